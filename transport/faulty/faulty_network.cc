#include "transport/faulty/faulty_network.h"

#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status.h"

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

FaultyNetwork::FaultyNetwork(Network* inner, Clock* clock, FaultyNetworkOptions options)
    : inner_(inner), clock_(clock), options_(std::move(options)) {}

FaultyNetwork::~FaultyNetwork() { Stop(); }

absl::Status FaultyNetwork::Start(NetworkObserver* observer) {
  observer_ = observer;
  return inner_->Start(&relay_);
}

void FaultyNetwork::Relay::OnMessage(Message message) {
  owner_->observer_->OnMessage(std::move(message));
}

void FaultyNetwork::Relay::OnPeerFailed(WorkerId peer, const absl::Status& reason) {
  {
    absl::MutexLock lock(&owner_->mu_);
    owner_->failed_peers_.insert(peer);
  }
  owner_->observer_->OnPeerFailed(peer, reason);
}

absl::Status FaultyNetwork::Send(WorkerId to, Message message) {
  const MessageType type = message.envelope.type();
  absl::Duration delay = absl::ZeroDuration();
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return absl::UnavailableError("network is stopped");
    if (options_.fail_types.count(type) > 0 && failed_[type] < options_.num_fail_sends) {
      int n = ++failed_[type];
      return TransientSendError(absl::StrCat("Send attempt failed intentionally for ",
                                             MessageTypeName(type), " (injected fault ", n, " of ",
                                             options_.num_fail_sends, ")"));
    }
    auto it = options_.delays.find(type);
    if (it != options_.delays.end()) delay = it->second;
    if (delay > absl::ZeroDuration() && failed_peers_.count(to) > 0) {
      return absl::UnavailableError(absl::StrCat("worker ", to, " has failed"));
    }
  }
  if (delay <= absl::ZeroDuration()) return inner_->Send(to, std::move(message));
  auto id = std::make_shared<TimerId>(0);
  absl::MutexLock lock(&mu_);
  if (stopped_) return absl::UnavailableError("network is stopped");
  const uint64_t seq = next_seq_++;
  queues_[{to, type}].push_back(Delayed{seq, std::move(message)});
  // Guarded: the timer may outlive this object (Stop() cannot take back one already running).
  *id = clock_->Schedule(
      clock_->Now() + delay,
      CallbackGate::Guard(gate_, [this, to, type, seq, id] { SendDelayed(to, type, seq, id); }));
  delayed_.insert(*id);
  return absl::OkStatus();
}

void FaultyNetwork::SendDelayed(WorkerId to, MessageType type, uint64_t seq,
                                const std::shared_ptr<const TimerId>& timer) {
  std::vector<Message> due;
  {
    absl::MutexLock lock(&mu_);
    // `*timer` is set under mu_ once Schedule() returned: read it under mu_ too.
    if (stopped_ || delayed_.erase(*timer) == 0) return;
    // This message and those of its type to `to` sent before it (their deadlines are no later;
    // a clock may run timers of one deadline in any order, as the simulator's does).
    auto it = queues_.find({to, type});
    if (it == queues_.end()) return;
    std::deque<Delayed>& queue = it->second;
    while (!queue.empty() && queue.front().seq <= seq) {
      due.push_back(std::move(queue.front().message));
      queue.pop_front();
    }
    if (queue.empty()) queues_.erase(it);
  }
  // A failure now is like one on the wire: the peer's failure is reported by the inner network.
  // (Timer callbacks of one clock run one at a time, so these keep their order.)
  for (Message& m : due) inner_->Send(to, std::move(m)).IgnoreError();
}

void FaultyNetwork::Stop() {
  std::set<TimerId> pending;
  std::map<std::pair<WorkerId, MessageType>, std::deque<Delayed>> dropped;
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
    pending.swap(delayed_);
    dropped.swap(queues_);
  }
  // A delayed send running on the clock's thread finishes first; later ones do nothing.
  gate_->Close();
  for (TimerId t : pending) clock_->Cancel(t);
  inner_->Stop();
}

std::map<MessageType, int> FaultyNetwork::failed() const {
  absl::MutexLock lock(&mu_);
  return failed_;
}

}  // namespace tether
