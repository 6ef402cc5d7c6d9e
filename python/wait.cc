#include "python/wait.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>

#include "python/py_ownership.h"
#include "python/sim_bindings.h"

namespace py = pybind11;

namespace tether {

bool WaitUntilReady(const std::function<bool()>& ready,
                    const std::function<bool(absl::Duration)>& wait_for, absl::Time deadline,
                    sim::WaitKind kind) {
  if (InSimulatedWorker()) {
    // Yield to the simulator; the deadline counts in the worker's virtual time.
    absl::Time sim_deadline = deadline == absl::InfiniteFuture()
                                  ? absl::InfiniteFuture()
                                  : SimWorkerClock()->Now() + (deadline - absl::Now());
    std::string where = "waiting for an RPC result";
    try {
      where = py::module_::import("tether.sim._child").attr("_where")(where).cast<std::string>();
    } catch (const py::error_already_set&) {
    }
    ScopedGilRelease release;
    return SimWaitUntil(ready, sim_deadline, where, kind);
  }
  while (true) {
    bool done;
    {
      ScopedGilRelease release;
      absl::Duration step = std::min(absl::Milliseconds(100), deadline - absl::Now());
      done = wait_for(std::max(step, absl::ZeroDuration()));
    }
    if (done) return true;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (absl::Now() >= deadline) return false;
  }
}

}  // namespace tether
