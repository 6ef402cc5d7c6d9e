// A worker's life cycle as tether.rpc drives it: listen() (bind; the Python layer publishes the
// address through the rendezvous store), connect() (agent, RRef context, handlers; the current
// worker), start() (serving), shutdown(); inside tether.sim, sim_listen() instead of listen().
// Also the debug counters and the settings of a live worker.
//
// Planted protocol bugs (tether.sim's own tests): only the test-only extension variant, built
// with TETHER_PLANTED_BUGS (//python:_C_planted.so), reads $TETHER_SIM_PLANTED_RREF_BUGS.
#ifndef TETHER_PYTHON_LIFECYCLE_H_
#define TETHER_PYTHON_LIFECYCLE_H_

#include <pybind11/pybind11.h>

namespace tether {

// Adds _set_hooks, listen, sim_listen, abandon_listen, connect, start, shutdown, shutdown_progress,
// is_initialized, workers, self_id, get/set_rpc_timeout, agent_debug_info, agent_summary,
// rref_debug_info, enable_gil_profiling and the server-process profiler switches.
void RegisterLifecycleBindings(pybind11::module_& m);

}  // namespace tether

#endif  // TETHER_PYTHON_LIFECYCLE_H_
