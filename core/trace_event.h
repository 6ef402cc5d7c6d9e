// Chrome trace events (the JSON array format Perfetto and chrome://tracing
// open) for what Tether does: messages sent and received, calls as spans from
// request to reply, and markers. The simulator's traces (sim/process/host.h)
// and real-run traces (transport/tracing/) use the same events, so both open
// and merge the same way.
//
//   std::vector<std::string> events = MessageTraceEvents(self, /*sent=*/true, message, ts_us);
//
// Pure formatting: timestamps are given, nothing here reads a clock.
#ifndef TETHER_CORE_TRACE_EVENT_H_
#define TETHER_CORE_TRACE_EVENT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "core/message.h"

namespace tether {

// `s` as a JSON string literal, quotes included.
std::string JsonString(absl::string_view s);

// One event on worker `pid`'s track. `fields`: extra JSON members ("\"id\":3"),
// or empty.
std::string TraceEventJson(int pid, absl::string_view phase, absl::string_view name,
                           absl::string_view category, int64_t ts_us,
                           absl::string_view fields = "");

// Names worker `pid`'s track.
std::string ProcessNameEvent(int pid, absl::string_view name);

// The events for `message` sent (or received) by worker `self` at `ts_us`: an
// instant with its type, peer, request id, size and any error; a flow arrow
// from send to receive; and the call span, begun by a request and ended by its
// reply on the caller's track.
std::vector<std::string> MessageTraceEvents(WorkerId self, bool sent, const Message& message,
                                            int64_t ts_us);

}  // namespace tether

#endif  // TETHER_CORE_TRACE_EVENT_H_
