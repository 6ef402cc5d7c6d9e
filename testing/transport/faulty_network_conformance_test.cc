// The Network conformance suite (testing/network_conformance.h) run against the
// FaultyNetwork wrapping the simulated network and TCP, twice: with no faults
// configured (a FaultyNetwork that injects nothing is the network it wraps) and
// delaying every message the suite sends (wire::TEST_CALL), so that every case
// runs with its sends going out from the clock's timers, Stop() racing them
// included. One fixed delay per type keeps each pair's order; a delayed Send to
// an unknown worker cannot return kInvalidArgument (delays_sends). Failing
// sends break the contract on purpose; faulty_network_test covers them.
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

std::unique_ptr<Network> Delays(NetworkHarness& inner, WorkerId id) {
  FaultyNetworkOptions o;
  o.delays[wire::TEST_CALL] = absl::Milliseconds(2);
  return std::make_unique<FaultyNetwork>(inner.network(id), inner.clock(id), std::move(o));
}

NetworkFactory Delayed(std::string name, NetworkFactory inner) {
  NetworkFactory f = WrapNetworks(std::move(name), std::move(inner), &Delays);
  f.delays_sends = true;
  return f;
}

INSTANTIATE_TEST_SUITE_P(
    Faulty, NetworkConformanceTest,
    ::testing::Values(WrapNetworks("faulty_over_sim", SimNetworkFactory(), &NoFaults),
                      WrapNetworks("faulty_over_tcp", TcpNetworkFactory(), &NoFaults),
                      Delayed("delaying_faulty_over_sim", SimNetworkFactory()),
                      Delayed("delaying_faulty_over_tcp", TcpNetworkFactory())),
    NetworkFactoryName);

}  // namespace
}  // namespace tether::testing
