// Fused elementwise ops of the decoder on CPU: RMSNorm (optionally after the residual add),
// SiLU-and-mul, and rotary embedding of q/k together with the KV cache write.
//
// Why: in eager torch each of these is 3-8 ops (widen, square, mean, rsqrt, scale, round...),
// each a pass over memory and several microseconds of dispatch. At decode batch sizes the
// tensors are a few KB, so the dispatches were the cost: about 80 us per RMSNorm at batch 64 on
// an AMX Xeon, 61 of them per step. Here each op is one pass over each row, in float32, with
// one rounding per output. kernels/fused.py holds the torch twins and the routing.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace {

using alignserve::dispatch_float_types;
using alignserve::exp_vec;
using alignserve::load;
using alignserve::store;

// Rows per parallel task: waking the second thread costs microseconds, a 576-wide row far less.
int64_t rows_per_task(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols)); }

// The per-row loops live in functions that take every size and pointer by value: read through
// a lambda's captured references instead, each store (-fno-strict-aliasing) could change them,
// so GCC kept them in memory and left the loops scalar (4x slower than these).

// sum_out = x + residual (rounded to T, as the residual stream is kept), then
// norm_out = sum * rsqrt(mean(sum^2) + eps) * weight. Without residual: norm of x alone.
template <typename T>
void rms_norm_row(const T* x, const T* residual, T* sum_out, T* norm_out, const T* weight, int64_t cols,
                  float eps, float* h) {
  float squares = 0.f;
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) store(sum_out, c, load(x, c) + load(residual, c));
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < cols; ++c) {
      h[c] = load(sum_out, c);  // the rounded sum is what gets normalized
      squares += h[c] * h[c];
    }
  } else {
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < cols; ++c) {
      h[c] = load(x, c);
      squares += h[c] * h[c];
    }
  }
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(cols) + eps);
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) store(norm_out, c, h[c] * inv * load(weight, c));
}

template <typename T>
void rms_norm_rows(const T* x, const T* residual, T* sum_out, T* norm_out, const T* weight, int64_t rows,
                   int64_t cols, float eps) {
  at::parallel_for(0, rows, rows_per_task(cols), [=](int64_t begin, int64_t end) {
    std::vector<float> h(cols);
    for (int64_t r = begin; r < end; ++r) {
      rms_norm_row(x + r * cols, residual != nullptr ? residual + r * cols : nullptr,
                   residual != nullptr ? sum_out + r * cols : nullptr, norm_out + r * cols, weight, cols, eps,
                   h.data());
    }
  });
}

// out[c] = silu(gate[c]) * up[c].
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t width) {
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    const float g = load(gate, c);
    store(out, c, g / (1.f + exp_vec(-g)) * load(up, c));
  }
}

template <typename T>
void silu_and_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, rows_per_task(2 * width), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      silu_and_mul_row(gate_up + r * 2 * width, gate_up + r * 2 * width + width, out + r * width, width);
    }
  });
}

// In place over one head: x * cos + rotate_half(x) * sin (signed_sin holds sin with the first
// half negated, so rotate_half is a plain swap of halves).
template <typename T>
void rotate_head(T* x, const float* cos, const float* signed_sin, int64_t head_dim, float* rotated) {
  const int64_t half = head_dim / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    rotated[d] = load(x, d) * cos[d] + load(x, d + half) * signed_sin[d];
    rotated[d + half] = load(x, d + half) * cos[d + half] + load(x, d) * signed_sin[d + half];
  }
#pragma omp simd
  for (int64_t d = 0; d < head_dim; ++d) store(x, d, rotated[d]);
}

// Each token's q and k heads rotated in place, then its k and v rows copied into its cache slot.
template <typename T>
void rotary_and_cache_rows(T* qkv, int64_t row_stride, const int64_t* positions, const float* cos,
                           const float* signed_sin, const int64_t* slots, T* k_cache, T* v_cache,
                           int64_t tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  const int64_t kv_row = num_kv_heads * head_dim;
  at::parallel_for(0, tokens, rows_per_task(row_stride), [=](int64_t begin, int64_t end) {
    std::vector<float> rotated(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv + t * row_stride;
      const float* c = cos + positions[t] * head_dim;
      const float* s = signed_sin + positions[t] * head_dim;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate_head(row + h * head_dim, c, s, head_dim, rotated.data());
      std::memcpy(k_cache + slots[t] * kv_row, row + num_heads * head_dim, kv_row * sizeof(T));
      std::memcpy(v_cache + slots[t] * kv_row, row + (num_heads + num_kv_heads) * head_dim, kv_row * sizeof(T));
    }
  });
}

// The first index of the largest of x[0 .. n) (a NaN counts as largest, as in torch.argmax), in
// one pass over the row: each 64-value chunk's maximum is a vectorized reduction, the chunk
// holding the first maximum so far is remembered, and only that chunk is scanned at the end.
// Why not torch.argmax: over a batch-64 step's [64, 49152] float32 logits it was the whole
// sampling phase, 3.3-3.5 ms on a 2-core AMX Xeon (bench/results/step_profile_sampler_argmax_*).
inline int64_t argmax_row(const float* x, int64_t n) {
  constexpr int64_t kChunk = 64;
  float top = -std::numeric_limits<float>::infinity();
  int64_t best = 0;  // start of the chunk holding the first maximum so far
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    float chunk_top = -std::numeric_limits<float>::infinity();
    int nan = 0;
#pragma omp simd reduction(max : chunk_top) reduction(| : nan)
    for (int64_t j = 0; j < m; ++j) {
      chunk_top = x[c + j] > chunk_top ? x[c + j] : chunk_top;
      nan |= x[c + j] != x[c + j];
    }
    if (nan)  // the first NaN is the answer
      for (int64_t j = 0;; ++j)
        if (x[c + j] != x[c + j]) return c + j;
    if (chunk_top > top) top = chunk_top, best = c;  // strictly: an equal later maximum is not first
  }
  for (int64_t j = best;; ++j)  // all -inf: top is -inf and x[0] matches
    if (x[j] == top) return j;
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1 && t.stride(0) == t.size(1),
              name, " must be a contiguous 2-D CPU tensor");
}

}  // namespace

// norm_out = rms_norm(x [+ residual]) * weight; with residual, sum_out = x + residual too.
// Pass an empty tensor (numel 0) for residual and sum_out to normalize x alone.
void rms_norm(torch::Tensor norm_out, torch::Tensor sum_out, torch::Tensor x, torch::Tensor residual,
              torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(norm_out, "norm_out");
  const bool add = residual.numel() > 0;
  if (add) {
    check_rows(residual, "residual");
    check_rows(sum_out, "sum_out");
    TORCH_CHECK(residual.sizes() == x.sizes() && sum_out.sizes() == x.sizes(), "residual/sum_out shape");
    TORCH_CHECK(residual.scalar_type() == x.scalar_type() && sum_out.scalar_type() == x.scalar_type(),
                "residual/sum_out dtype");
  }
  TORCH_CHECK(norm_out.sizes() == x.sizes() && norm_out.scalar_type() == x.scalar_type(), "norm_out like x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(), "weight: [hidden], x's dtype");
  dispatch_float_types(x.scalar_type(), "rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), add ? residual.data_ptr<scalar_t>() : nullptr,
                            add ? sum_out.data_ptr<scalar_t>() : nullptr, norm_out.data_ptr<scalar_t>(),
                            weight.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
}

// out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:].
void silu_and_mul(torch::Tensor out, torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  check_rows(out, "out");
  TORCH_CHECK(gate_up.size(1) % 2 == 0 && out.size(0) == gate_up.size(0) && out.size(1) * 2 == gate_up.size(1) &&
                  out.scalar_type() == gate_up.scalar_type(), "out: [rows, width / 2], gate_up's dtype");
  dispatch_float_types(gate_up.scalar_type(), "silu_and_mul", [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_and_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.size(0),
                                out.size(1));
  });
}

// qkv: [tokens, >= (num_heads + 2 num_kv_heads) * head_dim] rows (q heads, k heads, v heads),
// rotated in place; positions, slots: [tokens] int64; cos, signed_sin: [max_positions,
// head_dim] float32; caches: [num_blocks, block_size, num_kv_heads, head_dim], qkv's dtype.
void rotary_and_cache(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor signed_sin,
                      torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, int64_t num_heads,
                      int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv: 2-D with contiguous rows");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.size(2) == num_kv_heads, "caches: contiguous, alike");
  const int64_t head_dim = k_cache.size(3), tokens = qkv.size(0);
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) >= (num_heads + 2 * num_kv_heads) * head_dim, "qkv width");
  TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type() && qkv.scalar_type() == v_cache.scalar_type(),
              "qkv and the caches must share a dtype");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && signed_sin.scalar_type() == torch::kFloat &&
                  cos.is_contiguous() && signed_sin.is_contiguous() && cos.sizes() == signed_sin.sizes() &&
                  cos.dim() == 2 && cos.size(1) == head_dim, "cos/signed_sin: [positions, head_dim] float32");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong &&
                  positions.is_contiguous() && slots.is_contiguous() && positions.numel() == tokens &&
                  slots.numel() == tokens, "positions/slots: [tokens] int64");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position out of the rotary table");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "cache slot out of range");
  }
  dispatch_float_types(qkv.scalar_type(), "rotary_and_cache", [&](auto tag) {
    using scalar_t = decltype(tag);
    rotary_and_cache_rows<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0), pos, cos.data_ptr<float>(),
                                    signed_sin.data_ptr<float>(), slot, k_cache.data_ptr<scalar_t>(),
                                    v_cache.data_ptr<scalar_t>(), tokens, num_heads, num_kv_heads, head_dim);
  });
}

// out[r] = the first index of the largest value of x's row r (a NaN counts as largest, as in
// torch.argmax). x: [rows, cols] float32 CPU, rows may be strided; out: [rows] int64.
void argmax_rows(torch::Tensor out, torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0 &&
                  x.scalar_type() == torch::kFloat, "x: 2-D float32 CPU rows, contiguous within a row, not empty");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kLong && out.dim() == 1 &&
                  out.size(0) == x.size(0) && out.is_contiguous(), "out: [rows] int64");
  const float* base = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  const int64_t cols = x.size(1), stride = x.stride(0);
  at::parallel_for(0, x.size(0), 1, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) index[r] = argmax_row(base + r * stride, cols);
  });
}
