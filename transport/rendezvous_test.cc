#include "transport/rendezvous.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace tether {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir ? dir : "/tmp", "/", name, "_", getpid());
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// Runs one rendezvous per options entry, each on its own thread.
std::vector<absl::StatusOr<Rendezvous>> RunAll(std::vector<RendezvousOptions> all) {
  std::vector<absl::StatusOr<Rendezvous>> results;
  for (size_t i = 0; i < all.size(); ++i) {
    results.emplace_back(absl::UnknownError("not run"));
  }
  std::vector<std::thread> threads;
  for (size_t i = 0; i < all.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = RunRendezvous(all[i]); });
  }
  for (auto& t : threads) t.join();
  return results;
}

RendezvousOptions Opts(const std::string& init, int rank, int world, std::string name = "") {
  RendezvousOptions o;
  o.init_method = init;
  o.rank = rank;
  o.world_size = world;
  o.name = std::move(name);
  o.timeout = absl::Seconds(20);
  return o;
}

class Counter : public NetworkObserver {
 public:
  void OnMessage(Message) override {
    absl::MutexLock lock(&mu_);
    ++n_;
  }
  void OnPeerFailed(WorkerId, const absl::Status&) override {}
  int n() {
    absl::MutexLock lock(&mu_);
    return n_;
  }

 private:
  absl::Mutex mu_;
  int n_ ABSL_GUARDED_BY(mu_) = 0;
};

void ExpectWorkingWorld(std::vector<absl::StatusOr<Rendezvous>>& results) {
  const int n = static_cast<int>(results.size());
  for (int i = 0; i < n; ++i) {
    ASSERT_TRUE(results[i].ok()) << results[i].status();
    EXPECT_EQ(results[i]->self, i);
    ASSERT_EQ(results[i]->workers.size(), static_cast<size_t>(n));
    EXPECT_EQ(results[i]->workers, results[0]->workers);
    EXPECT_EQ(results[i]->addresses, results[0]->addresses);
    EXPECT_EQ(results[i]->addresses.at(i), results[i]->network->listen_address());
  }
  // The networks it produced connect: everyone sends to worker 0.
  std::vector<Counter> counters(n);
  for (int i = 0; i < n; ++i) ASSERT_TRUE(results[i]->network->Start(&counters[i]).ok());
  for (int i = 1; i < n; ++i) {
    Message m;
    m.envelope.set_type(wire::TEST_CALL);
    ASSERT_TRUE(results[i]->network->Send(0, std::move(m)).ok());
  }
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (counters[0].n() < n - 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(counters[0].n(), n - 1);
  for (int i = 0; i < n; ++i) results[i]->network->Stop();
}

TEST(RendezvousTest, FileStore) {
  std::string init = "file://" + TempPath("rdzv_file");
  auto results = RunAll({Opts(init, 0, 3, "a"), Opts(init, 1, 3, "b"), Opts(init, 2, 3)});
  ExpectWorkingWorld(results);
  EXPECT_EQ(results[0]->workers[0].name, "a");
  EXPECT_EQ(results[0]->workers[2].name, "worker2");
}

TEST(RendezvousTest, TcpStore) {
  std::string init = absl::StrCat("tcp://127.0.0.1:", FreePort());
  auto results = RunAll({Opts(init, 0, 3), Opts(init, 1, 3), Opts(init, 2, 3)});
  ExpectWorkingWorld(results);
  EXPECT_EQ(results[1]->addresses.at(1).rfind("127.0.0.1:", 0), 0u);
}

TEST(RendezvousTest, EnvLikeTorchrun) {
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", std::to_string(FreePort()).c_str(), 1);
  setenv("WORLD_SIZE", "2", 1);
  // RANK differs per process under torchrun; threads here pass it explicitly.
  auto results = RunAll({Opts("env://", 0, -1), Opts("env://", 1, -1)});
  ExpectWorkingWorld(results);
  unsetenv("WORLD_SIZE");
  unsetenv("MASTER_ADDR");
  EXPECT_EQ(RunRendezvous(Opts("env://", 0, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  unsetenv("MASTER_PORT");
}

TEST(RendezvousTest, DuplicateNamesAreRejected) {
  std::string init = "file://" + TempPath("rdzv_dup_name");
  auto results = RunAll({Opts(init, 0, 2, "same"), Opts(init, 1, 2, "same")});
  for (auto& r : results) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("'same' is not unique"), std::string::npos) << r.status();
  }
}

TEST(RendezvousTest, DuplicateRankIsRejected) {
  std::string init = "file://" + TempPath("rdzv_dup_rank");
  RendezvousOptions a = Opts(init, 0, 2, "a"), b = Opts(init, 0, 2, "b");
  a.timeout = b.timeout = absl::Seconds(1);
  auto results = RunAll({a, b});
  int duplicates = 0;
  for (auto& r : results) {
    EXPECT_FALSE(r.ok());
    duplicates += r.status().message().find("duplicate rank 0") != std::string::npos;
  }
  EXPECT_EQ(duplicates, 1);
}

TEST(RendezvousTest, WrongWorldSizeIsRejected) {
  std::string init = "file://" + TempPath("rdzv_world");
  RendezvousOptions a = Opts(init, 0, 2), b = Opts(init, 1, 3);
  auto results = RunAll({a, b});
  for (auto& r : results) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("wrong world size"), std::string::npos) << r.status();
  }
}

TEST(RendezvousTest, TimeoutNamesTheMissingRanks) {
  RendezvousOptions o = Opts("file://" + TempPath("rdzv_timeout"), 0, 3);
  o.timeout = absl::Milliseconds(300);
  absl::StatusOr<Rendezvous> r = RunRendezvous(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_NE(r.status().message().find("rank(s) 1, 2 never joined"), std::string::npos)
      << r.status();
}

// A store error is a timeout by the time it took, whatever its text says.
TEST(RendezvousTest, StoreErrorIsATimeoutByElapsedTimeNotByText) {
  const absl::Duration after = absl::Seconds(2);
  std::runtime_error says_timeout("Socket Timeout\nException raised from recvBytes at ...");
  absl::Status fast = StoreErrorStatus(says_timeout, absl::Milliseconds(3), after);
  EXPECT_EQ(fast.code(), absl::StatusCode::kUnavailable) << fast;
  EXPECT_EQ(fast.message(), "rendezvous store: Socket Timeout");  // First line only.
  std::runtime_error plain("Connection reset by peer");
  absl::Status slow = StoreErrorStatus(plain, absl::Seconds(2), after);
  EXPECT_EQ(slow.code(), absl::StatusCode::kDeadlineExceeded) << slow;
  EXPECT_EQ(StoreErrorStatus(plain, absl::Milliseconds(1990), after).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(StoreErrorStatus(says_timeout, absl::Hours(1), absl::InfiniteDuration()).code(),
            absl::StatusCode::kUnavailable);
}

// Nothing listens on the store's port: c10d retries the connect until (about) the timeout.
TEST(RendezvousTest, UnreachableTcpStoreTimesOut) {
  RendezvousOptions o = Opts(absl::StrCat("tcp://127.0.0.1:", FreePort()), 1, 2);
  o.timeout = absl::Seconds(3);
  absl::StatusOr<Rendezvous> r = RunRendezvous(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_NE(r.status().message().find("rendezvous store: "), std::string::npos) << r.status();
}

TEST(RendezvousTest, BadOptions) {
  for (const char* init : {"foo://x", "tcp://nohost", "tcp://h:0", "file://relative"}) {
    EXPECT_EQ(RunRendezvous(Opts(init, 0, 1)).status().code(), absl::StatusCode::kInvalidArgument)
        << init;
  }
  std::string init = "file://" + TempPath("rdzv_bad");
  EXPECT_EQ(RunRendezvous(Opts(init, 2, 2)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RunRendezvous(Opts(init, 0, 0)).status().code(), absl::StatusCode::kInvalidArgument);
  unsetenv("RANK");
  EXPECT_EQ(RunRendezvous(Opts(init, -1, 1)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RendezvousTest, PublishAddressChoice) {
  EXPECT_EQ(ChoosePublishAddress("", "", "127.0.0.1").value(), "127.0.0.1");
  EXPECT_EQ(ChoosePublishAddress("", "", "localhost").value(), "127.0.0.1");
  EXPECT_EQ(ChoosePublishAddress("", "10.1.2.3", "127.0.0.1").value(), "10.1.2.3");
  EXPECT_EQ(ChoosePublishAddress("lo", "", "10.9.9.9").value(), "127.0.0.1");
  absl::StatusOr<std::string> bad = ChoosePublishAddress("nosuchif0", "", "");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("lo"), std::string::npos) << bad.status();
  EXPECT_FALSE(ChoosePublishAddress("lo", "1.2.3.4", "").ok());
  EXPECT_EQ(ChoosePublishAddress("", "", "").value(), "127.0.0.1");  // file://: loopback
}

}  // namespace
}  // namespace tether
