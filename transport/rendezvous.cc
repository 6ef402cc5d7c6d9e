#include "transport/rendezvous.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

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

namespace tether {
namespace {

constexpr char kPrefix[] = "tether/rdzv/";

std::vector<uint8_t> Bytes(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}
std::string Str(const std::vector<uint8_t>& v) {
  return std::string(v.begin(), v.end());
}

absl::StatusOr<int> EnvInt(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    return absl::InvalidArgumentError(absl::StrCat("$", name, " is not set"));
  }
  int n = 0;
  if (!absl::SimpleAtoi(v, &n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("$", name, "='", v, "' is not an integer"));
  }
  return n;
}

std::string SockaddrHost(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "";
  if (sa->sa_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(sa)->sin_addr,
              host, sizeof(host));
  } else if (sa->sa_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(sa)->sin6_addr,
              host, sizeof(host));
  }
  return host;
}

absl::StatusOr<std::string> InterfaceAddress(const std::string& name) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0)
    return absl::UnavailableError("getifaddrs failed");
  std::string v4, v6;
  std::set<std::string> names;
  for (ifaddrs* i = list; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr) continue;
    names.insert(i->ifa_name);
    if (name != i->ifa_name) continue;
    if (i->ifa_addr->sa_family == AF_INET && v4.empty())
      v4 = SockaddrHost(i->ifa_addr);
    if (i->ifa_addr->sa_family == AF_INET6 && v6.empty()) {
      const auto* a6 = reinterpret_cast<const sockaddr_in6*>(i->ifa_addr);
      if (!IN6_IS_ADDR_LINKLOCAL(&a6->sin6_addr))
        v6 = SockaddrHost(i->ifa_addr);
    }
  }
  freeifaddrs(list);
  if (!v4.empty()) return v4;
  if (!v6.empty()) return v6;
  return absl::InvalidArgumentError(absl::StrCat(
      "network interface '", name, "' has no usable address (interfaces: ",
      absl::StrJoin(names, ", "), ")"));
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
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot resolve the store host '", host, "': ", gai_strerror(rc)));
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
    return absl::UnavailableError(
        absl::StrCat("no route to the store host '", host, "'"));
  }
  return local;
}

absl::StatusOr<std::string> HostnameAddress() {
  char name[256] = "";
  gethostname(name, sizeof(name) - 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(name, nullptr, &hints, &res) != 0 || res == nullptr)
    return std::string("127.0.0.1");
  std::string chosen;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    std::string h = SockaddrHost(a->ai_addr);
    if (chosen.empty() || (IsLoopbackHost(chosen) && !IsLoopbackHost(h)))
      chosen = h;
  }
  freeaddrinfo(res);
  return chosen.empty() ? std::string("127.0.0.1") : chosen;
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
        !absl::SimpleAtoi(hostport.substr(colon + 1), &m.port) || m.port <= 0 ||
        m.port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("init_method '", init, "': expected host:port, got '",
                       hostport, "'"));
    }
    m.kind = InitMethod::kTcp;
    m.host = hostport.substr(0, colon);
    if (m.host.size() > 2 && m.host.front() == '[')
      m.host = m.host.substr(1, m.host.size() - 2);
    return m;
  }
  if (absl::StartsWith(init, "file://")) {
    m.kind = InitMethod::kFile;
    m.path = init.substr(7);
    if (m.path.empty() || m.path[0] != '/') {
      return absl::InvalidArgumentError(absl::StrCat(
          "init_method '", init, "': expected file:///absolute/path"));
    }
    return m;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown init_method '", init,
                   "' (use tcp://host:port, file:///path or env://)"));
}

struct Entry {
  int world_size = 0;
  std::string name;
  std::string address;
};

std::string EncodeEntry(const Entry& e) {
  return absl::StrCat("v1\n", e.world_size, "\n", e.name, "\n", e.address);
}

absl::StatusOr<Entry> DecodeEntry(int rank, const std::string& s) {
  std::vector<std::string> parts = absl::StrSplit(s, '\n');
  Entry e;
  if (parts.size() != 4 || parts[0] != "v1" ||
      !absl::SimpleAtoi(parts[1], &e.world_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous entry of rank ", rank,
                     " is malformed (another program or "
                     "Tether version using the same store?)"));
  }
  e.name = parts[2];
  e.address = parts[3];
  return e;
}

absl::StatusOr<Rendezvous> RunWithStore(c10d::Store& store,
                                        const RendezvousOptions& o, int rank,
                                        int world_size, const std::string& name,
                                        std::unique_ptr<TcpNetwork> network) {
  const absl::Time deadline = absl::Now() + o.timeout;
  Entry mine{world_size, name, network->listen_address()};
  std::string prefix = kPrefix;
  if (store.add(absl::StrCat(prefix, "rank_claims/", rank), 1) > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "duplicate rank ", rank,
        ": another worker already joined the rendezvous as rank ", rank));
  }
  // Publish first, so a worker that already claimed this name sees the
  // duplicate too.
  store.set(absl::StrCat(prefix, "worker/", rank), Bytes(EncodeEntry(mine)));
  if (store.add(absl::StrCat(prefix, "name_claims/", name), 1) > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "duplicate worker name '", name, "': another worker already uses it"));
  }

  Rendezvous r;
  r.self = rank;
  std::set<std::string> names;
  for (int i = 0; i < world_size; ++i) {
    std::string key = absl::StrCat(prefix, "worker/", i);
    while (!store.check({key})) {
      if (absl::Now() >= deadline) {
        std::vector<int> missing;
        for (int j = i; j < world_size; ++j) {
          if (!store.check({absl::StrCat(prefix, "worker/", j)}))
            missing.push_back(j);
        }
        return absl::DeadlineExceededError(absl::StrCat(
            "rendezvous timed out after ", absl::FormatDuration(o.timeout),
            " (init_method ", o.init_method, ", world size ", world_size,
            "): rank(s) ", absl::StrJoin(missing, ", "), " never joined"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    absl::StatusOr<Entry> e = DecodeEntry(i, Str(store.get(key)));
    if (!e.ok()) return e.status();
    if (e->world_size != world_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "wrong world size: worker '", e->name, "' (rank ", i,
          ") was started with world size ", e->world_size, ", this worker ('",
          name, "', rank ", rank, ") with ", world_size));
    }
    if (!names.insert(e->name).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "duplicate worker name '", e->name, "' (rank ", i, " and another)"));
    }
    r.workers.push_back(WorkerInfo{e->name, i});
    r.addresses[i] = e->address;
  }
  // Rank 0 hosts the TCPStore: it leaves only once every worker has read
  // everything.
  store.add(absl::StrCat(prefix, "done"), 1);
  if (rank == 0) {
    while (store.add(absl::StrCat(prefix, "done"), 0) < world_size) {
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "rendezvous timed out after ", absl::FormatDuration(o.timeout),
            ": not every worker finished reading the worker list"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  std::map<WorkerId, std::string> peers = r.addresses;
  peers.erase(rank);
  absl::Status s = network->SetPeers(peers);
  if (!s.ok()) return s;
  r.network = std::move(network);
  return r;
}

}  // namespace

absl::StatusOr<std::string> ChoosePublishAddress(
    const std::string& interface, const std::string& address,
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
  if (store_host.empty()) return HostnameAddress();
  if (IsLoopbackHost(store_host))
    return std::string(store_host == "::1" ? "::1" : "127.0.0.1");
  return RouteTo(store_host);
}

absl::StatusOr<Rendezvous> RunRendezvous(const RendezvousOptions& options) {
  absl::StatusOr<InitMethod> init = ParseInitMethod(options.init_method);
  if (!init.ok()) return init.status();
  int rank = options.rank, world_size = options.world_size;
  if (rank < 0) {
    absl::StatusOr<int> r = EnvInt("RANK");
    if (!r.ok())
      return absl::InvalidArgumentError(
          absl::StrCat("no rank given and ", r.status().message()));
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
    return absl::InvalidArgumentError(
        absl::StrCat("world size ", world_size, " is not positive"));
  }
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, " is outside the world of size ", world_size));
  }
  std::string name =
      options.name.empty() ? absl::StrCat("worker", rank) : options.name;
  if (name.find('\n') != std::string::npos) {
    return absl::InvalidArgumentError(
        "a worker name must not contain a newline");
  }
  absl::StatusOr<std::string> publish =
      ChoosePublishAddress(options.interface, options.address,
                           init->kind == InitMethod::kTcp ? init->host : "");
  if (!publish.ok()) return publish.status();

  TcpNetworkOptions net_options = options.network;
  net_options.self = rank;
  net_options.listen_host = *publish;
  net_options.listen_port = 0;
  absl::StatusOr<std::unique_ptr<TcpNetwork>> network =
      TcpNetwork::Listen(net_options);
  if (!network.ok()) return network.status();

  auto timeout =
      std::chrono::milliseconds(absl::ToInt64Milliseconds(options.timeout));
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
    return RunWithStore(*store, options, rank, world_size, name,
                        std::move(*network));
  } catch (const std::exception& e) {
    std::string what = e.what();
    size_t nl = what.find('\n');  // c10 errors append a long backtrace.
    if (nl != std::string::npos) what = what.substr(0, nl);
    absl::StatusCode code =
        absl::StrContains(what, "imeout") || absl::StrContains(what, "imed out")
            ? absl::StatusCode::kDeadlineExceeded
            : absl::StatusCode::kUnavailable;
    return absl::Status(code,
                        absl::StrCat("rendezvous through ", options.init_method,
                                     " failed: ", what));
  }
}

}  // namespace tether
