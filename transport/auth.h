// Peer authentication for the TCP transport: the connection handshake's records and their
// HMAC-SHA256 challenge, kept apart from the sockets so it can be tested alone (the steps each
// side takes are in transport/handshake.h).
//
// Every connection starts with three fixed-size (80-byte) handshake records
// before any frame:
//
//   dialer   -> acceptor  HELLO  {from, to, nonce_d}
//   acceptor -> dialer    HELLO  {from, to, nonce_a, mac_a}
//   dialer   -> acceptor  PROOF  {from, to, nonce_d, mac_d}
//
//   mac_a = HMAC(token, "accept" ids nonce_d nonce_a)
//   mac_d = HMAC(token, "dial" ids nonce_a nonce_d)
//
// Each side proves it knows the shared token by answering the other's fresh
// random nonce, so a recorded handshake cannot be replayed. Without a token (on
// both sides) the MACs are zero and the records only exchange ids. A side with
// a token refuses a peer without one, and vice versa. Nothing here logs;
// callers name the peer's address in their errors.
//
// The token comes from TcpNetworkOptions::auth_token or, if that is empty, the
// environment variable TETHER_AUTH_TOKEN (see TokenFromEnvironment).
#ifndef TETHER_TRANSPORT_AUTH_H_
#define TETHER_TRANSPORT_AUTH_H_

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tether {

inline constexpr size_t kHandshakeSize = 80;
inline constexpr uint32_t kHandshakeMagic = 0x53485454;  // "TTHS" on the wire.
inline constexpr uint16_t kHandshakeVersion = 1;

using Nonce = std::array<uint8_t, 32>;
using Mac = std::array<uint8_t, 32>;

enum class HandshakeKind : uint16_t { kHello = 1, kAcceptHello = 2, kProof = 3 };

struct HandshakeRecord {
  HandshakeKind kind = HandshakeKind::kHello;
  bool authenticated = false;  // The sender has a token (and `mac` is meaningful).
  int32_t from = -1;
  int32_t to = -1;
  Nonce nonce{};
  Mac mac{};
};

void EncodeHandshake(const HandshakeRecord& record, uint8_t out[kHandshakeSize]);
// kInvalidArgument naming what is wrong (not a Tether handshake, version,
// kind).
absl::StatusOr<HandshakeRecord> DecodeHandshake(const uint8_t in[kHandshakeSize],
                                                HandshakeKind expected);

// A fresh random nonce (OpenSSL's CSPRNG).
absl::StatusOr<Nonce> RandomNonce();

// The MAC the acceptor (dialer) sends: HMAC-SHA256 over a role label, both ids
// and both nonces.
Mac AcceptorMac(absl::string_view token, int32_t dialer, int32_t acceptor, const Nonce& nonce_d,
                const Nonce& nonce_a);
Mac DialerMac(absl::string_view token, int32_t dialer, int32_t acceptor, const Nonce& nonce_d,
              const Nonce& nonce_a);
// Constant-time comparison.
bool MacEquals(const Mac& a, const Mac& b);

// Checks that a peer's record matches our token setting and, with a token,
// carries `expected`. kUnauthenticated with a clear reason otherwise.
absl::Status VerifyPeerMac(absl::string_view token, const HandshakeRecord& record,
                           const Mac& expected);

// $TETHER_AUTH_TOKEN, or "" if unset.
std::string TokenFromEnvironment();

// Whether `host` (a literal address or name) is a loopback address ("127.x",
// "::1", "localhost").
bool IsLoopbackHost(absl::string_view host);

}  // namespace tether

#endif  // TETHER_TRANSPORT_AUTH_H_
