#include "transport/faulty/faulty_network.h"

#include <memory>

#include "core/agent.h"
#include "gtest/gtest.h"
#include "sim/sim_world.h"

namespace tether {
namespace {

// Worker 1 is the world's own agent (echo); worker 0 is an agent over a
// FaultyNetwork.
struct Fixture {
  std::unique_ptr<sim::SimWorld> world;
  std::unique_ptr<FaultyNetwork> faulty;
  std::unique_ptr<Agent> agent;
};

Fixture Make(FaultyNetworkOptions options) {
  Fixture f;
  sim::SimWorldOptions o;
  o.num_workers = 2;
  o.order = sim::RunOrder::kFifo;
  o.on_agent = [](sim::SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall> c) {
      c->Reply(c->request().envelope.payload(), {});
    });
  };
  f.world = sim::SimWorld::Create(o).value();
  EXPECT_TRUE(f.world->StartWorker(1).ok());
  f.faulty = std::make_unique<FaultyNetwork>(
      &f.world->network(0), &f.world->clock(0), std::move(options));
  AgentOptions a;
  a.self = 0;
  a.workers = f.world->worker_infos();
  f.agent = Agent::Create(a, &f.world->clock(0), f.faulty.get(),
                          &f.world->executor(0))
                .value();
  EXPECT_TRUE(f.agent->Start().ok());
  return f;
}

TEST(FaultyNetworkTest, FailsTheFirstSendsOfAType) {
  FaultyNetworkOptions o =
      FaultyNetworkOptions::FromNames({"TEST_CALL"}, 2, {}).value();
  Fixture f = Make(o);
  for (int i = 0; i < 3; ++i) {
    auto call = f.agent->Call(1, wire::TEST_CALL, "x", {});
    ASSERT_TRUE(f.world->RunUntilReady(call));
    if (i < 2) {
      EXPECT_EQ(call.result().status().code(), absl::StatusCode::kUnavailable);
      EXPECT_NE(call.result().status().message().find(
                    "failed intentionally for TEST_CALL"),
                std::string::npos);
    } else {
      EXPECT_TRUE(call.result().ok()) << call.result().status();
    }
  }
  EXPECT_EQ(f.faulty->failed().at(wire::TEST_CALL), 2);
  f.agent->Shutdown(false);
  f.world->RunUntilIdle();
}

TEST(FaultyNetworkTest, DelaysATypeAndLetsOthersOvertake) {
  FaultyNetworkOptions o;
  o.delays[wire::TEST_CALL] = absl::Seconds(2);
  Fixture f = Make(o);
  absl::Time start = f.world->Now();
  auto slow = f.agent->Call(1, wire::TEST_CALL, "slow", {});
  auto unknown_handler = f.agent->Call(1, wire::PYTHON_CALL, "fast", {});
  ASSERT_TRUE(f.world->RunUntilReady(unknown_handler));
  EXPECT_FALSE(slow.ready());  // The undelayed call's reply came first.
  ASSERT_TRUE(f.world->RunUntilReady(slow));
  EXPECT_TRUE(slow.result().ok());
  EXPECT_GE(f.world->Now() - start, absl::Seconds(2));
  f.agent->Shutdown(false);
  f.world->RunUntilIdle();
}

TEST(FaultyNetworkTest, BadOptionsAreRefused) {
  EXPECT_EQ(FaultyNetworkOptions::FromNames({"NOPE"}, 1, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FaultyNetworkOptions::FromNames({}, -1, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FaultyNetworkOptions::FromNames({}, 0, {{"PYTHON_CALL", -2.0}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(FaultyNetworkOptions::FromNames({}, 0, {}).value().empty());
}

}  // namespace
}  // namespace tether
