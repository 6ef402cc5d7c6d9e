#include "python/rref_binding.h"

// clang-format off
#include <ATen/ThreadLocalState.h>
// clang-format on
#include <pybind11/stl.h>
#include <torch/csrc/profiler/api.h>
#include <torch/csrc/utils/pybind.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/future.h"
#include "core/rref_context.h"
#include "python/caller.h"
#include "python/errors.h"
#include "python/owned_value.h"
#include "python/process_state.h"
#include "python/py_ownership.h"
#include "python/torch_calls.h"
#include "python/wait.h"

namespace py = pybind11;

namespace tether {
namespace {

// An id as PyTorch prints it: GloballyUniqueId(created_on=1, local_id=0).
std::string TorchId(const GloballyUniqueId& id) {
  return absl::StrCat("GloballyUniqueId(created_on=", id.worker, ", local_id=", id.local, ")");
}

std::string TorchWorker(WorkerId id, const std::string& name) {
  return absl::StrCat("WorkerInfo(id=", id, ", name=", name, ")");
}

constexpr absl::string_view kForkAfterDeletion = "Cannot call fork an UserRRef after deletion.";

class PyRRef {
 public:
  explicit PyRRef(RRefHandle handle) : handle_(std::move(handle)) {}
  // Default: dropping the handle only posts to the RRef context (see the file comment).
  ~PyRRef() = default;
  PyRRef(const PyRRef&) = delete;
  PyRRef& operator=(const PyRRef&) = delete;

  const RRefHandle& handle() const { return handle_; }
  int owner_id() const { return handle_.owner(); }
  bool is_owner() const { return handle_.is_owner(); }

  std::string owner_name() const {
    std::shared_ptr<Worker> w = RequireWorker();
    absl::StatusOr<WorkerInfo> info = w->runtime->agent()->GetWorker(handle_.owner());
    if (!info.ok()) Raise(info.status());
    return info->name;
  }

  bool confirmed_by_owner() const {
    std::shared_ptr<Worker> w = RequireWorker();
    if (handle_.is_owner()) return true;
    ScopedGilRelease release;
    Future<Unit> f = w->runtime->rrefs()->WaitForConfirmations({handle_});
    return f.ready() && f.result().ok();
  }

  py::object ToHere(double timeout_s) const {
    std::shared_ptr<Worker> w = WorkerOrDeleted("Cannot call to_here() on it after deletion.");
    std::optional<absl::Duration> timeout = ToTimeout(timeout_s);
    CallContext ctx = MakeContext(*w, handle_.owner(), timeout);
    // Inside a distributed autograd context a fetch from another worker is recorded (always,
    // as PyTorch does): the owner joins the context and the value comes back with history.
    std::string attachment;
    std::shared_ptr<dist_autograd::LocalAutograd> autograd;
    const ContextId context = dist_autograd::CurrentContext();
    if (context != dist_autograd::kNoContext && !handle_.is_owner() && w->autograd != nullptr) {
      pycall::Payload carrier;  // only its autograd meta is used
      w->autograd->RecordOutgoing(context, handle_.owner(), {}, /*force=*/true,
                                  /*involved_of=*/false, &carrier);
      if (carrier.has_autograd()) {
        attachment = carrier.autograd().SerializeAsString();
        autograd = w->autograd;
      }
    }
    Future<RRefValue> f(nullptr);
    {
      ScopedGilRelease release;
      f = w->runtime->rrefs()->ToHere(handle_, timeout, std::move(attachment));
    }
    WaitInterruptibly(f);
    // A profiled remote(): its creation reply carries the callee's operators; let it be
    // processed before the value is returned (and the profile ends). (The owner sends that
    // reply before it serves the value: a short wait.)
    const absl::StatusOr<RRefValue>& v = f.result();
    if (v.ok() && profiled_creation_.has_value()) WaitInterruptibly(*profiled_creation_);
    if (!v.ok())
      RaiseDeletedOr(*w, v.status(), "Cannot call to_here() on it after deletion.", &ctx);
    return ValueToPython(*v, handle_.owner(), handle_.owner() == w->self.id, autograd.get(),
                         context);
  }

  // For a profiled remote() (user handle): to_here() also waits for `acked`.
  void set_profiled_creation(Future<Unit> acked) { profiled_creation_.emplace(std::move(acked)); }

  py::object LocalValue() const {
    if (!handle_.is_owner()) {
      // PyTorch's text (its tests match it).
      std::shared_ptr<Worker> w = RequireWorker();
      absl::StatusOr<WorkerInfo> owner = w->runtime->agent()->GetWorker(handle_.owner());
      Raise(absl::FailedPreconditionError(absl::StrCat(
          "For UserRRef(rref_id=", TorchId(handle_.rref_id()),
          ", fork_id=", TorchId(handle_.fork_id()), "), can't call localValue() on user ",
          TorchWorker(w->self.id, w->self.name), ". Call it on owner ",
          TorchWorker(handle_.owner(), owner.ok() ? owner->name : "?"))));
    }
    return ToHere(0);
  }

  // The descriptor that travels in place of this RRef to worker `to` (a fork for `to`).
  RRefDescriptor ForkFor(WorkerId to) const {
    std::shared_ptr<Worker> w = WorkerOrDeleted(kForkAfterDeletion);
    absl::StatusOr<RRefDescriptor> d;
    {
      ScopedGilRelease release;
      d = w->runtime->rrefs()->Fork(handle_, to);
    }
    if (!d.ok()) RaiseDeletedOr(*w, d.status(), kForkAfterDeletion);
    return *std::move(d);
  }

  py::bytes Fork(WorkerId to) const { return py::bytes(ForkFor(to).Serialize()); }

  // The fork as PyTorch's RRefForkData tuple (RRef._serialize()): (owner, rref id's worker,
  // rref id's counter, fork id's worker, fork id's counter, parent, type name).
  py::tuple ForkFields(WorkerId to) const {
    RRefDescriptor d = ForkFor(to);
    return py::make_tuple(d.owner, d.rref_id.worker, d.rref_id.local, d.fork_id.worker,
                          d.fork_id.local, d.parent, d.type_name);
  }

  // The running worker; PyTorch's error for a user RRef that RPC's shutdown deleted if RPC
  // is not running (`action`: what cannot be done).
  std::shared_ptr<Worker> WorkerOrDeleted(absl::string_view action) const {
    std::shared_ptr<Worker> w = CurrentWorker();
    if (w == nullptr && !handle_.is_owner()) RaiseDeleted(action);
    return w != nullptr ? w : RequireWorker();
  }

  // Raises `status`, as PyTorch's deletion error if this user RRef was deleted by a shutdown.
  [[noreturn]] void RaiseDeletedOr(const Worker& w, const absl::Status& status,
                                   absl::string_view action,
                                   const CallContext* ctx = nullptr) const {
    if (!handle_.is_owner() && status.code() == absl::StatusCode::kCancelled &&
        w.runtime->rrefs()->Check(handle_).code() == absl::StatusCode::kCancelled) {
      RaiseDeleted(action);
    }
    Raise(status, ctx);
  }

  [[noreturn]] void RaiseDeleted(absl::string_view action) const {
    Raise(absl::FailedPreconditionError(
        absl::StrCat("UserRRef(rref_id=", TorchId(handle_.rref_id()),
                     ", fork_id=", TorchId(handle_.fork_id()), ") has been deleted. ", action)));
  }

  // PyTorch's format: OwnerRRef(GloballyUniqueId(created_on=1, local_id=0)),
  // UserRRef(RRefId = GloballyUniqueId(...), ForkId = GloballyUniqueId(...)).
  std::string Repr() const {
    if (handle_.is_owner()) return absl::StrCat("OwnerRRef(", TorchId(handle_.rref_id()), ")");
    return absl::StrCat("UserRRef(RRefId = ", TorchId(handle_.rref_id()),
                        ", ForkId = ", TorchId(handle_.fork_id()), ")");
  }

 private:
  RRefHandle handle_;
  std::optional<Future<Unit>> profiled_creation_;
};

std::shared_ptr<PyRRef> ReceiveRRef(const py::bytes& descriptor, WorkerId from) {
  std::shared_ptr<Worker> w = RequireWorker();
  RRefDescriptor d = ValueOrRaise(RRefDescriptor::Parse(std::string(descriptor)));
  absl::StatusOr<RRefHandle> h;
  {
    ScopedGilRelease release;
    h = w->runtime->rrefs()->Receive(d, from);
  }
  if (!h.ok()) Raise(h.status());
  return std::make_shared<PyRRef>(*std::move(h));
}

// RRef._deserialize(): the fork that ForkFields made, received from worker `from`.
std::shared_ptr<PyRRef> ReceiveRRefFields(const py::tuple& fields, WorkerId from) {
  if (fields.size() != 7) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("RRef._deserialize: expected the 7 fields RRef._serialize() returns, got ",
                     fields.size())));
  }
  RRefDescriptor d;
  try {
    d.owner = fields[0].cast<WorkerId>();
    d.rref_id = GloballyUniqueId{fields[1].cast<WorkerId>(), fields[2].cast<uint64_t>()};
    d.fork_id = GloballyUniqueId{fields[3].cast<WorkerId>(), fields[4].cast<uint64_t>()};
    d.parent = fields[5].cast<WorkerId>();
    d.type_name = fields[6].cast<std::string>();
  } catch (const py::cast_error&) {
    Raise(absl::InvalidArgumentError(
        "RRef._deserialize: the fields are not what RRef._serialize() returns"));
  }
  // Checked as a descriptor that came over the wire is.
  return ReceiveRRef(py::bytes(d.Serialize()), from);
}

std::shared_ptr<PyRRef> CreateOwnedRRef(py::object value, const std::string& type_name) {
  std::shared_ptr<Worker> w = RequireWorker();
  RRefValue v = MakeOwnedPython(std::move(value), /*is_exception=*/false);
  RRefHandle h;
  {
    ScopedGilRelease release;
    h = w->runtime->rrefs()->CreateOwned(std::move(v), w->self.name, type_name);
  }
  return std::make_shared<PyRRef>(std::move(h));
}

std::shared_ptr<PyRRef> Remote(Prepared p, WorkerId to, double timeout_s,
                               const std::string& type_name) {
  Worker& w = *p.worker;
  CheckDestination(w, to);
  MessageType type = p.kind == Kind::kPython    ? wire::PYTHON_REMOTE_CALL
                     : p.kind == Kind::kBuiltin ? wire::BUILTIN_REMOTE_CALL
                                                : wire::SCRIPT_REMOTE_CALL;
  // The arguments' gradients flow back through the owner's receive function; the value's own
  // history comes with it when a to_here() inside a context fetches it (ToHere above).
  RecordAutograd(p, to);
  std::string bytes = pycall::Serialize(p.payload);
  CreationCallback on_created;
  if (p.profile != nullptr) {
    on_created = [profile = p.profile](absl::string_view reply) {
      absl::StatusOr<pycall::Payload> payload = pycall::Parse(std::string(reply));
      if (payload.ok()) profile->AddRemoteEvents(payload->profiled_events()).IgnoreError();
    };
  }
  absl::StatusOr<RRefHandle> h;
  {
    ScopedGilRelease release;
    h = w.runtime->rrefs()->Remote(to, type, std::move(bytes), std::move(p.buffers),
                                   ToTimeout(timeout_s), w.self.name, type_name,
                                   std::move(on_created));
  }
  if (!h.ok()) Raise(h.status());
  auto rref = std::make_shared<PyRRef>(*std::move(h));
  if (p.profile != nullptr && !rref->is_owner()) {
    ScopedGilRelease release;
    rref->set_profiled_creation(w.runtime->rrefs()->WaitForConfirmations({rref->handle()}));
  }
  return rref;
}

// Calls `callback(None)` once every RRef in `rrefs` is confirmed by its owner, or
// `callback(exception)`; inline if they already are, else later on a pool thread.
void OnConfirmed(const std::vector<std::shared_ptr<PyRRef>>& rrefs, py::object callback) {
  std::shared_ptr<Worker> w = RequireWorker();
  std::vector<RRefHandle> handles;
  for (const auto& r : rrefs) handles.push_back(r->handle());
  Future<Unit> f(nullptr);
  {
    ScopedGilRelease release;
    f = w->runtime->rrefs()->WaitForConfirmations(handles);
  }
  auto deliver = [](const py::object& cb, const absl::StatusOr<Unit>& r) {
    cb(r.ok() ? py::none() : MakeException(r.status(), nullptr));
  };
  if (f.ready()) {
    deliver(callback, f.result());
    return;
  }
  auto target = std::make_shared<PyRef>(std::move(callback));
  // A call handled under the profiler stays profiled when it runs later on another thread: the
  // callback then runs with this thread's state.
  std::optional<at::ThreadLocalState> state;
  if (torch::profiler::impl::profilerEnabled()) state.emplace();
  // So does a call recorded in a distributed autograd context (its nested calls carry it).
  const ContextId context = dist_autograd::CurrentContext();
  f.Then([target, deliver, state, context](const absl::StatusOr<Unit>& r) {
    std::optional<at::ThreadLocalStateGuard> guard;
    if (state.has_value()) guard.emplace(*state);
    dist_autograd::ContextGuard in_context(context);
    Gil gil;
    try {
      deliver(target->get(), r);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("tether: running a call after its RRef arguments were confirmed");
    }
  });
}

}  // namespace

void RegisterRRefBindings(py::module_& m) {
  py::class_<PyRRef, std::shared_ptr<PyRRef>>(m, "RRef", py::dynamic_attr())
      .def(py::init([](py::object value, py::object type_hint) {
             return CreateOwnedRRef(std::move(value), "");
           }),
           py::arg("value"), py::arg("type_hint") = py::none(),
           "Creates an RRef owned by this worker that holds `value`.")
      .def("_owner_id", &PyRRef::owner_id)
      .def("is_owner", &PyRRef::is_owner, "Whether the current worker owns this RRef.")
      .def("owner_name", &PyRRef::owner_name, "The name of the worker that owns this RRef.")
      .def("confirmed_by_owner", &PyRRef::confirmed_by_owner,
           "Whether the owner has confirmed this RRef (always true on the owner).")
      .def("to_here", &PyRRef::ToHere, py::arg("timeout") = -1.0,
           "Blocking: copies the value from the owner and returns it (the value itself on the "
           "owner). `timeout` in seconds; -1: the default RPC timeout; 0: none.")
      .def("local_value", &PyRRef::LocalValue,
           "The value held by the owner; raises on a non-owner.")
      .def("_fork", &PyRRef::Fork, py::arg("to"))
      .def("_fork_fields", &PyRRef::ForkFields, py::arg("to"))
      .def("__repr__", &PyRRef::Repr)
      .def("__str__", &PyRRef::Repr);

  auto remote = [](Prepared p, WorkerId to, double timeout) {
    return Remote(std::move(p), to, timeout, "");
  };
  DefPythonCall(m, "remote_python", remote);
  DefTorchCall(m, "remote_builtin", &PrepareBuiltin, remote);
  DefTorchCall(m, "remote_script", &PrepareScript, remote);
  m.def("create_owned_rref", &CreateOwnedRRef, py::arg("value"), py::arg("type_name") = "");
  m.def("receive_rref", &ReceiveRRef, py::arg("descriptor"), py::arg("sender"));
  m.def("receive_rref_fields", &ReceiveRRefFields, py::arg("fields"), py::arg("sender"));
  m.def("on_confirmed", &OnConfirmed, py::arg("rrefs"), py::arg("callback"));
}

}  // namespace tether
