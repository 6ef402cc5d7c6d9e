// DistAutograd: one worker's share of distributed autograd (torch.distributed.autograd), the
// torch-free protocol part. It keeps the contexts this worker created or joined (who joined from
// where, known and involved workers, the send/recv functions recorded by message id), runs the
// FAST-mode backward pass protocol over BACKWARD_AUTOGRAD_REQ, and releases contexts everywhere
// with CLEANUP_AUTOGRAD_CONTEXT_REQ. The local graph itself is somebody else's: a GraphRunner
// (libtorch's engine in python/dist_autograd_engine.cc, a fake integer engine in tests).
//
//   auto dag = DistAutograd::Create(agent, clock, executor, options).value();  // before Start()
//   dag->SetRunner(&runner);
//   ContextId ctx = dag->NewContext();                  // with dist_autograd.context() as ctx:
//   AutogradMessageId msg = dag->NewMessageId();        //   a forward call to worker 1 records
//   dag->RecordSend(ctx, msg, /*dst=*/1);               //   a send function (callee: Join +
//   Future<Unit> done = dag->Backward(ctx, false, deadline);   // RecordRecv)
//   done.Then([](const absl::StatusOr<Unit>& r) { ... });      // on the executor
//   dag->Release(ctx);                                  // __exit__: released on every worker
//
// Ids: ContextId and AutogradMessageId are `worker << 48 | counter`, two independent counters
// (PyTorch's layout: the first context and message of worker 0 are 0); a restarted worker starts
// its counters at `incarnation << 40`. MaxId() is `(1 << 48) - 1 | worker << 48`.
//
// Pass protocol (PyTorch's FAST mode, dist_engine.cpp):
// - The initiator's Backward() begins a pass (BeginPass + RunRoot on the runner). Every recv node
//   the runner executes calls SendGradients(), an agent call carrying the gradients back to the
//   worker that sent the forward message.
// - On a worker, the first BACKWARD_AUTOGRAD_REQ of a pass begins the pass there (BeginPass +
//   RunSendFunction) and its reply is deferred: it carries that worker's completion or error. Later
//   arrivals of the same pass (BackwardReq.pass_id) run their send function and are answered at
//   once. A worker's pass completes when the runner says it is locally done and every gradient
//   call it made was answered.
// - Errors get "Error on Node <worker>: " once (where they first happen) and travel back along
//   the deferred replies. A pass also fails at its deadline (the initiator's; each request carries
//   the time left) with kDeadlineExceeded naming what it still waits for, at once with
//   kUnavailable naming a failed peer it depends on, and with kCancelled when the agent stops.
//
// Release: Release(ctx) erases the context, remembers it (a tombstone: a late Join or backward
// message for it is refused, never re-creates it) and sends CleanupReq to every known or involved
// worker, retried (timeouts, and send failures while the peer is not declared failed) up to
// `cleanup_max_attempts`; a worker declared failed is tried too (it may have restarted and
// joined again): a send failure ends it at once (the network has it down, a dead one costs one
// attempt), a timeout is retried (the request went out: a new incarnation is up). A receiver
// releases its copy, forwards to its own known/involved workers (transitive) and always
// acknowledges. When a peer fails, the contexts it created are released
// here (nobody else can exit them), and so are those this worker joined only through failed
// workers (their creator may never have learned of it), below but not on their creator. Pending
// cleanups show in the agent's activity (the graceful shutdown barrier waits for them).
//
// Tombstones: a context this worker issued itself needs none (it is released once issued and
// gone: ids are allocated in order from `incarnation << 40`). Other ids are kept per creator as
// ranges [lo, hi] that merge when adjacent, so a worker that sees every context of a trainer
// keeps one range per creator (and incarnation), however long the run. They are never pruned,
// not even for a creator declared failed: its old contexts may still arrive late through living
// workers (a restarted incarnation reuses the worker id), and nobody would release them again.
//
// The world: ids off the wire are checked against the agent's workers. A context created by a
// worker outside the world, or a worker id outside it (Join's `from`, LearnInvolved, a known
// worker, a send's destination, a CleanupReq's `involved`), is refused with kInvalidArgument
// naming the id and changes nothing; a refused CleanupReq is answered with that error (the
// sender does not retry it) and nothing is released or forwarded.
//
// Threading: every method is thread-safe. One mutex guards the state; observer events fire under
// it (observers must not call back). Runner calls run on the executor, one at a time per context
// (a per-context strand), never under the lock; so are call replies and future completions.
// Futures' callbacks run on the executor.
//
// Ownership: create with Create() before agent->Start(); the agent, clock, executor and observer
// must outlive it (none is owned). The runner is not owned either: it either outlives the core or
// detaches itself first with SetRunner(nullptr) (the extension's does). Its timers and posted tasks
// hold only weak references: once it is destroyed they do nothing, and its handlers answer
// kCancelled.
#ifndef TETHER_CORE_DIST_AUTOGRAD_H_
#define TETHER_CORE_DIST_AUTOGRAD_H_

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
#include "core/retried_call.h"

namespace tether {

using ContextId = int64_t;
using AutogradMessageId = int64_t;

// PyTorch's error texts (torch/csrc/distributed/autograd), kept verbatim for drop-in tests.
// "Could not find autograd context with id: N"
std::string ContextNotFoundText(ContextId context);
// "Could not find send function for autograd message id: N"
std::string SendFunctionNotFoundText(AutogradMessageId message);
// "Autograd context no longer valid! This usually means ..."
extern const char kContextNoLongerValidText[];

// What a runner call reports about the local pass.
struct PassProgress {
  // Not OK: the local pass failed (the engine's error; "Error on Node N: " is added by the core).
  absl::Status error;
  // Every root of this worker's pass ran (the initiator's graph root, every send function of the
  // context) and nothing is left waiting for inputs.
  bool local_done = false;
};

// The local graph engine: libtorch's in the extension (python/dist_autograd_engine.cc), a fake
// one in tests. Called on the executor, one call at a time per context (never concurrently for
// one context, possibly concurrently for two), never under the core's lock. A runner call may
// call back into the core (SendGradients from a recv node, Exists).
class GraphRunner {
 public:
  virtual ~GraphRunner() = default;
  // A pass of `context` begins on this worker. FAST mode: every send function of the context is
  // a root. For the initiator the glue built the GraphRoot and GraphTask before calling Backward()
  // (on the caller's thread); BeginPass only adopts them. An error fails the pass.
  // `pass_id` is the pass's (PassRunning(context, pass_id) tells whether it still runs: a pass
  // that failed before its BeginPass ran still gets it, then AbortPass and EndPass).
  virtual absl::Status BeginPass(ContextId context, int64_t pass_id, bool retain_graph,
                                 bool initiator) = 0;
  // Initiator only: runs the graph root.
  virtual PassProgress RunRoot(ContextId context) = 0;
  // Runs send function `message` with the gradients that arrived for it (`gradients` and
  // `buffers` as the sending recv node passed them to SendGradients).
  virtual PassProgress RunSendFunction(ContextId context, AutogradMessageId message,
                                       const std::string& gradients,
                                       const std::vector<Buffer>& buffers) = 0;
  // The pass failed (`error` is what the pass reports): stop the local task. EndPass follows.
  virtual void AbortPass(ContextId context, const absl::Status& error) = 0;
  // The pass ended (after success or AbortPass): drop the pass's task.
  virtual void EndPass(ContextId context) = 0;
  // The context was released here: drop its nodes and gradients. After the running call, if any.
  virtual void Release(ContextId context) = 0;
};

// Events for a ghost ledger (testing/scenarios). `worker` is where it happened.
struct DistAutogradEvent {
  enum Kind {
    kCreated,          // NewContext()
    kJoined,           // first Join from `peer`
    kKnown,            // `peer` became a known worker
    kSendRecorded,     // send function `message` towards `peer`
    kRecvRecorded,     // recv function `message` from `peer`
    kPassBegun,        // a pass began here (`peer`: the first arrival's sender; -1 initiator)
    kPassEnded,        // it ended with `status`
    kGradientsSent,    // SendGradients(`message`) to `peer`
    kGradientsRun,     // send function `message` was handed its gradients (from `peer`)
    kReleaseSent,      // CleanupReq to `peer` (first attempt)
    kReleaseAcked,     // ... acknowledged by `peer` (or given up: `status`)
    kReleased,         // the context was erased here and tombstoned
    kBackwardStarted,  // Backward() accepted, `deadline`
    kBackwardDone,     // Backward()'s future completes with `status`
    kPeerFailed,       // `peer` declared failed
  };
  Kind kind;
  WorkerId worker = -1;
  ContextId context = -1;
  AutogradMessageId message = -1;
  WorkerId peer = -1;
  int64_t pass_id = -1;
  absl::Status status;
  absl::Time deadline = absl::InfiniteFuture();
};

class DistAutogradObserver {
 public:
  virtual ~DistAutogradObserver() = default;
  virtual void OnDistAutogradEvent(const DistAutogradEvent& event) = 0;
};

// Bugs planted on purpose, to prove the ledger and the explorer find them. They have effect only
// in the testonly //core:dist_autograd_planted (TETHER_PLANTED_BUGS); the production
// //core:dist_autograd compiles their branches out. The struct is the same in both variants.
struct DistAutogradPlantedBugs {
  bool forget_transitive_release = false;  // A cleanup receiver does not forward.
  bool release_once = false;               // Cleanups are not retried.
  bool resurrect_released = false;         // No tombstones: a late Join re-creates the context.
  bool reply_before_rpcs = false;          // A pass completes without waiting for its calls.
};

// True in //core:dist_autograd_planted, false in //core:dist_autograd.
bool DistAutogradPlantedBugsCompiledIn();

struct DistAutogradOptions {
  // The agent's incarnation: ids of a restarted worker start at `incarnation << 40`.
  uint64_t incarnation = 0;
  // Per-attempt timeout and backoff of CleanupReq.
  RetryPolicy cleanup_retry;
  // Attempts of one CleanupReq, the first included (PyTorch's sendWithRetries: 20).
  int cleanup_max_attempts = 20;
  // Not owned. Null: nobody is told.
  DistAutogradObserver* observer = nullptr;
  // Has effect only in //core:dist_autograd_planted.
  DistAutogradPlantedBugs bugs;
};

class DistAutograd : public std::enable_shared_from_this<DistAutograd> {
 public:
  // Registers the two handlers, an activity source and a peer-failure listener on `agent`: call
  // before agent->Start(). kInvalidArgument unless the worker id is in [0, 65535].
  static absl::StatusOr<std::shared_ptr<DistAutograd>> Create(Agent* agent, Clock* clock,
                                                              Executor* executor,
                                                              DistAutogradOptions options = {});
  ~DistAutograd();
  DistAutograd(const DistAutograd&) = delete;
  DistAutograd& operator=(const DistAutograd&) = delete;

  WorkerId self() const { return self_; }
  // Not owned. Call before agent->Start(). Without one, passes fail with kFailedPrecondition.
  // SetRunner(nullptr) detaches it: it waits for a runner call running on another thread, after
  // which no call reaches the old runner (a pass running then fails with kCancelled). A runner
  // calls it from its destructor.
  void SetRunner(GraphRunner* runner);

  // --- Ids. ---
  ContextId NewContext();  // created here (its creator is ctx >> 48)
  AutogradMessageId NewMessageId();
  int64_t MaxId() const;  // (1 << 48) - 1 | self << 48 (_get_max_id)
  static WorkerId CreatorOf(ContextId context) { return static_cast<WorkerId>(context >> 48); }

  // --- Contexts. ---
  // Erases and tombstones the context, then releases it on every known and involved worker.
  // kNotFound with ContextNotFoundText if it is not here.
  absl::Status Release(ContextId context);
  // The same without an error when it is absent (it is tombstoned all the same, unless its
  // creator is outside the world: such an id can never be joined anyway).
  void ReleaseIfPresent(ContextId context);
  bool Exists(ContextId context) const;  // _retrieve_context / _is_valid_context
  // Whether pass `pass_id` of `context` runs here now; whether any pass of it does.
  bool PassRunning(ContextId context, int64_t pass_id) const;
  bool AnyPassRunning(ContextId context) const;
  // Released here: tombstoned, or issued by this worker (this incarnation) and gone.
  bool IsReleased(ContextId context) const;

  // --- Forward recording (the glue calls these while sending and receiving calls). ---
  // The context as seen by a callee: created on first use. kNotFound if it was released here (a
  // late message), or if it is this worker's own id and was never issued: the glue then runs the
  // call without recording. kInvalidArgument for a negative id, a creator (CreatorOf) or `from`
  // outside the world.
  absl::Status Join(ContextId context, WorkerId from);
  // _known_worker_ids(). RecordSend adds its destination too (PyTorch always does). Both refuse
  // a worker outside the world (kInvalidArgument).
  absl::Status AddKnownWorker(ContextId context, WorkerId worker);
  absl::Status RecordSend(ContextId context, AutogradMessageId message, WorkerId dst);
  absl::Status RecordRecv(ContextId context, AutogradMessageId message, WorkerId from);
  // Workers a reply said are in the callee's subtree (released directly by the creator).
  // kInvalidArgument naming the first one outside the world: then none is learned.
  absl::Status LearnInvolved(ContextId context, const std::vector<WorkerId>& workers);
  // This worker, its known workers and what it learned, sorted (a reply carries it).
  absl::StatusOr<std::vector<WorkerId>> Involved(ContextId context) const;
  absl::StatusOr<std::vector<WorkerId>> KnownWorkers(ContextId context) const;
  // Send functions (message id -> destination) and recv functions (message id -> source).
  absl::StatusOr<std::map<AutogradMessageId, WorkerId>> SendFunctions(ContextId context) const;
  absl::StatusOr<std::map<AutogradMessageId, WorkerId>> RecvFunctions(ContextId context) const;

  // --- Backward. ---
  // Initiator: runs a pass over the whole context; completes when every worker's share is done,
  // or with its error ("Error on Node N: ..."), kDeadlineExceeded at `deadline`
  // (absl::InfiniteFuture(): none), kNotFound for an unknown context, kFailedPrecondition if a
  // pass is already running in it, kCancelled when the agent stops.
  Future<Unit> Backward(ContextId context, bool retain_graph, absl::Time deadline);
  // From a recv node during a runner call: sends `gradients`/`buffers` for the send function
  // `message` of worker `to` (the recv's source), with the pass's retain_graph and a call timeout
  // of the pass's time left (plus a grace period). The pass waits for the reply and fails with
  // its error. kNotFound / kFailedPrecondition (nothing sent) if the
  // context is gone, the recv function is not recorded, or no pass runs.
  Future<Message> SendGradients(ContextId context, WorkerId to, AutogradMessageId message,
                                std::string gradients, std::vector<Buffer> buffers);

  // --- For people, tests and the shutdown barrier. ---
  // PyTorch's num_autograd_contexts and num_current_backward_passes, plus Tether's
  // num_released_context_records (stored tombstone ranges: about one per other creator; none
  // for this worker's own contexts), num_pending_cleanups, num_backward_passes_started,
  // num_backward_passes_failed.
  std::map<std::string, int64_t> GetDebugInfo() const;
  // Pending cleanups (pending) and an event count (registered as the agent's activity source).
  ActivitySnapshot Activity() const;

 private:
  struct Pass;
  struct Context;
  struct Strand;
  using Actions = std::vector<std::function<void()>>;

  DistAutograd(Agent* agent, Clock* clock, Executor* executor, DistAutogradOptions options);
  void Attach();

  void HandleBackward(std::shared_ptr<IncomingCall> call);
  void HandleCleanup(std::shared_ptr<IncomingCall> call);
  void OnPeerFailed(WorkerId peer, const absl::Status& reason);
  void OnAgentStopped();
  void OnDeadline(ContextId context, int64_t pass_id);
  void OnProgress(ContextId context, int64_t pass_id, const PassProgress& progress);
  void OnGradientsReply(ContextId context, int64_t pass_id, uint64_t call,
                        const absl::StatusOr<Message>& reply);
  bool OnCleanupAttempt(WorkerId to, int attempt, const absl::Status& status);

  Context* FindLocked(ContextId context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const Context* FindLocked(ContextId context) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseLocked(ContextId context, WorkerId from, const std::set<WorkerId>& covered,
                     Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SendCleanupLocked(WorkerId to, ContextId context, const std::set<WorkerId>& involved,
                         Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartPassLocked(Context* ctx, int64_t pass_id, bool initiator, bool retain,
                       absl::Time deadline, std::shared_ptr<IncomingCall> first_call, WorkerId from,
                       Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeCompleteLocked(Context* ctx, Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Fails the context's pass if it depends on a worker already declared failed.
  void FailIfPeerFailedLocked(Context* ctx, Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailPassLocked(Context* ctx, absl::Status error, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndPassLocked(Context* ctx, absl::Status status, Actions* actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string WaitingForLocked(const Context& ctx) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Queues `task` on the context's strand; it runs on the executor after the strand's earlier
  // tasks, without the lock.
  void EnqueueLocked(ContextId context, int64_t pass_id, std::function<void()> task,
                     Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunStrand(ContextId context);
  void EmitLocked(DistAutogradEvent::Kind kind, ContextId context, WorkerId peer = -1,
                  AutogradMessageId message = -1, int64_t pass_id = -1,
                  absl::Status status = absl::OkStatus(),
                  absl::Time deadline = absl::InfiniteFuture()) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NoteCallerLocked(const IncomingCall& call) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool InWorld(WorkerId worker) const { return world_.count(worker) > 0; }
  // kInvalidArgument naming `worker` (`what` it is) and the world.
  absl::Status NotInWorldError(WorkerId worker, absl::string_view what) const;
  // kInvalidArgument naming `context` unless its creator is in the world.
  absl::Status CheckCreatorInWorld(ContextId context) const;
  bool IssuedHereLocked(ContextId context) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IsReleasedLocked(ContextId context) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records the release of `context` (before it is erased). True if it was not released yet.
  bool TombstoneLocked(ContextId context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status WithNodePrefix(const absl::Status& error) const;
  void PostSelf(std::function<void(DistAutograd*)> fn);
  static void RunActions(Actions actions);
  // Runs fn with the runner (nullptr once detached), counted as a runner call (SetRunner waits).
  void WithRunner(const std::function<void(GraphRunner*)>& fn) ABSL_LOCKS_EXCLUDED(mu_);
  PassProgress RunnerGone() const;

  Agent* const agent_;
  Clock* const clock_;
  Executor* const executor_;
  const DistAutogradOptions options_;
  const WorkerId self_;
  const int64_t id_base_;           // self << 48
  const int64_t first_context_;     // this incarnation's first context id
  const std::set<WorkerId> world_;  // the agent's workers (fixed)
  std::unique_ptr<RetriedCaller> cleanup_;

  mutable absl::Mutex mu_;
  GraphRunner* runner_ ABSL_GUARDED_BY(mu_) = nullptr;
  int runner_calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  int64_t next_context_ ABSL_GUARDED_BY(mu_);
  int64_t next_message_ ABSL_GUARDED_BY(mu_);
  int64_t next_pass_ ABSL_GUARDED_BY(mu_);
  uint64_t next_call_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t events_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pending_cleanups_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t passes_started_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t passes_failed_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<ContextId, std::unique_ptr<Context>> contexts_ ABSL_GUARDED_BY(mu_);
  // Tombstones, lo -> hi (inclusive), disjoint, each within one creator; adjacent ones merged.
  // Ids issued here (IssuedHereLocked) are not stored.
  std::map<ContextId, ContextId> released_ ABSL_GUARDED_BY(mu_);
  std::map<ContextId, std::unique_ptr<Strand>> strands_ ABSL_GUARDED_BY(mu_);
  std::set<WorkerId> failed_ ABSL_GUARDED_BY(mu_);
  std::map<WorkerId, uint64_t> seen_incarnation_ ABSL_GUARDED_BY(mu_);
  std::map<WorkerId, uint64_t> failed_incarnation_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tether

#endif  // TETHER_CORE_DIST_AUTOGRAD_H_
