#include "sim/sim_clock.h"

#include <vector>

#include "core/future.h"
#include "gtest/gtest.h"
#include "sim/sim_executor.h"

namespace tether::sim {
namespace {

TEST(SimClockTest, TimerFiresAtLocalDeadline) {
  Scheduler s(1);
  SimClock clock(&s, 0);
  EXPECT_EQ(clock.Now(), Scheduler::Epoch());
  absl::Time fired;
  clock.Schedule(clock.Now() + absl::Milliseconds(40),
                 [&] { fired = clock.Now(); });
  s.RunUntilIdle();
  EXPECT_EQ(fired, Scheduler::Epoch() + absl::Milliseconds(40));
}

TEST(SimClockTest, ScheduleInThePastRunsLaterNotInline) {
  Scheduler s(1);
  SimClock clock(&s, 0);
  bool ran = false;
  clock.Schedule(clock.Now() - absl::Seconds(1), [&] { ran = true; });
  EXPECT_FALSE(ran);
  s.RunUntilIdle();
  EXPECT_TRUE(ran);
}

TEST(SimClockTest, CancelAndInfiniteDeadline) {
  Scheduler s(1);
  SimClock clock(&s, 0);
  int ran = 0;
  TimerId a = clock.Schedule(clock.Now() + absl::Seconds(1), [&] { ++ran; });
  TimerId b = clock.Schedule(absl::InfiniteFuture(), [&] { ++ran; });
  EXPECT_TRUE(clock.Cancel(a));
  EXPECT_FALSE(clock.Cancel(a));
  EXPECT_TRUE(
      s.RunUntilIdle());  // the infinite timer does not keep the world busy
  EXPECT_TRUE(clock.Cancel(b));
  EXPECT_FALSE(clock.Cancel(b));
  EXPECT_EQ(ran, 0);
}

TEST(SimClockTest, SkewAndDriftKeepDeadlinesExact) {
  Scheduler s(1);
  SimClock fast(&s, 0, ClockModel{absl::Milliseconds(30), 1.001});
  SimClock slow(&s, 1, ClockModel{-absl::Milliseconds(20), 0.999});
  EXPECT_EQ(fast.Now() - slow.Now(), absl::Milliseconds(50));
  std::vector<absl::Duration> lateness;
  for (SimClock* c : {&fast, &slow}) {
    for (int ms : {1, 333, 1000, 77777}) {
      const absl::Time deadline = c->Now() + absl::Milliseconds(ms);
      c->Schedule(deadline, [&lateness, c, deadline] {
        lateness.push_back(c->Now() - deadline);
      });
    }
  }
  s.RunUntilIdle();
  ASSERT_EQ(lateness.size(), 8u);
  for (absl::Duration d : lateness) {
    EXPECT_GE(d, absl::ZeroDuration());
    EXPECT_LE(d, absl::Nanoseconds(2));
  }
}

TEST(SimClockTest, CrashMakesClockAndExecutorInert) {
  Scheduler s(1);
  SimClock clock(&s, 3);
  SimExecutor ex(&s, 3);
  int ran = 0;
  clock.Schedule(clock.Now() + absl::Seconds(1), [&] { ++ran; });
  ex.Post([&] { ++ran; });
  s.PurgeDomain(3);
  EXPECT_FALSE(clock.alive());
  EXPECT_FALSE(ex.alive());
  ex.Post([&] { ++ran; });
  TimerId t = clock.Schedule(clock.Now(), [&] { ++ran; });
  s.RunUntilIdle();
  EXPECT_EQ(ran, 0);
  EXPECT_EQ(ex.dropped(), 1u);
  EXPECT_TRUE(clock.Cancel(t));
  // A new incarnation's executor works.
  SimExecutor ex2(&s, 3);
  ex2.Post([&] { ++ran; });
  s.RunUntilIdle();
  EXPECT_EQ(ran, 1);
}

TEST(SimExecutorTest, PostNeverRunsInlineAndFuturesCompleteThroughIt) {
  Scheduler s(1);
  SimExecutor ex(&s, 0);
  Future<int> f(&ex);
  int seen = 0;
  f.Then([&](const absl::StatusOr<int>& r) { seen = *r; });
  f.Set(5);
  EXPECT_EQ(seen, 0);
  s.RunUntilIdle();
  EXPECT_EQ(seen, 5);
  EXPECT_EQ(ex.posted(), 1u);
}

}  // namespace
}  // namespace tether::sim
