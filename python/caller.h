// The caller's side: preparing a Python, builtin or TorchScript call, sending it as a call or a
// remote(), and turning replies into Python values, either for a blocking wait (rpc_sync) or
// delivered into a torch.futures.Future (rpc_async) in batches on a pool thread.
//
//   Prepared p = Profiled(PreparePython(pickle, tensors, false), key);   // GIL held
//   std::shared_ptr<Pending> call = Send(std::move(p), to, timeout);
//   py::object value = call->Wait();                                   // or DeliverTo(fut)
#ifndef TETHER_PYTHON_CALLER_H_
#define TETHER_PYTHON_CALLER_H_

#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/buffer.h"
#include "core/network.h"
#include "python/call.pb.h"
#include "python/call_profiling.h"
#include "python/errors.h"
#include "python/process_state.h"

namespace tether {

enum class Kind { kPython, kBuiltin, kScript };

// A prepared call: its payload and buffers, ready for a call or a remote().
struct Prepared {
  std::shared_ptr<Worker> worker;
  Kind kind = Kind::kPython;
  pycall::Payload payload;
  std::vector<Buffer> buffers;
  std::shared_ptr<const pycall::CallerProfile> profile;
  // The tensors as sent (with their autograd history), for distributed autograd recording.
  std::vector<at::Tensor> sent;
};

// Inside a distributed autograd context (the thread's current one), records the call to `to` in
// `p.payload` (python/dist_autograd_runner.h): builtin calls only when a tensor requires grad,
// Python and TorchScript calls always. Returns the recorder for the reply, or null.
std::shared_ptr<dist_autograd::LocalAutograd> RecordAutograd(Prepared& p, WorkerId to);

// GIL held; raise on bad input (an unknown operator, arguments that match no schema).
Prepared PreparePython(const pybind11::bytes& pickle, const std::vector<at::Tensor>& tensors,
                       bool async_execution);
Prepared PrepareBuiltin(const std::string& qualified_name, const pybind11::tuple& args,
                        const pybind11::dict& kwargs);
Prepared PrepareScript(const std::string& qualified_name, const pybind11::tuple& args,
                       const pybind11::dict& kwargs);

// Asks the callee to profile the call if this thread's legacy profiler is on; `key` names the
// call in the profile ("rpc_sync#f(worker0 -> worker1)"; empty: never profile).
Prepared Profiled(Prepared p, const std::string& key);

// Raises ValueError-like RuntimeError naming `to` if it is not a worker of this group.
void CheckDestination(Worker& w, WorkerId to);
CallContext MakeContext(Worker& w, WorkerId to, std::optional<absl::Duration> timeout);

class Pending;
// Sends a prepared call (GIL held; released only for large sends).
std::shared_ptr<Pending> Send(Prepared p, WorkerId to, double timeout_s);

// Binds `name`(to, pickle, tensors, timeout, async_execution, profiling_key): a Python call,
// sent by `send` (a call or a remote()).
template <typename SendFn>
void DefPythonCall(pybind11::module_& m, const char* name, SendFn send) {
  namespace py = pybind11;
  m.def(
      name,
      [send](WorkerId to, const py::bytes& pickle, const std::vector<at::Tensor>& tensors,
             double timeout, bool async_execution, const std::string& profiling_key) {
        return send(Profiled(PreparePython(pickle, tensors, async_execution), profiling_key), to,
                    timeout);
      },
      py::arg("to"), py::arg("pickle"), py::arg("tensors"), py::arg("timeout"),
      py::arg("async_execution"), py::arg("profiling_key") = "");
}

// Binds `name`(to, qualified_name, args, kwargs, timeout, profiling_key): a builtin-operator or
// TorchScript call made by `prepare`, sent by `send`.
template <typename PrepareFn, typename SendFn>
void DefTorchCall(pybind11::module_& m, const char* name, PrepareFn prepare, SendFn send) {
  namespace py = pybind11;
  m.def(
      name,
      [prepare, send](WorkerId to, const std::string& qualified_name, const py::tuple& args,
                      const py::dict& kwargs, double timeout, const std::string& profiling_key) {
        return send(Profiled(prepare(qualified_name, args, kwargs), profiling_key), to, timeout);
      },
      py::arg("to"), py::arg("qualified_name"), py::arg("args"), py::arg("kwargs"),
      py::arg("timeout"), py::arg("profiling_key") = "");
}

// Adds tether._C.Pending and send_python / send_builtin / send_script.
void RegisterCallerBindings(pybind11::module_& m);

}  // namespace tether

#endif  // TETHER_PYTHON_CALLER_H_
