// LocalAutograd: joins the torch-free protocol (core/dist_autograd.h) to libtorch. It records the
// send and receive functions of calls made inside a distributed autograd context, keeps each
// context's nodes and gradients on this worker, and runs this worker's part of a backward pass
// (python/dist_autograd_engine.h) as the core's GraphRunner.
//
//   // caller, sending a call inside `with dist_autograd.context()` (thread's current context)
//   autograd->RecordOutgoing(CurrentContext(), to, tensors, /*force=*/true,
//                            /*involved_of=*/false, &payload);
//   // callee, receiving it: the handler then runs under the returned context
//   ContextGuard guard(autograd->RecordIncoming(payload.autograd(), caller, tensors, true));
//   // initiator
//   Future<Unit> done = autograd->Backward(ctx, roots, retain_graph).value();
//
// Payloads carry an AutogradMeta (python/call.proto) when a call was recorded; tensors that
// require grad get a RecvRpcBackward as their history on the receiving side. A reply that arrives
// after its context was released here is not recorded (the context is never re-created).
//
// Threads: every method is thread-safe. Recording may hold the GIL (it never waits for it); the
// GraphRunner calls run on the executor, serialized per context by the core, without the GIL and
// without this object's lock (Python nodes take the GIL themselves). Nodes are dropped without
// the lock too (a Python node's destructor takes the GIL).
//
// Ownership: the Worker owns it (python/process_state.h). Its destructor detaches it from the
// core and waits for a runner call running elsewhere, which may need the GIL: destroy it after
// the runtime stopped (no call runs then) or without the GIL. It and the nodes it creates hold the
// core weakly: once the runtime stopped, recording does nothing and a node that outlives the
// worker fails its pass instead of touching freed state.
#ifndef TETHER_PYTHON_DIST_AUTOGRAD_RUNNER_H_
#define TETHER_PYTHON_DIST_AUTOGRAD_RUNNER_H_

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/dist_autograd.h"
#include "core/future.h"
#include "python/call.pb.h"
#include "python/dist_autograd_engine.h"

namespace tether {
namespace dist_autograd {

constexpr ContextId kNoContext = -1;

// The calling thread's current distributed autograd context (kNoContext: none).
ContextId CurrentContext();
void SetCurrentContext(ContextId context);

// Makes `context` the thread's current context for its scope (kNoContext leaves it as is).
class ContextGuard {
 public:
  explicit ContextGuard(ContextId context);
  ~ContextGuard();
  ContextGuard(const ContextGuard&) = delete;
  ContextGuard& operator=(const ContextGuard&) = delete;

 private:
  const bool set_;
  const ContextId previous_;
};

// Clears the thread's current context for its scope (drains: calls a backward function makes are
// not recorded into the pass's context, where their send functions would wait in later passes).
class NoContextGuard {
 public:
  NoContextGuard();
  ~NoContextGuard();
  NoContextGuard(const NoContextGuard&) = delete;
  NoContextGuard& operator=(const NoContextGuard&) = delete;

 private:
  const ContextId previous_;
};

class LocalAutograd final : public GraphRunner {
 public:
  // Registers itself as `core`'s runner (before the agent starts).
  explicit LocalAutograd(std::shared_ptr<DistAutograd> core);
  // Detaches from the core first (waits for a runner call running on another thread).
  ~LocalAutograd() override;

  // Null once the worker's runtime stopped.
  std::shared_ptr<DistAutograd> core() const { return core_.lock(); }

  // --- Recording. ---
  // The sending side of a request or a reply in `context` (kNoContext: nothing happens). It
  // records when `force` is set or some tensor requires grad: a message id, `dst` as a known
  // worker and, over the tensors that require grad, a send function. Sets `payload`'s autograd
  // meta then (and only then: otherwise it has none); `involved_of` adds this worker's
  // Involved() list (a reply's).
  void RecordOutgoing(ContextId context, WorkerId dst, const std::vector<at::Tensor>& tensors,
                      bool force, bool involved_of, pycall::Payload* payload);
  // The receiving side of what RecordOutgoing recorded. A request joins the context (a released
  // one is refused: kNoContext); a reply is recorded only while the context is still here. The
  // received tensors that require grad get one RecvRpcBackward. Returns the context the request's
  // handler runs under, or kNoContext (a released context: the call runs unrecorded). Bad
  // metadata (ids outside the world, a duplicate message id) is an error for the sender.
  absl::StatusOr<ContextId> RecordIncoming(const pycall::AutogradMeta& meta, WorkerId from,
                                           const std::vector<at::Tensor>& tensors, bool request);
  // A reply to a call recorded in `expected`: kInvalidArgument (nothing recorded) if its meta
  // names another context.
  absl::Status RecordReply(ContextId expected, const pycall::AutogradMeta& meta, WorkerId from,
                           const std::vector<at::Tensor>& tensors);

  // --- The Python surface. ---
  // Starts a pass from `roots` (PyTorch's checks and texts: kInvalidArgument, or kNotFound for an
  // unknown context). Builds the local task on the calling thread (its profiler sees the pass).
  absl::StatusOr<Future<Unit>> Backward(ContextId context, const std::vector<at::Tensor>& roots,
                                        bool retain_graph, absl::Time deadline);
  // This worker's gradients of `context` (kNotFound if it is not here).
  absl::StatusOr<c10::Dict<at::Tensor, at::Tensor>> Gradients(ContextId context) const;
  std::map<AutogradMessageId, std::shared_ptr<torch::autograd::Node>> SendFunctions(
      ContextId context) const;
  std::map<AutogradMessageId, std::shared_ptr<torch::autograd::Node>> RecvFunctions(
      ContextId context) const;
  // Contexts this object keeps nodes or gradients for (0 once every context was released).
  size_t NumLocalRecords() const;

  // --- GraphRunner (the core's strand). ---
  absl::Status BeginPass(ContextId context, int64_t pass_id, bool retain_graph,
                         bool initiator) override;
  PassProgress RunRoot(ContextId context) override;
  PassProgress RunSendFunction(ContextId context, AutogradMessageId message,
                               const std::string& gradients,
                               const std::vector<Buffer>& buffers) override;
  void AbortPass(ContextId context, const absl::Status& error) override;
  void EndPass(ContextId context) override;
  void Release(ContextId context) override;

 private:
  struct Local {
    std::map<AutogradMessageId, std::shared_ptr<SendRpcBackward>> sends;
    std::map<AutogradMessageId, std::shared_ptr<RecvRpcBackward>> recvs;
    std::shared_ptr<GradientStore> store = std::make_shared<GradientStore>();
    // The initiator's task and root, built by Backward() until BeginPass adopts them.
    std::shared_ptr<DistGraphTask> prepared;
    std::shared_ptr<torch::autograd::Node> prepared_root;
    // The running pass.
    std::shared_ptr<DistGraphTask> task;
    std::shared_ptr<torch::autograd::Node> root;
  };

  // The context's record if the core still has the context (never re-created after a release).
  Local* LiveLocalLocked(const DistAutograd& core, ContextId context)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  RecvRpcBackward::SendGrads GradientSender(ContextId context, WorkerId to,
                                            AutogradMessageId message) const;
  static PassProgress Progress(const DrainOutcome& outcome);

  const std::weak_ptr<DistAutograd> core_;
  mutable absl::Mutex mu_;
  std::map<ContextId, Local> locals_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dist_autograd
}  // namespace tether

#endif  // TETHER_PYTHON_DIST_AUTOGRAD_RUNNER_H_
