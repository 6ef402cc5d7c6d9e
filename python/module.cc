// tether._C: the pybind11 extension behind tether.rpc, as components that each register their
// bindings (tensorstore's layout):
//
//   py_ownership   the rule for Python references and the GIL (read it first)
//   errors         statuses become Python exceptions, in one place (and tether._C.RRefLeakError)
//   process_state  the extension's process-wide state, in one place
//   wait           blocking waits: GIL released, Ctrl-C, the simulator's virtual time
//   owned_value    RRef values kept as Python objects on their owner
//   caller         sending calls and remote()s, replies into values and futures
//   callee         handlers that run Python, builtin and TorchScript calls
//   rref_binding   tether._C.RRef
//   dist_autograd_binding  tether._C.autograd_*: distributed autograd (dist_autograd_runner.h)
//   lifecycle      listen / connect / shutdown, counters, settings
//   rendezvous_binding  the name and address exchange over torch.distributed's store
//   sim_bindings   tether.sim's simulated worker processes
//
// Pickling of Python calls happens in tether/rpc/internal.py; the extension moves the pickle and
// the tensors (out of band) and runs builtin operators and TorchScript functions on the callee
// without the GIL.
#include <pybind11/pybind11.h>

#include "absl/synchronization/mutex.h"
#include "python/callee.h"
#include "python/caller.h"
#include "python/dist_autograd_binding.h"
#include "python/errors.h"
#include "python/lifecycle.h"
#include "python/rendezvous_binding.h"
#include "python/rref_binding.h"
#include "python/sim_bindings.h"

PYBIND11_MODULE(_C, m) {
  // Debian's Abseil tracks every Mutex in a lock graph to detect deadlocks (a debug feature that
  // costs a graph update per lock): off in the extension.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  m.doc() = "Tether's extension: the RPC engine behind tether.rpc (see python/module.cc).";
  tether::RegisterErrorBindings(m);
  tether::RegisterLifecycleBindings(m);
  tether::RegisterCalleeBindings(m);
  tether::RegisterCallerBindings(m);
  tether::RegisterRRefBindings(m);
  tether::RegisterDistAutogradBindings(m);
  tether::RegisterRendezvousBindings(m);
  tether::RegisterSimBindings(m);
}
