#include "transport/system_clock.h"

#include <algorithm>
#include <limits>

#include "absl/time/clock.h"

namespace tether {

SystemClock::SystemClock()
    : steady_base_(std::chrono::steady_clock::now()), wall_base_(absl::Now()) {
  thread_ = std::thread([this] { Loop(); });
}

SystemClock::~SystemClock() { Stop(); }

void SystemClock::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.SignalAll();
  thread_.join();
}

absl::Time SystemClock::Now() {
  return wall_base_ + absl::FromChrono(std::chrono::steady_clock::now() - steady_base_);
}

SystemClock::SteadyTime SystemClock::ToSteady(absl::Time t) const {
  // Clamp far deadlines (absl::InfiniteFuture()) so the chrono arithmetic
  // cannot overflow.
  const absl::Duration max_ahead = absl::Hours(24 * 365 * 100);
  absl::Duration d = t - wall_base_;
  if (d > max_ahead) d = max_ahead;
  if (d < -max_ahead) d = -max_ahead;
  return steady_base_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            absl::ToChronoNanoseconds(d));
}

TimerId SystemClock::Schedule(absl::Time deadline, std::function<void()> callback) {
  SteadyTime when = ToSteady(deadline);
  bool wake;
  TimerId id;
  {
    absl::MutexLock lock(&mu_);
    id = next_id_++;
    if (stopping_) return id;  // Never runs; `callback` is destroyed outside the lock.
    wake = when < sleeping_until_;
    queue_.emplace(Key(when, id), std::move(callback));
    deadlines_.emplace(id, when);
  }
  if (wake) cv_.SignalAll();
  return id;
}

bool SystemClock::Cancel(TimerId id) {
  std::function<void()> dropped;  // Destroyed outside the lock.
  {
    absl::MutexLock lock(&mu_);
    auto it = deadlines_.find(id);
    if (it == deadlines_.end()) return false;
    auto q = queue_.find(Key(it->second, id));
    dropped = std::move(q->second);
    queue_.erase(q);
    deadlines_.erase(it);
  }
  return true;
}

size_t SystemClock::pending() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

void SystemClock::Loop() {
  // The thread sleeps until the earliest deadline, but never longer than
  // kMaxSleep, so Schedule() needs to wake it only for a deadline earlier than
  // the one it sleeps towards (a call's far timeout does not cost a wake-up).
  constexpr auto kMaxSleep = std::chrono::seconds(1);
  mu_.Lock();
  while (!stopping_) {
    const SteadyTime now = std::chrono::steady_clock::now();
    if (!queue_.empty() && queue_.begin()->first.first <= now) {
      auto first = queue_.begin();
      std::function<void()> callback = std::move(first->second);
      deadlines_.erase(first->first.second);
      queue_.erase(first);
      mu_.Unlock();
      callback();
      callback = nullptr;
      mu_.Lock();
      continue;
    }
    SteadyTime target = now + kMaxSleep;
    if (!queue_.empty()) target = std::min(target, queue_.begin()->first.first);
    sleeping_until_ = target;
    cv_.WaitWithTimeout(&mu_, absl::FromChrono(target - now));
    sleeping_until_ = SteadyTime::min();
  }
  // Drop what never ran, outside the lock (their destructors may do anything).
  std::map<Key, std::function<void()>> dropped;
  dropped.swap(queue_);
  deadlines_.clear();
  mu_.Unlock();
}

}  // namespace tether
