#include "core/agent.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/callback_gate.h"
#include "core/shutdown_barrier.h"
#include "core/status.h"

namespace tether {
namespace {

// The planted bugs (PlantedBugs, RRefPlantedBugs) take effect only in the testonly variants of the
// core libraries (//core:agent_planted, //core:rref_context_planted), which compile these very
// sources with TETHER_PLANTED_BUGS. In the production libraries kPlantedBugs is false, so every
// planted branch below folds away at compile time and the options' `bugs` fields are ignored.
#ifdef TETHER_PLANTED_BUGS
constexpr bool kPlantedBugs = true;
#else
constexpr bool kPlantedBugs = false;
#endif

}  // namespace

bool PlantedBugsCompiledIn() { return kPlantedBugs; }

template <typename Fn>
auto Agent::Guarded(Fn fn) const {
  return CallbackGate::Guard(gate_, std::move(fn));
}

// The agent as its shutdown barrier sees it.
class Agent::BarrierHost final : public ShutdownBarrier::Host {
 public:
  explicit BarrierHost(Agent* agent) : agent_(agent) {}
  void SendBarrierMessage(WorkerId to, MessageType type, std::string payload) override {
    agent_->SendControl(to, type, std::move(payload));
  }
  ActivitySnapshot LocalActivity() override { return agent_->LocalActivity(); }
  void FinishShutdown(absl::Status status) override { agent_->FinishShutdown(std::move(status)); }

 private:
  Agent* const agent_;
};

struct Agent::PendingCall {
  WorkerId to = -1;
  absl::Time started;
  MessageType type = wire::MESSAGE_TYPE_UNSPECIFIED;
  absl::Duration timeout = absl::ZeroDuration();
  std::optional<Future<Message>> future;
  std::optional<TimerId> timer;
};

struct Agent::PeerState {
  bool failed = false;
  absl::Status failure;  // Why, once failed.
  PeerStats stats;
  uint64_t incarnation = 0;
  // Request ids up to `watermark` count as seen; `seen` holds the ones above
  // it.
  uint64_t watermark = 0;
  absl::btree_set<uint64_t> seen;
};

namespace {

// A request being served; replies once, through the agent.
class IncomingCallImpl : public IncomingCall {
 public:
  using ReplyFn = std::function<void(absl::StatusOr<Message>)>;

  IncomingCallImpl(Message request, absl::Time deadline, ReplyFn reply)
      : request_(std::move(request)), deadline_(deadline), reply_(std::move(reply)) {}

  ~IncomingCallImpl() override {
    if (!replied_) {
      Finish(absl::InternalError(absl::StrCat("the handler for ",
                                              MessageTypeName(request_.envelope.type()),
                                              " dropped the request without replying")));
    }
  }

  const Message& request() const override { return request_; }
  absl::Time deadline() const override { return deadline_; }

  void Reply(std::string payload, std::vector<Buffer> buffers) override {
    Message m;
    m.envelope.set_payload(std::move(payload));
    m.buffers = std::move(buffers);
    Finish(std::move(m));
  }

  void ReplyRaised(std::string payload, std::vector<Buffer> buffers) override {
    Message m;
    m.envelope.set_payload(std::move(payload));
    m.envelope.set_raised(true);
    m.buffers = std::move(buffers);
    Finish(std::move(m));
  }

  void ReplyError(const absl::Status& error) override {
    Finish(error.ok() ? absl::InternalError("handler replied with an OK error") : error);
  }

 private:
  void Finish(absl::StatusOr<Message> result) {
    {
      absl::MutexLock lock(&mu_);
      if (replied_) return;
      replied_ = true;
    }
    reply_(std::move(result));
  }

  const Message request_;
  const absl::Time deadline_;
  const ReplyFn reply_;
  absl::Mutex mu_;
  bool replied_ ABSL_GUARDED_BY(mu_) = false;
};

std::string TimeoutText(absl::Duration timeout) {
  return absl::StrCat("RPC ran for more than set timeout (", absl::ToInt64Milliseconds(timeout),
                      " ms) and will now be marked with an error");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Agent>> Agent::Create(AgentOptions options, Clock* clock,
                                                     Network* network, Executor* executor) {
  if (clock == nullptr || network == nullptr || executor == nullptr) {
    return absl::InvalidArgumentError("agent needs a clock, a network and an executor");
  }
  std::set<WorkerId> ids;
  std::set<std::string> names;
  bool found_self = false;
  for (const WorkerInfo& w : options.workers) {
    if (w.name.empty()) return absl::InvalidArgumentError("worker names must not be empty");
    if (w.id < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker '", w.name, "' has negative id ", w.id));
    }
    if (!ids.insert(w.id).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate worker id ", w.id));
    }
    if (!names.insert(w.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate worker name '", w.name, "'"));
    }
    if (w.id == options.self) found_self = true;
  }
  if (!found_self) {
    return absl::InvalidArgumentError(
        absl::StrCat("this worker's id ", options.self, " is not in the worker list"));
  }
  if (network->self() != options.self) {
    return absl::InvalidArgumentError(absl::StrCat("network is for worker ", network->self(),
                                                   " but the agent is for ", options.self));
  }
  if (options.default_timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("default timeout must not be negative");
  }
  return std::unique_ptr<Agent>(new Agent(std::move(options), clock, network, executor));
}

Agent::Agent(AgentOptions options, Clock* clock, Network* network, Executor* executor)
    : options_(std::move(options)),
      gate_(std::make_shared<CallbackGate>()),
      clock_(clock),
      network_(network),
      executor_(executor),
      workers_(options_.workers),
      default_timeout_(options_.default_timeout),
      shutdown_future_(executor),
      barrier_host_(std::make_unique<BarrierHost>(this)) {
  std::sort(workers_.begin(), workers_.end(),
            [](const WorkerInfo& a, const WorkerInfo& b) { return a.id < b.id; });
  for (const WorkerInfo& w : workers_) {
    ids_by_name_[w.name] = w.id;
    if (w.id == options_.self) self_ = w;
    peers_[w.id] = std::make_unique<PeerState>();
  }
  ShutdownBarrierOptions b;
  b.self = options_.self;
  b.workers = workers_;
  b.timeout = options_.shutdown_timeout;
  b.poll_interval = options_.shutdown_poll_interval;
  b.fails_on_lost_peer = options_.shutdown_fails_on_lost_peer;
  barrier_ = std::make_unique<ShutdownBarrier>(std::move(b), &mu_, clock_, executor_, gate_,
                                               barrier_host_.get());
}

Agent::~Agent() {
  // Callbacks running on other threads finish first; later ones, and replies
  // sent from now on, do nothing.
  gate_->Close();
  std::vector<TimerId> timers;
  std::map<uint64_t, std::unique_ptr<PendingCall>> abandoned;
  bool stop_network = false;
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    for (auto& [id, call] : pending_) {
      if (call->timer) timers.push_back(*call->timer);
    }
    stop_network = started_ && !barrier_->FinishedLocked();
    // From here on nothing is sent: replies owed by requests that pending
    // calls' callbacks still hold are dropped when those callbacks go, below,
    // while every member is alive.
    barrier_->CloseLocked(&timers);
    abandoned.swap(pending_);
  }
  for (TimerId t : timers) clock_->Cancel(t);
  if (stop_network) network_->Stop();
  abandoned.clear();
}

void Agent::RegisterHandler(MessageType type, Handler handler) {
  handlers_[type] = std::move(handler);
}

void Agent::AddActivitySource(ActivitySource source) {
  activity_sources_.push_back(std::move(source));
}

void Agent::AddPeerFailureListener(PeerFailureListener listener) {
  peer_failure_listeners_.push_back(std::move(listener));
}

void Agent::AddShutdownJoinedListener(ShutdownJoinedListener listener) {
  barrier_->AddJoinedListener(std::move(listener));
}

absl::Status Agent::Start() {
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    if (started_) return absl::FailedPreconditionError("agent already started");
    if (barrier_->BegunLocked()) {
      return absl::CancelledError("agent was shut down before it started");
    }
    started_ = true;
  }
  return network_->Start(this);
}

absl::StatusOr<WorkerInfo> Agent::GetWorker(absl::string_view name) const {
  auto it = ids_by_name_.find(name);
  if (it == ids_by_name_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown destination worker '", name, "'"));
  }
  return GetWorker(it->second);
}

absl::StatusOr<WorkerInfo> Agent::GetWorker(WorkerId id) const {
  auto it = std::lower_bound(workers_.begin(), workers_.end(), id,
                             [](const WorkerInfo& w, WorkerId i) { return w.id < i; });
  if (it == workers_.end() || it->id != id) {
    return absl::InvalidArgumentError(absl::StrCat("unknown destination worker id ", id));
  }
  return *it;
}

absl::Duration Agent::default_timeout() const {
  absl::MutexLock lock(&mu_);
  return default_timeout_;
}

void Agent::set_default_timeout(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  default_timeout_ = std::max(timeout, absl::ZeroDuration());
}

void Agent::set_planted_bugs(PlantedBugs bugs) {
  absl::MutexLock lock(&mu_);
  bugs_ = bugs;
}

bool Agent::is_shut_down() const {
  ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
  return barrier_->FinishedLocked();
}

namespace {

size_t BufferBytes(const std::vector<Buffer>& buffers) {
  size_t total = 0;
  for (const Buffer& b : buffers) total += b.size();
  return total;
}

}  // namespace

std::map<WorkerId, PeerStats> Agent::GetPeerStats() const {
  absl::MutexLock lock(&mu_);
  std::map<WorkerId, PeerStats> out;
  for (const auto& [id, peer] : peers_) out[id] = peer->stats;
  return out;
}

std::vector<InFlightCall> Agent::GetInFlightCalls() const {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_->Now();
  std::vector<InFlightCall> out;
  for (const auto& [id, call] : pending_) {
    out.push_back(InFlightCall{id, call->to, call->type, now - call->started});
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const InFlightCall& a, const InFlightCall& b) { return a.age > b.age; });
  return out;
}

std::string Agent::Summary() const {
  std::map<std::string, int64_t> info = GetDebugInfo();
  std::map<WorkerId, PeerStats> peers = GetPeerStats();
  std::vector<InFlightCall> calls = GetInFlightCalls();
  std::string out = absl::StrCat("worker '", self_.name, "' (id ", self_.id, ")\n");
  for (const auto& [key, value] : info) absl::StrAppend(&out, "  ", key, " = ", value, "\n");
  absl::StrAppend(&out,
                  "  peer                calls out  calls in   msgs out   msgs "
                  "in  bytes out   bytes in\n");
  for (const auto& [id, p] : peers) {
    auto w = GetWorker(id);
    absl::StrAppend(
        &out, "  ",
        absl::StrFormat("%-18s %10d %9d %10d %9d %10d %10d", w.ok() ? w->name : absl::StrCat(id),
                        p.calls_sent, p.calls_received, p.messages_sent, p.messages_received,
                        p.bytes_sent, p.bytes_received),
        "\n");
  }
  absl::StrAppend(&out, "  calls in flight: ", calls.size(), "\n");
  for (size_t i = 0; i < calls.size() && i < 10; ++i) {
    auto w = GetWorker(calls[i].to);
    absl::StrAppend(&out, "    #", calls[i].request_id, " ", MessageTypeName(calls[i].type), " to ",
                    w.ok() ? w->name : absl::StrCat(calls[i].to), ", for ",
                    absl::FormatDuration(calls[i].age), "\n");
  }
  return out;
}

std::map<std::string, int64_t> Agent::GetDebugInfo() const {
  absl::MutexLock lock(&mu_);
  std::map<std::string, int64_t> info;
  static constexpr std::pair<const char*, std::atomic<int64_t> Counters::*> kCounters[] = {
      {"calls_sent", &Counters::calls_sent},
      {"calls_received", &Counters::calls_received},
      {"calls_failed", &Counters::calls_failed},
      {"calls_timed_out", &Counters::calls_timed_out},
      {"duplicates_dropped", &Counters::duplicates_dropped},
      {"stale_replies", &Counters::stale_replies},
      {"peers_failed", &Counters::peers_failed},
      {"messages_from_unknown_worker", &Counters::messages_from_unknown_worker},
      {"messages_from_old_incarnation", &Counters::messages_from_old_incarnation},
      {"malformed_control_messages", &Counters::malformed_control_messages},
  };
  for (const auto& [key, field] : kCounters) {
    const int64_t value = (counters_.*field).load(std::memory_order_relaxed);
    if (value != 0) info[key] = value;
  }
  info["client_active_calls"] = static_cast<int64_t>(pending_.size());
  info["server_active_calls"] = server_active_;
  int64_t failed = 0;
  for (const auto& [id, peer] : peers_) failed += peer->failed ? 1 : 0;
  info["peers_failed_now"] = failed;
  info["world_size"] = static_cast<int64_t>(workers_.size());
  absl::Duration oldest = absl::ZeroDuration();
  const absl::Time now = clock_->Now();
  for (const auto& [id, call] : pending_) oldest = std::max(oldest, now - call->started);
  info["oldest_call_age_ms"] = absl::ToInt64Milliseconds(oldest);
  return info;
}

Future<Message> Agent::Call(WorkerId to, MessageType type, std::string payload,
                            std::vector<Buffer> buffers, std::optional<absl::Duration> timeout) {
  Future<Message> future(executor_);
  if (!GetWorker(to).ok()) {
    future.Set(absl::InvalidArgumentError(absl::StrCat("unknown destination worker id ", to)));
    return future;
  }
  if (IsReply(type) || IsShutdownMessage(type) || !wire::MessageType_IsValid(type) ||
      type == wire::MESSAGE_TYPE_UNSPECIFIED) {
    future.Set(absl::InvalidArgumentError(
        absl::StrCat("cannot send a request of type ", MessageTypeName(type))));
    return future;
  }
  if (timeout && *timeout < absl::ZeroDuration()) {
    future.Set(absl::InvalidArgumentError("a call's timeout must not be negative"));
    return future;
  }
  Message m;
  uint64_t id;
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    if (!started_ || barrier_->FinishedLocked()) {
      future.Set(absl::CancelledError(absl::StrCat("RPC agent of worker '", self_.name, "' is ",
                                                   started_ ? "shut down" : "not started")));
      return future;
    }
    id = next_request_id_++;
    auto call = std::make_unique<PendingCall>();
    call->to = to;
    call->type = type;
    call->started = clock_->Now();
    call->timeout = timeout.value_or(default_timeout_);
    call->future = future;
    if (call->timeout > absl::ZeroDuration() && !(kPlantedBugs && bugs_.lose_timeout_timer)) {
      call->timer = clock_->Schedule(clock_->Now() + call->timeout,
                                     Guarded([this, id] { OnCallTimeout(id); }));
    }
    m.envelope.set_timeout_ns(absl::ToInt64Nanoseconds(call->timeout));
    pending_[id] = std::move(call);
    Count(counters_.calls_sent);
    ++events_;
    PeerStats& stats = peers_[to]->stats;
    ++stats.calls_sent;
    ++stats.messages_sent;
    stats.bytes_sent += static_cast<int64_t>(payload.size() + BufferBytes(buffers));
  }
  m.envelope.set_type(type);
  m.envelope.set_request_id(id);
  m.envelope.set_from(self_.id);
  m.envelope.set_to(to);
  m.envelope.set_from_incarnation(options_.incarnation);
  m.envelope.set_payload(std::move(payload));
  m.buffers = std::move(buffers);
  absl::Status sent = network_->Send(to, std::move(m));
  if (!sent.ok()) CompleteCall(id, sent);
  return future;
}

void Agent::CompleteCall(uint64_t request_id, absl::StatusOr<Message> result, bool from_reply) {
  std::optional<Future<Message>> future;
  std::optional<TimerId> timer;
  WorkerId to = -1;
  MessageType type = wire::MESSAGE_TYPE_UNSPECIFIED;
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(request_id);
    if (it == pending_.end()) return;
    future = std::move(it->second->future);
    timer = it->second->timer;
    to = it->second->to;
    type = it->second->type;
    pending_.erase(it);
    ++events_;
    if (!result.ok()) Count(counters_.calls_failed);
  }
  if (timer) clock_->Cancel(*timer);
  if (!result.ok() && !from_reply && options_.call_observer != nullptr) {
    options_.call_observer->OnCallFailed(to, type, request_id, result.status());
  }
  future->Set(std::move(result));
}

void Agent::OnCallTimeout(uint64_t request_id) {
  std::string text;
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(request_id);
    if (it == pending_.end()) return;
    it->second->timer.reset();
    Count(counters_.calls_timed_out);
    auto to = GetWorker(it->second->to);
    text = absl::StrCat(MessageTypeName(it->second->type), " to '", to.ok() ? to->name : "?",
                        "': ", TimeoutText(it->second->timeout));
  }
  CompleteCall(request_id, RpcTimeoutError(text));
}

void Agent::OnMessage(Message message) {
  const wire::Envelope& env = message.envelope;
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    auto peer = peers_.find(env.from());
    if (peer == peers_.end()) {
      Count(counters_.messages_from_unknown_worker);
      return;
    }
    PeerState& p = *peer->second;
    ++p.stats.messages_received;
    p.stats.bytes_received += static_cast<int64_t>(env.payload().size() + message.BufferBytes());
    if (env.from_incarnation() < p.incarnation) {
      Count(counters_.messages_from_old_incarnation);
      return;
    }
    if (env.from_incarnation() > p.incarnation) {
      p.incarnation = env.from_incarnation();
      p.failed = false;
      p.failure = absl::OkStatus();
      // The new incarnation has not declared anything yet.
      barrier_->OnPeerRestartedLocked(env.from());
      p.watermark = 0;
      p.seen.clear();
    }
  }
  if (IsReply(env.type())) {
    HandleReply(std::move(message));
    return;
  }
  executor_->Post(Guarded([this, m = std::move(message)]() mutable {
    if (IsShutdownMessage(m.envelope.type())) {
      if (!barrier_->HandleMessage(m).ok()) Count(counters_.malformed_control_messages);
    } else {
      HandleRequest(std::move(m));
    }
  }));
}

void Agent::HandleReply(Message message) {
  uint64_t id = message.envelope.request_id();
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(id);
    if (it == pending_.end() || it->second->to != message.envelope.from()) {
      Count(counters_.stale_replies);
      return;
    }
  }
  if (message.envelope.type() == wire::ERROR_RESPONSE) {
    CompleteCall(id, ErrorFromEnvelope(message.envelope), /*from_reply=*/true);
    return;
  }
  absl::Status check = message.CheckBuffers();
  if (!check.ok()) {
    CompleteCall(id, absl::InternalError(absl::StrCat("malformed reply: ", check.message())));
    return;
  }
  CompleteCall(id, std::move(message), /*from_reply=*/true);
}

bool Agent::IsDuplicateLocked(WorkerId from, uint64_t request_id) {
  PeerState& p = *peers_[from];
  if (request_id <= p.watermark) return true;
  if (!p.seen.insert(request_id).second) return true;
  while (!p.seen.empty() && *p.seen.begin() == p.watermark + 1) {
    p.watermark = *p.seen.begin();
    p.seen.erase(p.seen.begin());
  }
  // Forget the oldest holes (requests that never arrived) beyond the window.
  while (p.seen.size() > options_.dedup_window) {
    p.watermark = *p.seen.begin();
    p.seen.erase(p.seen.begin());
  }
  return false;
}

void Agent::HandleRequest(Message message) {
  const WorkerId from = message.envelope.from();
  const uint64_t id = message.envelope.request_id();
  Handler handler;
  absl::Time deadline = absl::InfiniteFuture();
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    if (barrier_->FinishedLocked()) return;
    if (IsDuplicateLocked(from, id) && !(kPlantedBugs && bugs_.process_duplicates)) {
      Count(counters_.duplicates_dropped);
      return;
    }
    ++server_active_;
    ++events_;
    Count(counters_.calls_received);
    ++peers_[from]->stats.calls_received;
    auto it = handlers_.find(message.envelope.type());
    if (it != handlers_.end()) handler = it->second;
    if (message.envelope.timeout_ns() > 0) {
      deadline = clock_->Now() + absl::Nanoseconds(message.envelope.timeout_ns());
    }
  }
  absl::Status check = message.CheckBuffers();
  if (!check.ok()) {
    SendReply(from, id,
              absl::InvalidArgumentError(absl::StrCat("malformed request: ", check.message())));
    return;
  }
  if (!handler) {
    SendReply(from, id,
              absl::UnimplementedError(absl::StrCat("worker '", self_.name,
                                                    "' has no handler for message type ",
                                                    MessageTypeName(message.envelope.type()))));
    return;
  }
  auto call = std::make_shared<IncomingCallImpl>(
      std::move(message), deadline, Guarded([this, from, id](absl::StatusOr<Message> reply) {
        SendReply(from, id, std::move(reply));
      }));
  handler(std::move(call));
}

void Agent::SendReply(WorkerId to, uint64_t request_id, absl::StatusOr<Message> reply) {
  bool drop = false;
  uint64_t incarnation = options_.incarnation;
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    --server_active_;
    ++events_;
    drop = ((kPlantedBugs && bugs_.drop_reply_at_shutdown) && barrier_->BegunLocked()) ||
           barrier_->FinishedLocked();
  }
  if (drop) return;
  Message m;
  if (reply.ok()) {
    m = std::move(*reply);
    m.envelope.set_type(wire::RESPONSE);
  } else {
    m.envelope.set_type(wire::ERROR_RESPONSE);
    SetError(reply.status(), &m.envelope);
  }
  m.envelope.set_request_id(request_id);
  m.envelope.set_from(self_.id);
  m.envelope.set_to(to);
  m.envelope.set_from_incarnation(incarnation);
  {
    absl::MutexLock lock(&mu_);
    auto peer = peers_.find(to);
    if (peer != peers_.end()) {
      ++peer->second->stats.messages_sent;
      peer->second->stats.bytes_sent +=
          static_cast<int64_t>(m.envelope.payload().size() + m.BufferBytes());
    }
  }
  // A failed send means the caller is gone; it learns so from its own network.
  network_->Send(to, std::move(m)).IgnoreError();
}

void Agent::OnPeerFailed(WorkerId peer, const absl::Status& reason) {
  std::vector<uint64_t> failed_calls;
  std::string name = absl::StrCat(peer);
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    auto it = peers_.find(peer);
    if (it == peers_.end() || it->second->failed) return;
    it->second->failed = true;
    it->second->failure = reason;
    barrier_->OnPeerFailedLocked(peer, reason);
    Count(counters_.peers_failed);
    ++events_;
    for (const auto& [id, call] : pending_) {
      if (call->to == peer) failed_calls.push_back(id);
    }
  }
  auto info = GetWorker(peer);
  if (info.ok()) name = info->name;
  for (uint64_t id : failed_calls) {
    CompleteCall(id, absl::UnavailableError(absl::StrCat(
                         "worker '", name, "' failed before replying: ", reason.message())));
  }
  executor_->Post(Guarded([this, peer, reason] {
    for (const PeerFailureListener& l : peer_failure_listeners_) l(peer, reason);
    barrier_->HandlePeerFailure(peer, reason);
  }));
}

ActivitySnapshot Agent::LocalActivity() const {
  ActivitySnapshot a;
  {
    absl::MutexLock lock(&mu_);
    a.pending = static_cast<int64_t>(pending_.size()) + server_active_;
    a.events = events_;
  }
  for (const ActivitySource& s : activity_sources_) {
    ActivitySnapshot x = s();
    a.pending += x.pending;
    a.events += x.events;
  }
  return a;
}

void Agent::SendControl(WorkerId to, MessageType type, std::string payload) {
  Message m;
  m.envelope.set_type(type);
  m.envelope.set_from(self_.id);
  m.envelope.set_to(to);
  m.envelope.set_from_incarnation(options_.incarnation);
  m.envelope.set_payload(std::move(payload));
  network_->Send(to, std::move(m)).IgnoreError();
}

Future<Unit> Agent::Shutdown(bool graceful) {
  bool end_graceful = false;
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    end_graceful = !graceful && barrier_->PendingLocked();
    if (barrier_->BegunLocked() && !end_graceful) return shutdown_future_;
  }
  if (end_graceful) {
    FinishShutdown(absl::CancelledError(
        "the graceful shutdown was ended by a non-graceful one before it completed"));
    return shutdown_future_;
  }
  bool run_barrier = false;  // Graceful, and there is a network to hold the barrier over.
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    if (barrier_->BegunLocked()) return shutdown_future_;
    run_barrier = graceful && started_;
    barrier_->BeginLocked(run_barrier);
  }
  if (run_barrier) {
    barrier_->Run();
  } else {
    FinishShutdown(absl::OkStatus());
  }
  return shutdown_future_;
}

ShutdownProgress Agent::GetShutdownProgress() const { return barrier_->Progress(); }

void Agent::FinishShutdown(absl::Status status) {
  std::vector<uint64_t> calls;
  std::vector<TimerId> timers;
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    if (!barrier_->FinishLocked(&timers)) return;
    for (const auto& [id, call] : pending_) calls.push_back(id);
  }
  for (TimerId t : timers) clock_->Cancel(t);
  for (uint64_t id : calls) {
    CompleteCall(id, absl::CancelledError(absl::StrCat("RPC agent of worker '", self_.name,
                                                       "' shut down before the call completed")));
  }
  network_->Stop();
  if (status.ok()) {
    shutdown_future_.Set(Unit{});
  } else {
    shutdown_future_.Set(status);
  }
}

}  // namespace tether
