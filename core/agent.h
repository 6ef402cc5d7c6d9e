// Agent: one worker's RPC engine. It keeps the worker registry, sends requests
// and matches their replies, runs registered handlers for incoming requests,
// enforces per-call timeouts, fails the calls that wait on a failed peer, and
// shuts down gracefully (a barrier over all workers) or not.
//
// The agent reaches time, threads and the network only through Clock, Executor
// and Network, so the same agent runs over TCP with a thread pool or inside the
// simulator.
//
//   auto agent = Agent::Create(options, clock, network, executor).value();
//   agent->RegisterHandler(wire::TEST_CALL, [](std::shared_ptr<IncomingCall> call) {
//     call->Reply(call->request().envelope.payload(), {});
//   });
//   agent->Start();
//   Future<Message> reply = agent->Call(peer, wire::TEST_CALL, "ping", {});
//   reply.Then([](const absl::StatusOr<Message>& m) { ... });  // On the executor.
//   agent->Shutdown(/*graceful=*/true).Wait();
//
// Ownership: the Clock, Network and Executor must outlive the agent. The agent
// is the network's observer from Start() until its shutdown completes. Handlers
// and future callbacks run on the executor. All methods are thread-safe.
// Lifetime: the agent's timer and executor callbacks (and the reply path of an
// IncomingCall) go through a CallbackGate: the destructor first waits for those
// running on other threads (a handler still running included), and those that
// start later, or a reply sent after, do nothing. So the agent may be destroyed
// while the clock still holds a timer it could not cancel (Clock::Cancel does
// not wait for one already running) or the executor a task it posted.
//
// Graceful shutdown, the one shutdown protocol (tether.rpc's shutdown() is this barrier): every
// worker calls Shutdown(true). The worker with the lowest id leads and polls every worker.
//   1. Join: once every worker has declared its intent (called Shutdown(true)), the leader's
//      polls say so, and each worker runs its joined listeners once (for instance the RRef
//      context's deletion of its user references: nothing is deleted while another worker may
//      still be running user code that could use it).
//   2. Quiescence: the leader polls the activity counters until every worker has joined, none
//      has a call in flight, a handler running or pending activity from a source, and two
//      consecutive polls read the same counters; then it tells every worker to stop.
// So no worker stops while another still has work that could reach it, and no reply is lost.
// A peer lost before the join completes fails the barrier at once, with kUnavailable naming it,
// on every worker (AgentOptions::shutdown_fails_on_lost_peer; otherwise, and always after the
// join, a failed peer counts as stopped): the leader sends SHUTDOWN_ABORT with the reason and
// resends it until every live follower acknowledged it (at most about a second), then stops; a
// follower that has not called Shutdown yet remembers it, and its later Shutdown(true) fails
// with it at once (as it does when the leader is gone). If the leader fails (before its commit
// reached this worker: once it has every ack it stops, and that is no failure), or the barrier
// takes longer than `shutdown_timeout`, each worker stops on its own and pending calls fail with
// kCancelled. GetShutdownProgress() says what the barrier waits for (for reports while it waits).
// The barrier itself is core/shutdown_barrier.h; the agent drives it under its own mutex.
#ifndef TETHER_CORE_AGENT_H_
#define TETHER_CORE_AGENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/future.h"
#include "core/message.h"
#include "core/network.h"

namespace tether {

class CallbackGate;
class ShutdownBarrier;

struct WorkerInfo {
  std::string name;
  WorkerId id = -1;

  friend bool operator==(const WorkerInfo& a, const WorkerInfo& b) {
    return a.name == b.name && a.id == b.id;
  }
};

// Told of each call of this agent that it ended with an error itself: a
// timeout, a failed peer, a failed send, shutdown (not an error reply: that
// came from the callee). Runs on the thread ending the call, outside the
// agent's locks; must not block. For traces and logs.
class CallObserver {
 public:
  virtual ~CallObserver() = default;
  virtual void OnCallFailed(WorkerId to, MessageType type, uint64_t request_id,
                            const absl::Status& status) = 0;
};

struct AgentOptions {
  WorkerId self = -1;
  // Every worker, this one included. Names and ids must be unique.
  std::vector<WorkerInfo> workers;
  // Increases each time a worker with this id restarts.
  uint64_t incarnation = 0;
  // Timeout of a call that does not set one. absl::ZeroDuration(): no timeout.
  absl::Duration default_timeout = absl::Seconds(60);
  // Bound on the graceful-shutdown barrier. absl::ZeroDuration(): no bound.
  absl::Duration shutdown_timeout = absl::Seconds(60);
  // How often the leader polls workers (and resends unacknowledged barrier
  // messages).
  absl::Duration shutdown_poll_interval = absl::Milliseconds(10);
  // A peer lost before every worker has joined the graceful shutdown fails the
  // barrier at once, naming it (what a program's shutdown() wants: the peer can
  // never join). False: it counts as stopped.
  bool shutdown_fails_on_lost_peer = false;
  // Request ids remembered per caller to discard duplicated requests.
  size_t dedup_window = 4096;
  // Not owned; must outlive the agent. Null: nobody is told.
  CallObserver* call_observer = nullptr;
};

// Bugs planted on purpose, to prove the simulator's oracles find them. They have effect only in
// the testonly variant //core:agent_planted (agent.cc compiled with TETHER_PLANTED_BUGS); the
// production //core:agent compiles their branches out and ignores set_planted_bugs. The struct is
// the same in both variants (no ODR difference); PlantedBugsCompiledIn() tells which one is linked.
struct PlantedBugs {
  bool lose_timeout_timer = false;      // Calls never time out.
  bool drop_reply_at_shutdown = false;  // Replies are not sent once shutdown has begun.
  bool process_duplicates = false;      // Duplicated requests run their handler again.
};

// True in //core:agent_planted, false in the production //core:agent.
bool PlantedBugsCompiledIn();

// A request being served. The handler (or whatever it hands the call to) must
// reply exactly once, from any thread; a call dropped without a reply answers
// the caller with kInternal.
class IncomingCall {
 public:
  virtual ~IncomingCall() = default;
  virtual const Message& request() const = 0;
  WorkerId caller() const { return request().envelope.from(); }
  // When the caller will give up; absl::InfiniteFuture() if never.
  virtual absl::Time deadline() const = 0;
  virtual void Reply(std::string payload, std::vector<Buffer> buffers) = 0;
  // Reply() for a payload that is an exception the function raised: a result
  // for the caller, flagged in the envelope (Envelope.raised) for traces.
  virtual void ReplyRaised(std::string payload, std::vector<Buffer> buffers) = 0;
  virtual void ReplyError(const absl::Status& error) = 0;
};

using Handler = std::function<void(std::shared_ptr<IncomingCall> call)>;

// Traffic with one peer, for people looking at a slow or stuck worker.
struct PeerStats {
  int64_t calls_sent = 0;
  int64_t calls_received = 0;
  int64_t messages_sent = 0;
  int64_t messages_received = 0;
  int64_t bytes_sent = 0;  // envelope payloads and buffers
  int64_t bytes_received = 0;
};

// A call of this worker still waiting for its reply.
struct InFlightCall {
  uint64_t request_id = 0;
  WorkerId to = -1;
  MessageType type = wire::MESSAGE_TYPE_UNSPECIFIED;
  absl::Duration age;
};

// Extra quiescence source for the shutdown barrier (for instance, the RRef
// context's unacknowledged control messages): `pending` must reach zero before
// the workers stop, and `events` must change whenever the source does any work.
struct ActivitySnapshot {
  int64_t pending = 0;
  uint64_t events = 0;
};
using ActivitySource = std::function<ActivitySnapshot()>;

// Told (on the executor) when a peer is reported failed, after the agent has
// failed the calls waiting on it.
using PeerFailureListener = std::function<void(WorkerId peer, const absl::Status& reason)>;

// Told once (on the executor, outside the agent's locks) when every worker has
// joined this worker's graceful shutdown, before this worker reports itself
// ready to stop; the work it starts must show in an ActivitySource, so the
// barrier waits for it. Must not block.
using ShutdownJoinedListener = std::function<void()>;

// What a graceful shutdown waits for, as this worker knows it.
struct ShutdownProgress {
  bool pending = false;  // A graceful shutdown has begun and not finished.
  WorkerId leader = -1;
  bool joined = false;    // Every worker has called Shutdown(true).
  bool aborting = false;  // Leader: ending the barrier (a worker was lost before the join).
  // Leader only: the live workers that have not called Shutdown(true), and
  // those whose last report had work in flight.
  std::vector<WorkerId> not_joined;
  std::vector<WorkerId> busy;
};

class Agent : public NetworkObserver {
 public:
  // Returns kInvalidArgument for a malformed registry (duplicate or empty
  // names, duplicate ids, `self` missing).
  static absl::StatusOr<std::unique_ptr<Agent>> Create(AgentOptions options, Clock* clock,
                                                       Network* network, Executor* executor);
  ~Agent() override;

  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Registers the handler for requests of `type`. Call before Start().
  void RegisterHandler(MessageType type, Handler handler);
  // Adds a source the shutdown barrier waits on. Call before Start().
  void AddActivitySource(ActivitySource source);
  // Adds a listener for peer failures. Call before Start().
  void AddPeerFailureListener(PeerFailureListener listener);
  // Adds a listener for the join of the graceful shutdown. Call before Start().
  void AddShutdownJoinedListener(ShutdownJoinedListener listener);
  // Starts the network. Requests of a type without a handler are answered with
  // kUnimplemented.
  absl::Status Start();

  const WorkerInfo& self() const { return self_; }
  const std::vector<WorkerInfo>& workers() const { return workers_; }
  // kInvalidArgument naming the worker if unknown.
  absl::StatusOr<WorkerInfo> GetWorker(absl::string_view name) const;
  absl::StatusOr<WorkerInfo> GetWorker(WorkerId id) const;

  // Sends a request and returns its reply. `timeout`: unset uses the default;
  // zero means none. The future fails with the handler's error (code and
  // message intact), kDeadlineExceeded on timeout, kUnavailable if the peer
  // fails, kCancelled if this agent shuts down first, and kInvalidArgument for
  // an unknown worker.
  Future<Message> Call(WorkerId to, MessageType type, std::string payload,
                       std::vector<Buffer> buffers,
                       std::optional<absl::Duration> timeout = std::nullopt);

  // Begins shutdown (idempotent: later calls return the same future). Graceful:
  // the barrier described above; the future fails with kDeadlineExceeded or
  // kUnavailable if the barrier was cut short (the agent is stopped all the
  // same). Ungraceful: fails pending calls with kCancelled and stops at once;
  // an ungraceful call while a graceful shutdown is still pending ends it so
  // (its future fails with kCancelled), so a stop never waits on a barrier.
  // Either way the network is stopped when the future completes.
  Future<Unit> Shutdown(bool graceful);
  bool is_shut_down() const;
  // Completes (its callbacks on the executor) when this agent has stopped, however the shutdown
  // began: Shutdown()'s future, without beginning one. For components that must end their own
  // work then (the distributed-autograd passes).
  Future<Unit> stopped() const { return shutdown_future_; }
  ShutdownProgress GetShutdownProgress() const;

  absl::Duration default_timeout() const;
  void set_default_timeout(absl::Duration timeout);

  // Counters for people and tests: client_active_calls, server_active_calls,
  // calls_sent, calls_received, calls_timed_out, calls_failed_peer,
  // duplicates_dropped, peers_failed, ...
  std::map<std::string, int64_t> GetDebugInfo() const;

  // Per-peer traffic, by worker id.
  std::map<WorkerId, PeerStats> GetPeerStats() const;
  // Calls in flight, oldest first.
  std::vector<InFlightCall> GetInFlightCalls() const;
  // A one-screen text summary: counters, traffic per peer, the oldest calls in
  // flight.
  std::string Summary() const;

  // Has effect only in //core:agent_planted (see PlantedBugs).
  void set_planted_bugs(PlantedBugs bugs);

  // NetworkObserver.
  void OnMessage(Message message) override;
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override;

 private:
  struct PendingCall;
  struct PeerState;
  class BarrierHost;

  // Event counts for GetDebugInfo(), one field each (no map lookup on the hot path). Relaxed
  // atomics: bumped with or without mu_, read by GetDebugInfo() under mu_ (so the counts bumped
  // under mu_ are consistent with the rest of the snapshot). They only ever grow, and
  // GetDebugInfo() reports a count once it is non-zero, as the string-keyed map it replaces did.
  struct Counters {
    std::atomic<int64_t> calls_sent{0};
    std::atomic<int64_t> calls_received{0};
    std::atomic<int64_t> calls_failed{0};
    std::atomic<int64_t> calls_timed_out{0};
    std::atomic<int64_t> duplicates_dropped{0};
    std::atomic<int64_t> stale_replies{0};
    std::atomic<int64_t> peers_failed{0};
    std::atomic<int64_t> messages_from_unknown_worker{0};
    std::atomic<int64_t> messages_from_old_incarnation{0};
    std::atomic<int64_t> malformed_control_messages{0};
  };
  static void Count(std::atomic<int64_t>& counter) {
    counter.fetch_add(1, std::memory_order_relaxed);
  }

  Agent(AgentOptions options, Clock* clock, Network* network, Executor* executor);

  // Everything below is defined in agent.cc.
  void HandleRequest(Message message);
  void HandleReply(Message message);
  void SendReply(WorkerId to, uint64_t request_id, absl::StatusOr<Message> reply);
  // `from_reply`: the result is the callee's reply (not decided here).
  void CompleteCall(uint64_t request_id, absl::StatusOr<Message> result, bool from_reply = false);
  void OnCallTimeout(uint64_t request_id);
  void ServerCallDone();
  // Sends a barrier message (the barrier's Host).
  void SendControl(WorkerId to, MessageType type, std::string payload);
  // Stops: fails the pending calls, stops the network, completes shutdown_future_ with `status`.
  // Once per agent (the first call wins); the barrier's Host calls it too.
  void FinishShutdown(absl::Status status);
  ActivitySnapshot LocalActivity() const;
  bool IsDuplicateLocked(WorkerId from, uint64_t request_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // `fn` wrapped to run only while this agent lives (see Lifetime above).
  template <typename Fn>
  auto Guarded(Fn fn) const;

  const AgentOptions options_;
  // Every timer and executor callback holds it; the destructor closes it first.
  const std::shared_ptr<CallbackGate> gate_;
  Clock* const clock_;
  Network* const network_;
  Executor* const executor_;
  WorkerInfo self_;
  std::vector<WorkerInfo> workers_;
  // seam-ok: lookups only, never iterated.
  absl::flat_hash_map<std::string, WorkerId> ids_by_name_;
  std::map<MessageType, Handler> handlers_;
  std::vector<ActivitySource> activity_sources_;
  std::vector<PeerFailureListener> peer_failure_listeners_;

  mutable absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_request_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::Duration default_timeout_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::unique_ptr<PendingCall>> pending_ ABSL_GUARDED_BY(mu_);
  std::map<WorkerId, std::unique_ptr<PeerState>> peers_ ABSL_GUARDED_BY(mu_);
  int64_t server_active_ ABSL_GUARDED_BY(mu_) = 0;
  Counters counters_;
  uint64_t events_ ABSL_GUARDED_BY(mu_) = 0;
  PlantedBugs bugs_ ABSL_GUARDED_BY(mu_);
  Future<Unit> shutdown_future_;
  // The shutdown's state and the graceful barrier (core/shutdown_barrier.h). Its state is guarded
  // by mu_ too: its *Locked methods are called with mu_ held (taken with
  // ShutdownBarrier::OwnerLock, which the thread-safety analysis reads as holding both), the
  // others without. It calls the agent back through barrier_host_, with mu_ released.
  std::unique_ptr<BarrierHost> barrier_host_;
  std::unique_ptr<ShutdownBarrier> barrier_;
};

}  // namespace tether

#endif  // TETHER_CORE_AGENT_H_
