#include "core/future.h"

#include <thread>

#include "gtest/gtest.h"
#include "core/inline_executor.h"

namespace tether {
namespace {

TEST(FutureTest, FirstSetWins) {
  testing::QueueExecutor ex;
  Future<int> f(&ex);
  EXPECT_FALSE(f.ready());
  EXPECT_TRUE(f.Set(1));
  EXPECT_FALSE(f.Set(absl::DeadlineExceededError("late")));
  ASSERT_TRUE(f.ready());
  EXPECT_EQ(*f.result(), 1);
}

TEST(FutureTest, CallbacksRunOnExecutorNotInline) {
  testing::QueueExecutor ex;
  Future<int> f(&ex);
  int seen = 0;
  f.Then([&](const absl::StatusOr<int>& r) { seen = *r; });
  f.Set(7);
  EXPECT_EQ(seen, 0);
  EXPECT_EQ(ex.RunAll(), 1);
  EXPECT_EQ(seen, 7);
  // Then() on a completed future is posted too.
  f.Then([&](const absl::StatusOr<int>& r) { seen = *r + 1; });
  EXPECT_EQ(seen, 7);
  ex.RunAll();
  EXPECT_EQ(seen, 8);
}

TEST(FutureTest, ErrorsPropagate) {
  testing::QueueExecutor ex;
  Future<int> f(&ex);
  absl::Status seen;
  f.Then([&](const absl::StatusOr<int>& r) { seen = r.status(); });
  f.Set(absl::UnavailableError("peer lost"));
  ex.RunAll();
  EXPECT_EQ(seen.code(), absl::StatusCode::kUnavailable);
}

TEST(FutureTest, WaitBlocksUntilSetFromAnotherThread) {
  testing::QueueExecutor ex;
  Future<int> f(&ex);
  EXPECT_FALSE(f.WaitFor(absl::Milliseconds(1)));
  std::thread t([f] { f.Set(5); });
  EXPECT_EQ(*f.Wait(), 5);
  t.join();
}

}  // namespace
}  // namespace tether
