// Vectorisable exp and tanh for the kernels' inner loops (glibc's expf/tanhf are scalar calls
// and stop the compiler from vectorising a loop).
//
// FastExp: Cody-Waite range reduction and Cephes' degree-6 polynomial, ~2 ulp relative error on
// [-87, 88]; inputs outside are clamped (exp(-inf) -> ~0, never NaN for finite input).
// FastTanh: from FastExp, absolute error < 2e-7.
#pragma once

#include <bit>
#include <cstdint>

namespace strata::model {

inline float FastExp(float x) {
  // Written without branches or calls so that loops using it vectorise.
  // (Ternaries, not std::min/max: GCC if-converts these, not the reference-returning forms.)
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (a select-free rint; |x / ln2| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline float FastTanh(float u) {
  u = u < -9.f ? -9.f : u;  // tanh(9) = 1 - 3e-8
  u = u > 9.f ? 9.f : u;
  const float e = FastExp(2.f * u);
  return (e - 1.f) / (e + 1.f);
}

}  // namespace strata::model
