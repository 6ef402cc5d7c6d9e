// Prng: the simulator's own seeded pseudo-random generator (xoshiro256**,
// seeded through splitmix64). Everything random in a simulation draws from a
// Prng derived from the run's one seed, so a seed replays exactly; nothing in
// sim/ uses std::random_device or global state.
//
//   Prng rng(seed);
//   Prng faults = rng.Fork(/*stream=*/2);   // an independent stream, same seed
//   if (rng.Bernoulli(0.05)) ...;  rng.Uniform(10);  rng.UniformInt(-3, 3);
//
// Not thread-safe: each user owns its Prng.
#ifndef TETHER_SIM_RANDOM_H_
#define TETHER_SIM_RANDOM_H_

#include <cstdint>

namespace tether::sim {

// One step of splitmix64: advances `state` and returns a well-mixed 64-bit
// value.
inline uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// A strong 64-bit mixer (the splitmix64 finalizer), for hashing.
inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

class Prng {
 public:
  explicit Prng(uint64_t seed) {
    uint64_t sm = seed;
    for (uint64_t& word : s_) word = SplitMix64(&sm);
  }

  // A generator for an independent stream derived from this one's seed
  // material.
  Prng Fork(uint64_t stream) const {
    return Prng(Mix64(s_[0] ^ Mix64(stream + 0x632be59bd9b4e019ULL)) ^ s_[2]);
  }

  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }

  // Uniform in [0, n). n == 0 returns 0.
  uint64_t Uniform(uint64_t n) {
    if (n == 0) return 0;
    // Lemire's multiply-shift with rejection: unbiased.
    unsigned __int128 m = static_cast<unsigned __int128>(Next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(Next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

  // Uniform in [lo, hi] (inclusive). Requires lo <= hi.
  int64_t UniformInt(int64_t lo, int64_t hi) {
    return lo +
           static_cast<int64_t>(Uniform(static_cast<uint64_t>(hi - lo) + 1));
  }

  // Uniform in [0, 1).
  double UniformDouble() {
    return static_cast<double>(Next() >> 11) * 0x1.0p-53;
  }

  // True with probability p (p <= 0: never; p >= 1: always, without drawing).
  bool Bernoulli(double p) {
    if (p <= 0) return false;
    if (p >= 1) return true;
    return UniformDouble() < p;
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

}  // namespace tether::sim

#endif  // TETHER_SIM_RANDOM_H_
