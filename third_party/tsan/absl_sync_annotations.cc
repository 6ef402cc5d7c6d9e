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
