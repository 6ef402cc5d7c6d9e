#include "python/torch_calls.h"

#include <ATen/ATen.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/jit.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

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
    ASSERT_TRUE(AppendTensors({at::full({1000}, 7.0, at::kDouble)}, &payload, &buffers).ok());
    std::vector<Buffer> wire = Transmit(buffers);
    received = TakeTensors(payload, wire, false).value()[0];
  }
  EXPECT_EQ(received.sum().item<double>(), 7000.0);
}

Payload BuiltinCall(const std::string& name, const std::string& overload, torch::jit::Stack stack,
                    std::vector<Buffer>* wire) {
  Payload payload;
  std::vector<Buffer> buffers;
  EXPECT_TRUE(EncodeBuiltinCall(name, overload, stack, &payload, &buffers).ok());
  Payload parsed = Parse(Serialize(payload)).value();
  *wire = Transmit(buffers);
  return parsed;
}

// Sends `tensors` and receives them through a copying transport.
std::vector<at::Tensor> RoundTrip(const std::vector<at::Tensor>& tensors,
                                  std::vector<Buffer>* sent = nullptr, bool copy = false) {
  Payload payload;
  std::vector<Buffer> buffers;
  absl::Status s = AppendTensors(tensors, &payload, &buffers);
  EXPECT_TRUE(s.ok()) << s;
  Payload parsed = Parse(Serialize(payload)).value();
  auto received = TakeTensors(parsed, Transmit(buffers), copy);
  EXPECT_TRUE(received.ok()) << received.status();
  if (sent != nullptr) *sent = buffers;
  return received.ok() ? *received : std::vector<at::Tensor>();
}

bool SameStorage(const at::Tensor& a, const at::Tensor& b) {
  return a.storage().unsafeGetStorageImpl() == b.storage().unsafeGetStorageImpl();
}

void ExpectSameLayout(const at::Tensor& got, const at::Tensor& want) {
  EXPECT_EQ(got.sizes(), want.sizes());
  EXPECT_EQ(got.strides(), want.strides());
  EXPECT_EQ(got.storage_offset(), want.storage_offset());
  EXPECT_EQ(got.storage().nbytes(), want.storage().nbytes());
  EXPECT_EQ(got.scalar_type(), want.scalar_type());
  EXPECT_TRUE(at::equal(got, want));
}

TEST(TorchCallsTest, NonContiguousViewKeepsStridesAndOffset) {
  at::Tensor big = at::arange(100, at::kLong).reshape({10, 10});  // 800 bytes
  at::Tensor view = big.t().slice(0, 2, 4);  // 2 x 10, strides (1, 10), offset 2
  ASSERT_FALSE(view.is_contiguous());
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({view}, &payload, &buffers).ok());
  ASSERT_EQ(buffers.size(), 1u);
  EXPECT_EQ(buffers[0].data(), big.data_ptr());  // the whole storage, no copy
  EXPECT_EQ(buffers[0].size(), 800u);
  std::vector<Buffer> wire = Transmit(buffers);
  auto tensors = TakeTensors(payload, wire, false);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  ExpectSameLayout((*tensors)[0], view);
  EXPECT_EQ((*tensors)[0].storage().data(), wire[0].data());  // adopted, no copy

  at::Tensor transposed = at::arange(12, at::kFloat).reshape({3, 4}).t();
  ExpectSameLayout(RoundTrip({transposed})[0], transposed);
  at::Tensor expanded = at::ones({1}).expand({5000});  // stride 0 (not compacted: numel counts)
  ExpectSameLayout(RoundTrip({expanded})[0], expanded);
}

TEST(TorchCallsTest, TensorsSharingStorageShareItOnArrival) {
  at::Tensor a = at::arange(10, at::kFloat);
  at::Tensor tail = a.slice(0, 1);
  at::Tensor grid = a.view({2, 5}).t();
  for (bool copy : {false, true}) {
    std::vector<Buffer> sent;
    std::vector<at::Tensor> got = RoundTrip({a, tail, grid, at::ones({2})}, &sent, copy);
    ASSERT_EQ(got.size(), 4u);
    ASSERT_EQ(sent.size(), 2u);  // the shared storage travels once
    EXPECT_EQ(sent[0].size(), 40u);
    ExpectSameLayout(got[0], a);
    ExpectSameLayout(got[1], tail);
    ExpectSameLayout(got[2], grid);
    EXPECT_TRUE(SameStorage(got[0], got[1]));
    EXPECT_TRUE(SameStorage(got[0], got[2]));
    EXPECT_FALSE(SameStorage(got[0], got[3]));
    got[1][0].fill_(100);  // a[1]
    EXPECT_EQ(got[0][1].item<float>(), 100.0f);
    EXPECT_EQ(got[2][1][0].item<float>(), 100.0f);  // grid[1][0] is a[1]
  }
}

TEST(TorchCallsTest, IValueAndBuiltinCallsKeepViewsAndSharing) {
  at::Tensor a = at::arange(12, at::kFloat);
  c10::IValue value = c10::ivalue::Tuple::create({a.slice(0, 2), a.view({3, 4}).t(), a});
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(EncodeIValue(value, &payload, &buffers).ok());
  EXPECT_EQ(buffers.size(), 1u);
  auto decoded = DecodeIValue(payload, Transmit(buffers), false);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const auto& e = decoded->toTupleRef().elements();
  ExpectSameLayout(e[0].toTensor(), a.slice(0, 2));
  ExpectSameLayout(e[1].toTensor(), a.view({3, 4}).t());
  EXPECT_TRUE(SameStorage(e[0].toTensor(), e[2].toTensor()));
  EXPECT_TRUE(SameStorage(e[1].toTensor(), e[2].toTensor()));

  // aten::narrow on the callee returns a view of the received (transposed) argument.
  std::vector<Buffer> wire;
  Payload call = BuiltinCall("aten::narrow", "",
                             {a.view({3, 4}).t(), int64_t{0}, int64_t{1}, int64_t{2}}, &wire);
  auto result = RunBuiltinCall(call, wire, false);
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectSameLayout(result->toTensor(), a.view({3, 4}).t().narrow(0, 1, 2));
}

TEST(TorchCallsTest, SmallViewOfHugeStorageIsCompacted) {
  // PyTorch's rule: compact when storage >= 8 KiB and storage >= 2 * numel * itemsize.
  at::Tensor big = at::arange(1000000, at::kFloat);
  std::vector<Buffer> sent;
  at::Tensor slice = big.slice(0, 10, 20);
  at::Tensor got = RoundTrip({slice}, &sent)[0];
  EXPECT_EQ(sent[0].size(), 40u);
  EXPECT_EQ(got.storage_offset(), 0);
  EXPECT_EQ(got.storage().nbytes(), 40u);
  EXPECT_TRUE(at::equal(got, slice));

  // Dense views keep their strides (clone preserves them); others become contiguous.
  at::Tensor block = big.view({1000, 1000}).slice(0, 0, 2).t();
  got = RoundTrip({block}, &sent)[0];
  EXPECT_EQ(sent[0].size(), 8000u);
  EXPECT_EQ(got.strides(), block.strides());
  EXPECT_TRUE(at::equal(got, block));
  at::Tensor columns = big.view({1000, 1000}).slice(1, 0, 2);
  got = RoundTrip({columns}, &sent)[0];
  EXPECT_EQ(sent[0].size(), 8000u);
  EXPECT_EQ(got.strides(), (std::vector<int64_t>{2, 1}));
  EXPECT_TRUE(at::equal(got, columns));

  // The whole tensor and its compacted view no longer share.
  std::vector<at::Tensor> both = RoundTrip({big, slice}, &sent);
  ASSERT_EQ(sent.size(), 2u);
  EXPECT_EQ(sent[0].size(), 4000000u);
  EXPECT_EQ(sent[1].size(), 40u);
  EXPECT_FALSE(SameStorage(both[0], both[1]));

  // A view using more than half of the storage ships it whole.
  at::Tensor most = big.slice(0, 1, 600001);
  got = RoundTrip({most}, &sent)[0];
  EXPECT_EQ(sent[0].size(), 4000000u);
  ExpectSameLayout(got, most);

  // The boundaries.
  at::Tensor s8192 = at::zeros({2048}, at::kFloat);  // 8192 bytes
  RoundTrip({s8192.slice(0, 0, 1024)}, &sent);
  EXPECT_EQ(sent[0].size(), 4096u);  // exactly half: compacted
  got = RoundTrip({s8192.slice(0, 1, 1026)}, &sent)[0];
  EXPECT_EQ(sent[0].size(), 8192u);  // more than half: whole
  EXPECT_EQ(got.storage_offset(), 1);
  at::Tensor s8188 = at::zeros({2047}, at::kFloat);
  got = RoundTrip({s8188.slice(0, 5, 6)}, &sent)[0];
  EXPECT_EQ(sent[0].size(), 8188u);  // under 8 KiB: whole
  EXPECT_EQ(got.storage_offset(), 5);
  got = RoundTrip({big.slice(0, 5, 5)}, &sent)[0];  // an empty view of a huge storage
  EXPECT_EQ(sent[0].size(), 0u);
  EXPECT_EQ(got.storage_offset(), 0);
}

TEST(TorchCallsTest, CompactedClonesNeverShareAFreedStorageAddress) {
  // A zero-size view of a big storage is compacted into a 0-byte clone that
  // dies right after it is described; later clones may get its address.
  std::vector<at::Tensor> tensors;
  std::vector<at::Tensor> bigs;
  for (int i = 0; i < 4; ++i) {
    bigs.push_back(at::arange(100000, at::kFloat));
    tensors.push_back(bigs.back().slice(0, 5, 5));
    tensors.push_back(bigs.back().slice(0, 0, 10));
  }
  std::vector<at::Tensor> got = RoundTrip(tensors);
  ASSERT_EQ(got.size(), tensors.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(at::equal(got[i], tensors[i])) << i;
}

TEST(TorchCallsTest, ZeroSizeZeroDimConjugateAndMisalignedTensors) {
  at::Tensor a = at::arange(10, at::kFloat);
  std::vector<at::Tensor> got = RoundTrip({a.slice(0, 5, 5), a[3], at::empty({0, 3}, at::kInt)});
  ExpectSameLayout(got[0], a.slice(0, 5, 5));
  EXPECT_EQ(got[0].storage_offset(), 5);
  ExpectSameLayout(got[1], a[3]);
  EXPECT_EQ(got[1].dim(), 0);
  EXPECT_TRUE(SameStorage(got[0], got[1]));
  EXPECT_EQ(got[2].sizes(), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(got[2].scalar_type(), at::kInt);

  at::Tensor c = at::complex(at::arange(4, at::kFloat), at::ones({4})).slice(0, 1).conj();
  ASSERT_TRUE(c.is_conj());
  at::Tensor back = RoundTrip({c})[0];
  EXPECT_FALSE(back.is_conj());
  EXPECT_TRUE(at::equal(back, c.resolve_conj()));
  at::Tensor n = at::arange(4, at::kFloat)._neg_view();
  back = RoundTrip({n})[0];
  EXPECT_FALSE(back.is_neg());
  EXPECT_TRUE(at::equal(back, n.resolve_neg()));

  // A buffer not aligned for its dtype is copied, still shared by its tensors.
  at::Tensor d = at::arange(8, at::kDouble);
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({d, d.slice(0, 2)}, &payload, &buffers).ok());
  Buffer padded = Buffer::Allocate(65);
  std::memcpy(padded.mutable_data() + 1, buffers[0].data(), 64);
  Buffer odd = Buffer::Wrap(padded.owner(), padded.data() + 1, 64);
  auto tensors = TakeTensors(payload, {odd}, false);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  ExpectSameLayout((*tensors)[1], d.slice(0, 2));
  EXPECT_TRUE(SameStorage((*tensors)[0], (*tensors)[1]));
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

TEST(TorchCallsTest, RefusesOtherLayoutsClearly) {
  at::Tensor csr = at::eye(3).to_sparse_csr();
  Payload payload;
  std::vector<Buffer> buffers;
  absl::Status s = AppendTensors({csr}, &payload, &buffers);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layout"), std::string::npos) << s;
}

at::Tensor SparseExample(bool coalesce) {
  // Two entries at (1, 0): uncoalesced unless `coalesce`.
  at::Tensor i = at::tensor({0, 1, 1, 2, 0, 0}, at::kLong).reshape({2, 3});
  at::Tensor v = at::tensor({3.0f, 4.0f, 5.0f});
  at::Tensor t = at::sparse_coo_tensor(i, v, {2, 3});
  return coalesce ? t.coalesce() : t;
}

TEST(TorchCallsTest, SparseCooTensorsRoundTrip) {
  for (bool coalesce : {false, true}) {
    at::Tensor sparse = SparseExample(coalesce);
    at::Tensor hybrid = at::sparse_coo_tensor(at::tensor({0, 2}, at::kLong).reshape({1, 2}),
                                              at::ones({2, 4}, at::kDouble), {3, 4});
    at::Tensor grad = SparseExample(coalesce).requires_grad_(true);
    Payload payload;
    std::vector<Buffer> buffers;
    ASSERT_TRUE(AppendTensors({sparse, hybrid, grad}, &payload, &buffers).ok());
    auto tensors = TakeTensors(payload, Transmit(buffers), /*copy=*/false);
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    const at::Tensor& got = (*tensors)[0];
    EXPECT_TRUE(got.is_sparse());
    EXPECT_EQ(got.is_coalesced(), coalesce);
    EXPECT_EQ(got.sizes(), sparse.sizes());
    EXPECT_TRUE(at::equal(got._indices(), sparse._indices()));
    EXPECT_TRUE(at::equal(got.to_dense(), sparse.to_dense()));
    EXPECT_EQ((*tensors)[1].sparse_dim(), 1);
    EXPECT_EQ((*tensors)[1].dense_dim(), 1);
    EXPECT_TRUE(at::equal((*tensors)[1].to_dense(), hybrid.to_dense()));
    EXPECT_TRUE((*tensors)[2].requires_grad());
    EXPECT_TRUE(at::equal((*tensors)[2].detach().to_dense(), sparse.to_dense()));
  }
}

TEST(TorchCallsTest, MalformedSparseTensorsAreRefused) {
  auto sent = [](const at::Tensor& t, Payload* payload, std::vector<Buffer>* wire) {
    std::vector<Buffer> buffers;
    ASSERT_TRUE(AppendTensors({t}, payload, &buffers).ok());
    *wire = Transmit(buffers);
  };
  auto expect = [](const Payload& payload, const std::vector<Buffer>& wire,
                   const std::string& text) {
    absl::Status s = TakeTensors(payload, wire, false).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(text), std::string::npos) << s;
  };
  Payload good;
  std::vector<Buffer> wire;
  sent(SparseExample(/*coalesce=*/false), &good, &wire);

  Payload p = good;
  p.mutable_tensors(0)->set_sizes(0, 1);  // index 1 in dimension 0 is out of range
  expect(p, wire, "cannot rebuild tensor");
  p = good;
  p.mutable_tensors(0)->add_sizes(5);  // three sizes for two sparse and no dense dimensions
  expect(p, wire, "do not fit");
  p = good;
  p.mutable_tensors(0)->mutable_sparse_coo()->mutable_indices()->set_dtype(
      static_cast<int>(c10::ScalarType::Int));
  expect(p, wire, "must be a 2-D int64 tensor");
  p = good;
  p.mutable_tensors(0)->set_dtype(static_cast<int>(c10::ScalarType::Double));
  expect(p, wire, "values must be a tensor of dtype Double");
  p = good;
  p.mutable_tensors(0)->mutable_sparse_coo()->set_coalesced(true);  // duplicates at (1, 0)
  expect(p, wire, "marked coalesced");
  p = good;
  *p.mutable_tensors(0)->mutable_sparse_coo()->mutable_values()->mutable_sparse_coo() =
      good.tensors(0).sparse_coo();
  expect(p, wire, "is sparse where a dense tensor must be");
  p = good;
  p.mutable_tensors(0)->mutable_sparse_coo()->mutable_values()->set_storage(7);
  expect(p, wire, "values refers to storage 7");
}

// Expects kInvalidArgument with a message containing `text`.
void ExpectInvalid(const Payload& payload, const std::vector<Buffer>& wire,
                   const std::string& text) {
  absl::Status s = TakeTensors(payload, wire, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(text), std::string::npos) << s;
}

TEST(TorchCallsTest, RejectsMalformedTensorDescriptions) {
  at::Tensor a = at::arange(12, at::kFloat);
  Payload payload;
  std::vector<Buffer> buffers;
  ASSERT_TRUE(AppendTensors({a, a.view({3, 4}).slice(1, 1)}, &payload, &buffers).ok());
  std::vector<Buffer> wire = Transmit(buffers);
  ASSERT_EQ(wire.size(), 1u);
  ASSERT_TRUE(TakeTensors(payload, wire, false).ok());
  auto with = [&](const std::function<void(TensorMeta*)>& change) {
    Payload p = payload;
    change(p.mutable_tensors(1));
    return p;
  };

  ExpectInvalid(with([](TensorMeta* m) { m->set_dtype(1000); }), wire, "invalid dtype 1000");
  ExpectInvalid(with([](TensorMeta* m) { m->set_dtype(-1); }), wire, "invalid dtype");
  ExpectInvalid(with([](TensorMeta* m) { m->set_sizes(0, -4); }), wire, "negative size -4");
  ExpectInvalid(with([](TensorMeta* m) { m->set_strides(1, -1); }), wire, "negative stride -1");
  ExpectInvalid(with([](TensorMeta* m) { m->add_strides(1); }), wire, "2 sizes but 3 strides");
  ExpectInvalid(with([](TensorMeta* m) { m->clear_strides(); }), wire, "2 sizes but 0 strides");
  ExpectInvalid(with([](TensorMeta* m) { m->set_storage_offset(-1); }), wire,
                "negative storage offset");
  ExpectInvalid(with([](TensorMeta* m) { m->set_storage(1); }), wire,
                "refers to storage 1 but the message carries 1");
  ExpectInvalid(with([](TensorMeta* m) { m->set_storage(-1); }), wire, "refers to storage -1");
  // Offset, sizes or strides that reach past the storage's 48 bytes.
  ExpectInvalid(with([](TensorMeta* m) { m->set_storage_offset(2); }), wire,
                "reaches past the end of storage 0, which has 48 bytes");
  ExpectInvalid(with([](TensorMeta* m) { m->set_sizes(0, 4); }), wire, "reaches past the end");
  ExpectInvalid(with([](TensorMeta* m) { m->set_strides(0, 5); }), wire, "reaches past the end");
  ExpectInvalid(with([](TensorMeta* m) { m->set_storage_offset(int64_t{1} << 61); }), wire,
                "impossibly large storage offset");
  ExpectInvalid(with([](TensorMeta* m) { m->set_strides(0, int64_t{1} << 62); }), wire,
                "reaches past the end");
  ExpectInvalid(with([](TensorMeta* m) { m->set_strides(0, INT64_MAX); }), wire,
                "impossibly large size or stride");
  ExpectInvalid(with([](TensorMeta* m) { m->set_sizes(0, INT64_MAX); }), wire,
                "impossibly large size or stride");
  ExpectInvalid(with([](TensorMeta* m) {
                  for (int i = 0; i < 8; ++i) {
                    m->add_sizes(1 << 20);
                    m->add_strides(0);
                  }
                }),
                wire, "impossibly large");
  ExpectInvalid(with([](TensorMeta* m) {
                  for (int i = 0; i < 70; ++i) {
                    m->add_sizes(1);
                    m->add_strides(1);
                  }
                }),
                wire, "at most 64");
  // A 0-dim tensor needs one element; a zero-size one reads nothing.
  ExpectInvalid(with([](TensorMeta* m) {
                  m->clear_sizes();
                  m->clear_strides();
                  m->set_storage_offset(12);
                }),
                wire, "reaches past the end");
  Payload empty = with([](TensorMeta* m) {
    m->set_sizes(0, 0);
    m->set_storage_offset(1000);
  });
  EXPECT_TRUE(TakeTensors(empty, wire, false).ok());

  // Buffers that do not match the descriptions.
  ExpectInvalid(payload, {}, "refers to storage 0 but the message carries 0");
  ExpectInvalid(payload, {wire[0], wire[0]}, "storage 1 (48 bytes) but no received tensor uses it");
  ExpectInvalid(payload, {Buffer::CopyFrom(wire[0].view().substr(0, 40))}, "which has 40 bytes");
  Payload none;
  ExpectInvalid(none, wire, "no received tensor uses it");
}

TEST(TorchCallsTest, IValueRoundTripKeepsTensorsOutOfBand) {
  at::Tensor t = at::rand({256, 256});
  c10::IValue value = c10::ivalue::Tuple::create({c10::IValue(3), c10::IValue("x"), t});
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
  EXPECT_EQ(DecodeIValue(payload, {}, false).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Parse(std::string("\xff\xff\xff", 3)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TorchCallsTest, RunsBuiltinOperator) {
  std::vector<Buffer> wire;
  Payload call = BuiltinCall("aten::add", "Tensor",
                             {at::ones({2, 2}), at::full({2, 2}, 2.0), c10::Scalar(1)}, &wire);
  auto result = RunBuiltinCall(call, wire, false);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(at::equal(result->toTensor(), at::full({2, 2}, 3.0)));
}

TEST(TorchCallsTest, BuiltinWithSeveralOutputsReturnsTuple) {
  std::vector<Buffer> wire;
  Payload call =
      BuiltinCall("aten::max", "dim", {at::tensor({1.0, 5.0, 2.0}), int64_t{0}, false}, &wire);
  auto result = RunBuiltinCall(call, wire, false);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(result->isTuple());
  EXPECT_EQ(result->toTupleRef().elements()[1].toTensor().item<int64_t>(), 1);
}

TEST(TorchCallsTest, BuiltinErrors) {
  std::vector<Buffer> wire;
  Payload unknown = BuiltinCall("aten::no_such_op", "", {}, &wire);
  EXPECT_EQ(RunBuiltinCall(unknown, wire, false).status().code(), absl::StatusCode::kNotFound);

  Payload wrong_arity = BuiltinCall("aten::add", "Tensor", {at::ones({2})}, &wire);
  absl::Status s = RunBuiltinCall(wrong_arity, wire, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);

  Payload wrong_type =
      BuiltinCall("aten::add", "Tensor", {c10::IValue("a"), at::ones({2}), c10::Scalar(1)}, &wire);
  s = RunBuiltinCall(wrong_type, wire, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("self"), std::string::npos) << s;

  Payload bad_shapes =
      BuiltinCall("aten::add", "Tensor", {at::ones({2}), at::ones({3}), c10::Scalar(1)}, &wire);
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
  ASSERT_TRUE(EncodeScriptCall(name, {at::ones({3}), int64_t{4}}, &payload, &buffers).ok());
  auto result = RunScriptCall(*cu, payload, Transmit(buffers), false);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(at::equal(result->toTensor(), at::full({3}, 6.0)));

  Payload missing;
  missing.set_op("__torch__.nope");
  ASSERT_TRUE(EncodeIValue(c10::ivalue::Tuple::create({}), &missing, &buffers).ok());
  EXPECT_EQ(RunScriptCall(*cu, missing, {}, false).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pycall
}  // namespace tether
