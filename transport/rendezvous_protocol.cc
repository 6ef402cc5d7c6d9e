#include "transport/rendezvous_protocol.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "transport/auth.h"
#include "transport/socket_util.h"

namespace tether {
namespace {

constexpr char kPrefix[] = "tether/rdzv/";

struct Entry {
  int world_size = 0;
  std::string name;
  std::string address;
  std::string loopback_scope;
};

std::string EncodeEntry(const Entry& e) {
  return absl::StrCat("v2\n", e.world_size, "\n", e.name, "\n", e.address, "\n", e.loopback_scope);
}

absl::StatusOr<Entry> DecodeEntry(int rank, const std::string& s) {
  std::vector<std::string> parts = absl::StrSplit(s, '\n');
  Entry e;
  if (parts.size() != 5 || parts[0] != "v2" || !absl::SimpleAtoi(parts[1], &e.world_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous entry of rank ", rank,
                     " is malformed (another program or Tether version using the same store?)"));
  }
  e.name = parts[2];
  e.address = parts[3];
  e.loopback_scope = parts[4];
  return e;
}

bool IsLoopbackAddress(const std::string& address) {
  std::string host;
  int port = 0;
  return socket_util::SplitHostPort(address, &host, &port).ok() && IsLoopbackHost(host);
}

std::string Key(absl::string_view kind, absl::string_view id) {
  return absl::StrCat(kPrefix, kind, id);
}

absl::Status CheckOptions(const ExchangeOptions& o) {
  if (o.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("world size ", o.world_size, " is not positive"));
  }
  if (o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", o.rank, " is outside the world of size ", o.world_size));
  }
  if (o.name.empty() || o.name.find('\n') != std::string::npos) {
    return absl::InvalidArgumentError("a worker name must be non-empty and have no newline");
  }
  if (o.address.find('\n') != std::string::npos ||
      o.loopback_scope.find('\n') != std::string::npos) {
    return absl::InvalidArgumentError("a worker address must not contain a newline");
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// Polls back off from 5 ms to 100 ms, so that a large world does not flood the store's host.
class Poller {
 public:
  void Sleep() {
    absl::SleepFor(delay_);
    delay_ = std::min(delay_ * 2, absl::Milliseconds(100));
  }

 private:
  absl::Duration delay_ = absl::Milliseconds(5);
};

// A worker that stops on an error publishes it (`error`, then `failed`), so that the others
// stop at once with it instead of waiting for a rank that will never finish.
absl::Status PublishFailure(RendezvousStore& store, const ExchangeOptions& o,
                            const absl::Status& error) {
  // The first failure is the one every worker reports (a worker stopped by another's failure
  // does not publish its own).
  absl::StatusOr<int64_t> first = store.Add(Key("error_claims", ""), 1);
  if (!first.ok()) return first.status();
  if (*first == 1) {
    absl::Status s = store.Set(
        Key("error", ""),
        absl::StrCat("worker '", o.name, "' (rank ", o.rank, ") failed: ", error.message()));
    if (!s.ok()) return s;
  }
  return store.Add(Key("failed", ""), 1).status();
}

// kInvalidArgument with another worker's published failure, if one failed already.
absl::Status CheckNoneFailed(RendezvousStore& store) {
  absl::StatusOr<int64_t> failed = store.Add(Key("failed", ""), 0);
  if (!failed.ok()) return failed.status();
  if (*failed == 0) return absl::OkStatus();
  absl::StatusOr<std::string> why = store.Get(Key("error", ""));
  if (!why.ok()) return why.status();
  return absl::InvalidArgumentError(*why);
}

// A loopback address is reachable only from the same host and network namespace: with workers
// on several, one that publishes loopback could never be reached (a multi-host file:// run with
// no `interface`, for example). Every worker reads the same entries and fails the same way.
absl::Status CheckLoopbackReach(const std::vector<Entry>& entries) {
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!IsLoopbackAddress(entries[i].address) || entries[i].loopback_scope.empty()) continue;
    for (size_t j = 0; j < entries.size(); ++j) {
      if (entries[j].loopback_scope.empty() ||
          entries[j].loopback_scope == entries[i].loopback_scope) {
        continue;
      }
      return absl::InvalidArgumentError(absl::StrCat(
          "worker '", entries[i].name, "' (rank ", i, ") publishes the loopback address ",
          entries[i].address, ", which worker '", entries[j].name, "' (rank ", j,
          ") cannot reach from another host or network namespace; give every worker the "
          "`interface` option (an address or a network interface name such as eth0) or set "
          "TETHER_SOCKET_IFNAME"));
    }
  }
  return absl::OkStatus();
}

// Reads every worker's entry (waiting for those not written yet). Every worker reads the same
// entries, so a name used twice fails every one of them.
absl::StatusOr<ExchangeResult> ReadAll(RendezvousStore& store, const ExchangeOptions& o,
                                       absl::Time deadline) {
  ExchangeResult r;
  std::map<std::string, int> rank_of_name;
  std::vector<Entry> entries;
  for (int i = 0; i < o.world_size; ++i) {
    Poller poller;
    while (true) {
      absl::StatusOr<int64_t> present = store.Add(Key("present/", absl::StrCat(i)), 0);
      if (!present.ok()) return present.status();
      if (*present > 0) break;
      if (absl::Status s = CheckNoneFailed(store); !s.ok()) return s;
      if (absl::Now() >= deadline) {
        std::vector<int> missing;
        for (int j = i; j < o.world_size; ++j) {
          absl::StatusOr<int64_t> p = store.Add(Key("present/", absl::StrCat(j)), 0);
          if (p.ok() && *p == 0) missing.push_back(j);
        }
        return absl::DeadlineExceededError(absl::StrCat(
            "rendezvous timed out after ", absl::FormatDuration(o.timeout), " (",
            o.init_method.empty() ? "" : absl::StrCat("init_method ", o.init_method, ", "),
            "world size ", o.world_size, "): rank(s) ", absl::StrJoin(missing, ", "),
            " never joined"));
      }
      poller.Sleep();
    }
    absl::StatusOr<std::string> value = store.Get(Key("worker/", absl::StrCat(i)));
    if (!value.ok()) return value.status();
    absl::StatusOr<Entry> e = DecodeEntry(i, *value);
    if (!e.ok()) return e.status();
    if (e->world_size != o.world_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "wrong world size: worker '", e->name, "' (rank ", i, ") was started with world size ",
          e->world_size, ", this worker ('", o.name, "', rank ", o.rank, ") with ", o.world_size));
    }
    auto [it, inserted] = rank_of_name.emplace(e->name, i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("RPC worker name '", e->name,
                                                     "' is not unique: ranks ", it->second, " and ",
                                                     i, " both use it"));
    }
    r.workers.push_back(WorkerInfo{e->name, i});
    r.addresses[i] = e->address;
    entries.push_back(*std::move(e));
  }
  if (absl::Status s = CheckLoopbackReach(entries); !s.ok()) return s;
  return r;
}

// A name claimed twice fails the second claimer at once (naming the first), before it waits
// for the ranks below it; the first learns of it through the published failure.
absl::Status ClaimName(RendezvousStore& store, const ExchangeOptions& o) {
  absl::StatusOr<int64_t> claims = store.Add(Key("name_claims/", o.name), 1);
  if (!claims.ok()) return claims.status();
  if (*claims == 1) return absl::OkStatus();
  // Every claimer wrote its entry before claiming: look for the other one among those present.
  for (int i = 0; i < o.world_size; ++i) {
    if (i == o.rank) continue;
    absl::StatusOr<int64_t> present = store.Add(Key("present/", absl::StrCat(i)), 0);
    if (!present.ok()) return present.status();
    if (*present == 0) continue;
    absl::StatusOr<std::string> value = store.Get(Key("worker/", absl::StrCat(i)));
    if (!value.ok()) return value.status();
    absl::StatusOr<Entry> e = DecodeEntry(i, *value);
    if (e.ok() && e->name == o.name) {
      return absl::InvalidArgumentError(absl::StrCat("RPC worker name '", o.name,
                                                     "' is not unique: ranks ", std::min(i, o.rank),
                                                     " and ", std::max(i, o.rank), " both use it"));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("RPC worker name '", o.name, "' is not unique"));
}

}  // namespace

absl::StatusOr<ExchangeResult> ExchangeAddresses(RendezvousStore& store, const ExchangeOptions& o) {
  if (absl::Status s = CheckOptions(o); !s.ok()) return s;
  const absl::Time deadline = absl::Now() + o.timeout;
  const std::string context =
      o.init_method.empty() ? std::string() : absl::StrCat(" (init_method ", o.init_method, ")");

  absl::StatusOr<int64_t> claims = store.Add(Key("rank_claims/", absl::StrCat(o.rank)), 1);
  if (!claims.ok()) return claims.status();
  if (*claims > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("duplicate rank ", o.rank,
                     ": another worker already joined the rendezvous as rank ", o.rank, context));
  }
  if (absl::Status s =
          store.Set(Key("worker/", absl::StrCat(o.rank)),
                    EncodeEntry(Entry{o.world_size, o.name, o.address, o.loopback_scope}));
      !s.ok()) {
    return s;
  }
  if (absl::StatusOr<int64_t> n = store.Add(Key("present/", absl::StrCat(o.rank)), 1); !n.ok()) {
    return n.status();
  }

  absl::Status claimed = ClaimName(store, o);
  absl::StatusOr<ExchangeResult> result =
      claimed.ok() ? ReadAll(store, o, deadline) : absl::StatusOr<ExchangeResult>(claimed);
  if (!result.ok() &&
      (absl::IsDeadlineExceeded(result.status()) || absl::IsUnavailable(result.status()))) {
    return result;  // Out of time, or the store is gone: nothing left to wait for.
  }
  // Rank 0 may host the store: it returns only once every worker has read everything (`done`),
  // or, on an error, once every worker has finished one way or the other (`failed` counts the
  // ones that did not read it all), for a few seconds at most, so that the others report their
  // own error rather than a lost store.
  absl::Status counted = result.ok() ? store.Add(Key("done", ""), 1).status()
                                     : PublishFailure(store, o, result.status());
  if (!counted.ok()) return result.ok() ? counted : result.status();
  const absl::Time wait_until =
      result.ok() ? deadline : std::min(deadline, absl::Now() + absl::Seconds(5));
  auto finished = [&]() -> absl::StatusOr<int64_t> {
    absl::StatusOr<int64_t> d = store.Add(Key("done", ""), 0);
    if (!d.ok() || result.ok()) return d;  // Success needs everyone's "done".
    absl::StatusOr<int64_t> f = store.Add(Key("failed", ""), 0);
    if (!f.ok()) return f;
    return *d + *f;
  };
  absl::StatusOr<int64_t> done = finished();
  if (!done.ok()) return result.ok() ? done.status() : result.status();
  Poller poller;
  while (o.rank == 0 && *done < o.world_size) {
    if (absl::Now() >= wait_until) {
      if (!result.ok()) return result;
      return absl::DeadlineExceededError(
          absl::StrCat("rendezvous timed out after ", absl::FormatDuration(o.timeout), context,
                       ": not every worker finished reading the worker list"));
    }
    poller.Sleep();
    if (result.ok()) {
      // Another worker failed after reading the list (the world cannot start): its error.
      if (absl::Status s = CheckNoneFailed(store); !s.ok()) return s;
    }
    done = finished();
    if (!done.ok()) return result.ok() ? done.status() : result.status();
  }
  return result;
}

std::string LocalLoopbackScope() {
  std::string boot_id;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot_id;
  char netns[128];
  ssize_t n = readlink("/proc/self/ns/net", netns, sizeof(netns) - 1);
  if (boot_id.empty() || n <= 0) return "";
  return absl::StrCat(boot_id, "/", absl::string_view(netns, n));
}

}  // namespace tether
