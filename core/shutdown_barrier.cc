#include "core/shutdown_barrier.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tether {
namespace {

// Bound on how long a leader ending the barrier waits for the followers' acks of its ABORT (a
// follower whose threads are all busy cannot ack; the abort must not wait on it).
constexpr absl::Duration kAbortAckBound = absl::Seconds(1);

absl::Status Malformed(MessageType type, absl::string_view payload) {
  return absl::InvalidArgumentError(
      absl::StrCat("malformed ", MessageTypeName(type), " payload '", payload, "'"));
}

}  // namespace

std::string EncodeBarrierReport(const RoundReport& report) {
  const BarrierReport& r = report.report;
  return absl::StrCat(report.round, ",", r.declared ? 1 : 0, ",", r.activity.pending, ",",
                      r.activity.events, ",", r.joined ? 1 : 0);
}

absl::StatusOr<RoundReport> DecodeBarrierReport(absl::string_view payload) {
  std::vector<absl::string_view> parts = absl::StrSplit(payload, ',');
  RoundReport out;
  BarrierReport& r = out.report;
  int declared = 0, joined = 0;
  if (parts.size() != 5 || !absl::SimpleAtoi(parts[0], &out.round) ||
      !absl::SimpleAtoi(parts[1], &declared) || !absl::SimpleAtoi(parts[2], &r.activity.pending) ||
      !absl::SimpleAtoi(parts[3], &r.activity.events) || !absl::SimpleAtoi(parts[4], &joined)) {
    return Malformed(wire::SHUTDOWN_REPORT, payload);
  }
  r.declared = declared != 0;
  r.joined = joined != 0;
  return out;
}

std::string EncodeBarrierQuery(const BarrierQuery& query) {
  return query.joined ? absl::StrCat(query.round, ",1") : absl::StrCat(query.round);
}

absl::StatusOr<BarrierQuery> DecodeBarrierQuery(absl::string_view payload) {
  std::vector<absl::string_view> parts = absl::StrSplit(payload, ',');
  BarrierQuery out;
  if (parts.empty() || parts.size() > 2 || !absl::SimpleAtoi(parts[0], &out.round)) {
    return Malformed(wire::SHUTDOWN_QUERY, payload);
  }
  out.joined = parts.size() == 2 && parts[1] == "1";
  if (parts.size() == 2 && !out.joined) return Malformed(wire::SHUTDOWN_QUERY, payload);
  return out;
}

std::string EncodeBarrierAbort(absl::string_view lost_name, const absl::Status& reason,
                               bool lost_had_declared) {
  return absl::StrCat(lost_name, " is gone (", reason.message(), ")",
                      lost_had_declared ? " after it called shutdown() but" : "",
                      " before every worker called shutdown(): the graceful shutdown barrier "
                      "cannot complete");
}

absl::Status DecodeBarrierAbort(absl::string_view payload, absl::string_view leader_name) {
  return absl::UnavailableError(
      absl::StrCat(payload, " (the shutdown leader ", leader_name, " ended the barrier)"));
}

struct ShutdownBarrier::State {
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

ShutdownBarrier::ShutdownBarrier(ShutdownBarrierOptions options, absl::Mutex* mu, Clock* clock,
                                 Executor* executor, std::shared_ptr<CallbackGate> gate, Host* host)
    : options_(std::move(options)),
      mu_(mu),
      clock_(clock),
      executor_(executor),
      gate_(std::move(gate)),
      host_(host) {}

ShutdownBarrier::~ShutdownBarrier() = default;

void ShutdownBarrier::AddJoinedListener(ShutdownJoinedListener listener) {
  listeners_.push_back(std::move(listener));
}

bool ShutdownBarrier::BegunLocked() const {
  mu_->AssertHeld();
  return state_ != nullptr;
}

bool ShutdownBarrier::FinishedLocked() const {
  mu_->AssertHeld();
  return state_ != nullptr && state_->finished;
}

bool ShutdownBarrier::PendingLocked() const {
  mu_->AssertHeld();
  return state_ != nullptr && state_->graceful && !state_->finished;
}

void ShutdownBarrier::BeginLocked(bool graceful) {
  mu_->AssertHeld();
  state_ = std::make_unique<State>();
  state_->graceful = graceful;
  if (IsLeader()) state_->declared.insert(options_.self);
  if (graceful && options_.timeout > absl::ZeroDuration()) {
    state_->deadline_timer =
        clock_->Schedule(clock_->Now() + options_.timeout, Guarded([this] {
                           executor_->Post(Guarded([this] {
                             Finish(absl::DeadlineExceededError(
                                 "graceful shutdown did not complete within its timeout; "
                                 "stopped without it"));
                           }));
                         }));
  }
}

bool ShutdownBarrier::FinishLocked(std::vector<TimerId>* timers) {
  mu_->AssertHeld();
  if (!state_ || state_->finished) return false;
  state_->finished = true;
  if (state_->deadline_timer) timers->push_back(*state_->deadline_timer);
  if (state_->poll_timer) timers->push_back(*state_->poll_timer);
  state_->deadline_timer.reset();
  state_->poll_timer.reset();
  return true;
}

void ShutdownBarrier::CloseLocked(std::vector<TimerId>* timers) {
  mu_->AssertHeld();
  if (state_) {
    if (state_->deadline_timer) timers->push_back(*state_->deadline_timer);
    if (state_->poll_timer) timers->push_back(*state_->poll_timer);
  } else {
    state_ = std::make_unique<State>();
  }
  state_->finished = true;
}

void ShutdownBarrier::OnPeerFailedLocked(WorkerId peer, const absl::Status& reason) {
  mu_->AssertHeld();
  lost_[peer] = reason;
}

void ShutdownBarrier::OnPeerRestartedLocked(WorkerId peer) {
  mu_->AssertHeld();
  lost_.erase(peer);
  if (state_) {
    state_->declared.erase(peer);
    state_->reports.erase(peer);
    state_->acked.erase(peer);
  }
  if (peer == workers_.front().id) leader_abort_.reset();
}

void ShutdownBarrier::Run() {
  if (IsLeader()) {
    executor_->Post(Guarded([this] { LeaderPoll(0); }));
    return;
  }
  bool gone = false;
  {
    absl::MutexLock lock(mu_);
    gone = leader_abort_.has_value() || LostLocked(workers_.front().id);
  }
  if (gone) Finish(LeaderGoneStatus());
}

absl::Status ShutdownBarrier::LeaderGoneStatus() const {
  absl::MutexLock lock(mu_);
  // The leader's own reason, when its ABORT came before its stop.
  if (leader_abort_) return *leader_abort_;
  const WorkerInfo& leader = workers_.front();
  auto lost = lost_.find(leader.id);
  const absl::Status why = lost != lost_.end() ? lost->second : absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("the shutdown leader ", leader.name, " is gone", why.ok() ? "" : " (",
                   why.ok() ? "" : why.message(), why.ok() ? "" : ")",
                   "; this worker stopped without the graceful shutdown barrier"));
}

ShutdownProgress ShutdownBarrier::Progress() const {
  absl::MutexLock lock(mu_);
  ShutdownProgress p;
  p.leader = workers_.front().id;
  if (!state_ || !state_->graceful || state_->finished) return p;
  p.pending = true;
  p.joined = state_->joined;
  p.aborting = state_->abort_text.has_value();
  if (options_.self != p.leader) return p;
  for (const WorkerInfo& w : workers_) {
    if (LostLocked(w.id) && w.id != options_.self) continue;
    if (!state_->declared.count(w.id)) p.not_joined.push_back(w.id);
    auto it = state_->reports.find(w.id);
    const BarrierReport* r = it != state_->reports.end() ? &it->second : nullptr;
    if (r == nullptr && state_->previous) {
      auto prev = state_->previous->find(w.id);
      if (prev != state_->previous->end()) r = &prev->second;
    }
    if (r != nullptr && r->activity.pending != 0) p.busy.push_back(w.id);
  }
  return p;
}

void ShutdownBarrier::RunJoinedListeners() {
  {
    absl::MutexLock lock(mu_);
    if (!state_ || !state_->joined || state_->listeners_ran) return;
    state_->listeners_ran = true;
  }
  for (const ShutdownJoinedListener& l : listeners_) l();
  absl::MutexLock lock(mu_);
  state_->listeners_done = true;
}

void ShutdownBarrier::MaybeJoin() {
  std::vector<WorkerId> targets;
  uint64_t round = 0;
  {
    absl::MutexLock lock(mu_);
    if (!state_ || state_->finished || state_->joined || state_->abort_text || !IsLeader()) {
      return;
    }
    State& s = *state_;
    for (const WorkerInfo& w : workers_) {
      if (w.id != options_.self && LostLocked(w.id)) {
        // The barrier fails instead (the task HandlePeerFailure runs in, or the next poll).
        if (options_.fails_on_lost_peer) return;
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
      if (w.id != options_.self && !LostLocked(w.id)) targets.push_back(w.id);
    }
  }
  RunJoinedListeners();
  BarrierReport mine{true, LocalActivity(), false};
  {
    absl::MutexLock lock(mu_);
    mine.joined = state_->listeners_done;
    if (state_->round == round) state_->reports[options_.self] = mine;
  }
  for (WorkerId w : targets) Send(w, wire::SHUTDOWN_QUERY, EncodeBarrierQuery({round, true}));
}

void ShutdownBarrier::AbortBarrier(WorkerId lost, const absl::Status& reason) {
  std::vector<WorkerId> targets;
  std::string name = absl::StrCat("worker ", lost);
  std::string text;
  {
    absl::MutexLock lock(mu_);
    if (!state_ || state_->finished || state_->joined || state_->abort_text) return;
    for (const WorkerInfo& w : workers_) {
      if (w.id == lost) name = w.name;
      if (w.id != options_.self && !LostLocked(w.id)) targets.push_back(w.id);
    }
    text = EncodeBarrierAbort(name, reason, state_->declared.count(lost) != 0);
    state_->abort_deadline = clock_->Now() + kAbortAckBound;
    // Followers must hear why before this worker stops (its stop alone would only tell them
    // that the leader is gone): ABORT until acknowledged, resent by LeaderPoll.
    state_->abort_text = text;
    state_->acked.clear();
    if (!targets.empty()) SchedulePollLocked();
  }
  for (WorkerId w : targets) Send(w, wire::SHUTDOWN_ABORT, text);
  MaybeCommit();
}

void ShutdownBarrier::SchedulePollLocked() {
  State& s = *state_;
  if (s.poll_timer) clock_->Cancel(*s.poll_timer);
  const uint64_t gen = ++s.poll_gen;
  absl::Duration delay = options_.poll_interval;
  if (s.abort_text)
    delay = std::min(delay, std::max(absl::ZeroDuration(), s.abort_deadline - clock_->Now()));
  s.poll_timer = clock_->Schedule(clock_->Now() + delay, Guarded([this, gen] {
                                    executor_->Post(Guarded([this, gen] { LeaderPoll(gen); }));
                                  }));
}

void ShutdownBarrier::LeaderPoll(uint64_t gen) {
  std::vector<WorkerId> targets;
  uint64_t round;
  bool commit_resend = false;
  std::optional<std::string> abort_text;
  bool abort_expired = false;
  bool joined = false;
  std::optional<std::pair<WorkerId, absl::Status>> lost;
  {
    absl::MutexLock lock(mu_);
    if (!state_ || state_->finished) return;
    State& s = *state_;
    if (gen != s.poll_gen) return;  // Replaced while queued.
    s.poll_timer.reset();           // The timer that ran this poll (if any) has fired.
    if (options_.fails_on_lost_peer && !s.joined && !s.abort_text) {
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && LostLocked(w.id)) {
          lost.emplace(w.id, lost_.at(w.id));
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
    absl::MutexLock lock(mu_);
    if (!state_ || state_->finished) return;
    State& s = *state_;
    if (gen != s.poll_gen || s.poll_timer) return;  // Another chain was started meanwhile.
    SchedulePollLocked();
    if (s.committing || s.abort_text) {
      commit_resend = true;
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && !s.acked.count(w.id) && !LostLocked(w.id)) {
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
        if (w.id != options_.self && !LostLocked(w.id) && !s.reports.count(w.id)) complete = false;
      }
      // An incomplete round is resent to whoever has not answered; a complete
      // one that did not commit starts the next.
      if (complete || s.round == 0) {
        ++s.round;
        s.reports.clear();
      }
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && !LostLocked(w.id) && !s.reports.count(w.id)) {
          targets.push_back(w.id);
        }
      }
    }
    round = s.round;
    joined = s.listeners_done;
  }
  if (abort_expired) {
    Finish(absl::UnavailableError(*abort_text));
    return;
  }
  if (commit_resend) {
    for (WorkerId w : targets) {
      if (abort_text) {
        Send(w, wire::SHUTDOWN_ABORT, *abort_text);
      } else {
        Send(w, wire::SHUTDOWN_COMMIT, "");
      }
    }
    if (abort_text) MaybeCommit();
    return;
  }
  BarrierReport mine{true, LocalActivity(), joined};
  {
    absl::MutexLock lock(mu_);
    if (state_->round == round) state_->reports[options_.self] = mine;
  }
  for (WorkerId w : targets) Send(w, wire::SHUTDOWN_QUERY, EncodeBarrierQuery({round, joined}));
  MaybeJoin();
  MaybeCommit();
}

void ShutdownBarrier::MaybeCommit() {
  std::vector<WorkerId> targets;
  bool finish = false;
  bool next_round = false;
  std::optional<absl::Status> abort_status;
  {
    absl::MutexLock lock(mu_);
    if (!state_ || state_->finished || !IsLeader()) return;
    State& s = *state_;
    if (s.abort_text) {
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && !s.acked.count(w.id) && !LostLocked(w.id)) return;
      }
      abort_status = absl::UnavailableError(*s.abort_text);
    } else if (s.committing) {
      finish = true;
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && !s.acked.count(w.id) && !LostLocked(w.id)) finish = false;
      }
    } else {
      std::map<WorkerId, BarrierReport> live;
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && LostLocked(w.id)) continue;
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
          if (w.id != options_.self && !LostLocked(w.id)) {
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
    Finish(*abort_status);
    return;
  }
  for (WorkerId w : targets) Send(w, wire::SHUTDOWN_COMMIT, "");
  if (finish) {
    Finish(absl::OkStatus());
    return;
  }
  if (next_round) {
    std::vector<WorkerId> all;
    uint64_t round;
    {
      absl::MutexLock lock(mu_);
      round = state_->round;
      for (const WorkerInfo& w : workers_) {
        if (w.id != options_.self && !LostLocked(w.id)) all.push_back(w.id);
      }
    }
    BarrierReport mine{true, LocalActivity(), false};
    {
      absl::MutexLock lock(mu_);
      mine.joined = state_->listeners_done;
      if (state_->round == round) state_->reports[options_.self] = mine;
    }
    for (WorkerId w : all) Send(w, wire::SHUTDOWN_QUERY, EncodeBarrierQuery({round, true}));
    MaybeCommit();
  }
}

absl::Status ShutdownBarrier::HandleMessage(const Message& message) {
  const wire::Envelope& env = message.envelope;
  switch (env.type()) {
    case wire::SHUTDOWN_QUERY: {
      absl::StatusOr<BarrierQuery> query = DecodeBarrierQuery(env.payload());
      if (!query.ok()) return query.status();
      BarrierReport r;
      {
        absl::MutexLock lock(mu_);
        if (state_ && state_->finished) return absl::OkStatus();
        r.declared = state_ != nullptr && state_->graceful;
        // Only a worker that declared can have been counted in the join.
        if (query->joined && r.declared) state_->joined = true;
      }
      if (query->joined && r.declared) RunJoinedListeners();
      {
        absl::MutexLock lock(mu_);
        r.joined = state_ != nullptr && state_->listeners_done;
      }
      r.activity = LocalActivity();
      Send(env.from(), wire::SHUTDOWN_REPORT, EncodeBarrierReport({query->round, r}));
      return absl::OkStatus();
    }
    case wire::SHUTDOWN_REPORT: {
      absl::StatusOr<RoundReport> report = DecodeBarrierReport(env.payload());
      if (!report.ok()) return report.status();
      {
        absl::MutexLock lock(mu_);
        if (!state_ || state_->finished || state_->committing || state_->round != report->round) {
          return absl::OkStatus();
        }
        state_->reports[env.from()] = report->report;
        if (report->report.declared) state_->declared.insert(env.from());
      }
      MaybeJoin();
      MaybeCommit();
      return absl::OkStatus();
    }
    case wire::SHUTDOWN_COMMIT: {
      bool commit = false;
      {
        absl::MutexLock lock(mu_);
        // A commit only follows this worker's own declaration.
        commit = state_ && state_->graceful;
        if (commit) state_->committed = true;
      }
      Send(env.from(), wire::SHUTDOWN_ACK, "");
      if (commit) Finish(absl::OkStatus());
      return absl::OkStatus();
    }
    case wire::SHUTDOWN_ABORT: {
      if (env.from() != workers_.front().id) {
        return absl::InvalidArgumentError(
            absl::StrCat("SHUTDOWN_ABORT from worker ", env.from(), ", not the leader"));
      }
      absl::Status why = DecodeBarrierAbort(env.payload(), workers_.front().name);
      bool finish = false;
      {
        // Recorded before the ack: once the leader has it, it may stop, and whatever then
        // reports its stop (or a later Shutdown(true)) must give this reason.
        absl::MutexLock lock(mu_);
        if (!leader_abort_) leader_abort_ = why;
        finish = state_ && state_->graceful && !state_->finished;
      }
      Send(env.from(), wire::SHUTDOWN_ACK, "");
      if (finish) Finish(why);
      return absl::OkStatus();
    }
    case wire::SHUTDOWN_ACK: {
      {
        absl::MutexLock lock(mu_);
        if (!state_ || !(state_->committing || state_->abort_text)) return absl::OkStatus();
        state_->acked.insert(env.from());
      }
      MaybeCommit();
      return absl::OkStatus();
    }
    default:
      return absl::OkStatus();
  }
}

void ShutdownBarrier::HandlePeerFailure(WorkerId peer, const absl::Status& reason) {
  bool finish_unavailable = false;
  bool abort = false;
  {
    absl::MutexLock lock(mu_);
    if (!state_ || state_->finished || !state_->graceful) return;
    const WorkerId leader = workers_.front().id;
    if (options_.self != leader && peer == leader) {
      // After its commit the leader stops as soon as it has our ack: that
      // is the barrier's end, not a failure (the commit finishes us).
      if (state_->committed) return;
      finish_unavailable = true;
    } else if (options_.self == leader) {
      abort = options_.fails_on_lost_peer && !state_->joined && !state_->abort_text;
      state_->reports.erase(peer);
      if (state_->committing || state_->abort_text) state_->acked.insert(peer);
    }
  }
  if (finish_unavailable) {
    Finish(LeaderGoneStatus());
  } else if (abort) {
    AbortBarrier(peer, reason);
  } else {
    MaybeJoin();
    MaybeCommit();
  }
}

}  // namespace tether
