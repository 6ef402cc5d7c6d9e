// RRefLedger: the simulator's ghost ledger for remote references. It sees every
// RRefEvent of every worker's RRef context (as their shared RRefObserver) plus
// the simulator's crashes, keeps the true global state of every reference, user
// fork and pending child, and records a violation whenever an invariant of the
// RRef protocol breaks:
// - no owner value is freed while a live user fork or a pending child can still reach it (unless
//   the owner had declared a worker involved with that reference failed);
// - nothing is served after its value was freed (no use after free), and a freed value never comes
//   back (no resurrection by late or duplicated messages);
// - the function of a remote() runs at most once per reference.
// The end-of-run checks (no leak once every handle is dropped and the network
// settled, zero counters after graceful shutdown) read the contexts themselves
// (rref_harness.h).
//
// Thread-safe; events arrive synchronously from the contexts (under their
// locks).
#ifndef TETHER_TESTING_SCENARIOS_RREF_LEDGER_H_
#define TETHER_TESTING_SCENARIOS_RREF_LEDGER_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "core/rref_context.h"

namespace tether::testing {

class RRefLedger : public RRefObserver {
 public:
  void OnRRefEvent(const RRefEvent& event) override;
  // Worker `worker`'s current incarnation crashed: its users and children are
  // gone.
  void OnCrash(WorkerId worker);

  std::vector<std::string> violations() const {
    absl::MutexLock lock(&mu_);
    return violations_;
  }
  // Counters for tests.
  int64_t function_runs(const RRefId& rref) const;
  int64_t frees() const {
    absl::MutexLock lock(&mu_);
    return frees_;
  }

 private:
  struct UserG {
    RRefId rref;
    WorkerId worker = -1;
    WorkerId parent = -1;
    bool alive = true;
  };
  struct ChildG {
    RRefId rref;
    WorkerId parent = -1;
    WorkerId child = -1;
    bool open = true;
  };
  struct OwnerG {
    WorkerId owner = -1;
    bool freed = false;
    bool owner_crashed = false;
    int64_t runs = 0;
  };

  void Violation(std::string text) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckFree(WorkerId owner, const RRefId& rref) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  mutable absl::Mutex mu_;

  std::map<ForkId, UserG> users_;
  std::map<ForkId, ChildG> children_;
  std::map<RRefId, OwnerG> owners_;
  std::map<RRefId, std::set<WorkerId>> involved_;
  std::map<WorkerId, std::set<WorkerId>> declared_failed_;
  std::set<WorkerId> declared_by_anyone_;
  std::vector<std::string> violations_;
  int64_t frees_ = 0;
};

}  // namespace tether::testing

#endif  // TETHER_TESTING_SCENARIOS_RREF_LEDGER_H_
