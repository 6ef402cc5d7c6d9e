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
// predicates run on the controller thread.
#ifndef TETHER_SIM_PROCESS_CHILD_H_
#define TETHER_SIM_PROCESS_CHILD_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/clock.h"
#include "core/executor.h"
#include "core/network.h"
#include "sim/process/pipe.h"

namespace tether::sim {

class ChildRuntime {
 public:
  // Takes `fd` (one end of the link). Starts the controller thread.
  static absl::StatusOr<std::unique_ptr<ChildRuntime>> Create(int fd, WorkerId rank,
                                                              int max_task_threads);
  // The runtime of this process, if one was created.
  static ChildRuntime* Current();
  ~ChildRuntime();

  Clock* clock();
  Executor* executor();
  Network* network();
  WorkerId rank() const { return rank_; }

  // The main thread waits for the host's START.
  void WaitForStart();
  // Yields this frame until `ready()` holds. `where` says what it waits for
  // (hang reports). Returns kFailedPrecondition when called from a thread that
  // is not a frame.
  absl::Status BlockUntil(std::function<bool()> ready, std::string where);
  // Tells the host this worker's name and waits until every worker has
  // registered; returns the name of each rank. kInvalidArgument (from the host)
  // for a duplicate name.
  absl::StatusOr<std::vector<std::string>> Register(const std::string& name);
  // Sends a trace event (a JSON object) to the host's Chrome trace.
  void Trace(const std::string& json);
  // The main function returned (`ok`) or raised (`text` says what). Serves the
  // host until EXIT.
  void MainDone(bool ok, const std::string& text);
  // Sets the pool size (the worker's num_worker_threads), from the baton holder.
  void set_max_task_threads(int n) { max_task_threads_ = n < 1 ? 1 : n; }
  // Whether the calling thread is one of this runtime's frames.
  bool OnFrame() const;

 private:
  class LinkClock;
  class LinkExecutor;
  class LinkNetwork;
  struct Frame {
    uint64_t id = 0;
    std::thread thread;  // seam-ok: frames hand a baton, one runs at a time
    std::function<void()> job;
    bool blocked = false;
    bool announced = false;  // READY sent
    std::function<bool()> ready;
    std::string where;
  };
  static constexpr uint64_t kController = 0;
  static constexpr uint64_t kMain = 1;

  ChildRuntime(int fd, WorkerId rank, int max_task_threads);

  // Requests, from whoever holds the baton.
  absl::StatusOr<link::Frame> Request(link::Frame frame, const std::vector<Buffer>& buffers = {});
  void ControllerLoop();
  void RunTask(std::function<void()> task);
  void TaskThreadLoop(Frame* frame);
  // Hands the baton to `to` and waits until it comes back to `self`.
  void PassBaton(uint64_t to, uint64_t self);
  uint64_t CurrentFrameId() const;
  void AnnounceReadyFrames();
  [[noreturn]] void Die(const std::string& why);

  const int fd_;
  const WorkerId rank_;
  int max_task_threads_;
  std::unique_ptr<LinkClock> clock_;
  std::unique_ptr<LinkExecutor> executor_;
  std::unique_ptr<LinkNetwork> network_;

  // Everything below is touched only by the baton holder, except the baton
  // itself.
  mutable std::mutex baton_mu_;
  std::condition_variable baton_cv_;
  uint64_t holder_ = kController;
  bool exiting_ = false;

  int64_t now_ns_ = 0;
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::function<void()>> tasks_;
  std::map<uint64_t, std::function<void()>> timers_;
  std::map<uint64_t, std::unique_ptr<Frame>> frames_;  // task threads and main
  std::deque<std::function<void()>> starved_;          // tasks waiting for a free task thread
  uint64_t next_frame_ = 2;
  bool names_known_ = false;
  std::vector<std::string> names_;
  std::thread controller_;  // seam-ok: reads the host's commands; holds the baton between them
};

}  // namespace tether::sim

#endif  // TETHER_SIM_PROCESS_CHILD_H_
