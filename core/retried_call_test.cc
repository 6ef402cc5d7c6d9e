#include "core/retried_call.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/inline_executor.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

// A clock the test moves by hand; due timers run inside Advance().
class ManualClock : public Clock {
 public:
  absl::Time Now() override { return now_; }
  TimerId Schedule(absl::Time deadline, std::function<void()> callback) override {
    TimerId id = next_++;
    timers_.emplace(id, Timer{deadline, std::move(callback)});
    deadlines_.push_back(deadline);
    return id;
  }
  bool Cancel(TimerId id) override { return timers_.erase(id) > 0; }

  void Advance(absl::Duration d) {
    now_ += d;
    for (auto it = timers_.begin(); it != timers_.end();) {
      if (it->second.deadline <= now_) {
        std::function<void()> cb = std::move(it->second.callback);
        it = timers_.erase(it);
        cb();
      } else {
        ++it;
      }
    }
  }
  size_t pending() const { return timers_.size(); }
  // Every deadline ever scheduled, in order.
  const std::vector<absl::Time>& deadlines() const { return deadlines_; }

 private:
  struct Timer {
    absl::Time deadline;
    std::function<void()> callback;
  };
  absl::Time now_ = absl::UnixEpoch();
  TimerId next_ = 1;
  std::map<TimerId, Timer> timers_;
  std::vector<absl::Time> deadlines_;
};

struct SentAttempt {
  WorkerId to;
  MessageType type;
  std::string payload;
  absl::Duration timeout;
  Future<Message> reply;
};

class RetriedCallTest : public ::testing::Test {
 protected:
  RetriedCallTest() : owner_(std::make_shared<int>(0)) {
    policy_.attempt_timeout = absl::Seconds(1);
    policy_.initial_backoff = absl::Milliseconds(20);
    policy_.max_backoff = absl::Milliseconds(100);
  }

  std::unique_ptr<RetriedCaller> MakeCaller() {
    return std::make_unique<RetriedCaller>(
        owner_,
        [this](WorkerId to, MessageType type, std::string payload, absl::Duration timeout) {
          Future<Message> reply(&ex_);
          sent_.push_back(SentAttempt{to, type, std::move(payload), timeout, reply});
          return reply;
        },
        &clock_, &ex_, policy_,
        [this](WorkerId to, int attempt, const absl::Status& status) {
          bool timed_out = status.code() == absl::StatusCode::kDeadlineExceeded;
          hook_calls_.push_back(timed_out);
          hook_seen_.push_back(HookCall{to, attempt, status.code()});
          // The RRef context's policy (only timeouts), unless the test retries other errors too
          // (the distributed-autograd cleanup's), bounded by max_attempts_.
          return allow_retry_ && (timed_out || retry_other_errors_) && attempt + 1 < max_attempts_;
        });
  }

  static Message Reply(const std::string& payload) {
    Message m;
    m.envelope.set_payload(payload);
    return m;
  }

  testing::QueueExecutor ex_;
  ManualClock clock_;
  RetryPolicy policy_;
  std::shared_ptr<int> owner_;
  std::vector<SentAttempt> sent_;
  struct HookCall {
    WorkerId to;
    int attempt;
    absl::StatusCode code;
  };
  std::vector<bool> hook_calls_;
  std::vector<HookCall> hook_seen_;
  bool allow_retry_ = true;
  bool retry_other_errors_ = false;
  int max_attempts_ = 1000;
};

TEST(RetryBackoffTest, DoublesFromInitialAndCaps) {
  RetryPolicy p;
  p.initial_backoff = absl::Milliseconds(20);
  p.max_backoff = absl::Milliseconds(100);
  EXPECT_EQ(RetryBackoff(p, 0), absl::Milliseconds(20));
  EXPECT_EQ(RetryBackoff(p, 1), absl::Milliseconds(40));
  EXPECT_EQ(RetryBackoff(p, 2), absl::Milliseconds(80));
  EXPECT_EQ(RetryBackoff(p, 3), absl::Milliseconds(100));
  EXPECT_EQ(RetryBackoff(p, 1000), absl::Milliseconds(100));
  p.initial_backoff = absl::Seconds(5);  // above the cap from the start
  EXPECT_EQ(RetryBackoff(p, 0), absl::Milliseconds(100));
}

TEST_F(RetriedCallTest, AnsweredAtOnceCallsDoneOnce) {
  auto caller = MakeCaller();
  std::vector<std::string> done;
  caller->Send(3, wire::RREF_USER_DELETE, "ids",
               [&](const absl::StatusOr<Message>& r) { done.push_back(r->envelope.payload()); });
  ASSERT_EQ(sent_.size(), 1u);  // sent from the calling thread, at once
  EXPECT_EQ(sent_[0].to, 3);
  EXPECT_EQ(sent_[0].type, wire::RREF_USER_DELETE);
  EXPECT_EQ(sent_[0].payload, "ids");
  EXPECT_EQ(sent_[0].timeout, absl::Seconds(1));
  sent_[0].reply.Set(Reply("ack"));
  ex_.RunAll();
  EXPECT_EQ(done, std::vector<std::string>{"ack"});
  EXPECT_EQ(hook_calls_, std::vector<bool>{false});
  EXPECT_EQ(clock_.pending(), 0u);
}

TEST_F(RetriedCallTest, RetriesTimeoutsWithBackoffUntilAnswered) {
  auto caller = MakeCaller();
  int done = 0;
  caller->Send(1, wire::RREF_FORK_REQUEST, "p", [&](const absl::StatusOr<Message>& r) {
    ASSERT_TRUE(r.ok());
    ++done;
  });
  for (int attempt = 0; attempt < 4; ++attempt) {
    ASSERT_EQ(sent_.size(), static_cast<size_t>(attempt + 1));
    sent_.back().reply.Set(absl::DeadlineExceededError("attempt timed out"));
    ex_.RunAll();
    ASSERT_EQ(clock_.pending(), 1u);
    absl::Duration backoff = RetryBackoff(policy_, attempt);
    EXPECT_EQ(clock_.deadlines().back(), clock_.Now() + backoff);
    clock_.Advance(backoff - absl::Milliseconds(1));
    EXPECT_EQ(sent_.size(), static_cast<size_t>(attempt + 1));  // not yet
    clock_.Advance(absl::Milliseconds(1));
    // The timer only posts: the retry goes out from the executor.
    EXPECT_EQ(sent_.size(), static_cast<size_t>(attempt + 1));
    ex_.RunAll();
  }
  ASSERT_EQ(sent_.size(), 5u);
  for (const SentAttempt& s : sent_) EXPECT_EQ(s.payload, "p");
  EXPECT_EQ(done, 0);
  sent_.back().reply.Set(Reply(""));
  ex_.RunAll();
  EXPECT_EQ(done, 1);
  EXPECT_EQ(hook_calls_, (std::vector<bool>{true, true, true, true, false}));
}

TEST_F(RetriedCallTest, OtherErrorsEndTheCallWithoutRetry) {
  auto caller = MakeCaller();
  absl::Status final_status;
  caller->Send(1, wire::RREF_USER_DELETE, "p",
               [&](const absl::StatusOr<Message>& r) { final_status = r.status(); });
  sent_[0].reply.Set(absl::UnavailableError("worker 1 failed"));
  ex_.RunAll();
  EXPECT_EQ(final_status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(sent_.size(), 1u);
  EXPECT_EQ(clock_.pending(), 0u);
  // The hook's "retry" is ignored for anything but a timeout.
  EXPECT_EQ(hook_calls_, std::vector<bool>{false});
}

TEST_F(RetriedCallTest, HookSeesDestinationAttemptAndStatus) {
  auto caller = MakeCaller();
  caller->Send(4, wire::RREF_USER_DELETE, "p", [](const absl::StatusOr<Message>&) {});
  sent_[0].reply.Set(absl::DeadlineExceededError("timed out"));
  ex_.RunAll();
  clock_.Advance(absl::Seconds(1));
  ex_.RunAll();
  ASSERT_EQ(sent_.size(), 2u);
  sent_[1].reply.Set(Reply("ack"));
  ex_.RunAll();
  ASSERT_EQ(hook_seen_.size(), 2u);
  EXPECT_EQ(hook_seen_[0].to, 4);
  EXPECT_EQ(hook_seen_[0].attempt, 0);
  EXPECT_EQ(hook_seen_[0].code, absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(hook_seen_[1].attempt, 1);
  EXPECT_EQ(hook_seen_[1].code, absl::StatusCode::kOk);
}

TEST_F(RetriedCallTest, HookMayRetryOtherErrorsAndBoundTheAttempts) {
  retry_other_errors_ = true;  // e.g. send failures of a peer not declared failed
  max_attempts_ = 3;
  auto caller = MakeCaller();
  absl::Status final_status;
  int done = 0;
  caller->Send(1, wire::CLEANUP_AUTOGRAD_CONTEXT_REQ, "p", [&](const absl::StatusOr<Message>& r) {
    final_status = r.status();
    ++done;
  });
  for (int attempt = 0; attempt < 3; ++attempt) {
    ASSERT_EQ(sent_.size(), static_cast<size_t>(attempt + 1));
    sent_.back().reply.Set(absl::UnavailableError("injected send failure"));
    ex_.RunAll();
    clock_.Advance(absl::Seconds(1));
    ex_.RunAll();
  }
  EXPECT_EQ(sent_.size(), 3u);  // the bound: no fourth attempt
  EXPECT_EQ(done, 1);
  EXPECT_EQ(final_status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(clock_.pending(), 0u);
}

TEST_F(RetriedCallTest, HookCanRefuseARetry) {
  auto caller = MakeCaller();
  allow_retry_ = false;  // e.g. the owner is closed
  absl::Status final_status;
  caller->Send(1, wire::RREF_USER_DELETE, "p",
               [&](const absl::StatusOr<Message>& r) { final_status = r.status(); });
  sent_[0].reply.Set(absl::DeadlineExceededError("timed out"));
  ex_.RunAll();
  EXPECT_EQ(final_status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(sent_.size(), 1u);
  EXPECT_EQ(clock_.pending(), 0u);
}

TEST_F(RetriedCallTest, StopsSilentlyOnceTheOwnerIsGone) {
  auto caller = MakeCaller();
  int done = 0;
  caller->Send(1, wire::RREF_USER_DELETE, "p", [&](const absl::StatusOr<Message>&) { ++done; });
  sent_[0].reply.Set(absl::DeadlineExceededError("timed out"));
  ex_.RunAll();
  ASSERT_EQ(clock_.pending(), 1u);
  owner_.reset();  // the owner goes while a retry waits for its timer
  clock_.Advance(absl::Seconds(10));
  ex_.RunAll();
  EXPECT_EQ(sent_.size(), 1u);
  EXPECT_EQ(done, 0);

  // And a reply that arrives after the owner went calls nothing back.
  owner_ = std::make_shared<int>(1);
  caller = MakeCaller();
  caller->Send(1, wire::RREF_USER_DELETE, "p", [&](const absl::StatusOr<Message>&) { ++done; });
  owner_.reset();
  sent_.back().reply.Set(Reply("late"));
  ex_.RunAll();
  EXPECT_EQ(done, 0);
  EXPECT_EQ(hook_calls_.size(), 1u);  // only the first caller's timed-out attempt
}

}  // namespace
}  // namespace tether
