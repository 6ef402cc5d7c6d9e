// CallbackGate: keeps an object that is owned by a unique_ptr (the Agent) from being destroyed
// while one of its timer or executor callbacks runs, and makes the callbacks that start after it
// is gone do nothing.
//
// The Clock's Cancel() does not wait for a callback that is already running (SystemClock's timer
// thread may have taken it off its queue a moment before), and an Executor cannot take back a
// posted task, so a callback capturing a raw `this` can outlive its object. A callback wrapped by
// Guard() holds the gate (a shared_ptr, so the gate outlives the object) and runs its body only
// inside a Scope; the object's destructor calls Close() first, which turns later Scopes away and
// waits for the Scopes open on other threads (a Scope open on the calling thread, when the object
// is destroyed from inside one of its own callbacks, is not waited for).
//
//   gate_ = std::make_shared<CallbackGate>();
//   clock_->Schedule(deadline, CallbackGate::Guard(gate_, [this] { OnTimer(); }));
//   ~Owner() { gate_->Close(); ... }
//
// Cost: two atomic read-modify-writes per callback; no lock unless the gate is closing.
#ifndef TETHER_CORE_CALLBACK_GATE_H_
#define TETHER_CORE_CALLBACK_GATE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/synchronization/mutex.h"

namespace tether {

class CallbackGate {
 public:
  CallbackGate() = default;
  CallbackGate(const CallbackGate&) = delete;
  CallbackGate& operator=(const CallbackGate&) = delete;

  // One callback's run through the gate. Test it: false means the owner is gone or going.
  class Scope {
   public:
    explicit Scope(CallbackGate* gate);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    explicit operator bool() const { return entered_; }

   private:
    friend class CallbackGate;
    CallbackGate* const gate_;
    const Scope* const outer_;  // The thread's enclosing Scope (any gate).
    bool entered_ = false;
  };

  // Turns later Scopes away, then waits until no Scope of this gate is open on another thread.
  // Idempotent.
  void Close();
  bool closed() const { return (state_.load(std::memory_order_acquire) & kClosed) != 0; }

  // `fn` (returning void) wrapped so that it runs only inside a Scope of `gate`.
  template <typename Fn>
  static auto Guard(std::shared_ptr<CallbackGate> gate, Fn fn) {
    return [gate = std::move(gate), fn = std::move(fn)](auto&&... args) mutable {
      Scope scope(gate.get());
      if (scope) fn(std::forward<decltype(args)>(args)...);
    };
  }

 private:
  static constexpr int64_t kClosed = int64_t{1} << 40;
  // Scopes open on this gate, plus kClosed once Close() began.
  std::atomic<int64_t> state_{0};
  // Close() waits on it; a Scope leaving a closing gate takes it so the wait re-checks.
  absl::Mutex mu_;
};

}  // namespace tether

#endif  // TETHER_CORE_CALLBACK_GATE_H_
