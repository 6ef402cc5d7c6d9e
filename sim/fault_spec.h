// FaultSpec: which faults a simulated network injects, written as a string for the command line
// (`explore --faults=SPEC`), parsed here, and resolved into a concrete plan per seed.
//
// Grammar: `none`, `all`, or comma-separated tokens (later tokens override
// earlier ones; `partition=`, `crash=` and `type=` tokens accumulate):
//
//   drop=P              drop each message with probability P (0..1)
//   dup=P               deliver a second copy with probability P
//   reorder=P           with probability P a message leaves its FIFO channel and gets an extra
//                       delay of up to 4x the delay distribution's bound (may overtake others)
//   delay=D             one-way latency: a constant D ("2ms", "1.5s", "0"),
//   delay=A..B          uniform in [A, B],
//   delay=exp:M         exponential with mean M (capped at 20 M).
//                       Default when unset: uniform 50us..500us (latency, not a fault).
//   partition=G-G[@T1..T2]   two-way partition between worker groups during [T1, T2) of virtual
//   partition=G>G[@T1..T2]   time since the start (`@T1..` = until the end; no `@` = whole run);
//                       `>` is one-way: messages from the left group to the right one are lost.
//                       A group is worker ids joined by '+', e.g. `0+1-2+3`, `2>0@100ms..400ms`.
//   partition=random    one random partition (random groups, direction, window).
//   crash=W@T           worker W crashes at T (its tasks, timers and in-flight messages vanish;
//                       peers get OnPeerFailed);
//   crash=W@T..R        ... and restarts at R as a new incarnation.
//   crash=random        one random worker crashes at a random time, restarting half the time.
//   skew=D              each worker's clock is offset by a random amount in [-D, D]
//   drift=X             each worker's clock runs at a random rate in [1-X, 1+X] (X < 0.5)
//   type=NAME:KEY=VALUE applies KEY (drop, dup, reorder, delay) only to messages of type NAME
//                       (as in core/envelope.proto), e.g. `type=RREF_USER_DELETE:drop=0.5`; it
//                       replaces the global value for that type.
//
// `none` injects nothing. `all` draws, per seed, a random mix of every fault
// above (drop up to 5%, dup up to 10%, reorder up to 20%, delay up to 50ms,
// sometimes one targeted message type, one partition, one crash with or without
// restart, clock skew and drift).
//
// Errors are kInvalidArgument naming the offending token. Parsing is pure;
// randomness enters only through Resolve(), which takes the run's Prng.
#ifndef TETHER_SIM_FAULT_SPEC_H_
#define TETHER_SIM_FAULT_SPEC_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/message.h"
#include "sim/random.h"

namespace tether::sim {

struct DelayDist {
  enum class Kind { kUniform, kExponential };
  Kind kind = Kind::kUniform;
  absl::Duration lo = absl::Microseconds(50);   // kUniform
  absl::Duration hi = absl::Microseconds(500);  // kUniform
  absl::Duration mean = absl::ZeroDuration();   // kExponential

  absl::Duration Sample(Prng& rng) const;
  // Largest value Sample() returns.
  absl::Duration Max() const;
  std::string ToString() const;
};

struct LinkFaults {
  std::optional<double> drop;
  std::optional<double> dup;
  std::optional<double> reorder;
  std::optional<DelayDist> delay;
};

struct PartitionSpec {
  std::vector<int32_t> left;
  std::vector<int32_t> right;
  bool one_way = false;  // only left -> right is cut
  absl::Duration start = absl::ZeroDuration();
  absl::Duration end = absl::InfiniteDuration();

  // Whether a message from `from` to `to` sent at `elapsed` (since the start)
  // is cut.
  bool Cuts(int32_t from, int32_t to, absl::Duration elapsed) const;
  std::string ToString() const;
};

struct CrashSpec {
  int32_t worker = 0;
  absl::Duration at = absl::ZeroDuration();
  std::optional<absl::Duration> restart_at;
  std::string ToString() const;
};

struct FaultSpec {
  bool all = false;  // resolve a random mix per seed
  LinkFaults link;
  std::map<MessageType, LinkFaults> by_type;
  std::vector<PartitionSpec> partitions;
  int random_partitions = 0;
  std::vector<CrashSpec> crashes;
  int random_crashes = 0;
  absl::Duration skew = absl::ZeroDuration();
  double drift = 0;

  static absl::StatusOr<FaultSpec> Parse(absl::string_view text);
  // The canonical text of this spec (parses back to an equal spec).
  std::string ToString() const;

  // Whether the spec can lose messages or workers (drop, partitions, crashes,
  // or `all`). Scenarios only promise successful calls when it cannot.
  bool CanLose() const;
  // Checks worker ids against `num_workers`; kInvalidArgument naming the bad
  // token.
  absl::Status Validate(int num_workers) const;
};

// A FaultSpec with everything random (`all`, `random` partitions and crashes)
// drawn for one run. The link faults of the result are concrete (every optional
// set).
struct FaultPlan {
  FaultSpec spec;
  LinkFaults link;                            // global, every field set
  std::map<MessageType, LinkFaults> by_type;  // every field set
  std::vector<double> clock_rate;             // per worker
  std::vector<absl::Duration> clock_skew;     // per worker

  // The link faults for a message of `type`.
  const LinkFaults& For(MessageType type) const;
  std::string ToString() const;
};

FaultPlan ResolveFaults(const FaultSpec& spec, int num_workers, Prng& rng);

}  // namespace tether::sim

#endif  // TETHER_SIM_FAULT_SPEC_H_
