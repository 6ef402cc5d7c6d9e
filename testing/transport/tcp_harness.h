// The conformance suite's harness over TCP: n TcpNetworks on loopback, each
// told the others' addresses, optionally polled by thread pools or
// authenticated (tweak the options), one SystemClock for all, progress by
// polling with real sleeps.
#ifndef TETHER_TESTING_TRANSPORT_TCP_HARNESS_H_
#define TETHER_TESTING_TRANSPORT_TCP_HARNESS_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "testing/network_conformance.h"
#include "transport/system_clock.h"
#include "transport/tcp_network.h"
#include "transport/thread_pool.h"

namespace tether::testing {

class TcpHarness : public NetworkHarness {
 public:
  explicit TcpHarness(int n, const std::function<void(TcpNetworkOptions&)>& tweak = nullptr,
                      bool pooled = false) {
    for (int i = 0; i < n; ++i) {
      TcpNetworkOptions o;
      o.self = i;
      if (pooled) {
        pools_.push_back(std::make_unique<ThreadPool>(2));
        o.poll_with = pools_.back().get();
      }
      o.stop_flush_timeout = absl::Seconds(2);
      if (tweak) tweak(o);
      nets_.push_back(TcpNetwork::Listen(o).value());
    }
    for (int i = 0; i < n; ++i) {
      std::map<WorkerId, std::string> peers;
      for (int j = 0; j < n; ++j) {
        if (j != i) peers[j] = nets_[j]->listen_address();
      }
      EXPECT_TRUE(nets_[i]->SetPeers(peers).ok());
    }
  }
  int size() const override { return static_cast<int>(nets_.size()); }
  Network* network(WorkerId id) override { return nets_[id].get(); }
  TcpNetwork* tcp(WorkerId id) { return nets_[id].get(); }
  bool RunUntil(const std::function<bool()>& done, absl::Duration timeout) override {
    absl::Time deadline = absl::Now() + timeout;
    while (!done()) {
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(1));
    }
    return true;
  }
  void Crash(WorkerId id) override { nets_[id]->Abort(); }
  Clock* clock(WorkerId) override { return &clock_; }

 private:
  SystemClock clock_;                               // Outlives the networks.
  std::vector<std::unique_ptr<ThreadPool>> pools_;  // Outlive the networks.
  std::vector<std::unique_ptr<TcpNetwork>> nets_;
};

// Plain TCP, each network's loop run by a thread pool, and HMAC-authenticated.
inline NetworkFactory TcpNetworkFactory() {
  return NetworkFactory{"tcp", [](int n) -> std::unique_ptr<NetworkHarness> {
                          return std::make_unique<TcpHarness>(n);
                        }};
}
inline NetworkFactory PooledTcpNetworkFactory() {
  return NetworkFactory{"tcp_pooled", [](int n) -> std::unique_ptr<NetworkHarness> {
                          return std::make_unique<TcpHarness>(n, nullptr, /*pooled=*/true);
                        }};
}
inline NetworkFactory AuthenticatedTcpNetworkFactory() {
  return NetworkFactory{"tcp_authenticated", [](int n) -> std::unique_ptr<NetworkHarness> {
                          return std::make_unique<TcpHarness>(
                              n, [](TcpNetworkOptions& o) { o.auth_token = "s3cret"; });
                        }};
}

}  // namespace tether::testing

#endif  // TETHER_TESTING_TRANSPORT_TCP_HARNESS_H_
