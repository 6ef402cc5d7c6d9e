#include "python/torch_calls.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstring>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tether {
namespace pycall {
namespace {

// The first line of a c10::Error, without the C++ backtrace PyTorch appends.
std::string ErrorText(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

bool SendableDtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Undefined:
    case c10::ScalarType::QInt8:
    case c10::ScalarType::QUInt8:
    case c10::ScalarType::QInt32:
    case c10::ScalarType::QUInt4x2:
    case c10::ScalarType::QUInt2x4:
      return false;
    default:
      return static_cast<int>(t) >= 0 &&
             static_cast<int>(t) <
                 static_cast<int>(c10::ScalarType::NumOptions);
  }
}

absl::Status AppendTensor(at::Tensor t, Payload* payload,
                          std::vector<Buffer>* buffers) {
  if (!t.defined())
    return absl::InvalidArgumentError("cannot send an undefined tensor");
  if (t.layout() != c10::kStrided) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot send a tensor of layout ", c10::str(t.layout()),
                     ": Tether sends dense (strided) tensors only; convert it "
                     "(e.g. .to_dense()) first"));
  }
  if (!t.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot send a tensor on device ", t.device().str(),
        ": Tether sends CPU tensors only; move it with .cpu() first"));
  }
  if (t.is_quantized() || !SendableDtype(t.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot send a tensor of dtype ", c10::toString(t.scalar_type())));
  }
  const bool requires_grad = t.requires_grad();
  // Materialize lazy conjugation/negation bits and make the bytes dense and
  // row-major.
  t = t.detach().resolve_conj().resolve_neg();
  if (!t.is_contiguous()) t = t.contiguous();
  TensorMeta* meta = payload->add_tensors();
  meta->set_dtype(static_cast<int>(t.scalar_type()));
  for (int64_t s : t.sizes()) meta->add_sizes(s);
  meta->set_requires_grad(requires_grad);
  const size_t nbytes = t.numel() * t.element_size();
  if (nbytes == 0) {
    buffers->push_back(Buffer());
  } else {
    // The Buffer keeps the tensor's storage alive for as long as the transport
    // needs the bytes.
    auto owner = std::make_shared<c10::Storage>(t.storage());
    buffers->push_back(Buffer::Wrap(std::move(owner), t.data_ptr(), nbytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> TakeTensor(const TensorMeta& meta,
                                      const Buffer& buffer, bool copy) {
  const auto dtype = static_cast<c10::ScalarType>(meta.dtype());
  if (!SendableDtype(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("received tensor has invalid dtype ", meta.dtype()));
  }
  std::vector<int64_t> sizes(meta.sizes().begin(), meta.sizes().end());
  if (sizes.size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("received tensor has ", sizes.size(),
                     " dimensions (at most 64 allowed)"));
  }
  const size_t itemsize = c10::elementSize(dtype);
  // numel * itemsize with overflow checks: the sizes come from the wire.
  unsigned __int128 nbytes = itemsize;
  for (int64_t s : sizes) {
    if (s < 0)
      return absl::InvalidArgumentError("received tensor has a negative size");
    nbytes *= static_cast<unsigned __int128>(s);
    if (nbytes > (static_cast<unsigned __int128>(1) << 62)) {
      return absl::InvalidArgumentError("received tensor is impossibly large");
    }
  }
  if (static_cast<size_t>(nbytes) != buffer.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("received tensor of shape [", absl::StrJoin(sizes, ", "),
                     "] and dtype ", c10::toString(dtype), " needs ",
                     static_cast<uint64_t>(nbytes),
                     " bytes but its buffer has ", buffer.size()));
  }
  const auto options = at::TensorOptions().dtype(dtype);
  at::Tensor t;
  const bool aligned =
      reinterpret_cast<uintptr_t>(buffer.data()) % itemsize == 0;
  if (buffer.size() == 0) {
    t = at::empty(sizes, options);
  } else if (copy || !aligned) {
    t = at::empty(sizes, options);
    std::memcpy(t.data_ptr(), buffer.data(), buffer.size());
  } else {
    // The tensor adopts the received bytes; its deleter drops the Buffer's
    // owner.
    auto* holder = new std::shared_ptr<const void>(buffer.owner());
    t = at::for_blob(const_cast<uint8_t*>(buffer.data()), sizes)
            .context(holder,
                     [](void* ctx) {
                       delete static_cast<std::shared_ptr<const void>*>(ctx);
                     })
            .options(options)
            .make_tensor();
  }
  if (meta.requires_grad() &&
      (c10::isFloatingType(dtype) || c10::isComplexType(dtype))) {
    t.requires_grad_(true);
  }
  return t;
}

// Checks that `stack` can be passed to `schema` (count and types), so that a
// malformed request is refused instead of reaching an operator kernel.
absl::Status CheckStack(const c10::FunctionSchema& schema,
                        const torch::jit::Stack& stack) {
  const auto& args = schema.arguments();
  if (stack.size() != args.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", c10::toString(schema), "' takes ", args.size(),
                     " arguments but the call has ", stack.size()));
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (!stack[i].type()->isSubtypeOf(*args[i].type())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "argument '", args[i].name(), "' of '", c10::toString(schema),
          "' must be ", args[i].type()->repr_str(), " but the call has ",
          stack[i].type()->repr_str()));
    }
  }
  return absl::OkStatus();
}

c10::IValue StackResult(torch::jit::Stack& stack) {
  if (stack.empty()) return c10::IValue();
  if (stack.size() == 1) return std::move(stack[0]);
  return c10::ivalue::Tuple::create(std::move(stack));
}

absl::StatusOr<torch::jit::Stack> DecodeStack(
    const Payload& payload, const std::vector<Buffer>& buffers, bool copy,
    const OnTensors& received) {
  absl::StatusOr<c10::IValue> args =
      DecodeIValue(payload, buffers, copy, received);
  if (!args.ok()) return args.status();
  if (!args->isTuple())
    return absl::InvalidArgumentError("call arguments are not a tuple");
  const auto& elements = args->toTupleRef().elements();
  return torch::jit::Stack(elements.begin(), elements.end());
}

}  // namespace

absl::Status AppendTensors(const std::vector<at::Tensor>& tensors,
                           Payload* payload, std::vector<Buffer>* buffers) {
  try {
    for (const at::Tensor& t : tensors) {
      absl::Status s = AppendTensor(t, payload, buffers);
      if (!s.ok()) return s;
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot send tensor: ", ErrorText(e)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<at::Tensor>> TakeTensors(
    const Payload& payload, const std::vector<Buffer>& buffers, bool copy) {
  if (static_cast<size_t>(payload.tensors_size()) != buffers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "payload describes ", payload.tensors_size(),
        " tensors but the message carries ", buffers.size(), " buffers"));
  }
  std::vector<at::Tensor> tensors;
  tensors.reserve(buffers.size());
  try {
    for (size_t i = 0; i < buffers.size(); ++i) {
      absl::StatusOr<at::Tensor> t =
          TakeTensor(payload.tensors(i), buffers[i], copy);
      if (!t.ok()) return t.status();
      tensors.push_back(*std::move(t));
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot rebuild tensor: ", ErrorText(e)));
  }
  return tensors;
}

absl::Status EncodeIValue(const c10::IValue& value, Payload* payload,
                          std::vector<Buffer>* buffers,
                          std::vector<at::Tensor>* sent) {
  std::vector<at::Tensor> tensors;
  try {
    std::vector<char> bytes = torch::jit::pickle(value, &tensors);
    payload->set_pickle(bytes.data(), bytes.size());
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot serialize TorchScript value: ", ErrorText(e)));
  }
  absl::Status appended = AppendTensors(tensors, payload, buffers);
  if (appended.ok() && sent != nullptr) *sent = std::move(tensors);
  return appended;
}

absl::StatusOr<c10::IValue> DecodeIValue(const Payload& payload,
                                         const std::vector<Buffer>& buffers,
                                         bool copy, const OnTensors& received) {
  absl::StatusOr<std::vector<at::Tensor>> tensors =
      TakeTensors(payload, buffers, copy);
  if (!tensors.ok()) return tensors.status();
  if (received) received(*tensors);
  try {
    return torch::jit::unpickle(payload.pickle().data(),
                                payload.pickle().size(), nullptr, *tensors);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed TorchScript pickle: ", ErrorText(e)));
  }
}

absl::Status EncodeBuiltinCall(const std::string& name,
                               const std::string& overload,
                               const torch::jit::Stack& stack, Payload* payload,
                               std::vector<Buffer>* buffers,
                               std::vector<at::Tensor>* sent) {
  payload->set_op(name);
  payload->set_overload(overload);
  return EncodeIValue(c10::ivalue::Tuple::create(stack), payload, buffers,
                      sent);
}

absl::StatusOr<c10::IValue> RunBuiltinCall(const Payload& payload,
                                           const std::vector<Buffer>& buffers,
                                           bool copy,
                                           const OnTensors& received) {
  std::shared_ptr<torch::jit::Operator> op;
  try {
    op = torch::jit::findOperatorFor(
        c10::OperatorName(payload.op(), payload.overload()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad operator name '", payload.op(), "': ", ErrorText(e)));
  }
  if (op == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        "no builtin operator '", payload.op(),
        payload.overload().empty() ? "" : ".", payload.overload(), "'"));
  }
  absl::StatusOr<torch::jit::Stack> stack =
      DecodeStack(payload, buffers, copy, received);
  if (!stack.ok()) return stack.status();
  absl::Status ok = CheckStack(op->schema(), *stack);
  if (!ok.ok()) return ok;
  try {
    op->getOperation()(*stack);
  } catch (const std::exception& e) {
    return absl::InternalError(ErrorText(e));
  }
  return StackResult(*stack);
}

absl::Status EncodeScriptCall(const std::string& qualified_name,
                              const torch::jit::Stack& stack, Payload* payload,
                              std::vector<Buffer>* buffers,
                              std::vector<at::Tensor>* sent) {
  payload->set_op(qualified_name);
  return EncodeIValue(c10::ivalue::Tuple::create(stack), payload, buffers,
                      sent);
}

absl::StatusOr<c10::IValue> RunScriptCall(const torch::jit::CompilationUnit& cu,
                                          const Payload& payload,
                                          const std::vector<Buffer>& buffers,
                                          bool copy,
                                          const OnTensors& received) {
  torch::jit::Function* fn = nullptr;
  try {
    fn = cu.find_function(c10::QualifiedName(payload.op()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad TorchScript function name '", payload.op(), "': ", ErrorText(e)));
  }
  if (fn == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no TorchScript function '", payload.op(),
                     "' on the callee (define it with @torch.jit.script in a "
                     "module both workers import)"));
  }
  absl::StatusOr<torch::jit::Stack> stack =
      DecodeStack(payload, buffers, copy, received);
  if (!stack.ok()) return stack.status();
  try {
    absl::Status ok = CheckStack(fn->getSchema(), *stack);
    if (!ok.ok()) return ok;
    fn->run(*stack);
  } catch (const std::exception& e) {
    return absl::InternalError(ErrorText(e));
  }
  return StackResult(*stack);
}

std::string Serialize(const Payload& payload) {
  return payload.SerializeAsString();
}

absl::StatusOr<Payload> Parse(const std::string& bytes) {
  Payload payload;
  if (!payload.ParseFromString(bytes)) {
    return absl::InvalidArgumentError("malformed call payload");
  }
  return payload;
}

}  // namespace pycall
}  // namespace tether
