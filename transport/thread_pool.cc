#include "transport/thread_pool.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tether {
namespace {
thread_local const ThreadPool* current_pool = nullptr;
thread_local const ThreadPool* polling_pool = nullptr;
// How often idle threads check that someone polls (see Loop).
constexpr absl::Duration kFollowerCheck = absl::Milliseconds(5);

int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

std::string StuckThread::ToString() const {
  return absl::StrCat("pool thread ", index, " (tid ", os_tid, "), inside one task for ",
                      absl::FormatDuration(busy_for));
}

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  {
    absl::MutexLock lock(&exit_mu_);
    exited_.assign(num_threads, false);
    detached_.assign(num_threads, false);
  }
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) {
    threads_.push_back(std::make_unique<ThreadState>());
    threads_.back()->index = i;
  }
  // Started once every state exists: a thread reads only its own.
  for (auto& t : threads_) {
    ThreadState* state = t.get();
    state->thread = std::thread([this, state] { Loop(state); });
  }
}

ThreadPool::~ThreadPool() {
  Shutdown(kDrain);
  // Threads left behind by a bounded shutdown still use this object: wait for
  // them to leave rather than free it under them.
  WaitForExits(absl::InfiniteFuture());
}

int ThreadPool::num_idle_threads() const {
  int n = 0;
  for (const std::unique_ptr<ThreadState>& t : threads_) {
    n += t->busy_since_ns.load(std::memory_order_acquire) == 0;
  }
  return n;
}

int ThreadPool::threads_left_behind() const {
  absl::MutexLock lock(&exit_mu_);
  int n = 0;
  for (size_t i = 0; i < exited_.size(); ++i) n += detached_[i] && !exited_[i];
  return n;
}

void ThreadPool::WaitForExits(absl::Time deadline) {
  absl::MutexLock lock(&exit_mu_);
  auto all_exited = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(exit_mu_) {
    for (bool e : exited_)
      if (!e) return false;
    return true;
  };
  while (!all_exited()) {
    if (exit_cv_.WaitWithDeadline(&exit_mu_, deadline)) break;  // Timed out.
  }
}

bool ThreadPool::InPool() const { return current_pool == this; }
bool ThreadPool::InPoll() const { return polling_pool == this; }

bool ThreadPool::SetPollable(Pollable* pollable) {
  {
    absl::MutexLock lock(&mu_);
    if (pollable == nullptr || pollable_ != nullptr || joined_) return false;
    pollable_ = pollable;
  }
  cv_.Signal();  // An idle thread becomes the poller.
  return true;
}

void ThreadPool::ClearPollable(Pollable* pollable) {
  absl::MutexLock lock(&mu_);
  if (pollable_ != pollable || pollable == nullptr) return;
  pollable_ = nullptr;
  if (InPoll()) return;
  if (polling_) pollable->Wake();
  while (polling_) poll_done_.Wait(&mu_);
}

void ThreadPool::Post(std::function<void()> task) {
  bool notify = false;
  Pollable* wake = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (joined_ || (shutting_down_ && !InPool())) {
      ++dropped_;
      return;
    }
    queue_.push_back(std::move(task));
    if (InPoll()) {
      // The poller runs it once its Poll() returns; wake a helper only for
      // more than one task.
      notify = queue_.size() > 1 && idle_ > 0;
    } else if (idle_ > 0) {
      notify = true;
    } else if (polling_) {
      wake = pollable_;  // Everyone else is busy: the poller takes it.
    }
  }
  if (notify) cv_.Signal();
  if (wake != nullptr) wake->Wake();
}

void ThreadPool::Shutdown(ShutdownMode mode) { ShutdownWithin(mode, absl::InfiniteDuration()); }

std::vector<StuckThread> ThreadPool::ShutdownWithin(ShutdownMode mode, absl::Duration join_bound) {
  absl::MutexLock serial(&shutdown_mu_);
  const absl::Time deadline = absl::Now() + join_bound;
  std::deque<std::function<void()>> discarded;
  {
    absl::MutexLock lock(&mu_);
    if (joined_) return {};
    shutting_down_ = true;
    if (mode == kDrop) {
      dropped_ += queue_.size();
      discarded.swap(queue_);
    }
    if (polling_ && pollable_ != nullptr) pollable_->Wake();
  }
  cv_.SignalAll();
  discarded.clear();
  WaitForExits(deadline);
  std::vector<StuckThread> stuck;
  std::vector<std::thread*> to_join;
  {
    absl::MutexLock lock(&exit_mu_);
    const int64_t now = SteadyNanos();
    for (auto& t : threads_) {
      if (exited_[t->index]) {
        to_join.push_back(&t->thread);
        continue;
      }
      // Left behind: it still runs (a task, or its last steps of draining).
      detached_[t->index] = true;
      t->thread.detach();
      const int64_t since = t->busy_since_ns.load(std::memory_order_acquire);
      stuck.push_back(
          StuckThread{t->index, t->os_tid.load(std::memory_order_relaxed),
                      since == 0 ? absl::ZeroDuration() : absl::Nanoseconds(now - since)});
    }
  }
  for (std::thread* t : to_join) t->join();  // Each has left Loop: prompt.
  std::deque<std::function<void()>> leftover;
  {
    absl::MutexLock lock(&mu_);
    joined_ = true;
    // Anything posted after the last thread left its loop (or that a thread
    // left behind would otherwise take) is dropped.
    dropped_ += queue_.size();
    leftover.swap(queue_);
  }
  leftover.clear();  // Outside the lock: a task's destructor may Post().
  return stuck;
}

uint64_t ThreadPool::dropped() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

void ThreadPool::Loop(ThreadState* self) {
  current_pool = this;
  self->os_tid.store(static_cast<int64_t>(syscall(SYS_gettid)), std::memory_order_relaxed);
  mu_.Lock();
  while (true) {
    if (!queue_.empty() && !joined_) {
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      mu_.Unlock();
      self->busy_since_ns.store(SteadyNanos(), std::memory_order_release);
      task();
      task = nullptr;
      self->busy_since_ns.store(0, std::memory_order_release);
      mu_.Lock();
      continue;
    }
    // Draining ends when the queue is empty and no task is left that could
    // post more: a running task that posts runs it itself afterwards, so each
    // thread only leaves once it sees the queue empty after shutdown began.
    // (Once joined_, a bounded shutdown gave up on this thread: it takes no
    // further task.)
    if (shutting_down_ || joined_) break;
    if (pollable_ != nullptr && !polling_) {
      Pollable* p = pollable_;
      polling_ = true;
      polling_pool = this;
      mu_.Unlock();
      p->Poll(/*max_wait_ms=*/200);
      mu_.Lock();
      polling_pool = nullptr;
      polling_ = false;
      poll_done_.SignalAll();
      // This thread runs what the poll produced, then polls again. Followers
      // are not woken for that (a wake-up per message costs more than it
      // saves); they look every kFollowerCheck and take over polling if the
      // leader is still busy running tasks.
      continue;
    }
    ++idle_;
    if (pollable_ != nullptr) {
      cv_.WaitWithTimeout(&mu_, kFollowerCheck);
    } else {
      cv_.Wait(&mu_);
    }
    --idle_;
  }
  mu_.Unlock();
  current_pool = nullptr;
  // The last thing this thread does with the pool (a thread left behind by a
  // bounded shutdown may get here long after it).
  absl::MutexLock exit_lock(&exit_mu_);
  exited_[self->index] = true;
  exit_cv_.SignalAll();
}

}  // namespace tether
