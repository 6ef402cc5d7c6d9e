// ThreadPool: the real-run Executor, a fixed number of threads serving one FIFO
// queue.
//
//   ThreadPool pool(4);
//   pool.Post([] { ... });
//   pool.Shutdown(ThreadPool::kDrain);  // or let the destructor do it
//
// Shutdown (idempotent; the first call's mode wins): from the moment it begins,
// Post() from a thread outside the pool drops the task. With kDrain, tasks
// already queued still run, and so do tasks that running pool tasks post while
// draining (continuations of queued work: a future's callbacks), until the
// queue is empty; with kDrop, queued tasks are discarded (destroyed without
// running) and only the tasks already running finish. Shutdown() then joins the
// threads. Once it has returned, every Post() drops its task. It must not be
// called from a pool thread. The destructor calls Shutdown(kDrain).
//
// Threading: Post() is thread-safe and never runs the task inline.
#ifndef TETHER_TRANSPORT_THREAD_POOL_H_
#define TETHER_TRANSPORT_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/executor.h"

namespace tether {

class ThreadPool : public Executor {
 public:
  enum ShutdownMode { kDrain, kDrop };

  // `num_threads` >= 1 (0 is taken as 1).
  explicit ThreadPool(int num_threads);
  ~ThreadPool() override;

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void Post(std::function<void()> task) override;
  void Shutdown(ShutdownMode mode = kDrain);

  int num_threads() const { return static_cast<int>(threads_.size()); }
  // Whether the calling thread is one of this pool's threads.
  bool InPool() const;
  // Tasks dropped because they were posted after shutdown began (or discarded
  // by kDrop).
  uint64_t dropped() const;

 private:
  void Loop();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool shutting_down_ = false;
  bool joined_ = false;
  uint64_t dropped_ = 0;
  std::vector<std::thread> threads_;
  std::mutex shutdown_mu_;  // Serializes Shutdown() callers.
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_THREAD_POOL_H_
