// SystemClock: the real-run Clock. Now() follows a steady (monotonic) clock,
// anchored to the wall clock once at construction so printed times look
// familiar; it never jumps when the wall clock is adjusted. Timers are kept in
// one ordered queue served by a single timer thread that the clock owns.
//
//   SystemClock clock;
//   TimerId id = clock.Schedule(clock.Now() + absl::Milliseconds(5), [] { ... });
//   clock.Cancel(id);
//
// Threading: every method is thread-safe. Callbacks run on the timer thread,
// one at a time, in deadline order (ties in scheduling order); they must not
// block (post work to an Executor). A callback may Schedule or Cancel timers.
// Stop() (or destroying the clock) stops the thread; timers that have not run by
// then never run, and later ones are dropped (Now() still works). It waits for a
// callback that is running, so it must not be called from a timer callback.
#ifndef TETHER_TRANSPORT_SYSTEM_CLOCK_H_
#define TETHER_TRANSPORT_SYSTEM_CLOCK_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/clock.h"

namespace tether {

class SystemClock : public Clock {
 public:
  SystemClock();
  ~SystemClock() override;

  SystemClock(const SystemClock&) = delete;
  SystemClock& operator=(const SystemClock&) = delete;

  absl::Time Now() override;
  TimerId Schedule(absl::Time deadline, std::function<void()> callback) override;
  bool Cancel(TimerId id) override;

  // Stops the timer thread: waits for the callback running (if any), drops every
  // timer not yet run and every one scheduled later. Idempotent.
  void Stop();

  // Timers scheduled and neither run nor cancelled yet.
  size_t pending() const;

 private:
  using SteadyTime = std::chrono::steady_clock::time_point;
  using Key = std::pair<SteadyTime, TimerId>;

  SteadyTime ToSteady(absl::Time t) const;
  void Loop();

  const SteadyTime steady_base_;
  const absl::Time wall_base_;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // When the timer thread will wake up by itself; min() while it is awake.
  SteadyTime sleeping_until_ ABSL_GUARDED_BY(mu_) = SteadyTime::min();
  TimerId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<Key, std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  std::map<TimerId, SteadyTime> deadlines_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_SYSTEM_CLOCK_H_
