#include "testing/scenarios/rref_scenarios.h"

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "sim/random.h"
#include "testing/scenarios/rref_ledger.h"
#include "testing/scenarios/scenario.h"

namespace tether::scenarios {

RRefPlantedBugs& PlantedRRefBugs() {
  static RRefPlantedBugs bugs;
  return bugs;
}

namespace {

using StatusCode = absl::StatusCode;

enum class Variant { kChain, kTree, kCycle, kChurn, kOvertake, kCrash, kShutdown, kMixed };
constexpr int kNumConcreteVariants = 7;

// Where a reference goes next: worker `worker` receives it (after the sender
// waited `delay_ms`), holds it for `hold_ms`, maybe fetches it, and passes it
// on to `children`.
struct Node {
  WorkerId worker = 0;
  int hold_ms = 0;
  int delay_ms = 0;
  bool fetch = false;
  std::vector<Node> children;
};

std::string EncodeNode(const Node& n) {
  std::vector<std::string> kids;
  for (const Node& c : n.children) kids.push_back(EncodeNode(c));
  return absl::StrCat(n.worker, ",", n.hold_ms, ",", n.delay_ms, ",", n.fetch ? 1 : 0, "(",
                      absl::StrJoin(kids, ";"), ")");
}

// Parses one node at the start of `s`, advancing it.
bool ParseNode(absl::string_view* s, Node* out) {
  size_t open = s->find('(');
  if (open == absl::string_view::npos) return false;
  std::vector<absl::string_view> f = absl::StrSplit(s->substr(0, open), ',');
  int fetch = 0;
  if (f.size() != 4 || !absl::SimpleAtoi(f[0], &out->worker) ||
      !absl::SimpleAtoi(f[1], &out->hold_ms) || !absl::SimpleAtoi(f[2], &out->delay_ms) ||
      !absl::SimpleAtoi(f[3], &fetch)) {
    return false;
  }
  out->fetch = fetch != 0;
  s->remove_prefix(open + 1);
  while (!s->empty() && s->front() != ')') {
    Node child;
    if (!ParseNode(s, &child)) return false;
    out->children.push_back(std::move(child));
    if (!s->empty() && s->front() == ';') s->remove_prefix(1);
  }
  if (s->empty()) return false;
  s->remove_prefix(1);  // ')'
  return true;
}

struct RefPlan {
  WorkerId creator = 0;
  WorkerId owner = 0;
  std::string function;  // "v:X", "e:X", "s:MS:X"
  std::optional<absl::Duration> remote_timeout;
  int start_ms = 0;
  Node root;  // root.worker == creator; its hold is the creator's own handle
};

struct CrashPlan {
  WorkerId victim = 0;
  WorkerId by = 0;
  int at_ms = 0;
  bool restart = false;
};

struct Plan {
  Variant variant = Variant::kChain;
  int active = 4;
  std::vector<RefPlan> refs;
  std::optional<CrashPlan> crash;
  int end_ms = 3000;
};

const char* VariantName(Variant v) {
  switch (v) {
    case Variant::kChain:
      return "chain";
    case Variant::kTree:
      return "tree";
    case Variant::kCycle:
      return "cycle";
    case Variant::kChurn:
      return "churn";
    case Variant::kOvertake:
      return "overtake";
    case Variant::kCrash:
      return "crash";
    case Variant::kShutdown:
      return "shutdown";
    case Variant::kMixed:
      return "mixed";
  }
  return "?";
}

class Planner {
 public:
  Planner(sim::Prng* rng, int active) : rng_(rng), active_(active) {}

  WorkerId AnyWorker() { return static_cast<WorkerId>(rng_->Uniform(active_)); }
  int Between(int lo, int hi) { return lo + static_cast<int>(rng_->Uniform(hi - lo + 1)); }
  bool Coin(double p) { return rng_->Bernoulli(p); }

  Node Leaf(WorkerId w, int max_hold) {
    Node n;
    n.worker = w;
    n.hold_ms = Between(0, max_hold);
    n.delay_ms = Between(0, 100);
    n.fetch = Coin(0.3);
    return n;
  }

  // A chain of `len` hops through `workers` (random if empty).
  void Chain(Node* root, int len, const std::vector<WorkerId>& forced, int max_hold) {
    Node* at = root;
    for (int i = 0; i < len; ++i) {
      WorkerId w = i < static_cast<int>(forced.size()) ? forced[i] : AnyWorker();
      at->children.push_back(Leaf(w, max_hold));
      at = &at->children.back();
    }
  }

  void Tree(Node* at, int depth, int max_branch, int max_hold) {
    if (depth == 0) return;
    int branches = Between(depth == 3 ? 1 : 0, max_branch);
    for (int i = 0; i < branches; ++i) {
      at->children.push_back(Leaf(AnyWorker(), max_hold));
      Tree(&at->children.back(), depth - 1, max_branch, max_hold);
    }
  }

  RefPlan Ref(int max_hold) {
    RefPlan r;
    r.creator = AnyWorker();
    r.owner = Coin(0.2) ? r.creator : AnyWorker();
    int kind = Between(0, 9);
    std::string tag = absl::StrCat("x", Between(0, 999));
    if (kind == 0) {
      r.function = absl::StrCat("e:", tag);
    } else if (kind <= 2) {
      r.function = absl::StrCat("s:", Between(1, 300), ":", tag);
    } else {
      r.function = absl::StrCat("v:", tag);
    }
    r.start_ms = Between(0, 300);
    r.root = Leaf(r.creator, max_hold);
    r.root.delay_ms = 0;
    return r;
  }

 private:
  sim::Prng* rng_;
  int active_;
};

Plan MakePlan(Variant variant, int num_workers, uint64_t seed) {
  sim::Prng rng = sim::Prng(seed).Fork(777);
  Plan plan;
  if (variant == Variant::kMixed) {
    variant = static_cast<Variant>(rng.Uniform(kNumConcreteVariants));
    plan.active = 4 + static_cast<int>(rng.Uniform(num_workers - 3));
  } else {
    plan.active = num_workers;
  }
  plan.variant = variant;
  Planner p(&rng, plan.active);
  switch (variant) {
    case Variant::kChain:
      for (int i = 0; i < 2; ++i) {
        RefPlan r = p.Ref(800);
        p.Chain(&r.root, p.Between(3, 6), {}, 800);
        plan.refs.push_back(std::move(r));
      }
      break;
    case Variant::kTree:
      for (int i = 0; i < 2; ++i) {
        RefPlan r = p.Ref(800);
        p.Tree(&r.root, 3, 3, 800);
        plan.refs.push_back(std::move(r));
      }
      break;
    case Variant::kCycle:
      for (int i = 0; i < 2; ++i) {
        RefPlan r = p.Ref(800);
        // creator -> owner -> owner (to self) -> creator -> creator (to self)
        // -> any -> owner
        p.Chain(&r.root, 6, {r.owner, r.owner, r.creator, r.creator, p.AnyWorker(), r.owner}, 800);
        plan.refs.push_back(std::move(r));
      }
      break;
    case Variant::kChurn:
      for (int i = 0; i < 5; ++i) {
        RefPlan r = p.Ref(300);
        if (p.Coin(0.5)) r.root.hold_ms = 0;  // dropped while its creation is in flight
        p.Tree(&r.root, 2, 2, 300);
        plan.refs.push_back(std::move(r));
      }
      break;
    case Variant::kOvertake:
      for (int i = 0; i < 3; ++i) {
        RefPlan r = p.Ref(200);
        r.owner = (r.creator + 1 + static_cast<int>(rng.Uniform(plan.active - 1))) % plan.active;
        // Give up on the creation at once: the delete may overtake the remote
        // call.
        r.remote_timeout = absl::Microseconds(p.Between(1, 400));
        r.root.hold_ms = 0;
        if (p.Coin(0.5)) p.Chain(&r.root, 1, {}, 200);
        plan.refs.push_back(std::move(r));
      }
      break;
    case Variant::kCrash: {
      for (int i = 0; i < 3; ++i) {
        RefPlan r = p.Ref(800);
        p.Tree(&r.root, 3, 2, 800);
        plan.refs.push_back(std::move(r));
      }
      CrashPlan c;
      c.victim = p.AnyWorker();
      c.by = (c.victim + 1) % plan.active;
      c.at_ms = p.Between(0, 800);
      c.restart = p.Coin(0.5);
      plan.crash = c;
      break;
    }
    case Variant::kShutdown:
      for (int i = 0; i < 3; ++i) {
        RefPlan r = p.Ref(800);
        p.Tree(&r.root, 3, 2, 800);
        // Most holders keep their reference past the start of shutdown.
        r.root.hold_ms = 60000;
        for (Node& c : r.root.children) c.hold_ms = p.Coin(0.7) ? 60000 : c.hold_ms;
        plan.refs.push_back(std::move(r));
      }
      plan.end_ms = 600;
      break;
    case Variant::kMixed:
      break;
  }
  return plan;
}

// The keep flag (always "1" here), then each descriptor as LENGTH:BYTES.
std::string EncodeDescriptors(const std::vector<RRefDescriptor>& descriptors) {
  std::string out = "1";
  for (const RRefDescriptor& d : descriptors) {
    std::string bytes = d.Serialize();
    absl::StrAppend(&out, bytes.size(), ":", bytes);
  }
  return out;
}

CallExpectation Lenient(std::optional<std::string> value = std::nullopt) {
  CallExpectation e;
  e.if_lossless = std::nullopt;
  e.remote_codes = {StatusCode::kFailedPrecondition, StatusCode::kNotFound,
                    StatusCode::kAlreadyExists, StatusCode::kInternal};
  e.value = std::move(value);
  return e;
}

std::string ExpectedValue(const std::string& function) {
  std::vector<std::string> parts = absl::StrSplit(function, ':');
  return parts.back();
}

class RRefScenario;

class RRefWorker : public ScenarioWorker {
 public:
  explicit RRefWorker(RRefScenario* scenario) : scenario_(scenario) {}
  ~RRefWorker() override {
    std::map<uint64_t, RRefHandle> held;
    {
      absl::MutexLock lock(&mu_);
      held.swap(held_);
    }
    held.clear();
    if (ctx_) ctx_->Close(/*ignore_leaks=*/true).IgnoreError();
  }

  void Setup(WorkerEnv& env) override;
  void Run(WorkerEnv& env) override;
  void RunRestarted(WorkerEnv& env) override;

 private:
  void Create(const RefPlan& ref);
  void Hold(const RRefHandle& handle, const Node& node, const std::string& function);
  void PassTo(const RRefHandle& handle, const Node& node, const std::string& function);
  void Fetch(const RRefHandle& handle, const std::string& function);
  void Serve(std::shared_ptr<IncomingCall> call);
  void Finish();

  // Set by Setup(), before the agent starts; read-only afterwards.
  RRefScenario* scenario_;
  WorkerEnv* env_ = nullptr;
  std::shared_ptr<RRefContext> ctx_;
  // Hold() and the functions that drop what it holds run on the worker's
  // executor, concurrently on a real worker's pool. Handles are created and
  // dropped outside the lock (dropping one calls into the RRef context).
  absl::Mutex mu_;
  uint64_t next_hold_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, RRefHandle> held_ ABSL_GUARDED_BY(mu_);
};

class RRefScenario : public Scenario {
 public:
  RRefScenario(Variant variant, int num_workers)
      : variant_(variant), num_workers_(num_workers), bugs_(PlantedRRefBugs()) {}

  int num_workers() const override { return num_workers_; }
  void Configure(AgentOptions* options) const override {
    options->default_timeout = absl::Seconds(2);
    options->shutdown_timeout = absl::Seconds(30);
  }
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv& env) override {
    if (!plan_.has_value()) plan_ = MakePlan(variant_, num_workers_, env.run_seed);
    return std::make_unique<RRefWorker>(this);
  }

  void Check(const Recorder& recorder, bool lossless,
             std::vector<std::string>* out) const override {
    std::string where = absl::StrCat("rref/", VariantName(plan_->variant), ": ");
    for (const std::string& v : ledger_.violations()) out->push_back(where + "ledger: " + v);
    // A copy: over real processes, shutdowns may still complete on the pool
    // (and the contexts are asked outside the lock).
    std::map<std::pair<WorkerId, uint64_t>, Life> lives;
    {
      absl::MutexLock lock(&mu_);
      lives = lives_;
    }
    for (const auto& [key, life] : lives) {
      if (!life.shutdown_done || !life.shutdown_status.ok()) continue;
      std::shared_ptr<RRefContext> ctx = life.ctx.lock();
      if (!ctx) continue;
      for (const auto& [name, value] : ctx->GetDebugInfo()) {
        if (name == "num_deleted_fork_records" || name == "num_freed_rref_records") continue;
        if (value != 0) {
          out->push_back(absl::StrCat(where, "after graceful shutdown worker ", key.first,
                                      " (incarnation ", key.second, ") reads ", name, "=", value));
        }
      }
      for (const LeakedRRef& leak : ctx->Leaks()) {
        out->push_back(absl::StrCat(where, "after graceful shutdown worker ", key.first, " leaked ",
                                    leak.ToString()));
      }
    }
  }

  const Plan& plan() const { return *plan_; }
  testing::RRefLedger& ledger() { return ledger_; }
  const RRefPlantedBugs& bugs() const { return bugs_; }

  void Register(WorkerId w, uint64_t inc, std::shared_ptr<RRefContext> ctx) {
    absl::MutexLock lock(&mu_);
    lives_[{w, inc}].ctx = ctx;
  }
  void ShutdownDone(WorkerId w, uint64_t inc, const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    Life& life = lives_[{w, inc}];
    life.shutdown_done = true;
    life.shutdown_status = status;
  }

 private:
  struct Life {
    std::weak_ptr<RRefContext> ctx;
    bool shutdown_done = false;
    absl::Status shutdown_status;
  };
  const Variant variant_;
  const int num_workers_;
  const RRefPlantedBugs bugs_;
  // Made by the first NewWorker(), before any worker runs; read-only after.
  std::optional<Plan> plan_;
  testing::RRefLedger ledger_;  // thread-safe
  // Workers' callbacks (on their executors) and Check() share it.
  mutable absl::Mutex mu_;
  std::map<std::pair<WorkerId, uint64_t>, Life> lives_ ABSL_GUARDED_BY(mu_);
};

void RRefWorker::Setup(WorkerEnv& env) {
  env_ = &env;
  RRefContextOptions o;
  o.incarnation = env.incarnation;
  o.control_timeout = absl::Milliseconds(300);
  o.retry_max_backoff = absl::Milliseconds(400);
  o.child_query_delay = absl::Seconds(1);
  o.observer = &scenario_->ledger();
  o.bugs = scenario_->bugs();
  ctx_ = RRefContext::Create(env.agent, env.clock, env.executor, o);
  scenario_->Register(env.id, env.incarnation, ctx_);
  // As the product wires it (python/runtime.cc): the barrier's join deletes the user references.
  std::weak_ptr<RRefContext> weak_ctx = ctx_;
  env.agent->AddShutdownJoinedListener([weak_ctx] {
    if (std::shared_ptr<RRefContext> ctx = weak_ctx.lock()) {
      ctx->DeleteAllUsersAndUnforkedOwners(absl::Seconds(5));
    }
  });
  Clock* clock = env.clock;
  Executor* executor = env.executor;
  ctx_->SetRemoteRunner(wire::TEST_REMOTE_CALL, [clock, executor](RemoteRequest req) {
    Future<RRefValue> out(executor);
    absl::string_view p = req.payload;
    RRefValue v;
    if (absl::ConsumePrefix(&p, "v:")) {
      v.payload = std::string(p);
      out.Set(v);
    } else if (absl::ConsumePrefix(&p, "e:")) {
      out.Set(absl::InternalError(std::string(p)));
    } else if (absl::ConsumePrefix(&p, "s:")) {
      std::vector<std::string> parts = absl::StrSplit(p, absl::MaxSplits(':', 1));
      int ms = 0;
      if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &ms)) {
        out.Set(absl::InvalidArgumentError("bad slow function"));
      } else {
        v.payload = parts[1];
        clock->Schedule(clock->Now() + absl::Milliseconds(ms),
                        [executor, out, v] { executor->Post([out, v] { out.Set(v); }); });
      }
    } else {
      out.Set(absl::InvalidArgumentError(absl::StrCat("unknown test function '", p, "'")));
    }
    return out;
  });
  env.agent->RegisterHandler(wire::TEST_CALL,
                             [this](std::shared_ptr<IncomingCall> call) { Serve(call); });
}

void RRefWorker::Run(WorkerEnv& env) {
  const Plan& plan = scenario_->plan();
  for (const RefPlan& ref : plan.refs) {
    if (ref.creator != env.id) continue;
    RefPlan copy = ref;
    After(env, absl::Milliseconds(ref.start_ms), [this, copy] { Create(copy); });
  }
  if (plan.crash.has_value() && plan.crash->by == env.id && env.control != nullptr) {
    CrashPlan c = *plan.crash;
    WorldControl* control = env.control;
    After(env, absl::Milliseconds(c.at_ms), [control, c] {
      control->Crash(c.victim);
      if (c.restart) control->Restart(c.victim).IgnoreError();
    });
  }
  After(env, absl::Milliseconds(plan.end_ms), [this] { Finish(); });
}

void RRefWorker::RunRestarted(WorkerEnv& env) {
  After(env, absl::Milliseconds(200), [this] { Finish(); });
}

void RRefWorker::Finish() {
  WorkerEnv* env = env_;
  RRefScenario* scenario = scenario_;
  // The scenario's own crash can cut the shutdown barrier short.
  bool expect_ok = !env->lossy && !scenario->plan().crash.has_value();
  const WorkerId id = env->id;
  const uint64_t inc = env->incarnation;
  ShutdownWorker(
      *env, /*graceful=*/true, /*expect_ok=*/expect_ok,
      [scenario, id, inc](const absl::Status& s) { scenario->ShutdownDone(id, inc, s); });
}

void RRefWorker::Create(const RefPlan& ref) {
  auto handle =
      ctx_->Remote(ref.owner, wire::TEST_REMOTE_CALL, ref.function, {}, ref.remote_timeout);
  if (!handle.ok()) return;  // e.g. the owner is known to have failed
  Hold(*handle, ref.root, ref.function);
}

void RRefWorker::Hold(const RRefHandle& handle, const Node& node, const std::string& function) {
  uint64_t id;
  {
    absl::MutexLock lock(&mu_);
    id = next_hold_++;
    held_[id] = handle;
  }
  if (node.fetch) Fetch(handle, function);
  for (const Node& child : node.children) {
    Node c = child;
    After(*env_, absl::Milliseconds(c.delay_ms),
          [this, handle, c, function] { PassTo(handle, c, function); });
  }
  After(*env_, absl::Milliseconds(node.hold_ms), [this, id] {
    std::optional<RRefHandle> dropped;
    {
      absl::MutexLock lock(&mu_);
      auto it = held_.find(id);
      if (it == held_.end()) return;
      dropped = std::move(it->second);
      held_.erase(it);
    }
    // `dropped` goes out of scope here, outside the lock.
  });
}

void RRefWorker::PassTo(const RRefHandle& handle, const Node& node, const std::string& function) {
  auto desc = ctx_->Fork(handle, node.worker);
  if (!desc.ok()) return;  // creation failed, owner failed, or deleted by shutdown
  std::string body =
      absl::StrCat(function, "\n", EncodeNode(node), "\n", EncodeDescriptors({*desc}));
  TrackedCall(*env_, node.worker, body, std::nullopt, Lenient("ok"));
}

void RRefWorker::Fetch(const RRefHandle& handle, const std::string& function) {
  Recorder::Token token = Recorder::MakeToken(env_->id, env_->incarnation, env_->NextSeq());
  absl::Duration timeout = absl::Milliseconds(500);
  Recorder* recorder = env_->recorder;
  Clock* clock = env_->clock;
  std::optional<std::string> value;
  if (function.rfind("e:", 0) != 0) value = ExpectedValue(function);
  recorder->CallIssued(token, env_->id, env_->incarnation, handle.owner(), clock->Now(), timeout,
                       Lenient(value));
  ctx_->ToHere(handle, timeout).Then([recorder, clock, token](const absl::StatusOr<RRefValue>& r) {
    recorder->CallCompleted(token, clock->Now(), r.status(), r.ok() ? r->payload : "");
  });
}

void RRefWorker::Serve(std::shared_ptr<IncomingCall> call) {
  std::optional<std::string> body = AcceptTracked(*env_, *call);
  if (!body.has_value()) {
    call->ReplyError(absl::InvalidArgumentError("malformed tracked request"));
    return;
  }
  std::vector<std::string> parts = absl::StrSplit(*body, absl::MaxSplits('\n', 2));
  Node node;
  absl::string_view spec = parts.size() == 3 ? absl::string_view(parts[1]) : "";
  if (parts.size() != 3 || !ParseNode(&spec, &node)) {
    env_->recorder->Violation("rref scenario: malformed TEST_CALL body");
    call->ReplyError(absl::InvalidArgumentError("malformed body"));
    return;
  }
  std::string function = parts[0];
  // Decode the descriptors (the keep flag, then length-prefixed descriptors).
  absl::string_view data = parts[2];
  std::vector<RRefHandle> handles;
  absl::Status status;
  if (data.empty()) status = absl::InvalidArgumentError("no keep flag");
  if (status.ok()) data.remove_prefix(1);
  while (status.ok() && !data.empty()) {
    size_t colon = data.find(':');
    uint64_t len = 0;
    if (colon == absl::string_view::npos || !absl::SimpleAtoi(data.substr(0, colon), &len) ||
        len > data.size() - colon - 1) {
      status = absl::InvalidArgumentError("bad descriptor framing");
      break;
    }
    auto desc = RRefDescriptor::Parse(data.substr(colon + 1, len));
    data.remove_prefix(colon + 1 + len);
    if (!desc.ok()) {
      status = desc.status();
      break;
    }
    auto h = ctx_->Receive(*desc, call->caller());
    if (!h.ok()) {
      status = h.status();
      break;
    }
    handles.push_back(*h);
  }
  if (!status.ok()) {
    call->ReplyError(status);
    return;
  }
  std::shared_ptr<RRefContext> ctx = ctx_;
  ctx_->WaitForConfirmations(handles).Then(
      [this, call, handles, node, function](const absl::StatusOr<Unit>& r) {
        if (!r.ok()) {
          call->ReplyError(r.status());
          return;
        }
        // The "function" runs: it keeps its argument, fetches it, passes it on.
        for (const RRefHandle& h : handles) Hold(h, node, function);
        call->Reply("ok", {});
      });
}

template <Variant V, int N>
class Registered : public RRefScenario {
 public:
  Registered() : RRefScenario(V, N) {}
};

#define TETHER_RREF_SCENARIO(cls, variant, workers, name, description) \
  class cls : public Registered<variant, workers> {                    \
   public:                                                             \
    static constexpr const char* kName = name;                         \
    static constexpr const char* kDescription = description;           \
  };                                                                   \
  TETHER_REGISTER_SCENARIO(cls)

TETHER_RREF_SCENARIO(RRefMixed, Variant::kMixed, 8, "rref",
                     "every RRef variant below, one per seed, on 4 to 8 active workers");
TETHER_RREF_SCENARIO(RRefChain, Variant::kChain, 4, "rref_chain",
                     "references forked along chains of users across 4 workers");
TETHER_RREF_SCENARIO(RRefTree, Variant::kTree, 8, "rref_tree",
                     "references forked along trees across 8 workers");
TETHER_RREF_SCENARIO(RRefCycle, Variant::kCycle, 5, "rref_cycle",
                     "references passed in cycles: back to the owner, to self, to the creator");
TETHER_RREF_SCENARIO(RRefChurn, Variant::kChurn, 6, "rref_churn",
                     "many references dropped in random orders, some while being created");
TETHER_RREF_SCENARIO(RRefOvertake, Variant::kOvertake, 4, "rref_overtake",
                     "creations given up at once: the delete may overtake the remote call");
TETHER_RREF_SCENARIO(RRefCrash, Variant::kCrash, 6, "rref_crash",
                     "a parent, child or owner crashes (maybe restarts) mid-fork");
TETHER_RREF_SCENARIO(RRefShutdown, Variant::kShutdown, 4, "rref_shutdown",
                     "graceful shutdown of every worker with references still alive");

}  // namespace
}  // namespace tether::scenarios
