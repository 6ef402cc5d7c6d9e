// Runtime: one process's real-run Tether worker, as the Python extension uses
// it. It owns the system clock, the thread pool, the TCP network, the agent and
// the RRef context, and wires them together. The rendezvous itself (a c10d
// store: tcp://, file://, env://) is done by the Python layer, exactly as
// torch.distributed.rpc does it, between the two phases below.
//
//   auto rt = Runtime::Listen(options).value();        // binds; publish
//   rt->address() rt->Connect(workers, addresses);                    // agent
//   + RRef context, not started rt->agent()->RegisterHandler(wire::PYTHON_CALL,
//   ...); rt->Start();
//   ... rt->agent()->Call(...) ...
//   rt->agent()->Shutdown(true).Wait();
//   rt.reset();                                        // stops the network,
//   joins the threads
//
// Threading: the destructor blocks until the pool's threads are joined (call it
// without the GIL, never on a pool thread). Handlers, runners and future
// callbacks run on the thread pool. The pool object itself is deliberately
// never freed (a stopped pool drops what is posted to it), so a stray future
// completed after shutdown cannot post into freed memory.
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
#include "core/executor.h"
#include "core/network.h"
#include "core/rref_context.h"
#include "transport/faulty/faulty_network.h"

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
  // Faults to inject, like PyTorch's faulty agent (empty: $TETHER_FAULTY_MESSAGES,
  // $TETHER_NUM_FAIL_SENDS and $TETHER_MESSAGES_TO_DELAY, "TYPE=seconds,...").
  FaultyNetworkOptions faults;
  // Where to write this worker's Chrome trace: calls, messages, errors and RRef
  // events (empty: $TETHER_TRACE_DIR/trace-NAME.json if that is set, else no
  // trace). Merge the workers' files with tools/merge-traces.
  std::string trace_path;
};

class Runtime {
 public:
  // Binds the listening socket. kInvalidArgument for bad options, kUnavailable
  // if binding fails.
  static absl::StatusOr<std::unique_ptr<Runtime>> Listen(
      const RuntimeOptions& options);
  // A worker inside tether.sim: the simulator's clock, executor and network
  // (not owned; they outlive the runtime). Connect() then ignores addresses.
  static absl::StatusOr<std::unique_ptr<Runtime>> ForSimulation(
      const RuntimeOptions& options, Clock* clock, Executor* executor,
      Network* network);
  ~Runtime();

  // "host:port" to publish.
  std::string address() const;

  // Creates the agent and the RRef context for this worker set. `addresses`
  // maps every other worker to its published address. kInvalidArgument for a
  // malformed worker set.
  absl::Status Connect(const std::vector<WorkerInfo>& workers,
                       const std::map<WorkerId, std::string>& addresses);

  // Valid after Connect().
  Agent* agent() const;
  RRefContext* rrefs() const;
  Executor* executor() const;
  int num_worker_threads() const;

  // Starts the agent (register handlers and runners first).
  absl::Status Start();

  class Impl;

 private:
  explicit Runtime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tether

#endif  // TETHER_PYTHON_RUNTIME_H_
