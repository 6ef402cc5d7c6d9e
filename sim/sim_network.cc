#include "sim/sim_network.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tether::sim {
namespace {

uint64_t Fnv1a(absl::string_view bytes, uint64_t h = 0xcbf29ce484222325ULL) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace

uint64_t MessageDigest(const Message& message) {
  const wire::Envelope& e = message.envelope;
  uint64_t h = Fnv1a(e.payload());
  h = Mix64(h ^ static_cast<uint64_t>(e.type()));
  h = Mix64(h ^ e.request_id());
  h = Mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(e.from())) << 32 |
                 static_cast<uint32_t>(e.to())));
  h = Mix64(h ^ e.from_incarnation());
  h = Mix64(h ^ static_cast<uint64_t>(e.timeout_ns()));
  h = Mix64(h ^ static_cast<uint64_t>(e.error().code()));
  h = Fnv1a(e.error().message(), h);
  for (const Buffer& b : message.buffers)
    h = Fnv1a(b.view(), Mix64(h ^ b.size()));
  return h;
}

SimFabric::SimFabric(Scheduler* scheduler, int num_workers, FaultPlan plan,
                     uint64_t seed)
    : scheduler_(scheduler),
      num_workers_(num_workers),
      plan_(std::move(plan)),
      rng_(Prng(seed).Fork(2)),
      endpoints_(num_workers, nullptr),
      incarnations_(num_workers, -1),
      channels_(static_cast<size_t>(num_workers) * num_workers) {}

SimFabric::~SimFabric() {
  for (SimNetwork* e : endpoints_) {
    if (e != nullptr) e->fabric_ = nullptr;
  }
  for (SimNetwork* e : retired_) e->fabric_ = nullptr;
}

std::unique_ptr<SimNetwork> SimFabric::CreateEndpoint(WorkerId worker) {
  SimNetwork* old = endpoints_[worker];
  if (old != nullptr) retired_.push_back(old);
  const uint64_t inc = static_cast<uint64_t>(++incarnations_[worker]);
  std::unique_ptr<SimNetwork> e(new SimNetwork(this, worker, inc));
  e->peers_.resize(num_workers_);
  for (int p = 0; p < num_workers_; ++p) {
    e->peers_[p].incarnation =
        static_cast<uint64_t>(std::max<int64_t>(0, incarnations_[p]));
  }
  endpoints_[worker] = e.get();
  return e;
}

bool SimFabric::crashed(WorkerId worker) const {
  return endpoints_[worker] != nullptr && endpoints_[worker]->crashed();
}

SimNetwork* SimFabric::Running(WorkerId worker) const {
  SimNetwork* e = endpoints_[worker];
  return e != nullptr && e->running() ? e : nullptr;
}

void SimFabric::Crash(WorkerId worker) {
  SimNetwork* e = endpoints_[worker];
  const int64_t inc = incarnations_[worker];
  if (e != nullptr) e->state_ = SimNetwork::State::kCrashed;
  for (int p = 0; p < num_workers_; ++p) {
    for (Channel* c : {&channel(worker, p), &channel(p, worker)}) {
      for (const InFlight& item : c->queue)
        stats_.vanished += item.close ? 0 : 1;
      c->queue.clear();
      c->last_due = absl::InfinitePast();
    }
  }
  scheduler_->PurgeDomain(worker);
  for (int p = 0; p < num_workers_; ++p) {
    if (p == worker) continue;
    ScheduleFailure(
        p, worker,
        absl::StrCat("worker ", worker, " (incarnation ", inc, ") crashed"));
  }
}

absl::Status SimFabric::Send(SimNetwork* from, WorkerId to, Message message) {
  const WorkerId self = from->self_;
  if (from->state_ != SimNetwork::State::kRunning) {
    return absl::UnavailableError(
        absl::StrCat("network of worker ", self, " is not running"));
  }
  if (to < 0 || to >= num_workers_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown worker ", to, " (workers are 0..", num_workers_ - 1, ")"));
  }
  SimNetwork::PeerView& view = from->peers_[to];
  if (view.failure_known) {
    SimNetwork* target = endpoints_[to];
    if (incarnations_[to] > static_cast<int64_t>(view.incarnation) &&
        target != nullptr && !target->crashed()) {
      view = SimNetwork::PeerView{static_cast<uint64_t>(incarnations_[to]),
                                  false, false};
    } else {
      return absl::UnavailableError(absl::StrCat(
          "worker ", to, " (incarnation ", view.incarnation, ") has failed"));
    }
  }
  message.envelope.set_from(self);
  message.envelope.set_to(to);
  message.SealBuffers();
  ++stats_.sent;
  const uint64_t digest = MessageDigest(message);
  InFlight item{false, view.incarnation, std::move(message)};

  if (to == self) {  // loopback: no faults
    Enqueue(self, to, std::move(item), plan_.link.delay->Sample(rng_), true,
            digest);
    return absl::OkStatus();
  }
  SimNetwork* target = endpoints_[to];
  if (target == nullptr || !target->running() ||
      target->incarnation_ != item.to_incarnation) {
    ++stats_.refused;
    ScheduleFailure(
        self, to,
        absl::StrCat("connection to worker ", to, " refused (incarnation ",
                     item.to_incarnation, " is not running)"));
    return absl::OkStatus();
  }
  const absl::Duration elapsed = scheduler_->Elapsed();
  for (const PartitionSpec& p : plan_.spec.partitions) {
    if (p.Cuts(self, to, elapsed)) {
      ++stats_.partitioned;
      scheduler_->Trace(0x9a9a0000ULL ^ digest);
      return absl::OkStatus();
    }
  }
  const LinkFaults& faults = plan_.For(item.message.envelope.type());
  if (rng_.Bernoulli(*faults.drop)) {
    ++stats_.dropped;
    scheduler_->Trace(0xd0d00000ULL ^ digest);
    return absl::OkStatus();
  }
  const bool dup = rng_.Bernoulli(*faults.dup);
  if (dup) {
    ++stats_.duplicated;
    InFlight copy{false, item.to_incarnation, item.message};
    const absl::Duration delay = faults.delay->Sample(rng_);
    const bool reorder = rng_.Bernoulli(*faults.reorder);
    Enqueue(self, to, std::move(copy), delay, !reorder, digest ^ 0xd00b);
  }
  const absl::Duration delay = faults.delay->Sample(rng_);
  const bool reorder = rng_.Bernoulli(*faults.reorder);
  Enqueue(self, to, std::move(item), delay, !reorder, digest);
  return absl::OkStatus();
}

void SimFabric::Enqueue(WorkerId from, WorkerId to, InFlight item,
                        absl::Duration delay, bool fifo, uint64_t digest) {
  const absl::Time now = scheduler_->Now();
  if (fifo) {
    Channel& c = channel(from, to);
    const absl::Time due = std::max(now + delay, c.last_due);
    c.last_due = due;
    c.queue.push_back(std::move(item));
    scheduler_->At(due, Owners{from, to}, EventKind::kDelivery, digest,
                   [this, from, to] {
                     Channel& ch = channel(from, to);
                     if (ch.queue.empty()) return;
                     InFlight next = std::move(ch.queue.front());
                     ch.queue.pop_front();
                     Deliver(from, to, std::move(next));
                   });
    return;
  }
  ++stats_.reordered;
  const absl::Duration bound =
      std::max(plan_.For(item.message.envelope.type()).delay->Max(),
               absl::Milliseconds(1));
  const absl::Duration extra = absl::Nanoseconds(
      rng_.UniformInt(0, absl::ToInt64Nanoseconds(bound) * 4));
  auto held = std::make_shared<InFlight>(std::move(item));
  scheduler_->At(
      now + delay + extra, Owners{from, to}, EventKind::kDelivery, digest,
      [this, from, to, held] { Deliver(from, to, std::move(*held)); });
}

void SimFabric::Deliver(WorkerId from, WorkerId to, InFlight item) {
  SimNetwork* r = endpoints_[to];
  const bool ok =
      r != nullptr && r->running() && r->incarnation_ == item.to_incarnation;
  if (item.close) {
    if (ok) NotifyFailure(r, from, absl::StrCat("worker ", from, " stopped"));
    return;
  }
  if (!ok) {
    ++stats_.refused;
    ScheduleFailure(
        from, to,
        absl::StrCat("worker ", to, " (incarnation ", item.to_incarnation,
                     ") refused a message: it is not running"));
    return;
  }
  ++stats_.delivered;
  r->observer_->OnMessage(std::move(item.message));
}

void SimFabric::ScheduleFailure(WorkerId worker, WorkerId peer,
                                std::string reason) {
  SimNetwork* e = Running(worker);
  if (e == nullptr) return;
  SimNetwork::PeerView& view = e->peers_[peer];
  if (view.failure_pending) return;
  view.failure_pending = true;
  const uint64_t inc = e->incarnation_;
  const absl::Duration delay = plan_.link.delay->Sample(rng_);
  scheduler_->At(scheduler_->Now() + delay, Owners{worker, -1},
                 EventKind::kPeerFailed, static_cast<uint64_t>(peer),
                 [this, worker, peer, inc, reason = std::move(reason)] {
                   SimNetwork* e = Running(worker);
                   if (e == nullptr || e->incarnation_ != inc) return;
                   NotifyFailure(e, peer, reason);
                 });
}

void SimFabric::NotifyFailure(SimNetwork* e, WorkerId peer,
                              const std::string& reason) {
  SimNetwork::PeerView& view = e->peers_[peer];
  if (view.failure_known) return;
  view.failure_known = true;
  view.failure_pending = true;
  ++stats_.peer_failures;
  e->observer_->OnPeerFailed(peer, absl::UnavailableError(reason));
}

void SimFabric::OnStopped(SimNetwork* e) {
  const WorkerId self = e->self_;
  for (int p = 0; p < num_workers_; ++p) {
    if (p == self || Running(p) == nullptr) continue;
    InFlight close{true, static_cast<uint64_t>(incarnations_[p]), Message()};
    Enqueue(self, p, std::move(close), plan_.link.delay->Sample(rng_), true,
            0xc105e000ULL + static_cast<uint64_t>(p));
  }
}

void SimFabric::OnDestroyed(SimNetwork* e) {
  if (endpoints_[e->self_] == e) endpoints_[e->self_] = nullptr;
  retired_.erase(std::remove(retired_.begin(), retired_.end(), e),
                 retired_.end());
}

SimNetwork::SimNetwork(SimFabric* fabric, WorkerId self, uint64_t incarnation)
    : fabric_(fabric), self_(self), incarnation_(incarnation) {}

SimNetwork::~SimNetwork() {
  if (fabric_ != nullptr) fabric_->OnDestroyed(this);
}

absl::Status SimNetwork::Start(NetworkObserver* observer) {
  if (observer == nullptr)
    return absl::InvalidArgumentError("Start: observer is null");
  switch (state_) {
    case State::kNew:
      if (fabric_ == nullptr)
        return absl::UnavailableError("the simulated network is gone");
      observer_ = observer;
      state_ = State::kRunning;
      return absl::OkStatus();
    case State::kRunning:
      return absl::FailedPreconditionError(
          absl::StrCat("network of worker ", self_, " already started"));
    case State::kStopped:
      return absl::FailedPreconditionError(
          absl::StrCat("network of worker ", self_, " was stopped"));
    case State::kCrashed:
      return absl::UnavailableError(absl::StrCat("worker ", self_, " crashed"));
  }
  return absl::InternalError("unreachable");
}

absl::Status SimNetwork::Send(WorkerId to, Message message) {
  if (fabric_ == nullptr)
    return absl::UnavailableError("the simulated network is gone");
  return fabric_->Send(this, to, std::move(message));
}

void SimNetwork::Stop() {
  if (state_ == State::kNew) {
    state_ = State::kStopped;
    return;
  }
  if (state_ != State::kRunning) return;
  state_ = State::kStopped;
  if (fabric_ != nullptr) fabric_->OnStopped(this);
}

}  // namespace tether::sim
