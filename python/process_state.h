// Process-wide state of the extension, in one place: the Python hooks tether.rpc installs at
// import, the live worker, the runtime between listen() and connect(), and workers kept for good.
//
//   Hooks         set once at import (GIL held), never released: live as long as the interpreter.
//   the worker    a shared_ptr swapped under a mutex: any thread may take a reference to it;
//                 set by connect(), cleared by shutdown().
//   listening     between listen() and connect(); touched only by bound functions (GIL held).
//   kept          workers whose handler threads were left behind at shutdown (never freed).
//
// The only other process-wide state in the extension lives with the one component that uses it,
// each annotated there with a comment pointing back here:
//   caller.cc          Deliveries(): the batch queue of rpc_async deliveries, a function-local
//                      static never freed (pool threads deliver late), its own absl::Mutex.
//   py_ownership.cc    the GIL-profiling switch and counters: atomics, any thread, for the
//                      whole interpreter.
//   call_profiling.cc  the server-process profiler's stack of enables: one per process, as in
//                      PyTorch; an absl::Mutex (ABSL_CONST_INIT) and an atomic for the fast path.
//   transport/tcp_network.cc  warn_once: the unauthenticated-network warning, printed once per
//                      process however many networks it makes (absl::once_flag).
//   sim_bindings.cc    g_child: the simulated worker's runtime, one per forked tether.sim process.
//   sim/process/child.cc  g_current: ChildRuntime::Current(), the same runtime as the process
//                      singleton the link network and virtual waits reach.
// Thread-locals (not process-wide, listed so nothing is missed): the CallbackGate's innermost
// Scope (core/callback_gate.cc), the ThreadPool's current and polling pool
// (transport/thread_pool.cc) and the TCP network being polled (transport/tcp_network.cc).
#ifndef TETHER_PYTHON_PROCESS_STATE_H_
#define TETHER_PYTHON_PROCESS_STATE_H_

#include <pybind11/pybind11.h>
#include <torch/csrc/jit/api/compilation_unit.h>

#include <atomic>
#include <memory>
#include <optional>

#include "absl/time/time.h"
#include "core/agent.h"
#include "python/dist_autograd_runner.h"
#include "python/runtime.h"

namespace tether {

// tether.rpc's Python hooks, borrowed (never released). Called with the GIL held.
struct Hooks {
  // (responder, pickle: bytes, tensors: list, async_execution: bool, caller: int) -> None; must
  // end with responder.reply(...) / set_value(...) exactly once, now or later.
  PyObject* run_python_call = nullptr;
  // (pickle: bytes, tensors: list, is_exception: bool, sender: int) -> value; raises the remote
  // exception.
  PyObject* decode_reply = nullptr;
  // (value, is_exception, peer: int) -> (pickle: bytes, tensors: list): an RRef's value for a
  // fetch by worker `peer` (RRefs inside it are forked for `peer`).
  PyObject* serialize_value = nullptr;
  // The exception class of RPC timeouts (both TimeoutError and RuntimeError).
  PyObject* timeout_error = nullptr;
};

// GIL held; steals the references.
void SetHooks(pybind11::object run_python_call, pybind11::object decode_reply,
              pybind11::object serialize_value, pybind11::object timeout_error);
const Hooks& GetHooks();

// The live worker.
struct Worker : std::enable_shared_from_this<Worker> {
  // Declared before `runtime`, so freed after it: the core calls it until the runtime stops.
  std::shared_ptr<dist_autograd::LocalAutograd> autograd;
  std::unique_ptr<Runtime> runtime;
  std::shared_ptr<torch::jit::CompilationUnit> cu;
  WorkerInfo self;
  std::atomic<int64_t> server_active_async_calls{0};
};

// Any thread.
std::shared_ptr<Worker> CurrentWorker();
void SetCurrentWorker(std::shared_ptr<Worker> w);
// Throws a RuntimeError naming init_rpc if no worker is live.
std::shared_ptr<Worker> RequireWorker();

// The runtime between listen() and connect() (GIL held).
std::unique_ptr<Runtime>& ListeningRuntime();

// Keeps `w` (and its runtime) for the life of the process: handler threads left behind at
// shutdown may still use them when their user code returns. GIL held.
void KeepForever(std::shared_ptr<Worker> w);

// A Python timeout in seconds: negative (UNSET_RPC_TIMEOUT, -1): the agent's default (nullopt);
// 0: none.
std::optional<absl::Duration> ToTimeout(double seconds);

}  // namespace tether

#endif  // TETHER_PYTHON_PROCESS_STATE_H_
