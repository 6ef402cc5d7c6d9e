// Distributed-autograd protocol tests (core/dist_autograd.h), driven by the deterministic
// simulator (virtual time, no threads) with a scripted fake GraphRunner; one test runs on real
// threads to check the per-context strand, and one over a FaultyNetwork (PyTorch's faulty agent)
// to check that cleanups retry through send failures.
#include "core/dist_autograd.h"

#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>  // NOLINT(build/c++11): a thread that detaches the runner
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/agent.h"
#include "gtest/gtest.h"
#include "sim/fault_spec.h"
#include "sim/random.h"
#include "sim/scheduler.h"
#include "sim/sim_clock.h"
#include "sim/sim_executor.h"
#include "sim/sim_network.h"
#include "sim/sim_world.h"
#include "transport/faulty/faulty_network.h"
#include "transport/system_clock.h"
#include "transport/thread_pool.h"

namespace tether {
namespace {

bool Contains(absl::string_view s, absl::string_view part) { return absl::StrContains(s, part); }

// ---------------------------------------------------------------------------------------------
// A scripted FAST engine. A context's graph on this worker is a set of roots (the graph root, -1,
// on the initiator, and every send function recorded with AddSend); running a root "fires" the
// recv nodes scripted for it with On() (SendGradients to their source), or fails. The local pass
// is done once the graph root (initiator) and every send function ran.

class FakeRunner : public GraphRunner {
 public:
  static constexpr AutogradMessageId kRoot = -1;
  struct Fire {
    WorkerId to;
    AutogradMessageId recv;
  };

  explicit FakeRunner(WorkerId self) : self_(self) {}
  void set_dag(DistAutograd* dag) { dag_ = dag; }

  void AddSend(ContextId ctx, AutogradMessageId msg) {
    absl::MutexLock lock(&mu_);
    sends_[ctx].insert(msg);
  }
  void On(ContextId ctx, AutogradMessageId root, std::vector<Fire> fires) {
    absl::MutexLock lock(&mu_);
    script_[{ctx, root}] = std::move(fires);
  }
  // The next run of `root` fails with `error` (once).
  void FailOnce(ContextId ctx, AutogradMessageId root, absl::Status error) {
    absl::MutexLock lock(&mu_);
    errors_[{ctx, root}] = std::move(error);
  }

  absl::Status BeginPass(ContextId ctx, int64_t /*pass_id*/, bool retain, bool initiator) override {
    absl::MutexLock lock(&mu_);
    Enter(ctx);
    Log(absl::StrCat("begin ", ctx, initiator ? " initiator" : "", retain ? " retain" : ""));
    Pass& p = passes_[ctx];
    p = Pass{};
    p.initiator = initiator;
    Leave(ctx);
    return absl::OkStatus();
  }
  PassProgress RunRoot(ContextId ctx) override { return Run(ctx, kRoot, ""); }
  PassProgress RunSendFunction(ContextId ctx, AutogradMessageId msg, const std::string& grads,
                               const std::vector<Buffer>&) override {
    return Run(ctx, msg, grads);
  }
  void AbortPass(ContextId ctx, const absl::Status& error) override {
    absl::MutexLock lock(&mu_);
    Log(absl::StrCat("abort ", ctx, ": ", error.message()));
  }
  void EndPass(ContextId ctx) override {
    absl::MutexLock lock(&mu_);
    Log(absl::StrCat("end ", ctx));
    passes_.erase(ctx);
  }
  void Release(ContextId ctx) override {
    absl::MutexLock lock(&mu_);
    Log(absl::StrCat("release ", ctx));
  }

  std::vector<std::string> log() const {
    absl::MutexLock lock(&mu_);
    return log_;
  }
  bool overlapped() const { return overlapped_.load(); }
  // The futures SendGradients returned, by recv message id (the latest).
  std::map<AutogradMessageId, Future<Message>> grads_calls() const {
    absl::MutexLock lock(&mu_);
    return grads_calls_;
  }

 private:
  struct Pass {
    bool initiator = false;
    std::set<AutogradMessageId> ran;
  };

  PassProgress Run(ContextId ctx, AutogradMessageId root, const std::string& grads) {
    std::vector<Fire> fires;
    PassProgress progress;
    {
      absl::MutexLock lock(&mu_);
      Enter(ctx);
      Log(root == kRoot ? absl::StrCat("root ", ctx)
                        : absl::StrCat("send ", ctx, " ", root, " ", grads));
      auto err = errors_.find({ctx, root});
      if (err != errors_.end()) {
        progress.error = err->second;
        errors_.erase(err);
        Leave(ctx);
        return progress;
      }
      auto it = script_.find({ctx, root});
      if (it != script_.end()) fires = it->second;
      passes_[ctx].ran.insert(root);
    }
    // Recv nodes call back into the core without the runner's lock (as the glue would).
    for (const Fire& f : fires) {
      Future<Message> call = dag_->SendGradients(
          ctx, f.to, f.recv, absl::StrCat("g", self_, "->", f.to, "#", f.recv), {});
      absl::MutexLock lock(&mu_);
      grads_calls_.insert_or_assign(f.recv, call);
      if (call.ready() && !call.result().ok()) progress.error = call.result().status();
    }
    absl::MutexLock lock(&mu_);
    const Pass& p = passes_[ctx];
    bool done = !p.initiator || p.ran.count(kRoot) > 0;
    for (AutogradMessageId m : sends_[ctx]) done = done && p.ran.count(m) > 0;
    progress.local_done = done;
    Leave(ctx);
    return progress;
  }

  // Overlap detection for the strand test: a runner call for `ctx` while another one runs.
  void Enter(ContextId ctx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (in_call_[ctx]++ > 0) overlapped_ = true;
  }
  void Leave(ContextId ctx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { --in_call_[ctx]; }
  void Log(std::string line) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { log_.push_back(line); }

  const WorkerId self_;
  DistAutograd* dag_ = nullptr;
  mutable absl::Mutex mu_;
  std::map<ContextId, std::set<AutogradMessageId>> sends_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<ContextId, AutogradMessageId>, std::vector<Fire>> script_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<ContextId, AutogradMessageId>, absl::Status> errors_ ABSL_GUARDED_BY(mu_);
  std::map<ContextId, Pass> passes_ ABSL_GUARDED_BY(mu_);
  std::map<ContextId, int> in_call_ ABSL_GUARDED_BY(mu_);
  std::map<AutogradMessageId, Future<Message>> grads_calls_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> log_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> overlapped_{false};
};

// Every event of every worker, in order.
class EventLog : public DistAutogradObserver {
 public:
  void OnDistAutogradEvent(const DistAutogradEvent& e) override {
    absl::MutexLock lock(&mu_);
    events_.push_back(e);
  }
  std::vector<DistAutogradEvent> events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  int Count(DistAutogradEvent::Kind kind, WorkerId worker = -1) const {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const auto& e : events_) n += e.kind == kind && (worker < 0 || e.worker == worker);
    return n;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<DistAutogradEvent> events_ ABSL_GUARDED_BY(mu_);
};

DistAutogradOptions TestOptions(EventLog* log) {
  DistAutogradOptions o;
  o.observer = log;
  o.cleanup_retry.attempt_timeout = absl::Milliseconds(200);
  o.cleanup_retry.initial_backoff = absl::Milliseconds(10);
  o.cleanup_retry.max_backoff = absl::Milliseconds(100);
  return o;
}

// ---------------------------------------------------------------------------------------------
// A cluster over SimWorld: one DistAutograd and one FakeRunner per worker (rebuilt on restart).

class Cluster {
 public:
  static std::unique_ptr<Cluster> Make(int n, const std::string& faults = "none", uint64_t seed = 1,
                                       DistAutogradPlantedBugs bugs = {}) {
    auto c = std::unique_ptr<Cluster>(new Cluster());
    sim::SimWorldOptions o;
    o.num_workers = n;
    o.seed = seed;
    o.faults = sim::FaultSpec::Parse(faults).value();
    o.agent.default_timeout = absl::Seconds(10);
    c->dag_.resize(n);
    c->runner_.resize(n);
    Cluster* raw = c.get();
    o.on_agent = [raw, bugs](sim::SimWorld& world, WorkerId id, Agent& agent) {
      DistAutogradOptions opts = TestOptions(&raw->log_);
      opts.bugs = bugs;
      opts.incarnation = world.incarnation(id);
      raw->dag_[id] =
          DistAutograd::Create(&agent, &world.clock(id), &world.executor(id), opts).value();
      raw->runner_[id] = std::make_unique<FakeRunner>(id);
      raw->runner_[id]->set_dag(raw->dag_[id].get());
      raw->dag_[id]->SetRunner(raw->runner_[id].get());
    };
    c->world_ = sim::SimWorld::Create(std::move(o)).value();
    EXPECT_TRUE(c->world_->Start().ok());
    return c;
  }

  ~Cluster() {
    world_.reset();  // agents first: they hold handlers that reach the contexts weakly
    dag_.clear();
  }

  sim::SimWorld& world() { return *world_; }
  DistAutograd& dag(WorkerId w) { return *dag_[w]; }
  FakeRunner& runner(WorkerId w) { return *runner_[w]; }
  EventLog& log() { return log_; }

  // A forward message from `from` to `to` in `ctx`, recorded on both sides (the glue's job):
  // a send function on `from`, a recv function on `to`. Returns its message id.
  AutogradMessageId Forward(ContextId ctx, WorkerId from, WorkerId to) {
    AutogradMessageId msg = dag(from).NewMessageId();
    EXPECT_TRUE(dag(from).RecordSend(ctx, msg, to).ok());
    runner(from).AddSend(ctx, msg);
    EXPECT_TRUE(dag(to).Join(ctx, from).ok());
    EXPECT_TRUE(dag(to).RecordRecv(ctx, msg, from).ok());
    return msg;
  }

  // A nested call chain path[0] -> path[1] -> ... with a reply (carrying gradients back) at
  // every hop, and the script of a backward from path[0]: the graph root fires the first reply's
  // recv; each reply's send function fires the next hop's reply recv (or, at the end, the
  // request's recv); each request's send function fires the request recv one hop back.
  void Chain(ContextId ctx, const std::vector<WorkerId>& path) {
    std::vector<AutogradMessageId> request, reply;
    for (size_t i = 0; i + 1 < path.size(); ++i) {
      request.push_back(Forward(ctx, path[i], path[i + 1]));
    }
    for (size_t i = 0; i + 1 < path.size(); ++i) {
      reply.push_back(Forward(ctx, path[i + 1], path[i]));
    }
    const size_t hops = request.size();
    runner(path[0]).On(ctx, FakeRunner::kRoot, {{path[1], reply[0]}});
    for (size_t i = 0; i < hops; ++i) {
      WorkerId callee = path[i + 1];
      if (i + 1 < hops) {
        runner(callee).On(ctx, reply[i], {{path[i + 2], reply[i + 1]}});
      } else {
        runner(callee).On(ctx, reply[i], {{path[i], request[i]}});
      }
      if (i > 0) runner(path[i]).On(ctx, request[i], {{path[i - 1], request[i - 1]}});
    }
  }

  absl::Status RunBackward(WorkerId w, ContextId ctx, absl::Duration timeout = absl::Seconds(10),
                           bool retain = false) {
    Future<Unit> f = dag(w).Backward(ctx, retain, world_->Now() + timeout);
    EXPECT_TRUE(world_->RunUntilReady(f));
    return f.ready() ? f.result().status() : absl::UnknownError("backward never completed");
  }

  int64_t Debug(WorkerId w, const std::string& key) { return dag(w).GetDebugInfo()[key]; }

 private:
  Cluster() = default;
  EventLog log_;
  std::vector<std::shared_ptr<DistAutograd>> dag_;
  std::vector<std::unique_ptr<FakeRunner>> runner_;
  std::unique_ptr<sim::SimWorld> world_;
};

// ---------------------------------------------------------------------------------------------
// Ids.

TEST(DistAutogradTest, IdsFollowPyTorchsLayout) {
  auto c = Cluster::Make(4);
  EXPECT_EQ(c->dag(0).NewContext(), 0);  // the probe: worker 0's first context and message are 0
  EXPECT_EQ(c->dag(0).NewMessageId(), 0);
  EXPECT_EQ(c->dag(0).NewContext(), 1);  // two independent counters
  EXPECT_EQ(c->dag(0).NewMessageId(), 1);
  for (WorkerId w : {1, 3}) {
    ContextId ctx = c->dag(w).NewContext();
    EXPECT_EQ(ctx >> 48, w);
    EXPECT_EQ(DistAutograd::CreatorOf(ctx), w);
    EXPECT_EQ(c->dag(w).NewMessageId() >> 48, w);
    EXPECT_EQ(c->dag(w).MaxId(), 281474976710655 + (int64_t{w} << 48));  // dist_autograd_test.py
    EXPECT_LT(ctx, c->dag(w).MaxId());
  }
  EXPECT_EQ(c->dag(0).MaxId(), 281474976710655);
  // A restarted worker's ids do not collide with its earlier life's.
  c->world().Crash(2);
  ASSERT_TRUE(c->world().Restart(2).ok());
  ContextId fresh = c->dag(2).NewContext();
  EXPECT_EQ(fresh >> 48, 2);
  EXPECT_EQ((fresh >> 40) & 0xff, 1);
}

// ---------------------------------------------------------------------------------------------
// Contexts, known and involved workers, release.

TEST(DistAutogradTest, ReleaseErasesAndTombstonesAndRefusesLateJoins) {
  auto c = Cluster::Make(2);
  ContextId ctx = c->dag(0).NewContext();
  EXPECT_TRUE(c->dag(0).Exists(ctx));
  AutogradMessageId msg = c->Forward(ctx, 0, 1);
  EXPECT_TRUE(c->dag(1).Exists(ctx));
  EXPECT_EQ(c->dag(1).RecvFunctions(ctx).value(),
            (std::map<AutogradMessageId, WorkerId>{{msg, 0}}));
  EXPECT_EQ(c->dag(0).SendFunctions(ctx).value(),
            (std::map<AutogradMessageId, WorkerId>{{msg, 1}}));
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  EXPECT_FALSE(c->dag(0).Exists(ctx));
  EXPECT_TRUE(c->dag(0).IsReleased(ctx));
  absl::Status again = c->dag(0).Release(ctx);
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(again.message(), "Could not find autograd context with id: 0");
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(c->dag(1).Exists(ctx));
  EXPECT_TRUE(c->dag(1).IsReleased(ctx));
  // A late forward message (say an rpc_async still in flight) must not re-create it.
  absl::Status late = c->dag(1).Join(ctx, 0);
  EXPECT_EQ(late.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(late.message(), "Could not find autograd context with id: 0")) << late;
  EXPECT_FALSE(c->dag(1).Exists(ctx));
  EXPECT_EQ(c->dag(0).Join(ctx, 1).code(), absl::StatusCode::kNotFound);
  // Nor is an id of this worker that it never issued joinable.
  EXPECT_EQ(c->dag(0).Join(int64_t{1000}, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c->dag(1).Join(-1, 0).code(), absl::StatusCode::kInvalidArgument);
  // ReleaseIfPresent tombstones an id never seen (a cleanup that overtook the forward call).
  ContextId other = c->dag(0).NewContext();
  c->dag(1).ReleaseIfPresent(other);
  EXPECT_EQ(c->dag(1).Join(other, 0).code(), absl::StatusCode::kNotFound);
  // Recording into a released context fails.
  EXPECT_EQ(c->dag(0).AddKnownWorker(ctx, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c->dag(0).RecordSend(ctx, 7, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c->dag(0).Involved(ctx).status().code(), absl::StatusCode::kNotFound);
  // Worker 0 issued ctx itself: no record kept. Worker 1 keeps one range for ctx and other.
  EXPECT_EQ(c->Debug(0, "num_released_context_records"), 0);
  EXPECT_EQ(c->Debug(1, "num_released_context_records"), 1);
}

// A parameter server sees one context per trainer step: its tombstones stay one range per
// creator, however many contexts were released, and every one of them still refuses a late Join.
TEST(DistAutogradTest, TombstonesOfAnotherCreatorMergeIntoOneRange) {
  auto c = Cluster::Make(3);
  constexpr int kSteps = 1000;
  std::vector<ContextId> ctxs;
  for (int i = 0; i < kSteps; ++i) {
    ContextId ctx = c->dag(0).NewContext();
    c->Forward(ctx, 0, 1);
    ctxs.push_back(ctx);
  }
  // Released out of order (odd steps first): the gaps close as the even ones arrive.
  for (int i = 1; i < kSteps; i += 2) ASSERT_TRUE(c->dag(0).Release(ctxs[i]).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->Debug(1, "num_released_context_records"), kSteps / 2);
  for (int i = 0; i < kSteps; i += 2) ASSERT_TRUE(c->dag(0).Release(ctxs[i]).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->Debug(1, "num_autograd_contexts"), 0);
  EXPECT_EQ(c->Debug(1, "num_released_context_records"), 1);
  EXPECT_EQ(c->Debug(0, "num_released_context_records"), 0);  // its own: none
  for (ContextId ctx : ctxs) {
    ASSERT_TRUE(c->dag(1).IsReleased(ctx)) << ctx;
    ASSERT_TRUE(c->dag(0).IsReleased(ctx)) << ctx;
  }
  // A late Join after the release is refused, at either end of the range and in its middle.
  for (ContextId ctx : {ctxs.front(), ctxs[kSteps / 2], ctxs.back()}) {
    absl::Status late = c->dag(1).Join(ctx, 0);
    EXPECT_EQ(late.code(), absl::StatusCode::kNotFound) << late;
    EXPECT_TRUE(Contains(late.message(), "already released")) << late;
  }
  EXPECT_EQ(c->Debug(1, "num_autograd_contexts"), 0);
  // The next context of the same creator is not tombstoned: it joins.
  ContextId next = c->dag(0).NewContext();
  EXPECT_FALSE(c->dag(1).IsReleased(next));
  EXPECT_TRUE(c->dag(1).Join(next, 0).ok());
  // Ranges never span creators, even where the ids are adjacent numbers.
  const ContextId last_of_0 = (int64_t{1} << 48) - 1;
  const ContextId first_of_1 = int64_t{1} << 48;
  c->dag(2).ReleaseIfPresent(first_of_1);
  c->dag(2).ReleaseIfPresent(last_of_0);
  EXPECT_EQ(c->Debug(2, "num_released_context_records"), 2);
  EXPECT_TRUE(c->dag(2).IsReleased(last_of_0));
  EXPECT_TRUE(c->dag(2).IsReleased(first_of_1));
  EXPECT_FALSE(c->dag(2).IsReleased(last_of_0 - 1));
  EXPECT_FALSE(c->dag(2).IsReleased(first_of_1 + 1));
  // A single id filling the gap between two ranges merges them.
  c->dag(2).ReleaseIfPresent(first_of_1 + 2);
  EXPECT_EQ(c->Debug(2, "num_released_context_records"), 3);
  c->dag(2).ReleaseIfPresent(first_of_1 + 1);
  EXPECT_EQ(c->Debug(2, "num_released_context_records"), 2);
  c->dag(2).ReleaseIfPresent(first_of_1 + 1);  // again: nothing changes
  EXPECT_EQ(c->Debug(2, "num_released_context_records"), 2);
}

// Contexts a worker issued need no tombstone: they are released once issued and gone.
TEST(DistAutogradTest, SelfCreatedContextsLeaveNoRecordButStayReleased) {
  auto c = Cluster::Make(2);
  std::vector<ContextId> ctxs;
  for (int i = 0; i < 100; ++i) {
    ctxs.push_back(c->dag(0).NewContext());
    c->Forward(ctxs.back(), 0, 1);
  }
  const ContextId live = c->dag(0).NewContext();
  for (ContextId ctx : ctxs) ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->Debug(0, "num_released_context_records"), 0);
  for (ContextId ctx : ctxs) {
    EXPECT_TRUE(c->dag(0).IsReleased(ctx)) << ctx;
    absl::Status late = c->dag(0).Join(ctx, 1);
    EXPECT_EQ(late.code(), absl::StatusCode::kNotFound) << late;
    EXPECT_TRUE(Contains(late.message(), "already released on worker 0")) << late;
  }
  EXPECT_FALSE(c->dag(0).IsReleased(live));      // issued, not released
  EXPECT_FALSE(c->dag(0).IsReleased(live + 1));  // not issued yet
  EXPECT_TRUE(c->dag(0).Join(live, 1).ok());     // a call back to the creator
  ASSERT_TRUE(c->dag(0).Release(live).ok());
  EXPECT_TRUE(c->dag(0).IsReleased(live));
  EXPECT_EQ(c->Debug(0, "num_released_context_records"), 0);
  // A cleanup for an own id never issued (by this incarnation) is remembered as before.
  c->dag(0).ReleaseIfPresent(live + 5);
  EXPECT_TRUE(c->dag(0).IsReleased(live + 5));
  EXPECT_EQ(c->Debug(0, "num_released_context_records"), 1);
  // A restarted worker issued none of its earlier life's ids: they are not released there, and
  // not joinable either.
  c->world().Crash(0);
  ASSERT_TRUE(c->world().Restart(0).ok());
  EXPECT_FALSE(c->dag(0).IsReleased(ctxs[0]));
  absl::Status old = c->dag(0).Join(ctxs[0], 1);
  EXPECT_EQ(old.code(), absl::StatusCode::kNotFound) << old;
  EXPECT_TRUE(Contains(old.message(), "never created it")) << old;
}

TEST(DistAutogradTest, KnownAndInvolvedWorkers) {
  auto c = Cluster::Make(4);
  ContextId ctx = c->dag(0).NewContext();
  EXPECT_TRUE(c->dag(0).KnownWorkers(ctx).value().empty());
  c->Forward(ctx, 0, 1);                               // a send adds its destination
  ASSERT_TRUE(c->dag(0).AddKnownWorker(ctx, 0).ok());  // to_here() to self, say
  EXPECT_EQ(c->dag(0).KnownWorkers(ctx).value(), (std::vector<WorkerId>{0, 1}));
  EXPECT_TRUE(c->dag(1).KnownWorkers(ctx).value().empty());  // joining knows nobody
  c->Forward(ctx, 1, 2);
  EXPECT_EQ(c->dag(1).Involved(ctx).value(), (std::vector<WorkerId>{1, 2}));
  // Worker 1's reply tells worker 0 its subtree; worker 3 joined through worker 2 unrecorded.
  ASSERT_TRUE(c->dag(3).Join(ctx, 2).ok());
  ASSERT_TRUE(c->dag(0).LearnInvolved(ctx, c->dag(1).Involved(ctx).value()).ok());
  ASSERT_TRUE(c->dag(0).LearnInvolved(ctx, {3}).ok());
  EXPECT_EQ(c->dag(0).Involved(ctx).value(), (std::vector<WorkerId>{0, 1, 2, 3}));
  EXPECT_EQ(c->dag(0).KnownWorkers(ctx).value(), (std::vector<WorkerId>{0, 1}));
  // The creator releases the involved workers directly: worker 3 goes although nobody knows it.
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (WorkerId w = 0; w < 4; ++w) EXPECT_FALSE(c->dag(w).Exists(ctx)) << w;
  // Worker 0 sent to 1, 2 and 3 (not to itself), and worker 1 did not forward to 2 (covered).
  EXPECT_EQ(c->log().Count(DistAutogradEvent::kReleaseSent, 0), 3);
  EXPECT_EQ(c->log().Count(DistAutogradEvent::kReleaseSent, 1), 0);
  EXPECT_EQ(c->log().Count(DistAutogradEvent::kReleaseAcked, 0), 3);
}

TEST(DistAutogradTest, ReleaseIsTransitiveAlongKnownWorkers) {
  auto c = Cluster::Make(4);
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);  // nested calls 0 -> 1 -> 2 -> 3, no involved sets learned
  c->Forward(ctx, 1, 2);
  c->Forward(ctx, 2, 3);
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (WorkerId w = 0; w < 4; ++w) {
    EXPECT_FALSE(c->dag(w).Exists(ctx)) << w;
    EXPECT_TRUE(c->dag(w).IsReleased(ctx)) << w;
    EXPECT_EQ(c->Debug(w, "num_autograd_contexts"), 0) << w;
    EXPECT_EQ(c->Debug(w, "num_pending_cleanups"), 0) << w;
  }
  // Each hop forwarded once: 0 -> 1 -> 2 -> 3.
  for (WorkerId w = 0; w < 3; ++w) {
    EXPECT_EQ(c->log().Count(DistAutogradEvent::kReleaseSent, w), 1) << w;
  }
  EXPECT_EQ(c->log().Count(DistAutogradEvent::kReleaseSent, 3), 0);
  int released_from_2 = 0;
  for (const auto& e : c->log().events()) {
    released_from_2 += e.kind == DistAutogradEvent::kReleased && e.worker == 3 && e.peer == 2;
  }
  EXPECT_EQ(released_from_2, 1);
}

TEST(DistAutogradTest, CleanupRetriesThroughDropsAndShowsAsActivity) {
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    auto c = Cluster::Make(3, "type=CLEANUP_AUTOGRAD_CONTEXT_REQ:drop=0.6", seed);
    ContextId ctx = c->dag(0).NewContext();
    c->Forward(ctx, 0, 1);
    c->Forward(ctx, 1, 2);
    ASSERT_TRUE(c->dag(0).Release(ctx).ok());
    EXPECT_EQ(c->dag(0).Activity().pending, 1);  // counted until acknowledged
    EXPECT_EQ(c->Debug(0, "num_pending_cleanups"), 1);
    ASSERT_TRUE(c->world().RunUntilIdle());
    for (WorkerId w = 0; w < 3; ++w) {
      EXPECT_FALSE(c->dag(w).Exists(ctx)) << "seed " << seed << " worker " << w;
      EXPECT_EQ(c->dag(w).Activity().pending, 0) << w;
    }
  }
}

TEST(DistAutogradTest, GracefulShutdownWaitsForPendingCleanups) {
  auto c = Cluster::Make(3, "type=CLEANUP_AUTOGRAD_CONTEXT_REQ:delay=300ms");
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);
  c->Forward(ctx, 1, 2);
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  std::vector<Future<Unit>> done = c->world().ShutdownAll(/*graceful=*/true);
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (auto& f : done) EXPECT_TRUE(f.ready() && f.result().ok());
  for (WorkerId w = 0; w < 3; ++w) EXPECT_FALSE(c->dag(w).Exists(ctx)) << w;
}

// Once the agent stopped nothing is sent: a release then erases the context here and schedules
// no cleanup (none pending, none sent).
TEST(DistAutogradTest, NoCleanupIsSentOnceTheAgentStopped) {
  auto c = Cluster::Make(2);
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);
  std::vector<Future<Unit>> done = c->world().ShutdownAll(/*graceful=*/true);
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (auto& f : done) ASSERT_TRUE(f.ready());
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  EXPECT_EQ(c->Debug(0, "num_pending_cleanups"), 0);
  EXPECT_FALSE(c->dag(0).Exists(ctx));
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->Debug(0, "num_pending_cleanups"), 0);
}

// PyTorch's FaultyAgentDistAutogradTest.test_context_cleanup_tensor_with_grad: the first sends of
// CLEANUP_AUTOGRAD_CONTEXT_REQ fail (kUnavailable from the network, the peer alive); release
// retries them, up to 20 attempts.
class FaultyCluster {
 public:
  FaultyCluster(int n, int num_fail_sends) : scheduler_(1) {
    sim::Prng rng(1);
    fabric_ = std::make_unique<sim::SimFabric>(&scheduler_, n,
                                               sim::ResolveFaults(sim::FaultSpec{}, n, rng), 1);
    std::vector<WorkerInfo> infos;
    for (int i = 0; i < n; ++i) infos.push_back(WorkerInfo{absl::StrCat("worker", i), i});
    FaultyNetworkOptions faults;
    faults.fail_types = {wire::CLEANUP_AUTOGRAD_CONTEXT_REQ};
    faults.num_fail_sends = num_fail_sends;
    for (int i = 0; i < n; ++i) {
      auto w = std::make_unique<Worker>();
      w->clock = std::make_unique<sim::SimClock>(&scheduler_, i);
      w->executor = std::make_unique<sim::SimExecutor>(&scheduler_, i);
      w->network = fabric_->CreateEndpoint(i);
      w->faulty = std::make_unique<FaultyNetwork>(w->network.get(), w->clock.get(), faults);
      AgentOptions o;
      o.self = i;
      o.workers = infos;
      w->agent = Agent::Create(o, w->clock.get(), w->faulty.get(), w->executor.get()).value();
      w->dag = DistAutograd::Create(w->agent.get(), w->clock.get(), w->executor.get(),
                                    TestOptions(&log_))
                   .value();
      workers_.push_back(std::move(w));
    }
    for (auto& w : workers_) EXPECT_TRUE(w->agent->Start().ok());
  }
  ~FaultyCluster() {
    for (auto& w : workers_) w->agent->Shutdown(false);
    scheduler_.Clear();
    for (auto& w : workers_) w->dag.reset();
    for (auto& w : workers_) w->agent.reset();
    workers_.clear();
  }
  DistAutograd& dag(int i) { return *workers_[i]->dag; }
  FaultyNetwork& faulty(int i) { return *workers_[i]->faulty; }
  sim::Scheduler& scheduler() { return scheduler_; }
  EventLog& log() { return log_; }

 private:
  struct Worker {
    std::unique_ptr<sim::SimClock> clock;
    std::unique_ptr<sim::SimExecutor> executor;
    std::unique_ptr<sim::SimNetwork> network;
    std::unique_ptr<FaultyNetwork> faulty;
    std::unique_ptr<Agent> agent;
    std::shared_ptr<DistAutograd> dag;
    ~Worker() {
      agent.reset();
      faulty.reset();
      network.reset();
    }
  };
  EventLog log_;
  sim::Scheduler scheduler_;
  std::unique_ptr<sim::SimFabric> fabric_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

TEST(DistAutogradTest, CleanupRetriesThroughSendFailures) {
  FaultyCluster c(3, /*num_fail_sends=*/3);
  ContextId ctx = c.dag(0).NewContext();
  ASSERT_TRUE(c.dag(0).RecordSend(ctx, c.dag(0).NewMessageId(), 1).ok());
  ASSERT_TRUE(c.dag(1).Join(ctx, 0).ok());
  ASSERT_TRUE(c.dag(1).RecordSend(ctx, c.dag(1).NewMessageId(), 2).ok());
  ASSERT_TRUE(c.dag(2).Join(ctx, 1).ok());
  ASSERT_TRUE(c.dag(0).Release(ctx).ok());
  ASSERT_TRUE(c.scheduler().RunUntilIdle());
  for (int w = 0; w < 3; ++w) EXPECT_FALSE(c.dag(w).Exists(ctx)) << w;
  // Worker 0's first 3 sends failed, and so did worker 1's forward: each went through.
  EXPECT_EQ(c.faulty(0).failed()[wire::CLEANUP_AUTOGRAD_CONTEXT_REQ], 3);
  EXPECT_EQ(c.faulty(1).failed()[wire::CLEANUP_AUTOGRAD_CONTEXT_REQ], 3);
  EXPECT_EQ(c.dag(0).Activity().pending, 0);
}

TEST(DistAutogradTest, CleanupGivesUpAfterTwentyAttempts) {
  FaultyCluster c(2, /*num_fail_sends=*/1000);
  ContextId ctx = c.dag(0).NewContext();
  ASSERT_TRUE(c.dag(0).RecordSend(ctx, c.dag(0).NewMessageId(), 1).ok());
  ASSERT_TRUE(c.dag(1).Join(ctx, 0).ok());
  ASSERT_TRUE(c.dag(0).Release(ctx).ok());
  ASSERT_TRUE(c.scheduler().RunUntilIdle());
  EXPECT_EQ(c.faulty(0).failed()[wire::CLEANUP_AUTOGRAD_CONTEXT_REQ], 20);
  EXPECT_EQ(c.dag(0).Activity().pending, 0);  // given up: it holds no shutdown
  EXPECT_TRUE(c.dag(1).Exists(ctx));          // (the peer never heard of it)
  bool gave_up = false;
  for (const auto& e : c.log().events()) {
    gave_up |= e.kind == DistAutogradEvent::kReleaseAcked &&
               e.status.code() == absl::StatusCode::kUnavailable;
  }
  EXPECT_TRUE(gave_up);
}

// ---------------------------------------------------------------------------------------------
// Backward passes.

TEST(DistAutogradTest, BackwardThroughANestedChainRunsEverySendFunctionOnce) {
  auto c = Cluster::Make(3);
  ContextId ctx = c->dag(0).NewContext();
  c->Chain(ctx, {0, 1, 2});
  ASSERT_TRUE(c->RunBackward(0, ctx).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());  // EndPass runs on the strand after the reply
  EXPECT_EQ(c->runner(0).log(),
            (std::vector<std::string>{"begin 0 initiator", "root 0", "send 0 0 g1->0#0", "end 0"}));
  // Worker 1: the reply's send function (first arrival), then the request to 2's.
  std::vector<std::string> w1 = c->runner(1).log();
  ASSERT_EQ(w1.size(), 4u);
  EXPECT_EQ(w1[0], "begin 0");
  EXPECT_TRUE(absl::StartsWith(w1[1], "send 0 ")) << w1[1];
  EXPECT_TRUE(absl::StartsWith(w1[2], "send 0 ")) << w1[2];
  EXPECT_EQ(w1[3], "end 0");
  EXPECT_EQ(c->runner(2).log().size(), 3u);  // begin, send, end
  for (WorkerId w = 0; w < 3; ++w) {
    EXPECT_EQ(c->Debug(w, "num_current_backward_passes"), 0) << w;
    EXPECT_EQ(c->Debug(w, "num_backward_passes_started"), 1) << w;
    EXPECT_EQ(c->log().Count(DistAutogradEvent::kPassEnded, w), 1) << w;
  }
  // retain_graph passes repeat in the same context (test_multiple_backward).
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c->RunBackward(0, ctx, absl::Seconds(10), true).ok());
  EXPECT_EQ(c->Debug(2, "num_backward_passes_started"), 4);
  EXPECT_EQ(c->runner(0).log()[4], "begin 0 initiator retain");
}

TEST(DistAutogradTest, BackwardCycleBackToTheInitiator) {
  auto c = Cluster::Make(2);  // A -> B -> A (_py_nested_call_itself)
  ContextId ctx = c->dag(0).NewContext();
  c->Chain(ctx, {0, 1, 0});
  ASSERT_TRUE(c->RunBackward(0, ctx).ok());
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 0);
  EXPECT_EQ(c->Debug(1, "num_current_backward_passes"), 0);
  EXPECT_EQ(c->Debug(0, "num_backward_passes_started"), 1);  // the same pass, not a second one
}

TEST(DistAutogradTest, FirstArrivalRepliesAtTheEndLaterArrivalsAtOnce) {
  auto c = Cluster::Make(2);
  ContextId ctx = c->dag(0).NewContext();
  // Worker 0 calls worker 1 twice; both replies carry gradients back.
  AutogradMessageId f1 = c->Forward(ctx, 0, 1), f2 = c->Forward(ctx, 0, 1);
  AutogradMessageId r1 = c->Forward(ctx, 1, 0), r2 = c->Forward(ctx, 1, 0);
  c->runner(0).On(ctx, FakeRunner::kRoot, {{1, r1}, {1, r2}});
  c->runner(1).On(ctx, r1, {{0, f1}});
  c->runner(1).On(ctx, r2, {{0, f2}});
  Future<Unit> done = c->dag(0).Backward(ctx, false, c->world().Now() + absl::Seconds(10));
  ASSERT_TRUE(c->world().RunUntil([&] { return c->runner(0).grads_calls().size() == 2; }));
  Future<Message> a = c->runner(0).grads_calls().at(r1);
  Future<Message> b = c->runner(0).grads_calls().at(r2);
  // The later arrival is answered while worker 1's pass still waits for f1/f2's replies.
  ASSERT_TRUE(c->world().RunUntil([&] { return a.ready() || b.ready(); }));
  Future<Message> later = a.ready() ? a : b;
  Future<Message> first = a.ready() ? b : a;
  EXPECT_TRUE(later.result().ok()) << later.result().status();
  EXPECT_FALSE(first.ready());
  EXPECT_EQ(c->Debug(1, "num_current_backward_passes"), 1);
  ASSERT_TRUE(c->world().RunUntilReady(done));
  ASSERT_TRUE(done.result().ok()) << done.result().status();
  EXPECT_TRUE(first.ready() && first.result().ok());
  // The first arrival's reply came after worker 1's pass ended.
  int ended_at = -1, began_at = -1, i = 0;
  for (const auto& e : c->log().events()) {
    if (e.worker == 1 && e.kind == DistAutogradEvent::kPassEnded) ended_at = i;
    if (e.worker == 1 && e.kind == DistAutogradEvent::kPassBegun) began_at = i;
    ++i;
  }
  EXPECT_GE(began_at, 0);
  EXPECT_GT(ended_at, began_at);
  EXPECT_EQ(c->Debug(1, "num_backward_passes_started"), 1);  // one pass for both arrivals
}

TEST(DistAutogradTest, ErrorsNameTheirNodeOnceAndTheContextRecovers) {
  auto c = Cluster::Make(4);
  ContextId ctx = c->dag(0).NewContext();
  c->Chain(ctx, {0, 1, 2, 3});
  // The deepest worker's send function fails (test_backward_autograd_engine_error, 4 hops).
  auto sends = c->dag(3).SendFunctions(ctx).value();
  ASSERT_EQ(sends.size(), 1u);
  c->runner(3).FailOnce(ctx, sends.begin()->first,
                        absl::InternalError("Simulate error on backward pass"));
  absl::Status st = c->RunBackward(0, ctx);
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(st.message(), "Error on Node 3: Simulate error on backward pass");
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (WorkerId w = 0; w < 4; ++w) {
    EXPECT_EQ(c->Debug(w, "num_current_backward_passes"), 0) << w;
  }
  std::vector<std::string> log3 = c->runner(3).log();
  ASSERT_GE(log3.size(), 2u);
  EXPECT_TRUE(absl::StartsWith(log3[log3.size() - 2], "abort ")) << log3[log3.size() - 2];
  EXPECT_EQ(log3.back(), absl::StrCat("end ", ctx));
  // test_multiple_backward_with_errors: the next pass in the same context works.
  EXPECT_TRUE(c->RunBackward(0, ctx).ok());
  // The initiator's own error is prefixed with its own id.
  c->runner(0).FailOnce(ctx, FakeRunner::kRoot, absl::InternalError("local boom"));
  EXPECT_EQ(c->RunBackward(0, ctx).message(), "Error on Node 0: local boom");
}

TEST(DistAutogradTest, BackwardRefusalsUseTheExpectedCodesAndTexts) {
  auto c = Cluster::Make(2);
  Future<Unit> unknown = c->dag(0).Backward(12345, false, absl::InfiniteFuture());
  ASSERT_TRUE(c->world().RunUntilReady(unknown));
  EXPECT_EQ(unknown.result().status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(unknown.result().status().message(), "Could not find autograd context with id: 12345");
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);  // never receives gradients: the pass waits
  Future<Unit> running = c->dag(0).Backward(ctx, false, absl::InfiniteFuture());
  c->world().RunFor(absl::Milliseconds(10));  // the root ran; the pass waits
  Future<Unit> second = c->dag(0).Backward(ctx, false, absl::InfiniteFuture());
  ASSERT_TRUE(c->world().RunUntilReady(second));
  EXPECT_EQ(second.result().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(second.result().status().message(), "already running"))
      << second.result().status();
  EXPECT_FALSE(running.ready());
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 1);
  EXPECT_EQ(c->Debug(0, "num_autograd_contexts"), 1);
  // Gradients outside a pass, or for a recv function that is not recorded, are refused unsent.
  Future<Message> stray = c->dag(1).SendGradients(ctx, 0, 99, "g", {});
  ASSERT_TRUE(c->world().RunUntilReady(stray));
  EXPECT_EQ(stray.result().status().code(), absl::StatusCode::kNotFound);
  // A recorded recv function run outside the pass's drains (here: not in a runner call) while
  // the pass runs: refused, never taken for the pass's gradients.
  ASSERT_TRUE(c->dag(0).RecordRecv(ctx, 77, 1).ok());
  Future<Message> outside = c->dag(0).SendGradients(ctx, 1, 77, "g", {});
  ASSERT_TRUE(c->world().RunUntilReady(outside));
  EXPECT_EQ(outside.result().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(
      Contains(outside.result().status().message(), "it runs only inside dist_autograd.backward"))
      << outside.result().status();
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());  // fails the running pass
  ASSERT_TRUE(c->world().RunUntilReady(running));
  EXPECT_EQ(running.result().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(running.result().status().message(),
            std::string("Error on Node 0: ") + kContextNoLongerValidText);
  ASSERT_TRUE(c->world().RunUntilIdle());
  // Abort and end, then release: in strand order, after the pass's own calls.
  std::vector<std::string> log = c->runner(0).log();
  ASSERT_EQ(log.size(), 5u);
  EXPECT_EQ(log[0], absl::StrCat("begin ", ctx, " initiator"));
  EXPECT_EQ(log[1], absl::StrCat("root ", ctx));
  EXPECT_TRUE(absl::StartsWith(
      log[2], absl::StrCat("abort ", ctx, ": Error on Node 0: Autograd context no longer")))
      << log[2];
  EXPECT_EQ(log[3], absl::StrCat("end ", ctx));
  EXPECT_EQ(log[4], absl::StrCat("release ", ctx));
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 0);
  EXPECT_EQ(c->Debug(0, "num_autograd_contexts"), 0);
}

TEST(DistAutogradTest, DeadlineNamesWhatThePassWaitsFor) {
  auto c = Cluster::Make(3);
  ContextId ctx = c->dag(0).NewContext();
  // test_backward_unused_send_function: a send function nobody sends gradients to.
  AutogradMessageId unused = c->Forward(ctx, 0, 1);
  absl::Time start = c->world().Now();
  absl::Status st = c->RunBackward(0, ctx, absl::Seconds(2));
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(c->world().Now() - start, absl::Seconds(2));
  EXPECT_LE(c->world().Now() - start, absl::Seconds(2) + absl::Milliseconds(10));
  EXPECT_TRUE(Contains(st.message(), "Error on Node 0: distributed backward of autograd context"))
      << st;
  EXPECT_TRUE(Contains(st.message(), "did not finish within 2s")) << st;
  EXPECT_TRUE(Contains(st.message(),
                       absl::StrCat("send functions [", unused, " (gradients from worker 1)]")))
      << st;
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 0);

  // A pass that waits on a remote worker's share: both fail by the initiator's deadline, and the
  // initiator's message names the gradient call.
  ContextId ctx2 = c->dag(0).NewContext();
  AutogradMessageId f = c->Forward(ctx2, 0, 1);
  AutogradMessageId r = c->Forward(ctx2, 1, 0);
  c->Forward(ctx2, 1, 2);  // worker 1's unused send function: its share never finishes
  c->runner(0).On(ctx2, FakeRunner::kRoot, {{1, r}});
  c->runner(1).On(ctx2, r, {{0, f}});
  start = c->world().Now();
  st = c->RunBackward(0, ctx2, absl::Seconds(3));
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_LE(c->world().Now() - start, absl::Seconds(3) + absl::Milliseconds(10));
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->Debug(1, "num_current_backward_passes"), 0);
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 0);
}

TEST(DistAutogradTest, DeadlineMessageListsGradientCalls) {
  auto c = Cluster::Make(2, "type=BACKWARD_AUTOGRAD_REQ:drop=1");
  ContextId ctx = c->dag(0).NewContext();
  ASSERT_TRUE(c->dag(1).Join(ctx, 0).ok());
  AutogradMessageId r = c->Forward(ctx, 1, 0);
  c->runner(0).On(ctx, FakeRunner::kRoot, {{1, r}});  // its gradients are lost on the wire
  absl::Status st = c->RunBackward(0, ctx, absl::Seconds(1));
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(
      Contains(st.message(), absl::StrCat("gradient calls to [worker 1 (message ", r, ")]")))
      << st;
}

TEST(DistAutogradTest, PeerFailureFailsDependentPassesAtOnce) {
  auto c = Cluster::Make(3);
  // A send function recorded for worker 1, not run: its crash fails the pass at once.
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);
  Future<Unit> f = c->dag(0).Backward(ctx, false, c->world().Now() + absl::Seconds(60));
  c->world().RunFor(absl::Milliseconds(5));
  EXPECT_FALSE(f.ready());
  absl::Time crash = c->world().Now();
  c->world().Crash(1);
  ASSERT_TRUE(c->world().RunUntilReady(f));
  EXPECT_LT(c->world().Now() - crash, absl::Seconds(1));
  absl::Status st = f.result().status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(Contains(st.message(), "Error on Node 0: worker 1 failed")) << st;

  // A pass that begins after the peer failed: 0 -> 2, and worker 2 holds a send function towards
  // the crashed worker 1. Worker 2's share fails as soon as it begins, naming worker 1.
  ContextId ctx2 = c->dag(0).NewContext();
  AutogradMessageId req = c->Forward(ctx2, 0, 2);
  AutogradMessageId rep = c->Forward(ctx2, 2, 0);
  c->runner(0).On(ctx2, FakeRunner::kRoot, {{2, rep}});
  c->runner(2).On(ctx2, rep, {{0, req}});
  ASSERT_TRUE(c->dag(2).RecordSend(ctx2, c->dag(2).NewMessageId(), 1).ok());
  Future<Unit> g = c->dag(0).Backward(ctx2, false, c->world().Now() + absl::Seconds(60));
  ASSERT_TRUE(c->world().RunUntilReady(g));
  st = g.result().status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE(Contains(st.message(), "Error on Node 2: worker 1 failed")) << st;
  EXPECT_LT(c->world().Now() - crash, absl::Seconds(1));
}

TEST(DistAutogradTest, CrashDuringAPassFailsItNamingThePeer) {
  auto c = Cluster::Make(3);
  ContextId ctx = c->dag(0).NewContext();
  c->Chain(ctx, {0, 1, 2});
  c->runner(2).AddSend(ctx, 1000);  // worker 2's share never finishes on its own
  Future<Unit> f = c->dag(0).Backward(ctx, false, c->world().Now() + absl::Seconds(60));
  ASSERT_TRUE(c->world().RunUntil([&] { return c->Debug(2, "num_current_backward_passes") == 1; }));
  absl::Time crash = c->world().Now();
  c->world().Crash(2);
  ASSERT_TRUE(c->world().RunUntilReady(f));
  EXPECT_LT(c->world().Now() - crash, absl::Seconds(1));
  absl::Status st = f.result().status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE(absl::StartsWith(st.message(), "Error on Node 1: ")) << st;
  EXPECT_TRUE(Contains(st.message(), "worker2") || Contains(st.message(), "worker 2")) << st;
}

TEST(DistAutogradTest, ContextsOfAFailedCreatorAreReleased) {
  auto c = Cluster::Make(3);
  ContextId ctx = c->dag(1).NewContext();
  c->Forward(ctx, 1, 2);
  c->Forward(ctx, 2, 0);
  ContextId mine = c->dag(0).NewContext();
  c->Forward(mine, 0, 2);
  c->world().Crash(1);
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(c->dag(2).Exists(ctx));
  EXPECT_TRUE(c->dag(2).IsReleased(ctx));
  EXPECT_FALSE(c->dag(0).Exists(ctx));
  EXPECT_TRUE(c->dag(2).Exists(mine));  // only the failed worker's contexts
  EXPECT_EQ(c->dag(2).Join(ctx, 0).code(), absl::StatusCode::kNotFound);
}

// A middle worker crashes before its reply (carrying its involved workers) reached the creator:
// the workers below it, joined only through it, release the context themselves (and forward
// below), but leave the living creator's alone. Found by the explorer (autograd_chain, a crash).
TEST(DistAutogradTest, ContextsJoinedOnlyThroughAFailedWorkerAreReleased) {
  auto c = Cluster::Make(4);
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);  // 0 -> 1 -> 2 -> 3, worker 0 learns nothing of 2 and 3
  c->Forward(ctx, 1, 2);
  c->Forward(ctx, 2, 3);
  c->Forward(ctx, 2, 0);  // worker 2 also sent to the creator (a known worker)
  ContextId other = c->dag(0).NewContext();
  c->Forward(other, 0, 1);
  c->Forward(other, 1, 2);
  c->Forward(other, 0, 2);  // worker 2 joined it from a live worker too: kept
  c->world().Crash(1);
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(c->dag(2).Exists(ctx));
  EXPECT_FALSE(c->dag(3).Exists(ctx));  // forwarded below
  EXPECT_TRUE(c->dag(3).IsReleased(ctx));
  EXPECT_TRUE(c->dag(0).Exists(ctx));  // the creator exits it itself
  EXPECT_TRUE(c->dag(2).Exists(other));
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->dag(0).Release(other).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (WorkerId w : {0, 2, 3}) EXPECT_EQ(c->Debug(w, "num_autograd_contexts"), 0) << w;
}

// A worker declared failed may be back: its new incarnation joined a context through a forward
// call (which the core cannot tell from the old one) and must still be released; a dead one is
// tried once. Found by the explorer (autograd_release_race, a crash with restart).
TEST(DistAutogradTest, ReleaseReachesARestartedWorkerAndTriesADeadOneOnce) {
  auto c = Cluster::Make(3);
  ContextId dead = c->dag(0).NewContext();
  c->Forward(dead, 0, 2);
  c->world().Crash(1);
  ASSERT_TRUE(c->world().Restart(1).ok());
  c->world().Crash(2);
  ASSERT_TRUE(c->world().RunUntilIdle());  // both declared failed on worker 0
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);  // the new incarnation of worker 1 joins
  ASSERT_TRUE(c->dag(1).Exists(ctx));
  const absl::Time start = c->world().Now();
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->dag(0).Release(dead).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(c->dag(1).Exists(ctx));
  EXPECT_TRUE(c->dag(1).IsReleased(ctx));
  EXPECT_EQ(c->Debug(0, "num_pending_cleanups"), 0);
  EXPECT_LT(c->world().Now() - start, absl::Seconds(1));  // no 20 attempts at the dead one
}

// Found by the explorer (autograd_release_race, seed 467, --faults=all): a worker declared failed
// that restarted and joined a context through this worker's forward call got a single cleanup
// attempt, and when that one was lost its copy was never released. The request went out (the
// network sends to a new incarnation), so a timeout is retried; only a send failure (the network
// still has the worker down) ends the attempts to a worker declared failed.
TEST(DistAutogradTest, ReleaseToARestartedWorkerIsRetriedWhenAnAttemptIsLost) {
  // Requests from worker 0 to worker 1 are lost during [1s, 1.3s): the first attempts.
  auto c = Cluster::Make(3, "partition=0>1@1s..1.3s");
  c->world().Crash(1);
  ASSERT_TRUE(c->world().Restart(1).ok());
  c->world().Crash(2);
  ASSERT_TRUE(c->world().RunUntilIdle());  // both declared failed on worker 0
  ASSERT_LT(c->world().Elapsed(), absl::Seconds(1));
  c->world().RunFor(absl::Seconds(1) - c->world().Elapsed());
  ContextId dead = c->dag(0).NewContext();
  c->Forward(dead, 0, 2);
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);  // the new incarnation of worker 1 joins
  ASSERT_TRUE(c->dag(1).Exists(ctx));
  const absl::Time start = c->world().Now();
  ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->dag(0).Release(dead).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(c->dag(1).Exists(ctx));
  EXPECT_TRUE(c->dag(1).IsReleased(ctx));
  EXPECT_EQ(c->Debug(1, "num_autograd_contexts"), 0);
  EXPECT_EQ(c->Debug(0, "num_pending_cleanups"), 0);
  EXPECT_LT(c->world().Now() - start, absl::Seconds(2));  // a few retries, none at the dead one
}

TEST(DistAutogradTest, AgentStopCancelsRunningPasses) {
  auto c = Cluster::Make(2);
  ContextId ctx = c->dag(0).NewContext();
  c->Forward(ctx, 0, 1);  // nothing in flight: the pass holds no shutdown barrier
  Future<Unit> f = c->dag(0).Backward(ctx, false, absl::InfiniteFuture());
  c->world().RunFor(absl::Milliseconds(5));
  EXPECT_FALSE(f.ready());
  std::vector<Future<Unit>> down = c->world().ShutdownAll(/*graceful=*/true);
  ASSERT_TRUE(c->world().RunUntilReady(f));
  EXPECT_EQ(f.result().status().code(), absl::StatusCode::kCancelled) << f.result().status();
  EXPECT_TRUE(Contains(f.result().status().message(), "stopped")) << f.result().status();
  ASSERT_TRUE(c->world().RunUntilIdle());
  for (auto& d : down) EXPECT_TRUE(d.ready());
  Future<Unit> after = c->dag(0).Backward(ctx, false, absl::InfiniteFuture());
  ASSERT_TRUE(c->world().RunUntilReady(after));
  EXPECT_EQ(after.result().status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 0);
}

TEST(DistAutogradTest, MalformedAndUnknownBackwardRequestsGetClearErrors) {
  auto c = Cluster::Make(2);
  auto call = [&](MessageType type, std::string payload) {
    Future<Message> f = c->world().agent(1).Call(0, type, std::move(payload), {});
    EXPECT_TRUE(c->world().RunUntilReady(f));
    return f.result().status();
  };
  absl::Status st = call(wire::BACKWARD_AUTOGRAD_REQ, "\xff\xff\xff garbage");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "BACKWARD_AUTOGRAD_REQ")) << st;
  EXPECT_TRUE(Contains(st.message(), "is not a BackwardReq")) << st;
  st = call(wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, "\xff\xff\xff garbage");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "CLEANUP_AUTOGRAD_CONTEXT_REQ")) << st;
  EXPECT_TRUE(Contains(st.message(), "is not a CleanupReq")) << st;
  // Well-formed protobuf, bad values. Field 1 (context_id) = -1 as a varint.
  std::string negative = std::string("\x08", 1) + std::string(9, '\xff') + std::string("\x01", 1);
  st = call(wire::BACKWARD_AUTOGRAD_REQ, negative);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "invalid ids")) << st;
  st = call(wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, negative);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "invalid autograd context id -1")) << st;
  // Unknown context and unknown message id: PyTorch's texts, from the node that found them.
  std::string ctx_only = std::string("\x08\x2a", 2);  // context_id = 42
  st = call(wire::BACKWARD_AUTOGRAD_REQ, ctx_only);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "Error on Node 0: Could not find autograd context with id: 42");
  ContextId ctx = c->dag(0).NewContext();
  ASSERT_TRUE(c->dag(0).RecordSend(ctx, 5, 0).ok());  // a send function towards worker 0
  std::string with_msg = std::string("\x08", 1) + std::string(1, static_cast<char>(ctx)) +
                         std::string("\x10\x09", 2);  // message_id = 9
  st = call(wire::BACKWARD_AUTOGRAD_REQ, with_msg);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(st.message(),
            "Error on Node 0: Could not find send function for autograd message id: 9");
  // Message 5 exists but was sent to worker 0, not to the caller (worker 1).
  std::string wrong =
      std::string("\x08", 1) + std::string(1, static_cast<char>(ctx)) + std::string("\x10\x05", 2);
  st = call(wire::BACKWARD_AUTOGRAD_REQ, wrong);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "was sent to worker 0, not to worker 1")) << st;
  // A cleanup for an unknown context is acknowledged (and tombstones it).
  st = call(wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, ctx_only);
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_TRUE(c->dag(0).IsReleased(42));
  // The worker keeps serving.
  EXPECT_TRUE(c->dag(0).Exists(ctx));
}

// A protobuf varint field (wire type 0), for hand-made payloads.
std::string VarintField(int field, int64_t value) {
  std::string out(1, static_cast<char>(field << 3));
  uint64_t v = static_cast<uint64_t>(value);
  do {
    char byte = static_cast<char>(v & 0x7f);
    v >>= 7;
    if (v != 0) byte = static_cast<char>(byte | 0x80);
    out.push_back(byte);
  } while (v != 0);
  return out;
}

// A worker still in an old pass (waiting for gradients that will never come: the pass failed
// elsewhere) takes the initiator's next pass at once, and a late message of the old pass is
// answered and dropped, never taken for a pass of its own.
TEST(DistAutogradTest, ANewerPassOfTheSameInitiatorSupersedesAndStragglersAreDropped) {
  auto c = Cluster::Make(2);
  ContextId ctx = c->dag(0).NewContext();
  ASSERT_TRUE(c->dag(1).Join(ctx, 0).ok());
  for (AutogradMessageId m : {7, 8}) {
    ASSERT_TRUE(c->dag(1).RecordSend(ctx, m, 0).ok());
    c->runner(1).AddSend(ctx, m);
  }
  auto send = [&](AutogradMessageId message, int64_t pass) {
    std::string req = VarintField(1, ctx) + VarintField(2, message) + VarintField(5, pass);
    return c->world().agent(0).Call(1, wire::BACKWARD_AUTOGRAD_REQ, std::move(req), {});
  };
  const int64_t p1 = 3, p2 = 4;  // passes of worker 0 (ids below 1 << 48)
  Future<Message> first = send(7, p1);
  c->world().RunFor(absl::Milliseconds(50));
  EXPECT_FALSE(first.ready());  // pass p1 waits for message 8's gradients
  EXPECT_TRUE(c->dag(1).PassRunning(ctx, p1));

  Future<Message> second = send(7, p2);
  ASSERT_TRUE(c->world().RunUntilReady(first));
  EXPECT_EQ(first.result().status().code(), absl::StatusCode::kAborted) << first.result().status();
  EXPECT_TRUE(Contains(first.result().status().message(), "superseded by pass 4 of worker 0"))
      << first.result().status();
  EXPECT_TRUE(c->dag(1).PassRunning(ctx, p2));

  Future<Message> straggler = send(8, p1);
  ASSERT_TRUE(c->world().RunUntilReady(straggler));
  EXPECT_TRUE(straggler.result().ok()) << straggler.result().status();
  EXPECT_TRUE(c->dag(1).PassRunning(ctx, p2));  // not taken for p1, not counted for p2
  EXPECT_FALSE(second.ready());

  Future<Message> last = send(8, p2);
  ASSERT_TRUE(c->world().RunUntilReady(second));
  EXPECT_TRUE(second.result().ok()) << second.result().status();
  ASSERT_TRUE(c->world().RunUntilReady(last));
  EXPECT_FALSE(c->dag(1).AnyPassRunning(ctx));
}

// Ids off the wire name workers of the world, or are refused naming the id; nothing is learned.
TEST(DistAutogradTest, IdsOutsideTheWorldAreRefused) {
  auto c = Cluster::Make(3);
  ContextId ctx = c->dag(0).NewContext();
  AutogradMessageId msg = c->Forward(ctx, 0, 1);
  // Join: a creator (CreatorOf) outside the world, or `from` outside it.
  const ContextId alien = (int64_t{7} << 48) | 5;
  absl::Status st = c->dag(1).Join(alien, 0);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), absl::StrCat("autograd context id ", alien))) << st;
  EXPECT_TRUE(Contains(st.message(), "creator worker 7")) << st;
  EXPECT_FALSE(c->dag(1).Exists(alien));
  EXPECT_FALSE(c->dag(1).IsReleased(alien));
  st = c->dag(2).Join(ctx, 9);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), "worker id 9")) << st;
  EXPECT_TRUE(Contains(st.message(), absl::StrCat("autograd context ", ctx))) << st;
  EXPECT_FALSE(c->dag(2).Exists(ctx));
  EXPECT_EQ(c->dag(2).Join(ctx, -1).code(), absl::StatusCode::kInvalidArgument);
  // LearnInvolved refuses the whole list.
  st = c->dag(0).LearnInvolved(ctx, {2, 42});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), "worker id 42")) << st;
  EXPECT_EQ(c->dag(0).Involved(ctx).value(), (std::vector<WorkerId>{0, 1}));
  // Nor do known workers or send destinations leave the world.
  st = c->dag(0).AddKnownWorker(ctx, 3);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), "worker id 3")) << st;
  st = c->dag(0).RecordSend(ctx, c->dag(0).NewMessageId(), -2);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), "worker id -2")) << st;
  EXPECT_EQ(c->dag(0).KnownWorkers(ctx).value(), (std::vector<WorkerId>{1}));
  EXPECT_EQ(c->dag(0).SendFunctions(ctx).value(),
            (std::map<AutogradMessageId, WorkerId>{{msg, 1}}));
  // CleanupReq: an involved worker or the context's creator outside the world refuses the
  // request with a clear error; nothing is released or tombstoned.
  auto cleanup = [&](std::string payload) {
    Future<Message> f =
        c->world().agent(1).Call(0, wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, std::move(payload), {});
    EXPECT_TRUE(c->world().RunUntilReady(f));
    return f.result().status();
  };
  st = cleanup(VarintField(1, ctx) + VarintField(2, 1) + VarintField(2, 77));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), "CLEANUP_AUTOGRAD_CONTEXT_REQ")) << st;
  EXPECT_TRUE(Contains(st.message(), "worker id 77")) << st;
  EXPECT_TRUE(c->dag(0).Exists(ctx));
  st = cleanup(VarintField(1, alien));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), absl::StrCat("autograd context id ", alien))) << st;
  EXPECT_FALSE(c->dag(0).IsReleased(alien));
  EXPECT_EQ(c->Debug(0, "num_released_context_records"), 0);
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_EQ(c->log().Count(DistAutogradEvent::kReleased), 0);
  // A well-formed cleanup still works: the worker keeps serving.
  st = cleanup(VarintField(1, ctx) + VarintField(2, 1));
  EXPECT_TRUE(st.ok()) << st;
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_FALSE(c->dag(0).Exists(ctx));
  EXPECT_TRUE(c->dag(0).IsReleased(ctx));
}

TEST(DistAutogradTest, DebugInfoCountsContextsAndPasses) {
  auto c = Cluster::Make(2);
  std::map<std::string, int64_t> info = c->dag(0).GetDebugInfo();
  EXPECT_EQ(info.count("num_autograd_contexts"), 1u);
  EXPECT_EQ(info.count("num_current_backward_passes"), 1u);
  EXPECT_EQ(info["num_autograd_contexts"], 0);
  std::vector<ContextId> ctxs;
  for (int i = 0; i < 5; ++i) ctxs.push_back(c->dag(0).NewContext());
  EXPECT_EQ(c->Debug(0, "num_autograd_contexts"), 5);
  c->Forward(ctxs[0], 0, 1);
  EXPECT_EQ(c->Debug(1, "num_autograd_contexts"), 1);
  Future<Unit> f = c->dag(0).Backward(ctxs[0], false, absl::InfiniteFuture());
  EXPECT_EQ(c->Debug(0, "num_current_backward_passes"), 1);
  for (ContextId ctx : ctxs) ASSERT_TRUE(c->dag(0).Release(ctx).ok());
  ASSERT_TRUE(c->world().RunUntilIdle());
  EXPECT_TRUE(f.ready());
  for (WorkerId w : {0, 1}) {
    EXPECT_EQ(c->Debug(w, "num_autograd_contexts"), 0) << w;
    EXPECT_EQ(c->Debug(w, "num_current_backward_passes"), 0) << w;
  }
  EXPECT_EQ(c->Debug(0, "num_backward_passes_failed"), 1);
}

// ---------------------------------------------------------------------------------------------
// Planted bugs: this file is also built against //core:dist_autograd_planted
// (:dist_autograd_planted_test), where each bug shows its symptom; in the production library
// setting them changes nothing.

TEST(DistAutogradTest, PlantedBugsTakeEffectOnlyInThePlantedVariant) {
  const bool planted = DistAutogradPlantedBugsCompiledIn();
  {
    DistAutogradPlantedBugs bugs;
    bugs.forget_transitive_release = true;
    auto c = Cluster::Make(3, "none", 1, bugs);
    ContextId ctx = c->dag(0).NewContext();
    c->Forward(ctx, 0, 1);
    c->Forward(ctx, 1, 2);
    ASSERT_TRUE(c->dag(0).Release(ctx).ok());
    ASSERT_TRUE(c->world().RunUntilIdle());
    EXPECT_FALSE(c->dag(1).Exists(ctx));
    EXPECT_EQ(c->dag(2).Exists(ctx), planted) << "forget_transitive_release";
  }
  {
    DistAutogradPlantedBugs bugs;
    bugs.release_once = true;
    auto c = Cluster::Make(2, "partition=0-1@0..100ms", 1, bugs);
    ContextId ctx = c->dag(0).NewContext();
    c->Forward(ctx, 0, 1);
    ASSERT_TRUE(c->dag(0).Release(ctx).ok());  // the first attempt is lost in the partition
    ASSERT_TRUE(c->world().RunUntilIdle());
    EXPECT_EQ(c->dag(1).Exists(ctx), planted) << "release_once";
  }
  {
    DistAutogradPlantedBugs bugs;
    bugs.resurrect_released = true;
    auto c = Cluster::Make(2, "none", 1, bugs);
    ContextId ctx = c->dag(0).NewContext();
    c->Forward(ctx, 0, 1);
    ASSERT_TRUE(c->dag(0).Release(ctx).ok());
    ASSERT_TRUE(c->world().RunUntilIdle());
    EXPECT_EQ(c->dag(1).Join(ctx, 0).ok(), planted) << "resurrect_released";
    EXPECT_EQ(c->dag(1).Exists(ctx), planted);
  }
  {
    DistAutogradPlantedBugs bugs;
    bugs.reply_before_rpcs = true;
    auto c = Cluster::Make(3, "type=BACKWARD_AUTOGRAD_REQ:delay=50ms", 1, bugs);
    // 0 -> 1 -> 2; only the replies carry gradients (the requests had none that required grad),
    // so worker 1's share is locally done as soon as it has sent worker 2 its gradients.
    ContextId ctx = c->dag(0).NewContext();
    ASSERT_TRUE(c->dag(1).Join(ctx, 0).ok());
    ASSERT_TRUE(c->dag(2).Join(ctx, 1).ok());
    AutogradMessageId r0 = c->Forward(ctx, 1, 0);
    AutogradMessageId r1 = c->Forward(ctx, 2, 1);
    c->runner(0).On(ctx, FakeRunner::kRoot, {{1, r0}});
    c->runner(1).On(ctx, r0, {{2, r1}});
    ASSERT_TRUE(c->RunBackward(0, ctx).ok());
    // Correct: the backward returns only once worker 2 ran its share.
    EXPECT_EQ(c->log().Count(DistAutogradEvent::kGradientsRun, 2), planted ? 0 : 1)
        << "reply_before_rpcs";
  }
}

// ---------------------------------------------------------------------------------------------
// The strand, on real threads: many gradient messages for one context arrive at once on a
// thread pool; the runner's calls for that context never overlap.

// Delivers every message to the one worker's agent, in order, from pool tasks.
class LoopbackNetwork : public Network {
 public:
  explicit LoopbackNetwork(Executor* executor) : executor_(executor) {}
  WorkerId self() const override { return 0; }
  absl::Status Start(NetworkObserver* observer) override {
    absl::MutexLock lock(&mu_);
    observer_ = observer;
    return absl::OkStatus();
  }
  absl::Status Send(WorkerId to, Message message) override {
    if (to != 0) return absl::InvalidArgumentError("one worker only");
    message.envelope.set_from(0);
    message.envelope.set_to(0);
    message.SealBuffers();
    absl::MutexLock lock(&mu_);
    if (stopped_) return absl::UnavailableError("stopped");
    queue_.push_back(std::move(message));
    if (!draining_) {
      draining_ = true;
      executor_->Post([this] { Drain(); });
    }
    return absl::OkStatus();
  }
  void Stop() override {
    absl::MutexLock lock(&mu_);
    stopped_ = true;
    mu_.Await(absl::Condition(
        +[](bool* draining) { return !*draining; }, &draining_));
  }

 private:
  void Drain() {
    while (true) {
      Message m;
      NetworkObserver* observer;
      {
        absl::MutexLock lock(&mu_);
        if (queue_.empty() || stopped_) {
          draining_ = false;
          return;
        }
        m = std::move(queue_.front());
        queue_.erase(queue_.begin());
        observer = observer_;
      }
      observer->OnMessage(std::move(m));  // one at a time: never concurrently for a sender
    }
  }
  Executor* const executor_;
  absl::Mutex mu_;
  NetworkObserver* observer_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<Message> queue_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

// A runner whose calls take a while, so that two of them for one context would overlap.
class SlowRunner : public FakeRunner {
 public:
  using FakeRunner::FakeRunner;
  PassProgress RunSendFunction(ContextId ctx, AutogradMessageId msg, const std::string& grads,
                               const std::vector<Buffer>& buffers) override {
    {
      absl::MutexLock lock(&mu_);
      if (busy_[ctx]++ > 0) overlap_ = true;
    }
    absl::SleepFor(absl::Milliseconds(2));
    PassProgress p = FakeRunner::RunSendFunction(ctx, msg, grads, buffers);
    absl::MutexLock lock(&mu_);
    --busy_[ctx];
    return p;
  }
  bool overlap() const {
    absl::MutexLock lock(&mu_);
    return overlap_ || overlapped();
  }

 private:
  mutable absl::Mutex mu_;
  std::map<ContextId, int> busy_ ABSL_GUARDED_BY(mu_);
  bool overlap_ ABSL_GUARDED_BY(mu_) = false;
};

// One worker on real threads (a thread pool, the system clock, loopback), for the tests that need
// runner calls on other threads. Its agent starts once a runner is set (Start).
struct ThreadedWorker {
  ThreadedWorker() : pool(4), network(&pool) {
    AgentOptions o;
    o.self = 0;
    o.workers = {WorkerInfo{"worker0", 0}};
    o.default_timeout = absl::ZeroDuration();
    agent = Agent::Create(o, &clock, &network, &pool).value();
    dag = DistAutograd::Create(agent.get(), &clock, &pool, TestOptions(&log)).value();
  }
  ~ThreadedWorker() {
    agent->Shutdown(false).Wait();
    pool.Shutdown();
  }
  absl::Status Start(FakeRunner& runner) {
    runner.set_dag(dag.get());
    dag->SetRunner(&runner);
    return agent->Start();
  }

  ThreadPool pool;
  SystemClock clock;
  LoopbackNetwork network;
  EventLog log;
  std::unique_ptr<Agent> agent;
  std::shared_ptr<DistAutograd> dag;
};

TEST(DistAutogradTest, RunnerCallsForOneContextNeverOverlap) {
  SlowRunner runner(0);  // outlives the worker (declared first)
  ThreadedWorker w;
  ASSERT_TRUE(w.Start(runner).ok());
  DistAutograd* dag = w.dag.get();
  // rpc_sync to self, many times: send and recv functions on the same worker.
  constexpr int kCalls = 24;
  std::vector<ContextId> ctxs = {dag->NewContext(), dag->NewContext()};
  for (ContextId ctx : ctxs) {
    std::vector<FakeRunner::Fire> fires;
    for (int i = 0; i < kCalls; ++i) {
      AutogradMessageId m = dag->NewMessageId();
      ASSERT_TRUE(dag->RecordSend(ctx, m, 0).ok());
      ASSERT_TRUE(dag->RecordRecv(ctx, m, 0).ok());
      runner.AddSend(ctx, m);
      fires.push_back({0, m});
    }
    runner.On(ctx, FakeRunner::kRoot, fires);
  }
  std::vector<Future<Unit>> done;
  for (ContextId ctx : ctxs) done.push_back(dag->Backward(ctx, false, absl::InfiniteFuture()));
  for (auto& f : done) {
    ASSERT_TRUE(f.WaitFor(absl::Seconds(30)));
    EXPECT_TRUE(f.result().ok()) << f.result().status();
  }
  EXPECT_FALSE(runner.overlap());
  int sends = 0;
  for (const std::string& line : runner.log()) sends += absl::StartsWith(line, "send ");
  EXPECT_EQ(sends, 2 * kCalls);
}

// A runner whose RunRoot blocks until released.
class BlockingRunner : public FakeRunner {
 public:
  using FakeRunner::FakeRunner;
  PassProgress RunRoot(ContextId ctx) override {
    entered.Notify();
    release.WaitForNotification();
    return FakeRunner::RunRoot(ctx);
  }
  absl::Notification entered;
  absl::Notification release;
};

// SetRunner(nullptr) (the glue's destructor) returns only once a runner call running on another
// thread returned; after it no call reaches the runner and passes are refused.
TEST(DistAutogradTest, DetachingTheRunnerWaitsForARunningCall) {
  BlockingRunner runner(0);  // outlives the worker (declared first)
  ThreadedWorker w;
  ASSERT_TRUE(w.Start(runner).ok());
  DistAutograd* dag = w.dag.get();
  ContextId ctx = dag->NewContext();
  Future<Unit> first = dag->Backward(ctx, false, absl::InfiniteFuture());
  ASSERT_TRUE(runner.entered.WaitForNotificationWithTimeout(absl::Seconds(30)));
  std::atomic<bool> detached{false};
  std::thread detach([&] {
    dag->SetRunner(nullptr);
    detached = true;
  });
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_FALSE(detached.load());  // RunRoot still runs
  const size_t calls = runner.log().size();
  runner.release.Notify();
  detach.join();
  EXPECT_TRUE(detached.load());
  ASSERT_TRUE(first.WaitFor(absl::Seconds(30)));
  Future<Unit> second = dag->Backward(ctx, false, absl::InfiniteFuture());
  ASSERT_TRUE(second.WaitFor(absl::Seconds(30)));
  EXPECT_EQ(second.result().status().code(), absl::StatusCode::kFailedPrecondition)
      << second.result().status();
  // Only the released RunRoot's own line came after the detach began (no EndPass, no Release).
  EXPECT_EQ(runner.log().size(), calls + 1);
}

}  // namespace
}  // namespace tether
