#include "python/owned_value.h"

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "python/call.pb.h"
#include "python/errors.h"
#include "python/process_state.h"
#include "python/torch_calls.h"

namespace py = pybind11;

namespace tether {
namespace {

const OwnedValue* AsOwned(const RRefValue& v) {
  return static_cast<const OwnedValue*>(v.object.get());
}

}  // namespace

RRefValue MakeOwned(std::shared_ptr<OwnedValue> value) {
  RRefValue v;
  v.object = std::shared_ptr<const void>(std::move(value));
  return v;
}

RRefValue MakeOwnedPython(py::object value, bool is_exception) {
  auto owned = std::make_shared<OwnedValue>();
  owned->py = std::make_unique<PyRef>(std::move(value));
  owned->is_exception = is_exception;
  return MakeOwned(std::move(owned));
}

absl::StatusOr<RRefValue> SerializeOwned(const RRefValue& v, const FetchInfo& info) {
  const OwnedValue* owned = AsOwned(v);
  if (owned == nullptr) return v;
  // A to_here() inside a distributed autograd context: this worker joins it (PyTorch's forced
  // recording of a fetch) and records the value's tensors on the reply.
  std::shared_ptr<dist_autograd::LocalAutograd> autograd;
  ContextId context = dist_autograd::kNoContext;
  if (!info.attachment.empty()) {
    pycall::AutogradMeta meta;
    std::shared_ptr<Worker> w = CurrentWorker();
    if (!meta.ParseFromString(info.attachment)) {
      return absl::InvalidArgumentError("RREF_FETCH_CALL: malformed autograd attachment");
    }
    if (w != nullptr && w->autograd != nullptr) {
      autograd = w->autograd;
      absl::StatusOr<ContextId> joined =
          autograd->RecordIncoming(meta, info.caller, {}, /*request=*/true);
      if (!joined.ok()) return joined.status();
      context = *joined;
    }
  }
  pycall::Payload payload;
  std::vector<Buffer> buffers;
  std::vector<at::Tensor> sent;
  if (owned->ivalue.has_value()) {
    payload.set_torchscript_value(true);
    absl::Status s = pycall::EncodeIValue(*owned->ivalue, &payload, &buffers, &sent);
    if (!s.ok()) return s;
  } else {
    std::vector<at::Tensor> tensors;
    {
      Gil gil;
      try {
        py::object hook = py::reinterpret_borrow<py::object>(GetHooks().serialize_value);
        // RRefs inside the value are forked for the fetching worker (it becomes their child).
        py::tuple r = hook(owned->py->get(), owned->is_exception, info.caller);
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
    sent = std::move(tensors);
  }
  if (context != dist_autograd::kNoContext && !owned->is_exception) {
    autograd->RecordOutgoing(context, info.caller, sent, /*force=*/false, /*involved_of=*/true,
                             &payload);
  }
  RRefValue out;
  out.payload = pycall::Serialize(payload);
  out.buffers = std::move(buffers);
  return out;
}

py::object ValueToPython(const RRefValue& v, WorkerId sender, bool copy,
                         dist_autograd::LocalAutograd* autograd, ContextId context) {
  CheckGilHeld("ValueToPython");
  if (const OwnedValue* owned = AsOwned(v)) {
    if (owned->ivalue.has_value()) return torch::jit::toPyObject(*owned->ivalue);
    if (owned->is_exception) {
      owned->py->get().attr("reraise")();
      throw std::logic_error("remote exception record did not raise");
    }
    return owned->py->get();
  }
  pycall::Payload payload = ValueOrRaise(pycall::Parse(v.payload));
  absl::Status recorded;
  auto record = [&](const std::vector<at::Tensor>& tensors) {
    if (autograd != nullptr && payload.has_autograd()) {
      recorded = autograd->RecordReply(context, payload.autograd(), sender, tensors);
    }
  };
  if (payload.torchscript_value()) {
    c10::IValue value = ValueOrRaise(pycall::DecodeIValue(payload, v.buffers, copy, record));
    if (!recorded.ok()) Raise(recorded);
    return torch::jit::toPyObject(std::move(value));
  }
  std::vector<at::Tensor> tensors = ValueOrRaise(pycall::TakeTensors(payload, v.buffers, copy));
  record(tensors);
  if (!recorded.ok()) Raise(recorded);
  py::object hook = py::reinterpret_borrow<py::object>(GetHooks().decode_reply);
  return hook(py::bytes(payload.pickle()), py::cast(tensors), payload.remote_exception(), sender);
}

}  // namespace tether
