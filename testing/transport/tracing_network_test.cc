#include "transport/tracing/tracing_network.h"

#include <cstdio>
#include <memory>

#include "core/agent.h"
#include "gtest/gtest.h"
#include "sim/sim_world.h"
#include "testing/transport/trace_text.h"

namespace tether {
namespace {

using ::tether::testing::Count;
using ::tether::testing::ReadFile;

TEST(TracingNetworkTest, WritesCallsMessagesAndFailures) {
  sim::SimWorldOptions o;
  o.num_workers = 3;
  o.on_agent = [](sim::SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall> c) {
      if (c->request().envelope.payload() == "fail") {
        c->ReplyError(absl::InvalidArgumentError("bad \"input\""));
      } else if (c->request().envelope.payload() == "raise") {
        c->ReplyRaised("an exception", {});
      } else {
        c->Reply("ok", {});
      }
    });
  };
  auto world = sim::SimWorld::Create(o).value();
  ASSERT_TRUE(world->StartWorker(1).ok());
  ASSERT_TRUE(world->StartWorker(2).ok());
  const std::string path = ::testing::TempDir() + "/trace-worker0.json";
  auto traced = std::make_unique<TracingNetwork>(
      &world->network(0), &world->clock(0), path, "worker0");
  AgentOptions a;
  a.self = 0;
  a.workers = world->worker_infos();
  auto agent =
      Agent::Create(a, &world->clock(0), traced.get(), &world->executor(0))
          .value();
  ASSERT_TRUE(agent->Start().ok());
  auto ok = agent->Call(1, wire::TEST_CALL, "x", {});
  auto failed = agent->Call(1, wire::TEST_CALL, "fail", {});
  auto raised = agent->Call(1, wire::TEST_CALL, "raise", {});
  ASSERT_TRUE(world->RunUntil(
      [&] { return ok.ready() && failed.ready() && raised.ready(); }));
  // An exception the function raised is the call's result, flagged.
  ASSERT_TRUE(raised.result().ok());
  EXPECT_TRUE(raised.result()->envelope.raised());
  EXPECT_FALSE(ok.result()->envelope.raised());
  world->Crash(2);
  world->RunFor(absl::Seconds(1));
  auto done = agent->Shutdown(false);
  world->RunUntilIdle();
  std::string text = ReadFile(path);
  EXPECT_EQ(text.rfind("{\"traceEvents\":[", 0), 0u) << text.substr(0, 100);
  EXPECT_EQ(Count(text, "\"send TEST_CALL\""), 3);
  EXPECT_EQ(Count(text, "\"recv RESPONSE\""), 2);
  EXPECT_EQ(Count(text, "{\"name\":\"call raised\",\"cat\":\"error\""), 1);
  EXPECT_EQ(Count(text, "\"recv ERROR_RESPONSE\""), 1);
  // The error travels, escaped: in the reply's event and its marker.
  EXPECT_EQ(Count(text, "bad \\\"input\\\""), 2);
  EXPECT_EQ(Count(text, "{\"name\":\"call failed\",\"cat\":\"error\""), 1);
  EXPECT_EQ(Count(text, "\"replied with error\""), 0);
  EXPECT_EQ(Count(text, "\"ph\":\"b\""), 3);
  EXPECT_EQ(Count(text, "\"ph\":\"e\""), 3);
  EXPECT_EQ(Count(text, "\"peer 2 failed\""), 1);
  EXPECT_EQ(Count(text, "\"process_name\""), 1);
  EXPECT_NE(text.find("\"otherData\":{\"worker\":\"worker0\",\"id\":0}"),
            std::string::npos);
  std::remove(path.c_str());
}

TEST(TracingNetworkTest, MarksAnErrorReplyOnTheCalleesTrack) {
  sim::SimWorldOptions o;
  o.num_workers = 2;
  auto world = sim::SimWorld::Create(o).value();
  ASSERT_TRUE(world->StartWorker(0).ok());
  const std::string path = ::testing::TempDir() + "/trace-callee.json";
  auto traced = std::make_unique<TracingNetwork>(
      &world->network(1), &world->clock(1), path, "worker1");
  AgentOptions a;
  a.self = 1;
  a.workers = world->worker_infos();
  auto agent =
      Agent::Create(a, &world->clock(1), traced.get(), &world->executor(1))
          .value();
  agent->RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall> c) {
    c->ReplyError(absl::NotFoundError("no such thing"));
  });
  ASSERT_TRUE(agent->Start().ok());
  auto failed = world->agent(0).Call(1, wire::TEST_CALL, "x", {});
  ASSERT_TRUE(world->RunUntilReady(failed));
  EXPECT_FALSE(failed.result().ok());
  auto done = agent->Shutdown(false);
  world->RunUntilIdle();
  traced->Stop();
  std::string text = ReadFile(path);
  EXPECT_EQ(Count(text, "\"send ERROR_RESPONSE\""), 1) << text;
  EXPECT_EQ(Count(text, "{\"name\":\"replied with error\",\"cat\":\"error\""),
            1)
      << text;
  EXPECT_EQ(Count(text, "\"error\":\"no such thing\""), 2);
  EXPECT_EQ(Count(text, "\"call failed\""), 0);
  std::remove(path.c_str());
}

TEST(TracingNetworkTest, UnwritablePathIsAnError) {
  sim::SimWorldOptions o;
  o.num_workers = 1;
  auto world = sim::SimWorld::Create(o).value();
  TracingNetwork traced(&world->network(0), &world->clock(0),
                        "/nonexistent/dir/t.json", "w");
  absl::Status s = traced.Flush();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("/nonexistent/dir/t.json"), std::string::npos);
}

}  // namespace
}  // namespace tether
