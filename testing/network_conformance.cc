#include "testing/network_conformance.h"

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace tether::testing {

void PrintTo(const NetworkFactory& factory, std::ostream* os) { *os << factory.name; }

std::string NetworkFactoryName(const ::testing::TestParamInfo<NetworkFactory>& info) {
  return info.param.name;
}

namespace {

class WrappedHarness : public NetworkHarness {
 public:
  WrappedHarness(std::unique_ptr<NetworkHarness> inner, const NetworkWrapper& wrap)
      : inner_(std::move(inner)) {
    for (int i = 0; i < inner_->size(); ++i) wrappers_.push_back(wrap(*inner_, i));
  }
  ~WrappedHarness() override {
    wrappers_.clear();  // Before the networks they wrap.
    inner_.reset();
  }

  int size() const override { return inner_->size(); }
  Network* network(WorkerId id) override { return wrappers_[id].get(); }
  bool RunUntil(const std::function<bool()>& done, absl::Duration timeout) override {
    return inner_->RunUntil(done, timeout);
  }
  void Crash(WorkerId id) override { inner_->Crash(id); }
  Clock* clock(WorkerId id) override { return inner_->clock(id); }

 private:
  std::unique_ptr<NetworkHarness> inner_;
  std::vector<std::unique_ptr<Network>> wrappers_;
};

}  // namespace

NetworkFactory WrapNetworks(std::string name, NetworkFactory inner, NetworkWrapper wrap) {
  const bool delays_sends = inner.delays_sends;
  return NetworkFactory{
      std::move(name),
      [inner = std::move(inner), wrap = std::move(wrap)](int n) -> std::unique_ptr<NetworkHarness> {
        return std::make_unique<WrappedHarness>(inner.create(n), wrap);
      },
      delays_sends};
}

namespace {

constexpr absl::Duration kTimeout = absl::Seconds(60);

// Records everything delivered to one worker. Thread-safe.
class RecordingObserver : public NetworkObserver {
 public:
  void OnMessage(Message message) override {
    absl::MutexLock lock(&mu_);
    if (closed_) ++late_callbacks_;
    messages_.push_back(std::move(message));
  }
  void OnPeerFailed(WorkerId peer, const absl::Status& reason) override {
    absl::MutexLock lock(&mu_);
    if (closed_) ++late_callbacks_;
    failures_.emplace_back(peer, reason);
  }

  // Marks the point after which no callback may arrive (the network's Stop()
  // returned).
  void Close() {
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }
  int late_callbacks() {
    absl::MutexLock lock(&mu_);
    return late_callbacks_;
  }
  size_t message_count() {
    absl::MutexLock lock(&mu_);
    return messages_.size();
  }
  std::vector<Message> messages() {
    absl::MutexLock lock(&mu_);
    return messages_;
  }
  std::vector<std::pair<WorkerId, absl::Status>> failures() {
    absl::MutexLock lock(&mu_);
    return failures_;
  }
  int FailuresOf(WorkerId peer) {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const auto& f : failures_) n += f.first == peer;
    return n;
  }
  size_t MessagesFrom(WorkerId peer) {
    absl::MutexLock lock(&mu_);
    size_t n = 0;
    for (const Message& m : messages_) n += m.envelope.from() == peer;
    return n;
  }

 private:
  absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int late_callbacks_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Message> messages_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<WorkerId, absl::Status>> failures_ ABSL_GUARDED_BY(mu_);
};

uint8_t PatternByte(uint64_t seed, size_t buffer, size_t i) {
  return static_cast<uint8_t>(seed * 131 + buffer * 31 + i * 7 + (i >> 8));
}

Buffer PatternBuffer(uint64_t seed, size_t buffer, size_t size) {
  Buffer b = Buffer::Allocate(size);
  for (size_t i = 0; i < size; ++i) b.mutable_data()[i] = PatternByte(seed, buffer, i);
  return b;
}

// Returns "" if `b` holds the pattern, else a description of the first
// mismatch.
std::string CheckPattern(uint64_t seed, size_t buffer, const Buffer& b, size_t size) {
  if (b.size() != size)
    return absl::StrCat("buffer ", buffer, " has ", b.size(), " bytes, want ", size);
  for (size_t i = 0; i < size; ++i) {
    if (b.data()[i] != PatternByte(seed, buffer, i)) {
      return absl::StrCat("buffer ", buffer, " differs at byte ", i);
    }
  }
  return "";
}

Message MakeMessage(uint64_t seq, std::string payload = "", std::vector<Buffer> buffers = {}) {
  Message m;
  m.envelope.set_type(wire::TEST_CALL);
  m.envelope.set_request_id(seq);
  m.envelope.set_payload(payload.empty() ? absl::StrCat("m", seq) : std::move(payload));
  m.buffers = std::move(buffers);
  return m;
}

class Fixture {
 public:
  explicit Fixture(const NetworkFactory& factory, int n)
      : harness_(factory.create(n)), observers_(n) {
    for (auto& o : observers_) o = std::make_unique<RecordingObserver>();
  }
  ~Fixture() {
    for (int i = 0; i < size(); ++i) {
      if (!crashed_[i]) Stop(i);
    }
  }

  int size() const { return harness_->size(); }
  Network* net(WorkerId i) { return harness_->network(i); }
  RecordingObserver& obs(WorkerId i) { return *observers_[i]; }
  NetworkHarness& harness() { return *harness_; }

  void StartAll() {
    for (int i = 0; i < size(); ++i) ASSERT_TRUE(net(i)->Start(&obs(i)).ok());
  }
  void Stop(WorkerId i) {
    net(i)->Stop();
    obs(i).Close();
  }
  void Crash(WorkerId i) {
    crashed_[i] = true;
    harness_->Crash(i);
    obs(i).Close();
  }
  bool RunUntil(const std::function<bool()>& done) { return harness_->RunUntil(done, kTimeout); }

 private:
  std::unique_ptr<NetworkHarness> harness_;
  std::vector<std::unique_ptr<RecordingObserver>> observers_;
  std::map<int, bool> crashed_;
};

// Checks that `messages` from `from` carry request ids 0, 1, 2, ... in order (a
// prefix of what was sent when `complete` is false; exactly `count` messages
// otherwise).
void ExpectInOrderFrom(const std::vector<Message>& messages, WorkerId from, WorkerId to,
                       size_t count, bool complete) {
  uint64_t next = 0;
  for (const Message& m : messages) {
    if (m.envelope.from() != from) continue;
    ASSERT_EQ(m.envelope.request_id(), next) << "from " << from << " to " << to;
    EXPECT_EQ(m.envelope.to(), to);
    EXPECT_EQ(m.envelope.type(), wire::TEST_CALL);
    EXPECT_EQ(m.envelope.payload(), absl::StrCat("m", next));
    ++next;
  }
  if (complete) {
    EXPECT_EQ(next, count) << "from " << from << " to " << to;
  } else {
    EXPECT_LE(next, count) << "from " << from << " to " << to;
  }
}

TEST_P(NetworkConformanceTest, SelfIsTheWorkerId) {
  Fixture f(GetParam(), 3);
  for (int i = 0; i < f.size(); ++i) EXPECT_EQ(f.net(i)->self(), i);
}

TEST_P(NetworkConformanceTest, OrderingPerPair) {
  Fixture f(GetParam(), 3);
  f.StartAll();
  constexpr int kPerPair = 300;
  for (int seq = 0; seq < kPerPair; ++seq) {
    for (int from = 0; from < f.size(); ++from) {
      for (int to = 0; to < f.size(); ++to) {
        if (from == to) continue;
        ASSERT_TRUE(f.net(from)->Send(to, MakeMessage(seq)).ok());
      }
    }
  }
  const size_t expected = kPerPair * (f.size() - 1);
  ASSERT_TRUE(f.RunUntil([&] {
    for (int i = 0; i < f.size(); ++i) {
      if (f.obs(i).message_count() < expected) return false;
    }
    return true;
  }));
  for (int to = 0; to < f.size(); ++to) {
    std::vector<Message> got = f.obs(to).messages();
    EXPECT_EQ(got.size(), expected);
    for (int from = 0; from < f.size(); ++from) {
      if (from != to) ExpectInOrderFrom(got, from, to, kPerPair, /*complete=*/true);
    }
    EXPECT_TRUE(f.obs(to).failures().empty());
  }
}

TEST_P(NetworkConformanceTest, LargeAndManyBuffers) {
  Fixture f(GetParam(), 2);
  f.StartAll();
  // Sizes per message: no buffers; one empty; mixed; many small; one large.
  std::vector<std::vector<size_t>> shapes = {
      {}, {0}, {1, 0, 4096, 3, 70000}, std::vector<size_t>(300, 17), {24u << 20}};
  for (size_t k = 0; k < 40; ++k) shapes.push_back({k * 1000 + 1, k});
  for (size_t seq = 0; seq < shapes.size(); ++seq) {
    std::vector<Buffer> buffers;
    for (size_t b = 0; b < shapes[seq].size(); ++b) {
      buffers.push_back(PatternBuffer(seq, b, shapes[seq][b]));
    }
    std::string payload = seq == 4 ? std::string(1 << 20, 'p') : absl::StrCat("m", seq);
    ASSERT_TRUE(f.net(0)->Send(1, MakeMessage(seq, payload, std::move(buffers))).ok());
  }
  ASSERT_TRUE(f.RunUntil([&] { return f.obs(1).message_count() >= shapes.size(); }));
  std::vector<Message> got = f.obs(1).messages();
  ASSERT_EQ(got.size(), shapes.size());
  for (size_t seq = 0; seq < shapes.size(); ++seq) {
    const Message& m = got[seq];
    EXPECT_EQ(m.envelope.request_id(), seq);
    EXPECT_EQ(m.envelope.from(), 0);
    EXPECT_TRUE(m.CheckBuffers().ok()) << m.CheckBuffers();
    if (seq == 4) {
      EXPECT_EQ(m.envelope.payload(), std::string(1 << 20, 'p'));
    } else {
      EXPECT_EQ(m.envelope.payload(), absl::StrCat("m", seq));
    }
    ASSERT_EQ(m.buffers.size(), shapes[seq].size()) << "message " << seq;
    for (size_t b = 0; b < shapes[seq].size(); ++b) {
      EXPECT_EQ(CheckPattern(seq, b, m.buffers[b], shapes[seq][b]), "") << "message " << seq;
    }
  }
}

TEST_P(NetworkConformanceTest, ManyPeers) {
  Fixture f(GetParam(), 8);
  f.StartAll();
  constexpr int kPerPair = 5;
  for (int seq = 0; seq < kPerPair; ++seq) {
    for (int from = 0; from < f.size(); ++from) {
      for (int to = 0; to < f.size(); ++to) {
        if (from != to) {
          ASSERT_TRUE(
              f.net(from)->Send(to, MakeMessage(seq, "", {PatternBuffer(seq, 0, 100)})).ok());
        }
      }
    }
  }
  const size_t expected = kPerPair * (f.size() - 1);
  ASSERT_TRUE(f.RunUntil([&] {
    for (int i = 0; i < f.size(); ++i) {
      if (f.obs(i).message_count() < expected) return false;
    }
    return true;
  }));
  for (int to = 0; to < f.size(); ++to) {
    std::vector<Message> got = f.obs(to).messages();
    for (int from = 0; from < f.size(); ++from) {
      if (from != to) ExpectInOrderFrom(got, from, to, kPerPair, /*complete=*/true);
    }
  }
}

TEST_P(NetworkConformanceTest, CrashedPeerIsReportedOnceAndOnlyIt) {
  Fixture f(GetParam(), 3);
  f.StartAll();
  // Everyone talks to everyone first, so connections exist.
  for (int from = 0; from < 3; ++from) {
    for (int to = 0; to < 3; ++to) {
      if (from != to) ASSERT_TRUE(f.net(from)->Send(to, MakeMessage(0)).ok());
    }
  }
  ASSERT_TRUE(f.RunUntil([&] {
    return f.obs(0).message_count() == 2 && f.obs(1).message_count() == 2 &&
           f.obs(2).message_count() == 2;
  }));
  f.Crash(2);
  ASSERT_TRUE(f.RunUntil([&] { return f.obs(0).FailuresOf(2) > 0 && f.obs(1).FailuresOf(2) > 0; }));
  // Sends to the failed peer fail; the survivors still talk.
  for (int i = 0; i < 2; ++i) {
    absl::Status s = f.net(i)->Send(2, MakeMessage(1));
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  }
  ASSERT_TRUE(f.net(0)->Send(1, MakeMessage(1)).ok());
  ASSERT_TRUE(f.net(1)->Send(0, MakeMessage(1)).ok());
  ASSERT_TRUE(
      f.RunUntil([&] { return f.obs(0).MessagesFrom(1) == 2 && f.obs(1).MessagesFrom(0) == 2; }));
  for (int i = 0; i < 2; ++i) {
    auto failures = f.obs(i).failures();
    ASSERT_EQ(failures.size(), 1u) << "worker " << i;
    EXPECT_EQ(failures[0].first, 2);
    EXPECT_EQ(failures[0].second.code(), absl::StatusCode::kUnavailable) << failures[0].second;
  }
}

TEST_P(NetworkConformanceTest, StoppedPeerIsReported) {
  Fixture f(GetParam(), 3);
  f.StartAll();
  for (int from = 0; from < 3; ++from) {
    for (int to = 0; to < 3; ++to) {
      if (from != to) ASSERT_TRUE(f.net(from)->Send(to, MakeMessage(0)).ok());
    }
  }
  ASSERT_TRUE(f.RunUntil([&] {
    return f.obs(0).message_count() == 2 && f.obs(1).message_count() == 2 &&
           f.obs(2).message_count() == 2;
  }));
  f.Stop(2);
  ASSERT_TRUE(f.RunUntil([&] { return f.obs(0).FailuresOf(2) > 0 && f.obs(1).FailuresOf(2) > 0; }));
  ASSERT_TRUE(f.net(0)->Send(1, MakeMessage(1)).ok());
  ASSERT_TRUE(f.RunUntil([&] { return f.obs(1).MessagesFrom(0) == 2; }));
  EXPECT_EQ(f.obs(0).FailuresOf(2), 1);
  EXPECT_EQ(f.obs(1).FailuresOf(2), 1);
  EXPECT_EQ(f.obs(0).failures().size(), 1u);
  EXPECT_EQ(f.obs(1).failures().size(), 1u);
  EXPECT_EQ(f.obs(2).late_callbacks(), 0);
}

TEST_P(NetworkConformanceTest, SendToUnknownWorkerIsInvalidArgument) {
  Fixture f(GetParam(), 2);
  f.StartAll();
  for (WorkerId bad : {-1, 2, 1000}) {
    absl::Status s = f.net(0)->Send(bad, MakeMessage(0));
    if (GetParam().delays_sends && s.ok()) continue;  // Dropped when its delay ends.
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad << ": " << s;
  }
  // The network still works.
  ASSERT_TRUE(f.net(0)->Send(1, MakeMessage(0)).ok());
  ASSERT_TRUE(f.RunUntil([&] { return f.obs(1).message_count() == 1; }));
}

TEST_P(NetworkConformanceTest, SendAfterStopIsUnavailable) {
  Fixture f(GetParam(), 2);
  f.StartAll();
  f.Stop(0);
  absl::Status s = f.net(0)->Send(1, MakeMessage(0));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  f.Stop(0);  // Idempotent.
  EXPECT_EQ(f.obs(0).late_callbacks(), 0);
}

TEST_P(NetworkConformanceTest, StopWithTrafficInFlight) {
  Fixture f(GetParam(), 3);
  f.StartAll();
  constexpr int kCount = 2000;
  for (int seq = 0; seq < kCount; ++seq) {
    for (int from = 0; from < 3; ++from) {
      for (int to = 0; to < 3; ++to) {
        if (from != to) {
          f.net(from)->Send(to, MakeMessage(seq, "", {PatternBuffer(seq, 0, 512)})).IgnoreError();
        }
      }
    }
  }
  // Stop in the middle of the traffic, one worker after the other; none may
  // hang or call back after its Stop() returned, and what arrived is an
  // in-order prefix of what was sent.
  for (int i = 0; i < 3; ++i) f.Stop(i);
  for (int to = 0; to < 3; ++to) {
    EXPECT_EQ(f.obs(to).late_callbacks(), 0);
    std::vector<Message> got = f.obs(to).messages();
    for (int from = 0; from < 3; ++from) {
      if (from != to) ExpectInOrderFrom(got, from, to, kCount, /*complete=*/false);
    }
    for (const Message& m : got) {
      EXPECT_EQ(CheckPattern(m.envelope.request_id(), 0, m.buffers.at(0), 512), "");
    }
  }
}

}  // namespace
}  // namespace tether::testing
