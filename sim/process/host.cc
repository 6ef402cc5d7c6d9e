#include "sim/process/host.h"

#include <unistd.h>

#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/trace_event.h"
#include "sim/random.h"

namespace tether::sim {

struct ProcessHost::Worker {
  int fd = -1;
  bool dead = false;  // crashed, lost or exited: commands to it are dropped
  std::unique_ptr<SimClock> clock;
  std::unique_ptr<SimExecutor> executor;
  std::unique_ptr<SimNetwork> network;
  std::unique_ptr<Observer> observer;
  bool network_started = false;
  std::map<uint64_t, TimerId> timers;  // child's timer id -> clock timer
  WorkerOutcome outcome;
};

// Hands what the simulated network delivers to worker k's process. The endpoint
// listens from the worker's registration on (as a real worker listens before it
// publishes its address); what arrives before the worker's agent starts its
// network waits here, in order.
class ProcessHost::Observer : public NetworkObserver {
 public:
  Observer(ProcessHost* host, WorkerId k) : host_(host), k_(k) {}
  void OnMessage(Message message) override {
    host_->RecordMessage(k_, /*sent=*/false, message);
    link::Frame f;
    f.set_kind(link::Frame::DELIVER);
    f.set_envelope(message.envelope.SerializeAsString());
    Forward(std::move(f), std::move(message.buffers));
  }
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override {
    link::Frame f;
    f.set_kind(link::Frame::PEER_FAILED);
    f.set_peer(peer);
    f.set_text(std::string(reason.message()));
    Forward(std::move(f), {});
  }
  // The worker's agent started its network: deliver what waited.
  void Open() {
    open_ = true;
    while (!held_.empty()) {
      auto [f, buffers] = std::move(held_.front());
      held_.pop_front();
      host_->Exec(k_, std::move(f), std::move(buffers));
    }
  }
  bool open() const { return open_; }
  bool has_held() const { return !held_.empty(); }

 private:
  void Forward(link::Frame f, std::vector<Buffer> buffers) {
    if (open_) {
      host_->Exec(k_, std::move(f), std::move(buffers));
    } else {
      held_.emplace_back(std::move(f), std::move(buffers));
    }
  }

  ProcessHost* const host_;
  const WorkerId k_;
  bool open_ = false;
  std::deque<std::pair<link::Frame, std::vector<Buffer>>> held_;
};

ProcessHost::ProcessHost(ProcessHostOptions options, std::vector<int> fds)
    : options_(std::move(options)) {
  const int n = options_.num_workers;
  scheduler_ = std::make_unique<Scheduler>(options_.seed, options_.order);
  Prng plan_rng = Prng(options_.seed).Fork(3);
  FaultPlan plan = ResolveFaults(options_.faults, n, plan_rng);
  result_.plan = plan.ToString();
  fabric_ =
      std::make_unique<SimFabric>(scheduler_.get(), n, plan, options_.seed);
  names_.resize(n);
  for (int k = 0; k < n; ++k) {
    auto w = std::make_unique<Worker>();
    w->fd = k < static_cast<int>(fds.size()) ? fds[k] : -1;
    w->clock =
        std::make_unique<SimClock>(scheduler_.get(), k,
                                   ClockModel{fabric_->plan().clock_skew[k],
                                              fabric_->plan().clock_rate[k]});
    w->executor = std::make_unique<SimExecutor>(scheduler_.get(), k);
    w->network = fabric_->CreateEndpoint(k);
    w->observer = std::make_unique<Observer>(this, k);
    if (w->fd < 0) {
      w->dead = true;
      w->outcome.lost = true;
      w->outcome.error = "no link to this worker's process";
    }
    workers_.push_back(std::move(w));
  }
  for (const CrashSpec& c : fabric_->plan().spec.crashes) {
    const WorkerId id = c.worker;
    if (id < 0 || id >= n) continue;
    scheduler_->At(Scheduler::Epoch() + c.at, Owners{}, EventKind::kFault,
                   0xc0000 + static_cast<uint64_t>(id),
                   [this, id] { Crash(id); });
    // Restarting a worker process is not supported: a crashed worker stays
    // down.
  }
}

ProcessHost::~ProcessHost() {
  for (auto& w : workers_) {
    if (w->fd >= 0) ::close(w->fd);
  }
  workers_.clear();
  fabric_.reset();
  scheduler_.reset();
}

void ProcessHost::Reply(WorkerId k, bool ok, absl::StatusCode code,
                        std::string text) {
  Worker& w = *workers_[k];
  link::Frame r;
  r.set_kind(link::Frame::REPLY);
  r.set_ok(ok);
  r.set_code(static_cast<int>(code));
  r.set_text(std::move(text));
  r.set_now_ns(absl::ToUnixNanos(w.clock->Now()));
  absl::Status s = WriteFrame(w.fd, std::move(r));
  if (!s.ok()) Lost(k, std::string(s.message()));
}

void ProcessHost::Lost(WorkerId k, const std::string& why) {
  Worker& w = *workers_[k];
  if (w.dead) return;
  w.dead = true;
  if (!w.outcome.main_done && !w.outcome.crashed) {
    w.outcome.lost = true;
    w.outcome.error = absl::StrCat("the worker process died: ", why);
  }
  // To its peers a dead process looks like a crash.
  if (!fabric_->crashed(k)) fabric_->Crash(k);
}

void ProcessHost::Crash(WorkerId k) {
  Worker& w = *workers_[k];
  if (w.dead || w.outcome.main_done) return;
  w.outcome.crashed = true;
  Record(k, "i", "crash", "fault");
  link::Frame exit;
  exit.set_kind(link::Frame::EXIT);
  WriteFrame(w.fd, std::move(exit)).IgnoreError();
  w.dead = true;
  fabric_->Crash(k);
  if (options_.on_crash) options_.on_crash(k);
}

void ProcessHost::Finish(WorkerId k) {
  // The main function returned: like a process that exits, its connections
  // close.
  Worker& w = *workers_[k];
  if (w.network_started) w.network->Stop();
  w.dead = true;
  link::Frame exit;
  exit.set_kind(link::Frame::EXIT);
  WriteFrame(w.fd, std::move(exit)).IgnoreError();
}

void ProcessHost::Record(WorkerId k, const std::string& phase,
                         const std::string& name, const std::string& category,
                         const std::string& fields) {
  if (!options_.record_trace) return;
  result_.trace.push_back(TraceEvent{
      k, TraceEventJson(k, phase, name, category,
                        absl::ToInt64Microseconds(scheduler_->Elapsed()),
                        fields)});
}

void ProcessHost::RecordMessage(WorkerId k, bool sent, const Message& m) {
  if (!options_.record_trace) return;
  for (std::string& json : MessageTraceEvents(
           k, sent, m, absl::ToInt64Microseconds(scheduler_->Elapsed()))) {
    result_.trace.push_back(TraceEvent{k, std::move(json)});
  }
}

void ProcessHost::HandleRequest(WorkerId k, LinkFrame& in) {
  Worker& w = *workers_[k];
  link::Frame& f = in.frame;
  switch (f.kind()) {
    case link::Frame::POST: {
      uint64_t id = f.id();
      w.executor->Post([this, k, id] {
        link::Frame c;
        c.set_kind(link::Frame::RUN_TASK);
        c.set_id(id);
        Exec(k, std::move(c));
      });
      Reply(k, true);
      return;
    }
    case link::Frame::SCHEDULE: {
      uint64_t id = f.id();
      TimerId t = w.clock->Schedule(absl::FromUnixNanos(f.deadline_ns()),
                                    [this, k, id] {
                                      workers_[k]->timers.erase(id);
                                      link::Frame c;
                                      c.set_kind(link::Frame::FIRE_TIMER);
                                      c.set_id(id);
                                      Exec(k, std::move(c));
                                    });
      w.timers[id] = t;
      Reply(k, true);
      return;
    }
    case link::Frame::CANCEL: {
      bool cancelled = false;
      auto it = w.timers.find(f.id());
      if (it != w.timers.end()) {
        cancelled = w.clock->Cancel(it->second);
        w.timers.erase(it);
      }
      Reply(k, cancelled);
      return;
    }
    case link::Frame::SEND: {
      Message m;
      if (!m.envelope.ParseFromString(f.envelope())) {
        Reply(k, false, absl::StatusCode::kInvalidArgument,
              "malformed envelope");
        return;
      }
      m.buffers = std::move(in.buffers);
      m.envelope.set_to(f.peer());
      RecordMessage(k, /*sent=*/true, m);
      absl::Status s = w.network->Send(f.peer(), std::move(m));
      if (!s.ok())
        Record(
            k, "i", "send failed", "error",
            absl::StrCat("\"args\":{\"error\":", JsonString(s.message()), "}"));
      Reply(k, s.ok(), s.code(), std::string(s.message()));
      return;
    }
    case link::Frame::NETWORK_START: {
      if (!w.network_started || w.observer->open()) {
        Reply(k, false, absl::StatusCode::kFailedPrecondition,
              w.network_started ? "network already started"
                                : "register the worker first");
        return;
      }
      Reply(k, true);
      if (w.observer->has_held()) {
        w.executor->Post([this, k] { workers_[k]->observer->Open(); });
      } else {
        w.observer->Open();
      }
      return;
    }
    case link::Frame::NETWORK_STOP:
      w.network->Stop();
      Reply(k, true);
      return;
    case link::Frame::READY: {
      uint64_t frame = f.id();
      w.executor->Post([this, k, frame] {
        link::Frame c;
        c.set_kind(link::Frame::RESUME);
        c.set_id(frame);
        Exec(k, std::move(c));
      });
      Reply(k, true);
      return;
    }
    case link::Frame::REGISTER: {
      const std::string& name = f.text();
      if (name.empty()) {
        Reply(k, false, absl::StatusCode::kInvalidArgument,
              "worker name must not be empty");
        return;
      }
      if (!names_[k].empty()) {
        Reply(k, false, absl::StatusCode::kFailedPrecondition,
              absl::StrCat("rank ", k, " already registered as '", names_[k],
                           "'"));
        return;
      }
      for (int j = 0; j < static_cast<int>(names_.size()); ++j) {
        if (names_[j] == name) {
          Reply(k, false, absl::StatusCode::kInvalidArgument,
                absl::StrCat("worker name '", name,
                             "' is already taken by rank ", j));
          return;
        }
      }
      names_[k] = name;
      w.outcome.name = name;
      if (options_.record_trace) {
        result_.trace.push_back(TraceEvent{
            k, ProcessNameEvent(k, absl::StrCat(name, " (rank ", k, ")"))});
      }
      if (absl::Status s = w.network->Start(w.observer.get()); s.ok()) {
        w.network_started = true;
      }
      ++registered_;
      Reply(k, true);
      if (registered_ == static_cast<int>(names_.size())) {
        for (int j = 0; j < static_cast<int>(workers_.size()); ++j) {
          workers_[j]->executor->Post([this, j] {
            link::Frame c;
            c.set_kind(link::Frame::WORKERS);
            for (const std::string& nm : names_) c.add_names(nm);
            Exec(j, std::move(c));
          });
        }
      }
      return;
    }
    case link::Frame::MAIN_DONE:
      Record(k, "i", f.ok() ? "main returned" : "main raised", "main",
             f.ok() ? ""
                    : absl::StrCat("\"args\":{\"error\":", JsonString(f.text()),
                                   "}"));
      w.outcome.main_done = true;
      w.outcome.ok = f.ok();
      w.outcome.error = f.text();
      w.outcome.error_kind = f.error_kind();
      Reply(k, true);
      return;
    case link::Frame::TRACE:
      Record(k, "i", f.text(), "user");
      Reply(k, true);
      return;
    default:
      Lost(k, absl::StrCat("sent an unexpected frame kind ", f.kind()));
      return;
  }
}

void ProcessHost::Exec(WorkerId k, link::Frame command,
                       std::vector<Buffer> buffers) {
  Worker& w = *workers_[k];
  if (w.dead) return;
  command.set_now_ns(absl::ToUnixNanos(w.clock->Now()));
  absl::Status s = WriteFrame(w.fd, std::move(command), buffers);
  if (!s.ok()) {
    Lost(k, std::string(s.message()));
    return;
  }
  while (!w.dead) {
    absl::StatusOr<LinkFrame> in = ReadFrame(w.fd);
    if (!in.ok()) {
      Lost(k, std::string(in.status().message()));
      return;
    }
    if (in->frame.kind() == link::Frame::DONE) {
      w.outcome.blocked.clear();
      w.outcome.blocked_in_shutdown = false;
      for (const link::Blocked& b : in->frame.blocked()) {
        w.outcome.blocked.push_back(b.where());
        if (b.kind() == link::Blocked::SHUTDOWN)
          w.outcome.blocked_in_shutdown = true;
      }
      if (w.outcome.main_done) Finish(k);
      return;
    }
    HandleRequest(k, *in);
  }
}

bool ProcessHost::AllDone() const {
  for (const auto& w : workers_) {
    if (!w->outcome.main_done && !w->outcome.crashed && !w->outcome.lost)
      return false;
  }
  return true;
}

ProcessRunResult ProcessHost::Run() {
  for (int k = 0; k < static_cast<int>(workers_.size()); ++k) {
    workers_[k]->executor->Post([this, k] {
      link::Frame c;
      c.set_kind(link::Frame::START);
      Exec(k, std::move(c));
    });
  }
  const absl::Time limit = scheduler_->Now() + options_.time_limit;
  const uint64_t events_before = scheduler_->events_run();
  bool done = scheduler_->RunUntil([this] { return AllDone(); }, limit,
                                   options_.max_events);
  for (int k = 0; k < static_cast<int>(workers_.size()); ++k) {
    for (const std::string& b : workers_[k]->outcome.blocked) {
      if (!workers_[k]->outcome.main_done)
        Record(k, "i", absl::StrCat("still waiting: ", b), "hang");
    }
  }
  if (!AllDone()) {
    if (scheduler_->idle()) {
      result_.hang =
          "deadlock: nothing left to run, but some workers are still waiting";
    } else if (scheduler_->events_run() - events_before >=
               options_.max_events) {
      result_.hang = absl::StrCat("livelock: more than ", options_.max_events,
                                  " events ran");
    } else {
      result_.hang = absl::StrCat("time limit: the run took more than ",
                                  absl::FormatDuration(options_.time_limit),
                                  " of virtual time");
    }
  }

  for (int k = 0; k < static_cast<int>(workers_.size()); ++k) {
    Worker& w = *workers_[k];
    if (!w.dead) {
      link::Frame exit;
      exit.set_kind(link::Frame::EXIT);
      WriteFrame(w.fd, std::move(exit)).IgnoreError();
      w.dead = true;
    }
    if (w.outcome.main_done) {
      w.outcome.blocked.clear();
      w.outcome.blocked_in_shutdown = false;
    }
    result_.workers.push_back(w.outcome);
  }
  result_.trace_hash = scheduler_->trace_hash();
  result_.elapsed = scheduler_->Elapsed();
  result_.events = scheduler_->events_run();
  return std::move(result_);
}

}  // namespace tether::sim
