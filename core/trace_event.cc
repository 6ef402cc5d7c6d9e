#include "core/trace_event.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tether {
namespace {

bool IsCallType(MessageType t) {
  return !IsReply(t) &&
         !(t >= wire::SHUTDOWN_INTENT && t <= wire::SHUTDOWN_ACK);
}

uint64_t Mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h;
}

}  // namespace

std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppendFormat(&out, "\\u%04x", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string TraceEventJson(int pid, absl::string_view phase,
                           absl::string_view name, absl::string_view category,
                           int64_t ts_us, absl::string_view fields) {
  std::string json = absl::StrCat(
      "{\"name\":", JsonString(name), ",\"cat\":", JsonString(category),
      ",\"ph\":\"", phase, "\",\"pid\":", pid, ",\"tid\":0,\"ts\":", ts_us);
  if (phase == "i") absl::StrAppend(&json, ",\"s\":\"t\"");
  if (!fields.empty()) absl::StrAppend(&json, ",", fields);
  return json + "}";
}

std::string ProcessNameEvent(int pid, absl::string_view name) {
  return absl::StrCat("{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":", pid,
                      ",\"args\":{\"name\":", JsonString(name), "}}");
}

std::vector<std::string> MessageTraceEvents(WorkerId self, bool sent,
                                            const Message& m, int64_t ts_us) {
  const wire::Envelope& e = m.envelope;
  const std::string type = MessageTypeName(e.type());
  const WorkerId from = sent ? self : e.from();
  const WorkerId to = sent ? e.to() : self;
  std::vector<std::string> out;
  out.push_back(TraceEventJson(
      self, "i", absl::StrCat(sent ? "send " : "recv ", type), "message", ts_us,
      absl::StrCat(
          "\"args\":{\"from\":", from, ",\"to\":", to, ",\"request_id\":",
          e.request_id(), ",\"bytes\":", e.payload().size() + m.BufferBytes(),
          e.type() == wire::ERROR_RESPONSE
              ? absl::StrCat(",\"error\":", JsonString(e.error().message()))
              : "",
          "}")));
  uint64_t flow = Mix(Mix(Mix(Mix(0, from), to), e.type()), e.request_id());
  out.push_back(TraceEventJson(self, sent ? "s" : "f", type, "flow", ts_us,
                               absl::StrCat("\"id\":", flow & 0xffffffffffffull,
                                            sent ? "" : ",\"bp\":\"e\"")));
  // A call is a span on the caller's track, from its request to its reply.
  if (sent && IsCallType(e.type()) && e.request_id() != 0) {
    const uint64_t call = (static_cast<uint64_t>(from) << 40) ^ e.request_id();
    out.push_back(TraceEventJson(self, "b",
                                 absl::StrCat(type, " -> worker", to), "call",
                                 ts_us, absl::StrCat("\"id\":", call)));
  } else if (!sent && IsReply(e.type())) {
    const uint64_t call = (static_cast<uint64_t>(self) << 40) ^ e.request_id();
    out.push_back(TraceEventJson(self, "e", "", "call", ts_us,
                                 absl::StrCat("\"id\":", call)));
  }
  return out;
}

}  // namespace tether
