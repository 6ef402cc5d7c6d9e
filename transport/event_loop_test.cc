#include "transport/event_loop.h"

#include <sys/epoll.h>
#include <unistd.h>

#include <thread>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

using Events = std::vector<std::pair<uint64_t, uint32_t>>;

Events WaitFor(EventLoop& loop, int timeout_ms, int* n = nullptr) {
  Events seen;
  int count =
      loop.Wait(timeout_ms, [&](uint64_t key, uint32_t events) { seen.emplace_back(key, events); });
  if (n != nullptr) *n = count;
  return seen;
}

class EventLoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(pipe(fds_), 0);
    absl::StatusOr<std::unique_ptr<EventLoop>> loop = EventLoop::Create();
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
  }
  void TearDown() override {
    loop_.reset();
    close(fds_[0]);
    close(fds_[1]);
  }
  int fds_[2] = {-1, -1};
  std::unique_ptr<EventLoop> loop_;
};

TEST_F(EventLoopTest, ReportsRegisteredSocketsUnderTheirKeys) {
  loop_->Add(fds_[0], 7, EPOLLIN);
  EXPECT_TRUE(WaitFor(*loop_, 0).empty());
  ASSERT_EQ(write(fds_[1], "x", 1), 1);
  Events seen = WaitFor(*loop_, 1000);
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].first, 7u);
  EXPECT_TRUE(seen[0].second & EPOLLIN);
  // Level-triggered: still readable until read.
  EXPECT_EQ(WaitFor(*loop_, 0).size(), 1u);
  char c;
  ASSERT_EQ(read(fds_[0], &c, 1), 1);
  EXPECT_TRUE(WaitFor(*loop_, 0).empty());
}

TEST_F(EventLoopTest, ModifyAndRemove) {
  loop_->Add(fds_[1], 9, EPOLLIN);  // the write end: never readable
  EXPECT_TRUE(WaitFor(*loop_, 0).empty());
  loop_->Modify(fds_[1], 10, EPOLLOUT);
  Events seen = WaitFor(*loop_, 0);
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].first, 10u);  // the new key
  EXPECT_TRUE(seen[0].second & EPOLLOUT);
  loop_->Remove(fds_[1]);
  EXPECT_TRUE(WaitFor(*loop_, 0).empty());
}

TEST_F(EventLoopTest, WakeIsConsumedNotReported) {
  loop_->Wake();
  loop_->Wake();  // coalesces
  int n = 0;
  absl::Time start = absl::Now();
  EXPECT_TRUE(WaitFor(*loop_, 5000, &n).empty());
  EXPECT_EQ(n, 1);  // counted, not passed on
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_TRUE(WaitFor(*loop_, 0, &n).empty());  // drained
  EXPECT_EQ(n, 0);
}

TEST_F(EventLoopTest, WakeFromAnotherThreadEndsABlockedWait) {
  std::thread waker([&] {
    absl::SleepFor(absl::Milliseconds(50));
    loop_->Wake();
  });
  absl::Time start = absl::Now();
  int n = 0;
  EXPECT_TRUE(WaitFor(*loop_, -1, &n).empty());
  EXPECT_EQ(n, 1);
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  waker.join();
}

}  // namespace
}  // namespace tether
