#include "transport/handshake.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "transport/socket_util.h"

namespace tether {

HandshakeRecord MakeHello(absl::string_view token, int32_t self, int32_t to, const Nonce& nonce) {
  HandshakeRecord hello;
  hello.kind = HandshakeKind::kHello;
  hello.authenticated = !token.empty();
  hello.from = self;
  hello.to = to;
  hello.nonce = nonce;
  return hello;
}

absl::StatusOr<HandshakeRecord> CheckHello(const uint8_t in[kHandshakeSize], int32_t self) {
  absl::StatusOr<HandshakeRecord> r = DecodeHandshake(in, HandshakeKind::kHello);
  if (!r.ok()) return r;
  if (r->to != self) {
    return absl::InvalidArgumentError(
        absl::StrCat("handshake addressed to worker ", r->to, ", but this is worker ", self));
  }
  return r;
}

HandshakeRecord MakeAcceptHello(absl::string_view token, int32_t self, int32_t dialer,
                                const Nonce& dialer_nonce, const Nonce& my_nonce) {
  HandshakeRecord reply;
  reply.kind = HandshakeKind::kAcceptHello;
  reply.authenticated = !token.empty();
  reply.from = self;
  reply.to = dialer;
  reply.nonce = my_nonce;
  if (!token.empty()) reply.mac = AcceptorMac(token, dialer, self, dialer_nonce, my_nonce);
  return reply;
}

absl::StatusOr<HandshakeRecord> CheckAcceptHello(const uint8_t in[kHandshakeSize],
                                                 absl::string_view token, int32_t self,
                                                 int32_t peer, const Nonce& my_nonce) {
  absl::StatusOr<HandshakeRecord> r = DecodeHandshake(in, HandshakeKind::kAcceptHello);
  if (r.ok() && (r->from != peer || r->to != self)) {
    r = absl::InvalidArgumentError(
        absl::StrCat("the peer answered as worker ", r->from, " to worker ", r->to));
  }
  if (r.ok()) {
    absl::Status auth =
        VerifyPeerMac(token, *r, AcceptorMac(token, self, peer, my_nonce, r->nonce));
    if (!auth.ok()) r = auth;
  }
  return r;
}

HandshakeRecord MakeProof(absl::string_view token, int32_t self, int32_t peer,
                          const Nonce& my_nonce, const Nonce& acceptor_nonce) {
  HandshakeRecord proof;
  proof.kind = HandshakeKind::kProof;
  proof.authenticated = !token.empty();
  proof.from = self;
  proof.to = peer;
  proof.nonce = my_nonce;
  if (!token.empty()) proof.mac = DialerMac(token, self, peer, my_nonce, acceptor_nonce);
  return proof;
}

absl::Status CheckProof(const uint8_t in[kHandshakeSize], absl::string_view token, int32_t self,
                        int32_t dialer, const Nonce& dialer_nonce, const Nonce& my_nonce) {
  absl::StatusOr<HandshakeRecord> r = DecodeHandshake(in, HandshakeKind::kProof);
  if (!r.ok()) return r.status();
  if (r->from != dialer || r->to != self || r->nonce != dialer_nonce) {
    return absl::InvalidArgumentError("the handshake proof does not match its hello");
  }
  return VerifyPeerMac(token, *r, DialerMac(token, dialer, self, dialer_nonce, my_nonce));
}

HandshakeBuffer::Result HandshakeBuffer::ReadFrom(int fd, int* error) {
  *error = 0;
  while (have_ < kHandshakeSize) {
    ssize_t r = read(fd, bytes_ + have_, kHandshakeSize - have_);
    if (r > 0) {
      have_ += r;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return kWouldBlock;
    *error = r < 0 ? errno : 0;
    return kClosed;
  }
  have_ = 0;
  return kComplete;
}

absl::Status SendHandshake(int fd, const HandshakeRecord& record, absl::string_view address) {
  uint8_t bytes[kHandshakeSize];
  EncodeHandshake(record, bytes);
  ssize_t w = send(fd, bytes, sizeof(bytes), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (w != static_cast<ssize_t>(sizeof(bytes))) {
    return absl::UnavailableError(
        absl::StrCat("cannot write the handshake to ", address, ": ",
                     w < 0 ? socket_util::ErrnoText(errno) : "short write"));
  }
  return absl::OkStatus();
}

}  // namespace tether
