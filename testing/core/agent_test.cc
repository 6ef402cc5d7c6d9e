// Agent behaviour, driven by the deterministic simulator (no threads, virtual
// time).
#include "core/agent.h"

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "core/callback_gate.h"
#include "core/inline_executor.h"
#include "core/status.h"
#include "gtest/gtest.h"
#include "sim/sim_world.h"

namespace tether {
namespace {

using sim::SimWorld;
using sim::SimWorldOptions;

// Replies with the request's payload and buffers.
void Echo(std::shared_ptr<IncomingCall> call) {
  call->Reply(call->request().envelope.payload(), call->request().buffers);
}

std::unique_ptr<SimWorld> MakeWorld(
    int n, const std::string& faults = "none", uint64_t seed = 1,
    std::function<void(SimWorld&, WorkerId, Agent&)> on_agent = {}) {
  SimWorldOptions o;
  o.num_workers = n;
  o.seed = seed;
  o.faults = sim::FaultSpec::Parse(faults).value();
  o.agent.default_timeout = absl::Seconds(10);
  o.on_agent = on_agent ? on_agent : [](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, Echo);
  };
  auto world = SimWorld::Create(std::move(o));
  EXPECT_TRUE(world.ok()) << world.status();
  EXPECT_TRUE((*world)->Start().ok());
  return std::move(*world);
}

TEST(AgentTest, CreateRejectsBadRegistries) {
  sim::SimWorldOptions o;
  o.num_workers = 2;
  o.names = {"a", "a"};
  auto world = SimWorld::Create(o);
  ASSERT_FALSE(world.ok());
  EXPECT_EQ(world.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(world.status().message().find("duplicate worker name 'a'"),
            std::string::npos)
      << world.status();
}

TEST(AgentTest, WorkerRegistryLooksUpByNameAndId) {
  auto world = MakeWorld(3);
  Agent& a = world->agent(0);
  EXPECT_EQ(a.self().name, "worker0");
  ASSERT_EQ(a.workers().size(), 3u);
  EXPECT_EQ(a.GetWorker("worker2")->id, 2);
  EXPECT_EQ(a.GetWorker(1)->name, "worker1");
  auto unknown = a.GetWorker("nobody");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("'nobody'"), std::string::npos);
  EXPECT_EQ(a.GetWorker(7).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(AgentTest, CallReturnsReplyWithBuffers) {
  auto world = MakeWorld(2);
  Future<Message> f =
      world->agent(0).Call(1, wire::TEST_CALL, "ping",
                           {Buffer::CopyFrom("abc"), Buffer::CopyFrom("")});
  ASSERT_TRUE(world->RunUntilReady(f));
  ASSERT_TRUE(f.result().ok()) << f.result().status();
  EXPECT_EQ(f.result()->envelope.payload(), "ping");
  ASSERT_EQ(f.result()->buffers.size(), 2u);
  EXPECT_EQ(f.result()->buffers[0].view(), "abc");
  EXPECT_EQ(f.result()->envelope.from(), 1);
}

TEST(AgentTest, CallToSelfWorks) {
  auto world = MakeWorld(2);
  Future<Message> f = world->agent(1).Call(1, wire::TEST_CALL, "me", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  ASSERT_TRUE(f.result().ok()) << f.result().status();
  EXPECT_EQ(f.result()->envelope.payload(), "me");
}

TEST(AgentTest, RemoteErrorTravelsIntact) {
  auto world = MakeWorld(2, "none", 1, [](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall> call) {
      call->ReplyError(absl::FailedPreconditionError(
          "ValueError: bad thing\nTraceback: ..."));
    });
  });
  Future<Message> f = world->agent(0).Call(1, wire::TEST_CALL, "", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  EXPECT_EQ(f.result().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(f.result().status().message(),
            "ValueError: bad thing\nTraceback: ...");
}

TEST(AgentTest, MissingHandlerIsUnimplemented) {
  auto world = MakeWorld(2);
  Future<Message> f = world->agent(0).Call(1, wire::PYTHON_CALL, "", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  EXPECT_EQ(f.result().status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(f.result().status().message().find("PYTHON_CALL"),
            std::string::npos);
}

TEST(AgentTest, HandlerDroppingTheCallAnswersInternal) {
  auto world = MakeWorld(2, "none", 1, [](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall>) {});
  });
  Future<Message> f = world->agent(0).Call(1, wire::TEST_CALL, "", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  EXPECT_EQ(f.result().status().code(), absl::StatusCode::kInternal);
}

TEST(AgentTest, BadArgumentsFailAtOnce) {
  auto world = MakeWorld(2);
  Agent& a = world->agent(0);
  auto unknown = a.Call(9, wire::TEST_CALL, "", {});
  ASSERT_TRUE(unknown.ready());
  EXPECT_EQ(unknown.result().status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.result().status().message().find("9"), std::string::npos);
  auto reply_type = a.Call(1, wire::RESPONSE, "", {});
  ASSERT_TRUE(reply_type.ready());
  EXPECT_EQ(reply_type.result().status().code(),
            absl::StatusCode::kInvalidArgument);
  auto negative = a.Call(1, wire::TEST_CALL, "", {}, absl::Seconds(-1));
  ASSERT_TRUE(negative.ready());
  EXPECT_EQ(negative.result().status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Never replies; keeps the call so it is not answered as dropped.
struct Hoarder {
  std::vector<std::shared_ptr<IncomingCall>> calls;
};

// Keeps "hold" calls unanswered in `hoard`; answers any other with "ok".
Handler HoldOrReplyOk(std::shared_ptr<Hoarder> hoard) {
  return [hoard](std::shared_ptr<IncomingCall> c) {
    if (c->request().envelope.payload() == "hold") {
      hoard->calls.push_back(c);
    } else {
      c->Reply("ok", {});
    }
  };
}

TEST(AgentTest, TimeoutsDefaultOverrideAndNone) {
  auto hoard = std::make_shared<Hoarder>();
  auto world = MakeWorld(2, "none", 1, [hoard](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL,
                      [hoard](std::shared_ptr<IncomingCall> c) {
                        hoard->calls.push_back(c);
                      });
  });
  Agent& a = world->agent(0);
  absl::Time start = world->Now();
  auto by_default = a.Call(1, wire::TEST_CALL, "", {});
  auto overridden = a.Call(1, wire::TEST_CALL, "", {}, absl::Seconds(2));
  auto none = a.Call(1, wire::TEST_CALL, "", {}, absl::ZeroDuration());

  ASSERT_TRUE(world->RunUntilReady(overridden));
  EXPECT_EQ(overridden.result().status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(overridden.result().status().message().find(
                "RPC ran for more than set timeout (2000 ms)"),
            std::string::npos)
      << overridden.result().status();
  // The kind travels as data (a payload), not only in the text.
  EXPECT_TRUE(IsRpcTimeout(overridden.result().status()));
  EXPECT_FALSE(IsRpcTimeout(absl::DeadlineExceededError("another deadline")));
  EXPECT_GE(world->Now() - start, absl::Seconds(2));
  EXPECT_FALSE(by_default.ready());

  ASSERT_TRUE(world->RunUntilReady(by_default));
  EXPECT_EQ(by_default.result().status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(world->Now() - start, absl::Seconds(10));
  EXPECT_LT(world->Now() - start, absl::Seconds(11));

  world->RunFor(absl::Hours(2));
  EXPECT_FALSE(none.ready());
  EXPECT_EQ(a.GetDebugInfo()["client_active_calls"], 1);
  EXPECT_EQ(a.GetDebugInfo()["calls_timed_out"], 2);
  // The server saw all three and still holds them.
  EXPECT_EQ(world->agent(1).GetDebugInfo()["server_active_calls"], 3);

  a.set_default_timeout(absl::Milliseconds(5));
  auto short_default = a.Call(1, wire::TEST_CALL, "", {});
  ASSERT_TRUE(world->RunUntilReady(short_default));
  EXPECT_EQ(short_default.result().status().code(),
            absl::StatusCode::kDeadlineExceeded);

  // A late reply to a timed-out call is ignored.
  hoard->calls[0]->Reply("late", {});
  world->RunFor(absl::Seconds(1));
  EXPECT_EQ(by_default.result().status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(a.GetDebugInfo()["stale_replies"], 1);
  hoard->calls.clear();
}

// GetDebugInfo's keys are what tools and tether.rpc's get_debug_info read: the gauges always,
// each event count once it has happened (as when the counts were a string-keyed map).
TEST(AgentTest, DebugInfoKeysAreGaugesAlwaysAndCountsOnceNonZero) {
  auto world = MakeWorld(2);
  Agent& a = world->agent(0);
  auto keys = [](const std::map<std::string, int64_t>& info) {
    std::vector<std::string> out;
    for (const auto& [key, value] : info) out.push_back(key);
    return out;
  };
  const std::vector<std::string> gauges = {"client_active_calls", "oldest_call_age_ms",
                                           "peers_failed_now", "server_active_calls",
                                           "world_size"};
  EXPECT_EQ(keys(a.GetDebugInfo()), gauges);
  auto f = a.Call(1, wire::TEST_CALL, "x", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  ASSERT_TRUE(f.result().ok()) << f.result().status();
  std::map<std::string, int64_t> info = a.GetDebugInfo();
  EXPECT_EQ(info["calls_sent"], 1);
  EXPECT_EQ(info.count("calls_failed"), 0u);
  EXPECT_EQ(info.count("calls_received"), 0u);
  EXPECT_EQ(world->agent(1).GetDebugInfo()["calls_received"], 1);
  world->agent(1).OnPeerFailed(0, absl::UnavailableError("gone"));
  world->RunUntilIdle();
  EXPECT_EQ(world->agent(1).GetDebugInfo()["peers_failed"], 1);
  EXPECT_EQ(world->agent(1).GetDebugInfo()["peers_failed_now"], 1);
  EXPECT_NE(world->agent(1).Summary().find("  peers_failed = 1\n"), std::string::npos);
}

TEST(AgentTest, HandlerSeesTheCallersDeadline) {
  absl::Time seen_deadline;
  auto world = MakeWorld(2, "none", 1, [&](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [&](std::shared_ptr<IncomingCall> c) {
      seen_deadline = c->deadline();
      c->Reply("", {});
    });
  });
  absl::Time start = world->Now();
  auto f = world->agent(0).Call(1, wire::TEST_CALL, "", {}, absl::Seconds(3));
  ASSERT_TRUE(world->RunUntilReady(f));
  EXPECT_GT(seen_deadline, start);
  EXPECT_LE(seen_deadline - start, absl::Seconds(3) + absl::Seconds(1));
}

TEST(AgentTest, NestedCallsDoNotBlock) {
  // worker0 -> worker1 -> worker2, worker1 replies once worker2 has.
  auto world = MakeWorld(3, "none", 1, [](SimWorld&, WorkerId w, Agent& a) {
    Agent* agent = &a;
    a.RegisterHandler(
        wire::TEST_CALL, [agent, w](std::shared_ptr<IncomingCall> c) {
          if (w == 2) {
            c->Reply("leaf", {});
            return;
          }
          agent->Call(w + 1, wire::TEST_CALL, "", {})
              .Then([c, w](const absl::StatusOr<Message>& r) {
                if (!r.ok()) return c->ReplyError(r.status());
                c->Reply(absl::StrCat(w, ">", r->envelope.payload()), {});
              });
        });
  });
  auto f = world->agent(0).Call(1, wire::TEST_CALL, "", {});
  ASSERT_TRUE(world->RunUntilReady(f));
  ASSERT_TRUE(f.result().ok()) << f.result().status();
  EXPECT_EQ(f.result()->envelope.payload(), "1>leaf");
}

TEST(AgentTest, PeerCrashFailsOnlyItsCalls) {
  auto hoard = std::make_shared<Hoarder>();
  std::vector<std::pair<WorkerId, absl::StatusCode>> told;
  auto world =
      MakeWorld(3, "none", 1, [&, hoard](SimWorld&, WorkerId, Agent& a) {
        a.RegisterHandler(wire::TEST_CALL, HoldOrReplyOk(hoard));
        a.AddPeerFailureListener([&told](WorkerId peer, const absl::Status& s) {
          told.emplace_back(peer, s.code());
        });
      });
  Agent& a = world->agent(0);
  auto to_victim = a.Call(1, wire::TEST_CALL, "hold", {}, absl::ZeroDuration());
  auto to_other = a.Call(2, wire::TEST_CALL, "hold", {}, absl::ZeroDuration());
  world->RunFor(absl::Milliseconds(100));
  ASSERT_EQ(hoard->calls.size(), 2u);
  world->Crash(1);
  ASSERT_TRUE(world->RunUntilReady(to_victim));
  EXPECT_EQ(to_victim.result().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(to_victim.result().status().message().find("worker1"),
            std::string::npos)
      << to_victim.result().status();
  world->RunFor(absl::Seconds(1));
  EXPECT_FALSE(to_other.ready());
  EXPECT_FALSE(told.empty());
  EXPECT_EQ(told[0].first, 1);
  // Other peers still serve.
  auto again = a.Call(2, wire::TEST_CALL, "x", {});
  ASSERT_TRUE(world->RunUntilReady(again));
  EXPECT_TRUE(again.result().ok());
  hoard->calls.clear();
  world->RunUntilIdle();
}

class RecordingCallObserver : public CallObserver {
 public:
  void OnCallFailed(WorkerId to, MessageType, uint64_t,
                    const absl::Status& status) override {
    failures.emplace_back(to, status.code());
  }
  std::vector<std::pair<WorkerId, absl::StatusCode>> failures;
};

TEST(AgentTest, CallObserverHearsOfTheFailuresTheAgentDecided) {
  RecordingCallObserver observer;
  auto hoard = std::make_shared<Hoarder>();
  SimWorldOptions o;
  o.num_workers = 3;
  o.agent.call_observer = &observer;
  o.on_agent = [hoard](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(
        wire::TEST_CALL, [hoard](std::shared_ptr<IncomingCall> c) {
          const std::string& p = c->request().envelope.payload();
          if (p == "hold") {
            hoard->calls.push_back(c);
          } else if (p == "fail") {
            c->ReplyError(absl::InvalidArgumentError("the callee says no"));
          } else {
            Echo(c);
          }
        });
  };
  auto world = SimWorld::Create(std::move(o)).value();
  ASSERT_TRUE(world->Start().ok());
  Agent& a = world->agent(0);
  auto timed_out = a.Call(1, wire::TEST_CALL, "hold", {}, absl::Seconds(1));
  auto refused = a.Call(1, wire::TEST_CALL, "fail", {});
  auto fine = a.Call(1, wire::TEST_CALL, "ok", {});
  ASSERT_TRUE(world->RunUntilReady(timed_out));
  ASSERT_TRUE(world->RunUntilReady(refused));
  ASSERT_TRUE(world->RunUntilReady(fine));
  EXPECT_EQ(refused.result().status().code(),
            absl::StatusCode::kInvalidArgument);
  auto lost = a.Call(2, wire::TEST_CALL, "hold", {}, absl::ZeroDuration());
  world->RunFor(absl::Milliseconds(100));
  world->Crash(2);
  ASSERT_TRUE(world->RunUntilReady(lost));
  // The callee's own error is its reply, not the agent's decision.
  std::vector<std::pair<WorkerId, absl::StatusCode>> want = {
      {1, absl::StatusCode::kDeadlineExceeded},
      {2, absl::StatusCode::kUnavailable}};
  EXPECT_EQ(observer.failures, want);
  hoard->calls.clear();
  world->RunUntilIdle();
}

TEST(AgentTest, UngracefulShutdownCancelsPendingCalls) {
  auto hoard = std::make_shared<Hoarder>();
  auto world = MakeWorld(2, "none", 1, [hoard](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL,
                      [hoard](std::shared_ptr<IncomingCall> c) {
                        hoard->calls.push_back(c);
                      });
  });
  Agent& a = world->agent(0);
  auto pending = a.Call(1, wire::TEST_CALL, "", {}, absl::ZeroDuration());
  world->RunFor(absl::Milliseconds(10));
  auto done = a.Shutdown(/*graceful=*/false);
  ASSERT_TRUE(world->RunUntilReady(pending));
  EXPECT_EQ(pending.result().status().code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(world->RunUntilReady(done));
  EXPECT_TRUE(done.result().ok());
  EXPECT_TRUE(a.is_shut_down());
  auto after = a.Call(1, wire::TEST_CALL, "", {});
  ASSERT_TRUE(after.ready());
  EXPECT_EQ(after.result().status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(after.result().status().message().find("shut down"),
            std::string::npos);
  hoard->calls.clear();
}

TEST(AgentTest, UngracefulShutdownEndsAPendingGracefulOne) {
  // worker1 never shuts down: worker0's graceful barrier would wait for ever (no timeout).
  auto world = MakeWorld(2, "none", 1, [](SimWorld&, WorkerId, Agent&) {});
  Agent& a = world->agent(0);
  auto graceful = a.Shutdown(/*graceful=*/true);
  world->RunFor(absl::Seconds(5));
  ASSERT_FALSE(graceful.ready());
  auto stop = a.Shutdown(/*graceful=*/false);
  ASSERT_TRUE(world->RunUntilReady(stop));
  ASSERT_TRUE(graceful.ready());
  EXPECT_EQ(graceful.result().status().code(), absl::StatusCode::kCancelled)
      << graceful.result().status();
  EXPECT_TRUE(a.is_shut_down());
  // Idempotent from then on.
  EXPECT_TRUE(a.Shutdown(false).ready());
}

TEST(AgentTest, GracefulShutdownWaitsForCallsInFlight) {
  // worker1 answers after 3 s of virtual time; everyone shuts down at once.
  auto world = MakeWorld(3, "none", 1, [](SimWorld& w, WorkerId id, Agent& a) {
    Clock* clock = &w.clock(id);
    a.RegisterHandler(wire::TEST_CALL,
                      [clock](std::shared_ptr<IncomingCall> c) {
                        clock->Schedule(clock->Now() + absl::Seconds(3),
                                        [c] { c->Reply("slow", {}); });
                      });
  });
  std::vector<Future<Message>> calls;
  for (WorkerId from = 0; from < 3; ++from) {
    calls.push_back(
        world->agent(from).Call((from + 1) % 3, wire::TEST_CALL, "", {}));
  }
  world->RunFor(absl::Milliseconds(1));
  std::vector<Future<Unit>> done = world->ShutdownAll(true);
  world->RunUntilIdle();
  for (auto& c : calls) {
    ASSERT_TRUE(c.ready());
    EXPECT_TRUE(c.result().ok()) << c.result().status();
  }
  for (auto& d : done) {
    ASSERT_TRUE(d.ready());
    EXPECT_TRUE(d.result().ok()) << d.result().status();
  }
  EXPECT_GE(world->Elapsed(), absl::Seconds(3));
}

TEST(AgentTest, GracefulShutdownInEveryOrderUnderFaults) {
  for (uint64_t seed = 1; seed <= 30; ++seed) {
    auto world =
        MakeWorld(4, "drop=0.05,dup=0.05,delay=0..20ms,reorder=0.2", seed);
    std::vector<Future<Message>> calls;
    for (WorkerId from = 0; from < 4; ++from) {
      for (WorkerId to = 0; to < 4; ++to) {
        calls.push_back(world->agent(from).Call(to, wire::TEST_CALL, "", {},
                                                absl::Seconds(1)));
      }
    }
    std::vector<Future<Unit>> done;
    // Workers declare in an order that depends on the seed, some time apart.
    for (int i = 0; i < 4; ++i) {
      WorkerId w = static_cast<WorkerId>((i + seed) % 4);
      world->RunFor(absl::Milliseconds(seed % 7));
      done.push_back(world->agent(w).Shutdown(true));
    }
    ASSERT_TRUE(world->RunUntilIdle()) << "seed " << seed;
    for (auto& c : calls) {
      ASSERT_TRUE(c.ready()) << "seed " << seed;
      if (!c.result().ok()) {
        EXPECT_EQ(c.result().status().code(),
                  absl::StatusCode::kDeadlineExceeded)
            << "seed " << seed << ": " << c.result().status();
      }
    }
    for (auto& d : done) {
      ASSERT_TRUE(d.ready()) << "seed " << seed;
    }
    for (WorkerId w = 0; w < 4; ++w)
      EXPECT_TRUE(world->agent(w).is_shut_down());
  }
}

// Three workers declare their graceful shutdown 0, 1 and 2 s apart; each registers a joined
// listener (and worker 1 one whose work the barrier must wait for).
struct JoinWorld {
  std::unique_ptr<SimWorld> world;
  std::vector<absl::Duration> joined_at = std::vector<absl::Duration>(3, absl::ZeroDuration());
  std::vector<int> joined_runs = std::vector<int>(3, 0);
  int64_t work_pending = 0;
  uint64_t work_events = 0;
  absl::Duration work_done_at = absl::ZeroDuration();

  explicit JoinWorld(bool fails_on_lost_peer) {
    SimWorldOptions o;
    o.num_workers = 3;
    o.seed = 1;
    o.faults = sim::FaultSpec::Parse("none").value();
    o.agent.shutdown_timeout = absl::ZeroDuration();
    o.agent.shutdown_fails_on_lost_peer = fails_on_lost_peer;
    o.on_agent = [this](SimWorld& w, WorkerId id, Agent& a) {
      a.RegisterHandler(wire::TEST_CALL, Echo);
      a.AddShutdownJoinedListener([this, &w, id] {
        ++joined_runs[id];
        joined_at[id] = w.Elapsed();
        if (id != 1) return;
        // Work that takes 1 s after the join (as the RRef context's deletions do).
        work_pending = 1;
        ++work_events;
        Clock* clock = &w.clock(1);
        clock->Schedule(clock->Now() + absl::Seconds(1), [this, &w] {
          work_pending = 0;
          ++work_events;
          work_done_at = w.Elapsed();
        });
      });
      if (id == 1) {
        a.AddActivitySource([this] { return ActivitySnapshot{work_pending, work_events}; });
      }
    };
    auto created = SimWorld::Create(std::move(o));
    EXPECT_TRUE(created.ok()) << created.status();
    world = std::move(*created);
    EXPECT_TRUE(world->Start().ok());
  }
};

TEST(AgentTest, JoinedListenersRunOnceOnEveryWorkerAfterTheLastOneJoins) {
  JoinWorld j(/*fails_on_lost_peer=*/false);
  SimWorld& world = *j.world;
  std::vector<Future<Unit>> done;
  for (WorkerId w : {2, 0, 1}) {
    done.push_back(world.agent(w).Shutdown(true));
    if (w != 1) world.RunFor(absl::Seconds(1));
    // Until the last worker declares, nobody has run its listeners.
    for (int runs : j.joined_runs) EXPECT_EQ(runs, 0);
    if (w == 0) {
      ShutdownProgress p = world.agent(0).GetShutdownProgress();
      EXPECT_TRUE(p.pending);
      EXPECT_FALSE(p.joined);
      EXPECT_EQ(p.not_joined, std::vector<WorkerId>{1});
    }
  }
  ASSERT_TRUE(world.RunUntilIdle());
  for (auto& d : done) {
    ASSERT_TRUE(d.ready());
    EXPECT_TRUE(d.result().ok()) << d.result().status();
  }
  for (WorkerId w = 0; w < 3; ++w) {
    EXPECT_EQ(j.joined_runs[w], 1) << "worker " << w;
    EXPECT_GE(j.joined_at[w], absl::Seconds(2)) << "worker " << w;
  }
  // The barrier waited for the work worker 1's listener started.
  EXPECT_GE(j.work_done_at, absl::Seconds(3));
  EXPECT_GE(world.Elapsed(), j.work_done_at);
  EXPECT_FALSE(world.agent(0).GetShutdownProgress().pending);
}

TEST(AgentTest, PeerLostBeforeTheJoinFailsTheBarrierAtOnceNamingIt) {
  JoinWorld j(/*fails_on_lost_peer=*/true);
  SimWorld& world = *j.world;
  world.Crash(2);
  world.RunFor(absl::Milliseconds(100));
  // Worker 1 (a follower) declares first, then the leader.
  Future<Unit> follower = world.agent(1).Shutdown(true);
  world.RunFor(absl::Milliseconds(100));
  Future<Unit> leader = world.agent(0).Shutdown(true);
  ASSERT_TRUE(world.RunUntilIdle());
  for (Future<Unit>* f : {&leader, &follower}) {
    ASSERT_TRUE(f->ready());
    EXPECT_EQ(f->result().status().code(), absl::StatusCode::kUnavailable)
        << f->result().status();
    EXPECT_NE(f->result().status().message().find("worker2 is gone"), std::string::npos)
        << f->result().status();
  }
  EXPECT_NE(follower.result().status().message().find("the shutdown leader worker0 ended"),
            std::string::npos)
      << follower.result().status();
  EXPECT_LT(world.Elapsed(), absl::Seconds(1));
  for (int runs : j.joined_runs) EXPECT_EQ(runs, 0);
}

TEST(AgentTest, PeerLostAfterTheJoinCountsAsStopped) {
  JoinWorld j(/*fails_on_lost_peer=*/true);
  SimWorld& world = *j.world;
  std::vector<Future<Unit>> done;
  for (WorkerId w = 0; w < 3; ++w) done.push_back(world.agent(w).Shutdown(true));
  // Worker 1's listener work keeps the barrier open for 1 s after the join: worker 2 dies then.
  world.RunFor(absl::Milliseconds(500));
  ASSERT_EQ(j.joined_runs[2], 1);
  world.Crash(2);
  ASSERT_TRUE(world.RunUntilIdle());
  for (WorkerId w : {0, 1}) {
    ASSERT_TRUE(done[w].ready());
    EXPECT_TRUE(done[w].result().ok()) << done[w].result().status();
  }
}

TEST(AgentTest, FollowerWhoseLeaderIsGoneFailsAtOnce) {
  JoinWorld j(/*fails_on_lost_peer=*/true);
  SimWorld& world = *j.world;
  world.Crash(0);
  world.RunFor(absl::Milliseconds(100));
  Future<Unit> done = world.agent(1).Shutdown(true);
  ASSERT_TRUE(world.RunUntilReady(done));
  EXPECT_EQ(done.result().status().code(), absl::StatusCode::kUnavailable)
      << done.result().status();
  EXPECT_LT(world.Elapsed(), absl::Seconds(1));
}

TEST(AgentTest, DuplicatedRequestsRunOnce) {
  int runs = 0;
  auto world = MakeWorld(2, "dup=1.0", 3, [&](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, [&](std::shared_ptr<IncomingCall> c) {
      ++runs;
      c->Reply("", {});
    });
  });
  std::vector<Future<Message>> calls;
  for (int i = 0; i < 20; ++i)
    calls.push_back(world->agent(0).Call(1, wire::TEST_CALL, "", {}));
  world->RunFor(absl::Seconds(5));
  for (auto& c : calls) {
    ASSERT_TRUE(c.ready());
    EXPECT_TRUE(c.result().ok());
  }
  EXPECT_EQ(runs, 20);
  EXPECT_GT(world->agent(1).GetDebugInfo()["duplicates_dropped"], 0);
}

TEST(AgentTest, PeerStatsInFlightAgesAndSummary) {
  auto hoard = std::make_shared<Hoarder>();
  auto world = MakeWorld(3, "none", 1, [hoard](SimWorld&, WorkerId, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, HoldOrReplyOk(hoard));
  });
  Agent& a = world->agent(0);
  auto done = a.Call(1, wire::TEST_CALL, "12345", {Buffer::CopyFrom("abc")});
  ASSERT_TRUE(world->RunUntilReady(done));
  auto held = a.Call(2, wire::TEST_CALL, "hold", {}, absl::ZeroDuration());
  world->RunFor(absl::Seconds(3));
  std::map<WorkerId, PeerStats> stats = a.GetPeerStats();
  EXPECT_EQ(stats[1].calls_sent, 1);
  EXPECT_EQ(stats[1].bytes_sent, 8);  // "12345" + "abc"
  EXPECT_EQ(stats[1].messages_received, 1);
  EXPECT_EQ(stats[1].bytes_received, 2);  // "ok"
  EXPECT_EQ(stats[2].calls_sent, 1);
  EXPECT_EQ(stats[2].messages_received, 0);
  EXPECT_EQ(world->agent(1).GetPeerStats()[0].calls_received, 1);
  std::vector<InFlightCall> calls = a.GetInFlightCalls();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].to, 2);
  EXPECT_GE(calls[0].age, absl::Seconds(3));
  EXPECT_GE(a.GetDebugInfo()["oldest_call_age_ms"], 3000);
  std::string summary = a.Summary();
  EXPECT_NE(summary.find("worker2"), std::string::npos) << summary;
  EXPECT_NE(summary.find("TEST_CALL to worker2, for 3"), std::string::npos)
      << summary;
  hoard->calls.clear();
  world->RunUntilIdle();
}

// This test links the production //core:agent, where planted bugs are compiled out: setting one
// changes nothing. (//core:agent_planted runs the handler again; planted_bugs_test shows it.)
TEST(AgentTest, PlantedDuplicateBugRunsHandlerTwiceOnlyWhenCompiledIn) {
  int runs = 0;
  auto world = MakeWorld(2, "dup=1.0", 3, [&](SimWorld&, WorkerId, Agent& a) {
    a.set_planted_bugs(PlantedBugs{.process_duplicates = true});
    a.RegisterHandler(wire::TEST_CALL, [&](std::shared_ptr<IncomingCall> c) {
      ++runs;
      c->Reply("", {});
    });
  });
  auto f = world->agent(0).Call(1, wire::TEST_CALL, "", {});
  world->RunFor(absl::Seconds(5));
  EXPECT_FALSE(PlantedBugsCompiledIn());
  EXPECT_EQ(runs > 1, PlantedBugsCompiledIn()) << runs << " runs";
}

// --- Graceful shutdown as a follower, against a leader played by the test ---
//
// The simulator runs each executor task to completion, but a real thread pool
// does not: while one pool thread runs a task, another may run the next. These
// tests pin such an interleaving down with a scripted network and a queue
// executor the test drains itself.

// Virtual time that never advances; timers never fire.
class FrozenClock : public Clock {
 public:
  absl::Time Now() override { return absl::UnixEpoch(); }
  TimerId Schedule(absl::Time, std::function<void()>) override {
    return ++next_;
  }
  bool Cancel(TimerId) override { return true; }

 private:
  TimerId next_ = 0;
};

// Records what the agent sends and calls `on_send` (outside any agent lock).
class ScriptedNetwork : public Network {
 public:
  explicit ScriptedNetwork(WorkerId self) : self_(self) {}
  WorkerId self() const override { return self_; }
  absl::Status Start(NetworkObserver*) override { return absl::OkStatus(); }
  absl::Status Send(WorkerId to, Message message) override {
    if (stopped_) return absl::UnavailableError("network stopped");
    sent_.push_back(message.envelope.type());
    if (on_send) on_send(to, message);
    return absl::OkStatus();
  }
  void Stop() override { stopped_ = true; }

  const std::vector<MessageType>& sent() const { return sent_; }
  std::function<void(WorkerId, const Message&)> on_send;

 private:
  const WorkerId self_;
  bool stopped_ = false;
  std::vector<MessageType> sent_;
};

struct Follower {
  Follower() : network(1) {
    AgentOptions o;
    o.self = 1;
    o.workers = {{"leader", 0}, {"follower", 1}};
    agent = Agent::Create(o, &clock, &network, &executor).value();
    EXPECT_TRUE(agent->Start().ok());
  }
  // A control message from the leader, as the network delivers it.
  void FromLeader(MessageType type) {
    Message m;
    m.envelope.set_type(type);
    m.envelope.set_from(0);
    m.envelope.set_to(1);
    agent->OnMessage(std::move(m));
  }

  FrozenClock clock;
  ScriptedNetwork network;
  testing::QueueExecutor executor;
  std::unique_ptr<Agent> agent;
};

TEST(AgentTest, LeaderStoppingAfterTheCommitIsNotAFailure) {
  Follower f;
  Future<Unit> done = f.agent->Shutdown(true);
  f.executor.RunAll();
  // The leader commits. As soon as it has the ack it stops, and this worker's
  // transport reports it (a goodbye or a close looks the same to the agent);
  // another pool thread runs the failure task while the thread that sent the
  // ack has not yet finished the commit.
  f.network.on_send = [&](WorkerId to, const Message& m) {
    if (to != 0 || m.envelope.type() != wire::SHUTDOWN_ACK) return;
    f.agent->OnPeerFailed(0, absl::UnavailableError("worker 0 stopped"));
    f.executor.RunAll();
  };
  f.FromLeader(wire::SHUTDOWN_COMMIT);
  f.executor.RunAll();
  EXPECT_EQ(f.network.sent().back(), wire::SHUTDOWN_ACK);
  ASSERT_TRUE(done.ready());
  EXPECT_TRUE(done.result().ok()) << done.result().status();
  EXPECT_TRUE(f.agent->is_shut_down());
}

TEST(AgentTest, LeaderFailingBeforeItsCommitCutsTheBarrierShort) {
  Follower f;
  Future<Unit> done = f.agent->Shutdown(true);
  f.executor.RunAll();
  f.agent->OnPeerFailed(0, absl::UnavailableError("worker 0 crashed"));
  f.executor.RunAll();
  ASSERT_TRUE(done.ready());
  EXPECT_EQ(done.result().status().code(), absl::StatusCode::kUnavailable)
      << done.result().status();
  EXPECT_TRUE(f.agent->is_shut_down());
}

// A Clock whose timers the test fires by hand, and whose Cancel() fails as SystemClock's does for a
// callback its timer thread has already taken off the queue (Clock::Cancel does not wait for it).
class UncancellableClock : public Clock {
 public:
  absl::Time Now() override { return absl::UnixEpoch(); }
  TimerId Schedule(absl::Time, std::function<void()> callback) override {
    absl::MutexLock lock(&mu_);
    timers_.push_back(std::move(callback));
    return timers_.size();
  }
  bool Cancel(TimerId) override { return false; }
  void FireAll() {
    std::vector<std::function<void()>> timers;
    {
      absl::MutexLock lock(&mu_);
      timers.swap(timers_);
    }
    for (auto& t : timers) t();
  }

 private:
  absl::Mutex mu_;
  std::vector<std::function<void()>> timers_;
};

// Requests from worker 0 to this agent (worker 1), as the network delivers them.
Message RequestFromZero(uint64_t request_id, MessageType type = wire::TEST_CALL) {
  Message m;
  m.envelope.set_type(type);
  m.envelope.set_from(0);
  m.envelope.set_to(1);
  m.envelope.set_request_id(request_id);
  return m;
}

// The Agent is held by a unique_ptr, so its callbacks cannot hold it alive (as the RRef context's
// weak_ptrs do). What they hold is its CallbackGate: a timer the clock failed to cancel, a task
// still queued on the executor and a reply sent after the agent went all do nothing. (Under ASan
// this test fails with a heap-use-after-free if any of them reaches the agent.)
TEST(AgentLifetimeTest, CallbacksThatOutliveTheAgentDoNothing) {
  UncancellableClock clock;
  ScriptedNetwork network(1);
  testing::QueueExecutor executor;
  std::shared_ptr<IncomingCall> held;
  {
    AgentOptions o;
    o.self = 1;
    o.workers = {{"zero", 0}, {"one", 1}};
    o.shutdown_timeout = absl::Seconds(1);
    std::unique_ptr<Agent> agent = Agent::Create(o, &clock, &network, &executor).value();
    agent->RegisterHandler(wire::TEST_CALL,
                           [&held](std::shared_ptr<IncomingCall> c) { held = std::move(c); });
    ASSERT_TRUE(agent->Start().ok());
    Future<Message> call = agent->Call(0, wire::TEST_CALL, "x", {}, absl::Seconds(1));
    agent->OnMessage(RequestFromZero(1));
    executor.RunAll();  // The handler keeps the call.
    ASSERT_NE(held, nullptr);
    agent->OnMessage(RequestFromZero(2));              // Its task stays queued.
    agent->OnPeerFailed(0, absl::UnavailableError("x"));  // Queues the listeners' task.
    agent->Shutdown(/*graceful=*/true);                // A deadline timer (worker 1 follows).
  }
  const size_t sent = network.sent().size();
  clock.FireAll();  // The call's timeout and the shutdown deadline.
  executor.RunAll();
  held->Reply("late", {});
  held.reset();
  EXPECT_EQ(network.sent().size(), sent);
}

// A callback running on another thread when the agent's destructor starts finishes first: here a
// handler (it runs inside the agent's executor task) that is still running.
TEST(AgentLifetimeTest, DestructorWaitsForACallbackRunningOnAnotherThread) {
  UncancellableClock clock;
  ScriptedNetwork network(1);
  testing::QueueExecutor executor;
  absl::Notification in_handler, release_handler, destroyed;
  std::atomic<bool> handler_done{false};
  AgentOptions o;
  o.self = 1;
  o.workers = {{"zero", 0}, {"one", 1}};
  std::unique_ptr<Agent> agent = Agent::Create(o, &clock, &network, &executor).value();
  agent->RegisterHandler(wire::TEST_CALL, [&](std::shared_ptr<IncomingCall> c) {
    in_handler.Notify();
    release_handler.WaitForNotification();
    handler_done = true;
    c->Reply("done", {});  // The agent is closing: dropped, but the agent is still whole.
  });
  ASSERT_TRUE(agent->Start().ok());
  agent->OnMessage(RequestFromZero(1));
  std::thread pool_thread([&] { executor.RunAll(); });
  in_handler.WaitForNotification();
  std::thread destroyer([&] {
    agent.reset();
    destroyed.Notify();
  });
  EXPECT_FALSE(destroyed.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  release_handler.Notify();
  destroyed.WaitForNotification();
  EXPECT_TRUE(handler_done);
  pool_thread.join();
  destroyer.join();
}

// An agent destroyed from inside one of its own callbacks does not wait for itself.
TEST(AgentLifetimeTest, GateClosedFromInsideItsOwnScopeDoesNotWaitForIt) {
  auto gate = std::make_shared<CallbackGate>();
  int ran = 0;
  auto inner = CallbackGate::Guard(gate, [&ran] { ++ran; });
  auto outer = CallbackGate::Guard(gate, [&] {
    ++ran;
    gate->Close();  // Returns: the only open Scope is this thread's.
    inner();        // Closed: does not run.
  });
  outer();
  EXPECT_EQ(ran, 1);
  EXPECT_TRUE(gate->closed());
  outer();
  EXPECT_EQ(ran, 1);
}

}  // namespace
}  // namespace tether
