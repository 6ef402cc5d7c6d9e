// SimFabric and SimNetwork: the simulated network. SimFabric is the wire shared
// by all workers of one simulation; SimNetwork is one worker incarnation's
// endpoint (core/network.h).
//
// Behaviour without faults: each (sender, receiver) pair is a FIFO channel with
// a latency drawn from the plan's delay distribution; delivery is a kDelivery
// event owned by both sender and receiver, run by the Scheduler, which calls
// the receiver's observer. Send() never calls an observer inline.
//
// Faults (from a FaultPlan, see fault_spec.h), all drawn from the fabric's own
// Prng stream: drop, duplicate, reorder (a message leaves its FIFO channel with
// an extra delay), partitions (messages crossing one are silently lost), faults
// aimed at one message type, and crashes:
// - Crash(w): the worker's queued tasks, timers and in-flight messages to and from it vanish
//   (Scheduler::PurgeDomain); every other running endpoint is told OnPeerFailed(w) after a latency.
//   The crashed endpoint never calls its observer again and its Send() fails.
// - A restarted worker gets a new endpoint (CreateEndpoint) with the next incarnation. A peer keeps
//   addressing the incarnation it knows until it has been told of the failure: messages it sends
//   meanwhile are refused (lost, and the sender is told OnPeerFailed). Once told, its next Send()
//   connects to the new incarnation, like a new TCP connection.
// - Sending to a stopped or crashed worker reports OnPeerFailed to the sender asynchronously (like
//   a TCP reset), once per peer incarnation.
// - Stop() flushes: messages already sent are still delivered; then each peer is told OnPeerFailed
//   (the close travels behind the data in the FIFO channel, like a TCP FIN).
//
// Messages to oneself go through a FIFO channel too, without faults.
//
// Not thread-safe: use only on the scheduler's thread (see scheduler.h).
// Observer callbacks run there, from Scheduler::Run*().
#ifndef TETHER_SIM_SIM_NETWORK_H_
#define TETHER_SIM_SIM_NETWORK_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/message.h"
#include "core/network.h"
#include "sim/fault_spec.h"
#include "sim/random.h"
#include "sim/scheduler.h"

namespace tether::sim {

class SimNetwork;

struct SimNetworkStats {
  uint64_t sent = 0;           // Send() calls accepted
  uint64_t delivered = 0;      // OnMessage calls
  uint64_t dropped = 0;        // lost to drop faults
  uint64_t partitioned = 0;    // lost to partitions
  uint64_t duplicated = 0;     // extra copies sent
  uint64_t reordered = 0;      // messages taken out of FIFO order
  uint64_t refused = 0;        // addressed to a stopped, crashed or replaced incarnation
  uint64_t vanished = 0;       // in flight when an end crashed
  uint64_t peer_failures = 0;  // OnPeerFailed calls
};

// A 64-bit digest of a message's envelope fields and payload, for trace hashes.
// Stable across processes and runs.
uint64_t MessageDigest(const Message& message);

class SimFabric {
 public:
  // `seed` seeds the fabric's own fault stream. `plan` is usually
  // ResolveFaults(...)'s result.
  SimFabric(Scheduler* scheduler, int num_workers, FaultPlan plan, uint64_t seed);
  ~SimFabric();
  SimFabric(const SimFabric&) = delete;
  SimFabric& operator=(const SimFabric&) = delete;

  // The endpoint of `worker`'s next incarnation (0 first, then one more after
  // each crash). Requires that the worker has no endpoint or that its current
  // one crashed.
  std::unique_ptr<SimNetwork> CreateEndpoint(WorkerId worker);

  // Crashes `worker`'s current incarnation (see above). Also purges its
  // scheduler domain.
  void Crash(WorkerId worker);

  int num_workers() const { return num_workers_; }
  // The incarnation of `worker`'s current endpoint (-1 before its first one).
  int64_t incarnation(WorkerId worker) const { return incarnations_[worker]; }
  bool crashed(WorkerId worker) const;
  const FaultPlan& plan() const { return plan_; }
  const SimNetworkStats& stats() const { return stats_; }

 private:
  friend class SimNetwork;
  struct InFlight {
    bool close = false;  // a stop notice instead of a message
    uint64_t to_incarnation = 0;
    Message message;
  };
  struct Channel {
    std::deque<InFlight> queue;
    absl::Time last_due = absl::InfinitePast();
  };

  absl::Status Send(SimNetwork* from, WorkerId to, Message message);
  void OnStopped(SimNetwork* endpoint);
  void OnDestroyed(SimNetwork* endpoint);
  void Enqueue(WorkerId from, WorkerId to, InFlight item, absl::Duration delay, bool fifo,
               uint64_t digest);
  void Deliver(WorkerId from, WorkerId to, InFlight item);
  // Tells `worker`'s current endpoint, after a latency, that `peer` failed
  // (once per peer incarnation).
  void ScheduleFailure(WorkerId worker, WorkerId peer, std::string reason);
  void NotifyFailure(SimNetwork* endpoint, WorkerId peer, const std::string& reason);
  SimNetwork* Running(WorkerId worker) const;
  Channel& channel(WorkerId from, WorkerId to) { return channels_[from * num_workers_ + to]; }

  Scheduler* const scheduler_;
  const int num_workers_;
  const FaultPlan plan_;
  Prng rng_;
  std::vector<SimNetwork*> endpoints_;  // current incarnation per worker (not owned)
  std::vector<SimNetwork*> retired_;    // earlier incarnations still alive (not owned)
  std::vector<int64_t> incarnations_;
  std::vector<Channel> channels_;
  SimNetworkStats stats_;
};

class SimNetwork : public Network {
 public:
  ~SimNetwork() override;

  WorkerId self() const override { return self_; }
  absl::Status Start(NetworkObserver* observer) override;
  absl::Status Send(WorkerId to, Message message) override;
  void Stop() override;

  uint64_t incarnation() const { return incarnation_; }
  bool running() const { return state_ == State::kRunning; }
  bool crashed() const { return state_ == State::kCrashed; }

 private:
  friend class SimFabric;
  enum class State { kNew, kRunning, kStopped, kCrashed };
  struct PeerView {
    uint64_t incarnation = 0;      // the peer incarnation this endpoint addresses
    bool failure_pending = false;  // a failure notice is scheduled or was delivered
    bool failure_known = false;    // OnPeerFailed was called for `incarnation`
  };

  SimNetwork(SimFabric* fabric, WorkerId self, uint64_t incarnation);

  SimFabric* fabric_;  // null once the fabric is gone
  const WorkerId self_;
  const uint64_t incarnation_;
  State state_ = State::kNew;
  NetworkObserver* observer_ = nullptr;
  std::vector<PeerView> peers_;
};

}  // namespace tether::sim

#endif  // TETHER_SIM_SIM_NETWORK_H_
