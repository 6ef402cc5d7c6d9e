// The Network conformance suite (testing/network_conformance.h) run against the
// TracingNetwork, wrapping the simulated network and TCP: recording a trace
// must not change what the wrapped network delivers or reports.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "testing/network_conformance.h"
#include "testing/sim_harness.h"
#include "testing/transport/tcp_harness.h"
#include "transport/tracing/tracing_network.h"

namespace tether::testing {
namespace {

// Each wrapper writes its trace file into the test's temporary directory when
// it stops; the name is unique per network so parallel cases do not collide.
std::unique_ptr<Network> Trace(NetworkHarness& inner, WorkerId id) {
  static std::atomic<int> next{0};
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path =
      absl::StrCat(dir != nullptr ? dir : "/tmp", "/trace-", next++, "-worker", id, ".json");
  return std::make_unique<TracingNetwork>(inner.network(id), inner.clock(id), path,
                                          absl::StrCat("worker", id));
}

INSTANTIATE_TEST_SUITE_P(
    Tracing, NetworkConformanceTest,
    ::testing::Values(WrapNetworks("tracing_over_sim", SimNetworkFactory(), &Trace),
                      WrapNetworks("tracing_over_tcp", TcpNetworkFactory(), &Trace)),
    NetworkFactoryName);

}  // namespace
}  // namespace tether::testing
