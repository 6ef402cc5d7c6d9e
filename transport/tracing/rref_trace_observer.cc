#include "transport/tracing/rref_trace_observer.h"

#include "absl/strings/str_cat.h"

namespace tether {

std::string RRefTraceObserver::EventName(RRefEvent::Kind kind) {
  switch (kind) {
    case RRefEvent::kOwnerCreated:
      return "rref owner created";
    case RRefEvent::kFunctionRun:
      return "rref function run";
    case RRefEvent::kValueSet:
      return "rref value set";
    case RRefEvent::kOwnerFreed:
      return "rref owner freed";
    case RRefEvent::kValueServed:
      return "rref value served";
    case RRefEvent::kForkAdded:
      return "rref fork added";
    case RRefEvent::kForkRemoved:
      return "rref fork removed";
    case RRefEvent::kUserCreated:
      return "rref user created";
    case RRefEvent::kUserConfirmed:
      return "rref user confirmed";
    case RRefEvent::kUserReleased:
      return "rref user released";
    case RRefEvent::kUserDeleteSent:
      return "rref user delete sent";
    case RRefEvent::kChildPending:
      return "rref child pending";
    case RRefEvent::kChildResolved:
      return "rref child resolved";
    case RRefEvent::kPeerFailed:
      return "rref peer failed";
  }
  return absl::StrCat("rref event ", static_cast<int>(kind));
}

std::string RRefTraceObserver::EventDetail(const RRefEvent& event) {
  std::string out;
  if (event.rref.valid()) absl::StrAppend(&out, "rref ", event.rref.ToString());
  if (event.fork.valid()) {
    absl::StrAppend(&out, out.empty() ? "" : " ", "fork ",
                    event.fork.ToString());
  }
  if (event.peer >= 0) {
    absl::StrAppend(&out, out.empty() ? "" : " ", "peer ", event.peer);
  }
  return out;
}

void RRefTraceObserver::OnRRefEvent(const RRefEvent& event) {
  trace_->Mark(EventName(event.kind), "rref", EventDetail(event));
  if (next_ != nullptr) next_->OnRRefEvent(event);
}

}  // namespace tether
