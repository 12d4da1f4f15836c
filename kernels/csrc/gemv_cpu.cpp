// Small-batch bf16 linears for decode steps: y[M, N] = x[M, K] W^T (+ bias) for a few rows, on
// CPUs with AVX512-BF16 (server.models.linear's PackedLinear takes it up to small_m_rows(K) rows).
//
// Why: a decode step's linears read every weight once for a handful of rows, so they are bound
// by memory, and oneDNN spends ~15 us of fixed setup per call (attribute and memory-descriptor
// objects, primitive-cache lookup) on 121 calls a step of the default model. Here a call is one
// parallel loop over column blocks. Past a few rows the multiplies dominate and oneDNN's AMX
// kernels win (bench/results/linear_routes_small_m_2026-12-07.json).
//
// Layout (pack_small_m in linear.py): W as [N / 16][K / 2][16][2], i.e. for each block of 16
// output columns, K/2 rows of 64 bytes, each the pair (k, k+1) of the 16 columns: one zmm load
// is what VDPBF16PS multiplies with a broadcast pair of x. Each task streams its blocks once;
// up to 8 rows accumulate in registers per pass (a second pass for rows 9-16 re-reads the
// block from L1/L2, not memory). Every row's sums run in the same order whatever M is, so a
// row's output does not depend on the batch it came in.
//
// With AMX (amx_cpu.cpp) every call of up to 16 rows takes the tile multiply instead, for K a
// multiple of 32: it beats these passes from ~5 rows and matches them below (both are one pass
// over the weights), and one route for every M keeps a row's output independent of its batch.
//
// Numerics: VDPBF16PS multiplies bf16 pairs exactly and accumulates in float32 (denormal inputs
// and results flushed to zero); the bias is added in float32; one rounding to bf16 (to nearest,
// ties to even) at the end. tests/kernels/test_gemv_cpu.py bounds it against float64.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>

#include "ops.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kBlock = 16;  // output columns per block
constexpr int kMaxRows = 8;     // rows held in registers per pass

// R rows x B column blocks (B = 1 or 2) of one pass; w: the first block's [K/2][16][2] rows.
template <int R, int B>
inline void pass(const at::BFloat16* x, int64_t x_stride, const at::BFloat16* w, int64_t k_pairs,
                 const float* bias, at::BFloat16* y, int64_t y_stride) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t block_elems = k_pairs * 2 * kBlock;
  for (int64_t p = 0; p < k_pairs; ++p) {
    __m512bh wv[B];
    for (int b = 0; b < B; ++b)
      wv[b] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(w + b * block_elems + p * 2 * kBlock));
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * x_stride + 2 * p, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wv[b], xv);
    }
  }
  for (int b = 0; b < B; ++b) {
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + b * kBlock) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], bv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + b * kBlock), (__m256i)out);
    }
  }
}

template <int B>
void rows_pass(int64_t rows, const at::BFloat16* x, int64_t x_stride, const at::BFloat16* w, int64_t k_pairs,
               const float* bias, at::BFloat16* y, int64_t y_stride) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t n = std::min<int64_t>(kMaxRows, rows - r0);
    const at::BFloat16* xr = x + r0 * x_stride;
    at::BFloat16* yr = y + r0 * y_stride;
    switch (n) {
      case 1: pass<1, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      case 2: pass<2, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      case 3: pass<3, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      case 4: pass<4, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      case 5: pass<5, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      case 6: pass<6, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      case 7: pass<7, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
      default: pass<8, B>(xr, x_stride, w, k_pairs, bias, yr, y_stride); break;
    }
  }
}
#endif

}  // namespace

constexpr int64_t kPassesMaxRows = 4;   // past this, oneDNN's AMX kernels beat the passes
constexpr int64_t kTilesMaxRows = 16;   // the rows of one A tile

// Whether small_m_linear multiplies on AMX tiles for a K-wide input.
static bool takes_tiles(int64_t k) { return k % 32 == 0 && amx_linear_usable(); }

int64_t small_m_rows(int64_t k) {
  if (!small_m_linear_supported()) return 0;
  return takes_tiles(k) ? kTilesMaxRows : kPassesMaxRows;
}

bool small_m_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// y: [M, N] bf16 rows (contiguous within a row); x: [M, K] bf16 rows; w_packed: [N / 16, K / 2,
// 16, 2] bf16 (see the layout above); bias: [N] float32 or empty. `tiles`: AMX where it serves
// (M <= 16, see small_m_rows); false keeps the passes (so tests check both on an AMX machine).
void small_m_linear(torch::Tensor y, torch::Tensor x, torch::Tensor w_packed, torch::Tensor bias, bool tiles) {
  TORCH_CHECK(small_m_linear_supported(), "small_m_linear needs AVX512-BF16 (this build has none)");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1, "x, y: 2-D rows");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && y.scalar_type() == torch::kBFloat16 &&
                  w_packed.scalar_type() == torch::kBFloat16, "bf16 x, y and weight");
  TORCH_CHECK(w_packed.dim() == 4 && w_packed.is_contiguous() && w_packed.size(2) == 16 && w_packed.size(3) == 2,
              "w_packed: contiguous [N / 16, K / 2, 16, 2]");
  const int64_t rows = x.size(0), k_pairs = w_packed.size(1), blocks = w_packed.size(0);
  TORCH_CHECK(x.size(1) == 2 * k_pairs && y.size(0) == rows && y.size(1) == 16 * blocks, "shapes disagree");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == y.size(1)),
              "bias: [N] float32 or empty");
#if defined(__AVX512BF16__)
  if (rows == 0) return;
  if (tiles && rows <= kTilesMaxRows && takes_tiles(x.size(1))) {
    amx_linear(y, x, w_packed, has_bias ? bias.data_ptr<float>() : nullptr);
    return;
  }
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w_packed.data_ptr<at::BFloat16>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0), block_elems = k_pairs * 32;
  const int64_t pairs_of_blocks = (blocks + 1) / 2;  // tasks: two blocks each, the last may have one
  at::parallel_for(0, pairs_of_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = 2 * t;
      const float* bias_t = bp != nullptr ? bp + b0 * kBlock : nullptr;
      if (b0 + 1 < blocks) {
        rows_pass<2>(rows, xp, x_stride, wp + b0 * block_elems, k_pairs, bias_t, yp + b0 * kBlock, y_stride);
      } else {
        rows_pass<1>(rows, xp, x_stride, wp + b0 * block_elems, k_pairs, bias_t, yp + b0 * kBlock, y_stride);
      }
    }
  });
#endif
}
