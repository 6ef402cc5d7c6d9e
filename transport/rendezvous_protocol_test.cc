#include "transport/rendezvous_protocol.h"

#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

// An in-memory store shared by the threads of one test.
class MemoryStore : public RendezvousStore {
 public:
  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta) override {
    absl::MutexLock lock(&mu_);
    if (fail_all_) return absl::UnavailableError("store is down");
    return counters_[key] += delta;
  }
  absl::Status Set(const std::string& key, const std::string& value) override {
    absl::MutexLock lock(&mu_);
    if (fail_all_) return absl::UnavailableError("store is down");
    values_[key] = value;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Get(const std::string& key) override {
    absl::MutexLock lock(&mu_);
    if (fail_all_) return absl::UnavailableError("store is down");
    return values_.at(key);
  }
  void FailAll() {
    absl::MutexLock lock(&mu_);
    fail_all_ = true;
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, int64_t> counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
  bool fail_all_ ABSL_GUARDED_BY(mu_) = false;
};

ExchangeOptions Opts(int rank, int world, std::string name) {
  ExchangeOptions o;
  o.rank = rank;
  o.world_size = world;
  o.name = std::move(name);
  o.address = absl::StrCat("10.0.0.", rank, ":1000");
  o.timeout = absl::Seconds(10);
  o.init_method = "file:///test";
  return o;
}

std::vector<absl::StatusOr<ExchangeResult>> RunAll(RendezvousStore& store,
                                                   const std::vector<ExchangeOptions>& all) {
  std::vector<absl::StatusOr<ExchangeResult>> results(all.size(), absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < all.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = ExchangeAddresses(store, all[i]); });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

TEST(RendezvousProtocolTest, EveryWorkerLearnsEveryAddress) {
  MemoryStore store;
  auto results = RunAll(store, {Opts(2, 3, "c"), Opts(0, 3, "a"), Opts(1, 3, "b")});
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->workers.size(), 3u);
    EXPECT_EQ(r->workers[0].name, "a");
    EXPECT_EQ(r->workers[2].name, "c");
    EXPECT_EQ(r->workers[2].id, 2);
    EXPECT_EQ(r->addresses.at(1), "10.0.0.1:1000");
  }
}

TEST(RendezvousProtocolTest, DuplicateNameFailsEveryWorkerThatSeesIt) {
  MemoryStore store;
  auto results = RunAll(store, {Opts(0, 2, "same"), Opts(1, 2, "same")});
  for (const auto& r : results) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(r.status().message(), "'same' is not unique")) << r.status();
  }
}

TEST(RendezvousProtocolTest, DuplicateNameFailsEveryWorkerWithoutWaitingForTheOthers) {
  // Rank 1 never comes; the workers fail on the duplicate at once, not after the timeout.
  MemoryStore store;
  std::vector<ExchangeOptions> all = {Opts(0, 4, "x"), Opts(2, 4, "x"), Opts(3, 4, "y")};
  for (ExchangeOptions& o : all) o.timeout = absl::Seconds(3);
  auto results = RunAll(store, all);
  for (const auto& r : results) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(),
                                  "RPC worker name 'x' is not unique: ranks 0 and 2 both use it"))
        << r.status();
  }
  // The worker that did nothing wrong names the one that failed.
  EXPECT_TRUE(absl::StrContains(results[2].status().message(), "failed: RPC worker name"))
      << results[2].status();
}

TEST(RendezvousProtocolTest, LoopbackAcrossHostsIsRefused) {
  MemoryStore store;
  std::vector<ExchangeOptions> all = {Opts(0, 2, "a"), Opts(1, 2, "b")};
  all[0].address = "127.0.0.1:1000";
  all[0].loopback_scope = "host-a/net:[1]";
  all[1].address = "10.0.0.2:1000";
  all[1].loopback_scope = "host-b/net:[1]";
  auto results = RunAll(store, all);
  for (const auto& r : results) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(r.status().message(),
                                  "worker 'a' (rank 0) publishes the loopback address "
                                  "127.0.0.1:1000, which worker 'b' (rank 1) cannot reach"))
        << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), "`interface` option")) << r.status();
  }
}

TEST(RendezvousProtocolTest, LoopbackOnOneHostIsFine) {
  MemoryStore store;
  std::vector<ExchangeOptions> all = {Opts(0, 3, "a"), Opts(1, 3, "b"), Opts(2, 3, "c")};
  for (ExchangeOptions& o : all) {
    o.address = absl::StrCat("127.0.0.1:100", o.rank);
    o.loopback_scope = LocalLoopbackScope();
  }
  all[2].loopback_scope = "";  // Unknown: not compared.
  for (const auto& r : RunAll(store, all)) EXPECT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(LocalLoopbackScope().empty());
}

TEST(RendezvousProtocolTest, DuplicateRankIsRejected) {
  MemoryStore store;
  ExchangeOptions first = Opts(0, 2, "a");
  first.timeout = absl::Milliseconds(200);
  ExchangeOptions second = Opts(0, 2, "b");
  auto results = RunAll(store, {first});
  ASSERT_FALSE(results[0].ok());  // Rank 1 never came.
  absl::StatusOr<ExchangeResult> r = ExchangeAddresses(store, second);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "duplicate rank 0")) << r.status();
}

TEST(RendezvousProtocolTest, WrongWorldSizeIsNamed) {
  MemoryStore store;
  auto results = RunAll(store, {Opts(0, 2, "a"), Opts(1, 3, "b")});
  bool named = false;
  for (const auto& r : results) {
    ASSERT_FALSE(r.ok());
    named |= absl::StrContains(r.status().message(), "started with world size");
  }
  EXPECT_TRUE(named);
}

TEST(RendezvousProtocolTest, TimeoutNamesTheMissingRanks) {
  MemoryStore store;
  ExchangeOptions o = Opts(1, 4, "b");
  o.timeout = absl::Milliseconds(100);
  absl::StatusOr<ExchangeResult> r = ExchangeAddresses(store, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "rank(s) 0, 2, 3 never joined"))
      << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "init_method file:///test")) << r.status();
}

TEST(RendezvousProtocolTest, MalformedEntryIsRefused) {
  MemoryStore store;
  ASSERT_TRUE(store.Set("tether/rdzv/worker/0", "garbage").ok());
  ASSERT_TRUE(store.Add("tether/rdzv/present/0", 1).ok());
  absl::StatusOr<ExchangeResult> r = ExchangeAddresses(store, Opts(1, 2, "b"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "entry of rank 0 is malformed"))
      << r.status();
}

TEST(RendezvousProtocolTest, StoreErrorsAreReturnedAsTheyAre) {
  MemoryStore store;
  store.FailAll();
  absl::StatusOr<ExchangeResult> r = ExchangeAddresses(store, Opts(0, 1, "a"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status(), absl::UnavailableError("store is down"));
}

TEST(RendezvousProtocolTest, BadOptionsAreRefused) {
  MemoryStore store;
  EXPECT_EQ(ExchangeAddresses(store, Opts(2, 2, "a")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExchangeAddresses(store, Opts(0, 0, "a")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExchangeAddresses(store, Opts(0, 1, "a\nb")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExchangeAddresses(store, Opts(0, 1, "")).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tether
