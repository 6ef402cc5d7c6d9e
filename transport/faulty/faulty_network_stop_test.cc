// FaultyNetwork's Stop() against its delayed sends on a real clock: Stop() waits for one that is
// running, none runs after it returns, and the object may be freed while the clock still holds
// timers (run it under --config=tsan and --config=asan too).
#include <atomic>
#include <memory>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "transport/faulty/faulty_network.h"
#include "transport/system_clock.h"

namespace tether {
namespace {

// An inner network that counts sends, can hold them inside Send(), and counts every send that
// overlaps or follows its Stop() (which FaultyNetwork::Stop() calls last).
class InnerNetwork : public Network {
 public:
  WorkerId self() const override { return 0; }
  absl::Status Start(NetworkObserver*) override { return absl::OkStatus(); }
  absl::Status Send(WorkerId, Message) override {
    absl::Duration spin;
    {
      absl::MutexLock lock(&mu_);
      if (stopped_) ++late_;
      ++entered_;
      ++active_;
      mu_.Await(absl::Condition(
          +[](bool* held) { return !*held; }, &held_));
      spin = spin_;
    }
    if (spin > absl::ZeroDuration()) absl::SleepFor(spin);
    absl::MutexLock lock(&mu_);
    --active_;
    return absl::OkStatus();
  }
  void Stop() override {
    absl::MutexLock lock(&mu_);
    stopped_ = true;
    if (active_ > 0) ++late_;
  }

  void Hold(bool held) {
    absl::MutexLock lock(&mu_);
    held_ = held;
  }
  void SpinInSend(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    spin_ = d;
  }
  void AwaitEntered(int n) {
    absl::MutexLock lock(&mu_);
    struct Arg {
      InnerNetwork* self;
      int n;
    } arg{this, n};
    mu_.Await(absl::Condition(
        +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->self->entered_ >= a->n; }, &arg));
  }
  int entered() {
    absl::MutexLock lock(&mu_);
    return entered_;
  }
  int late() {
    absl::MutexLock lock(&mu_);
    return late_;
  }

 private:
  absl::Mutex mu_;
  bool held_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration spin_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
  int active_ ABSL_GUARDED_BY(mu_) = 0;
  int late_ ABSL_GUARDED_BY(mu_) = 0;
};

class NullObserver : public NetworkObserver {
 public:
  void OnMessage(Message) override {}
  void OnPeerFailed(WorkerId, const absl::Status&) override {}
};

Message TestCall(uint64_t seq) {
  Message m;
  m.envelope.set_type(wire::TEST_CALL);
  m.envelope.set_request_id(seq);
  return m;
}

FaultyNetworkOptions DelayTestCalls(absl::Duration d) {
  FaultyNetworkOptions o;
  o.delays[wire::TEST_CALL] = d;
  return o;
}

TEST(FaultyNetworkStopTest, StopWaitsForADelayedSendThatIsRunning) {
  SystemClock clock;
  InnerNetwork inner;
  NullObserver observer;
  auto faulty =
      std::make_unique<FaultyNetwork>(&inner, &clock, DelayTestCalls(absl::Milliseconds(1)));
  ASSERT_TRUE(faulty->Start(&observer).ok());
  inner.Hold(true);
  ASSERT_TRUE(faulty->Send(1, TestCall(0)).ok());
  inner.AwaitEntered(1);  // The timer thread is inside the inner Send, held there.

  std::atomic<bool> stop_returned{false};
  std::thread stopper([&] {
    faulty->Stop();
    stop_returned = true;
  });
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_FALSE(stop_returned) << "Stop() returned while a delayed send was still running";
  inner.Hold(false);
  stopper.join();
  EXPECT_TRUE(stop_returned);
  EXPECT_EQ(inner.late(), 0) << "a delayed send overlapped the inner network's Stop()";
  faulty.reset();
  EXPECT_EQ(inner.entered(), 1);
}

TEST(FaultyNetworkStopTest, StopAndFreeWhileDelayedSendsFire) {
  SystemClock clock;
  NullObserver observer;
  for (int round = 0; round < 30; ++round) {
    InnerNetwork inner;
    inner.SpinInSend(absl::Microseconds(20));
    auto faulty =
        std::make_unique<FaultyNetwork>(&inner, &clock, DelayTestCalls(absl::Microseconds(300)));
    ASSERT_TRUE(faulty->Start(&observer).ok());
    for (int i = 0; i < 200; ++i) {
      ASSERT_TRUE(faulty->Send(1, TestCall(i)).ok());
      if (i % 20 == 0) absl::SleepFor(absl::Microseconds(50));
    }
    absl::SleepFor(absl::Microseconds(100 * (round % 10)));
    faulty->Stop();
    const int sent = inner.entered();
    faulty.reset();  // The clock may still hold a timer it took off its queue.
    absl::SleepFor(absl::Milliseconds(2));
    EXPECT_EQ(inner.entered(), sent) << "a delayed send ran after Stop() returned";
    ASSERT_EQ(inner.late(), 0) << "round " << round;
  }
}

}  // namespace
}  // namespace tether
