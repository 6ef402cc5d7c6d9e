// Future<T>: the completion of an asynchronous operation, with a value or an absl::Status.
//
// A Future is a cheap, shared handle: copies refer to the same state. The first Set() wins;
// later ones are ignored (and return false), which is what timeouts racing replies need.
// Callbacks added with Then() run on the future's Executor, never inline in Set() or Then().
//
//   Future<int> f(executor);
//   f.Then([](const absl::StatusOr<int>& r) { ... });   // runs on `executor`
//   f.Set(42);
//
// Wait()/WaitFor() block the calling thread. They are for real runs only (Python bindings,
// tests); core code never blocks, and simulated code never waits.
#ifndef TETHER_CORE_FUTURE_H_
#define TETHER_CORE_FUTURE_H_

#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/executor.h"

namespace tether {

// The value of a future that only signals completion.
struct Unit {};

template <typename T>
class Future {
 public:
  using Result = absl::StatusOr<T>;
  using Callback = std::function<void(const Result&)>;

  explicit Future(Executor* executor) : state_(std::make_shared<State>(executor)) {}

  // Completes the future. Returns false (and changes nothing) if it was already complete.
  bool Set(Result result) const {
    std::vector<Callback> callbacks;
    {
      absl::MutexLock lock(&state_->mu);
      if (state_->result.has_value()) return false;
      state_->result.emplace(std::move(result));
      callbacks.swap(state_->callbacks);
    }
    for (Callback& cb : callbacks) Dispatch(std::move(cb));
    return true;
  }

  bool ready() const {
    absl::MutexLock lock(&state_->mu);
    return state_->result.has_value();
  }

  // The result. Requires ready().
  const Result& result() const {
    absl::MutexLock lock(&state_->mu);
    return *state_->result;
  }

  // Runs `callback` with the result on the executor once the future completes.
  void Then(Callback callback) const {
    {
      absl::MutexLock lock(&state_->mu);
      if (!state_->result.has_value()) {
        state_->callbacks.push_back(std::move(callback));
        return;
      }
    }
    Dispatch(std::move(callback));
  }

  // Blocks until complete. Real runs only.
  const Result& Wait() const {
    absl::MutexLock lock(&state_->mu);
    state_->mu.Await(absl::Condition(this, &Future::HasResultLocked));
    return *state_->result;
  }

  // Blocks until complete or `timeout` passes; returns ready(). Real runs only.
  bool WaitFor(absl::Duration timeout) const {
    absl::MutexLock lock(&state_->mu);
    return state_->mu.AwaitWithTimeout(absl::Condition(this, &Future::HasResultLocked), timeout);
  }

  Executor* executor() const { return state_->executor; }

 private:
  struct State {
    explicit State(Executor* e) : executor(e) {}
    Executor* const executor;
    mutable absl::Mutex mu;
    // Written once, by the first Set(); never changed after.
    std::optional<Result> result ABSL_GUARDED_BY(mu);
    // Waiting for the result; taken by the first Set().
    std::vector<Callback> callbacks ABSL_GUARDED_BY(mu);

    // The result once it is set, without the lock: it is written once under `mu` before any
    // reader can learn it is there (through `mu` or a dispatched callback) and never again.
    const Result& ResultOnceSet() const ABSL_NO_THREAD_SAFETY_ANALYSIS { return *result; }
  };

  bool HasResultLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_->mu) {
    return state_->result.has_value();
  }

  void Dispatch(Callback cb) const {
    std::shared_ptr<State> state = state_;
    state_->executor->Post([state, cb = std::move(cb)] { cb(state->ResultOnceSet()); });
  }

  std::shared_ptr<State> state_;
};

}  // namespace tether

#endif  // TETHER_CORE_FUTURE_H_
