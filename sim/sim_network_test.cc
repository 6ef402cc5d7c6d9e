#include "sim/sim_network.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace tether::sim {
namespace {

struct Recorder : NetworkObserver {
  std::vector<std::string> payloads;
  std::vector<WorkerId> failed;
  void OnMessage(Message m) override {
    payloads.push_back(m.envelope.payload());
  }
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override {
    EXPECT_EQ(reason.code(), absl::StatusCode::kUnavailable);
    failed.push_back(peer);
  }
};

Message Msg(const std::string& payload, MessageType type = wire::TEST_CALL) {
  Message m;
  m.envelope.set_type(type);
  m.envelope.set_payload(payload);
  return m;
}

struct Net {
  explicit Net(int n, const std::string& faults = "none", uint64_t seed = 1)
      : scheduler(seed), observers(n) {
    Prng rng(seed);
    fabric = std::make_unique<SimFabric>(
        &scheduler, n, ResolveFaults(FaultSpec::Parse(faults).value(), n, rng),
        seed);
    for (int i = 0; i < n; ++i) {
      endpoints.push_back(fabric->CreateEndpoint(i));
      EXPECT_TRUE(endpoints[i]->Start(&observers[i]).ok());
    }
  }
  Scheduler scheduler;
  std::unique_ptr<SimFabric> fabric;
  std::vector<Recorder> observers;
  std::vector<std::unique_ptr<SimNetwork>> endpoints;
};

TEST(SimNetworkTest, FifoPerPairAndNeverInline) {
  Net net(2, "delay=0..20ms");
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(net.endpoints[0]->Send(1, Msg(std::to_string(i))).ok());
  }
  EXPECT_TRUE(net.observers[1].payloads.empty());
  net.scheduler.RunUntilIdle();
  ASSERT_EQ(net.observers[1].payloads.size(), 100u);
  for (int i = 0; i < 100; ++i)
    EXPECT_EQ(net.observers[1].payloads[i], std::to_string(i));
  EXPECT_EQ(net.fabric->stats().delivered, 100u);
}

TEST(SimNetworkTest, SetsFromToAndCarriesBuffers) {
  Net net(3);
  struct Check : NetworkObserver {
    Message got;
    void OnMessage(Message m) override { got = std::move(m); }
    void OnPeerFailed(WorkerId, const absl::Status&) override {}
  } check;
  Prng rng(1);
  SimFabric f2(&net.scheduler, 3, ResolveFaults(FaultSpec(), 3, rng), 1);
  auto a = f2.CreateEndpoint(0);
  auto b = f2.CreateEndpoint(2);
  ASSERT_TRUE(a->Start(&net.observers[0]).ok());
  ASSERT_TRUE(b->Start(&check).ok());
  Message m = Msg("x");
  m.envelope.set_from(9);
  m.buffers.push_back(Buffer::CopyFrom("tensor-bytes"));
  const uint8_t* data = m.buffers[0].data();
  ASSERT_TRUE(a->Send(2, std::move(m)).ok());
  net.scheduler.RunUntilIdle();
  EXPECT_EQ(check.got.envelope.from(), 0);
  EXPECT_EQ(check.got.envelope.to(), 2);
  ASSERT_EQ(check.got.buffers.size(), 1u);
  EXPECT_EQ(check.got.buffers[0].data(), data);  // not copied
  EXPECT_TRUE(check.got.CheckBuffers().ok());
}

TEST(SimNetworkTest, SendErrors) {
  Net net(2);
  EXPECT_EQ(net.endpoints[0]->Send(5, Msg("x")).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(net.endpoints[0]->Send(-1, Msg("x")).code(),
            absl::StatusCode::kInvalidArgument);
  net.endpoints[0]->Stop();
  net.endpoints[0]->Stop();  // idempotent
  EXPECT_EQ(net.endpoints[0]->Send(1, Msg("x")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(net.endpoints[0]->Start(&net.observers[0]).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(SimNetworkTest, StopFlushesThenPeersSeeFailureOnce) {
  Net net(3);
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("last")).ok());
  net.endpoints[0]->Stop();
  net.scheduler.RunUntilIdle();
  EXPECT_EQ(net.observers[1].payloads, std::vector<std::string>{"last"});
  EXPECT_EQ(net.observers[1].failed, std::vector<WorkerId>{0});
  EXPECT_EQ(net.observers[2].failed, std::vector<WorkerId>{0});
  // Sending to the stopped worker: known failed now.
  EXPECT_EQ(net.endpoints[1]->Send(0, Msg("x")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(net.observers[0].payloads.empty());
  EXPECT_EQ(net.observers[1].failed.size(), 1u);
}

TEST(SimNetworkTest, NoCallbackAfterStop) {
  Net net(2, "delay=10ms");
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("late")).ok());
  net.endpoints[1]->Stop();
  net.scheduler.RunUntilIdle();
  EXPECT_TRUE(net.observers[1].payloads.empty());
  // The sender learns that its message was refused.
  EXPECT_EQ(net.observers[0].failed, std::vector<WorkerId>{1});
  EXPECT_EQ(net.fabric->stats().refused, 1u);
}

TEST(SimNetworkTest, CrashVanishesInFlightAndNotifiesPeers) {
  Net net(3, "delay=5ms");
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("to-crashed")).ok());
  ASSERT_TRUE(net.endpoints[1]->Send(2, Msg("from-crashed")).ok());
  net.fabric->Crash(1);
  EXPECT_TRUE(net.fabric->crashed(1));
  EXPECT_EQ(net.endpoints[1]->Send(0, Msg("x")).code(),
            absl::StatusCode::kUnavailable);
  net.scheduler.RunUntilIdle();
  EXPECT_TRUE(net.observers[1].payloads.empty());
  EXPECT_TRUE(net.observers[2].payloads.empty());
  EXPECT_EQ(net.observers[0].failed, std::vector<WorkerId>{1});
  EXPECT_EQ(net.observers[2].failed, std::vector<WorkerId>{1});
  EXPECT_EQ(net.fabric->stats().vanished, 2u);
}

TEST(SimNetworkTest, RestartNewIncarnationOldOneRefused) {
  Net net(2, "delay=5ms");
  net.fabric->Crash(1);
  auto fresh = net.fabric->CreateEndpoint(1);
  Recorder r1;
  ASSERT_TRUE(fresh->Start(&r1).ok());
  EXPECT_EQ(fresh->incarnation(), 1u);
  // Worker 0 has not been told yet: it still addresses incarnation 0, which
  // refuses.
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("stale")).ok());
  net.scheduler.RunUntilIdle();
  EXPECT_TRUE(r1.payloads.empty());
  EXPECT_EQ(net.observers[0].failed, std::vector<WorkerId>{1});
  // Once told, the next send reaches the new incarnation.
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("fresh")).ok());
  net.scheduler.RunUntilIdle();
  EXPECT_EQ(r1.payloads, std::vector<std::string>{"fresh"});
  net.endpoints[1]
      .reset();  // the old endpoint can go before or after the fabric
}

TEST(SimNetworkTest, SendToCrashedReportsFailureAsynchronously) {
  Net net(2);
  net.fabric->Crash(1);
  net.scheduler.RunUntilIdle();
  net.observers[0].failed.clear();
  EXPECT_EQ(net.endpoints[0]->Send(1, Msg("x")).code(),
            absl::StatusCode::kUnavailable);
}

TEST(SimNetworkTest, DropDupReorderAreSeededAndCounted) {
  auto run = [](uint64_t seed) {
    Net net(2, "drop=0.2,dup=0.2,reorder=0.3,delay=1ms..2ms", seed);
    for (int i = 0; i < 500; ++i) {
      EXPECT_TRUE(net.endpoints[0]->Send(1, Msg(std::to_string(i))).ok());
    }
    net.scheduler.RunUntilIdle();
    return std::make_pair(net.observers[1].payloads, net.fabric->stats());
  };
  auto [a, sa] = run(3);
  auto [b, sb] = run(3);
  EXPECT_EQ(a, b);
  EXPECT_GT(sa.dropped, 60u);
  EXPECT_LT(sa.dropped, 140u);
  EXPECT_GT(sa.duplicated, 50u);
  EXPECT_GT(sa.reordered, 100u);
  EXPECT_EQ(a.size(), 500 - sa.dropped + sa.duplicated);
  bool out_of_order = false;
  for (size_t i = 1; i < a.size(); ++i)
    out_of_order |= std::stoi(a[i]) < std::stoi(a[i - 1]);
  EXPECT_TRUE(out_of_order);
  EXPECT_NE(a, run(4).first);
}

TEST(SimNetworkTest, TypeTargetedFaultsOnlyHitThatType) {
  Net net(2, "type=RESPONSE:drop=1");
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("req", wire::TEST_CALL)).ok());
    ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("resp", wire::RESPONSE)).ok());
  }
  net.scheduler.RunUntilIdle();
  EXPECT_EQ(net.observers[1].payloads, std::vector<std::string>(20, "req"));
}

TEST(SimNetworkTest, PartitionsOneWayAndHealing) {
  Net net(2, "partition=0>1@0..10ms,delay=0");
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("cut")).ok());
  ASSERT_TRUE(net.endpoints[1]->Send(0, Msg("back")).ok());
  net.scheduler.RunFor(absl::Milliseconds(20));
  ASSERT_TRUE(net.endpoints[0]->Send(1, Msg("healed")).ok());
  net.scheduler.RunUntilIdle();
  EXPECT_EQ(net.observers[1].payloads, std::vector<std::string>{"healed"});
  EXPECT_EQ(net.observers[0].payloads, std::vector<std::string>{"back"});
  EXPECT_EQ(net.fabric->stats().partitioned, 1u);
}

TEST(SimNetworkTest, LoopbackWorks) {
  Net net(1);
  ASSERT_TRUE(net.endpoints[0]->Send(0, Msg("me")).ok());
  net.scheduler.RunUntilIdle();
  EXPECT_EQ(net.observers[0].payloads, std::vector<std::string>{"me"});
}

}  // namespace
}  // namespace tether::sim
