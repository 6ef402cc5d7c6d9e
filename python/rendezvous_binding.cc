#include "python/rendezvous_binding.h"

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "python/errors.h"
#include "python/py_ownership.h"
#include "transport/rendezvous.h"
#include "transport/rendezvous_protocol.h"

namespace py = pybind11;

namespace tether {
namespace {

// A torch.distributed Store (a Python object) as the protocol's store. The protocol runs with
// the GIL released; each store operation takes it. The first Python exception (the store's own
// error, or KeyboardInterrupt raised by a signal handler between two polls) ends the exchange
// and is raised again, as it is, once the GIL is back.
class PythonStore : public RendezvousStore {
 public:
  explicit PythonStore(py::object store) : store_(std::move(store)) {}

  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta) override {
    return Run<int64_t>([&](py::object s) { return s.attr("add")(key, delta).cast<int64_t>(); });
  }
  absl::Status Set(const std::string& key, const std::string& value) override {
    return Run<bool>([&](py::object s) {
             s.attr("set")(key, py::bytes(value));
             return true;
           })
        .status();
  }
  absl::StatusOr<std::string> Get(const std::string& key) override {
    return Run<std::string>(
        [&](py::object s) { return std::string(s.attr("get")(key).cast<py::bytes>()); });
  }

  // Raises the Python exception that ended the exchange, if one did. GIL held.
  void RaiseIfPythonError() {
    if (error_) {
      py::error_already_set e = std::move(*error_);
      error_.reset();
      throw e;
    }
  }

 private:
  template <typename T, typename Fn>
  absl::StatusOr<T> Run(Fn fn) {
    Gil gil;
    if (error_) return absl::AbortedError("the rendezvous store raised");
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      return fn(store_.get());
    } catch (py::error_already_set& e) {
      error_.emplace(std::move(e));
      return absl::AbortedError("the rendezvous store raised");
    } catch (const py::cast_error& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("the rendezvous store returned an unexpected value: ", e.what()));
    }
  }

  PyRef store_;
  std::optional<py::error_already_set> error_;  // Touched with the GIL only.
};

std::vector<std::tuple<std::string, int, std::string>> ExchangeAddressesOver(
    py::object store, int rank, int world_size, const std::string& name, const std::string& address,
    double timeout, const std::string& init_method) {
  PythonStore adapter(std::move(store));
  ExchangeOptions options;
  options.rank = rank;
  options.world_size = world_size;
  options.name = name;
  options.address = address;
  options.timeout = timeout > 0 ? absl::Seconds(timeout) : absl::InfiniteDuration();
  options.init_method = init_method;
  options.loopback_scope = LocalLoopbackScope();
  absl::StatusOr<ExchangeResult> result;
  {
    ScopedGilRelease release;
    result = ExchangeAddresses(adapter, options);
  }
  adapter.RaiseIfPythonError();
  if (!result.ok()) Raise(result.status());
  std::vector<std::tuple<std::string, int, std::string>> workers;
  for (const WorkerInfo& w : result->workers) {
    workers.emplace_back(w.name, w.id, result->addresses.at(w.id));
  }
  return workers;
}

}  // namespace

void RegisterRendezvousBindings(py::module_& m) {
  m.def("exchange_addresses", &ExchangeAddressesOver, py::arg("store"), py::arg("rank"),
        py::arg("world_size"), py::arg("name"), py::arg("address"), py::arg("timeout"),
        py::arg("init_method") = "",
        "Publishes this worker's name and address in `store` and returns every worker's "
        "(name, rank, address), ordered by rank (transport/rendezvous_protocol.h).");
  m.def(
      "choose_publish_address",
      [](const std::string& interface, const std::string& address, const std::string& store_host) {
        absl::StatusOr<std::string> chosen;
        {
          ScopedGilRelease release;  // getaddrinfo / getifaddrs may block
          chosen = ChoosePublishAddress(interface, address, store_host);
        }
        return ValueOrRaise(std::move(chosen));
      },
      py::arg("interface"), py::arg("address"), py::arg("store_host"),
      "The address a worker listens on and publishes (transport/rendezvous.h).");
}

}  // namespace tether
