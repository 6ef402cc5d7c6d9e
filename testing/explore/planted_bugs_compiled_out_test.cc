// Proves the production core libraries carry no planted bug: linked against //core:agent,
// //core:rref_context and //core:dist_autograd (not their _planted variants), the explorer with
// every planted bug turned on finds nothing over the seeds where planted_bugs_test (and
// rref_scenarios_test) find each one.
#include <sstream>
#include <string>
#include <vector>

#include "core/agent.h"
#include "core/dist_autograd.h"
#include "core/rref_context.h"
#include "gtest/gtest.h"
#include "testing/explore/explorer.h"

namespace tether::sim {
namespace {

struct Case {
  const char* bug;
  const char* scenario;
  const char* faults;
  const char* seeds;
};

class PlantedBugsCompiledOutTest : public ::testing::TestWithParam<Case> {};

TEST(PlantedBugsCompiledOutTest, ProductionLibrariesAreLinked) {
  EXPECT_FALSE(PlantedBugsCompiledIn());
  EXPECT_FALSE(RRefPlantedBugsCompiledIn());
  EXPECT_FALSE(DistAutogradPlantedBugsCompiledIn());
}

TEST_P(PlantedBugsCompiledOutTest, PlantingChangesNothing) {
  const Case& c = GetParam();
  absl::StatusOr<ExploreOptions> o = ParseExploreArgs(
      {"explore", std::string("--scenario=") + c.scenario, std::string("--seeds=") + c.seeds,
       std::string("--faults=") + c.faults, std::string("--plant=") + c.bug});
  ASSERT_TRUE(o.ok()) << o.status();
  std::ostringstream out;
  ExploreSummary summary = Explore(*o, out);
  EXPECT_GT(summary.seeds, 0u);
  EXPECT_EQ(summary.failed, 0u) << "planted bug " << c.bug << " took effect:\n" << out.str();
}

INSTANTIATE_TEST_SUITE_P(
    AllBugs, PlantedBugsCompiledOutTest,
    ::testing::Values(Case{"lose_timeout_timer", "timeouts", "none", "1..3"},
                      Case{"drop_reply_at_shutdown", "shutdown_in_flight", "none", "1..3"},
                      Case{"process_duplicates", "request_storm", "dup=0.1", "1..3"},
                      Case{"skip_child_wait", "rref", "all", "1..200"},
                      Case{"forget_idempotence", "rref", "all", "1..200"},
                      Case{"free_on_first_delete", "rref", "all", "1..200"},
                      Case{"forget_user_delete", "rref", "all", "1..50"},
                      Case{"forget_transitive_release", "autograd_chain", "none", "1..3"},
                      Case{"release_once", "autograd_chain", "drop=0.1", "1..20"},
                      Case{"resurrect_released", "autograd_release_race",
                           "delay=0..20ms,reorder=0.3", "1..20"},
                      Case{"reply_before_rpcs", "autograd_cycle", "delay=0..5ms", "1..10"}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.bug); });

}  // namespace
}  // namespace tether::sim
