// Network: a transport as seen from one worker. The agent and the RRef context reach other
// workers only through it.
//
// Implementations: TCP (transport/tcp_network.h) for real runs, the simulated network
// (sim/sim_network.h) for simulations. Every implementation passes the conformance suite in
// testing/network_conformance.h.
//
// Contract:
// - Messages from one sender to one receiver are delivered in the order they were sent, unless
//   the network injects faults (only the simulator does).
// - Buffers are delivered as Buffers: never copied into the envelope.
// - A peer that closes, resets, crashes or stops answering is reported once through
//   NetworkObserver::OnPeerFailed; messages to it from then on may be lost.
#ifndef TETHER_CORE_NETWORK_H_
#define TETHER_CORE_NETWORK_H_

#include "absl/status/status.h"
#include "core/message.h"

namespace tether {

// Receives what the network delivers. Callbacks may run on any transport thread (the simulator's
// scheduler, a TCP event loop), never concurrently for the same sender, and must not block.
class NetworkObserver {
 public:
  virtual ~NetworkObserver() = default;

  // `message.envelope.from()` is set by the network to the authenticated sender.
  virtual void OnMessage(Message message) = 0;
  // `peer` is unreachable; `reason` is kUnavailable with a description.
  virtual void OnPeerFailed(WorkerId peer, const absl::Status& reason) = 0;
};

class Network {
 public:
  virtual ~Network() = default;

  virtual WorkerId self() const = 0;

  // Begins delivering to `observer`, which must stay valid until Stop() returns.
  virtual absl::Status Start(NetworkObserver* observer) = 0;

  // Queues `message` for worker `to` and returns without waiting for it to be written. Never
  // calls the observer inline. Sets `message.envelope.to()`; the network fills in the buffer
  // descriptors itself.
  // Returns kInvalidArgument for an unknown worker and kUnavailable for a peer already known to
  // have failed or a stopped network; later failures arrive as OnPeerFailed.
  virtual absl::Status Send(WorkerId to, Message message) = 0;

  // Flushes what was already queued (best effort, bounded), closes every connection and stops
  // delivering. No observer callback runs after Stop() returns. Idempotent.
  virtual void Stop() = 0;
};

}  // namespace tether

#endif  // TETHER_CORE_NETWORK_H_
