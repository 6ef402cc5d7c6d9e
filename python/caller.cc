#include "python/caller.h"

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/jit/python/python_ivalue.h>

#include <functional>
#include <stdexcept>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/agent.h"
#include "core/future.h"
#include "python/py_ownership.h"
#include "python/torch_calls.h"
#include "python/wait.h"

namespace py = pybind11;

namespace tether {
namespace {

// A reply decoded as far as possible without the GIL.
struct Decoded {
  absl::Status status;
  pycall::Payload payload;
  std::vector<at::Tensor> tensors;
  c10::IValue value;
};

// Where a reply to a call recorded in a distributed autograd context is recorded.
struct ReplyRecording {
  std::shared_ptr<dist_autograd::LocalAutograd> autograd;  // null: the call was not recorded
  WorkerId from = -1;
  ContextId context = dist_autograd::kNoContext;  // the call's

  // kInvalidArgument if the reply names another context than the call's.
  absl::Status Record(const pycall::Payload& payload,
                      const std::vector<at::Tensor>& tensors) const {
    if (autograd == nullptr || !payload.has_autograd()) return absl::OkStatus();
    return autograd->RecordReply(context, payload.autograd(), from, tensors);
  }
};

// `profile`: the caller's profile if the call was profiled; the callee's events are added to it
// here, before the call's result is delivered. `recording`: the reply's autograd recording.
Decoded Decode(const absl::StatusOr<Message>& reply, bool copy,
               const pycall::CallerProfile* profile, const ReplyRecording& recording) {
  Decoded d;
  if (!reply.ok()) {
    d.status = reply.status();
    return d;
  }
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(reply->envelope.payload());
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
      d.status = recording.Record(d.payload, d.tensors);
    }
  } else {
    absl::Status recorded;
    absl::StatusOr<c10::IValue> value = pycall::DecodeIValue(
        d.payload, reply->buffers, copy,
        [&](const std::vector<at::Tensor>& t) { recorded = recording.Record(d.payload, t); });
    if (!value.ok()) {
      d.status = value.status();
    } else if (!recorded.ok()) {
      d.status = recorded;
    } else {
      d.value = *std::move(value);
    }
  }
  return d;
}

// GIL held. Returns the value or throws error_already_set (remote or local error).
py::object ToPython(Decoded& d, const CallContext& ctx) {
  CheckGilHeld("ToPython");
  if (!d.status.ok()) Raise(d.status, &ctx);
  if (d.payload.torchscript_value()) return torch::jit::toPyObject(std::move(d.value));
  py::object hook = py::reinterpret_borrow<py::object>(GetHooks().decode_reply);
  try {
    return hook(py::bytes(d.payload.pickle()), py::cast(d.tensors), d.payload.remote_exception(),
                ctx.to);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_Exception)) throw;  // Ctrl-C while decoding stays itself
    std::rethrow_exception(RemoteErrorAsTorch(e));
  }
}

// GIL held. A torch future's error that torch's futures raise as the Python exception `exc`
// itself (its type and message), as often as they are waited on.
std::exception_ptr AsFutureError(py::handle exc) {
  CheckGilHeld("AsFutureError");
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  python_error error;
  error.persist();
  return std::make_exception_ptr(std::move(error));
}

c10::intrusive_ptr<c10::ivalue::Future> TorchFuture(const py::handle& fut) {
  return py::cast<std::shared_ptr<torch::jit::PythonFutureWrapper>>(fut)->fut;
}

// GIL held. Completes `fut` (a torch future) with the error `exc` as an error of the future
// (torch.futures.Future.set_exception stores it as a value that wait() raises, which
// torch.futures.collect_all / wait_all do not see as a failure).
void SetFutureError(const py::handle& fut, const py::handle& exc) {
  if (!PyExceptionInstance_Check(exc.ptr())) {
    throw py::type_error(
        absl::StrCat("set_future_error: exc must be an exception instance, got ",
                     std::string(py::str(py::type::handle_of(exc).attr("__name__")))));
  }
  TorchFuture(fut)->setError(AsFutureError(exc));
}

// GIL held. Completes `fut` as `source` (complete) is: its value or its very error. Does nothing
// if `fut` is complete already.
void CompleteFutureLike(const py::handle& fut, const py::handle& source) {
  c10::intrusive_ptr<c10::ivalue::Future> out = TorchFuture(fut);
  c10::intrusive_ptr<c10::ivalue::Future> src = TorchFuture(source);
  if (out->completed()) return;
  if (!src->completed()) {
    throw py::value_error("complete_future_like: the source future is not complete");
  }
  if (src->hasError()) {
    out->setError(src->exception_ptr());
  } else {
    out->markCompleted(src->value());
  }
}

// The text of the error `fut` (a complete torch future) carries, or nothing if it has a value
// (one set by set_exception() included).
std::optional<std::string> FutureErrorText(const py::handle& fut) {
  c10::intrusive_ptr<c10::ivalue::Future> f = TorchFuture(fut);
  if (!f->completed() || !f->hasError()) return std::nullopt;
  return f->tryRetrieveErrorMessage();
}

// One rpc_async result on its way into its torch future. It is delivered exactly once, by
// whichever comes first: the delivery queue, or a wait() on that future (which must not depend
// on a queue that a blocked done-callback of another future may hold up). The reply is decoded
// once (the decode also adds the callee's profiling events).
class Delivery {
 public:
  // `target`: a torch.futures.Future (raises TypeError otherwise). GIL held.
  Delivery(const py::object& target, CallContext ctx)
      : target_(TorchFuture(target)), ctx_(std::move(ctx)) {}

  // A pool thread, the reply in: decodes it (no GIL) unless a wait() already took it. Returns
  // whether it is now ready for the queue.
  bool Prepare(const std::function<Decoded()>& decode) {
    {
      absl::MutexLock lock(&mu_);
      if (state_ != kWaiting) return false;
      state_ = kDecoding;
    }
    Decoded d = decode();
    absl::MutexLock lock(&mu_);
    decoded_ = std::move(d);
    state_ = kReady;
    return true;
  }

  // GIL held; from the queue, after Prepare(). Completes the target unless a wait() took the
  // delivery first.
  void CompleteFromQueue() {
    Decoded d;
    {
      absl::MutexLock lock(&mu_);
      if (state_ != kReady) return;
      d = std::move(decoded_);
      state_ = kTaken;
    }
    Deliver(d, /*from_wait=*/false);
  }

  // GIL held (released while it waits for a decode in progress, and while it decodes); from a
  // wait() once the reply is in. Completes the target unless the queue took the delivery first;
  // `decode` decodes the reply if no pool thread has started to.
  void CompleteNow(const std::function<Decoded()>& decode) {
    Decoded d;
    {
      ScopedGilRelease release;
      bool decode_here;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](State* s) { return *s != kDecoding; }, &state_));
        if (state_ == kTaken) return;
        decode_here = state_ == kWaiting;
        if (!decode_here) d = std::move(decoded_);
        state_ = kTaken;
      }
      if (decode_here) d = decode();
    }
    Deliver(d, /*from_wait=*/true);
  }

 private:
  enum State { kWaiting, kDecoding, kReady, kTaken };

  // GIL held. The result or the error goes into the future unless the user completed it
  // already (theirs stands); an error as an error of the future (so torch.futures.collect_all
  // and wait_all fail at once), converted as PyTorch converts it for a remote exception
  // (RemoteErrorAsTorch), as its Python exception (RpcTimeoutError, ...) for Tether's own. Never
  // throws, except, from a wait() (`from_wait`), the Ctrl-C that interrupted the result's
  // decoding on that thread: the future then gets an error saying the result was lost. What
  // cannot be delivered is reported as unraisable.
  void Deliver(Decoded& d, bool from_wait) {
    std::optional<py::error_already_set> interrupt;
    try {
      py::object value;
      std::exception_ptr error;
      try {
        value = ToPython(d, ctx_);
      } catch (py::error_already_set& e) {
        if (e.matches(PyExc_Exception)) {
          error = AsFutureError(e.value());
        } else {
          error = std::make_exception_ptr(
              std::runtime_error(absl::StrCat("the result of the RPC to worker '", ctx_.to_name,
                                              "' was lost: its decoding was interrupted")));
          if (from_wait) interrupt.emplace(std::move(e));
        }
      } catch (const std::exception&) {
        error = std::current_exception();
      }
      if (target_->completed()) {
        // The user's result stands.
      } else if (error) {
        target_->setError(error);
      } else {
        // Completed directly (GIL held): torch's set_result() releases the GIL around it, which
        // would hand the GIL to a waiting thread in the middle of the batch.
        target_->markCompleted(
            c10::IValue(c10::ivalue::ConcretePyObjectHolder::create(std::move(value))));
      }
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("tether: delivering an RPC result into its future");
    } catch (const std::exception& e) {
      PyErr_SetString(
          PyExc_RuntimeError,
          absl::StrCat("tether: delivering an RPC result into its future: ", e.what()).c_str());
      PyErr_WriteUnraisable(nullptr);
    }
    if (!target_->completed()) {
      // Delivery itself failed (reported above): no wait() may block on this future for ever.
      target_->setError(std::make_exception_ptr(std::runtime_error(absl::StrCat(
          "the result of the RPC to worker '", ctx_.to_name, "' could not be delivered"))));
    }
    // The future's value may hold Python objects: dropped here, GIL held.
    target_.reset();
    if (interrupt) throw std::move(*interrupt);
  }

  c10::intrusive_ptr<c10::ivalue::Future> target_;  // Dropped once delivered (GIL held).
  const CallContext ctx_;
  absl::Mutex mu_;
  State state_ ABSL_GUARDED_BY(mu_) = kWaiting;
  Decoded decoded_ ABSL_GUARDED_BY(mu_);
};

// Completions of rpc_async futures, delivered in batches: whichever pool thread finds no
// delivery in progress takes the GIL once and completes every future whose reply has arrived
// meanwhile; the others only queue theirs (decoded without the GIL) and return. Under load this
// replaces one GIL acquisition per reply (a convoy of pool threads) with one per batch. A
// done-callback that blocks holds the rest of the batch up, but never a wait() on one of these
// futures (Delivery).
class DeliveryQueue {
 public:
  void Push(std::shared_ptr<Delivery> delivery) {
    {
      absl::MutexLock lock(&mu_);
      items_.push_back(std::move(delivery));
      if (draining_) return;
      draining_ = true;
    }
    while (true) {
      std::vector<std::shared_ptr<Delivery>> batch;
      {
        absl::MutexLock lock(&mu_);
        if (items_.empty()) {
          draining_ = false;
          return;
        }
        batch.swap(items_);
      }
      Gil gil;
      for (std::shared_ptr<Delivery>& d : batch) d->CompleteFromQueue();
      batch.clear();  // Drops the Python references with the GIL held.
    }
  }

 private:
  absl::Mutex mu_;
  std::vector<std::shared_ptr<Delivery>> items_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

// Process-wide (python/process_state.h lists it): one queue for every worker of the process.
DeliveryQueue* Deliveries() {
  static DeliveryQueue* queue = new DeliveryQueue();  // Never freed: pool threads use it late.
  return queue;
}

}  // namespace

// An outstanding call made from Python.
class Pending {
 public:
  Pending(Future<Message> future, CallContext ctx, bool copy,
          std::shared_ptr<const pycall::CallerProfile> profile, ReplyRecording recording)
      : future_(std::move(future)),
        ctx_(std::move(ctx)),
        copy_(copy),
        profile_(std::move(profile)),
        recording_(std::move(recording)) {}

  bool done() const { return future_.ready(); }

  // Blocks (interruptibly) and returns the result or raises.
  py::object Wait() {
    WaitInterruptibly(future_);
    Decoded d;
    {
      ScopedGilRelease release;
      d = Decode(future_.result(), copy_, profile_.get(), recording_);
    }
    return ToPython(d, ctx_);
  }

  // Completes the torch.futures.Future `fut` with the result (set_result) or the error
  // (set_exception) once the reply arrives. The delivery runs on a pool thread, or in
  // DeliverNow(), whichever comes first.
  void DeliverTo(py::object fut) {
    delivery_ = std::make_shared<Delivery>(std::move(fut), ctx_);
    std::shared_ptr<Delivery> delivery = delivery_;
    bool copy = copy_;
    std::shared_ptr<const pycall::CallerProfile> profile = profile_;
    ReplyRecording recording = recording_;
    future_.Then([delivery, copy, profile, recording](const absl::StatusOr<Message>& reply) {
      if (delivery->Prepare([&] { return Decode(reply, copy, profile.get(), recording); })) {
        Deliveries()->Push(delivery);
      }
    });
  }

  // Blocks (interruptibly) until the reply is in, then delivers it into the DeliverTo() future
  // on this thread unless the queue already did.
  void DeliverNow() {
    WaitInterruptibly(future_);
    if (delivery_ == nullptr) return;
    delivery_->CompleteNow(
        [this] { return Decode(future_.result(), copy_, profile_.get(), recording_); });
  }

 private:
  std::shared_ptr<Delivery> delivery_;
  Future<Message> future_;
  CallContext ctx_;
  bool copy_;
  std::shared_ptr<const pycall::CallerProfile> profile_;
  ReplyRecording recording_;
};

std::shared_ptr<dist_autograd::LocalAutograd> RecordAutograd(Prepared& p, WorkerId to) {
  const ContextId context = dist_autograd::CurrentContext();
  if (context == dist_autograd::kNoContext || p.worker->autograd == nullptr) return nullptr;
  p.worker->autograd->RecordOutgoing(context, to, p.sent, /*force=*/p.kind != Kind::kBuiltin,
                                     /*involved_of=*/false, &p.payload);
  if (!p.payload.has_autograd()) return nullptr;
  return p.worker->autograd;
}

CallContext MakeContext(Worker& w, WorkerId to, std::optional<absl::Duration> timeout) {
  CallContext ctx;
  ctx.to = to;
  absl::StatusOr<WorkerInfo> info = w.runtime->agent()->GetWorker(to);
  ctx.to_name = info.ok() ? info->name : absl::StrCat("#", to);
  ctx.timeout = timeout.value_or(w.runtime->agent()->default_timeout());
  return ctx;
}

void CheckDestination(Worker& w, WorkerId to) {
  if (!w.runtime->agent()->GetWorker(to).ok()) {
    Raise(absl::InvalidArgumentError(absl::StrCat("name:", w.self.name, ",rank:", w.self.id,
                                                  " could not find destination id ", to)));
  }
}

Prepared Profiled(Prepared p, const std::string& key) {
  if (key.empty()) return p;
  p.profile = pycall::CallerProfile::Capture(key);
  if (p.profile != nullptr) *p.payload.mutable_profiling() = p.profile->request();
  return p;
}

Prepared PreparePython(const py::bytes& pickle, const std::vector<at::Tensor>& tensors,
                       bool async_execution) {
  Prepared p;
  p.worker = RequireWorker();
  p.payload.set_pickle(std::string(pickle));
  p.payload.set_async_execution(async_execution);
  absl::Status s;
  if (tensors.empty()) {
    s = pycall::AppendTensors(tensors, &p.payload, &p.buffers);
  } else {
    ScopedGilRelease release;  // may clone views (torch_calls.h): no Python touched
    s = pycall::AppendTensors(tensors, &p.payload, &p.buffers);
  }
  if (!s.ok()) Raise(s);
  p.sent = tensors;
  return p;
}

Prepared PrepareBuiltin(const std::string& qualified_name, const py::tuple& args,
                        const py::dict& kwargs) {
  Prepared p;
  p.worker = RequireWorker();
  p.kind = Kind::kBuiltin;
  c10::Symbol symbol = c10::Symbol::fromQualString(qualified_name);
  std::string errors;
  std::shared_ptr<torch::jit::Operator> chosen;
  torch::jit::Stack stack;
  py::kwargs kw = py::reinterpret_borrow<py::kwargs>(kwargs);
  for (const std::shared_ptr<torch::jit::Operator>& op : torch::jit::getAllOperatorsFor(symbol)) {
    try {
      stack = torch::jit::createStackForSchema(op->schema(), args, kw, c10::nullopt);
      chosen = op;
      break;
    } catch (const std::exception& e) {
      absl::StrAppend(&errors, e.what(), "\n");
    }
  }
  if (chosen == nullptr) {
    // PyTorch's first words, which programs match.
    throw std::runtime_error(
        absl::StrCat("Overloaded torch operator invoked from Python failed to many any schema: "
                     "no overload of ",
                     qualified_name, " takes the given arguments:\n", errors));
  }
  absl::Status s =
      pycall::EncodeBuiltinCall(chosen->schema().name(), chosen->schema().overload_name(), stack,
                                &p.payload, &p.buffers, &p.sent);
  if (!s.ok()) Raise(s);
  return p;
}

Prepared PrepareScript(const std::string& qualified_name, const py::tuple& args,
                       const py::dict& kwargs) {
  Prepared p;
  p.worker = RequireWorker();
  p.kind = Kind::kScript;
  torch::jit::Function* fn = p.worker->cu->find_function(c10::QualifiedName(qualified_name));
  if (fn == nullptr) {
    throw std::runtime_error(absl::StrCat("no TorchScript function named '", qualified_name, "'"));
  }
  py::kwargs kw = py::reinterpret_borrow<py::kwargs>(kwargs);
  torch::jit::Stack stack =
      torch::jit::createStackForSchema(fn->getSchema(), args, kw, c10::nullopt);
  absl::Status s = pycall::EncodeScriptCall(qualified_name, stack, &p.payload, &p.buffers, &p.sent);
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
  ReplyRecording recording{RecordAutograd(p, to), to, dist_autograd::CurrentContext()};
  std::string bytes = pycall::Serialize(p.payload);
  Future<Message> future(nullptr);
  {
    ReleaseGilIfLarge release(bytes, p.buffers);
    future = w.runtime->agent()->Call(to, type, std::move(bytes), std::move(p.buffers), timeout);
  }
  return std::make_shared<Pending>(std::move(future), std::move(ctx), to == w.self.id,
                                   std::move(p.profile), std::move(recording));
}

void RegisterCallerBindings(py::module_& m) {
  py::class_<Pending, std::shared_ptr<Pending>>(m, "Pending")
      .def("wait", &Pending::Wait)
      .def("done", &Pending::done)
      .def("deliver_to", &Pending::DeliverTo)
      .def("deliver_now", &Pending::DeliverNow);
  m.def("set_future_error", &SetFutureError, py::arg("fut"), py::arg("exception"));
  m.def("complete_future_like", &CompleteFutureLike, py::arg("fut"), py::arg("source"));
  m.def("future_error_text", &FutureErrorText, py::arg("fut"));
  auto call = [](Prepared p, WorkerId to, double timeout) {
    return Send(std::move(p), to, timeout);
  };
  DefPythonCall(m, "send_python", call);
  DefTorchCall(m, "send_builtin", &PrepareBuiltin, call);
  DefTorchCall(m, "send_script", &PrepareScript, call);
}

}  // namespace tether
