// The distributed-autograd scenarios under the simulator: a few seeds of each variant pass (the
// explorer runs many more), runs are deterministic, the fake engine and the god view agree on a
// hand-built graph, and each planted core bug is caught by its scenario.
#include "testing/scenarios/dist_autograd_scenarios.h"

#include <iostream>
#include <string>

#include "gtest/gtest.h"
#include "testing/scenarios/dist_autograd_harness.h"
#include "testing/scenarios/scenario.h"
#include "testing/scenarios/scenario_runner.h"
#include "testing/scenarios/scenario_test_util.h"

namespace tether::scenarios {
namespace {

TEST(DistAutogradScenariosTest, EveryVariantPassesSomeSeeds) {
  for (const char* name :
       {"autograd_chain", "autograd_cycle", "autograd_trainers", "autograd_error", "autograd_crash",
        "autograd_release_race", "autograd_shutdown", "autograd"}) {
    for (const char* faults : {"none", "all"}) {
      for (uint64_t seed = 1; seed <= 5; ++seed) {
        sim::RunResult r = RunOne(name, seed, faults);
        ASSERT_TRUE(r.violations.empty()) << name << " seed " << seed << " faults " << faults
                                          << " (" << r.plan << "): " << r.violations[0];
        if (std::string(faults) == "none") {
          EXPECT_GT(r.calls_ok, 0) << name;
        }
      }
    }
  }
}

TEST(DistAutogradScenariosTest, SameSeedSameTrace) {
  sim::RunResult a = RunOne("autograd", 11, "all");
  sim::RunResult b = RunOne("autograd", 11, "all");
  EXPECT_EQ(a.trace_hash, b.trace_hash);
  EXPECT_EQ(a.events, b.events);
  EXPECT_EQ(a.violations, b.violations);
}

// The god view on a hand-built two-worker graph: m0 (0 -> 1) carries 3·p0, worker 1 replies
// m1 = 5·(recv m0) + 7·p1, and worker 0's loss is 2·(recv m1) + p0.
TEST(DistAutogradScenariosTest, GodViewComputesExactGradients) {
  testing::IntGraphRunner w0(0), w1(1);
  const ContextId ctx = 0;
  const AutogradMessageId m0 = 0;                 // from worker 0
  const AutogradMessageId m1 = int64_t{1} << 48;  // from worker 1
  testing::NodeId p0 = w0.Leaf(ctx, 0);
  testing::NodeId s0 = w0.Op(ctx, {{p0, 3}});
  w0.Send(ctx, m0, 1, s0);
  testing::NodeId r0 = w1.Recv(ctx, m0, 0);
  testing::NodeId out = w1.Op(ctx, {{r0, 5}, {w1.Leaf(ctx, 1), 7}});
  w1.Send(ctx, m1, 0, out);
  testing::NodeId r1 = w0.Recv(ctx, m1, 1);
  w0.SetRoot(ctx, w0.Op(ctx, {{r1, 2}, {p0, 1}}));
  auto expected = testing::GodView::Expected({{0, *w0.Graph(ctx)}, {1, *w1.Graph(ctx)}}, 0);
  ASSERT_TRUE(expected.ok()) << expected.status();
  // d loss / d p0 = 2·5·3 + 1 = 31; d loss / d p1 = 2·7 = 14.
  EXPECT_EQ((*expected)[0], (std::map<int, int64_t>{{0, 31}}));
  EXPECT_EQ((*expected)[1], (std::map<int, int64_t>{{1, 14}}));
  // An incomplete call tree is reported, not guessed.
  EXPECT_FALSE(testing::GodView::Expected({{0, *w0.Graph(ctx)}}, 0).ok());
}

// Runs `scenario` with `bug` planted over seeds 1..limit; returns the first failing seed, or 0.
uint64_t FirstCaught(const DistAutogradPlantedBugs& bug, const std::string& scenario,
                     const std::string& faults, uint64_t limit, std::string* why) {
  PlantedDistAutogradBugs() = bug;
  uint64_t found = FirstFailingSeed(scenario, faults, limit, why);
  PlantedDistAutogradBugs() = DistAutogradPlantedBugs();
  return found;
}

TEST(DistAutogradScenariosTest, PlantedBugsAreCaught) {
  ASSERT_TRUE(DistAutogradPlantedBugsCompiledIn());
  struct Case {
    const char* name;
    DistAutogradPlantedBugs bug;
    const char* scenario;
    const char* faults;
    uint64_t limit;
  };
  DistAutogradPlantedBugs forget, once, resurrect, early;
  forget.forget_transitive_release = true;
  once.release_once = true;
  resurrect.resurrect_released = true;
  early.reply_before_rpcs = true;
  for (const Case& c : {Case{"forget_transitive_release", forget, "autograd_chain", "none", 3},
                        Case{"release_once", once, "autograd_chain", "drop=0.1", 20},
                        Case{"resurrect_released", resurrect, "autograd_release_race",
                             "delay=0..20ms,reorder=0.3", 20},
                        Case{"reply_before_rpcs", early, "autograd_cycle", "delay=0..5ms", 10}}) {
    std::string why;
    uint64_t seed = FirstCaught(c.bug, c.scenario, c.faults, c.limit, &why);
    EXPECT_NE(seed, 0u) << c.name << " not caught by " << c.scenario << " in " << c.limit
                        << " seeds";
    std::cerr << c.name << " caught at seed " << seed << ": " << why << "\n";
  }
}

}  // namespace
}  // namespace tether::scenarios
