// RRef values as the extension keeps them. An owner keeps the Python object itself (or the
// TorchScript value of a builtin or script call); it is serialized only when another worker
// fetches it, so unpicklable values can live in RRefs and be used through rpc proxies.
//
// Ownership: the RRef context holds an RRefValue whose `object` is an OwnedValue; the Python
// value inside is a PyRef, so the context may drop it on any thread (py_ownership.h).
#ifndef TETHER_PYTHON_OWNED_VALUE_H_
#define TETHER_PYTHON_OWNED_VALUE_H_

#include <ATen/core/ivalue.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>

#include "absl/status/statusor.h"
#include "core/rref_context.h"
#include "python/dist_autograd_runner.h"
#include "python/py_ownership.h"

namespace tether {

struct OwnedValue {
  std::unique_ptr<PyRef> py;  // The Python value, or a remote-exception record.
  bool is_exception = false;
  std::optional<c10::IValue> ivalue;
};

RRefValue MakeOwned(std::shared_ptr<OwnedValue> value);

// An owner value as an RRefValue of this process (GIL held): takes `value`'s reference.
RRefValue MakeOwnedPython(pybind11::object value, bool is_exception);

// The RRef context's serializer: what a fetch of an owner value sends. Any thread, without the
// GIL (takes it for a Python value). RRefs inside a Python value are forked for the fetching
// worker (FetchInfo::caller), as RRefs inside a call's arguments are for the callee. A to_here()
// made inside a distributed autograd context (its attachment is the caller's AutogradMeta) joins it
// and records the value's tensors that require grad (a send function; the reply carries the meta).
absl::StatusOr<RRefValue> SerializeOwned(const RRefValue& v, const FetchInfo& info);

// GIL held. An RRef value as a Python object; raises a stored remote exception. `copy`: copy
// tensors out of the buffers (a value from this very process). `autograd` (may be null) records
// a fetched value that the owner recorded in distributed autograd context `context` (the
// fetch's; a value recorded in another is an error).
pybind11::object ValueToPython(const RRefValue& v, WorkerId sender, bool copy,
                               dist_autograd::LocalAutograd* autograd = nullptr,
                               ContextId context = dist_autograd::kNoContext);

}  // namespace tether

#endif  // TETHER_PYTHON_OWNED_VALUE_H_
