#include "transport/thread_pool.h"

#include <chrono>
#include <utility>

namespace tether {
namespace {
thread_local const ThreadPool* current_pool = nullptr;
thread_local const ThreadPool* polling_pool = nullptr;
// How often idle threads check that someone polls (see Loop).
constexpr auto kFollowerCheck = std::chrono::milliseconds(5);
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i)
    threads_.emplace_back([this] { Loop(); });
}

ThreadPool::~ThreadPool() { Shutdown(kDrain); }

bool ThreadPool::InPool() const { return current_pool == this; }
bool ThreadPool::InPoll() const { return polling_pool == this; }

bool ThreadPool::SetPollable(Pollable* pollable) {
  std::unique_lock<std::mutex> lock(mu_);
  if (pollable == nullptr || pollable_ != nullptr || joined_) return false;
  pollable_ = pollable;
  lock.unlock();
  cv_.notify_one();  // An idle thread becomes the poller.
  return true;
}

void ThreadPool::ClearPollable(Pollable* pollable) {
  std::unique_lock<std::mutex> lock(mu_);
  if (pollable_ != pollable || pollable == nullptr) return;
  pollable_ = nullptr;
  if (InPoll()) return;
  if (polling_) pollable->Wake();
  poll_done_.wait(lock, [&] { return !polling_; });
}

void ThreadPool::Post(std::function<void()> task) {
  bool notify = false;
  Pollable* wake = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
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
  if (notify) cv_.notify_one();
  if (wake != nullptr) wake->Wake();
}

void ThreadPool::Shutdown(ShutdownMode mode) {
  std::lock_guard<std::mutex> serial(shutdown_mu_);
  std::deque<std::function<void()>> discarded;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (joined_) return;
    shutting_down_ = true;
    if (mode == kDrop) {
      dropped_ += queue_.size();
      discarded.swap(queue_);
    }
    if (polling_ && pollable_ != nullptr) pollable_->Wake();
  }
  cv_.notify_all();
  discarded.clear();
  for (std::thread& t : threads_) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  joined_ = true;
  // Anything a task posted after the last thread left its loop is dropped.
  dropped_ += queue_.size();
  queue_.clear();
}

uint64_t ThreadPool::dropped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return dropped_;
}

void ThreadPool::Loop() {
  current_pool = this;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (!queue_.empty()) {
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      task();
      task = nullptr;
      lock.lock();
      continue;
    }
    // Draining ends when the queue is empty and no task is left that could
    // post more: a running task that posts runs it itself afterwards, so each
    // thread only leaves once it sees the queue empty after shutdown began.
    if (shutting_down_) break;
    if (pollable_ != nullptr && !polling_) {
      Pollable* p = pollable_;
      polling_ = true;
      polling_pool = this;
      lock.unlock();
      p->Poll(/*max_wait_ms=*/200);
      lock.lock();
      polling_pool = nullptr;
      polling_ = false;
      poll_done_.notify_all();
      // This thread runs what the poll produced, then polls again. Followers
      // are not woken for that (a wake-up per message costs more than it
      // saves); they look every kFollowerCheck and take over polling if the
      // leader is still busy running tasks.
      continue;
    }
    ++idle_;
    if (pollable_ != nullptr) {
      cv_.wait_for(lock, kFollowerCheck);
    } else {
      cv_.wait(lock);
    }
    --idle_;
  }
  current_pool = nullptr;
}

}  // namespace tether
