// Executor: where core code runs its work. Real runs use a thread pool; simulated runs a seeded
// run queue on one thread. Core code never starts a thread of its own.
#ifndef TETHER_CORE_EXECUTOR_H_
#define TETHER_CORE_EXECUTOR_H_

#include <functional>

namespace tether {

class Executor {
 public:
  virtual ~Executor() = default;

  // Runs `task` later, never inline in the caller. Thread-safe. Tasks posted after the executor
  // is shut down are dropped (the executor's owner decides when that is).
  virtual void Post(std::function<void()> task) = 0;
};

}  // namespace tether

#endif  // TETHER_CORE_EXECUTOR_H_
