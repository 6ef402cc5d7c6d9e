// SimClock: one simulated worker's Clock (core/clock.h), driven by the
// Scheduler's virtual time.
//
// A worker's clock can be skewed (a fixed offset) and drift (run at `rate`
// times true speed):
//   local = Epoch + skew + (true - Epoch) * rate.
// A timer for local deadline D fires at the first true instant at which local
// Now() >= D, as a kTimer event owned by the worker, so crashing the worker
// (Scheduler::PurgeDomain) discards its timers. After a crash the clock is
// inert: Schedule() returns ids that never fire.
//
// Timer callbacks run on the scheduler's thread, never inline in Schedule().
// Not thread-safe (nothing in the simulator is; see scheduler.h).
#ifndef TETHER_SIM_SIM_CLOCK_H_
#define TETHER_SIM_SIM_CLOCK_H_

#include <cstdint>
#include <functional>

#include "absl/container/flat_hash_set.h"
#include "absl/time/time.h"
#include "core/clock.h"
#include "sim/scheduler.h"

namespace tether::sim {

struct ClockModel {
  absl::Duration skew = absl::ZeroDuration();
  // Local seconds per true second; must be > 0.
  double rate = 1.0;
};

class SimClock : public Clock {
 public:
  SimClock(Scheduler* scheduler, int32_t worker, ClockModel model = {});

  absl::Time Now() override;
  TimerId Schedule(absl::Time deadline,
                   std::function<void()> callback) override;
  bool Cancel(TimerId id) override;

  // Converts between this clock's local time and the scheduler's true time.
  absl::Time LocalFromTrue(absl::Time t) const;
  // The first true time at which the local time is >= `local`.
  absl::Time TrueFromLocal(absl::Time local) const;

  const ClockModel& model() const { return model_; }
  int32_t worker() const { return worker_; }
  // False once the worker's incarnation this clock belongs to has crashed.
  bool alive() const;

 private:
  Scheduler* const scheduler_;
  const int32_t worker_;
  const uint64_t generation_;
  const ClockModel model_;
  uint64_t next_inert_id_ = 1ULL << 62;
  // Timers that can never fire (infinite deadline, or scheduled on a dead
  // clock) but that are still "pending" for Cancel().
  absl::flat_hash_set<TimerId> never_;  // seam-ok: lookups only
};

}  // namespace tether::sim

#endif  // TETHER_SIM_SIM_CLOCK_H_
