#include "sim/fault_spec.h"

#include <string>

#include "gtest/gtest.h"

namespace tether::sim {
namespace {

TEST(FaultSpecTest, NoneAndAll) {
  FaultSpec none = FaultSpec::Parse("none").value();
  EXPECT_FALSE(none.CanLose());
  EXPECT_EQ(none.ToString(), "none");
  FaultSpec all = FaultSpec::Parse(" all ").value();
  EXPECT_TRUE(all.all);
  EXPECT_TRUE(all.CanLose());
  EXPECT_EQ(all.ToString(), "all");
}

TEST(FaultSpecTest, ParsesEveryKeyAndRoundTrips) {
  const std::string text =
      "drop=0.05,delay=0..50ms,dup=0.02,reorder=0.1,partition=0+1-2@100ms.."
      "300ms,"
      "partition=2>0@1s..,crash=1@200ms..500ms,crash=2@1s,skew=20ms,drift=0."
      "001,"
      "type=RREF_USER_DELETE:drop=0.5,type=TEST_CALL:delay=exp:5ms";
  absl::StatusOr<FaultSpec> spec = FaultSpec::Parse(text);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(*spec->link.drop, 0.05);
  EXPECT_EQ(spec->link.delay->hi, absl::Milliseconds(50));
  ASSERT_EQ(spec->partitions.size(), 2u);
  EXPECT_EQ(spec->partitions[0].left, (std::vector<int32_t>{0, 1}));
  EXPECT_FALSE(spec->partitions[0].one_way);
  EXPECT_TRUE(spec->partitions[1].one_way);
  EXPECT_EQ(spec->partitions[1].end, absl::InfiniteDuration());
  ASSERT_EQ(spec->crashes.size(), 2u);
  EXPECT_EQ(*spec->crashes[0].restart_at, absl::Milliseconds(500));
  EXPECT_FALSE(spec->crashes[1].restart_at.has_value());
  EXPECT_EQ(*spec->by_type.at(wire::RREF_USER_DELETE).drop, 0.5);
  EXPECT_EQ(spec->by_type.at(wire::TEST_CALL).delay->kind,
            DelayDist::Kind::kExponential);
  EXPECT_TRUE(spec->CanLose());
  absl::StatusOr<FaultSpec> again = FaultSpec::Parse(spec->ToString());
  ASSERT_TRUE(again.ok()) << again.status() << " for " << spec->ToString();
  EXPECT_EQ(again->ToString(), spec->ToString());
  EXPECT_TRUE(spec->Validate(3).ok());
  EXPECT_FALSE(spec->Validate(2).ok());
}

TEST(FaultSpecTest, DupAndReorderAloneCannotLose) {
  EXPECT_FALSE(
      FaultSpec::Parse("dup=0.5,reorder=0.5,delay=exp:1ms").value().CanLose());
  EXPECT_TRUE(FaultSpec::Parse("type=RESPONSE:drop=0.1").value().CanLose());
}

TEST(FaultSpecTest, ErrorsNameTheBadToken) {
  const char* bad[] = {"",
                       "drop=2",
                       "drop=x",
                       "delay=5",
                       "delay=50ms..10ms",
                       "partition=0",
                       "partition=0-0",
                       "partition=0-1@5ms..1ms",
                       "crash=a@1s",
                       "crash=1@2s..1s",
                       "type=NOPE:drop=0.1",
                       "type=TEST_CALL:speed=1",
                       "type=TEST_CALL",
                       "frobnicate=1",
                       "drop=0.1,all",
                       "drift=0.9"};
  for (const char* text : bad) {
    absl::StatusOr<FaultSpec> spec = FaultSpec::Parse(text);
    ASSERT_FALSE(spec.ok()) << text;
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << text;
    if (*text != '\0') {
      // The offending token (the last one in these examples) is quoted.
      std::string last(text);
      last = last.substr(
          last.rfind(',') == std::string::npos ? 0 : last.rfind(',') + 1);
      EXPECT_NE(spec.status().message().find("'" + last + "'"),
                std::string::npos)
          << spec.status();
    }
  }
}

TEST(FaultSpecTest, PartitionWindowsAndDirection) {
  PartitionSpec p =
      FaultSpec::Parse("partition=0>1@10ms..20ms").value().partitions[0];
  EXPECT_FALSE(p.Cuts(0, 1, absl::Milliseconds(5)));
  EXPECT_TRUE(p.Cuts(0, 1, absl::Milliseconds(10)));
  EXPECT_FALSE(p.Cuts(1, 0, absl::Milliseconds(15)));
  EXPECT_FALSE(p.Cuts(0, 1, absl::Milliseconds(20)));
  PartitionSpec q = FaultSpec::Parse("partition=0-1+2").value().partitions[0];
  EXPECT_TRUE(q.Cuts(2, 0, absl::Hours(5)));
  EXPECT_FALSE(q.Cuts(1, 2, absl::Hours(5)));
}

TEST(FaultSpecTest, ResolveIsDeterministicAndConcrete) {
  FaultSpec all = FaultSpec::Parse("all").value();
  bool some_crash = false, some_partition = false;
  for (uint64_t seed = 1; seed <= 50; ++seed) {
    Prng a(seed), b(seed);
    FaultPlan p = ResolveFaults(all, 4, a);
    FaultPlan q = ResolveFaults(all, 4, b);
    EXPECT_EQ(p.ToString(), q.ToString());
    ASSERT_TRUE(p.link.drop && p.link.dup && p.link.reorder && p.link.delay);
    EXPECT_EQ(p.clock_rate.size(), 4u);
    EXPECT_TRUE(p.spec.Validate(4).ok());
    some_crash |= !p.spec.crashes.empty();
    some_partition |= !p.spec.partitions.empty();
    // The resolved plan is itself a valid spec.
    EXPECT_TRUE(
        FaultSpec::Parse(p.ToString().empty() ? "none" : p.ToString()).ok())
        << p.ToString();
  }
  EXPECT_TRUE(some_crash);
  EXPECT_TRUE(some_partition);
}

TEST(FaultSpecTest, DelaySamplesStayInBounds) {
  Prng rng(1);
  DelayDist u = FaultSpec::Parse("delay=1ms..3ms").value().link.delay.value();
  DelayDist e = FaultSpec::Parse("delay=exp:2ms").value().link.delay.value();
  for (int i = 0; i < 1000; ++i) {
    absl::Duration d = u.Sample(rng);
    EXPECT_GE(d, absl::Milliseconds(1));
    EXPECT_LE(d, absl::Milliseconds(3));
    absl::Duration x = e.Sample(rng);
    EXPECT_GE(x, absl::ZeroDuration());
    EXPECT_LE(x, e.Max());
  }
}

}  // namespace
}  // namespace tether::sim
