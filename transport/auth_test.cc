#include "transport/auth.h"

#include "gtest/gtest.h"

namespace tether {
namespace {

TEST(AuthTest, HandshakeRoundTrip) {
  HandshakeRecord r;
  r.kind = HandshakeKind::kProof;
  r.authenticated = true;
  r.from = 3;
  r.to = 1;
  r.nonce = RandomNonce().value();
  r.mac = DialerMac("secret", 3, 1, r.nonce, Nonce{});
  uint8_t bytes[kHandshakeSize];
  EncodeHandshake(r, bytes);
  HandshakeRecord d = DecodeHandshake(bytes, HandshakeKind::kProof).value();
  EXPECT_EQ(d.from, 3);
  EXPECT_EQ(d.to, 1);
  EXPECT_TRUE(d.authenticated);
  EXPECT_EQ(d.nonce, r.nonce);
  EXPECT_TRUE(MacEquals(d.mac, r.mac));
  EXPECT_EQ(DecodeHandshake(bytes, HandshakeKind::kHello).status().code(),
            absl::StatusCode::kInvalidArgument);
  bytes[0] ^= 1;
  EXPECT_EQ(DecodeHandshake(bytes, HandshakeKind::kProof).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AuthTest, MacsDependOnTokenRoleIdsAndNonces) {
  Nonce a = RandomNonce().value(), b = RandomNonce().value();
  EXPECT_NE(a, b);
  Mac m = AcceptorMac("t", 1, 0, a, b);
  EXPECT_TRUE(MacEquals(m, AcceptorMac("t", 1, 0, a, b)));
  EXPECT_FALSE(MacEquals(m, AcceptorMac("u", 1, 0, a, b)));
  EXPECT_FALSE(MacEquals(m, DialerMac("t", 1, 0, a, b)));
  EXPECT_FALSE(MacEquals(m, AcceptorMac("t", 2, 0, a, b)));
  EXPECT_FALSE(MacEquals(m, AcceptorMac("t", 1, 0, b, a)));
}

TEST(AuthTest, VerifyPeerMac) {
  HandshakeRecord r;
  Mac good = AcceptorMac("t", 1, 0, Nonce{}, Nonce{});
  EXPECT_TRUE(VerifyPeerMac("", r, good).ok());
  r.authenticated = true;
  EXPECT_EQ(VerifyPeerMac("", r, good).code(),
            absl::StatusCode::kUnauthenticated);
  r.mac = good;
  EXPECT_TRUE(VerifyPeerMac("t", r, good).ok());
  r.mac[0] ^= 1;
  EXPECT_EQ(VerifyPeerMac("t", r, good).code(),
            absl::StatusCode::kUnauthenticated);
  r.authenticated = false;
  EXPECT_EQ(VerifyPeerMac("t", r, good).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(AuthTest, Loopback) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("localhost"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
}

}  // namespace
}  // namespace tether
