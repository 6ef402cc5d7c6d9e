// tether.rpc's rendezvous: the one exchange of names and addresses
// (transport/rendezvous_protocol.h) run over the store torch.distributed.rendezvous() returned,
// so every init method PyTorch knows (and any registered handler) works, and the store layout,
// the checks and the errors are those of the C++ rendezvous.
//
//   store, rank, world_size = next(dist.rendezvous(init_method, rank=rank, world_size=n))
//   workers = _C.exchange_addresses(store, rank, world_size, name, address, timeout, init_method)
//   # [(name, rank, "host:port"), ...] ordered by rank
//   host = _C.choose_publish_address(interface, address, store_host)
#ifndef TETHER_PYTHON_RENDEZVOUS_BINDING_H_
#define TETHER_PYTHON_RENDEZVOUS_BINDING_H_

#include <pybind11/pybind11.h>

namespace tether {

// Adds exchange_addresses and choose_publish_address.
void RegisterRendezvousBindings(pybind11::module_& m);

}  // namespace tether

#endif  // TETHER_PYTHON_RENDEZVOUS_BINDING_H_
