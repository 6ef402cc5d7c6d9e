#include "sim/sim_world.h"

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tether::sim {
namespace {

void Echo(SimWorld&, WorkerId, Agent& agent) {
  agent.RegisterHandler(
      wire::TEST_CALL, [](std::shared_ptr<IncomingCall> call) {
        call->Reply("echo:" + call->request().envelope.payload(), {});
      });
}

std::unique_ptr<SimWorld> MakeWorld(int n, uint64_t seed,
                                    const std::string& faults = "none") {
  SimWorldOptions o;
  o.num_workers = n;
  o.seed = seed;
  o.faults = FaultSpec::Parse(faults).value();
  o.agent.default_timeout = absl::Seconds(5);
  o.agent.shutdown_timeout = absl::Seconds(30);
  o.on_agent = Echo;
  auto world = SimWorld::Create(std::move(o));
  EXPECT_TRUE(world.ok()) << world.status();
  return std::move(world).value();
}

TEST(SimWorldTest, CallAndReplyInVirtualTime) {
  auto world = MakeWorld(3, 7);
  ASSERT_TRUE(world->Start().ok());
  Future<Message> f = world->agent(0).Call(2, wire::TEST_CALL, "hi", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  ASSERT_TRUE(f.result().ok()) << f.result().status();
  EXPECT_EQ(f.result()->envelope.payload(), "echo:hi");
  // Two one-way latencies of at most 500us each.
  EXPECT_GT(world->Elapsed(), absl::ZeroDuration());
  EXPECT_LE(world->Elapsed(), absl::Milliseconds(1));
  EXPECT_EQ(world->agent(0).self().name, "worker0");
}

TEST(SimWorldTest, TimeoutFiresAtVirtualDeadline) {
  std::vector<std::shared_ptr<IncomingCall>>
      never_replied;  // alive, unanswered
  SimWorldOptions o;
  o.num_workers = 2;
  o.on_agent = [&](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [&](std::shared_ptr<IncomingCall> call) {
      never_replied.push_back(call);
    });
  };
  auto world = SimWorld::Create(o).value();
  ASSERT_TRUE(world->Start().ok());
  const absl::Time start = world->clock(0).Now();
  Future<Message> f = world->agent(0).Call(1, wire::TEST_CALL, "x", {},
                                           absl::Milliseconds(250));
  ASSERT_TRUE(world->RunUntilReady(f));
  EXPECT_EQ(f.result().status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(world->clock(0).Now() - start, absl::Milliseconds(250));
  never_replied.clear();  // replies late, before the world goes
  world->RunUntilIdle();
}

TEST(SimWorldTest, GracefulShutdownTerminatesAndIdles) {
  auto world = MakeWorld(4, 3);
  ASSERT_TRUE(world->Start().ok());
  std::vector<Future<Message>> calls;
  for (int i = 0; i < 4; ++i)
    calls.push_back(
        world->agent(i).Call((i + 1) % 4, wire::TEST_CALL, "c", {}));
  auto done = world->ShutdownAll(true);
  ASSERT_TRUE(world->RunUntilIdle());
  for (auto& f : calls) EXPECT_TRUE(f.ready() && f.result().ok());
  for (auto& f : done)
    EXPECT_TRUE(f.ready() && f.result().ok()) << f.result().status();
}

TEST(SimWorldTest, SameSeedSameTraceDifferentSeedDifferentTrace) {
  auto run = [](uint64_t seed) {
    auto world =
        MakeWorld(3, seed, "drop=0.05,dup=0.1,reorder=0.2,delay=0..5ms");
    EXPECT_TRUE(world->Start().ok());
    std::vector<Future<Message>> calls;
    for (int i = 0; i < 30; ++i) {
      calls.push_back(world->agent(i % 3).Call((i + 1) % 3, wire::TEST_CALL,
                                               std::to_string(i), {},
                                               absl::Seconds(1)));
    }
    world->RunFor(absl::Seconds(2));
    world->ShutdownAll(true);
    EXPECT_TRUE(world->RunUntilIdle());
    for (auto& f : calls) EXPECT_TRUE(f.ready());
    return world->trace_hash();
  };
  EXPECT_EQ(run(11), run(11));
  EXPECT_NE(run(11), run(12));
}

TEST(SimWorldTest, CrashFailsCallsWithUnavailableAndRestartServesAgain) {
  std::vector<std::shared_ptr<IncomingCall>> held;
  SimWorldOptions o;
  o.num_workers = 2;
  o.on_agent = [&](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [&](std::shared_ptr<IncomingCall> call) {
      if (call->request().envelope.payload() == "hold") {
        held.push_back(call);
      } else {
        call->Reply("ok", {});
      }
    });
  };
  auto world = SimWorld::Create(o).value();
  ASSERT_TRUE(world->Start().ok());
  Future<Message> f =
      world->agent(0).Call(1, wire::TEST_CALL, "hold", {}, absl::Seconds(10));
  world->RunFor(absl::Milliseconds(5));
  world->Crash(1);
  EXPECT_TRUE(world->crashed(1));
  ASSERT_TRUE(world->RunUntilReady(f));
  EXPECT_EQ(f.result().status().code(), absl::StatusCode::kUnavailable)
      << f.result().status();
  EXPECT_LT(world->Elapsed(), absl::Seconds(1));

  ASSERT_TRUE(world->Restart(1).ok());
  EXPECT_EQ(world->incarnation(1), 1u);
  EXPECT_FALSE(world->Restart(1).ok());
  Future<Message> g =
      world->agent(0).Call(1, wire::TEST_CALL, "again", {}, absl::Seconds(10));
  ASSERT_TRUE(world->RunUntilReady(g));
  // The first send after the failure reconnects to the new incarnation.
  ASSERT_TRUE(g.result().ok()) << g.result().status();
  held.clear();
}

TEST(SimWorldTest, PlannedCrashFromFaultSpec) {
  auto world = MakeWorld(3, 5, "crash=2@100ms..300ms");
  ASSERT_TRUE(world->Start().ok());
  world->RunFor(absl::Milliseconds(150));
  EXPECT_TRUE(world->crashed(2));
  world->RunFor(absl::Milliseconds(200));
  EXPECT_FALSE(world->crashed(2));
  EXPECT_EQ(world->incarnation(2), 1u);
}

// A handler that forwards keeps its IncomingCall in the forwarded call's
// callback, inside its own agent's pending calls. Tearing the world down
// mid-call must not destroy that call after the agent's other members (it
// replies through them).
TEST(SimWorldTest, TeardownWithForwardedCallsInFlight) {
  std::vector<std::shared_ptr<IncomingCall>> held;
  {
    SimWorldOptions o;
    o.num_workers = 3;
    o.on_agent = [&](SimWorld& world, WorkerId w, Agent& a) {
      a.RegisterHandler(wire::TEST_CALL,
                        [&world, &held, w](std::shared_ptr<IncomingCall> call) {
                          if (w == 2) {
                            held.push_back(call);  // never answered
                            return;
                          }
                          world.agent(w)
                              .Call(2, wire::TEST_CALL, "inner", {},
                                    absl::ZeroDuration())
                              .Then([call](const absl::StatusOr<Message>& r) {
                                call->Reply("outer", {});
                              });
                        });
    };
    auto world = SimWorld::Create(o).value();
    ASSERT_TRUE(world->Start().ok());
    Future<Message> f =
        world->agent(0).Call(1, wire::TEST_CALL, "x", {}, absl::ZeroDuration());
    world->RunFor(absl::Milliseconds(10));
    EXPECT_FALSE(f.ready());
    EXPECT_EQ(held.size(), 1u);
    world->Crash(0);
    // Worker 1 crashes in the middle of a graceful shutdown, its forwarded call pending.
    world->agent(1).Shutdown(true);
    world->RunFor(absl::Milliseconds(5));
    world->Crash(1);
    held.clear();  // worker 2's reply is owed by the test: settle it while its agent lives
  }  // the world goes with calls pending in crashed agents 0 and 1
}

TEST(SimWorldTest, BadOptionsAreInvalidArgument) {
  SimWorldOptions o;
  o.num_workers = 0;
  EXPECT_EQ(SimWorld::Create(o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.num_workers = 2;
  o.faults = FaultSpec::Parse("crash=5@1s").value();
  auto w = SimWorld::Create(o);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(w.status().message().find("crash=5@1s"), std::string::npos)
      << w.status();
}

}  // namespace
}  // namespace tether::sim
