#include "transport/thread_pool.h"

#include <atomic>
#include <set>
#include <thread>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

TEST(ThreadPoolTest, RunsEveryTaskOnPoolThreads) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.num_threads(), 3);
  constexpr int kTasks = 1000;
  absl::BlockingCounter counter(kTasks);
  std::atomic<int> in_pool{0};
  for (int i = 0; i < kTasks; ++i) {
    pool.Post([&] {
      if (pool.InPool()) ++in_pool;
      counter.DecrementCount();
    });
  }
  counter.Wait();
  EXPECT_EQ(in_pool.load(), kTasks);
  EXPECT_FALSE(pool.InPool());
}

TEST(ThreadPoolTest, NumIdleThreadsCountsThreadsOutsideATask) {
  ThreadPool pool(3);
  EXPECT_EQ(pool.num_idle_threads(), 3);
  absl::BlockingCounter arrived(2);
  absl::Notification release;
  absl::BlockingCounter finished(2);
  for (int i = 0; i < 2; ++i) {
    pool.Post([&] {
      arrived.DecrementCount();
      release.WaitForNotification();
      finished.DecrementCount();
    });
  }
  arrived.Wait();
  EXPECT_EQ(pool.num_idle_threads(), 1);
  release.Notify();
  finished.Wait();
  // The counter is decremented inside the task: the thread leaves it just after.
  while (pool.num_idle_threads() != 3) std::this_thread::yield();
}

TEST(ThreadPoolTest, NeverRunsInline) {
  ThreadPool pool(1);
  std::thread::id poster = std::this_thread::get_id();
  absl::Notification done;
  std::thread::id ran_on;
  pool.Post([&] {
    ran_on = std::this_thread::get_id();
    done.Notify();
  });
  done.WaitForNotification();
  EXPECT_NE(ran_on, poster);
}

TEST(ThreadPoolTest, UsesAllThreadsConcurrently) {
  ThreadPool pool(3);
  absl::BlockingCounter arrived(3);
  absl::Notification release;
  absl::BlockingCounter finished(3);
  for (int i = 0; i < 3; ++i) {
    pool.Post([&] {
      arrived.DecrementCount();
      release.WaitForNotification();
      finished.DecrementCount();
    });
  }
  arrived.Wait();  // Would hang if fewer than 3 threads served the queue.
  release.Notify();
  finished.Wait();
}

TEST(ThreadPoolTest, DrainRunsQueuedTasksAndTheirContinuations) {
  std::atomic<int> ran{0};
  ThreadPool pool(1);
  absl::Notification release;
  pool.Post([&] { release.WaitForNotification(); });
  for (int i = 0; i < 10; ++i) {
    pool.Post([&] {
      ++ran;
      pool.Post([&] { ++ran; });  // Posted from a pool thread while draining: still runs.
    });
  }
  std::thread shutter([&] { pool.Shutdown(ThreadPool::kDrain); });
  // Post probes from outside until one is dropped: shutdown has then begun.
  std::atomic<int> probes_ran{0};
  int probes_posted = 0;
  while (true) {
    uint64_t before = pool.dropped();
    pool.Post([&] { ++probes_ran; });
    ++probes_posted;
    if (pool.dropped() > before) break;
    std::this_thread::yield();
  }
  release.Notify();
  shutter.join();
  EXPECT_EQ(ran.load(), 20);
  EXPECT_EQ(probes_ran.load(), probes_posted - 1);
  pool.Post([&] { ++ran; });  // After shutdown: dropped.
  EXPECT_EQ(ran.load(), 20);
}

TEST(ThreadPoolTest, DropDiscardsQueuedTasks) {
  ThreadPool pool(1);
  absl::Notification started, release;
  std::atomic<int> ran{0};
  pool.Post([&] {
    started.Notify();
    release.WaitForNotification();
  });
  started.WaitForNotification();
  for (int i = 0; i < 5; ++i) pool.Post([&] { ++ran; });
  std::thread shutter([&] { pool.Shutdown(ThreadPool::kDrop); });
  while (pool.dropped() < 5) std::this_thread::yield();
  release.Notify();
  shutter.join();
  EXPECT_EQ(ran.load(), 0);
  EXPECT_EQ(pool.dropped(), 5u);
}

TEST(ThreadPoolTest, ShutdownIsIdempotentAndDestructorDrains) {
  std::atomic<int> ran{0};
  {
    ThreadPool pool(2);
    for (int i = 0; i < 100; ++i) pool.Post([&] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 100);
  ThreadPool pool(1);
  pool.Shutdown();
  pool.Shutdown(ThreadPool::kDrop);
  pool.Post([&] { ++ran; });
  EXPECT_EQ(ran.load(), 100);
  EXPECT_EQ(pool.dropped(), 1u);
}

}  // namespace
}  // namespace tether

namespace tether {
namespace {

// A pollable event source driven by the test: Trigger() makes the next Poll()
// post a task from inside the poll.
class FakePollable : public Pollable {
 public:
  explicit FakePollable(ThreadPool* pool) : pool_(pool) {}
  void Poll(int max_wait_ms) override {
    int n;
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(this, &FakePollable::PendingOrWokenLocked),
                           absl::Milliseconds(max_wait_ms));
      woken_ = false;
      n = pending_;
      pending_ = 0;
    }
    // Post outside our lock (the pool calls Wake() under its own).
    for (int k = 0; k < n; ++k) {
      std::thread::id poller = std::this_thread::get_id();
      EXPECT_TRUE(pool_->InPoll());
      pool_->Post([this, poller] {
        absl::MutexLock l(&mu_);
        same_thread_ += std::this_thread::get_id() == poller;
        ++ran_;
      });
    }
  }
  void Wake() override {
    absl::MutexLock lock(&mu_);
    woken_ = true;
  }
  void Trigger() {
    absl::MutexLock lock(&mu_);
    ++pending_;
  }
  void WaitRan(int n) {
    absl::MutexLock lock(&mu_);
    struct Arg {
      FakePollable* self;
      int n;
    } arg{this, n};
    mu_.Await(absl::Condition(
        +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->self->ran_ >= a->n; }, &arg));
  }
  int same_thread() {
    absl::MutexLock lock(&mu_);
    return same_thread_;
  }

 private:
  bool PendingOrWokenLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return pending_ > 0 || woken_;
  }

  ThreadPool* pool_;
  absl::Mutex mu_;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;
  int ran_ ABSL_GUARDED_BY(mu_) = 0;
  int same_thread_ ABSL_GUARDED_BY(mu_) = 0;
  bool woken_ ABSL_GUARDED_BY(mu_) = false;
};

TEST(ThreadPoolPollTest, TasksPostedDuringPollRunOnThePollingThread) {
  ThreadPool pool(2);
  FakePollable p(&pool);
  ASSERT_TRUE(pool.SetPollable(&p));
  EXPECT_FALSE(pool.SetPollable(&p));  // One at a time.
  for (int i = 1; i <= 20; ++i) {
    p.Trigger();
    p.WaitRan(i);
  }
  EXPECT_EQ(p.same_thread(), 20);
  // Outside tasks still run while a thread polls.
  absl::Notification done;
  pool.Post([&] { done.Notify(); });
  done.WaitForNotification();
  pool.ClearPollable(&p);  // Waits for the poll in progress.
  EXPECT_FALSE(pool.InPoll());
}

TEST(ThreadPoolPollTest, OutsidePostWakesTheOnlyPollingThread) {
  ThreadPool pool(1);
  FakePollable p(&pool);
  ASSERT_TRUE(pool.SetPollable(&p));
  for (int i = 0; i < 5; ++i) {
    absl::Notification done;
    pool.Post([&] { done.Notify(); });
    done.WaitForNotification();
  }
  pool.Shutdown();
}

}  // namespace
}  // namespace tether

namespace tether {
namespace {

// A task blocked until the test releases it: what a handler stuck in user code
// (blocked on a lock) looks like to the pool.
TEST(ThreadPoolBoundedShutdownTest, LeavesAStuckThreadBehindAndReportsIt) {
  // Never freed: a thread left behind uses the pool when its task returns.
  auto* pool = new ThreadPool(3);
  absl::Notification started, release;
  std::atomic<int> ran{0};
  pool->Post([&] {
    started.Notify();
    release.WaitForNotification();
  });
  started.WaitForNotification();
  for (int i = 0; i < 4; ++i) pool->Post([&] { ++ran; });
  // Hangs here (the test's timeout fails it) if the stuck thread is joined.
  std::vector<StuckThread> stuck =
      pool->ShutdownWithin(ThreadPool::kDrain, absl::Milliseconds(300));
  ASSERT_EQ(stuck.size(), 1u);
  EXPECT_GE(stuck[0].index, 0);
  EXPECT_LT(stuck[0].index, 3);
  EXPECT_GT(stuck[0].os_tid, 0);
  EXPECT_GE(stuck[0].busy_for, absl::Milliseconds(300));
  EXPECT_NE(stuck[0].ToString().find("inside one task for"), std::string::npos);
  EXPECT_EQ(ran.load(), 4);  // The free threads drained the queue.
  EXPECT_EQ(pool->threads_left_behind(), 1);
  // Shut down: posts are dropped, a second shutdown returns at once.
  pool->Post([&] { ++ran; });
  EXPECT_TRUE(pool->ShutdownWithin(ThreadPool::kDrain, absl::Seconds(1)).empty());
  // The stuck task returns: its thread leaves without running anything more,
  // not even what it posts itself.
  pool->Post([] {});  // (dropped too)
  release.Notify();
  while (pool->threads_left_behind() > 0) std::this_thread::yield();
  EXPECT_EQ(ran.load(), 4);
  EXPECT_EQ(pool->dropped(), 2u);
}

TEST(ThreadPoolBoundedShutdownTest, StuckTaskPostingAfterItReturnsRunsNothing) {
  auto* pool = new ThreadPool(1);  // Never freed (see above).
  absl::Notification started, release;
  std::atomic<int> ran{0};
  pool->Post([&] {
    started.Notify();
    release.WaitForNotification();
    pool->Post([&] { ++ran; });  // A continuation posted from the pool thread.
  });
  started.WaitForNotification();
  std::vector<StuckThread> stuck = pool->ShutdownWithin(ThreadPool::kDrop, absl::Milliseconds(100));
  ASSERT_EQ(stuck.size(), 1u);
  EXPECT_EQ(stuck[0].index, 0);
  release.Notify();
  while (pool->threads_left_behind() > 0) std::this_thread::yield();
  EXPECT_EQ(ran.load(), 0);
  EXPECT_EQ(pool->dropped(), 1u);
}

TEST(ThreadPoolBoundedShutdownTest, JoinsEveryThreadThatLeavesWithinTheBound) {
  ThreadPool pool(4);
  std::atomic<int> ran{0};
  absl::Notification release;
  for (int i = 0; i < 4; ++i) {
    pool.Post([&] {
      release.WaitForNotification();
      ++ran;
    });
  }
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(50));
    release.Notify();
  });
  // Generous bound: the tasks end long before it, so nobody is left behind.
  std::vector<StuckThread> stuck = pool.ShutdownWithin(ThreadPool::kDrain, absl::Seconds(60));
  releaser.join();
  EXPECT_TRUE(stuck.empty());
  EXPECT_EQ(ran.load(), 4);
  EXPECT_EQ(pool.threads_left_behind(), 0);
}

TEST(ThreadPoolBoundedShutdownTest, DestructorWaitsForThreadsLeftBehind) {
  std::atomic<bool> task_done{false};
  absl::Notification started, release;
  auto pool = std::make_unique<ThreadPool>(1);
  pool->Post([&] {
    started.Notify();
    release.WaitForNotification();
    absl::SleepFor(absl::Milliseconds(20));
    task_done = true;
  });
  started.WaitForNotification();
  ASSERT_EQ(pool->ShutdownWithin(ThreadPool::kDrain, absl::Milliseconds(50)).size(), 1u);
  release.Notify();
  pool.reset();  // Must not free the pool under the thread still using it.
  EXPECT_TRUE(task_done.load());
}

}  // namespace
}  // namespace tether
