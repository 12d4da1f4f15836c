// Helpers shared by our CPU kernels: 16-bit <-> float32 conversions, an exp that vectorizes, and
// a prefetch of a run of elements.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace alignserve {

// Asks for the cache lines of n elements from p on (decode attention's next rows, BGMV's next tile).
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(bytes + off);
}

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
namespace exp_consts {
constexpr float kLo = -87.3f, kHi = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: (x + it) - it rounds x to an integer
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_consts

inline float exp_vec(float x) {
  using namespace exp_consts;
  x = x < kLo ? kLo : x;
  x = x > kHi ? kHi : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: std::floor would not vectorize (it may raise
  // the inexact exception, which only -ffast-math lets GCC ignore).
  const float n = (x * kLog2e + kRound) - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kPoly[0];
  p = p * r + kPoly[1];  // written out, not looped: this runs inside callers' simd loops
  p = p * r + kPoly[2];
  p = p * r + kPoly[3];
  p = p * r + kPoly[4];
  p = p * r + kPoly[5];
  p = p * r * r + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(scale);
}

#if defined(__AVX512F__)
// exp_vec on sixteen lanes, for loops GCC would not vectorize well (masked, 16-wide rows). The
// clamps put x second: AVX-512 max/min return their second operand when one is NaN.
inline __m512 exp16(__m512 x) {
  using namespace exp_consts;
  x = _mm512_max_ps(_mm512_set1_ps(kLo), x);
  x = _mm512_min_ps(_mm512_set1_ps(kHi), x);
  const __m512 round = _mm512_set1_ps(kRound);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), round), round);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}
#endif

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
