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
// overtake later messages (as a slow link would). Stop() drops delayed messages
// not yet sent. Thread-safe; `inner` and `clock` must outlive this object.
#ifndef TETHER_TRANSPORT_FAULTY_FAULTY_NETWORK_H_
#define TETHER_TRANSPORT_FAULTY_FAULTY_NETWORK_H_

#include <map>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
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
  absl::Status Start(NetworkObserver* observer) override { return inner_->Start(observer); }
  absl::Status Send(WorkerId to, Message message) override;
  void Stop() override;

  // Sends failed on purpose so far, per type.
  std::map<MessageType, int> failed() const;

 private:
  Network* const inner_;
  Clock* const clock_;
  const FaultyNetworkOptions options_;
  mutable absl::Mutex mu_;
  std::map<MessageType, int> failed_ ABSL_GUARDED_BY(mu_);
  std::set<TimerId> delayed_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_FAULTY_FAULTY_NETWORK_H_
