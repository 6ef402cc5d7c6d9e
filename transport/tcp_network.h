// TcpNetwork: the real-run Network (core/network.h) over TCP.
//
//   TcpNetworkOptions o;
//   o.self = rank;
//   o.listen_host = "10.0.0.5";
//   auto net = TcpNetwork::Listen(o).value();               // binds an ephemeral port
//   publish(net->listen_address());                         // e.g. through the rendezvous store
//   net->SetPeers({{0, "10.0.0.4:41234"}, ...});            // every other worker's address
//   net->Start(observer);
//   net->Send(0, message);
//   ...
//   net->Stop();
//
// Design:
// - One event-loop thread (epoll) per network reads every connection, accepts, dials and runs the
//   handshake. Send() writes from the caller's thread when the socket has room (so a request costs
//   no thread hop) and leaves the rest to the loop (EPOLLOUT). One connection per pair of workers:
//   the worker with the higher id dials the lower one at Start(), so two workers never dial each
//   other at once; messages sent before the connection is up wait in its queue.
// - Frames (transport/frame.h): header + serialized envelope + the buffers written with one
//   scatter-gather sendmsg straight from the Buffers; received buffers are read straight into
//   Buffer::Allocate'd storage. TCP_NODELAY, TCP keepalive and TCP_USER_TIMEOUT are set, so a peer
//   that stops answering is reported too.
// - Every connection begins with the handshake of transport/auth.h (ids, and an HMAC challenge both
//   ways when a token is set; the steps are transport/handshake.h's); no envelope is decoded
//   before it succeeds.
// - Bad input (a failed handshake, a frame beyond FrameLimits, garbage) closes that connection and
//   logs an error naming the peer's address on stderr; if the connection belonged to a worker, that
//   worker is reported failed. Every other connection is unaffected.
// - A peer that closes, resets or times out is reported once through OnPeerFailed (on the loop
//   thread); from then on Send() to it returns kUnavailable.
// - Stop() stops delivering, flushes what was queued (bounded by stop_flush_timeout), closes every
//   connection and joins the loop. It may be called from an observer callback (then the bounded
//   flush finishes on the loop thread after Stop() returns, with no callbacks).
//
// Pieces: transport/socket_util.h (addresses, socket options, the error log),
// transport/event_loop.h (the epoll set and its wake-up), transport/handshake.h (the handshake's
// records and checks).
//
// Observer callbacks run on the loop thread (in pooled mode: on the pool thread
// polling at the time), one at a time. All public methods are thread-safe.
#ifndef TETHER_TRANSPORT_TCP_NETWORK_H_
#define TETHER_TRANSPORT_TCP_NETWORK_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/network.h"
#include "transport/frame.h"
#include "transport/thread_pool.h"

namespace tether {

struct TcpNetworkOptions {
  WorkerId self = -1;
  // Address to listen on ("0.0.0.0" or "::" for every interface) and port (0:
  // ephemeral).
  std::string listen_host = "127.0.0.1";
  int listen_port = 0;
  // Shared secret; empty: $TETHER_AUTH_TOKEN, and if that is unset too, no
  // authentication (with a warning, once per process, unless every address is
  // loopback).
  std::string auth_token;
  FrameLimits limits;
  // How long to keep dialing a lower-id peer (or to wait for a higher-id one to
  // dial in).
  absl::Duration connect_timeout = absl::Seconds(60);
  // A connection that has not finished its handshake by then is closed.
  absl::Duration handshake_timeout = absl::Seconds(10);
  // Bound on Stop()'s flush of queued messages.
  absl::Duration stop_flush_timeout = absl::Seconds(5);
  // Dead-peer detection: keepalive probes after `keepalive_idle` of silence,
  // and TCP_USER_TIMEOUT for data left unacknowledged.
  absl::Duration keepalive_idle = absl::Seconds(10);
  absl::Duration keepalive_interval = absl::Seconds(2);
  int keepalive_count = 3;
  absl::Duration user_timeout = absl::Seconds(30);
  // Pooled mode: no thread of its own; the pool's idle threads take turns
  // running the event loop (leader/followers, see thread_pool.h), so a
  // received request's handler and a reply's callbacks run without a thread
  // switch. The pool (>= 2 threads) must outlive the network. Null: the
  // network runs its own event-loop thread.
  ThreadPool* poll_with = nullptr;
};

class TcpNetwork : public Network {
 public:
  // Binds and listens. kInvalidArgument for a bad host, kUnavailable if the
  // bind fails.
  static absl::StatusOr<std::unique_ptr<TcpNetwork>> Listen(TcpNetworkOptions options);
  ~TcpNetwork() override;

  TcpNetwork(const TcpNetwork&) = delete;
  TcpNetwork& operator=(const TcpNetwork&) = delete;

  // The bound port and "host:port" (IPv6 hosts in brackets), for publishing.
  int port() const;
  std::string listen_address() const;

  // Every other worker's "host:port". Call once, before Start().
  // kInvalidArgument for an address that does not parse or resolve, or an entry
  // for this worker itself.
  absl::Status SetPeers(const std::map<WorkerId, std::string>& addresses);

  // Network.
  WorkerId self() const override;
  absl::Status Start(NetworkObserver* observer) override;
  absl::Status Send(WorkerId to, Message message) override;
  void Stop() override;

  // Crashes this worker as its peers see it: resets every connection (no flush)
  // and stops at once, delivering nothing more. For tests.
  void Abort();

  // Counters: messages_sent, messages_received, bad_input_connections,
  // refused_connections, peers_failed.
  std::map<std::string, int64_t> GetStats() const;

  class Impl;

 private:
  explicit TcpNetwork(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tether

#endif  // TETHER_TRANSPORT_TCP_NETWORK_H_
