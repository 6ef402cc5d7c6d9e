// FaultyNetwork: injects faults into a real run, like PyTorch's faulty RPC
// agent. It wraps any Network and, for the message types it is told about,
// fails the first N sends or delays every send by a fixed time. Everything else
// passes straight through.
//
//   FaultyNetworkOptions o;
//   o.fail_types = {wire::RREF_USER_DELETE};
//   o.num_fail_sends = 2;                                   // the first two such sends fail
//   o.delays[wire::PYTHON_REMOTE_CALL] = absl::Milliseconds(500);
//   FaultyNetwork faulty(&tcp, &clock, o);                  // give `faulty` to the agent
//
// A failed send returns kUnavailable naming the injected fault. A delayed
// message is sent from the clock's timer thread when its delay ends, so it may
// overtake later messages of other types (as a slow link would); messages of
// one delayed type to one peer keep their order. A Send to a peer already reported failed
// returns kUnavailable at once, delayed or not; an error the inner network
// gives a delayed message when it is finally sent (an unknown worker included)
// is lost like one on the wire. Stop() drops delayed messages not yet sent.
//
// Lifetime: the delayed sends go through a CallbackGate. Stop() waits for one
// that is running on another thread, and those that start later do nothing,
// so once Stop() returns no delayed send touches this object or `inner` and
// the object may be destroyed while the clock still holds a timer it could not
// cancel (Clock::Cancel does not wait for one already running). Thread-safe;
// `inner` and `clock` must outlive this object.
#ifndef TETHER_TRANSPORT_FAULTY_FAULTY_NETWORK_H_
#define TETHER_TRANSPORT_FAULTY_FAULTY_NETWORK_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/callback_gate.h"
#include "core/clock.h"
#include "core/network.h"

namespace tether {

struct FaultyNetworkOptions {
  std::set<MessageType> fail_types;
  int num_fail_sends = 0;
  std::map<MessageType, absl::Duration> delays;

  bool empty() const { return (fail_types.empty() || num_fail_sends <= 0) && delays.empty(); }
  // Builds options from message type names ("PYTHON_CALL"); kInvalidArgument
  // naming an unknown type, a negative count or a negative delay.
  static absl::StatusOr<FaultyNetworkOptions> FromNames(
      const std::vector<std::string>& fail_types, int num_fail_sends,
      const std::map<std::string, double>& delay_seconds);
};

class FaultyNetwork : public Network {
 public:
  FaultyNetwork(Network* inner, Clock* clock, FaultyNetworkOptions options);
  ~FaultyNetwork() override;

  WorkerId self() const override { return inner_->self(); }
  absl::Status Start(NetworkObserver* observer) override;
  absl::Status Send(WorkerId to, Message message) override;
  void Stop() override;

  // Sends failed on purpose so far, per type.
  std::map<MessageType, int> failed() const;

 private:
  // Between the inner network and the observer: notes the failed peers (for Send), forwards all.
  class Relay : public NetworkObserver {
   public:
    explicit Relay(FaultyNetwork* owner) : owner_(owner) {}
    void OnMessage(Message message) override;
    void OnPeerFailed(WorkerId peer, const absl::Status& reason) override;

   private:
    FaultyNetwork* const owner_;
  };
  struct Delayed {
    uint64_t seq;
    Message message;
  };

  // A delayed send's timer (`*timer`) for message `seq` fired: sends it, after those of its type
  // to `to` queued before it.
  void SendDelayed(WorkerId to, MessageType type, uint64_t seq,
                   const std::shared_ptr<const TimerId>& timer);

  Network* const inner_;
  Clock* const clock_;
  const FaultyNetworkOptions options_;
  // The delayed sends' gate: closed by Stop().
  const std::shared_ptr<CallbackGate> gate_ = std::make_shared<CallbackGate>();
  Relay relay_{this};
  NetworkObserver* observer_ = nullptr;  // Set by Start(), before any delivery.
  mutable absl::Mutex mu_;
  std::map<MessageType, int> failed_ ABSL_GUARDED_BY(mu_);
  // The delayed sends' timers not yet run, and their messages in send order per peer and type.
  std::set<TimerId> delayed_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<WorkerId, MessageType>, std::deque<Delayed>> queues_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::set<WorkerId> failed_peers_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_FAULTY_FAULTY_NETWORK_H_
