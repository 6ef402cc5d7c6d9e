// ProcessHost: the simulator's host for worker processes (tether.sim). Each
// simulated worker is its own process (so it keeps its own module globals)
// running a ChildRuntime (sim/process/child.h); the host owns virtual time, the
// simulated network with its faults and the deterministic scheduler, and lets
// exactly one worker process run at a time.
//
// Every executor task, timer, delivery and peer-failure notice of a worker is
// an event of the host's Scheduler owned by that worker; running it means
// sending the command to the worker's process and serving its requests (post,
// schedule, send, ...) until it is done. One seed thus replays one run exactly,
// across processes.
//
//   ProcessHostOptions o;
//   o.num_workers = 3;
//   o.seed = 7;
//   o.faults = FaultSpec::Parse("drop=0.01").value();
//   ProcessHost host(o, fds);          // one connected link per worker, in rank order
//   ProcessRunResult r = host.Run();   // until every main function returned, or a hang
//
// Not thread-safe; Run() blocks the calling thread (release the GIL around it).
#ifndef TETHER_SIM_PROCESS_HOST_H_
#define TETHER_SIM_PROCESS_HOST_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/network.h"
#include "sim/fault_spec.h"
#include "sim/process/pipe.h"
#include "sim/scheduler.h"
#include "sim/sim_clock.h"
#include "sim/sim_executor.h"
#include "sim/sim_network.h"

namespace tether::sim {

struct ProcessHostOptions {
  int num_workers = 2;
  uint64_t seed = 1;
  FaultSpec faults;
  RunOrder order = RunOrder::kRandom;
  // Virtual time a run may take before it counts as hung.
  absl::Duration time_limit = absl::Hours(1);
  uint64_t max_events = 20'000'000;
  // Called when a planned crash kills a worker's process (the host has already
  // cut its link).
  std::function<void(WorkerId)> on_crash;
  // Record a Chrome trace of the run (ProcessRunResult::trace).
  bool record_trace = false;
};

struct WorkerOutcome {
  std::string name;  // as registered (empty if it never called init_rpc)
  bool main_done = false;
  bool ok = false;       // main returned without raising
  std::string error;     // what main raised, with its traceback
  // What kind of failure main reported (ChildRuntime::MainDone's error_kind),
  // as data: the driver classifies by it, never by `error`'s text.
  std::string error_kind;
  bool crashed = false;  // by a planned fault
  bool lost = false;     // the process died on its own
  // Frames still waiting when the run ended (a hang): what each waits for.
  std::vector<std::string> blocked;
  // Whether one of them waits in the graceful-shutdown barrier
  // (WaitKind::kShutdown).
  bool blocked_in_shutdown = false;
};

// One trace event from the run, for the Chrome trace: JSON object text with
// "ts" in virtual microseconds filled in by the host.
struct TraceEvent {
  WorkerId worker;
  std::string json;
};

struct ProcessRunResult {
  std::vector<WorkerOutcome> workers;
  // Why the run did not finish: empty if every worker's main returned (or
  // crashed by plan).
  std::string hang;
  uint64_t trace_hash = 0;
  absl::Duration elapsed;
  uint64_t events = 0;
  std::string plan;  // the resolved fault plan
  std::vector<TraceEvent> trace;
};

class ProcessHost {
 public:
  // `fds[i]` is the host's end of worker i's link; the host closes them.
  ProcessHost(ProcessHostOptions options, std::vector<int> fds);
  ~ProcessHost();
  ProcessHost(const ProcessHost&) = delete;
  ProcessHost& operator=(const ProcessHost&) = delete;

  ProcessRunResult Run();

 private:
  class Observer;
  struct Worker;

  void Exec(WorkerId k, link::Frame command, std::vector<Buffer> buffers = {});
  void Reply(WorkerId k, bool ok, absl::StatusCode code = absl::StatusCode::kOk,
             std::string text = "");
  void HandleRequest(WorkerId k, LinkFrame& in);
  void Lost(WorkerId k, const std::string& why);
  void Crash(WorkerId k);
  void Finish(WorkerId k);
  bool AllDone() const;
  // Records a Chrome trace event on worker k's track: `fields` are extra JSON
  // members.
  void Record(WorkerId k, const std::string& phase, const std::string& name,
              const std::string& category, const std::string& fields = "");
  void RecordMessage(WorkerId k, bool sent, const Message& m);

  ProcessHostOptions options_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<SimFabric> fabric_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::string> names_;
  int registered_ = 0;
  ProcessRunResult result_;
};

}  // namespace tether::sim

#endif  // TETHER_SIM_PROCESS_HOST_H_
