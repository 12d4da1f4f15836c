// Gathered multi-LoRA (BGMV) on CPU: for each gathered row r with adapter slot s,
// y[r] += scale[s] * (x[r] @ A[s, :rank]^T) @ B[s, :rank].
//
// Why: the torch route is ~8 ops per adapted projection (gather A's ranks, bmm, scale, index
// arithmetic, an embedding_bag over B, widen y, add, round back), 7 projections x 30 layers a
// step; at decode sizes the dispatches were the cost (45.0 vs 12.9 ms a step here at 16 rows on 16
// rank-8 adapters, SmolLM2-135M shapes, AMX Xeon: bench/results/lora_cpu_step_2026-12-06.*).
// Here one pass per tile of rows sharing a slot (up to kTileRows): A and B are read in their
// storage dtype (so 16-bit stacks halve the bytes read) and widened in registers, or, for bf16
// rows and stacks on AVX512-BF16, the shrink multiplies bf16 pairs as they are (VDPBF16PS);
// float32 accumulation, one rounding into y; a row's sums run as they would alone.
// kernels/lora.py holds the torch twin and the routing.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using alignserve::dispatch_float_types;
using alignserve::load;
using alignserve::prefetch_row;
using alignserve::store;

// 16 float32 lanes as a GCC vector type: one zmm register on AVX-512, two ymm on AVX2 (GCC
// splits it), so one source serves both. Plain `omp simd` loops ran at ~17 GFLOP/s a core here:
// each shrink dot product was one accumulator's chain of dependent FMAs, and the expand read and
// wrote its float32 accumulator row once per rank. Below, four ranks share each x load with four
// independent accumulators, and each 16-wide chunk of the output sums all ranks in a register.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const at::BFloat16* p) {  // bf16 is float32's top half: widen, shift up
#if defined(__AVX512F__)
  // GCC splits the generic widening below into two 256-bit halves (its preferred width on these
  // CPUs), three times the instructions of this one 512-bit widen-and-shift.
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (f32x16)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
  u16x16 bits;
  std::memcpy(&bits, p, sizeof bits);
  return (f32x16)(__builtin_convertvector(bits, u32x16) << 16);  // a same-size vector cast: the bits as they are
#endif
}
inline f32x16 load16(const at::Half* p) {
  f32x16 v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = load(p, l);
  return v;
}
inline float sum16(f32x16 v) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Rows of one slot taken together: each weight vector loaded (and widened) once serves all of
// them. A prefill chunk's rows share their adapter: one row at a time, its A and B were re-read
// and re-widened per row, ~40 GFLOP/s on two cores (1024 rows of one rank-8 adapter: 113 ms a
// step, bench/results/lora_cpu_step_2026-12-06.*). Decode rows of distinct adapters are tiles of one.
constexpr int64_t kTileRows = 4;

// shrunk[r][k] = scale * x_r . A[k] for R rows and `kRanks` consecutive ranks (A rank-major: a
// row per rank); shrunk rows are `rank` apart. Each row's sums run as they would alone.
template <int64_t R, int64_t kRanks, typename W>
void shrink_ranks(const float* x, const W* a, int64_t in, float scale, float* shrunk, int64_t rank) {
  f32x16 acc[R][kRanks] = {};
  const int64_t vec_end = in - in % kLanes;
  for (int64_t i = 0; i < vec_end; i += kLanes) {
    f32x16 xv[R];
    for (int64_t r = 0; r < R; ++r) xv[r] = load16(x + r * in + i);
    for (int64_t k = 0; k < kRanks; ++k) {
      const f32x16 av = load16(a + k * in + i);
      for (int64_t r = 0; r < R; ++r) acc[r][k] += xv[r] * av;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < kRanks; ++k) {
      float s = sum16(acc[r][k]);
      for (int64_t i = vec_end; i < in; ++i) s += x[r * in + i] * load(a + k * in, i);
      shrunk[r * rank + k] = s * scale;
    }
  }
}

#if defined(__AVX512BF16__)
// shrink_ranks for bf16 rows and bf16 A on VDPBF16PS: a pair of bf16 products per lane and
// instruction straight from memory, where the float32 route loads, widens (two instructions)
// and multiplies 16 elements at a time; the shrink is about half a step's LoRA arithmetic. The
// sums run in another order than the float32 route's (lanes take pairs, 32 elements a pass;
// inputs and results below float's normal range count as zero), the same for a row in a tile as
// alone. 16 adapters x 1 row, cold caches, a step of SmolLM2-135M's shapes:
// bench/results/lora_cpu_step_cold_dpbf16_*.
template <int64_t R, int64_t kRanks>
void shrink_ranks_bf16(const at::BFloat16* const* x, const at::BFloat16* a, int64_t in, float scale, float* shrunk,
                       int64_t rank) {
  constexpr int64_t kPair = 2 * kLanes;
  __m512 acc[R][kRanks];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < kRanks; ++k) acc[r][k] = _mm512_setzero_ps();
  const int64_t vec_end = in - in % kPair;
  for (int64_t i = 0; i < vec_end; i += kPair) {
    __m512bh xv[R];
    for (int64_t r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(x[r] + i);
    for (int64_t k = 0; k < kRanks; ++k) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + k * in + i);
      for (int64_t r = 0; r < R; ++r) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], xv[r], av);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < kRanks; ++k) {
      float s = _mm512_reduce_add_ps(acc[r][k]);
      for (int64_t i = vec_end; i < in; ++i) s += load(x[r], i) * load(a + k * in, i);
      shrunk[r * rank + k] = s * scale;
    }
  }
}
#endif

// shrunk[r][:rank] for R rows of one slot: VDPBF16PS where rows and A are bf16 and the CPU has
// it, else the float32 route over rows widened into x_wide ([R][in] scratch).
template <int64_t R, typename X, typename W>
void shrink_rows(const X* const* x, const W* a, int64_t in, int64_t rank, float scale, float* x_wide, float* shrunk) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<X, at::BFloat16> && std::is_same_v<W, at::BFloat16>) {
    int64_t k = 0;
    for (; k + 4 <= rank; k += 4) shrink_ranks_bf16<R, 4>(x, a + k * in, in, scale, shrunk + k, rank);
    for (; k < rank; ++k) shrink_ranks_bf16<R, 1>(x, a + k * in, in, scale, shrunk + k, rank);
    return;
  }
#endif
  // Row pointers copied out of the array first: with -fno-strict-aliasing every store could
  // change x[r] as far as GCC knows, so loops reading it in place stay scalar.
  for (int64_t r = 0; r < R; ++r) {
    const X* xr = x[r];
    float* xw = x_wide + r * in;
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) xw[i] = load(xr, i);
  }
  int64_t k = 0;
  for (; k + 4 <= rank; k += 4) shrink_ranks<R, 4>(x_wide, a + k * in, in, scale, shrunk + k, rank);
  for (; k < rank; ++k) shrink_ranks<R, 1>(x_wide, a + k * in, in, scale, shrunk + k, rank);
}

// R rows of one slot: y_r += (scale * x_r @ A[:rank]^T) @ B[:rank], in float32, one rounding
// into y. x_wide: [R][in], shrunk: [R][rank] scratch.
template <int64_t R, typename X, typename W>
void bgmv_tile(const X* const* x, X* const* y, const W* a, const W* b, int64_t in, int64_t out, int64_t rank,
               float scale, float* x_wide, float* shrunk) {
  shrink_rows<R>(x, a, in, rank, scale, x_wide, shrunk);
  const int64_t vec_end = out - out % kLanes;
  for (int64_t o = 0; o < vec_end; o += kLanes) {
    f32x16 acc[R] = {};
    for (int64_t q = 0; q < rank; ++q) {
      const f32x16 bv = load16(b + q * out + o);
      for (int64_t r = 0; r < R; ++r) acc[r] += shrunk[r * rank + q] * bv;
    }
    for (int64_t r = 0; r < R; ++r) {
      float delta[kLanes];
      std::memcpy(delta, &acc[r], sizeof delta);
      X* yr = y[r] + o;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) store(yr, l, load(yr, l) + delta[l]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    X* yr = y[r];
    for (int64_t o = vec_end; o < out; ++o) {
      float acc = 0.f;
      for (int64_t q = 0; q < rank; ++q) acc += shrunk[r * rank + q] * load(b + q * out, o);
      store(yr, o, load(yr, o) + acc);
    }
  }
}

template <typename X, typename W>
void bgmv_rows(X* y, int64_t y_stride, const X* x, int64_t x_stride, const W* a, const W* b, const float* scales,
               const int64_t* slots, const int64_t* rows, int64_t n, int64_t in, int64_t out, int64_t max_rank,
               int64_t rank) {
  // Tiles: runs of consecutive entries with one slot (a prefill chunk's rows), kTileRows at most.
  std::vector<int64_t> tile_start;
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || slots[i] != slots[i - 1] || i - tile_start.back() == kTileRows) tile_start.push_back(i);
  const int64_t tiles = static_cast<int64_t>(tile_start.size());
  tile_start.push_back(n);
  // A tile reads rank x (in + out) weights: tens of KB, enough to give each thread its own tiles.
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x_wide(kTileRows * in), shrunk(kTileRows * rank);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = tile_start[t], count = tile_start[t + 1] - i0, s = slots[i0];
      // The next tile's A and B are asked for before this tile's arithmetic starts. Why: a
      // decode step's tiles are one row each of a distinct adapter, so each reads ~10-30 KB that
      // no cache holds (the base weights streamed through since the last step) in short strided
      // runs that the hardware prefetcher barely follows; a core then waits on one tile's misses
      // at a time. 16 adapters x 1 row, cold caches, a decode step of SmolLM2-135M's shapes:
      // 8.4 / 8.3 -> 6.6 / 6.9 ms (2-core AMX Xeon,
      // bench/results/lora_cpu_step_cold_{before,after}_r{1,2}_2026-12-07.*).
      if (t + 1 < end && slots[tile_start[t + 1]] != s) {
        const int64_t next = slots[tile_start[t + 1]];
        prefetch_row(a + next * max_rank * in, rank * in);
        prefetch_row(b + next * max_rank * out, rank * out);
      }
      const X* xs[kTileRows];
      X* ys[kTileRows];
      for (int64_t r = 0; r < count; ++r) {
        const int64_t row = rows != nullptr ? rows[i0 + r] : i0 + r;
        xs[r] = x + row * x_stride;
        ys[r] = y + row * y_stride;
      }
      const W* sa = a + s * max_rank * in;
      const W* sb = b + s * max_rank * out;
      switch (count) {
        case 1: bgmv_tile<1>(xs, ys, sa, sb, in, out, rank, scales[s], x_wide.data(), shrunk.data()); break;
        case 2: bgmv_tile<2>(xs, ys, sa, sb, in, out, rank, scales[s], x_wide.data(), shrunk.data()); break;
        case 3: bgmv_tile<3>(xs, ys, sa, sb, in, out, rank, scales[s], x_wide.data(), shrunk.data()); break;
        default: bgmv_tile<4>(xs, ys, sa, sb, in, out, rank, scales[s], x_wide.data(), shrunk.data()); break;
      }
    }
  });
}

}  // namespace

// y: [tokens, out], x: [tokens, in] (rows of any stride, unit column stride); lora_a: [slots,
// max_rank, in] and lora_b: [slots, max_rank, out], contiguous, both float32 or both x's dtype;
// scales: [slots] float32; slots: [n] int64 (each row's adapter slot); rows: [n] distinct int64
// row ids, or empty for rows 0..n-1 (then n == tokens); rank <= max_rank columns are used.
void lora_bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor scales,
               torch::Tensor slots, torch::Tensor rows, int64_t rank) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && y.dim() == 2 && x.dim() == 2 && y.stride(1) == 1 &&
                  x.stride(1) == 1 && y.size(0) == x.size(0) && y.scalar_type() == x.scalar_type(),
              "y, x: 2-D CPU rows with unit column stride, same tokens and dtype");
  TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_a.is_contiguous() && lora_b.is_contiguous() &&
                  lora_a.size(0) == lora_b.size(0) && lora_a.size(1) == lora_b.size(1) &&
                  lora_a.size(2) == x.size(1) && lora_b.size(2) == y.size(1),
              "lora_a: [slots, max_rank, in], lora_b: [slots, max_rank, out], contiguous");
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type() &&
                  (lora_a.scalar_type() == torch::kFloat || lora_a.scalar_type() == x.scalar_type()),
              "lora_a, lora_b: float32 or x's dtype, alike");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == lora_a.size(0),
              "scales: [slots] float32");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.dim() == 1, "slots: [n] int64");
  TORCH_CHECK(0 <= rank && rank <= lora_a.size(1), "rank must be in 0..max_rank");
  const int64_t n = slots.numel(), tokens = x.size(0), num_slots = lora_a.size(0);
  const bool all_rows = rows.numel() == 0;
  TORCH_CHECK(all_rows ? n == tokens : (rows.scalar_type() == torch::kLong && rows.is_contiguous() &&
                                        rows.numel() == n),
              "rows: [n] int64, or empty with one slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* row = all_rows ? nullptr : rows.data_ptr<int64_t>();
  std::vector<bool> seen(tokens, false);  // rows are written in parallel: each must come once
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < num_slots, "slot out of range");
    if (row != nullptr) {
      TORCH_CHECK(row[i] >= 0 && row[i] < tokens && !seen[row[i]], "rows: distinct ids in range");
      seen[row[i]] = true;
    }
  }
  if (n == 0 || rank == 0) return;
  dispatch_float_types(x.scalar_type(), "lora_bgmv", [&](auto tag) {
    using X = decltype(tag);
    auto run = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      bgmv_rows<X, W>(y.data_ptr<X>(), y.stride(0), x.data_ptr<X>(), x.stride(0), lora_a.data_ptr<W>(),
                      lora_b.data_ptr<W>(), scales.data_ptr<float>(), slot, row, n, x.size(1), y.size(1),
                      lora_a.size(1), rank);
    };
    if (lora_a.scalar_type() == torch::kFloat) {
      run(float{});
    } else {
      run(X{});
    }
  });
}
