// Small deterministic random number generators (identical on every platform and compiler,
// unlike std::normal_distribution).
#pragma once

#include <cmath>
#include <cstdint>

namespace strata::model {

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Standard normal samples (Box-Muller) from a counter-based stream keyed by (seed, stream).
class NormalRng {
 public:
  NormalRng(uint64_t seed, uint64_t stream) : key_(SplitMix64(seed ^ SplitMix64(stream + 1))) {}

  float Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = Uniform(), u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double a = 6.283185307179586 * u2;
    spare_ = static_cast<float>(r * std::sin(a));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(a));
  }

 private:
  // Uniform in (0, 1].
  double Uniform() {
    const uint64_t x = SplitMix64(key_ + counter_++);
    return (static_cast<double>(x >> 11) + 1.0) * (1.0 / 9007199254740992.0);
  }

  uint64_t key_;
  uint64_t counter_ = 0;
  float spare_ = 0.f;
  bool has_spare_ = false;
};

}  // namespace strata::model
