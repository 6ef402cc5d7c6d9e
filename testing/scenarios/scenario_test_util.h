// Helpers for the scenario tests (testonly): run one registered scenario at one seed, and find
// the first seed whose run violates an invariant (how a test shows a planted bug is caught).
//
//   PlantedRRefBugs().skip_child_wait = true;
//   std::string why;
//   EXPECT_NE(FirstFailingSeed("rref_tree", "none", 20, &why), 0u);
#ifndef TETHER_TESTING_SCENARIOS_SCENARIO_TEST_UTIL_H_
#define TETHER_TESTING_SCENARIOS_SCENARIO_TEST_UTIL_H_

#include <cstdint>
#include <string>

#include "gtest/gtest.h"
#include "testing/scenarios/scenario.h"
#include "testing/scenarios/scenario_runner.h"

namespace tether::scenarios {

inline const ScenarioInfo& Info(const std::string& name) {
  const ScenarioInfo* info = ScenarioRegistry::Global().Find(name);
  EXPECT_NE(info, nullptr) << name;
  return *info;
}

// `faults` is a sim/fault_spec.h spec ("none", "all", ...).
inline sim::RunResult RunOne(const std::string& name, uint64_t seed, const std::string& faults) {
  sim::RunConfig config;
  config.seed = seed;
  config.faults = sim::FaultSpec::Parse(faults).value();
  return sim::RunScenario(Info(name), config);
}

// The first seed in 1..limit whose run of `scenario` violates an invariant, or 0; `*why` is that
// run's first violation.
inline uint64_t FirstFailingSeed(const std::string& scenario, const std::string& faults,
                                 uint64_t limit, std::string* why) {
  for (uint64_t seed = 1; seed <= limit; ++seed) {
    sim::RunResult r = RunOne(scenario, seed, faults);
    if (!r.violations.empty()) {
      *why = r.violations[0];
      return seed;
    }
  }
  return 0;
}

}  // namespace tether::scenarios

#endif  // TETHER_TESTING_SCENARIOS_SCENARIO_TEST_UTIL_H_
