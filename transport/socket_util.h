// Socket utilities of the TCP transport: addresses ("host:port", "[v6]:port") parsed, resolved
// and printed, the per-connection socket options, and the transport's one-line error log.
//
//   std::string host;
//   int port = 0;
//   TETHER_RETURN_IF_ERROR(socket_util::SplitHostPort("[::1]:41234", &host, &port));
//   sockaddr_storage addr;
//   socklen_t len = 0;
//   TETHER_RETURN_IF_ERROR(socket_util::Resolve(host, port, /*passive=*/false, &addr, &len));
//   socket_util::Log(absl::StrCat("dialing ", socket_util::SockaddrText(addr)));
//
// Plain functions without state: any thread. Errors are absl::Status values (kInvalidArgument
// for an address that does not parse or resolve); nothing here throws or keeps a socket.
#ifndef TETHER_TRANSPORT_SOCKET_UTIL_H_
#define TETHER_TRANSPORT_SOCKET_UTIL_H_

#include <sys/socket.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tether::socket_util {

// Writes "tether: <message>\n" to stderr with one write(2), so lines of concurrent writers do not
// interleave.
void Log(absl::string_view message);

// strerror(err).
std::string ErrnoText(int err);

// "a.b.c.d:port", "[v6]:port", or "?" for another family.
std::string SockaddrText(const sockaddr_storage& address);
// The port of an IPv4 or IPv6 address (host byte order); 0 for another family.
int SockaddrPort(const sockaddr_storage& address);

// Splits "host:port" or "[v6]:port" (the brackets removed). kInvalidArgument without a ':port',
// with an empty host, or a port outside 1..65535.
absl::Status SplitHostPort(absl::string_view address, std::string* host, int* port);

// Resolves `host` (a literal address or a name; empty with `passive`: every interface) to its
// first TCP address. kInvalidArgument if it does not resolve.
absl::Status Resolve(const std::string& host, int port, bool passive, sockaddr_storage* out,
                     socklen_t* len);

// Dead-peer detection of a connection: keepalive probes after `idle` of silence, every
// `interval`, `count` of them; TCP_USER_TIMEOUT for data left unacknowledged. Durations are
// rounded down to whole seconds (at least 1) for the probes, to milliseconds for the timeout.
struct KeepaliveOptions {
  absl::Duration idle = absl::Seconds(10);
  absl::Duration interval = absl::Seconds(2);
  int count = 3;
  absl::Duration user_timeout = absl::Seconds(30);
};

// Sets TCP_NODELAY, SO_KEEPALIVE and the options above on a connected (or connecting) socket.
// Best effort: a failing setsockopt is ignored.
void SetSocketOptions(int fd, const KeepaliveOptions& options);

}  // namespace tether::socket_util

#endif  // TETHER_TRANSPORT_SOCKET_UTIL_H_
