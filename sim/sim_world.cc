#include "sim/sim_world.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace tether::sim {

SimWorld::SimWorld(SimWorldOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<SimWorld>> SimWorld::Create(
    SimWorldOptions options) {
  if (options.num_workers < 1 || options.num_workers > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a simulated world needs 1..1024 workers, not ", options.num_workers));
  }
  if (!options.names.empty() &&
      static_cast<int>(options.names.size()) != options.num_workers) {
    return absl::InvalidArgumentError(
        absl::StrCat("got ", options.names.size(), " worker names for ",
                     options.num_workers, " workers"));
  }
  if (absl::Status s = options.faults.Validate(options.num_workers); !s.ok())
    return s;
  std::unique_ptr<SimWorld> world(new SimWorld(std::move(options)));
  SimWorld& w = *world;
  const int n = w.options_.num_workers;
  for (int i = 0; i < n; ++i) {
    w.infos_.push_back(WorkerInfo{w.options_.names.empty()
                                      ? absl::StrCat("worker", i)
                                      : w.options_.names[i],
                                  i});
  }
  w.scheduler_ = std::make_unique<Scheduler>(w.options_.seed, w.options_.order);
  Prng plan_rng = Prng(w.options_.seed).Fork(3);
  FaultPlan plan = ResolveFaults(w.options_.faults, n, plan_rng);
  w.fabric_ =
      std::make_unique<SimFabric>(w.scheduler_.get(), n, plan, w.options_.seed);
  w.workers_.resize(n);
  for (int i = 0; i < n; ++i) {
    if (absl::Status s = w.BuildWorker(i); !s.ok()) return s;
  }
  SimWorld* self = world.get();
  for (const CrashSpec& c : w.fabric_->plan().spec.crashes) {
    const WorkerId id = c.worker;
    w.scheduler_->At(Scheduler::Epoch() + c.at, Owners{}, EventKind::kFault,
                     0xc0000 + static_cast<uint64_t>(id),
                     [self, id] { self->Crash(id); });
    if (c.restart_at) {
      w.scheduler_->At(Scheduler::Epoch() + *c.restart_at, Owners{},
                       EventKind::kFault, 0xe0000 + static_cast<uint64_t>(id),
                       [self, id] {
                         if (self->crashed(id)) self->Restart(id).IgnoreError();
                       });
    }
  }
  return world;
}

absl::Status SimWorld::BuildWorker(WorkerId id) {
  Worker& w = workers_[id];
  const FaultPlan& plan = fabric_->plan();
  w.clock = std::make_unique<SimClock>(
      scheduler_.get(), id,
      ClockModel{plan.clock_skew[id], plan.clock_rate[id]});
  w.executor = std::make_unique<SimExecutor>(scheduler_.get(), id);
  w.network = fabric_->CreateEndpoint(id);
  AgentOptions o = options_.agent;
  o.self = id;
  o.workers = infos_;
  o.incarnation = w.network->incarnation();
  absl::StatusOr<std::unique_ptr<Agent>> agent = Agent::Create(
      std::move(o), w.clock.get(), w.network.get(), w.executor.get());
  if (!agent.ok()) return agent.status();
  w.agent = std::move(agent).value();
  w.started = false;
  if (options_.on_agent) options_.on_agent(*this, id, *w.agent);
  return absl::OkStatus();
}

SimWorld::~SimWorld() {
  // Agents' pending calls and queued events can hold objects (replies owed by
  // handlers of other agents) whose destructors reach other agents, so no agent
  // may go while another still holds such things: first every agent (crashed
  // ones too) stops ungracefully, which completes its pending calls (their
  // callbacks are queued, never run); then the queued events are dropped; only
  // then do the agents go, then everything else.
  // An agent that crashed mid-way through a graceful shutdown ignores
  // Shutdown(false); telling it that every worker failed completes whatever
  // calls it still has pending.
  const absl::Status torn_down =
      absl::UnavailableError("the simulation is being torn down");
  for (std::vector<Worker>* list : {&graveyard_, &workers_}) {
    for (Worker& w : *list) {
      if (w.agent == nullptr) continue;
      w.agent->Shutdown(false);
      for (const WorkerInfo& peer : infos_)
        w.agent->OnPeerFailed(peer.id, torn_down);
    }
  }
  scheduler_->Clear();
  for (Worker& w : workers_) w.agent.reset();
  for (Worker& w : graveyard_) w.agent.reset();
  workers_.clear();
  graveyard_.clear();
  fabric_.reset();
  scheduler_.reset();
}

absl::Status SimWorld::Start() {
  for (int i = 0; i < size(); ++i) {
    if (workers_[i].started || crashed(i)) continue;
    if (absl::Status s = StartWorker(i); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status SimWorld::StartWorker(WorkerId worker) {
  if (worker < 0 || worker >= size()) {
    return absl::InvalidArgumentError(absl::StrCat("no worker ", worker));
  }
  Worker& w = workers_[worker];
  if (w.started)
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " already started"));
  w.started = true;
  return w.agent->Start();
}

bool SimWorld::RunUntilIdle(uint64_t max_events) {
  return scheduler_->RunUntilIdle(max_events);
}

bool SimWorld::RunUntil(const std::function<bool()>& done,
                        absl::Duration limit) {
  return scheduler_->RunUntil(done, limit == absl::InfiniteDuration()
                                        ? absl::InfiniteFuture()
                                        : scheduler_->Now() + limit);
}

std::vector<Future<Unit>> SimWorld::ShutdownAll(bool graceful) {
  std::vector<Future<Unit>> futures;
  for (int i = 0; i < size(); ++i) {
    if (!crashed(i)) futures.push_back(workers_[i].agent->Shutdown(graceful));
  }
  return futures;
}

void SimWorld::Crash(WorkerId worker) {
  if (worker < 0 || worker >= size() || crashed(worker)) return;
  fabric_->Crash(worker);
  if (options_.on_crash) options_.on_crash(*this, worker);
}

absl::Status SimWorld::Restart(WorkerId worker) {
  if (worker < 0 || worker >= size()) {
    return absl::InvalidArgumentError(absl::StrCat("no worker ", worker));
  }
  if (!crashed(worker)) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " is not crashed"));
  }
  graveyard_.push_back(std::move(workers_[worker]));
  workers_[worker] = Worker();
  if (absl::Status s = BuildWorker(worker); !s.ok()) return s;
  return StartWorker(worker);
}

}  // namespace tether::sim
