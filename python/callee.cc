#include "python/callee.h"

#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/agent.h"
#include "core/future.h"
#include "core/rref_context.h"
#include "python/call.pb.h"
#include "python/call_profiling.h"
#include "python/owned_value.h"
#include "python/py_ownership.h"
#include "python/torch_calls.h"

namespace py = pybind11;

namespace tether {
namespace {

std::string WorkerText(const Worker& w) {
  return absl::StrCat("WorkerInfo(id=", w.self.id, ", name=", w.self.name, ")");
}

absl::Status Prefixed(const Worker& w, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat("On ", WorkerText(w), ":\n", s.message()));
}

// Starts profiling a call's handling if its caller or the server-process profiler asks for it
// (null otherwise).
std::shared_ptr<pycall::HandlerProfile> StartProfile(const pycall::Payload& request) {
  return pycall::HandlerProfile::Start(request.has_profiling() ? &request.profiling() : nullptr);
}

// What a remote() creation acknowledges with: the profiled events, if any.
std::string CreationReply(pycall::HandlerProfile* profile) {
  if (profile == nullptr) return "";
  std::string events = profile->Finish();
  if (events.empty()) return "";
  pycall::Payload reply;
  reply.set_profiled_events(std::move(events));
  return pycall::Serialize(reply);
}

// Handed to the Python handler of a Python call (or of a remote() creating an RRef's value);
// answers exactly once: reply() with the pickled result for a call, set_value() with the value
// itself for a remote(). A Responder dropped without an answer (a handler that lost it, an
// async_execution future nobody completes) fails its call instead of leaving the caller to
// its timeout.
class Responder {
 public:
  Responder(std::shared_ptr<IncomingCall> call, std::shared_ptr<Worker> worker, bool async,
            std::shared_ptr<pycall::HandlerProfile> profile, ContextId context)
      : call_(std::move(call)),
        result_(nullptr),
        worker_(std::move(worker)),
        async_(async),
        profile_(std::move(profile)),
        context_(context) {
    if (async_) ++worker_->server_active_async_calls;
  }
  Responder(Future<RRefValue> result, std::shared_ptr<Worker> worker, bool async,
            std::shared_ptr<pycall::HandlerProfile> profile)
      : result_(std::move(result)),
        worker_(std::move(worker)),
        async_(async),
        profile_(std::move(profile)) {
    if (async_) ++worker_->server_active_async_calls;
  }
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;

  // May run inside pybind11_object_dealloc: no GIL release, no throw (py_ownership.h rule 3).
  ~Responder() {
    if (async_) --worker_->server_active_async_calls;
    if (replied_.exchange(true)) return;
    try {
      Answer(absl::InternalError(absl::StrCat(
          "On ", WorkerText(*worker_),
          ":\nthe call's handler was dropped without answering (an async_execution function "
          "whose future was never completed?)")));
    } catch (const std::exception&) {
    }
  }

  bool is_remote() const { return call_ == nullptr; }

  // GIL held on entry.
  void Reply(const py::bytes& pickle, const std::vector<at::Tensor>& tensors, bool is_exception) {
    if (is_remote()) throw std::logic_error("reply() on a remote() responder; use set_value()");
    if (replied_.exchange(true)) throw std::runtime_error("this call was already answered");
    pycall::Payload payload;
    payload.set_pickle(std::string(pickle));
    payload.set_remote_exception(is_exception);
    if (profile_ != nullptr) payload.set_profiled_events(profile_->Finish());
    if (context_ != dist_autograd::kNoContext && worker_->autograd != nullptr && !is_exception) {
      // The context comes from the request, not the thread: an async_execution result is
      // answered from whichever thread completes its future.
      worker_->autograd->RecordOutgoing(context_, call_->caller(), tensors, /*force=*/false,
                                        /*involved_of=*/true, &payload);
    }
    std::vector<Buffer> buffers;
    absl::Status s;
    if (tensors.empty()) {
      s = pycall::AppendTensors(tensors, &payload, &buffers);
    } else {
      ScopedGilRelease release;  // may clone views (torch_calls.h): no Python touched
      s = pycall::AppendTensors(tensors, &payload, &buffers);
    }
    if (!s.ok()) {
      ScopedGilRelease release;
      call_->ReplyError(absl::InvalidArgumentError(
          absl::StrCat("On ", WorkerText(*worker_), ": cannot send the result: ", s.message())));
      return;
    }
    std::string bytes = pycall::Serialize(payload);
    ReleaseGilIfLarge release(bytes, buffers);
    if (is_exception) {
      call_->ReplyRaised(std::move(bytes), std::move(buffers));
    } else {
      call_->Reply(std::move(bytes), std::move(buffers));
    }
  }

  // GIL held on entry.
  void SetValue(py::object value, bool is_exception) {
    if (!is_remote()) throw std::logic_error("set_value() on a call responder; use reply()");
    if (replied_.exchange(true)) throw std::runtime_error("this RRef value was already set");
    RRefValue v = MakeOwnedPython(std::move(value), is_exception);
    ScopedGilRelease release;
    v.creation_reply = CreationReply(profile_.get());
    result_.Set(std::move(v));
  }

  // GIL held on entry. The caller raises RuntimeError with `message`, after "On WorkerInfo(...):"
  // naming this worker if `on_worker` (a handler's own failure); as is otherwise (the text of a
  // failure PyTorch reports without it: an async_execution function's wrong result or failed
  // future).
  void Fail(const std::string& message, bool on_worker) {
    if (replied_.exchange(true)) return;
    if (profile_ != nullptr) profile_->Finish();
    absl::Status error = absl::InternalError(
        on_worker ? absl::StrCat("On ", WorkerText(*worker_), ":\n", message) : message);
    ScopedGilRelease release;
    Answer(error);
  }

 private:
  void Answer(const absl::Status& error) {
    if (is_remote()) {
      result_.Set(error);
    } else {
      call_->ReplyError(error);
    }
  }

  std::shared_ptr<IncomingCall> call_;
  Future<RRefValue> result_;
  std::shared_ptr<Worker> worker_;
  bool async_;
  std::shared_ptr<pycall::HandlerProfile> profile_;
  // The distributed autograd context the request was recorded in (kNoContext: none).
  const ContextId context_ = dist_autograd::kNoContext;
  std::atomic<bool> replied_{false};
};

// A request recorded in a distributed autograd context: joins it and gives the received tensors
// their history. Returns the context the handler runs under (kNoContext: none).
absl::StatusOr<ContextId> RecordRequest(const Worker& w, const pycall::Payload& payload,
                                        WorkerId caller, const std::vector<at::Tensor>& tensors) {
  if (!payload.has_autograd() || w.autograd == nullptr) return dist_autograd::kNoContext;
  return w.autograd->RecordIncoming(payload.autograd(), caller, tensors, /*request=*/true);
}

void ReplyStatus(const Worker& w, IncomingCall& call, const absl::Status& s) {
  call.ReplyError(Prefixed(w, s));
}

// Runs the Python hook for a call or a remote() (GIL taken here).
void RunPythonHook(std::shared_ptr<Responder> responder, const pycall::Payload& payload,
                   const std::vector<at::Tensor>& tensors, WorkerId caller,
                   pycall::HandlerProfile* profile, ContextId context) {
  {
    // Nested calls the function makes carry the caller's context.
    dist_autograd::ContextGuard in_context(context);
    Gil gil;
    try {
      py::object hook = py::reinterpret_borrow<py::object>(GetHooks().run_python_call);
      hook(responder, py::bytes(payload.pickle()), py::cast(tensors), payload.async_execution(),
           caller);
    } catch (py::error_already_set& e) {
      responder->Fail(e.what(), /*on_worker=*/true);
    } catch (const std::exception& e) {
      responder->Fail(e.what(), /*on_worker=*/true);
    }
  }
  if (profile != nullptr) profile->LeaveThread();
}

void HandlePythonCall(Worker* w, std::shared_ptr<IncomingCall> call) {
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(call->request().envelope.payload());
  if (!payload.ok()) return ReplyStatus(*w, *call, payload.status());
  const bool copy = call->caller() == w->self.id;
  absl::StatusOr<std::vector<at::Tensor>> tensors =
      pycall::TakeTensors(*payload, call->request().buffers, copy);
  if (!tensors.ok()) return ReplyStatus(*w, *call, tensors.status());
  WorkerId caller = call->caller();
  absl::StatusOr<ContextId> recorded = RecordRequest(*w, *payload, caller, *tensors);
  if (!recorded.ok()) return ReplyStatus(*w, *call, recorded.status());
  const ContextId context = *recorded;
  std::shared_ptr<pycall::HandlerProfile> profile = StartProfile(*payload);
  auto responder = std::make_shared<Responder>(std::move(call), w->shared_from_this(),
                                               payload->async_execution(), profile, context);
  RunPythonHook(std::move(responder), *payload, *tensors, caller, profile.get(), context);
}

// Runs a builtin (`script` false) or TorchScript call without the GIL, profiled if asked
// (`*profile` is then the started profile, its thread part over).
// `*context` is the distributed autograd context the request was recorded in (kNoContext: none);
// the call runs under it.
absl::StatusOr<c10::IValue> RunTorchCall(Worker* w, bool script, const std::string& bytes,
                                         const std::vector<Buffer>& buffers, WorkerId caller,
                                         bool copy,
                                         std::shared_ptr<pycall::HandlerProfile>* profile,
                                         ContextId* context) {
  *context = dist_autograd::kNoContext;
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(bytes);
  if (!payload.ok()) return payload.status();
  *profile = StartProfile(*payload);
  absl::Status recorded;
  pycall::OnTensors record = [&](const std::vector<at::Tensor>& tensors) {
    absl::StatusOr<ContextId> joined = RecordRequest(*w, *payload, caller, tensors);
    if (!joined.ok()) recorded = joined.status();
    *context = joined.value_or(dist_autograd::kNoContext);
    dist_autograd::SetCurrentContext(*context);
  };
  const ContextId previous = dist_autograd::CurrentContext();
  absl::StatusOr<c10::IValue> result =
      script ? pycall::RunScriptCall(*w->cu, *payload, buffers, copy, record)
             : pycall::RunBuiltinCall(*payload, buffers, copy, record);
  dist_autograd::SetCurrentContext(previous);
  if (*profile != nullptr) (*profile)->LeaveThread();
  if (!recorded.ok()) return recorded;  // bad autograd metadata: the result is not returned
  return result;
}

void HandleTorchCall(Worker* w, bool script, std::shared_ptr<IncomingCall> call) {
  std::shared_ptr<pycall::HandlerProfile> profile;
  ContextId context;
  absl::StatusOr<c10::IValue> result =
      RunTorchCall(w, script, call->request().envelope.payload(), call->request().buffers,
                   call->caller(), call->caller() == w->self.id, &profile, &context);
  if (!result.ok()) return ReplyStatus(*w, *call, result.status());
  pycall::Payload reply;
  reply.set_torchscript_value(true);
  if (profile != nullptr) reply.set_profiled_events(profile->Finish());
  std::vector<Buffer> buffers;
  std::vector<at::Tensor> sent;
  absl::Status s = pycall::EncodeIValue(*result, &reply, &buffers, &sent);
  if (!s.ok()) return ReplyStatus(*w, *call, s);
  if (context != dist_autograd::kNoContext && w->autograd != nullptr) {
    w->autograd->RecordOutgoing(context, call->caller(), sent, /*force=*/false,
                                /*involved_of=*/true, &reply);
  }
  call->Reply(pycall::Serialize(reply), std::move(buffers));
}

Future<RRefValue> RunPythonRemote(Worker* w, RemoteRequest request) {
  Future<RRefValue> out(w->runtime->executor());
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(request.payload);
  if (!payload.ok()) {
    out.Set(Prefixed(*w, payload.status()));
    return out;
  }
  absl::StatusOr<std::vector<at::Tensor>> tensors =
      pycall::TakeTensors(*payload, request.buffers, request.caller == w->self.id);
  if (!tensors.ok()) {
    out.Set(Prefixed(*w, tensors.status()));
    return out;
  }
  absl::StatusOr<ContextId> recorded = RecordRequest(*w, *payload, request.caller, *tensors);
  if (!recorded.ok()) {
    out.Set(Prefixed(*w, recorded.status()));
    return out;
  }
  const ContextId context = *recorded;
  std::shared_ptr<pycall::HandlerProfile> profile = StartProfile(*payload);
  auto responder =
      std::make_shared<Responder>(out, w->shared_from_this(), payload->async_execution(), profile);
  RunPythonHook(std::move(responder), *payload, *tensors, request.caller, profile.get(), context);
  return out;
}

Future<RRefValue> RunTorchRemote(Worker* w, bool script, RemoteRequest request) {
  Future<RRefValue> out(w->runtime->executor());
  std::shared_ptr<pycall::HandlerProfile> profile;
  ContextId context;
  absl::StatusOr<c10::IValue> result =
      RunTorchCall(w, script, request.payload, request.buffers, request.caller,
                   request.caller == w->self.id, &profile, &context);
  if (!result.ok()) {
    out.Set(Prefixed(*w, result.status()));
    return out;
  }
  auto owned = std::make_shared<OwnedValue>();
  owned->ivalue = *std::move(result);
  RRefValue value = MakeOwned(std::move(owned));
  value.creation_reply = CreationReply(profile.get());
  out.Set(std::move(value));
  return out;
}

}  // namespace

void InstallCallee(Worker* w) {
  Agent* agent = w->runtime->agent();
  agent->RegisterHandler(wire::PYTHON_CALL, [w](std::shared_ptr<IncomingCall> c) {
    HandlePythonCall(w, std::move(c));
  });
  agent->RegisterHandler(wire::BUILTIN_CALL, [w](std::shared_ptr<IncomingCall> c) {
    HandleTorchCall(w, /*script=*/false, std::move(c));
  });
  agent->RegisterHandler(wire::SCRIPT_CALL, [w](std::shared_ptr<IncomingCall> c) {
    HandleTorchCall(w, /*script=*/true, std::move(c));
  });
  RRefContext* rrefs = w->runtime->rrefs();
  rrefs->SetRemoteRunner(wire::PYTHON_REMOTE_CALL,
                         [w](RemoteRequest r) { return RunPythonRemote(w, std::move(r)); });
  rrefs->SetRemoteRunner(wire::BUILTIN_REMOTE_CALL, [w](RemoteRequest r) {
    return RunTorchRemote(w, /*script=*/false, std::move(r));
  });
  rrefs->SetRemoteRunner(wire::SCRIPT_REMOTE_CALL, [w](RemoteRequest r) {
    return RunTorchRemote(w, /*script=*/true, std::move(r));
  });
}

void RegisterCalleeBindings(py::module_& m) {
  py::class_<Responder, std::shared_ptr<Responder>>(m, "Responder")
      .def_property_readonly("is_remote", &Responder::is_remote)
      .def("reply", &Responder::Reply, py::arg("pickle"), py::arg("tensors"),
           py::arg("is_exception"))
      .def("set_value", &Responder::SetValue, py::arg("value"), py::arg("is_exception"))
      .def("fail", &Responder::Fail, py::arg("message"), py::arg("on_worker") = true);
}

}  // namespace tether
