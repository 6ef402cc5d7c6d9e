// RRefCluster: a simulated cluster (sim::SimWorld) with an RRef context on
// every worker, a model of the call-dispatch layer, and the ghost ledger
// (rref_ledger.h) watching every context. Used by core/rref_context_test.cc and
// by the RRef scenarios of the explorer (rref_scenarios.h).
//
// The dispatch model: TEST_REMOTE_CALL runs a tiny function language (payload
// "v:TEXT" returns TEXT, "e:TEXT" fails with TEXT, "s:MS:TEXT" returns TEXT
// after MS virtual milliseconds); TEST_CALL carries RRef descriptors: the
// callee receives them, waits for every confirmation before "running the
// function", and then keeps the handles (if asked) in its held store, as a
// Python function would keep arguments alive.
//
// Single-threaded: everything runs on the caller's thread inside
// world().Run*().
#ifndef TETHER_TESTING_SCENARIOS_RREF_HARNESS_H_
#define TETHER_TESTING_SCENARIOS_RREF_HARNESS_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/rref_context.h"
#include "sim/sim_world.h"
#include "testing/scenarios/rref_ledger.h"

namespace tether::testing {

struct RRefClusterOptions {
  int num_workers = 4;
  uint64_t seed = 1;
  sim::FaultSpec faults;
  RRefPlantedBugs bugs;
  absl::Duration call_timeout = absl::Seconds(3);
  absl::Duration control_timeout = absl::Milliseconds(300);
  absl::Duration retry_max_backoff = absl::Milliseconds(400);
  absl::Duration child_query_delay = absl::Seconds(1);
  absl::Duration shutdown_timeout = absl::Seconds(30);
  // RRefContextOptions::first_local_id (the explorer's pinned traces were made with 1).
  uint64_t first_local_id = 1;
};

class RRefCluster {
 public:
  static absl::StatusOr<std::unique_ptr<RRefCluster>> Create(
      RRefClusterOptions options);
  ~RRefCluster();

  sim::SimWorld& world() { return *world_; }
  int size() const { return world_->size(); }
  RRefContext& ctx(WorkerId w) { return *contexts_[w]; }
  RRefLedger& ledger() { return ledger_; }
  bool alive(WorkerId w) const { return !world_->crashed(w); }

  // remote() from `from` to `owner` with a test function payload (see above).
  absl::StatusOr<RRefHandle> Remote(
      WorkerId from, WorkerId owner, std::string function,
      std::optional<absl::Duration> timeout = std::nullopt);
  // Sends `handles` (held by `from`) to `to` in a TEST_CALL. The reply is OK
  // once the callee has confirmed them all (and kept them if `keep`).
  Future<Message> Pass(WorkerId from, WorkerId to,
                       const std::vector<RRefHandle>& handles,
                       bool keep = true);
  // Handles that worker `w`'s "application" received and keeps.
  std::vector<RRefHandle>& held(WorkerId w) { return held_[w]; }

  // Crashes worker `w` now (its held handles are forgotten), optionally
  // restarting it at once.
  void Crash(WorkerId w, bool restart);

  // Every future the harness handed out or tracks; CheckFuturesDone() reports
  // those not done.
  void Track(Future<Message> f) { messages_.push_back(f); }
  void Track(Future<RRefValue> f) { values_.push_back(f); }
  std::vector<std::string> CheckFuturesDone() const;

  // Leak check for when every handle is dropped and the network has settled:
  // every live worker has no owner, user, pending child, pending control
  // message or received child.
  std::vector<std::string> CheckNoLeaks() const;
  // After graceful shutdown: every live worker's debug counters read zero.
  std::vector<std::string> CheckCountersZero() const;

  // Drops every handle held by the application on every worker.
  void DropAllHeld();
  // Shutdown(graceful) on every live worker (the barrier's join deletes the
  // user references, as in the product); runs the world until idle. Returns the
  // agents' shutdown results (live workers only).
  std::vector<absl::Status> ShutdownAll();

 private:
  explicit RRefCluster(RRefClusterOptions options)
      : options_(std::move(options)) {}
  void SetUpWorker(sim::SimWorld& world, WorkerId w, Agent& agent);

  RRefClusterOptions options_;
  RRefLedger ledger_;
  std::unique_ptr<sim::SimWorld> world_;
  std::vector<std::shared_ptr<RRefContext>> contexts_;
  std::vector<std::shared_ptr<RRefContext>> graveyard_;
  std::map<WorkerId, std::vector<RRefHandle>> held_;
  std::vector<Future<Message>> messages_;
  std::vector<Future<RRefValue>> values_;
};

// Encodes a TEST_CALL payload carrying descriptors (exposed for tests of bad
// input).
std::string EncodePass(const std::vector<RRefDescriptor>& descriptors,
                       bool keep);

}  // namespace tether::testing

#endif  // TETHER_TESTING_SCENARIOS_RREF_HARNESS_H_
