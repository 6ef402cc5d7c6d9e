// Call profiling, as torch.distributed.rpc does it, over PyTorch's legacy
// autograd profiler (torch.autograd.profiler_legacy.profile, the one PyTorch
// 1.13's RPC records into).
//
// Remote events: a caller whose legacy profiler is on puts a ProfilingRequest
// in its call (CallerProfile); the callee handles the call under the legacy
// profiler with that configuration (HandlerProfile) and sends back the
// operators it ran (Payload.profiled_events); the caller adds them to its
// profile as remote events named "<rpc key>#remote_op: <operator>", each
// carrying the callee's node id (the worker id: SetNodeId on each worker).
//
// Server-process profiler: between EnableServerProfiler() and
// DisableServerProfiler() (which nest, as a stack), every call this worker
// handles runs under the legacy profiler and its events are kept for the
// matching disable (and every enclosing one).
//
//   Caller (calling thread):                  Callee (handler thread):
//     auto caller = CallerProfile::Capture(     auto p = HandlerProfile::Start(
//         "rpc_sync#f(worker0 -> worker1)");        request.has_profiling() ?
//     if (caller)                                   &request.profiling() :
//       *payload.mutable_profiling() =              nullptr);
//           caller->request();                  ... run the call ...
//     ... send; when the reply arrives           if (p) p->LeaveThread();
//     (any thread), before completing the       ... when the reply is ready
//     call's future:                            (any thread):
//       caller->AddRemoteEvents(                  reply.set_profiled_events(
//           reply.profiled_events());                 p->Finish());
//
// Everything here is thread-safe and never touches Python.
#ifndef TETHER_PYTHON_CALL_PROFILING_H_
#define TETHER_PYTHON_CALL_PROFILING_H_

#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_legacy.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "python/call.pb.h"

namespace tether {
namespace pycall {

// What PyTorch's RPC appends to the call's key to name a remote operator.
inline constexpr char kRemoteOpPrefix[] = "#remote_op: ";

// Events recorded on this worker carry `worker_id` as their node id.
void SetNodeId(int worker_id);

// The profiler state of the thread that made a call, kept until its reply.
class CallerProfile {
 public:
  // Non-null if the calling thread's legacy profiler is on. `key` names the
  // call ("rpc_sync#add(worker0 -> worker1)").
  static std::shared_ptr<const CallerProfile> Capture(std::string key);

  // What to put in the call's Payload.profiling.
  const ProfilingRequest& request() const { return request_; }

  // Adds the callee's events (a reply's Payload.profiled_events) to the
  // captured profile, renamed "<key>#remote_op: <name>". Nothing if `events`
  // is empty; kInvalidArgument if it is malformed.
  absl::Status AddRemoteEvents(const std::string& events) const;

  CallerProfile(std::string key, ProfilingRequest request);

 private:
  const std::string key_;
  const ProfilingRequest request_;
  const at::ThreadLocalState state_;
};

// The profiling of one call's handling on the callee.
class HandlerProfile {
 public:
  // Starts profiling this thread's handling of a call if the caller asked for
  // it (`request` non-null) or the server-process profiler is on; null
  // otherwise, or if this thread profiles already.
  static std::shared_ptr<HandlerProfile> Start(const ProfilingRequest* request);

  // On the starting thread, once its synchronous part of the handling is over:
  // turns this thread's profiler off. Work the call continues on a thread
  // running under the state captured here (at::ThreadLocalStateGuard, as
  // module.cc does for a call postponed until its RRef arguments are
  // confirmed, and a profiled nested rpc_async's callbacks) is still recorded;
  // a plain torch Future's callbacks are not.
  void LeaveThread();

  // Once the reply is ready (any thread; later calls return ""): stops
  // recording, gives the events to the server-process profilers that were on
  // at Start, and returns them encoded for Payload.profiled_events if the
  // caller asked for them ("" otherwise).
  std::string Finish();

  ~HandlerProfile();

  HandlerProfile(const HandlerProfile&) = delete;
  HandlerProfile& operator=(const HandlerProfile&) = delete;

  struct ServerEntry;
  HandlerProfile(bool requested, std::shared_ptr<ServerEntry> server);

 private:
  const bool requested_;
  const std::shared_ptr<ServerEntry> server_;
  const at::ThreadLocalState state_;
  // Serializes the two disables (they share the profiler's callback handle).
  absl::Mutex mu_;
  // The RecordFunction callback the profiler added to the starting thread: set by Start() before
  // the profile is shared, read by LeaveThread() under mu_.
  at::CallbackHandle callback_ = at::INVALID_CALLBACK_HANDLE;
  std::atomic<bool> finished_{false};
  std::atomic<bool> left_{false};
};

// The server-process profiler (torch.distributed.rpc's
// _enable/_disable_server_process_global_profiler).
void EnableServerProfiler(const torch::profiler::impl::ProfilerConfig& config);
// The events of every call handled since the matching enable, one
// thread_event_lists per call. kFailedPrecondition if it is not on.
absl::StatusOr<std::vector<torch::autograd::profiler::thread_event_lists>> DisableServerProfiler();

// The wire form of a list of events (Payload.profiled_events), and back.
std::string EncodeEvents(const std::vector<torch::autograd::profiler::LegacyEvent>& events);
absl::StatusOr<std::vector<torch::autograd::profiler::LegacyEvent>> DecodeEvents(
    const std::string& bytes);

}  // namespace pycall
}  // namespace tether

#endif  // TETHER_PYTHON_CALL_PROFILING_H_
