// Statuses become Python exceptions here, and only here.
//
// The code says what kind of error it is (kDeadlineExceeded: a timeout, raised as the class
// tether.rpc installs in Hooks::timeout_error, its RpcTimeoutError, both a TimeoutError and a
// RuntimeError; kCancelled: RPC shut down; kUnavailable: the peer is gone; anything else:
// RuntimeError with the message). A call's context adds the worker the call went to. Where the
// code is not enough, a payload says the kind: an RRef leak found by a simulated worker's graceful
// shutdown (RRefLeakError()) is raised as tether._C.RRefLeakError, a RuntimeError subclass, so
// `except RuntimeError` still catches it and tether.sim tells a leak by its type, not its text.
#ifndef TETHER_PYTHON_ERRORS_H_
#define TETHER_PYTHON_ERRORS_H_

#include <pybind11/pybind11.h>

#include <exception>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/network.h"

namespace tether {

// The call an error belongs to, for its message.
struct CallContext {
  WorkerId to = -1;
  std::string to_name;
  absl::Duration timeout = absl::ZeroDuration();
};

inline constexpr char kRRefLeakPayloadUrl[] = "type.tether.dev/rref-leak";

// kDataLoss with `message`, marked as an RRef leak (raised as tether._C.RRefLeakError).
absl::Status RRefLeakError(absl::string_view message);
bool IsRRefLeak(const absl::Status& s);

// Adds tether._C.RRefLeakError (a RuntimeError subclass).
void RegisterErrorBindings(pybind11::module_& m);

// The Python exception for `status` (not raised). GIL held.
pybind11::object MakeException(const absl::Status& status, const CallContext* ctx);

// Raises the exception for `status` (throws pybind11::error_already_set). GIL held.
[[noreturn]] void Raise(const absl::Status& status, const CallContext* ctx = nullptr);

// The error a call's future carries for the exception that decoding its reply raised (a remote
// exception, or a reply that cannot be unpickled), converted as torch.distributed.rpc converts
// it: ValueError and TypeError stay themselves, any other type becomes RuntimeError; the text is
// the Python error's ("KeyError: <message>\n\nAt:\n  <frames>"). GIL held.
std::exception_ptr RemoteErrorAsTorch(const pybind11::error_already_set& e);

template <typename T>
T ValueOrRaise(absl::StatusOr<T> s) {
  if (!s.ok()) Raise(s.status());
  return *std::move(s);
}

}  // namespace tether

#endif  // TETHER_PYTHON_ERRORS_H_
