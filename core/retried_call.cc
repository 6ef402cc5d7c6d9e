#include "core/retried_call.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"

namespace tether {

absl::Duration RetryBackoff(const RetryPolicy& policy, int attempt) {
  absl::Duration backoff = policy.initial_backoff;
  for (int i = 0; i < attempt && backoff < policy.max_backoff; ++i) backoff *= 2;
  return std::min(backoff, policy.max_backoff);
}

RetriedCaller::RetriedCaller(std::weak_ptr<const void> owner, SendFn send, Clock* clock,
                             Executor* executor, RetryPolicy policy, AttemptHook on_attempt)
    : owner_(std::move(owner)),
      send_(std::move(send)),
      clock_(clock),
      executor_(executor),
      policy_(policy),
      on_attempt_(std::move(on_attempt)) {}

void RetriedCaller::Send(WorkerId to, MessageType type, std::string payload, Done done) {
  Attempt(to, type, std::move(payload), 0, std::move(done));
}

void RetriedCaller::Attempt(WorkerId to, MessageType type, std::string payload, int attempt,
                            Done done) {
  // Every callback below captures `owner` and touches `this` only while it holds it: the caller
  // lives as long as its owner.
  std::weak_ptr<const void> owner = owner_;
  Future<Message> reply = send_(to, type, payload, policy_.attempt_timeout);
  reply.Then(
      [this, owner, to, type, payload, attempt, done](const absl::StatusOr<Message>& result) {
        std::shared_ptr<const void> alive = owner.lock();
        if (!alive) return;
        bool retry = on_attempt_(to, attempt, result.status()) && !result.ok();
        if (!retry) {
          done(result);
          return;
        }
        clock_->Schedule(clock_->Now() + RetryBackoff(policy_, attempt),
                         [this, owner, to, type, payload, attempt, done] {
                           std::shared_ptr<const void> alive = owner.lock();
                           if (!alive) return;
                           executor_->Post([this, owner, to, type, payload, attempt, done] {
                             std::shared_ptr<const void> alive = owner.lock();
                             if (alive) Attempt(to, type, payload, attempt + 1, done);
                           });
                         });
      });
}

}  // namespace tether
