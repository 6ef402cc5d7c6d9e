// RunScenario: runs one scenario (testing/scenarios/scenario.h) for one seed
// inside a SimWorld and checks its invariants. The explorer and tests call it;
// it is deterministic: the same scenario, seed, faults and planted bugs give
// the same result and trace hash.
//
// Exact expectations (a call must succeed, a shutdown must be clean) apply only
// when the run is "lossless": the faults cannot lose messages or workers and
// one-way latency stays within kLosslessMaxDelay, so scenario timing margins
// hold. The scenario's own deliberate crashes are part of its expectations.
#ifndef TETHER_TESTING_SCENARIOS_SCENARIO_RUNNER_H_
#define TETHER_TESTING_SCENARIOS_SCENARIO_RUNNER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/agent.h"
#include "sim/fault_spec.h"
#include "sim/sim_network.h"
#include "testing/scenarios/scenario.h"

namespace tether::sim {

inline constexpr absl::Duration kLosslessMaxDelay = absl::Milliseconds(10);

struct RunConfig {
  uint64_t seed = 1;
  FaultSpec faults;
  PlantedBugs bugs;
  // A run that has not settled by then violates "shutdown terminates".
  absl::Duration max_virtual_time = absl::Minutes(10);
  uint64_t max_events = 2'000'000;
};

struct RunResult {
  // Violated invariants, one line each; empty if the run was correct.
  std::vector<std::string> violations;
  uint64_t trace_hash = 0;
  uint64_t events = 0;
  absl::Duration virtual_time;
  bool lossless = false;
  std::string plan;  // the resolved faults
  SimNetworkStats network;
  int64_t calls = 0;
  int64_t calls_ok = 0;
};

RunResult RunScenario(const scenarios::ScenarioInfo& scenario,
                      const RunConfig& config);

}  // namespace tether::sim

#endif  // TETHER_TESTING_SCENARIOS_SCENARIO_RUNNER_H_
