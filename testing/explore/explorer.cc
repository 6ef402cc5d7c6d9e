#include "testing/explore/explorer.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "testing/scenarios/scenario_runner.h"
#include "testing/scenarios/dist_autograd_scenarios.h"
#include "testing/scenarios/rref_scenarios.h"
#include "testing/scenarios/scenario.h"

namespace tether::sim {
namespace {

using scenarios::ScenarioInfo;
using scenarios::ScenarioRegistry;

absl::Status BadFlag(absl::string_view flag, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("explore: bad flag '", flag, "': ", why));
}

std::string ScenarioNames() {
  std::vector<std::string> names;
  for (const auto& [name, info] : ScenarioRegistry::Global().all())
    names.push_back(name);
  return absl::StrJoin(names, ", ");
}

}  // namespace

std::string Usage() {
  return absl::StrCat(
      "usage: explore --scenario=NAME[,NAME...]|all (--seeds=A..B | --seed=S)\n"
      "               [--faults=none|all|SPEC] [--check-determinism] "
      "[--trace-hash]\n"
      "               "
      "[--plant=BUG]\n"
      "               [--verbose] [--max-reports=N] [--list]\n"
      "scenarios: ",
      ScenarioNames(),
      "\nfault SPEC: comma-separated drop=P dup=P reorder=P delay=D|A..B|exp:M "
      "partition=G-G[@T1..T2] partition=G>G[@..] partition=random "
      "crash=W@T[..R] "
      "crash=random skew=D drift=X type=NAME:KEY=VALUE (see "
      "sim/fault_spec.h)\n"
      "planted BUG (tests of the oracles): lose_timeout_timer "
      "drop_reply_at_shutdown process_duplicates (agent), skip_child_wait "
      "forget_idempotence free_on_first_delete forget_user_delete (RRefs), "
      "forget_transitive_release release_once resurrect_released reply_before_rpcs "
      "(distributed autograd)\n");
}

absl::Status ParsePlantedBug(const std::string& name, PlantedBugs* bugs,
                             RRefPlantedBugs* rref_bugs,
                             DistAutogradPlantedBugs* autograd_bugs) {
  if (name == "forget_transitive_release") {
    autograd_bugs->forget_transitive_release = true;
  } else if (name == "release_once") {
    autograd_bugs->release_once = true;
  } else if (name == "resurrect_released") {
    autograd_bugs->resurrect_released = true;
  } else if (name == "reply_before_rpcs") {
    autograd_bugs->reply_before_rpcs = true;
  } else if (name == "skip_child_wait") {
    rref_bugs->skip_child_wait = true;
  } else if (name == "forget_idempotence") {
    rref_bugs->forget_idempotence = true;
  } else if (name == "free_on_first_delete") {
    rref_bugs->free_on_first_delete = true;
  } else if (name == "forget_user_delete") {
    rref_bugs->forget_user_delete = true;
  } else if (name == "lose_timeout_timer") {
    bugs->lose_timeout_timer = true;
  } else if (name == "drop_reply_at_shutdown") {
    bugs->drop_reply_at_shutdown = true;
  } else if (name == "process_duplicates") {
    bugs->process_duplicates = true;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown planted bug '", name,
        "' (lose_timeout_timer, drop_reply_at_shutdown, process_duplicates, "
        "skip_child_wait, forget_idempotence, free_on_first_delete, "
        "forget_user_delete, forget_transitive_release, release_once, "
        "resurrect_released, reply_before_rpcs)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ExploreOptions> ParseExploreArgs(
    const std::vector<std::string>& args) {
  ExploreOptions o;
  bool have_seeds = false;
  std::string scenario_arg;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& arg = args[i];
    std::string key = arg, value;
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      key = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    if (key == "--scenario") {
      scenario_arg = value;
    } else if (key == "--seeds") {
      std::vector<std::string> parts =
          absl::StrSplit(value, absl::MaxSplits("..", 1));
      uint64_t a = 0, b = 0;
      if (parts.size() == 2 && absl::SimpleAtoi(parts[0], &a) &&
          absl::SimpleAtoi(parts[1], &b) && a <= b) {
        o.first_seed = a;
        o.last_seed = b;
      } else if (parts.size() == 1 && absl::SimpleAtoi(parts[0], &b) &&
                 b >= 1) {
        o.first_seed = 1;
        o.last_seed = b;
      } else {
        return BadFlag(
            arg, "expected --seeds=A..B with A <= B (or --seeds=N for 1..N)");
      }
      have_seeds = true;
    } else if (key == "--seed") {
      uint64_t s = 0;
      if (!absl::SimpleAtoi(value, &s))
        return BadFlag(arg, "expected --seed=S, a number");
      o.first_seed = o.last_seed = s;
      have_seeds = true;
    } else if (key == "--faults") {
      absl::StatusOr<FaultSpec> spec = FaultSpec::Parse(value);
      if (!spec.ok()) return BadFlag(arg, spec.status().message());
      o.faults = *spec;
      o.faults_text = value;
    } else if (key == "--plant") {
      if (absl::Status s = ParsePlantedBug(value, &o.bugs, &o.rref_bugs,
                                           &o.autograd_bugs);
          !s.ok()) {
        return BadFlag(arg, s.message());
      }
      o.plant = value;
    } else if (key == "--max-reports") {
      if (!absl::SimpleAtoi(value, &o.max_reports) || o.max_reports < 0) {
        return BadFlag(arg, "expected a count");
      }
    } else if (arg == "--check-determinism") {
      o.check_determinism = true;
    } else if (arg == "--trace-hash") {
      o.trace_hash = true;
    } else if (arg == "--verbose" || arg == "-v") {
      o.verbose = true;
    } else if (arg == "--list") {
      o.list = true;
    } else {
      return BadFlag(arg, "unknown flag (see --help)");
    }
  }
  if (o.list) return o;
  if (scenario_arg.empty())
    return BadFlag("--scenario", "missing; give a name or 'all'");
  if (!have_seeds)
    return BadFlag("--seeds", "missing; give --seeds=A..B or --seed=S");
  if (scenario_arg == "all") {
    for (const auto& [name, info] : ScenarioRegistry::Global().all())
      o.scenarios.push_back(name);
  } else {
    for (absl::string_view name : absl::StrSplit(scenario_arg, ',')) {
      if (ScenarioRegistry::Global().Find(std::string(name)) == nullptr) {
        return BadFlag(absl::StrCat("--scenario=", scenario_arg),
                       absl::StrCat("unknown scenario '", name,
                                    "' (known: ", ScenarioNames(), ")"));
      }
      o.scenarios.emplace_back(name);
    }
  }
  for (const std::string& name : o.scenarios) {
    const int n =
        ScenarioRegistry::Global().Find(name)->create()->num_workers();
    if (absl::Status s = o.faults.Validate(n); !s.ok()) {
      return BadFlag(absl::StrCat("--faults=", o.faults_text),
                     absl::StrCat(s.message(), " in scenario ", name));
    }
  }
  return o;
}

std::string ReplayCommand(const ExploreOptions& o, const std::string& scenario,
                          uint64_t seed) {
  std::string cmd =
      absl::StrCat("bazel run //testing/explore:explore -- --scenario=", scenario,
                   " --seed=", seed, " --faults='", o.faults_text, "'");
  if (!o.plant.empty()) absl::StrAppend(&cmd, " --plant=", o.plant);
  if (o.check_determinism) absl::StrAppend(&cmd, " --check-determinism");
  return cmd;
}

ExploreSummary Explore(const ExploreOptions& o, std::ostream& out) {
  ExploreSummary summary;
  if (o.list) {
    for (const auto& [name, info] : ScenarioRegistry::Global().all()) {
      out << name << ": " << info.description << "\n";
    }
    return summary;
  }
  int reported = 0;
  // The RRef scenarios read their planted bugs from here (none unless asked).
  scenarios::PlantedRRefBugs() = o.rref_bugs;
  // So do the distributed-autograd scenarios.
  scenarios::PlantedDistAutogradBugs() = o.autograd_bugs;
  for (const std::string& name : o.scenarios) {
    const ScenarioInfo& info = *ScenarioRegistry::Global().Find(name);
    ++summary.scenarios;
    for (uint64_t seed = o.first_seed;; ++seed) {
      RunConfig config;
      config.seed = seed;
      config.faults = o.faults;
      config.bugs = o.bugs;
      RunResult r = RunScenario(info, config);
      if (o.check_determinism) {
        RunResult again = RunScenario(info, config);
        if (again.trace_hash != r.trace_hash ||
            again.violations != r.violations) {
          r.violations.push_back(
              absl::StrFormat("determinism: two runs of this seed differ "
                              "(trace hash %016x vs %016x, %d vs %d "
                              "violations)",
                              r.trace_hash, again.trace_hash,
                              r.violations.size(), again.violations.size()));
        }
      }
      ++summary.seeds;
      summary.events += r.events;
      summary.messages += r.network.delivered;
      if (o.trace_hash) {
        out << absl::StrFormat(
            "trace-hash scenario=%s seed=%d hash=%016x events=%d\n", name, seed,
            r.trace_hash, r.events);
      }
      if (o.verbose) {
        out << absl::StrFormat(
            "run scenario=%s seed=%d %s events=%d virtual=%s calls=%d ok=%d "
            "delivered=%d "
            "dropped=%d dup=%d faults=%s\n",
            name, seed, r.violations.empty() ? "ok" : "FAILED", r.events,
            absl::FormatDuration(r.virtual_time), r.calls, r.calls_ok,
            r.network.delivered, r.network.dropped, r.network.duplicated,
            r.plan.empty() ? "none" : r.plan);
      }
      if (!r.violations.empty()) {
        ++summary.failed;
        if (reported++ < o.max_reports) {
          out << "FAIL scenario=" << name << " seed=" << seed
              << " faults=" << (r.plan.empty() ? "none" : r.plan)
              << (o.plant.empty() ? "" : " plant=" + o.plant) << "\n";
          constexpr size_t kMaxLines = 8;
          for (size_t i = 0; i < r.violations.size() && i < kMaxLines; ++i) {
            out << "  invariant violated: " << r.violations[i] << "\n";
          }
          if (r.violations.size() > kMaxLines) {
            out << "  ... and " << r.violations.size() - kMaxLines << " more\n";
          }
          out << "  replay: " << ReplayCommand(o, name, seed) << std::endl;
        }
      }
      if (seed == o.last_seed) break;
    }
  }
  out << "explored scenarios=" << summary.scenarios
      << " seeds=" << summary.seeds << " failed=" << summary.failed << "\n";
  return summary;
}

}  // namespace tether::sim
