#include "core/callback_gate.h"

namespace tether {
namespace {

// The innermost Scope open on this thread, to tell Close() which open Scopes are its caller's.
thread_local const CallbackGate::Scope* innermost_scope = nullptr;

}  // namespace

CallbackGate::Scope::Scope(CallbackGate* gate) : gate_(gate), outer_(innermost_scope) {
  const int64_t before = gate_->state_.fetch_add(1, std::memory_order_acq_rel);
  if ((before & kClosed) == 0) {
    entered_ = true;
    innermost_scope = this;
    return;
  }
  gate_->state_.fetch_sub(1, std::memory_order_acq_rel);
  absl::MutexLock lock(&gate_->mu_);  // Closing: let Close() re-check.
}

CallbackGate::Scope::~Scope() {
  if (!entered_) return;
  innermost_scope = outer_;
  const int64_t after = gate_->state_.fetch_sub(1, std::memory_order_acq_rel) - 1;
  if ((after & kClosed) != 0) {
    absl::MutexLock lock(&gate_->mu_);  // Closing: let Close() re-check.
  }
}

void CallbackGate::Close() {
  int64_t own = 0;
  for (const Scope* s = innermost_scope; s != nullptr; s = s->outer_) {
    if (s->gate_ == this && s->entered_) ++own;
  }
  absl::MutexLock lock(&mu_);
  state_.fetch_or(kClosed, std::memory_order_acq_rel);
  struct Wait {
    const CallbackGate* gate;
    int64_t own;
  } wait{this, own};
  mu_.Await(absl::Condition(
      +[](Wait* w) {
        const int64_t open = w->gate->state_.load(std::memory_order_acquire) & ~kClosed;
        return open <= w->own;
      },
      &wait));
}

}  // namespace tether
