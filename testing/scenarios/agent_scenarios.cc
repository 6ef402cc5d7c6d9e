// The agent's scenario catalogue: request storms, nested calls, timeouts of
// every kind, a peer crash mid-call, a peer restart, shutdown with calls in
// flight (graceful and not), and graceful shutdown in every order of workers.
// See scenario.h for how scenarios run and recorder.h for the invariants
// checked after each.
//
// Every worker serves TEST_CALL requests whose body (after the token, see
// TrackedPayload) is:
//   echo:X[:D]      reply "re:X" after D microseconds (default 0)
//   late:MS         reply "re:late" after MS milliseconds
//   never           never reply (the call is held until this worker has shut
//   down) fail:CODE       reply with error CODE (an absl::StatusCode number)
//   relay:H:BODY    forward BODY to worker H within the remaining deadline and
//   reply with
//                   its value + "<" + this worker's id (or its error)
//   chain:H1,H2,...:X   forward "chain:H2,...:X" to worker H1 within the
//   remaining deadline
//                   and reply with its value + "<" + this worker's id; with no
//                   hops left reply "X@" + this worker's id.
#include <algorithm>
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
#include "testing/scenarios/scenario.h"

namespace tether::scenarios {
namespace {

using StatusCode = absl::StatusCode;

CallExpectation ExpectOk(std::string value) {
  CallExpectation e;
  e.value = std::move(value);
  return e;
}

CallExpectation ExpectCode(StatusCode code) {
  CallExpectation e;
  e.if_lossless = code;
  return e;
}

CallExpectation ExpectAnything(std::optional<std::string> value_if_ok = std::nullopt) {
  CallExpectation e;
  e.if_lossless = std::nullopt;
  e.value = std::move(value_if_ok);
  return e;
}

// For calls whose handler forwards to other workers.
CallExpectation Forwarding(CallExpectation e) {
  e.forwards = true;
  return e;
}

// The value a chain call returns.
std::string ChainValue(WorkerId first, const std::vector<WorkerId>& rest, const std::string& x) {
  std::vector<WorkerId> hops = {first};
  hops.insert(hops.end(), rest.begin(), rest.end());
  std::string v = absl::StrCat(x, "@", hops.back());
  for (int i = static_cast<int>(hops.size()) - 2; i >= 0; --i) absl::StrAppend(&v, "<", hops[i]);
  return v;
}

std::string ChainBody(const std::vector<WorkerId>& rest, const std::string& x) {
  return absl::StrCat("chain:", absl::StrJoin(rest, ","), ":", x);
}

// A worker that serves the request language above. Subclasses write Run().
class ServingWorker : public ScenarioWorker {
 public:
  void Setup(WorkerEnv& env) override {
    env_ = &env;
    env.agent->RegisterHandler(wire::TEST_CALL,
                               [this](std::shared_ptr<IncomingCall> call) { Serve(call); });
  }

  void RunRestarted(WorkerEnv& env) override { Shutdown(env, true, false); }

  ~ServingWorker() override { ReleaseHeld(); }

 protected:
  // Shuts down; releases held calls once done.
  void Shutdown(WorkerEnv& env, bool graceful, bool expect_ok, std::function<void()> then = {}) {
    ShutdownWorker(env, graceful, expect_ok, [this, then](const absl::Status&) {
      ReleaseHeld();
      if (then) then();
    });
  }

  // Runs `done` once `count` tracked calls have completed (see Track()).
  // Completions may come (on other threads) before AwaitCalls() is called.
  void AwaitCalls(int count, std::function<void()> done) {
    std::function<void()> f;
    {
      absl::MutexLock lock(&mu_);
      outstanding_ += count;
      on_all_done_ = std::move(done);
      f = TakeIfAllDone();
    }
    if (f) f();
  }
  std::function<void(const absl::StatusOr<Message>&)> Track() {
    return [this](const absl::StatusOr<Message>&) {
      std::function<void()> f;
      {
        absl::MutexLock lock(&mu_);
        --outstanding_;
        f = TakeIfAllDone();
      }
      if (f) f();
    };
  }

  WorkerEnv* env_ = nullptr;

 private:
  // The function to run now that all awaited calls completed, if they did.
  std::function<void()> TakeIfAllDone() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::function<void()> f;
    if (outstanding_ == 0 && on_all_done_) {
      f = std::move(on_all_done_);
      on_all_done_ = nullptr;
    }
    return f;
  }

  // Drops the held calls (outside the lock: releasing a call may reply).
  void ReleaseHeld() {
    std::vector<std::shared_ptr<IncomingCall>> held;
    {
      absl::MutexLock lock(&mu_);
      held.swap(held_);
    }
    held.clear();
  }

  void Serve(std::shared_ptr<IncomingCall> call) {
    WorkerEnv& env = *env_;
    std::optional<std::string> body = AcceptTracked(env, *call);
    if (!body) {
      call->ReplyError(absl::InvalidArgumentError("untracked request"));
      return;
    }
    std::vector<std::string> parts = absl::StrSplit(*body, absl::MaxSplits(':', 2));
    const std::string& op = parts[0];
    if (op == "echo" && parts.size() >= 2) {
      int64_t us = 0;
      if (parts.size() == 3) absl::SimpleAtoi(parts[2], &us);
      std::string value = "re:" + parts[1];
      if (us == 0) {
        call->Reply(std::move(value), {});
      } else {
        After(env, absl::Microseconds(us), [call, value] { call->Reply(value, {}); });
      }
    } else if (op == "late" && parts.size() == 2) {
      int64_t ms = 0;
      absl::SimpleAtoi(parts[1], &ms);
      After(env, absl::Milliseconds(ms), [call] { call->Reply("re:late", {}); });
    } else if (op == "never") {
      absl::MutexLock lock(&mu_);
      held_.push_back(std::move(call));
    } else if (op == "fail" && parts.size() == 2) {
      int code = 0;
      absl::SimpleAtoi(parts[1], &code);
      call->ReplyError(absl::Status(static_cast<StatusCode>(code), "planned failure"));
    } else if (op == "chain" && parts.size() == 3) {
      ServeChain(env, std::move(call), parts[1], parts[2]);
    } else if (op == "relay" && parts.size() == 3) {
      int32_t to = 0;
      absl::SimpleAtoi(parts[1], &to);
      Forward(env, std::move(call), to, parts[2], std::nullopt);
    } else {
      env.recorder->Violation(absl::StrCat("worker ", env.id, ": bad request body '", *body, "'"));
      call->ReplyError(absl::InvalidArgumentError("bad request body"));
    }
  }

  void ServeChain(WorkerEnv& env, std::shared_ptr<IncomingCall> call, const std::string& hops,
                  const std::string& x) {
    std::vector<WorkerId> rest;
    for (absl::string_view h : absl::StrSplit(hops, ',', absl::SkipEmpty())) {
      int32_t id = 0;
      absl::SimpleAtoi(h, &id);
      rest.push_back(id);
    }
    if (rest.empty()) {
      call->Reply(absl::StrCat(x, "@", env.id), {});
      return;
    }
    const WorkerId next = rest.front();
    rest.erase(rest.begin());
    Forward(env, std::move(call), next, ChainBody(rest, x), ChainValue(next, rest, x));
  }

  // Sends `body` on to `to` within the call's remaining deadline and answers
  // the call with the result (value + "<" + this worker's id).
  void Forward(WorkerEnv& env, std::shared_ptr<IncomingCall> call, WorkerId to,
               const std::string& body, std::optional<std::string> value) {
    std::optional<absl::Duration> timeout = absl::ZeroDuration();  // none
    if (call->deadline() != absl::InfiniteFuture()) {
      timeout = call->deadline() - env.clock->Now();
      if (*timeout <= absl::ZeroDuration()) {
        call->ReplyError(absl::DeadlineExceededError("no time left to forward"));
        return;
      }
    }
    const WorkerId self = env.id;
    // The outer call's expectation covers this one (it fails when this one
    // does).
    TrackedCall(env, to, body, timeout, Forwarding(ExpectAnything(std::move(value))),
                [call, self](const absl::StatusOr<Message>& r) {
                  if (r.ok()) {
                    call->Reply(absl::StrCat(r->envelope.payload(), "<", self), {});
                  } else {
                    call->ReplyError(r.status());
                  }
                });
  }

  // Handlers, call callbacks and After() functions may run concurrently on a
  // real worker's thread pool.
  absl::Mutex mu_;
  std::vector<std::shared_ptr<IncomingCall>> held_ ABSL_GUARDED_BY(mu_);
  int outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<void()> on_all_done_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------------
class RequestStorm : public Scenario {
 public:
  static constexpr char kName[] = "request_storm";
  static constexpr char kDescription[] =
      "4 workers each send 40 calls at random times to random workers "
      "(themselves included), "
      "served after random delays; all succeed when nothing is lost; graceful "
      "shutdown";
  int num_workers() const override { return 4; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(30);
    o->shutdown_poll_interval = absl::Milliseconds(20);
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      constexpr int kCalls = 40;
      for (int i = 0; i < kCalls; ++i) {
        const absl::Duration at = absl::Microseconds(env.rng->Uniform(200'000));
        const WorkerId to = static_cast<WorkerId>(env.rng->Uniform(env.num_workers));
        const int64_t serve_us = static_cast<int64_t>(env.rng->Uniform(5000));
        const bool default_timeout = env.rng->Bernoulli(0.5);
        const std::string x = absl::StrCat(env.id, "-", i);
        After(env, at, [this, &env, to, serve_us, default_timeout, x] {
          TrackedCall(
              env, to, absl::StrCat("echo:", x, ":", serve_us),
              default_timeout ? std::nullopt : std::optional<absl::Duration>(absl::Seconds(3)),
              ExpectOk("re:" + x), Track());
        });
      }
      AwaitCalls(kCalls, [this, &env] { Shutdown(env, true, true); });
    }
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(RequestStorm);

// ---------------------------------------------------------------------------------------------
class NestedCalls : public Scenario {
 public:
  static constexpr char kName[] = "nested_calls";
  static constexpr char kDescription[] =
      "worker 0 calls 1 which calls 2 (A->B->C), and every worker sends random "
      "chains of 1-4 "
      "hops; inner calls use the remaining deadline; values compose along the "
      "chain";
  int num_workers() const override { return 4; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(30);
    o->shutdown_poll_interval = absl::Milliseconds(20);
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      int calls = 0;
      if (env.id == 0 && env.num_workers >= 3) {
        TrackedCall(env, 1, ChainBody({2}, "abc"), absl::Seconds(2),
                    Forwarding(ExpectOk(ChainValue(1, {2}, "abc"))), Track());
        ++calls;
      }
      for (int i = 0; i < 6; ++i) {
        const WorkerId first = static_cast<WorkerId>(env.rng->Uniform(env.num_workers));
        std::vector<WorkerId> rest(env.rng->Uniform(4));
        for (WorkerId& h : rest) h = static_cast<WorkerId>(env.rng->Uniform(env.num_workers));
        const std::string x = absl::StrCat("n", env.id, "-", i);
        const absl::Duration at = absl::Microseconds(env.rng->Uniform(50'000));
        After(env, at, [this, &env, first, rest, x] {
          TrackedCall(env, first, ChainBody(rest, x), absl::Seconds(3),
                      Forwarding(ExpectOk(ChainValue(first, rest, x))), Track());
        });
        ++calls;
      }
      AwaitCalls(calls, [this, &env] { Shutdown(env, true, true); });
    }
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(NestedCalls);

// ---------------------------------------------------------------------------------------------
class Timeouts : public Scenario {
 public:
  static constexpr char kName[] = "timeouts";
  static constexpr char kDescription[] =
      "timeouts of every kind: the agent default (300ms), a per-call override, "
      "none (ends only "
      "at shutdown, cancelled), a handler that never replies, a reply after "
      "the deadline, a "
      "reply just in time, a changed default, and a remote error";
  int num_workers() const override { return 3; }
  void Configure(AgentOptions* o) const override {
    // Real-time runs on slow processes scale every duration below alike (see
    // WorkerEnv::time_scale): the margins ("just in time") grow with them.
    o->default_timeout = ScaledTime(absl::Milliseconds(300));
    o->shutdown_timeout = ScaledTime(absl::Seconds(2));
    o->shutdown_poll_interval = absl::Milliseconds(20);
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      if (env.id == 0) {
        // Completes only when this worker shuts down: no timeout, never
        // answered.
        TrackedCall(env, 1, "never", absl::ZeroDuration(), ExpectCode(StatusCode::kCancelled));
        TrackedCall(env, 1, "never", std::nullopt, ExpectCode(StatusCode::kDeadlineExceeded),
                    Track());
        TrackedCall(env, 1, "never", Scaled(env, absl::Milliseconds(100)),
                    ExpectCode(StatusCode::kDeadlineExceeded), Track());
        TrackedCall(env, 1, absl::StrCat("late:", ScaledCount(env, 80)),
                    Scaled(env, absl::Milliseconds(50)), ExpectCode(StatusCode::kDeadlineExceeded),
                    Track());
        TrackedCall(env, 1, absl::StrCat("late:", ScaledCount(env, 20)),
                    Scaled(env, absl::Milliseconds(100)), ExpectOk("re:late"), Track());
        TrackedCall(env, 2, absl::StrCat("echo:t:", ScaledCount(env, 1000)),
                    Scaled(env, absl::Seconds(1)), ExpectOk("re:t"), Track());
        CallExpectation remote = ExpectCode(StatusCode::kAborted);
        remote.remote_codes = {StatusCode::kAborted};
        TrackedCall(env, 2, absl::StrCat("fail:", static_cast<int>(StatusCode::kAborted)),
                    Scaled(env, absl::Seconds(1)), remote, Track());
        AwaitCalls(6, [this, &env] { Shutdown(env, true, false); });
      } else if (env.id == 1) {
        // Holds its "never" calls, so the barrier cannot settle: shutdown ends
        // by its timeout.
        After(env, Scaled(env, absl::Milliseconds(400)),
              [this, &env] { Shutdown(env, true, false); });
      } else {
        const std::string late = absl::StrCat("late:", ScaledCount(env, 250));
        TrackedCall(env, 1, late, std::nullopt, ExpectOk("re:late"), Track());
        env.agent->set_default_timeout(Scaled(env, absl::Milliseconds(150)));
        TrackedCall(env, 1, late, std::nullopt, ExpectCode(StatusCode::kDeadlineExceeded), Track());
        AwaitCalls(2, [this, &env] { Shutdown(env, true, false); });
      }
    }
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(Timeouts);

// ---------------------------------------------------------------------------------------------
// Worker 2 crashes at 100ms while serving slow calls; calls that depend on it
// fail with kUnavailable (directly, or relayed by worker 1), calls between 0
// and 1 are unaffected.
class PeerCrash : public Scenario {
 public:
  static constexpr char kName[] = "peer_crash";
  static constexpr char kDescription[] =
      "worker 2 crashes mid-call: calls to it (direct, relayed through worker "
      "1, and later "
      "ones) fail with kUnavailable, calls between workers 0 and 1 succeed, "
      "shutdown completes";
  int num_workers() const override { return 3; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(30);
    o->shutdown_poll_interval = absl::Milliseconds(20);
  }
  class Worker : public ServingWorker {
   public:
    explicit Worker(bool restart) : restart_(restart) {}
    void Run(WorkerEnv& env) override {
      if (env.id == 2) {
        // Serves until it crashes; shuts down on its own if it does not.
        After(env, absl::Milliseconds(600), [this, &env] { Shutdown(env, true, false); });
        return;
      }
      const bool can_crash = env.control != nullptr;
      const StatusCode lost = can_crash ? StatusCode::kUnavailable : StatusCode::kOk;
      // A call that depends on worker 2 fails with an error that names it.
      auto lost_expect = [lost](std::optional<std::string> value) {
        CallExpectation e = ExpectCode(lost);
        e.value = std::move(value);
        e.error_mentions = {"worker2", "worker 2"};
        return e;
      };
      int calls = 0;
      if (env.id == 0) {
        for (int i = 0; i < 3; ++i) {
          TrackedCall(env, 2, "late:500", std::nullopt, lost_expect("re:late"), Track());
          ++calls;
        }
        TrackedCall(env, 1, "relay:2:late:500", std::nullopt, Forwarding(lost_expect("re:late<1")),
                    Track());
        ++calls;
        if (can_crash) {
          After(env, absl::Milliseconds(100), [&env] { env.control->Crash(2); });
          if (restart_) {
            After(env, absl::Milliseconds(250), [&env] {
              absl::Status s = env.control->Restart(2);
              if (!s.ok() && !env.lossy) {
                env.recorder->Violation("restarting worker 2 failed: " + s.ToString());
              }
            });
          }
        }
        if (!restart_) {
          After(env, absl::Milliseconds(300), [this, &env, lost_expect] {
            TrackedCall(env, 2, "echo:after", std::nullopt, lost_expect("re:after"), Track());
          });
          ++calls;
        }
      }
      if (restart_) {
        // Once worker 2 is back, its new incarnation serves (the first call may
        // still meet the old one, so only the later ones must succeed).
        for (int i = 0; i < 3; ++i) {
          const std::string x = absl::StrCat("back", env.id, "-", i);
          After(env, absl::Milliseconds(400 + 50 * i), [this, &env, i, x] {
            TrackedCall(env, 2, "echo:" + x, std::nullopt,
                        i == 0 ? ExpectAnything("re:" + x) : ExpectOk("re:" + x), Track());
          });
          ++calls;
        }
      }
      for (int i = 0; i < 10; ++i) {
        const WorkerId peer = 1 - env.id;
        const std::string x = absl::StrCat("p", env.id, "-", i);
        After(env, absl::Milliseconds(30 * i), [this, &env, peer, x] {
          TrackedCall(env, peer, "echo:" + x + ":2000", std::nullopt, ExpectOk("re:" + x), Track());
        });
        ++calls;
      }
      AwaitCalls(calls, [this, &env] { Shutdown(env, true, true); });
    }

   private:
    const bool restart_;
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>(false);
  }
};
TETHER_REGISTER_SCENARIO(PeerCrash);

class PeerRestart : public PeerCrash {
 public:
  static constexpr char kName[] = "peer_restart";
  static constexpr char kDescription[] =
      "worker 2 crashes mid-call and restarts as a new incarnation at 250ms: "
      "calls to the old "
      "one fail with kUnavailable, calls to the new one succeed, nothing meant "
      "for the old "
      "incarnation reaches the new one";
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>(true);
  }
};
TETHER_REGISTER_SCENARIO(PeerRestart);

// ---------------------------------------------------------------------------------------------
class ShutdownInFlight : public Scenario {
 public:
  static constexpr char kName[] = "shutdown_in_flight";
  static constexpr char kDescription[] =
      "every worker sends 10 slow calls and at once begins a graceful "
      "shutdown: the barrier "
      "must let every call finish (no reply lost) before any worker stops";
  int num_workers() const override { return 3; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(30);
    o->shutdown_poll_interval = absl::Milliseconds(10);
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      for (int i = 0; i < 10; ++i) {
        WorkerId to = static_cast<WorkerId>(env.rng->Uniform(env.num_workers - 1));
        if (to >= env.id) ++to;
        const std::string x = absl::StrCat("s", env.id, "-", i);
        const int64_t serve_us = static_cast<int64_t>(env.rng->Uniform(50'000));
        TrackedCall(env, to, absl::StrCat("echo:", x, ":", serve_us), absl::Seconds(2),
                    ExpectOk("re:" + x));
      }
      const absl::Duration wait = absl::Microseconds(env.rng->Uniform(2000));
      After(env, wait, [this, &env] { Shutdown(env, true, true); });
    }
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(ShutdownInFlight);

// ---------------------------------------------------------------------------------------------
class ShutdownUngraceful : public Scenario {
 public:
  static constexpr char kName[] = "shutdown_ungraceful";
  static constexpr char kDescription[] =
      "workers shut down at random times with calls in flight, some "
      "gracefully, some not "
      "(worker 1 always ungracefully): every call still completes, every "
      "shutdown terminates";
  int num_workers() const override { return 3; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(10);
    o->shutdown_poll_interval = absl::Milliseconds(10);
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      for (int i = 0; i < 10; ++i) {
        const WorkerId to = static_cast<WorkerId>(env.rng->Uniform(env.num_workers));
        const std::string x = absl::StrCat("u", env.id, "-", i);
        const int64_t serve_us = static_cast<int64_t>(env.rng->Uniform(40'000));
        const bool none = env.rng->Bernoulli(0.3);
        TrackedCall(env, to, absl::StrCat("echo:", x, ":", serve_us),
                    none ? absl::ZeroDuration() : absl::Seconds(2), ExpectAnything("re:" + x));
      }
      const bool graceful = env.id != 1 && env.rng->Bernoulli(0.5);
      const absl::Duration at = absl::Microseconds(env.rng->Uniform(30'000));
      After(env, at, [this, &env, graceful] { Shutdown(env, graceful, false); });
    }
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(ShutdownUngraceful);

// ---------------------------------------------------------------------------------------------
class ShutdownOrders : public Scenario {
 public:
  static constexpr char kName[] = "shutdown_orders";
  static constexpr char kDescription[] =
      "4 workers keep calling each other and begin graceful shutdown one by "
      "one, 20ms apart, "
      "in the order numbered (seed mod 24): 24 consecutive seeds cover every "
      "order; all calls "
      "and all shutdowns succeed when nothing is lost";
  int num_workers() const override { return 4; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(30);
    o->shutdown_poll_interval = absl::Milliseconds(10);
  }
  // The position of `worker` in permutation number `index` of 0..n-1
  // (lexicographic).
  static int Position(uint64_t index, int n, WorkerId worker) {
    std::vector<int> pool(n);
    for (int i = 0; i < n; ++i) pool[i] = i;
    uint64_t fact = 1;
    for (int i = 2; i < n; ++i) fact *= i;
    index %= fact * n;
    for (int pos = 0; pos < n; ++pos) {
      const uint64_t pick = index / fact;
      index %= fact;
      if (pos + 1 < n) fact /= (n - 1 - pos);
      if (pool[pick] == worker) return pos;
      pool.erase(pool.begin() + static_cast<int64_t>(pick));
    }
    return n - 1;
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      const int pos = Position(env.run_seed, env.num_workers, env.id);
      const absl::Duration at =
          absl::Milliseconds(20) * pos + absl::Microseconds(env.rng->Uniform(5000));
      After(env, at, [this, &env] {
        // Under the lock: a call Tick() is issuing goes out before the
        // shutdown begins (on a real pool they may run concurrently).
        absl::MutexLock lock(&tick_mu_);
        declared_ = true;
        Shutdown(env, true, true);
      });
      Tick(env);
    }

   private:
    void Tick(WorkerEnv& env) {
      absl::MutexLock lock(&tick_mu_);
      if (declared_) return;
      WorkerId to = static_cast<WorkerId>(env.rng->Uniform(env.num_workers - 1));
      if (to >= env.id) ++to;
      const std::string x = absl::StrCat("o", env.id, "-", n_++);
      TrackedCall(env, to, absl::StrCat("echo:", x, ":", env.rng->Uniform(3000)), absl::Seconds(2),
                  ExpectOk("re:" + x));
      After(env, absl::Microseconds(1000 + env.rng->Uniform(3000)), [this, &env] { Tick(env); });
    }
    // Tick() and the shutdown function may run on different threads.
    absl::Mutex tick_mu_;
    bool declared_ ABSL_GUARDED_BY(tick_mu_) = false;
    int n_ ABSL_GUARDED_BY(tick_mu_) = 0;
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(ShutdownOrders);

// ---------------------------------------------------------------------------------------------
class ShutdownLostPeer : public Scenario {
 public:
  static constexpr char kName[] = "shutdown_lost_peer";
  static constexpr char kDescription[] =
      "the product's shutdown (shutdown_fails_on_lost_peer, as tether.rpc runs it): workers 0 and "
      "1 call each other and shut down gracefully at 60ms and 120ms, worker 2 at 180ms unless it "
      "crashes first at a random time (0..300ms): every shutdown completes; one that fails fails "
      "with kUnavailable naming the lost worker, and a crash well before worker 2 declared "
      "always fails them";
  int num_workers() const override { return 3; }
  void Configure(AgentOptions* o) const override {
    o->default_timeout = absl::Seconds(5);
    o->shutdown_timeout = absl::Seconds(30);
    o->shutdown_poll_interval = absl::Milliseconds(10);
    o->shutdown_fails_on_lost_peer = true;
  }
  class Worker : public ServingWorker {
   public:
    void Run(WorkerEnv& env) override {
      // Every worker draws the same crash time from the run's seed.
      const absl::Duration crash_at = absl::Milliseconds(env.run_seed * 37 % 300);
      const bool will_crash = env.control != nullptr;
      if (env.id == 2) {
        After(env, absl::Milliseconds(180), [this, &env] { Shutdown(env, true, false); });
        return;
      }
      if (env.id == 0 && will_crash) {
        After(env, crash_at, [&env] { env.control->Crash(2); });
      }
      for (int i = 0; i < 5; ++i) {
        const std::string x = absl::StrCat("l", env.id, "-", i);
        After(env, absl::Milliseconds(10 * i), [this, &env, x] {
          // A barrier ended by the crash stops the workers with their calls in flight.
          TrackedCall(env, 1 - env.id, absl::StrCat("echo:", x, ":1000"), absl::Seconds(2),
                      env.lossy || env.control != nullptr ? ExpectAnything("re:" + x)
                                                          : ExpectOk("re:" + x));
        });
      }
      const absl::Duration at = absl::Milliseconds(60 * (env.id + 1));
      // Crashed before it declared (at 180ms, less a margin for clock skew): the join cannot
      // have completed, so both shutdowns fail.
      const bool must_fail = will_crash && crash_at < absl::Milliseconds(100);
      absl::StatusOr<WorkerInfo> lost = env.agent->GetWorker(2);
      const std::string gone = absl::StrCat(lost.ok() ? lost->name : "worker2", " is gone");
      After(env, at, [this, &env, must_fail, gone] {
        Recorder* recorder = env.recorder;
        const WorkerId id = env.id;
        const bool lossy = env.lossy;
        ShutdownWorker(
            env, true, false, [recorder, id, lossy, must_fail, gone](const absl::Status& s) {
              if (s.ok()) {
                if (must_fail && !lossy) {
                  recorder->Violation(
                      absl::StrCat("worker ", id,
                                   ": graceful shutdown succeeded although worker 2 was gone "
                                   "before it began"));
                }
                return;
              }
              if (lossy) return;
              if (s.code() != absl::StatusCode::kUnavailable ||
                  s.message().find(gone) == std::string::npos) {
                recorder->Violation(absl::StrCat("worker ", id, ": shutdown failed with ",
                                                 s.ToString(), ", not kUnavailable saying '", gone,
                                                 "'"));
              }
            });
      });
    }
  };
  std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv&) override {
    return std::make_unique<Worker>();
  }
};
TETHER_REGISTER_SCENARIO(ShutdownLostPeer);

}  // namespace
}  // namespace tether::scenarios
