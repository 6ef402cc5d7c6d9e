#include "sim/random.h"

#include <set>

#include "gtest/gtest.h"

namespace tether::sim {
namespace {

TEST(PrngTest, SameSeedSameStream) {
  Prng a(42), b(42), c(43);
  bool differs = false;
  for (int i = 0; i < 100; ++i) {
    const uint64_t x = a.Next();
    EXPECT_EQ(x, b.Next());
    differs |= x != c.Next();
  }
  EXPECT_TRUE(differs);
}

TEST(PrngTest, ForksAreIndependentAndStable) {
  Prng root(7);
  Prng f1 = root.Fork(1), f1b = root.Fork(1), f2 = root.Fork(2);
  EXPECT_EQ(f1.Next(), f1b.Next());
  EXPECT_NE(Prng(7).Fork(1).Next(), f2.Next());
}

TEST(PrngTest, UniformStaysInRangeAndCoversIt) {
  Prng rng(1);
  std::set<uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    const uint64_t x = rng.Uniform(7);
    ASSERT_LT(x, 7u);
    seen.insert(x);
    const int64_t y = rng.UniformInt(-3, 3);
    ASSERT_GE(y, -3);
    ASSERT_LE(y, 3);
    const double d = rng.UniformDouble();
    ASSERT_GE(d, 0.0);
    ASSERT_LT(d, 1.0);
  }
  EXPECT_EQ(seen.size(), 7u);
  EXPECT_EQ(rng.Uniform(0), 0u);
}

TEST(PrngTest, BernoulliFrequencyAndExtremes) {
  Prng rng(3);
  int hits = 0;
  for (int i = 0; i < 10000; ++i) hits += rng.Bernoulli(0.25) ? 1 : 0;
  EXPECT_GT(hits, 2200);
  EXPECT_LT(hits, 2800);
  EXPECT_FALSE(rng.Bernoulli(0));
  EXPECT_TRUE(rng.Bernoulli(1));
}

}  // namespace
}  // namespace tether::sim
