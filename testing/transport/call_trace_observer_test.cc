#include "transport/tracing/call_trace_observer.h"

#include <memory>
#include <string>

#include "core/agent.h"
#include "gtest/gtest.h"
#include "sim/sim_world.h"
#include "testing/transport/trace_text.h"
#include "transport/tracing/tracing_network.h"

namespace tether {
namespace {

using ::tether::testing::ReadFile;

TEST(CallTraceObserverTest, MarksTheCallsTheAgentEndedWithAnError) {
  sim::SimWorldOptions o;
  o.num_workers = 2;
  std::vector<std::shared_ptr<IncomingCall>> held;
  o.on_agent = [&held](sim::SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL,
                      [&held](std::shared_ptr<IncomingCall> c) {
                        held.push_back(c);  // never answered in time
                      });
  };
  auto world = sim::SimWorld::Create(std::move(o)).value();
  ASSERT_TRUE(world->StartWorker(1).ok());

  // Worker 0 runs its own agent: traced, its failures observed.
  const std::string path = ::testing::TempDir() + "/call-trace.json";
  TracingNetwork traced(&world->network(0), &world->clock(0), path, "worker0");
  CallTraceObserver observer(&traced);
  AgentOptions a;
  a.self = 0;
  a.workers = world->worker_infos();
  a.call_observer = &observer;
  auto agent =
      Agent::Create(a, &world->clock(0), &traced, &world->executor(0)).value();
  ASSERT_TRUE(agent->Start().ok());
  Future<Message> call =
      agent->Call(1, wire::TEST_CALL, "x", {}, absl::Milliseconds(50));
  ASSERT_TRUE(world->RunUntilReady(call));
  EXPECT_EQ(call.result().status().code(), absl::StatusCode::kDeadlineExceeded);
  agent->Shutdown(/*graceful=*/false);
  world->RunUntilIdle();
  traced.Stop();
  held.clear();

  std::string trace = ReadFile(path);
  EXPECT_NE(trace.find("\"call failed\""), std::string::npos) << trace;
  EXPECT_NE(trace.find("TEST_CALL #"), std::string::npos) << trace;
  EXPECT_NE(trace.find("to worker 1: DEADLINE_EXCEEDED"), std::string::npos)
      << trace;
}

}  // namespace
}  // namespace tether
