#include "testing/scenarios/recorder.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tether::scenarios {
namespace {

std::string TokenName(Recorder::Token t) {
  return absl::StrCat("call ", t >> 44, ".", (t >> 32) & 0xfff, ".",
                      t & 0xffffffffULL);
}

std::string Code(absl::StatusCode c) { return absl::StatusCodeToString(c); }

bool Allowed(const absl::Status& s, const CallExpectation& e) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled:
      return true;
    default:
      for (absl::StatusCode c : e.remote_codes) {
        if (c == s.code()) return true;
      }
      return false;
  }
}

}  // namespace

void Recorder::CallIssued(Token token, WorkerId caller, uint64_t incarnation,
                          WorkerId callee, absl::Time issued,
                          absl::Duration timeout, CallExpectation expect) {
  absl::MutexLock lock(&mu_);
  Call& c = calls_[token];
  c.caller = caller;
  c.incarnation = incarnation;
  c.callee = callee;
  c.issued = issued;
  c.timeout = timeout;
  c.expect = std::move(expect);
}

void Recorder::CallCompleted(Token token, absl::Time completed,
                             const absl::Status& status,
                             const std::string& value) {
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(token);
  if (it == calls_.end()) {
    violations_.push_back(
        absl::StrCat(TokenName(token), " completed but was never issued"));
    return;
  }
  Call& c = it->second;
  if (++c.completions > 1) return;
  c.completed = true;
  c.completed_at = completed;
  c.status = status;
  c.value = value;
}

void Recorder::HandlerRan(Token token, WorkerId server) {
  absl::MutexLock lock(&mu_);
  ++handler_runs_[token];
  handler_server_[token] = server;
}

bool Recorder::ShutdownBegan(WorkerId worker, uint64_t incarnation,
                             bool graceful, bool expect_ok) {
  absl::MutexLock lock(&mu_);
  Shutdown& s = shutdowns_[{worker, incarnation}];
  if (s.began) return false;
  s.began = true;
  s.graceful = graceful;
  s.expect_ok = expect_ok;
  return true;
}

void Recorder::ShutdownDone(WorkerId worker, uint64_t incarnation,
                            const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  Shutdown& s = shutdowns_[{worker, incarnation}];
  if (s.done) {
    violations_.push_back(absl::StrCat("worker ", worker, " (incarnation ",
                                       incarnation,
                                       "): shutdown completed twice"));
    return;
  }
  s.done = true;
  s.status = status;
}

void Recorder::WorkerCrashed(WorkerId worker, uint64_t incarnation) {
  absl::MutexLock lock(&mu_);
  crashed_.insert({worker, incarnation});
}

void Recorder::WorkerStarted(WorkerId worker, uint64_t incarnation) {
  absl::MutexLock lock(&mu_);
  started_.insert({worker, incarnation});
}

void Recorder::Violation(std::string what) {
  absl::MutexLock lock(&mu_);
  violations_.push_back(std::move(what));
}

std::vector<std::string> Recorder::CheckInvariants(bool lossless) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> v = violations_;
  for (const auto& [token, c] : calls_) {
    const bool caller_crashed = crashed_.count({c.caller, c.incarnation}) > 0;
    const std::string who = absl::StrCat(TokenName(token), " from worker ",
                                         c.caller, " to ", c.callee);
    if (!c.completed) {
      if (!caller_crashed) {
        v.push_back(absl::StrCat("completion: ", who,
                                 " never completed (timeout ",
                                 absl::FormatDuration(c.timeout), ")"));
      }
      continue;
    }
    if (c.completions > 1) {
      v.push_back(absl::StrCat("completion: ", who, " completed ",
                               c.completions, " times"));
    }
    const absl::Duration took = c.completed_at - c.issued;
    if (c.timeout > absl::ZeroDuration()) {
      if (took > c.timeout + kDeadlineTolerance) {
        v.push_back(absl::StrCat(
            "completion: ", who, " completed ", absl::FormatDuration(took),
            " after issue with ", Code(c.status.code()),
            ", later than its timeout ", absl::FormatDuration(c.timeout),
            " + tolerance ", absl::FormatDuration(kDeadlineTolerance)));
      }
      if (c.status.code() == absl::StatusCode::kDeadlineExceeded &&
          took < c.timeout && !c.expect.forwards) {
        v.push_back(absl::StrCat("completion: ", who,
                                 " timed out early, after ",
                                 absl::FormatDuration(took), " of its ",
                                 absl::FormatDuration(c.timeout)));
      }
    }
    if (!Allowed(c.status, c.expect)) {
      v.push_back(absl::StrCat("status: ", who, " ended with unexpected ",
                               c.status.ToString()));
    } else if (lossless && c.expect.if_lossless &&
               c.status.code() != *c.expect.if_lossless) {
      v.push_back(absl::StrCat(
          "status: ", who, " should end ", Code(*c.expect.if_lossless),
          " when nothing is lost, but ended ", c.status.ToString()));
    }
    if (lossless && !c.status.ok() && c.expect.if_lossless &&
        c.status.code() == *c.expect.if_lossless &&
        !c.expect.error_mentions.empty()) {
      bool mentioned = false;
      for (const std::string& m : c.expect.error_mentions) {
        mentioned |= absl::StrContains(c.status.message(), m);
      }
      if (!mentioned) {
        v.push_back(absl::StrCat("clear error: ", who, " failed with '",
                                 c.status.message(), "', which names none of: ",
                                 absl::StrJoin(c.expect.error_mentions, ", ")));
      }
    }
    if (c.status.ok() && c.expect.value && c.value != *c.expect.value) {
      v.push_back(absl::StrCat("value: ", who, " returned '", c.value,
                               "' instead of '", *c.expect.value, "'"));
    }
  }
  for (const auto& [token, runs] : handler_runs_) {
    if (runs > 1) {
      v.push_back(absl::StrCat("at-most-once: the handler for ",
                               TokenName(token), " ran ", runs,
                               " times on worker ", handler_server_.at(token)));
    }
  }
  for (const Incarnation& w : started_) {
    if (crashed_.count(w)) continue;
    auto it = shutdowns_.find(w);
    const std::string who =
        absl::StrCat("worker ", w.first, " (incarnation ", w.second, ")");
    if (it == shutdowns_.end() || !it->second.began) {
      v.push_back(
          absl::StrCat("shutdown: ", who, " never began shutting down"));
    } else if (!it->second.done) {
      v.push_back(absl::StrCat("shutdown: ", who, "'s ",
                               it->second.graceful ? "graceful" : "ungraceful",
                               " shutdown never completed"));
    } else if (lossless && it->second.expect_ok && !it->second.status.ok()) {
      v.push_back(absl::StrCat("shutdown: ", who,
                               " should shut down cleanly when nothing is "
                               "lost, but got ",
                               it->second.status.ToString()));
    }
  }
  return v;
}

int64_t Recorder::calls() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(calls_.size());
}

int64_t Recorder::calls_ok() const {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (const auto& [t, c] : calls_) n += c.completed && c.status.ok() ? 1 : 0;
  return n;
}

int64_t Recorder::handler_runs() const {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (const auto& [t, r] : handler_runs_) n += r;
  return n;
}

}  // namespace tether::scenarios
