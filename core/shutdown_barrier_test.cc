// The shutdown barrier on its own: its payload codecs, and the leader's and a follower's decisions,
// driven message by message against a fake host, a hand-driven clock and a queue executor.
#include "core/shutdown_barrier.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/callback_gate.h"
#include "core/inline_executor.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

// --- Codecs ---

TEST(BarrierCodecTest, QueryRoundTrips) {
  for (BarrierQuery q : {BarrierQuery{0, false}, BarrierQuery{7, false}, BarrierQuery{7, true},
                         BarrierQuery{UINT64_MAX, true}}) {
    absl::StatusOr<BarrierQuery> back = DecodeBarrierQuery(EncodeBarrierQuery(q));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->round, q.round);
    EXPECT_EQ(back->joined, q.joined);
  }
  EXPECT_EQ(EncodeBarrierQuery({12, false}), "12");
  EXPECT_EQ(EncodeBarrierQuery({12, true}), "12,1");
}

TEST(BarrierCodecTest, QueryRejectsMalformedPayloads) {
  for (const char* bad : {"", "x", "-1", "1,", "1,0", "1,2", "1,1,1", ",1", "1.5"}) {
    absl::StatusOr<BarrierQuery> q = DecodeBarrierQuery(bad);
    EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
  }
  EXPECT_NE(DecodeBarrierQuery("1,2").status().message().find("SHUTDOWN_QUERY"), std::string::npos);
}

TEST(BarrierCodecTest, ReportRoundTrips) {
  RoundReport r;
  r.round = 42;
  r.report.declared = true;
  r.report.activity.pending = -3;  // A source may report a negative correction; it travels as is.
  r.report.activity.events = UINT64_MAX;
  r.report.joined = true;
  EXPECT_EQ(EncodeBarrierReport(r), "42,1,-3,18446744073709551615,1");
  absl::StatusOr<RoundReport> back = DecodeBarrierReport(EncodeBarrierReport(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->round, 42u);
  EXPECT_EQ(back->report, r.report);

  RoundReport idle;
  back = DecodeBarrierReport(EncodeBarrierReport(idle));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->round, 0u);
  EXPECT_EQ(back->report, BarrierReport{});
  EXPECT_FALSE(back->report.declared);
  EXPECT_FALSE(back->report.joined);
}

TEST(BarrierCodecTest, ReportRejectsMalformedPayloads) {
  for (const char* bad : {"", "1", "1,1,0,0", "1,1,0,0,1,1", "x,1,0,0,1", "1,y,0,0,1", "1,1,z,0,1",
                          "1,1,0,-1,1", "1,1,0,0,", "-1,1,0,0,1", "1,1,0,0,1x"}) {
    absl::StatusOr<RoundReport> r = DecodeBarrierReport(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
  }
}

TEST(BarrierCodecTest, AbortCarriesTheLostWorkerAndTheLeader) {
  std::string text =
      EncodeBarrierAbort("trainer3", absl::UnavailableError("connection reset"), false);
  EXPECT_EQ(text,
            "trainer3 is gone (connection reset) before every worker called shutdown(): the "
            "graceful shutdown barrier cannot complete");
  EXPECT_NE(EncodeBarrierAbort("w", absl::UnavailableError("x"), true)
                .find("after it called shutdown() but before every worker"),
            std::string::npos);
  absl::Status why = DecodeBarrierAbort(text, "master");
  EXPECT_EQ(why.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(why.message(), text + " (the shutdown leader master ended the barrier)");
}

// --- The barrier, against a fake host ---

// Timers fire only when the test advances time.
class ManualClock : public Clock {
 public:
  absl::Time Now() override { return now_; }
  TimerId Schedule(absl::Time deadline, std::function<void()> callback) override {
    timers_[++next_] = {deadline, std::move(callback)};
    return next_;
  }
  bool Cancel(TimerId id) override { return timers_.erase(id) > 0; }
  // Moves time on by `d`, running the timers that come due, in deadline order.
  void Advance(absl::Duration d) {
    now_ += d;
    while (true) {
      auto due = timers_.end();
      for (auto it = timers_.begin(); it != timers_.end(); ++it) {
        if (it->second.first <= now_ &&
            (due == timers_.end() || it->second.first < due->second.first)) {
          due = it;
        }
      }
      if (due == timers_.end()) return;
      std::function<void()> callback = std::move(due->second.second);
      timers_.erase(due);
      callback();
    }
  }
  size_t armed() const { return timers_.size(); }

 private:
  absl::Time now_ = absl::UnixEpoch();
  TimerId next_ = 0;
  std::map<TimerId, std::pair<absl::Time, std::function<void()>>> timers_;
};

struct Sent {
  WorkerId to;
  MessageType type;
  std::string payload;
};

class BarrierTest : public ::testing::Test {
 protected:
  // The host, as the Agent is: it finishes through FinishLocked(), once.
  class FakeHost : public ShutdownBarrier::Host {
   public:
    explicit FakeHost(BarrierTest* t) : t_(t) {}
    void SendBarrierMessage(WorkerId to, MessageType type, std::string payload) override {
      t_->sent_.push_back({to, type, std::move(payload)});
    }
    ActivitySnapshot LocalActivity() override { return t_->activity_; }
    void FinishShutdown(absl::Status status) override {
      std::vector<TimerId> timers;
      {
        ShutdownBarrier::OwnerLock lock(&t_->mu_, t_->barrier_.get());
        if (!t_->barrier_->FinishLocked(&timers)) return;
      }
      for (TimerId id : timers) t_->clock_.Cancel(id);
      t_->finished_.push_back(status);
    }

   private:
    BarrierTest* const t_;
  };

  ~BarrierTest() override { gate_->Close(); }

  // Workers 0 .. n-1, named "w<id>"; worker 0 leads.
  void Make(WorkerId self, int n, bool fails_on_lost_peer = false) {
    ShutdownBarrierOptions o;
    o.self = self;
    for (WorkerId w = 0; w < n; ++w) o.workers.push_back({absl::StrCat("w", w), w});
    o.timeout = absl::Seconds(60);
    o.poll_interval = absl::Milliseconds(10);
    o.fails_on_lost_peer = fails_on_lost_peer;
    barrier_ = std::make_unique<ShutdownBarrier>(o, &mu_, &clock_, &executor_, gate_, &host_);
    barrier_->AddJoinedListener([this] { ++joined_listener_runs_; });
  }

  // Shutdown(true), as the Agent runs it.
  void Begin() {
    {
      ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
      barrier_->BeginLocked(/*graceful=*/true);
    }
    barrier_->Run();
    executor_.RunAll();
  }

  absl::Status Deliver(WorkerId from, MessageType type, std::string payload = "") {
    Message m;
    m.envelope.set_type(type);
    m.envelope.set_from(from);
    m.envelope.set_payload(std::move(payload));
    absl::Status s = barrier_->HandleMessage(m);
    executor_.RunAll();
    return s;
  }

  absl::Status Report(WorkerId from, uint64_t round, bool declared, int64_t pending,
                      uint64_t events, bool joined) {
    return Deliver(from, wire::SHUTDOWN_REPORT,
                   EncodeBarrierReport({round, {declared, {pending, events}, joined}}));
  }

  void Lose(WorkerId peer, absl::Status reason = absl::UnavailableError("crashed")) {
    {
      ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
      barrier_->OnPeerFailedLocked(peer, reason);
    }
    barrier_->HandlePeerFailure(peer, reason);
    executor_.RunAll();
  }

  void Advance(absl::Duration d) {
    clock_.Advance(d);
    executor_.RunAll();
  }

  // What was sent since the last call, as "type to payload" lines.
  std::vector<std::string> TakeSent() {
    std::vector<std::string> out;
    for (const Sent& s : sent_) {
      out.push_back(absl::StrCat(MessageTypeName(s.type), " ", s.to, s.payload.empty() ? "" : " ",
                                 s.payload));
    }
    sent_.clear();
    return out;
  }

  bool Finished() {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    return barrier_->FinishedLocked();
  }

  // The leader's run up to the join: every follower declares in round 1, and the join's round 2
  // is sent to all.
  void JoinAllIdle(int n) {
    Begin();
    std::vector<std::string> first;
    for (WorkerId w = 1; w < n; ++w) first.push_back(absl::StrCat("SHUTDOWN_QUERY ", w, " 1"));
    ASSERT_EQ(TakeSent(), first);
    for (WorkerId w = 1; w < n; ++w) ASSERT_TRUE(Report(w, 1, true, 0, 5, false).ok());
    // The last declaration completes the join: a fresh round tells everyone.
    std::vector<std::string> join;
    for (WorkerId w = 1; w < n; ++w) join.push_back(absl::StrCat("SHUTDOWN_QUERY ", w, " 2,1"));
    ASSERT_EQ(TakeSent(), join);
    EXPECT_EQ(joined_listener_runs_, 1);
  }

  absl::Mutex mu_;
  ManualClock clock_;
  testing::QueueExecutor executor_;
  std::shared_ptr<CallbackGate> gate_ = std::make_shared<CallbackGate>();
  FakeHost host_{this};
  std::unique_ptr<ShutdownBarrier> barrier_;
  std::vector<Sent> sent_;
  ActivitySnapshot activity_;
  std::vector<absl::Status> finished_;
  int joined_listener_runs_ = 0;
};

TEST_F(BarrierTest, LeaderCommitsAfterTwoIdenticalQuietRounds) {
  Make(0, 3);
  JoinAllIdle(3);
  ASSERT_TRUE(Report(1, 2, true, 0, 5, true).ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{});  // Round 2 is not complete yet.
  ASSERT_TRUE(Report(2, 2, true, 0, 5, true).ok());
  // Quiet, but nothing to compare with: confirmed by an immediate second round.
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 3,1", "SHUTDOWN_QUERY 2 3,1"}));
  ASSERT_TRUE(Report(1, 3, true, 0, 5, true).ok());
  ASSERT_TRUE(Report(2, 3, true, 0, 5, true).ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_COMMIT 1", "SHUTDOWN_COMMIT 2"}));
  EXPECT_FALSE(Finished());  // Until every live follower acknowledged the commit.
  ASSERT_TRUE(Deliver(1, wire::SHUTDOWN_ACK).ok());
  EXPECT_FALSE(Finished());
  ASSERT_TRUE(Deliver(2, wire::SHUTDOWN_ACK).ok());
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_TRUE(finished_[0].ok()) << finished_[0];
  EXPECT_TRUE(Finished());
  EXPECT_EQ(joined_listener_runs_, 1);
  EXPECT_EQ(clock_.armed(), 0u);  // The deadline and the poll were cancelled.
}

TEST_F(BarrierTest, LeaderDoesNotCommitWhileAnyWorkIsInFlightOrChanging) {
  Make(0, 3);
  JoinAllIdle(3);
  // A follower with a call in flight: no commit, and no immediate confirmation round.
  ASSERT_TRUE(Report(1, 2, true, 1, 5, true).ok());
  ASSERT_TRUE(Report(2, 2, true, 0, 5, true).ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{});
  // The next poll starts round 3: now idle, but its counters moved since round 2.
  Advance(absl::Milliseconds(10));
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 3,1", "SHUTDOWN_QUERY 2 3,1"}));
  ASSERT_TRUE(Report(1, 3, true, 0, 6, true).ok());
  // The leader's own work counts the same way: its report for the confirming round 4 moved.
  activity_.events = 1;
  ASSERT_TRUE(Report(2, 3, true, 0, 5, true).ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 4,1", "SHUTDOWN_QUERY 2 4,1"}));
  ASSERT_TRUE(Report(1, 4, true, 0, 6, true).ok());
  ASSERT_TRUE(Report(2, 4, true, 0, 5, true).ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 5,1", "SHUTDOWN_QUERY 2 5,1"}));
  ASSERT_TRUE(Report(1, 5, true, 0, 6, true).ok());
  ASSERT_TRUE(Report(2, 5, true, 0, 5, true).ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_COMMIT 1", "SHUTDOWN_COMMIT 2"}));
  EXPECT_TRUE(finished_.empty());
}

TEST_F(BarrierTest, LeaderIgnoresStaleRoundsAndWaitsForEveryDeclaration) {
  Make(0, 3);
  Begin();
  TakeSent();
  ASSERT_TRUE(Report(1, 1, true, 0, 0, false).ok());
  ASSERT_TRUE(Report(2, 1, false, 0, 0, false).ok());  // Worker 2 has not called Shutdown yet.
  EXPECT_EQ(TakeSent(), std::vector<std::string>{});
  EXPECT_EQ(barrier_->Progress().not_joined, std::vector<WorkerId>{2});
  ASSERT_TRUE(Report(2, 7, true, 0, 0, false).ok());  // A round never asked: dropped.
  EXPECT_EQ(barrier_->Progress().not_joined, std::vector<WorkerId>{2});
  Advance(absl::Milliseconds(10));  // Complete but not joined: the next round.
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 2", "SHUTDOWN_QUERY 2 2"}));
  ASSERT_TRUE(Report(2, 2, true, 0, 0, false).ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 3,1", "SHUTDOWN_QUERY 2 3,1"}));
  ShutdownProgress p = barrier_->Progress();
  EXPECT_TRUE(p.pending);
  EXPECT_TRUE(p.joined);
  EXPECT_TRUE(p.not_joined.empty());
  EXPECT_EQ(joined_listener_runs_, 1);
}

TEST_F(BarrierTest, LeaderAbortsWhenAWorkerIsLostBeforeTheJoin) {
  Make(0, 3, /*fails_on_lost_peer=*/true);
  Begin();
  TakeSent();
  ASSERT_TRUE(Report(1, 1, true, 0, 0, false).ok());
  Lose(2, absl::UnavailableError("connection reset"));
  const std::string text =
      "w2 is gone (connection reset) before every worker called shutdown(): the graceful "
      "shutdown barrier cannot complete";
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_ABORT 1 " + text});
  EXPECT_TRUE(barrier_->Progress().aborting);
  EXPECT_TRUE(finished_.empty());  // Not before worker 1 heard why.
  Advance(absl::Milliseconds(10));
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_ABORT 1 " + text});  // Resent.
  ASSERT_TRUE(Deliver(1, wire::SHUTDOWN_ACK).ok());
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_EQ(finished_[0].code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(finished_[0].message(), text);
  EXPECT_EQ(joined_listener_runs_, 0);
}

TEST_F(BarrierTest, LeaderAbortGivesUpOnMissingAcksAfterItsBound) {
  Make(0, 3, /*fails_on_lost_peer=*/true);
  Begin();
  ASSERT_TRUE(Report(1, 1, true, 0, 0, false).ok());
  Lose(1);
  EXPECT_EQ(TakeSent().back().rfind("SHUTDOWN_ABORT 2 w1 is gone", 0), 0u);
  Advance(absl::Milliseconds(990));
  EXPECT_TRUE(finished_.empty());
  Advance(absl::Milliseconds(10));
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_EQ(finished_[0].code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(finished_[0].message().find("w1 is gone (crashed) after it called"), std::string::npos)
      << finished_[0];
}

TEST_F(BarrierTest, LostWorkerCountsAsStoppedUnlessTheBarrierFailsOnIt) {
  Make(0, 3);  // shutdown_fails_on_lost_peer off.
  Begin();
  TakeSent();
  Lose(2);
  ASSERT_TRUE(Report(1, 1, true, 0, 0, false).ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_QUERY 1 2,1"});
  ASSERT_TRUE(Report(1, 2, true, 0, 0, true).ok());
  ASSERT_TRUE(Report(1, 3, true, 0, 0, true).ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_QUERY 1 3,1", "SHUTDOWN_COMMIT 1"}));
  ASSERT_TRUE(Deliver(1, wire::SHUTDOWN_ACK).ok());
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_TRUE(finished_[0].ok()) << finished_[0];
}

TEST_F(BarrierTest, DeadlineEndsABarrierThatDoesNotComplete) {
  Make(0, 2);
  Begin();
  Advance(absl::Seconds(60));
  ASSERT_FALSE(finished_.empty());
  EXPECT_EQ(finished_[0].code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_FALSE(barrier_->Progress().pending);
}

TEST_F(BarrierTest, MalformedMessagesAreRejectedAndChangeNothing) {
  Make(1, 2);
  Begin();
  EXPECT_EQ(Deliver(0, wire::SHUTDOWN_QUERY, "nope").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Deliver(0, wire::SHUTDOWN_QUERY, "1,0").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Deliver(0, wire::SHUTDOWN_REPORT, "1,1,0").code(), absl::StatusCode::kInvalidArgument);
  // Only the leader may end the barrier.
  EXPECT_EQ(Deliver(1, wire::SHUTDOWN_ABORT, "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TakeSent(), std::vector<std::string>{});
  EXPECT_TRUE(finished_.empty());
  EXPECT_TRUE(barrier_->Progress().pending);
}

TEST_F(BarrierTest, FollowerAnswersQueriesRunsListenersOnceAndFinishesOnCommit) {
  Make(1, 2);
  Begin();
  EXPECT_EQ(TakeSent(), std::vector<std::string>{});  // A follower only answers.
  activity_ = {2, 9};
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_QUERY, "1").ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_REPORT 0 1,1,2,9,0"});
  EXPECT_EQ(joined_listener_runs_, 0);
  activity_ = {0, 9};
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_QUERY, "2,1").ok());
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_QUERY, "3,1").ok());
  EXPECT_EQ(TakeSent(), (std::vector<std::string>{"SHUTDOWN_REPORT 0 2,1,0,9,1",
                                                  "SHUTDOWN_REPORT 0 3,1,0,9,1"}));
  EXPECT_EQ(joined_listener_runs_, 1);
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_COMMIT).ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_ACK 0"});
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_TRUE(finished_[0].ok());
  // The leader stopping after its commit is the barrier's end, not a failure.
  Lose(0);
  EXPECT_EQ(finished_.size(), 1u);
}

TEST_F(BarrierTest, FollowerThatHasNotDeclaredSaysSoAndIgnoresACommit) {
  Make(1, 2);
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_QUERY, "1,1").ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_REPORT 0 1,0,0,0,0"});
  EXPECT_EQ(joined_listener_runs_, 0);
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_COMMIT).ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_ACK 0"});
  EXPECT_TRUE(finished_.empty());
}

TEST_F(BarrierTest, FollowerFailsWhenTheLeaderIsLostBeforeItsCommit) {
  Make(1, 2);
  Begin();
  Lose(0, absl::UnavailableError("socket closed"));
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_EQ(finished_[0].code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(finished_[0].message(),
            "the shutdown leader w0 is gone (socket closed); this worker stopped without the "
            "graceful shutdown barrier");
}

TEST_F(BarrierTest, LeadersAbortBeforeShutdownFailsTheLaterShutdownWithItsReason) {
  Make(1, 2);
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_ABORT, "w2 is gone").ok());
  EXPECT_EQ(TakeSent(), std::vector<std::string>{"SHUTDOWN_ACK 0"});
  EXPECT_TRUE(finished_.empty());
  Begin();
  ASSERT_EQ(finished_.size(), 1u);
  EXPECT_EQ(finished_[0].message(), "w2 is gone (the shutdown leader w0 ended the barrier)");
}

TEST_F(BarrierTest, RestartedLeaderIsNoLongerGone) {
  Make(1, 2);
  Lose(0);
  ASSERT_TRUE(Deliver(0, wire::SHUTDOWN_ABORT, "why").ok());
  {
    ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
    barrier_->OnPeerRestartedLocked(0);
  }
  Begin();
  EXPECT_TRUE(finished_.empty());
  EXPECT_TRUE(barrier_->Progress().pending);
}

TEST_F(BarrierTest, UngracefulShutdownRunsNoBarrierAndFinishesOnce) {
  Make(0, 2);
  std::vector<TimerId> timers;
  ShutdownBarrier::OwnerLock lock(&mu_, barrier_.get());
  EXPECT_FALSE(barrier_->BegunLocked());
  EXPECT_FALSE(barrier_->FinishLocked(&timers));  // Nothing to finish before it begins.
  barrier_->BeginLocked(/*graceful=*/false);
  EXPECT_TRUE(barrier_->BegunLocked());
  EXPECT_FALSE(barrier_->PendingLocked());
  EXPECT_TRUE(barrier_->FinishLocked(&timers));
  EXPECT_TRUE(timers.empty());  // No deadline without a barrier.
  EXPECT_FALSE(barrier_->FinishLocked(&timers));
  EXPECT_TRUE(barrier_->FinishedLocked());
}

}  // namespace
}  // namespace tether
