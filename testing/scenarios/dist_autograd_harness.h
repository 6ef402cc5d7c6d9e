// A fake local autograd engine for the distributed-autograd scenarios (design note §4.7), and a
// god view of every worker's graphs that computes the exact gradients a backward must produce.
//
// IntGraphRunner is the core's GraphRunner (core/dist_autograd.h) over integer linear graphs: a
// "tensor" is an integer, and every op a scenario records is y = Σ kᵢ·xᵢ with the scenario's
// (seeded) coefficients. Per context a worker's graph has
//   - leaves: the worker's parameters (AccumulateGrad): gradients accumulate into the context;
//   - ops: y = Σ k·x over earlier nodes;
//   - recv nodes: the grad_fn of a value received in a forward message; running one sends its
//     gradient back with DistAutograd::SendGradients;
//   - send functions: the value a forward message carried (FAST-mode roots);
//   - on the initiator, the graph root (the loss).
// The engine does what python/dist_autograd_engine.cc does with libtorch's: BeginPass counts
// dependencies over everything reachable from every root (the graph root and every send function
// of the context); RunRoot / RunSendFunction push a gradient in and run whatever became ready;
// the pass is locally done once every root ran and nothing waits for inputs. A failing op (the
// error scenario's) fails the pass; a second pass over a graph freed by a pass without
// retain_graph fails with libtorch's text.
//
// Its own oracles (violations()): runner calls for one context never overlap (the core's
// strand), none touches a context after its Release(), and no send function runs twice in one
// pass.
//
// GodView::Expected() computes, from the whole call tree (every worker's recorded graph for the
// context, the send of message m on one worker joined to the recv of m on another), the exact
// gradient one pass must accumulate for every (worker, parameter): forward-mode derivatives of
// the loss, a different algorithm from the engine's. Exact equality after a pass shows
// exactly-once delivery under duplicates and reordering.
//
// Thread-safe (one mutex per runner; SendGradients is called without it).
#ifndef TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_HARNESS_H_
#define TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_HARNESS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/dist_autograd.h"

namespace tether::testing {

using NodeId = int64_t;

// One input of an op: coefficient k times node `node`'s value.
struct Term {
  NodeId node = -1;
  int64_t k = 1;
};

// A worker's recorded graph for one context (what the god view reads).
struct LocalGraph {
  enum Kind { kLeaf, kOp, kRecv };
  struct Node {
    Kind kind = kOp;
    int param = -1;                  // kLeaf
    std::vector<Term> inputs;        // kOp
    bool fails = false;              // kOp: running it fails the pass
    AutogradMessageId message = -1;  // kRecv
    WorkerId peer = -1;              // kRecv: where the value came from
  };
  std::map<NodeId, Node> nodes;
  std::map<int, NodeId> leaves;  // param -> its leaf node
  // Send functions: message id -> (destination, the node whose value the message carried).
  std::map<AutogradMessageId, std::pair<WorkerId, NodeId>> sends;
  std::optional<NodeId> root;  // the initiator's loss
  bool freed = false;          // a pass without retain_graph ran over it
};

class IntGraphRunner : public GraphRunner {
 public:
  // `core` (not owned) is this worker's DistAutograd, for SendGradients; set before passes run.
  explicit IntGraphRunner(WorkerId self) : self_(self) {}
  void set_core(DistAutograd* core) { core_ = core; }
  WorkerId self() const { return self_; }

  // --- Forward recording (the scenario, as the glue would). ---
  // The worker's parameter `param` in `context` (one leaf per context and parameter).
  NodeId Leaf(ContextId context, int param);
  // y = Σ k·x; `fails`: running it in a backward fails the pass.
  NodeId Op(ContextId context, std::vector<Term> inputs, bool fails = false);
  // A value received in forward message `message` from `from` (after core RecordRecv).
  NodeId Recv(ContextId context, AutogradMessageId message, WorkerId from);
  // The send function of forward message `message` to `to`, carrying `input` (after core
  // RecordSend).
  void Send(ContextId context, AutogradMessageId message, WorkerId to, NodeId input);
  // The initiator's loss.
  void SetRoot(ContextId context, NodeId loss);

  // --- Reading. ---
  // The gradients accumulated in `context` (get_gradients): param -> value (zeros left out).
  std::map<int, int64_t> Gradients(ContextId context) const;
  std::optional<LocalGraph> Graph(ContextId context) const;
  std::vector<std::string> violations() const;
  int64_t runs() const;

  // --- GraphRunner. ---
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
  struct PassState {
    bool initiator = false;
    bool retain = false;
    bool aborted = false;
    bool root_ran = false;
    std::set<AutogradMessageId> sends_ran;
    std::map<NodeId, int> deps;        // inputs still missing, for reachable nodes
    std::map<NodeId, int64_t> buffer;  // gradient accumulated so far
    std::set<NodeId> executed;
  };
  struct Local {
    LocalGraph graph;
    NodeId next = 0;
    std::map<int, int64_t> grads;
    std::optional<PassState> pass;
  };
  struct Outgoing {
    WorkerId to;
    AutogradMessageId message;
    int64_t gradient;
  };

  Local& LocalLocked(ContextId context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EnterLocked(ContextId context, const char* what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LeaveLocked(ContextId context) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ViolationLocked(std::string text) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds `g` to `node`'s buffer and runs what became ready; recv nodes go to `out`.
  absl::Status PushLocked(Local& local, NodeId node, int64_t g, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool LocalDoneLocked(const Local& local) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The runner call's end: sends the recv nodes' gradients (without the lock) and reports.
  PassProgress Finish(ContextId context, absl::Status status, std::vector<Outgoing> out);

  const WorkerId self_;
  DistAutograd* core_ = nullptr;
  mutable absl::Mutex mu_;
  std::map<ContextId, Local> locals_ ABSL_GUARDED_BY(mu_);
  std::set<ContextId> released_ ABSL_GUARDED_BY(mu_);
  std::map<ContextId, int> in_call_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> violations_ ABSL_GUARDED_BY(mu_);
  int64_t runs_ ABSL_GUARDED_BY(mu_) = 0;
};

// The god view over every worker's graph of one context.
class GodView {
 public:
  // `graphs`: each worker's recorded graph of the context (crashed workers' too, if known).
  // The exact gradient one backward pass from `initiator`'s root accumulates, per worker and
  // parameter (zeros left out). kFailedPrecondition if the initiator has no root, or a recv's
  // send function is in no graph (the call tree is incomplete).
  static absl::StatusOr<std::map<WorkerId, std::map<int, int64_t>>> Expected(
      const std::map<WorkerId, LocalGraph>& graphs, WorkerId initiator);
};

}  // namespace tether::testing

#endif  // TETHER_TESTING_SCENARIOS_DIST_AUTOGRAD_HARNESS_H_
