// QueueExecutor: a test Executor that queues tasks until the test drains them on its own thread.
//
//   QueueExecutor ex;
//   future.Then(...);
//   ex.RunAll();  // runs the queued callbacks, and any they post
#ifndef TETHER_CORE_INLINE_EXECUTOR_H_
#define TETHER_CORE_INLINE_EXECUTOR_H_

#include <deque>
#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/executor.h"

namespace tether::testing {

class QueueExecutor : public Executor {
 public:
  void Post(std::function<void()> task) override {
    absl::MutexLock lock(&mu_);
    tasks_.push_back(std::move(task));
  }

  // Runs tasks until none is queued. Returns how many ran.
  int RunAll() {
    int n = 0;
    while (true) {
      std::function<void()> task;
      {
        absl::MutexLock lock(&mu_);
        if (tasks_.empty()) return n;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
      ++n;
    }
  }

 private:
  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tether::testing

#endif  // TETHER_CORE_INLINE_EXECUTOR_H_
