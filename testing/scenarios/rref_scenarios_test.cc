// The RRef scenarios under the simulator: a few seeds of each pass (the
// explorer runs many more), runs are deterministic, and each planted protocol
// bug is caught within a bounded number of seeds.
#include "testing/scenarios/rref_scenarios.h"

#include <string>

#include "gtest/gtest.h"
#include "testing/scenarios/scenario.h"
#include "testing/scenarios/scenario_runner.h"
#include "testing/scenarios/scenario_test_util.h"

namespace tether::scenarios {
namespace {

TEST(RRefScenariosTest, EveryVariantPassesSomeSeeds) {
  for (const char* name : {"rref_chain", "rref_tree", "rref_cycle", "rref_churn", "rref_overtake",
                           "rref_crash", "rref_shutdown", "rref"}) {
    for (const char* faults : {"none", "all"}) {
      for (uint64_t seed = 1; seed <= 6; ++seed) {
        sim::RunResult r = RunOne(name, seed, faults);
        ASSERT_TRUE(r.violations.empty()) << name << " seed " << seed << " faults " << faults
                                          << " (" << r.plan << "): " << r.violations[0];
      }
    }
  }
}

TEST(RRefScenariosTest, SameSeedSameTrace) {
  sim::RunResult a = RunOne("rref", 7, "all");
  sim::RunResult b = RunOne("rref", 7, "all");
  EXPECT_EQ(a.trace_hash, b.trace_hash);
  EXPECT_EQ(a.events, b.events);
}

// Runs `scenario` with `bug` planted over seeds 1..limit; returns the first
// failing seed, or 0.
uint64_t FirstCaught(const RRefPlantedBugs& bug, const std::string& scenario,
                     const std::string& faults, uint64_t limit, std::string* why) {
  PlantedRRefBugs() = bug;
  uint64_t found = FirstFailingSeed(scenario, faults, limit, why);
  PlantedRRefBugs() = RRefPlantedBugs();
  return found;
}

TEST(RRefScenariosTest, PlantedBugSkipChildWaitIsCaught) {
  RRefPlantedBugs bug;
  bug.skip_child_wait = true;
  std::string why;
  uint64_t seed = FirstCaught(bug, "rref", "all", 200, &why);
  EXPECT_NE(seed, 0u) << "skip_child_wait not caught in 200 seeds";
  std::cerr << "skip_child_wait caught at seed " << seed << ": " << why << "\n";
}

TEST(RRefScenariosTest, PlantedBugForgetIdempotenceIsCaught) {
  RRefPlantedBugs bug;
  bug.forget_idempotence = true;
  std::string why;
  uint64_t seed = FirstCaught(bug, "rref", "all", 200, &why);
  EXPECT_NE(seed, 0u) << "forget_idempotence not caught in 200 seeds";
  std::cerr << "forget_idempotence caught at seed " << seed << ": " << why << "\n";
}

TEST(RRefScenariosTest, PlantedBugFreeOnFirstDeleteIsCaught) {
  RRefPlantedBugs bug;
  bug.free_on_first_delete = true;
  std::string why;
  uint64_t seed = FirstCaught(bug, "rref", "all", 200, &why);
  EXPECT_NE(seed, 0u) << "free_on_first_delete not caught in 200 seeds";
  std::cerr << "free_on_first_delete caught at seed " << seed << ": " << why << "\n";
}

}  // namespace
}  // namespace tether::scenarios
