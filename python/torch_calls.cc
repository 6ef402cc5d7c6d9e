#include "python/torch_calls.h"

#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/_validate_sparse_coo_tensor_args.h>
#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/ScalarType.h>
#include <c10/core/ScalarTypeToTypeMeta.h>
#include <c10/core/Storage.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <unordered_map>
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
             static_cast<int>(t) < static_cast<int>(c10::ScalarType::NumOptions);
  }
}

// PyTorch's rule (torch/csrc/distributed/rpc/utils.cpp, cloneSparseTensors,
// checked against PyTorch 1.13.1 by experiment): a tensor whose storage is at
// least 8 KiB and at least twice the bytes the tensor uses (numel * itemsize)
// is sent as a compact clone, so a small view of a huge tensor does not ship
// the whole storage.
bool WorthCompacting(const at::Tensor& t) {
  constexpr size_t kMinCompactStorageBytes = 8 * 1024;
  constexpr size_t kMinMultiple = 2;
  const size_t storage_bytes = t.storage().nbytes();
  const size_t useful_bytes = t.numel() * t.element_size();
  return storage_bytes >= kMinCompactStorageBytes && storage_bytes >= useful_bytes * kMinMultiple;
}

// The storages of one message: each distinct storage becomes one buffer (its
// index is the buffer's position in `buffers`).
class StorageTable {
 public:
  explicit StorageTable(std::vector<Buffer>* buffers) : buffers_(buffers) {}

  int64_t IndexOf(const c10::Storage& storage) {
    auto [it, inserted] = index_.emplace(storage.unsafeGetStorageImpl(), buffers_->size());
    if (inserted) {
      // Held until the message is made: a storage freed meanwhile (a compacted
      // clone of a zero-size view) must not lend its address to another one.
      held_.push_back(storage);
      const size_t nbytes = storage.nbytes();
      if (nbytes == 0) {
        buffers_->push_back(Buffer());
      } else {
        // The Buffer keeps the storage alive for as long as the transport
        // needs the bytes (no copy).
        auto owner = std::make_shared<c10::Storage>(storage);
        buffers_->push_back(Buffer::Wrap(std::move(owner), storage.data(), nbytes));
      }
    }
    return static_cast<int64_t>(it->second);
  }

 private:
  std::vector<Buffer>* buffers_;
  // Looked up only, never iterated: the message does not depend on its order.
  std::unordered_map<const c10::StorageImpl*, size_t> index_;
  std::vector<c10::Storage> held_;
};

// Fills `meta` for the dense CPU tensor `t` (layout and device already checked).
void AppendDense(at::Tensor t, TensorMeta* meta, StorageTable* storages) {
  const bool requires_grad = t.requires_grad();
  // Materialize lazy conjugation/negation bits (a copy only if one is set).
  t = t.detach().resolve_conj().resolve_neg();
  if (WorthCompacting(t)) t = t.clone();
  meta->set_dtype(static_cast<int>(t.scalar_type()));
  for (int64_t s : t.sizes()) meta->add_sizes(s);
  for (int64_t s : t.strides()) meta->add_strides(s);
  meta->set_storage_offset(t.storage_offset());
  meta->set_requires_grad(requires_grad);
  meta->set_storage(storages->IndexOf(t.storage()));
}

absl::Status AppendTensor(const at::Tensor& t, Payload* payload, StorageTable* storages) {
  if (!t.defined()) return absl::InvalidArgumentError("cannot send an undefined tensor");
  if (t.layout() != c10::kStrided && t.layout() != c10::kSparse) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot send a tensor of layout ", c10::str(t.layout()),
                     ": Tether sends dense (strided) and sparse COO tensors only; convert it "
                     "(e.g. .to_dense()) first"));
  }
  if (!t.device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot send a tensor on device ", t.device().str(),
                     ": Tether sends CPU tensors only; move it with .cpu() first"));
  }
  if (t.is_quantized() || !SendableDtype(t.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot send a tensor of dtype ", c10::toString(t.scalar_type())));
  }
  TensorMeta* meta = payload->add_tensors();
  if (t.layout() == c10::kSparse) {
    const at::Tensor detached = t.detach();
    meta->set_dtype(static_cast<int>(t.scalar_type()));
    for (int64_t s : t.sizes()) meta->add_sizes(s);
    meta->set_requires_grad(t.requires_grad());
    SparseCoo* parts = meta->mutable_sparse_coo();
    parts->set_coalesced(detached.is_coalesced());
    AppendDense(detached._indices(), parts->mutable_indices(), storages);
    AppendDense(detached._values(), parts->mutable_values(), storages);
    return absl::OkStatus();
  }
  if (!t.has_storage()) {
    return absl::InvalidArgumentError("cannot send a tensor without storage");
  }
  AppendDense(t, meta, storages);
  return absl::OkStatus();
}

// Bound on every size, stride, offset and byte count read from the wire, so
// that none of PyTorch's int64 arithmetic on them can overflow.
constexpr uint64_t kMaxWireValue = uint64_t{1} << 62;

// A tensor description from the wire, checked against the message's buffers.
struct CheckedMeta {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t offset;
  size_t storage;
};

// `what` names the tensor in errors ("received tensor 3").
absl::StatusOr<CheckedMeta> CheckMeta(const std::string& what, const TensorMeta& meta,
                                      const std::vector<Buffer>& buffers) {
  if (meta.has_sparse_coo()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is sparse where a dense tensor must be"));
  }
  CheckedMeta out;
  out.dtype = static_cast<c10::ScalarType>(meta.dtype());
  if (!SendableDtype(out.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has invalid dtype ", meta.dtype()));
  }
  if (meta.sizes_size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", meta.sizes_size(), " dimensions (at most 64 allowed)"));
  }
  if (meta.strides_size() != meta.sizes_size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", meta.sizes_size(), " sizes but ",
                                                   meta.strides_size(), " strides"));
  }
  out.sizes.assign(meta.sizes().begin(), meta.sizes().end());
  out.strides.assign(meta.strides().begin(), meta.strides().end());
  out.offset = meta.storage_offset();
  const uint64_t itemsize = c10::elementSize(out.dtype);
  uint64_t numel = 1;
  for (size_t d = 0; d < out.sizes.size(); ++d) {
    if (out.sizes[d] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has negative size ", out.sizes[d], " in dimension ", d));
    }
    if (out.strides[d] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, " has negative stride ", out.strides[d],
                                                     " in dimension ", d,
                                                     " (strides must not be negative)"));
    }
    if (static_cast<uint64_t>(out.sizes[d]) > kMaxWireValue ||
        static_cast<uint64_t>(out.strides[d]) > kMaxWireValue) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has an impossibly large size or stride in dimension ", d));
    }
    if (numel != 0) {
      const unsigned __int128 n = static_cast<unsigned __int128>(numel) * out.sizes[d];
      if (n > kMaxWireValue / itemsize) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " of shape [", absl::StrJoin(out.sizes, ", "), "] is impossibly large"));
      }
      numel = static_cast<uint64_t>(n);
    }
  }
  if (out.offset < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has negative storage offset ", out.offset));
  }
  if (static_cast<unsigned __int128>(out.offset) * itemsize > kMaxWireValue) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has an impossibly large storage offset ", out.offset));
  }
  if (meta.storage() < 0 || static_cast<uint64_t>(meta.storage()) >= buffers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " refers to storage ", meta.storage(),
                                                   " but the message carries ", buffers.size(),
                                                   " storage buffer(s)"));
  }
  out.storage = static_cast<size_t>(meta.storage());
  if (numel == 0) return out;  // reads no bytes (PyTorch's rule too)
  // The last element the tensor reaches: offset + sum((size - 1) * stride),
  // each term below 2^124 and the sum checked as it grows.
  const uint64_t storage_bytes = buffers[out.storage].size();
  unsigned __int128 last = static_cast<uint64_t>(out.offset);
  for (size_t d = 0; d < out.sizes.size(); ++d) {
    last +=
        static_cast<unsigned __int128>(out.sizes[d] - 1) * static_cast<uint64_t>(out.strides[d]);
    if (last > kMaxWireValue) break;
  }
  if (last > kMaxWireValue || (last + 1) * itemsize > storage_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " of shape [", absl::StrJoin(out.sizes, ", "), "], strides [",
                     absl::StrJoin(out.strides, ", "), "], storage offset ", out.offset,
                     " and dtype ", c10::toString(out.dtype), " reaches past the end of storage ",
                     out.storage, ", which has ", storage_bytes, " bytes"));
  }
  return out;
}

// A received tensor: dense (`dense` only) or sparse COO (`dense` holds its
// values, `indices` its indices).
struct CheckedTensor {
  CheckedMeta dense;
  std::optional<CheckedMeta> indices;
  std::vector<int64_t> sparse_sizes;
  bool coalesced = false;
  bool requires_grad = false;
};

absl::StatusOr<CheckedTensor> CheckTensor(int index, const TensorMeta& meta,
                                          const std::vector<Buffer>& buffers) {
  const std::string what = absl::StrCat("received tensor ", index);
  CheckedTensor out;
  out.requires_grad = meta.requires_grad();
  if (!meta.has_sparse_coo()) {
    absl::StatusOr<CheckedMeta> dense = CheckMeta(what, meta, buffers);
    if (!dense.ok()) return dense.status();
    out.dense = *std::move(dense);
    return out;
  }
  const auto dtype = static_cast<c10::ScalarType>(meta.dtype());
  if (!SendableDtype(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has invalid dtype ", meta.dtype()));
  }
  if (meta.sizes_size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", meta.sizes_size(), " dimensions (at most 64 allowed)"));
  }
  for (int64_t s : meta.sizes()) {
    if (s < 0 || static_cast<uint64_t>(s) > kMaxWireValue) {
      return absl::InvalidArgumentError(absl::StrCat(what, " has invalid size ", s));
    }
  }
  const SparseCoo& parts = meta.sparse_coo();
  absl::StatusOr<CheckedMeta> indices =
      CheckMeta(absl::StrCat(what, "'s indices"), parts.indices(), buffers);
  if (!indices.ok()) return indices.status();
  absl::StatusOr<CheckedMeta> values =
      CheckMeta(absl::StrCat(what, "'s values"), parts.values(), buffers);
  if (!values.ok()) return values.status();
  out.sparse_sizes.assign(meta.sizes().begin(), meta.sizes().end());
  const std::string shape =
      absl::StrCat(" (sparse tensor of shape [", absl::StrJoin(out.sparse_sizes, ", "), "])");
  if (indices->dtype != c10::ScalarType::Long || indices->sizes.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, "'s indices must be a 2-D int64 tensor; got ", indices->sizes.size(),
                     "-D ", c10::toString(indices->dtype), shape));
  }
  if (values->dtype != dtype || values->sizes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, "'s values must be a tensor of dtype ", c10::toString(dtype),
                     " with at least one dimension; got ", values->sizes.size(), "-D ",
                     c10::toString(values->dtype), shape));
  }
  const int64_t sparse_dim = indices->sizes[0];
  const size_t dense_dim = values->sizes.size() - 1;
  if (static_cast<uint64_t>(sparse_dim) + dense_dim != out.sparse_sizes.size() ||
      indices->sizes[1] != values->sizes[0] ||
      !std::equal(values->sizes.begin() + 1, values->sizes.end(),
                  out.sparse_sizes.begin() + sparse_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, "'s indices [", absl::StrJoin(indices->sizes, ", "), "] and values [",
                     absl::StrJoin(values->sizes, ", "), "] do not fit", shape));
  }
  out.dense = *std::move(values);
  out.indices = *std::move(indices);
  out.coalesced = parts.coalesced();
  return out;
}

// Whether the columns of `indices` ([sparse_dim, nnz]) are in strictly
// increasing lexicographic order: what a coalesced sparse tensor promises.
bool SortedWithoutDuplicates(const at::Tensor& indices) {
  const auto idx = indices.accessor<int64_t, 2>();
  const int64_t dims = indices.size(0);
  for (int64_t j = 1; j < indices.size(1); ++j) {
    int64_t d = 0;
    while (d < dims && idx[d][j - 1] == idx[d][j]) ++d;
    if (d == dims || idx[d][j - 1] > idx[d][j]) return false;
  }
  return true;
}

// The storage a received buffer becomes: its bytes adopted (the deleter drops
// the Buffer's owner), or copied when `copy` is set or the bytes are not
// aligned for `alignment`.
c10::Storage ReceivedStorage(const Buffer& buffer, bool copy, size_t alignment) {
  const bool aligned = reinterpret_cast<uintptr_t>(buffer.data()) % alignment == 0;
  if (buffer.size() == 0 || copy || !aligned) {
    c10::Storage storage(c10::Storage::use_byte_size_t(), buffer.size(), c10::GetCPUAllocator(),
                         /*resizable=*/true);
    if (buffer.size() != 0) {
      std::memcpy(storage.data(), buffer.data(), buffer.size());
    }
    return storage;
  }
  auto* holder = new std::shared_ptr<const void>(buffer.owner());
  c10::DataPtr data(
      const_cast<uint8_t*>(buffer.data()), holder,
      [](void* ctx) { delete static_cast<std::shared_ptr<const void>*>(ctx); },
      c10::Device(c10::DeviceType::CPU));
  return c10::Storage(c10::Storage::use_byte_size_t(), buffer.size(), std::move(data),
                      /*allocator=*/nullptr,
                      /*resizable=*/false);
}

// Checks that `stack` can be passed to `schema` (count and types), so that a
// malformed request is refused instead of reaching an operator kernel.
absl::Status CheckStack(const c10::FunctionSchema& schema, const torch::jit::Stack& stack) {
  const auto& args = schema.arguments();
  if (stack.size() != args.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", c10::toString(schema), "' takes ",
                                                   args.size(), " arguments but the call has ",
                                                   stack.size()));
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (!stack[i].type()->isSubtypeOf(*args[i].type())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "argument '", args[i].name(), "' of '", c10::toString(schema), "' must be ",
          args[i].type()->repr_str(), " but the call has ", stack[i].type()->repr_str()));
    }
  }
  return absl::OkStatus();
}

c10::IValue StackResult(torch::jit::Stack& stack) {
  if (stack.empty()) return c10::IValue();
  if (stack.size() == 1) return std::move(stack[0]);
  return c10::ivalue::Tuple::create(std::move(stack));
}

absl::StatusOr<torch::jit::Stack> DecodeStack(const Payload& payload,
                                              const std::vector<Buffer>& buffers, bool copy,
                                              const OnTensors& received) {
  absl::StatusOr<c10::IValue> args = DecodeIValue(payload, buffers, copy, received);
  if (!args.ok()) return args.status();
  if (!args->isTuple()) return absl::InvalidArgumentError("call arguments are not a tuple");
  const auto& elements = args->toTupleRef().elements();
  return torch::jit::Stack(elements.begin(), elements.end());
}

}  // namespace

absl::Status AppendTensors(const std::vector<at::Tensor>& tensors, Payload* payload,
                           std::vector<Buffer>* buffers) {
  StorageTable storages(buffers);
  try {
    for (const at::Tensor& t : tensors) {
      absl::Status s = AppendTensor(t, payload, &storages);
      if (!s.ok()) return s;
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot send tensor: ", ErrorText(e)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<at::Tensor>> TakeTensors(const Payload& payload,
                                                    const std::vector<Buffer>& buffers, bool copy) {
  std::vector<CheckedTensor> checked;
  checked.reserve(payload.tensors_size());
  // Per storage: the largest itemsize of the tensors viewing it (0: unused).
  std::vector<size_t> alignment(buffers.size(), 0);
  auto uses = [&alignment](const CheckedMeta& meta) {
    size_t& a = alignment[meta.storage];
    a = std::max(a, c10::elementSize(meta.dtype));
  };
  for (int i = 0; i < payload.tensors_size(); ++i) {
    absl::StatusOr<CheckedTensor> tensor = CheckTensor(i, payload.tensors(i), buffers);
    if (!tensor.ok()) return tensor.status();
    uses(tensor->dense);
    if (tensor->indices) uses(*tensor->indices);
    checked.push_back(*std::move(tensor));
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (alignment[i] == 0) {
      return absl::InvalidArgumentError(absl::StrCat("the message carries storage ", i, " (",
                                                     buffers[i].size(),
                                                     " bytes) but no received tensor uses it"));
    }
  }
  std::vector<at::Tensor> tensors;
  tensors.reserve(checked.size());
  try {
    std::vector<c10::Storage> storages;
    storages.reserve(buffers.size());
    for (size_t i = 0; i < buffers.size(); ++i) {
      storages.push_back(ReceivedStorage(buffers[i], copy, alignment[i]));
    }
    // Built as from_blob builds a tensor (no operator runs, so nothing is
    // recorded by a profiler); every tensor on one storage shares it.
    auto dense = [&storages](const CheckedMeta& meta) {
      at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
          c10::Storage(storages[meta.storage]), c10::DispatchKeySet(c10::DispatchKey::CPU),
          c10::scalarTypeToTypeMeta(meta.dtype));
      t.unsafeGetTensorImpl()->set_sizes_and_strides(at::IntArrayRef(meta.sizes),
                                                     at::IntArrayRef(meta.strides),
                                                     c10::optional<int64_t>(meta.offset));
      return t;
    };
    for (size_t i = 0; i < checked.size(); ++i) {
      const CheckedTensor& c = checked[i];
      at::Tensor t = dense(c.dense);
      if (c.indices) {
        // The operators that check and assemble a sparse tensor are not the
        // user's: the profiler does not see them either.
        at::DisableRecordFunctionGuard not_profiled;
        at::Tensor indices = dense(*c.indices);
        at::_validate_sparse_coo_tensor_args(indices, t, c.sparse_sizes);
        if (c.coalesced && !SortedWithoutDuplicates(indices)) {
          return absl::InvalidArgumentError(
              absl::StrCat("received tensor ", i,
                           " is marked coalesced but its indices are not sorted "
                           "without duplicates"));
        }
        t = at::_sparse_coo_tensor_unsafe(indices, t, c.sparse_sizes);
        if (c.coalesced) t._coalesced_(true);
      }
      if (c.requires_grad &&
          (c10::isFloatingType(c.dense.dtype) || c10::isComplexType(c.dense.dtype))) {
        t.requires_grad_(true);
      }
      tensors.push_back(std::move(t));
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot rebuild tensor: ", ErrorText(e)));
  }
  return tensors;
}

absl::Status EncodeIValue(const c10::IValue& value, Payload* payload, std::vector<Buffer>* buffers,
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

absl::StatusOr<c10::IValue> DecodeIValue(const Payload& payload, const std::vector<Buffer>& buffers,
                                         bool copy, const OnTensors& received) {
  absl::StatusOr<std::vector<at::Tensor>> tensors = TakeTensors(payload, buffers, copy);
  if (!tensors.ok()) return tensors.status();
  if (received) received(*tensors);
  try {
    return torch::jit::unpickle(payload.pickle().data(), payload.pickle().size(), nullptr,
                                *tensors);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("malformed TorchScript pickle: ", ErrorText(e)));
  }
}

absl::Status EncodeBuiltinCall(const std::string& name, const std::string& overload,
                               const torch::jit::Stack& stack, Payload* payload,
                               std::vector<Buffer>* buffers, std::vector<at::Tensor>* sent) {
  payload->set_op(name);
  payload->set_overload(overload);
  return EncodeIValue(c10::ivalue::Tuple::create(stack), payload, buffers, sent);
}

absl::StatusOr<c10::IValue> RunBuiltinCall(const Payload& payload,
                                           const std::vector<Buffer>& buffers, bool copy,
                                           const OnTensors& received) {
  std::shared_ptr<torch::jit::Operator> op;
  try {
    op = torch::jit::findOperatorFor(c10::OperatorName(payload.op(), payload.overload()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad operator name '", payload.op(), "': ", ErrorText(e)));
  }
  if (op == nullptr) {
    return absl::NotFoundError(absl::StrCat("no builtin operator '", payload.op(),
                                            payload.overload().empty() ? "" : ".",
                                            payload.overload(), "'"));
  }
  absl::StatusOr<torch::jit::Stack> stack = DecodeStack(payload, buffers, copy, received);
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

absl::Status EncodeScriptCall(const std::string& qualified_name, const torch::jit::Stack& stack,
                              Payload* payload, std::vector<Buffer>* buffers,
                              std::vector<at::Tensor>* sent) {
  payload->set_op(qualified_name);
  return EncodeIValue(c10::ivalue::Tuple::create(stack), payload, buffers, sent);
}

absl::StatusOr<c10::IValue> RunScriptCall(const torch::jit::CompilationUnit& cu,
                                          const Payload& payload,
                                          const std::vector<Buffer>& buffers, bool copy,
                                          const OnTensors& received) {
  torch::jit::Function* fn = nullptr;
  try {
    fn = cu.find_function(c10::QualifiedName(payload.op()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad TorchScript function name '", payload.op(), "': ", ErrorText(e)));
  }
  if (fn == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no TorchScript function '", payload.op(),
                     "' on the callee (define it with @torch.jit.script in a "
                     "module both workers import)"));
  }
  absl::StatusOr<torch::jit::Stack> stack = DecodeStack(payload, buffers, copy, received);
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

std::string Serialize(const Payload& payload) { return payload.SerializeAsString(); }

absl::StatusOr<Payload> Parse(const std::string& bytes) {
  Payload payload;
  if (!payload.ParseFromString(bytes)) {
    return absl::InvalidArgumentError("malformed call payload");
  }
  return payload;
}

}  // namespace pycall
}  // namespace tether
