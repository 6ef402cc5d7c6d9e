// SimExecutor: one simulated worker's Executor (core/executor.h). Post() queues
// the task as a kTask event owned by the worker in the Scheduler's run queue,
// which picks among runnable events with its seeded Prng, so task interleavings
// across (and within) workers vary by seed as they would on a thread pool, yet
// replay exactly.
//
// After the worker crashes (Scheduler::PurgeDomain) the executor is inert:
// queued tasks are gone and new ones are dropped, as the Executor contract
// allows for a shut-down executor. Not thread-safe (see scheduler.h).
#ifndef TETHER_SIM_SIM_EXECUTOR_H_
#define TETHER_SIM_SIM_EXECUTOR_H_

#include <cstdint>
#include <functional>

#include "core/executor.h"
#include "sim/scheduler.h"

namespace tether::sim {

class SimExecutor : public Executor {
 public:
  SimExecutor(Scheduler* scheduler, int32_t worker)
      : scheduler_(scheduler),
        worker_(worker),
        generation_(scheduler->Generation(worker)) {}

  void Post(std::function<void()> task) override {
    if (!alive()) {
      ++dropped_;
      return;
    }
    ++posted_;
    scheduler_->Post(Owners{worker_, -1}, EventKind::kTask,
                     static_cast<uint64_t>(worker_), std::move(task));
  }

  bool alive() const { return scheduler_->Generation(worker_) == generation_; }
  int32_t worker() const { return worker_; }
  uint64_t posted() const { return posted_; }
  uint64_t dropped() const { return dropped_; }

 private:
  Scheduler* const scheduler_;
  const int32_t worker_;
  const uint64_t generation_;
  uint64_t posted_ = 0;
  uint64_t dropped_ = 0;
};

}  // namespace tether::sim

#endif  // TETHER_SIM_SIM_EXECUTOR_H_
