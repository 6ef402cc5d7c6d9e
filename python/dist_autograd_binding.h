// tether._C.autograd_*: distributed autograd for tether.autograd (torch.distributed.autograd's
// surface) and the DistAutogradContext class. Only converts and forwards to
// python/dist_autograd_runner.h; backward() waits with the GIL released (Ctrl-C honoured).
#ifndef TETHER_PYTHON_DIST_AUTOGRAD_BINDING_H_
#define TETHER_PYTHON_DIST_AUTOGRAD_BINDING_H_

#include <pybind11/pybind11.h>

namespace tether {

void RegisterDistAutogradBindings(pybind11::module_& m);

}  // namespace tether

#endif  // TETHER_PYTHON_DIST_AUTOGRAD_BINDING_H_
