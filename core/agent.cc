#include "core/agent.h"

#include <algorithm>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/callback_gate.h"
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

// What one worker reports to the leader in one poll round.
struct BarrierReport {
  bool declared = false;
  ActivitySnapshot activity;
  // The worker knows every worker joined, and has run its joined listeners.
  bool joined = false;

  bool operator==(const BarrierReport& o) const {
    return declared == o.declared && activity.pending == o.activity.pending &&
           activity.events == o.activity.events && joined == o.joined;
  }
};

struct Agent::ShutdownState {
  bool graceful = false;
  bool finished = false;
  // Every worker has joined (the leader saw it, or a follower was told); the
  // joined listeners have run (or are running) once it is set.
  bool joined = false;
  bool listeners_ran = false;
  bool listeners_done = false;  // Reports say "joined" only once they have returned.
  std::optional<TimerId> deadline_timer;
  std::optional<TimerId> poll_timer;
  // Bumped by every SchedulePollLocked(): a poll whose generation is stale (its timer was
  // replaced while it was queued on the executor) does nothing, so one chain of polls runs.
  uint64_t poll_gen = 0;
  // Leader only.
  std::set<WorkerId> declared;  // Workers that called Shutdown(true).
  uint64_t round = 0;
  std::map<WorkerId, BarrierReport> reports;
  std::optional<std::map<WorkerId, BarrierReport>> previous;
  bool committing = false;
  // Leader: the barrier is being ended (a worker was lost before the join); the
  // ABORT is resent until every live follower acknowledged it, then it stops.
  std::optional<std::string> abort_text;
  absl::Time abort_deadline;  // When it stops without the missing acks (kAbortAckBound).
  std::set<WorkerId> acked;
  // Follower only: the leader's commit arrived, so the barrier is complete.
  // Set before the ack goes out: once the leader has it, it may stop, and
  // its stop must not then count as a failure.
  bool committed = false;
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

std::string EncodeReport(uint64_t round, const BarrierReport& r) {
  return absl::StrCat(round, ",", r.declared ? 1 : 0, ",", r.activity.pending, ",",
                      r.activity.events, ",", r.joined ? 1 : 0);
}

bool DecodeReport(absl::string_view payload, uint64_t* round, BarrierReport* r) {
  std::vector<absl::string_view> parts = absl::StrSplit(payload, ',');
  if (parts.size() != 5) return false;
  int declared = 0, joined = 0;
  if (!absl::SimpleAtoi(parts[0], round) || !absl::SimpleAtoi(parts[1], &declared) ||
      !absl::SimpleAtoi(parts[2], &r->activity.pending) ||
      !absl::SimpleAtoi(parts[3], &r->activity.events) || !absl::SimpleAtoi(parts[4], &joined)) {
    return false;
  }
  r->declared = declared != 0;
  r->joined = joined != 0;
  return true;
}

// A leader's query: "<round>", or "<round>,1" once every worker has joined.
std::string EncodeQuery(uint64_t round, bool joined) {
  return joined ? absl::StrCat(round, ",1") : absl::StrCat(round);
}

bool DecodeQuery(absl::string_view payload, uint64_t* round, bool* joined) {
  std::vector<absl::string_view> parts = absl::StrSplit(payload, ',');
  if (parts.empty() || parts.size() > 2 || !absl::SimpleAtoi(parts[0], round)) return false;
  *joined = parts.size() == 2 && parts[1] == "1";
  return parts.size() == 1 || *joined;
}

// Bound on how long a leader ending the barrier waits for the followers' acks of its ABORT (a
// follower whose threads are all busy cannot ack; the abort must not wait on it).
constexpr absl::Duration kAbortAckBound = absl::Seconds(1);

bool IsShutdownMessage(MessageType type) {
  return type >= wire::SHUTDOWN_INTENT && type <= wire::SHUTDOWN_ABORT;
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
      shutdown_future_(executor) {
  std::sort(workers_.begin(), workers_.end(),
            [](const WorkerInfo& a, const WorkerInfo& b) { return a.id < b.id; });
  for (const WorkerInfo& w : workers_) {
    ids_by_name_[w.name] = w.id;
    if (w.id == options_.self) self_ = w;
    peers_[w.id] = std::make_unique<PeerState>();
  }
}

Agent::~Agent() {
  // Callbacks running on other threads finish first; later ones, and replies
  // sent from now on, do nothing.
  gate_->Close();
  std::vector<TimerId> timers;
  std::map<uint64_t, std::unique_ptr<PendingCall>> abandoned;
  bool stop_network = false;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, call] : pending_) {
      if (call->timer) timers.push_back(*call->timer);
    }
    if (shutdown_) {
      if (shutdown_->deadline_timer) timers.push_back(*shutdown_->deadline_timer);
      if (shutdown_->poll_timer) timers.push_back(*shutdown_->poll_timer);
    }
    stop_network = started_ && !(shutdown_ && shutdown_->finished);
    // From here on nothing is sent: replies owed by requests that pending
    // calls' callbacks still hold are dropped when those callbacks go, below,
    // while every member is alive.
    if (!shutdown_) shutdown_ = std::make_unique<ShutdownState>();
    shutdown_->finished = true;
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
  joined_listeners_.push_back(std::move(listener));
}

absl::Status Agent::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_) return absl::FailedPreconditionError("agent already started");
    if (shutdown_) return absl::CancelledError("agent was shut down before it started");
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
  absl::MutexLock lock(&mu_);
  return shutdown_ != nullptr && shutdown_->finished;
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
    absl::MutexLock lock(&mu_);
    if (!started_ || (shutdown_ && shutdown_->finished)) {
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
    absl::MutexLock lock(&mu_);
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
      if (shutdown_) {
        shutdown_->declared.erase(env.from());
        shutdown_->reports.erase(env.from());
        shutdown_->acked.erase(env.from());
      }
      if (env.from() == workers_.front().id) leader_abort_.reset();
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
      HandleShutdownMessage(std::move(m));
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
    absl::MutexLock lock(&mu_);
    if (shutdown_ && shutdown_->finished) return;
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
    absl::MutexLock lock(&mu_);
    --server_active_;
    ++events_;
    drop = ((kPlantedBugs && bugs_.drop_reply_at_shutdown) && shutdown_ != nullptr) ||
           (shutdown_ && shutdown_->finished);
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
    absl::MutexLock lock(&mu_);
    auto it = peers_.find(peer);
    if (it == peers_.end() || it->second->failed) return;
    it->second->failed = true;
    it->second->failure = reason;
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
    bool finish_unavailable = false;
    bool abort = false;
    {
      absl::MutexLock lock(&mu_);
      if (!shutdown_ || shutdown_->finished || !shutdown_->graceful) return;
      const WorkerId leader = workers_.front().id;
      if (self_.id != leader && peer == leader) {
        // After its commit the leader stops as soon as it has our ack: that
        // is the barrier's end, not a failure (the commit finishes us).
        if (shutdown_->committed) return;
        finish_unavailable = true;
      } else if (self_.id == leader) {
        abort =
            options_.shutdown_fails_on_lost_peer && !shutdown_->joined && !shutdown_->abort_text;
        shutdown_->reports.erase(peer);
        if (shutdown_->committing || shutdown_->abort_text) shutdown_->acked.insert(peer);
      }
    }
    if (finish_unavailable) {
      FinishShutdown(LeaderGoneStatus());
    } else if (abort) {
      AbortBarrier(peer, reason);
    } else {
      MaybeJoin();
      MaybeCommit();
    }
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
  bool start_now = false;
  bool was_started = false;
  bool leader = false;
  bool end_graceful = false;
  {
    absl::MutexLock lock(&mu_);
    end_graceful = shutdown_ && !graceful && shutdown_->graceful && !shutdown_->finished;
    if (shutdown_ && !end_graceful) return shutdown_future_;
  }
  if (end_graceful) {
    FinishShutdown(absl::CancelledError(
        "the graceful shutdown was ended by a non-graceful one before it completed"));
    return shutdown_future_;
  }
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return shutdown_future_;
    shutdown_ = std::make_unique<ShutdownState>();
    shutdown_->graceful = graceful && started_;
    was_started = started_;
    start_now = true;
    leader = workers_.front().id == self_.id;
    if (leader) shutdown_->declared.insert(self_.id);
    if (shutdown_->graceful && options_.shutdown_timeout > absl::ZeroDuration()) {
      shutdown_->deadline_timer =
          clock_->Schedule(clock_->Now() + options_.shutdown_timeout, Guarded([this] {
                             executor_->Post(Guarded([this] {
                               FinishShutdown(absl::DeadlineExceededError(
                                   "graceful shutdown did not complete within its timeout; "
                                   "stopped without it"));
                             }));
                           }));
    }
  }
  if (!start_now) return shutdown_future_;
  std::optional<absl::Status> leader_gone;
  if (graceful && was_started && !leader) {
    bool gone = false;
    {
      absl::MutexLock lock(&mu_);
      gone = leader_abort_.has_value() || peers_[workers_.front().id]->failed;
    }
    if (gone) leader_gone = LeaderGoneStatus();
  }
  if (!graceful || !was_started) {
    FinishShutdown(absl::OkStatus());
  } else if (leader_gone) {
    FinishShutdown(*leader_gone);
  } else if (leader) {
    executor_->Post(Guarded([this] { LeaderPoll(0); }));
  }
  return shutdown_future_;
}

absl::Status Agent::LeaderGoneStatus() const {
  absl::MutexLock lock(&mu_);
  // The leader's own reason, when its ABORT came before its stop.
  if (leader_abort_) return *leader_abort_;
  const WorkerInfo& leader = workers_.front();
  const absl::Status& why = peers_.at(leader.id)->failure;
  return absl::UnavailableError(
      absl::StrCat("the shutdown leader ", leader.name, " is gone", why.ok() ? "" : " (",
                   why.ok() ? "" : why.message(), why.ok() ? "" : ")",
                   "; this worker stopped without the graceful shutdown barrier"));
}

ShutdownProgress Agent::GetShutdownProgress() const {
  absl::MutexLock lock(&mu_);
  ShutdownProgress p;
  p.leader = workers_.front().id;
  if (!shutdown_ || !shutdown_->graceful || shutdown_->finished) return p;
  p.pending = true;
  p.joined = shutdown_->joined;
  p.aborting = shutdown_->abort_text.has_value();
  if (self_.id != p.leader) return p;
  for (const WorkerInfo& w : workers_) {
    if (peers_.at(w.id)->failed && w.id != self_.id) continue;
    if (!shutdown_->declared.count(w.id)) p.not_joined.push_back(w.id);
    auto it = shutdown_->reports.find(w.id);
    const BarrierReport* r = it != shutdown_->reports.end() ? &it->second : nullptr;
    if (r == nullptr && shutdown_->previous) {
      auto prev = shutdown_->previous->find(w.id);
      if (prev != shutdown_->previous->end()) r = &prev->second;
    }
    if (r != nullptr && r->activity.pending != 0) p.busy.push_back(w.id);
  }
  return p;
}

void Agent::RunJoinedListeners() {
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || !shutdown_->joined || shutdown_->listeners_ran) return;
    shutdown_->listeners_ran = true;
  }
  for (const ShutdownJoinedListener& l : joined_listeners_) l();
  absl::MutexLock lock(&mu_);
  shutdown_->listeners_done = true;
}

void Agent::MaybeJoin() {
  std::vector<WorkerId> targets;
  uint64_t round = 0;
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || shutdown_->finished || shutdown_->joined || shutdown_->abort_text ||
        workers_.front().id != self_.id) {
      return;
    }
    ShutdownState& s = *shutdown_;
    for (const WorkerInfo& w : workers_) {
      if (w.id != self_.id && peers_[w.id]->failed) {
        // The barrier fails instead (the task OnPeerFailed posted, or the next poll).
        if (options_.shutdown_fails_on_lost_peer) return;
        continue;
      }
      if (!s.declared.count(w.id)) return;
    }
    s.joined = true;
    // The quiescence phase starts with a fresh round that tells every worker.
    ++s.round;
    s.reports.clear();
    s.previous.reset();
    round = s.round;
    for (const WorkerInfo& w : workers_) {
      if (w.id != self_.id && !peers_[w.id]->failed) targets.push_back(w.id);
    }
  }
  RunJoinedListeners();
  BarrierReport mine{true, LocalActivity(), false};
  {
    absl::MutexLock lock(&mu_);
    mine.joined = shutdown_->listeners_done;
    if (shutdown_->round == round) shutdown_->reports[self_.id] = mine;
  }
  for (WorkerId w : targets) SendControl(w, wire::SHUTDOWN_QUERY, EncodeQuery(round, true));
}

void Agent::AbortBarrier(WorkerId lost, const absl::Status& reason) {
  std::vector<WorkerId> targets;
  std::string name = absl::StrCat("worker ", lost);
  std::string text;
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || shutdown_->finished || shutdown_->joined || shutdown_->abort_text) return;
    for (const WorkerInfo& w : workers_) {
      if (w.id == lost) name = w.name;
      if (w.id != self_.id && !peers_[w.id]->failed) targets.push_back(w.id);
    }
    text = absl::StrCat(name, " is gone (", reason.message(), ")",
                        shutdown_->declared.count(lost) ? " after it called shutdown() but" : "",
                        " before every worker called shutdown(): the graceful shutdown barrier "
                        "cannot complete");
    shutdown_->abort_deadline = clock_->Now() + kAbortAckBound;
    // Followers must hear why before this worker stops (its stop alone would only tell them
    // that the leader is gone): ABORT until acknowledged, resent by LeaderPoll.
    shutdown_->abort_text = text;
    shutdown_->acked.clear();
    if (!targets.empty()) SchedulePollLocked();
  }
  for (WorkerId w : targets) SendControl(w, wire::SHUTDOWN_ABORT, text);
  MaybeCommit();
}

void Agent::SchedulePollLocked() {
  ShutdownState& s = *shutdown_;
  if (s.poll_timer) clock_->Cancel(*s.poll_timer);
  const uint64_t gen = ++s.poll_gen;
  absl::Duration delay = options_.shutdown_poll_interval;
  if (s.abort_text)
    delay = std::min(delay, std::max(absl::ZeroDuration(), s.abort_deadline - clock_->Now()));
  s.poll_timer = clock_->Schedule(clock_->Now() + delay, Guarded([this, gen] {
                                    executor_->Post(Guarded([this, gen] { LeaderPoll(gen); }));
                                  }));
}

void Agent::LeaderPoll(uint64_t gen) {
  std::vector<WorkerId> targets;
  uint64_t round;
  bool commit_resend = false;
  std::optional<std::string> abort_text;
  bool abort_expired = false;
  bool joined = false;
  std::optional<std::pair<WorkerId, absl::Status>> lost;
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || shutdown_->finished) return;
    ShutdownState& s = *shutdown_;
    if (gen != s.poll_gen) return;  // Replaced while queued.
    s.poll_timer.reset();           // The timer that ran this poll (if any) has fired.
    if (options_.shutdown_fails_on_lost_peer && !s.joined && !s.abort_text) {
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && peers_[w.id]->failed) {
          lost.emplace(w.id, peers_[w.id]->failure);
          break;
        }
      }
    }
  }
  if (lost) {
    AbortBarrier(lost->first, lost->second);
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || shutdown_->finished) return;
    ShutdownState& s = *shutdown_;
    if (gen != s.poll_gen || s.poll_timer) return;  // Another chain was started meanwhile.
    SchedulePollLocked();
    if (s.committing || s.abort_text) {
      commit_resend = true;
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && !s.acked.count(w.id) && !peers_[w.id]->failed) {
          targets.push_back(w.id);
        }
      }
      if (s.abort_text) {
        abort_text = *s.abort_text;
        abort_expired = clock_->Now() >= s.abort_deadline;
      }
    } else {
      bool complete = true;
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && !peers_[w.id]->failed && !s.reports.count(w.id)) complete = false;
      }
      // An incomplete round is resent to whoever has not answered; a complete
      // one that did not commit starts the next.
      if (complete || s.round == 0) {
        ++s.round;
        s.reports.clear();
      }
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && !peers_[w.id]->failed && !s.reports.count(w.id)) {
          targets.push_back(w.id);
        }
      }
    }
    round = s.round;
    joined = s.listeners_done;
  }
  if (abort_expired) {
    FinishShutdown(absl::UnavailableError(*abort_text));
    return;
  }
  if (commit_resend) {
    for (WorkerId w : targets) {
      if (abort_text) {
        SendControl(w, wire::SHUTDOWN_ABORT, *abort_text);
      } else {
        SendControl(w, wire::SHUTDOWN_COMMIT, "");
      }
    }
    if (abort_text) MaybeCommit();
    return;
  }
  BarrierReport mine{true, LocalActivity(), joined};
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_->round == round) shutdown_->reports[self_.id] = mine;
  }
  for (WorkerId w : targets) SendControl(w, wire::SHUTDOWN_QUERY, EncodeQuery(round, joined));
  MaybeJoin();
  MaybeCommit();
}

void Agent::MaybeCommit() {
  std::vector<WorkerId> targets;
  bool finish = false;
  bool next_round = false;
  std::optional<absl::Status> abort_status;
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || shutdown_->finished || workers_.front().id != self_.id) return;
    ShutdownState& s = *shutdown_;
    if (s.abort_text) {
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && !s.acked.count(w.id) && !peers_[w.id]->failed) return;
      }
      abort_status = absl::UnavailableError(*s.abort_text);
    } else if (s.committing) {
      finish = true;
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && !s.acked.count(w.id) && !peers_[w.id]->failed) finish = false;
      }
    } else {
      std::map<WorkerId, BarrierReport> live;
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && peers_[w.id]->failed) continue;
        auto it = s.reports.find(w.id);
        if (it == s.reports.end()) return;  // Round incomplete.
        live[w.id] = it->second;
      }
      bool quiet = s.joined;
      for (const auto& [id, r] : live) {
        if (!r.declared || !r.joined || r.activity.pending != 0) quiet = false;
      }
      if (quiet && s.previous && *s.previous == live) {
        s.committing = true;
        if (s.poll_timer) {
          clock_->Cancel(*s.poll_timer);
          s.poll_timer.reset();
        }
        finish = true;
        for (const WorkerInfo& w : workers_) {
          if (w.id != self_.id && !peers_[w.id]->failed) {
            targets.push_back(w.id);
            finish = false;
          }
        }
        if (!finish) SchedulePollLocked();
      } else {
        s.previous = std::move(live);
        // A quiet round is confirmed by an immediate second one; otherwise wait
        // for the poll.
        next_round = quiet;
        if (next_round) {
          ++s.round;
          s.reports.clear();
        }
      }
    }
  }
  if (abort_status) {
    FinishShutdown(*abort_status);
    return;
  }
  for (WorkerId w : targets) SendControl(w, wire::SHUTDOWN_COMMIT, "");
  if (finish) {
    FinishShutdown(absl::OkStatus());
    return;
  }
  if (next_round) {
    std::vector<WorkerId> all;
    uint64_t round;
    {
      absl::MutexLock lock(&mu_);
      round = shutdown_->round;
      for (const WorkerInfo& w : workers_) {
        if (w.id != self_.id && !peers_[w.id]->failed) all.push_back(w.id);
      }
    }
    BarrierReport mine{true, LocalActivity(), false};
    {
      absl::MutexLock lock(&mu_);
      mine.joined = shutdown_->listeners_done;
      if (shutdown_->round == round) shutdown_->reports[self_.id] = mine;
    }
    for (WorkerId w : all) SendControl(w, wire::SHUTDOWN_QUERY, EncodeQuery(round, true));
    MaybeCommit();
  }
}

void Agent::HandleShutdownMessage(Message message) {
  const wire::Envelope& env = message.envelope;
  switch (env.type()) {
    case wire::SHUTDOWN_QUERY: {
      uint64_t round = 0;
      bool joined = false;
      if (!DecodeQuery(env.payload(), &round, &joined)) {
        Count(counters_.malformed_control_messages);
        return;
      }
      BarrierReport r;
      {
        absl::MutexLock lock(&mu_);
        if (shutdown_ && shutdown_->finished) return;
        r.declared = shutdown_ != nullptr && shutdown_->graceful;
        // Only a worker that declared can have been counted in the join.
        if (joined && r.declared) shutdown_->joined = true;
      }
      if (joined && r.declared) RunJoinedListeners();
      {
        absl::MutexLock lock(&mu_);
        r.joined = shutdown_ != nullptr && shutdown_->listeners_done;
      }
      r.activity = LocalActivity();
      SendControl(env.from(), wire::SHUTDOWN_REPORT, EncodeReport(round, r));
      return;
    }
    case wire::SHUTDOWN_REPORT: {
      uint64_t round = 0;
      BarrierReport r;
      if (!DecodeReport(env.payload(), &round, &r)) {
        Count(counters_.malformed_control_messages);
        return;
      }
      {
        absl::MutexLock lock(&mu_);
        if (!shutdown_ || shutdown_->finished || shutdown_->committing ||
            shutdown_->round != round) {
          return;
        }
        shutdown_->reports[env.from()] = r;
        if (r.declared) shutdown_->declared.insert(env.from());
      }
      MaybeJoin();
      MaybeCommit();
      return;
    }
    case wire::SHUTDOWN_COMMIT: {
      bool commit = false;
      {
        absl::MutexLock lock(&mu_);
        // A commit only follows this worker's own declaration.
        commit = shutdown_ && shutdown_->graceful;
        if (commit) shutdown_->committed = true;
      }
      SendControl(env.from(), wire::SHUTDOWN_ACK, "");
      if (commit) FinishShutdown(absl::OkStatus());
      return;
    }
    case wire::SHUTDOWN_ABORT: {
      if (env.from() != workers_.front().id) {
        Count(counters_.malformed_control_messages);
        return;
      }
      absl::Status why = absl::UnavailableError(absl::StrCat(
          env.payload(), " (the shutdown leader ", workers_.front().name, " ended the barrier)"));
      bool finish = false;
      {
        // Recorded before the ack: once the leader has it, it may stop, and whatever then
        // reports its stop (or a later Shutdown(true)) must give this reason.
        absl::MutexLock lock(&mu_);
        if (!leader_abort_) leader_abort_ = why;
        finish = shutdown_ && shutdown_->graceful && !shutdown_->finished;
      }
      SendControl(env.from(), wire::SHUTDOWN_ACK, "");
      if (finish) FinishShutdown(why);
      return;
    }
    case wire::SHUTDOWN_ACK: {
      {
        absl::MutexLock lock(&mu_);
        if (!shutdown_ || !(shutdown_->committing || shutdown_->abort_text)) return;
        shutdown_->acked.insert(env.from());
      }
      MaybeCommit();
      return;
    }
    default:
      return;
  }
}

void Agent::FinishShutdown(absl::Status status) {
  std::vector<uint64_t> calls;
  std::vector<TimerId> timers;
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ || shutdown_->finished) return;
    shutdown_->finished = true;
    for (const auto& [id, call] : pending_) calls.push_back(id);
    if (shutdown_->deadline_timer) timers.push_back(*shutdown_->deadline_timer);
    if (shutdown_->poll_timer) timers.push_back(*shutdown_->poll_timer);
    shutdown_->deadline_timer.reset();
    shutdown_->poll_timer.reset();
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
