#include "sim/process/child.h"

#include <unistd.h>

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tether::sim {
namespace {

constexpr uint64_t kNoFrame = ~0ull;
// Process-wide state (one slot per thread: which frame the thread is, if any), listed with the
// extension's others in python/process_state.h. Written once by each thread as it starts.
thread_local uint64_t tls_frame = kNoFrame;

}  // namespace

class ChildRuntime::LinkClock : public Clock {
 public:
  explicit LinkClock(ChildRuntime* rt) : rt_(rt) {}
  absl::Time Now() override {
    rt_->AssertHoldsBaton();
    return absl::FromUnixNanos(rt_->now_ns_);
  }
  TimerId Schedule(absl::Time deadline,
                   std::function<void()> callback) override {
    rt_->AssertHoldsBaton();
    TimerId id = rt_->next_id_++;
    rt_->timers_[id] = std::move(callback);
    if (deadline == absl::InfiniteFuture())
      return id;  // Never fires; only Cancel() sees it.
    link::Frame f;
    f.set_kind(link::Frame::SCHEDULE);
    f.set_id(id);
    f.set_deadline_ns(absl::ToUnixNanos(deadline));
    rt_->Request(std::move(f)).IgnoreError();
    return id;
  }
  bool Cancel(TimerId id) override {
    rt_->AssertHoldsBaton();
    if (rt_->timers_.erase(id) == 0) return false;
    link::Frame f;
    f.set_kind(link::Frame::CANCEL);
    f.set_id(id);
    rt_->Request(std::move(f)).IgnoreError();
    return true;
  }

 private:
  ChildRuntime* const rt_;
};

class ChildRuntime::LinkExecutor : public Executor {
 public:
  explicit LinkExecutor(ChildRuntime* rt) : rt_(rt) {}
  void Post(std::function<void()> task) override {
    rt_->AssertHoldsBaton();
    uint64_t id = rt_->next_id_++;
    rt_->tasks_[id] = std::move(task);
    link::Frame f;
    f.set_kind(link::Frame::POST);
    f.set_id(id);
    rt_->Request(std::move(f)).IgnoreError();
  }

 private:
  ChildRuntime* const rt_;
};

class ChildRuntime::LinkNetwork : public Network {
 public:
  explicit LinkNetwork(ChildRuntime* rt) : rt_(rt) {}
  WorkerId self() const override { return rt_->rank_; }
  absl::Status Start(NetworkObserver* observer) override {
    rt_->AssertHoldsBaton();
    if (observer_ != nullptr)
      return absl::FailedPreconditionError("network already started");
    observer_ = observer;
    link::Frame f;
    f.set_kind(link::Frame::NETWORK_START);
    absl::StatusOr<link::Frame> r = rt_->Request(std::move(f));
    if (!r.ok()) return r.status();
    return r->ok() ? absl::OkStatus()
                   : absl::Status(static_cast<absl::StatusCode>(r->code()),
                                  r->text());
  }
  absl::Status Send(WorkerId to, Message message) override {
    rt_->AssertHoldsBaton();
    if (stopped_) return absl::UnavailableError("network is stopped");
    message.envelope.set_to(to);
    message.SealBuffers();
    link::Frame f;
    f.set_kind(link::Frame::SEND);
    f.set_peer(to);
    f.set_envelope(message.envelope.SerializeAsString());
    absl::StatusOr<link::Frame> r = rt_->Request(std::move(f), message.buffers);
    if (!r.ok()) return r.status();
    return r->ok() ? absl::OkStatus()
                   : absl::Status(static_cast<absl::StatusCode>(r->code()),
                                  r->text());
  }
  void Stop() override {
    rt_->AssertHoldsBaton();
    if (stopped_) return;
    stopped_ = true;
    observer_ = nullptr;
    link::Frame f;
    f.set_kind(link::Frame::NETWORK_STOP);
    rt_->Request(std::move(f)).IgnoreError();
  }
  // From the controller (the baton holder).
  NetworkObserver* observer() const {
    rt_->AssertHoldsBaton();
    return observer_;
  }

 private:
  ChildRuntime* const rt_;
  NetworkObserver* observer_ ABSL_GUARDED_BY(rt_->baton_) = nullptr;
  bool stopped_ ABSL_GUARDED_BY(rt_->baton_) = false;
};

absl::StatusOr<std::unique_ptr<ChildRuntime>> ChildRuntime::Create(
    int fd, WorkerId rank, int max_task_threads) {
  if (fd < 0) return absl::InvalidArgumentError("bad link descriptor");
  if (max_task_threads < 1) max_task_threads = 1;
  std::unique_ptr<ChildRuntime> rt(
      new ChildRuntime(fd, rank, max_task_threads));
  ChildRuntime* raw = rt.get();
  rt->controller_ =
      std::thread([raw] { raw->ControllerLoop(); });  // seam-ok: see header
  return rt;
}

ChildRuntime::ChildRuntime(int fd, WorkerId rank, int max_task_threads)
    : fd_(fd), rank_(rank), max_task_threads_(max_task_threads) {
  clock_ = std::make_unique<LinkClock>(this);
  executor_ = std::make_unique<LinkExecutor>(this);
  network_ = std::make_unique<LinkNetwork>(this);
  auto main = std::make_unique<Frame>();
  main->id = kMain;
  frames_[kMain] = std::move(main);
}

ChildRuntime::~ChildRuntime() {
  // The process leaves with _exit(); threads are never joined.
  if (controller_.joinable()) controller_.detach();
  for (auto& [id, f] : frames_) {
    if (f->thread.joinable()) f->thread.detach();
  }
}

Clock* ChildRuntime::clock() { return clock_.get(); }
Executor* ChildRuntime::executor() { return executor_.get(); }
Network* ChildRuntime::network() { return network_.get(); }

void ChildRuntime::Die(const std::string& why) const {
  std::fprintf(stderr, "tether.sim worker %d: %s\n", rank_, why.c_str());
  std::fflush(nullptr);
  _exit(3);
}

absl::StatusOr<link::Frame> ChildRuntime::Request(
    link::Frame frame, const std::vector<Buffer>& buffers) {
  absl::Status s = WriteFrame(fd_, std::move(frame), buffers);
  if (!s.ok()) Die(absl::StrCat("lost the simulator host: ", s.message()));
  absl::StatusOr<LinkFrame> in = ReadFrame(fd_);
  if (!in.ok())
    Die(absl::StrCat("lost the simulator host: ", in.status().message()));
  if (in->frame.kind() == link::Frame::EXIT) {
    std::fflush(nullptr);
    _exit(0);
  }
  if (in->frame.kind() != link::Frame::REPLY) {
    Die(absl::StrCat("expected a reply from the host, got frame kind ",
                     in->frame.kind()));
  }
  now_ns_ = in->frame.now_ns();
  return std::move(in->frame);
}

void ChildRuntime::AssertHoldsBaton() const {
  uint64_t holder;
  {
    absl::MutexLock lock(&baton_mu_);
    holder = holder_;
  }
  if (tls_frame == kNoFrame || holder != tls_frame) {
    Die("the simulated worker's runtime was used from a thread that does not "
        "hold the baton (a thread of its own, or a frame that is not running)");
  }
}

void ChildRuntime::set_max_task_threads(int n) {
  AssertHoldsBaton();
  max_task_threads_ = n < 1 ? 1 : n;
}

void ChildRuntime::PassBaton(uint64_t to, uint64_t self) {
  absl::MutexLock lock(&baton_mu_);
  holder_ = to;
  auto mine = [this, self]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(baton_mu_) {
    return holder_ == self;
  };
  baton_mu_.Await(absl::Condition(&mine));
}

void ChildRuntime::AwaitBaton(uint64_t self) {
  absl::MutexLock lock(&baton_mu_);
  auto mine = [this, self]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(baton_mu_) {
    return holder_ == self;
  };
  baton_mu_.Await(absl::Condition(&mine));
}

bool ChildRuntime::OnFrame() const {
  return tls_frame != kNoFrame && tls_frame != kController;
}

void ChildRuntime::WaitForStart() {
  tls_frame = kMain;
  AwaitBaton(kMain);
}

absl::Status ChildRuntime::BlockUntil(std::function<bool()> ready,
                                      std::string where, WaitKind kind) {
  const uint64_t me = tls_frame;
  if (me == kNoFrame || me == kController) {
    return absl::FailedPreconditionError(
        "a simulated worker can only wait on its main thread or in an RPC "
        "handler");
  }
  AssertHoldsBaton();
  while (!ready()) {
    Frame& f = *frames_[me];
    f.blocked = true;
    f.announced = false;
    f.ready = ready;
    f.where = where;
    f.kind = kind;
    PassBaton(kController, me);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ChildRuntime::Register(
    const std::string& name) {
  AssertHoldsBaton();
  link::Frame f;
  f.set_kind(link::Frame::REGISTER);
  f.set_text(name);
  absl::StatusOr<link::Frame> r = Request(std::move(f));
  if (!r.ok()) return r.status();
  if (!r->ok())
    return absl::Status(static_cast<absl::StatusCode>(r->code()), r->text());
  // The predicate runs on the controller, the baton holder.
  auto known = [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return names_known_; };
  absl::Status s =
      BlockUntil(known, absl::StrCat("rendezvous of worker '", name, "'"));
  if (!s.ok()) return s;
  return names_;
}

void ChildRuntime::Trace(const std::string& json) {
  AssertHoldsBaton();
  link::Frame f;
  f.set_kind(link::Frame::TRACE);
  f.set_text(json);
  Request(std::move(f)).IgnoreError();
}

void ChildRuntime::MainDone(bool ok, const std::string& text,
                            const std::string& error_kind) {
  AssertHoldsBaton();
  link::Frame f;
  f.set_kind(link::Frame::MAIN_DONE);
  f.set_ok(ok);
  f.set_text(text);
  f.set_error_kind(error_kind);
  Request(std::move(f)).IgnoreError();
  frames_[kMain]->blocked = false;
  while (true)
    PassBaton(kController, kMain);  // Never resumed: the host ends with EXIT.
}

void ChildRuntime::RunTask(std::function<void()> task) {
  Frame* idle = nullptr;
  int task_threads = 0;
  for (auto& [id, f] : frames_) {
    if (id == kMain) continue;
    ++task_threads;
    if (!f->blocked && !f->job && idle == nullptr) idle = f.get();
  }
  if (idle == nullptr) {
    if (task_threads >= max_task_threads_) {
      starved_.push_back(std::move(task));
      return;
    }
    auto frame = std::make_unique<Frame>();
    frame->id = next_frame_++;
    idle = frame.get();
    frames_[idle->id] = std::move(frame);
    // seam-ok on the next line: a frame; frames hand a baton, one runs at a
    // time.
    auto loop = [this, idle] { TaskThreadLoop(idle); };
    idle->thread = std::thread(loop);  // seam-ok: a frame
  }
  idle->job = std::move(task);
  PassBaton(idle->id, kController);
}

void ChildRuntime::TaskThreadLoop(Frame* frame) {
  tls_frame = frame->id;
  AwaitBaton(frame->id);
  AssertHoldsBaton();
  while (true) {
    std::function<void()> job = std::move(frame->job);
    frame->job = nullptr;
    if (job) job();
    // A freed thread takes the tasks that waited for one, as a pool thread
    // would.
    if (!starved_.empty()) {
      frame->job = std::move(starved_.front());
      starved_.pop_front();
      continue;
    }
    PassBaton(kController, frame->id);
  }
}

void ChildRuntime::AnnounceReadyFrames() {
  for (auto& [id, f] : frames_) {
    if (!f->blocked || f->announced || !f->ready || !f->ready()) continue;
    f->announced = true;
    link::Frame r;
    r.set_kind(link::Frame::READY);
    r.set_id(id);
    Request(std::move(r)).IgnoreError();
  }
}

void ChildRuntime::ControllerLoop() {
  tls_frame = kController;
  AssertHoldsBaton();  // The controller starts with it.
  while (true) {
    absl::StatusOr<LinkFrame> in = ReadFrame(fd_);
    if (!in.ok())
      Die(absl::StrCat("lost the simulator host: ", in.status().message()));
    link::Frame& cmd = in->frame;
    now_ns_ = cmd.now_ns();
    switch (cmd.kind()) {
      case link::Frame::START:
        PassBaton(kMain, kController);
        break;
      case link::Frame::RUN_TASK: {
        auto it = tasks_.find(cmd.id());
        if (it == tasks_.end()) break;
        std::function<void()> task = std::move(it->second);
        tasks_.erase(it);
        RunTask(std::move(task));
        break;
      }
      case link::Frame::FIRE_TIMER: {
        auto it = timers_.find(cmd.id());
        if (it == timers_.end()) break;  // Cancelled meanwhile.
        std::function<void()> cb = std::move(it->second);
        timers_.erase(it);
        cb();
        break;
      }
      case link::Frame::DELIVER: {
        Message m;
        if (!m.envelope.ParseFromString(cmd.envelope()))
          Die("host delivered a malformed envelope");
        m.buffers = std::move(in->buffers);
        if (NetworkObserver* o = network_->observer())
          o->OnMessage(std::move(m));
        break;
      }
      case link::Frame::PEER_FAILED:
        if (NetworkObserver* o = network_->observer()) {
          o->OnPeerFailed(cmd.peer(), absl::UnavailableError(cmd.text()));
        }
        break;
      case link::Frame::RESUME: {
        auto it = frames_.find(cmd.id());
        if (it == frames_.end() || !it->second->blocked) break;
        it->second->blocked = false;
        it->second->announced = false;
        it->second->ready = nullptr;
        PassBaton(cmd.id(), kController);
        break;
      }
      case link::Frame::WORKERS:
        names_.assign(cmd.names().begin(), cmd.names().end());
        names_known_ = true;
        break;
      case link::Frame::EXIT:
        std::fflush(nullptr);
        _exit(0);
      default:
        Die(absl::StrCat("unexpected command kind ", cmd.kind(),
                         " from the host"));
    }
    AnnounceReadyFrames();
    link::Frame done;
    done.set_kind(link::Frame::DONE);
    for (auto& [id, f] : frames_) {
      if (!f->blocked) continue;
      link::Blocked* b = done.add_blocked();
      b->set_frame(id);
      b->set_where(f->where);
      b->set_kind(f->kind == WaitKind::kShutdown ? link::Blocked::SHUTDOWN
                                                 : link::Blocked::OTHER);
    }
    for (size_t i = 0; i < starved_.size(); ++i) {
      link::Blocked* b = done.add_blocked();
      b->set_frame(0);
      b->set_where(
          "a task waiting for a free thread (every worker thread is blocked)");
    }
    absl::Status s = WriteFrame(fd_, std::move(done));
    if (!s.ok()) Die(absl::StrCat("lost the simulator host: ", s.message()));
  }
}

}  // namespace tether::sim
