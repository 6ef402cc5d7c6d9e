#include "sim/scheduler.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tether::sim {
namespace {

TEST(SchedulerTest, TimeAdvancesOnlyWhenNothingIsRunnable) {
  Scheduler s(1);
  std::vector<std::string> log;
  s.At(s.Now() + absl::Milliseconds(10), {0}, EventKind::kTimer, 0, [&] {
    log.push_back("timer@" +
                  std::to_string(absl::ToInt64Milliseconds(s.Elapsed())));
  });
  s.Post({0}, EventKind::kTask, 0, [&] {
    log.push_back("task@" +
                  std::to_string(absl::ToInt64Milliseconds(s.Elapsed())));
    s.Post({1}, EventKind::kTask, 0, [&] { log.push_back("nested"); });
  });
  EXPECT_TRUE(s.RunUntilIdle());
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[0], "task@0");
  EXPECT_EQ(log[1], "nested");
  EXPECT_EQ(log[2], "timer@10");
  EXPECT_EQ(s.Elapsed(), absl::Milliseconds(10));
  EXPECT_TRUE(s.idle());
}

TEST(SchedulerTest, TimedEventsRunInTimeOrder) {
  Scheduler s(2);
  std::vector<int> order;
  for (int ms : {30, 10, 20, 0}) {
    s.At(s.Now() + absl::Milliseconds(ms), {}, EventKind::kTimer, 0,
         [&order, ms] { order.push_back(ms); });
  }
  s.RunUntilIdle();
  EXPECT_EQ(order, (std::vector<int>{0, 10, 20, 30}));
}

TEST(SchedulerTest, RandomOrderDependsOnSeedAndReplays) {
  auto run = [](uint64_t seed) {
    Scheduler s(seed);
    std::vector<int> order;
    for (int i = 0; i < 20; ++i)
      s.Post({i % 3}, EventKind::kTask, i, [&order, i] { order.push_back(i); });
    s.RunUntilIdle();
    return std::make_pair(order, s.trace_hash());
  };
  EXPECT_EQ(run(5), run(5));
  EXPECT_NE(run(5).first, run(6).first);
  EXPECT_NE(run(5).second, run(6).second);
}

TEST(SchedulerTest, FifoOrderRunsInPostOrder) {
  Scheduler s(9, RunOrder::kFifo);
  std::vector<int> order;
  for (int i = 0; i < 10; ++i)
    s.Post({}, EventKind::kTask, 0, [&order, i] { order.push_back(i); });
  s.RunUntilIdle();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
}

TEST(SchedulerTest, CancelBeforeAndAfterDue) {
  Scheduler s(3);
  int ran = 0;
  EventId a = s.At(s.Now() + absl::Seconds(1), {}, EventKind::kTimer, 0,
                   [&] { ++ran; });
  EventId b = s.At(s.Now(), {}, EventKind::kTimer, 0, [&] { ++ran; });
  EventId c = s.At(s.Now() + absl::Seconds(2), {}, EventKind::kTimer, 0,
                   [&] { ++ran; });
  EXPECT_TRUE(s.Cancel(a));
  EXPECT_FALSE(s.Cancel(a));
  s.RunOne();  // runs b (due now)
  EXPECT_EQ(ran, 1);
  EXPECT_FALSE(s.Cancel(b));
  EXPECT_TRUE(s.Cancel(c));
  EXPECT_TRUE(s.RunUntilIdle());
  EXPECT_EQ(ran, 1);
  // A cancelled timer does not drag virtual time forward.
  EXPECT_EQ(s.Elapsed(), absl::ZeroDuration());
}

TEST(SchedulerTest, PurgeDomainDropsItsEventsAndBumpsGeneration) {
  Scheduler s(4);
  std::vector<int> ran;
  s.Post({1}, EventKind::kTask, 0, [&] { ran.push_back(1); });
  s.Post({0, 1}, EventKind::kDelivery, 0, [&] { ran.push_back(2); });
  s.Post({0}, EventKind::kTask, 0, [&] { ran.push_back(3); });
  EventId t = s.At(s.Now() + absl::Seconds(1), {1}, EventKind::kTimer, 0,
                   [&] { ran.push_back(4); });
  EXPECT_EQ(s.Generation(1), 0u);
  s.PurgeDomain(1);
  EXPECT_EQ(s.Generation(1), 1u);
  EXPECT_EQ(s.Generation(0), 0u);
  EXPECT_FALSE(s.Cancel(t));
  s.RunUntilIdle();
  EXPECT_EQ(ran, (std::vector<int>{3}));
}

TEST(SchedulerTest, RunUntilStopsAtPredicateOrLimit) {
  Scheduler s(5);
  int count = 0;
  for (int i = 1; i <= 10; ++i) {
    s.At(s.Now() + absl::Seconds(i), {}, EventKind::kTimer, 0,
         [&] { ++count; });
  }
  EXPECT_TRUE(s.RunUntil([&] { return count == 3; }));
  EXPECT_EQ(s.Elapsed(), absl::Seconds(3));
  EXPECT_FALSE(
      s.RunUntil([&] { return count == 100; }, s.Now() + absl::Seconds(2)));
  EXPECT_EQ(count, 5);
  s.RunFor(absl::Milliseconds(500));
  EXPECT_EQ(s.Elapsed(), absl::Milliseconds(5500));
  EXPECT_EQ(s.NextEventTime(), Scheduler::Epoch() + absl::Seconds(6));
}

TEST(SchedulerTest, RunUntilIdleReportsLivelock) {
  Scheduler s(6);
  std::function<void()> again = [&] { s.Post({}, EventKind::kTask, 0, again); };
  s.Post({}, EventKind::kTask, 0, again);
  EXPECT_FALSE(s.RunUntilIdle(1000));
  EXPECT_EQ(s.events_run(), 1000u);
  EXPECT_EQ(s.events_run(EventKind::kTask), 1000u);
}

}  // namespace
}  // namespace tether::sim
