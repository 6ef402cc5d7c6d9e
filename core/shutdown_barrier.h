// ShutdownBarrier: one worker's part of the graceful-shutdown barrier that core/agent.h describes
// (join, then quiescence, then commit; or abort when a worker is lost before the join). It holds
// the shutdown's state, the codecs of the SHUTDOWN_* payloads, the leader's polls and its join,
// commit and abort decisions, and a follower's answers. The Agent owns one and is its only user.
//
//   ShutdownBarrier barrier(options, &mu_, clock, executor, gate, &host);
//   {
//     ShutdownBarrier::OwnerLock lock(&mu_, &barrier);  // mu_, the owner's
//     barrier.BeginLocked(/*graceful=*/true);            // Arms the deadline.
//   }
//   barrier.Run();  // The leader starts polling; a follower waits for the leader's messages.
//   // For every SHUTDOWN_* message, on the executor:
//   if (!barrier.HandleMessage(message).ok()) ...;  // malformed: dropped
//   // The barrier ends by calling host.FinishShutdown(status), which calls FinishLocked().
//
// Ownership: the owner (the Agent) keeps the network, the clock, the executor, its mutex and its
// peers; none is owned here, and all must outlive the barrier. The barrier reaches them only
// through the Host the owner implements (send a barrier message, measure this worker's activity,
// finish the shutdown), the Clock and Executor it schedules its timers and polls on, and the
// owner's CallbackGate. Of the peers it learns only what the owner tells it (OnPeerFailedLocked,
// OnPeerRestartedLocked), in the critical section where the owner records the same.
//
// Locking: the barrier has no mutex of its own. `mu`, the owner's mutex, guards its state along
// with the owner's, so the owner reads and changes both in one critical section. Methods named
// *Locked are called with `mu` held (the owner takes it with an OwnerLock, which the
// thread-safety analysis understands; the methods assert it); every other method takes `mu`
// itself, so call those without it. The barrier calls the Host and the joined listeners only with
// `mu` released; it calls Clock::Now, Schedule and Cancel with `mu` held (Schedule never runs its
// callback inline).
//
// Threads: every method runs on its caller's thread, and the Host calls it makes run there too
// (the Agent calls HandleMessage and HandlePeerFailure from its executor tasks, Run from the
// thread calling Shutdown). The barrier's timers (the leader's poll, the deadline) run on the
// clock's context and only post to the executor, where the polls and the deadline's finish run.
// All of these callbacks go through `gate`, the owner's: none runs once the owner closed it.
#ifndef TETHER_CORE_SHUTDOWN_BARRIER_H_
#define TETHER_CORE_SHUTDOWN_BARRIER_H_

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "core/callback_gate.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/message.h"

namespace tether {

// Whether `type` is one of the barrier's messages (SHUTDOWN_INTENT .. SHUTDOWN_ABORT).
inline bool IsShutdownMessage(MessageType type) {
  return type >= wire::SHUTDOWN_INTENT && type <= wire::SHUTDOWN_ABORT;
}

// --- Payloads (pure functions, any thread) ---

// What one worker reports to the leader in one poll round (SHUTDOWN_REPORT).
struct BarrierReport {
  bool declared = false;  // It called Shutdown(true).
  ActivitySnapshot activity;
  // The worker knows every worker joined, and has run its joined listeners.
  bool joined = false;

  bool operator==(const BarrierReport& o) const {
    return declared == o.declared && activity.pending == o.activity.pending &&
           activity.events == o.activity.events && joined == o.joined;
  }
};

// A SHUTDOWN_REPORT's payload: the round it answers and the report, "<round>,<declared 0|1>,
// <pending>,<events>,<joined 0|1>".
struct RoundReport {
  uint64_t round = 0;
  BarrierReport report;
};
std::string EncodeBarrierReport(const RoundReport& report);
// kInvalidArgument unless `payload` is five comma-separated integers.
absl::StatusOr<RoundReport> DecodeBarrierReport(absl::string_view payload);

// A SHUTDOWN_QUERY's payload, the leader's poll: "<round>", or "<round>,1" once every worker has
// joined.
struct BarrierQuery {
  uint64_t round = 0;
  bool joined = false;
};
std::string EncodeBarrierQuery(const BarrierQuery& query);
// kInvalidArgument unless `payload` is a round, alone or followed by ",1".
absl::StatusOr<BarrierQuery> DecodeBarrierQuery(absl::string_view payload);

// A SHUTDOWN_ABORT's payload: why the leader ends the barrier, as text naming the lost worker.
std::string EncodeBarrierAbort(absl::string_view lost_name, const absl::Status& reason,
                               bool lost_had_declared);
// What a follower's shutdown fails with when `leader_name` sent it `payload` (kUnavailable).
absl::Status DecodeBarrierAbort(absl::string_view payload, absl::string_view leader_name);

// --- The barrier ---

struct ShutdownBarrierOptions {
  WorkerId self = -1;
  // Every worker, this one included, sorted by id; the first is the leader.
  std::vector<WorkerInfo> workers;
  // AgentOptions::shutdown_timeout, shutdown_poll_interval, shutdown_fails_on_lost_peer.
  absl::Duration timeout = absl::ZeroDuration();  // Zero: no bound.
  absl::Duration poll_interval = absl::Milliseconds(10);
  bool fails_on_lost_peer = false;
};

class ShutdownBarrier {
 public:
  // What the barrier needs of its owner. Called with `mu` released, on the thread of the barrier
  // method that makes the call.
  class Host {
   public:
    virtual ~Host() = default;
    // Sends a SHUTDOWN_* message; a failed send is ignored (a lost peer is reported on its own).
    virtual void SendBarrierMessage(WorkerId to, MessageType type, std::string payload) = 0;
    // This worker's activity now: its calls in flight, its handlers running, its activity sources.
    virtual ActivitySnapshot LocalActivity() = 0;
    // Ends this worker's shutdown with `status`: calls FinishLocked() and, only if it returns
    // true, cancels the timers it returned and stops (fails its calls, stops its network,
    // completes its shutdown with `status`).
    virtual void FinishShutdown(absl::Status status) = 0;
  };

  // The owner's lock for a critical section that touches the barrier (its *Locked methods): it
  // takes `mu` once, and tells the thread-safety analysis that both the owner's mutex and the
  // barrier's are held (they are the same mutex; the constructor checks it).
  //
  //   ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
  //   if (barrier_->FinishedLocked()) return;
  class ABSL_SCOPED_LOCKABLE OwnerLock {
   public:
    OwnerLock(absl::Mutex* mu, const ShutdownBarrier* barrier)
        ABSL_EXCLUSIVE_LOCK_FUNCTION(mu, barrier->mu_)
        : mu_(mu) {
      if (barrier->mu_ != mu) std::abort();  // Not the mutex the barrier was given.
      mu_->Lock();
      barrier->mu_->AssertHeld();
    }
    ~OwnerLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
    OwnerLock(const OwnerLock&) = delete;
    OwnerLock& operator=(const OwnerLock&) = delete;

   private:
    absl::Mutex* const mu_;
  };

  // `mu`, `clock`, `executor` and `host` are not owned and must outlive the barrier; `gate` is the
  // owner's, closed before the barrier is destroyed. `options.workers` must not be empty.
  ShutdownBarrier(ShutdownBarrierOptions options, absl::Mutex* mu, Clock* clock, Executor* executor,
                  std::shared_ptr<CallbackGate> gate, Host* host);
  ~ShutdownBarrier();

  ShutdownBarrier(const ShutdownBarrier&) = delete;
  ShutdownBarrier& operator=(const ShutdownBarrier&) = delete;

  // Adds a listener for the join (see ShutdownJoinedListener). Call before the shutdown begins
  // (not thread-safe); listeners run once, in order, with `mu` released.
  void AddJoinedListener(ShutdownJoinedListener listener);

  // --- The shutdown's lifecycle; with `mu` held ---

  // The shutdown has begun (gracefully or not).
  bool BegunLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The shutdown has finished (FinishLocked or CloseLocked ran).
  bool FinishedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A graceful shutdown has begun and not finished.
  bool PendingLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Begins the shutdown; BegunLocked() must be false. Graceful: the barrier (the owner then calls
  // Run()); the deadline, if options.timeout is set, finishes it with kDeadlineExceeded.
  // Ungraceful: no barrier, the owner finishes at once.
  void BeginLocked(bool graceful) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks a shutdown that has begun and not finished as finished, and appends the timers the
  // caller must cancel (with `mu` released). False if it had not begun or had finished already.
  bool FinishLocked(std::vector<TimerId>* timers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The owner is going: marks the shutdown finished whatever its state (begun or not), and appends
  // the timers still armed.
  void CloseLocked(std::vector<TimerId>* timers) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // --- Peers; with `mu` held, where the owner records the same ---

  // `peer` failed (told once per incarnation).
  void OnPeerFailedLocked(WorkerId peer, const absl::Status& reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A new incarnation of `peer` was heard from: it is alive, and has declared nothing yet.
  void OnPeerRestartedLocked(WorkerId peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // --- Entry points; they take `mu` themselves ---

  // After BeginLocked(true): the leader posts its first poll; a follower whose leader is already
  // gone (failed, or ended the barrier with SHUTDOWN_ABORT) finishes at once with that reason.
  void Run() ABSL_LOCKS_EXCLUDED(mu_);
  // A SHUTDOWN_* message (IsShutdownMessage). Returns kInvalidArgument, having done nothing, for a
  // malformed payload or a SHUTDOWN_ABORT not from the leader.
  absl::Status HandleMessage(const Message& message) ABSL_LOCKS_EXCLUDED(mu_);
  // The barrier's part of `peer`'s failure, once the owner has told its own listeners (the
  // Agent: on the executor, after OnPeerFailedLocked).
  void HandlePeerFailure(WorkerId peer, const absl::Status& reason) ABSL_LOCKS_EXCLUDED(mu_);
  ShutdownProgress Progress() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct State;

  bool IsLeader() const { return workers_.front().id == options_.self; }
  bool LostLocked(WorkerId w) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return lost_.count(w); }
  template <typename Fn>
  auto Guarded(Fn fn) const {
    return CallbackGate::Guard(gate_, std::move(fn));
  }

  // `gen`: the poll generation it was scheduled for (see State::poll_gen).
  void LeaderPoll(uint64_t gen) ABSL_LOCKS_EXCLUDED(mu_);
  // (Re)arms the leader's poll timer, replacing any armed one.
  void SchedulePollLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Leader: a join completed by the last report (or a failure) starts the quiescence phase.
  void MaybeJoin() ABSL_LOCKS_EXCLUDED(mu_);
  void MaybeCommit() ABSL_LOCKS_EXCLUDED(mu_);
  // Leader: a worker lost before the join ends the barrier.
  void AbortBarrier(WorkerId lost, const absl::Status& reason) ABSL_LOCKS_EXCLUDED(mu_);
  // A follower's error when the leader is gone (or ended the barrier).
  absl::Status LeaderGoneStatus() const ABSL_LOCKS_EXCLUDED(mu_);
  // Runs the joined listeners once.
  void RunJoinedListeners() ABSL_LOCKS_EXCLUDED(mu_);

  // The Host, called only with `mu` released.
  void Send(WorkerId to, MessageType type, std::string payload) ABSL_LOCKS_EXCLUDED(mu_) {
    host_->SendBarrierMessage(to, type, std::move(payload));
  }
  ActivitySnapshot LocalActivity() ABSL_LOCKS_EXCLUDED(mu_) { return host_->LocalActivity(); }
  void Finish(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    host_->FinishShutdown(std::move(status));
  }

  const ShutdownBarrierOptions options_;
  const std::vector<WorkerInfo>& workers_ = options_.workers;
  absl::Mutex* const mu_;
  Clock* const clock_;
  Executor* const executor_;
  const std::shared_ptr<CallbackGate> gate_;
  Host* const host_;
  std::vector<ShutdownJoinedListener> listeners_;

  // Null until the shutdown begins.
  std::unique_ptr<State> state_ ABSL_GUARDED_BY(mu_);
  // The failed peers and why (as the owner's peer records have them).
  std::map<WorkerId, absl::Status> lost_ ABSL_GUARDED_BY(mu_);
  // The leader's SHUTDOWN_ABORT, when it came before this worker's Shutdown().
  std::optional<absl::Status> leader_abort_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tether

#endif  // TETHER_CORE_SHUTDOWN_BARRIER_H_
