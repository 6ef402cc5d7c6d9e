// Recorder: what a scenario run did, kept for the invariant checks that follow
// it. Scenarios record every client call they make (issue, deadline, what they
// expect, completion), every handler run, every shutdown, and every crash;
// CheckInvariants() then reports violations of the invariants every run must
// hold (see below) in plain words.
//
// Times are those of the caller's own Clock (virtual in the simulator, real
// over TCP). Thread-safe: handlers and callbacks of any worker may record
// concurrently.
//
// Invariants checked (beyond each scenario's own checks):
//  - completion: every call made by a worker incarnation that did not crash completes; one with a
//    deadline completes no later than deadline + kDeadlineTolerance, and a timeout is never
//    reported before the deadline;
//  - status: a call ends OK, with kDeadlineExceeded, kUnavailable, kCancelled, or a remote error
//    code the scenario declared; when the faults cannot lose messages it ends exactly as the
//    scenario expected (e.g. no reply lost by a graceful shutdown);
//  - values: an OK reply carries the value the scenario expected;
//  - at most once: no handler runs twice for one request;
//  - shutdown: every live worker incarnation shut down, and its shutdown completed (OK when the
//    scenario expected so and nothing could be lost).
#ifndef TETHER_TESTING_SCENARIOS_RECORDER_H_
#define TETHER_TESTING_SCENARIOS_RECORDER_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/message.h"

namespace tether::scenarios {

// How late after its deadline a call may complete. The simulator completes
// calls exactly at their deadline (executor tasks take no virtual time); the
// margin is for real runs.
inline constexpr absl::Duration kDeadlineTolerance = absl::Milliseconds(1);

// What a scenario expects of one call.
struct CallExpectation {
  // The final status code when the faults cannot lose anything; nullopt:
  // anything allowed.
  std::optional<absl::StatusCode> if_lossless = absl::StatusCode::kOk;
  // Remote error codes the scenario's handlers may produce (allowed in addition
  // to OK, kDeadlineExceeded, kUnavailable and kCancelled).
  std::vector<absl::StatusCode> remote_codes;
  // The reply payload an OK call must carry; nullopt: not checked.
  std::optional<std::string> value;
  // The handler forwards to other workers, so a kDeadlineExceeded may come back
  // from one of them, earlier than this call's own deadline (their clocks may
  // run fast): the "timed out early" check is skipped.
  bool forwards = false;
  // When the call ends with `if_lossless`'s error code (and nothing could be
  // lost), its message must contain one of these (e.g. the failed worker's
  // name): a clear error.
  std::vector<std::string> error_mentions;
};

class Recorder {
 public:
  using Token = uint64_t;
  // A call token is unique in a run: caller, caller incarnation and a
  // per-incarnation counter.
  static Token MakeToken(WorkerId caller, uint64_t incarnation, uint32_t seq) {
    return (static_cast<uint64_t>(caller) << 44) | ((incarnation & 0xfff) << 32) | seq;
  }

  void CallIssued(Token token, WorkerId caller, uint64_t incarnation, WorkerId callee,
                  absl::Time issued, absl::Duration timeout, CallExpectation expect);
  void CallCompleted(Token token, absl::Time completed, const absl::Status& status,
                     const std::string& value);
  void HandlerRan(Token token, WorkerId server);

  // Returns false if this incarnation's shutdown was already recorded.
  bool ShutdownBegan(WorkerId worker, uint64_t incarnation, bool graceful, bool expect_ok);
  void ShutdownDone(WorkerId worker, uint64_t incarnation, const absl::Status& status);
  void WorkerCrashed(WorkerId worker, uint64_t incarnation);
  // Declares that worker incarnation exists (it must shut down unless it
  // crashes).
  void WorkerStarted(WorkerId worker, uint64_t incarnation);

  // A scenario-specific violation.
  void Violation(std::string what);

  // Every violated invariant, each a line; empty when the run was correct.
  // `lossless`: the faults could not lose messages or workers.
  std::vector<std::string> CheckInvariants(bool lossless) const;

  // Counts, for reports.
  int64_t calls() const;
  int64_t calls_ok() const;
  int64_t handler_runs() const;

 private:
  struct Call {
    WorkerId caller = -1;
    uint64_t incarnation = 0;
    WorkerId callee = -1;
    absl::Time issued;
    absl::Duration timeout;
    CallExpectation expect;
    bool completed = false;
    absl::Time completed_at;
    absl::Status status;
    std::string value;
    int completions = 0;
  };
  struct Shutdown {
    bool began = false;
    bool graceful = false;
    bool expect_ok = false;
    bool done = false;
    absl::Status status;
  };
  using Incarnation = std::pair<WorkerId, uint64_t>;

  mutable absl::Mutex mu_;
  std::map<Token, Call> calls_ ABSL_GUARDED_BY(mu_);
  std::map<Token, int> handler_runs_ ABSL_GUARDED_BY(mu_);
  std::map<Token, WorkerId> handler_server_ ABSL_GUARDED_BY(mu_);
  std::map<Incarnation, Shutdown> shutdowns_ ABSL_GUARDED_BY(mu_);
  std::set<Incarnation> started_ ABSL_GUARDED_BY(mu_);
  std::set<Incarnation> crashed_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> violations_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tether::scenarios

#endif  // TETHER_TESTING_SCENARIOS_RECORDER_H_
