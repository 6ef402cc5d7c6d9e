// The Network conformance suite (testing/network_conformance.h) run against the
// FaultyNetwork with no faults configured, wrapping the simulated network and
// TCP: a FaultyNetwork that injects nothing is the network it wraps. (With
// faults it breaks the contract on purpose: failed sends, delayed messages that
// overtake later ones; faulty_network_test covers that.)
#include <memory>

#include "testing/network_conformance.h"
#include "testing/sim_harness.h"
#include "testing/transport/tcp_harness.h"
#include "transport/faulty/faulty_network.h"

namespace tether::testing {
namespace {

std::unique_ptr<Network> NoFaults(NetworkHarness& inner, WorkerId id) {
  return std::make_unique<FaultyNetwork>(inner.network(id), inner.clock(id),
                                         FaultyNetworkOptions{});
}

INSTANTIATE_TEST_SUITE_P(
    Faulty, NetworkConformanceTest,
    ::testing::Values(WrapNetworks("faulty_over_sim", SimNetworkFactory(), &NoFaults),
                      WrapNetworks("faulty_over_tcp", TcpNetworkFactory(), &NoFaults)),
    NetworkFactoryName);

}  // namespace
}  // namespace tether::testing
