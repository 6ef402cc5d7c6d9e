// The rendezvous protocol: how workers that share a key-value store learn every worker's name
// and address before their agents start. It is the one implementation of that exchange: the C++
// rendezvous (transport/rendezvous.h) runs it over a c10d store it opens itself, and tether.rpc
// runs it over the store torch.distributed.rendezvous() gives it (python/rendezvous_binding.cc).
// It needs no libtorch: the store is an interface.
//
//   MyStore store;  // a RendezvousStore
//   ExchangeOptions o;
//   o.rank = 1;
//   o.world_size = 2;
//   o.name = "trainer1";
//   o.address = "10.0.0.2:41234";
//   absl::StatusOr<ExchangeResult> r = ExchangeAddresses(store, o);
//   // r->workers: every worker's name and id (= rank); r->addresses: id -> "host:port".
//
// Store layout (under the store's own prefix, if any), all under `tether/rdzv/`:
//   rank_claims/<rank>  a counter that reveals a duplicate rank;
//   worker/<rank>       "v2\n<world size>\n<name>\n<address>\n<loopback scope>";
//   present/<rank>      a counter set to 1 once that entry is written (readers poll it with
//                       Add(key, 0), which every c10d store has and which never blocks or throws);
//   name_claims/<name>  a counter that reveals a duplicate name at once;
//   error_claims, error the first failure, "worker 'x' (rank r) failed: ...";
//   failed              counts the workers that stopped on an error (set after `error`);
//   done                counts the workers that read the whole list (rank 0, which may host the
//                       store, returns only once it reaches the world size).
//
// Errors: kInvalidArgument for a duplicate rank, a worker name used twice ("RPC worker name
// 'x' is not unique", as PyTorch says it), workers started with different world sizes, a
// malformed entry, or a loopback address published to a worker on another host or network
// namespace (a multi-host file:// run without `interface`); kDeadlineExceeded naming the ranks
// that never joined when `timeout` passes; a store operation's own error is returned as it is.
// A worker that fails publishes its error, and every other worker then fails with that error at
// once (kInvalidArgument) rather than waiting for the timeout.
//
// Blocking (polls the store, backing off from 5 to 100 ms); call from a plain thread. The store's
// methods are called on that thread only.
#ifndef TETHER_TRANSPORT_RENDEZVOUS_PROTOCOL_H_
#define TETHER_TRANSPORT_RENDEZVOUS_PROTOCOL_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/agent.h"

namespace tether {

// A key-value store shared by all workers (c10d's semantics: Add creates a missing counter at 0
// and returns the new value; Get is only called for a key known to be written).
class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  virtual absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta) = 0;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  virtual absl::StatusOr<std::string> Get(const std::string& key) = 0;
};

struct ExchangeOptions {
  int rank = 0;
  int world_size = 1;
  std::string name;
  // What this worker publishes ("host:port").
  std::string address;
  absl::Duration timeout = absl::Seconds(300);
  // Named in errors (for example "tcp://10.0.0.1:29500").
  std::string init_method;
  // Which workers can reach this one's loopback address: LocalLoopbackScope() in production.
  // Empty: unknown, never compared.
  std::string loopback_scope;
};

struct ExchangeResult {
  // Every worker, ordered by id (= rank).
  std::vector<WorkerInfo> workers;
  // Every worker's published address, this one's included.
  std::map<WorkerId, std::string> addresses;
};

absl::StatusOr<ExchangeResult> ExchangeAddresses(RendezvousStore& store,
                                                 const ExchangeOptions& options);

// This process's host and network namespace ("<boot id>/net:[<inode>]"): two processes share
// loopback exactly when these are equal. Empty if /proc does not say.
std::string LocalLoopbackScope();

}  // namespace tether

#endif  // TETHER_TRANSPORT_RENDEZVOUS_PROTOCOL_H_
