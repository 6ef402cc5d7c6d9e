#include "python/dist_autograd_engine.h"

#include <ATen/core/ivalue.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/input_buffer.h>

#include <exception>
#include <map>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"

// libtorch 1.13 defines DelayWarningHandler's members with hidden visibility, so a GraphTask
// built outside libtorch has no vtable to link against (process() is its key function). Both are
// defined here as libtorch defines them; libtorch keeps its own definitions for its own calls,
// and both read the members the header declares. Engine::execute replays a task's warnings
// itself, execute_with_graph_task does not: DistGraphTask::ReplayWarnings does it.
// //python:dist_autograd_engine_test pins the behaviour.
namespace torch {
namespace autograd {
namespace utils {
void DelayWarningHandler::process(const c10::SourceLocation& source_location,
                                  const std::string& msg, bool verbatim) {
  std::lock_guard<std::mutex> lock(mutex_);
  warnings_.push_back({source_location, msg, verbatim});
}

void DelayWarningHandler::replay_warnings() {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_INTERNAL_ASSERT(c10::Warning::get_warning_handler() != this,
                        "DelayWarningHandler cannot replay warnings into itself");
  for (const auto& warning : warnings_) {
    c10::Warning::warn(warning.source_location, warning.msg, warning.verbatim);
  }
  warnings_.clear();
}
}  // namespace utils
}  // namespace autograd
}  // namespace torch

namespace tether {
namespace dist_autograd {
namespace {

using torch::autograd::AccumulateGrad;
using torch::autograd::Engine;
using torch::autograd::GraphTask;
using torch::autograd::InputBuffer;
using torch::autograd::Node;
using torch::autograd::ReadyQueue;
using torch::autograd::variable_list;

// What exec_post_processing throws when a drain ends while nodes still wait for another root's
// contribution (libtorch 1.13). It completes only the drain's future; the task goes on.
constexpr char kNotReadyText[] = "could not compute gradients for some functions";

// Engine::init_local_ready_queue is protected (and exported): reach it through a derived class's
// pointer to member. thread_main pops from the thread's local ready queue, so a drain points it
// at the queue its task pushes to.
struct EngineAccess : Engine {
  static void SetLocalReadyQueue(std::shared_ptr<ReadyQueue> queue) {
    (Engine::get_default_engine().*(&EngineAccess::init_local_ready_queue))(std::move(queue));
  }
};

// The queue of the drain running on this thread, if any: a drain started from inside another
// (a backward function that waits on the network in the simulator) gives it back when it ends.
thread_local std::shared_ptr<ReadyQueue> current_drain_queue;

}  // namespace

SendRpcBackward::SendRpcBackward(const std::vector<at::Tensor>& tensors) {
  set_next_edges(torch::autograd::collect_next_edges(tensors));
  for (const at::Tensor& tensor : tensors) add_input_metadata(tensor);
}

variable_list SendRpcBackward::apply(variable_list&& inputs) {
  TORCH_CHECK(inputs.empty(), "SendRpcBackward should receive no inputs");
  for (const at::Tensor& grad : grads_) {
    TORCH_CHECK(grad.defined(), "BUG!: SendRpcBackward didn't receive valid gradients");
  }
  return std::move(grads_);
}

void SendRpcBackward::SetGrads(variable_list grads) { grads_ = std::move(grads); }

std::shared_ptr<RecvRpcBackward> RecvRpcBackward::Attach(const std::vector<at::Tensor>& tensors,
                                                         SendGrads send) {
  auto node = std::shared_ptr<RecvRpcBackward>(new RecvRpcBackward(std::move(send)));
  for (at::Tensor tensor : tensors) torch::autograd::set_history(tensor, node);
  return node;
}

RecvRpcBackward::RecvRpcBackward(SendGrads send) : send_(std::move(send)) {}

variable_list RecvRpcBackward::apply(variable_list&& grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = input_metadata(i).zeros_like();
  }
  absl::Status sent = send_(std::move(grads));
  TORCH_CHECK(sent.ok(), std::string(sent.message()));
  return {};
}

void GradientStore::Accumulate(const at::Tensor& variable, const at::Tensor& grad,
                               size_t num_expected_refs) {
  c10::AutoGradMode no_grad(false);
  // The tensor's own hooks may be Python (they take the GIL): never under mu_.
  at::Tensor new_grad = AccumulateGrad::callHooks(variable, grad);
  // Declared before the lock: the replaced gradient (whose last reference may free a Python
  // object, under the GIL) is dropped after it.
  at::Tensor old_grad;
  absl::MutexLock lock(&mu_);
  auto it = grads_.find(variable);
  if (it != grads_.end()) old_grad = it->value();
  // One more reference than the caller's: new_grad here.
  AccumulateGrad::accumulateGrad(variable, old_grad, new_grad, num_expected_refs + 1,
                                 [this, &variable](at::Tensor&& update) {
                                   grads_.insert_or_assign(variable, std::move(update));
                                 });
}

c10::Dict<at::Tensor, at::Tensor> GradientStore::Snapshot() const {
  absl::MutexLock lock(&mu_);
  return grads_.copy();
}

DistGraphTask::DistGraphTask(std::shared_ptr<Node> graph_root,
                             std::vector<std::shared_ptr<Node>> send_functions, bool keep_graph,
                             std::shared_ptr<GradientStore> store)
    : task_(std::make_shared<GraphTask>(keep_graph, /*grad_mode=*/false, /*reentrant_depth=*/0,
                                        /*cpu_ready_queue=*/nullptr, /*exit_on_error=*/true)),
      store_(std::move(store)) {
  if (graph_root != nullptr) roots_.push_back(std::move(graph_root));
  for (auto& send : send_functions) roots_.push_back(std::move(send));
  for (const auto& root : roots_) roots_not_run_.insert(root.get());
  ComputeDependencies();
}

DistGraphTask::~DistGraphTask() = default;

// The dependency counts of every node reachable from any root, and which nodes run: those that
// lead to a leaf (a captured AccumulateGrad or a RecvRpcBackward, which always runs).
void DistGraphTask::ComputeDependencies() {
  GraphTask& task = *task_;
  std::vector<Node*> order;  // discovery order; reversed below for the "needed" pass
  std::vector<Node*> stack;
  std::unordered_map<Node*, std::shared_ptr<Node>> owners;
  for (const auto& root : roots_) {
    if (task.nodes_in_graph_.insert(root.get()).second) {
      stack.push_back(root.get());
      owners[root.get()] = root;
    }
  }
  while (!stack.empty()) {
    Node* node = stack.back();
    stack.pop_back();
    order.push_back(node);
    for (const auto& edge : node->next_edges()) {
      if (!edge.is_valid()) continue;
      Node* next = edge.function.get();
      task.dependencies_[next] += 1;
      if (task.nodes_in_graph_.insert(next).second) {
        stack.push_back(next);
        owners[next] = edge.function;
      }
    }
  }

  // A node is needed once any next node is needed or captured. Process nodes after everything
  // they lead to: a topological order of the DAG, built from the dependency counts.
  std::unordered_map<Node*, int> remaining(task.dependencies_.begin(), task.dependencies_.end());
  std::vector<Node*> topo;
  std::vector<Node*> ready;
  for (const auto& root : roots_) ready.push_back(root.get());
  std::unordered_set<Node*> queued(ready.begin(), ready.end());
  while (!ready.empty()) {
    Node* node = ready.back();
    ready.pop_back();
    topo.push_back(node);
    for (const auto& edge : node->next_edges()) {
      if (!edge.is_valid()) continue;
      Node* next = edge.function.get();
      if (--remaining[next] == 0 && queued.insert(next).second) ready.push_back(next);
    }
  }
  std::unordered_set<Node*> leads_to_leaf;
  for (auto it = topo.rbegin(); it != topo.rend(); ++it) {
    Node* node = *it;
    if (auto leaf = std::dynamic_pointer_cast<AccumulateGrad>(owners[node])) {
      auto& info = task.exec_info_[node];
      info.captures_ = std::make_unique<std::vector<GraphTask::ExecInfo::Capture>>();
      // Captured without hooks (the engine runs capture hooks under the task's mutex): the
      // drain accumulates after the engine returns (AccumulateCaptured).
      info.captures_->emplace_back(/*input_idx=*/0, /*output_idx=*/num_captures_++);
      capture_leaves_.push_back(std::move(leaf));
      leads_to_leaf.insert(node);
      continue;
    }
    bool needed = dynamic_cast<RecvRpcBackward*>(node) != nullptr;
    for (const auto& edge : node->next_edges()) {
      if (edge.is_valid() && leads_to_leaf.count(edge.function.get()) > 0) needed = true;
    }
    if (needed) {
      leads_to_leaf.insert(node);
      task.exec_info_[node].needed_ = true;
    }
  }
  // Roots always run (the engine looks every node it runs up in exec_info_).
  for (const auto& root : roots_) task.exec_info_[root.get()].needed_ = true;
}

DrainOutcome DistGraphTask::Drain(const std::shared_ptr<Node>& root) {
  DrainOutcome outcome;
  if (failed_) {
    outcome.error = absl::FailedPreconditionError("the backward pass already failed");
    return outcome;
  }
  // A local backward running on this thread (not a drain of ours): the engine's thread-local
  // ready queue is that task's, and a drain would take it over.
  if (torch::autograd::get_current_graph_task_exec_info() != nullptr &&
      current_drain_queue == nullptr) {
    outcome.error = absl::FailedPreconditionError(
        "a distributed backward pass cannot run on a thread that is running a local backward "
        "pass (a backward function waited for the network here)");
    return outcome;
  }
  if (roots_not_run_.erase(root.get()) == 0) {
    outcome.error = absl::InvalidArgumentError(
        absl::StrCat(root->name(), " is not a root of this backward pass, or it already ran"));
    return outcome;
  }
  // Each drain completes the task's future (its value, or kNotReadyText's error while nodes
  // wait): start every one with a fresh future, as if it were the first.
  task_->future_result_ =
      c10::make_intrusive<at::ivalue::Future>(c10::ListType::create(c10::TensorType::get()));
  task_->future_completed_ = false;
  {
    std::lock_guard<std::mutex> lock(task_->mutex_);
    task_->captured_vars_.clear();
    task_->captured_vars_.resize(num_captures_);
  }
  auto queue = std::make_shared<ReadyQueue>();
  task_->cpu_ready_queue_ = queue;
  std::shared_ptr<ReadyQueue> outer = current_drain_queue;
  current_drain_queue = queue;
  EngineAccess::SetLocalReadyQueue(queue);
  c10::intrusive_ptr<at::ivalue::Future> done;
  std::string thrown;
  try {
    done = Engine::get_default_engine().execute_with_graph_task(task_, root, InputBuffer(0));
  } catch (const std::exception& e) {
    thrown = e.what();
  }
  current_drain_queue = outer;
  EngineAccess::SetLocalReadyQueue(outer != nullptr ? outer : std::make_shared<ReadyQueue>());
  task_->cpu_ready_queue_ = nullptr;

  bool waiting;
  variable_list captured;
  {
    std::lock_guard<std::mutex> lock(task_->mutex_);
    waiting = !task_->not_ready_.empty();
    captured.swap(task_->captured_vars_);
  }
  if (done == nullptr) {
    failed_ = true;
    outcome.error = absl::InternalError(thrown);
    return outcome;
  }
  if (task_->has_error_.load() ||
      (done->hasError() && !(waiting && done->tryRetrieveErrorMessage() == kNotReadyText))) {
    failed_ = true;
    outcome.error = absl::InternalError(done->tryRetrieveErrorMessage());
    return outcome;
  }
  // A drain that completed the task's future moved the captured gradients into its value. The
  // future goes (the next drain makes a new one): the gradients may then be stolen, not copied.
  if (!done->hasError()) {
    captured = done->value().toTensorVector();
    done.reset();
    task_->future_result_.reset();
  }
  if (absl::Status s = AccumulateCaptured(std::move(captured)); !s.ok()) {
    failed_ = true;
    outcome.error = s;
    return outcome;
  }
  outcome.local_done = roots_not_run_.empty() && !waiting;
  return outcome;
}

// What AccumulateGrad would do with each leaf's gradient, into the store: its pre hooks, the
// tensor's hooks and the accumulation (GradientStore::Accumulate), its post hooks. Without any
// lock (hooks may be Python).
absl::Status DistGraphTask::AccumulateCaptured(variable_list captured) {
  try {
    for (size_t i = 0; i < captured.size() && i < capture_leaves_.size(); ++i) {
      if (!captured[i].defined()) continue;
      const std::shared_ptr<AccumulateGrad>& leaf = capture_leaves_[i];
      variable_list grads = {std::move(captured[i])};
      for (const auto& hook : leaf->pre_hooks()) grads = (*hook)(grads);
      // The one reference to grads[0] its caller holds: this list.
      if (grads[0].defined()) store_->Accumulate(leaf->variable, grads[0], 1);
      const variable_list no_outputs;
      for (const auto& hook : leaf->post_hooks()) (*hook)(no_outputs, grads);
    }
  } catch (const std::exception& e) {
    return absl::InternalError(e.what());
  }
  return absl::OkStatus();
}

void DistGraphTask::ReplayWarnings() { task_->warning_handler_.replay_warnings(); }

void DistGraphTask::Abort() {
  failed_ = true;
  task_->has_error_ = true;
}

}  // namespace dist_autograd
}  // namespace tether
