// Rendezvous: how real workers find each other before the agent starts, like
// torch.distributed.rpc's init_method, over a c10d store from libtorch (the
// only library of Tether's transport that links libtorch; this header does not
// include it).
//
//   RendezvousOptions o;
//   o.init_method = "env://";  // or "tcp://10.0.0.1:29500", "file:///shared/rdzv"
//   o.name = "trainer0";       // rank and world size from RANK / WORLD_SIZE
//   absl::StatusOr<Rendezvous> r = RunRendezvous(o);
//   // r->workers: every worker's name and id (= rank); r->network: a TcpNetwork listening on
//   // an ephemeral port with every peer's address set, ready for Agent::Create + Start.
//
// The exchange itself is transport/rendezvous_protocol.h (tether.rpc runs the same one over
// torch.distributed's store).
//
// Init methods: tcp://host:port (rank 0 hosts a TCPStore there), file:///path
// (a FileStore on a file system all workers share), env:// (MASTER_ADDR,
// MASTER_PORT, RANK, WORLD_SIZE as torchrun sets them; RANK and WORLD_SIZE also
// fill in a missing rank or world size for the others).
//
// Each worker listens on an ephemeral port and publishes its name and address
// under its rank; only the store needs a known port. Errors (kInvalidArgument
// unless noted): a bad init method, a rank outside the world, and those of the
// exchange (rendezvous_protocol.h); kUnavailable when the store cannot be reached.
//
// The address to publish (and listen on): `address` if set; else the IPv4
// address of `interface` (or $TETHER_SOCKET_IFNAME); else loopback when the
// store's host is loopback, the address of the interface that routes to the
// store's host otherwise, and loopback for file:// (a multi-host file:// run
// sets the interface or the address).
//
// Blocking; call from a plain thread, not from an executor or a callback.
#ifndef TETHER_TRANSPORT_RENDEZVOUS_H_
#define TETHER_TRANSPORT_RENDEZVOUS_H_

#include <exception>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/agent.h"
#include "transport/tcp_network.h"

namespace tether {

struct RendezvousOptions {
  std::string init_method = "env://";
  // This worker's name; empty: "worker<rank>".
  std::string name;
  // -1: from $RANK / $WORLD_SIZE.
  int rank = -1;
  int world_size = -1;
  absl::Duration timeout = absl::Seconds(300);
  // Choose the address to publish (see above); at most one of them.
  std::string interface;
  std::string address;
  // Settings for the network (self, listen_host and listen_port are filled in
  // here).
  TcpNetworkOptions network;
};

struct Rendezvous {
  WorkerId self = -1;
  // Every worker, ordered by id (= rank).
  std::vector<WorkerInfo> workers;
  // Every worker's published "host:port", this one's included.
  std::map<WorkerId, std::string> addresses;
  // Listening, with its peers set; not started.
  std::unique_ptr<TcpNetwork> network;
};

absl::StatusOr<Rendezvous> RunRendezvous(const RendezvousOptions& options);

// The address this worker would publish (see above). `store_host` empty for
// file://.
absl::StatusOr<std::string> ChoosePublishAddress(const std::string& interface,
                                                 const std::string& address,
                                                 const std::string& store_host);

// How a c10d store's exception `e`, thrown by an operation that ran for `elapsed` and can time
// out no sooner than `times_out_after` (absl::InfiniteDuration(): never), becomes a status
// (RunRendezvous's; public for its test): the exception's first line (c10 errors append a long
// backtrace), kDeadlineExceeded if it ran that long, else kUnavailable (the store could not be
// used). The one place a store timeout is recognised; never by the exception's text.
absl::Status StoreErrorStatus(const std::exception& e, absl::Duration elapsed,
                              absl::Duration times_out_after);

}  // namespace tether

#endif  // TETHER_TRANSPORT_RENDEZVOUS_H_
