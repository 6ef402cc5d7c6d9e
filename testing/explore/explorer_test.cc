// The explorer's command line, reports and determinism check, over the agent
// scenarios.
#include "testing/explore/explorer.h"

#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "testing/scenarios/scenario.h"
#include "testing/scenarios/scenario_runner.h"

namespace tether::sim {
namespace {

absl::StatusOr<ExploreOptions> Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "explore");
  return ParseExploreArgs(args);
}

TEST(ExplorerTest, ParsesTheIssueCommandLines) {
  absl::StatusOr<ExploreOptions> o =
      Parse({"--scenario=all", "--seeds=1..2000", "--faults=all"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->first_seed, 1u);
  EXPECT_EQ(o->last_seed, 2000u);
  EXPECT_TRUE(o->faults.all);
  EXPECT_GE(o->scenarios.size(), 8u);
  o = Parse({"--scenario=timeouts", "--seed=7", "--trace-hash",
             "--check-determinism", "--plant=process_duplicates",
             "--faults=drop=0.1,crash=1@5ms"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->first_seed, 7u);
  EXPECT_EQ(o->last_seed, 7u);
  EXPECT_TRUE(o->trace_hash && o->check_determinism &&
              o->bugs.process_duplicates);
  EXPECT_EQ(ReplayCommand(*o, "timeouts", 9),
            "bazel run //testing/explore:explore -- --scenario=timeouts --seed=9 "
            "--faults='drop=0.1,crash=1@5ms' --plant=process_duplicates "
            "--check-determinism");
}

TEST(ExplorerTest, BadArgumentsNameWhatIsWrong) {
  struct Bad {
    std::vector<std::string> args;
    std::string mention;
  } cases[] = {
      {{"--scenario=nope", "--seed=1"}, "unknown scenario 'nope'"},
      {{"--scenario=timeouts", "--seeds=5..1"}, "--seeds=5..1"},
      {{"--scenario=timeouts"}, "--seeds"},
      {{"--seed=1"}, "--scenario"},
      {{"--scenario=timeouts", "--seed=1", "--faults=drop=2"}, "'drop=2'"},
      {{"--scenario=timeouts", "--seed=1", "--faults=crash=9@1s"}, "worker 9"},
      {{"--scenario=timeouts", "--seed=1", "--plant=bogus"},
       "unknown planted bug 'bogus'"},
      {{"--scenario=timeouts", "--seed=1", "--frobnicate"}, "--frobnicate"},
  };
  for (const Bad& b : cases) {
    absl::StatusOr<ExploreOptions> o = Parse(b.args);
    ASSERT_FALSE(o.ok()) << b.mention;
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(o.status().message().find(b.mention), std::string::npos)
        << o.status();
  }
}

TEST(ExplorerTest, AgentScenariosPassAndAreDeterministic) {
  for (const char* faults : {"none", "all"}) {
    absl::StatusOr<ExploreOptions> o =
        Parse({"--scenario=request_storm,nested_calls,timeouts,peer_crash,peer_"
               "restart,"
               "shutdown_in_flight,shutdown_ungraceful,shutdown_orders",
               "--seeds=1..6", std::string("--faults=") + faults,
               "--check-determinism"});
    ASSERT_TRUE(o.ok()) << o.status();
    std::ostringstream out;
    ExploreSummary s = Explore(*o, out);
    EXPECT_EQ(s.failed, 0u) << out.str();
    EXPECT_EQ(s.scenarios, 8);
    EXPECT_EQ(s.seeds, 48u);
    EXPECT_NE(out.str().find("explored scenarios=8 seeds=48 failed=0"),
              std::string::npos);
  }
}

TEST(ExplorerTest, PlantedRRefBugIsFoundAndItsReplayPlantsItAgain) {
  absl::StatusOr<ExploreOptions> o =
      Parse({"--scenario=rref", "--seeds=1..100", "--faults=all",
             "--plant=free_on_first_delete", "--max-reports=1"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->rref_bugs.free_on_first_delete);
  std::ostringstream out;
  ExploreSummary s = Explore(*o, out);
  EXPECT_GT(s.failed, 0u) << out.str();
  EXPECT_NE(out.str().find("--plant=free_on_first_delete"), std::string::npos)
      << out.str();
  // Without the plant the same seeds pass.
  o = Parse({"--scenario=rref", "--seeds=1..20", "--faults=all"});
  ASSERT_TRUE(o.ok());
  std::ostringstream clean;
  EXPECT_EQ(Explore(*o, clean).failed, 0u) << clean.str();
}

TEST(ExplorerTest, TraceHashIsPrintedAndStable) {
  absl::StatusOr<ExploreOptions> o = Parse(
      {"--scenario=request_storm", "--seed=3", "--trace-hash", "--faults=all"});
  ASSERT_TRUE(o.ok());
  std::ostringstream a, b;
  Explore(*o, a);
  Explore(*o, b);
  EXPECT_EQ(a.str(), b.str());
  EXPECT_NE(a.str().find("trace-hash scenario=request_storm seed=3 hash="),
            std::string::npos);
  o->first_seed = o->last_seed = 4;
  std::ostringstream c;
  Explore(*o, c);
  EXPECT_NE(a.str(), c.str());
}

TEST(ExplorerTest, RunnerReportsWhatChangedBetweenSeeds) {
  const scenarios::ScenarioInfo* info =
      scenarios::ScenarioRegistry::Global().Find("timeouts");
  ASSERT_NE(info, nullptr);
  RunConfig config;
  RunResult r = RunScenario(*info, config);
  EXPECT_TRUE(r.violations.empty());
  EXPECT_TRUE(r.lossless);
  EXPECT_GT(r.calls, 5);
  EXPECT_GT(r.events, 0u);
  config.faults = FaultSpec::Parse("drop=0.2").value();
  RunResult lossy = RunScenario(*info, config);
  EXPECT_FALSE(lossy.lossless);
  EXPECT_NE(lossy.trace_hash, r.trace_hash);
}

}  // namespace
}  // namespace tether::sim
