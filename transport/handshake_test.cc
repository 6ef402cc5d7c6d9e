#include "transport/handshake.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "gtest/gtest.h"

namespace tether {
namespace {

Nonce MakeNonce(uint8_t seed) {
  Nonce n;
  for (size_t i = 0; i < n.size(); ++i) n[i] = static_cast<uint8_t>(seed + i);
  return n;
}

struct Bytes {
  explicit Bytes(const HandshakeRecord& r) { EncodeHandshake(r, data); }
  uint8_t data[kHandshakeSize];
};

// Runs the three records between dialer 2 and acceptor 1; returns the first failure.
absl::Status Exchange(const std::string& dialer_token, const std::string& acceptor_token) {
  const Nonce nd = MakeNonce(1), na = MakeNonce(100);
  Bytes hello(MakeHello(dialer_token, 2, 1, nd));
  absl::StatusOr<HandshakeRecord> h = CheckHello(hello.data, 1);
  if (!h.ok()) return h.status();
  if (h->from != 2 || h->nonce != nd) return absl::InternalError("hello garbled");
  absl::Status auth = VerifyPeerMac(acceptor_token, *h, h->mac);
  if (!auth.ok()) return auth;
  Bytes accept(MakeAcceptHello(acceptor_token, 1, h->from, h->nonce, na));
  absl::StatusOr<HandshakeRecord> a = CheckAcceptHello(accept.data, dialer_token, 2, 1, nd);
  if (!a.ok()) return a.status();
  Bytes proof(MakeProof(dialer_token, 2, 1, nd, a->nonce));
  return CheckProof(proof.data, acceptor_token, 1, 2, nd, na);
}

TEST(HandshakeTest, BothSidesAgreeWithAndWithoutAToken) {
  EXPECT_TRUE(Exchange("", "").ok());
  EXPECT_TRUE(Exchange("secret", "secret").ok());
}

TEST(HandshakeTest, TokenMismatchesAreRefused) {
  EXPECT_EQ(Exchange("secret", "other").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(Exchange("secret", "").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(Exchange("", "secret").code(), absl::StatusCode::kUnauthenticated);
}

TEST(HandshakeTest, HelloMustBeAHelloForThisWorker) {
  Bytes hello(MakeHello("", 2, 3, MakeNonce(1)));
  absl::StatusOr<HandshakeRecord> r = CheckHello(hello.data, 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "handshake addressed to worker 3, but this is worker 1");
  Bytes proof(MakeProof("", 2, 1, MakeNonce(1), MakeNonce(2)));
  EXPECT_EQ(CheckHello(proof.data, 1).status().code(), absl::StatusCode::kInvalidArgument);
  uint8_t junk[kHandshakeSize] = {};
  EXPECT_FALSE(CheckHello(junk, 1).ok());
}

TEST(HandshakeTest, AcceptHelloFromTheWrongWorkerOrWithTheWrongMac) {
  const Nonce nd = MakeNonce(1), na = MakeNonce(100);
  Bytes wrong_peer(MakeAcceptHello("t", 4, 2, nd, na));
  absl::StatusOr<HandshakeRecord> r = CheckAcceptHello(wrong_peer.data, "t", 2, 1, nd);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "the peer answered as worker 4 to worker 2");
  // A MAC over another dialer nonce (a replayed answer) does not verify.
  Bytes replayed(MakeAcceptHello("t", 1, 2, MakeNonce(9), na));
  EXPECT_EQ(CheckAcceptHello(replayed.data, "t", 2, 1, nd).status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(HandshakeTest, ProofMustMatchItsHello) {
  const Nonce nd = MakeNonce(1), na = MakeNonce(100);
  Bytes other_nonce(MakeProof("t", 2, 1, MakeNonce(5), na));
  absl::Status s = CheckProof(other_nonce.data, "t", 1, 2, nd, na);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "the handshake proof does not match its hello");
  Bytes other_worker(MakeProof("t", 3, 1, nd, na));
  EXPECT_EQ(CheckProof(other_worker.data, "t", 1, 2, nd, na).code(),
            absl::StatusCode::kInvalidArgument);
  Bytes stale_mac(MakeProof("t", 2, 1, nd, MakeNonce(50)));  // over another acceptor nonce
  EXPECT_EQ(CheckProof(stale_mac.data, "t", 1, 2, nd, na).code(),
            absl::StatusCode::kUnauthenticated);
}

class SocketPairTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds_), 0); }
  void TearDown() override {
    if (fds_[0] >= 0) close(fds_[0]);
    if (fds_[1] >= 0) close(fds_[1]);
  }
  int fds_[2] = {-1, -1};
};

TEST_F(SocketPairTest, BufferCollectsARecordInPieces) {
  HandshakeRecord hello = MakeHello("", 2, 1, MakeNonce(3));
  Bytes bytes(hello);
  HandshakeBuffer buf;
  int err = -1;
  EXPECT_EQ(buf.ReadFrom(fds_[1], &err), HandshakeBuffer::kWouldBlock);
  ASSERT_EQ(write(fds_[0], bytes.data, 30), 30);
  EXPECT_EQ(buf.ReadFrom(fds_[1], &err), HandshakeBuffer::kWouldBlock);
  ASSERT_EQ(write(fds_[0], bytes.data + 30, kHandshakeSize - 30),
            static_cast<ssize_t>(kHandshakeSize - 30));
  ASSERT_EQ(buf.ReadFrom(fds_[1], &err), HandshakeBuffer::kComplete);
  absl::StatusOr<HandshakeRecord> r = CheckHello(buf.record(), 1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->nonce, MakeNonce(3));
  // The next read starts a new record: a full second one, then EOF.
  ASSERT_TRUE(SendHandshake(fds_[0], hello, "peer").ok());
  ASSERT_EQ(buf.ReadFrom(fds_[1], &err), HandshakeBuffer::kComplete);
  EXPECT_TRUE(CheckHello(buf.record(), 1).ok());
  close(fds_[0]);
  fds_[0] = -1;
  EXPECT_EQ(buf.ReadFrom(fds_[1], &err), HandshakeBuffer::kClosed);
  EXPECT_EQ(err, 0);
}

TEST_F(SocketPairTest, SendToAClosedPeerIsUnavailable) {
  close(fds_[1]);
  fds_[1] = -1;
  absl::Status s = SendHandshake(fds_[0], MakeHello("", 2, 1, MakeNonce(0)), "10.0.0.9:77");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("cannot write the handshake to 10.0.0.9:77: "),
            absl::string_view::npos)
      << s;
}

}  // namespace
}  // namespace tether
