// scenario_process: runs the agent and RRef scenarios of testing/scenarios/ for
// real, one OS process per worker, over TCP on loopback (TcpNetwork +
// SystemClock + ThreadPool), rendezvousing through a c10d FileStore. Each
// worker checks its own recorder's invariants (every call it made completed in
// time with the expected status and value, no handler of its ran twice, its
// shutdown completed) and the launcher reports every worker's verdict.
//
//   scenario_process --list
//   scenario_process [--seed=N] [--seeds=K] [--retries=R] [--timeout_s=S]
//                    [--pooled] [--time_scale=F]
//                    SCENARIO...   (or --all [--skip=NAME]...)
//
// --pooled: each worker's network is polled by its agent's thread pool
// (TcpNetworkOptions::poll_with) instead of running its own thread.
//
// --time_scale=F (an integer >= 1): multiplies the real-time margins of the
// timing-sensitive scenarios (WorkerEnv::time_scale: e.g. `timeouts` replies
// "just in time") and the slack allowed to a late completion, for slowed-down
// processes. Defaults to 1, or to kSanitizerTimeScale in a build with a
// sanitizer (ThreadSanitizer slows a process 5-15x).
//
// Real threads on a shared machine can miss a scenario's timing margins (the
// `timeouts` scenario replies "just in time"); --retries reruns a failed
// scenario, each rerun with the time scale doubled, and reports it as FLAKY if a
// rerun passes.
//
// Crashes requested by a scenario (WorldControl::Crash) are carried out by the
// launcher with SIGKILL, as a real machine failure would be. Restarting a
// crashed worker is not supported over TCP (the survivors' networks keep it
// failed), so scenarios that restart are skipped by --all.
//
// Exit status: 0 if every scenario passed on every worker.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/agent.h"
#include "sim/random.h"
#include "testing/scenarios/recorder.h"
#include "testing/scenarios/scenario.h"
#include "transport/rendezvous.h"
#include "transport/system_clock.h"
#include "transport/thread_pool.h"

namespace tether {
namespace {

using scenarios::Recorder;
using scenarios::Scenario;
using scenarios::ScenarioInfo;
using scenarios::ScenarioRegistry;
using scenarios::ScenarioWorker;
using scenarios::WorkerEnv;

// Scenarios that need a crashed worker to come back.
const std::set<std::string>& NeedsRestart() {
  static const auto* s = new std::set<std::string>{"peer_restart"};
  return *s;
}

// Asks the launcher (through a pipe) to kill a worker.
class ProcessControl : public scenarios::WorldControl {
 public:
  explicit ProcessControl(int fd) : fd_(fd) {}
  void Crash(WorkerId worker) override {
    std::string line = absl::StrCat("crash ", worker, "\n");
    (void)!write(fd_, line.data(), line.size());
  }
  absl::Status Restart(WorkerId worker) override {
    return absl::UnimplementedError(absl::StrCat(
        "restarting worker ", worker, " is not supported over TCP processes"));
  }

 private:
  int fd_;
};

// The recorder allows a call to complete kDeadlineTolerance (1 ms, sized for
// the simulator) after its deadline; real threads on a loaded machine need
// more. A lateness violation within kRealTimeSlack is reported as a note and
// not counted.
constexpr absl::Duration kRealTimeSlack = absl::Milliseconds(50);

// The default time scale (see --time_scale) of a build with a sanitizer.
constexpr int kSanitizerTimeScale = 10;

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define TETHER_SANITIZED_BUILD 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define TETHER_SANITIZED_BUILD 1
#endif
#endif
#ifdef TETHER_SANITIZED_BUILD
int time_scale = kSanitizerTimeScale;
#else
int time_scale = 1;
#endif

// kRealTimeSlack at the run's time scale.
absl::Duration RealTimeSlack() { return kRealTimeSlack * time_scale; }

bool WithinRealTimeSlack(const std::string& v) {
  // "completion: call ... completed <took> after issue with <code>, later than
  // its timeout <timeout> + tolerance ..."
  const std::string a = " completed ", b = " after issue", c = "its timeout ",
                    d = " + tolerance";
  size_t pa = v.find(a), pb = v.find(b), pc = v.find(c), pd = v.find(d);
  if (v.rfind("completion: ", 0) != 0 || pa == std::string::npos ||
      pb == std::string::npos || pc == std::string::npos ||
      pd == std::string::npos || pb < pa || pd < pc) {
    return false;
  }
  absl::Duration took, timeout;
  if (!absl::ParseDuration(v.substr(pa + a.size(), pb - pa - a.size()),
                           &took) ||
      !absl::ParseDuration(v.substr(pc + c.size(), pd - pc - c.size()),
                           &timeout)) {
    return false;
  }
  return took <= timeout + RealTimeSlack();
}

// The body of one worker process. Returns its exit code.
bool pooled_mode = false;

int RunWorker(const ScenarioInfo& info, int rank, uint64_t seed,
              const std::string& store_path, int control_fd,
              absl::Duration timeout) {
  ThreadPool pool(2);  // Outlives the network (pooled mode).
  std::unique_ptr<Scenario> scenario = info.create();
  scenario->set_time_scale(time_scale);
  const int n = scenario->num_workers();
  const std::string who = absl::StrCat(info.name, " worker ", rank);

  RendezvousOptions ro;
  ro.init_method = "file://" + store_path;
  ro.rank = rank;
  ro.world_size = n;
  ro.name = absl::StrCat("w", rank);
  ro.timeout = absl::Seconds(30);
  ro.network.connect_timeout = absl::Seconds(20);
  ro.network.stop_flush_timeout = absl::Seconds(2);
  if (pooled_mode) ro.network.poll_with = &pool;
  absl::StatusOr<Rendezvous> rdzv = RunRendezvous(ro);
  if (!rdzv.ok()) {
    std::fprintf(stderr, "%s: rendezvous failed: %s\n", who.c_str(),
                 rdzv.status().ToString().c_str());
    return 2;
  }
  std::unique_ptr<TcpNetwork> network = std::move(rdzv->network);
  SystemClock clock;
  Recorder recorder;
  sim::Prng rng = sim::Prng(seed).Fork(1000 + rank);
  ProcessControl control(control_fd);

  AgentOptions o;
  o.self = rank;
  o.workers = rdzv->workers;
  scenario->Configure(&o);
  absl::StatusOr<std::unique_ptr<Agent>> created =
      Agent::Create(o, &clock, network.get(), &pool);
  if (!created.ok()) {
    std::fprintf(stderr, "%s: %s\n", who.c_str(),
                 created.status().ToString().c_str());
    return 2;
  }
  std::unique_ptr<Agent> agent = std::move(created).value();
  WorkerEnv env;
  env.id = rank;
  env.incarnation = 0;
  env.num_workers = n;
  env.agent = agent.get();
  env.clock = &clock;
  env.executor = &pool;
  env.recorder = &recorder;
  env.rng = &rng;
  env.lossy = false;
  env.control = &control;
  env.run_seed = seed;
  env.time_scale = scenario->time_scale();
  std::unique_ptr<ScenarioWorker> worker = scenario->NewWorker(env);
  worker->Setup(env);
  recorder.WorkerStarted(rank, 0);
  if (absl::Status s = agent->Start(); !s.ok()) {
    std::fprintf(stderr, "%s: starting the agent: %s\n", who.c_str(),
                 s.ToString().c_str());
    return 2;
  }
  pool.Post([&] { worker->Run(env); });

  // Wait for the worker to shut down, then for its recorder to settle (the
  // last completions run on the pool).
  const absl::Time deadline = absl::Now() + timeout;
  while (!agent->is_shut_down() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  auto check = [&] {
    std::vector<std::string> v = recorder.CheckInvariants(true);
    scenario->Check(recorder, true, &v);
    std::vector<std::string> kept;
    for (std::string& line : v) {
      if (WithinRealTimeSlack(line)) {
        std::fprintf(stderr, "%s: note (within real-time slack of %s): %s\n",
                     who.c_str(), absl::FormatDuration(RealTimeSlack()).c_str(),
                     line.c_str());
      } else {
        kept.push_back(std::move(line));
      }
    }
    return kept;
  };
  std::vector<std::string> violations = recorder.CheckInvariants(true);
  const absl::Time settle =
      std::min(deadline, absl::Now() + absl::Seconds(2) * time_scale);
  while (!violations.empty() && absl::Now() < settle) {
    absl::SleepFor(absl::Milliseconds(5));
    violations = recorder.CheckInvariants(true);
    for (auto it = violations.begin(); it != violations.end();) {
      it = WithinRealTimeSlack(*it) ? violations.erase(it) : it + 1;
    }
  }
  violations = check();
  if (!agent->is_shut_down()) {
    violations.push_back("the agent did not shut down in time");
  }
  pool.Shutdown(ThreadPool::kDrain);
  for (const std::string& v : violations) {
    std::fprintf(stderr, "%s: VIOLATION %s\n", who.c_str(), v.c_str());
  }
  std::fprintf(stderr, "%s: %lld calls, %lld ok, %lld handler runs: %s\n",
               who.c_str(), static_cast<long long>(recorder.calls()),
               static_cast<long long>(recorder.calls_ok()),
               static_cast<long long>(recorder.handler_runs()),
               violations.empty() ? "ok" : "FAILED");
  std::fflush(stderr);
  // Skip destructors of anything a still-running thread might touch.
  _exit(violations.empty() ? 0 : 1);
}

// Runs one scenario with one process per worker. Returns true if it passed.
bool RunScenarioProcesses(const ScenarioInfo& info, uint64_t seed,
                          absl::Duration timeout) {
  const int n = info.create()->num_workers();
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string store_path = absl::StrCat(tmp ? tmp : "/tmp", "/tether_scenario_",
                                        getpid(), "_", info.name, "_", seed);
  unlink(store_path.c_str());
  int fds[2];
  if (pipe(fds) != 0) return false;
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids(n, -1);
  for (int rank = 0; rank < n; ++rank) {
    pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      _exit(RunWorker(info, rank, seed, store_path, fds[1], timeout));
    }
    pids[rank] = pid;
  }
  close(fds[1]);

  std::set<int> killed;
  std::map<int, int> status;  // rank -> wait status
  std::string pending;
  const absl::Time deadline = absl::Now() + timeout + absl::Seconds(10);
  bool timed_out = false;
  while (static_cast<int>(status.size()) < n) {
    pollfd p{fds[0], POLLIN, 0};
    poll(&p, 1, 5);
    char buf[256];
    ssize_t r;
    while ((r = read(fds[0], buf, sizeof(buf))) > 0) pending.append(buf, r);
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      int victim = -1;
      if (absl::StartsWith(line, "crash ") &&
          absl::SimpleAtoi(line.substr(6), &victim) && victim >= 0 &&
          victim < n && !status.count(victim)) {
        kill(pids[victim], SIGKILL);
        killed.insert(victim);
      }
    }
    for (int rank = 0; rank < n; ++rank) {
      if (status.count(rank)) continue;
      int st = 0;
      if (waitpid(pids[rank], &st, WNOHANG) == pids[rank]) status[rank] = st;
    }
    if (absl::Now() > deadline && !timed_out) {
      timed_out = true;
      for (int rank = 0; rank < n; ++rank) {
        if (!status.count(rank)) kill(pids[rank], SIGKILL);
      }
    }
  }
  close(fds[0]);
  unlink(store_path.c_str());

  bool ok = !timed_out;
  for (int rank = 0; rank < n; ++rank) {
    int st = status[rank];
    if (killed.count(rank)) {
      if (!(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) && st != 0) ok = false;
      continue;
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      ok = false;
      std::fprintf(stderr, "%s worker %d: %s %d\n", info.name.c_str(), rank,
                   WIFEXITED(st) ? "exited with" : "killed by signal",
                   WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    }
  }
  std::fprintf(stderr, "%s scenario %s (seed %llu, %d processes%s)\n",
               ok ? "PASS" : "FAIL", info.name.c_str(),
               static_cast<unsigned long long>(seed), n,
               timed_out ? ", TIMED OUT" : "");
  return ok;
}

int Main(int argc, char** argv) {
  uint64_t seed = 1;
  int seeds = 1;
  int timeout_s = 60;
  int retries = 0;
  std::set<std::string> skip;
  bool all = false;
  std::vector<std::string> names;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--list") {
      for (const auto& [name, info] : ScenarioRegistry::Global().all()) {
        std::printf("%-22s %s%s\n", name.c_str(), info.description.c_str(),
                    NeedsRestart().count(name) ? " [not over TCP]" : "");
      }
      return 0;
    } else if (a == "--pooled") {
      pooled_mode = true;
    } else if (a == "--all") {
      all = true;
    } else if (absl::StartsWith(a, "--seed=")) {
      if (!absl::SimpleAtoi(a.substr(7), &seed)) return 2;
    } else if (absl::StartsWith(a, "--seeds=")) {
      if (!absl::SimpleAtoi(a.substr(8), &seeds)) return 2;
    } else if (absl::StartsWith(a, "--skip=")) {
      skip.insert(a.substr(7));
    } else if (absl::StartsWith(a, "--retries=")) {
      if (!absl::SimpleAtoi(a.substr(10), &retries)) return 2;
    } else if (absl::StartsWith(a, "--timeout_s=")) {
      if (!absl::SimpleAtoi(a.substr(12), &timeout_s)) return 2;
    } else if (absl::StartsWith(a, "--time_scale=")) {
      if (!absl::SimpleAtoi(a.substr(13), &time_scale) || time_scale < 1) {
        std::fprintf(stderr, "--time_scale wants an integer >= 1\n");
        return 2;
      }
    } else if (absl::StartsWith(a, "--")) {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    } else {
      names.push_back(a);
    }
  }
  if (all) {
    for (const auto& [name, info] : ScenarioRegistry::Global().all()) {
      if (!NeedsRestart().count(name) && !skip.count(name)) {
        names.push_back(name);
      }
    }
  }
  if (names.empty()) {
    std::fprintf(stderr,
                 "usage: %s [--seed=N] [--seeds=K] [--retries=R] [--skip=NAME] "
                 "[--pooled] [--time_scale=F] "
                 "[--timeout_s=S] "
                 "(--all | SCENARIO...) | --list\n",
                 argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  int failed = 0;
  for (const std::string& name : names) {
    const ScenarioInfo* info = ScenarioRegistry::Global().Find(name);
    if (info == nullptr) {
      std::fprintf(stderr, "unknown scenario '%s' (see --list)\n",
                   name.c_str());
      return 2;
    }
    for (int k = 0; k < seeds; ++k) {
      bool ok = RunScenarioProcesses(*info, seed + k, absl::Seconds(timeout_s));
      // Each retry doubles the real-time margins (the forked workers inherit time_scale): a
      // scenario that misses them only on a loaded machine passes, a real failure does not.
      const int base_scale = time_scale;
      for (int r = 0; !ok && r < retries; ++r) {
        time_scale *= 2;
        ok = RunScenarioProcesses(*info, seed + k, absl::Seconds(timeout_s));
        if (ok) {
          std::fprintf(stderr,
                       "FLAKY scenario %s (seed %llu): failed, then passed on "
                       "retry with time scale %d (real-time margins on a loaded machine?)\n",
                       name.c_str(), static_cast<unsigned long long>(seed + k), time_scale);
        }
      }
      time_scale = base_scale;
      if (!ok) ++failed;
    }
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace tether

int main(int argc, char** argv) { return tether::Main(argc, argv); }
