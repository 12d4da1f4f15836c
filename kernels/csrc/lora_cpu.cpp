// Gathered multi-LoRA (BGMV) on CPU: for each gathered row r with adapter slot s,
// y[r] += scale[s] * (x[r] @ A[s, :rank]^T) @ B[s, :rank].
//
// Why: the torch route is ~8 ops per adapted projection (gather A's ranks, bmm, scale, index
// arithmetic, an embedding_bag over B, widen y, add, round back), 7 projections x 30 layers a
// step; at decode sizes the dispatches were the cost (27 ms a step at 16 rows on 16 rank-8
// adapters, SmolLM2-135M shapes, AMX Xeon). Here one pass per row: A and B are read in their
// storage dtype and widened in registers (so 16-bit stacks halve the bytes read), float32
// accumulation, one rounding into y. kernels/lora.py holds the torch twin and the routing.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_common.h"

namespace {

using alignserve::dispatch_float_types;
using alignserve::load;
using alignserve::store;

// One row. Sizes and pointers by value, for the reason given in fused_cpu.cpp (GCC keeps
// captured references in memory and leaves the loops scalar).
template <typename X, typename W>
void bgmv_row(const X* x, const W* a, const W* b, X* y, int64_t in, int64_t out, int64_t rank, float scale,
              float* x_wide, float* acc) {
#pragma omp simd
  for (int64_t i = 0; i < in; ++i) x_wide[i] = load(x, i);
#pragma omp simd
  for (int64_t o = 0; o < out; ++o) acc[o] = 0.f;
  for (int64_t k = 0; k < rank; ++k) {
    const W* a_k = a + k * in;  // A is rank-major: rank k's weights over the inputs are contiguous
    float shrunk = 0.f;
#pragma omp simd reduction(+ : shrunk)
    for (int64_t i = 0; i < in; ++i) shrunk += x_wide[i] * load(a_k, i);
    shrunk *= scale;
    const W* b_k = b + k * out;
#pragma omp simd
    for (int64_t o = 0; o < out; ++o) acc[o] += shrunk * load(b_k, o);
  }
#pragma omp simd
  for (int64_t o = 0; o < out; ++o) store(y, o, load(y, o) + acc[o]);
}

template <typename X, typename W>
void bgmv_rows(X* y, int64_t y_stride, const X* x, int64_t x_stride, const W* a, const W* b, const float* scales,
               const int64_t* slots, const int64_t* rows, int64_t n, int64_t in, int64_t out, int64_t max_rank,
               int64_t rank) {
  // A row reads rank x (in + out) weights: tens of KB, enough to give each thread its own rows.
  at::parallel_for(0, n, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> x_wide(in), acc(out);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows != nullptr ? rows[i] : i, s = slots[i];
      bgmv_row(x + r * x_stride, a + s * max_rank * in, b + s * max_rank * out, y + r * y_stride, in, out, rank,
               scales[s], x_wide.data(), acc.data());
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
