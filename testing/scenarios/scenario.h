// Scenarios: small distributed programs that exercise the agent (and, later,
// the RRef context), written against one worker's environment (WorkerEnv: its
// agent, clock, executor, a recorder) so the same scenario runs inside the
// simulator (testing/scenarios/scenario_runner.h, the explorer) and could run over real TCP
// processes.
//
// A Scenario makes one ScenarioWorker per worker incarnation. The driver:
//   1. builds the worker's agent, calls worker->Setup(env) (register handlers), starts it;
//   2. posts worker->Run(env) to the worker's executor (first incarnation) or
//      worker->RunRestarted(env) (a restarted incarnation);
//   3. runs until everything settles; every incarnation that did not crash must have shut down (use
//      ShutdownWorker());
//   4. checks Recorder::CheckInvariants() plus Scenario::Check().
// All scenario code runs on the worker's executor (handlers, future callbacks,
// After()). In the simulator that executor is single-threaded, but over real
// processes (testing/multiprocess/scenario_process.cc) it is a thread pool: handlers,
// callbacks and After() functions of one worker may run concurrently, so a
// ScenarioWorker's state that more than one of them touches must be guarded
// (an absl::Mutex, or an atomic), as must a Scenario's state that its workers
// share and that Check() reads. Never run a callback, or a call into the agent
// or an RRef context, while holding such a lock. Locks do not change the
// simulator's (deterministic) order of events or random draws. Workers
// coordinate only through RPCs, as separate processes would.
//
// Real-time runs on slow processes (sanitizers, loaded machines) set a time
// scale (WorkerEnv::time_scale, Scenario::time_scale()); scenarios whose
// expectations hang on timing margins (a reply "just in time") multiply their
// durations by it (Scaled(), Scenario::ScaledTime()). The simulator leaves it
// at 1: what it checks is unchanged.
//
// Registering: a scenario library defines its scenarios and registers them with
//   TETHER_REGISTER_SCENARIO(MyScenario);
// and is a cc_library with alwayslink = 1 that the explorer links in. Names
// must be unique.
#ifndef TETHER_TESTING_SCENARIOS_SCENARIO_H_
#define TETHER_TESTING_SCENARIOS_SCENARIO_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "core/clock.h"
#include "core/executor.h"
#include "sim/random.h"
#include "testing/scenarios/recorder.h"

namespace tether::scenarios {

// Harness powers that only some drivers have (the simulator: yes; real
// processes: maybe).
class WorldControl {
 public:
  virtual ~WorldControl() = default;
  // Crashes `worker`'s current incarnation abruptly.
  virtual void Crash(WorkerId worker) = 0;
  // Starts a new incarnation of a crashed worker.
  virtual absl::Status Restart(WorkerId worker) = 0;
};

struct WorkerEnv {
  WorkerId id = -1;
  uint64_t incarnation = 0;
  int num_workers = 0;
  Agent* agent = nullptr;
  Clock* clock = nullptr;
  Executor* executor = nullptr;
  Recorder* recorder = nullptr;
  // Seeded per worker incarnation; scenario choices draw from it. Not
  // thread-safe: draw from it only in Run()/RunRestarted() or in a chain of
  // functions each started (After()) by the previous one, never from handlers
  // or call callbacks that may run concurrently.
  sim::Prng* rng = nullptr;
  // True if the faults in force can lose messages or workers; scenarios then
  // expect less.
  bool lossy = false;
  // Null when the driver cannot crash or restart workers.
  WorldControl* control = nullptr;
  // The run's seed, the same for every worker (for choices all workers must
  // agree on).
  uint64_t run_seed = 0;
  // The next call token's counter (see TrackedCall, NextSeq()); atomic: calls
  // may be issued from several threads of a real worker's pool.
  std::atomic<uint32_t> next_seq{1};
  // Multiplies the real-time margins of timing-sensitive scenarios (see
  // Scaled()); >= 1. Always 1 in the simulator.
  int time_scale = 1;

  // Returns a fresh call sequence number (1, 2, ...) of this incarnation.
  uint32_t NextSeq() { return next_seq.fetch_add(1, std::memory_order_relaxed); }
};

// `d` multiplied by the run's time scale (exactly `d` at scale 1).
inline absl::Duration Scaled(const WorkerEnv& env, absl::Duration d) {
  return env.time_scale == 1 ? d : d * env.time_scale;
}
// A count of time units (e.g. the MS of a "late:MS" request) multiplied by the
// run's time scale.
inline int64_t ScaledCount(const WorkerEnv& env, int64_t n) { return n * env.time_scale; }

class ScenarioWorker {
 public:
  virtual ~ScenarioWorker() = default;
  // Registers handlers (and anything else) on env.agent before it starts.
  virtual void Setup(WorkerEnv& env) = 0;
  // The worker's program (first incarnation), run on its executor once all
  // agents started.
  virtual void Run(WorkerEnv& env) = 0;
  // A restarted incarnation's program. By default it shuts down gracefully at
  // once.
  virtual void RunRestarted(WorkerEnv& env);
};

class Scenario {
 public:
  virtual ~Scenario() = default;
  virtual int num_workers() const = 0;
  // Adjusts the agents' options (timeouts, shutdown bounds) before they are
  // created.
  virtual void Configure(AgentOptions* options) const {}
  virtual std::unique_ptr<ScenarioWorker> NewWorker(const WorkerEnv& env) = 0;
  // Scenario-wide checks after the run; add violations to `out`. Over real
  // processes it may run while the worker's pool still runs callbacks.
  virtual void Check(const Recorder& recorder, bool lossless, std::vector<std::string>* out) const {
  }

  // The time scale of the run (see WorkerEnv::time_scale): a real-time driver
  // sets it before Configure() and NewWorker(); the simulator leaves it at 1.
  void set_time_scale(int scale) { time_scale_ = scale < 1 ? 1 : scale; }
  int time_scale() const { return time_scale_; }
  // `d` multiplied by time_scale() (exactly `d` at scale 1).
  absl::Duration ScaledTime(absl::Duration d) const {
    return time_scale_ == 1 ? d : d * time_scale_;
  }

 private:
  int time_scale_ = 1;
};

struct ScenarioInfo {
  std::string name;
  std::string description;
  std::function<std::unique_ptr<Scenario>()> create;
};

// The scenarios linked into this binary, by name (sorted).
class ScenarioRegistry {
 public:
  static ScenarioRegistry& Global();
  // Returns false (and keeps the first) if the name is taken.
  bool Register(ScenarioInfo info);
  const ScenarioInfo* Find(const std::string& name) const;
  const std::map<std::string, ScenarioInfo>& all() const { return scenarios_; }

 private:
  std::map<std::string, ScenarioInfo> scenarios_;
};

#define TETHER_SCENARIO_CONCAT_INNER_(a, b) a##b
#define TETHER_SCENARIO_CONCAT_(a, b) TETHER_SCENARIO_CONCAT_INNER_(a, b)
// Registers a Scenario subclass with static `kName` and `kDescription` members.
#define TETHER_REGISTER_SCENARIO(cls)                                                \
  static const bool TETHER_SCENARIO_CONCAT_(tether_scenario_registered_, __LINE__) = \
      ::tether::scenarios::ScenarioRegistry::Global().Register(                      \
          {cls::kName, cls::kDescription, [] { return std::make_unique<cls>(); }})

// ---- Helpers for scenario code (run on the worker's executor). ----

// Runs `fn` on env's executor after `delay` of env's clock.
void After(WorkerEnv& env, absl::Duration delay, std::function<void()> fn);

// The payload of a tracked request: the call's token, then the body.
std::string TrackedPayload(Recorder::Token token, const std::string& body);
// Splits a tracked request's payload. Returns false if it is not one.
bool ParseTracked(const std::string& payload, Recorder::Token* token, std::string* body);

// Sends a TEST_CALL (or `type`) request whose payload carries a fresh token,
// records it, and records its completion (on env's executor) before running
// `then` (if any). `timeout`: nullopt uses the agent's default, zero means
// none.
Future<Message> TrackedCall(WorkerEnv& env, WorkerId to, const std::string& body,
                            std::optional<absl::Duration> timeout, CallExpectation expect,
                            std::function<void(const absl::StatusOr<Message>&)> then = {},
                            MessageType type = wire::TEST_CALL);

// For handlers: records the run and returns the body of a tracked request (or
// records a violation and returns nullopt for a malformed one).
std::optional<std::string> AcceptTracked(WorkerEnv& env, const IncomingCall& call);

// Shuts the worker down, recording it; runs `then` (if any) on completion.
// Calling it again for the same incarnation only adds `then`.
void ShutdownWorker(WorkerEnv& env, bool graceful, bool expect_ok,
                    std::function<void(const absl::Status&)> then = {});

}  // namespace tether::scenarios

#endif  // TETHER_TESTING_SCENARIOS_SCENARIO_H_
