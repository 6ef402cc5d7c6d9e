// The Network conformance suite (testing/network_conformance.h) run against the
// simulated network, without faults (ordering and reliability are part of the
// contract only then).
#include <memory>
#include <vector>

#include "sim/fault_spec.h"
#include "sim/scheduler.h"
#include "sim/sim_network.h"
#include "testing/network_conformance.h"

namespace tether::sim {
namespace {

using ::tether::testing::NetworkConformanceTest;

class SimHarness : public testing::NetworkHarness {
 public:
  explicit SimHarness(int n) : scheduler_(n * 7919 + 1) {
    Prng rng(1);
    fabric_ = std::make_unique<SimFabric>(
        &scheduler_, n, ResolveFaults(FaultSpec(), n, rng), 1);
    for (int i = 0; i < n; ++i)
      endpoints_.push_back(fabric_->CreateEndpoint(i));
  }

  int size() const override { return static_cast<int>(endpoints_.size()); }
  Network* network(WorkerId id) override { return endpoints_[id].get(); }
  bool RunUntil(const std::function<bool()>& done,
                absl::Duration timeout) override {
    return scheduler_.RunUntil(done, scheduler_.Now() + timeout);
  }
  void Crash(WorkerId id) override { fabric_->Crash(id); }

 private:
  Scheduler scheduler_;
  std::unique_ptr<SimFabric> fabric_;
  std::vector<std::unique_ptr<SimNetwork>> endpoints_;
};

INSTANTIATE_TEST_SUITE_P(
    Sim, NetworkConformanceTest,
    ::testing::Values(testing::NetworkFactory{
        "sim",
        [](int n) -> std::unique_ptr<testing::NetworkHarness> {
          return std::make_unique<SimHarness>(n);
        }}),
    testing::NetworkFactoryName);

}  // namespace
}  // namespace tether::sim
