#include "transport/tcp_network.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/call_once.h"
#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "transport/auth.h"
#include "transport/event_loop.h"
#include "transport/handshake.h"
#include "transport/socket_util.h"
#include "transport/thread_pool.h"

namespace tether {
namespace {

using SteadyClock = std::chrono::steady_clock;
using SteadyTime = SteadyClock::time_point;

constexpr size_t kStagingSize = 256 << 10;
constexpr size_t kDirectReadThreshold = 32 << 10;
constexpr int kMaxIov = 512;
constexpr auto kDialRetry = std::chrono::milliseconds(50);
constexpr auto kCloseLinger = std::chrono::milliseconds(500);

SteadyClock::duration ToSteady(absl::Duration d) {
  return std::chrono::duration_cast<SteadyClock::duration>(absl::ToChronoNanoseconds(d));
}

using socket_util::ErrnoText;
using socket_util::Log;
using socket_util::Resolve;
using socket_util::SockaddrText;
using socket_util::SplitHostPort;

void SetSocketOptions(int fd, const TcpNetworkOptions& o) {
  socket_util::KeepaliveOptions keepalive;
  keepalive.idle = o.keepalive_idle;
  keepalive.interval = o.keepalive_interval;
  keepalive.count = o.keepalive_count;
  keepalive.user_timeout = o.user_timeout;
  socket_util::SetSocketOptions(fd, keepalive);
}

// Event-loop keys: the listen socket's, and (EventLoop::kWakeKey) the wake-up's; connections
// count up from kFirstConnKey.
constexpr uint64_t kListenKey = 0;
constexpr uint64_t kFirstConnKey = 2;
static_assert(EventLoop::kWakeKey == 1, "the keys below kFirstConnKey are taken");

// Process-wide (python/process_state.h lists it): the warning is printed once per process,
// however many networks it makes.
ABSL_CONST_INIT absl::once_flag warn_once;

}  // namespace

class TcpNetwork::Impl {
 public:
  explicit Impl(TcpNetworkOptions options) : options_(std::move(options)) {}
  ~Impl();

  absl::Status Listen();
  absl::Status SetPeers(const std::map<WorkerId, std::string>& addresses);
  absl::Status Start(NetworkObserver* observer);
  absl::Status Send(WorkerId to, Message message);
  void Stop(bool abort);
  std::map<std::string, int64_t> GetStats() const {
    return {{"messages_sent", messages_sent_.load()},
            {"messages_received", messages_received_.load()},
            {"bad_input_connections", bad_input_.load()},
            {"refused_connections", refused_.load()},
            {"peers_failed", peers_failed_.load()}};
  }

  const TcpNetworkOptions options_;
  int port_ = 0;
  std::string listen_address_;

 private:
  enum State { kIdle, kRunning, kStopping, kStopped };

  struct Outgoing {
    EncodedFrame frame;
    size_t size;
  };

  struct Peer {
    WorkerId id = -1;
    std::string address;
    sockaddr_storage addr{};
    socklen_t addr_len = 0;

    absl::Mutex mu;
    std::deque<Outgoing> queue ABSL_GUARDED_BY(mu);
    size_t offset ABSL_GUARDED_BY(mu) = 0;      // Bytes of queue.front() written.
    int fd ABSL_GUARDED_BY(mu) = -1;            // The ready connection's socket, or -1.
    uint64_t conn_id ABSL_GUARDED_BY(mu) = 0;   // Its epoll key.
    bool want_out ABSL_GUARDED_BY(mu) = false;  // EPOLLOUT armed.
    bool failed ABSL_GUARDED_BY(mu) = false;
    absl::Status failure ABSL_GUARDED_BY(mu);
    // Set by a writer; the loop turns it into a failure.
    absl::Status write_error ABSL_GUARDED_BY(mu);

    // Loop thread only.
    uint64_t conn = 0;  // Connection (being set up or ready), 0 if none.
    bool ready_once = false;
    SteadyTime next_dial{};
  };

  enum Phase { kConnecting, kAwaitHello, kAwaitAcceptHello, kAwaitProof, kReady, kClosing };

  // Loop thread only.
  struct Conn {
    uint64_t id = 0;
    int fd = -1;
    std::string address;
    bool dialer = false;
    Peer* peer = nullptr;  // Known from the start when dialing, after the hello when accepting.
    Phase phase = kConnecting;
    HandshakeBuffer hs;
    Nonce my_nonce{};
    Nonce peer_nonce{};  // The dialer's, kept by the acceptor for the proof.
    SteadyTime deadline{};
    std::unique_ptr<FrameReader> reader;
  };

  void Loop();
  // One turn of the event loop; false once the network should close
  // (stopping and flushed or out of time, or aborted).
  bool Iterate(int max_wait_ms);
  // Half-closes, lingers briefly, closes every connection.
  void Close();

 public:
  // Pooled mode (options.poll_with): run by the pool's poller thread.
  void Poll(int max_wait_ms);
  void Wake();

 private:
  void HandleEvent(uint64_t key, uint32_t events);
  void AcceptAll();
  void Dial(Peer* peer);
  void OnConnected(Conn* c);
  void OnReadable(Conn* c);
  // Reads the rest of a handshake record; true once complete. On EOF/error
  // closes `c` (via ConnError) and returns false.
  bool ReadHandshake(Conn* c, bool* closed);
  void OnHello(Conn* c);
  void OnAcceptHello(Conn* c);
  void OnProof(Conn* c);
  void MakeReady(Conn* c);
  void ReadFrames(Conn* c);
  bool WriteRecord(Conn* c, const HandshakeRecord& r);
  // An error on `c`: bad input or a broken stream. Fails its peer if it has one
  // (once ready, or when dialing), else just closes and logs.
  void ConnError(Conn* c, const absl::Status& status, bool bad_input);
  void CloseConn(Conn* c, bool reset);
  // Reports `p` failed (once); `quiet`: an orderly stop, not logged.
  void FailPeer(Peer* p, const absl::Status& status, bool quiet = false);
  // Dials, gives up on peers and handshakes. Returns whether anything is still
  // being set up.
  bool CheckTimers();
  void DeliverSelf();
  bool FlushDone();
  void Deliver(Message m, WorkerId from);
  std::string PeerName(const Peer* p) const {
    return absl::StrCat("worker ", p->id, " at ", p->address);
  }

  // Writes as much of the peer's queue as the socket takes. Returns false if
  // the write failed (p->write_error set).
  bool FlushLocked(Peer* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu);
  void SetWantOutLocked(Peer* p, bool want) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu);

  std::string token_;
  int listen_fd_ = -1;
  std::unique_ptr<EventLoop> poller_;  // Set by Listen().
  std::map<WorkerId, std::unique_ptr<Peer>> peers_;
  bool peers_set_ = false;

  std::atomic<int> state_{kIdle};
  std::atomic<bool> abort_{false};
  std::atomic<bool> write_errors_{false};
  NetworkObserver* observer_ = nullptr;
  std::thread loop_;
  std::atomic<std::thread::id> loop_id_{};
  ThreadPool* pool_ = nullptr;  // Pooled mode.
  class Adapter : public Pollable {
   public:
    explicit Adapter(Impl* impl) : impl_(impl) {}
    void Poll(int max_wait_ms) override { impl_->Poll(max_wait_ms); }
    void Wake() override { impl_->Wake(); }

   private:
    Impl* impl_;
  };
  Adapter adapter_{this};
  std::atomic<bool> closed_{false};
  absl::Mutex finish_mu_;
  absl::CondVar finish_cv_;  // Signalled when closed_ is set.
  bool finish_claimed_ ABSL_GUARDED_BY(finish_mu_) = false;
  // Whether the caller is the one to finish (flush and close) in pooled mode.
  bool ClaimFinish();
  int next_timeout_ms_ = 10;  // Loop only.
  absl::Mutex stop_mu_;       // Serializes Stop() callers.
  SteadyTime start_time_{};
  SteadyTime stop_deadline_{};
  bool stop_deadline_set_ = false;  // Loop only.

  absl::Mutex self_mu_;
  std::deque<Message> self_queue_ ABSL_GUARDED_BY(self_mu_);

  // Loop thread only.
  std::map<uint64_t, std::unique_ptr<Conn>> conns_;
  uint64_t next_conn_id_ = kFirstConnKey;
  std::vector<uint8_t> staging_;

  std::atomic<int64_t> messages_sent_{0}, messages_received_{0}, bad_input_{0}, refused_{0},
      peers_failed_{0};
};

TcpNetwork::Impl::~Impl() {
  Stop(false);
  if (listen_fd_ >= 0) close(listen_fd_);
}

absl::Status TcpNetwork::Impl::Listen() {
  if (options_.self < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad worker id ", options_.self));
  }
  token_ = options_.auth_token.empty() ? TokenFromEnvironment() : options_.auth_token;
  sockaddr_storage ss{};
  socklen_t len = 0;
  std::string host = options_.listen_host;
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  absl::Status resolved = Resolve(host, options_.listen_port, /*passive=*/true, &ss, &len);
  if (!resolved.ok()) return resolved;
  listen_fd_ = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return absl::UnavailableError(absl::StrCat("socket: ", ErrnoText(errno)));
  int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen_host, ":",
                                               options_.listen_port, ": ", ErrnoText(errno)));
  }
  if (listen(listen_fd_, 1024) != 0) {
    return absl::UnavailableError(absl::StrCat("listen: ", ErrnoText(errno)));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  listen_address_ = SockaddrText(bound);
  port_ = socket_util::SockaddrPort(bound);
  absl::StatusOr<std::unique_ptr<EventLoop>> poller = EventLoop::Create();
  if (!poller.ok()) return poller.status();
  poller_ = std::move(*poller);
  poller_->Add(listen_fd_, kListenKey, EPOLLIN);
  return absl::OkStatus();
}

absl::Status TcpNetwork::Impl::SetPeers(const std::map<WorkerId, std::string>& addresses) {
  if (state_.load() != kIdle || peers_set_) {
    return absl::FailedPreconditionError("SetPeers must be called once, before Start");
  }
  std::map<WorkerId, std::unique_ptr<Peer>> peers;
  for (const auto& [id, address] : addresses) {
    if (id == options_.self) {
      return absl::InvalidArgumentError(
          absl::StrCat("peer list names this worker (", id, ") itself"));
    }
    if (id < 0) return absl::InvalidArgumentError(absl::StrCat("bad worker id ", id));
    auto p = std::make_unique<Peer>();
    p->id = id;
    p->address = address;
    std::string host;
    int port = 0;
    absl::Status s = SplitHostPort(address, &host, &port);
    if (s.ok()) s = Resolve(host, port, /*passive=*/false, &p->addr, &p->addr_len);
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("address of worker ", id, ": ", s.message()));
    }
    peers[id] = std::move(p);
  }
  peers_ = std::move(peers);
  peers_set_ = true;
  return absl::OkStatus();
}

absl::Status TcpNetwork::Impl::Start(NetworkObserver* observer) {
  int expected = kIdle;
  if (observer == nullptr) return absl::InvalidArgumentError("Start needs an observer");
  if (!state_.compare_exchange_strong(expected, kRunning)) {
    return absl::FailedPreconditionError("network already started or stopped");
  }
  observer_ = observer;
  if (token_.empty()) {
    bool all_loopback = IsLoopbackHost(options_.listen_host);
    for (const auto& [id, p] : peers_) {
      std::string host;
      int port;
      if (SplitHostPort(p->address, &host, &port).ok() && !IsLoopbackHost(host)) {
        all_loopback = false;
      }
    }
    if (!all_loopback) {
      absl::call_once(warn_once, [] {
        Log("WARNING: no authentication token is set and workers talk over a non-loopback "
            "network: anyone who can reach these ports can run code on this worker. Set "
            "TETHER_AUTH_TOKEN (the same secret on every worker) to require authentication.");
      });
    }
  }
  staging_.resize(kStagingSize);
  start_time_ = SteadyClock::now();
  for (auto& [id, p] : peers_) {
    if (id < options_.self) p->next_dial = start_time_;
  }
  if (options_.poll_with != nullptr) {
    pool_ = options_.poll_with;
    if (!pool_->SetPollable(&adapter_)) {
      state_ = kStopped;
      return absl::FailedPreconditionError("the thread pool already polls another network");
    }
    return absl::OkStatus();
  }
  loop_ = std::thread([this] { Loop(); });
  return absl::OkStatus();
}

void TcpNetwork::Impl::Wake() { poller_->Wake(); }

absl::Status TcpNetwork::Impl::Send(WorkerId to, Message message) {
  int state = state_.load();
  auto it = peers_.find(to);
  if (to != options_.self && it == peers_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker ", options_.self, " cannot send to unknown worker ", to));
  }
  if (state != kRunning) {
    return absl::UnavailableError(absl::StrCat("the network of worker ", options_.self, " is ",
                                               state == kIdle ? "not started" : "stopped"));
  }
  message.envelope.set_from(options_.self);
  message.envelope.set_to(to);
  if (to == options_.self) {
    message.SealBuffers();
    {
      absl::MutexLock lock(&self_mu_);
      self_queue_.push_back(std::move(message));
    }
    Wake();
    return absl::OkStatus();
  }
  Peer* p = it->second.get();
  absl::StatusOr<EncodedFrame> frame = EncodeFrame(std::move(message));
  if (!frame.ok()) return frame.status();
  size_t size = frame->size();
  absl::ReleasableMutexLock lock(&p->mu);
  if (p->failed) {
    return absl::UnavailableError(absl::StrCat(PeerName(p), " has failed: ", p->failure.message()));
  }
  p->queue.push_back(Outgoing{std::move(*frame), size});
  ++messages_sent_;
  if (p->fd >= 0 && !p->want_out && p->write_error.ok()) {
    if (!FlushLocked(p)) {
      lock.Release();
      Wake();
    }
  }
  return absl::OkStatus();
}

bool TcpNetwork::Impl::FlushLocked(Peer* p) {
  while (!p->queue.empty()) {
    iovec iov[kMaxIov];
    int n = 0;
    size_t skip = p->offset;
    for (auto it = p->queue.begin(); it != p->queue.end() && n < kMaxIov; ++it) {
      auto add = [&](const void* data, size_t size) {
        if (size == 0 || n >= kMaxIov) return;
        if (skip >= size) {
          skip -= size;
          return;
        }
        iov[n].iov_base = const_cast<uint8_t*>(static_cast<const uint8_t*>(data) + skip);
        iov[n].iov_len = size - skip;
        skip = 0;
        ++n;
      };
      add(it->frame.header, kFrameHeaderSize);
      add(it->frame.envelope.data(), it->frame.envelope.size());
      for (const Buffer& b : it->frame.buffers) add(b.data(), b.size());
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    ssize_t w = sendmsg(p->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        SetWantOutLocked(p, true);
        return true;
      }
      p->write_error = absl::UnavailableError(
          absl::StrCat("writing to ", PeerName(p), " failed: ", ErrnoText(errno)));
      write_errors_ = true;
      return false;
    }
    size_t written = static_cast<size_t>(w);
    while (written > 0) {
      Outgoing& front = p->queue.front();
      size_t left = front.size - p->offset;
      if (written >= left) {
        written -= left;
        p->offset = 0;
        p->queue.pop_front();
      } else {
        p->offset += written;
        written = 0;
      }
    }
  }
  SetWantOutLocked(p, false);
  return true;
}

void TcpNetwork::Impl::SetWantOutLocked(Peer* p, bool want) {
  if (p->want_out == want || p->fd < 0) return;
  poller_->Modify(p->fd, p->conn_id, EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0));
  p->want_out = want;
}

namespace {
// The network whose Poll() the calling pool thread is inside, if any.
thread_local const void* polling_network = nullptr;
}  // namespace

void TcpNetwork::Impl::Stop(bool abort) {
  if (abort) abort_ = true;
  int state = kIdle;
  if (state_.compare_exchange_strong(state, kStopped)) return;  // Never started.
  state = kRunning;
  state_.compare_exchange_strong(state, kStopping);
  if (std::this_thread::get_id() == loop_id_.load() || polling_network == this) {
    // Called from an observer callback: the loop finishes the flush and exits
    // on its own; no callback runs after this returns (the loop checks the
    // state before each one).
    return;
  }
  Wake();
  absl::MutexLock lock(&stop_mu_);
  if (pool_ != nullptr) {
    // Once no pool thread polls any more, finish here, unless the last poll
    // claimed that (then wait for it).
    pool_->ClearPollable(&adapter_);
    if (ClaimFinish()) {
      while (Iterate(10)) {
      }
      Close();
    }
    absl::MutexLock f(&finish_mu_);
    while (!closed_.load()) finish_cv_.Wait(&finish_mu_);
  } else if (loop_.joinable()) {
    loop_.join();
  }
  state_ = kStopped;
}

void TcpNetwork::Impl::Poll(int max_wait_ms) {
  if (closed_) return;
  polling_network = this;
  bool more = Iterate(max_wait_ms);
  if (more && state_.load() == kRunning) {
    polling_network = nullptr;
    return;
  }
  // Stopping: this is the last poll; finish the flush and close here.
  pool_->ClearPollable(&adapter_);
  if (ClaimFinish()) {
    while (more) more = Iterate(10);
    Close();
  }
  polling_network = nullptr;
}

bool TcpNetwork::Impl::ClaimFinish() {
  absl::MutexLock lock(&finish_mu_);
  if (finish_claimed_) return false;
  finish_claimed_ = true;
  return true;
}

void TcpNetwork::Impl::Loop() {
  loop_id_ = std::this_thread::get_id();
  while (Iterate(200)) {
  }
  Close();
}

bool TcpNetwork::Impl::Iterate(int max_wait_ms) {
  int timeout_ms = std::min(max_wait_ms, next_timeout_ms_);
  int state = state_.load();
  if (state != kRunning) {
    if (abort_.load()) return false;
    timeout_ms = 10;
    if (!stop_deadline_set_) {
      stop_deadline_ = SteadyClock::now() + ToSteady(options_.stop_flush_timeout);
      stop_deadline_set_ = true;
    }
    if (FlushDone() || SteadyClock::now() >= stop_deadline_) return false;
  }
  int n = poller_->Wait(timeout_ms,
                        [this](uint64_t key, uint32_t events) { HandleEvent(key, events); });
  if (n < 0 && errno != EINTR) {
    Log(absl::StrCat("worker ", options_.self, ": epoll_wait failed: ", ErrnoText(errno)));
    return false;
  }
  if (write_errors_.exchange(false)) {
    for (auto& [id, p] : peers_) {
      absl::Status err;
      {
        absl::MutexLock lock(&p->mu);
        err = p->write_error;
      }
      if (!err.ok()) FailPeer(p.get(), err);
    }
  }
  DeliverSelf();
  next_timeout_ms_ = CheckTimers() ? 10 : 200;
  return true;
}

void TcpNetwork::Impl::Close() {
  if (abort_.load()) {
    while (!conns_.empty()) CloseConn(conns_.begin()->second.get(), /*reset=*/true);
  } else {
    // Half-close every connection so peers read all we wrote, then close.
    if (!stop_deadline_set_) {
      stop_deadline_ = SteadyClock::now() + ToSteady(options_.stop_flush_timeout);
      stop_deadline_set_ = true;
    }
    auto linger_until = std::min(SteadyClock::now() + kCloseLinger, stop_deadline_);
    // Say goodbye (after whatever is still queued, best effort), so peers see
    // an orderly stop rather than a crash.
    for (auto& [id, p] : peers_) {
      absl::MutexLock lock(&p->mu);
      if (p->fd < 0 || p->failed) continue;
      Outgoing bye;
      FrameHeader h;
      h.goodbye = true;
      EncodeFrameHeader(h, bye.frame.header);
      bye.size = kFrameHeaderSize;
      p->queue.push_back(std::move(bye));
      FlushLocked(p.get());
    }
    for (auto& [id, c] : conns_) shutdown(c->fd, SHUT_WR);
    while (!conns_.empty() && SteadyClock::now() < linger_until) {
      poller_->Wait(10, [this](uint64_t key, uint32_t) {
        auto it = conns_.find(key);
        if (it == conns_.end()) return;  // The listen socket.
        ssize_t r = read(it->second->fd, staging_.data(), staging_.size());
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
          CloseConn(it->second.get(), false);
      });
    }
  }
  while (!conns_.empty()) CloseConn(conns_.begin()->second.get(), false);
  for (auto& [id, p] : peers_) {
    std::deque<Outgoing> dropped;
    absl::MutexLock lock(&p->mu);
    dropped.swap(p->queue);
    p->failed = true;
    if (p->failure.ok()) p->failure = absl::UnavailableError("network stopped");
  }
  absl::MutexLock lock(&finish_mu_);
  closed_ = true;
  finish_cv_.SignalAll();
}

bool TcpNetwork::Impl::FlushDone() {
  for (auto& [id, p] : peers_) {
    absl::MutexLock lock(&p->mu);
    if (!p->failed && p->fd >= 0 && !p->queue.empty()) return false;
  }
  return true;
}

void TcpNetwork::Impl::HandleEvent(uint64_t key, uint32_t events) {
  if (key == kListenKey) {
    AcceptAll();
    return;
  }
  auto it = conns_.find(key);
  if (it == conns_.end()) return;
  Conn* c = it->second.get();
  if (c->phase == kConnecting) {
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) OnConnected(c);
    return;
  }
  if (events & EPOLLOUT && c->phase == kReady) {
    Peer* p = c->peer;
    bool ok;
    absl::Status error;  // Copied under the lock: writers set it.
    {
      absl::MutexLock lock(&p->mu);
      ok = p->fd < 0 || FlushLocked(p);
      if (!ok) error = p->write_error;
    }
    if (!ok) {
      FailPeer(p, error);
      return;
    }
  }
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) OnReadable(c);
}

void TcpNetwork::Impl::AcceptAll() {
  while (true) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    int fd =
        accept4(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        Log(absl::StrCat("worker ", options_.self, ": accept failed: ", ErrnoText(errno)));
      }
      return;
    }
    if (state_.load() != kRunning) {
      close(fd);
      continue;
    }
    SetSocketOptions(fd, options_);
    auto c = std::make_unique<Conn>();
    c->id = next_conn_id_++;
    c->fd = fd;
    c->address = SockaddrText(ss);
    c->phase = kAwaitHello;
    c->deadline = SteadyClock::now() + ToSteady(options_.handshake_timeout);
    poller_->Add(fd, c->id, EPOLLIN | EPOLLRDHUP);
    conns_[c->id] = std::move(c);
  }
}

void TcpNetwork::Impl::Dial(Peer* p) {
  int fd = socket(p->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    FailPeer(p, absl::UnavailableError(absl::StrCat("cannot create a socket to ", PeerName(p), ": ",
                                                    ErrnoText(errno))));
    return;
  }
  SetSocketOptions(fd, options_);
  auto c = std::make_unique<Conn>();
  c->id = next_conn_id_++;
  c->fd = fd;
  c->address = p->address;
  c->dialer = true;
  c->peer = p;
  c->phase = kConnecting;
  c->deadline = SteadyClock::now() + ToSteady(options_.handshake_timeout);
  p->conn = c->id;
  int rc = connect(fd, reinterpret_cast<sockaddr*>(&p->addr), p->addr_len);
  poller_->Add(fd, c->id, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
  Conn* raw = c.get();
  conns_[c->id] = std::move(c);
  if (rc != 0 && errno != EINPROGRESS) {
    int err = errno;
    CloseConn(raw, false);
    p->conn = 0;
    p->next_dial = SteadyClock::now() + kDialRetry;
    (void)err;
  }
}

void TcpNetwork::Impl::OnConnected(Conn* c) {
  int err = 0;
  socklen_t len = sizeof(err);
  getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
  Peer* p = c->peer;
  if (err != 0) {
    // Not listening yet, or refused: retry until connect_timeout (CheckTimers
    // gives up).
    CloseConn(c, false);
    p->conn = 0;
    p->next_dial = SteadyClock::now() + kDialRetry;
    return;
  }
  poller_->Modify(c->fd, c->id, EPOLLIN | EPOLLRDHUP);
  absl::StatusOr<Nonce> nonce = RandomNonce();
  if (!nonce.ok()) {
    ConnError(c, nonce.status(), false);
    return;
  }
  c->my_nonce = *nonce;
  c->phase = kAwaitAcceptHello;
  WriteRecord(c, MakeHello(token_, options_.self, p->id, c->my_nonce));
}

bool TcpNetwork::Impl::WriteRecord(Conn* c, const HandshakeRecord& r) {
  absl::Status sent = SendHandshake(c->fd, r, c->address);
  if (!sent.ok()) {
    ConnError(c, sent, false);
    return false;
  }
  return true;
}

bool TcpNetwork::Impl::ReadHandshake(Conn* c, bool* closed) {
  *closed = false;
  int err = 0;
  HandshakeBuffer::Result result = c->hs.ReadFrom(c->fd, &err);
  if (result == HandshakeBuffer::kComplete) return true;
  if (result == HandshakeBuffer::kWouldBlock) return false;
  *closed = true;
  ConnError(c,
            absl::UnavailableError(
                absl::StrCat(c->address, " closed the connection during the handshake",
                             err != 0 ? absl::StrCat(": ", ErrnoText(err)) : std::string(),
                             c->dialer ? " (did it refuse our authentication?)" : "")),
            false);
  return false;
}

void TcpNetwork::Impl::OnReadable(Conn* c) {
  const uint64_t id = c->id;  // `c` may be closed (and freed) by any step below.
  while (c->phase != kReady) {
    bool closed = false;
    if (!ReadHandshake(c, &closed)) return;
    Phase before = c->phase;
    if (before == kAwaitHello) {
      OnHello(c);
    } else if (before == kAwaitAcceptHello) {
      OnAcceptHello(c);
    } else if (before == kAwaitProof) {
      OnProof(c);
    } else {
      return;
    }
    if (conns_.find(id) == conns_.end()) return;
    if (c->phase == before) return;
  }
  ReadFrames(c);
}

void TcpNetwork::Impl::OnHello(Conn* c) {
  absl::StatusOr<HandshakeRecord> r = CheckHello(c->hs.record(), options_.self);
  if (!r.ok()) {
    ConnError(c, r.status(), true);
    return;
  }
  auto it = peers_.find(r->from);
  if (it == peers_.end() || r->from <= options_.self) {
    ConnError(c,
              absl::InvalidArgumentError(
                  absl::StrCat("handshake from worker ", r->from,
                               it == peers_.end() ? ", which is not a known peer"
                                                  : ", which this worker dials itself (lower id)")),
              true);
    return;
  }
  Peer* p = it->second.get();
  {
    absl::MutexLock lock(&p->mu);
    if (p->failed || p->conn != 0) {
      ConnError(c,
                absl::FailedPreconditionError(
                    absl::StrCat("refused a second connection claiming to be worker ", r->from,
                                 p->failed ? " (already failed)" : " (already connected)")),
                true);
      return;
    }
  }
  // The MAC comes with the proof; here only the token settings must agree.
  absl::Status auth = VerifyPeerMac(token_, *r, r->mac);
  if (!auth.ok()) {
    ++refused_;
    ConnError(
        c,
        absl::UnauthenticatedError(absl::StrCat("refused worker ", r->from, ": ", auth.message())),
        true);
    return;
  }
  absl::StatusOr<Nonce> nonce = RandomNonce();
  if (!nonce.ok()) {
    ConnError(c, nonce.status(), false);
    return;
  }
  c->my_nonce = *nonce;
  c->peer = p;  // Tentative: bound for real once the proof checks out.
  c->peer_nonce = r->nonce;
  c->phase = kAwaitProof;
  WriteRecord(c, MakeAcceptHello(token_, options_.self, r->from, r->nonce, c->my_nonce));
}

void TcpNetwork::Impl::OnAcceptHello(Conn* c) {
  Peer* p = c->peer;
  absl::StatusOr<HandshakeRecord> r =
      CheckAcceptHello(c->hs.record(), token_, options_.self, p->id, c->my_nonce);
  if (!r.ok()) {
    ConnError(c, r.status(), true);
    return;
  }
  if (!WriteRecord(c, MakeProof(token_, options_.self, p->id, c->my_nonce, r->nonce))) return;
  MakeReady(c);
}

void TcpNetwork::Impl::OnProof(Conn* c) {
  Peer* p = c->peer;
  const Nonce dialer_nonce = c->peer_nonce;
  absl::Status r =
      CheckProof(c->hs.record(), token_, options_.self, p->id, dialer_nonce, c->my_nonce);
  if (!r.ok()) {
    ++refused_;
    c->peer = nullptr;  // Not authenticated: refusing it must not fail the real worker.
    ConnError(c,
              absl::Status(r.code(), absl::StrCat("refused a connection claiming to be worker ",
                                                  p->id, ": ", r.message())),
              true);
    return;
  }
  {
    absl::MutexLock lock(&p->mu);
    if (p->failed || p->conn != 0) {
      c->peer = nullptr;
      ConnError(c,
                absl::FailedPreconditionError(
                    absl::StrCat("refused a second connection from worker ", p->id)),
                true);
      return;
    }
  }
  MakeReady(c);
}

void TcpNetwork::Impl::MakeReady(Conn* c) {
  Peer* p = c->peer;
  c->phase = kReady;
  c->reader = std::make_unique<FrameReader>(options_.limits);
  p->conn = c->id;
  p->ready_once = true;
  bool ok;
  absl::Status error;  // Copied under the lock: writers set it.
  {
    absl::MutexLock lock(&p->mu);
    p->fd = c->fd;
    p->conn_id = c->id;
    p->want_out = false;
    ok = FlushLocked(p);
    if (!ok) error = p->write_error;
  }
  if (!ok) FailPeer(p, error);
}

void TcpNetwork::Impl::ReadFrames(Conn* c) {
  Peer* p = c->peer;
  std::vector<Message> messages;
  for (int round = 0; round < 16; ++round) {
    ssize_t r;
    bool direct = c->reader->DirectSize() >= kDirectReadThreshold;
    size_t want = direct ? c->reader->DirectSize() : staging_.size();
    r = read(c->fd, direct ? c->reader->DirectData() : staging_.data(), want);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      FailPeer(p, absl::UnavailableError(
                      absl::StrCat("connection to ", PeerName(p), " failed: ", ErrnoText(errno))));
      return;
    }
    if (r == 0) {
      if (c->reader->goodbye()) {
        FailPeer(p, absl::UnavailableError(absl::StrCat(PeerName(p), " stopped")),
                 /*quiet=*/true);
      } else {
        FailPeer(p, absl::UnavailableError(absl::StrCat(PeerName(p), " closed the connection")));
      }
      return;
    }
    absl::Status s;
    if (direct) {
      c->reader->CommitDirect(static_cast<size_t>(r), &messages);
    } else {
      s = c->reader->Feed(staging_.data(), static_cast<size_t>(r), &messages);
    }
    for (Message& m : messages) Deliver(std::move(m), p->id);
    messages.clear();
    if (!s.ok()) {
      ConnError(c, s, true);
      return;
    }
    if (static_cast<size_t>(r) < want) return;
  }
}

void TcpNetwork::Impl::Deliver(Message m, WorkerId from) {
  if (state_.load() != kRunning) return;
  m.envelope.set_from(from);
  ++messages_received_;
  observer_->OnMessage(std::move(m));
}

void TcpNetwork::Impl::DeliverSelf() {
  while (true) {
    Message m;
    {
      absl::MutexLock lock(&self_mu_);
      if (self_queue_.empty()) return;
      m = std::move(self_queue_.front());
      self_queue_.pop_front();
    }
    Deliver(std::move(m), options_.self);
  }
}

void TcpNetwork::Impl::ConnError(Conn* c, const absl::Status& status, bool bad_input) {
  if (bad_input) ++bad_input_;
  Peer* p = c->peer;
  bool owns_peer = p != nullptr && p->conn == c->id;
  if (owns_peer) {
    FailPeer(p, absl::UnavailableError(
                    absl::StrCat("connection to ", PeerName(p), " closed: ", status.message())));
    return;
  }
  Log(absl::StrCat("worker ", options_.self, ": closing the connection from ", c->address, ": ",
                   status.message()));
  CloseConn(c, false);
}

void TcpNetwork::Impl::CloseConn(Conn* c, bool reset) {
  if (reset) {
    linger l{1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  }
  Peer* p = c->peer;
  if (p != nullptr && p->conn == c->id) {
    p->conn = 0;
    absl::MutexLock lock(&p->mu);
    if (p->conn_id == c->id) {
      p->fd = -1;
      p->conn_id = 0;
    }
  }
  poller_->Remove(c->fd);
  close(c->fd);
  conns_.erase(c->id);
}

void TcpNetwork::Impl::FailPeer(Peer* p, const absl::Status& status, bool quiet) {
  std::deque<Outgoing> dropped;
  {
    absl::MutexLock lock(&p->mu);
    if (p->failed) return;
    p->failed = true;
    p->failure = status;
    dropped.swap(p->queue);
    p->offset = 0;
  }
  if (p->conn != 0) {
    auto it = conns_.find(p->conn);
    if (it != conns_.end()) CloseConn(it->second.get(), false);
    p->conn = 0;
  }
  ++peers_failed_;
  if (state_.load() != kRunning) return;
  if (!quiet)
    Log(absl::StrCat("worker ", options_.self, ": ", PeerName(p), " failed: ", status.message()));
  observer_->OnPeerFailed(p->id, absl::UnavailableError(status.message()));
}

bool TcpNetwork::Impl::CheckTimers() {
  bool busy = false;
  SteadyTime now = SteadyClock::now();
  SteadyTime connect_deadline = start_time_ + ToSteady(options_.connect_timeout);
  for (auto& [id, p] : peers_) {
    if (p->conn != 0 || p->ready_once) continue;
    {
      absl::MutexLock lock(&p->mu);
      if (p->failed) continue;
    }
    if (now >= connect_deadline) {
      FailPeer(p.get(),
               absl::UnavailableError(absl::StrCat(
                   id < options_.self ? "could not connect to " : "no connection from ",
                   PeerName(p.get()), " within ", absl::FormatDuration(options_.connect_timeout))));
      continue;
    }
    busy = true;
    if (id < options_.self && now >= p->next_dial && state_.load() == kRunning) Dial(p.get());
  }
  std::vector<Conn*> expired;
  for (auto& [id, c] : conns_) {
    if (c->phase == kReady) continue;
    busy = true;
    if (now >= c->deadline) expired.push_back(c.get());
  }
  for (Conn* c : expired) {
    if (c->dialer) {
      ConnError(c,
                absl::DeadlineExceededError(
                    absl::StrCat("handshake with ", c->address, " did not finish within ",
                                 absl::FormatDuration(options_.handshake_timeout))),
                false);
    } else {
      c->peer = nullptr;
      ConnError(c,
                absl::DeadlineExceededError(
                    absl::StrCat("the peer did not finish the handshake within ",
                                 absl::FormatDuration(options_.handshake_timeout))),
                true);
    }
  }
  return busy;
}

TcpNetwork::TcpNetwork(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TcpNetwork::~TcpNetwork() = default;

absl::StatusOr<std::unique_ptr<TcpNetwork>> TcpNetwork::Listen(TcpNetworkOptions options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  absl::Status s = impl->Listen();
  if (!s.ok()) return s;
  return std::unique_ptr<TcpNetwork>(new TcpNetwork(std::move(impl)));
}

int TcpNetwork::port() const { return impl_->port_; }
std::string TcpNetwork::listen_address() const { return impl_->listen_address_; }
absl::Status TcpNetwork::SetPeers(const std::map<WorkerId, std::string>& addresses) {
  return impl_->SetPeers(addresses);
}
WorkerId TcpNetwork::self() const { return impl_->options_.self; }
absl::Status TcpNetwork::Start(NetworkObserver* observer) { return impl_->Start(observer); }
absl::Status TcpNetwork::Send(WorkerId to, Message message) {
  return impl_->Send(to, std::move(message));
}
void TcpNetwork::Stop() { impl_->Stop(false); }
void TcpNetwork::Abort() { impl_->Stop(true); }
std::map<std::string, int64_t> TcpNetwork::GetStats() const { return impl_->GetStats(); }

}  // namespace tether
