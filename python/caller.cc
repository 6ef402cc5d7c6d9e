#include "python/caller.h"

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/jit/python/python_ivalue.h>

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

// `profile`: the caller's profile if the call was profiled; the callee's events are added to it
// here, before the call's result is delivered.
Decoded Decode(const absl::StatusOr<Message>& reply, bool copy,
               const pycall::CallerProfile* profile) {
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
    }
  } else {
    absl::StatusOr<c10::IValue> value = pycall::DecodeIValue(d.payload, reply->buffers, copy);
    if (!value.ok()) {
      d.status = value.status();
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
  return hook(py::bytes(d.payload.pickle()), py::cast(d.tensors), d.payload.remote_exception(),
              ctx.to);
}

// Completions of rpc_async futures, delivered in batches: whichever pool thread finds no
// delivery in progress takes the GIL once and completes every future whose reply has arrived
// meanwhile; the others only queue theirs (decoded without the GIL) and return. Under load this
// replaces one GIL acquisition per reply (a convoy of pool threads) with one per batch.
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
      Gil gil;
      for (Item& it : batch) Deliver(it);
      batch.clear();  // Drops the Python references with the GIL held.
    }
  }

 private:
  static void Deliver(Item& it) {
    py::object f = it.target->get();
    try {
      py::object value = ToPython(it.decoded, it.ctx);
      // Complete the future directly: torch's set_result() releases the GIL around it, which
      // would hand the GIL to a waiting thread in the middle of the batch.
      std::shared_ptr<torch::jit::PythonFutureWrapper> wrapper;
      try {
        wrapper = py::cast<std::shared_ptr<torch::jit::PythonFutureWrapper>>(f);
      } catch (const py::cast_error&) {
      }
      if (wrapper != nullptr) {
        wrapper->fut->markCompleted(
            c10::IValue(c10::ivalue::ConcretePyObjectHolder::create(std::move(value))));
      } else {
        f.attr("set_result")(value);
      }
    } catch (py::error_already_set& e) {
      try {
        f.attr("set_exception")(e.value());
      } catch (py::error_already_set& e2) {
        e2.discard_as_unraisable("tether: delivering an RPC error into its future");
      }
    }
  }

  absl::Mutex mu_;
  std::vector<Item> items_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

DeliveryQueue* Deliveries() {
  static DeliveryQueue* queue = new DeliveryQueue();  // Never freed: pool threads use it late.
  return queue;
}

}  // namespace

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
      ScopedGilRelease release;
      d = Decode(future_.result(), copy_, profile_.get());
    }
    return ToPython(d, ctx_);
  }

  // Completes the torch.futures.Future `fut` with the result (set_result) or the error
  // (set_exception) once the reply arrives. The delivery runs on a pool thread.
  void DeliverTo(py::object fut) {
    auto target = std::make_shared<PyRef>(std::move(fut));
    CallContext ctx = ctx_;
    bool copy = copy_;
    std::shared_ptr<const pycall::CallerProfile> profile = profile_;
    future_.Then([target, ctx, copy, profile](const absl::StatusOr<Message>& reply) {
      Deliveries()->Push(DeliveryQueue::Item{target, Decode(reply, copy, profile.get()), ctx});
    });
  }

 private:
  Future<Message> future_;
  CallContext ctx_;
  bool copy_;
  std::shared_ptr<const pycall::CallerProfile> profile_;
};

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
  absl::Status s = pycall::AppendTensors(tensors, &p.payload, &p.buffers);
  if (!s.ok()) Raise(s);
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
    throw std::runtime_error(absl::StrCat("Failed to match operator ", qualified_name,
                                          " to the given arguments:\n", errors));
  }
  absl::Status s = pycall::EncodeBuiltinCall(
      chosen->schema().name(), chosen->schema().overload_name(), stack, &p.payload, &p.buffers);
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
  absl::Status s = pycall::EncodeScriptCall(qualified_name, stack, &p.payload, &p.buffers);
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
    future = w.runtime->agent()->Call(to, type, std::move(bytes), std::move(p.buffers), timeout);
  }
  return std::make_shared<Pending>(std::move(future), std::move(ctx), to == w.self.id,
                                   std::move(p.profile));
}

void RegisterCallerBindings(py::module_& m) {
  py::class_<Pending, std::shared_ptr<Pending>>(m, "Pending")
      .def("wait", &Pending::Wait)
      .def("done", &Pending::done)
      .def("wait_done", &Pending::WaitDone)
      .def("deliver_to", &Pending::DeliverTo);
  auto call = [](Prepared p, WorkerId to, double timeout) {
    return Send(std::move(p), to, timeout);
  };
  DefPythonCall(m, "send_python", call);
  DefTorchCall(m, "send_builtin", &PrepareBuiltin, call);
  DefTorchCall(m, "send_script", &PrepareScript, call);
}

}  // namespace tether
