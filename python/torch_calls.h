// Torch calls: how tensors, TorchScript values, builtin-operator calls and
// TorchScript-function calls travel in a Tether message, and how a callee runs
// builtin operators and TorchScript functions without Python (no GIL).
//
// Tensors go out of band, as PyTorch's RPC sends them (checked against PyTorch
// 1.13.1): each tensor is described by its dtype, sizes, strides and storage
// offset (TensorMeta) and refers to one of the message's storages; each
// distinct storage travels once per message, as one Buffer holding all its
// bytes, so tensors that share a storage on the sender (`a` and `a[1:]`) share
// one on arrival and keep their strides and offsets. A Buffer aliases its
// storage (it keeps the storage alive; nothing is copied until the transport
// writes it), and a received Buffer becomes the storage of the tensors that
// view it, its deleter holding the Buffer's owner (no copy either).
// PyTorch's rule against shipping a huge storage for a small view: a tensor
// whose storage has at least 8 KiB and at least twice numel * itemsize bytes
// is replaced by its clone() first (compact; strides kept when the view is
// dense, contiguous otherwise), so it no longer shares with the message's
// other tensors. Conjugate and negative bits are resolved before sending (a
// copy when set). A sparse COO tensor travels as its indices and values (two
// dense tensors, the rule above applied to each) with its sizes and coalesced
// flag; the receiver checks them as torch.sparse_coo_tensor does (and that a
// tensor marked coalesced is). CUDA, quantized, sparse CSR and other layouts
// are refused with a clear error. The receiver checks every description against
// the buffers (storage index, sizes, non-negative strides, offset and the
// bytes they reach, with overflow checks; every buffer used) and refuses a bad
// one with kInvalidArgument naming the tensor and what is wrong.
//
// Everything here is thread-safe and never touches Python; errors are returned
// as absl::Status (kInvalidArgument for malformed or unsupported input,
// kNotFound for an unknown operator or function, kInternal for an exception
// raised while running one, with its message).
#ifndef TETHER_PYTHON_TORCH_CALLS_H_
#define TETHER_PYTHON_TORCH_CALLS_H_

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/stack.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/buffer.h"
#include "python/call.pb.h"

namespace torch {
namespace jit {
struct CompilationUnit;
}  // namespace jit
}  // namespace torch

namespace tether {
namespace pycall {

// Appends `tensors` to `payload->tensors` and their storages (each once) to
// `buffers` (aliasing, see above); a tensor's `storage` is its buffer's index
// in `buffers`.
absl::Status AppendTensors(const std::vector<at::Tensor>& tensors, Payload* payload,
                           std::vector<Buffer>* buffers);

// Rebuilds the tensors `payload` describes from `buffers` (one per storage).
// Aliases the buffers unless `copy` is set (a call to oneself must not share
// storage with the caller; tensors of one storage then share one copy) or a
// buffer is not aligned for the element types viewing it.
absl::StatusOr<std::vector<at::Tensor>> TakeTensors(const Payload& payload,
                                                    const std::vector<Buffer>& buffers, bool copy);

// A TorchScript value (tensors out of band) into `payload->pickle` / `tensors`
// and back.
// `sent` (if not null) gets the tensors as they were before sending (for
// autograd recording); `received` is called with the rebuilt tensors before
// the value is unpickled (to give them autograd history).
using OnTensors = std::function<void(const std::vector<at::Tensor>&)>;
absl::Status EncodeIValue(const c10::IValue& value, Payload* payload, std::vector<Buffer>* buffers,
                          std::vector<at::Tensor>* sent = nullptr);
absl::StatusOr<c10::IValue> DecodeIValue(const Payload& payload, const std::vector<Buffer>& buffers,
                                         bool copy, const OnTensors& received = nullptr);

// A builtin-operator call: `stack` holds the arguments already matched to the
// schema of `name`.`overload` (caller side).
absl::Status EncodeBuiltinCall(const std::string& name, const std::string& overload,
                               const torch::jit::Stack& stack, Payload* payload,
                               std::vector<Buffer>* buffers,
                               std::vector<at::Tensor>* sent = nullptr);

// Runs a decoded builtin call through the operator registry (ATen ops dispatch
// through the ATen dispatcher) and returns its result: the single output, a
// tuple of several, or None.
absl::StatusOr<c10::IValue> RunBuiltinCall(const Payload& payload,
                                           const std::vector<Buffer>& buffers, bool copy,
                                           const OnTensors& received = nullptr);

// A TorchScript-function call: `stack` holds arguments matched to the
// function's schema.
absl::Status EncodeScriptCall(const std::string& qualified_name, const torch::jit::Stack& stack,
                              Payload* payload, std::vector<Buffer>* buffers,
                              std::vector<at::Tensor>* sent = nullptr);

// Finds the function in `cu` and runs it on the decoded arguments; returns its
// result.
absl::StatusOr<c10::IValue> RunScriptCall(const torch::jit::CompilationUnit& cu,
                                          const Payload& payload,
                                          const std::vector<Buffer>& buffers, bool copy,
                                          const OnTensors& received = nullptr);

// Serializes `payload` into an envelope payload string, and parses one back
// (kInvalidArgument).
std::string Serialize(const Payload& payload);
absl::StatusOr<Payload> Parse(const std::string& bytes);

}  // namespace pycall
}  // namespace tether

#endif  // TETHER_PYTHON_TORCH_CALLS_H_
