// Runtime: one process's real-run Tether worker, as the Python extension uses
// it. It owns the system clock, the thread pool, the TCP network, the agent and
// the RRef context, and wires them together. The rendezvous itself (a c10d
// store: tcp://, file://, env://) is done by the Python layer, exactly as
// torch.distributed.rpc does it, between the two phases below.
//
//   auto rt = Runtime::Listen(options).value();          // binds; publish rt->address()
//   rt->Connect(workers, addresses);                     // agent + RRef context, not started
//   rt->agent()->RegisterHandler(wire::PYTHON_CALL, ...);
//   rt->Start();
//   ... rt->agent()->Call(...) ...
//   rt->agent()->Shutdown(true).Wait();
//   rt.reset();                                          // stops the network, joins the threads
//
// Threading: Stop() (and the destructor, which calls it) blocks until the
// pool's threads have left, but at most `stop_join_timeout` (call it without
// the GIL, never on a pool thread). Handlers, runners and future callbacks run
// on the thread pool. The pool object itself is deliberately never freed (a
// stopped pool drops what is posted to it), so a stray future completed after
// shutdown cannot post into freed memory.
//
// Threads left behind: a pool thread still inside a task when the bound passes
// (a handler stuck in user code, e.g. blocked forever on a lock) does not hold
// the process: Stop() detaches it, writes one report to stderr (how many, their
// tids, for how long) and returns them. What such a thread may touch once its
// user code returns is kept alive for good: the pool, and the whole of this
// runtime's state (clock, network, agent, RRef context, tracers: none is freed,
// the RRef context is not closed, so no owned value is released under it; the
// network is stopped and the agent shut down, so what it sends is dropped).
// The Runtime object itself is only a handle: deleting it after such a Stop()
// frees nothing else. Whatever the caller's handlers capture (python/: the
// Worker) is the caller's to keep alive when Stop() returned threads.
#ifndef TETHER_PYTHON_RUNTIME_H_
#define TETHER_PYTHON_RUNTIME_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "core/clock.h"
#include "core/dist_autograd.h"
#include "core/executor.h"
#include "core/network.h"
#include "core/rref_context.h"
#include "transport/faulty/faulty_network.h"
#include "transport/thread_pool.h"

namespace tether {

struct RuntimeOptions {
  std::string name;
  int rank = -1;
  int num_worker_threads = 16;
  // Default call timeout; zero means none.
  absl::Duration rpc_timeout = absl::Seconds(60);
  // Shared secret every worker must present (empty: $TETHER_AUTH_TOKEN or
  // none).
  std::string auth_token;
  // Address to listen on and publish to the other workers.
  std::string listen_host = "127.0.0.1";
  // How long to wait for the other workers' connections.
  absl::Duration connect_timeout = absl::Seconds(60);
  RRefContextOptions rref_options;
  // Faults to inject, like PyTorch's faulty agent (empty:
  // $TETHER_FAULTY_MESSAGES, $TETHER_NUM_FAIL_SENDS and
  // $TETHER_MESSAGES_TO_DELAY, "TYPE=seconds,...").
  FaultyNetworkOptions faults;
  // Where to write this worker's Chrome trace: calls, messages, errors and RRef
  // events (empty: $TETHER_TRACE_DIR/trace-NAME.json if that is set, else no
  // trace). Merge the workers' files with tools/merge-traces.
  std::string trace_path;
  // How long Stop() waits for the pool's threads to leave before it leaves
  // the ones still in a task behind (negative: $TETHER_SHUTDOWN_JOIN_TIMEOUT
  // seconds if set, else 5 s; absl::InfiniteDuration(): wait for ever).
  absl::Duration stop_join_timeout = absl::Seconds(-1);
};

class Runtime {
 public:
  // Binds the listening socket. kInvalidArgument for bad options, kUnavailable
  // if binding fails.
  static absl::StatusOr<std::unique_ptr<Runtime>> Listen(const RuntimeOptions& options);
  // A worker inside tether.sim: the simulator's clock, executor and network
  // (not owned; they outlive the runtime). Connect() then ignores addresses.
  static absl::StatusOr<std::unique_ptr<Runtime>> ForSimulation(const RuntimeOptions& options,
                                                                Clock* clock, Executor* executor,
                                                                Network* network);
  ~Runtime();

  // "host:port" to publish.
  std::string address() const;

  // Creates the agent, the RRef context and distributed autograd for this worker set. `addresses`
  // maps every other worker to its published address. kInvalidArgument for a
  // malformed worker set.
  absl::Status Connect(const std::vector<WorkerInfo>& workers,
                       const std::map<WorkerId, std::string>& addresses);

  // Valid after Connect().
  Agent* agent() const;
  RRefContext* rrefs() const;
  // Shared: the autograd glue (python/dist_autograd_runner.h) holds it weakly.
  std::shared_ptr<DistAutograd> dist_autograd() const;
  Executor* executor() const;
  Clock* clock() const;
  int num_worker_threads() const;
  // Pool threads not running a task now (a simulated worker: num_worker_threads()).
  int num_idle_threads() const;

  // Sends the faulty network failed on purpose so far, by message type name
  // (empty when no faults were configured).
  std::map<std::string, int> failed_sends() const;

  // Starts the agent (register handlers and runners first).
  absl::Status Start();

  // Stops the worker (idempotent): shuts the agent down at once if it is not
  // already, stops the network, runs what the pool has queued and joins its
  // threads within `stop_join_timeout`, then frees the worker's state, unless
  // threads were left behind (see above): returns those (empty: every thread
  // was joined). Later calls return the first call's result.
  std::vector<StuckThread> Stop();

  class Impl;

 private:
  explicit Runtime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tether

#endif  // TETHER_PYTHON_RUNTIME_H_
