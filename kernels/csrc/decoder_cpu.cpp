// The whole decoder stack of a decode step in one call (server.models.cpu_stack drives it).
//
// Why: a decode step of a small model on a 2-core CPU spent ~5 ms of its ~20-25 in fixed cost
// per op (a 30-layer model with 64-wide layers, so nothing to compute, took 5.3 ms a step):
// Python frames and module calls, pybind argument parsing, tensor allocation through malloc,
// and the GIL taken back after every op. During all of it the OpenMP worker spins. Here the
// per-layer sequence of server.models.llama (add + RMSNorm, qkv projection, rotary + cache
// write, decode attention, o projection, add + RMSNorm, gate|up, SiLU-and-mul, down) runs in
// C++, calling the very kernels and linears the Python path calls, in the same order: the
// outputs are bitwise those of the Python path (tests/models/test_cpu_stack.py). The GIL is
// released for the whole stack.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "ops.h"

namespace {

using OptTensor = std::optional<torch::Tensor>;

// A projection as server.models.linear stores it: oneDNN's packed weight (PackedLinear, called
// through the same operator its Python forward calls) or a plain [out, in] weight (nn.Linear);
// with PackedLinear's small-M copy (gemv_cpu.cpp) taken up to small_m_rows(K) rows, as it does.
struct Projection {
  torch::Tensor weight;
  OptTensor bias;
  bool packed;
  torch::Tensor small;  // [N / 16, K / 2, 16, 2] or empty
  int64_t small_rows;
  torch::Tensor small_bias;  // the bias in float32, or empty

  Projection(torch::Tensor weight_, OptTensor bias_, bool packed_, torch::Tensor small_)
      : weight(std::move(weight_)), bias(std::move(bias_)), packed(packed_), small(std::move(small_)),
        small_rows(small.defined() && small.numel() > 0 ? small_m_rows(2 * small.size(1)) : 0),
        small_bias(bias.has_value() ? bias->to(torch::kFloat).contiguous() : torch::empty({0}, torch::kFloat)) {}

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (small_rows > 0 && x.size(0) <= small_rows) {
      torch::Tensor y = x.new_empty({x.size(0), small.size(0) * 16});
      small_m_linear(y, x, small, small_bias, /*tiles=*/true);
      return y;
    }
    if (!packed) return at::linear(x, weight, bias);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           c10::string_view, c10::List<std::optional<at::Scalar>>,
                                           std::optional<c10::string_view>)>();
    return op.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
};

// A step's adapter rows, as kernels.lora plans them for the C++ route (one gathered group):
// per layer and module (q, k, v, o, gate, up, down) its stacks (rank-major A [slots, max_rank,
// in], B [slots, max_rank, out], scales [slots]) or none; each adapter row's slot and row id.
struct StepLoRA {
  const std::vector<OptTensor>* a;
  const std::vector<OptTensor>* b;
  const std::vector<OptTensor>* scales;
  torch::Tensor slots, rows;
  int64_t rank;

  // y += each adapter row's delta of module `m` (0..6) of layer `layer`, as LoRABatch.apply.
  void apply(size_t layer, int m, torch::Tensor y, const torch::Tensor& x) const {
    const size_t i = layer * 7 + m;
    if (a == nullptr || !(*a)[i].has_value()) return;
    lora_bgmv(std::move(y), x, *(*a)[i], *(*b)[i], *(*scales)[i], slots, rows, rank);
  }
};

struct Layer {
  torch::Tensor attention_norm, ffn_norm;
  Projection wqkv, wo, w13, w2;
  int64_t window;  // <= 0: attends to the whole context
};

}  // namespace

class DecoderStack {
 public:
  // Per layer, in order: attention-norm weight, qkv weight, qkv bias (None), o weight,
  // ffn-norm weight, gate|up weight, down weight, window; `packed[i]`: layer i's four
  // projections are oneDNN-packed; `small[i]`: their four small-M copies (empty tensors where
  // none). All weights in the activations' dtype (or packed from it).
  DecoderStack(std::vector<torch::Tensor> attention_norms, std::vector<torch::Tensor> wqkv,
               std::vector<OptTensor> wqkv_bias, std::vector<torch::Tensor> wo, std::vector<torch::Tensor> ffn_norms,
               std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2, std::vector<int64_t> windows,
               std::vector<bool> packed, std::vector<std::vector<torch::Tensor>> small,
               torch::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : final_norm_(std::move(final_norm)), num_heads_(num_heads), num_kv_heads_(num_kv_heads),
        head_dim_(head_dim), eps_(eps) {
    const size_t n = attention_norms.size();
    TORCH_CHECK(wqkv.size() == n && wqkv_bias.size() == n && wo.size() == n && ffn_norms.size() == n &&
                    w13.size() == n && w2.size() == n && windows.size() == n && packed.size() == n &&
                    small.size() == n, "one entry per layer in every list");
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(small[i].size() == 4, "four small-M weights (or empty tensors) per layer");
      layers_.push_back(Layer{attention_norms[i], ffn_norms[i],
                              Projection{wqkv[i], wqkv_bias[i], packed[i], small[i][0]},
                              Projection{wo[i], std::nullopt, packed[i], small[i][1]},
                              Projection{w13[i], std::nullopt, packed[i], small[i][2]},
                              Projection{w2[i], std::nullopt, packed[i], small[i][3]}, windows[i]});
    }
  }

  // h: [tokens, hidden], the step's embeddings, one token per sequence (a decode step);
  // lora_*: empty lists for a step without adapter rows, else see StepLoRA;
  // positions, slots: [tokens] int64; cos, signed_sin: the rotary tables [positions, head_dim]
  // float32; caches: per layer [blocks, block_size, kv_heads, head_dim]; tables: [tokens,
  // max_blocks] int32; lens: [tokens] int32 (contexts after this step). Returns the final
  // norm's output [tokens, hidden].
  torch::Tensor forward(torch::Tensor h, torch::Tensor positions, torch::Tensor cos, torch::Tensor signed_sin,
                        torch::Tensor slots, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, torch::Tensor tables, torch::Tensor lens,
                        double scale, const std::vector<OptTensor>& lora_a, const std::vector<OptTensor>& lora_b,
                        const std::vector<OptTensor>& lora_scales, torch::Tensor lora_slots, torch::Tensor lora_rows,
                        int64_t lora_rank) const {
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h: contiguous [tokens, hidden]");
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one cache per layer");
    TORCH_CHECK(tables.size(0) == h.size(0) && lens.size(0) == h.size(0), "one sequence per token");
    const bool adapted = !lora_a.empty();
    TORCH_CHECK(!adapted || (lora_a.size() == 7 * layers_.size() && lora_b.size() == lora_a.size() &&
                             lora_scales.size() == lora_a.size()), "seven LoRA modules per layer");
    const StepLoRA lora{adapted ? &lora_a : nullptr, &lora_b, &lora_scales, lora_slots, lora_rows, lora_rank};
    const int64_t tokens = h.size(0), q_size = num_heads_ * head_dim_;
    const torch::Tensor none = h.new_empty({0});
    torch::Tensor delta = none;  // the previous layer's MLP output, added inside the next norm
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      torch::Tensor normed = torch::empty_like(h);
      torch::Tensor x = i == 0 ? h : torch::empty_like(h);
      rms_norm(normed, i == 0 ? none : x, h, delta, layer.attention_norm, eps_);
      torch::Tensor qkv = layer.wqkv(normed);
      const int64_t kv_size = num_kv_heads_ * head_dim_;
      lora.apply(i, 0, qkv.narrow(1, 0, q_size), normed);
      lora.apply(i, 1, qkv.narrow(1, q_size, kv_size), normed);
      lora.apply(i, 2, qkv.narrow(1, q_size + kv_size, kv_size), normed);
      rotary_and_cache(qkv, positions, cos, signed_sin, slots, k_caches[i], v_caches[i], num_heads_, num_kv_heads_);
      torch::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads_, head_dim_});
      torch::Tensor attended = torch::empty({tokens, num_heads_, head_dim_}, h.options());
      paged_decode_attention(attended, q, k_caches[i], v_caches[i], tables, lens, scale, layer.window, false);
      torch::Tensor attention_out = layer.wo(attended.view({tokens, q_size}));
      lora.apply(i, 3, attention_out, attended.view({tokens, q_size}));
      torch::Tensor ffn_input = torch::empty_like(h);
      torch::Tensor sum = torch::empty_like(h);
      rms_norm(ffn_input, sum, x, attention_out, layer.ffn_norm, eps_);
      torch::Tensor gate_up = layer.w13(ffn_input);
      const int64_t intermediate = gate_up.size(1) / 2;
      lora.apply(i, 4, gate_up.narrow(1, 0, intermediate), ffn_input);
      lora.apply(i, 5, gate_up.narrow(1, intermediate, intermediate), ffn_input);
      torch::Tensor activated = gate_up.new_empty({tokens, intermediate});
      silu_and_mul(activated, gate_up);
      delta = layer.w2(activated);
      lora.apply(i, 6, delta, activated);
      h = sum;
    }
    torch::Tensor out = torch::empty_like(h);
    rms_norm(out, torch::empty_like(h), h, delta, final_norm_, eps_);
    return out;
  }

 private:
  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_;
};

void bind_decoder_stack(pybind11::module_& m) {
  pybind11::class_<DecoderStack>(m, "DecoderStack")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<OptTensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<int64_t>, std::vector<bool>,
                          std::vector<std::vector<torch::Tensor>>, torch::Tensor, int64_t, int64_t, int64_t,
                          double>())
      // Tensors only inside: the engine thread need not hold the GIL for the stack's ~20 ms.
      .def("forward", &DecoderStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
