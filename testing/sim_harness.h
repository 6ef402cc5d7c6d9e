// The conformance suite's harness over the simulated network, without faults
// (ordering and reliability are part of the Network contract only then): n
// endpoints of one SimFabric, a SimClock per worker, progress by running the
// scheduler in virtual time.
//
//   INSTANTIATE_TEST_SUITE_P(Sim, NetworkConformanceTest, ::testing::Values(SimNetworkFactory()),
//                            NetworkFactoryName);
#ifndef TETHER_TESTING_SIM_HARNESS_H_
#define TETHER_TESTING_SIM_HARNESS_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "sim/fault_spec.h"
#include "sim/scheduler.h"
#include "sim/sim_clock.h"
#include "sim/sim_network.h"
#include "testing/network_conformance.h"

namespace tether::testing {

class SimHarness : public NetworkHarness {
 public:
  explicit SimHarness(int n) : scheduler_(n * 7919 + 1) {
    sim::Prng rng(1);
    fabric_ = std::make_unique<sim::SimFabric>(&scheduler_, n,
                                               sim::ResolveFaults(sim::FaultSpec(), n, rng), 1);
    for (int i = 0; i < n; ++i) {
      clocks_.push_back(std::make_unique<sim::SimClock>(&scheduler_, i));
      endpoints_.push_back(fabric_->CreateEndpoint(i));
    }
  }

  int size() const override { return static_cast<int>(endpoints_.size()); }
  Network* network(WorkerId id) override { return endpoints_[id].get(); }
  bool RunUntil(const std::function<bool()>& done, absl::Duration timeout) override {
    return scheduler_.RunUntil(done, scheduler_.Now() + timeout);
  }
  void Crash(WorkerId id) override { fabric_->Crash(id); }
  Clock* clock(WorkerId id) override { return clocks_[id].get(); }

 private:
  sim::Scheduler scheduler_;
  std::vector<std::unique_ptr<sim::SimClock>> clocks_;
  std::unique_ptr<sim::SimFabric> fabric_;
  std::vector<std::unique_ptr<sim::SimNetwork>> endpoints_;
};

inline NetworkFactory SimNetworkFactory(std::string name = "sim") {
  return NetworkFactory{std::move(name), [](int n) -> std::unique_ptr<NetworkHarness> {
                          return std::make_unique<SimHarness>(n);
                        }};
}

}  // namespace tether::testing

#endif  // TETHER_TESTING_SIM_HARNESS_H_
