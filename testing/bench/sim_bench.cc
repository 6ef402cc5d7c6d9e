// sim_bench: how fast the simulator runs, on one core (it is single-threaded).
// Not a test.
//
//   bazel run -c opt //testing/bench:sim_bench [-- --scale=N]
//
// Reports
//  - network: messages delivered per wall-second by the bare simulated network
//  (4 workers, each
//    answering every message with a new one to a random peer, 64 messages in
//    flight);
//  - agent: messages delivered per wall-second while 4 agents run
//  request_storm;
//  - seeds: whole 4-worker scenario runs (request_storm, shutdown_orders) per
//  wall-second,
//    without faults and with --faults=all.
// This is the one file in sim/ that reads the wall clock, to measure itself.
#include <chrono>  // seam-ok: the benchmark measures wall time
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "sim/fault_spec.h"
#include "sim/scheduler.h"
#include "sim/sim_network.h"
#include "testing/scenarios/scenario.h"
#include "testing/scenarios/scenario_runner.h"

namespace tether::sim {
namespace {

double WallSeconds() {
  using Clock =
      std::chrono::steady_clock;  // seam-ok: the benchmark measures wall time
  static const Clock::time_point start = Clock::now();  // seam-ok: benchmark
  return std::chrono::duration<double>(Clock::now() - start)
      .count();  // seam-ok: benchmark
}

class Bouncer : public NetworkObserver {
 public:
  Bouncer(Network** self, int n, Prng* rng, uint64_t* budget)
      : self_(self), n_(n), rng_(rng), budget_(budget) {}
  void OnMessage(Message m) override {
    ++received;
    if (*budget_ == 0) return;
    --*budget_;
    Message next;
    next.envelope.set_type(wire::TEST_CALL);
    next.envelope.set_payload(m.envelope.payload());
    (*self_)
        ->Send(static_cast<WorkerId>(rng_->Uniform(n_)), std::move(next))
        .IgnoreError();
  }
  void OnPeerFailed(WorkerId, const absl::Status&) override {}
  uint64_t received = 0;

 private:
  Network** self_;
  int n_;
  Prng* rng_;
  uint64_t* budget_;
};

void BenchNetwork(uint64_t messages) {
  constexpr int kWorkers = 4;
  Scheduler scheduler(1);
  Prng rng(2);
  Prng plan_rng(3);
  SimFabric fabric(&scheduler, kWorkers,
                   ResolveFaults(FaultSpec(), kWorkers, plan_rng), 1);
  std::vector<std::unique_ptr<SimNetwork>> endpoints;
  std::vector<Network*> nets(kWorkers);
  std::vector<std::unique_ptr<Bouncer>> observers;
  uint64_t budget = messages;
  for (int i = 0; i < kWorkers; ++i) {
    endpoints.push_back(fabric.CreateEndpoint(i));
    nets[i] = endpoints[i].get();
    observers.push_back(
        std::make_unique<Bouncer>(&nets[i], kWorkers, &rng, &budget));
    endpoints[i]->Start(observers[i].get()).IgnoreError();
  }
  for (int i = 0; i < 64; ++i) {
    Message m;
    m.envelope.set_type(wire::TEST_CALL);
    m.envelope.set_payload(std::string(32, 'x'));
    endpoints[i % kWorkers]
        ->Send(static_cast<WorkerId>(rng.Uniform(kWorkers)), std::move(m))
        .IgnoreError();
  }
  const double t0 = WallSeconds();
  scheduler.RunUntilIdle();
  const double dt = WallSeconds() - t0;
  std::printf(
      "network: %llu messages delivered in %.3f s = %.0f messages/s (%llu "
      "events)\n",
      static_cast<unsigned long long>(fabric.stats().delivered), dt,
      fabric.stats().delivered / dt,
      static_cast<unsigned long long>(scheduler.events_run()));
}

void BenchScenario(const std::string& name, const std::string& faults,
                   int seeds) {
  const scenarios::ScenarioInfo* info =
      scenarios::ScenarioRegistry::Global().Find(name);
  if (info == nullptr) {
    std::printf("%s: not linked in\n", name.c_str());
    return;
  }
  RunConfig config;
  config.faults = FaultSpec::Parse(faults).value();
  uint64_t delivered = 0, events = 0, failed = 0;
  const double t0 = WallSeconds();
  for (int s = 1; s <= seeds; ++s) {
    config.seed = s;
    RunResult r = RunScenario(*info, config);
    delivered += r.network.delivered;
    events += r.events;
    failed += r.violations.empty() ? 0 : 1;
  }
  const double dt = WallSeconds() - t0;
  std::printf(
      "seeds: %s --faults=%s: %d seeds in %.3f s = %.1f seeds/s; %.0f "
      "messages/s, %.0f "
      "events/s (%.0f messages per seed; %llu failed)\n",
      name.c_str(), faults.c_str(), seeds, dt, seeds / dt, delivered / dt,
      events / dt, static_cast<double>(delivered) / seeds,
      static_cast<unsigned long long>(failed));
}

}  // namespace
}  // namespace tether::sim

int main(int argc, char** argv) {
  int scale = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--scale=", 0) == 0 && absl::SimpleAtoi(a.substr(8), &scale) &&
        scale >= 1) {
      continue;
    }
    std::fprintf(stderr, "usage: sim_bench [--scale=N]\n");
    return 2;
  }
  tether::sim::BenchNetwork(2'000'000ULL * scale);
  tether::sim::BenchScenario("request_storm", "none", 200 * scale);
  tether::sim::BenchScenario("request_storm", "all", 200 * scale);
  tether::sim::BenchScenario("shutdown_orders", "none", 200 * scale);
  tether::sim::BenchScenario("shutdown_orders", "all", 200 * scale);
  return 0;
}
