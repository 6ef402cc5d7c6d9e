// bench_transport: measures Tether's real transport against bare TCP, two
// processes on loopback, side by side in one run (these machines are noisy:
// only compare figures of one run). Run through tools/bench-transport.
//
// Figures (one line each: Tether's number, the bare baseline, and their ratio):
//  - request/response latency p50 and p99: Agent::Call(TEST_CALL, 64-byte
//  payload) answered by
//    a handler, against a 64-byte ping-pong over a bare blocking TCP socket;
//  - pipelined requests per second with `window` calls in flight, against the
//  same window of
//    64-byte ping-pongs over bare TCP;
//  - a 64 MB buffer echoed (out-of-band Buffer in the request and the reply),
//  against a bare
//    TCP echo of 64 MB, both as GB/s of payload moved (2 x 64 MB per round
//    trip); and a memcpy of 64 MB for scale.
//
//   bench_transport [--iters=N] [--window=W] [--pipelined=N] [--mb=M]
//   [--rounds=R]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/agent.h"
#include "transport/system_clock.h"
#include "transport/tcp_network.h"
#include "transport/thread_pool.h"

namespace tether {
namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  int iters = 5000;
  int window = 32;
  int pipelined = 20000;
  int mb = 64;
  int rounds = 5;
};

double Micros(Clock::duration d) {
  return std::chrono::duration<double, std::micro>(d).count();
}

void Die(const std::string& what) {
  std::fprintf(stderr, "bench_transport: %s: %s\n", what.c_str(),
               std::strerror(errno));
  std::exit(1);
}

// ---- Control pipe between the two processes. ----
void WriteLine(int fd, const std::string& s) {
  std::string line = s + "\n";
  if (write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
    Die("control write");
}
std::string ReadLine(int fd) {
  std::string s;
  char c;
  while (read(fd, &c, 1) == 1) {
    if (c == '\n') return s;
    s += c;
  }
  Die("control read");
  return s;
}

// ---- Bare TCP. ----
int Listen(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) Die("bind");
  listen(fd, 4);
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}
int Connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0)
    Die("connect");
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}
void WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = write(fd, c, n);
    if (w <= 0) Die("write");
    c += w;
    n -= w;
  }
}
bool ReadAll(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = read(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= r;
  }
  return true;
}

// Serves bare ping-pongs of 64 bytes until the client closes, then one bulk
// echo of `bytes` per round.
void BareServer(int ctl_in, int ctl_out, const Config& cfg) {
  int port;
  int lfd = Listen(&port);
  WriteLine(ctl_out, std::to_string(port));
  int fd = accept(lfd, nullptr, nullptr);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  char msg[64];
  // Ping-pong phase: a zero first byte ends it.
  while (ReadAll(fd, msg, sizeof(msg))) {
    if (msg[0] == 0) break;
    WriteAll(fd, msg, sizeof(msg));
  }
  const size_t bytes = static_cast<size_t>(cfg.mb) << 20;
  std::vector<char> buf(bytes);
  for (int r = 0; r < cfg.rounds; ++r) {
    if (!ReadAll(fd, buf.data(), bytes)) break;
    WriteAll(fd, buf.data(), bytes);
  }
  close(fd);
  close(lfd);
  (void)ctl_in;
}

struct Results {
  double p50 = 0, p99 = 0, rate = 0, gbps = 0;
  double async_p50 = 0, async_p99 = 0;
};

Results BareClient(int ctl_in, const Config& cfg) {
  Results res;
  int fd = Connect(std::stoi(ReadLine(ctl_in)));
  char msg[64];
  std::memset(msg, 'x', sizeof(msg));
  std::vector<double> lat;
  for (int i = 0; i < cfg.iters + cfg.iters / 10; ++i) {
    auto t0 = Clock::now();
    WriteAll(fd, msg, sizeof(msg));
    ReadAll(fd, msg, sizeof(msg));
    if (i >= cfg.iters / 10) lat.push_back(Micros(Clock::now() - t0));
  }
  std::sort(lat.begin(), lat.end());
  res.p50 = lat[lat.size() / 2];
  res.p99 = lat[lat.size() * 99 / 100];
  // Pipelined: keep `window` messages in flight.
  auto t0 = Clock::now();
  int sent = 0, got = 0;
  while (sent < cfg.window && sent < cfg.pipelined) {
    WriteAll(fd, msg, sizeof(msg));
    ++sent;
  }
  while (got < cfg.pipelined) {
    ReadAll(fd, msg, sizeof(msg));
    ++got;
    if (sent < cfg.pipelined) {
      WriteAll(fd, msg, sizeof(msg));
      ++sent;
    }
  }
  res.rate =
      cfg.pipelined / std::chrono::duration<double>(Clock::now() - t0).count();
  msg[0] = 0;
  WriteAll(fd, msg, sizeof(msg));
  // Bulk echo, a writer thread so both directions stream.
  const size_t bytes = static_cast<size_t>(cfg.mb) << 20;
  std::vector<char> out(bytes, 'b'), in(bytes);
  double best = 0;
  for (int r = 0; r < cfg.rounds; ++r) {
    auto s = Clock::now();
    std::thread writer([&] { WriteAll(fd, out.data(), bytes); });
    ReadAll(fd, in.data(), bytes);
    writer.join();
    double secs = std::chrono::duration<double>(Clock::now() - s).count();
    best = std::max(best, 2.0 * bytes / secs / 1e9);
  }
  res.gbps = best;
  close(fd);
  return res;
}

// ---- TcpNetwork alone (no agent): the server's observer echoes inline on its
// event loop; the client's wakes the waiting thread. ----
class EchoObserver : public NetworkObserver {
 public:
  explicit EchoObserver(Network** net) : net_(net) {}
  void OnMessage(Message m) override {
    if (m.envelope.payload().empty()) {
      absl::MutexLock lock(&mu_);
      stop_ = true;
      cv_.SignalAll();
      return;
    }
    (*net_)->Send(m.envelope.from(), std::move(m)).IgnoreError();
  }
  void OnPeerFailed(WorkerId, const absl::Status&) override {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  void WaitStop() {
    absl::MutexLock lock(&mu_);
    while (!stop_) cv_.Wait(&mu_);
  }

 private:
  Network** net_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

class WakeObserver : public NetworkObserver {
 public:
  void OnMessage(Message) override {
    absl::MutexLock lock(&mu_);
    ++got_;
    cv_.Signal();
  }
  void OnPeerFailed(WorkerId, const absl::Status& s) override {
    absl::MutexLock lock(&mu_);
    failure_ = s;
    cv_.Signal();
  }
  void WaitFor(int n) {
    absl::MutexLock lock(&mu_);
    while (got_ < n && failure_.ok()) cv_.Wait(&mu_);
    if (!failure_.ok()) Die("peer failed: " + failure_.ToString());
  }

 private:
  absl::Mutex mu_;
  absl::CondVar cv_;
  int got_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

std::unique_ptr<TcpNetwork> MakeNet(WorkerId self, int ctl_in, int ctl_out) {
  TcpNetworkOptions o;
  o.self = self;
  auto net = TcpNetwork::Listen(o);
  if (!net.ok()) Die(net.status().ToString());
  WriteLine(ctl_out, (*net)->listen_address());
  std::string peer = ReadLine(ctl_in);
  if (!(*net)->SetPeers({{1 - self, peer}}).ok()) Die("SetPeers");
  return std::move(*net);
}

void NetServer(int ctl_in, int ctl_out) {
  Network* raw = nullptr;
  EchoObserver obs(&raw);
  std::unique_ptr<TcpNetwork> net = MakeNet(1, ctl_in, ctl_out);
  raw = net.get();
  if (!net->Start(&obs).ok()) Die("start");
  obs.WaitStop();
  net->Stop();
}

Results NetClient(int ctl_in, int ctl_out, const Config& cfg) {
  Results res;
  WakeObserver obs;
  std::unique_ptr<TcpNetwork> net = MakeNet(0, ctl_in, ctl_out);
  if (!net->Start(&obs).ok()) Die("start");
  std::vector<double> lat;
  const std::string payload(64, 'x');
  int n = 0;
  for (int i = 0; i < cfg.iters + cfg.iters / 10; ++i) {
    auto t0 = Clock::now();
    Message m;
    m.envelope.set_type(wire::TEST_CALL);
    m.envelope.set_payload(payload);
    if (!net->Send(1, std::move(m)).ok()) Die("send");
    obs.WaitFor(++n);
    if (i >= cfg.iters / 10) lat.push_back(Micros(Clock::now() - t0));
  }
  std::sort(lat.begin(), lat.end());
  res.p50 = lat[lat.size() / 2];
  res.p99 = lat[lat.size() * 99 / 100];
  Message bye;
  bye.envelope.set_type(wire::TEST_CALL);
  net->Send(1, std::move(bye)).IgnoreError();
  net->Stop();
  return res;
}

// ---- Tether: two agents over TcpNetwork. ----
struct Node {
  ThreadPool pool{2};  // Outlives the network (pooled mode).
  SystemClock clock;
  std::unique_ptr<TcpNetwork> net;
  std::unique_ptr<Agent> agent;
};

bool pooled_mode = true;

std::unique_ptr<Node> MakeNode(WorkerId self, int ctl_in, int ctl_out) {
  auto node = std::make_unique<Node>();
  TcpNetworkOptions o;
  o.self = self;
  if (pooled_mode) o.poll_with = &node->pool;
  auto net = TcpNetwork::Listen(o);
  if (!net.ok()) Die(net.status().ToString());
  node->net = std::move(*net);
  WriteLine(ctl_out, node->net->listen_address());
  std::string peer = ReadLine(ctl_in);
  if (!node->net->SetPeers({{1 - self, peer}}).ok()) Die("SetPeers");
  AgentOptions ao;
  ao.self = self;
  ao.workers = {{"client", 0}, {"server", 1}};
  ao.default_timeout = absl::Seconds(60);
  auto agent = Agent::Create(ao, &node->clock, node->net.get(), &node->pool);
  if (!agent.ok()) Die(agent.status().ToString());
  node->agent = std::move(*agent);
  return node;
}

void TetherServer(int ctl_in, int ctl_out, const Config&) {
  std::unique_ptr<Node> node = MakeNode(1, ctl_in, ctl_out);
  node->agent->RegisterHandler(wire::TEST_CALL,
                               [](std::shared_ptr<IncomingCall> call) {
                                 call->Reply(call->request().envelope.payload(),
                                             call->request().buffers);
                               });
  if (!node->agent->Start().ok()) Die("agent start");
  ReadLine(ctl_in);  // The client is done.
  node->agent->Shutdown(true).Wait();
}

Results TetherClient(int ctl_in, int ctl_out, const Config& cfg) {
  Results res;
  std::unique_ptr<Node> node = MakeNode(0, ctl_in, ctl_out);
  if (!node->agent->Start().ok()) Die("agent start");
  Agent& agent = *node->agent;
  const std::string payload(64, 'x');
  std::vector<double> lat;
  for (int i = 0; i < cfg.iters + cfg.iters / 10; ++i) {
    auto t0 = Clock::now();
    const auto& r = agent.Call(1, wire::TEST_CALL, payload, {}).Wait();
    if (!r.ok()) Die(r.status().ToString());
    if (i >= cfg.iters / 10) lat.push_back(Micros(Clock::now() - t0));
  }
  std::sort(lat.begin(), lat.end());
  res.p50 = lat[lat.size() / 2];
  res.p99 = lat[lat.size() * 99 / 100];

  // Asynchronous request/response: each reply's callback (on the pool) issues
  // the next call, as async code does; no thread waits.
  {
    absl::Mutex mu;
    absl::CondVar cv;
    std::vector<double> alat;
    const int total = cfg.iters + cfg.iters / 10;
    bool finished = false;
    std::function<void(int)> issue;
    issue = [&](int i) {
      auto t0 = Clock::now();
      agent.Call(1, wire::TEST_CALL, payload, {})
          .Then([&, i, t0](const absl::StatusOr<Message>& r) {
            if (!r.ok()) Die(r.status().ToString());
            if (i >= cfg.iters / 10) alat.push_back(Micros(Clock::now() - t0));
            if (i + 1 < total) {
              issue(i + 1);
              return;
            }
            absl::MutexLock lock(&mu);
            finished = true;
            cv.SignalAll();
          });
    };
    issue(0);
    {
      absl::MutexLock lock(&mu);
      while (!finished) cv.Wait(&mu);
    }
    std::sort(alat.begin(), alat.end());
    res.async_p50 = alat[alat.size() / 2];
    res.async_p99 = alat[alat.size() * 99 / 100];
  }

  // Pipelined: each completion (on the pool) issues the next call.
  {
    absl::Mutex mu;
    absl::CondVar cv;
    int issued = 0, done = 0;
    std::function<void()> issue;
    issue = [&] {
      agent.Call(1, wire::TEST_CALL, payload, {})
          .Then([&](const absl::StatusOr<Message>& r) {
            if (!r.ok()) Die(r.status().ToString());
            bool more;
            {
              absl::MutexLock lock(&mu);
              ++done;
              more = issued < cfg.pipelined;
              if (more) ++issued;
              if (done == cfg.pipelined) cv.SignalAll();
            }
            if (more) issue();
          });
    };
    auto t0 = Clock::now();
    {
      absl::MutexLock lock(&mu);
      issued = std::min(cfg.window, cfg.pipelined);
    }
    for (int i = 0; i < std::min(cfg.window, cfg.pipelined); ++i) issue();
    {
      absl::MutexLock lock(&mu);
      while (done != cfg.pipelined) cv.Wait(&mu);
    }
    res.rate = cfg.pipelined /
               std::chrono::duration<double>(Clock::now() - t0).count();
  }

  const size_t bytes = static_cast<size_t>(cfg.mb) << 20;
  Buffer big = Buffer::Allocate(bytes);
  std::memset(big.mutable_data(), 'b', bytes);
  double best = 0;
  for (int r = 0; r < cfg.rounds; ++r) {
    auto s = Clock::now();
    const auto& reply = agent.Call(1, wire::TEST_CALL, "", {big}).Wait();
    if (!reply.ok() || reply->buffers.size() != 1 ||
        reply->buffers[0].size() != bytes) {
      Die("64 MB echo failed");
    }
    double secs = std::chrono::duration<double>(Clock::now() - s).count();
    best = std::max(best, 2.0 * bytes / secs / 1e9);
  }
  res.gbps = best;
  WriteLine(ctl_out, "done");
  node->agent->Shutdown(true).Wait();
  return res;
}

double MemcpyGbps(const Config& cfg) {
  const size_t bytes = static_cast<size_t>(cfg.mb) << 20;
  std::vector<char> a(bytes, 'a'), b(bytes, 'b');
  double best = 0;
  for (int r = 0; r < cfg.rounds; ++r) {
    auto s = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    double secs = std::chrono::duration<double>(Clock::now() - s).count();
    best = std::max(best, bytes / secs / 1e9);
    a[r] = b[bytes - 1 - r];  // Keep the copies observable.
  }
  return best;
}

int Main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto flag = [&](const char* name, int* v) {
      std::string p = absl::StrCat("--", name, "=");
      if (a.rfind(p, 0) != 0) return false;
      if (!absl::SimpleAtoi(a.substr(p.size()), v) || *v <= 0) {
        std::fprintf(stderr, "bad %s\n", a.c_str());
        std::exit(2);
      }
      return true;
    };
    if (a == "--pooled=0" || a == "--pooled=1") {
      pooled_mode = a == "--pooled=1";
      continue;
    }
    if (!flag("iters", &cfg.iters) && !flag("window", &cfg.window) &&
        !flag("pipelined", &cfg.pipelined) && !flag("mb", &cfg.mb) &&
        !flag("rounds", &cfg.rounds)) {
      std::fprintf(
          stderr,
          "usage: %s [--iters=N] [--window=W] [--pipelined=N] [--mb=M] "
          "[--rounds=R] [--pooled=0|1]\n",
          argv[0]);
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  int to_child[2], to_parent[2];
  if (pipe(to_child) != 0 || pipe(to_parent) != 0) Die("pipe");
  std::fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    close(to_child[1]);
    close(to_parent[0]);
    BareServer(to_child[0], to_parent[1], cfg);
    NetServer(to_child[0], to_parent[1]);
    TetherServer(to_child[0], to_parent[1], cfg);
    _exit(0);
  }
  close(to_child[0]);
  close(to_parent[1]);
  Results bare = BareClient(to_parent[0], cfg);
  Results netonly = NetClient(to_parent[0], to_child[1], cfg);
  Results tether = TetherClient(to_parent[0], to_child[1], cfg);
  int st = 0;
  waitpid(pid, &st, 0);
  double mem = MemcpyGbps(cfg);

  auto line = [](const std::string& what, double t, double b, const char* unit,
                 const char* goal) {
    std::printf(
        "%-34s tether %10.1f %-6s bare-tcp %10.1f %-6s ratio %5.2f  %s\n",
        what.c_str(), t, unit, b, unit, t / b, goal);
  };
  std::printf(
      "bench-transport: 2 processes on loopback, %d calls of 64 B, window %d, "
      "%d MB buffer, network %s\n",
      cfg.iters, cfg.window, cfg.mb,
      pooled_mode ? "polled by the agent's thread pool"
                  : "on its own event-loop thread");
  line("request/response latency p50", tether.p50, bare.p50, "us",
       "(goal <= 1.30)");
  line("request/response latency p99", tether.p99, bare.p99, "us", "");
  line("async request/response p50", tether.async_p50, bare.p50, "us", "");
  line("async request/response p99", tether.async_p99, bare.p99, "us", "");
  line("  TcpNetwork alone (no agent) p50", netonly.p50, bare.p50, "us", "");
  line("  TcpNetwork alone (no agent) p99", netonly.p99, bare.p99, "us", "");
  line(absl::StrCat("pipelined requests (window ", cfg.window, ")"),
       tether.rate, bare.rate, "req/s", "");
  line(absl::StrCat(cfg.mb, " MB buffer echo"), tether.gbps, bare.gbps, "GB/s",
       "(goal >= 0.80)");
  std::printf("%-34s tether %10.1f %-6s memcpy   %10.1f %-6s ratio %5.2f\n",
              absl::StrCat(cfg.mb, " MB buffer echo vs memcpy").c_str(),
              tether.gbps, "GB/s", mem, "GB/s", tether.gbps / mem);
  return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}

}  // namespace
}  // namespace tether

int main(int argc, char** argv) { return tether::Main(argc, argv); }
