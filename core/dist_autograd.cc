#include "core/dist_autograd.h"

#include <algorithm>
#include <deque>
#include <iterator>
#include <set>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/dist_autograd.pb.h"
#include "core/status.h"

namespace tether {
namespace {

// The planted bugs (DistAutogradPlantedBugs) take effect only in //core:dist_autograd_planted,
// which compiles this very source with TETHER_PLANTED_BUGS; in the production library every
// planted branch folds away at compile time.
#ifdef TETHER_PLANTED_BUGS
constexpr bool kPlantedBugs = true;
#else
constexpr bool kPlantedBugs = false;
#endif

constexpr int64_t kIdBits = 48;
constexpr int64_t kCounterMask = (int64_t{1} << kIdBits) - 1;
constexpr char kNodePrefix[] = "Error on Node ";

std::set<WorkerId> WorldOf(const Agent& agent) {
  std::set<WorkerId> world;
  for (const WorkerInfo& w : agent.workers()) world.insert(w.id);
  return world;
}

}  // namespace

const char kContextNoLongerValidText[] =
    "Autograd context no longer valid! This usually means the autograd context was cleaned up by "
    "a different thread due to an error before RecvRcpBackward had a chance to run";

std::string ContextNotFoundText(ContextId context) {
  return absl::StrCat("Could not find autograd context with id: ", context);
}

std::string SendFunctionNotFoundText(AutogradMessageId message) {
  return absl::StrCat("Could not find send function for autograd message id: ", message);
}

bool DistAutogradPlantedBugsCompiledIn() { return kPlantedBugs; }

// ---------------------------------------------------------------------------------------------
// Internal records.

struct DistAutograd::Pass {
  struct Outstanding {
    WorkerId to = -1;
    AutogradMessageId message = -1;
  };
  int64_t id = -1;
  bool initiator = false;
  bool retain = false;
  absl::Time started;
  absl::Time deadline = absl::InfiniteFuture();
  TimerId timer = 0;
  bool has_timer = false;
  std::shared_ptr<IncomingCall> first_call;  // non-initiator: the deferred reply
  std::optional<Future<Unit>> done;          // initiator: Backward()'s future
  bool local_done = false;
  std::set<AutogradMessageId> ran;  // send functions handed their gradients in this pass
  std::map<uint64_t, Outstanding> outstanding;  // gradient calls waiting for their replies
};

struct DistAutograd::Context {
  ContextId id = -1;
  std::set<WorkerId> joined_from;
  std::set<WorkerId> known;
  std::set<WorkerId> involved;
  std::map<AutogradMessageId, WorkerId> sends;  // message id -> destination of the forward call
  std::map<AutogradMessageId, WorkerId> recvs;  // message id -> source of the forward call
  std::unique_ptr<Pass> pass;
  // The newest pass id begun here by each initiator (pass ids grow per initiator): any older
  // one, and this one once it ended, are over here.
  std::map<WorkerId, int64_t> newest_pass;
  int64_t NewestFrom(WorkerId initiator) const {
    auto it = newest_pass.find(initiator);
    return it == newest_pass.end() ? -1 : it->second;
  }
};

struct DistAutograd::Strand {
  // (pass id or -1, task), run one at a time in order.
  std::deque<std::pair<int64_t, std::function<void()>>> tasks;
  int64_t running_pass = -1;  // the pass of the task being run
};

// ---------------------------------------------------------------------------------------------
// Construction.

DistAutograd::DistAutograd(Agent* agent, Clock* clock, Executor* executor,
                           DistAutogradOptions options)
    : agent_(agent),
      clock_(clock),
      executor_(executor),
      options_(std::move(options)),
      self_(agent->self().id),
      id_base_(static_cast<int64_t>(agent->self().id) << kIdBits),
      // Counters of a restarted worker start at incarnation << 40 (256 lives before they wrap).
      first_context_(id_base_ + (static_cast<int64_t>(options_.incarnation % 256) << 40)),
      world_(WorldOf(*agent)) {
  next_context_ = first_context_;
  next_message_ = first_context_;
  next_pass_ = first_context_;
}

absl::StatusOr<std::shared_ptr<DistAutograd>> DistAutograd::Create(Agent* agent, Clock* clock,
                                                                   Executor* executor,
                                                                   DistAutogradOptions options) {
  WorkerId self = agent->self().id;
  if (self < 0 || self > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker_id needs to be in the range [0, 65535], not ", self));
  }
  if (options.cleanup_max_attempts < 1) {
    return absl::InvalidArgumentError("cleanup_max_attempts must be at least 1");
  }
  std::shared_ptr<DistAutograd> dag(new DistAutograd(agent, clock, executor, std::move(options)));
  dag->Attach();
  return dag;
}

DistAutograd::~DistAutograd() = default;

void DistAutograd::Attach() {
  std::weak_ptr<DistAutograd> weak = weak_from_this();
  Agent* agent = agent_;
  cleanup_ = std::make_unique<RetriedCaller>(
      weak,
      [agent](WorkerId to, MessageType type, std::string payload, absl::Duration timeout) {
        return agent->Call(to, type, std::move(payload), {}, timeout);
      },
      clock_, executor_, options_.cleanup_retry,
      [this](WorkerId to, int attempt, const absl::Status& status) {
        return OnCleanupAttempt(to, attempt, status);
      });
  auto route = [weak](void (DistAutograd::*method)(std::shared_ptr<IncomingCall>)) {
    return [weak, method](std::shared_ptr<IncomingCall> call) {
      if (std::shared_ptr<DistAutograd> self = weak.lock()) {
        (self.get()->*method)(std::move(call));
      } else {
        call->ReplyError(absl::CancelledError("distributed autograd is gone"));
      }
    };
  };
  agent_->RegisterHandler(wire::BACKWARD_AUTOGRAD_REQ, route(&DistAutograd::HandleBackward));
  agent_->RegisterHandler(wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, route(&DistAutograd::HandleCleanup));
  agent_->AddActivitySource([weak]() -> ActivitySnapshot {
    std::shared_ptr<DistAutograd> self = weak.lock();
    return self ? self->Activity() : ActivitySnapshot{};
  });
  agent_->AddPeerFailureListener([weak](WorkerId peer, const absl::Status& reason) {
    if (std::shared_ptr<DistAutograd> self = weak.lock()) self->OnPeerFailed(peer, reason);
  });
  agent_->stopped().Then([weak](const absl::StatusOr<Unit>&) {
    if (std::shared_ptr<DistAutograd> self = weak.lock()) self->OnAgentStopped();
  });
}

namespace {
// The cores whose runner calls run on this thread, innermost last.
thread_local std::vector<const DistAutograd*> runner_calls_here;

struct RunnerCallsDone {
  const int* calls;
  int own;  // this thread's own calls, which cannot end while it waits
  bool Done() const { return *calls <= own; }
};
}  // namespace

void DistAutograd::SetRunner(GraphRunner* runner) {
  absl::MutexLock lock(&mu_);
  runner_ = runner;
  if (runner != nullptr) return;
  // Waits for the runner calls on other threads (a call of this thread's own is below us).
  RunnerCallsDone done{&runner_calls_, static_cast<int>(std::count(runner_calls_here.begin(),
                                                                   runner_calls_here.end(), this))};
  mu_.Await(absl::Condition(&done, &RunnerCallsDone::Done));
}

void DistAutograd::WithRunner(const std::function<void(GraphRunner*)>& fn) {
  GraphRunner* runner;
  {
    absl::MutexLock lock(&mu_);
    runner = runner_;
    if (runner != nullptr) ++runner_calls_;
  }
  runner_calls_here.push_back(this);
  fn(runner);
  runner_calls_here.pop_back();
  if (runner != nullptr) {
    absl::MutexLock lock(&mu_);
    --runner_calls_;
  }
}

PassProgress DistAutograd::RunnerGone() const {
  return PassProgress{absl::CancelledError(absl::StrCat(
                          "the distributed autograd engine of worker ", self_, " has stopped")),
                      false};
}

void DistAutograd::PostSelf(std::function<void(DistAutograd*)> fn) {
  std::weak_ptr<DistAutograd> weak = weak_from_this();
  executor_->Post([weak, fn = std::move(fn)] {
    if (std::shared_ptr<DistAutograd> self = weak.lock()) fn(self.get());
  });
}

void DistAutograd::RunActions(Actions actions) {
  for (auto& action : actions) action();
}

void DistAutograd::EmitLocked(DistAutogradEvent::Kind kind, ContextId context, WorkerId peer,
                              AutogradMessageId message, int64_t pass_id, absl::Status status,
                              absl::Time deadline) {
  ++events_;
  if (options_.observer == nullptr) return;
  DistAutogradEvent event;
  event.kind = kind;
  event.worker = self_;
  event.context = context;
  event.peer = peer;
  event.message = message;
  event.pass_id = pass_id;
  event.status = std::move(status);
  event.deadline = deadline;
  options_.observer->OnDistAutogradEvent(event);
}

void DistAutograd::NoteCallerLocked(const IncomingCall& call) {
  WorkerId from = call.caller();
  uint64_t inc = call.request().envelope.from_incarnation();
  uint64_t& seen = seen_incarnation_[from];
  seen = std::max(seen, inc);
  auto it = failed_incarnation_.find(from);
  if (it != failed_incarnation_.end() && inc > it->second) {
    failed_.erase(from);  // a restarted worker is alive again
    failed_incarnation_.erase(it);
  }
}

absl::Status DistAutograd::NotInWorldError(WorkerId worker, absl::string_view what) const {
  return absl::InvalidArgumentError(absl::StrCat("worker id ", worker, " (", what,
                                                 ") is not a worker of the world of worker ", self_,
                                                 " (", world_.size(), " workers)"));
}

absl::Status DistAutograd::CheckCreatorInWorld(ContextId context) const {
  if (InWorld(CreatorOf(context))) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("autograd context id ", context, " names creator worker ", CreatorOf(context),
                   ", which is not a worker of the world of worker ", self_));
}

absl::Status DistAutograd::WithNodePrefix(const absl::Status& error) const {
  if (error.ok() || absl::StartsWith(error.message(), kNodePrefix)) return error;
  absl::Status out(error.code(), absl::StrCat(kNodePrefix, self_, ": ", error.message()));
  error.ForEachPayload(
      [&out](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Ids and contexts.

ContextId DistAutograd::NewContext() {
  absl::MutexLock lock(&mu_);
  ContextId id = next_context_++;
  auto ctx = std::make_unique<Context>();
  ctx->id = id;
  contexts_.emplace(id, std::move(ctx));
  EmitLocked(DistAutogradEvent::kCreated, id);
  return id;
}

AutogradMessageId DistAutograd::NewMessageId() {
  absl::MutexLock lock(&mu_);
  return next_message_++;
}

int64_t DistAutograd::MaxId() const { return kCounterMask | id_base_; }

DistAutograd::Context* DistAutograd::FindLocked(ContextId context) {
  auto it = contexts_.find(context);
  return it == contexts_.end() ? nullptr : it->second.get();
}

const DistAutograd::Context* DistAutograd::FindLocked(ContextId context) const {
  auto it = contexts_.find(context);
  return it == contexts_.end() ? nullptr : it->second.get();
}

bool DistAutograd::Exists(ContextId context) const {
  absl::MutexLock lock(&mu_);
  return FindLocked(context) != nullptr;
}

bool DistAutograd::IsReleased(ContextId context) const {
  absl::MutexLock lock(&mu_);
  return IsReleasedLocked(context);
}

// Ids are issued in order from first_context_: one below next_context_ was issued here.
bool DistAutograd::IssuedHereLocked(ContextId context) const {
  return context >= first_context_ && context < next_context_;
}

bool DistAutograd::IsReleasedLocked(ContextId context) const {
  if (kPlantedBugs && options_.bugs.resurrect_released) return false;  // no tombstones
  auto it = released_.upper_bound(context);
  if (it != released_.begin() && context <= std::prev(it)->second) return true;
  return IssuedHereLocked(context) && contexts_.count(context) == 0;
}

bool DistAutograd::TombstoneLocked(ContextId context) {
  if (kPlantedBugs && options_.bugs.resurrect_released) return false;
  if (IsReleasedLocked(context)) return false;
  // Issued here: released once erased (a later Join refuses it, see Join). Out of the world:
  // never joinable, nothing to remember.
  if (IssuedHereLocked(context) || !InWorld(CreatorOf(context))) return true;
  // Merge with the neighbouring ranges of the same creator.
  auto next = released_.upper_bound(context);
  auto prev = next == released_.begin() ? released_.end() : std::prev(next);
  const bool join_prev = prev != released_.end() && prev->second == context - 1 &&
                         CreatorOf(context - 1) == CreatorOf(context);
  const bool join_next = next != released_.end() && next->first == context + 1 &&
                         CreatorOf(context + 1) == CreatorOf(context);
  if (join_prev && join_next) {
    prev->second = next->second;
    released_.erase(next);
  } else if (join_prev) {
    prev->second = context;
  } else if (join_next) {
    const ContextId hi = next->second;
    released_.erase(next);
    released_.emplace(context, hi);
  } else {
    released_.emplace(context, context);
  }
  return true;
}

absl::Status DistAutograd::Join(ContextId context, WorkerId from) {
  absl::MutexLock lock(&mu_);
  if (context < 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid autograd context id ", context));
  }
  if (absl::Status st = CheckCreatorInWorld(context); !st.ok()) return st;
  if (!InWorld(from)) {
    return NotInWorldError(from, absl::StrCat("the caller joining autograd context ", context));
  }
  const bool resurrect = kPlantedBugs && options_.bugs.resurrect_released;
  if (!resurrect && IsReleasedLocked(context)) {
    return absl::NotFoundError(
        absl::StrCat(ContextNotFoundText(context), " (already released on worker ", self_, ")"));
  }
  Context* ctx = FindLocked(context);
  if (ctx == nullptr) {
    if (!resurrect && CreatorOf(context) == self_) {
      return absl::NotFoundError(
          absl::StrCat(ContextNotFoundText(context), " (worker ", self_, " never created it)"));
    }
    auto fresh = std::make_unique<Context>();
    fresh->id = context;
    ctx = fresh.get();
    contexts_.emplace(context, std::move(fresh));
  }
  if (ctx->joined_from.insert(from).second) EmitLocked(DistAutogradEvent::kJoined, context, from);
  return absl::OkStatus();
}

absl::Status DistAutograd::AddKnownWorker(ContextId context, WorkerId worker) {
  absl::MutexLock lock(&mu_);
  Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  if (!InWorld(worker)) {
    return NotInWorldError(worker, absl::StrCat("a known worker of autograd context ", context));
  }
  if (ctx->known.insert(worker).second) EmitLocked(DistAutogradEvent::kKnown, context, worker);
  return absl::OkStatus();
}

absl::Status DistAutograd::RecordSend(ContextId context, AutogradMessageId message, WorkerId dst) {
  absl::MutexLock lock(&mu_);
  Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  if (!InWorld(dst)) {
    return NotInWorldError(dst, absl::StrCat("the destination of autograd message id ", message));
  }
  if (!ctx->sends.emplace(message, dst).second) {
    return absl::AlreadyExistsError(
        absl::StrCat("autograd message id ", message, " already has a send function"));
  }
  EmitLocked(DistAutogradEvent::kSendRecorded, context, dst, message);
  if (ctx->known.insert(dst).second) EmitLocked(DistAutogradEvent::kKnown, context, dst);
  return absl::OkStatus();
}

absl::Status DistAutograd::RecordRecv(ContextId context, AutogradMessageId message, WorkerId from) {
  absl::MutexLock lock(&mu_);
  Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  if (!ctx->recvs.emplace(message, from).second) {
    return absl::AlreadyExistsError(
        absl::StrCat("autograd message id ", message, " already has a recv function"));
  }
  EmitLocked(DistAutogradEvent::kRecvRecorded, context, from, message);
  return absl::OkStatus();
}

absl::Status DistAutograd::LearnInvolved(ContextId context, const std::vector<WorkerId>& workers) {
  absl::MutexLock lock(&mu_);
  Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  for (WorkerId w : workers) {
    if (!InWorld(w)) {
      return NotInWorldError(w, absl::StrCat("an involved worker of autograd context ", context));
    }
  }
  for (WorkerId w : workers) {
    if (w != self_) ctx->involved.insert(w);
  }
  ++events_;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<WorkerId>> DistAutograd::Involved(ContextId context) const {
  absl::MutexLock lock(&mu_);
  const Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  std::set<WorkerId> all = ctx->known;
  all.insert(ctx->involved.begin(), ctx->involved.end());
  all.insert(self_);
  return std::vector<WorkerId>(all.begin(), all.end());
}

absl::StatusOr<std::vector<WorkerId>> DistAutograd::KnownWorkers(ContextId context) const {
  absl::MutexLock lock(&mu_);
  const Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  return std::vector<WorkerId>(ctx->known.begin(), ctx->known.end());
}

absl::StatusOr<std::map<AutogradMessageId, WorkerId>> DistAutograd::SendFunctions(
    ContextId context) const {
  absl::MutexLock lock(&mu_);
  const Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  return ctx->sends;
}

absl::StatusOr<std::map<AutogradMessageId, WorkerId>> DistAutograd::RecvFunctions(
    ContextId context) const {
  absl::MutexLock lock(&mu_);
  const Context* ctx = FindLocked(context);
  if (ctx == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
  return ctx->recvs;
}

// ---------------------------------------------------------------------------------------------
// Release.

absl::Status DistAutograd::Release(ContextId context) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (FindLocked(context) == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
    ReleaseLocked(context, -1, {}, &actions);
  }
  RunActions(std::move(actions));
  return absl::OkStatus();
}

void DistAutograd::ReleaseIfPresent(ContextId context) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    ReleaseLocked(context, -1, {}, &actions);
  }
  RunActions(std::move(actions));
}

void DistAutograd::ReleaseLocked(ContextId context, WorkerId from,
                                 const std::set<WorkerId>& covered, Actions* actions) {
  if (TombstoneLocked(context)) ++events_;
  Context* ctx = FindLocked(context);
  if (ctx == nullptr) return;
  if (ctx->pass != nullptr) {
    FailPassLocked(ctx, absl::FailedPreconditionError(kContextNoLongerValidText), actions);
  }
  std::set<WorkerId> targets;
  const bool forward = from < 0 || !(kPlantedBugs && options_.bugs.forget_transitive_release);
  if (forward) {
    for (const std::set<WorkerId>* set : {&ctx->known, &ctx->involved}) {
      for (WorkerId w : *set) {
        // A worker declared failed is released too: it may be back (a restarted incarnation
        // that joined through a forward call, which this worker cannot tell); a dead one costs a
        // single attempt (OnCleanupAttempt).
        if (w != self_ && w != from && covered.count(w) == 0) {
          targets.insert(w);
        }
      }
    }
  }
  std::set<WorkerId> involved = covered;
  involved.insert(targets.begin(), targets.end());
  involved.insert(self_);
  if (from >= 0) involved.insert(from);
  contexts_.erase(context);
  EmitLocked(DistAutogradEvent::kReleased, context, from);
  // Once the agent stopped nothing can be sent (and nothing may be scheduled).
  if (!stopped_) {
    for (WorkerId to : targets) SendCleanupLocked(to, context, involved, actions);
  }
  if (runner_ != nullptr) {
    EnqueueLocked(
        context, -1,
        [this, context] {
          WithRunner([context](GraphRunner* runner) {
            if (runner != nullptr) runner->Release(context);
          });
        },
        actions);
  }
}

void DistAutograd::SendCleanupLocked(WorkerId to, ContextId context,
                                     const std::set<WorkerId>& involved, Actions* actions) {
  dist_autograd_wire::CleanupReq req;
  req.set_context_id(context);
  for (WorkerId w : involved) req.add_involved(w);
  std::string payload = req.SerializeAsString();
  ++pending_cleanups_;
  EmitLocked(DistAutogradEvent::kReleaseSent, context, to);
  std::weak_ptr<DistAutograd> weak = weak_from_this();
  actions->push_back([this, weak, to, context, payload = std::move(payload)]() mutable {
    cleanup_->Send(to, wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, std::move(payload),
                   [weak, to, context](const absl::StatusOr<Message>& reply) {
                     std::shared_ptr<DistAutograd> self = weak.lock();
                     if (!self) return;
                     absl::MutexLock lock(&self->mu_);
                     --self->pending_cleanups_;
                     self->EmitLocked(DistAutogradEvent::kReleaseAcked, context, to, -1, -1,
                                      reply.status());
                   });
  });
}

bool DistAutograd::OnCleanupAttempt(WorkerId to, int attempt, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  ++events_;
  if (status.ok() || stopped_) return false;
  if (kPlantedBugs && options_.bugs.release_once) return false;
  if (attempt + 1 >= options_.cleanup_max_attempts) return false;
  switch (status.code()) {
    case absl::StatusCode::kDeadlineExceeded:
      // The request went out and no answer came: retried, even to a worker declared failed. The
      // network sent it, so a new incarnation is up there (the network refuses sends to a worker
      // whose failure it reported until one is), and it may have joined the context through a
      // forward call: a single lost attempt must not leave its copy unreleased.
      return true;
    case absl::StatusCode::kUnavailable:
      // A send failure (PyTorch's faulty agent), or the peer's failure being reported: retried
      // until the peer is declared failed. To a worker declared failed it means the network
      // still has it down (dead): one attempt only.
      return failed_.count(to) == 0;
    default:
      return false;
  }
}

void DistAutograd::HandleCleanup(std::shared_ptr<IncomingCall> call) {
  const std::string& payload = call->request().envelope.payload();
  dist_autograd_wire::CleanupReq req;
  if (!req.ParseFromString(payload)) {
    call->ReplyError(
        absl::InvalidArgumentError(absl::StrCat("CLEANUP_AUTOGRAD_CONTEXT_REQ: the payload (",
                                                payload.size(), " bytes) is not a CleanupReq")));
    return;
  }
  if (req.context_id() < 0) {
    call->ReplyError(absl::InvalidArgumentError(absl::StrCat(
        "CLEANUP_AUTOGRAD_CONTEXT_REQ: invalid autograd context id ", req.context_id())));
    return;
  }
  // Out-of-world ids refuse the whole request: nothing released, tombstoned or forwarded.
  absl::Status bad = CheckCreatorInWorld(req.context_id());
  for (int i = 0; bad.ok() && i < req.involved_size(); ++i) {
    if (!InWorld(req.involved(i))) {
      bad = NotInWorldError(req.involved(i), absl::StrCat("an involved worker of autograd context ",
                                                          req.context_id()));
    }
  }
  if (!bad.ok()) {
    call->ReplyError(
        absl::InvalidArgumentError(absl::StrCat("CLEANUP_AUTOGRAD_CONTEXT_REQ: ", bad.message())));
    return;
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
    std::set<WorkerId> covered(req.involved().begin(), req.involved().end());
    ReleaseLocked(req.context_id(), call->caller(), covered, &actions);
  }
  actions.push_back([call] { call->Reply("", {}); });  // always acknowledged
  RunActions(std::move(actions));
}

// ---------------------------------------------------------------------------------------------
// The strand.

void DistAutograd::EnqueueLocked(ContextId context, int64_t pass_id, std::function<void()> task,
                                 Actions* actions) {
  std::unique_ptr<Strand>& strand = strands_[context];
  const bool start = strand == nullptr;
  if (start) strand = std::make_unique<Strand>();
  strand->tasks.emplace_back(pass_id, std::move(task));
  if (start) {
    actions->push_back(
        [this, context] { PostSelf([context](DistAutograd* d) { d->RunStrand(context); }); });
  }
}

void DistAutograd::RunStrand(ContextId context) {
  std::function<void()> task;
  {
    absl::MutexLock lock(&mu_);
    auto it = strands_.find(context);
    if (it == strands_.end()) return;
    Strand& strand = *it->second;
    if (strand.tasks.empty()) {
      strands_.erase(it);
      return;
    }
    strand.running_pass = strand.tasks.front().first;
    task = std::move(strand.tasks.front().second);
    strand.tasks.pop_front();
  }
  task();  // a runner call: no lock held
  {
    absl::MutexLock lock(&mu_);
    auto it = strands_.find(context);
    if (it == strands_.end()) return;
    it->second->running_pass = -1;
    if (it->second->tasks.empty()) {
      strands_.erase(it);
      return;
    }
  }
  // One task per executor turn: other contexts' work interleaves.
  PostSelf([context](DistAutograd* d) { d->RunStrand(context); });
}

// ---------------------------------------------------------------------------------------------
// Passes.

void DistAutograd::StartPassLocked(Context* ctx, int64_t pass_id, bool initiator, bool retain,
                                   absl::Time deadline, std::shared_ptr<IncomingCall> first_call,
                                   WorkerId from, Actions* actions) {
  auto pass = std::make_unique<Pass>();
  pass->id = pass_id;
  pass->initiator = initiator;
  pass->retain = retain;
  pass->started = clock_->Now();
  pass->deadline = deadline;
  pass->first_call = std::move(first_call);
  const ContextId context = ctx->id;
  if (deadline != absl::InfiniteFuture()) {
    std::weak_ptr<DistAutograd> weak = weak_from_this();
    pass->has_timer = true;
    pass->timer = clock_->Schedule(deadline, [weak, context, pass_id] {
      if (std::shared_ptr<DistAutograd> self = weak.lock()) {
        self->PostSelf([context, pass_id](DistAutograd* d) { d->OnDeadline(context, pass_id); });
      }
    });
  }
  ctx->pass = std::move(pass);
  ++passes_started_;
  EmitLocked(DistAutogradEvent::kPassBegun, context, from, -1, pass_id, absl::OkStatus(), deadline);
  EnqueueLocked(
      context, pass_id,
      [this, context, pass_id, retain, initiator] {
        PassProgress failed;
        WithRunner([&](GraphRunner* runner) {
          if (runner == nullptr) {
            failed = RunnerGone();
          } else {
            failed.error = runner->BeginPass(context, pass_id, retain, initiator);
          }
        });
        if (!failed.error.ok()) OnProgress(context, pass_id, failed);
      },
      actions);
}

void DistAutograd::FailIfPeerFailedLocked(Context* ctx, Actions* actions) {
  const Pass* pass = ctx->pass.get();
  if (pass == nullptr) return;
  WorkerId peer = -1;
  if (pass->first_call != nullptr && failed_.count(pass->first_call->caller()) > 0) {
    peer = pass->first_call->caller();
  }
  for (const auto& [message, dst] : ctx->sends) {
    if (peer < 0 && failed_.count(dst) > 0 && pass->ran.count(message) == 0) peer = dst;
  }
  if (peer < 0) return;
  FailPassLocked(
      ctx,
      absl::UnavailableError(absl::StrCat(
          "worker ", peer, " failed before the distributed backward of autograd context ", ctx->id,
          " could get its gradients")),
      actions);
}

void DistAutograd::MaybeCompleteLocked(Context* ctx, Actions* actions) {
  Pass* pass = ctx->pass.get();
  if (pass == nullptr || !pass->local_done) return;
  const bool wait_for_calls = !(kPlantedBugs && options_.bugs.reply_before_rpcs);
  if (wait_for_calls && !pass->outstanding.empty()) return;
  EndPassLocked(ctx, absl::OkStatus(), actions);
}

void DistAutograd::FailPassLocked(Context* ctx, absl::Status error, Actions* actions) {
  EndPassLocked(ctx, WithNodePrefix(error), actions);
}

void DistAutograd::EndPassLocked(Context* ctx, absl::Status status, Actions* actions) {
  std::unique_ptr<Pass> pass = std::move(ctx->pass);
  if (pass == nullptr) return;
  if (pass->has_timer) clock_->Cancel(pass->timer);
  if (!status.ok()) ++passes_failed_;
  const ContextId context = ctx->id;
  EmitLocked(DistAutogradEvent::kPassEnded, context, -1, -1, pass->id, status);
  if (runner_ != nullptr) {
    EnqueueLocked(
        context, -1,
        [this, context, status] {
          WithRunner([&](GraphRunner* runner) {
            if (runner == nullptr) return;
            if (!status.ok()) runner->AbortPass(context, status);
            runner->EndPass(context);
          });
        },
        actions);
  }
  if (pass->done.has_value()) {
    EmitLocked(DistAutogradEvent::kBackwardDone, context, -1, -1, pass->id, status);
    Future<Unit> done = *pass->done;
    actions->push_back([done, status] {
      if (status.ok()) {
        done.Set(Unit{});
      } else {
        done.Set(status);
      }
    });
  }
  if (pass->first_call != nullptr) {
    std::shared_ptr<IncomingCall> call = std::move(pass->first_call);
    actions->push_back([call, status] {
      if (status.ok()) {
        call->Reply("", {});
      } else {
        call->ReplyError(status);
      }
    });
  }
}

std::string DistAutograd::WaitingForLocked(const Context& ctx) const {
  const Pass& pass = *ctx.pass;
  std::vector<std::string> sends;
  for (const auto& [message, dst] : ctx.sends) {
    if (pass.ran.count(message) == 0) {
      sends.push_back(absl::StrCat(message, " (gradients from worker ", dst, ")"));
    }
  }
  std::vector<std::string> calls;
  for (const auto& [id, call] : pass.outstanding) {
    calls.push_back(absl::StrCat("worker ", call.to, " (message ", call.message, ")"));
  }
  if (sends.empty() && calls.empty()) return "waiting for the local graph to finish";
  std::string out = "waiting for";
  if (!sends.empty()) absl::StrAppend(&out, " send functions [", absl::StrJoin(sends, ", "), "]");
  if (!sends.empty() && !calls.empty()) absl::StrAppend(&out, " and");
  if (!calls.empty())
    absl::StrAppend(&out, " gradient calls to [", absl::StrJoin(calls, ", "), "]");
  return out;
}

Future<Unit> DistAutograd::Backward(ContextId context, bool retain_graph, absl::Time deadline) {
  Future<Unit> done(executor_);
  absl::Status refused;
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    Context* ctx = FindLocked(context);
    if (stopped_) {
      refused = absl::CancelledError(
          absl::StrCat("RPC agent of worker ", self_, " is stopped: no distributed backward"));
    } else if (runner_ == nullptr) {
      refused = absl::FailedPreconditionError(
          absl::StrCat("worker ", self_, " has no distributed autograd engine"));
    } else if (ctx == nullptr) {
      refused = absl::NotFoundError(ContextNotFoundText(context));
    } else if (ctx->pass != nullptr) {
      refused = absl::FailedPreconditionError(
          absl::StrCat("a backward pass is already running for autograd context ", context));
    } else {
      const int64_t pass_id = next_pass_++;
      ctx->newest_pass[self_] = pass_id;
      EmitLocked(DistAutogradEvent::kBackwardStarted, context, -1, -1, pass_id, absl::OkStatus(),
                 deadline);
      StartPassLocked(ctx, pass_id, /*initiator=*/true, retain_graph, deadline, nullptr, -1,
                      &actions);
      ctx->pass->done = done;
      EnqueueLocked(
          context, pass_id,
          [this, context, pass_id] {
            if (!PassRunning(context, pass_id)) return;
            PassProgress progress;
            WithRunner([&](GraphRunner* runner) {
              progress = runner == nullptr ? RunnerGone() : runner->RunRoot(context);
            });
            OnProgress(context, pass_id, progress);
          },
          &actions);
      FailIfPeerFailedLocked(ctx, &actions);
    }
  }
  if (!refused.ok()) done.Set(refused);
  RunActions(std::move(actions));
  return done;
}

bool DistAutograd::PassRunning(ContextId context, int64_t pass_id) const {
  absl::MutexLock lock(&mu_);
  const Context* ctx = FindLocked(context);
  return ctx != nullptr && ctx->pass != nullptr && ctx->pass->id == pass_id;
}

bool DistAutograd::AnyPassRunning(ContextId context) const {
  absl::MutexLock lock(&mu_);
  const Context* ctx = FindLocked(context);
  return ctx != nullptr && ctx->pass != nullptr;
}

void DistAutograd::OnProgress(ContextId context, int64_t pass_id, const PassProgress& progress) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    Context* ctx = FindLocked(context);
    if (ctx == nullptr || ctx->pass == nullptr || ctx->pass->id != pass_id) return;
    if (!progress.error.ok()) {
      FailPassLocked(ctx, progress.error, &actions);
    } else if (progress.local_done) {
      ctx->pass->local_done = true;
      MaybeCompleteLocked(ctx, &actions);
    }
  }
  RunActions(std::move(actions));
}

void DistAutograd::OnDeadline(ContextId context, int64_t pass_id) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    Context* ctx = FindLocked(context);
    if (ctx == nullptr || ctx->pass == nullptr || ctx->pass->id != pass_id) return;
    ctx->pass->has_timer = false;
    absl::Duration allowed = ctx->pass->deadline - ctx->pass->started;
    FailPassLocked(
        ctx,
        absl::DeadlineExceededError(absl::StrCat(
            "distributed backward of autograd context ", context, " did not finish within ",
            absl::FormatDuration(allowed), "; ", WaitingForLocked(*ctx))),
        &actions);
  }
  RunActions(std::move(actions));
}

Future<Message> DistAutograd::SendGradients(ContextId context, WorkerId to,
                                            AutogradMessageId message, std::string gradients,
                                            std::vector<Buffer> buffers) {
  absl::Status refused;
  std::string payload;
  absl::Duration timeout = absl::ZeroDuration();
  int64_t pass_id = -1;
  uint64_t call_id = 0;
  {
    absl::MutexLock lock(&mu_);
    Context* ctx = FindLocked(context);
    auto strand = strands_.find(context);
    const int64_t running =
        strand != strands_.end() ? strand->second->running_pass : static_cast<int64_t>(-1);
    if (stopped_) {
      refused = absl::CancelledError(absl::StrCat("RPC agent of worker ", self_, " is stopped"));
    } else if (ctx == nullptr) {
      refused = absl::NotFoundError(ContextNotFoundText(context));
    } else if (auto it = ctx->recvs.find(message); it == ctx->recvs.end() || it->second != to) {
      refused = absl::NotFoundError(absl::StrCat(
          "Could not find recv function for autograd message id: ", message, " from worker ", to));
    } else if (ctx->pass == nullptr || running != ctx->pass->id ||
               std::find(runner_calls_here.begin(), runner_calls_here.end(), this) ==
                   runner_calls_here.end()) {
      // A recv node runs only in a drain of the pass (a runner call on its strand): run anywhere
      // else (a local autograd.grad through it) its gradients would be taken for the pass's.
      refused = absl::FailedPreconditionError(absl::StrCat(
          "no backward pass of autograd context ", context,
          " is running this receive function: it runs only inside dist_autograd.backward"));
    } else {
      Pass* pass = ctx->pass.get();
      pass_id = pass->id;
      dist_autograd_wire::BackwardReq req;
      req.set_context_id(context);
      req.set_message_id(message);
      req.set_retain_graph(pass->retain);
      req.set_gradients(std::move(gradients));
      req.set_pass_id(pass_id);
      payload = req.SerializeAsString();
      if (pass->deadline != absl::InfiniteFuture()) {
        // The time left, plus a grace period: the pass's own deadline reports first, naming what
        // it waits for, rather than the call's timeout (the receiver's pass ends by then too).
        absl::Duration left = std::max(pass->deadline - clock_->Now(), absl::ZeroDuration());
        timeout = left + std::max(absl::Milliseconds(10), left / 10);
      }
      call_id = next_call_++;
      pass->outstanding[call_id] = Pass::Outstanding{to, message};
      EmitLocked(DistAutogradEvent::kGradientsSent, context, to, message, pass_id);
    }
  }
  if (!refused.ok()) {
    Future<Message> failed(executor_);
    failed.Set(refused);
    return failed;
  }
  Future<Message> reply = agent_->Call(to, wire::BACKWARD_AUTOGRAD_REQ, std::move(payload),
                                       std::move(buffers), timeout);
  std::weak_ptr<DistAutograd> weak = weak_from_this();
  reply.Then([weak, context, pass_id, call_id](const absl::StatusOr<Message>& result) {
    if (std::shared_ptr<DistAutograd> self = weak.lock()) {
      self->OnGradientsReply(context, pass_id, call_id, result);
    }
  });
  return reply;
}

void DistAutograd::OnGradientsReply(ContextId context, int64_t pass_id, uint64_t call,
                                    const absl::StatusOr<Message>& reply) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    Context* ctx = FindLocked(context);
    if (ctx == nullptr || ctx->pass == nullptr || ctx->pass->id != pass_id) return;
    if (ctx->pass->outstanding.erase(call) == 0) return;
    ++events_;
    if (!reply.ok()) {
      FailPassLocked(ctx, reply.status(), &actions);
    } else {
      MaybeCompleteLocked(ctx, &actions);
    }
  }
  RunActions(std::move(actions));
}

void DistAutograd::HandleBackward(std::shared_ptr<IncomingCall> call) {
  const Message& request = call->request();
  dist_autograd_wire::BackwardReq req;
  if (!req.ParseFromString(request.envelope.payload())) {
    call->ReplyError(absl::InvalidArgumentError(absl::StrCat("BACKWARD_AUTOGRAD_REQ: the payload (",
                                                             request.envelope.payload().size(),
                                                             " bytes) is not a BackwardReq")));
    return;
  }
  if (req.context_id() < 0 || req.message_id() < 0 || req.pass_id() < 0) {
    call->ReplyError(absl::InvalidArgumentError(
        absl::StrCat("BACKWARD_AUTOGRAD_REQ: invalid ids (autograd context ", req.context_id(),
                     ", message ", req.message_id(), ", pass ", req.pass_id(), ")")));
    return;
  }
  const ContextId context = req.context_id();
  const AutogradMessageId message = req.message_id();
  const int64_t pass_id = req.pass_id();
  const WorkerId caller = call->caller();
  absl::Status refused;
  bool reply_now = false;
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
    Context* ctx = FindLocked(context);
    auto send = ctx == nullptr ? std::map<AutogradMessageId, WorkerId>::iterator()
                               : ctx->sends.find(message);
    if (stopped_) {
      refused = absl::CancelledError(absl::StrCat("RPC agent of worker ", self_, " is stopped"));
    } else if (runner_ == nullptr) {
      refused = absl::FailedPreconditionError(
          absl::StrCat("worker ", self_, " has no distributed autograd engine"));
    } else if (ctx == nullptr) {
      refused = absl::NotFoundError(ContextNotFoundText(context));
    } else if (send == ctx->sends.end()) {
      refused = absl::NotFoundError(SendFunctionNotFoundText(message));
    } else if (send->second != caller) {
      refused = absl::InvalidArgumentError(absl::StrCat("autograd message id ", message,
                                                        " was sent to worker ", send->second,
                                                        ", not to worker ", caller));
    } else if (ctx->NewestFrom(CreatorOf(pass_id)) > pass_id ||
               (ctx->pass == nullptr && ctx->NewestFrom(CreatorOf(pass_id)) == pass_id)) {
      // A straggler of a pass that ended here, or one its initiator already followed with a
      // newer pass (it ended there): answered and dropped, never taken for a pass of its own.
      reply_now = true;
    } else if (ctx->pass != nullptr && ctx->pass->id != pass_id &&
               CreatorOf(ctx->pass->id) != CreatorOf(pass_id)) {
      refused = absl::FailedPreconditionError(
          absl::StrCat("a backward pass is already running for autograd context ", context));
    } else if (ctx->pass != nullptr && ctx->pass->id == pass_id &&
               ctx->pass->ran.count(message) > 0) {
      reply_now = true;  // its send function already ran in this pass
    } else {
      ctx->newest_pass[CreatorOf(pass_id)] = pass_id;
      if (ctx->pass != nullptr && ctx->pass->id != pass_id) {
        // Its initiator began a newer pass, so the running one ended there (it runs one pass per
        // context at a time): this worker's part can never finish. It fails here and now.
        FailPassLocked(
            ctx,
            absl::AbortedError(absl::StrCat(
                "distributed backward pass ", ctx->pass->id, " of autograd context ", context,
                " was superseded by pass ", pass_id, " of worker ", CreatorOf(pass_id))),
            &actions);
      }
      if (ctx->pass == nullptr) {
        // The first arrival of this pass here: its reply waits for the whole local pass.
        StartPassLocked(ctx, pass_id, /*initiator=*/false, req.retain_graph(), call->deadline(),
                        call, caller, &actions);
      } else {
        reply_now = true;  // a later arrival: answered at once
      }
      ctx->pass->ran.insert(message);
      EmitLocked(DistAutogradEvent::kGradientsRun, context, caller, message, pass_id);
      auto gradients = std::make_shared<std::string>(std::move(*req.mutable_gradients()));
      std::vector<Buffer> buffers = request.buffers;
      EnqueueLocked(
          context, pass_id,
          [this, context, message, pass_id, gradients, buffers] {
            if (!PassRunning(context, pass_id)) return;  // failed meanwhile: skipped
            PassProgress progress;
            WithRunner([&](GraphRunner* runner) {
              progress = runner == nullptr
                             ? RunnerGone()
                             : runner->RunSendFunction(context, message, *gradients, buffers);
            });
            OnProgress(context, pass_id, progress);
          },
          &actions);
      FailIfPeerFailedLocked(ctx, &actions);
    }
  }
  if (!refused.ok()) {
    call->ReplyError(WithNodePrefix(refused));
  } else if (reply_now) {
    call->Reply("", {});
  }
  RunActions(std::move(actions));
}

// ---------------------------------------------------------------------------------------------
// Failures and shutdown.

void DistAutograd::OnPeerFailed(WorkerId peer, const absl::Status& reason) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (!failed_.insert(peer).second) return;
    failed_incarnation_[peer] = seen_incarnation_[peer];
    EmitLocked(DistAutogradEvent::kPeerFailed, -1, peer);
    std::vector<ContextId> failing;
    std::vector<ContextId> orphans;
    std::vector<ContextId> stranded;
    for (const auto& [id, ctx] : contexts_) {
      // A loop, not std::all_of: the thread-safety analysis cannot see mu_ held in a lambda.
      bool only_through_failed = !ctx->joined_from.empty();
      for (WorkerId w : ctx->joined_from) {
        only_through_failed = only_through_failed && failed_.count(w) > 0;
      }
      if (CreatorOf(id) == peer) {
        orphans.push_back(id);
      } else if (CreatorOf(id) != self_ && only_through_failed) {
        // Joined only through workers now failed: if the creator never heard of this worker (the
        // failed one's reply, carrying its involved workers, never reached it), nobody else can
        // release it here.
        stranded.push_back(id);
      }
      const Pass* pass = ctx->pass.get();
      if (pass == nullptr) continue;
      bool depends = pass->first_call != nullptr && pass->first_call->caller() == peer;
      for (const auto& [call, out] : pass->outstanding) depends = depends || out.to == peer;
      for (const auto& [message, dst] : ctx->sends) {
        depends = depends || (dst == peer && pass->ran.count(message) == 0);
      }
      if (depends) failing.push_back(id);
    }
    for (ContextId id : failing) {
      FailPassLocked(
          FindLocked(id),
          absl::UnavailableError(absl::StrCat("worker ", peer,
                                              " failed during the distributed backward of autograd "
                                              "context ",
                                              id, ": ", reason.message())),
          &actions);
    }
    // Nobody else can exit the contexts the failed worker created.
    for (ContextId id : orphans) ReleaseLocked(id, -1, {}, &actions);
    // Nor, maybe, those reached only through it: released here and below (the workers this one
    // called), but not on their living creator, whose program exits them itself.
    for (ContextId id : stranded) ReleaseLocked(id, -1, {CreatorOf(id)}, &actions);
  }
  RunActions(std::move(actions));
}

void DistAutograd::OnAgentStopped() {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    stopped_ = true;
    ++events_;
    std::vector<ContextId> running;
    for (const auto& [id, ctx] : contexts_) {
      if (ctx->pass != nullptr) running.push_back(id);
    }
    for (ContextId id : running) {
      FailPassLocked(FindLocked(id),
                     absl::CancelledError(absl::StrCat(
                         "RPC agent of worker ", self_,
                         " stopped during the distributed backward of autograd context ", id)),
                     &actions);
    }
  }
  RunActions(std::move(actions));
}

// ---------------------------------------------------------------------------------------------
// Introspection.

std::map<std::string, int64_t> DistAutograd::GetDebugInfo() const {
  absl::MutexLock lock(&mu_);
  int64_t passes = 0;
  for (const auto& [id, ctx] : contexts_) passes += ctx->pass != nullptr ? 1 : 0;
  return {
      {"num_autograd_contexts", static_cast<int64_t>(contexts_.size())},
      {"num_current_backward_passes", passes},
      {"num_released_context_records", static_cast<int64_t>(released_.size())},  // ranges
      {"num_pending_cleanups", pending_cleanups_},
      {"num_backward_passes_started", passes_started_},
      {"num_backward_passes_failed", passes_failed_},
  };
}

ActivitySnapshot DistAutograd::Activity() const {
  absl::MutexLock lock(&mu_);
  ActivitySnapshot snap;
  snap.pending = pending_cleanups_;
  snap.events = events_;
  return snap;
}

}  // namespace tether
