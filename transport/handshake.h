// The connection handshake of the TCP transport, as steps the event loop takes: the records each
// side sends and the checks each applies to what it receives, plus the non-blocking socket I/O of
// the fixed-size records. The record format and the HMACs are transport/auth.h's.
//
//   dialer                                         acceptor
//   send MakeHello(token, self, peer, n_d)   ->    r = CheckHello(bytes, self)
//                                                  (is r.from a peer it expects? then)
//                                                  VerifyPeerMac(token, r, r.mac)
//   a = CheckAcceptHello(bytes, token, self,  <-   send MakeAcceptHello(token, self, r.from,
//           peer, n_d)                                                  r.nonce, n_a)
//   send MakeProof(token, self, peer, n_d,    ->   CheckProof(bytes, token, self, r.from,
//                  a.nonce)                                   r.nonce, n_a)
//
// Everything but HandshakeBuffer::ReadFrom and SendHandshake is pure, so both sides can be
// exercised without sockets; those two only touch the socket they are given. Errors are
// absl::Status values whose messages name what is wrong; callers add the peer's address. No
// state is shared: one HandshakeBuffer per connection, used by the thread that owns it.
#ifndef TETHER_TRANSPORT_HANDSHAKE_H_
#define TETHER_TRANSPORT_HANDSHAKE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "transport/auth.h"

namespace tether {

// Dialer, first record: its id, the acceptor's, and its nonce.
HandshakeRecord MakeHello(absl::string_view token, int32_t self, int32_t to, const Nonce& nonce);

// Acceptor: decodes the dialer's hello and checks it is addressed to `self`. Which workers may dial
// and whether the MAC settings agree (VerifyPeerMac) are the caller's checks, in that order.
absl::StatusOr<HandshakeRecord> CheckHello(const uint8_t in[kHandshakeSize], int32_t self);

// Acceptor's answer: its nonce, and with a token the MAC over both nonces.
HandshakeRecord MakeAcceptHello(absl::string_view token, int32_t self, int32_t dialer,
                                const Nonce& dialer_nonce, const Nonce& my_nonce);

// Dialer: checks the acceptor's answer comes from `peer`, is addressed to `self` and carries the
// MAC over `my_nonce` and its own. Returns it (its nonce goes into the proof).
absl::StatusOr<HandshakeRecord> CheckAcceptHello(const uint8_t in[kHandshakeSize],
                                                 absl::string_view token, int32_t self,
                                                 int32_t peer, const Nonce& my_nonce);

// Dialer's last record: the MAC over the acceptor's nonce.
HandshakeRecord MakeProof(absl::string_view token, int32_t self, int32_t peer,
                          const Nonce& my_nonce, const Nonce& acceptor_nonce);

// Acceptor: checks the proof comes from `dialer` with the nonce of its hello and the right MAC.
absl::Status CheckProof(const uint8_t in[kHandshakeSize], absl::string_view token, int32_t self,
                        int32_t dialer, const Nonce& dialer_nonce, const Nonce& my_nonce);

// Collects one record from a non-blocking socket over as many reads as it takes.
class HandshakeBuffer {
 public:
  enum Result {
    kComplete,    // record() holds a whole record; the next ReadFrom starts a new one
    kWouldBlock,  // the socket has nothing more for now
    kClosed,      // EOF (`*error` = 0) or a read error (`*error` = errno)
  };
  Result ReadFrom(int fd, int* error);
  const uint8_t* record() const { return bytes_; }

 private:
  uint8_t bytes_[kHandshakeSize];
  size_t have_ = 0;
};

// Writes `record` in one non-blocking send (it is small enough for any fresh socket).
// kUnavailable "cannot write the handshake to <address>: <reason>" otherwise.
absl::Status SendHandshake(int fd, const HandshakeRecord& record, absl::string_view address);

}  // namespace tether

#endif  // TETHER_TRANSPORT_HANDSHAKE_H_
