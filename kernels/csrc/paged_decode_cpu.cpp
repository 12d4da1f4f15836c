// Single-query paged attention on CPU: each decode sequence reads its own KV blocks in place.
//
// Semantics are those of kernels.paged_attention (the twin): out[b, g*G + j] = softmax over the
// keys [start, len) of scale * q[b, g*G + j] . k[t], weighted sum of v[t], where G = heads /
// kv_heads (GQA, q heads grouped by kv head) and start = max(0, len - window) for a sliding
// window. Keys live at cache[block_table[b][t / block_size], t % block_size, g].
//
// Why a kernel: the torch route gathers a padded copy of every context in every layer, then
// widens it to float32 for SDPA; at batch 64 x 200 keys that is ~60 MB of traffic per layer.
// Here each (sequence, kv head) task reads each key row once, widened to float32, and scores its
// G query heads against it; then each value row once, added into the G accumulators. Rows are
// prefetched a few ahead: the loop is bound by cache misses, not arithmetic. The softmax is
// exact (two passes), all in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {  // half (and double, refused upstream)
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  // bf16 is the top half of a float32: a shift, which the compiler vectorizes.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

constexpr int64_t kAhead = 4;  // rows prefetched ahead

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int32_t* tables,
                      const int32_t* lens, T* out, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                      double scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row = num_kv_heads * head_dim;  // one slot of the cache
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    // Per thread: the task's query group (pre-scaled), one widened row, its scores [group][n].
    std::vector<float> qf(group * head_dim), kv(head_dim), scores, acc(group * head_dim);
    std::vector<int64_t> offsets;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, g = task % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      const int32_t* table = tables + b * max_blocks;
      // Element offset of each key's row, shared by both passes (one division per task).
      offsets.resize(n);
      for (int64_t t = start, i = 0; t < len; ++i) {
        const int64_t blk = t / block_size, off = t % block_size;
        const int64_t base = static_cast<int64_t>(table[blk]) * block_size;
        for (int64_t o = off; o < block_size && t < len; ++o, ++t, ++i) offsets[i] = (base + o) * row;
        --i;
      }
      widen(q + (b * num_heads + g * group) * head_dim, qf.data(), group * head_dim);
      const float s = static_cast<float>(scale);
      for (auto& x : qf) x *= s;
      scores.resize(group * n);
      const T* k_base = k_cache + g * head_dim;
      const T* v_base = v_cache + g * head_dim;
      for (int64_t i = 0; i < n; ++i) {
        // The loads of a row miss cache: ask for a later row now, so that misses overlap
        // instead of queueing one after another behind the arithmetic.
        if (i + kAhead < n) prefetch_row(k_base + offsets[i + kAhead], head_dim);
        widen(k_base + offsets[i], kv.data(), head_dim);
        for (int64_t j = 0; j < group; ++j) {
          const float* qj = qf.data() + j * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qj[d] * kv[d];
          scores[j * n + i] = dot;
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* sj = scores.data() + j * n;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) top = std::max(top, sj[i]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < n; ++i) {
          sj[i] = expf(sj[i] - top);
          total += sj[i];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sj[i] *= inv;
      }
      // Values: each row widened once and added into the group's accumulators (vectorized
      // over d).
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < n; ++i) {
        if (i + kAhead < n) prefetch_row(v_base + offsets[i + kAhead], head_dim);
        widen(v_base + offsets[i], kv.data(), head_dim);
        for (int64_t j = 0; j < group; ++j) {
          const float p = scores[j * n + i];
          float* aj = acc.data() + j * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) aj[d] += p * kv[d];
        }
      }
      T* o = out + (b * num_heads + g * group) * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

}  // namespace

// q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
// block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (each >= 1);
// window <= 0 means none. Writes out: [num_seqs, num_heads, head_dim], q's dtype, contiguous.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.scalar_type() != torch::kDouble, "float64 runs the torch path (float32 math here)");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head layout mismatch");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0), "one table and length per query");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(),
              "out must be a contiguous tensor like q");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                               v_cache.data_ptr<scalar_t>(), tables.data_ptr<int32_t>(),
                               lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), q.size(0), num_heads,
                               num_kv_heads, head_dim, k_cache.size(1), tables.size(1), scale, window);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "single-query paged attention (CPU)");
}
