// The callee's side: handlers for Python, builtin and TorchScript calls and the runners that
// create an RRef's value for a remote(), registered on a worker's agent and RRef context.
//
// Threading: handlers and runners run on the worker's pool threads without the GIL; a Python
// call takes it (Gil) to run tether.rpc's hook, builtins and TorchScript run without it. The
// hook answers through a Responder exactly once, now or later, from any thread with the GIL.
#ifndef TETHER_PYTHON_CALLEE_H_
#define TETHER_PYTHON_CALLEE_H_

#include <pybind11/pybind11.h>

#include "python/process_state.h"

namespace tether {

// Registers the call handlers and remote() runners on `w`'s agent and RRef context. `w` must
// outlive its runtime's agent.
void InstallCallee(Worker* w);

// Adds tether._C.Responder.
void RegisterCalleeBindings(pybind11::module_& m);

}  // namespace tether

#endif  // TETHER_PYTHON_CALLEE_H_
