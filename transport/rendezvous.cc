#include "transport/rendezvous.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <set>
#include <thread>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "transport/auth.h"
#include "transport/rendezvous_protocol.h"

namespace tether {
namespace {

// How long a store operation has been running (the steady clock, as c10d's own timeouts).
class Stopwatch {
 public:
  absl::Duration Elapsed() const {
    return absl::FromChrono(std::chrono::steady_clock::now() - start_);
  }

 private:
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

absl::StatusOr<int> EnvInt(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    return absl::InvalidArgumentError(absl::StrCat("$", name, " is not set"));
  }
  int n = 0;
  if (!absl::SimpleAtoi(v, &n)) {
    return absl::InvalidArgumentError(absl::StrCat("$", name, "='", v, "' is not an integer"));
  }
  return n;
}

std::string SockaddrHost(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "";
  if (sa->sa_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(sa)->sin_addr, host, sizeof(host));
  } else if (sa->sa_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(sa)->sin6_addr, host, sizeof(host));
  }
  return host;
}

absl::StatusOr<std::string> InterfaceAddress(const std::string& name) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return absl::UnavailableError("getifaddrs failed");
  std::string v4, v6;
  std::set<std::string> names;
  for (ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr) continue;
    names.insert(i->ifa_name);
    if (name != i->ifa_name) continue;
    if (i->ifa_addr->sa_family == AF_INET && v4.empty()) v4 = SockaddrHost(i->ifa_addr);
    if (i->ifa_addr->sa_family == AF_INET6 && v6.empty()) {
      const auto* a6 = reinterpret_cast<const sockaddr_in6*>(i->ifa_addr);
      if (!IN6_IS_ADDR_LINKLOCAL(&a6->sin6_addr)) v6 = SockaddrHost(i->ifa_addr);
    }
  }
  freeifaddrs(list);
  if (!v4.empty()) return v4;
  if (!v6.empty()) return v6;
  return absl::InvalidArgumentError(
      absl::StrCat("network interface '", name,
                   "' has no usable address (interfaces: ", absl::StrJoin(names, ", "), ")"));
}

// The local address the kernel would use to reach `host` (a UDP connect sends
// nothing).
absl::StatusOr<std::string> RouteTo(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), "9", &hints, &res);
  if (rc != 0 || res == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve the store host '", host, "': ", gai_strerror(rc)));
  }
  int fd = socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  std::string local;
  if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
      local = SockaddrHost(reinterpret_cast<sockaddr*>(&ss));
    }
  }
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  if (local.empty()) {
    return absl::UnavailableError(absl::StrCat("no route to the store host '", host, "'"));
  }
  return local;
}

struct InitMethod {
  enum Kind { kTcp, kFile } kind;
  std::string host;  // tcp
  int port = 0;      // tcp
  std::string path;  // file
};

absl::StatusOr<InitMethod> ParseInitMethod(const std::string& init) {
  InitMethod m;
  if (absl::StartsWith(init, "tcp://") || init == "env://") {
    std::string hostport;
    if (init == "env://") {
      const char* addr = std::getenv("MASTER_ADDR");
      const char* port = std::getenv("MASTER_PORT");
      if (addr == nullptr || port == nullptr || !*addr || !*port) {
        return absl::InvalidArgumentError(
            "init_method env:// needs MASTER_ADDR and MASTER_PORT (as torchrun "
            "sets them)");
      }
      hostport = absl::StrCat(addr, ":", port);
    } else {
      hostport = init.substr(6);
    }
    size_t colon = hostport.rfind(':');
    if (colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(hostport.substr(colon + 1), &m.port) || m.port <= 0 || m.port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("init_method '", init, "': expected host:port, got '", hostport, "'"));
    }
    m.kind = InitMethod::kTcp;
    m.host = hostport.substr(0, colon);
    if (m.host.size() > 2 && m.host.front() == '[') m.host = m.host.substr(1, m.host.size() - 2);
    return m;
  }
  if (absl::StartsWith(init, "file://")) {
    m.kind = InitMethod::kFile;
    m.path = init.substr(7);
    if (m.path.empty() || m.path[0] != '/') {
      return absl::InvalidArgumentError(
          absl::StrCat("init_method '", init, "': expected file:///absolute/path"));
    }
    return m;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown init_method '", init, "' (use tcp://host:port, file:///path or env://)"));
}

// A c10d store as the protocol's store (c10d reports errors as exceptions).
class C10dStore : public RendezvousStore {
 public:
  // `times_out_after`: when one of its operations can time out at the earliest (OpTimesOutAfter).
  C10dStore(c10d::Store& store, std::string init_method, absl::Duration times_out_after)
      : store_(store), init_method_(std::move(init_method)), times_out_after_(times_out_after) {}

  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta) override {
    return Guard([&] { return store_.add(key, delta); });
  }
  absl::Status Set(const std::string& key, const std::string& value) override {
    return Guard([&] {
             store_.set(key, std::vector<uint8_t>(value.begin(), value.end()));
             return true;
           })
        .status();
  }
  absl::StatusOr<std::string> Get(const std::string& key) override {
    return Guard([&] {
      std::vector<uint8_t> v = store_.get(key);
      return std::string(v.begin(), v.end());
    });
  }

 private:
  template <typename Fn>
  auto Guard(Fn fn) -> absl::StatusOr<decltype(fn())> {
    Stopwatch watch;
    try {
      return fn();
    } catch (const std::exception& e) {
      absl::Status s = StoreErrorStatus(e, watch.Elapsed(), times_out_after_);
      return absl::Status(
          s.code(), absl::StrCat("rendezvous through ", init_method_, " failed: ", s.message()));
    }
  }

  c10d::Store& store_;
  const std::string init_method_;
  const absl::Duration times_out_after_;
};

// Clock granularity: c10d's own deadlines and ours are taken a moment apart.
constexpr absl::Duration kSlack = absl::Milliseconds(50);

// When a store operation (add, set, get) with the store's `timeout` can time out at the earliest:
// c10d throws for it once the timeout has passed (a zero timeout is c10d's none: never).
absl::Duration OpTimesOutAfter(absl::Duration timeout) {
  const int64_t ms = absl::ToInt64Milliseconds(timeout);
  return ms > 0 ? absl::Milliseconds(ms) - std::min(absl::Milliseconds(ms) / 20, kSlack)
                : absl::InfiniteDuration();
}

// When opening the store can time out at the earliest. A TCPStore client connects within the
// timeout in whole seconds (SocketOptions::connect_timeout is std::chrono::seconds) and retries
// a refused connect 1 s apart, giving up when the next attempt would pass the deadline: up to
// 1 s early (measured: a 20 s timeout gives up after 19.1 s, a 1 s one at once). FileStore's
// constructor opens its file with c10d's default timeout (setTimeout comes after it).
absl::Duration OpeningTimesOutAfter(bool tcp, absl::Duration timeout) {
  if (!tcp)
    return absl::FromChrono(std::chrono::milliseconds(c10d::Store::kDefaultTimeout)) - kSlack;
  const absl::Duration connect = absl::Seconds(absl::ToInt64Seconds(timeout));
  return std::max(connect - absl::Seconds(1) - kSlack, absl::ZeroDuration());
}

}  // namespace

// Whether it is a timeout is told by the clock, not by the text (c10d's exceptions carry no kind
// before PyTorch 2, and their texts mislead: a connect refused at once may say it "timed out"):
// c10d throws for a timeout only once the store's timeout has passed, so an operation that
// failed sooner than that could not use the store. When that is, for each operation, is
// OpTimesOutAfter's and OpeningTimesOutAfter's.
absl::Status StoreErrorStatus(const std::exception& e, absl::Duration elapsed,
                              absl::Duration times_out_after) {
  std::string what = e.what();
  size_t nl = what.find('\n');
  if (nl != std::string::npos) what = what.substr(0, nl);
  return absl::Status(elapsed >= times_out_after ? absl::StatusCode::kDeadlineExceeded
                                                 : absl::StatusCode::kUnavailable,
                      absl::StrCat("rendezvous store: ", what));
}

absl::StatusOr<std::string> ChoosePublishAddress(const std::string& interface,
                                                 const std::string& address,
                                                 const std::string& store_host) {
  if (!interface.empty() && !address.empty()) {
    return absl::InvalidArgumentError(
        "set either the interface or the address to publish, not both");
  }
  if (!address.empty()) return address;
  std::string ifname = interface;
  if (ifname.empty()) {
    const char* env = std::getenv("TETHER_SOCKET_IFNAME");
    if (env != nullptr) ifname = env;
  }
  if (!ifname.empty()) return InterfaceAddress(ifname);
  // file:// (no store host): loopback. Listening on a public address by default would expose
  // the (unauthenticated unless auth_token is set) RPC port; multi-host file:// runs name the
  // interface or the address.
  if (store_host.empty()) return std::string("127.0.0.1");
  if (IsLoopbackHost(store_host)) return std::string(store_host == "::1" ? "::1" : "127.0.0.1");
  return RouteTo(store_host);
}

absl::StatusOr<Rendezvous> RunRendezvous(const RendezvousOptions& options) {
  absl::StatusOr<InitMethod> init = ParseInitMethod(options.init_method);
  if (!init.ok()) return init.status();
  int rank = options.rank, world_size = options.world_size;
  if (rank < 0) {
    absl::StatusOr<int> r = EnvInt("RANK");
    if (!r.ok())
      return absl::InvalidArgumentError(absl::StrCat("no rank given and ", r.status().message()));
    rank = *r;
  }
  if (world_size < 0) {
    absl::StatusOr<int> w = EnvInt("WORLD_SIZE");
    if (!w.ok())
      return absl::InvalidArgumentError(
          absl::StrCat("no world size given and ", w.status().message()));
    world_size = *w;
  }
  if (world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("world size ", world_size, " is not positive"));
  }
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is outside the world of size ", world_size));
  }
  std::string name = options.name.empty() ? absl::StrCat("worker", rank) : options.name;
  absl::StatusOr<std::string> publish = ChoosePublishAddress(
      options.interface, options.address, init->kind == InitMethod::kTcp ? init->host : "");
  if (!publish.ok()) return publish.status();

  TcpNetworkOptions net_options = options.network;
  net_options.self = rank;
  net_options.listen_host = *publish;
  net_options.listen_port = 0;
  absl::StatusOr<std::unique_ptr<TcpNetwork>> network = TcpNetwork::Listen(net_options);
  if (!network.ok()) return network.status();

  auto timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(options.timeout));
  Stopwatch opening;
  try {
    std::unique_ptr<c10d::Store> store;
    if (init->kind == InitMethod::kTcp) {
      c10d::TCPStoreOptions so;
      so.port = static_cast<uint16_t>(init->port);
      so.isServer = rank == 0;
      so.numWorkers = world_size;
      so.waitWorkers = false;
      so.timeout = timeout;
      store = std::make_unique<c10d::TCPStore>(init->host, so);
    } else {
      store = std::make_unique<c10d::FileStore>(init->path, world_size);
      store->setTimeout(timeout);
    }
    C10dStore adapter(*store, options.init_method, OpTimesOutAfter(options.timeout));
    ExchangeOptions exchange;
    exchange.rank = rank;
    exchange.world_size = world_size;
    exchange.name = name;
    exchange.address = (*network)->listen_address();
    exchange.timeout = options.timeout;
    exchange.init_method = options.init_method;
    exchange.loopback_scope = LocalLoopbackScope();
    absl::StatusOr<ExchangeResult> result = ExchangeAddresses(adapter, exchange);
    if (!result.ok()) return result.status();
    Rendezvous r;
    r.self = rank;
    r.workers = std::move(result->workers);
    r.addresses = std::move(result->addresses);
    std::map<WorkerId, std::string> peers = r.addresses;
    peers.erase(rank);
    if (absl::Status s = (*network)->SetPeers(peers); !s.ok()) return s;
    r.network = *std::move(network);
    return r;
  } catch (const std::exception& e) {
    // Only opening the store throws here.
    absl::Status s =
        StoreErrorStatus(e, opening.Elapsed(),
                         OpeningTimesOutAfter(init->kind == InitMethod::kTcp, options.timeout));
    return absl::Status(s.code(), absl::StrCat("rendezvous through ", options.init_method,
                                               " failed: ", s.message()));
  }
}

}  // namespace tether
