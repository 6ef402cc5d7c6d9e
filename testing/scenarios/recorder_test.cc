#include "testing/scenarios/recorder.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tether::scenarios {
namespace {

const absl::Time t0 = absl::FromUnixSeconds(1000);

bool Mentions(const std::vector<std::string>& v, const std::string& what) {
  for (const std::string& s : v) {
    if (s.find(what) != std::string::npos) return true;
  }
  return false;
}

TEST(RecorderTest, CleanRunHasNoViolations) {
  Recorder r;
  r.WorkerStarted(0, 0);
  CallExpectation e;
  e.value = "re:x";
  r.CallIssued(1, 0, 0, 1, t0, absl::Seconds(1), e);
  r.HandlerRan(1, 1);
  r.CallCompleted(1, t0 + absl::Milliseconds(3), absl::OkStatus(), "re:x");
  r.ShutdownBegan(0, 0, true, true);
  r.ShutdownDone(0, 0, absl::OkStatus());
  EXPECT_TRUE(r.CheckInvariants(true).empty());
  EXPECT_EQ(r.calls_ok(), 1);
}

TEST(RecorderTest, EachInvariantBites) {
  Recorder r;
  r.WorkerStarted(0, 0);
  r.WorkerStarted(1, 0);
  CallExpectation ok;
  ok.value = "good";
  r.CallIssued(1, 0, 0, 1, t0, absl::Seconds(1), ok);  // never completes
  r.CallIssued(2, 0, 0, 1, t0, absl::Seconds(1), ok);  // late
  r.CallCompleted(2, t0 + absl::Seconds(2), absl::CancelledError("x"), "");
  r.CallIssued(3, 0, 0, 1, t0, absl::Seconds(1), ok);  // wrong value
  r.CallCompleted(3, t0, absl::OkStatus(), "bad");
  r.CallIssued(4, 0, 0, 1, t0, absl::Seconds(1), ok);  // early timeout
  r.CallCompleted(4, t0 + absl::Milliseconds(10),
                  absl::DeadlineExceededError("t"), "");
  r.CallIssued(5, 0, 0, 1, t0, absl::Seconds(1), ok);  // unexpected code
  r.CallCompleted(5, t0, absl::InvalidArgumentError("?"), "");
  r.HandlerRan(6, 1);
  r.HandlerRan(6, 1);
  r.ShutdownBegan(0, 0, true, true);  // never done; worker 1 never began
  const std::vector<std::string> v = r.CheckInvariants(true);
  EXPECT_TRUE(Mentions(v, "never completed"));
  EXPECT_TRUE(Mentions(v, "later than its timeout"));
  EXPECT_TRUE(Mentions(v, "instead of 'good'"));
  EXPECT_TRUE(Mentions(v, "timed out early"));
  EXPECT_TRUE(Mentions(v, "unexpected INVALID_ARGUMENT"));
  EXPECT_TRUE(Mentions(v, "ran 2 times"));
  EXPECT_TRUE(Mentions(v, "graceful shutdown never completed"));
  EXPECT_TRUE(Mentions(v, "never began shutting down"));
}

TEST(RecorderTest, LosslessExpectationsOnlyWhenLossless) {
  Recorder r;
  r.CallIssued(1, 0, 0, 1, t0, absl::Seconds(1), CallExpectation{});
  r.CallCompleted(1, t0 + absl::Seconds(1), absl::DeadlineExceededError("t"),
                  "");
  EXPECT_TRUE(r.CheckInvariants(false).empty());
  EXPECT_TRUE(Mentions(r.CheckInvariants(true), "should end OK"));
}

TEST(RecorderTest, ClearErrorsNameTheFailedWorker) {
  Recorder r;
  CallExpectation e;
  e.if_lossless = absl::StatusCode::kUnavailable;
  e.error_mentions = {"worker2", "worker 2"};
  r.CallIssued(1, 0, 0, 2, t0, absl::Seconds(1), e);
  r.CallCompleted(1, t0, absl::UnavailableError("worker 'worker2' failed"), "");
  r.CallIssued(2, 0, 0, 2, t0, absl::Seconds(1), e);
  r.CallCompleted(2, t0, absl::UnavailableError("something broke"), "");
  const std::vector<std::string> v = r.CheckInvariants(true);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_TRUE(Mentions(v, "names none of: worker2, worker 2"));
  EXPECT_TRUE(r.CheckInvariants(false).empty());
}

TEST(RecorderTest, CrashedCallersAreExempt) {
  Recorder r;
  r.WorkerStarted(2, 0);
  r.CallIssued(Recorder::MakeToken(2, 0, 1), 2, 0, 1, t0, absl::Seconds(1),
               CallExpectation{});
  r.WorkerCrashed(2, 0);
  EXPECT_TRUE(r.CheckInvariants(true).empty());
}

TEST(RecorderTest, RemoteCodesDeclaredAreAllowed) {
  Recorder r;
  CallExpectation e;
  e.if_lossless = absl::StatusCode::kAborted;
  e.remote_codes = {absl::StatusCode::kAborted};
  r.CallIssued(1, 0, 0, 1, t0, absl::ZeroDuration(), e);
  r.CallCompleted(1, t0 + absl::Hours(1), absl::AbortedError("planned"), "");
  EXPECT_TRUE(r.CheckInvariants(true).empty());
}

}  // namespace
}  // namespace tether::scenarios
