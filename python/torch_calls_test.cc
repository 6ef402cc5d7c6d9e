#include "python/torch_calls.h"

#include <ATen/ATen.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/jit.h>

#include "gtest/gtest.h"

namespace tether {
namespace pycall {
namespace {

// What a transport does: the receiver gets its own copy of each buffer's bytes.
std::vector<Buffer> Transmit(const std::vector<Buffer>& buffers) {
  std::vector<Buffer> out;
  for (const Buffer& b : buffers) out.push_back(Buffer::CopyFrom(b.view()));
  return out;
}

TEST(TorchCallsTest, ContiguousTensorAliasesStorageBothWays) {
  at::Tensor t = at::arange(12, at::kFloat).reshape({3, 4});
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({t}, &payload, &buffers).ok());
  ASSERT_EQ(buffers.size(), 1u);
  EXPECT_EQ(buffers[0].data(), t.data_ptr());  // no copy on send
  EXPECT_EQ(buffers[0].size(), 48u);

  std::vector<Buffer> received = Transmit(buffers);
  auto tensors = TakeTensors(payload, received, /*copy=*/false);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  ASSERT_EQ(tensors->size(), 1u);
  EXPECT_EQ((*tensors)[0].data_ptr(),
            received[0].data());  // no copy on receipt
  EXPECT_TRUE(at::equal((*tensors)[0], t));
  EXPECT_EQ((*tensors)[0].sizes(), t.sizes());

  auto copied = TakeTensors(payload, received, /*copy=*/true);
  ASSERT_TRUE(copied.ok());
  EXPECT_NE((*copied)[0].data_ptr(), received[0].data());
  EXPECT_TRUE(at::equal((*copied)[0], t));
}

TEST(TorchCallsTest, ReceivedTensorOutlivesMessageBuffers) {
  at::Tensor received;
  {
    Payload payload;
    std::vector<Buffer> buffers;
    ASSERT_TRUE(
        AppendTensors({at::full({1000}, 7.0, at::kDouble)}, &payload, &buffers)
            .ok());
    std::vector<Buffer> wire = Transmit(buffers);
    received = TakeTensors(payload, wire, false).value()[0];
  }
  EXPECT_EQ(received.sum().item<double>(), 7000.0);
}

TEST(TorchCallsTest, NonContiguousViewSendsOnlyItsElements) {
  at::Tensor big = at::arange(100, at::kLong).reshape({10, 10});
  at::Tensor view = big.t().slice(0, 2, 4);  // 2 x 10, not contiguous
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({view}, &payload, &buffers).ok());
  EXPECT_EQ(buffers[0].size(), 20u * 8u);
  auto tensors = TakeTensors(payload, Transmit(buffers), false);
  ASSERT_TRUE(tensors.ok());
  EXPECT_TRUE(at::equal((*tensors)[0], view));
}

TEST(TorchCallsTest, RequiresGradAndEmptyTensorsRoundTrip) {
  at::Tensor g = at::ones({2}, at::kFloat).set_requires_grad(true);
  at::Tensor empty = at::empty({0, 3}, at::kInt);
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({g, empty}, &payload, &buffers).ok());
  auto tensors = TakeTensors(payload, Transmit(buffers), false);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_TRUE((*tensors)[0].requires_grad());
  EXPECT_EQ((*tensors)[1].sizes(), empty.sizes());
  EXPECT_EQ((*tensors)[1].scalar_type(), at::kInt);
}

TEST(TorchCallsTest, RefusesSparseTensorsClearly) {
  at::Tensor sparse = at::eye(3).to_sparse();
  Payload payload;
  std::vector<Buffer> buffers;
  absl::Status s = AppendTensors({sparse}, &payload, &buffers);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layout"), std::string::npos) << s;
}

TEST(TorchCallsTest, RejectsMalformedTensorDescriptions) {
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({at::ones({4})}, &payload, &buffers).ok());
  std::vector<Buffer> wire = Transmit(buffers);

  Payload wrong_size = payload;
  wrong_size.mutable_tensors(0)->set_sizes(0, 5);
  EXPECT_EQ(TakeTensors(wrong_size, wire, false).status().code(),
            absl::StatusCode::kInvalidArgument);

  Payload bad_dtype = payload;
  bad_dtype.mutable_tensors(0)->set_dtype(1000);
  EXPECT_EQ(TakeTensors(bad_dtype, wire, false).status().code(),
            absl::StatusCode::kInvalidArgument);

  Payload negative = payload;
  negative.mutable_tensors(0)->set_sizes(0, -4);
  EXPECT_EQ(TakeTensors(negative, wire, false).status().code(),
            absl::StatusCode::kInvalidArgument);

  Payload huge = payload;
  for (int i = 0; i < 8; ++i) huge.mutable_tensors(0)->add_sizes(1 << 20);
  EXPECT_EQ(TakeTensors(huge, wire, false).status().code(),
            absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(TakeTensors(payload, {}, false).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TorchCallsTest, IValueRoundTripKeepsTensorsOutOfBand) {
  at::Tensor t = at::rand({256, 256});
  c10::IValue value =
      c10::ivalue::Tuple::create({c10::IValue(3), c10::IValue("x"), t});
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(EncodeIValue(value, &payload, &buffers).ok());
  EXPECT_LT(payload.pickle().size(),
            1000u);  // the 256 KB tensor is not in the pickle
  auto decoded = DecodeIValue(payload, Transmit(buffers), false);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const auto& elements = decoded->toTupleRef().elements();
  EXPECT_EQ(elements[0].toInt(), 3);
  EXPECT_EQ(elements[1].toStringRef(), "x");
  EXPECT_TRUE(at::equal(elements[2].toTensor(), t));
}

TEST(TorchCallsTest, MalformedPickleIsAnError) {
  Payload payload;
  payload.set_pickle("\x80\x02garbage");
  EXPECT_EQ(DecodeIValue(payload, {}, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse(std::string("\xff\xff\xff", 3)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

Payload BuiltinCall(const std::string& name, const std::string& overload,
                    torch::jit::Stack stack, std::vector<Buffer>* wire) {
  Payload payload;
  std::vector<Buffer> buffers;
  EXPECT_TRUE(
      EncodeBuiltinCall(name, overload, stack, &payload, &buffers).ok());
  Payload parsed = Parse(Serialize(payload)).value();
  *wire = Transmit(buffers);
  return parsed;
}

TEST(TorchCallsTest, RunsBuiltinOperator) {
  std::vector<Buffer> wire;
  Payload call = BuiltinCall(
      "aten::add", "Tensor",
      {at::ones({2, 2}), at::full({2, 2}, 2.0), c10::Scalar(1)}, &wire);
  auto result = RunBuiltinCall(call, wire, false);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(at::equal(result->toTensor(), at::full({2, 2}, 3.0)));
}

TEST(TorchCallsTest, BuiltinWithSeveralOutputsReturnsTuple) {
  std::vector<Buffer> wire;
  Payload call =
      BuiltinCall("aten::max", "dim",
                  {at::tensor({1.0, 5.0, 2.0}), int64_t{0}, false}, &wire);
  auto result = RunBuiltinCall(call, wire, false);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(result->isTuple());
  EXPECT_EQ(result->toTupleRef().elements()[1].toTensor().item<int64_t>(), 1);
}

TEST(TorchCallsTest, BuiltinErrors) {
  std::vector<Buffer> wire;
  Payload unknown = BuiltinCall("aten::no_such_op", "", {}, &wire);
  EXPECT_EQ(RunBuiltinCall(unknown, wire, false).status().code(),
            absl::StatusCode::kNotFound);

  Payload wrong_arity =
      BuiltinCall("aten::add", "Tensor", {at::ones({2})}, &wire);
  absl::Status s = RunBuiltinCall(wrong_arity, wire, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);

  Payload wrong_type =
      BuiltinCall("aten::add", "Tensor",
                  {c10::IValue("a"), at::ones({2}), c10::Scalar(1)}, &wire);
  s = RunBuiltinCall(wrong_type, wire, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("self"), std::string::npos) << s;

  Payload bad_shapes =
      BuiltinCall("aten::add", "Tensor",
                  {at::ones({2}), at::ones({3}), c10::Scalar(1)}, &wire);
  s = RunBuiltinCall(bad_shapes, wire, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("size of tensor"), std::string::npos) << s;
}

TEST(TorchCallsTest, RunsScriptFunctionByQualifiedName) {
  auto cu = torch::jit::compile(R"JIT(
def twice_plus(x: Tensor, k: int) -> Tensor:
    return x * 2 + k
)JIT");
  std::string name = cu->get_functions()[0]->qualname().qualifiedName();
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(
      EncodeScriptCall(name, {at::ones({3}), int64_t{4}}, &payload, &buffers)
          .ok());
  auto result = RunScriptCall(*cu, payload, Transmit(buffers), false);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(at::equal(result->toTensor(), at::full({3}, 6.0)));

  Payload missing;
  missing.set_op("__torch__.nope");
  ASSERT_TRUE(
      EncodeIValue(c10::ivalue::Tuple::create({}), &missing, &buffers).ok());
  EXPECT_EQ(RunScriptCall(*cu, missing, {}, false).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pycall
}  // namespace tether
