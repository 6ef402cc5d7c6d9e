// RRefs as Python sees them: tether._C.RRef (a handle of this worker's RRef context), remote()
// calls that create one, RRefs received inside a call's arguments, and on_confirmed(), which
// runs a call whose RRef arguments must first be confirmed by their owners.
//
// Ownership: a Python RRef owns one RRefHandle. Dropping it (in pybind11_object_dealloc, GIL
// held) only posts a note to the RRef context's executor: it never blocks, never releases the
// GIL (py_ownership.h rule 3).
#ifndef TETHER_PYTHON_RREF_BINDING_H_
#define TETHER_PYTHON_RREF_BINDING_H_

#include <pybind11/pybind11.h>

namespace tether {

// Adds tether._C.RRef, remote_python / remote_builtin / remote_script, create_owned_rref,
// receive_rref and on_confirmed.
void RegisterRRefBindings(pybind11::module_& m);

}  // namespace tether

#endif  // TETHER_PYTHON_RREF_BINDING_H_
