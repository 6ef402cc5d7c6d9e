// The process simulator end to end, without Python: each worker is a forked
// process running a real Agent over a ChildRuntime; the host runs the simulated
// world.
#include "sim/process/host.h"

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/agent.h"
#include "gtest/gtest.h"
#include "sim/process/child.h"

namespace tether::sim {
namespace {

// What a worker process does; returns an error text, or "" when it succeeded.
using WorkerMain = std::function<std::string(ChildRuntime& rt, Agent& agent)>;
using Setup = std::function<void(ChildRuntime& rt, Agent& agent)>;

struct Plan {
  int workers = 2;
  uint64_t seed = 1;
  std::string faults = "none";
  int max_task_threads = 4;
  std::vector<std::string> names;  // default worker<i>
  bool record_trace = false;
  Setup setup;  // handlers, on every worker
  WorkerMain main;
  std::string error_kind;  // MainDone's, when main fails
};

[[noreturn]] void RunChild(const Plan& plan, int rank, int fd) {
  auto rt = ChildRuntime::Create(fd, rank, plan.max_task_threads);
  if (!rt.ok()) _exit(4);
  ChildRuntime& child = **rt;
  child.WaitForStart();
  std::string name =
      plan.names.empty() ? absl::StrCat("worker", rank) : plan.names[rank];
  auto names = child.Register(name);
  if (!names.ok()) {
    child.MainDone(false, std::string(names.status().message()));
  }
  AgentOptions o;
  o.self = rank;
  for (int i = 0; i < static_cast<int>(names->size()); ++i)
    o.workers.push_back({(*names)[i], i});
  o.default_timeout = absl::ZeroDuration();
  o.shutdown_timeout = absl::Seconds(30);
  auto agent =
      Agent::Create(o, child.clock(), child.network(), child.executor());
  if (!agent.ok()) child.MainDone(false, std::string(agent.status().message()));
  if (plan.setup) plan.setup(child, **agent);
  absl::Status s = (*agent)->Start();
  if (!s.ok()) child.MainDone(false, std::string(s.message()));
  std::string error = plan.main ? plan.main(child, **agent) : "";
  Future<Unit> done = (*agent)->Shutdown(true);
  child.BlockUntil([&] { return done.ready(); }, "shutdown", WaitKind::kShutdown)
      .IgnoreError();
  child.MainDone(error.empty(), error, error.empty() ? "" : plan.error_kind);
  _exit(0);
}

ProcessRunResult RunPlan(const Plan& plan) {
  std::vector<int> host_fds;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < plan.workers; ++rank) {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    pid_t pid = fork();
    if (pid == 0) {
      for (int fd : host_fds) close(fd);
      close(sv[0]);
      RunChild(plan, rank, sv[1]);
    }
    close(sv[1]);
    host_fds.push_back(sv[0]);
    pids.push_back(pid);
  }
  ProcessHostOptions o;
  o.num_workers = plan.workers;
  o.seed = plan.seed;
  o.faults = FaultSpec::Parse(plan.faults).value();
  o.time_limit = absl::Minutes(10);
  o.record_trace = plan.record_trace;
  ProcessRunResult r;
  {
    ProcessHost host(o, host_fds);
    r = host.Run();
  }
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
  }
  return r;
}

void Echo(std::shared_ptr<IncomingCall> c) {
  c->Reply(c->request().envelope.payload(), {});
}

std::string CallAndWait(ChildRuntime& rt, Agent& agent, WorkerId to,
                        const std::string& payload,
                        std::string* reply = nullptr) {
  Future<Message> f = agent.Call(to, wire::TEST_CALL, payload, {});
  absl::Status s = rt.BlockUntil([&] { return f.ready(); },
                                 absl::StrCat("call to worker", to));
  if (!s.ok()) return std::string(s.message());
  if (!f.result().ok()) return std::string(f.result().status().ToString());
  if (reply) *reply = f.result()->envelope.payload();
  return "";
}

Plan EchoPlan(int workers, uint64_t seed) {
  Plan p;
  p.workers = workers;
  p.seed = seed;
  p.setup = [](ChildRuntime&, Agent& a) {
    a.RegisterHandler(wire::TEST_CALL, Echo);
  };
  p.main = [workers](ChildRuntime& rt, Agent& a) -> std::string {
    for (int i = 0; i < 5; ++i) {
      WorkerId to = (a.self().id + 1 + i) % workers;
      std::string reply;
      std::string err = CallAndWait(rt, a, to, absl::StrCat("m", i), &reply);
      if (!err.empty()) return err;
      if (reply != absl::StrCat("m", i)) return "wrong reply " + reply;
    }
    return "";
  };
  return p;
}

TEST(ProcessHostTest, WorkersCallEachOtherAndShutDown) {
  ProcessRunResult r = RunPlan(EchoPlan(3, 5));
  EXPECT_EQ(r.hang, "");
  ASSERT_EQ(r.workers.size(), 3u);
  for (const WorkerOutcome& w : r.workers) {
    EXPECT_TRUE(w.main_done) << w.name << ": " << w.error;
    EXPECT_TRUE(w.ok) << w.name << ": " << w.error;
  }
  EXPECT_EQ(r.workers[2].name, "worker2");
  EXPECT_GT(r.events, 20u);
}

TEST(ProcessHostTest, RecordsAChromeTrace) {
  Plan p = EchoPlan(2, 3);
  p.record_trace = true;
  ProcessRunResult r = RunPlan(p);
  int sends = 0, recvs = 0, spans = 0, names = 0;
  for (const TraceEvent& e : r.trace) {
    if (e.json.find("\"send TEST_CALL\"") != std::string::npos) ++sends;
    if (e.json.find("\"recv RESPONSE\"") != std::string::npos) ++recvs;
    if (e.json.find("\"ph\":\"b\"") != std::string::npos) ++spans;
    if (e.json.find("process_name") != std::string::npos) ++names;
    EXPECT_EQ(e.json.front(), '{');
    EXPECT_EQ(e.json.back(), '}');
  }
  EXPECT_EQ(sends, 10);  // 5 calls from each worker
  EXPECT_EQ(recvs, 10);
  EXPECT_GE(spans, 10);
  EXPECT_EQ(names, 2);
  EXPECT_TRUE(RunPlan(EchoPlan(2, 3)).trace.empty());
}

TEST(ProcessHostTest, SameSeedSameTrace) {
  ProcessRunResult a = RunPlan(EchoPlan(3, 11));
  ProcessRunResult b = RunPlan(EchoPlan(3, 11));
  EXPECT_EQ(a.trace_hash, b.trace_hash);
  EXPECT_EQ(a.events, b.events);
  ProcessRunResult c = RunPlan(EchoPlan(3, 12));
  EXPECT_NE(a.trace_hash, c.trace_hash);
}

TEST(ProcessHostTest, FaultsStillFinish) {
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    Plan p = EchoPlan(3, seed);
    p.faults = "dup=0.2,delay=0..30ms,reorder=0.3";
    ProcessRunResult r = RunPlan(p);
    EXPECT_EQ(r.hang, "") << "seed " << seed;
    for (const WorkerOutcome& w : r.workers)
      EXPECT_TRUE(w.ok) << w.name << ": " << w.error;
  }
}

TEST(ProcessHostTest, ReportsADeadlockWithWhatWaits) {
  Plan p;
  p.workers = 2;
  p.setup = [](ChildRuntime&, Agent& a) {
    // Keeps every request without replying.
    auto hoard = std::make_shared<std::vector<std::shared_ptr<IncomingCall>>>();
    a.RegisterHandler(
        wire::TEST_CALL,
        [hoard](std::shared_ptr<IncomingCall> c) { hoard->push_back(c); });
  };
  p.main = [](ChildRuntime& rt, Agent& a) -> std::string {
    // Each waits on the other, which never answers.
    return CallAndWait(rt, a, 1 - a.self().id, "never answered");
  };
  ProcessRunResult r = RunPlan(p);
  EXPECT_NE(r.hang, "");
  ASSERT_EQ(r.workers.size(), 2u);
  EXPECT_FALSE(r.workers[0].main_done);
  ASSERT_FALSE(r.workers[0].blocked.empty());
  EXPECT_EQ(r.workers[0].blocked[0], "call to worker1");
  EXPECT_EQ(r.workers[1].blocked[0], "call to worker0");
}

TEST(ProcessHostTest, ReportsAnErrorFromMain) {
  Plan p = EchoPlan(2, 1);
  p.main = [](ChildRuntime&, Agent& a) -> std::string {
    return a.self().id == 1 ? "ValueError: planted" : "";
  };
  ProcessRunResult r = RunPlan(p);
  EXPECT_EQ(r.hang, "");
  EXPECT_TRUE(r.workers[0].ok);
  EXPECT_FALSE(r.workers[1].ok);
  EXPECT_EQ(r.workers[1].error, "ValueError: planted");
}

TEST(ProcessHostTest, TheErrorKindIsDataNotText) {
  // Text that reads like a leak carries no kind; a kind is passed as given.
  Plan p = EchoPlan(2, 1);
  p.main = [](ChildRuntime&, Agent&) -> std::string {
    return "RuntimeError: RRef leak on worker 'worker1' without calling rpc.shutdown()";
  };
  ProcessRunResult r = RunPlan(p);
  ASSERT_EQ(r.workers.size(), 2u);
  EXPECT_FALSE(r.workers[1].ok);
  EXPECT_EQ(r.workers[1].error_kind, "");
  p.error_kind = "leak";
  r = RunPlan(p);
  EXPECT_EQ(r.workers[0].error_kind, "leak");
  EXPECT_EQ(r.workers[1].error_kind, "leak");
  EXPECT_EQ(r.workers[1].error.substr(0, 13), "RuntimeError:");
}

TEST(ProcessHostTest, AHangInTheShutdownBarrierIsMarkedByItsKind) {
  // worker0 waits for ever where its text says "shutdown"; worker1 in a wait of
  // kind kShutdown whose text does not.
  Plan p;
  p.workers = 2;
  p.main = [](ChildRuntime& rt, Agent& a) -> std::string {
    if (a.self().id == 0) {
      rt.BlockUntil([] { return false; }, "shutdown_requested.wait()").IgnoreError();
    } else {
      rt.BlockUntil([] { return false; }, "the barrier", WaitKind::kShutdown).IgnoreError();
    }
    return "";
  };
  ProcessRunResult r = RunPlan(p);
  EXPECT_NE(r.hang, "");
  ASSERT_EQ(r.workers.size(), 2u);
  EXPECT_FALSE(r.workers[0].main_done);
  EXPECT_EQ(r.workers[0].blocked, std::vector<std::string>{"shutdown_requested.wait()"});
  EXPECT_FALSE(r.workers[0].blocked_in_shutdown);
  EXPECT_EQ(r.workers[1].blocked, std::vector<std::string>{"the barrier"});
  EXPECT_TRUE(r.workers[1].blocked_in_shutdown);
}

TEST(ProcessHostTest, DuplicateNamesAreRefused) {
  Plan p = EchoPlan(2, 1);
  p.names = {"same", "same"};
  ProcessRunResult r = RunPlan(p);
  int refused = 0;
  for (const WorkerOutcome& w : r.workers) {
    if (w.main_done && !w.ok &&
        w.error.find("already taken") != std::string::npos)
      ++refused;
  }
  EXPECT_EQ(refused, 1);
}

TEST(ProcessHostTest, CrashFailsOnlyCallsToTheCrashedWorker) {
  Plan p;
  p.workers = 3;
  p.faults = "crash=2@50ms";
  p.setup = [](ChildRuntime& rt, Agent& a) {
    Clock* clock = rt.clock();
    a.RegisterHandler(wire::TEST_CALL,
                      [clock](std::shared_ptr<IncomingCall> c) {
                        clock->Schedule(clock->Now() + absl::Milliseconds(200),
                                        [c] { c->Reply("late", {}); });
                      });
  };
  p.main = [](ChildRuntime& rt, Agent& a) -> std::string {
    if (a.self().id != 0) return "";
    Future<Message> to_crashed = a.Call(2, wire::TEST_CALL, "", {});
    Future<Message> to_live = a.Call(1, wire::TEST_CALL, "", {});
    rt.BlockUntil([&] { return to_crashed.ready() && to_live.ready(); }, "both")
        .IgnoreError();
    if (to_crashed.result().status().code() != absl::StatusCode::kUnavailable) {
      return "call to the crashed worker: " +
             to_crashed.result().status().ToString();
    }
    if (!to_live.result().ok())
      return "call to live worker: " + to_live.result().status().ToString();
    return "";
  };
  ProcessRunResult r = RunPlan(p);
  EXPECT_TRUE(r.workers[2].crashed);
  EXPECT_TRUE(r.workers[0].ok) << r.workers[0].error;
  EXPECT_TRUE(r.workers[1].ok) << r.workers[1].error;
}

TEST(ProcessHostTest, BlockingHandlersExhaustTheThreadPool) {
  // worker1's handler blocks on a call back to worker0, whose handler calls
  // worker1 again: with one task thread on worker1, the second request can
  // never run.
  Plan p;
  p.workers = 2;
  p.max_task_threads = 1;
  p.setup = [](ChildRuntime& rt, Agent& a) {
    ChildRuntime* r = &rt;
    Agent* agent = &a;
    a.RegisterHandler(
        wire::TEST_CALL, [r, agent](std::shared_ptr<IncomingCall> c) {
          const std::string& hops = c->request().envelope.payload();
          if (hops.empty()) return c->Reply("leaf", {});
          WorkerId next = 1 - agent->self().id;
          std::string reply;
          std::string err =
              CallAndWait(*r, *agent, next, hops.substr(1), &reply);
          if (!err.empty()) return c->ReplyError(absl::InternalError(err));
          c->Reply(reply, {});
        });
  };
  p.main = [](ChildRuntime& rt, Agent& a) -> std::string {
    if (a.self().id != 0) return "";
    return CallAndWait(rt, a, 1, "xx");
  };
  ProcessRunResult r = RunPlan(p);
  EXPECT_NE(r.hang, "");
  bool starved = false;
  for (const std::string& b : r.workers[1].blocked) {
    if (b.find("free thread") != std::string::npos) starved = true;
  }
  EXPECT_TRUE(starved);
}

}  // namespace
}  // namespace tether::sim
