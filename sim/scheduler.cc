#include "sim/scheduler.h"

#include <algorithm>
#include <utility>

namespace tether::sim {
namespace {

constexpr std::pair<int64_t, uint64_t> kReadyKey{-1, 0};
constexpr std::pair<int64_t, uint64_t> kCancelledKey{-2, 0};

}  // namespace

Scheduler::Scheduler(uint64_t seed, RunOrder order)
    : rng_(Prng(seed).Fork(1)), order_(order) {}

void Scheduler::Post(Owners owners, EventKind kind, uint64_t tag,
                     std::function<void()> fn) {
  ready_.push_back(Event{owners, kind, 0, tag, std::move(fn)});
}

EventId Scheduler::At(absl::Time when, Owners owners, EventKind kind,
                      uint64_t tag, std::function<void()> fn) {
  int64_t t = now_ns_;
  if (when == absl::InfiniteFuture()) {
    t = INT64_MAX;
  } else if (when > Now()) {
    t = absl::ToInt64Nanoseconds(when - Epoch());
  }
  const uint64_t seq = next_seq_++;
  const EventId id = seq;
  Key key{t, seq};
  timed_.emplace(key, Event{owners, kind, id, tag, std::move(fn)});
  live_ids_[id] = key;
  return id;
}

bool Scheduler::Cancel(EventId id) {
  auto it = live_ids_.find(id);
  if (it == live_ids_.end() || it->second == kCancelledKey) return false;
  if (it->second == kReadyKey) {
    it->second = kCancelledKey;  // skipped when picked
    return true;
  }
  timed_.erase(it->second);
  live_ids_.erase(it);
  return true;
}

void Scheduler::PurgeDomain(int32_t domain) {
  if (domain < 0) return;
  // The generation changes first, and purged events are destroyed only once the
  // queues are consistent again: destroying an event's function may run code (a
  // destructor) that posts.
  if (generations_.size() <= static_cast<size_t>(domain)) {
    generations_.resize(domain + 1, 0);
  }
  ++generations_[domain];
  std::vector<Event> purged;
  for (auto it = timed_.begin(); it != timed_.end();) {
    if (it->second.owners.Has(domain)) {
      if (it->second.id != 0) live_ids_.erase(it->second.id);
      purged.push_back(std::move(it->second));
      it = timed_.erase(it);
    } else {
      ++it;
    }
  }
  std::deque<Event> kept;
  for (Event& e : ready_) {
    if (e.owners.Has(domain)) {
      if (e.id != 0) live_ids_.erase(e.id);
      purged.push_back(std::move(e));
    } else {
      kept.push_back(std::move(e));
    }
  }
  ready_.swap(kept);
  Trace(0xdead0000ULL + static_cast<uint64_t>(domain));
  purged.clear();
}

void Scheduler::Clear() {
  for (int round = 0; round < 100 && !idle(); ++round) {
    std::deque<Event> ready;
    absl::btree_map<Key, Event> timed;
    ready.swap(ready_);
    timed.swap(timed_);
    live_ids_.clear();
  }
}

uint64_t Scheduler::Generation(int32_t domain) const {
  if (domain < 0 || static_cast<size_t>(domain) >= generations_.size())
    return 0;
  return generations_[domain];
}

absl::Time Scheduler::NextEventTime() const {
  if (timed_.empty()) return absl::InfiniteFuture();
  const int64_t t = timed_.begin()->first.first;
  if (t == INT64_MAX) return absl::InfiniteFuture();
  return Epoch() + absl::Nanoseconds(t);
}

void Scheduler::Trace(uint64_t value) {
  trace_hash_ = Mix64(trace_hash_ ^ Mix64(value + 0x9e3779b97f4a7c15ULL));
}

void Scheduler::PromoteDue() {
  while (!timed_.empty() && timed_.begin()->first.first <= now_ns_) {
    auto node = timed_.extract(timed_.begin());
    if (node.mapped().id != 0) live_ids_[node.mapped().id] = kReadyKey;
    ready_.push_back(std::move(node.mapped()));
  }
}

bool Scheduler::RunOne() {
  while (true) {
    PromoteDue();
    if (ready_.empty()) {
      if (timed_.empty()) return false;
      const int64_t t = timed_.begin()->first.first;
      if (t == INT64_MAX) return false;  // only never-firing events remain
      now_ns_ = t;
      continue;
    }
    Event event;
    if (order_ == RunOrder::kFifo || ready_.size() == 1) {
      event = std::move(ready_.front());
      ready_.pop_front();
    } else {
      const size_t i = rng_.Uniform(ready_.size());
      if (i != ready_.size() - 1) std::swap(ready_[i], ready_.back());
      event = std::move(ready_.back());
      ready_.pop_back();
    }
    if (event.id != 0) {
      auto it = live_ids_.find(event.id);
      const bool cancelled =
          it == live_ids_.end() || it->second == kCancelledKey;
      if (it != live_ids_.end()) live_ids_.erase(it);
      if (cancelled) continue;
    }
    RunEvent(event);
    return true;
  }
}

void Scheduler::RunEvent(Event& event) {
  ++events_run_;
  ++by_kind_[static_cast<int>(event.kind) & 7];
  uint64_t h = static_cast<uint64_t>(event.kind);
  h = h * 0x100000001b3ULL ^ static_cast<uint32_t>(event.owners.a);
  h = h * 0x100000001b3ULL ^ static_cast<uint32_t>(event.owners.b);
  h = h * 0x100000001b3ULL ^ static_cast<uint64_t>(now_ns_);
  h = h * 0x100000001b3ULL ^ event.tag;
  Trace(h);
  std::function<void()> fn = std::move(event.fn);
  fn();
}

bool Scheduler::RunUntilIdle(uint64_t max_events) {
  for (uint64_t n = 0; n < max_events; ++n) {
    if (!RunOne()) return true;
  }
  return idle();
}

bool Scheduler::RunUntil(const std::function<bool()>& done, absl::Time limit,
                         uint64_t max_events) {
  for (uint64_t n = 0; n < max_events; ++n) {
    if (done()) return true;
    PromoteDue();
    if (ready_.empty() && NextEventTime() > limit) return done();
    if (!RunOne()) return done();
  }
  return done();
}

void Scheduler::RunFor(absl::Duration d) {
  const int64_t end = now_ns_ + absl::ToInt64Nanoseconds(d);
  while (true) {
    PromoteDue();
    if (ready_.empty()) {
      if (timed_.empty() || timed_.begin()->first.first > end) break;
    }
    RunOne();
  }
  if (now_ns_ < end) now_ns_ = end;
}

}  // namespace tether::sim
