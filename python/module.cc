// tether._C: the pybind11 extension behind tether.rpc. It is thin: it converts
// between Python and the call layer (python/torch_calls.h) and forwards to the
// agent (core/agent.h) that a Runtime (python/runtime.h) owns. Pickling of
// Python calls happens in tether/rpc/internal.py; this module moves the pickle
// and the tensors (out of band) and runs builtin operators and TorchScript
// functions on the callee without the GIL.
//
// GIL discipline: released around every wait and every call into the agent or
// the runtime; taken on pool threads only to run Python (a Python call's
// handler, delivering a result into a torch.futures.Future). Blocking waits
// poll for signals so Ctrl-C interrupts them.
//
// Errors: every absl::Status becomes a Python exception in one place,
// MakeException().
#include <Python.h>
// clang-format off
#include <ATen/ThreadLocalState.h>
// clang-format on
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/jit/python/python_ivalue.h>
#include <torch/csrc/profiler/api.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "core/future.h"
#include "core/rref_context.h"
#include "python/call.pb.h"
#include "python/call_profiling.h"
#include "python/runtime.h"
#include "python/sim_bindings.h"
#include "python/torch_calls.h"

namespace py = pybind11;

namespace tether {
namespace {

// ---------------------------------------------------------------------------------------------
// Python objects this module keeps: set once by tether.rpc at import, never
// released (they live as long as the interpreter).
struct Hooks {
  // (responder, pickle: bytes, tensors: list, async_execution: bool, caller:
  // int) -> None; must end with responder.reply(...) / set_value(...) exactly
  // once, now or later.
  PyObject* run_python_call = nullptr;
  // (pickle: bytes, tensors: list, is_exception: bool, sender: int) -> value;
  // raises the remote exception.
  PyObject* decode_reply = nullptr;
  // (value, is_exception) -> (pickle: bytes, tensors: list): an RRef's value
  // for a fetch.
  PyObject* serialize_value = nullptr;
  // The exception class that is both TimeoutError and RuntimeError.
  PyObject* timeout_error = nullptr;
};
Hooks g_hooks;

// A Python reference that may be dropped on a pool thread (takes the GIL to do
// so).
class PyRef {
 public:
  explicit PyRef(py::object o) : obj_(o.release().ptr()) {}
  ~PyRef() {
    if (obj_ == nullptr || !Py_IsInitialized() || _Py_IsFinalizing()) return;
    py::gil_scoped_acquire gil;
    Py_DECREF(obj_);
  }
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  py::object get() const { return py::reinterpret_borrow<py::object>(obj_); }

 private:
  PyObject* obj_;
};

// GIL acquisition that records its wait when profiling is on
// (enable_gil_profiling).
std::atomic<bool> g_gil_profiling{false};
std::atomic<int64_t> g_gil_wait_ns{0};
std::atomic<int64_t> g_gil_acquisitions{0};

class ProfiledGil {
 public:
  ProfiledGil() {
    if (!g_gil_profiling.load(std::memory_order_relaxed)) {
      gil_.emplace();
      return;
    }
    auto start = std::chrono::steady_clock::now();
    gil_.emplace();
    auto waited = std::chrono::steady_clock::now() - start;
    g_gil_wait_ns +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count();
    ++g_gil_acquisitions;
  }

 private:
  std::optional<py::gil_scoped_acquire> gil_;
};

// ---------------------------------------------------------------------------------------------
// Statuses become Python exceptions here, and only here.
struct CallContext {
  WorkerId to = -1;
  std::string to_name;
  absl::Duration timeout = absl::ZeroDuration();
};

py::object MakeException(const absl::Status& status, const CallContext* ctx) {
  std::string detail(status.message());
  PyObject* type = PyExc_RuntimeError;
  std::string text;
  switch (status.code()) {
    case absl::StatusCode::kDeadlineExceeded:
      type = g_hooks.timeout_error != nullptr ? g_hooks.timeout_error
                                              : PyExc_TimeoutError;
      if (detail.find("RPC ran for more than") != std::string::npos) {
        text = ctx != nullptr ? absl::StrCat(detail, " (call to worker '",
                                             ctx->to_name, "')")
                              : detail;
      } else if (ctx != nullptr) {
        text = absl::StrCat("RPC ran for more than set timeout (",
                            absl::ToInt64Milliseconds(ctx->timeout),
                            " ms) and will now be marked with an error (",
                            detail, ")");
      } else {
        text = absl::StrCat(
            "RPC ran for more than set timeout and will now be marked with an "
            "error (",
            detail, ")");
      }
      break;
    case absl::StatusCode::kCancelled:
      text = absl::StrCat("RPC is shut down: ", detail);
      break;
    case absl::StatusCode::kUnavailable:
      text = ctx != nullptr ? absl::StrCat("RPC to worker '", ctx->to_name,
                                           "' failed: ", detail)
                            : detail;
      break;
    default:
      text = detail;
      break;
  }
  py::object cls = py::reinterpret_borrow<py::object>(type);
  return cls(text);
}

[[noreturn]] void Raise(const absl::Status& status,
                        const CallContext* ctx = nullptr) {
  py::object exc = MakeException(status, ctx);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

template <typename T>
T ValueOrRaise(absl::StatusOr<T> s) {
  if (!s.ok()) Raise(s.status());
  return *std::move(s);
}

// ---------------------------------------------------------------------------------------------
// The live worker.
enum class Kind { kPython, kBuiltin, kScript };

struct Worker {
  std::unique_ptr<Runtime> runtime;
  std::shared_ptr<torch::jit::CompilationUnit> cu;
  WorkerInfo self;
  std::atomic<int64_t> server_active_async_calls{0};
};

absl::Mutex g_mu;
std::shared_ptr<Worker> g_worker ABSL_GUARDED_BY(g_mu);

std::shared_ptr<Worker> CurrentWorker() {
  absl::MutexLock lock(&g_mu);
  return g_worker;
}

std::shared_ptr<Worker> RequireWorker() {
  std::shared_ptr<Worker> w = CurrentWorker();
  if (w == nullptr) {
    throw std::runtime_error(
        "RPC has not been initialized. Call tether.rpc.init_rpc first.");
  }
  return w;
}

std::optional<absl::Duration> ToTimeout(double seconds) {
  if (seconds < 0)
    return std::nullopt;  // UNSET_RPC_TIMEOUT (-1): the agent's default.
  return absl::Seconds(seconds);  // 0: no timeout.
}

// Waits for `future` with the GIL released, checking for signals so Ctrl-C
// interrupts. `deadline` bounds the wait (InfiniteFuture: none); returns
// whether the future completed.
template <typename T>
bool WaitInterruptibly(const Future<T>& future,
                       absl::Time deadline = absl::InfiniteFuture()) {
  if (InSimulatedWorker()) {
    // Yield to the simulator; the deadline counts in the worker's virtual time.
    absl::Time sim_deadline =
        deadline == absl::InfiniteFuture()
            ? absl::InfiniteFuture()
            : SimWorkerClock()->Now() + (deadline - absl::Now());
    std::string where = "waiting for an RPC result";
    try {
      where = py::module_::import("tether.sim._child")
                  .attr("_where")(where)
                  .cast<std::string>();
    } catch (const py::error_already_set&) {
    }
    py::gil_scoped_release release;
    return SimWaitUntil([&future] { return future.ready(); }, sim_deadline,
                        where);
  }
  while (true) {
    bool done;
    {
      py::gil_scoped_release release;
      absl::Duration step =
          std::min(absl::Milliseconds(100), deadline - absl::Now());
      done = future.WaitFor(std::max(step, absl::ZeroDuration()));
    }
    if (done) return true;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (absl::Now() >= deadline) return false;
  }
}

// ---------------------------------------------------------------------------------------------
// RRef values. An owner keeps the Python object itself (or the TorchScript
// value of a builtin or script call); it is serialized only when another worker
// fetches it, so unpicklable values can live in RRefs and be used through rpc
// proxies.
struct OwnedValue {
  std::unique_ptr<PyRef> py;  // The Python value, or a remote-exception record.
  bool is_exception = false;
  std::optional<c10::IValue> ivalue;
};

RRefValue MakeOwned(std::shared_ptr<OwnedValue> value) {
  RRefValue v;
  v.object = std::shared_ptr<const void>(std::move(value));
  return v;
}

const OwnedValue* AsOwned(const RRefValue& v) {
  return static_cast<const OwnedValue*>(v.object.get());
}

// The RRef context's serializer: what a fetch of an owner value sends.
absl::StatusOr<RRefValue> SerializeOwned(const RRefValue& v) {
  const OwnedValue* owned = AsOwned(v);
  if (owned == nullptr) return v;
  pycall::Payload payload;
  std::vector<Buffer> buffers;
  if (owned->ivalue.has_value()) {
    payload.set_torchscript_value(true);
    absl::Status s = pycall::EncodeIValue(*owned->ivalue, &payload, &buffers);
    if (!s.ok()) return s;
  } else {
    std::vector<at::Tensor> tensors;
    {
      ProfiledGil gil;
      try {
        py::object hook =
            py::reinterpret_borrow<py::object>(g_hooks.serialize_value);
        py::tuple r = hook(owned->py->get(), owned->is_exception);
        payload.set_pickle(std::string(r[0].cast<py::bytes>()));
        tensors = r[1].cast<std::vector<at::Tensor>>();
      } catch (py::error_already_set& e) {
        return absl::InvalidArgumentError(
            absl::StrCat("cannot serialize the RRef's value: ", e.what()));
      }
    }
    payload.set_remote_exception(owned->is_exception);
    absl::Status s = pycall::AppendTensors(tensors, &payload, &buffers);
    if (!s.ok()) return s;
  }
  RRefValue out;
  out.payload = pycall::Serialize(payload);
  out.buffers = std::move(buffers);
  return out;
}

// GIL held. An RRef value as a Python object; raises a stored remote exception.
py::object ValueToPython(const RRefValue& v, WorkerId sender, bool copy) {
  if (const OwnedValue* owned = AsOwned(v)) {
    if (owned->ivalue.has_value())
      return torch::jit::toPyObject(*owned->ivalue);
    if (owned->is_exception) {
      owned->py->get().attr("reraise")();
      throw std::logic_error("remote exception record did not raise");
    }
    return owned->py->get();
  }
  pycall::Payload payload = ValueOrRaise(pycall::Parse(v.payload));
  if (payload.torchscript_value()) {
    return torch::jit::toPyObject(
        ValueOrRaise(pycall::DecodeIValue(payload, v.buffers, copy)));
  }
  std::vector<at::Tensor> tensors =
      ValueOrRaise(pycall::TakeTensors(payload, v.buffers, copy));
  py::object hook = py::reinterpret_borrow<py::object>(g_hooks.decode_reply);
  return hook(py::bytes(payload.pickle()), py::cast(tensors),
              payload.remote_exception(), sender);
}

// ---------------------------------------------------------------------------------------------
// Callee side.

// Releases the GIL only around sends big enough that writing them may take a
// while. A small send only queues or writes a few bytes; releasing the GIL
// there would hand it to any thread waiting for it (a pool thread delivering
// results) and cost two context switches per call under load. Only for agent
// calls: RRef-context calls always release it (the context may hold its lock
// while it waits for the GIL).
class ReleaseGilIfLarge {
 public:
  static constexpr size_t kLargeSend = 256 << 10;
  ReleaseGilIfLarge(const std::string& bytes,
                    const std::vector<Buffer>& buffers) {
    size_t total = bytes.size();
    for (const Buffer& b : buffers) total += b.size();
    if (total > kLargeSend) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

// Starts profiling a call's handling if its caller or the server-process
// profiler asks for it (null otherwise).
std::shared_ptr<pycall::HandlerProfile> StartProfile(
    const pycall::Payload& request) {
  return pycall::HandlerProfile::Start(
      request.has_profiling() ? &request.profiling() : nullptr);
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

// Handed to the Python handler of a Python call (or of a remote() creating an
// RRef's value); answers exactly once: reply() with the pickled result for a
// call, set_value() with the value itself for a remote().
class Responder {
 public:
  Responder(std::shared_ptr<IncomingCall> call, Worker* worker, bool async,
            std::shared_ptr<pycall::HandlerProfile> profile)
      : call_(std::move(call)),
        result_(nullptr),
        worker_(worker),
        async_(async),
        profile_(std::move(profile)) {
    if (async_) ++worker_->server_active_async_calls;
  }
  Responder(Future<RRefValue> result, Worker* worker, bool async,
            std::shared_ptr<pycall::HandlerProfile> profile)
      : result_(std::move(result)),
        worker_(worker),
        async_(async),
        profile_(std::move(profile)) {
    if (async_) ++worker_->server_active_async_calls;
  }
  ~Responder() {
    if (async_) --worker_->server_active_async_calls;
  }

  bool is_remote() const { return call_ == nullptr; }

  // GIL held on entry.
  void Reply(const py::bytes& pickle, const std::vector<at::Tensor>& tensors,
             bool is_exception) {
    if (is_remote())
      throw std::logic_error(
          "reply() on a remote() responder; use set_value()");
    if (replied_.exchange(true))
      throw std::runtime_error("this call was already answered");
    pycall::Payload payload;
    payload.set_pickle(std::string(pickle));
    payload.set_remote_exception(is_exception);
    if (profile_ != nullptr) payload.set_profiled_events(profile_->Finish());
    std::vector<Buffer> buffers;
    absl::Status s = pycall::AppendTensors(tensors, &payload, &buffers);
    if (!s.ok()) {
      py::gil_scoped_release release;
      call_->ReplyError(absl::InvalidArgumentError(absl::StrCat(
          "On ", WorkerText(), ": cannot send the result: ", s.message())));
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
    if (!is_remote())
      throw std::logic_error("set_value() on a call responder; use reply()");
    if (replied_.exchange(true))
      throw std::runtime_error("this RRef value was already set");
    auto owned = std::make_shared<OwnedValue>();
    owned->py = std::make_unique<PyRef>(std::move(value));
    owned->is_exception = is_exception;
    RRefValue v = MakeOwned(std::move(owned));
    py::gil_scoped_release release;
    v.creation_reply = CreationReply(profile_.get());
    result_.Set(std::move(v));
  }

  void Fail(const std::string& message) {
    if (replied_.exchange(true)) return;
    if (profile_ != nullptr) profile_->Finish();
    absl::Status error =
        absl::InternalError(absl::StrCat("On ", WorkerText(), ":\n", message));
    py::gil_scoped_release release;
    if (is_remote()) {
      result_.Set(error);
    } else {
      call_->ReplyError(error);
    }
  }

  std::string WorkerText() const {
    return absl::StrCat("WorkerInfo(id=", worker_->self.id,
                        ", name=", worker_->self.name, ")");
  }

 private:
  std::shared_ptr<IncomingCall> call_;
  Future<RRefValue> result_;
  Worker* worker_;
  bool async_;
  std::shared_ptr<pycall::HandlerProfile> profile_;
  std::atomic<bool> replied_{false};
};

void ReplyStatus(Worker* w, IncomingCall& call, const absl::Status& s) {
  call.ReplyError(absl::Status(
      s.code(), absl::StrCat("On WorkerInfo(id=", w->self.id,
                             ", name=", w->self.name, "):\n", s.message())));
}

absl::Status Prefixed(Worker* w, const absl::Status& s) {
  return absl::Status(
      s.code(), absl::StrCat("On WorkerInfo(id=", w->self.id,
                             ", name=", w->self.name, "):\n", s.message()));
}

// Runs the Python hook for a call or a remote() (GIL taken here).
void RunPythonHook(Worker* w, std::shared_ptr<Responder> responder,
                   const pycall::Payload& payload,
                   const std::vector<at::Tensor>& tensors, WorkerId caller,
                   pycall::HandlerProfile* profile) {
  {
    ProfiledGil gil;
    try {
      py::object hook =
          py::reinterpret_borrow<py::object>(g_hooks.run_python_call);
      hook(responder, py::bytes(payload.pickle()), py::cast(tensors),
           payload.async_execution(), caller);
    } catch (py::error_already_set& e) {
      responder->Fail(e.what());
    } catch (const std::exception& e) {
      responder->Fail(e.what());
    }
  }
  if (profile != nullptr) profile->LeaveThread();
}

void HandlePythonCall(Worker* w, std::shared_ptr<IncomingCall> call) {
  absl::StatusOr<pycall::Payload> payload =
      pycall::Parse(call->request().envelope.payload());
  if (!payload.ok()) return ReplyStatus(w, *call, payload.status());
  const bool copy = call->caller() == w->self.id;
  absl::StatusOr<std::vector<at::Tensor>> tensors =
      pycall::TakeTensors(*payload, call->request().buffers, copy);
  if (!tensors.ok()) return ReplyStatus(w, *call, tensors.status());
  WorkerId caller = call->caller();
  std::shared_ptr<pycall::HandlerProfile> profile = StartProfile(*payload);
  auto responder = std::make_shared<Responder>(
      std::move(call), w, payload->async_execution(), profile);
  RunPythonHook(w, std::move(responder), *payload, *tensors, caller,
                profile.get());
}

// Runs a builtin (`script` false) or TorchScript call without the GIL, profiled
// if asked (`*profile` is then the started profile, its thread part over).
absl::StatusOr<c10::IValue> RunTorchCall(
    Worker* w, bool script, const std::string& bytes,
    const std::vector<Buffer>& buffers, bool copy,
    std::shared_ptr<pycall::HandlerProfile>* profile) {
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(bytes);
  if (!payload.ok()) return payload.status();
  *profile = StartProfile(*payload);
  absl::StatusOr<c10::IValue> result =
      script ? pycall::RunScriptCall(*w->cu, *payload, buffers, copy)
             : pycall::RunBuiltinCall(*payload, buffers, copy);
  if (*profile != nullptr) (*profile)->LeaveThread();
  return result;
}

void HandleTorchCall(Worker* w, bool script,
                     std::shared_ptr<IncomingCall> call) {
  std::shared_ptr<pycall::HandlerProfile> profile;
  absl::StatusOr<c10::IValue> result = RunTorchCall(
      w, script, call->request().envelope.payload(), call->request().buffers,
      call->caller() == w->self.id, &profile);
  if (!result.ok()) return ReplyStatus(w, *call, result.status());
  pycall::Payload reply;
  reply.set_torchscript_value(true);
  if (profile != nullptr) reply.set_profiled_events(profile->Finish());
  std::vector<Buffer> buffers;
  absl::Status s = pycall::EncodeIValue(*result, &reply, &buffers);
  if (!s.ok()) return ReplyStatus(w, *call, s);
  call->Reply(pycall::Serialize(reply), std::move(buffers));
}

Future<RRefValue> RunPythonRemote(Worker* w, RemoteRequest request) {
  Future<RRefValue> out(w->runtime->executor());
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(request.payload);
  if (!payload.ok()) {
    out.Set(Prefixed(w, payload.status()));
    return out;
  }
  absl::StatusOr<std::vector<at::Tensor>> tensors = pycall::TakeTensors(
      *payload, request.buffers, request.caller == w->self.id);
  if (!tensors.ok()) {
    out.Set(Prefixed(w, tensors.status()));
    return out;
  }
  std::shared_ptr<pycall::HandlerProfile> profile = StartProfile(*payload);
  auto responder =
      std::make_shared<Responder>(out, w, payload->async_execution(), profile);
  RunPythonHook(w, std::move(responder), *payload, *tensors, request.caller,
                profile.get());
  return out;
}

Future<RRefValue> RunTorchRemote(Worker* w, bool script,
                                 RemoteRequest request) {
  Future<RRefValue> out(w->runtime->executor());
  std::shared_ptr<pycall::HandlerProfile> profile;
  absl::StatusOr<c10::IValue> result =
      RunTorchCall(w, script, request.payload, request.buffers,
                   request.caller == w->self.id, &profile);
  if (!result.ok()) {
    out.Set(Prefixed(w, result.status()));
    return out;
  }
  auto owned = std::make_shared<OwnedValue>();
  owned->ivalue = *std::move(result);
  RRefValue value = MakeOwned(std::move(owned));
  value.creation_reply = CreationReply(profile.get());
  out.Set(std::move(value));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Caller side.

// A reply decoded as far as possible without the GIL.
struct Decoded {
  absl::Status status;
  pycall::Payload payload;
  std::vector<at::Tensor> tensors;
  c10::IValue value;
};

// `profile`: the caller's profile if the call was profiled; the callee's
// events are added to it here, before the call's result is delivered.
Decoded Decode(const absl::StatusOr<Message>& reply, bool copy,
               const pycall::CallerProfile* profile) {
  Decoded d;
  if (!reply.ok()) {
    d.status = reply.status();
    return d;
  }
  absl::StatusOr<pycall::Payload> payload =
      pycall::Parse(reply->envelope.payload());
  if (!payload.ok()) {
    d.status = payload.status();
    return d;
  }
  d.payload = *std::move(payload);
  if (profile != nullptr) {
    // Malformed events cost the profile, never the call's result.
    profile->AddRemoteEvents(d.payload.profiled_events()).IgnoreError();
  }
  if (!d.payload.torchscript_value()) {
    absl::StatusOr<std::vector<at::Tensor>> tensors =
        pycall::TakeTensors(d.payload, reply->buffers, copy);
    if (!tensors.ok()) {
      d.status = tensors.status();
    } else {
      d.tensors = *std::move(tensors);
    }
  } else {
    absl::StatusOr<c10::IValue> value =
        pycall::DecodeIValue(d.payload, reply->buffers, copy);
    if (!value.ok()) {
      d.status = value.status();
    } else {
      d.value = *std::move(value);
    }
  }
  return d;
}

// GIL held. Returns the value or throws error_already_set (remote or local
// error).
py::object ToPython(Decoded& d, const CallContext& ctx) {
  if (!d.status.ok()) Raise(d.status, &ctx);
  if (d.payload.torchscript_value())
    return torch::jit::toPyObject(std::move(d.value));
  py::object hook = py::reinterpret_borrow<py::object>(g_hooks.decode_reply);
  return hook(py::bytes(d.payload.pickle()), py::cast(d.tensors),
              d.payload.remote_exception(), ctx.to);
}

// An outstanding call made from Python.
class Pending {
 public:
  Pending(Future<Message> future, CallContext ctx, bool copy,
          std::shared_ptr<const pycall::CallerProfile> profile)
      : future_(std::move(future)),
        ctx_(std::move(ctx)),
        copy_(copy),
        profile_(std::move(profile)) {}

  bool done() const { return future_.ready(); }

  // Blocks (interruptibly) until the reply has arrived.
  void WaitDone() { WaitInterruptibly(future_); }

  // Blocks (interruptibly) and returns the result or raises.
  py::object Wait() {
    WaitInterruptibly(future_);
    Decoded d;
    {
      py::gil_scoped_release release;
      d = Decode(future_.result(), copy_, profile_.get());
    }
    return ToPython(d, ctx_);
  }

  // Completes the torch.futures.Future `fut` with the result (set_result) or
  // the error (set_exception) once the reply arrives. The delivery runs on a
  // pool thread.
  void DeliverTo(py::object fut);

 private:
  Future<Message> future_;
  CallContext ctx_;
  bool copy_;
  std::shared_ptr<const pycall::CallerProfile> profile_;
};

// Completions of rpc_async futures, delivered in batches: whichever pool thread
// finds no delivery in progress takes the GIL once and completes every future
// whose reply has arrived meanwhile; the others only queue theirs (decoded
// without the GIL) and return. Under load this replaces one GIL acquisition per
// reply (a convoy of pool threads) with one per batch.
class DeliveryQueue {
 public:
  struct Item {
    std::shared_ptr<PyRef> target;
    Decoded decoded;
    CallContext ctx;
  };

  void Push(Item item) {
    {
      absl::MutexLock lock(&mu_);
      items_.push_back(std::move(item));
      if (draining_) return;
      draining_ = true;
    }
    while (true) {
      std::vector<Item> batch;
      {
        absl::MutexLock lock(&mu_);
        if (items_.empty()) {
          draining_ = false;
          return;
        }
        batch.swap(items_);
      }
      ProfiledGil gil;
      for (Item& it : batch) Deliver(it);
      batch.clear();  // Drops the Python references with the GIL held.
    }
  }

 private:
  static void Deliver(Item& it) {
    py::object f = it.target->get();
    try {
      py::object value = ToPython(it.decoded, it.ctx);
      // Complete the future directly: torch's set_result() releases the GIL
      // around it, which would hand the GIL to a waiting thread in the middle
      // of the batch.
      std::shared_ptr<torch::jit::PythonFutureWrapper> wrapper;
      try {
        wrapper = py::cast<std::shared_ptr<torch::jit::PythonFutureWrapper>>(f);
      } catch (const py::cast_error&) {
      }
      if (wrapper != nullptr) {
        wrapper->fut->markCompleted(c10::IValue(
            c10::ivalue::ConcretePyObjectHolder::create(std::move(value))));
      } else {
        f.attr("set_result")(value);
      }
    } catch (py::error_already_set& e) {
      try {
        f.attr("set_exception")(e.value());
      } catch (py::error_already_set& e2) {
        e2.discard_as_unraisable(
            "tether: delivering an RPC error into its future");
      }
    }
  }

  absl::Mutex mu_;
  std::vector<Item> items_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

DeliveryQueue* g_deliveries =
    new DeliveryQueue();  // Never freed: pool threads may use it late.

void Pending::DeliverTo(py::object fut) {
  auto target = std::make_shared<PyRef>(std::move(fut));
  CallContext ctx = ctx_;
  bool copy = copy_;
  std::shared_ptr<const pycall::CallerProfile> profile = profile_;
  future_.Then(
      [target, ctx, copy, profile](const absl::StatusOr<Message>& reply) {
        g_deliveries->Push(DeliveryQueue::Item{
            target, Decode(reply, copy, profile.get()), ctx});
      });
}

CallContext MakeContext(Worker& w, WorkerId to,
                        std::optional<absl::Duration> timeout) {
  CallContext ctx;
  ctx.to = to;
  absl::StatusOr<WorkerInfo> info = w.runtime->agent()->GetWorker(to);
  ctx.to_name = info.ok() ? info->name : absl::StrCat("#", to);
  ctx.timeout = timeout.value_or(w.runtime->agent()->default_timeout());
  return ctx;
}

void CheckDestination(Worker& w, WorkerId to) {
  if (!w.runtime->agent()->GetWorker(to).ok()) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("name:", w.self.name, ",rank:", w.self.id,
                     " could not find destination id ", to)));
  }
}

// A prepared call: its payload and buffers, ready for a call or a remote().
struct Prepared {
  std::shared_ptr<Worker> worker;
  Kind kind = Kind::kPython;
  pycall::Payload payload;
  std::vector<Buffer> buffers;
  std::shared_ptr<const pycall::CallerProfile> profile;
};

// Asks the callee to profile the call if this thread's legacy profiler is on;
// `key` names the call in the profile ("rpc_sync#f(worker0 -> worker1)"; empty:
// never profile).
Prepared Profiled(Prepared p, const std::string& key) {
  if (key.empty()) return p;
  p.profile = pycall::CallerProfile::Capture(key);
  if (p.profile != nullptr)
    *p.payload.mutable_profiling() = p.profile->request();
  return p;
}

Prepared PreparePython(const py::bytes& pickle,
                       const std::vector<at::Tensor>& tensors,
                       bool async_execution) {
  Prepared p;
  p.worker = RequireWorker();
  p.payload.set_pickle(std::string(pickle));
  p.payload.set_async_execution(async_execution);
  absl::Status s = pycall::AppendTensors(tensors, &p.payload, &p.buffers);
  if (!s.ok()) Raise(s);
  return p;
}

Prepared PrepareBuiltin(const std::string& qualified_name,
                        const py::tuple& args, const py::dict& kwargs) {
  Prepared p;
  p.worker = RequireWorker();
  p.kind = Kind::kBuiltin;
  c10::Symbol symbol = c10::Symbol::fromQualString(qualified_name);
  std::string errors;
  std::shared_ptr<torch::jit::Operator> chosen;
  torch::jit::Stack stack;
  py::kwargs kw = py::reinterpret_borrow<py::kwargs>(kwargs);
  for (const std::shared_ptr<torch::jit::Operator>& op :
       torch::jit::getAllOperatorsFor(symbol)) {
    try {
      stack = torch::jit::createStackForSchema(op->schema(), args, kw,
                                               c10::nullopt);
      chosen = op;
      break;
    } catch (const std::exception& e) {
      absl::StrAppend(&errors, e.what(), "\n");
    }
  }
  if (chosen == nullptr) {
    throw std::runtime_error(
        absl::StrCat("Failed to match operator ", qualified_name,
                     " to the given arguments:\n", errors));
  }
  absl::Status s = pycall::EncodeBuiltinCall(chosen->schema().name(),
                                             chosen->schema().overload_name(),
                                             stack, &p.payload, &p.buffers);
  if (!s.ok()) Raise(s);
  return p;
}

Prepared PrepareScript(const std::string& qualified_name, const py::tuple& args,
                       const py::dict& kwargs) {
  Prepared p;
  p.worker = RequireWorker();
  p.kind = Kind::kScript;
  torch::jit::Function* fn =
      p.worker->cu->find_function(c10::QualifiedName(qualified_name));
  if (fn == nullptr) {
    throw std::runtime_error(
        absl::StrCat("no TorchScript function named '", qualified_name, "'"));
  }
  py::kwargs kw = py::reinterpret_borrow<py::kwargs>(kwargs);
  torch::jit::Stack stack =
      torch::jit::createStackForSchema(fn->getSchema(), args, kw, c10::nullopt);
  absl::Status s =
      pycall::EncodeScriptCall(qualified_name, stack, &p.payload, &p.buffers);
  if (!s.ok()) Raise(s);
  return p;
}

std::shared_ptr<Pending> Send(Prepared p, WorkerId to, double timeout_s) {
  Worker& w = *p.worker;
  CheckDestination(w, to);
  MessageType type = p.kind == Kind::kPython    ? wire::PYTHON_CALL
                     : p.kind == Kind::kBuiltin ? wire::BUILTIN_CALL
                                                : wire::SCRIPT_CALL;
  std::optional<absl::Duration> timeout = ToTimeout(timeout_s);
  CallContext ctx = MakeContext(w, to, timeout);
  std::string bytes = pycall::Serialize(p.payload);
  Future<Message> future(nullptr);
  {
    ReleaseGilIfLarge release(bytes, p.buffers);
    future = w.runtime->agent()->Call(to, type, std::move(bytes),
                                      std::move(p.buffers), timeout);
  }
  return std::make_shared<Pending>(std::move(future), std::move(ctx),
                                   to == w.self.id, std::move(p.profile));
}

// ---------------------------------------------------------------------------------------------
// RRefs as Python sees them (tether.rpc.RRef).
class PyRRef {
 public:
  explicit PyRRef(RRefHandle handle) : handle_(std::move(handle)) {}
  ~PyRRef() {
    // Dropping a handle may take the RRef context's lock, which a pool thread
    // may hold while it waits for the GIL (serializing a value): never hold the
    // GIL here.
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release release;
      handle_ = RRefHandle();
    }
  }

  const RRefHandle& handle() const { return handle_; }
  int owner_id() const { return handle_.owner(); }
  bool is_owner() const { return handle_.is_owner(); }

  std::string owner_name() const {
    std::shared_ptr<Worker> w = RequireWorker();
    absl::StatusOr<WorkerInfo> info =
        w->runtime->agent()->GetWorker(handle_.owner());
    if (!info.ok()) Raise(info.status());
    return info->name;
  }

  bool confirmed_by_owner() const {
    std::shared_ptr<Worker> w = RequireWorker();
    if (handle_.is_owner()) return true;
    py::gil_scoped_release release;
    Future<Unit> f = w->runtime->rrefs()->WaitForConfirmations({handle_});
    return f.ready() && f.result().ok();
  }

  py::object ToHere(double timeout_s) const {
    std::shared_ptr<Worker> w = RequireWorker();
    std::optional<absl::Duration> timeout = ToTimeout(timeout_s);
    CallContext ctx = MakeContext(*w, handle_.owner(), timeout);
    Future<RRefValue> f(nullptr);
    {
      py::gil_scoped_release release;
      f = w->runtime->rrefs()->ToHere(handle_, timeout);
    }
    WaitInterruptibly(f);
    // A profiled remote(): its creation reply carries the callee's operators;
    // let it be processed before the value is returned (and the profile ends).
    // (The owner sends that reply before it serves the value: a short wait.)
    const absl::StatusOr<RRefValue>& v = f.result();
    if (v.ok() && profiled_creation_.has_value())
      WaitInterruptibly(*profiled_creation_);
    if (!v.ok()) Raise(v.status(), &ctx);
    return ValueToPython(*v, handle_.owner(), handle_.owner() == w->self.id);
  }

  // For a profiled remote() (user handle): to_here() also waits for `acked`.
  void set_profiled_creation(Future<Unit> acked) {
    profiled_creation_.emplace(std::move(acked));
  }

  py::object LocalValue() const {
    if (!handle_.is_owner()) {
      throw std::runtime_error(
          absl::StrCat("Cannot call local_value() on a non-local reference. "
                       "Call it on the owner (worker id ",
                       handle_.owner(), ")."));
    }
    return ToHere(0);
  }

  // The descriptor that travels in place of this RRef to worker `to`.
  py::bytes Fork(WorkerId to) const {
    std::shared_ptr<Worker> w = RequireWorker();
    absl::StatusOr<RRefDescriptor> d;
    {
      py::gil_scoped_release release;
      d = w->runtime->rrefs()->Fork(handle_, to);
    }
    if (!d.ok()) Raise(d.status());
    return py::bytes(d->Serialize());
  }

  std::string Repr() const {
    if (handle_.is_owner()) {
      return absl::StrCat("OwnerRRef(", handle_.rref_id().ToString(), ")");
    }
    return absl::StrCat("UserRRef(RRefId = ", handle_.rref_id().ToString(),
                        ", ForkId = ", handle_.fork_id().ToString(), ")");
  }

 private:
  RRefHandle handle_;
  std::optional<Future<Unit>> profiled_creation_;
};

std::shared_ptr<PyRRef> ReceiveRRef(const py::bytes& descriptor,
                                    WorkerId from) {
  std::shared_ptr<Worker> w = RequireWorker();
  RRefDescriptor d =
      ValueOrRaise(RRefDescriptor::Parse(std::string(descriptor)));
  absl::StatusOr<RRefHandle> h;
  {
    py::gil_scoped_release release;
    h = w->runtime->rrefs()->Receive(d, from);
  }
  if (!h.ok()) Raise(h.status());
  return std::make_shared<PyRRef>(*std::move(h));
}

std::shared_ptr<PyRRef> CreateOwnedRRef(py::object value,
                                        const std::string& type_name) {
  std::shared_ptr<Worker> w = RequireWorker();
  auto owned = std::make_shared<OwnedValue>();
  owned->py = std::make_unique<PyRef>(std::move(value));
  RRefValue v = MakeOwned(std::move(owned));
  py::gil_scoped_release release;
  return std::make_shared<PyRRef>(
      w->runtime->rrefs()->CreateOwned(std::move(v), w->self.name, type_name));
}

std::shared_ptr<PyRRef> Remote(Prepared p, WorkerId to, double timeout_s,
                               const std::string& type_name) {
  Worker& w = *p.worker;
  CheckDestination(w, to);
  MessageType type = p.kind == Kind::kPython    ? wire::PYTHON_REMOTE_CALL
                     : p.kind == Kind::kBuiltin ? wire::BUILTIN_REMOTE_CALL
                                                : wire::SCRIPT_REMOTE_CALL;
  std::string bytes = pycall::Serialize(p.payload);
  CreationCallback on_created;
  if (p.profile != nullptr) {
    on_created = [profile = p.profile](absl::string_view reply) {
      absl::StatusOr<pycall::Payload> payload =
          pycall::Parse(std::string(reply));
      if (payload.ok())
        profile->AddRemoteEvents(payload->profiled_events()).IgnoreError();
    };
  }
  absl::StatusOr<RRefHandle> h;
  {
    py::gil_scoped_release release;
    h = w.runtime->rrefs()->Remote(
        to, type, std::move(bytes), std::move(p.buffers), ToTimeout(timeout_s),
        w.self.name, type_name, std::move(on_created));
  }
  if (!h.ok()) Raise(h.status());
  auto rref = std::make_shared<PyRRef>(*std::move(h));
  if (p.profile != nullptr && !rref->is_owner()) {
    py::gil_scoped_release release;
    rref->set_profiled_creation(
        w.runtime->rrefs()->WaitForConfirmations({rref->handle()}));
  }
  return rref;
}

// Calls `callback(None)` once every RRef in `rrefs` is confirmed by its owner,
// or `callback(exception)`; inline if they already are, else later on a pool
// thread.
void OnConfirmed(const std::vector<std::shared_ptr<PyRRef>>& rrefs,
                 py::object callback) {
  std::shared_ptr<Worker> w = RequireWorker();
  std::vector<RRefHandle> handles;
  for (const auto& r : rrefs) handles.push_back(r->handle());
  Future<Unit> f(nullptr);
  {
    py::gil_scoped_release release;
    f = w->runtime->rrefs()->WaitForConfirmations(handles);
  }
  auto deliver = [](py::object cb, const absl::StatusOr<Unit>& r) {
    cb(r.ok() ? py::none() : MakeException(r.status(), nullptr));
  };
  if (f.ready()) {
    deliver(callback, f.result());
    return;
  }
  auto target = std::make_shared<PyRef>(std::move(callback));
  // A call handled under the profiler stays profiled when it runs later on
  // another thread: the callback then runs with this thread's state.
  std::optional<at::ThreadLocalState> state;
  if (torch::profiler::impl::profilerEnabled()) state.emplace();
  f.Then([target, deliver, state](const absl::StatusOr<Unit>& r) {
    std::optional<at::ThreadLocalStateGuard> guard;
    if (state.has_value()) guard.emplace(*state);
    ProfiledGil gil;
    try {
      deliver(target->get(), r);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable(
          "tether: running a call after its RRef arguments were confirmed");
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Life cycle: Listen (bind; the Python layer publishes the address through the
// rendezvous store), then Connect (agent, RRef context, handlers, start).
std::unique_ptr<Runtime>
    g_listening;  // Between Listen and Connect; guarded by the GIL.

std::vector<std::pair<std::string, int>> Workers(const Worker& w) {
  std::vector<std::pair<std::string, int>> out;
  for (const WorkerInfo& info : w.runtime->agent()->workers())
    out.emplace_back(info.name, info.id);
  return out;
}

std::string Listen(const std::string& name, int rank, int num_worker_threads,
                   double rpc_timeout, const std::string& auth_token,
                   const std::string& listen_host) {
  if (CurrentWorker() != nullptr || g_listening != nullptr) {
    throw std::runtime_error("RPC is already initialized");
  }
  if (g_hooks.run_python_call == nullptr) {
    throw std::runtime_error(
        "tether._C is used before tether.rpc installed its hooks");
  }
  RuntimeOptions options;
  options.name = name;
  options.rank = rank;
  options.num_worker_threads = num_worker_threads;
  options.rpc_timeout =
      rpc_timeout <= 0 ? absl::ZeroDuration() : absl::Seconds(rpc_timeout);
  options.auth_token = auth_token;
  options.listen_host = listen_host;
  options.rref_options.serializer = SerializeOwned;
  absl::StatusOr<std::unique_ptr<Runtime>> runtime;
  {
    py::gil_scoped_release release;
    runtime = Runtime::Listen(options);
  }
  if (!runtime.ok()) Raise(runtime.status());
  g_listening = *std::move(runtime);
  return g_listening->address();
}

// Inside tether.sim: the rendezvous goes through the simulator's host. Returns
// every worker's (name, id, address); the addresses are empty.
std::vector<std::tuple<std::string, int, std::string>> SimListen(
    const std::string& name, int rank, int world_size, int num_worker_threads,
    double rpc_timeout) {
  if (CurrentWorker() != nullptr || g_listening != nullptr) {
    throw std::runtime_error("RPC is already initialized");
  }
  if (!InSimulatedWorker()) {
    throw std::runtime_error("sim_listen outside a tether.sim worker");
  }
  RuntimeOptions options;
  options.name = name;
  options.rank = rank;
  options.num_worker_threads = num_worker_threads;
  options.rpc_timeout =
      rpc_timeout <= 0 ? absl::ZeroDuration() : absl::Seconds(rpc_timeout);
  options.rref_options.serializer = SerializeOwned;
  // Protocol bugs planted on purpose (tether.sim's own tests): never in real
  // runs.
  if (const char* plant = std::getenv("TETHER_SIM_PLANTED_RREF_BUGS")) {
    std::string bugs = plant;
    options.rref_options.bugs.skip_child_wait =
        bugs.find("skip_child_wait") != std::string::npos;
    options.rref_options.bugs.forget_idempotence =
        bugs.find("forget_idempotence") != std::string::npos;
    options.rref_options.bugs.free_on_first_delete =
        bugs.find("free_on_first_delete") != std::string::npos;
    options.rref_options.bugs.forget_user_delete =
        bugs.find("forget_user_delete") != std::string::npos;
  }
  py::module_ c = py::module_::import("tether._C");
  std::vector<std::string> names =
      c.attr("sim_register")(name).cast<std::vector<std::string>>();
  if (static_cast<int>(names.size()) != world_size) {
    throw std::runtime_error(absl::StrCat("world_size is ", world_size,
                                          " but the simulation has ",
                                          names.size(), " workers"));
  }
  SetSimWorkerThreads(num_worker_threads);
  absl::StatusOr<std::unique_ptr<Runtime>> runtime = Runtime::ForSimulation(
      options, SimWorkerClock(), SimWorkerExecutor(), SimWorkerNetwork());
  if (!runtime.ok()) Raise(runtime.status());
  g_listening = *std::move(runtime);
  std::vector<std::tuple<std::string, int, std::string>> workers;
  for (int i = 0; i < static_cast<int>(names.size()); ++i)
    workers.emplace_back(names[i], i, "");
  return workers;
}

void AbandonListen() {
  std::unique_ptr<Runtime> rt = std::move(g_listening);
  py::gil_scoped_release release;
  rt.reset();
}

// `workers`: (name, id, address) for every worker, this one included.
std::vector<std::pair<std::string, int>> Connect(
    const std::vector<std::tuple<std::string, int, std::string>>& workers) {
  if (g_listening == nullptr) throw std::runtime_error("listen() first");
  std::unique_ptr<Runtime> runtime = std::move(g_listening);
  auto worker = std::make_shared<Worker>();
  worker->cu = torch::jit::get_python_cu();
  std::vector<WorkerInfo> infos;
  std::map<WorkerId, std::string> addresses;
  absl::Status s;
  {
    py::gil_scoped_release release;
    for (const auto& [name, id, address] : workers) {
      infos.push_back(WorkerInfo{name, id});
      if (address != runtime->address()) addresses[id] = address;
    }
    s = runtime->Connect(infos, addresses);
  }
  if (!s.ok()) {
    py::gil_scoped_release release;
    runtime.reset();
  }
  if (!s.ok()) Raise(s);
  worker->runtime = std::move(runtime);
  worker->self = worker->runtime->agent()->self();
  pycall::SetNodeId(worker->self.id);  // profiled events carry the worker id
  Worker* w = worker.get();
  Agent* agent = w->runtime->agent();
  agent->RegisterHandler(wire::PYTHON_CALL,
                         [w](std::shared_ptr<IncomingCall> c) {
                           HandlePythonCall(w, std::move(c));
                         });
  agent->RegisterHandler(wire::BUILTIN_CALL,
                         [w](std::shared_ptr<IncomingCall> c) {
                           HandleTorchCall(w, /*script=*/false, std::move(c));
                         });
  agent->RegisterHandler(wire::SCRIPT_CALL,
                         [w](std::shared_ptr<IncomingCall> c) {
                           HandleTorchCall(w, /*script=*/true, std::move(c));
                         });
  RRefContext* rrefs = w->runtime->rrefs();
  rrefs->SetRemoteRunner(wire::PYTHON_REMOTE_CALL, [w](RemoteRequest r) {
    return RunPythonRemote(w, std::move(r));
  });
  rrefs->SetRemoteRunner(wire::BUILTIN_REMOTE_CALL, [w](RemoteRequest r) {
    return RunTorchRemote(w, /*script=*/false, std::move(r));
  });
  rrefs->SetRemoteRunner(wire::SCRIPT_REMOTE_CALL, [w](RemoteRequest r) {
    return RunTorchRemote(w, /*script=*/true, std::move(r));
  });
  {
    py::gil_scoped_release release;
    s = w->runtime->Start();
    if (!s.ok()) worker->runtime.reset();
  }
  if (!s.ok()) Raise(s);
  {
    absl::MutexLock lock(&g_mu);
    g_worker = worker;
  }
  return Workers(*worker);
}

// Stops the worker: deletes this worker's user RRefs, then the graceful barrier
// (everything bounded by `timeout` seconds if > 0), or stops at once; then the
// network and the threads. Raises if a graceful shutdown could not complete.
void Shutdown(bool graceful, double timeout) {
  std::shared_ptr<Worker> w = RequireWorker();
  absl::Time deadline = timeout > 0 ? absl::Now() + absl::Seconds(timeout)
                                    : absl::InfiniteFuture();
  absl::Status status;
  if (graceful) {
    Future<Unit> deleted(nullptr);
    {
      py::gil_scoped_release release;
      deleted = w->runtime->rrefs()->DeleteAllUsersAndUnforkedOwners(
          timeout > 0 ? absl::Seconds(timeout) : absl::Seconds(60));
    }
    WaitInterruptibly(deleted);
    status = deleted.result().status();
  }
  Future<Unit> done(nullptr);
  {
    py::gil_scoped_release release;
    done = w->runtime->agent()->Shutdown(graceful);
  }
  bool finished = WaitInterruptibly(done, deadline);
  absl::Status barrier =
      finished ? done.result().status()
               : absl::DeadlineExceededError(absl::StrCat(
                     "the graceful shutdown barrier did not complete within ",
                     timeout, " s"));
  if (status.ok()) status = barrier;
  if (graceful && finished && status.ok()) {
    // After a clean graceful shutdown no reference may remain (a leak).
    std::vector<LeakedRRef> leaks = w->runtime->rrefs()->Leaks();
    if (!leaks.empty()) {
      std::string text = absl::StrCat(
          "RRef leak on worker '", w->self.name, "': ", leaks.size(),
          " reference(s) alive after a graceful shutdown:");
      for (const LeakedRRef& l : leaks)
        absl::StrAppend(&text, "\n  ", l.ToString());
      if (InSimulatedWorker()) {
        status = absl::DataLossError(text);
      } else {
        PySys_WriteStderr("tether: %s\n", text.substr(0, 4000).c_str());
      }
    }
  }
  {
    absl::MutexLock lock(&g_mu);
    g_worker.reset();
  }
  {
    py::gil_scoped_release release;
    w->runtime.reset();
  }
  if (!status.ok() && graceful) {
    throw std::runtime_error(
        absl::StrCat("RPC shutdown was not graceful: ", status.message()));
  }
}

py::dict ToDict(const std::map<std::string, int64_t>& info,
                const std::string& prefix) {
  py::dict out;
  for (const auto& [key, value] : info) {
    out[py::str(prefix + key)] = py::str(std::to_string(value));
  }
  return out;
}

py::dict AgentDebugInfo() {
  std::shared_ptr<Worker> w = RequireWorker();
  std::map<std::string, int64_t> info;
  {
    py::gil_scoped_release release;
    info = w->runtime->agent()->GetDebugInfo();
  }
  info["server_active_async_calls"] = w->server_active_async_calls.load();
  info["thread_pool_size"] = w->runtime->num_worker_threads();
  if (g_gil_profiling.load()) {
    int64_t n = g_gil_acquisitions.load();
    info["gil_average_wait_time_us"] =
        n == 0 ? 0 : g_gil_wait_ns.load() / n / 1000;
  }
  return ToDict(info, "agent.");
}

py::dict RRefDebugInfo() {
  std::shared_ptr<Worker> w = RequireWorker();
  std::map<std::string, int64_t> info;
  {
    py::gil_scoped_release release;
    info = w->runtime->rrefs()->GetDebugInfo();
  }
  return ToDict(info, "");
}

// Binds `name`(to, pickle, tensors, timeout, async_execution, profiling_key):
// a Python call, sent by `send` (a call or a remote()).
template <typename SendFn>
void DefPythonCall(py::module_& m, const char* name, SendFn send) {
  m.def(
      name,
      [send](WorkerId to, const py::bytes& pickle,
             const std::vector<at::Tensor>& tensors, double timeout,
             bool async_execution, const std::string& profiling_key) {
        return send(Profiled(PreparePython(pickle, tensors, async_execution),
                             profiling_key),
                    to, timeout);
      },
      py::arg("to"), py::arg("pickle"), py::arg("tensors"), py::arg("timeout"),
      py::arg("async_execution"), py::arg("profiling_key") = "");
}

// Binds `name`(to, qualified_name, args, kwargs, timeout, profiling_key): a
// builtin-operator or TorchScript call made by `prepare`, sent by `send`.
template <typename PrepareFn, typename SendFn>
void DefTorchCall(py::module_& m, const char* name, PrepareFn prepare,
                  SendFn send) {
  m.def(
      name,
      [prepare, send](WorkerId to, const std::string& qualified_name,
                      const py::tuple& args, const py::dict& kwargs,
                      double timeout, const std::string& profiling_key) {
        return send(
            Profiled(prepare(qualified_name, args, kwargs), profiling_key), to,
            timeout);
      },
      py::arg("to"), py::arg("qualified_name"), py::arg("args"),
      py::arg("kwargs"), py::arg("timeout"), py::arg("profiling_key") = "");
}

}  // namespace
}  // namespace tether

PYBIND11_MODULE(_C, m) {
  using namespace tether;
  // Debian's Abseil tracks every Mutex in a lock graph to detect deadlocks (a
  // debug feature that costs a graph update per lock): off in the extension.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  m.doc() =
      "Tether's extension: the RPC engine behind tether.rpc (see "
      "python/module.cc).";

  m.def(
      "_set_hooks",
      [](py::object run_python_call, py::object decode_reply,
         py::object serialize_value, py::object timeout_error) {
        g_hooks.run_python_call = run_python_call.release().ptr();
        g_hooks.decode_reply = decode_reply.release().ptr();
        g_hooks.serialize_value = serialize_value.release().ptr();
        g_hooks.timeout_error = timeout_error.release().ptr();
      },
      "Installs tether.rpc's Python hooks (once, at import).");

  py::class_<Responder, std::shared_ptr<Responder>>(m, "Responder")
      .def_property_readonly("is_remote", &Responder::is_remote)
      .def("reply", &Responder::Reply, py::arg("pickle"), py::arg("tensors"),
           py::arg("is_exception"))
      .def("set_value", &Responder::SetValue, py::arg("value"),
           py::arg("is_exception"))
      .def("fail", &Responder::Fail);

  py::class_<Pending, std::shared_ptr<Pending>>(m, "Pending")
      .def("wait", &Pending::Wait)
      .def("done", &Pending::done)
      .def("wait_done", &Pending::WaitDone)
      .def("deliver_to", &Pending::DeliverTo);

  py::class_<PyRRef, std::shared_ptr<PyRRef>>(m, "RRef", py::dynamic_attr())
      .def(py::init([](py::object value, py::object type_hint) {
             return CreateOwnedRRef(std::move(value), "");
           }),
           py::arg("value"), py::arg("type_hint") = py::none(),
           "Creates an RRef owned by this worker that holds `value`.")
      .def("_owner_id", &PyRRef::owner_id)
      .def("is_owner", &PyRRef::is_owner,
           "Whether the current worker owns this RRef.")
      .def("owner_name", &PyRRef::owner_name,
           "The name of the worker that owns this RRef.")
      .def("confirmed_by_owner", &PyRRef::confirmed_by_owner,
           "Whether the owner has confirmed this RRef (always true on the "
           "owner).")
      .def(
          "to_here", &PyRRef::ToHere, py::arg("timeout") = -1.0,
          "Blocking: copies the value from the owner and returns it (the value "
          "itself on the "
          "owner). `timeout` in seconds; -1: the default RPC timeout; 0: none.")
      .def("local_value", &PyRRef::LocalValue,
           "The value held by the owner; raises on a non-owner.")
      .def("_fork", &PyRRef::Fork, py::arg("to"))
      .def("__repr__", &PyRRef::Repr)
      .def("__str__", &PyRRef::Repr);

  m.def("listen", &Listen, py::arg("name"), py::arg("rank"),
        py::arg("num_worker_threads"), py::arg("rpc_timeout"),
        py::arg("auth_token"), py::arg("listen_host"));
  m.def("abandon_listen", &AbandonListen);
  m.def("sim_listen", &SimListen, py::arg("name"), py::arg("rank"),
        py::arg("world_size"), py::arg("num_worker_threads"),
        py::arg("rpc_timeout"));
  RegisterSimBindings(m);
  m.def("connect", &Connect, py::arg("workers"));
  m.def("shutdown", &Shutdown, py::arg("graceful"), py::arg("timeout"));
  m.def("is_initialized", [] { return CurrentWorker() != nullptr; });
  m.def("workers", [] { return Workers(*RequireWorker()); });
  m.def("self_id", [] { return RequireWorker()->self.id; });

  auto call = [](Prepared p, WorkerId to, double timeout) {
    return Send(std::move(p), to, timeout);
  };
  auto remote = [](Prepared p, WorkerId to, double timeout) {
    return Remote(std::move(p), to, timeout, "");
  };
  DefPythonCall(m, "send_python", call);
  DefPythonCall(m, "remote_python", remote);
  DefTorchCall(m, "send_builtin", &PrepareBuiltin, call);
  DefTorchCall(m, "send_script", &PrepareScript, call);
  DefTorchCall(m, "remote_builtin", &PrepareBuiltin, remote);
  DefTorchCall(m, "remote_script", &PrepareScript, remote);
  m.def("create_owned_rref", &CreateOwnedRRef, py::arg("value"),
        py::arg("type_name") = "");
  m.def("receive_rref", &ReceiveRRef, py::arg("descriptor"), py::arg("sender"));
  m.def("on_confirmed", &OnConfirmed, py::arg("rrefs"), py::arg("callback"));

  m.def("get_rpc_timeout", [] {
    return absl::ToDoubleSeconds(
        RequireWorker()->runtime->agent()->default_timeout());
  });
  m.def("set_rpc_timeout", [](double seconds) {
    RequireWorker()->runtime->agent()->set_default_timeout(
        seconds <= 0 ? absl::ZeroDuration() : absl::Seconds(seconds));
  });
  m.def("agent_debug_info", &AgentDebugInfo);
  m.def("agent_summary", [] {
    std::shared_ptr<Worker> w = RequireWorker();
    py::gil_scoped_release release;
    return w->runtime->agent()->Summary();
  });
  m.def("rref_debug_info", &RRefDebugInfo);
  m.def(
      "enable_server_process_global_profiler",
      [](const torch::profiler::impl::ProfilerConfig& config) {
        pycall::EnableServerProfiler(config);
      },
      py::arg("config"));
  m.def("disable_server_process_global_profiler",
        [] { return ValueOrRaise(pycall::DisableServerProfiler()); });
  m.def("enable_gil_profiling", [](bool on) { g_gil_profiling = on; });
}
