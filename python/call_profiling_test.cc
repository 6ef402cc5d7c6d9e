#include "python/call_profiling.h"

#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/profiler/api.h>

#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace tether {
namespace pycall {
namespace {

namespace profiler = ::torch::autograd::profiler;
using ::torch::profiler::impl::ProfilerConfig;
using ::torch::profiler::impl::ProfilerState;

std::vector<profiler::LegacyEvent> Flatten(
    const profiler::thread_event_lists& lists) {
  std::vector<profiler::LegacyEvent> out;
  for (const auto& l : lists) out.insert(out.end(), l.begin(), l.end());
  return out;
}

const profiler::LegacyEvent* Find(
    const std::vector<profiler::LegacyEvent>& events, const std::string& name) {
  for (const auto& e : events) {
    if (e.kindStr() == "push" && name == e.name()) return &e;
  }
  return nullptr;
}

// Handles a "call" on another thread, as a pool thread would.
std::string HandleOnAnotherThread(const ProfilingRequest* request,
                                  bool subtract = false) {
  std::string reply;
  std::thread t([&] {
    std::shared_ptr<HandlerProfile> p = HandlerProfile::Start(request);
    at::Tensor x = at::ones({2});
    if (subtract) {
      at::sub(x, x);
    } else {
      at::add(x, x);
    }
    if (p != nullptr) {
      p->LeaveThread();
      reply = p->Finish();
      EXPECT_EQ(p->Finish(), "");  // once
    }
  });
  t.join();
  return reply;
}

// A reply ready before the handler returns (a synchronous call) must not leave
// the profiler's callback on the thread: the next profiled call on that thread
// would record every operator twice.
TEST(CallProfilingTest, ReplyBeforeLeavingLeavesTheThreadClean) {
  std::thread t([] {
    ProfilingRequest request;
    for (int i = 0; i < 3; ++i) {
      std::shared_ptr<HandlerProfile> p = HandlerProfile::Start(&request);
      ASSERT_NE(p, nullptr);
      at::mul(at::ones({2}), at::ones({2}));
      absl::StatusOr<std::vector<profiler::LegacyEvent>> events =
          DecodeEvents(p->Finish());
      p->LeaveThread();
      ASSERT_TRUE(events.ok());
      int muls = 0;
      for (const auto& e : *events) {
        if (e.kindStr() == "push" && std::string(e.name()) == "aten::mul")
          ++muls;
      }
      EXPECT_EQ(muls, 1) << "call " << i;
      EXPECT_FALSE(torch::profiler::impl::profilerEnabled());
    }
  });
  t.join();
}

TEST(CallProfilingTest, NothingToCaptureWithoutAProfiler) {
  EXPECT_EQ(CallerProfile::Capture("rpc_sync#f(a -> b)"), nullptr);
  EXPECT_EQ(HandlerProfile::Start(nullptr), nullptr);
}

TEST(CallProfilingTest, CalleeOperatorsBecomeRemoteEventsOfTheCaller) {
  SetNodeId(3);  // this "worker" plays both sides: events carry node id 3
  profiler::enableProfilerLegacy(ProfilerConfig(ProfilerState::CPU, true));
  std::shared_ptr<const CallerProfile> caller =
      CallerProfile::Capture("rpc_sync#f(worker0 -> worker1)");
  ASSERT_NE(caller, nullptr);
  EXPECT_TRUE(caller->request().record_shapes());
  std::string events = HandleOnAnotherThread(&caller->request());
  ASSERT_FALSE(events.empty());
  // The reply is handled on yet another thread.
  std::thread t([&] { EXPECT_TRUE(caller->AddRemoteEvents(events).ok()); });
  t.join();
  std::vector<profiler::LegacyEvent> got =
      Flatten(profiler::disableProfilerLegacy());
  const profiler::LegacyEvent* add =
      Find(got, "rpc_sync#f(worker0 -> worker1)#remote_op: aten::add");
  ASSERT_NE(add, nullptr);
  EXPECT_TRUE(add->isRemote());
  EXPECT_EQ(add->nodeId(), 3);
  EXPECT_FALSE(add->shapes().empty());  // the caller's record_shapes applied
  // The caller's own thread recorded nothing of the callee's work.
  EXPECT_EQ(Find(got, "aten::add"), nullptr);
}

TEST(CallProfilingTest, LateRepliesAndBadEventsAreHarmless) {
  profiler::enableProfilerLegacy(ProfilerConfig(ProfilerState::CPU));
  std::shared_ptr<const CallerProfile> caller = CallerProfile::Capture("k");
  ASSERT_NE(caller, nullptr);
  std::string events = HandleOnAnotherThread(&caller->request());
  profiler::disableProfilerLegacy();
  // The profile ended before the reply came.
  EXPECT_TRUE(caller->AddRemoteEvents(events).ok());
  EXPECT_TRUE(caller->AddRemoteEvents("").ok());
  absl::Status bad = caller->AddRemoteEvents("garbage");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
}

TEST(CallProfilingTest, DecodeRejectsWhatIsNotAListOfEvents) {
  EXPECT_EQ(DecodeEvents("\x80\x02junk").status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<char> not_list = torch::jit::pickle(c10::IValue(int64_t{7}));
  EXPECT_EQ(DecodeEvents(std::string(not_list.data(), not_list.size()))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  c10::impl::GenericList wrong(c10::AnyType::get());
  wrong.push_back(c10::IValue(std::string("x")));
  std::vector<char> bytes = torch::jit::pickle(c10::IValue(wrong));
  EXPECT_EQ(
      DecodeEvents(std::string(bytes.data(), bytes.size())).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(DecodeEvents(EncodeEvents({})).value().empty());
  // An event whose kind is none of the four.
  profiler::LegacyEvent push(profiler::EventKind::PushRange,
                             at::StringView("x"), 0, false);
  c10::IValue event = push.toIValue();
  ASSERT_TRUE(event.isList());
  c10::List<c10::IValue> fields = event.toList();
  ASSERT_EQ(fields.get(0), c10::IValue(int64_t{1}));  // the kind comes first
  fields.set(0, c10::IValue(int64_t{99}));
  c10::impl::GenericList bad(c10::AnyType::get());
  bad.push_back(event);
  std::vector<char> bad_bytes = torch::jit::pickle(c10::IValue(bad));
  EXPECT_EQ(DecodeEvents(std::string(bad_bytes.data(), bad_bytes.size()))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CallProfilingTest, ServerProfilerCollectsEveryHandledCallAndNests) {
  EXPECT_EQ(DisableServerProfiler().status().code(),
            absl::StatusCode::kFailedPrecondition);
  EnableServerProfiler(ProfilerConfig(ProfilerState::CPU));
  EXPECT_EQ(HandleOnAnotherThread(nullptr), "");  // nothing to send back
  EnableServerProfiler(ProfilerConfig(ProfilerState::CPU));
  HandleOnAnotherThread(nullptr, /*subtract=*/true);
  auto inner = DisableServerProfiler();
  ASSERT_TRUE(inner.ok());
  ASSERT_EQ(inner->size(), 1u);
  EXPECT_NE(Find(Flatten((*inner)[0]), "aten::sub"), nullptr);
  EXPECT_EQ(Find(Flatten((*inner)[0]), "aten::add"), nullptr);
  auto outer = DisableServerProfiler();
  ASSERT_TRUE(outer.ok());
  ASSERT_EQ(outer->size(), 2u);
  EXPECT_NE(Find(Flatten((*outer)[0]), "aten::add"), nullptr);
  EXPECT_NE(Find(Flatten((*outer)[1]), "aten::sub"), nullptr);
  EXPECT_EQ(HandlerProfile::Start(nullptr), nullptr);  // off again
}

TEST(CallProfilingTest, ARequestedCallIsAlsoSeenByTheServerProfiler) {
  EnableServerProfiler(ProfilerConfig(ProfilerState::CPU));
  ProfilingRequest request;
  EXPECT_FALSE(HandleOnAnotherThread(&request).empty());
  auto server = DisableServerProfiler();
  ASSERT_TRUE(server.ok());
  ASSERT_EQ(server->size(), 1u);
  EXPECT_NE(Find(Flatten((*server)[0]), "aten::add"), nullptr);
}

}  // namespace
}  // namespace pycall
}  // namespace tether
