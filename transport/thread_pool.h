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
// Bounded shutdown (ShutdownWithin): the same, but it waits at most a bound for
// the threads to leave; a thread still inside a task by then (a handler stuck
// in user code, say, blocked forever on a lock) is detached, left behind, and
// described in the result, so the caller (a process on its way out) is never
// blocked by it. A thread left behind touches only the pool object once its
// task returns (it takes no further task: every Post() drops, the queue is
// empty, and it leaves its loop), so the pool must then never be freed; the
// destructor of a pool that left threads behind waits for them to leave. What
// the stuck task itself may touch later is the task owner's business (see
// python/runtime.h for the guarantee the real-run worker gives).
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
// Threading: Post() is thread-safe and never runs the task inline. Shutdown()
// and ShutdownWithin() are thread-safe, from threads outside the pool.
#ifndef TETHER_TRANSPORT_THREAD_POOL_H_
#define TETHER_TRANSPORT_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
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

// A pool thread that a bounded shutdown left behind, still inside one task.
struct StuckThread {
  int index = 0;            // 0 .. num_threads()-1, in creation order.
  int64_t os_tid = 0;       // Linux thread id (as in /proc, gdb, py-spy).
  absl::Duration busy_for;  // How long it has been inside its current task.

  // "pool thread 3 (tid 12345), inside one task for 7.2s".
  std::string ToString() const;
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
  // Shutdown(mode), waiting at most `join_bound` for the threads to leave (see
  // above); returns the threads left behind (empty if every thread was
  // joined). If a Shutdown is already complete, returns an empty list at once.
  std::vector<StuckThread> ShutdownWithin(ShutdownMode mode, absl::Duration join_bound);

  int num_threads() const { return static_cast<int>(threads_.size()); }
  // Threads not inside a task right now (waiting for one or polling), as
  // PyTorch's agent.num_idle_threads counts them. A snapshot: it may be stale
  // by the time it is read.
  int num_idle_threads() const;
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
  // Threads that a bounded shutdown left behind and that have not left yet.
  int threads_left_behind() const;

 private:
  // One pool thread. `busy_since_ns` (steady clock; 0: between tasks) is
  // written only by the thread itself, read by ShutdownWithin.
  struct ThreadState {
    int index = 0;
    std::atomic<int64_t> os_tid{0};
    std::atomic<int64_t> busy_since_ns{0};
    std::thread thread;
  };

  void Loop(ThreadState* self);
  // Waits until every thread has left Loop or `deadline` passes.
  void WaitForExits(absl::Time deadline);

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  bool joined_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  Pollable* pollable_ ABSL_GUARDED_BY(mu_) = nullptr;
  // A thread is inside pollable's Poll().
  bool polling_ ABSL_GUARDED_BY(mu_) = false;
  int idle_ ABSL_GUARDED_BY(mu_) = 0;                  // Threads waiting on cv_.
  absl::CondVar poll_done_;                            // Signalled when polling_ turns false.
  std::vector<std::unique_ptr<ThreadState>> threads_;  // Fixed at construction.
  absl::Mutex shutdown_mu_;                            // Serializes Shutdown() callers.

  // Which threads have left Loop (by index), and how many were left behind.
  mutable absl::Mutex exit_mu_;
  absl::CondVar exit_cv_;
  std::vector<bool> exited_ ABSL_GUARDED_BY(exit_mu_);
  std::vector<bool> detached_ ABSL_GUARDED_BY(exit_mu_);
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_THREAD_POOL_H_
