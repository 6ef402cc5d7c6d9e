// The Network conformance suite (testing/network_conformance.h) run against the
// simulated network, without faults (ordering and reliability are part of the
// contract only then).
#include "testing/network_conformance.h"
#include "testing/sim_harness.h"

namespace tether::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(Sim, NetworkConformanceTest, ::testing::Values(SimNetworkFactory()),
                         NetworkFactoryName);

}  // namespace
}  // namespace tether::testing
