#include "testing/scenarios/rref_ledger.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace tether::testing {

void RRefLedger::Violation(std::string text) {
  // Keep the report short: the first few violations tell the story.
  if (violations_.size() < 20) violations_.push_back(std::move(text));
}

int64_t RRefLedger::function_runs(const RRefId& rref) const {
  absl::MutexLock lock(&mu_);
  auto it = owners_.find(rref);
  return it == owners_.end() ? 0 : it->second.runs;
}

void RRefLedger::OnCrash(WorkerId worker) {
  absl::MutexLock lock(&mu_);
  for (auto& [fork, user] : users_) {
    if (user.worker == worker) user.alive = false;
  }
  for (auto& [fork, child] : children_) {
    if (child.parent == worker || child.child == worker) child.open = false;
  }
  for (auto& [rref, owner] : owners_) {
    if (owner.owner == worker) owner.owner_crashed = true;
  }
  // Whatever the crashed incarnation had declared no longer matters; its
  // successor starts over.
  declared_failed_.erase(worker);
}

void RRefLedger::CheckFree(WorkerId owner, const RRefId& rref) {
  const std::set<WorkerId>& involved = involved_[rref];
  const std::set<WorkerId>& failed = declared_failed_[owner];
  for (WorkerId w : involved) {
    if (failed.count(w) > 0)
      return;  // the owner released what that worker held
  }
  auto gone = [this](WorkerId w) { return declared_by_anyone_.count(w) > 0; };
  for (const auto& [fork, user] : users_) {
    // A user on (or hanging from) a worker someone declared failed was released
    // by that news.
    if (user.rref == rref && user.alive && !gone(user.worker) &&
        !gone(user.parent)) {
      Violation(absl::StrCat("RRef ", rref.ToString(), " freed on worker ",
                             owner, " while user fork ", fork.ToString(),
                             " on worker ", user.worker, " (parent ",
                             user.parent, ") can still reach it"));
    }
  }
  for (const auto& [fork, child] : children_) {
    if (child.rref == rref && child.open && !gone(child.parent) &&
        !gone(child.child)) {
      Violation(absl::StrCat("RRef ", rref.ToString(), " freed on worker ",
                             owner, " while child fork ", fork.ToString(),
                             " (worker ", child.parent, " -> worker ",
                             child.child, ") is pending"));
    }
  }
}

void RRefLedger::OnRRefEvent(const RRefEvent& e) {
  absl::MutexLock lock(&mu_);
  switch (e.kind) {
    case RRefEvent::kOwnerCreated:
    case RRefEvent::kValueSet:
    case RRefEvent::kForkAdded: {
      OwnerG& o = owners_[e.rref];
      o.owner = e.worker;
      if (o.freed) {
        Violation(absl::StrCat(
            "RRef ", e.rref.ToString(), " came back on worker ", e.worker,
            " after it was freed (event ", static_cast<int>(e.kind), ")"));
      }
      if (e.kind == RRefEvent::kForkAdded) involved_[e.rref].insert(e.peer);
      break;
    }
    case RRefEvent::kFunctionRun: {
      OwnerG& o = owners_[e.rref];
      o.owner = e.worker;
      if (++o.runs > 1) {
        Violation(absl::StrCat("remote() function of RRef ", e.rref.ToString(),
                               " ran ", o.runs, " times on worker ", e.worker));
      }
      break;
    }
    case RRefEvent::kOwnerFreed: {
      OwnerG& o = owners_[e.rref];
      o.owner = e.worker;
      ++frees_;
      if (o.freed) {
        Violation(absl::StrCat("RRef ", e.rref.ToString(),
                               " freed twice on worker ", e.worker));
      }
      o.freed = true;
      CheckFree(e.worker, e.rref);
      break;
    }
    case RRefEvent::kValueServed: {
      auto it = owners_.find(e.rref);
      if (it != owners_.end() && it->second.freed) {
        Violation(absl::StrCat("RRef ", e.rref.ToString(), " served on worker ",
                               e.worker, " after it was freed"));
      }
      break;
    }
    case RRefEvent::kForkRemoved:
      break;
    case RRefEvent::kUserCreated: {
      UserG& u = users_[e.fork];
      u.rref = e.rref;
      u.worker = e.worker;
      u.parent = e.peer;
      u.alive = true;
      involved_[e.rref].insert(e.worker);
      involved_[e.rref].insert(e.peer);
      // The child now exists as a user; from here its user record is what
      // reaches the value.
      auto child = children_.find(e.fork);
      if (child != children_.end()) child->second.open = false;
      break;
    }
    case RRefEvent::kUserConfirmed:
      break;
    case RRefEvent::kUserDeleteSent:
    case RRefEvent::kUserReleased: {
      auto it = users_.find(e.fork);
      if (it != users_.end()) it->second.alive = false;
      break;
    }
    case RRefEvent::kChildPending: {
      ChildG& c = children_[e.fork];
      c.rref = e.rref;
      c.parent = e.worker;
      c.child = e.peer;
      c.open = true;
      involved_[e.rref].insert(e.worker);
      involved_[e.rref].insert(e.peer);
      break;
    }
    case RRefEvent::kChildResolved: {
      auto it = children_.find(e.fork);
      if (it != children_.end()) it->second.open = false;
      break;
    }
    case RRefEvent::kPeerFailed:
      declared_failed_[e.worker].insert(e.peer);
      declared_by_anyone_.insert(e.peer);
      break;
  }
}

}  // namespace tether::testing
