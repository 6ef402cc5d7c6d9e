#include "sim/sim_clock.h"

#include <cmath>
#include <utility>

namespace tether::sim {

SimClock::SimClock(Scheduler* scheduler, int32_t worker, ClockModel model)
    : scheduler_(scheduler),
      worker_(worker),
      generation_(scheduler->Generation(worker)),
      model_(model.rate > 0 ? model : ClockModel{model.skew, 1.0}) {}

bool SimClock::alive() const {
  return scheduler_->Generation(worker_) == generation_;
}

absl::Time SimClock::LocalFromTrue(absl::Time t) const {
  const absl::Time epoch = Scheduler::Epoch();
  if (model_.rate == 1.0) return t + model_.skew;
  const double elapsed_ns = absl::ToDoubleNanoseconds(t - epoch) * model_.rate;
  return epoch + model_.skew +
         absl::Nanoseconds(static_cast<int64_t>(std::floor(elapsed_ns)));
}

absl::Time SimClock::TrueFromLocal(absl::Time local) const {
  const absl::Time epoch = Scheduler::Epoch();
  if (local == absl::InfiniteFuture()) return local;
  if (model_.rate == 1.0) return local - model_.skew;
  const double local_ns =
      absl::ToDoubleNanoseconds(local - model_.skew - epoch);
  absl::Time t = epoch + absl::Nanoseconds(static_cast<int64_t>(
                             std::ceil(local_ns / model_.rate)));
  // Correct any floating-point rounding so that LocalFromTrue(t) >= local,
  // minimally.
  while (LocalFromTrue(t) < local) t += absl::Nanoseconds(1);
  while (LocalFromTrue(t - absl::Nanoseconds(1)) >= local)
    t -= absl::Nanoseconds(1);
  return t;
}

absl::Time SimClock::Now() { return LocalFromTrue(scheduler_->Now()); }

TimerId SimClock::Schedule(absl::Time deadline,
                           std::function<void()> callback) {
  if (!alive() || deadline == absl::InfiniteFuture()) {
    const TimerId id = next_inert_id_++;
    never_.insert(id);
    return id;
  }
  return scheduler_->At(TrueFromLocal(deadline), Owners{worker_, -1},
                        EventKind::kTimer, static_cast<uint64_t>(worker_),
                        std::move(callback));
}

bool SimClock::Cancel(TimerId id) {
  if (never_.erase(id) > 0) return true;
  if (!alive()) return false;
  return scheduler_->Cancel(id);
}

}  // namespace tether::sim
