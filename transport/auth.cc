#include "transport/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "transport/little_endian.h"

namespace tether {
namespace {

using le::Get16;
using le::Get32;
using le::Put16;
using le::Put32;

Mac ComputeMac(absl::string_view token, absl::string_view label, int32_t dialer,
               int32_t acceptor, const Nonce& first, const Nonce& second) {
  uint8_t data[64 + 8 + 2 * 32];
  size_t n = 0;
  std::memcpy(data, label.data(), label.size());
  n += label.size();
  Put32(data + n, static_cast<uint32_t>(dialer));
  Put32(data + n + 4, static_cast<uint32_t>(acceptor));
  n += 8;
  std::memcpy(data + n, first.data(), 32);
  std::memcpy(data + n + 32, second.data(), 32);
  n += 64;
  Mac mac{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), token.data(), static_cast<int>(token.size()), data, n,
       mac.data(), &len);
  return mac;
}

}  // namespace

void EncodeHandshake(const HandshakeRecord& r, uint8_t out[kHandshakeSize]) {
  Put32(out, kHandshakeMagic);
  Put16(out + 4, kHandshakeVersion);
  Put16(out + 6, static_cast<uint16_t>(r.kind) | (r.authenticated ? 0x100 : 0));
  Put32(out + 8, static_cast<uint32_t>(r.from));
  Put32(out + 12, static_cast<uint32_t>(r.to));
  std::memcpy(out + 16, r.nonce.data(), 32);
  std::memcpy(out + 48, r.mac.data(), 32);
}

absl::StatusOr<HandshakeRecord> DecodeHandshake(
    const uint8_t in[kHandshakeSize], HandshakeKind expected) {
  if (Get32(in) != kHandshakeMagic) {
    return absl::InvalidArgumentError("not a Tether handshake (wrong magic)");
  }
  uint16_t version = Get16(in + 4);
  if (version != kHandshakeVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported handshake version ", version,
                     " (this worker speaks ", kHandshakeVersion, ")"));
  }
  uint16_t word = Get16(in + 6);
  HandshakeRecord r;
  r.kind = static_cast<HandshakeKind>(word & 0xff);
  if (r.kind != expected || (word & ~0x1ffu) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected handshake record 0x", absl::Hex(word),
                     " (wanted kind ", static_cast<int>(expected), ")"));
  }
  r.authenticated = (word & 0x100) != 0;
  r.from = static_cast<int32_t>(Get32(in + 8));
  r.to = static_cast<int32_t>(Get32(in + 12));
  std::memcpy(r.nonce.data(), in + 16, 32);
  std::memcpy(r.mac.data(), in + 48, 32);
  return r;
}

absl::StatusOr<Nonce> RandomNonce() {
  Nonce n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    return absl::InternalError(
        "OpenSSL could not produce random bytes for a handshake nonce");
  }
  return n;
}

Mac AcceptorMac(absl::string_view token, int32_t dialer, int32_t acceptor,
                const Nonce& nonce_d, const Nonce& nonce_a) {
  return ComputeMac(token, "tether-accept-v1", dialer, acceptor, nonce_d,
                    nonce_a);
}

Mac DialerMac(absl::string_view token, int32_t dialer, int32_t acceptor,
              const Nonce& nonce_d, const Nonce& nonce_a) {
  return ComputeMac(token, "tether-dial-v1", dialer, acceptor, nonce_a,
                    nonce_d);
}

bool MacEquals(const Mac& a, const Mac& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

absl::Status VerifyPeerMac(absl::string_view token,
                           const HandshakeRecord& record, const Mac& expected) {
  if (token.empty()) {
    if (record.authenticated) {
      return absl::UnauthenticatedError(
          "the peer uses an authentication token but this worker has none (set "
          "TETHER_AUTH_TOKEN on every worker)");
    }
    return absl::OkStatus();
  }
  if (!record.authenticated) {
    return absl::UnauthenticatedError(
        "the peer did not authenticate: this worker requires a token and the "
        "peer has none");
  }
  if (!MacEquals(record.mac, expected)) {
    return absl::UnauthenticatedError(
        "the peer's authentication proof is wrong (different token)");
  }
  return absl::OkStatus();
}

std::string TokenFromEnvironment() {
  const char* v = std::getenv("TETHER_AUTH_TOKEN");
  return v == nullptr ? "" : v;
}

bool IsLoopbackHost(absl::string_view host) {
  return host == "localhost" || host == "::1" || host == "[::1]" ||
         absl::StartsWith(host, "127.");
}

}  // namespace tether
