#include "transport/thread_pool.h"

#include <utility>

namespace tether {
namespace {
thread_local const ThreadPool* current_pool = nullptr;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i)
    threads_.emplace_back([this] { Loop(); });
}

ThreadPool::~ThreadPool() { Shutdown(kDrain); }

bool ThreadPool::InPool() const { return current_pool == this; }

void ThreadPool::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (joined_ || (shutting_down_ && !InPool())) {
      ++dropped_;
      return;  // `task` is destroyed on return, outside the lock's protection
               // needs.
    }
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
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
    if (queue_.empty()) {
      // Draining ends when the queue is empty and no task is left that could
      // post more: a running task that posts wakes the others through
      // notify_one, so each thread only leaves once it sees the queue empty
      // after shutdown began.
      if (shutting_down_) break;
      cv_.wait(lock);
      continue;
    }
    std::function<void()> task = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    task();
    task = nullptr;
    lock.lock();
  }
  current_pool = nullptr;
}

}  // namespace tether
