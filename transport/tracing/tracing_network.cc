#include "transport/tracing/tracing_network.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/trace_event.h"

namespace tether {
namespace {

// An "error" marker for a reply that carries an error: "call failed" on the
// caller's track (received), "replied with error" on the callee's (sent); or
// an exception the callee's function raised: "call raised" / "replied with
// exception". Empty for any other message.
std::string ErrorReplyEvent(WorkerId self, bool sent, const Message& m,
                            int64_t ts_us) {
  const wire::Envelope& e = m.envelope;
  if (e.type() == wire::RESPONSE && e.raised()) {
    return TraceEventJson(
        self, "i", sent ? "replied with exception" : "call raised", "error",
        ts_us,
        absl::StrCat("\"args\":{\"", sent ? "to" : "from",
                     "\":", sent ? e.to() : e.from(),
                     ",\"request_id\":", e.request_id(), "}"));
  }
  if (e.type() != wire::ERROR_RESPONSE) return "";
  return TraceEventJson(
      self, "i", sent ? "replied with error" : "call failed", "error", ts_us,
      absl::StrCat("\"args\":{\"", sent ? "to" : "from", "\":",
                   sent ? e.to() : e.from(), ",\"request_id\":", e.request_id(),
                   ",\"error\":", JsonString(e.error().message()), "}"));
}

}  // namespace

TracingNetwork::TracingNetwork(Network* inner, Clock* clock, std::string path,
                               std::string worker_name)
    : inner_(inner),
      clock_(clock),
      path_(std::move(path)),
      worker_name_(std::move(worker_name)) {
  events_.push_back(ProcessNameEvent(inner_->self(), worker_name_));
}

TracingNetwork::~TracingNetwork() { Stop(); }

int64_t TracingNetwork::NowUs() { return absl::ToUnixMicros(clock_->Now()); }

absl::Status TracingNetwork::Start(NetworkObserver* observer) {
  observer_ = observer;
  Mark("start", "worker", "");
  return inner_->Start(this);
}

absl::Status TracingNetwork::Send(WorkerId to, Message message) {
  message.envelope.set_to(to);
  const int64_t now = NowUs();
  std::vector<std::string> events =
      MessageTraceEvents(self(), /*sent=*/true, message, now);
  std::string error = ErrorReplyEvent(self(), /*sent=*/true, message, now);
  if (!error.empty()) events.push_back(std::move(error));
  absl::Status s = inner_->Send(to, std::move(message));
  absl::MutexLock lock(&mu_);
  for (std::string& e : events) events_.push_back(std::move(e));
  if (!s.ok()) {
    events_.push_back(TraceEventJson(
        self(), "i", "send failed", "error", NowUs(),
        absl::StrCat("\"args\":{\"to\":", to,
                     ",\"error\":", JsonString(s.message()), "}")));
  }
  return s;
}

void TracingNetwork::OnMessage(Message message) {
  const int64_t now = NowUs();
  std::vector<std::string> events =
      MessageTraceEvents(self(), /*sent=*/false, message, now);
  std::string error = ErrorReplyEvent(self(), /*sent=*/false, message, now);
  if (!error.empty()) events.push_back(std::move(error));
  {
    absl::MutexLock lock(&mu_);
    for (std::string& e : events) events_.push_back(std::move(e));
  }
  observer_->OnMessage(std::move(message));
}

void TracingNetwork::OnPeerFailed(WorkerId peer, const absl::Status& reason) {
  Mark(absl::StrCat("peer ", peer, " failed"), "error",
       std::string(reason.message()));
  observer_->OnPeerFailed(peer, reason);
}

void TracingNetwork::Mark(const std::string& name, const std::string& category,
                          const std::string& detail) {
  std::string fields =
      detail.empty()
          ? ""
          : absl::StrCat("\"args\":{\"detail\":", JsonString(detail), "}");
  std::string e = TraceEventJson(self(), "i", name, category, NowUs(), fields);
  absl::MutexLock lock(&mu_);
  events_.push_back(std::move(e));
}

size_t TracingNetwork::num_events() const {
  absl::MutexLock lock(&mu_);
  return events_.size();
}

absl::Status TracingNetwork::Flush() {
  std::string out = "{\"traceEvents\":[\n";
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < events_.size(); ++i) {
      absl::StrAppend(&out, i == 0 ? "" : ",\n", events_[i]);
    }
  }
  absl::StrAppend(&out,
                  "\n],\"displayTimeUnit\":\"ms\",\"otherData\":{\"worker\":",
                  JsonString(worker_name_), ",\"id\":", self(), "}}\n");
  std::FILE* f = std::fopen(path_.c_str(), "w");
  if (f == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot write trace file ", path_));
  }
  bool ok = std::fwrite(out.data(), 1, out.size(), f) == out.size();
  ok = std::fclose(f) == 0 && ok;
  return ok ? absl::OkStatus()
            : absl::UnavailableError(
                  absl::StrCat("cannot write trace file ", path_));
}

void TracingNetwork::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
  }
  inner_->Stop();
  Mark("stop", "worker", "");
  absl::Status s = Flush();
  if (!s.ok())
    std::fprintf(stderr, "tether: %s\n", std::string(s.message()).c_str());
}

}  // namespace tether
