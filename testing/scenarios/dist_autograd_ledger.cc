#include "testing/scenarios/dist_autograd_ledger.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "testing/scenarios/recorder.h"

namespace tether::testing {

void DistAutogradLedger::Violation(std::string text) {
  // Keep the report short: the first few violations tell the story.
  if (violations_.size() < 20) violations_.push_back(std::move(text));
}

void DistAutogradLedger::OnStart(WorkerId worker, uint64_t incarnation, Clock* clock) {
  absl::MutexLock lock(&mu_);
  WorkerG& w = workers_[worker];
  w = WorkerG{};
  w.incarnation = incarnation;
  w.clock = clock;
}

void DistAutogradLedger::OnCrash(WorkerId worker) {
  absl::MutexLock lock(&mu_);
  workers_.erase(worker);
}

std::vector<std::string> DistAutogradLedger::violations() const {
  absl::MutexLock lock(&mu_);
  return violations_;
}

int64_t DistAutogradLedger::backward_done() const {
  absl::MutexLock lock(&mu_);
  return backward_done_;
}

int64_t DistAutogradLedger::gradients_run() const {
  absl::MutexLock lock(&mu_);
  return gradients_run_;
}

int64_t DistAutogradLedger::released() const {
  absl::MutexLock lock(&mu_);
  return released_;
}

void DistAutogradLedger::OnDistAutogradEvent(const DistAutogradEvent& e) {
  absl::MutexLock lock(&mu_);
  auto wit = workers_.find(e.worker);
  if (wit == workers_.end()) return;  // an incarnation the ledger was not told of (or crashed)
  WorkerG& w = wit->second;
  if (e.kind == DistAutogradEvent::kPeerFailed) return;
  ContextG& c = w.contexts[e.context];
  switch (e.kind) {
    case DistAutogradEvent::kCreated:
      c.created = true;
      c.alive = true;
      break;
    case DistAutogradEvent::kJoined:
      if (c.released) {
        Violation(absl::StrCat("worker ", e.worker, " joined autograd context ", e.context,
                               " (from worker ", e.peer, ") after it released it"));
      }
      c.joined_from.insert(e.peer);
      c.alive = true;
      break;
    case DistAutogradEvent::kGradientsRun: {
      ++gradients_run_;
      if (c.released) {
        Violation(absl::StrCat("gradients for send function ", e.message, " ran on worker ",
                               e.worker, " in autograd context ", e.context,
                               " after it released it"));
      }
      PassG& p = c.passes[e.pass_id];
      if (!p.ran.insert(e.message).second) {
        Violation(absl::StrCat("send function ", e.message, " ran twice in pass ", e.pass_id,
                               " of autograd context ", e.context, " on worker ", e.worker));
      }
      break;
    }
    case DistAutogradEvent::kPassBegun: {
      PassG& p = c.passes[e.pass_id];
      p.initiator = e.peer < 0;
      break;
    }
    case DistAutogradEvent::kPassEnded:
      c.passes[e.pass_id].ended = true;
      break;
    case DistAutogradEvent::kReleased:
      ++released_;
      c.released = true;
      c.alive = false;
      break;
    case DistAutogradEvent::kBackwardStarted:
      c.backward_deadlines[e.pass_id] = e.deadline;
      break;
    case DistAutogradEvent::kBackwardDone: {
      ++backward_done_;
      auto it = c.backward_deadlines.find(e.pass_id);
      if (it == c.backward_deadlines.end()) {
        Violation(absl::StrCat("Backward() of pass ", e.pass_id, " of autograd context ",
                               e.context, " on worker ", e.worker,
                               " completed without having started (or twice)"));
        break;
      }
      const absl::Time deadline = it->second;
      c.backward_deadlines.erase(it);
      if (w.clock != nullptr && deadline != absl::InfiniteFuture()) {
        const absl::Time now = w.clock->Now();
        if (now > deadline + scenarios::kDeadlineTolerance) {
          Violation(absl::StrCat("Backward() of autograd context ", e.context, " on worker ",
                                 e.worker, " completed ", absl::FormatDuration(now - deadline),
                                 " after its deadline (", e.status.ToString(), ")"));
        }
      }
      break;
    }
    case DistAutogradEvent::kKnown:
    case DistAutogradEvent::kSendRecorded:
    case DistAutogradEvent::kRecvRecorded:
    case DistAutogradEvent::kGradientsSent:
    case DistAutogradEvent::kReleaseSent:
    case DistAutogradEvent::kReleaseAcked:
    case DistAutogradEvent::kPeerFailed:
      break;
  }
}

std::vector<std::string> DistAutogradLedger::CheckEnd(const std::set<WorkerId>& settled) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  auto add = [&out](std::string text) {
    if (out.size() < 20) out.push_back(std::move(text));
  };
  for (const auto& [id, w] : workers_) {
    if (settled.count(id) == 0) continue;
    for (const auto& [ctx, c] : w.contexts) {
      if (c.alive) {
        std::vector<WorkerId> from(c.joined_from.begin(), c.joined_from.end());
        add(absl::StrCat("autograd context ", ctx, " was never released on worker ", id,
                         c.created ? " (its creator)" : "", from.empty() ? "" : " (joined from ",
                         absl::StrJoin(from, ","), from.empty() ? "" : ")"));
      }
      for (const auto& [pass, p] : c.passes) {
        if (!p.ended) {
          add(absl::StrCat("pass ", pass, " of autograd context ", ctx, " on worker ", id,
                           p.initiator ? " (initiator)" : "", " never ended"));
        }
      }
      for (const auto& [pass, deadline] : c.backward_deadlines) {
        add(absl::StrCat("Backward() of pass ", pass, " of autograd context ", ctx,
                         " on worker ", id, " never completed"));
      }
    }
  }
  return out;
}

}  // namespace tether::testing
