#include "testing/scenarios/dist_autograd_scenarios.h"

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "sim/random.h"
#include "testing/scenarios/dist_autograd_harness.h"
#include "testing/scenarios/dist_autograd_ledger.h"
#include "testing/scenarios/scenario.h"

namespace tether::scenarios {

DistAutogradPlantedBugs& PlantedDistAutogradBugs() {
  static DistAutogradPlantedBugs bugs;
  return bugs;
}

namespace {

using testing::IntGraphRunner;
using testing::LocalGraph;
using testing::NodeId;
using testing::Term;

enum class Variant { kChain, kCycle, kTrainers, kError, kCrash, kReleaseRace, kShutdown, kMixed };
constexpr int kNumConcreteVariants = 7;
constexpr int kWorkers = 4;
constexpr int kParams = 3;
// Timeouts of forward calls (the agent's default) and of backward passes.
constexpr absl::Duration kCallTimeout = absl::Seconds(2);
constexpr absl::Duration kBackwardTimeout = absl::Seconds(2);
// An initiator gives up on a forward that has not completed by then (a lost pipeline hop).
constexpr absl::Duration kForwardLimit = absl::Seconds(5);

const char* VariantName(Variant v) {
  switch (v) {
    case Variant::kChain:
      return "chain";
    case Variant::kCycle:
      return "cycle";
    case Variant::kTrainers:
      return "trainers";
    case Variant::kError:
      return "error";
    case Variant::kCrash:
      return "crash";
    case Variant::kReleaseRace:
      return "release_race";
    case Variant::kShutdown:
      return "shutdown";
    case Variant::kMixed:
      return "mixed";
  }
  return "?";
}

// One forward call made inside a context. The callee computes h = k_in·input + k_param·param
// (input: the request's value, if it carries one), makes its nested calls (each carrying
// k_send·h), and, if the reply carries a value, replies out = h + Σ k_out·(nested replies).
struct Hop {
  WorkerId to = 0;
  bool grad_request = true;  // the request carries a value that requires grad (a send function)
  bool grad_reply = true;    // the reply carries one back
  bool await = true;         // the caller waits for the reply before it replies (or goes on)
  bool sink = false;         // to the initiator: the value feeds its loss (a pipeline's end)
  bool fails = false;        // the callee's op h fails in backward
  int param = 0;
  int64_t k_send = 1, k_in = 1, k_param = 1, k_out = 1;
  int delay_ms = 0;  // the callee waits this long before working
  std::vector<Hop> nested;
};

enum class Exit { kAfterBackward, kDuringForward, kDuringBackward };
enum class CrashAt { kNone, kBeforeBackward, kDuringBackward };

struct ContextPlan {
  WorkerId initiator = 0;
  int gap_ms = 0;  // the wait before it starts (after the initiator's previous context)
  int param = 0;
  int64_t k0 = 1;
  std::vector<Hop> calls;
  int sinks = 0;
  int passes = 1;           // backward passes; all but the last with retain_graph
  bool extra_pass = false;  // then one more, which must fail (the graph was freed)
  Exit exit = Exit::kAfterBackward;
  int exit_us = 0;
  WorkerId failing = -1;  // the worker whose op fails in backward (the error scenario)
  CrashAt crash = CrashAt::kNone;
  WorkerId victim = -1;
  int crash_us = 0;
  bool lenient = false;  // calls may fail even without lossy faults (the scenario's crash)
};

struct Plan {
  Variant variant = Variant::kChain;
  std::vector<ContextPlan> contexts;
  int shutdown_delay_ms = 50;
};

class Planner {
 public:
  explicit Planner(sim::Prng* rng) : rng_(rng) {}
  int Between(int lo, int hi) { return lo + static_cast<int>(rng_->Uniform(hi - lo + 1)); }
  bool Coin(double p) { return rng_->Bernoulli(p); }
  WorkerId Other(WorkerId not_this) {
    return static_cast<WorkerId>((not_this + 1 + Between(0, kWorkers - 2)) % kWorkers);
  }
  std::vector<WorkerId> Others(WorkerId not_this) {
    std::vector<WorkerId> out;
    for (WorkerId w = 0; w < kWorkers; ++w) {
      if (w != not_this) out.push_back(w);
    }
    for (size_t i = out.size(); i > 1; --i) std::swap(out[i - 1], out[Between(0, i - 1)]);
    return out;
  }

  Hop MakeHop(WorkerId to, int max_delay_ms = 3) {
    Hop h;
    h.to = to;
    h.param = Between(0, kParams - 1);
    h.k_send = Between(1, 3);
    h.k_in = Between(1, 3);
    h.k_param = Between(1, 3);
    h.k_out = Between(1, 3);
    h.delay_ms = Between(0, max_delay_ms);
    return h;
  }

  ContextPlan Context(WorkerId initiator) {
    ContextPlan c;
    c.initiator = initiator;
    c.param = Between(0, kParams - 1);
    c.k0 = Between(1, 3);
    c.gap_ms = Between(0, 20);
    return c;
  }

  // initiator -> path[0] -> path[1] -> ..., each nested in the previous, replies carrying values.
  Hop NestedChain(const std::vector<WorkerId>& path) {
    Hop first = MakeHop(path[0]);
    Hop* at = &first;
    for (size_t i = 1; i < path.size(); ++i) {
      at->nested.push_back(MakeHop(path[i]));
      at = &at->nested.back();
    }
    return first;
  }

  // initiator -> path[0] -> ... -> initiator: each hop forwards the value and replies at once
  // (no value back); the last hop brings it to the initiator's loss.
  Hop Pipeline(WorkerId initiator, const std::vector<WorkerId>& path) {
    Hop first = MakeHop(path[0]);
    first.grad_reply = false;
    Hop* at = &first;
    for (size_t i = 1; i <= path.size(); ++i) {
      Hop next = MakeHop(i < path.size() ? path[i] : initiator);
      next.grad_reply = false;
      next.await = false;
      next.sink = i == path.size();
      at->nested.push_back(next);
      at = &at->nested.back();
    }
    return first;
  }

  // A random tree of nested calls below `at` (replies carry values).
  void Tree(Hop* at, int depth) {
    if (depth == 0) return;
    const int n = Between(0, 2);
    for (int i = 0; i < n; ++i) {
      at->nested.push_back(MakeHop(Other(at->to)));
      Tree(&at->nested.back(), depth - 1);
    }
  }

 private:
  sim::Prng* rng_;
};

int CountSinks(const Hop& h) {
  int n = h.sink ? 1 : 0;
  for (const Hop& c : h.nested) n += CountSinks(c);
  return n;
}

void Finalize(ContextPlan* c) {
  c->sinks = 0;
  for (const Hop& h : c->calls) c->sinks += CountSinks(h);
}

// Every non-sink hop of a context, for picking one.
void CollectHops(Hop* h, std::vector<Hop*>* out) {
  if (!h->sink) out->push_back(h);
  for (Hop& c : h->nested) CollectHops(&c, out);
}

Plan MakePlan(Variant variant, uint64_t seed) {
  sim::Prng rng = sim::Prng(seed).Fork(4242);
  Plan plan;
  if (variant == Variant::kMixed) {
    variant = static_cast<Variant>(rng.Uniform(kNumConcreteVariants));
  }
  plan.variant = variant;
  Planner p(&rng);
  switch (variant) {
    case Variant::kChain: {
      // A nested chain (A→B→C, maybe →D) and a pipeline A→B→C→D→A, from one initiator.
      const WorkerId a = p.Between(0, kWorkers - 1);
      std::vector<WorkerId> others = p.Others(a);
      ContextPlan nested = p.Context(a);
      std::vector<WorkerId> path(others.begin(), others.begin() + p.Between(2, 3));
      nested.calls.push_back(p.NestedChain(path));
      nested.passes = p.Between(1, 2);
      plan.contexts.push_back(nested);
      ContextPlan pipe = p.Context(a);
      pipe.calls.push_back(p.Pipeline(a, p.Others(a)));
      plan.contexts.push_back(pipe);
      break;
    }
    case Variant::kCycle: {
      // A→B→A (PyTorch's _py_nested_call_itself), sometimes A→B→A→B; the first request may
      // carry no value that requires grad.
      const WorkerId a = p.Between(0, kWorkers - 1);
      for (int i = 0; i < 3; ++i) {
        const WorkerId b = p.Other(a);
        ContextPlan c = p.Context(a);
        Hop first = p.NestedChain(p.Coin(0.3) ? std::vector<WorkerId>{b, a, b}
                                              : std::vector<WorkerId>{b, a});
        first.grad_request = p.Coin(0.5);
        c.calls.push_back(first);
        if (p.Coin(0.3)) c.calls.push_back(p.NestedChain({b}));
        c.passes = p.Between(1, 2);
        plan.contexts.push_back(c);
      }
      break;
    }
    case Variant::kTrainers: {
      // Three trainers, two contexts each, concurrently on one parameter server; repeated
      // retain_graph passes, sometimes one more pass that must fail.
      const WorkerId ps = p.Between(0, kWorkers - 1);
      for (WorkerId t = 0; t < kWorkers; ++t) {
        if (t == ps) continue;
        for (int i = 0; i < 2; ++i) {
          ContextPlan c = p.Context(t);
          const int calls = p.Between(1, 2);
          for (int j = 0; j < calls; ++j) {
            Hop h = p.MakeHop(ps);
            if (p.Coin(0.25)) h.nested.push_back(p.MakeHop(p.Other(ps)));
            c.calls.push_back(h);
          }
          c.passes = p.Between(1, 3);
          c.extra_pass = p.Coin(0.3);
          plan.contexts.push_back(c);
        }
      }
      break;
    }
    case Variant::kError: {
      // A node fails on a random worker: the error reaches the initiator naming it; the same
      // program in a next context works.
      const WorkerId a = p.Between(0, kWorkers - 1);
      ContextPlan c = p.Context(a);
      Hop first = p.MakeHop(p.Other(a));
      p.Tree(&first, 2);
      c.calls.push_back(first);
      if (p.Coin(0.4)) c.calls.push_back(p.MakeHop(p.Other(a)));
      ContextPlan good = c;
      std::vector<Hop*> hops;
      for (Hop& h : c.calls) CollectHops(&h, &hops);
      Hop* failing = hops[p.Between(0, static_cast<int>(hops.size()) - 1)];
      failing->fails = true;
      c.failing = failing->to;
      plan.contexts.push_back(c);
      good.gap_ms = p.Between(0, 20);
      plan.contexts.push_back(good);
      break;
    }
    case Variant::kCrash: {
      // A worker crashes between forward and backward, or during backward: the backward fails
      // naming it, and release still reaches the others; a next context among the survivors
      // works.
      const WorkerId a = p.Between(0, kWorkers - 1);
      std::vector<WorkerId> others = p.Others(a);
      ContextPlan c = p.Context(a);
      c.calls.push_back(p.NestedChain(others));
      if (p.Coin(0.5)) c.calls.push_back(p.NestedChain({others[2], others[1]}));
      // Never worker 0: it leads the graceful shutdown, whose loss fails the barrier.
      std::vector<WorkerId> candidates;
      for (WorkerId w : others) {
        if (w != 0) candidates.push_back(w);
      }
      c.victim = candidates[p.Between(0, static_cast<int>(candidates.size()) - 1)];
      c.crash = p.Coin(0.5) ? CrashAt::kBeforeBackward : CrashAt::kDuringBackward;
      c.crash_us = p.Between(0, 3000);
      c.lenient = true;
      plan.contexts.push_back(c);
      std::vector<WorkerId> survivors;
      for (WorkerId w : others) {
        if (w != c.victim) survivors.push_back(w);
      }
      ContextPlan after = p.Context(a);
      after.gap_ms = p.Between(0, 50);
      after.calls.push_back(p.NestedChain(survivors));
      plan.contexts.push_back(after);
      break;
    }
    case Variant::kReleaseRace: {
      // The context exits with forward replies (or gradients) still in flight.
      const WorkerId a = p.Between(0, kWorkers - 1);
      for (int i = 0; i < 4; ++i) {
        ContextPlan c = p.Context(a);
        std::vector<WorkerId> others = p.Others(a);
        if (p.Coin(0.3)) {
          c.calls.push_back(p.Pipeline(a, others));
        } else {
          Hop first = p.NestedChain({others[0], others[1]});
          for (Hop* h = &first; h != nullptr; h = h->nested.empty() ? nullptr : &h->nested[0]) {
            h->delay_ms = p.Between(0, 10);
          }
          c.calls.push_back(first);
          if (p.Coin(0.5)) c.calls.push_back(p.MakeHop(others[2], 10));
        }
        c.exit = p.Coin(0.5) ? Exit::kDuringForward : Exit::kDuringBackward;
        c.exit_us = p.Between(0, 4000);
        plan.contexts.push_back(c);
      }
      break;
    }
    case Variant::kShutdown: {
      // Every worker is an initiator; each shuts down gracefully right after its exits (some
      // during a backward pass).
      for (WorkerId w = 0; w < kWorkers; ++w) {
        ContextPlan c = p.Context(w);
        Hop first = p.MakeHop(p.Other(w));
        p.Tree(&first, 1);
        c.calls.push_back(first);
        if (p.Coin(0.3)) {
          c.exit = Exit::kDuringBackward;
          c.exit_us = p.Between(0, 2000);
        }
        plan.contexts.push_back(c);
      }
      plan.shutdown_delay_ms = 0;
      break;
    }
    case Variant::kMixed:
      break;
  }
  for (ContextPlan& c : plan.contexts) Finalize(&c);
  return plan;
}

// "a;b;c" path of a hop: the index of the initiator's call, then of each nested call.
const Hop* FindHop(const Plan& plan, int ci, absl::string_view path) {
  if (ci < 0 || ci >= static_cast<int>(plan.contexts.size())) return nullptr;
  const std::vector<Hop>* level = &plan.contexts[ci].calls;
  const Hop* hop = nullptr;
  for (absl::string_view part : absl::StrSplit(path, '.')) {
    int i = 0;
    if (!absl::SimpleAtoi(part, &i) || i < 0 || i >= static_cast<int>(level->size())) {
      return nullptr;
    }
    hop = &(*level)[i];
    level = &hop->nested;
  }
  return hop;
}

bool MentionsWorker(absl::string_view text, WorkerId w) {
  return absl::StrContains(text, absl::StrCat("worker ", w)) ||
         absl::StrContains(text, absl::StrCat("worker", w)) ||
         absl::StrContains(text, absl::StrCat("Node ", w));
}

class AutogradScenario;

class AutogradWorker : public ScenarioWorker {
 public:
  explicit AutogradWorker(AutogradScenario* scenario) : scenario_(scenario) {}
  void Setup(WorkerEnv& env) override;
  void Run(WorkerEnv& env) override;

 private:
  // An initiator's context.
  struct Running {
    int ci = -1;
    NodeId h0 = -1;
    int pending = 0;  // forward pieces (calls' replies, sinks) not arrived
    std::vector<Term> terms;
    bool forward_failed = false;
    bool forward_done = false;
    bool exited = false;
    bool backward_running = false;
    bool finished = false;
    bool tainted = false;  // a pass failed: gradients are no longer exact
    int passes_ok = 0;
  };
  using Done = std::function<void(std::optional<Term>, bool ok)>;

  const ContextPlan& Ctx(int ci) const;
  void StartNext();
  void Begin(int ci);
  void OnForwardPiece(ContextId ctx, std::optional<Term> term, bool ok);
  void ForwardDone(ContextId ctx);
  void StartPass(ContextId ctx, int pass);
  void OnPassDone(ContextId ctx, int pass, const absl::Status& status);
  void Exit(ContextId ctx);
  void MaybeFinish(ContextId ctx);
  void Crash(WorkerId victim);
  void Finish();

  void IssueHop(ContextId ctx, int ci, const std::string& path, const Hop& hop, NodeId input,
                Done done);
  void Serve(std::shared_ptr<IncomingCall> call);
  void Work(std::shared_ptr<IncomingCall> call, ContextId ctx, AutogradMessageId msg, int ci,
            std::string path, const Hop* hop);
  void ReplyUnrecorded(const std::shared_ptr<IncomingCall>& call);
  std::string InvolvedText(ContextId ctx) const;

  AutogradScenario* const scenario_;
  WorkerEnv* env_ = nullptr;
  std::shared_ptr<DistAutograd> dag_;
  IntGraphRunner* runner_ = nullptr;
  // Handlers and callbacks run on the worker's executor (concurrently over real processes).
  absl::Mutex mu_;
  std::vector<int> queue_ ABSL_GUARDED_BY(mu_);  // this initiator's contexts still to run
  std::map<ContextId, Running> running_ ABSL_GUARDED_BY(mu_);
};

class AutogradScenario : public Scenario {
 public:
  explicit AutogradScenario(Variant variant) : variant_(variant), bugs_(PlantedDistAutogradBugs()) {}

  int num_workers() const override { return kWorkers; }
  void Configure(AgentOptions* options) const override {
    options->default_timeout = kCallTimeout;
    options->shutdown_timeout = absl::Seconds(60);
  }
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv& env) override {
    if (!plan_.has_value()) plan_ = MakePlan(variant_, env.run_seed);
    return std::make_unique<AutogradWorker>(this);
  }

  const Plan& plan() const { return *plan_; }
  const DistAutogradPlantedBugs& bugs() const { return bugs_; }
  testing::DistAutogradLedger& ledger() { return ledger_; }
  std::string Where() const { return absl::StrCat("autograd/", VariantName(plan_->variant), ": "); }

  IntGraphRunner* Register(const WorkerEnv& env, std::shared_ptr<DistAutograd> dag,
                           std::unique_ptr<IntGraphRunner> runner) {
    absl::MutexLock lock(&mu_);
    Life& life = lives_[{env.id, env.incarnation}];
    life.dag = std::move(dag);
    life.runner = std::move(runner);
    return life.runner.get();
  }
  void ShutdownDone(WorkerId w, uint64_t inc, const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    Life& life = lives_[{w, inc}];
    life.shutdown_done = true;
    life.shutdown_status = status;
  }
  void NoteCrash(WorkerId w) {
    absl::MutexLock lock(&mu_);
    crashed_.insert(w);
  }

  // The god view: after `passes` successful passes of `ctx` from `initiator`, every worker's
  // gradients must be exactly `passes` times one pass's. Violations go to the recorder.
  void CheckGradients(Recorder* recorder, ContextId ctx, WorkerId initiator, int passes,
                      bool strict) {
    std::map<WorkerId, LocalGraph> graphs;
    std::map<WorkerId, IntGraphRunner*> holders;
    {
      absl::MutexLock lock(&mu_);
      // Per worker, the latest incarnation that recorded something in the context.
      for (const auto& [key, life] : lives_) {
        std::optional<LocalGraph> g = life.runner->Graph(ctx);
        if (!g.has_value() || g->nodes.empty()) continue;
        graphs[key.first] = *std::move(g);
        holders[key.first] = life.runner.get();
      }
    }
    auto expected = testing::GodView::Expected(graphs, initiator);
    if (!expected.ok()) {
      if (strict) {
        recorder->Violation(absl::StrCat(Where(), "god view of autograd context ", ctx, ": ",
                                         expected.status().ToString()));
      }
      return;
    }
    for (const auto& [w, runner] : holders) {
      std::map<int, int64_t> want;
      auto it = expected->find(w);
      if (it != expected->end()) {
        for (const auto& [param, g] : it->second) want[param] = g * passes;
      }
      std::map<int, int64_t> got = runner->Gradients(ctx);
      if (got != want) {
        auto text = [](const std::map<int, int64_t>& m) {
          std::vector<std::string> parts;
          for (const auto& [param, g] : m) parts.push_back(absl::StrCat("p", param, "=", g));
          return absl::StrCat("{", absl::StrJoin(parts, " "), "}");
        };
        recorder->Violation(absl::StrCat(Where(), "after ", passes,
                                         " successful backward pass(es) of autograd context ",
                                         ctx, " worker ", w, " holds gradients ", text(got),
                                         ", the god view expects ", text(want)));
      }
    }
  }

  void Check(const Recorder& recorder, bool lossless,
             std::vector<std::string>* out) const override {
    const std::string where = Where();
    for (const std::string& v : ledger_.violations()) out->push_back(where + "ledger: " + v);
    // Workers whose latest incarnation shut down cleanly: they must have settled.
    std::set<WorkerId> settled;
    std::vector<std::pair<WorkerId, std::shared_ptr<DistAutograd>>> dags;
    {
      absl::MutexLock lock(&mu_);
      std::map<WorkerId, const Life*> latest;
      for (const auto& [key, life] : lives_) {
        latest[key.first] = &life;
        for (const std::string& v : life.runner->violations()) {
          out->push_back(where + "runner: " + v);
        }
      }
      for (const auto& [w, life] : latest) {
        if (life->shutdown_done && life->shutdown_status.ok()) {
          settled.insert(w);
          dags.emplace_back(w, life->dag);
        }
      }
    }
    for (const std::string& v : ledger_.CheckEnd(settled)) out->push_back(where + "ledger: " + v);
    for (const auto& [w, dag] : dags) {
      std::map<std::string, int64_t> info = dag->GetDebugInfo();
      for (const char* key : {"num_autograd_contexts", "num_current_backward_passes"}) {
        if (info[key] != 0) {
          out->push_back(absl::StrCat(where, "after graceful shutdown worker ", w, " reads ", key,
                                      "=", info[key]));
        }
      }
    }
  }

 private:
  struct Life {
    std::shared_ptr<DistAutograd> dag;
    std::unique_ptr<IntGraphRunner> runner;
    bool shutdown_done = false;
    absl::Status shutdown_status;
  };
  const Variant variant_;
  const DistAutogradPlantedBugs bugs_;
  // Made by the first NewWorker(), before any worker runs; read-only after.
  std::optional<Plan> plan_;
  // Declared before the lives: the contexts report to it until they go.
  testing::DistAutogradLedger ledger_;
  mutable absl::Mutex mu_;
  std::map<std::pair<WorkerId, uint64_t>, Life> lives_ ABSL_GUARDED_BY(mu_);
  std::set<WorkerId> crashed_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------------

const ContextPlan& AutogradWorker::Ctx(int ci) const { return scenario_->plan().contexts[ci]; }

void AutogradWorker::Setup(WorkerEnv& env) {
  env_ = &env;
  DistAutogradOptions o;
  o.incarnation = env.incarnation;
  o.cleanup_retry.attempt_timeout = absl::Milliseconds(300);
  o.cleanup_retry.initial_backoff = absl::Milliseconds(20);
  o.cleanup_retry.max_backoff = absl::Milliseconds(400);
  o.observer = &scenario_->ledger();
  o.bugs = scenario_->bugs();
  scenario_->ledger().OnStart(env.id, env.incarnation, env.clock);
  absl::StatusOr<std::shared_ptr<DistAutograd>> dag =
      DistAutograd::Create(env.agent, env.clock, env.executor, o);
  if (!dag.ok()) {
    env.recorder->Violation(scenario_->Where() + "DistAutograd::Create: " + dag.status().ToString());
    return;
  }
  dag_ = *std::move(dag);
  auto runner = std::make_unique<IntGraphRunner>(env.id);
  runner->set_core(dag_.get());
  dag_->SetRunner(runner.get());
  runner_ = scenario_->Register(env, dag_, std::move(runner));
  env.agent->RegisterHandler(wire::TEST_CALL,
                             [this](std::shared_ptr<IncomingCall> call) { Serve(std::move(call)); });
}

void AutogradWorker::Run(WorkerEnv& env) {
  if (dag_ == nullptr) {
    Finish();
    return;
  }
  bool any = false;
  {
    absl::MutexLock lock(&mu_);
    for (int ci = 0; ci < static_cast<int>(scenario_->plan().contexts.size()); ++ci) {
      if (Ctx(ci).initiator == env.id) queue_.push_back(ci);
    }
    any = !queue_.empty();
  }
  if (!any) {
    Finish();  // declares its shutdown at once and serves until every initiator is done
    return;
  }
  StartNext();
}

void AutogradWorker::Finish() {
  WorkerEnv* env = env_;
  AutogradScenario* scenario = scenario_;
  const WorkerId id = env->id;
  const uint64_t inc = env->incarnation;
  ShutdownWorker(*env, /*graceful=*/true, /*expect_ok=*/!env->lossy,
                 [scenario, id, inc](const absl::Status& s) { scenario->ShutdownDone(id, inc, s); });
}

void AutogradWorker::StartNext() {
  int ci = -1;
  {
    absl::MutexLock lock(&mu_);
    if (!queue_.empty()) {
      ci = queue_.front();
      queue_.erase(queue_.begin());
    }
  }
  if (ci < 0) {
    After(*env_, absl::Milliseconds(scenario_->plan().shutdown_delay_ms), [this] { Finish(); });
    return;
  }
  After(*env_, absl::Milliseconds(Ctx(ci).gap_ms), [this, ci] { Begin(ci); });
}

void AutogradWorker::Begin(int ci) {
  const ContextPlan& cp = Ctx(ci);
  const ContextId ctx = dag_->NewContext();
  const NodeId h0 = runner_->Op(ctx, {{runner_->Leaf(ctx, cp.param), cp.k0}});
  const int pending = static_cast<int>(cp.calls.size()) + cp.sinks;
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    r.ci = ci;
    r.h0 = h0;
    r.pending = pending;
  }
  for (size_t i = 0; i < cp.calls.size(); ++i) {
    IssueHop(ctx, ci, absl::StrCat(i), cp.calls[i], h0,
             [this, ctx](std::optional<Term> term, bool ok) { OnForwardPiece(ctx, term, ok); });
  }
  if (cp.exit == Exit::kDuringForward) {
    After(*env_, absl::Microseconds(cp.exit_us), [this, ctx] { Exit(ctx); });
  }
  After(*env_, kForwardLimit, [this, ctx] { OnForwardPiece(ctx, std::nullopt, false); });
  if (pending == 0) ForwardDone(ctx);
}

void AutogradWorker::OnForwardPiece(ContextId ctx, std::optional<Term> term, bool ok) {
  {
    absl::MutexLock lock(&mu_);
    auto it = running_.find(ctx);
    if (it == running_.end() || it->second.forward_done) return;
    Running& r = it->second;
    if (term.has_value()) r.terms.push_back(*term);
    if (!ok) {
      r.forward_failed = true;
      r.pending = 0;  // the forward limit, or a failed call: give up on the rest
    } else if (--r.pending > 0) {
      return;
    }
  }
  ForwardDone(ctx);
}

void AutogradWorker::ForwardDone(ContextId ctx) {
  bool exited = false, failed = false;
  std::vector<Term> terms;
  int ci = -1;
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    if (r.forward_done) return;
    r.forward_done = true;
    exited = r.exited;
    failed = r.forward_failed;
    terms = r.terms;
    terms.push_back({r.h0, 1});
    ci = r.ci;
  }
  const ContextPlan& cp = Ctx(ci);
  if (exited) {
    MaybeFinish(ctx);
    return;
  }
  if (failed) {
    if (!env_->lossy && !cp.lenient) {
      env_->recorder->Violation(absl::StrCat(scenario_->Where(), "the forward of autograd context ",
                                             ctx, " failed without lossy faults"));
    }
    Exit(ctx);
    return;
  }
  runner_->SetRoot(ctx, runner_->Op(ctx, std::move(terms)));
  if (cp.crash == CrashAt::kBeforeBackward) {
    Crash(cp.victim);
    After(*env_, absl::Microseconds(cp.crash_us), [this, ctx] { StartPass(ctx, 0); });
  } else {
    StartPass(ctx, 0);
  }
}

void AutogradWorker::Crash(WorkerId victim) {
  if (env_->control == nullptr || victim < 0) return;
  scenario_->NoteCrash(victim);
  env_->control->Crash(victim);
}

void AutogradWorker::StartPass(ContextId ctx, int pass) {
  int ci = -1;
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    if (r.exited) {
      ci = -2;
    } else {
      r.backward_running = true;
      ci = r.ci;
    }
  }
  if (ci == -2) {
    MaybeFinish(ctx);
    return;
  }
  const ContextPlan& cp = Ctx(ci);
  const bool retain = pass < cp.passes - 1;
  Future<Unit> done = dag_->Backward(ctx, retain, env_->clock->Now() + kBackwardTimeout);
  if (pass == 0 && cp.exit == Exit::kDuringBackward) {
    After(*env_, absl::Microseconds(cp.exit_us), [this, ctx] { Exit(ctx); });
  }
  if (pass == 0 && cp.crash == CrashAt::kDuringBackward) {
    const WorkerId victim = cp.victim;
    After(*env_, absl::Microseconds(cp.crash_us), [this, victim] { Crash(victim); });
  }
  done.Then([this, ctx, pass](const absl::StatusOr<Unit>& r) { OnPassDone(ctx, pass, r.status()); });
}

void AutogradWorker::OnPassDone(ContextId ctx, int pass, const absl::Status& status) {
  int ci = -1;
  bool exited = false, tainted = false;
  int passes_ok = 0;
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    r.backward_running = false;
    ci = r.ci;
    exited = r.exited;
    tainted = r.tainted;
    passes_ok = r.passes_ok;
  }
  const ContextPlan& cp = Ctx(ci);
  const std::string where =
      absl::StrCat(scenario_->Where(), "backward pass ", pass, " of autograd context ", ctx,
                   " on worker ", env_->id, ": ");
  const bool can_crash = env_->control != nullptr;
  // Without lossy faults (the scenario's own crash aside) what happens is exactly known.
  const bool exact = !env_->lossy && !exited && cp.exit == Exit::kAfterBackward;
  const bool freed_pass = pass >= cp.passes;
  Recorder* recorder = env_->recorder;
  if (freed_pass) {
    if (exact && (status.ok() || !absl::StrContains(status.message(), "a second time"))) {
      recorder->Violation(where + "a pass over a freed graph should fail (freed graph), got " +
                          status.ToString());
    }
  } else if (cp.failing >= 0) {
    if (exact && (status.ok() || !absl::StrContains(status.message(),
                                                    absl::StrCat("Error on Node ", cp.failing)))) {
      recorder->Violation(absl::StrCat(where, "the failing node on worker ", cp.failing,
                                       " should fail it naming that node, got ",
                                       status.ToString()));
    }
  } else if (cp.crash != CrashAt::kNone && can_crash) {
    const bool must_fail = cp.crash == CrashAt::kBeforeBackward;
    if (exact && ((must_fail && status.ok()) ||
                  (!status.ok() && !MentionsWorker(status.message(), cp.victim)))) {
      recorder->Violation(absl::StrCat(where, "the crash of worker ", cp.victim,
                                       must_fail ? " before it should fail it" : " during it",
                                       " with an error naming the worker, got ",
                                       status.ToString()));
    }
  } else if (exact && !status.ok()) {
    recorder->Violation(where + "failed without lossy faults: " + status.ToString());
  }
  if (status.ok() && !freed_pass && !tainted) {
    scenario_->CheckGradients(recorder, ctx, env_->id, passes_ok + 1, exact && cp.crash == CrashAt::kNone);
  }
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    if (status.ok() && !freed_pass) {
      ++r.passes_ok;
    } else if (!status.ok()) {
      r.tainted = true;
    }
  }
  const int total = cp.passes + (cp.extra_pass ? 1 : 0);
  if (status.ok() && pass + 1 < total && !exited) {
    StartPass(ctx, pass + 1);
  } else {
    Exit(ctx);
  }
}

void AutogradWorker::Exit(ContextId ctx) {
  bool already = false;
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    already = r.exited;
    r.exited = true;
  }
  if (already) {
    MaybeFinish(ctx);  // what kept the context busy (a pass) is over now
    return;
  }
  absl::Status s = dag_->Release(ctx);
  if (!s.ok() && !env_->lossy) {
    env_->recorder->Violation(absl::StrCat(scenario_->Where(), "worker ", env_->id,
                                           " could not exit its autograd context ", ctx, ": ",
                                           s.ToString()));
  }
  MaybeFinish(ctx);
}

void AutogradWorker::MaybeFinish(ContextId ctx) {
  {
    absl::MutexLock lock(&mu_);
    Running& r = running_[ctx];
    if (r.finished || !r.exited || !r.forward_done || r.backward_running) return;
    r.finished = true;
  }
  StartNext();
}

// ---------------------------------------------------------------------------------------------
// Forward calls.

void AutogradWorker::IssueHop(ContextId ctx, int ci, const std::string& path, const Hop& hop,
                              NodeId input, Done done) {
  AutogradMessageId msg = -1;
  if (hop.grad_request) {
    const AutogradMessageId m = dag_->NewMessageId();
    if (dag_->RecordSend(ctx, m, hop.to).ok()) {
      runner_->Send(ctx, m, hop.to, runner_->Op(ctx, {{input, hop.k_send}}));
      msg = m;
    }
  } else {
    dag_->AddKnownWorker(ctx, hop.to).IgnoreError();
  }
  CallExpectation expect;
  if (Ctx(ci).lenient) expect.if_lossless = std::nullopt;
  expect.forwards = !hop.nested.empty();
  const std::string body = absl::StrCat(ctx, " ", msg, " ", ci, " ", path);
  const WorkerId to = hop.to;
  const int64_t k_out = hop.k_out;
  const bool want_value = hop.grad_reply;
  TrackedCall(*env_, to, body, std::nullopt, expect,
              [this, ctx, to, k_out, want_value, done](const absl::StatusOr<Message>& r) {
                if (!r.ok()) {
                  done(std::nullopt, false);
                  return;
                }
                std::vector<std::string> parts =
                    absl::StrSplit(r->envelope.payload(), absl::MaxSplits(';', 1));
                AutogradMessageId reply = -1;
                if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &reply)) {
                  env_->recorder->Violation(scenario_->Where() + "malformed reply '" +
                                            r->envelope.payload() + "'");
                  done(std::nullopt, false);
                  return;
                }
                std::vector<WorkerId> involved;
                for (absl::string_view w : absl::StrSplit(parts[1], ',', absl::SkipEmpty())) {
                  int id = 0;
                  if (absl::SimpleAtoi(w, &id)) involved.push_back(id);
                }
                if (!involved.empty()) dag_->LearnInvolved(ctx, involved).IgnoreError();
                if (reply < 0) {
                  // Nothing recorded: the callee's context was gone (a late call).
                  done(std::nullopt, !want_value);
                  return;
                }
                if (!dag_->RecordRecv(ctx, reply, to).ok()) {
                  done(std::nullopt, false);  // this worker's context is gone meanwhile
                  return;
                }
                done(Term{runner_->Recv(ctx, reply, to), k_out}, true);
              });
}

std::string AutogradWorker::InvolvedText(ContextId ctx) const {
  absl::StatusOr<std::vector<WorkerId>> involved = dag_->Involved(ctx);
  return involved.ok() ? absl::StrJoin(*involved, ",") : "";
}

void AutogradWorker::ReplyUnrecorded(const std::shared_ptr<IncomingCall>& call) {
  call->Reply("-1;", {});
}

void AutogradWorker::Serve(std::shared_ptr<IncomingCall> call) {
  std::optional<std::string> body = AcceptTracked(*env_, *call);
  if (!body.has_value()) {
    call->ReplyError(absl::InvalidArgumentError("malformed tracked request"));
    return;
  }
  std::vector<std::string> parts = absl::StrSplit(*body, ' ');
  ContextId ctx = -1;
  AutogradMessageId msg = -1;
  int ci = -1;
  const Hop* hop = nullptr;
  if (parts.size() == 4 && absl::SimpleAtoi(parts[0], &ctx) && absl::SimpleAtoi(parts[1], &msg) &&
      absl::SimpleAtoi(parts[2], &ci)) {
    hop = FindHop(scenario_->plan(), ci, parts[3]);
  }
  if (hop == nullptr || dag_ == nullptr) {
    env_->recorder->Violation(scenario_->Where() + "malformed TEST_CALL body '" + *body + "'");
    call->ReplyError(absl::InvalidArgumentError("malformed body"));
    return;
  }
  // The callee joins the context (a late message for a released one runs unrecorded).
  if (!dag_->Join(ctx, call->caller()).ok()) {
    ReplyUnrecorded(call);
    return;
  }
  std::string path = parts[3];
  if (hop->delay_ms == 0) {
    Work(std::move(call), ctx, msg, ci, std::move(path), hop);
    return;
  }
  After(*env_, absl::Milliseconds(hop->delay_ms), [this, call, ctx, msg, ci, path, hop] {
    Work(call, ctx, msg, ci, path, hop);
  });
}

void AutogradWorker::Work(std::shared_ptr<IncomingCall> call, ContextId ctx,
                          AutogradMessageId msg, int ci, std::string path, const Hop* hop) {
  if (!dag_->Exists(ctx)) {
    ReplyUnrecorded(call);  // released meanwhile
    return;
  }
  const WorkerId caller = call->caller();
  NodeId in = -1;
  if (msg >= 0 && dag_->RecordRecv(ctx, msg, caller).ok()) in = runner_->Recv(ctx, msg, caller);
  if (hop->sink) {
    // The pipeline's value reaches the initiator (this worker): it feeds the loss.
    if (in >= 0) OnForwardPiece(ctx, Term{in, hop->k_out}, true);
    call->Reply(absl::StrCat("-1;", InvolvedText(ctx)), {});
    return;
  }
  std::vector<Term> terms = {{runner_->Leaf(ctx, hop->param), hop->k_param}};
  if (in >= 0) terms.push_back({in, hop->k_in});
  const NodeId h = runner_->Op(ctx, std::move(terms), hop->fails);
  struct Gather {
    absl::Mutex mu;
    int pending = 0;
    std::vector<Term> terms;
  };
  auto gather = std::make_shared<Gather>();
  auto reply = [this, call, ctx, caller, h, hop, gather] {
    AutogradMessageId reply_msg = -1;
    if (hop->grad_reply && dag_->Exists(ctx)) {
      std::vector<Term> out = {{h, 1}};
      {
        absl::MutexLock lock(&gather->mu);
        out.insert(out.end(), gather->terms.begin(), gather->terms.end());
      }
      const AutogradMessageId m = dag_->NewMessageId();
      if (dag_->RecordSend(ctx, m, caller).ok()) {
        runner_->Send(ctx, m, caller, runner_->Op(ctx, std::move(out)));
        reply_msg = m;
      }
    }
    call->Reply(absl::StrCat(reply_msg, ";", InvolvedText(ctx)), {});
  };
  int awaited = 0;
  for (const Hop& n : hop->nested) awaited += n.await ? 1 : 0;
  gather->pending = awaited;
  for (size_t j = 0; j < hop->nested.size(); ++j) {
    const Hop& n = hop->nested[j];
    const bool await = n.await;
    IssueHop(ctx, ci, absl::StrCat(path, ".", j), n, h,
             [gather, await, reply](std::optional<Term> term, bool) {
               if (!await) return;
               bool last = false;
               {
                 absl::MutexLock lock(&gather->mu);
                 if (term.has_value()) gather->terms.push_back(*term);
                 last = --gather->pending == 0;
               }
               if (last) reply();
             });
  }
  if (awaited == 0) reply();
}

template <Variant V>
class Registered : public AutogradScenario {
 public:
  Registered() : AutogradScenario(V) {}
};

#define TETHER_AUTOGRAD_SCENARIO(cls, variant, name, description) \
  class cls : public Registered<variant> {                        \
   public:                                                        \
    static constexpr const char* kName = name;                    \
    static constexpr const char* kDescription = description;      \
  };                                                              \
  TETHER_REGISTER_SCENARIO(cls)

TETHER_AUTOGRAD_SCENARIO(AutogradMixed, Variant::kMixed, "autograd",
                         "every distributed-autograd variant below, one per seed");
TETHER_AUTOGRAD_SCENARIO(AutogradChain, Variant::kChain, "autograd_chain",
                         "a nested chain A->B->C(->D) and a pipeline A->B->C->D->A, backward "
                         "from A, exact gradients");
TETHER_AUTOGRAD_SCENARIO(AutogradCycle, Variant::kCycle, "autograd_cycle",
                         "A->B->A (and A->B->A->B) nested calls, backward from A");
TETHER_AUTOGRAD_SCENARIO(AutogradTrainers, Variant::kTrainers, "autograd_trainers",
                         "three trainers' concurrent contexts on one parameter server, repeated "
                         "retain_graph passes");
TETHER_AUTOGRAD_SCENARIO(AutogradError, Variant::kError, "autograd_error",
                         "a node fails on a random worker: the error names it; the next context "
                         "works");
TETHER_AUTOGRAD_SCENARIO(AutogradCrash, Variant::kCrash, "autograd_crash",
                         "a worker crashes between forward and backward or during backward: "
                         "errors name it, release reaches the others");
TETHER_AUTOGRAD_SCENARIO(AutogradReleaseRace, Variant::kReleaseRace, "autograd_release_race",
                         "contexts exit with forward replies or gradients still in flight");
TETHER_AUTOGRAD_SCENARIO(AutogradShutdown, Variant::kShutdown, "autograd_shutdown",
                         "every worker an initiator, graceful shutdown right after the exits");

}  // namespace
}  // namespace tether::scenarios
