#include "python/dist_autograd_binding.h"

#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/utils/pybind.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dist_autograd.h"
#include "python/dist_autograd_runner.h"
#include "python/errors.h"
#include "python/process_state.h"
#include "python/py_ownership.h"
#include "python/wait.h"

namespace py = pybind11;

namespace tether {
namespace {

using dist_autograd::LocalAutograd;

// Process-wide (listed in process_state.h): the Python types of the two C++ nodes, registered
// once at import so that grad_fn / next_functions show them by name.
PyTypeObject send_rpc_backward_type;
PyTypeObject recv_rpc_backward_type;

constexpr char kNoCurrentContext[] =
    "Current thread doesn't have a valid autograd context. Please wrap your code using: `with "
    "torch.distributed.autograd.context() as context_id` to generate a valid context";

// The live worker's autograd and core (raises if RPC is not initialized or shut down). Held for
// one call, never across a wait (it keeps the worker's runtime alive).
struct Live {
  std::shared_ptr<Worker> worker;
  std::shared_ptr<LocalAutograd> autograd;
  std::shared_ptr<DistAutograd> core;
};

Live RequireLive() {
  Live live;
  live.worker = RequireWorker();
  live.autograd = live.worker->autograd;
  if (live.autograd != nullptr) live.core = live.autograd->core();
  if (live.core == nullptr) Raise(absl::CancelledError("distributed autograd has stopped"));
  return live;
}

// torch.distributed.autograd.DistAutogradContext: a handle on one context of this worker.
class PyContext {
 public:
  explicit PyContext(ContextId id) : id_(id) {}
  ContextId id() const { return id_; }

  py::dict SendFunctions() const { return Nodes(/*sends=*/true); }
  py::dict RecvFunctions() const { return Nodes(/*sends=*/false); }

  py::set KnownWorkerIds() const {
    Live live = RequireLive();
    absl::StatusOr<std::vector<WorkerId>> known = live.core->KnownWorkers(id_);
    if (!known.ok()) Raise(known.status());
    py::set out;
    for (WorkerId w : *known) out.add(py::int_(w));
    return out;
  }

 private:
  py::dict Nodes(bool sends) const {
    Live live = RequireLive();
    auto nodes = sends ? live.autograd->SendFunctions(id_) : live.autograd->RecvFunctions(id_);
    py::dict out;
    for (const auto& [message, node] : nodes) {
      out[py::int_(message)] =
          py::reinterpret_steal<py::object>(torch::autograd::functionToPyObject(node));
    }
    return out;
  }

  const ContextId id_;
};

PyContext NewContext() {
  Live live = RequireLive();
  if (dist_autograd::CurrentContext() != dist_autograd::kNoContext &&
      live.core->Exists(dist_autograd::CurrentContext())) {
    Raise(absl::FailedPreconditionError("Already have an autograd context id for this thread."));
  }
  ContextId id = live.core->NewContext();
  dist_autograd::SetCurrentContext(id);
  return PyContext(id);
}

void ReleaseContext(ContextId id) {
  Live live = RequireLive();
  if (dist_autograd::CurrentContext() == id) {
    dist_autograd::SetCurrentContext(dist_autograd::kNoContext);
  }
  absl::Status s;
  {
    ScopedGilRelease release;
    s = live.core->Release(id);
  }
  if (!s.ok()) Raise(s);
}

PyContext RetrieveContext(ContextId id) {
  Live live = RequireLive();
  if (!live.core->Exists(id)) Raise(absl::NotFoundError(ContextNotFoundText(id)));
  return PyContext(id);
}

PyContext CurrentContextObject() {
  Live live = RequireLive();
  ContextId id = dist_autograd::CurrentContext();
  if (id == dist_autograd::kNoContext || !live.core->Exists(id)) {
    Raise(absl::FailedPreconditionError(kNoCurrentContext));
  }
  return PyContext(id);
}

void Backward(ContextId context, const std::vector<at::Tensor>& roots, bool retain_graph) {
  RECORD_FUNCTION("torch::distributed::autograd::backward", std::vector<c10::IValue>());
  absl::StatusOr<Future<Unit>> done;
  {
    // Not held across the wait: a shutdown meanwhile frees the worker's runtime and core.
    Live live = RequireLive();
    const absl::Duration timeout = live.worker->runtime->agent()->default_timeout();
    const absl::Time deadline = timeout == absl::ZeroDuration()
                                    ? absl::InfiniteFuture()
                                    : live.worker->runtime->clock()->Now() + timeout;
    ScopedGilRelease release;
    done = live.autograd->Backward(context, roots, retain_graph, deadline);
  }
  if (!done.ok()) Raise(done.status());
  WaitInterruptibly(*done);
  if (!done->result().ok()) Raise(done->result().status());
}

py::dict GetGradients(ContextId context) {
  Live live = RequireLive();
  absl::StatusOr<c10::Dict<at::Tensor, at::Tensor>> grads;
  {
    ScopedGilRelease release;
    grads = live.autograd->Gradients(context);
  }
  if (!grads.ok()) Raise(grads.status());
  py::dict out;
  for (const auto& entry : *grads) out[py::cast(entry.key())] = py::cast(entry.value());
  return out;
}

py::dict DebugInfo() {
  Live live = RequireLive();
  std::map<std::string, int64_t> info = live.core->GetDebugInfo();
  py::dict out;
  for (const char* key : {"num_current_backward_passes", "num_autograd_contexts"}) {
    out[key] = info.count(key) > 0 ? info[key] : 0;
  }
  return out;
}

void CheckInit(int64_t worker_id) {
  Live live = RequireLive();
  if (worker_id != live.worker->self.id) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("Container is already initialized with worker_id: ", live.worker->self.id,
                     ", cannot initialize with different worker_id: ", worker_id)));
  }
}

}  // namespace

void RegisterDistAutogradBindings(py::module_& m) {
  torch::autograd::_initFunctionPyTypeObject(send_rpc_backward_type, "SendRpcBackward", nullptr,
                                             nullptr);
  Py_INCREF(&send_rpc_backward_type);
  torch::autograd::registerCppFunction(typeid(dist_autograd::SendRpcBackward),
                                       &send_rpc_backward_type);
  torch::autograd::_initFunctionPyTypeObject(recv_rpc_backward_type, "RecvRpcBackward", nullptr,
                                             nullptr);
  Py_INCREF(&recv_rpc_backward_type);
  torch::autograd::registerCppFunction(typeid(dist_autograd::RecvRpcBackward),
                                       &recv_rpc_backward_type);

  py::class_<PyContext>(m, "DistAutogradContext")
      .def("_context_id", &PyContext::id)
      .def("_send_functions", &PyContext::SendFunctions)
      .def("_recv_functions", &PyContext::RecvFunctions)
      .def("_known_worker_ids", &PyContext::KnownWorkerIds);
  m.def("autograd_new_context", &NewContext);
  m.def("autograd_release_context", &ReleaseContext, py::arg("context_id"));
  m.def("autograd_retrieve_context", &RetrieveContext, py::arg("context_id"));
  m.def("autograd_current_context", &CurrentContextObject);
  m.def("autograd_max_id", [] { return RequireLive().core->MaxId(); });
  m.def("autograd_backward", &Backward, py::arg("context_id"), py::arg("roots"),
        py::arg("retain_graph") = false);
  m.def("autograd_get_gradients", &GetGradients, py::arg("context_id"));
  m.def("autograd_debug_info", &DebugInfo);
  m.def("autograd_num_local_records", [] { return RequireLive().autograd->NumLocalRecords(); });
  m.def("autograd_check_init", &CheckInit, py::arg("worker_id"));
}

}  // namespace tether
