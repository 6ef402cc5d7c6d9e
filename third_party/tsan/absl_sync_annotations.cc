// ThreadSanitizer annotations for Debian's prebuilt Abseil synchronization.
//
// libabsl_synchronization.so is not built with -fsanitize=thread, so TSan sees
// neither absl::Mutex nor absl::Notification order anything, and reports every
// access they guard as a race. This file defines the functions Tether uses in
// the executable itself (ELF interposition: the executable's definition wins
// over the shared library's), each calling the library's own through
// dlsym(RTLD_NEXT) and telling TSan the happens-before edge it creates:
// release before letting go of the mutex, acquire once it is held (or a
// notification is seen). Built only under --config=tsan.
//
// Every Abseil entry point that takes, lets go of or re-takes a mutex must be
// here, CondVar's waits included: a wait lets go of the mutex and takes it back
// inside the library (not through Mutex::Lock/Unlock), so without them TSan
// sees the waiter's accesses after the wait as unordered with everything the
// other threads did under the mutex meanwhile (false reports on every CondVar
// user: ThreadPool, SystemClock, TcpNetwork's pooled Poll). Using a new one
// (a Mutex::LockWhenWithTimeout, a Notification::HasBeenNotified, ...) means
// adding it here.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);

namespace {

template <typename Fn>
Fn Real(const char* mangled) {
  void* f = dlsym(RTLD_NEXT, mangled);
  if (f == nullptr) {
    std::fprintf(stderr, "tsan shim: %s not found in Abseil\n", mangled);
    std::abort();
  }
  return reinterpret_cast<Fn>(f);
}

void Acquire(const void* p) { __tsan_acquire(const_cast<void*>(p)); }
void Release(const void* p) { __tsan_release(const_cast<void*>(p)); }

// A condition evaluated as a critical section of its mutex for TSan: Abseil
// evaluates a waiter's condition while it holds the mutex, inside the library
// (on the waiter's thread when it wakes, or on the thread letting go of the
// mutex). Constructed before the waiter releases the mutex.
struct AnnotatedCondition {
  const absl::Condition* cond;
  const void* mu;
  static bool Eval(void* self) {
    auto* a = static_cast<AnnotatedCondition*>(self);
    // Held by whoever evaluates; whoever takes the mutex next must see these
    // reads as before it.
    Acquire(a->mu);
    bool met = a->cond->Eval();
    Release(a->mu);
    return met;
  }
};

// Abseil's lock-order (deadlock) detector, on in Debian's build, keeps its
// graph (synchronization_internal::GraphCycles) under an internal SpinLock
// that is as invisible to TSan as the rest of the library; TSan still sees the
// graph's memmove()s (an intercepted libc call) and reports them as races
// between any two threads that lock a mutex (GraphCycles::GetId under
// Mutex::Lock). TSan checks the program's synchronization itself, so under
// --config=tsan the detector is switched off, before main() and before any
// other static initializer of the executable.
__attribute__((constructor(101))) void DisableAbslDeadlockDetection() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

using MutexFn = void (*)(Mutex*);
using MutexBoolFn = bool (*)(Mutex*);
using AwaitFn = void (*)(Mutex*, const Condition&);
using AwaitTimeoutFn = bool (*)(Mutex*, const Condition&, Duration);
using AwaitDeadlineFn = bool (*)(Mutex*, const Condition&, Time);

void Mutex::Lock() {
  static auto real = Real<MutexFn>("_ZN4absl7debian35Mutex4LockEv");
  real(this);
  Acquire(this);
}

void Mutex::Unlock() {
  static auto real = Real<MutexFn>("_ZN4absl7debian35Mutex6UnlockEv");
  Release(this);
  real(this);
}

bool Mutex::TryLock() {
  static auto real = Real<MutexBoolFn>("_ZN4absl7debian35Mutex7TryLockEv");
  bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

void Mutex::ReaderLock() {
  static auto real = Real<MutexFn>("_ZN4absl7debian35Mutex10ReaderLockEv");
  real(this);
  Acquire(this);
}

void Mutex::ReaderUnlock() {
  static auto real = Real<MutexFn>("_ZN4absl7debian35Mutex12ReaderUnlockEv");
  Release(this);
  real(this);
}

void Mutex::LockWhen(const Condition& cond) {
  static auto real =
      Real<AwaitFn>("_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  AnnotatedCondition a{&cond, this};
  real(this, Condition(&AnnotatedCondition::Eval, &a));
  Acquire(this);
}

void Mutex::Await(const Condition& cond) {
  static auto real =
      Real<AwaitFn>("_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  AnnotatedCondition a{&cond, this};
  Release(this);
  real(this, Condition(&AnnotatedCondition::Eval, &a));
  Acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  static auto real = Real<AwaitTimeoutFn>(
      "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_"
      "8DurationE");
  AnnotatedCondition a{&cond, this};
  Release(this);
  bool met = real(this, Condition(&AnnotatedCondition::Eval, &a), timeout);
  Acquire(this);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  static auto real = Real<AwaitDeadlineFn>(
      "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  AnnotatedCondition a{&cond, this};
  Release(this);
  bool met = real(this, Condition(&AnnotatedCondition::Eval, &a), deadline);
  Acquire(this);
  return met;
}

// CondVar waits: the mutex is let go of on entry and held again on return
// (timed out or not).
using CondWaitFn = void (*)(CondVar*, Mutex*);
using CondWaitTimeoutFn = bool (*)(CondVar*, Mutex*, Duration);
using CondWaitDeadlineFn = bool (*)(CondVar*, Mutex*, Time);

void CondVar::Wait(Mutex* mu) {
  static auto real =
      Real<CondWaitFn>("_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  Release(mu);
  real(this, mu);
  Acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  static auto real = Real<CondWaitTimeoutFn>(
      "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(mu);
  bool timed_out = real(this, mu, timeout);
  Acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  static auto real = Real<CondWaitDeadlineFn>(
      "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(mu);
  bool timed_out = real(this, mu, deadline);
  Acquire(mu);
  return timed_out;
}

void Notification::Notify() {
  static auto real =
      Real<void (*)(Notification*)>("_ZN4absl7debian312Notification6NotifyEv");
  Release(this);
  real(this);
}

void Notification::WaitForNotification() const {
  static auto real = Real<void (*)(const Notification*)>(
      "_ZNK4absl7debian312Notification19WaitForNotificationEv");
  real(this);
  Acquire(this);
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  static auto real = Real<bool (*)(const Notification*, Duration)>(
      "_ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_"
      "8DurationE");
  bool notified = real(this, timeout);
  if (notified) Acquire(this);
  return notified;
}

bool BlockingCounter::DecrementCount() {
  static auto real = Real<bool (*)(BlockingCounter*)>(
      "_ZN4absl7debian315BlockingCounter14DecrementCountEv");
  Release(this);
  bool last = real(this);
  if (last) Acquire(this);
  return last;
}

void BlockingCounter::Wait() {
  static auto real = Real<void (*)(BlockingCounter*)>(
      "_ZN4absl7debian315BlockingCounter4WaitEv");
  real(this);
  Acquire(this);
}

ABSL_NAMESPACE_END
}  // namespace absl
