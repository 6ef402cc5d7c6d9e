// ChildRuntime: the inside of one simulated worker process. It gives the
// worker's agent a Clock, an Executor and a Network that all forward to the
// simulator's host process over a pipe (sim/process/host.h), and runs the
// worker's code one piece at a time, when the host says so.
//
// The worker's main function and each executor task run on their own "frames"
// (threads), but only one of them (or the controller that reads the host's
// commands) ever runs at a time: a baton is handed from one to the next, so a
// worker process behaves exactly the same on every replay. A frame that must
// wait (an RPC result, a sleep) calls BlockUntil(): the baton goes back to the
// host, which runs the rest of the simulated world until the wait is over. Like
// a real thread pool, at most `max_task_threads` tasks run at once; a pool
// whose every thread is blocked stalls, which the host reports as a hang.
//
//   auto child = ChildRuntime::Create(fd, rank, 16).value();
//   child->WaitForStart();                          // main thread, without the GIL
//   auto names = child->Register("trainer1");       // rendezvous through the host
//   ... build an Agent over child->clock(), child->executor(), child->network() ...
//   child->BlockUntil([&] { return f.ready(); }, "rpc_sync to worker0");
//   child->MainDone(/*ok=*/true, "");               // serves until the host says EXIT
//
// Threading: BlockUntil(), WaitForStart(), Register() and MainDone() block the
// calling frame and must be called without the Python GIL; BlockUntil()
// predicates run on the controller thread. BlockUntil(), Register(), Trace(),
// MainDone(), set_max_task_threads() and every call on clock(), executor() and
// network() must come from the baton holder (a frame that runs, or the
// controller); a call from any other thread ends the process with a clear
// message rather than racing (AssertHoldsBaton()). The analysis can be run
// with clang: clang++ -fsyntax-only -Wthread-safety (generated .pb.h on the
// include path).
#ifndef TETHER_SIM_PROCESS_CHILD_H_
#define TETHER_SIM_PROCESS_CHILD_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/network.h"
#include "sim/process/pipe.h"
#include "sim/process/wait_kind.h"

namespace tether::sim {

class ChildRuntime {
 public:
  // Takes `fd` (one end of the link). Starts the controller thread.
  static absl::StatusOr<std::unique_ptr<ChildRuntime>> Create(int fd, WorkerId rank,
                                                              int max_task_threads);
  ~ChildRuntime();

  Clock* clock();
  Executor* executor();
  Network* network();
  WorkerId rank() const { return rank_; }

  // The main thread waits for the host's START.
  void WaitForStart();
  // Yields this frame until `ready()` holds. `where` says what it waits for
  // (hang reports), `kind` what kind of wait it is. Returns kFailedPrecondition
  // when called from a thread that is not a frame.
  absl::Status BlockUntil(std::function<bool()> ready, std::string where,
                          WaitKind kind = WaitKind::kOther);
  // Tells the host this worker's name and waits until every worker has
  // registered; returns the name of each rank. kInvalidArgument (from the host)
  // for a duplicate name.
  absl::StatusOr<std::vector<std::string>> Register(const std::string& name);
  // Sends a trace event (a JSON object) to the host's Chrome trace.
  void Trace(const std::string& json);
  // The main function returned (`ok`) or failed (`text` says how, for people;
  // `error_kind` what kind of failure it is, as data for the driver, e.g.
  // tether.sim's "exception", "leak", "shutdown"). Serves the host until EXIT.
  void MainDone(bool ok, const std::string& text,
                const std::string& error_kind = "");
  // Sets the pool size (the worker's num_worker_threads), from the baton holder.
  void set_max_task_threads(int n);
  // Whether the calling thread is one of this runtime's frames.
  bool OnFrame() const;

 private:
  class LinkClock;
  class LinkExecutor;
  class LinkNetwork;
  // A frame's fields are the baton holder's, as frames_ (below) is.
  struct Frame {
    uint64_t id = 0;
    std::thread thread;  // seam-ok: frames hand a baton, one runs at a time
    std::function<void()> job;
    bool blocked = false;
    bool announced = false;  // READY sent
    std::function<bool()> ready;
    std::string where;
    WaitKind kind = WaitKind::kOther;
  };
  // The baton, as a capability for the thread-safety analysis: one thread at a
  // time holds it (the frame that runs, or the controller), handed over by
  // PassBaton() under baton_mu_. What it guards is touched only by its holder,
  // without a lock: nobody else runs meanwhile, and each hand-over passes
  // baton_mu_, which orders one holder's writes before the next one's reads.
  class ABSL_LOCKABLE Baton {};
  static constexpr uint64_t kController = 0;
  static constexpr uint64_t kMain = 1;

  ChildRuntime(int fd, WorkerId rank, int max_task_threads);

  // Checks that the calling thread holds the baton (ends the process with a
  // clear message if not) and tells the analysis so.
  void AssertHoldsBaton() const ABSL_ASSERT_EXCLUSIVE_LOCK(baton_)
      ABSL_LOCKS_EXCLUDED(baton_mu_);
  // Requests, from whoever holds the baton.
  absl::StatusOr<link::Frame> Request(link::Frame frame, const std::vector<Buffer>& buffers = {})
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(baton_);
  void ControllerLoop();
  void RunTask(std::function<void()> task) ABSL_EXCLUSIVE_LOCKS_REQUIRED(baton_);
  void TaskThreadLoop(Frame* frame);
  // Hands the baton to `to` and waits until it comes back to `self`.
  void PassBaton(uint64_t to, uint64_t self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(baton_)
      ABSL_LOCKS_EXCLUDED(baton_mu_);
  // Waits until the baton is handed to `self` (a thread's first wait).
  void AwaitBaton(uint64_t self) ABSL_LOCKS_EXCLUDED(baton_mu_);
  void AnnounceReadyFrames() ABSL_EXCLUSIVE_LOCKS_REQUIRED(baton_);
  [[noreturn]] void Die(const std::string& why) const;

  const int fd_;
  const WorkerId rank_;
  std::unique_ptr<LinkClock> clock_;
  std::unique_ptr<LinkExecutor> executor_;
  std::unique_ptr<LinkNetwork> network_;

  // Who holds the baton: the one piece of state shared between threads.
  mutable absl::Mutex baton_mu_;
  uint64_t holder_ ABSL_GUARDED_BY(baton_mu_) = kController;
  Baton baton_;

  int max_task_threads_ ABSL_GUARDED_BY(baton_);
  int64_t now_ns_ ABSL_GUARDED_BY(baton_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(baton_) = 1;
  std::map<uint64_t, std::function<void()>> tasks_ ABSL_GUARDED_BY(baton_);
  std::map<uint64_t, std::function<void()>> timers_ ABSL_GUARDED_BY(baton_);
  // Task threads and main.
  std::map<uint64_t, std::unique_ptr<Frame>> frames_ ABSL_GUARDED_BY(baton_);
  // Tasks waiting for a free task thread.
  std::deque<std::function<void()>> starved_ ABSL_GUARDED_BY(baton_);
  uint64_t next_frame_ ABSL_GUARDED_BY(baton_) = 2;
  bool names_known_ ABSL_GUARDED_BY(baton_) = false;
  std::vector<std::string> names_ ABSL_GUARDED_BY(baton_);
  std::thread controller_;  // seam-ok: reads the host's commands; holds the baton between them
};

}  // namespace tether::sim

#endif  // TETHER_SIM_PROCESS_CHILD_H_
