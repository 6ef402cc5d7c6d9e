// Error-propagation helpers for absl::Status / absl::StatusOr (Debian's Abseil has no macros).
//
//   absl::StatusOr<int> Parse(absl::string_view s);
//   absl::Status Use(absl::string_view s) {
//     TETHER_ASSIGN_OR_RETURN(int n, Parse(s));
//     TETHER_RETURN_IF_ERROR(Check(n));
//     return absl::OkStatus();
//   }
//
// Errors carry their kind as data: the code (absl's guide: kDeadlineExceeded a timeout,
// kUnavailable a peer lost, kCancelled shutdown, kInvalidArgument bad input) and, where the code
// is not enough, a payload. An RPC that ran past its own timeout (PyTorch's RpcTimeoutError, as
// opposed to another deadline) is RpcTimeoutError(); IsRpcTimeout() recognises it. A send that
// failed while the peer is up (only injected faults do that: transport/faulty) is
// TransientSendError(); IsTransientSendError() recognises it, and callers that retry lost messages
// retry it too.
#ifndef TETHER_CORE_STATUS_H_
#define TETHER_CORE_STATUS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"

namespace tether {

inline constexpr char kRpcTimeoutPayloadUrl[] = "type.tether.dev/rpc-timeout";

// kDeadlineExceeded with `message`, marked as an RPC's own timeout.
inline absl::Status RpcTimeoutError(absl::string_view message) {
  absl::Status s = absl::DeadlineExceededError(message);
  s.SetPayload(kRpcTimeoutPayloadUrl, absl::Cord("1"));
  return s;
}

inline bool IsRpcTimeout(const absl::Status& s) {
  return s.code() == absl::StatusCode::kDeadlineExceeded &&
         s.GetPayload(kRpcTimeoutPayloadUrl).has_value();
}

inline constexpr char kTransientSendPayloadUrl[] = "type.tether.dev/transient-send-failure";

// kUnavailable with `message`, marked as a failed send of a message that may be sent again.
inline absl::Status TransientSendError(absl::string_view message) {
  absl::Status s = absl::UnavailableError(message);
  s.SetPayload(kTransientSendPayloadUrl, absl::Cord("1"));
  return s;
}

inline bool IsTransientSendError(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable &&
         s.GetPayload(kTransientSendPayloadUrl).has_value();
}

}  // namespace tether

#define TETHER_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status tether_status_ = (expr);          \
    if (!tether_status_.ok()) return tether_status_; \
  } while (0)

#define TETHER_STATUS_CONCAT_INNER_(a, b) a##b
#define TETHER_STATUS_CONCAT_(a, b) TETHER_STATUS_CONCAT_INNER_(a, b)

#define TETHER_ASSIGN_OR_RETURN(lhs, expr) \
  TETHER_ASSIGN_OR_RETURN_IMPL_(TETHER_STATUS_CONCAT_(tether_statusor_, __LINE__), lhs, expr)

#define TETHER_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // TETHER_CORE_STATUS_H_
