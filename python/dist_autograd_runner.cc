#include "python/dist_autograd_runner.h"

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "python/torch_calls.h"

namespace tether {
namespace dist_autograd {
namespace {

thread_local ContextId current_context = kNoContext;

std::vector<at::Tensor> RequiringGrad(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t.requires_grad()) out.push_back(t);
  }
  return out;
}

}  // namespace

ContextId CurrentContext() { return current_context; }
void SetCurrentContext(ContextId context) { current_context = context; }

ContextGuard::ContextGuard(ContextId context)
    : set_(context != kNoContext), previous_(current_context) {
  if (set_) current_context = context;
}

ContextGuard::~ContextGuard() {
  if (set_) current_context = previous_;
}

NoContextGuard::NoContextGuard() : previous_(current_context) { current_context = kNoContext; }
NoContextGuard::~NoContextGuard() { current_context = previous_; }

LocalAutograd::LocalAutograd(std::shared_ptr<DistAutograd> core) : core_(core) {
  core->SetRunner(this);
}

LocalAutograd::~LocalAutograd() {
  // After this no strand task reaches this object (a running one is waited for).
  if (std::shared_ptr<DistAutograd> core = core_.lock()) core->SetRunner(nullptr);
  std::map<ContextId, Local> dropped;
  {
    absl::MutexLock lock(&mu_);
    dropped.swap(locals_);
  }
}

LocalAutograd::Local* LocalAutograd::LiveLocalLocked(const DistAutograd& core, ContextId context) {
  // The core erases a context before it queues Release() here, so a context it still has is
  // released here later: recording into it cannot outlive the release.
  if (!core.Exists(context)) return nullptr;
  return &locals_[context];
}

size_t LocalAutograd::NumLocalRecords() const {
  absl::MutexLock lock(&mu_);
  return locals_.size();
}

void LocalAutograd::RecordOutgoing(ContextId context, WorkerId dst,
                                   const std::vector<at::Tensor>& tensors, bool force,
                                   bool involved_of, pycall::Payload* payload) {
  if (context == kNoContext) return;
  std::shared_ptr<DistAutograd> core = core_.lock();
  if (core == nullptr) return;
  std::vector<at::Tensor> with_grad = RequiringGrad(tensors);
  const bool record = force || !with_grad.empty();
  if (!record && !involved_of) return;
  std::vector<WorkerId> involved;
  if (involved_of) {
    absl::StatusOr<std::vector<WorkerId>> here = core->Involved(context);
    if (!here.ok()) return;  // released meanwhile
    involved = *std::move(here);
  }
  AutogradMessageId message = -1;  // -1: nothing recorded, the meta only carries `involved`
  if (record) {
    if (!core->AddKnownWorker(context, dst).ok()) return;  // released meanwhile
    message = core->NewMessageId();
  }
  pycall::AutogradMeta* meta = payload->mutable_autograd();
  meta->set_context_id(context);
  meta->set_message_id(message);
  for (WorkerId w : involved) meta->add_involved(w);
  if (with_grad.empty()) return;
  auto send = std::make_shared<SendRpcBackward>(with_grad);
  if (!core->RecordSend(context, message, dst).ok()) return;
  absl::MutexLock lock(&mu_);
  if (Local* local = LiveLocalLocked(*core, context)) local->sends.emplace(message, send);
  // else: released meanwhile; `send` is dropped after the lock (declared before it)
}

absl::StatusOr<ContextId> LocalAutograd::RecordIncoming(const pycall::AutogradMeta& meta,
                                                        WorkerId from,
                                                        const std::vector<at::Tensor>& tensors,
                                                        bool request) {
  const ContextId context = meta.context_id();
  std::shared_ptr<DistAutograd> core = core_.lock();
  if (core == nullptr) return kNoContext;
  if (request) {
    absl::Status joined = core->Join(context, from);
    // A released context (a late message) runs unrecorded; bad ids are the sender's error.
    if (absl::IsNotFound(joined)) return kNoContext;
    TETHER_RETURN_IF_ERROR(joined);
  } else {
    if (!core->Exists(context)) return kNoContext;
    std::vector<WorkerId> involved(meta.involved().begin(), meta.involved().end());
    if (!involved.empty()) {
      absl::Status learned = core->LearnInvolved(context, involved);
      if (absl::IsNotFound(learned)) return kNoContext;
      TETHER_RETURN_IF_ERROR(learned);
    }
  }
  const AutogradMessageId message = meta.message_id();
  if (message < 0) return context;
  std::vector<at::Tensor> with_grad = RequiringGrad(tensors);
  if (with_grad.empty()) return context;
  absl::Status recorded = core->RecordRecv(context, message, from);
  if (absl::IsNotFound(recorded)) return kNoContext;  // released meanwhile
  TETHER_RETURN_IF_ERROR(recorded);                   // e.g. a duplicate message id
  std::shared_ptr<RecvRpcBackward> recv;              // dropped after the lock if unused
  absl::MutexLock lock(&mu_);
  Local* local = LiveLocalLocked(*core, context);
  if (local == nullptr) return kNoContext;  // released meanwhile: no history attached
  recv = RecvRpcBackward::Attach(with_grad, GradientSender(context, from, message));
  local->recvs.emplace(message, recv);
  return context;
}

absl::Status LocalAutograd::RecordReply(ContextId expected, const pycall::AutogradMeta& meta,
                                        WorkerId from, const std::vector<at::Tensor>& tensors) {
  if (meta.context_id() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("the reply from worker ", from, " carries distributed autograd context ",
                     meta.context_id(), ", but the call was made in context ", expected));
  }
  return RecordIncoming(meta, from, tensors, /*request=*/false).status();
}

RecvRpcBackward::SendGrads LocalAutograd::GradientSender(ContextId context, WorkerId to,
                                                         AutogradMessageId message) const {
  std::weak_ptr<DistAutograd> weak = core_;
  return [weak, context, to, message](torch::autograd::variable_list grads) -> absl::Status {
    std::shared_ptr<DistAutograd> core = weak.lock();
    if (core == nullptr || !core->Exists(context)) {
      return absl::FailedPreconditionError(kContextNoLongerValidText);
    }
    pycall::Payload payload;
    std::vector<Buffer> buffers;
    TETHER_RETURN_IF_ERROR(pycall::AppendTensors(grads, &payload, &buffers));
    Future<Message> sent =
        core->SendGradients(context, to, message, pycall::Serialize(payload), std::move(buffers));
    // The core waits for the reply; only a refusal to send is this node's error.
    if (sent.ready() && !sent.result().ok()) return sent.result().status();
    return absl::OkStatus();
  };
}

absl::StatusOr<Future<Unit>> LocalAutograd::Backward(ContextId context,
                                                     const std::vector<at::Tensor>& roots,
                                                     bool retain_graph, absl::Time deadline) {
  std::shared_ptr<DistAutograd> core = core_.lock();
  if (core == nullptr) return absl::CancelledError("RPC has been shut down on this worker");
  if (!core->Exists(context)) return absl::NotFoundError(ContextNotFoundText(context));
  if (roots.empty()) {
    return absl::InvalidArgumentError("No tensors provided for gradient computation.");
  }
  torch::autograd::edge_list edges;
  torch::autograd::variable_list grads;
  for (const at::Tensor& root : roots) {
    if (!root.defined()) return absl::InvalidArgumentError("a root tensor is undefined");
    if (!root.requires_grad()) return absl::InvalidArgumentError("requires_grad not set on root");
    if (root.numel() != 1) {
      return absl::InvalidArgumentError("root is not a scalar, all roots need to be scalar");
    }
    if (root.grad_fn() == nullptr) {
      return absl::InvalidArgumentError("root does not have a valid gradient function.");
    }
    edges.push_back(torch::autograd::impl::gradient_edge(root));
    grads.push_back(at::ones_like(root, LEGACY_CONTIGUOUS_MEMORY_FORMAT));
  }
  auto graph_root =
      std::make_shared<torch::autograd::GraphRoot>(std::move(edges), std::move(grads));
  std::shared_ptr<DistGraphTask> mine;
  std::shared_ptr<DistGraphTask> stale;  // dropped after the lock
  std::shared_ptr<torch::autograd::Node> stale_root;
  {
    absl::MutexLock lock(&mu_);
    Local* live = LiveLocalLocked(*core, context);
    if (live == nullptr) return absl::NotFoundError(ContextNotFoundText(context));
    Local& local = *live;
    // A pass that just ended may still hold `task` until its EndPass, which the core's strand
    // runs before this pass's BeginPass; the core refuses a pass while one runs.
    // A prepared task no pass runs for is stale (its pass failed before its BeginPass ran, so
    // it was never adopted): replaced.
    if (local.prepared != nullptr && core->AnyPassRunning(context)) {
      return absl::FailedPreconditionError(
          absl::StrCat("a backward pass is already running for autograd context ", context));
    }
    stale = std::move(local.prepared);
    stale_root = std::move(local.prepared_root);
    std::vector<std::shared_ptr<torch::autograd::Node>> sends;
    for (const auto& [message, send] : local.sends) sends.push_back(send);
    // Built here, on the caller's thread: the task runs under its thread-local state.
    mine = std::make_shared<DistGraphTask>(graph_root, std::move(sends), retain_graph, local.store);
    local.prepared = mine;
    local.prepared_root = graph_root;
  }
  Future<Unit> done = core->Backward(context, retain_graph, deadline);
  if (done.ready() && !done.result().ok()) {
    // Refused (or failed at once): take back this call's task unless BeginPass adopted it. Only
    // ours: another thread's Backward() may have prepared its own since.
    std::shared_ptr<DistGraphTask> unused;
    std::shared_ptr<torch::autograd::Node> unused_root;
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it != locals_.end() && it->second.prepared == mine) {
      unused = std::move(it->second.prepared);
      unused_root = std::move(it->second.prepared_root);
    }
  }
  return done;
}

absl::StatusOr<c10::Dict<at::Tensor, at::Tensor>> LocalAutograd::Gradients(
    ContextId context) const {
  std::shared_ptr<DistAutograd> core = core_.lock();
  if (core == nullptr || !core->Exists(context)) {
    return absl::NotFoundError(ContextNotFoundText(context));
  }
  std::shared_ptr<GradientStore> store;
  {
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it == locals_.end()) return c10::Dict<at::Tensor, at::Tensor>();
    store = it->second.store;
  }
  return store->Snapshot();
}

std::map<AutogradMessageId, std::shared_ptr<torch::autograd::Node>> LocalAutograd::SendFunctions(
    ContextId context) const {
  std::map<AutogradMessageId, std::shared_ptr<torch::autograd::Node>> out;
  absl::MutexLock lock(&mu_);
  auto it = locals_.find(context);
  if (it == locals_.end()) return out;
  for (const auto& [message, node] : it->second.sends) out.emplace(message, node);
  return out;
}

std::map<AutogradMessageId, std::shared_ptr<torch::autograd::Node>> LocalAutograd::RecvFunctions(
    ContextId context) const {
  std::map<AutogradMessageId, std::shared_ptr<torch::autograd::Node>> out;
  absl::MutexLock lock(&mu_);
  auto it = locals_.find(context);
  if (it == locals_.end()) return out;
  for (const auto& [message, node] : it->second.recvs) out.emplace(message, node);
  return out;
}

absl::Status LocalAutograd::BeginPass(ContextId context, int64_t pass_id, bool retain_graph,
                                      bool initiator) {
  std::shared_ptr<DistGraphTask> task;
  std::vector<std::shared_ptr<torch::autograd::Node>> sends;
  std::shared_ptr<GradientStore> store;
  // A task and root a skipped EndPass left behind: dropped after the lock (Python nodes' last
  // references take the GIL).
  std::shared_ptr<DistGraphTask> old_task;
  std::shared_ptr<torch::autograd::Node> old_root;
  std::shared_ptr<DistAutograd> core = core_.lock();
  if (core == nullptr) return absl::FailedPreconditionError(kContextNoLongerValidText);
  {
    absl::MutexLock lock(&mu_);
    Local* live = LiveLocalLocked(*core, context);
    if (live == nullptr) return absl::FailedPreconditionError(kContextNoLongerValidText);
    Local& local = *live;
    if (initiator) {
      // A pass that failed before this ran must not adopt a later Backward()'s task (checked
      // under mu_, which Backward() holds while it replaces a stale prepared task).
      if (!core->PassRunning(context, pass_id)) {
        return absl::FailedPreconditionError(kContextNoLongerValidText);
      }
      if (local.prepared == nullptr) {
        return absl::InternalError(
            absl::StrCat("no backward pass was prepared for autograd context ", context));
      }
      old_task = std::exchange(local.task, std::move(local.prepared));
      old_root = std::exchange(local.root, std::move(local.prepared_root));
      return absl::OkStatus();
    }
    for (const auto& [message, send] : local.sends) sends.push_back(send);
    store = local.store;
  }
  // Built outside the lock (the dependency walk is as long as the graph).
  task = std::make_shared<DistGraphTask>(nullptr, std::move(sends), retain_graph, store);
  absl::MutexLock lock(&mu_);
  Local* local = LiveLocalLocked(*core, context);
  if (local == nullptr) return absl::FailedPreconditionError(kContextNoLongerValidText);
  old_task = std::exchange(local->task, std::move(task));
  return absl::OkStatus();
}

PassProgress LocalAutograd::Progress(const DrainOutcome& outcome) {
  PassProgress progress;
  progress.error = outcome.error;
  progress.local_done = outcome.local_done;
  return progress;
}

PassProgress LocalAutograd::RunRoot(ContextId context) {
  std::shared_ptr<DistGraphTask> task;
  std::shared_ptr<torch::autograd::Node> root;
  {
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it != locals_.end()) {
      task = it->second.task;
      root = it->second.root;
    }
  }
  if (task == nullptr || root == nullptr) {
    PassProgress failed;
    failed.error = absl::FailedPreconditionError(kContextNoLongerValidText);
    return failed;
  }
  NoContextGuard no_context;  // RPCs a backward function makes are not part of the context
  return Progress(task->Drain(root));
}

PassProgress LocalAutograd::RunSendFunction(ContextId context, AutogradMessageId message,
                                            const std::string& gradients,
                                            const std::vector<Buffer>& buffers) {
  PassProgress failed;
  std::shared_ptr<DistGraphTask> task;
  std::shared_ptr<SendRpcBackward> send;
  {
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it == locals_.end() || it->second.task == nullptr) {
      failed.error = absl::FailedPreconditionError(kContextNoLongerValidText);
      return failed;
    }
    task = it->second.task;
    auto found = it->second.sends.find(message);
    if (found == it->second.sends.end()) {
      failed.error = absl::NotFoundError(SendFunctionNotFoundText(message));
      return failed;
    }
    send = found->second;
  }
  absl::StatusOr<pycall::Payload> payload = pycall::Parse(gradients);
  if (!payload.ok()) {
    failed.error = absl::InvalidArgumentError(absl::StrCat(
        "malformed gradients for autograd message id ", message, ": ", payload.status().message()));
    return failed;
  }
  absl::StatusOr<std::vector<at::Tensor>> grads =
      pycall::TakeTensors(*payload, buffers, /*copy=*/false);
  if (!grads.ok()) {
    failed.error = absl::InvalidArgumentError(absl::StrCat(
        "malformed gradients for autograd message id ", message, ": ", grads.status().message()));
    return failed;
  }
  if (grads->size() != send->num_outputs()) {
    failed.error = absl::InvalidArgumentError(absl::StrCat(
        "autograd message id ", message, " sent ", send->num_outputs(),
        " tensor(s) that require grad, but ", grads->size(), " gradient(s) came back"));
    return failed;
  }
  send->SetGrads(*std::move(grads));
  NoContextGuard no_context;
  return Progress(task->Drain(send));
}

void LocalAutograd::AbortPass(ContextId context, const absl::Status& /*error*/) {
  std::shared_ptr<DistGraphTask> task;
  {
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it != locals_.end()) task = it->second.task;
  }
  if (task != nullptr) task->Abort();
}

void LocalAutograd::EndPass(ContextId context) {
  std::shared_ptr<DistGraphTask> task;
  std::shared_ptr<torch::autograd::Node> root;
  {
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it == locals_.end()) return;
    task = std::move(it->second.task);
    root = std::move(it->second.root);
  }
  if (task != nullptr) task->ReplayWarnings();
  // task and root are dropped here, without the lock.
}

void LocalAutograd::Release(ContextId context) {
  Local dropped;
  {
    absl::MutexLock lock(&mu_);
    auto it = locals_.find(context);
    if (it == locals_.end()) return;
    dropped = std::move(it->second);
    locals_.erase(it);
  }
  // `dropped` (nodes, gradients, any task) goes here, without the lock.
}

}  // namespace dist_autograd
}  // namespace tether
