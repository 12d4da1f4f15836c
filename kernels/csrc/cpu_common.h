// Helpers shared by our CPU kernels: 16-bit <-> float32 conversions and an exp that vectorizes.
//
// Why our own: inside `#pragma omp simd` loops GCC vectorizes plain arithmetic and bit
// operations, but not calls to libm's expf (without -ffast-math) nor c10's BFloat16
// constructor, so each of those would run one lane at a time.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace alignserve {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Loads widen to float32, stores round to the element type (to nearest, ties to even: what a
// torch op does when it writes its float32 result).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const at::BFloat16* p, int64_t i) {
  return bits_to_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
inline float load(const at::Half* p, int64_t i) { return static_cast<float>(p[i]); }

inline void store(float* p, int64_t i, float v) { p[i] = v; }
// bf16 bits of a finite float32 (bit pattern u), rounded to nearest, ties to even.
inline uint32_t bf16_bits_of_finite(uint32_t u) { return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; }
inline void store(at::BFloat16* p, int64_t i, float v) {
  const uint32_t u = float_to_bits(v);
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(is_nan ? 0x7fc0u : bf16_bits_of_finite(u));
}
inline void store(at::Half* p, int64_t i, float v) { p[i] = static_cast<at::Half>(v); }

// exp(x) to about 2 ulp of float32 (after Cephes' expf: x = n ln2 + r with ln2 split in two, a
// degree-7 polynomial for e^r, 2^n built in the exponent bits). Inputs are clamped to
// [-87.3, 88]: below, the result is 1.2e-38 instead of a denormal or 0 (softmax and SiLU do
// not notice); above, it would overflow the exponent trick. NaN stays NaN (comparisons, not
// fmin/fmax, which would drop it: a poisoned input must show in the output).
inline float exp_vec(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: std::floor would not vectorize (it may raise
  // the inexact exception, which only -ffast-math lets GCC ignore).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(scale);
}

}  // namespace alignserve

namespace alignserve {

// Calls fn(T{}) with T the element type of `dtype`: float32, bf16 or fp16 (float64 runs the
// torch twins: their oracle tests compare in it).
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, op, ": float32, bfloat16 or float16 only (float64 runs the torch twin)");
  }
}

}  // namespace alignserve
