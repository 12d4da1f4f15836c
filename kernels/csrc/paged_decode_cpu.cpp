// Single-query paged attention on CPU: each decode sequence reads its own KV blocks in place.
//
// Semantics are those of kernels.paged_attention (the twin): out[b, g*G + j] = softmax over the
// keys [start, len) of scale * q[b, g*G + j] . k[t], weighted sum of v[t], where G = heads /
// kv_heads (GQA, q heads grouped by kv head) and start = max(0, len - window) for a sliding
// window. Keys live at cache[block_table[b][t / block_size], t % block_size, g].
//
// Why a kernel: the torch route gathers a padded copy of every context in every layer, then
// widens it to float32 for SDPA; at batch 64 x 200 keys that is ~60 MB of traffic per layer.
// Here each task (a sequence and some of its kv heads) reads each key slot once, widened to
// float32, and scores its query heads against it; then each value slot once, added into the
// heads' accumulators. Slots are prefetched a few ahead: the loop is bound by memory, not
// arithmetic. The softmax is exact (two passes), all in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using alignserve::exp_vec;
using alignserve::prefetch_row;

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = alignserve::load(src, i);
}

// The task's query heads widened to float32, with the softmax scale folded in.
template <typename T>
inline void widen_scaled(const T* src, float* dst, int64_t n, float scale) {
  widen(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] *= scale;
}

constexpr int64_t kAhead = 4;  // rows prefetched ahead

// One task: its query heads against n keys at `offsets` (element offsets of their slots),
// written to o. Every size and pointer comes in by value: read through the caller's lambda
// captures instead, each store (-fno-strict-aliasing) could change them, so GCC would keep
// them in memory and leave the inner loops scalar.
template <typename T>
void attend(const T* q_task, const T* k_base, const T* v_base, const int64_t* offsets, int64_t n,
            int64_t head_dim, int64_t group, int64_t q_heads, int64_t width, float scale, float* qf,
            float* kv, float* scores, float* acc, T* o) {
  widen_scaled(q_task, qf, q_heads * head_dim, scale);
  float* kvp = kv;  // four widened slot ranges, `width` floats apart
  // Scores four keys at a time: four independent sums per dot product, where one key would
  // be a chain of dependent FMAs waiting on each other (same step: 23.0 -> 19.7 ms).
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int64_t r = 0; r < 4; ++r) {
      if (i + r + kAhead < n) prefetch_row(k_base + offsets[i + r + kAhead], width);
      widen(k_base + offsets[i + r], kvp + r * width, width);
    }
    for (int64_t j = 0; j < q_heads; ++j) {
      const float* qj = qf + j * head_dim;
      const float* k0 = kvp + (j / group) * head_dim;
      const float *k1 = k0 + width, *k2 = k1 + width, *k3 = k2 + width;
      float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t d = 0; d < head_dim; ++d) {
        d0 += qj[d] * k0[d];
        d1 += qj[d] * k1[d];
        d2 += qj[d] * k2[d];
        d3 += qj[d] * k3[d];
      }
      float* sj = scores + j * n + i;
      sj[0] = d0, sj[1] = d1, sj[2] = d2, sj[3] = d3;
    }
  }
  for (; i < n; ++i) {
    widen(k_base + offsets[i], kvp, width);
    for (int64_t j = 0; j < q_heads; ++j) {
      const float* qj = qf + j * head_dim;
      const float* kj = kvp + (j / group) * head_dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qj[d] * kj[d];
      scores[j * n + i] = dot;
    }
  }
  for (int64_t j = 0; j < q_heads; ++j) {
    float* sj = scores + j * n;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) top = std::max(top, sj[t]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; ++t) {
      sj[t] = exp_vec(sj[t] - top);
      total += sj[t];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
  }
  // Values: each slot range widened once and added into its heads' accumulators.
  std::fill(acc, acc + q_heads * head_dim, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    if (t + kAhead < n) prefetch_row(v_base + offsets[t + kAhead], width);
    widen(v_base + offsets[t], kvp, width);
    for (int64_t j = 0; j < q_heads; ++j) {
      const float p = scores[j * n + t];
      const float* vj = kvp + (j / group) * head_dim;
      float* aj = acc + j * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) aj[d] += p * vj[d];
    }
  }
#pragma omp simd
  for (int64_t e = 0; e < q_heads * head_dim; ++e) alignserve::store(o, e, acc[e]);
}

#if defined(__AVX512F__)
// The same task with AVX-512 intrinsics, for head_dim a multiple of 16. Perf on the portable
// loops above (batch 16 x 160 keys, cache-resident) found ~20 GFLOP/s: a horizontal sum per
// (key, head) with its scalar stores, a scalar max chain, and the value loop loading and
// storing every accumulator once per key. Here keys go sixteen at a time:
// - scores: per head, sixteen partial-sum vectors (one per key) over head_dim, then one
//   transpose-and-add tree turns them into one vector of the sixteen dot products (45 vector
//   ops where sixteen horizontal sums take ~130);
// - max and sum: vector reductions, sixteen lanes (an in-order scalar chain otherwise);
// - values: per group of query heads sharing a kv head (up to three at a time), up to four
//   16-float accumulator vectors a head live in registers across the sixteen keys; each row
//   block is widened once for the group, each key's weight broadcast per head.
// Both passes read the cache rows in place, widening in registers (bf16: a zero-extend and a
// shift; fp16: vcvtph2ps), where copying a chunk widened into a scratch row first cost a store
// and a load per element. bf16 scores on CPUs with AVX512-BF16 skip the widening too:
// VDPBF16PS multiplies pairs of bf16 (each product exact in float32) and adds them into
// float32 lanes, so q stays unscaled bf16 and the scale is applied to the sums.
// float32 accumulation throughout, like the loops above; only the order of the additions differs.
constexpr int64_t kKeys = 16;  // keys per chunk: one score vector

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane i of the result = the sum of the sixteen lanes of p[i].
inline __m512 sum_each_of_16(const __m512* p) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of p[2i], p[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four vectors 4i..4i+3, one float each
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes (0+1, 2+3) of b[2i] then of b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

// The slot rows of keys i .. i + m (m = min(16, n - i)); rows past m repeat the last one (so
// a short chunk reads no slot outside the context). Prefetches the next chunk's rows.
template <typename T>
inline int64_t chunk_rows(const T* base, const int64_t* offsets, int64_t i, int64_t n, int64_t width,
                          const T** rows) {
  const int64_t m = std::min(kKeys, n - i);
  for (int64_t r = 0; r < kKeys; ++r) {
    if (i + r + kKeys < n) prefetch_row(base + offsets[i + r + kKeys], width);
    rows[r] = base + offsets[i + std::min(r, m - 1)];
  }
  return m;
}

// The sixteen dot products of q (float32, pre-scaled) with rows[r][head ..], head_dim / 16 blocks.
template <typename T>
inline __m512 dots16(const float* q, const T* const* rows, int64_t head, int64_t blocks) {
  __m512 part[kKeys];
  for (int r = 0; r < kKeys; ++r) part[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 qv = _mm512_loadu_ps(q + 16 * b);
    for (int r = 0; r < kKeys; ++r) part[r] = _mm512_fmadd_ps(qv, load16(rows[r] + head + 16 * b), part[r]);
  }
  return sum_each_of_16(part);
}

#if defined(__AVX512BF16__)
// The same over bf16 q (unscaled) and keys as they are, 32 per VDPBF16PS (head_dim % 32 == 0).
inline __m512 dots16_bf16(const at::BFloat16* q, const at::BFloat16* const* rows, int64_t head, int64_t pairs,
                          float scale) {
  __m512 part[kKeys];
  for (int r = 0; r < kKeys; ++r) part[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < pairs; ++b) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + 32 * b);
    for (int r = 0; r < kKeys; ++r)
      part[r] = _mm512_dpbf16_ps(part[r], qv, (__m512bh)_mm512_loadu_si512(rows[r] + head + 32 * b));
  }
  return _mm512_mul_ps(sum_each_of_16(part), _mm512_set1_ps(scale));
}
#endif

// The chunk's sixteen scores of one query head (q_head as stored, qf_head widened and scaled).
template <typename T>
inline __m512 head_dots(const T* q_head, const float* qf_head, const T* const* rows, int64_t head,
                        int64_t head_dim, float scale, bool bf16_dots) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (bf16_dots) return dots16_bf16(q_head, rows, head, head_dim / 32, scale);
#endif
  return dots16(qf_head, rows, head, head_dim / 16);
}

// For G query heads that share a kv head (GQA): acc_j[0 .. 16 * NB) += sum over the chunk's m
// keys of w_j[r] * rows[r][col ..], where acc_j = acc + j * acc_stride and w_j = w + j * w_stride.
// Each row block is loaded and widened once for all G heads (per head, it cost a load, a widen
// and a broadcast per FMA: batch-16 decode attention over 150-300-key contexts, 30 layers, AMX
// Xeon: 4.6 -> 4.1 ms, ad hoc); each head's sums still add the keys in order, as before.
template <int G, int NB, typename T>
inline void add_weighted_rows(float* acc, int64_t acc_stride, const float* w, int64_t w_stride,
                              const T* const* rows, int64_t col, int64_t m) {
  __m512 a[G][NB];
  for (int j = 0; j < G; ++j)
    for (int b = 0; b < NB; ++b) a[j][b] = _mm512_loadu_ps(acc + j * acc_stride + 16 * b);
  for (int64_t r = 0; r < m; ++r) {
    __m512 v[NB];
    for (int b = 0; b < NB; ++b) v[b] = load16(rows[r] + col + 16 * b);
    for (int j = 0; j < G; ++j) {
      const __m512 wr = _mm512_set1_ps(w[j * w_stride + r]);
      for (int b = 0; b < NB; ++b) a[j][b] = _mm512_fmadd_ps(wr, v[b], a[j][b]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(acc + j * acc_stride + 16 * b, a[j][b]);
}

// A chunk's values for the `count` query heads of one kv head (its columns start at `head`):
// acc [count][head_dim], w [count][n] (the heads' softmax weights from the chunk's first key).
// Heads go three at a time, so accumulators, row blocks and a weight fit the 32 registers.
template <typename T>
inline void add_values(float* acc, const float* w, int64_t n, const T* const* rows, int64_t head,
                       int64_t head_dim, int64_t count, int64_t m) {
  const int64_t blocks = head_dim / 16;
  for (int64_t j = 0; j < count;) {
    const int64_t heads = std::min<int64_t>(count - j, 3);
    float* aj = acc + j * head_dim;
    const float* wj = w + j * n;
    auto run = [&](auto g) {
      constexpr int G = decltype(g)::value;
      int64_t b = 0;
      for (; b + 4 <= blocks; b += 4) add_weighted_rows<G, 4>(aj + 16 * b, head_dim, wj, n, rows, head + 16 * b, m);
      for (; b < blocks; ++b) add_weighted_rows<G, 1>(aj + 16 * b, head_dim, wj, n, rows, head + 16 * b, m);
    };
    if (heads == 3) run(std::integral_constant<int, 3>{});
    else if (heads == 2) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
    j += heads;
  }
}

template <typename T>
void attend_avx512(const T* q_task, const T* k_base, const T* v_base, const int64_t* offsets, int64_t n,
                   int64_t head_dim, int64_t group, int64_t q_heads, int64_t width, float scale, float* qf,
                   float* /*kv: unused, rows are read in place*/, float* scores, float* acc, T* o) {
  const int64_t blocks = head_dim / 16;
  bool bf16_dots = false;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) bf16_dots = head_dim % 32 == 0;
#endif
  if (!bf16_dots) widen_scaled(q_task, qf, q_heads * head_dim, scale);
  const T* rows[kKeys];
  for (int64_t i = 0; i < n; i += kKeys) {
    const int64_t m = chunk_rows(k_base, offsets, i, n, width, rows);
    const __mmask16 live = static_cast<__mmask16>((1u << m) - 1u);
    for (int64_t j = 0; j < q_heads; ++j)
      _mm512_mask_storeu_ps(scores + j * n + i, live,
                            head_dots(q_task + j * head_dim, qf + j * head_dim, rows, (j / group) * head_dim,
                                      head_dim, scale, bf16_dots));
  }
  for (int64_t j = 0; j < q_heads; ++j) {
    float* sj = scores + j * n;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < n; t += kKeys) {
      const __mmask16 live = static_cast<__mmask16>((1u << std::min(kKeys, n - t)) - 1u);
      top = _mm512_mask_max_ps(top, live, top, _mm512_maskz_loadu_ps(live, sj + t));
    }
    const float peak = _mm512_reduce_max_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += kKeys) {
      const int64_t m = std::min(kKeys, n - t);
      for (int64_t r = 0; r < m; ++r) sj[t + r] = alignserve::exp_vec(sj[t + r] - peak);
      total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1u), sj + t));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(total);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
  }
  std::fill(acc, acc + q_heads * head_dim, 0.f);
  for (int64_t i = 0; i < n; i += kKeys) {
    const int64_t m = chunk_rows(v_base, offsets, i, n, width, rows);
    for (int64_t j = 0; j < q_heads; j += group)
      add_values(acc + j * head_dim, scores + j * n + i, n, rows, (j / group) * head_dim, head_dim, group, m);
  }
#pragma omp simd
  for (int64_t e = 0; e < q_heads * head_dim; ++e) alignserve::store(o, e, acc[e]);
}
#endif

template <typename T>
void decode_attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* tables,
                      const int32_t* lens, T* out, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                      double scale, int64_t window, bool portable) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row = num_kv_heads * head_dim;  // one slot of the cache
  // A task is a sequence and a range of its kv heads. All of them when there are sequences
  // enough to keep every thread busy: a cache slot's heads are adjacent, so the task then
  // streams whole slots (a block is one contiguous run) instead of a 1 / kv_heads slice of
  // each, which the hardware prefetcher follows better (decode attention of a batch-64 step over
  // 160-token contexts, 30 layers, AMX Xeon: 27.6 -> 23.0 ms).
  // With few sequences, one kv head per task, so that the threads share the work.
  const int64_t heads_per_task = num_seqs >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
  const int64_t q_heads = heads_per_task * group, width = heads_per_task * head_dim;
  at::parallel_for(0, num_seqs * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    // Per thread: the task's query heads (pre-scaled), widened slot ranges (four, or a chunk of
    // sixteen), the scores [q_heads][n] and the output accumulators [q_heads][head_dim].
    auto* attend_task = &attend<T>;
#if defined(__AVX512F__)
    const bool wide = !portable && head_dim % 16 == 0;
    if (wide) attend_task = &attend_avx512<T>;
#else
    const bool wide = false;
#endif
    std::vector<float> qf(q_heads * head_dim), kv(wide ? 0 : 4 * width), scores, acc(q_heads * head_dim);
    std::vector<int64_t> offsets;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq, g0 = (task % tasks_per_seq) * heads_per_task;
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      const int32_t* table = tables + b * max_blocks;
      // Element offset of each key's slot, shared by both passes (one division per task).
      offsets.resize(n);
      for (int64_t t = start, i = 0; t < len; ++i) {
        const int64_t blk = t / block_size, off = t % block_size;
        const int64_t base = static_cast<int64_t>(table[blk]) * block_size;
        for (int64_t o = off; o < block_size && t < len; ++o, ++t, ++i) offsets[i] = (base + o) * row;
        --i;
      }
      scores.resize(q_heads * n);
      attend_task(q + b * q_stride + g0 * group * head_dim, k_cache + g0 * head_dim, v_cache + g0 * head_dim,
                  offsets.data(), n, head_dim, group, q_heads, width, static_cast<float>(scale), qf.data(),
                  kv.data(), scores.data(), acc.data(), out + (b * num_heads + g0 * group) * head_dim);
    }
  });
}

}  // namespace

// q: [num_seqs, num_heads, head_dim], heads contiguous (rows may be strided: q is a view of the
// qkv projection); caches: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables:
// [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (each >= 1); window <= 0 means none.
// Writes out: [num_seqs, num_heads, head_dim], q's dtype, contiguous. `portable`: the plain loops
// even where the AVX-512 task exists (so tests check both on an AVX-512 machine).
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale, int64_t window,
                            bool portable) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head layout mismatch");
  auto qc = q.stride(2) == 1 && q.stride(1) == head_dim ? q : q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0), "one table and length per query");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(),
              "out must be a contiguous tensor like q");
  alignserve::dispatch_float_types(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    decode_attention<scalar_t>(qc.data_ptr<scalar_t>(), qc.stride(0), k_cache.data_ptr<scalar_t>(),
                               v_cache.data_ptr<scalar_t>(), tables.data_ptr<int32_t>(),
                               lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), q.size(0), num_heads,
                               num_kv_heads, head_dim, k_cache.size(1), tables.size(1), scale, window,
                               portable);
  });
}
