// RetriedCaller: sends a control message and retries it, with doubling backoff, until it is
// answered. The RRef context sends every control message of its protocol (fork requests, user
// deletes, child accepts and queries) through one; receivers are idempotent, so the duplicates a
// retry may cause change nothing.
//
//   RetriedCaller control(weak_owner, send, clock, executor, policy, on_attempt);
//   control.Send(owner, wire::RREF_USER_DELETE, payload,
//                [](const absl::StatusOr<Message>& reply) { ... });  // runs once, at the end
//
// After every attempt `on_attempt` is told its result and decides whether to retry it: a failed
// attempt is retried while it says so (the RRef context retries only kDeadlineExceeded; the
// distributed-autograd cleanup also retries send failures, bounded), and an answered one (OK)
// always ends the call. Attempt k+1 is sent RetryBackoff(policy, k) after attempt k failed.
//
// Threads and lifetime: `on_attempt` and `done` run on the thread that completes the attempt's
// reply future (the executor, for an Agent's futures), `on_attempt` first. A retry is scheduled on
// the clock and sent from a task posted to the executor. The caller belongs to `owner` (it is a
// member of it, or outlives it): once `owner` is destroyed, pending attempts stop without calling
// back, and while a callback runs the owner is kept alive. Send() is thread-safe; the caller holds
// no lock of its own.
#ifndef TETHER_CORE_RETRIED_CALL_H_
#define TETHER_CORE_RETRIED_CALL_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/future.h"
#include "core/message.h"

namespace tether {

struct RetryPolicy {
  // Per-attempt timeout.
  absl::Duration attempt_timeout = absl::Seconds(5);
  // The first retry's delay; it doubles with every further attempt, up to max_backoff.
  absl::Duration initial_backoff = absl::Milliseconds(20);
  absl::Duration max_backoff = absl::Seconds(2);
};

// The delay before the attempt that follows timed-out attempt `attempt` (0 is the first):
// initial_backoff doubled `attempt` times, capped at max_backoff.
absl::Duration RetryBackoff(const RetryPolicy& policy, int attempt);

class RetriedCaller {
 public:
  using Done = std::function<void(const absl::StatusOr<Message>&)>;
  // Sends one attempt (the RRef context: Agent::Call without buffers).
  using SendFn = std::function<Future<Message>(WorkerId to, MessageType type, std::string payload,
                                               absl::Duration timeout)>;
  // Told that attempt `attempt` (0 is the first) to `to` finished with `status`; returns whether
  // to retry it (ignored when `status` is OK). When the call ends (no retry), `done` runs right
  // after.
  using AttemptHook = std::function<bool(WorkerId to, int attempt, const absl::Status& status)>;

  RetriedCaller(std::weak_ptr<const void> owner, SendFn send, Clock* clock, Executor* executor,
                RetryPolicy policy, AttemptHook on_attempt);

  RetriedCaller(const RetriedCaller&) = delete;
  RetriedCaller& operator=(const RetriedCaller&) = delete;

  const RetryPolicy& policy() const { return policy_; }

  // Sends the first attempt now, from the calling thread.
  void Send(WorkerId to, MessageType type, std::string payload, Done done);

 private:
  void Attempt(WorkerId to, MessageType type, std::string payload, int attempt, Done done);

  const std::weak_ptr<const void> owner_;
  const SendFn send_;
  Clock* const clock_;
  Executor* const executor_;
  const RetryPolicy policy_;
  const AttemptHook on_attempt_;
};

}  // namespace tether

#endif  // TETHER_CORE_RETRIED_CALL_H_
