// Scheduler: the simulator's deterministic event loop, on one thread.
//
// Everything that happens in a simulation is an event in this scheduler:
// executor tasks, clock timers, message deliveries, peer-failure notices,
// planned faults. Events due now sit in a run queue from which the scheduler
// picks one at a time with its own seeded Prng (or in FIFO order for
// debugging); virtual time advances only when nothing is runnable, and then
// straight to the next timed event. One seed therefore replays one run, event
// for event.
//
// Each event has up to two owners ("domains", one per simulated worker, -1 for
// none). Crashing a worker purges every queued event it owns (PurgeDomain) and
// bumps the domain's generation, so executors and clocks of the dead
// incarnation become inert.
//
// Every event that runs is folded into a 64-bit trace hash (kind, owners,
// virtual time and a tag such as a message digest), so two runs of one seed can
// be compared cheaply.
//
//   Scheduler s(seed);
//   s.Post({0}, EventKind::kTask, 0, [] { ... });
//   s.At(s.Now() + absl::Milliseconds(5), {1}, EventKind::kTimer, 7, [] { ... });
//   s.RunUntilIdle();
//
// Not thread-safe: create it, post to it and run it on one thread. Event
// functions run on that thread, inline in Run*(), and may post further events.
#ifndef TETHER_SIM_SCHEDULER_H_
#define TETHER_SIM_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "sim/random.h"

namespace tether::sim {

// What an event is, for the trace hash and statistics.
enum class EventKind : uint8_t {
  kTask = 1,        // an executor task
  kTimer = 2,       // a clock timer
  kDelivery = 3,    // a message handed to a network observer
  kPeerFailed = 4,  // a peer-failure notice handed to a network observer
  kFault = 5,       // a planned fault (crash, restart)
  kOther = 6,
};

// The workers an event belongs to; -1 for none. A delivery belongs to sender
// and receiver.
struct Owners {
  int32_t a = -1;
  int32_t b = -1;
  bool Has(int32_t domain) const { return domain >= 0 && (a == domain || b == domain); }
};

enum class RunOrder {
  kRandom,  // pick uniformly among the runnable events (default: explores interleavings)
  kFifo,    // run runnable events in the order they became runnable
};

using EventId = uint64_t;

class Scheduler {
 public:
  // The virtual time every simulation starts at (2000-01-01T00:00:00Z).
  static absl::Time Epoch() { return absl::FromUnixSeconds(946684800); }

  explicit Scheduler(uint64_t seed, RunOrder order = RunOrder::kRandom);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  absl::Time Now() const { return Epoch() + absl::Nanoseconds(now_ns_); }
  // Virtual time since Epoch().
  absl::Duration Elapsed() const { return absl::Nanoseconds(now_ns_); }

  // Makes `fn` runnable now.
  void Post(Owners owners, EventKind kind, uint64_t tag, std::function<void()> fn);
  // Runs `fn` at virtual time `when` (or now, if `when` has passed). The id can
  // be cancelled.
  EventId At(absl::Time when, Owners owners, EventKind kind, uint64_t tag,
             std::function<void()> fn);
  // Cancels an event from At(). True if it was queued and now will never run.
  bool Cancel(EventId id);

  // Drops every queued event owned by `domain` and bumps its generation.
  void PurgeDomain(int32_t domain);
  // Drops every queued event (their functions are destroyed, never run),
  // repeatedly if destroying them queues more. For tearing a simulation down.
  void Clear();
  // Starts at 0; PurgeDomain increments it. Executors and clocks compare it
  // with the generation they were created in and go inert once it changes.
  uint64_t Generation(int32_t domain) const;

  // Runs one event, first advancing virtual time to the next timed event if
  // nothing is runnable now. Returns false if there was nothing to run (idle).
  bool RunOne();
  // Runs until idle or until `max_events` more events have run. Returns true if
  // idle.
  bool RunUntilIdle(uint64_t max_events = UINT64_MAX);
  // Runs until `done()` holds (checked before each event), the scheduler is
  // idle, virtual time would pass `limit`, or `max_events` events have run.
  // Returns done().
  bool RunUntil(const std::function<bool()>& done, absl::Time limit = absl::InfiniteFuture(),
                uint64_t max_events = UINT64_MAX);
  // Runs every event due until Now() + d (time then stands at Now() + d even if
  // idle earlier).
  void RunFor(absl::Duration d);

  bool idle() const { return ready_.empty() && timed_.empty(); }
  // Events queued (runnable now or timed).
  size_t pending() const { return ready_.size() + timed_.size(); }
  // Time of the earliest timed event, or InfiniteFuture().
  absl::Time NextEventTime() const;

  uint64_t trace_hash() const { return trace_hash_; }
  // Folds extra values into the trace hash (e.g., a fault decision).
  void Trace(uint64_t value);
  uint64_t events_run() const { return events_run_; }
  uint64_t events_run(EventKind kind) const { return by_kind_[static_cast<int>(kind)]; }

  // The scheduler's own random stream (run-queue choices). Others should Fork
  // their own.
  Prng& rng() { return rng_; }

 private:
  struct Event {
    Owners owners;
    EventKind kind;
    EventId id;  // 0 if not cancellable
    uint64_t tag;
    std::function<void()> fn;
  };
  using Key = std::pair<int64_t, uint64_t>;  // (time ns, sequence)

  // Moves every timed event due at now_ns_ into ready_.
  void PromoteDue();
  void RunEvent(Event& event);

  Prng rng_;
  RunOrder order_;
  int64_t now_ns_ = 0;
  uint64_t next_seq_ = 1;
  std::deque<Event> ready_;
  absl::btree_map<Key, Event> timed_;
  // Cancellable events still queued: id -> key in timed_, kReadyKey once in
  // ready_, or kCancelledKey if cancelled while in ready_.
  absl::flat_hash_map<EventId, Key> live_ids_;  // seam-ok: lookups only
  std::vector<uint64_t> generations_;
  uint64_t trace_hash_ = 0x6a09e667f3bcc909ULL;
  uint64_t events_run_ = 0;
  uint64_t by_kind_[8] = {};
};

}  // namespace tether::sim

#endif  // TETHER_SIM_SCHEDULER_H_
