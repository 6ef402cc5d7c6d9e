// DistAutogradLedger: the simulator's ghost ledger for distributed autograd (design note
// docs/design/distributed_autograd.md §4.7). It is the DistAutogradObserver of every worker's
// DistAutograd (core/dist_autograd.h), is told of each worker incarnation's start (with its clock)
// and crash, keeps the true state of every (worker, context) and every pass, and records a
// violation when an oracle breaks:
//   1. at the end (every initiator exited its contexts and the network settled), every context a
//      live worker created or joined was released there (CheckEnd());
//   2. no join and no gradients run on a worker after its release of that context (online);
//   3. every Backward() is done by its deadline + kDeadlineTolerance on the initiator's clock
//      (online), and every pass that began on a live worker ended (CheckEnd());
//   4. each send function runs at most once per pass (online).
// Oracle 5 (debug counters at zero) and the exact-gradient oracle read the workers themselves
// (dist_autograd_harness.h, dist_autograd_scenarios.cc).
//
// A crash forgets the crashed incarnation's state: its successor starts over. Thread-safe; events
// arrive synchronously from the contexts (under their locks), so the ledger must not call back.
#ifndef TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_LEDGER_H_
#define TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_LEDGER_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/clock.h"
#include "core/dist_autograd.h"

namespace tether::testing {

class DistAutogradLedger : public DistAutogradObserver {
 public:
  void OnDistAutogradEvent(const DistAutogradEvent& event) override;
  // Worker `worker` starts incarnation `incarnation`; `clock` (not owned, outlives the ledger's
  // use) times its Backward() completions.
  void OnStart(WorkerId worker, uint64_t incarnation, Clock* clock);
  // Worker `worker`'s current incarnation crashed: its contexts and passes are gone.
  void OnCrash(WorkerId worker);

  // Violations found while events arrived (oracles 2, 3a, 4).
  std::vector<std::string> violations() const;
  // The end-of-run oracles (1 and 3b) for the workers in `settled` (alive, shut down cleanly).
  std::vector<std::string> CheckEnd(const std::set<WorkerId>& settled) const;

  // Counters, for tests and reports.
  int64_t backward_done() const;
  int64_t gradients_run() const;
  int64_t released() const;

 private:
  struct PassG {
    bool ended = false;
    bool initiator = false;
    std::set<AutogradMessageId> ran;
  };
  struct ContextG {
    bool created = false;
    std::set<WorkerId> joined_from;
    bool released = false;
    bool alive = false;  // created or joined, not released since
    std::map<int64_t, PassG> passes;
    std::map<int64_t, absl::Time> backward_deadlines;  // open Backward() calls, by pass id
  };
  struct WorkerG {
    uint64_t incarnation = 0;
    Clock* clock = nullptr;
    std::map<ContextId, ContextG> contexts;
  };

  void Violation(std::string text) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::map<WorkerId, WorkerG> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> violations_ ABSL_GUARDED_BY(mu_);
  int64_t backward_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t gradients_run_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t released_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tether::testing

#endif  // TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_LEDGER_H_
