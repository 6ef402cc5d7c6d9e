#include "testing/scenarios/scenario_runner.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "sim/sim_world.h"

namespace tether::sim {
namespace {

using scenarios::Recorder;
using scenarios::ScenarioWorker;
using scenarios::WorkerEnv;

class Control : public scenarios::WorldControl {
 public:
  void Crash(WorkerId worker) override { world->Crash(worker); }
  absl::Status Restart(WorkerId worker) override {
    return world->Restart(worker);
  }
  SimWorld* world = nullptr;
};

struct Slot {
  std::unique_ptr<Prng> rng;
  std::unique_ptr<WorkerEnv> env;
  std::unique_ptr<ScenarioWorker> worker;
};

bool Lossless(const FaultPlan& plan) {
  if (plan.spec.CanLose()) return false;
  if (plan.link.delay->Max() > kLosslessMaxDelay) return false;
  for (const auto& [type, l] : plan.by_type) {
    if (l.delay->Max() > kLosslessMaxDelay) return false;
  }
  return true;
}

}  // namespace

RunResult RunScenario(const scenarios::ScenarioInfo& info,
                      const RunConfig& config) {
  RunResult result;
  std::unique_ptr<scenarios::Scenario> scenario = info.create();
  Recorder recorder;
  Control control;
  std::vector<Slot> slots;
  bool lossless = false;

  SimWorldOptions o;
  o.num_workers = scenario->num_workers();
  o.seed = config.seed;
  o.faults = config.faults;
  scenario->Configure(&o.agent);
  o.on_agent = [&](SimWorld& world, WorkerId w, Agent& agent) {
    lossless = Lossless(world.plan());
    Slot slot;
    const uint64_t inc = world.incarnation(w);
    slot.rng =
        std::make_unique<Prng>(Prng(config.seed).Fork(1000 + 64 * inc + w));
    slot.env = std::make_unique<WorkerEnv>();
    WorkerEnv& env = *slot.env;
    env.id = w;
    env.incarnation = inc;
    env.num_workers = world.size();
    env.agent = &agent;
    env.clock = &world.clock(w);
    env.executor = &world.executor(w);
    env.recorder = &recorder;
    env.rng = slot.rng.get();
    env.lossy = !lossless;
    env.control = &control;
    env.run_seed = config.seed;
    slot.worker = scenario->NewWorker(env);
    slot.worker->Setup(env);
    agent.set_planted_bugs(config.bugs);
    recorder.WorkerStarted(w, inc);
    ScenarioWorker* worker = slot.worker.get();
    WorkerEnv* e = slot.env.get();
    env.executor->Post([worker, e] {
      if (e->incarnation == 0) {
        worker->Run(*e);
      } else {
        worker->RunRestarted(*e);
      }
    });
    slots.push_back(std::move(slot));
  };
  o.on_crash = [&](SimWorld& world, WorkerId w) {
    recorder.WorkerCrashed(w, world.incarnation(w));
  };

  absl::StatusOr<std::unique_ptr<SimWorld>> created =
      SimWorld::Create(std::move(o));
  if (!created.ok()) {
    result.violations.push_back(
        absl::StrCat("setup: ", created.status().ToString()));
    return result;
  }
  std::unique_ptr<SimWorld> world = std::move(created).value();
  control.world = world.get();
  result.plan = world->plan().ToString();
  result.lossless = lossless;
  if (absl::Status s = world->Start(); !s.ok()) {
    result.violations.push_back(
        absl::StrCat("setup: starting agents: ", s.ToString()));
  }
  Scheduler& scheduler = world->scheduler();
  scheduler.RunUntil([] { return false; },
                     Scheduler::Epoch() + config.max_virtual_time,
                     config.max_events);
  if (!scheduler.idle()) {
    result.violations.push_back(absl::StrCat(
        "termination: the run had not settled after ",
        absl::FormatDuration(world->Elapsed()), " of virtual time and ",
        scheduler.events_run(), " events (", scheduler.pending(),
        " events pending, next at +",
        absl::FormatDuration(scheduler.NextEventTime() - Scheduler::Epoch()),
        ")"));
  }
  for (std::string& v : recorder.CheckInvariants(lossless)) {
    result.violations.push_back(std::move(v));
  }
  scenario->Check(recorder, lossless, &result.violations);
  result.trace_hash = scheduler.trace_hash();
  result.events = scheduler.events_run();
  result.virtual_time = world->Elapsed();
  result.network = world->fabric().stats();
  result.calls = recorder.calls();
  result.calls_ok = recorder.calls_ok();
  // Scenario workers (and the calls they hold) go before the agents they point
  // into.
  slots.clear();
  world.reset();
  return result;
}

}  // namespace tether::sim
