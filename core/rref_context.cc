#include "core/rref_context.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/retried_call.h"
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

bool IsRemoteCallType(MessageType type) {
  return type == wire::PYTHON_REMOTE_CALL || type == wire::SCRIPT_REMOTE_CALL ||
         type == wire::BUILTIN_REMOTE_CALL || type == wire::TEST_REMOTE_CALL;
}

absl::Status WithPrefix(const absl::Status& status, absl::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

// What a fetch of a user RRef whose creation failed gets: kFailedPrecondition
// (the fetch itself neither timed out nor lost its peer) with the creation's
// text, which leads with PyTorch's "RRef creation".
absl::Status CreationFailedError(const absl::Status& creation) {
  return absl::FailedPreconditionError(creation.message());
}

}  // namespace

bool RRefPlantedBugsCompiledIn() { return kPlantedBugs; }

std::string LeakedRRef::ToString() const {
  return absl::StrCat(is_owner ? "owner" : "user", " RRef ", rref_id.ToString(),
                      is_owner ? "" : absl::StrCat(" fork ", fork_id.ToString()),
                      " owned by worker ", owner, ", created by worker ", creator, " (", created_by,
                      ")");
}

// ---------------------------------------------------------------------------------------------
// Internal records.

struct RRefHandle::State {
  std::weak_ptr<RRefContext> ctx;
  RRefId rref;
  ForkId fork;
  WorkerId owner = -1;
  bool is_owner = false;
  std::string type_name;

  ~State() {
    if (std::shared_ptr<RRefContext> c = ctx.lock()) {
      RRefId r = rref;
      ForkId f = fork;
      bool o = is_owner;
      c->PostSelf([r, f, o](RRefContext* self) { self->HandleGone(r, f, o); });
    }
  }
};

const RRefId& RRefHandle::rref_id() const { return state_->rref; }
const ForkId& RRefHandle::fork_id() const { return state_->fork; }
WorkerId RRefHandle::owner() const { return state_->owner; }
bool RRefHandle::is_owner() const { return state_->is_owner; }
const std::string& RRefHandle::type_name() const { return state_->type_name; }

struct RRefContext::OwnerEntry {
  struct Waiter {
    std::function<void(const absl::StatusOr<RRefValue>&)> done;
    TimerId timer = 0;
    bool has_timer = false;
  };

  RRefId id;
  WorkerId creator = -1;
  std::string created_by;
  std::string type_name;
  bool creation_started = false;
  std::optional<absl::StatusOr<RRefValue>> value;
  std::map<ForkId, WorkerId> forks;  // fork -> holder
  int64_t fork_count = 0;            // only with the planted bug forget_idempotence
  int64_t local_handles = 0;
  uint64_t next_waiter = 1;
  std::map<uint64_t, Waiter> waiters;
  std::vector<std::shared_ptr<IncomingCall>> creation_calls;

  bool placeholder() const { return !creation_started && !value.has_value(); }
};

struct RRefContext::UserFork {
  enum State { kPending, kConfirmed, kFailed };
  RRefId rref;
  ForkId fork;
  WorkerId owner = -1;
  WorkerId parent = -1;
  std::string type_name;
  std::string created_by;
  State state = kPending;
  absl::Status error;
  bool needs_delete = true;
  bool owner_failed = false;
  bool handle_alive = true;
  bool force_delete = false;
  bool delete_sent = false;
  int pending_children = 0;
  std::vector<Future<Unit>> confirm_waiters;
  // to_here() calls made before the creation settled: failed with it if it
  // fails (their fetch would not be answered), forgotten if it succeeds.
  std::vector<Future<RRefValue>> fetches;
};

struct RRefContext::PendingChild {
  RRefId rref;
  ForkId fork;
  WorkerId child = -1;
  WorkerId owner = -1;
  ForkId parent_fork;  // the parent's user fork; invalid when the parent is the owner
  RRefHandle pin;
  TimerId timer = 0;
  bool has_timer = false;
  bool query_in_flight = false;
};

struct RRefContext::ReceivedChild {
  WorkerId parent = -1;
  bool done = false;
};

// ---------------------------------------------------------------------------------------------
// Construction.

RRefContext::RRefContext(Agent* agent, Clock* clock, Executor* executor, RRefContextOptions options)
    : agent_(agent),
      clock_(clock),
      executor_(executor),
      options_(std::move(options)),
      self_(agent->self().id),
      next_local_id_((options_.incarnation << 40) + options_.first_local_id) {}

std::shared_ptr<RRefContext> RRefContext::Create(Agent* agent, Clock* clock, Executor* executor,
                                                 RRefContextOptions options) {
  std::shared_ptr<RRefContext> ctx(new RRefContext(agent, clock, executor, std::move(options)));
  ctx->Attach();
  return ctx;
}

RRefContext::~RRefContext() {
  // Touches neither the clock nor the executor: they may already be gone.
  // Pending timers and tasks hold only weak references and do nothing once the
  // context is destroyed.
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

void RRefContext::Attach() {
  std::weak_ptr<RRefContext> weak = weak_from_this();
  RetryPolicy policy;
  policy.attempt_timeout = options_.control_timeout;
  policy.initial_backoff = options_.retry_initial_backoff;
  policy.max_backoff = options_.retry_max_backoff;
  Agent* agent = agent_;
  control_ = std::make_unique<RetriedCaller>(
      weak,
      [agent](WorkerId to, MessageType type, std::string payload, absl::Duration timeout) {
        return agent->Call(to, type, std::move(payload), {}, timeout);
      },
      clock_, executor_, policy,
      [this](WorkerId to, int, const absl::Status& status) {
        return OnControlAttempt(to, status);
      });
  auto route = [weak](void (RRefContext::*method)(std::shared_ptr<IncomingCall>)) {
    return [weak, method](std::shared_ptr<IncomingCall> call) {
      if (std::shared_ptr<RRefContext> self = weak.lock()) {
        (self.get()->*method)(std::move(call));
      } else {
        call->ReplyError(absl::CancelledError("RRef context is gone"));
      }
    };
  };
  for (MessageType type : {wire::PYTHON_REMOTE_CALL, wire::SCRIPT_REMOTE_CALL,
                           wire::BUILTIN_REMOTE_CALL, wire::TEST_REMOTE_CALL}) {
    agent_->RegisterHandler(type, route(&RRefContext::HandleRemoteCall));
  }
  agent_->RegisterHandler(wire::RREF_FETCH_CALL, route(&RRefContext::HandleFetch));
  agent_->RegisterHandler(wire::RREF_FORK_REQUEST, route(&RRefContext::HandleForkRequest));
  agent_->RegisterHandler(wire::RREF_USER_DELETE, route(&RRefContext::HandleUserDelete));
  agent_->RegisterHandler(wire::RREF_CHILD_ACCEPT, route(&RRefContext::HandleChildControl));
  agent_->AddActivitySource([weak]() -> ActivitySnapshot {
    std::shared_ptr<RRefContext> self = weak.lock();
    if (!self) return {};
    absl::MutexLock lock(&self->mu_);
    ActivitySnapshot snap;
    snap.pending = self->pending_control_ + self->running_functions_ +
                   static_cast<int64_t>(self->pending_children_.size());
    snap.events = self->events_;
    return snap;
  });
  agent_->AddPeerFailureListener([weak](WorkerId peer, const absl::Status& reason) {
    if (std::shared_ptr<RRefContext> self = weak.lock()) self->OnPeerFailed(peer, reason);
  });
}

void RRefContext::SetRemoteRunner(MessageType type, RemoteRunner runner) {
  runners_[type] = std::move(runner);
}

void RRefContext::PostSelf(std::function<void(RRefContext*)> fn) {
  std::weak_ptr<RRefContext> weak = weak_from_this();
  executor_->Post([weak, fn = std::move(fn)] {
    if (std::shared_ptr<RRefContext> self = weak.lock()) fn(self.get());
  });
}

void RRefContext::RunActions(Actions actions) {
  for (auto& action : actions) action();
}

void RRefContext::NoteCallerLocked(const IncomingCall& call) {
  WorkerId from = call.caller();
  uint64_t inc = call.request().envelope.from_incarnation();
  uint64_t& seen = seen_incarnation_[from];
  seen = std::max(seen, inc);
  auto it = failed_incarnation_.find(from);
  if (it != failed_incarnation_.end() && inc > it->second) {
    failed_.erase(from);
    failed_incarnation_.erase(it);
  }
}

GloballyUniqueId RRefContext::NewIdLocked() { return GloballyUniqueId{self_, next_local_id_++}; }

void RRefContext::EmitLocked(RRefEvent::Kind kind, const RRefId& rref, const ForkId& fork,
                             WorkerId peer) {
  ++events_;
  if (options_.observer == nullptr) return;
  RRefEvent event;
  event.kind = kind;
  event.worker = self_;
  event.rref = rref;
  event.fork = fork;
  event.peer = peer;
  options_.observer->OnRRefEvent(event);
}

RRefHandle RRefContext::MakeHandleLocked(const RRefId& rref, const ForkId& fork, WorkerId owner,
                                         bool is_owner, const std::string& type_name) {
  auto state = std::make_shared<RRefHandle::State>();
  state->ctx = weak_from_this();
  state->rref = rref;
  state->fork = fork;
  state->owner = owner;
  state->is_owner = is_owner;
  state->type_name = type_name;
  if (is_owner) {
    auto it = owners_.find(rref);
    if (it != owners_.end()) ++it->second->local_handles;
  }
  return RRefHandle(std::move(state));
}

// ---------------------------------------------------------------------------------------------
// Control messages.

void RRefContext::SendControl(WorkerId to, MessageType type, std::string payload,
                              std::function<void(const absl::StatusOr<Message>&)> done) {
  {
    absl::MutexLock lock(&mu_);
    ++pending_control_;
    TouchLocked();
  }
  control_->Send(to, type, std::move(payload), std::move(done));
}

bool RRefContext::OnControlAttempt(WorkerId to, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  TouchLocked();
  // A send that failed while the peer is up (an injected fault) is retried like
  // a lost message, until the peer is declared failed; a lost peer is not.
  const bool retriable = status.code() == absl::StatusCode::kDeadlineExceeded ||
                         (IsTransientSendError(status) && failed_.count(to) == 0);
  bool retry = retriable && !closed_;
  if (!retry) {
    --pending_control_;
    CheckShutdownDone();
  }
  return retry;
}

// ---------------------------------------------------------------------------------------------
// Owner side.

RRefContext::OwnerEntry* RRefContext::FindOrCreatePlaceholderLocked(const RRefId& rref) {
  auto it = owners_.find(rref);
  if (it != owners_.end()) return it->second.get();
  auto entry = std::make_unique<OwnerEntry>();
  entry->id = rref;
  entry->creator = rref.worker;
  OwnerEntry* raw = entry.get();
  owners_.emplace(rref, std::move(entry));
  return raw;
}

void RRefContext::AddForkLocked(OwnerEntry* entry, const ForkId& fork, WorkerId holder) {
  if (kPlantedBugs && options_.bugs.forget_idempotence) {
    ++entry->fork_count;
    entry->forks[fork] = holder;
    EmitLocked(RRefEvent::kForkAdded, entry->id, fork, holder);
    return;
  }
  if (deleted_forks_.count(fork) > 0 || failed_.count(holder) > 0) return;
  if (entry->forks.emplace(fork, holder).second) {
    EmitLocked(RRefEvent::kForkAdded, entry->id, fork, holder);
  }
}

void RRefContext::RemoveForkLocked(OwnerEntry* entry, const ForkId& fork, bool duplicate_aware) {
  if ((kPlantedBugs && options_.bugs.forget_idempotence) && !duplicate_aware) {
    --entry->fork_count;
    if (entry->forks.erase(fork) > 0) {
      EmitLocked(RRefEvent::kForkRemoved, entry->id, fork, -1);
    }
    return;
  }
  deleted_forks_.insert(fork);
  auto it = entry->forks.find(fork);
  if (it == entry->forks.end()) return;
  entry->forks.erase(it);
  if (kPlantedBugs && options_.bugs.forget_idempotence) --entry->fork_count;
  EmitLocked(RRefEvent::kForkRemoved, entry->id, fork, -1);
}

void RRefContext::MaybeFreeLocked(const RRefId& rref, Actions* actions) {
  auto it = owners_.find(rref);
  if (it == owners_.end()) return;
  OwnerEntry* entry = it->second.get();
  bool forked = (kPlantedBugs && options_.bugs.forget_idempotence) ? entry->fork_count > 0
                                                                   : !entry->forks.empty();
  if (forked) return;
  if (entry->local_handles > 0) {
    if (!shutting_down_) return;
    // Shutting down, local handles no longer pin the value, but one sent to
    // this very worker and not received yet still does (its call is in flight).
    for (const auto& [fork, child] : pending_children_) {
      if (child->rref == rref && child->child == self_ && !child->parent_fork.valid()) return;
    }
  }
  if (entry->creation_started && !entry->value.has_value()) return;  // function still running
  if (entry->placeholder()) {
    // Nothing was ever created here; forget it (not a free: the creation may
    // still arrive).
    if (entry->waiters.empty()) owners_.erase(it);
    return;
  }
  FreeLocked(rref, actions);
}

void RRefContext::FreeLocked(const RRefId& rref, Actions* actions) {
  auto it = owners_.find(rref);
  if (it == owners_.end()) return;
  std::shared_ptr<OwnerEntry> entry(std::move(it->second));
  owners_.erase(it);
  freed_.insert(rref);
  EmitLocked(RRefEvent::kOwnerFreed, rref, ForkId{}, -1);
  absl::Status gone = absl::FailedPreconditionError(
      absl::StrCat("RRef ", rref.ToString(), " was freed on its owner (worker ", self_, ")"));
  for (auto& [id, waiter] : entry->waiters) {
    if (waiter.has_timer) clock_->Cancel(waiter.timer);
  }
  // The value (and the waiters' callbacks) are released outside the lock.
  actions->push_back([entry, gone] {
    for (auto& [id, waiter] : entry->waiters) waiter.done(gone);
    for (auto& call : entry->creation_calls) call->ReplyError(gone);
  });
}

void RRefContext::HandleRemoteCall(std::shared_ptr<IncomingCall> call) {
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
  }
  RemoteCallPayload msg;
  const Message& request = call->request();
  if (!DecodeRemoteCall(request.envelope.payload(), &msg)) {
    call->ReplyError(absl::InvalidArgumentError(absl::StrCat(
        MessageTypeName(request.envelope.type()), ": payload is not an RRef remote call")));
    return;
  }
  RRefId rref = msg.rref_id;
  ForkId fork = msg.fork_id;
  WorkerId caller = call->caller();
  if (!rref.valid() || !fork.valid() || rref.worker != caller || fork.worker != caller) {
    call->ReplyError(absl::InvalidArgumentError(
        absl::StrCat(MessageTypeName(request.envelope.type()), ": invalid ids (rref ",
                     rref.ToString(), ", fork ", fork.ToString(), ") from worker ", caller)));
    return;
  }
  Actions actions;
  bool start = false;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) {
      actions.push_back([call] { call->ReplyError(absl::CancelledError("RRef context closed")); });
    } else if (freed_.count(rref) > 0) {
      // A late duplicate of a creation that already ran and was freed: never
      // run it again.
      actions.push_back([call, rref] {
        call->ReplyError(absl::FailedPreconditionError(
            absl::StrCat("RRef ", rref.ToString(), " was already created and freed")));
      });
    } else {
      OwnerEntry* entry = FindOrCreatePlaceholderLocked(rref);
      AddForkLocked(entry, fork, caller);
      if (entry->creation_started) {
        if (entry->value.has_value()) {
          absl::Status status = entry->value->status();
          actions.push_back([call, status] {
            if (status.ok()) {
              call->Reply("", {});
            } else {
              call->ReplyError(status);
            }
          });
        } else {
          entry->creation_calls.push_back(call);
        }
      } else {
        entry->creation_started = true;
        entry->creator = caller;
        entry->created_by = msg.created_by;
        entry->type_name = msg.type_name;
        entry->creation_calls.push_back(call);
        ++running_functions_;
        EmitLocked(RRefEvent::kOwnerCreated, rref, fork, caller);
        EmitLocked(RRefEvent::kFunctionRun, rref, fork, caller);
        start = true;
      }
      MaybeFreeLocked(rref, &actions);
    }
  }
  RunActions(std::move(actions));
  if (start) {
    RemoteRequest req;
    req.caller = caller;
    req.type = request.envelope.type();
    req.rref_id = rref;
    req.payload = std::move(msg.payload);
    req.buffers = request.buffers;
    req.deadline = call->deadline();
    StartFunction(rref, std::move(req), request.envelope.type(), nullptr);
  }
}

void RRefContext::StartFunction(const RRefId& rref, RemoteRequest request, MessageType type,
                                CreationCallback on_created) {
  auto it = runners_.find(type);
  if (it == runners_.end()) {
    OnFunctionDone(rref, absl::UnimplementedError(absl::StrCat("no remote runner registered for ",
                                                               MessageTypeName(type))));
    return;
  }
  Future<RRefValue> value = it->second(std::move(request));
  std::weak_ptr<RRefContext> weak = weak_from_this();
  value.Then(
      [weak, rref, on_created = std::move(on_created)](const absl::StatusOr<RRefValue>& result) {
        if (on_created && result.ok()) on_created(result->creation_reply);
        if (std::shared_ptr<RRefContext> self = weak.lock()) self->OnFunctionDone(rref, result);
      });
}

void RRefContext::OnFunctionDone(const RRefId& rref, const absl::StatusOr<RRefValue>& result) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    --running_functions_;
    TouchLocked();
    auto it = owners_.find(rref);
    if (it == owners_.end()) return;  // freed by Close(); nothing to tell
    OwnerEntry* entry = it->second.get();
    entry->value.emplace(result);
    std::string creation_reply;
    if (entry->value->ok()) creation_reply.swap((*entry->value)->creation_reply);
    EmitLocked(RRefEvent::kValueSet, rref, ForkId{}, -1);
    std::vector<std::shared_ptr<IncomingCall>> calls;
    calls.swap(entry->creation_calls);
    absl::Status status = result.status();
    actions.push_back([calls, status, creation_reply] {
      for (auto& call : calls) {
        if (status.ok()) {
          call->Reply(creation_reply, {});
        } else {
          call->ReplyError(status);
        }
      }
    });
    std::map<uint64_t, OwnerEntry::Waiter> waiters;
    waiters.swap(entry->waiters);
    for (auto& [id, waiter] : waiters) {
      if (waiter.has_timer) clock_->Cancel(waiter.timer);
      EmitLocked(RRefEvent::kValueServed, rref, ForkId{}, -1);
      auto done = waiter.done;
      actions.push_back([done, result] { done(result); });
    }
    MaybeFreeLocked(rref, &actions);
  }
  RunActions(std::move(actions));
}

void RRefContext::HandleFetch(std::shared_ptr<IncomingCall> call) {
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
  }
  RRefId rref;
  ForkId fork;
  FetchInfo info;
  info.caller = call->caller();
  if (!DecodeForkRef(call->request().envelope.payload(), &rref, &fork, &info.attachment) ||
      !rref.valid()) {
    call->ReplyError(absl::InvalidArgumentError("RREF_FETCH_CALL: invalid payload"));
    return;
  }
  std::weak_ptr<RRefContext> weak = weak_from_this();
  auto serve = [weak, call, info](const absl::StatusOr<RRefValue>& value) {
    std::shared_ptr<RRefContext> self = weak.lock();
    if (!value.ok()) {
      call->ReplyError(value.status());
      return;
    }
    absl::StatusOr<RRefValue> wire = *value;
    if (self && self->options_.serializer) wire = self->options_.serializer(*value, info);
    if (!wire.ok()) {
      call->ReplyError(wire.status());
      return;
    }
    call->Reply(std::move(wire->payload), std::move(wire->buffers));
  };
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) {
      actions.push_back([call] { call->ReplyError(absl::CancelledError("RRef context closed")); });
    } else if (freed_.count(rref) > 0) {
      actions.push_back([call, rref, this] {
        call->ReplyError(absl::FailedPreconditionError(absl::StrCat(
            "RRef ", rref.ToString(), " was already freed on its owner (worker ", self_, ")")));
      });
    } else {
      OwnerEntry* entry = FindOrCreatePlaceholderLocked(rref);
      if (entry->value.has_value()) {
        EmitLocked(RRefEvent::kValueServed, rref, ForkId{}, call->caller());
        absl::StatusOr<RRefValue> value = *entry->value;
        actions.push_back([serve, value] { serve(value); });
      } else {
        uint64_t id = entry->next_waiter++;
        OwnerEntry::Waiter& waiter = entry->waiters[id];
        waiter.done = serve;
        absl::Time deadline = call->deadline();
        if (deadline != absl::InfiniteFuture()) {
          // The caller enforces its own timeout; this only stops holding the
          // call. A grace period keeps a faster owner clock from reporting the
          // timeout before the caller's.
          absl::Time now = clock_->Now();
          absl::Duration grace = std::max(absl::Milliseconds(10), (deadline - now) / 10);
          waiter.has_timer = true;
          waiter.timer = clock_->Schedule(deadline + grace, [weak, rref, id] {
            std::shared_ptr<RRefContext> self = weak.lock();
            if (!self) return;
            self->PostSelf([rref, id](RRefContext* c) {
              Actions acts;
              {
                absl::MutexLock lock(&c->mu_);
                auto it = c->owners_.find(rref);
                if (it == c->owners_.end()) return;
                auto w = it->second->waiters.find(id);
                if (w == it->second->waiters.end()) return;
                auto done = std::move(w->second.done);
                it->second->waiters.erase(w);
                acts.push_back([done, rref] {
                  done(absl::DeadlineExceededError(absl::StrCat(
                      "fetching RRef ", rref.ToString(), ": value not ready before the deadline")));
                });
                c->MaybeFreeLocked(rref, &acts);
              }
              c->RunActions(std::move(acts));
            });
          });
        }
      }
    }
  }
  RunActions(std::move(actions));
}

void RRefContext::HandleForkRequest(std::shared_ptr<IncomingCall> call) {
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
  }
  RRefId rref;
  ForkId fork;
  if (!DecodeForkRef(call->request().envelope.payload(), &rref, &fork) || !rref.valid() ||
      !fork.valid()) {
    call->ReplyError(absl::InvalidArgumentError("RREF_FORK_REQUEST: invalid payload"));
    return;
  }
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    if (closed_) {
      status = absl::CancelledError("RRef context closed");
    } else if (freed_.count(rref) > 0) {
      status = absl::NotFoundError(absl::StrCat(
          "RRef ", rref.ToString(), " was already freed on its owner (worker ", self_, ")"));
    } else {
      AddForkLocked(FindOrCreatePlaceholderLocked(rref), fork, call->caller());
    }
  }
  if (status.ok()) {
    call->Reply("", {});
  } else {
    call->ReplyError(status);
  }
}

void RRefContext::HandleUserDelete(std::shared_ptr<IncomingCall> call) {
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
  }
  RRefId rref;
  ForkId fork;
  if (!DecodeForkRef(call->request().envelope.payload(), &rref, &fork) || !rref.valid() ||
      !fork.valid()) {
    call->ReplyError(absl::InvalidArgumentError("RREF_USER_DELETE: invalid payload"));
    return;
  }
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    if (!closed_ && freed_.count(rref) == 0) {
      auto it = owners_.find(rref);
      if (it == owners_.end()) {
        // The delete overtook the creation: remember it so the creation does
        // not re-pin.
        if (!(kPlantedBugs && options_.bugs.forget_idempotence)) deleted_forks_.insert(fork);
      } else {
        RemoveForkLocked(it->second.get(), fork, /*duplicate_aware=*/false);
        if ((kPlantedBugs && options_.bugs.free_on_first_delete) && it->second->value.has_value()) {
          FreeLocked(rref, &actions);
        } else {
          MaybeFreeLocked(rref, &actions);
        }
      }
    }
  }
  RunActions(std::move(actions));
  call->Reply("", {});
}

// ---------------------------------------------------------------------------------------------
// Creation and use.

absl::StatusOr<RRefHandle> RRefContext::Remote(WorkerId owner, MessageType type,
                                               std::string payload, std::vector<Buffer> buffers,
                                               std::optional<absl::Duration> timeout,
                                               std::string created_by, std::string type_name,
                                               CreationCallback on_created) {
  if (!IsRemoteCallType(type)) {
    return absl::InvalidArgumentError(
        absl::StrCat("remote(): ", MessageTypeName(type), " is not a remote call type"));
  }
  TETHER_RETURN_IF_ERROR(agent_->GetWorker(owner).status());
  if (created_by.empty()) {
    created_by = absl::StrCat("remote(", MessageTypeName(type), ") by worker ", self_);
  }
  RRefHandle handle;
  RRefId rref;
  ForkId fork;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::CancelledError("remote(): RRef context closed");
    rref = NewIdLocked();
    fork = NewIdLocked();
    if (owner == self_) {
      auto entry = std::make_unique<OwnerEntry>();
      entry->id = rref;
      entry->creator = self_;
      entry->created_by = created_by;
      entry->type_name = type_name;
      entry->creation_started = true;
      owners_.emplace(rref, std::move(entry));
      ++running_functions_;
      EmitLocked(RRefEvent::kOwnerCreated, rref, ForkId{}, self_);
      EmitLocked(RRefEvent::kFunctionRun, rref, ForkId{}, self_);
      handle = MakeHandleLocked(rref, ForkId{}, self_, /*is_owner=*/true, type_name);
    } else {
      if (failed_.count(owner) > 0) {
        return absl::UnavailableError(
            absl::StrCat("remote(): owner worker ", owner, " has failed"));
      }
      auto user = std::make_unique<UserFork>();
      user->rref = rref;
      user->fork = fork;
      user->owner = owner;
      user->parent = self_;
      user->type_name = type_name;
      user->created_by = created_by;
      user->force_delete = shutting_down_;
      users_.emplace(fork, std::move(user));
      EmitLocked(RRefEvent::kUserCreated, rref, fork, self_);
      handle = MakeHandleLocked(rref, fork, owner, /*is_owner=*/false, type_name);
    }
  }
  if (owner == self_) {
    RemoteRequest req;
    req.caller = self_;
    req.type = type;
    req.rref_id = rref;
    req.payload = std::move(payload);
    req.buffers = std::move(buffers);
    if (timeout.has_value() && *timeout > absl::ZeroDuration()) {
      req.deadline = clock_->Now() + *timeout;
    }
    PostSelf([rref, req, type, on_created](RRefContext* c) {
      c->StartFunction(rref, req, type, on_created);
    });
    return handle;
  }
  RemoteCallPayload msg;
  msg.rref_id = rref;
  msg.fork_id = fork;
  msg.created_by = created_by;
  msg.type_name = type_name;
  msg.payload = std::move(payload);
  Future<Message> reply =
      agent_->Call(owner, type, EncodeRemoteCall(std::move(msg)), std::move(buffers), timeout);
  std::weak_ptr<RRefContext> weak = weak_from_this();
  reply.Then(
      [weak, fork, on_created = std::move(on_created)](const absl::StatusOr<Message>& result) {
        if (on_created && result.ok()) on_created(result->envelope.payload());
        if (std::shared_ptr<RRefContext> self = weak.lock()) self->OnCreationReply(fork, result);
      });
  return handle;
}

RRefHandle RRefContext::CreateOwned(RRefValue value, std::string created_by,
                                    std::string type_name) {
  absl::MutexLock lock(&mu_);
  RRefId rref = NewIdLocked();
  auto entry = std::make_unique<OwnerEntry>();
  entry->id = rref;
  entry->creator = self_;
  entry->created_by =
      created_by.empty() ? absl::StrCat("RRef(value) on worker ", self_) : std::move(created_by);
  entry->type_name = type_name;
  entry->creation_started = true;
  entry->value.emplace(std::move(value));
  owners_.emplace(rref, std::move(entry));
  EmitLocked(RRefEvent::kOwnerCreated, rref, ForkId{}, self_);
  EmitLocked(RRefEvent::kValueSet, rref, ForkId{}, self_);
  return MakeHandleLocked(rref, ForkId{}, self_, /*is_owner=*/true, type_name);
}

void RRefContext::SettleUserLocked(UserFork* user, absl::Status error, bool needs_delete) {
  if (user->state != UserFork::kPending) return;
  if (error.ok()) {
    user->state = UserFork::kConfirmed;
    EmitLocked(RRefEvent::kUserConfirmed, user->rref, user->fork, user->owner);
  } else {
    user->state = UserFork::kFailed;
    user->error = error;
    user->needs_delete = needs_delete;
  }
  for (auto& waiter : user->confirm_waiters) {
    if (error.ok()) {
      waiter.Set(Unit{});
    } else {
      waiter.Set(error);
    }
  }
  user->confirm_waiters.clear();
  if (!error.ok()) {
    for (auto& fetch : user->fetches) fetch.Set(CreationFailedError(error));
  }
  user->fetches.clear();
}

void RRefContext::OnCreationReply(const ForkId& fork, const absl::StatusOr<Message>& reply) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    auto it = users_.find(fork);
    if (it == users_.end()) return;
    UserFork* user = it->second.get();
    if (reply.ok()) {
      SettleUserLocked(user, absl::OkStatus(), true);
    } else {
      absl::StatusCode code = reply.status().code();
      // The owner never recorded this fork (it failed, or the creation was a
      // stale duplicate).
      bool needs_delete =
          code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kFailedPrecondition;
      SettleUserLocked(
          user,
          // PyTorch's words lead ("RRef creation"), which programs match.
          WithPrefix(reply.status(),
                     absl::StrCat("RRef creation via rpc.remote() failed (RRef ",
                                  user->rref.ToString(), " on worker ", user->owner, "): ")),
          needs_delete);
    }
    MaybeDeleteUserLocked(fork, &actions);
  }
  RunActions(std::move(actions));
}

absl::Status RRefContext::Check(const RRefHandle& handle) const {
  if (!handle.valid()) return absl::InvalidArgumentError("RRef handle is empty");
  absl::MutexLock lock(&mu_);
  if (closed_) return absl::CancelledError("RRef context closed");
  if (handle.is_owner()) {
    if (owners_.count(handle.rref_id()) == 0) {
      return absl::CancelledError(
          absl::StrCat("RRef ", handle.rref_id().ToString(), " was deleted by shutdown"));
    }
    return absl::OkStatus();
  }
  auto it = users_.find(handle.fork_id());
  if (it == users_.end() || it->second->force_delete) {
    return absl::CancelledError(
        absl::StrCat("RRef ", handle.rref_id().ToString(), " was deleted by shutdown"));
  }
  const UserFork& user = *it->second;
  if (user.owner_failed || failed_.count(user.owner) > 0) {
    return absl::UnavailableError(
        absl::StrCat("RRef ", user.rref.ToString(), ": owner worker ", user.owner, " has failed"));
  }
  if (user.state == UserFork::kFailed) return user.error;
  return absl::OkStatus();
}

Future<RRefValue> RRefContext::ToHere(const RRefHandle& handle,
                                      std::optional<absl::Duration> timeout,
                                      std::string attachment) {
  Future<RRefValue> out(executor_);
  absl::Status status = Check(handle);
  if (!status.ok()) {
    out.Set(status);
    return out;
  }
  absl::Duration limit = timeout.has_value() ? *timeout : agent_->default_timeout();
  if (!handle.is_owner()) {
    // A creation that failed fails the fetch too: the owner never learns of the
    // RRef, so its reply would only be the fetch's timeout (none if unbounded).
    {
      absl::MutexLock lock(&mu_);
      auto it = users_.find(handle.fork_id());
      if (it != users_.end()) {
        UserFork* user = it->second.get();
        if (user->state == UserFork::kFailed) {
          out.Set(CreationFailedError(user->error));
          return out;
        }
        if (user->state == UserFork::kPending) user->fetches.push_back(out);
      }
    }
    Future<Message> reply =
        agent_->Call(handle.owner(), wire::RREF_FETCH_CALL,
                     EncodeForkRef(handle.rref_id(), handle.fork_id(), attachment), {}, limit);
    RRefId rref = handle.rref_id();
    reply.Then([out, rref](const absl::StatusOr<Message>& result) {
      if (!result.ok()) {
        out.Set(WithPrefix(result.status(), absl::StrCat("to_here(", rref.ToString(), "): ")));
        return;
      }
      RRefValue value;
      value.payload = result->envelope.payload();
      value.buffers = result->buffers;
      out.Set(std::move(value));
    });
    return out;
  }
  // On the owner: wait for the value locally, bounded by the same timeout.
  RRefId rref = handle.rref_id();
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    auto it = owners_.find(rref);
    if (it == owners_.end()) {
      out.Set(absl::CancelledError(absl::StrCat("RRef ", rref.ToString(), " was deleted")));
      return out;
    }
    OwnerEntry* entry = it->second.get();
    if (entry->value.has_value()) {
      EmitLocked(RRefEvent::kValueServed, rref, ForkId{}, self_);
      out.Set(*entry->value);
      return out;
    }
    uint64_t id = entry->next_waiter++;
    OwnerEntry::Waiter& waiter = entry->waiters[id];
    waiter.done = [out](const absl::StatusOr<RRefValue>& v) { out.Set(v); };
    if (limit > absl::ZeroDuration()) {
      waiter.has_timer = true;
      std::weak_ptr<RRefContext> weak = weak_from_this();
      waiter.timer = clock_->Schedule(clock_->Now() + limit, [weak, rref, id, out] {
        std::shared_ptr<RRefContext> self = weak.lock();
        if (!self) return;
        self->PostSelf([rref, id, out](RRefContext* c) {
          Actions acts;
          {
            absl::MutexLock lock(&c->mu_);
            auto it = c->owners_.find(rref);
            if (it == c->owners_.end()) return;
            if (it->second->waiters.erase(id) == 0) return;
            c->MaybeFreeLocked(rref, &acts);
          }
          out.Set(absl::DeadlineExceededError(
              absl::StrCat("to_here(", rref.ToString(), "): value not ready before the timeout")));
          c->RunActions(std::move(acts));
        });
      });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Forks.

void RRefContext::ScheduleChildQueryLocked(const ForkId& fork, Actions* /*actions*/) {
  auto it = pending_children_.find(fork);
  if (it == pending_children_.end()) return;
  std::weak_ptr<RRefContext> weak = weak_from_this();
  // Shutting down, ask again soon (the first query was sent at once); never
  // spin.
  absl::Duration delay = shutting_down_
                             ? std::max(options_.retry_initial_backoff * 5, absl::Milliseconds(1))
                             : options_.child_query_delay;
  it->second->has_timer = true;
  it->second->timer = clock_->Schedule(clock_->Now() + delay, [weak, fork] {
    if (std::shared_ptr<RRefContext> self = weak.lock()) {
      self->PostSelf([fork](RRefContext* c) { c->OnChildQueryTimer(fork); });
    }
  });
}

absl::StatusOr<RRefDescriptor> RRefContext::Fork(const RRefHandle& handle, WorkerId to) {
  if (!handle.valid()) return absl::InvalidArgumentError("Fork: RRef handle is empty");
  TETHER_RETURN_IF_ERROR(agent_->GetWorker(to).status());
  TETHER_RETURN_IF_ERROR(Check(handle));
  Actions actions;
  RRefDescriptor desc;
  {
    absl::MutexLock lock(&mu_);
    if (failed_.count(to) > 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot send RRef ", handle.rref_id().ToString(), " to failed worker ", to));
    }
    auto child = std::make_unique<PendingChild>();
    child->rref = handle.rref_id();
    child->fork = NewIdLocked();
    child->child = to;
    child->owner = handle.owner();
    if (handle.is_owner()) {
      auto it = owners_.find(handle.rref_id());
      if (it == owners_.end()) {
        return absl::CancelledError(
            absl::StrCat("RRef ", handle.rref_id().ToString(), " was deleted by shutdown"));
      }
      if (to != self_) AddForkLocked(it->second.get(), child->fork, to);
      child->pin = handle;
    } else {
      auto it = users_.find(handle.fork_id());
      if (it == users_.end()) {
        return absl::CancelledError(
            absl::StrCat("RRef ", handle.rref_id().ToString(), " was deleted by shutdown"));
      }
      child->parent_fork = handle.fork_id();
      if (!(kPlantedBugs && options_.bugs.skip_child_wait)) {
        ++it->second->pending_children;
        child->pin = handle;
      }
    }
    desc.rref_id = child->rref;
    desc.fork_id = child->fork;
    desc.owner = handle.owner();
    desc.parent = self_;
    desc.type_name = handle.type_name();
    ForkId fork = child->fork;
    EmitLocked(RRefEvent::kChildPending, desc.rref_id, fork, to);
    pending_children_.emplace(fork, std::move(child));
    ScheduleChildQueryLocked(fork, &actions);
  }
  RunActions(std::move(actions));
  return desc;
}

void RRefContext::ResolveChildLocked(const ForkId& fork, bool refused, Actions* actions) {
  auto it = pending_children_.find(fork);
  if (it == pending_children_.end()) return;
  std::shared_ptr<PendingChild> child(std::move(it->second));
  pending_children_.erase(it);
  CheckShutdownDone();
  if (child->has_timer) clock_->Cancel(child->timer);
  EmitLocked(RRefEvent::kChildResolved, child->rref, fork, child->child);
  if (!child->parent_fork.valid()) {
    // The parent is the owner: a refused fork will never be deleted by its
    // child.
    auto entry = owners_.find(child->rref);
    if (refused && entry != owners_.end()) {
      RemoveForkLocked(entry->second.get(), fork, /*duplicate_aware=*/true);
    }
    if (refused) deleted_forks_.insert(fork);
    MaybeFreeLocked(child->rref, actions);
  } else {
    auto user = users_.find(child->parent_fork);
    if (user != users_.end() && !(kPlantedBugs && options_.bugs.skip_child_wait)) {
      --user->second->pending_children;
      MaybeDeleteUserLocked(child->parent_fork, actions);
    }
  }
  // Dropping the pin may end the parent's last handle (that work is posted,
  // never inline).
  actions->push_back([child] {});
}

void RRefContext::AcceptChildLocked(const ForkId& fork, WorkerId parent, Actions* actions) {
  if (parent == self_) {
    received_.erase(fork);
    ResolveChildLocked(fork, /*refused=*/false, actions);
    return;
  }
  if (failed_.count(parent) > 0) {
    received_.erase(fork);
    return;
  }
  std::weak_ptr<RRefContext> weak = weak_from_this();
  actions->push_back([this, weak, fork, parent] {
    SendControl(parent, wire::RREF_CHILD_ACCEPT, EncodeChildControl(fork, /*query=*/false),
                [weak, fork](const absl::StatusOr<Message>&) {
                  std::shared_ptr<RRefContext> self = weak.lock();
                  if (!self) return;
                  absl::MutexLock lock(&self->mu_);
                  self->received_.erase(fork);
                  self->TouchLocked();
                });
  });
}

absl::StatusOr<RRefHandle> RRefContext::Receive(const RRefDescriptor& desc, WorkerId from) {
  if (!desc.rref_id.valid() || !desc.fork_id.valid()) {
    return absl::InvalidArgumentError("Receive: RRef descriptor has invalid ids");
  }
  if (desc.parent != from) {
    return absl::InvalidArgumentError(absl::StrCat("Receive: RRef descriptor from worker ", from,
                                                   " names worker ", desc.parent,
                                                   " as its parent"));
  }
  TETHER_RETURN_IF_ERROR(agent_->GetWorker(desc.owner).status());
  TETHER_RETURN_IF_ERROR(agent_->GetWorker(from).status());
  Actions actions;
  absl::StatusOr<RRefHandle> result;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    const ForkId& fork = desc.fork_id;
    if (closed_) return absl::CancelledError("Receive: RRef context closed");
    if (refused_.count(fork) > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "RRef ", desc.rref_id.ToString(), " fork ", fork.ToString(), " was abandoned by worker ",
          from, ": the call carrying it arrived after the sender gave up on it"));
    }
    if (received_.count(fork) > 0 || users_.count(fork) > 0) {
      return absl::AlreadyExistsError(
          absl::StrCat("Receive: RRef fork ", fork.ToString(), " was already received"));
    }
    if (desc.owner == self_) {
      if (freed_.count(desc.rref_id) > 0) {
        result = absl::FailedPreconditionError(
            absl::StrCat("Receive: RRef ", desc.rref_id.ToString(),
                         " was already freed on its owner (worker ", self_, ")"));
      } else {
        // The creation may still be in flight (the sender's user is pinned
        // meanwhile): hold a placeholder that the remote call fills in.
        OwnerEntry* entry = FindOrCreatePlaceholderLocked(desc.rref_id);
        result = MakeHandleLocked(desc.rref_id, ForkId{}, self_,
                                  /*is_owner=*/true, entry->type_name);
      }
      if (from != self_)
        received_[fork] = std::make_unique<ReceivedChild>(ReceivedChild{from, true});
      AcceptChildLocked(fork, from, &actions);
    } else {
      auto user = std::make_unique<UserFork>();
      user->rref = desc.rref_id;
      user->fork = fork;
      user->owner = desc.owner;
      user->parent = from;
      user->type_name = desc.type_name;
      user->created_by = absl::StrCat("received from worker ", from);
      user->force_delete = shutting_down_;
      UserFork* raw = user.get();
      users_.emplace(fork, std::move(user));
      EmitLocked(RRefEvent::kUserCreated, desc.rref_id, fork, from);
      result = MakeHandleLocked(desc.rref_id, fork, desc.owner,
                                /*is_owner=*/false, desc.type_name);
      if (failed_.count(desc.owner) > 0) {
        raw->owner_failed = true;
        SettleUserLocked(
            raw,
            absl::UnavailableError(absl::StrCat("RRef ", desc.rref_id.ToString(), ": owner worker ",
                                                desc.owner, " has failed")),
            false);
        if (from != self_)
          received_[fork] = std::make_unique<ReceivedChild>(ReceivedChild{from, true});
        AcceptChildLocked(fork, from, &actions);
      } else if (from == desc.owner) {
        // The owner recorded this fork when it sent it.
        SettleUserLocked(raw, absl::OkStatus(), true);
        received_[fork] = std::make_unique<ReceivedChild>(ReceivedChild{from, true});
        AcceptChildLocked(fork, from, &actions);
        MaybeDeleteUserLocked(fork, &actions);  // at once if shutting down
      } else {
        if (from != self_) {
          received_[fork] = std::make_unique<ReceivedChild>(ReceivedChild{from, false});
        }
        std::weak_ptr<RRefContext> weak = weak_from_this();
        WorkerId owner = desc.owner;
        std::string payload = EncodeForkRef(desc.rref_id, fork);
        actions.push_back([this, weak, owner, payload, fork] {
          SendControl(owner, wire::RREF_FORK_REQUEST, payload,
                      [weak, fork](const absl::StatusOr<Message>& reply) {
                        if (std::shared_ptr<RRefContext> self = weak.lock()) {
                          self->OnForkRequestReply(fork, reply);
                        }
                      });
        });
      }
    }
  }
  RunActions(std::move(actions));
  return result;
}

void RRefContext::OnForkRequestReply(const ForkId& fork, const absl::StatusOr<Message>& reply) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    // The parent is owed an accept even if the user is already gone (its owner
    // failed and its handle was dropped meanwhile).
    WorkerId parent = self_;
    auto rec = received_.find(fork);
    if (rec != received_.end()) {
      rec->second->done = true;
      parent = rec->second->parent;
    }
    auto it = users_.find(fork);
    if (it != users_.end()) {
      UserFork* user = it->second.get();
      parent = user->parent;
      if (reply.ok()) {
        SettleUserLocked(user, absl::OkStatus(), true);
      } else {
        absl::StatusCode code = reply.status().code();
        bool needs_delete = code != absl::StatusCode::kNotFound &&
                            code != absl::StatusCode::kUnavailable &&
                            code != absl::StatusCode::kFailedPrecondition;
        SettleUserLocked(
            user,
            WithPrefix(
                reply.status(),
                absl::StrCat("confirming RRef ", user->rref.ToString(), " fork ", fork.ToString(),
                             " with its owner (worker ", user->owner, ") failed: ")),
            needs_delete);
      }
    }
    AcceptChildLocked(fork, parent, &actions);
    MaybeDeleteUserLocked(fork, &actions);
  }
  RunActions(std::move(actions));
}

void RRefContext::OnChildQueryTimer(const ForkId& fork) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_children_.find(fork);
    if (it == pending_children_.end() || closed_) return;
    PendingChild* child = it->second.get();
    child->has_timer = false;
    if (child->child == self_) {
      // The child is this worker: answer the query locally.
      if (users_.count(fork) > 0) {
        ScheduleChildQueryLocked(fork, &actions);
      } else {
        refused_.insert(fork);
        ResolveChildLocked(fork, /*refused=*/true, &actions);
      }
    } else if (!child->query_in_flight) {
      child->query_in_flight = true;
      std::weak_ptr<RRefContext> weak = weak_from_this();
      WorkerId to = child->child;
      actions.push_back([this, weak, to, fork] {
        SendControl(to, wire::RREF_CHILD_ACCEPT, EncodeChildControl(fork, /*query=*/true),
                    [weak, fork](const absl::StatusOr<Message>& reply) {
                      if (std::shared_ptr<RRefContext> self = weak.lock()) {
                        self->OnChildQueryReply(fork, reply);
                      }
                    });
      });
    }
  }
  RunActions(std::move(actions));
}

void RRefContext::OnChildQueryReply(const ForkId& fork, const absl::StatusOr<Message>& reply) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    auto it = pending_children_.find(fork);
    if (it == pending_children_.end()) return;
    it->second->query_in_flight = false;
    ChildState state = ChildState::kPending;
    if (!reply.ok()) {
      if (reply.status().code() == absl::StatusCode::kUnavailable ||
          reply.status().code() == absl::StatusCode::kCancelled) {
        ResolveChildLocked(fork, /*refused=*/true, &actions);
      } else {
        ScheduleChildQueryLocked(fork, &actions);
      }
    } else if (!DecodeChildQueryReply(reply->envelope.payload(), &state)) {
      ScheduleChildQueryLocked(fork, &actions);
    } else if (state == ChildState::kRefused) {
      ResolveChildLocked(fork, /*refused=*/true, &actions);
    } else if (state == ChildState::kDone) {
      ResolveChildLocked(fork, /*refused=*/false, &actions);
    } else {
      ScheduleChildQueryLocked(fork, &actions);
    }
  }
  RunActions(std::move(actions));
}

void RRefContext::HandleChildControl(std::shared_ptr<IncomingCall> call) {
  {
    absl::MutexLock lock(&mu_);
    NoteCallerLocked(*call);
  }
  ForkId fork;
  bool query = false;
  if (!DecodeChildControl(call->request().envelope.payload(), &fork, &query) || !fork.valid()) {
    call->ReplyError(absl::InvalidArgumentError("RREF_CHILD_ACCEPT: invalid payload"));
    return;
  }
  Actions actions;
  ChildState answer = ChildState::kRefused;
  {
    absl::MutexLock lock(&mu_);
    TouchLocked();
    if (!query) {
      ResolveChildLocked(fork, /*refused=*/false, &actions);
    } else {
      auto rec = received_.find(fork);
      if (rec != received_.end()) {
        answer = rec->second->done ? ChildState::kDone : ChildState::kPending;
      } else if (users_.count(fork) > 0) {
        // Received and already accepted by its parent: the parent just has not
        // heard yet.
        auto& user = users_[fork];
        answer = user->state == UserFork::kPending ? ChildState::kPending : ChildState::kDone;
      } else {
        refused_.insert(fork);
        answer = ChildState::kRefused;
      }
    }
  }
  RunActions(std::move(actions));
  call->Reply(query ? EncodeChildQueryReply(answer) : std::string(), {});
}

Future<Unit> RRefContext::WaitForConfirmations(const std::vector<RRefHandle>& handles) {
  Future<Unit> out(executor_);
  struct Join {
    absl::Mutex mu;
    int remaining = 0;
  };
  auto join = std::make_shared<Join>();
  std::vector<Future<Unit>> waits;
  {
    absl::MutexLock lock(&mu_);
    for (const RRefHandle& handle : handles) {
      if (!handle.valid()) {
        out.Set(absl::InvalidArgumentError("WaitForConfirmations: empty RRef handle"));
        return out;
      }
      if (handle.is_owner()) continue;
      auto it = users_.find(handle.fork_id());
      if (it == users_.end()) {
        out.Set(absl::CancelledError(
            absl::StrCat("RRef ", handle.rref_id().ToString(), " was deleted by shutdown")));
        return out;
      }
      UserFork* user = it->second.get();
      if (user->state == UserFork::kFailed) {
        out.Set(user->error);
        return out;
      }
      if (user->state == UserFork::kPending) {
        Future<Unit> wait(executor_);
        user->confirm_waiters.push_back(wait);
        waits.push_back(wait);
      }
    }
  }
  if (waits.empty()) {
    out.Set(Unit{});
    return out;
  }
  join->remaining = static_cast<int>(waits.size());
  for (Future<Unit>& wait : waits) {
    wait.Then([join, out](const absl::StatusOr<Unit>& r) {
      if (!r.ok()) {
        out.Set(r.status());
        return;
      }
      absl::MutexLock lock(&join->mu);
      if (--join->remaining == 0) out.Set(Unit{});
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Deletion.

void RRefContext::HandleGone(const RRefId& rref, const ForkId& fork, bool is_owner) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return;
    TouchLocked();
    if (is_owner) {
      auto it = owners_.find(rref);
      if (it == owners_.end()) return;
      --it->second->local_handles;
      MaybeFreeLocked(rref, &actions);
    } else {
      auto it = users_.find(fork);
      if (it == users_.end()) return;
      it->second->handle_alive = false;
      MaybeDeleteUserLocked(fork, &actions);
    }
  }
  RunActions(std::move(actions));
}

void RRefContext::MaybeDeleteUserLocked(const ForkId& fork, Actions* actions) {
  auto it = users_.find(fork);
  if (it == users_.end()) return;
  UserFork* user = it->second.get();
  if (user->handle_alive && !user->force_delete) return;
  if (user->state == UserFork::kPending || user->pending_children > 0 || user->delete_sent) return;
  if (!user->needs_delete || user->owner_failed || failed_.count(user->owner) > 0) {
    EmitLocked(RRefEvent::kUserReleased, user->rref, fork, user->owner);
    users_.erase(it);
    CheckShutdownDone();
    return;
  }
  if (kPlantedBugs && options_.bugs.forget_user_delete) {
    users_.erase(it);
    CheckShutdownDone();
    return;
  }
  user->delete_sent = true;
  EmitLocked(RRefEvent::kUserDeleteSent, user->rref, fork, user->owner);
  std::weak_ptr<RRefContext> weak = weak_from_this();
  WorkerId owner = user->owner;
  std::string payload = EncodeForkRef(user->rref, fork);
  actions->push_back([this, weak, owner, payload, fork] {
    SendControl(
        owner, wire::RREF_USER_DELETE, payload, [weak, fork](const absl::StatusOr<Message>&) {
          std::shared_ptr<RRefContext> self = weak.lock();
          if (!self) return;
          absl::MutexLock lock(&self->mu_);
          auto it = self->users_.find(fork);
          if (it == self->users_.end()) return;
          self->EmitLocked(RRefEvent::kUserReleased, it->second->rref, fork, it->second->owner);
          self->users_.erase(it);
          self->CheckShutdownDone();
        });
  });
}

void RRefContext::OnPeerFailed(WorkerId peer, const absl::Status& reason) {
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    if (closed_ || !failed_.insert(peer).second) return;
    failed_incarnation_[peer] = seen_incarnation_[peer];
    EmitLocked(RRefEvent::kPeerFailed, RRefId{}, ForkId{}, peer);
    // Forks the dead worker held.
    std::vector<RRefId> touched;
    for (auto& [rref, entry] : owners_) {
      std::vector<ForkId> gone;
      for (const auto& [fork, holder] : entry->forks) {
        if (holder == peer) gone.push_back(fork);
      }
      for (const ForkId& fork : gone) {
        RemoveForkLocked(entry.get(), fork, /*duplicate_aware=*/true);
      }
      if (!gone.empty()) touched.push_back(rref);
    }
    for (const RRefId& rref : touched) MaybeFreeLocked(rref, &actions);
    // Children pending on the dead worker, or on a dead owner.
    std::vector<ForkId> children;
    for (const auto& [fork, child] : pending_children_) {
      if (child->child == peer || child->owner == peer) children.push_back(fork);
    }
    for (const ForkId& fork : children) ResolveChildLocked(fork, /*refused=*/true, &actions);
    // References the dead worker owned.
    std::vector<ForkId> users;
    for (auto& [fork, user] : users_) {
      if (user->owner != peer) continue;
      user->owner_failed = true;
      SettleUserLocked(
          user.get(),
          absl::UnavailableError(absl::StrCat("RRef ", user->rref.ToString(), ": owner worker ",
                                              peer, " failed: ", reason.message())),
          false);
      users.push_back(fork);
    }
    for (const ForkId& fork : users) MaybeDeleteUserLocked(fork, &actions);
    // Accepts owed to a dead parent.
    for (auto it = received_.begin(); it != received_.end();) {
      if (it->second->parent == peer) {
        it = received_.erase(it);
      } else {
        ++it;
      }
    }
    CheckShutdownDone();
  }
  RunActions(std::move(actions));
}

// ---------------------------------------------------------------------------------------------
// Shutdown, leaks, debug info.

void RRefContext::CheckShutdownDone() {
  // Called with mu_ held.
  mu_.AssertHeld();
  if (!shutting_down_ || shutdown_waiters_.empty()) return;
  if (!users_.empty() || pending_control_ > 0 || !pending_children_.empty()) return;
  for (auto& waiter : shutdown_waiters_) waiter.Set(Unit{});
  shutdown_waiters_.clear();
  ResumeAfterDeleteAllLocked();
}

void RRefContext::ResumeAfterDeleteAllLocked() {
  mu_.AssertHeld();
  if (!resume_after_delete_all_) return;
  resume_after_delete_all_ = false;
  shutting_down_ = false;
}

Future<Unit> RRefContext::DeleteAllUsersAndUnforkedOwners(absl::Duration timeout,
                                                          bool then_resume) {
  Future<Unit> out(executor_);
  Actions actions;
  {
    absl::MutexLock lock(&mu_);
    shutting_down_ = true;
    resume_after_delete_all_ = then_resume;
    TouchLocked();
    std::vector<ForkId> users;
    for (auto& [fork, user] : users_) {
      user->force_delete = true;
      users.push_back(fork);
    }
    for (const ForkId& fork : users) MaybeDeleteUserLocked(fork, &actions);
    std::vector<RRefId> owners;
    for (const auto& [rref, entry] : owners_) owners.push_back(rref);
    for (const RRefId& rref : owners) MaybeFreeLocked(rref, &actions);
    // Ask every child that has not accepted yet, now.
    for (auto& [fork, child] : pending_children_) {
      if (child->has_timer && clock_->Cancel(child->timer)) {
        child->has_timer = false;
        ForkId f = fork;
        actions.push_back(
            [this, f] { PostSelf([f](RRefContext* c) { c->OnChildQueryTimer(f); }); });
      }
    }
    shutdown_waiters_.push_back(out);
    CheckShutdownDone();
    if (!out.ready() && timeout > absl::ZeroDuration()) {
      std::weak_ptr<RRefContext> weak = weak_from_this();
      clock_->Schedule(clock_->Now() + timeout, [weak, out] {
        std::shared_ptr<RRefContext> self = weak.lock();
        if (!self) {
          out.Set(absl::CancelledError("RRef context is gone"));
          return;
        }
        absl::MutexLock lock(&self->mu_);
        self->ResumeAfterDeleteAllLocked();
        out.Set(absl::DeadlineExceededError(
            absl::StrCat("deleting all RRefs: timed out with ", self->users_.size(), " users, ",
                         self->pending_control_, " unacknowledged control messages and ",
                         self->pending_children_.size(), " pending children left")));
      });
    }
  }
  RunActions(std::move(actions));
  return out;
}

std::map<std::string, int64_t> RRefContext::GetDebugInfo() const {
  absl::MutexLock lock(&mu_);
  std::map<std::string, int64_t> info;
  int64_t owners = 0, placeholders = 0, waiters = 0, forks = 0, pending_users = 0;
  for (const auto& [rref, entry] : owners_) {
    if (entry->placeholder()) {
      ++placeholders;
    } else {
      ++owners;
    }
    waiters += static_cast<int64_t>(entry->waiters.size());
    forks += static_cast<int64_t>(entry->forks.size());
  }
  for (const auto& [fork, user] : users_) {
    if (user->state == UserFork::kPending) ++pending_users;
  }
  info["num_owner_rrefs"] = owners;
  info["num_pending_futures"] = placeholders + waiters;
  info["num_pending_users"] = pending_users;
  info["num_forks"] = forks;
  info["num_user_rrefs"] = static_cast<int64_t>(users_.size());
  info["num_pending_children"] = static_cast<int64_t>(pending_children_.size());
  info["num_pending_control"] = pending_control_;
  info["num_received_children"] = static_cast<int64_t>(received_.size());
  info["num_running_functions"] = running_functions_;
  info["num_deleted_fork_records"] = static_cast<int64_t>(deleted_forks_.size());
  info["num_freed_rref_records"] = static_cast<int64_t>(freed_.size());
  return info;
}

std::vector<LeakedRRef> RRefContext::Leaks() const {
  absl::MutexLock lock(&mu_);
  std::vector<LeakedRRef> leaks;
  for (const auto& [rref, entry] : owners_) {
    if (entry->placeholder()) continue;
    LeakedRRef leak;
    leak.rref_id = rref;
    leak.owner = self_;
    leak.creator = entry->creator;
    leak.is_owner = true;
    leak.created_by = entry->created_by;
    leaks.push_back(leak);
  }
  for (const auto& [fork, user] : users_) {
    LeakedRRef leak;
    leak.rref_id = user->rref;
    leak.fork_id = fork;
    leak.owner = user->owner;
    leak.creator = user->rref.worker;
    leak.created_by = user->created_by;
    leaks.push_back(leak);
  }
  return leaks;
}

absl::Status RRefContext::Close(bool ignore_leaks) {
  std::vector<LeakedRRef> leaks = Leaks();
  std::vector<TimerId> timers;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::OkStatus();
    closed_ = true;
    for (auto& [fork, child] : pending_children_) {
      if (child->has_timer) timers.push_back(child->timer);
    }
    for (auto& [rref, entry] : owners_) {
      for (auto& [id, waiter] : entry->waiters) {
        if (waiter.has_timer) timers.push_back(waiter.timer);
      }
    }
  }
  for (TimerId timer : timers) clock_->Cancel(timer);
  if (leaks.empty() || ignore_leaks) return absl::OkStatus();
  std::vector<std::string> lines;
  for (const LeakedRRef& leak : leaks) lines.push_back(leak.ToString());
  return absl::FailedPreconditionError(absl::StrCat("RRef context on worker ", self_, " leaked ",
                                                    leaks.size(),
                                                    " reference(s): ", absl::StrJoin(lines, "; ")));
}

}  // namespace tether
