#include "transport/tracing/call_trace_observer.h"

#include "absl/strings/str_cat.h"

namespace tether {

void CallTraceObserver::OnCallFailed(WorkerId to, MessageType type,
                                     uint64_t request_id,
                                     const absl::Status& status) {
  trace_->Mark("call failed", "error",
               absl::StrCat(MessageTypeName(type), " #", request_id,
                            " to worker ", to, ": ", status.ToString()));
}

}  // namespace tether
