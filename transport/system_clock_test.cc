#include "transport/system_clock.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

TEST(SystemClockTest, NowIsMonotonic) {
  SystemClock clock;
  absl::Time a = clock.Now();
  absl::Time b = clock.Now();
  EXPECT_LE(a, b);
}

TEST(SystemClockTest, TimerRunsNoEarlierThanDeadline) {
  SystemClock clock;
  absl::Notification done;
  absl::Time deadline = clock.Now() + absl::Milliseconds(5);
  absl::Time ran_at;
  clock.Schedule(deadline, [&] {
    ran_at = clock.Now();
    done.Notify();
  });
  done.WaitForNotification();
  EXPECT_GE(ran_at, deadline);
}

TEST(SystemClockTest, TimersRunInDeadlineOrderThenScheduleOrder) {
  SystemClock clock;
  absl::Mutex mu;
  std::vector<int> order ABSL_GUARDED_BY(mu);
  absl::Notification done;
  // Hold the timer thread so all four timers are queued before any can run.
  absl::Notification scheduled;
  clock.Schedule(clock.Now(), [&] { scheduled.WaitForNotification(); });
  absl::Time base = clock.Now();
  auto record = [&](int i) {
    return [&, i] {
      absl::MutexLock lock(&mu);
      order.push_back(i);
      if (order.size() == 4) done.Notify();
    };
  };
  clock.Schedule(base + absl::Milliseconds(2), record(3));
  clock.Schedule(base, record(1));
  clock.Schedule(base, record(2));
  clock.Schedule(base - absl::Milliseconds(1), record(0));
  scheduled.Notify();
  done.WaitForNotification();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
}

TEST(SystemClockTest, CancelledTimerNeverRuns) {
  SystemClock clock;
  std::atomic<bool> ran{false};
  TimerId id = clock.Schedule(clock.Now() + absl::Milliseconds(10), [&] { ran = true; });
  EXPECT_TRUE(clock.Cancel(id));
  EXPECT_FALSE(clock.Cancel(id));
  // A later timer runs, which proves the cancelled (earlier) one was passed
  // over.
  absl::Notification later;
  clock.Schedule(clock.Now() + absl::Milliseconds(20), [&] { later.Notify(); });
  later.WaitForNotification();
  EXPECT_FALSE(ran.load());
  EXPECT_EQ(clock.pending(), 0u);
}

TEST(SystemClockTest, CancelAfterRunReturnsFalse) {
  SystemClock clock;
  absl::Notification done;
  TimerId id = clock.Schedule(clock.Now(), [&] { done.Notify(); });
  done.WaitForNotification();
  // The callback has returned or is returning; either way it is no longer
  // pending.
  EXPECT_FALSE(clock.Cancel(id));
}

TEST(SystemClockTest, CallbackCanScheduleAndCancel) {
  SystemClock clock;
  absl::Notification done;
  std::atomic<bool> cancelled_ran{false};
  clock.Schedule(clock.Now(), [&] {
    TimerId victim =
        clock.Schedule(clock.Now() + absl::Milliseconds(1), [&] { cancelled_ran = true; });
    EXPECT_TRUE(clock.Cancel(victim));
    clock.Schedule(clock.Now() + absl::Milliseconds(5), [&] { done.Notify(); });
  });
  done.WaitForNotification();
  EXPECT_FALSE(cancelled_ran.load());
}

TEST(SystemClockTest, InfiniteFutureTimerDoesNotOverflowAndIsDroppedAtDestruction) {
  std::atomic<bool> ran{false};
  {
    SystemClock clock;
    clock.Schedule(absl::InfiniteFuture(), [&] { ran = true; });
    clock.Schedule(absl::InfinitePast(), [] {});
    EXPECT_LE(clock.pending(), 2u);
  }
  EXPECT_FALSE(ran.load());
}

TEST(SystemClockTest, StopWaitsForTheRunningCallbackAndDropsTheRest) {
  SystemClock clock;
  absl::Notification entered, release;
  std::atomic<bool> finished{false}, later_ran{false};
  clock.Schedule(clock.Now(), [&] {
    entered.Notify();
    release.WaitForNotification();
    finished = true;
  });
  clock.Schedule(clock.Now() + absl::Milliseconds(1), [&] { later_ran = true; });
  entered.WaitForNotification();
  std::thread stopper([&] { clock.Stop(); });
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(finished.load());
  release.Notify();
  stopper.join();
  EXPECT_TRUE(finished.load());  // Stop() returned only after the running callback.
  clock.Schedule(clock.Now(), [&] { later_ran = true; });  // Dropped: the clock is stopped.
  EXPECT_EQ(clock.pending(), 0u);
  const absl::Time before = clock.Now();
  EXPECT_LE(before, clock.Now());  // Now() still works.
  clock.Stop();                    // Idempotent.
  EXPECT_FALSE(later_ran.load());
}

TEST(SystemClockTest, ManyTimersFromManyThreads) {
  SystemClock clock;
  std::atomic<int> count{0};
  absl::Notification done;
  constexpr int kThreads = 4, kPerThread = 250;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        clock.Schedule(clock.Now() + absl::Microseconds(i % 50), [&] {
          if (++count == kThreads * kPerThread) done.Notify();
        });
      }
    });
  }
  for (auto& t : threads) t.join();
  done.WaitForNotification();
  EXPECT_EQ(count.load(), kThreads * kPerThread);
}

}  // namespace
}  // namespace tether
