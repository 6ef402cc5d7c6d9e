// The local half of distributed autograd: the send and receive nodes that calls inside a
// `dist_autograd.context()` put into the autograd graph, the gradients a context accumulates on
// this worker, and the graph task that runs one worker's part of a distributed backward pass on
// libtorch's own engine (FAST mode, as PyTorch's DistEngine).
//
// A pass on one worker has several roots: the initiator's GraphRoot (only on the worker that
// called backward()) and every send function recorded in the context. Gradients for the send
// functions arrive one message at a time, so the pass runs in drains: each drain runs one root
// and everything it makes ready, and leaves nodes that still wait for another root's
// contribution in the task. A node shared by two roots runs once, with both contributions.
//
//   auto store = std::make_shared<GradientStore>();
//   DistGraphTask task(graph_root, {send1, send2}, /*keep_graph=*/false, store);
//   DrainOutcome a = task.Drain(graph_root);   // a.local_done == false: send2 has not run
//   send2->SetGrads(grads_from_peer);
//   DrainOutcome b = task.Drain(send2);        // b.local_done == true
//   store->Snapshot();                         // leaf -> accumulated gradient
//
// Leaves (AccumulateGrad) are captured, not run: gradients go into the GradientStore, never into
// `.grad`. Receive nodes run as leaves; their apply() hands the gradients to the sender's side
// through the function they were built with.
//
// Threads: a DistGraphTask is built on the thread whose thread-local state (grad mode, the
// profiler) the pass should run under, and is driven by one thread at a time (the caller
// serializes drains, the core protocol's per-context strand). A drain runs on the calling thread
// and starts none. A drain called from inside a local (non-distributed) backward on the same
// thread is refused; one nested in another drain is fine. Drains never need the GIL; Python nodes
// and hooks take it themselves (hooks run after the engine returns, under no lock).
// GradientStore is thread-safe.
#ifndef TETHER_PYTHON_DIST_AUTOGRAD_ENGINE_H_
#define TETHER_PYTHON_DIST_AUTOGRAD_ENGINE_H_

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/graph_task.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace tether {
namespace dist_autograd {

// The node a call inside a context records on its sending side. Its next edges are the gradient
// edges of the sent tensors that require grad; running it returns the gradients that the
// receiver sent back for them (set with SetGrads before the drain that runs it).
class SendRpcBackward : public torch::autograd::Node {
 public:
  // Builds the node over `tensors` (each must require grad).
  explicit SendRpcBackward(const std::vector<at::Tensor>& tensors);

  std::string name() const override { return "torch::distributed::autograd::SendRpcBackward"; }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& inputs) override;

  // The gradients for the next edges, one per sent tensor, in order.
  void SetGrads(torch::autograd::variable_list grads);

 private:
  torch::autograd::variable_list grads_;
};

// The node a call inside a context records on its receiving side: the grad_fn of every received
// tensor that requires grad (one input each). Running it passes the gradients to `send`, which
// carries them back to the sender's SendRpcBackward; an error it returns fails the pass.
class RecvRpcBackward : public torch::autograd::Node {
 public:
  using SendGrads = std::function<absl::Status(torch::autograd::variable_list grads)>;

  // Makes a new node the grad_fn of each of `tensors` (received leaves, of floating or complex
  // type; they come out requiring grad, with the node as their history).
  static std::shared_ptr<RecvRpcBackward> Attach(const std::vector<at::Tensor>& tensors,
                                                 SendGrads send);

  std::string name() const override { return "torch::distributed::autograd::RecvRpcBackward"; }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override;

 private:
  explicit RecvRpcBackward(SendGrads send);

  SendGrads send_;
};

// The gradients one context accumulated on this worker, keyed by the leaf tensor (by identity),
// following AccumulateGrad's rules (the tensor's hooks first, then steal-or-clone for the first
// gradient, out-of-place sums after). Thread-safe.
class GradientStore {
 public:
  // Accumulates `grad` for `variable`. `num_expected_refs` is the number of references to `grad`
  // its caller's frames hold, below which it may be stolen instead of copied.
  void Accumulate(const at::Tensor& variable, const at::Tensor& grad, size_t num_expected_refs);
  // A copy of the map (the tensors are shared, not copied).
  c10::Dict<at::Tensor, at::Tensor> Snapshot() const;

 private:
  mutable absl::Mutex mu_;
  c10::Dict<at::Tensor, at::Tensor> grads_ ABSL_GUARDED_BY(mu_);
};

struct DrainOutcome {
  // A node failed (the engine's message; the pass is over), or the drain was refused.
  absl::Status error;
  // Every root ran and no node waits for a contribution: this worker's part of the pass is done.
  bool local_done = false;
};

// One worker's part of one backward pass of one context. See the file comment.
class DistGraphTask {
 public:
  // `graph_root` is the initiator's GraphRoot, or null on every other worker. `send_functions`
  // are the context's send functions in message-id order. Gradients for leaves go to `store`.
  DistGraphTask(std::shared_ptr<torch::autograd::Node> graph_root,
                std::vector<std::shared_ptr<torch::autograd::Node>> send_functions, bool keep_graph,
                std::shared_ptr<GradientStore> store);
  ~DistGraphTask();

  DistGraphTask(const DistGraphTask&) = delete;
  DistGraphTask& operator=(const DistGraphTask&) = delete;

  // Runs `root` (the GraphRoot or one of the send functions, each at most once per pass) and
  // every node it makes ready.
  DrainOutcome Drain(const std::shared_ptr<torch::autograd::Node>& root);

  // Stops the pass: nodes not yet run never will be.
  void Abort();

  // Hands the warnings nodes raised during the drains so far to this thread's warning handler
  // (under Python, the caller's warnings; on other threads, stderr).
  void ReplayWarnings();

  bool keep_graph() const { return task_->keep_graph_; }

 private:
  void ComputeDependencies();
  absl::Status AccumulateCaptured(torch::autograd::variable_list captured);

  std::shared_ptr<torch::autograd::GraphTask> task_;
  std::vector<std::shared_ptr<torch::autograd::Node>> roots_;
  std::set<torch::autograd::Node*> roots_not_run_;
  std::shared_ptr<GradientStore> store_;
  size_t num_captures_ = 0;
  // The leaf of each capture (by output index).
  std::vector<std::shared_ptr<torch::autograd::AccumulateGrad>> capture_leaves_;
  bool failed_ = false;
};

}  // namespace dist_autograd
}  // namespace tether

#endif  // TETHER_PYTHON_DIST_AUTOGRAD_ENGINE_H_
