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
// Polling (leader/followers): an event source such as a TcpNetwork can hand its
// event loop to the pool (SetPollable). Then one idle pool thread at a time,
// the leader, runs Pollable::Poll(); tasks posted while it polls (a received
// request's handler, a reply's callbacks) run on that same thread right after
// Poll returns, with no thread switch, and then it polls again. Idle followers
// check every 5 ms and take over polling while the leader is busy running
// tasks (so a long handler delays other messages by at most about that). This
// saves the thread wake-ups of a hand-off per message; the price is that idle
// threads wake up every 5 ms while a pollable is set.
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

// An event source whose loop pool threads run (see above).
class Pollable {
 public:
  virtual ~Pollable() = default;
  // Waits at most about `max_wait_ms` for events and handles them; returns
  // promptly after handling some. Called by one pool thread at a time.
  virtual void Poll(int max_wait_ms) = 0;
  // Makes a Poll() in progress return soon. Thread-safe.
  virtual void Wake() = 0;
};

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
  // Lets idle threads poll `pollable` (the pool may call its Wake() while
  // holding the pool's lock: Wake() must not take locks a Poll() holds while
  // posting). Fails (returns false) while another is
  // set or after shutdown.
  bool SetPollable(Pollable* pollable);
  // Stops polling `pollable` if it is the one set (else does nothing): no new
  // Poll() starts, and one in progress is woken and waited for, unless this is
  // called from inside it (then the current Poll() is the last).
  void ClearPollable(Pollable* pollable);
  // Whether the calling thread is inside this pool's Poll().
  bool InPoll() const;

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
  Pollable* pollable_ = nullptr;
  bool polling_ = false;  // A thread is inside pollable's Poll().
  int idle_ = 0;          // Threads waiting on cv_.
  std::condition_variable poll_done_;
  std::vector<std::thread> threads_;
  std::mutex shutdown_mu_;  // Serializes Shutdown() callers.
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_THREAD_POOL_H_
