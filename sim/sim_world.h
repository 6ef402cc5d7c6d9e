// SimWorld: a whole simulated cluster in one object, for tests and the
// explorer: N workers, each with an Agent over its own SimClock, SimExecutor
// and SimNetwork endpoint, all driven by one Scheduler and one seed. Faults
// come from a FaultSpec (resolved per seed into a FaultPlan); planned crashes
// and restarts are scheduled automatically.
//
//   SimWorldOptions o;
//   o.num_workers = 3;
//   o.seed = 42;
//   o.faults = FaultSpec::Parse("drop=0.01,delay=0..5ms").value();  // default: none
//   o.agent.default_timeout = absl::Seconds(5);  // template for every worker's AgentOptions
//   auto world = SimWorld::Create(o).value();    // agents created, not started
//   world->agent(1).RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall> c) {
//     c->Reply(c->request().envelope.payload(), {});
//   });
//   TETHER_CHECK_OK(world->Start());  // starts every agent (or StartWorker(w))
//   Future<Message> f = world->agent(0).Call(1, wire::TEST_CALL, "hi", {});
//   world->RunUntilReady(f);                   // runs the scheduler until f completes
//   world->Elapsed();                          // virtual time since the start
//   world->ShutdownAll(/*graceful=*/true);     // Shutdown on every live agent
//   world->RunUntilIdle();
//   world->trace_hash();                       // same seed, same hash
//
// Workers are named "worker0", "worker1", ... (or SimWorldOptions::names). Test
// code calls agents directly between Run*() calls; everything runs on the
// caller's thread (the simulator is single-threaded), and agents' handlers and
// callbacks run inside Run*().
//
// Crash(w) kills worker w's current incarnation (tasks, timers, in-flight
// messages vanish, peers get OnPeerFailed); its Agent object is kept, inert,
// until the world is destroyed. Restart(w) builds a new incarnation: new clock,
// executor, endpoint and Agent (with AgentOptions::incarnation one higher),
// runs `on_agent` on it, and starts it.
#ifndef TETHER_SIM_SIM_WORLD_H_
#define TETHER_SIM_SIM_WORLD_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "core/future.h"
#include "sim/fault_spec.h"
#include "sim/scheduler.h"
#include "sim/sim_clock.h"
#include "sim/sim_executor.h"
#include "sim/sim_network.h"

namespace tether::sim {

class SimWorld;

struct SimWorldOptions {
  int num_workers = 2;
  uint64_t seed = 1;
  FaultSpec faults;  // default: none
  // Template for every agent; `self`, `workers` and `incarnation` are filled in
  // per worker.
  AgentOptions agent;
  // Worker names; default "worker0", "worker1", ...
  std::vector<std::string> names;
  RunOrder order = RunOrder::kRandom;
  // Called for every agent the world creates (in Create() and on Restart()),
  // before it starts: register handlers, activity sources and listeners here.
  std::function<void(SimWorld& world, WorkerId worker, Agent& agent)> on_agent;
  // Called right after a worker crashes (its agent is then inert).
  std::function<void(SimWorld& world, WorkerId worker)> on_crash;
};

class SimWorld {
 public:
  // kInvalidArgument for a bad worker count, a fault spec naming a missing
  // worker, or an agent registry the Agent rejects.
  static absl::StatusOr<std::unique_ptr<SimWorld>> Create(SimWorldOptions options);
  ~SimWorld();
  SimWorld(const SimWorld&) = delete;
  SimWorld& operator=(const SimWorld&) = delete;

  // Starts every agent not started yet (the first incarnations).
  absl::Status Start();
  absl::Status StartWorker(WorkerId worker);

  int size() const { return options_.num_workers; }
  uint64_t seed() const { return options_.seed; }
  // The current incarnation's pieces of `worker`.
  Agent& agent(WorkerId worker) { return *workers_[worker].agent; }
  SimClock& clock(WorkerId worker) { return *workers_[worker].clock; }
  SimExecutor& executor(WorkerId worker) { return *workers_[worker].executor; }
  SimNetwork& network(WorkerId worker) { return *workers_[worker].network; }
  uint64_t incarnation(WorkerId worker) const { return workers_[worker].network->incarnation(); }
  bool crashed(WorkerId worker) const { return fabric_->crashed(worker); }
  const std::vector<WorkerInfo>& worker_infos() const { return infos_; }

  Scheduler& scheduler() { return *scheduler_; }
  SimFabric& fabric() { return *fabric_; }
  const FaultPlan& plan() const { return fabric_->plan(); }

  // True (virtual) time, and time since the start.
  absl::Time Now() const { return scheduler_->Now(); }
  absl::Duration Elapsed() const { return scheduler_->Elapsed(); }

  // Runs until nothing is left to run. Returns false if `max_events` ran first
  // (a livelock).
  bool RunUntilIdle(uint64_t max_events = 50'000'000);
  // Runs until `done()`, idleness, or `limit` of virtual time from now. Returns
  // done().
  bool RunUntil(const std::function<bool()>& done, absl::Duration limit = absl::Hours(1));
  template <typename T>
  bool RunUntilReady(const Future<T>& future, absl::Duration limit = absl::Hours(1)) {
    return RunUntil([&future] { return future.ready(); }, limit);
  }
  // Runs everything due in the next `d` of virtual time.
  void RunFor(absl::Duration d) { scheduler_->RunFor(d); }

  // Calls Shutdown(graceful) on every live (not crashed) agent; returns their
  // futures in worker order (crashed workers are skipped).
  std::vector<Future<Unit>> ShutdownAll(bool graceful);

  // Crashes `worker` now. No-op if it is already crashed.
  void Crash(WorkerId worker);
  // Restarts a crashed worker as a new incarnation. kFailedPrecondition if it
  // is not crashed.
  absl::Status Restart(WorkerId worker);

  uint64_t trace_hash() const { return scheduler_->trace_hash(); }

 private:
  struct Worker {
    std::unique_ptr<SimClock> clock;
    std::unique_ptr<SimExecutor> executor;
    std::unique_ptr<SimNetwork> network;
    std::unique_ptr<Agent> agent;
    bool started = false;
  };

  explicit SimWorld(SimWorldOptions options);
  absl::Status BuildWorker(WorkerId worker);

  SimWorldOptions options_;
  std::vector<WorkerInfo> infos_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<SimFabric> fabric_;
  std::vector<Worker> workers_;
  std::vector<Worker> graveyard_;  // crashed incarnations, inert
};

}  // namespace tether::sim

#endif  // TETHER_SIM_SIM_WORLD_H_
