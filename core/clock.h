// Clock: the only way core code reads time or waits for it.
//
// Real runs use a steady system clock with a timer thread (transport/); simulated runs use a
// virtual clock driven by the scheduler (sim/). Timer callbacks run on the clock's own context
// (its timer thread, or the simulator's scheduler) and must not block: they usually post work to
// an Executor.
//
//   TimerId id = clock->Schedule(clock->Now() + absl::Seconds(1), [] { ... });
//   clock->Cancel(id);  // true if it had not run yet
#ifndef TETHER_CORE_CLOCK_H_
#define TETHER_CORE_CLOCK_H_

#include <cstdint>
#include <functional>

#include "absl/time/time.h"

namespace tether {

using TimerId = uint64_t;

class Clock {
 public:
  virtual ~Clock() = default;

  virtual absl::Time Now() = 0;

  // Runs `callback` once, at or after `deadline`. Thread-safe.
  virtual TimerId Schedule(absl::Time deadline, std::function<void()> callback) = 0;

  // Cancels a timer. Returns true if it was pending and will now never run; false if it already
  // ran, is running, or was cancelled before.
  virtual bool Cancel(TimerId id) = 0;
};

}  // namespace tether

#endif  // TETHER_CORE_CLOCK_H_
