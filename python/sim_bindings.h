// The simulator's side of tether._C: running simulated worker processes (tether.sim) and, inside
// one, waiting by yielding to the simulator instead of blocking a thread.
//
// The extension's blocking waits call SimWaitUntil() when InSimulatedWorker(); everything else
// here is bound as tether._C.sim_* by RegisterSimBindings().
#ifndef TETHER_PYTHON_SIM_BINDINGS_H_
#define TETHER_PYTHON_SIM_BINDINGS_H_

#include <pybind11/pybind11.h>

#include <functional>
#include <string>

#include "absl/time/time.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/network.h"
#include "sim/process/wait_kind.h"

namespace tether {

// Whether this process is a simulated worker (tether.sim created its ChildRuntime).
bool InSimulatedWorker();

// Sizes the simulated worker's thread pool (its num_worker_threads).
void SetSimWorkerThreads(int n);

// The simulated worker's Clock, Executor and Network (requires InSimulatedWorker()).
Clock* SimWorkerClock();
Executor* SimWorkerExecutor();
Network* SimWorkerNetwork();

// Yields to the simulator until `ready()` holds or the worker's virtual clock reaches `deadline`
// (InfiniteFuture: no deadline). Returns ready(). Call without the GIL; `ready` runs without it.
// `kind` says what kind of wait it is (a hang report's data), `where` where it waits (its text).
bool SimWaitUntil(const std::function<bool()>& ready, absl::Time deadline,
                  const std::string& where, sim::WaitKind kind = sim::WaitKind::kOther);

// Adds tether._C.sim_*.
void RegisterSimBindings(pybind11::module& m);

}  // namespace tether

#endif  // TETHER_PYTHON_SIM_BINDINGS_H_
