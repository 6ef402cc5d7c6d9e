#include "testing/scenarios/dist_autograd_harness.h"

#include <functional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tether::testing {
namespace {

constexpr char kFreedText[] =
    "Trying to backward through the graph a second time (or directly access saved tensors after "
    "they have already been freed). Saved intermediate values of the graph are freed when you "
    "call .backward() or autograd.grad(). Specify retain_graph=True if you need to backward "
    "through the graph a second time or if you need to access saved tensors after calling "
    "backward.";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Recording.

IntGraphRunner::Local& IntGraphRunner::LocalLocked(ContextId context) { return locals_[context]; }

NodeId IntGraphRunner::Leaf(ContextId context, int param) {
  absl::MutexLock lock(&mu_);
  Local& local = LocalLocked(context);
  auto it = local.graph.leaves.find(param);
  if (it != local.graph.leaves.end()) return it->second;
  const NodeId id = local.next++;
  LocalGraph::Node& node = local.graph.nodes[id];
  node.kind = LocalGraph::kLeaf;
  node.param = param;
  local.graph.leaves[param] = id;
  return id;
}

NodeId IntGraphRunner::Op(ContextId context, std::vector<Term> inputs, bool fails) {
  absl::MutexLock lock(&mu_);
  Local& local = LocalLocked(context);
  const NodeId id = local.next++;
  LocalGraph::Node& node = local.graph.nodes[id];
  node.kind = LocalGraph::kOp;
  node.inputs = std::move(inputs);
  node.fails = fails;
  return id;
}

NodeId IntGraphRunner::Recv(ContextId context, AutogradMessageId message, WorkerId from) {
  absl::MutexLock lock(&mu_);
  Local& local = LocalLocked(context);
  const NodeId id = local.next++;
  LocalGraph::Node& node = local.graph.nodes[id];
  node.kind = LocalGraph::kRecv;
  node.message = message;
  node.peer = from;
  return id;
}

void IntGraphRunner::Send(ContextId context, AutogradMessageId message, WorkerId to, NodeId input) {
  absl::MutexLock lock(&mu_);
  LocalLocked(context).graph.sends[message] = {to, input};
}

void IntGraphRunner::SetRoot(ContextId context, NodeId loss) {
  absl::MutexLock lock(&mu_);
  LocalLocked(context).graph.root = loss;
}

std::map<int, int64_t> IntGraphRunner::Gradients(ContextId context) const {
  absl::MutexLock lock(&mu_);
  std::map<int, int64_t> out;
  auto it = locals_.find(context);
  if (it == locals_.end()) return out;
  for (const auto& [param, g] : it->second.grads) {
    if (g != 0) out[param] = g;
  }
  return out;
}

std::optional<LocalGraph> IntGraphRunner::Graph(ContextId context) const {
  absl::MutexLock lock(&mu_);
  auto it = locals_.find(context);
  if (it == locals_.end()) return std::nullopt;
  return it->second.graph;
}

std::vector<std::string> IntGraphRunner::violations() const {
  absl::MutexLock lock(&mu_);
  return violations_;
}

int64_t IntGraphRunner::runs() const {
  absl::MutexLock lock(&mu_);
  return runs_;
}

void IntGraphRunner::ViolationLocked(std::string text) {
  if (violations_.size() < 10) violations_.push_back(absl::StrCat("worker ", self_, ": ", text));
}

void IntGraphRunner::EnterLocked(ContextId context, const char* what) {
  ++runs_;
  if (in_call_[context]++ > 0) {
    ViolationLocked(absl::StrCat("runner call ", what, " for autograd context ", context,
                                 " overlapped another one for the same context"));
  }
  if (released_.count(context) > 0) {
    ViolationLocked(absl::StrCat("runner call ", what, " for autograd context ", context,
                                 " after its Release()"));
  }
}

void IntGraphRunner::LeaveLocked(ContextId context) {
  if (--in_call_[context] == 0) in_call_.erase(context);
}

// ---------------------------------------------------------------------------------------------
// The FAST-mode engine.

absl::Status IntGraphRunner::BeginPass(ContextId context, int64_t /*pass_id*/, bool retain_graph,
                                       bool initiator) {
  absl::MutexLock lock(&mu_);
  EnterLocked(context, "BeginPass");
  Local& local = LocalLocked(context);
  absl::Status status;
  if (local.pass.has_value()) {
    ViolationLocked(absl::StrCat("BeginPass for autograd context ", context,
                                 " while a pass runs (no EndPass)"));
  }
  if (local.graph.freed) {
    status = absl::InternalError(kFreedText);
  } else if (initiator && !local.graph.root.has_value()) {
    status = absl::InvalidArgumentError("the initiator has no graph root");
  }
  PassState pass;
  pass.initiator = initiator;
  pass.retain = retain_graph;
  // Dependencies over everything reachable from every root: the graph root and every send
  // function (FAST mode).
  std::vector<NodeId> stack;
  std::set<NodeId> seen;
  auto reach = [&](NodeId n) {
    ++pass.deps[n];
    if (seen.insert(n).second) stack.push_back(n);
  };
  if (initiator && local.graph.root.has_value()) reach(*local.graph.root);
  for (const auto& [message, send] : local.graph.sends) reach(send.second);
  while (!stack.empty()) {
    const NodeId n = stack.back();
    stack.pop_back();
    auto it = local.graph.nodes.find(n);
    if (it == local.graph.nodes.end()) continue;
    if (it->second.kind == LocalGraph::kOp) {
      for (const Term& t : it->second.inputs) reach(t.node);
    }
  }
  local.pass = std::move(pass);
  LeaveLocked(context);
  return status;
}

absl::Status IntGraphRunner::PushLocked(Local& local, NodeId node, int64_t g,
                                        std::vector<Outgoing>* out) {
  PassState& pass = *local.pass;
  auto dep = pass.deps.find(node);
  if (dep == pass.deps.end() || dep->second <= 0) {
    ViolationLocked(
        absl::StrCat("a gradient reached node ", node, " after it ran (or it is unreachable)"));
    return absl::InternalError(absl::StrCat("node ", node, " got a gradient twice"));
  }
  pass.buffer[node] += g;
  if (--dep->second > 0) return absl::OkStatus();
  const int64_t grad = pass.buffer[node];
  pass.executed.insert(node);
  const LocalGraph::Node& n = local.graph.nodes.at(node);
  switch (n.kind) {
    case LocalGraph::kLeaf:
      local.grads[n.param] += grad;
      break;
    case LocalGraph::kRecv:
      out->push_back(Outgoing{n.peer, n.message, grad});
      break;
    case LocalGraph::kOp:
      if (n.fails) {
        return absl::InternalError(absl::StrCat(
            "node ", node, " raised (the scenario's failing op on worker ", self_, ")"));
      }
      for (const Term& t : n.inputs) {
        absl::Status s = PushLocked(local, t.node, t.k * grad, out);
        if (!s.ok()) return s;
      }
      break;
  }
  return absl::OkStatus();
}

bool IntGraphRunner::LocalDoneLocked(const Local& local) const {
  const PassState& pass = *local.pass;
  if (pass.initiator && !pass.root_ran) return false;
  for (const auto& [message, send] : local.graph.sends) {
    if (pass.sends_ran.count(message) == 0) return false;
  }
  for (const auto& [node, deps] : pass.deps) {
    if (deps != 0) return false;
  }
  return true;
}

PassProgress IntGraphRunner::Finish(ContextId context, absl::Status status,
                                    std::vector<Outgoing> out) {
  // Recv nodes call back into the core without the runner's lock (as the glue does).
  for (const Outgoing& o : out) {
    if (!status.ok() || core_ == nullptr) break;
    Future<Message> call =
        core_->SendGradients(context, o.to, o.message, absl::StrCat(o.gradient), {});
    if (call.ready() && !call.result().ok()) status = call.result().status();
  }
  absl::MutexLock lock(&mu_);
  PassProgress progress;
  progress.error = status;
  auto it = locals_.find(context);
  if (status.ok() && it != locals_.end() && it->second.pass.has_value()) {
    progress.local_done = LocalDoneLocked(it->second);
  }
  LeaveLocked(context);
  return progress;
}

PassProgress IntGraphRunner::RunRoot(ContextId context) {
  std::vector<Outgoing> out;
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    EnterLocked(context, "RunRoot");
    Local& local = LocalLocked(context);
    if (!local.pass.has_value() || !local.pass->initiator || !local.graph.root.has_value()) {
      ViolationLocked(
          absl::StrCat("RunRoot for autograd context ", context, " without an initiator's pass"));
      status = absl::InternalError("RunRoot without an initiator's pass");
    } else if (local.pass->root_ran) {
      ViolationLocked(absl::StrCat("RunRoot twice in one pass of autograd context ", context));
      status = absl::InternalError("RunRoot twice");
    } else {
      local.pass->root_ran = true;
      status = PushLocked(local, *local.graph.root, 1, &out);
    }
  }
  return Finish(context, std::move(status), std::move(out));
}

PassProgress IntGraphRunner::RunSendFunction(ContextId context, AutogradMessageId message,
                                             const std::string& gradients,
                                             const std::vector<Buffer>&) {
  std::vector<Outgoing> out;
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    EnterLocked(context, "RunSendFunction");
    Local& local = LocalLocked(context);
    int64_t g = 0;
    auto send = local.graph.sends.find(message);
    if (!local.pass.has_value()) {
      ViolationLocked(absl::StrCat("RunSendFunction(", message, ") for autograd context ", context,
                                   " outside a pass"));
      status = absl::InternalError("RunSendFunction outside a pass");
    } else if (send == local.graph.sends.end()) {
      status = absl::NotFoundError(SendFunctionNotFoundText(message));
    } else if (!absl::SimpleAtoi(gradients, &g)) {
      ViolationLocked(absl::StrCat("send function ", message, " got gradients '", gradients,
                                   "' (not an integer)"));
      status = absl::InvalidArgumentError("bad gradients");
    } else if (!local.pass->sends_ran.insert(message).second) {
      ViolationLocked(absl::StrCat("send function ", message, " of autograd context ", context,
                                   " ran twice in one pass"));
      status = absl::InternalError("SendRpcBackward ran twice");
    } else {
      status = PushLocked(local, send->second.second, g, &out);
    }
  }
  return Finish(context, std::move(status), std::move(out));
}

void IntGraphRunner::AbortPass(ContextId context, const absl::Status&) {
  absl::MutexLock lock(&mu_);
  EnterLocked(context, "AbortPass");
  auto it = locals_.find(context);
  if (it != locals_.end() && it->second.pass.has_value()) it->second.pass->aborted = true;
  LeaveLocked(context);
}

void IntGraphRunner::EndPass(ContextId context) {
  absl::MutexLock lock(&mu_);
  EnterLocked(context, "EndPass");
  auto it = locals_.find(context);
  if (it != locals_.end() && it->second.pass.has_value()) {
    // Without retain_graph, what the pass ran has freed its saved values.
    if (!it->second.pass->retain && !it->second.pass->executed.empty()) {
      it->second.graph.freed = true;
    }
    it->second.pass.reset();
  }
  LeaveLocked(context);
}

void IntGraphRunner::Release(ContextId context) {
  absl::MutexLock lock(&mu_);
  if (in_call_.count(context) > 0) {
    ViolationLocked(
        absl::StrCat("Release of autograd context ", context, " overlapped a runner call"));
  }
  locals_.erase(context);
  released_.insert(context);
}

// ---------------------------------------------------------------------------------------------
// The god view.

absl::StatusOr<std::map<WorkerId, std::map<int, int64_t>>> GodView::Expected(
    const std::map<WorkerId, LocalGraph>& graphs, WorkerId initiator) {
  using Vec = std::map<std::pair<WorkerId, int>, int64_t>;  // d(node)/d(worker's param)
  auto it = graphs.find(initiator);
  if (it == graphs.end() || !it->second.root.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat("worker ", initiator, " has no graph root"));
  }
  std::map<std::pair<WorkerId, NodeId>, Vec> memo;
  absl::Status problem;
  // Forward mode: each node's derivative with respect to every parameter, from its inputs'.
  std::function<Vec(WorkerId, NodeId)> d = [&](WorkerId w, NodeId id) -> Vec {
    auto m = memo.find({w, id});
    if (m != memo.end()) return m->second;
    Vec out;
    auto g = graphs.find(w);
    const LocalGraph::Node* node = nullptr;
    if (g != graphs.end()) {
      auto n = g->second.nodes.find(id);
      if (n != g->second.nodes.end()) node = &n->second;
    }
    if (node == nullptr) {
      problem = absl::FailedPreconditionError(
          absl::StrCat("node ", id, " of worker ", w, " is in no graph"));
      return out;
    }
    switch (node->kind) {
      case LocalGraph::kLeaf:
        out[{w, node->param}] = 1;
        break;
      case LocalGraph::kOp:
        for (const Term& t : node->inputs) {
          for (const auto& [key, v] : d(w, t.node)) out[key] += t.k * v;
        }
        break;
      case LocalGraph::kRecv: {
        // The value came from the sender's send function of the same message.
        const WorkerId sender = DistAutograd::CreatorOf(node->message);
        auto sg = graphs.find(sender);
        bool found = false;
        NodeId input = -1;
        if (sg != graphs.end()) {
          auto s = sg->second.sends.find(node->message);
          if (s != sg->second.sends.end() && s->second.first == w) {
            found = true;
            input = s->second.second;
          }
        }
        if (!found) {
          problem = absl::FailedPreconditionError(
              absl::StrCat("recv of message ", node->message, " on worker ", w,
                           " has no send function on worker ", sender));
          break;
        }
        out = d(sender, input);
        break;
      }
    }
    memo[{w, id}] = out;
    return out;
  };
  Vec loss = d(initiator, *it->second.root);
  if (!problem.ok()) return problem;
  std::map<WorkerId, std::map<int, int64_t>> expected;
  for (const auto& [key, v] : loss) {
    if (v != 0) expected[key.first][key.second] = v;
  }
  return expected;
}

}  // namespace tether::testing
