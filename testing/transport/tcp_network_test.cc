#include "transport/tcp_network.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "testing/network_conformance.h"
#include "testing/transport/tcp_harness.h"
#include "transport/auth.h"
#include "transport/frame.h"
#include "transport/thread_pool.h"

namespace tether {
namespace {

using testing::NetworkConformanceTest;
// The raw sockets below write to connections the network closes on purpose.
const bool kIgnoreSigpipe = [] {
  signal(SIGPIPE, SIG_IGN);
  return true;
}();

using testing::TcpHarness;

INSTANTIATE_TEST_SUITE_P(Tcp, NetworkConformanceTest,
                         ::testing::Values(testing::TcpNetworkFactory(),
                                           testing::PooledTcpNetworkFactory(),
                                           testing::AuthenticatedTcpNetworkFactory()),
                         testing::NetworkFactoryName);

// Thread-safe observer for the tests below.
class Recorder : public NetworkObserver {
 public:
  void OnMessage(Message m) override {
    absl::MutexLock lock(&mu_);
    messages_.push_back(std::move(m));
  }
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override {
    absl::MutexLock lock(&mu_);
    failures_.emplace_back(peer, reason);
  }
  size_t count() {
    absl::MutexLock lock(&mu_);
    return messages_.size();
  }
  std::vector<std::pair<WorkerId, absl::Status>> failures() {
    absl::MutexLock lock(&mu_);
    return failures_;
  }

 private:
  absl::Mutex mu_;
  std::vector<Message> messages_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<WorkerId, absl::Status>> failures_ ABSL_GUARDED_BY(mu_);
};

bool WaitFor(const std::function<bool()>& done) {
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

int ConnectTo(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

// Reads until the peer closes the connection (true) or 30 s pass (false).
bool ClosedByPeer(int fd) {
  timeval tv{30, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char buf[4096];
  while (true) {
    ssize_t r = read(fd, buf, sizeof(buf));
    if (r == 0 || (r < 0 && errno == ECONNRESET)) return true;
    if (r < 0) return false;
  }
}

Message Ping(uint64_t seq) {
  Message m;
  m.envelope.set_type(wire::TEST_CALL);
  m.envelope.set_request_id(seq);
  return m;
}

// Two working networks plus raw sockets that misbehave against worker 0.
struct Pair {
  explicit Pair(const std::function<void(TcpNetworkOptions&)>& tweak = nullptr)
      : harness(2, tweak) {
    EXPECT_TRUE(harness.network(0)->Start(&rec[0]).ok());
    EXPECT_TRUE(harness.network(1)->Start(&rec[1]).ok());
  }
  // Worker 1 and worker 0 still talk to each other.
  void ExpectStillServing() {
    size_t before0 = rec[0].count(), before1 = rec[1].count();
    ASSERT_TRUE(harness.network(1)->Send(0, Ping(1)).ok());
    ASSERT_TRUE(harness.network(0)->Send(1, Ping(2)).ok());
    EXPECT_TRUE(WaitFor(
        [&] { return rec[0].count() > before0 && rec[1].count() > before1; }));
    EXPECT_TRUE(rec[0].failures().empty());
    EXPECT_TRUE(rec[1].failures().empty());
  }
  Recorder rec[2];  // Outlives the networks.
  TcpHarness harness;
};

std::string HelloBytes(int from, int to, bool authenticated) {
  HandshakeRecord r;
  r.kind = HandshakeKind::kHello;
  r.authenticated = authenticated;
  r.from = from;
  r.to = to;
  uint8_t b[kHandshakeSize];
  EncodeHandshake(r, b);
  return std::string(reinterpret_cast<char*>(b), kHandshakeSize);
}

TEST(TcpNetworkTest, GarbageConnectionIsRefusedWhileServingOthers) {
  Pair pair;
  pair.ExpectStillServing();
  int fd = ConnectTo(pair.harness.tcp(0)->port());
  std::string junk =
      "GET / HTTP/1.1\r\nHost: example\r\n\r\n" + std::string(200, 'x');
  ASSERT_EQ(write(fd, junk.data(), junk.size()),
            static_cast<ssize_t>(junk.size()));
  EXPECT_TRUE(ClosedByPeer(fd));
  close(fd);
  EXPECT_GE(pair.harness.tcp(0)->GetStats()["bad_input_connections"], 1);
  pair.ExpectStillServing();
}

TEST(TcpNetworkTest, HandshakeFromUnknownWorkerIsRefused) {
  Pair pair;
  int fd = ConnectTo(pair.harness.tcp(0)->port());
  std::string hello = HelloBytes(7, 0, false);
  ASSERT_EQ(write(fd, hello.data(), hello.size()),
            static_cast<ssize_t>(hello.size()));
  EXPECT_TRUE(ClosedByPeer(fd));
  close(fd);
  pair.ExpectStillServing();
}

TEST(TcpNetworkTest, UnauthenticatedPeerIsRefused) {
  // Workers 0 and 1 run; worker 2 exists but has not connected yet, so
  // impostors claim its id (and that of the connected worker 1). None may
  // disturb the real workers.
  Recorder rec[2];
  TcpHarness h(3, [](TcpNetworkOptions& o) { o.auth_token = "right"; });
  ASSERT_TRUE(h.network(0)->Start(&rec[0]).ok());
  ASSERT_TRUE(h.network(1)->Start(&rec[1]).ok());
  // Worker 1 is connected before the impostors come.
  ASSERT_TRUE(h.network(1)->Send(0, Ping(0)).ok());
  ASSERT_TRUE(WaitFor([&] { return rec[0].count() == 1; }));
  for (int claimed : {1, 2}) {
    for (bool claims_auth : {false, true}) {
      int fd = ConnectTo(h.tcp(0)->port());
      std::string hello = HelloBytes(claimed, 0, claims_auth);
      ASSERT_EQ(write(fd, hello.data(), hello.size()),
                static_cast<ssize_t>(hello.size()));
      if (claims_auth) {
        // Read the challenge, answer with a forged proof, then a frame that
        // must never be decoded.
        uint8_t b[kHandshakeSize];
        size_t have = 0;
        while (have < kHandshakeSize) {
          ssize_t r = read(fd, b + have, kHandshakeSize - have);
          if (r <= 0) break;
          have += r;
        }
        if (have == kHandshakeSize) {
          HandshakeRecord proof;
          proof.kind = HandshakeKind::kProof;
          proof.authenticated = true;
          proof.from = claimed;
          proof.to = 0;
          proof.nonce =
              DecodeHandshake(b, HandshakeKind::kAcceptHello).value().nonce;
          EncodeHandshake(proof, b);
          ASSERT_EQ(write(fd, b, kHandshakeSize),
                    static_cast<ssize_t>(kHandshakeSize));
          EncodedFrame f = EncodeFrame(Ping(99)).value();
          (void)!write(fd, f.header, kFrameHeaderSize);
          (void)!write(fd, f.envelope.data(), f.envelope.size());
        }
      }
      EXPECT_TRUE(ClosedByPeer(fd));
      close(fd);
    }
  }
  // The two impostors for worker 2 were refused for authentication; those for
  // worker 1 earlier, as a second connection.
  EXPECT_EQ(h.tcp(0)->GetStats()["refused_connections"], 2);
  EXPECT_EQ(h.tcp(0)->GetStats()["bad_input_connections"], 4);
  ASSERT_TRUE(h.network(1)->Send(0, Ping(1)).ok());
  EXPECT_TRUE(WaitFor([&] { return rec[0].count() == 2; }));
  EXPECT_TRUE(rec[0].failures().empty());
  EXPECT_TRUE(rec[1].failures().empty());
  h.network(0)->Stop();
  h.network(1)->Stop();
}

TEST(TcpNetworkTest, WrongTokenFailsOnlyThatPeer) {
  // Worker 2 has another token: 0 and 1 report it failed, and keep talking.
  Recorder rec[3];
  TcpHarness h(3, [](TcpNetworkOptions& o) {
    o.auth_token = o.self == 2 ? "other" : "right";
    o.connect_timeout =
        absl::Milliseconds(500);  // How long 0 and 1 wait for 2 to dial in.
  });
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(h.network(i)->Start(&rec[i]).ok());
  ASSERT_TRUE(h.network(0)->Send(2, Ping(0)).ok());
  EXPECT_TRUE(WaitFor([&] { return !rec[0].failures().empty(); }));
  EXPECT_TRUE(WaitFor([&] { return !rec[1].failures().empty(); }));
  EXPECT_EQ(rec[0].failures()[0].first, 2);
  EXPECT_EQ(rec[1].failures()[0].first, 2);
  // Worker 2 learns why: its peers' proofs do not match its token.
  EXPECT_TRUE(WaitFor([&] { return rec[2].failures().size() == 2; }));
  EXPECT_NE(rec[2].failures()[0].second.message().find("authentication"),
            std::string::npos)
      << rec[2].failures()[0].second;
  EXPECT_EQ(rec[2].count(), 0u);
  ASSERT_TRUE(h.network(0)->Send(1, Ping(1)).ok());
  EXPECT_TRUE(WaitFor([&] { return rec[1].count() == 1; }));
  EXPECT_EQ(rec[0].failures().size(), 1u);
}

TEST(TcpNetworkTest, BadFrameFromAWorkerFailsOnlyThatWorker) {
  // Worker 0 accepts at most 1000-byte buffers; worker 2 sends a bigger one.
  Recorder rec[3];
  TcpHarness h(3, [](TcpNetworkOptions& o) {
    if (o.self == 0) o.limits.max_buffer_bytes = 1000;
  });
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(h.network(i)->Start(&rec[i]).ok());
  Message big = Ping(0);
  big.buffers.push_back(Buffer::CopyFrom(std::string(5000, 'b')));
  ASSERT_TRUE(h.network(2)->Send(0, std::move(big)).ok());
  EXPECT_TRUE(WaitFor([&] { return !rec[0].failures().empty(); }));
  auto f = rec[0].failures();
  EXPECT_EQ(f[0].first, 2);
  EXPECT_NE(f[0].second.message().find("exceeds the limit"), std::string::npos)
      << f[0].second;
  EXPECT_NE(f[0].second.message().find(h.tcp(2)->listen_address()),
            std::string::npos)
      << f[0].second;
  EXPECT_EQ(rec[0].count(), 0u);
  ASSERT_TRUE(h.network(1)->Send(0, Ping(1)).ok());
  EXPECT_TRUE(WaitFor([&] { return rec[0].count() == 1; }));
  EXPECT_EQ(rec[0].failures().size(), 1u);
}

TEST(TcpNetworkTest, SilentConnectionIsClosedAfterHandshakeTimeout) {
  Pair pair([](TcpNetworkOptions& o) {
    o.handshake_timeout = absl::Milliseconds(100);
  });
  int fd = ConnectTo(pair.harness.tcp(0)->port());
  (void)!write(fd, "TT", 2);  // A truncated handshake, then silence.
  EXPECT_TRUE(ClosedByPeer(fd));
  close(fd);
  pair.ExpectStillServing();
}

TEST(TcpNetworkTest, StopSaysGoodbyeAndAbortDoesNot) {
  {
    Pair pair;
    pair.ExpectStillServing();
    pair.harness.network(1)->Stop();
    ASSERT_TRUE(WaitFor([&] { return !pair.rec[0].failures().empty(); }));
    auto f = pair.rec[0].failures();
    EXPECT_NE(f[0].second.message().find("stopped"), std::string::npos)
        << f[0].second;
  }
  {
    Pair pair;
    pair.ExpectStillServing();
    pair.harness.tcp(1)->Abort();
    ASSERT_TRUE(WaitFor([&] { return !pair.rec[0].failures().empty(); }));
    auto f = pair.rec[0].failures();
    EXPECT_EQ(f[0].second.message().find("stopped"), std::string::npos)
        << f[0].second;
  }
}

TEST(TcpNetworkTest, SendToSelfIsDeliveredInOrder) {
  Pair pair;
  for (int i = 0; i < 10; ++i)
    ASSERT_TRUE(pair.harness.network(0)->Send(0, Ping(i)).ok());
  EXPECT_TRUE(WaitFor([&] { return pair.rec[0].count() == 10; }));
}

TEST(TcpNetworkTest, UnreachablePeerFailsAfterConnectTimeout) {
  // Worker 1's address points at a port nobody listens on.
  TcpNetworkOptions o;
  o.self = 1;
  o.connect_timeout = absl::Milliseconds(300);
  Recorder rec;
  auto net = TcpNetwork::Listen(o).value();
  auto dead = TcpNetwork::Listen(TcpNetworkOptions{.self = 0}).value();
  std::string address = dead->listen_address();
  dead.reset();  // Nobody listens there any more.
  ASSERT_TRUE(net->SetPeers({{0, address}}).ok());
  ASSERT_TRUE(net->Start(&rec).ok());
  ASSERT_TRUE(net->Send(0, Ping(0)).ok());  // Queued while dialing.
  EXPECT_TRUE(WaitFor([&] { return !rec.failures().empty(); }));
  EXPECT_NE(rec.failures()[0].second.message().find("could not connect"),
            std::string::npos);
  EXPECT_EQ(net->Send(0, Ping(1)).code(), absl::StatusCode::kUnavailable);
  net->Stop();
}

TEST(TcpNetworkTest, BadPeerAddressesAreRejected) {
  auto net = TcpNetwork::Listen(TcpNetworkOptions{.self = 0}).value();
  EXPECT_EQ(net->SetPeers({{1, "no-port"}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(net->SetPeers({{0, "127.0.0.1:5"}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(net->SetPeers({{1, "127.0.0.1:99999"}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TcpNetwork::Listen(
                TcpNetworkOptions{.self = 0, .listen_host = "256.1.1.1"})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tether
