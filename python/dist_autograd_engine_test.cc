// Pins the two things the distributed graph task takes from libtorch's engine (driving
// Engine::execute_with_graph_task from a queue of its own, and resuming a task whose first drain
// ended with nodes still waiting), and the local semantics of a pass: shared nodes run once with
// every root's contribution, leaves' gradients go to the store (never to .grad) with hooks and
// AccumulateGrad's steal-or-copy rule, retain_graph, errors.
#include "python/dist_autograd_engine.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <string>
#include <vector>

namespace tether {
namespace dist_autograd {
namespace {

using torch::autograd::Edge;
using torch::autograd::GraphRoot;
using torch::autograd::Node;
using torch::autograd::variable_list;

at::Tensor Leaf(std::vector<float> values) { return at::tensor(values).set_requires_grad(true); }

std::shared_ptr<Node> RootOf(const at::Tensor& scalar) {
  return std::make_shared<GraphRoot>(
      torch::autograd::edge_list{torch::autograd::impl::gradient_edge(scalar)},
      variable_list{at::ones_like(scalar)});
}

at::Tensor GradOf(const GradientStore& store, const at::Tensor& leaf) {
  auto grads = store.Snapshot();
  auto it = grads.find(leaf);
  return it == grads.end() ? at::Tensor() : it->value();
}

// Passes its gradient through, counting its runs and remembering the last input's data pointer.
class CountingIdentity : public Node {
 public:
  explicit CountingIdentity(const at::Tensor& input) {
    set_next_edges(torch::autograd::collect_next_edges(input));
  }
  std::string name() const override { return "CountingIdentity"; }
  variable_list apply(variable_list&& grads) override {
    ++runs;
    last_input = grads[0].data_ptr();
    return {std::move(grads[0])};
  }
  int runs = 0;
  void* last_input = nullptr;
};

// A tensor whose grad_fn is `node` (one output).
at::Tensor WithHistory(const std::shared_ptr<Node>& node, at::IntArrayRef sizes) {
  at::Tensor t = at::zeros(sizes);
  torch::autograd::set_history(t, node);
  return t;
}

class Throwing : public Node {
 public:
  explicit Throwing(const at::Tensor& input) {
    set_next_edges(torch::autograd::collect_next_edges(input));
  }
  variable_list apply(variable_list&&) override {
    throw std::runtime_error("Simulate error on backward pass");
  }
};

TEST(DistGraphTaskTest, LocalPassFillsStoreNotGrad) {
  at::Tensor x = Leaf({1, 2});
  at::Tensor loss = (x * 3).sum();
  auto store = std::make_shared<GradientStore>();
  auto root = RootOf(loss);
  DistGraphTask task(root, {}, /*keep_graph=*/false, store);
  DrainOutcome out = task.Drain(root);
  ASSERT_TRUE(out.error.ok()) << out.error;
  EXPECT_TRUE(out.local_done);
  EXPECT_TRUE(at::equal(GradOf(*store, x), at::tensor({3.0f, 3.0f})));
  EXPECT_FALSE(x.grad().defined());
}

TEST(DistGraphTaskTest, SharedNodeRunsOnceWithBothRootsContributions) {
  at::Tensor a = Leaf({1, 1});
  auto shared = std::make_shared<CountingIdentity>(a);
  at::Tensor h = WithHistory(shared, {2});
  auto root = RootOf((h * 2).sum());
  auto send = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{h});
  auto store = std::make_shared<GradientStore>();
  DistGraphTask task(root, {send}, /*keep_graph=*/false, store);

  DrainOutcome first = task.Drain(root);
  ASSERT_TRUE(first.error.ok()) << first.error;
  EXPECT_FALSE(first.local_done);
  EXPECT_EQ(shared->runs, 0);  // it waits for the send function's gradient
  EXPECT_FALSE(GradOf(*store, a).defined());

  send->SetGrads({at::tensor({10.0f, 20.0f})});
  DrainOutcome second = task.Drain(send);
  ASSERT_TRUE(second.error.ok()) << second.error;
  EXPECT_TRUE(second.local_done);
  EXPECT_EQ(shared->runs, 1);
  EXPECT_TRUE(at::equal(GradOf(*store, a), at::tensor({12.0f, 22.0f})));
}

TEST(DistGraphTaskTest, SendFunctionsAloneOnAWorkerThatDidNotStartThePass) {
  at::Tensor a = Leaf({1, 2});
  at::Tensor b = Leaf({3, 4});
  at::Tensor s = a * b;
  auto send1 = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{s});
  auto send2 = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{a});
  auto store = std::make_shared<GradientStore>();
  DistGraphTask task(nullptr, {send1, send2}, /*keep_graph=*/false, store);
  send2->SetGrads({at::tensor({1.0f, 1.0f})});
  DrainOutcome first = task.Drain(send2);
  ASSERT_TRUE(first.error.ok()) << first.error;
  EXPECT_FALSE(first.local_done);  // send1 has not run
  send1->SetGrads({at::tensor({1.0f, 1.0f})});
  DrainOutcome second = task.Drain(send1);
  ASSERT_TRUE(second.error.ok()) << second.error;
  EXPECT_TRUE(second.local_done);
  EXPECT_TRUE(at::equal(GradOf(*store, a), at::tensor({4.0f, 5.0f})));  // b + 1
  EXPECT_TRUE(at::equal(GradOf(*store, b), at::tensor({1.0f, 2.0f})));
}

TEST(DistGraphTaskTest, RecvNodeIsALeafThatSendsItsGradients) {
  at::Tensor received = at::tensor({1.0f, 2.0f, 3.0f});
  at::Tensor unused = at::tensor({5.0f});
  std::vector<variable_list> sent;
  auto recv = RecvRpcBackward::Attach({received, unused}, [&](variable_list grads) {
    sent.push_back(std::move(grads));
    return absl::OkStatus();
  });
  ASSERT_TRUE(received.requires_grad());
  EXPECT_EQ(received.grad_fn(), recv);
  auto root = RootOf((received * received).sum());
  auto store = std::make_shared<GradientStore>();
  DistGraphTask task(root, {}, /*keep_graph=*/false, store);
  DrainOutcome out = task.Drain(root);
  ASSERT_TRUE(out.error.ok()) << out.error;
  EXPECT_TRUE(out.local_done);
  ASSERT_EQ(sent.size(), 1u);
  ASSERT_EQ(sent[0].size(), 2u);
  EXPECT_TRUE(at::equal(sent[0][0], at::tensor({2.0f, 4.0f, 6.0f})));
  EXPECT_TRUE(at::equal(sent[0][1], at::zeros({1})));  // undefined becomes zeros
}

TEST(DistGraphTaskTest, RecvErrorFailsThePass) {
  at::Tensor received = at::tensor({1.0f});
  auto recv = RecvRpcBackward::Attach({received}, [](variable_list) {
    return absl::NotFoundError("Autograd context no longer valid!");
  });
  auto root = RootOf(received.sum());
  DistGraphTask task(root, {}, false, std::make_shared<GradientStore>());
  DrainOutcome out = task.Drain(root);
  EXPECT_FALSE(out.error.ok());
  EXPECT_NE(std::string(out.error.message()).find("Autograd context no longer valid!"),
            std::string::npos)
      << out.error;
}

TEST(DistGraphTaskTest, SecondPassWithoutRetainGraphFailsWithTheEnginesText) {
  at::Tensor x = Leaf({2});
  at::Tensor loss = (x * x).sum();
  auto store = std::make_shared<GradientStore>();
  {
    auto root = RootOf(loss);
    DistGraphTask task(root, {}, /*keep_graph=*/false, store);
    ASSERT_TRUE(task.Drain(root).error.ok());
  }
  auto root = RootOf(loss);
  DistGraphTask again(root, {}, /*keep_graph=*/false, store);
  DrainOutcome out = again.Drain(root);
  ASSERT_FALSE(out.error.ok());
  EXPECT_NE(
      std::string(out.error.message()).find("Trying to backward through the graph a second time"),
      std::string::npos)
      << out.error;
}

TEST(DistGraphTaskTest, RetainGraphAllowsRepeatedPassesThatAccumulate) {
  at::Tensor x = Leaf({2});
  at::Tensor loss = (x * x).sum();
  auto store = std::make_shared<GradientStore>();
  for (int i = 0; i < 3; ++i) {
    auto root = RootOf(loss);
    DistGraphTask task(root, {}, /*keep_graph=*/true, store);
    DrainOutcome out = task.Drain(root);
    ASSERT_TRUE(out.error.ok()) << out.error;
  }
  EXPECT_TRUE(at::equal(GradOf(*store, x), at::tensor({12.0f})));  // 3 * 2x
}

TEST(DistGraphTaskTest, NodeErrorEndsThePassAndLaterDrainsAreRefused) {
  at::Tensor a = Leaf({1});
  auto bad = std::make_shared<Throwing>(a);
  at::Tensor h = WithHistory(bad, {1});
  auto root = RootOf(h.sum());
  auto send = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{a});
  DistGraphTask task(root, {send}, false, std::make_shared<GradientStore>());
  DrainOutcome out = task.Drain(root);
  ASSERT_FALSE(out.error.ok());
  EXPECT_NE(std::string(out.error.message()).find("Simulate error on backward pass"),
            std::string::npos)
      << out.error;
  send->SetGrads({at::ones({1})});
  EXPECT_EQ(task.Drain(send).error.code(), absl::StatusCode::kFailedPrecondition);
}

TEST(DistGraphTaskTest, UnknownOrRepeatedRootIsRefused) {
  at::Tensor x = Leaf({1});
  auto root = RootOf(x.sum());
  DistGraphTask task(root, {}, false, std::make_shared<GradientStore>());
  auto stranger = RootOf((x * 2).sum());
  EXPECT_EQ(task.Drain(stranger).error.code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(task.Drain(root).error.ok());
  EXPECT_EQ(task.Drain(root).error.code(), absl::StatusCode::kInvalidArgument);
}

TEST(DistGraphTaskTest, AbortStopsThePass) {
  at::Tensor x = Leaf({1});
  auto send = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{x});
  DistGraphTask task(nullptr, {send}, false, std::make_shared<GradientStore>());
  task.Abort();
  send->SetGrads({at::ones({1})});
  EXPECT_EQ(task.Drain(send).error.code(), absl::StatusCode::kFailedPrecondition);
}

TEST(DistGraphTaskTest, TensorHooksRunOnceAndPostHooksSeeTheGradient) {
  at::Tensor t = Leaf({1});
  t.register_hook([](at::Tensor g) { return g * 2; });
  struct CountingPostHook : torch::autograd::FunctionPostHook {
    explicit CountingPostHook(int* calls) : calls(calls) {}
    variable_list operator()(const variable_list& outputs, const variable_list& inputs) override {
      ++*calls;
      return outputs;
    }
    int* calls;
  };
  int post_calls = 0;
  at::Tensor loss = (t * 3).sum();  // the graph holds t's AccumulateGrad (t only a weak pointer)
  torch::autograd::impl::grad_accumulator(t)->add_post_hook(
      std::make_unique<CountingPostHook>(&post_calls));
  auto store = std::make_shared<GradientStore>();
  auto root = RootOf(loss);
  DistGraphTask task(root, {}, false, store);
  ASSERT_TRUE(task.Drain(root).error.ok());
  EXPECT_TRUE(at::equal(GradOf(*store, t), at::tensor({6.0f})));
  EXPECT_EQ(post_calls, 1);
}

TEST(DistGraphTaskTest, AFreshGradientIsStolenAReferencedOneCopied) {
  at::Tensor a = Leaf({1, 2, 3});
  auto pass_through = std::make_shared<CountingIdentity>(a);
  at::Tensor h = WithHistory(pass_through, {3});
  auto send = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{h});
  auto store = std::make_shared<GradientStore>();
  DistGraphTask task(nullptr, {send}, false, store);
  send->SetGrads({at::ones({3})});  // nobody else holds it
  ASSERT_TRUE(task.Drain(send).error.ok());
  EXPECT_EQ(GradOf(*store, a).data_ptr(), pass_through->last_input);

  at::Tensor b = Leaf({1, 2, 3});
  at::Tensor kept = at::ones({3});
  auto send_kept = std::make_shared<SendRpcBackward>(std::vector<at::Tensor>{b});
  auto store2 = std::make_shared<GradientStore>();
  DistGraphTask task2(nullptr, {send_kept}, false, store2);
  send_kept->SetGrads({kept});
  ASSERT_TRUE(task2.Drain(send_kept).error.ok());
  EXPECT_NE(GradOf(*store2, b).data_ptr(), kept.data_ptr());
  EXPECT_TRUE(at::equal(GradOf(*store2, b), kept));
}

TEST(DistGraphTaskTest, DifferentDtypesAreCastToTheInputs) {
  at::Tensor f32 = Leaf({1});
  at::Tensor f64 = at::tensor({2.0}, at::kDouble).set_requires_grad(true);
  auto root = RootOf((f32 * f64).sum());
  auto store = std::make_shared<GradientStore>();
  DistGraphTask task(root, {}, false, store);
  ASSERT_TRUE(task.Drain(root).error.ok());
  EXPECT_EQ(GradOf(*store, f32).scalar_type(), at::kFloat);
  EXPECT_EQ(GradOf(*store, f64).scalar_type(), at::kDouble);
}

TEST(DistGraphTaskTest, PlainBackwardStillWorksOnTheSameThreadAfterADrain) {
  at::Tensor x = Leaf({1});
  auto root = RootOf((x * 5).sum());
  DistGraphTask task(root, {}, false, std::make_shared<GradientStore>());
  ASSERT_TRUE(task.Drain(root).error.ok());
  at::Tensor y = Leaf({1});
  (y * 7).sum().backward();
  EXPECT_TRUE(at::equal(y.grad(), at::tensor({7.0f})));
}

// A node of a local graph that, when it runs, drains another (distributed) task on the same
// thread: what a backward function waiting on the network would do in the simulator.
class DrainsWhileRunning : public Node {
 public:
  DrainsWhileRunning(const at::Tensor& input, DistGraphTask* task, std::shared_ptr<Node> root)
      : task_(task), root_(std::move(root)) {
    set_next_edges(torch::autograd::collect_next_edges(input));
  }
  std::string name() const override { return "DrainsWhileRunning"; }
  variable_list apply(variable_list&& grads) override {
    outcome = task_->Drain(root_);
    return {std::move(grads[0])};
  }
  DrainOutcome outcome;

 private:
  DistGraphTask* task_;
  std::shared_ptr<Node> root_;
};

TEST(DistGraphTaskTest, ADrainInsideALocalBackwardIsRefusedAndTheLocalPassFinishes) {
  at::Tensor d = Leaf({1});
  auto dist_root = RootOf((d * 4).sum());
  auto store = std::make_shared<GradientStore>();
  DistGraphTask dist(dist_root, {}, false, store);

  at::Tensor x = Leaf({1, 2});
  auto node = std::make_shared<DrainsWhileRunning>(x, &dist, dist_root);
  at::Tensor h = WithHistory(node, {2});
  (h * 3).sum().backward();
  EXPECT_EQ(node->outcome.error.code(), absl::StatusCode::kFailedPrecondition)
      << node->outcome.error;
  EXPECT_TRUE(at::equal(x.grad(), at::tensor({3.0f, 3.0f})));
  EXPECT_FALSE(GradOf(*store, d).defined());
  // The refused drain did not use up its root: outside the local pass it runs.
  DrainOutcome later = dist.Drain(dist_root);
  ASSERT_TRUE(later.error.ok()) << later.error;
  EXPECT_TRUE(at::equal(GradOf(*store, d), at::tensor({4.0f})));
}

TEST(DistGraphTaskTest, WarningsRaisedInADrainReachTheHandlerWhenThePassEnds) {
  struct Capture : c10::WarningHandler {
    void process(const c10::SourceLocation&, const std::string& msg, bool) override {
      messages.push_back(msg);
    }
    std::vector<std::string> messages;
  };
  class Warns : public Node {
   public:
    explicit Warns(const at::Tensor& input) {
      set_next_edges(torch::autograd::collect_next_edges(input));
    }
    variable_list apply(variable_list&& grads) override {
      TORCH_WARN("warned in backward");
      return {std::move(grads[0])};
    }
  };
  Capture capture;
  c10::Warning::WarningHandlerGuard guard(&capture);
  at::Tensor a = Leaf({1});
  at::Tensor h = WithHistory(std::make_shared<Warns>(a), {1});
  auto root = RootOf(h.sum());
  DistGraphTask task(root, {}, false, std::make_shared<GradientStore>());
  ASSERT_TRUE(task.Drain(root).error.ok());
  EXPECT_TRUE(capture.messages.empty());
  task.ReplayWarnings();
  ASSERT_EQ(capture.messages.size(), 1u);
  EXPECT_EQ(capture.messages[0], "warned in backward");
}

}  // namespace
}  // namespace dist_autograd
}  // namespace tether
