// The conformance suite (network_conformance.h) over the process simulator's
// link network: ChildRuntime's LinkNetwork (sim/process/child.cc), the Network
// a tether.sim worker's agent runs on.
//
// Each worker is a forked process running a ChildRuntime against a ProcessHost
// in this process (on a thread of its own, as tether.sim's driver runs it), so
// every Start/Send/Stop goes over the link to the host's simulated network and
// every delivery comes back over it, as in a real tether.sim run. The suite
// calls network(id) from its own thread; that is a proxy which forwards each
// call to worker id's process, where its main frame makes it on the link
// network holding the baton (as the worker's agent would), and the worker
// forwards what its link network delivers to the suite's observer. Crash(id)
// kills worker id's process: the host sees its link die, and to its peers it
// crashed.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/network.h"
#include "gtest/gtest.h"
#include "sim/fault_spec.h"
#include "sim/process/child.h"
#include "sim/process/host.h"
#include "sim/process/pipe.h"
#include "testing/network_conformance.h"

namespace tether::testing {
namespace {

namespace link = sim::link;
using sim::LinkFrame;
using sim::ReadFrame;
using sim::WriteFrame;

// Virtual time between a worker's looks for the harness's next command.
constexpr absl::Duration kTick = absl::Milliseconds(1);

bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

link::Frame StatusFrame(const absl::Status& s) {
  link::Frame f;
  f.set_kind(link::Frame::REPLY);
  f.set_ok(s.ok());
  f.set_code(static_cast<int>(s.code()));
  f.set_text(std::string(s.message()));
  return f;
}

absl::Status StatusOf(const link::Frame& f) {
  return f.ok() ? absl::OkStatus()
                : absl::Status(static_cast<absl::StatusCode>(f.code()), f.text());
}

// In a worker's process: what its link network delivers goes to the harness
// over `events` (called on the controller, the baton holder).
class EventForwarder : public NetworkObserver {
 public:
  explicit EventForwarder(int events) : events_(events) {}
  void OnMessage(Message message) override {
    link::Frame f;
    f.set_kind(link::Frame::DELIVER);
    f.set_envelope(message.envelope.SerializeAsString());
    if (!WriteFrame(events_, std::move(f), message.buffers).ok()) _exit(7);
  }
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override {
    link::Frame f = StatusFrame(reason);
    f.set_kind(link::Frame::PEER_FAILED);
    f.set_peer(peer);
    if (!WriteFrame(events_, std::move(f)).ok()) _exit(7);
  }

 private:
  const int events_;
};

// Worker `rank`'s process: registers, then carries out the harness's commands
// (from `control`, answered there) on its link network, from its main frame.
[[noreturn]] void RunWorker(int rank, int link_fd, int control, int events) {
  auto created = sim::ChildRuntime::Create(link_fd, rank, /*max_task_threads=*/1);
  if (!created.ok()) _exit(4);
  sim::ChildRuntime& rt = **created;
  rt.WaitForStart();
  if (!rt.Register(absl::StrCat("worker", rank)).ok()) _exit(5);
  link::Frame ready;
  ready.set_kind(link::Frame::WORKERS);
  if (!WriteFrame(events, std::move(ready)).ok()) _exit(6);
  // A tick keeps the host running this worker, so that its controller looks
  // for a command (BlockUntil's predicate) every kTick of virtual time.
  Clock* clock = rt.clock();
  std::function<void()> tick;
  tick = [&] { clock->Schedule(clock->Now() + kTick, tick); };
  tick();
  EventForwarder forwarder(events);
  while (true) {
    rt.BlockUntil([control] { return Readable(control); }, "the harness's next command")
        .IgnoreError();
    absl::StatusOr<LinkFrame> cmd = ReadFrame(control);
    if (!cmd.ok()) _exit(0);  // The harness is gone.
    absl::Status s;
    switch (cmd->frame.kind()) {
      case link::Frame::NETWORK_START:
        s = rt.network()->Start(&forwarder);
        break;
      case link::Frame::SEND: {
        Message m;
        if (!m.envelope.ParseFromString(cmd->frame.envelope())) _exit(8);
        m.buffers = std::move(cmd->buffers);
        s = rt.network()->Send(cmd->frame.peer(), std::move(m));
        break;
      }
      case link::Frame::NETWORK_STOP: {
        rt.network()->Stop();
        // Marks the end of what the link network delivered before its Stop()
        // returned: the harness's Stop() returns once it has forwarded that much
        // (the controller and this frame never run at once, so what follows the
        // marker came after).
        link::Frame marker;
        marker.set_kind(link::Frame::NETWORK_STOP);
        if (!WriteFrame(events, std::move(marker)).ok()) _exit(7);
        break;
      }
      case link::Frame::EXIT:
        // Serves the host until it ends this process (the run is over).
        rt.MainDone(/*ok=*/true, "");
        _exit(0);  // Not reached.
      default:
        _exit(9);
    }
    if (!WriteFrame(control, StatusFrame(s)).ok()) _exit(0);
  }
}

// In this process: worker `id`'s network as the suite sees it.
class LinkProxy : public Network {
 public:
  LinkProxy(WorkerId id, int control, int events) : id_(id), control_(control), events_(events) {}
  ~LinkProxy() override {
    ::close(control_);
    ::close(events_);
  }

  WorkerId self() const override { return id_; }
  absl::Status Start(NetworkObserver* observer) override {
    {
      absl::MutexLock lock(&mu_);
      observer_ = observer;
    }
    link::Frame f;
    f.set_kind(link::Frame::NETWORK_START);
    absl::Status s = Call(std::move(f));
    if (!s.ok()) {
      absl::MutexLock lock(&mu_);
      observer_ = nullptr;
    }
    return s;
  }
  absl::Status Send(WorkerId to, Message message) override {
    link::Frame f;
    f.set_kind(link::Frame::SEND);
    f.set_peer(to);
    f.set_envelope(message.envelope.SerializeAsString());
    return Call(std::move(f), message.buffers);
  }
  void Stop() override {
    link::Frame f;
    f.set_kind(link::Frame::NETWORK_STOP);
    if (!Call(std::move(f)).ok()) return;  // Killed.
    // Returns once what the link network delivered before its Stop() returned
    // has reached the observer; anything after is a callback after Stop() (the
    // suite counts those).
    absl::MutexLock lock(&mu_);
    const int want = ++stops_;
    auto forwarded = [this, want]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stop_markers_ >= want || events_ended_;
    };
    mu_.Await(absl::Condition(&forwarded));
  }

  // The suite's observers are going (the harness with them): nothing more is
  // delivered.
  void Detach() {
    absl::MutexLock lock(&mu_);
    observer_ = nullptr;
  }
  // The process was killed: nothing more is delivered or sent.
  void Crashed() {
    absl::MutexLock lock(&mu_);
    observer_ = nullptr;
    crashed_ = true;
  }
  // Ends the worker's main function (the host then ends its process).
  void Finish() {
    absl::MutexLock lock(&call_mu_);
    if (crashed()) return;
    link::Frame f;
    f.set_kind(link::Frame::EXIT);
    WriteFrame(control_, std::move(f)).IgnoreError();
  }
  // The events reader, on a thread of its own: until the worker's process ends.
  void ForwardEvents() {
    while (true) {
      absl::StatusOr<LinkFrame> in = ReadFrame(events_);
      absl::MutexLock lock(&mu_);
      if (!in.ok()) {
        events_ended_ = true;
        return;
      }
      if (in->frame.kind() == link::Frame::NETWORK_STOP) {
        ++stop_markers_;
        continue;
      }
      if (observer_ == nullptr) continue;
      if (in->frame.kind() == link::Frame::DELIVER) {
        Message m;
        if (!m.envelope.ParseFromString(in->frame.envelope())) {
          ADD_FAILURE() << "worker " << id_ << " forwarded a malformed envelope";
          continue;
        }
        m.buffers = std::move(in->buffers);
        observer_->OnMessage(std::move(m));
      } else if (in->frame.kind() == link::Frame::PEER_FAILED) {
        observer_->OnPeerFailed(in->frame.peer(), StatusOf(in->frame));
      }
    }
  }
  // Waits for the worker's "registered" report (before ForwardEvents runs).
  bool AwaitRegistered() {
    absl::StatusOr<LinkFrame> in = ReadFrame(events_);
    return in.ok() && in->frame.kind() == link::Frame::WORKERS;
  }

 private:
  bool crashed() {
    absl::MutexLock lock(&mu_);
    return crashed_;
  }
  absl::Status Call(link::Frame f, const std::vector<Buffer>& buffers = {}) {
    absl::MutexLock lock(&call_mu_);
    if (crashed()) return absl::UnavailableError("the worker's process was killed");
    absl::Status s = WriteFrame(control_, std::move(f), buffers);
    if (!s.ok()) return s;
    absl::StatusOr<LinkFrame> reply = ReadFrame(control_);
    if (!reply.ok()) return reply.status();
    return StatusOf(reply->frame);
  }

  const WorkerId id_;
  const int control_;
  const int events_;
  absl::Mutex call_mu_;  // one command at a time
  absl::Mutex mu_ ABSL_ACQUIRED_AFTER(call_mu_);
  NetworkObserver* observer_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool crashed_ ABSL_GUARDED_BY(mu_) = false;
  int stops_ ABSL_GUARDED_BY(mu_) = 0;         // Stop() calls answered
  int stop_markers_ ABSL_GUARDED_BY(mu_) = 0;  // their markers forwarded
  bool events_ended_ ABSL_GUARDED_BY(mu_) = false;
};

class ProcessLinkHarness : public NetworkHarness {
 public:
  explicit ProcessLinkHarness(int n) {
    // A killed worker's link: the host's write fails with EPIPE, not a signal.
    ::signal(SIGPIPE, SIG_IGN);
    std::vector<int> host_fds;
    std::vector<int> ours;  // every descriptor of this process a worker must not keep
    for (int rank = 0; rank < n; ++rank) {
      int link_fds[2], control[2], events[2];
      if (socketpair(AF_UNIX, SOCK_STREAM, 0, link_fds) != 0 ||
          socketpair(AF_UNIX, SOCK_STREAM, 0, control) != 0 ||
          socketpair(AF_UNIX, SOCK_STREAM, 0, events) != 0) {
        ADD_FAILURE() << "socketpair failed";
        return;
      }
      pid_t pid = fork();
      if (pid == 0) {
        for (int fd : ours) ::close(fd);
        ::close(link_fds[0]);
        ::close(control[0]);
        ::close(events[0]);
        RunWorker(rank, link_fds[1], control[1], events[1]);
      }
      ::close(link_fds[1]);
      ::close(control[1]);
      ::close(events[1]);
      host_fds.push_back(link_fds[0]);
      ours.insert(ours.end(), {link_fds[0], control[0], events[0]});
      pids_.push_back(pid);
      proxies_.push_back(std::make_unique<LinkProxy>(rank, control[0], events[0]));
    }
    sim::ProcessHostOptions o;
    o.num_workers = n;
    o.seed = 1;
    o.faults = sim::FaultSpec();  // Ordering and reliability are the contract only without faults.
    o.time_limit = absl::Hours(24 * 365);  // Virtual: the ticks run until the harness ends.
    o.max_events = ~0ull;
    host_ = std::make_unique<sim::ProcessHost>(o, host_fds);
    host_thread_ = std::thread([this] { result_ = host_->Run(); });
    for (auto& p : proxies_) EXPECT_TRUE(p->AwaitRegistered()) << "a worker did not register";
    for (auto& p : proxies_) {
      LinkProxy* raw = p.get();
      readers_.emplace_back([raw] { raw->ForwardEvents(); });
    }
  }

  ~ProcessLinkHarness() override {
    for (auto& p : proxies_) p->Detach();
    for (auto& p : proxies_) p->Finish();
    if (host_thread_.joinable()) host_thread_.join();
    EXPECT_EQ(result_.hang, "");
    for (std::thread& t : readers_) t.join();
    for (pid_t pid : pids_) {
      int status = 0;
      waitpid(pid, &status, 0);
    }
    host_.reset();
  }

  int size() const override { return static_cast<int>(proxies_.size()); }
  Network* network(WorkerId id) override { return proxies_[id].get(); }
  bool RunUntil(const std::function<bool()>& done, absl::Duration timeout) override {
    // The host runs on its own thread: wait in real time.
    absl::Time deadline = absl::Now() + timeout;
    while (!done()) {
      if (absl::Now() >= deadline) return false;
      absl::SleepFor(absl::Milliseconds(1));
    }
    return true;
  }
  void Crash(WorkerId id) override {
    proxies_[id]->Crashed();
    ::kill(pids_[id], SIGKILL);
  }
  // The worker's clock is in its own process (ChildRuntime's LinkClock): there
  // is none here to give a wrapping network, and none is instantiated over this
  // harness.
  Clock* clock(WorkerId) override { return nullptr; }

 private:
  std::vector<pid_t> pids_;
  std::vector<std::unique_ptr<LinkProxy>> proxies_;
  std::unique_ptr<sim::ProcessHost> host_;
  sim::ProcessRunResult result_;
  std::thread host_thread_;
  std::vector<std::thread> readers_;
};

INSTANTIATE_TEST_SUITE_P(ProcessLink, NetworkConformanceTest,
                         ::testing::Values(NetworkFactory{
                             "process_link",
                             [](int n) -> std::unique_ptr<NetworkHarness> {
                               return std::make_unique<ProcessLinkHarness>(n);
                             }}),
                         NetworkFactoryName);

}  // namespace
}  // namespace tether::testing
