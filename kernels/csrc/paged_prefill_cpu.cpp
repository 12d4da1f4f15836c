// Multi-query (prefill, chunk, extension) paged attention on CPU through oneDNN's brgemm (AMX).
//
// Semantics are those of kernels.paged_attention (the twin): sequence s feeds the queries at
// positions [len - nq, len) of its context; query p sees the keys t <= p (and t > p - window
// with a sliding window); out[row, h] = softmax(scale * q . k) . v over them, q head h reading
// kv head h / G (GQA). Keys live at cache[block_table[s][t / block_size], t % block_size].
//
// Why a kernel: the torch route gathers each sequence's context out of the cache in every
// layer and runs SDPA per sequence, ~60 GFLOP/s on 158-token prompts on a 2-core AMX Xeon
// (attention was a third of a prefill step). Here:
// 1. each (sequence, kv head) packs its keys and values once per layer, in 64-key tiles, into
//    the VNNI layout the AMX tiles multiply (pairs of rows interleaved);
// 2. each task (sequence, kv head, 32 queries) stacks its G query heads as the rows of one
//    matrix, so a key tile is multiplied once for the whole group: scores = Q K^T by brgemm
//    (bf16 in, float32 out), masked online softmax in float32, then acc += P V by brgemm with
//    P rounded to the cache dtype (as flash attention does). Tiles wholly after the causal edge
//    or before the window are never touched.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace {

namespace cpublas = at::native::cpublas;
using alignserve::exp_vec;

constexpr int64_t kKeyTile = 64;    // keys per packed tile (N of Q K^T, K of P V)
constexpr int64_t kQueryTile = 32;  // queries per task (times G heads: the brgemm's M)

// A sequence's place in the step: its queries' rows and its keys' packed tiles.
struct SeqPlan {
  int64_t seq, q_start, num_queries, len, pack_offset, num_tiles;
};

// Packs keys [tile*64, tile*64 + 64) of one kv head into the layouts brgemm reads:
//   kt: K^T as B of Q K^T (K = head_dim, N = 64): kt[(d / 2) * 128 + n * 2 + d % 2];
//   vt: V as B of P V (K = 64 keys, N = head_dim): vt[(n / 2) * 2D + d * 2 + n % 2].
// Keys past the context are zeros (their scores are masked; their weights are zero).
template <typename T>
void pack_tile(const T* k_cache, const T* v_cache, const int32_t* table, int64_t block_size, int64_t row,
               int64_t head_offset, int64_t head_dim, int64_t first_key, int64_t len, T* kt, T* vt) {
  const int64_t tile_elems = kKeyTile * head_dim;
  const int64_t valid = std::min<int64_t>(kKeyTile, len - first_key);
  if (valid < kKeyTile) {
    std::fill(kt, kt + tile_elems, T(0));
    std::fill(vt, vt + tile_elems, T(0));
  }
  for (int64_t n = 0; n < valid; ++n) {
    const int64_t t = first_key + n;
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    const T* k = k_cache + slot * row + head_offset;
    const T* v = v_cache + slot * row + head_offset;
    T* kdst = kt + n * 2;
    T* vdst = vt + (n / 2) * 2 * head_dim + n % 2;
    for (int64_t d = 0; d < head_dim; ++d) {
      kdst[(d / 2) * 2 * kKeyTile + d % 2] = k[d];
      vdst[d * 2] = v[d];
    }
  }
}

// Row r of a task over one key tile: its 64 raw scores become weights rounded to bf16 in p,
// scaled, against the row's running max `top` (updated), with exactly 0 for the keys outside
// [lo, hi); returns the sum of the rounded weights (what P V multiplies). top stays -inf when
// nothing is visible yet (p all zeros). A NaN score never becomes the max; its weight is NaN.
// Written in AVX-512: GCC's own vectorization of the masked 16-key chunks came out as masked
// 8-lane halves, and this loop was half of the kernel's time. The kernel runs only on AMX CPUs,
// which all have AVX-512.
inline float softmax_tile_row(const float* s, at::BFloat16* p, int64_t lo, int64_t hi, float scale, float& top) {
#if defined(__AVX512F__)
  static_assert(kKeyTile == 64, "four 16-lane chunks per tile");
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i hi_v = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512 hidden = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 scaled[4];
  __mmask16 visible[4];
  __m512 peak = _mm512_set1_ps(top);
  for (int c = 0; c < 4; ++c) {
    const __m512i key = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * c));
    visible[c] = _mm512_cmpge_epi32_mask(key, lo_v) & _mm512_cmplt_epi32_mask(key, hi_v);
    scaled[c] = _mm512_mask_mul_ps(hidden, visible[c], _mm512_loadu_ps(s + 16 * c), _mm512_set1_ps(scale));
    peak = _mm512_max_ps(scaled[c], peak);  // NaN lanes keep peak (max returns its second operand)
  }
  top = _mm512_reduce_max_ps(peak);
  uint16_t* bits = reinterpret_cast<uint16_t*>(p);
  if (top == -std::numeric_limits<float>::infinity()) {
    std::memset(bits, 0, kKeyTile * sizeof(uint16_t));
    return 0.f;
  }
  const __m512 top_v = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    __m256i rounded = _mm256_setzero_si256();
    if (visible[c]) {  // sixteen hidden keys (past the diagonal) need no exps
      // Hidden keys get exactly 0 (exp16 clamps: it would give ~1e-38).
      const __m512 e = alignserve::exp16(_mm512_sub_ps(scaled[c], top_v));
      const __m512i u = _mm512_castps_si512(_mm512_maskz_mov_ps(visible[c], e));
      // To nearest even, as bf16_bits_of_finite (an exp is finite or NaN, and NaN stays NaN).
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
      total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
      rounded = _mm512_cvtepi32_epi16(r);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + 16 * c), rounded);
  }
  return _mm512_reduce_add_ps(total);
#else
  TORCH_CHECK(false, "paged_prefill_attention: built without AVX-512");
  return 0.f;
#endif
}

// One task: rows r = t * G + g (query t of the tile, head g of the group). Sizes and pointers
// come by value (see paged_decode_cpu.cpp: captured references keep GCC's loops scalar).
template <typename T>
void attend_tile(const T* q, int64_t q_stride, const T* packed, int64_t num_tiles, int64_t first_pos,
                 int64_t num_queries, int64_t group, int64_t head_dim, float scale, int64_t window,
                 T* qbuf, float* scores, T* probs, float* acc, float* row_max, float* row_sum, T* out,
                 int64_t out_stride) {
  const int64_t rows = num_queries * group;
  for (int64_t t = 0; t < num_queries; ++t)
    for (int64_t g = 0; g < group; ++g)
      std::copy(q + t * q_stride + g * head_dim, q + t * q_stride + (g + 1) * head_dim,
                qbuf + (t * group + g) * head_dim);
  std::fill(acc, acc + rows * head_dim, 0.f);
  std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + rows, 0.f);
  const int64_t last_pos = first_pos + num_queries - 1;
  const int64_t lo_key = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  const int64_t tile_elems = kKeyTile * head_dim;
  for (int64_t tile = lo_key / kKeyTile; tile <= last_pos / kKeyTile && tile < num_tiles; ++tile) {
    const T* kt = packed + tile * 2 * tile_elems;
    const T* vt = kt + tile_elems;
    cpublas::brgemm(rows, kKeyTile, head_dim, head_dim, kKeyTile, kKeyTile, false, qbuf, kt, scores);
    const int64_t key0 = tile * kKeyTile;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first_pos + r / group;
      // Visible keys of this row in the tile: [lo, hi) relative to key0.
      const int64_t lo = std::clamp<int64_t>((window > 0 ? pos - window + 1 : 0) - key0, 0, kKeyTile);
      const int64_t hi = std::clamp<int64_t>(pos + 1 - key0, 0, kKeyTile);
      float top = row_max[r];
      const float total = softmax_tile_row(scores + r * kKeyTile, probs + r * kKeyTile, lo, hi, scale, top);
      if (top == -std::numeric_limits<float>::infinity()) continue;  // nothing visible yet
      if (top != row_max[r]) {  // a new maximum: rescale what the row has so far
        const float correction = exp_vec(row_max[r] - top);  // -inf - top: exp clamps to ~1e-38
        row_sum[r] *= correction;
        float* a = acc + r * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
      }
      row_sum[r] += total;
      row_max[r] = top;
    }
    cpublas::brgemm(rows, head_dim, kKeyTile, kKeyTile, head_dim, head_dim, true, probs, vt, acc);
  }
  for (int64_t t = 0; t < num_queries; ++t)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const float inv = 1.f / row_sum[r];
      const float* a = acc + r * head_dim;
      T* o = out + t * out_stride + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) alignserve::store(o, d, a[d] * inv);
    }
}

template <typename T>
void prefill_attention(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int32_t* tables,
                       int64_t max_blocks, const std::vector<SeqPlan>& seqs, T* packed, T* out,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                       float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads, row = num_kv_heads * head_dim;
  const int64_t tile_elems = kKeyTile * head_dim, num_seqs = static_cast<int64_t>(seqs.size());
  const SeqPlan* plan = seqs.data();
  // 1. Pack: one task per (sequence, kv head, key tile).
  std::vector<int64_t> tile_start(num_seqs + 1, 0);
  for (int64_t i = 0; i < num_seqs; ++i) tile_start[i + 1] = tile_start[i] + plan[i].num_tiles * num_kv_heads;
  const int64_t* starts = tile_start.data();
  at::parallel_for(0, tile_start[num_seqs], 1, [=](int64_t begin, int64_t end) {
    int64_t i = std::upper_bound(starts, starts + num_seqs + 1, begin) - starts - 1;
    for (int64_t task = begin; task < end; ++task) {
      while (task >= starts[i + 1]) ++i;
      const SeqPlan& s = plan[i];
      const int64_t h = (task - starts[i]) / s.num_tiles, tile = (task - starts[i]) % s.num_tiles;
      T* dst = packed + s.pack_offset + (h * s.num_tiles + tile) * 2 * tile_elems;
      pack_tile(k_cache, v_cache, tables + s.seq * max_blocks, block_size, row, h * head_dim, head_dim,
                tile * kKeyTile, s.len, dst, dst + tile_elems);
    }
  });
  // 2. Attend: one task per (sequence, kv head, query tile).
  std::vector<int64_t> task_start(num_seqs + 1, 0);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_tiles = (plan[i].num_queries + kQueryTile - 1) / kQueryTile;
    task_start[i + 1] = task_start[i] + q_tiles * num_kv_heads;
  }
  const int64_t* tstarts = task_start.data();
  at::parallel_for(0, task_start[num_seqs], 1, [=](int64_t begin, int64_t end) {
    const int64_t rows = kQueryTile * group;
    std::vector<T> qbuf(rows * head_dim), probs(rows * kKeyTile);
    std::vector<float> scores(rows * kKeyTile), acc(rows * head_dim), row_max(rows), row_sum(rows);
    int64_t i = std::upper_bound(tstarts, tstarts + num_seqs + 1, begin) - tstarts - 1;
    for (int64_t task = begin; task < end; ++task) {
      while (task >= tstarts[i + 1]) ++i;
      const SeqPlan& s = plan[i];
      const int64_t q_tiles = (s.num_queries + kQueryTile - 1) / kQueryTile;
      const int64_t h = (task - tstarts[i]) / q_tiles, q0 = ((task - tstarts[i]) % q_tiles) * kQueryTile;
      const int64_t nq = std::min(kQueryTile, s.num_queries - q0);
      const int64_t first_row = s.q_start + q0;
      attend_tile(q + first_row * q_stride + h * group * head_dim, q_stride,
                  packed + s.pack_offset + h * s.num_tiles * 2 * tile_elems, s.num_tiles,
                  s.len - s.num_queries + q0, nq, group, head_dim, scale, window, qbuf.data(), scores.data(),
                  probs.data(), acc.data(), row_max.data(), row_sum.data(),
                  out + (first_row * num_heads + h * group) * head_dim, num_heads * head_dim);
    }
    cpublas::brgemm_release();  // hand the AMX tile state back before the thread moves on
  });
}

}  // namespace

// Whether the kernel runs for `dtype` here: bf16 where oneDNN multiplies it in packed (AMX)
// tiles. fp16 would work the same way on AMX-FP16 CPUs, but no machine we test on has one, so
// it keeps the SDPA route until it can be tested.
bool paged_prefill_supported(torch::Dtype dtype) {
#if defined(__AVX512F__)
  return dtype == torch::kBFloat16 && cpublas::could_pack(dtype);
#else
  return false;  // could_pack(bf16) means AMX, which comes with AVX-512: not reached on such a CPU
#endif
}

// q, out: [num_tokens, num_heads, head_dim] (q rows may be strided: a view of the qkv
// projection; out contiguous); caches: [num_blocks, block_size, num_kv_heads, head_dim];
// block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 context length after
// the step; query_start_locs: [num_seqs + 1] int32. Only sequences with two or more queries are
// computed (decode rows belong to paged_decode_attention); their rows of out are written.
// pack_budget_bytes: the packed keys and values of the sequences handled at once stay under it
// (a long batch of long contexts runs in rounds, not through one huge buffer); one sequence
// per round at least.
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start_locs,
                             double scale, int64_t window, int64_t pack_budget_bytes) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(paged_prefill_supported(q.scalar_type()), "no packed brgemm for this dtype on this CPU");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32 &&
              query_start_locs.scalar_type() == torch::kInt32, "tables, lengths and starts must be int32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head layout mismatch");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 256, "head_dim must be even and at most 256");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(),
              "out must be a contiguous tensor like q");
  auto qc = q.stride(2) == 1 && q.stride(1) == head_dim ? q : q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto starts = query_start_locs.contiguous();
  const int64_t num_seqs = lens.size(0), block_size = k_cache.size(1), max_blocks = tables.size(1);
  TORCH_CHECK(tables.size(0) == num_seqs && starts.size(0) == num_seqs + 1, "one table and length per sequence");
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  const int32_t* start_ptr = starts.data_ptr<int32_t>();
  TORCH_CHECK(start_ptr[num_seqs] <= q.size(0), "query_start_locs beyond q");
  const int64_t itemsize = q.element_size();
  std::vector<SeqPlan> batch;
  int64_t packed_elems = 0;
  auto run = [&]() {
    if (batch.empty()) return;
    auto packed = torch::empty({packed_elems}, q.options());
    using scalar_t = at::BFloat16;  // the one supported dtype (checked above)
    prefill_attention<scalar_t>(qc.data_ptr<scalar_t>(), qc.stride(0), k_cache.data_ptr<scalar_t>(),
                                v_cache.data_ptr<scalar_t>(), tables.data_ptr<int32_t>(), max_blocks, batch,
                                packed.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), num_heads, num_kv_heads,
                                head_dim, block_size, static_cast<float>(scale), window);
    batch.clear();
    packed_elems = 0;
  };
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t nq = start_ptr[s + 1] - start_ptr[s], len = len_ptr[s];
    if (nq < 2) continue;
    TORCH_CHECK(nq <= len && len <= max_blocks * block_size, "sequence ", s, ": bad length or queries");
    const int64_t num_tiles = (len + kKeyTile - 1) / kKeyTile;
    const int64_t elems = num_kv_heads * num_tiles * 2 * kKeyTile * head_dim;
    if (!batch.empty() && (packed_elems + elems) * itemsize > pack_budget_bytes) run();
    batch.push_back({s, start_ptr[s], nq, len, packed_elems, num_tiles});
    packed_elems += elems;
  }
  run();
}
