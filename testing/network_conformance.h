// The conformance suite every Network implementation must pass
// (core/network.h's contract): ordering per pair, large and many buffers, many
// peers, peer failure reported once and only for that peer, Send to an unknown
// worker, Send after Stop, and Stop with traffic in flight.
//
// One value-parameterized gtest suite, NetworkConformanceTest. An
// implementation instantiates it with a NetworkFactory that builds N connected,
// not yet started networks inside a NetworkHarness; the harness also says how
// to make progress (RunUntil) so the same cases run over real threads (poll
// with real sleeps) and inside the simulator (run the scheduler):
//
//   INSTANTIATE_TEST_SUITE_P(Tcp, NetworkConformanceTest,
//                            ::testing::Values(NetworkFactory{"tcp", &MakeTcpHarness}),
//                            NetworkFactoryName);
//
// The harness owns its networks. The tests own the observers and call
// Start/Send/Stop themselves; observer callbacks may run on any thread (the
// suite's observer is thread-safe). Link the test binary against
// //testing:network_conformance (alwayslink) and gtest_main.
//
// A Network that wraps another (the tracing and faulty networks) runs the suite
// over the harness of an implementation it wraps, through WrapNetworks:
//
//   WrapNetworks("tracing_over_sim", SimNetworkFactory(), [](NetworkHarness& inner, WorkerId id) {
//     return std::make_unique<TracingNetwork>(inner.network(id), inner.clock(id), path, name);
//   })
//
// Instantiations in the tree (one test target each; every Network passes all
// of it):
//   //testing:sim_network_conformance_test            the simulated network
//   //testing/transport:tcp_network_test              TCP (plain, pooled, HMAC)
//   //testing/transport:tracing_network_conformance_test  tracing over sim, TCP
//   //testing/transport:faulty_network_conformance_test   faulty over sim, TCP: with no
//                                                         faults, and delaying every send
//   //testing:process_link_conformance_test          the process simulator's link
//       network (ChildRuntime's LinkNetwork, sim/process/child.cc): each worker a
//       forked process against a ProcessHost in the test; the suite's calls go
//       to a proxy that has the worker's main frame make them (only the baton
//       holder may), and the worker forwards what it delivers. Nothing wraps it:
//       its clock lives in the worker's process (clock() is null).
#ifndef TETHER_TESTING_NETWORK_CONFORMANCE_H_
#define TETHER_TESTING_NETWORK_CONFORMANCE_H_

#include <functional>
#include <memory>
#include <ostream>
#include <string>

#include "absl/time/time.h"
#include "core/clock.h"
#include "core/network.h"
#include "gtest/gtest.h"

namespace tether::testing {

class NetworkHarness {
 public:
  virtual ~NetworkHarness() = default;

  // Number of workers; their ids are 0 .. size()-1.
  virtual int size() const = 0;
  // The network of worker `id`, connected to all the others, not started. Owned
  // by the harness and valid until the harness is destroyed.
  virtual Network* network(WorkerId id) = 0;
  // Makes progress until `done()` returns true or `timeout` passes (real time
  // on real transports, virtual time in the simulator). Returns done(). `done`
  // is called from the caller's thread only.
  virtual bool RunUntil(const std::function<bool()>& done, absl::Duration timeout) = 0;
  // Makes worker `id` fail abruptly as its peers see it (a crash: its
  // connections reset, nothing more is flushed). Its own observer gets no
  // callback afterwards.
  virtual void Crash(WorkerId id) = 0;
  // The clock worker `id`'s network runs on (a SystemClock for real
  // transports, the worker's SimClock in the simulator): what a wrapping
  // network (tracing, faulty) is given. Owned by the harness, valid until it is
  // destroyed.
  virtual Clock* clock(WorkerId id) = 0;
};

struct NetworkFactory {
  std::string name;
  // Builds `n` connected networks (n >= 2).
  std::function<std::unique_ptr<NetworkHarness>(int n)> create;
  // The networks delay sends (FaultyNetwork with delays): Send may accept a message for an
  // unknown worker, which is then dropped (the inner network's kInvalidArgument comes too late
  // to return). Every other case holds as it is.
  bool delays_sends = false;
};

// Builds the network that wraps `inner`'s network of worker `id`.
using NetworkWrapper = std::function<std::unique_ptr<Network>(NetworkHarness& inner, WorkerId id)>;

// A factory whose harness is `inner`'s with each network wrapped by `wrap`:
// Send/Start/Stop go to the wrappers, Crash and RunUntil to the inner harness.
// The wrappers are destroyed before the inner networks.
NetworkFactory WrapNetworks(std::string name, NetworkFactory inner, NetworkWrapper wrap);

// Prints a factory as its name (gtest's messages).
void PrintTo(const NetworkFactory& factory, std::ostream* os);

// For INSTANTIATE_TEST_SUITE_P's name generator.
std::string NetworkFactoryName(const ::testing::TestParamInfo<NetworkFactory>& info);

class NetworkConformanceTest : public ::testing::TestWithParam<NetworkFactory> {};

}  // namespace tether::testing

#endif  // TETHER_TESTING_NETWORK_CONFORMANCE_H_
