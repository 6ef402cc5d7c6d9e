// The explorer: runs scenarios over ranges of seeds in the simulator, checks every invariant after
// each run (see testing/scenarios/recorder.h and scenario_runner.h), and reports.
//
//   bazel run //testing/explore:explore -- --scenario=NAME|all --seeds=A..B --faults=none|SPEC|all
//       [--check-determinism] [--plant=BUG] [--verbose]
//   bazel run //testing/explore:explore -- --scenario=NAME --seed=S --trace-hash
//   bazel run //testing/explore:explore -- --list
//
// Output: for each failing run, the scenario, seed, resolved faults, each violated invariant and
// the exact command that replays it; then one summary line
//   explored scenarios=S seeds=N failed=F
// where N counts runs (one scenario at one seed) and F the runs that violated an invariant.
// `--check-determinism` runs every seed twice and fails it if the trace hashes
// or violations differ. `--plant=BUG` turns on one planted bug of the agent
// (lose_timeout_timer, drop_reply_at_shutdown, process_duplicates), the RRef
// context or distributed autograd (see Usage()) to show the oracles find it. The exit status (from explore's main) is 0 when F == 0, 1
// when F > 0, 2 on bad arguments.
#ifndef TETHER_TESTING_EXPLORE_EXPLORER_H_
#define TETHER_TESTING_EXPLORE_EXPLORER_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/agent.h"
#include "core/dist_autograd.h"
#include "core/rref_context.h"
#include "sim/fault_spec.h"

namespace tether::sim {

struct ExploreOptions {
  std::vector<std::string> scenarios;  // resolved names
  uint64_t first_seed = 1;
  uint64_t last_seed = 1;
  std::string faults_text = "none";
  FaultSpec faults;
  std::string plant;  // empty: none
  PlantedBugs bugs;
  RRefPlantedBugs rref_bugs;
  DistAutogradPlantedBugs autograd_bugs;
  bool check_determinism = false;
  bool trace_hash = false;
  bool verbose = false;
  bool list = false;
  // Stop printing failure details after this many (they are still counted).
  int max_reports = 20;
};

struct ExploreSummary {
  int scenarios = 0;
  uint64_t seeds = 0;
  uint64_t failed = 0;
  uint64_t events = 0;
  uint64_t messages = 0;
};

// Parses explore's command line (argv[0] is skipped). kInvalidArgument naming
// the bad flag or value, or naming an unknown scenario or planted bug.
absl::StatusOr<ExploreOptions> ParseExploreArgs(const std::vector<std::string>& args);

// Sets `bugs` from a planted bug's name; kInvalidArgument for an unknown name.
absl::Status ParsePlantedBug(const std::string& name, PlantedBugs* bugs,
                             RRefPlantedBugs* rref_bugs,
                             DistAutogradPlantedBugs* autograd_bugs);

// The command that replays one run.
std::string ReplayCommand(const ExploreOptions& options, const std::string& scenario,
                          uint64_t seed);

// Runs everything `options` asks for, printing to `out`. The summary line comes
// last.
ExploreSummary Explore(const ExploreOptions& options, std::ostream& out);

std::string Usage();

}  // namespace tether::sim

#endif  // TETHER_TESTING_EXPLORE_EXPLORER_H_
