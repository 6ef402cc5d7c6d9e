#include "transport/faulty/faulty_network.h"

#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace tether {

absl::StatusOr<FaultyNetworkOptions> FaultyNetworkOptions::FromNames(
    const std::vector<std::string>& fail_types, int num_fail_sends,
    const std::map<std::string, double>& delay_seconds) {
  FaultyNetworkOptions o;
  if (num_fail_sends < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_fail_sends must be >= 0, got ", num_fail_sends));
  }
  o.num_fail_sends = num_fail_sends;
  for (const std::string& name : fail_types) {
    MessageType t;
    absl::Status s = ParseMessageType(name, &t);
    if (!s.ok()) return s;
    o.fail_types.insert(t);
  }
  for (const auto& [name, seconds] : delay_seconds) {
    MessageType t;
    absl::Status s = ParseMessageType(name, &t);
    if (!s.ok()) return s;
    if (seconds < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("delay of ", name, " must be >= 0, got ", seconds));
    }
    o.delays[t] = absl::Seconds(seconds);
  }
  return o;
}

FaultyNetwork::FaultyNetwork(Network* inner, Clock* clock,
                             FaultyNetworkOptions options)
    : inner_(inner), clock_(clock), options_(std::move(options)) {}

FaultyNetwork::~FaultyNetwork() { Stop(); }

absl::Status FaultyNetwork::Send(WorkerId to, Message message) {
  const MessageType type = message.envelope.type();
  absl::Duration delay = absl::ZeroDuration();
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return absl::UnavailableError("network is stopped");
    if (options_.fail_types.count(type) > 0 &&
        failed_[type] < options_.num_fail_sends) {
      int n = ++failed_[type];
      return absl::UnavailableError(absl::StrCat(
          "Send attempt failed intentionally for ", MessageTypeName(type),
          " (injected fault ", n, " of ", options_.num_fail_sends, ")"));
    }
    auto it = options_.delays.find(type);
    if (it != options_.delays.end()) delay = it->second;
  }
  if (delay <= absl::ZeroDuration())
    return inner_->Send(to, std::move(message));
  auto shared = std::make_shared<Message>(std::move(message));
  auto id = std::make_shared<TimerId>(0);
  absl::MutexLock lock(&mu_);
  *id = clock_->Schedule(clock_->Now() + delay, [this, to, shared, id] {
    {
      absl::MutexLock lock(&mu_);
      if (stopped_ || delayed_.erase(*id) == 0) return;
    }
    // A failure now is like one on the wire: the peer's failure is reported by
    // the inner network.
    inner_->Send(to, std::move(*shared)).IgnoreError();
  });
  delayed_.insert(*id);
  return absl::OkStatus();
}

void FaultyNetwork::Stop() {
  std::set<TimerId> pending;
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
    pending.swap(delayed_);
  }
  for (TimerId t : pending) clock_->Cancel(t);
  inner_->Stop();
}

std::map<MessageType, int> FaultyNetwork::failed() const {
  absl::MutexLock lock(&mu_);
  return failed_;
}

}  // namespace tether
