// Graceful shutdown of agents over TCP, each worker with its own thread pool
// and system clock, as in real runs.
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "core/agent.h"
#include "gtest/gtest.h"
#include "transport/system_clock.h"
#include "transport/tcp_network.h"
#include "transport/thread_pool.h"

namespace tether {
namespace {

// Forwards to a network; after sending a SHUTDOWN_ACK, holds the sending pool
// thread for `hold` (as a loaded machine may preempt it there).
class SlowAckNetwork : public Network {
 public:
  SlowAckNetwork(Network* inner, absl::Duration hold)
      : inner_(inner), hold_(hold) {}
  WorkerId self() const override { return inner_->self(); }
  absl::Status Start(NetworkObserver* observer) override {
    return inner_->Start(observer);
  }
  absl::Status Send(WorkerId to, Message message) override {
    const bool ack = message.envelope.type() == wire::SHUTDOWN_ACK;
    absl::Status s = inner_->Send(to, std::move(message));
    if (ack) absl::SleepFor(hold_);
    return s;
  }
  void Stop() override { inner_->Stop(); }

 private:
  Network* const inner_;
  const absl::Duration hold_;
};

// Two workers: start, call each other, shut down gracefully. Returns each
// worker's shutdown result.
std::vector<absl::Status> CallThenShutDown(absl::Duration ack_hold) {
  constexpr int kWorkers = 2;
  std::vector<std::unique_ptr<TcpNetwork>> tcp;
  for (int i = 0; i < kWorkers; ++i) {
    TcpNetworkOptions o;
    o.self = i;
    tcp.push_back(TcpNetwork::Listen(o).value());
  }
  for (int i = 0; i < kWorkers; ++i) {
    std::map<WorkerId, std::string> peers;
    for (int j = 0; j < kWorkers; ++j) {
      if (j != i) peers[j] = tcp[j]->listen_address();
    }
    EXPECT_TRUE(tcp[i]->SetPeers(peers).ok());
  }
  std::vector<std::unique_ptr<Network>> views;
  std::vector<std::unique_ptr<ThreadPool>> pools;
  std::vector<std::unique_ptr<SystemClock>> clocks;
  std::vector<std::unique_ptr<Agent>> agents;
  for (int i = 0; i < kWorkers; ++i) {
    views.push_back(std::make_unique<SlowAckNetwork>(tcp[i].get(), ack_hold));
    pools.push_back(std::make_unique<ThreadPool>(4));
    clocks.push_back(std::make_unique<SystemClock>());
    AgentOptions o;
    o.self = i;
    o.workers = {{"worker0", 0}, {"worker1", 1}};
    o.shutdown_timeout = absl::ZeroDuration();  // As tether.rpc sets it.
    agents.push_back(
        Agent::Create(o, clocks[i].get(), views[i].get(), pools[i].get())
            .value());
    agents[i]->RegisterHandler(wire::TEST_CALL,
                               [](std::shared_ptr<IncomingCall> c) {
                                 c->Reply(c->request().envelope.payload(), {});
                               });
    EXPECT_TRUE(agents[i]->Start().ok());
  }
  for (int i = 0; i < kWorkers; ++i) {
    auto reply =
        agents[i]->Call((i + 1) % kWorkers, wire::TEST_CALL, "ping", {});
    EXPECT_TRUE(reply.WaitFor(absl::Seconds(30)));
    EXPECT_TRUE(reply.result().ok()) << reply.result().status();
  }
  std::vector<Future<Unit>> done;
  for (auto& a : agents) done.push_back(a->Shutdown(true));
  std::vector<absl::Status> results;
  for (auto& d : done) {
    if (!d.WaitFor(absl::Seconds(30))) {
      results.push_back(absl::DeadlineExceededError("shutdown hung"));
    } else {
      results.push_back(d.result().status());
    }
  }
  // Tasks still queued may use the agents: drain the pools first.
  for (auto& p : pools) p->Shutdown(ThreadPool::kDrain);
  agents.clear();
  return results;
}

TEST(AgentTcpShutdownTest, GracefulShutdownSucceeds) {
  for (int run = 0; run < 10; ++run) {
    for (const absl::Status& s : CallThenShutDown(absl::ZeroDuration()))
      EXPECT_TRUE(s.ok()) << "run " << run << ": " << s;
  }
}

// The leader stops as soon as it has the follower's ack, and the follower's
// transport reports it (goodbye, then close) while the follower's thread that
// sent the ack has not finished the commit yet: another pool thread handles
// the report. The shutdown was clean all the same.
TEST(AgentTcpShutdownTest, LeaderStoppingRightAfterTheAckIsNotAFailure) {
  for (int run = 0; run < 3; ++run) {
    for (const absl::Status& s : CallThenShutDown(absl::Milliseconds(300)))
      EXPECT_TRUE(s.ok()) << "run " << run << ": " << s;
  }
}

}  // namespace
}  // namespace tether
