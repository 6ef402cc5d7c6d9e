// RRefContext: one worker's remote references (RRefs): the owner side (the
// value, the set of forks that can reach it) and the user side (references to
// values owned elsewhere), and the protocol that keeps them consistent over an
// unreliable network.
//
// Identity: every reference has an RRefId and every fork (each copy of a reference that a worker
// receives) a ForkId, both globally unique (creating worker + that worker's counter); they, the
// descriptors that carry references inside calls and the protocol's payloads are core/rref_ids.h's.
//
// Protocol (all control messages are Agent calls retried with backoff until acknowledged, see
// core/retried_call.h; receivers are idempotent, so drops and duplicates change nothing):
// - Remote(owner, ...): the caller gets a user reference at once and sends *_REMOTE_CALL carrying
//   (rref id, fork id). The owner creates (or finds) its entry, records the fork, runs the function
//   once however often the call arrives, and replies when the value is set. A failed or timed-out
//   creation is remembered and raised by the next use of the reference.
// - Fork(handle, to) / Receive(descriptor, from): the sender (parent) allocates a fork id and keeps
//   its own reference pinned until the child accepts (RREF_CHILD_ACCEPT). An owner parent records
//   the fork at once. A user child of a user parent asks the owner to record it (RREF_FORK_REQUEST)
//   and is confirmed by the owner's acknowledgement. A parent whose child does not accept in time
//   queries it; a child that never got the fork refuses it forever, so a lost call frees the parent
//   instead of pinning it.
// - Deletion: when the last handle to a user reference goes, once its creation or confirmation is
//   settled and its pending children accepted, RREF_USER_DELETE goes to the owner exactly once
//   (retried until acknowledged). The owner remembers deleted forks and freed references, so late
//   or duplicated messages never re-pin a value; it frees the value when no fork and no local
//   handle remain. Those records (deleted fork ids, freed reference ids, refused forks) live as
//   long as the context: a few bytes per reference (see num_deleted_fork_records,
//   num_freed_rref_records).
// - Failure: when the agent reports a worker failed, the forks it held and the children pending on
//   it are released; references it owned fail their next use with kUnavailable.
//
// Threading: every method is thread-safe. Remote runners, futures' callbacks
// and observer events: runners and callbacks run on the executor; observer
// events run synchronously under the context's lock (observers must not call
// back into the context). Handles may be dropped on any thread; the resulting
// protocol work is posted to the executor.
//
// Ownership: create with Create() before agent->Start(); the agent, clock and
// executor must outlive the context. Handles may outlive the context (they then
// do nothing when dropped).
#ifndef TETHER_CORE_RREF_CONTEXT_H_
#define TETHER_CORE_RREF_CONTEXT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "core/buffer.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/future.h"
#include "core/message.h"
#include "core/rref_ids.h"

namespace tether {

class RetriedCaller;

// The value an owner holds, opaque to the core. `object` is an in-process
// object (for instance a holder of a Python object) kept alive as long as the
// owner entry; `payload` and `buffers` are its serialized form, which a fetch
// from another worker sends (see RRefContextOptions::serializer).
struct RRefValue {
  std::shared_ptr<const void> object;
  std::string payload;
  std::vector<Buffer> buffers;
  // Set by a remote runner: bytes handed to the creator's `on_created` with
  // the creation's acknowledgement (the callee's profiled events, say). Not
  // kept with the value.
  std::string creation_reply;
};

class RRefContext;

// A local handle to a reference: an owner handle on the owner, a user handle
// elsewhere. Copies share one state; when the last copy goes, a user reference
// is deleted (the owner is told once) and an owner handle stops pinning the
// owner's value.
class RRefHandle {
 public:
  RRefHandle() = default;

  bool valid() const { return state_ != nullptr; }
  const RRefId& rref_id() const;
  // The fork this handle holds (user handles); invalid for owner handles.
  const ForkId& fork_id() const;
  WorkerId owner() const;
  bool is_owner() const;
  const std::string& type_name() const;
  // Number of handle copies sharing this state (for tests).
  long use_count() const { return state_.use_count(); }

 private:
  friend class RRefContext;
  struct State;
  explicit RRefHandle(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

// The user-facing name in the issue: a user reference is an RRefHandle with
// !is_owner().
using UserRRef = RRefHandle;

// A call that creates a reference's value on its owner.
struct RemoteRequest {
  WorkerId caller = -1;
  MessageType type = wire::MESSAGE_TYPE_UNSPECIFIED;
  RRefId rref_id;
  std::string payload;
  std::vector<Buffer> buffers;
  absl::Time deadline = absl::InfiniteFuture();
};
// Runs a remote call's function and completes with its value (or its error).
using RemoteRunner = std::function<Future<RRefValue>(RemoteRequest request)>;
// Told the runner's RRefValue::creation_reply when a creation succeeds, before
// the user reference is confirmed. Runs on an executor thread.
using CreationCallback = std::function<void(absl::string_view creation_reply)>;

// Events for the simulator's ghost ledger (testing/scenarios/rref_ledger.h).
// `worker` is where the event happened; `peer` is the other worker involved, if
// any.
struct RRefEvent {
  enum Kind {
    kOwnerCreated,    // owner entry with a creation started (remote() arrived or to self)
    kFunctionRun,     // the remote function was started for `rref`
    kValueSet,        // owner value (or error) set
    kOwnerFreed,      // owner value freed
    kValueServed,     // owner served the value (fetch)
    kForkAdded,       // owner recorded `fork` held by `peer`
    kForkRemoved,     // owner dropped `fork` (delete, failure, refusal)
    kUserCreated,     // user reference `fork` created (peer: its parent)
    kUserConfirmed,   // user `fork` known to the owner
    kUserReleased,    // user `fork` gone: delete acknowledged, or nothing to tell the owner
    kUserDeleteSent,  // user `fork` asked the owner to delete it (first attempt)
    kChildPending,    // parent pinned for child `fork` sent to `peer`
    kChildResolved,   // parent released child `fork`
    kPeerFailed,      // `worker` declared `peer` failed
  };
  Kind kind;
  WorkerId worker = -1;
  RRefId rref;
  ForkId fork;
  WorkerId peer = -1;
};

class RRefObserver {
 public:
  virtual ~RRefObserver() = default;
  virtual void OnRRefEvent(const RRefEvent& event) = 0;
};

// Bugs planted on purpose, to prove the ghost ledger and the explorer find them. They have effect
// only in the testonly variant //core:rref_context_planted (rref_context.cc compiled with
// TETHER_PLANTED_BUGS); the production //core:rref_context compiles their branches out and
// ignores RRefContextOptions::bugs. The struct is the same in both variants (no ODR difference).
struct RRefPlantedBugs {
  bool skip_child_wait = false;       // Parents do not stay pinned until children accept.
  bool forget_idempotence = false;    // Owner counts fork messages instead of fork ids.
  bool free_on_first_delete = false;  // Owner frees the value on the first user delete.
  bool forget_user_delete = false;    // Users go without telling the owner (the owner leaks).
};

// Who fetches an owner value (RRefContextOptions::serializer).
struct FetchInfo {
  WorkerId caller = -1;
  // The bytes the caller passed to ToHere() (empty: none).
  std::string attachment;
};

struct RRefContextOptions {
  // The agent's incarnation (AgentOptions::incarnation): ids made by a
  // restarted worker must not collide with those of its earlier lives.
  uint64_t incarnation = 0;
  // The first value of this worker's id counter (RRef ids and fork ids count up from it within an
  // incarnation). tether.rpc starts at 0, as PyTorch does: programs and PyTorch's tests read
  // the ids in an RRef's repr. The default, 1, is what the simulator's pinned traces were made
  // with.
  uint64_t first_local_id = 1;
  // Per-attempt timeout of a control message, and the retry backoff (doubling,
  // capped).
  absl::Duration control_timeout = absl::Seconds(5);
  absl::Duration retry_initial_backoff = absl::Milliseconds(20);
  absl::Duration retry_max_backoff = absl::Seconds(2);
  // A parent whose child has not accepted after this long asks the child
  // whether the fork ever arrived (and keeps asking at this interval).
  absl::Duration child_query_delay = absl::Seconds(30);
  // Turns an owner value into what a fetch sends, given who fetches it and the
  // attachment of its to_here() (FetchInfo). Runs on the thread that serves the
  // fetch, without the context's lock. Default: value.payload and value.buffers.
  std::function<absl::StatusOr<RRefValue>(const RRefValue&, const FetchInfo&)> serializer;
  RRefObserver* observer = nullptr;
  // Has effect only in //core:rref_context_planted (see RRefPlantedBugs).
  RRefPlantedBugs bugs;
};

// True in //core:rref_context_planted, false in the production //core:rref_context.
bool RRefPlantedBugsCompiledIn();

// One leaked reference, as reported when the context is closed.
struct LeakedRRef {
  RRefId rref_id;
  ForkId fork_id;  // users only
  WorkerId owner = -1;
  WorkerId creator = -1;
  bool is_owner = false;
  std::string created_by;
  std::string ToString() const;
};

class RRefContext : public std::enable_shared_from_this<RRefContext> {
 public:
  // Registers the RRef handlers, an activity source and a peer-failure listener
  // on `agent`: call before agent->Start().
  static std::shared_ptr<RRefContext> Create(Agent* agent, Clock* clock, Executor* executor,
                                             RRefContextOptions options = {});
  ~RRefContext();

  RRefContext(const RRefContext&) = delete;
  RRefContext& operator=(const RRefContext&) = delete;

  WorkerId self() const { return self_; }

  // Sets the function runner for remote calls of `type` (PYTHON_REMOTE_CALL,
  // SCRIPT_REMOTE_CALL, BUILTIN_REMOTE_CALL, TEST_REMOTE_CALL). Call before
  // agent->Start().
  void SetRemoteRunner(MessageType type, RemoteRunner runner);

  // Creates a reference whose value `owner` computes by running the call.
  // Returns at once: a user handle (owner elsewhere) or an owner handle (owner
  // == self). `timeout` bounds the creation (unset: the agent's default).
  // `on_created`, if set, receives the owner's creation reply.
  // kInvalidArgument for an unknown worker or a non-remote type.
  absl::StatusOr<RRefHandle> Remote(WorkerId owner, MessageType type, std::string payload,
                                    std::vector<Buffer> buffers,
                                    std::optional<absl::Duration> timeout = std::nullopt,
                                    std::string created_by = "", std::string type_name = "",
                                    CreationCallback on_created = nullptr);

  // Creates an owner reference holding `value` (rpc.RRef(obj)).
  RRefHandle CreateOwned(RRefValue value, std::string created_by = "", std::string type_name = "");

  // The value (to_here). Fails with the creation error if creation failed,
  // kUnavailable if the owner failed, kDeadlineExceeded after `timeout` (unset:
  // agent default; zero: none), on the owner as elsewhere.
  // `attachment` travels with the fetch to the owner's serializer (FetchInfo);
  // on the owner itself it is unused.
  Future<RRefValue> ToHere(const RRefHandle& handle,
                           std::optional<absl::Duration> timeout = std::nullopt,
                           std::string attachment = "");

  // Whether the handle can still be used: its creation/confirmation error,
  // kUnavailable if its owner failed, kCancelled if it was deleted by shutdown.
  absl::Status Check(const RRefHandle& handle) const;

  // Prepares `handle` to be sent to worker `to` inside a call's arguments. The
  // handle stays pinned until the child accepts. Fails with the creation error
  // of the reference.
  absl::StatusOr<RRefDescriptor> Fork(const RRefHandle& handle, WorkerId to);

  // Turns a descriptor received from worker `from` into a handle (user, or
  // owner on the owner) and starts confirming it. kInvalidArgument for a
  // malformed descriptor or a wrong parent.
  absl::StatusOr<RRefHandle> Receive(const RRefDescriptor& descriptor, WorkerId from);

  // Completes when every handle is confirmed by its owner (run a call's
  // function only then); fails with the first confirmation error.
  Future<Unit> WaitForConfirmations(const std::vector<RRefHandle>& handles);

  // Shutdown support: deletes every user reference (handles become unusable:
  // kCancelled) and every owner without forks, and from now on frees owners as
  // soon as their last fork goes. Completes when every deletion this worker
  // sent is acknowledged, or fails with kDeadlineExceeded after `timeout` (zero:
  // no timeout).
  // With `then_resume` (PyTorch's _delete_all_user_and_unforked_owner_rrefs in
  // a running program), the context leaves that mode once the future completes:
  // RRefs made afterwards live as usual.
  Future<Unit> DeleteAllUsersAndUnforkedOwners(absl::Duration timeout, bool then_resume = false);

  // num_owner_rrefs, num_pending_futures, num_pending_users, num_forks
  // (PyTorch's keys), plus num_user_rrefs, num_pending_children,
  // num_pending_control, num_received_children, num_running_functions,
  // num_deleted_fork_records, num_freed_rref_records.
  std::map<std::string, int64_t> GetDebugInfo() const;

  // References still alive here (owners with a value or a running creation, and
  // users).
  std::vector<LeakedRRef> Leaks() const;

  // Detaches the context: from now on handles do nothing when dropped and
  // handlers answer kCancelled. Returns kFailedPrecondition listing the leaks
  // (id, owner, creator, what created it) unless there are none or
  // `ignore_leaks`. Idempotent. Call it while the clock is alive: the
  // destructor only detaches (it touches neither the clock nor the executor).
  absl::Status Close(bool ignore_leaks);

 private:
  friend struct RRefHandle::State;
  struct OwnerEntry;
  struct UserFork;
  struct PendingChild;
  struct ReceivedChild;
  using Actions = std::vector<std::function<void()>>;

  RRefContext(Agent* agent, Clock* clock, Executor* executor, RRefContextOptions options);
  void Attach();

  // Handlers (on the executor).
  void HandleRemoteCall(std::shared_ptr<IncomingCall> call);
  void HandleFetch(std::shared_ptr<IncomingCall> call);
  void HandleForkRequest(std::shared_ptr<IncomingCall> call);
  void HandleUserDelete(std::shared_ptr<IncomingCall> call);
  void HandleChildControl(std::shared_ptr<IncomingCall> call);
  void OnPeerFailed(WorkerId peer, const absl::Status& reason);

  void HandleGone(const RRefId& rref, const ForkId& fork, bool is_owner);
  void OnCreationReply(const ForkId& fork, const absl::StatusOr<Message>& reply);
  void OnForkRequestReply(const ForkId& fork, const absl::StatusOr<Message>& reply);
  void StartFunction(const RRefId& rref, RemoteRequest request, MessageType type,
                     CreationCallback on_created);
  void OnFunctionDone(const RRefId& rref, const absl::StatusOr<RRefValue>& result);
  void OnChildQueryTimer(const ForkId& fork);
  void OnChildQueryReply(const ForkId& fork, const absl::StatusOr<Message>& reply);
  void CheckShutdownDone() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResumeAfterDeleteAllLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Locked helpers. Work that must happen without the lock (agent calls,
  // dropping pins, completing futures' owners) goes to `actions`.
  GloballyUniqueId NewIdLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  OwnerEntry* FindOrCreatePlaceholderLocked(const RRefId& rref) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AddForkLocked(OwnerEntry* entry, const ForkId& fork, WorkerId holder)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveForkLocked(OwnerEntry* entry, const ForkId& fork, bool duplicate_aware)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeFreeLocked(const RRefId& rref, Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeLocked(const RRefId& rref, Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeDeleteUserLocked(const ForkId& fork, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SettleUserLocked(UserFork* user, absl::Status error, bool needs_delete)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ResolveChildLocked(const ForkId& fork, bool refused, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AcceptChildLocked(const ForkId& fork, WorkerId parent, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ScheduleChildQueryLocked(const ForkId& fork, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EmitLocked(RRefEvent::Kind kind, const RRefId& rref, const ForkId& fork, WorkerId peer)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  RRefHandle MakeHandleLocked(const RRefId& rref, const ForkId& fork, WorkerId owner, bool is_owner,
                              const std::string& type_name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TouchLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { ++events_; }
  // Records the incarnation a request came from; a worker declared failed that
  // speaks again from a newer incarnation is alive again.
  void NoteCallerLocked(const IncomingCall& call) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Sends a control message through control_ (core/retried_call.h), retrying on timeouts with
  // backoff until it is answered (or the peer failed, or the agent shut down), and counts it in
  // pending_control_ until then. `done` runs on the executor with the final result.
  void SendControl(WorkerId to, MessageType type, std::string payload,
                   std::function<void(const absl::StatusOr<Message>&)> done);
  // control_'s hook: an attempt to `to` finished with `status`; returns whether
  // to retry it: a timeout is retried, and so is a transient send failure
  // (core/status.h; PyTorch's faulty agent) while `to` is not declared failed.
  bool OnControlAttempt(WorkerId to, const absl::Status& status);
  void RunActions(Actions actions);
  // Posts `fn(ctx)` on the executor if the context is still alive.
  void PostSelf(std::function<void(RRefContext*)> fn);

  Agent* const agent_;
  Clock* const clock_;
  Executor* const executor_;
  const RRefContextOptions options_;
  const WorkerId self_;
  std::map<MessageType, RemoteRunner> runners_;
  // Set once by Attach() (it needs weak_from_this()), before any control message is sent.
  std::unique_ptr<RetriedCaller> control_;

  mutable absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_local_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t events_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pending_control_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t running_functions_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<RRefId, std::unique_ptr<OwnerEntry>> owners_ ABSL_GUARDED_BY(mu_);
  std::map<ForkId, std::unique_ptr<UserFork>> users_ ABSL_GUARDED_BY(mu_);
  std::map<ForkId, std::unique_ptr<PendingChild>> pending_children_ ABSL_GUARDED_BY(mu_);
  std::map<ForkId, std::unique_ptr<ReceivedChild>> received_ ABSL_GUARDED_BY(mu_);
  std::set<ForkId> refused_ ABSL_GUARDED_BY(mu_);
  std::set<ForkId> deleted_forks_ ABSL_GUARDED_BY(mu_);
  std::set<RRefId> freed_ ABSL_GUARDED_BY(mu_);
  std::set<WorkerId> failed_ ABSL_GUARDED_BY(mu_);
  // DeleteAllUsersAndUnforkedOwners(then_resume): leave shutting_down_ when done.
  bool resume_after_delete_all_ ABSL_GUARDED_BY(mu_) = false;
  std::map<WorkerId, uint64_t> seen_incarnation_ ABSL_GUARDED_BY(mu_);
  std::map<WorkerId, uint64_t> failed_incarnation_ ABSL_GUARDED_BY(mu_);
  std::vector<Future<Unit>> shutdown_waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tether

#endif  // TETHER_CORE_RREF_CONTEXT_H_
