// The Python module of our CPU kernels (kernels/cpu_ext.py builds it): one binding per op.
#include <torch/extension.h>

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, double scale, int64_t window,
                            bool portable);
bool paged_prefill_supported(torch::Dtype dtype);
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start_locs,
                             double scale, int64_t window, int64_t pack_budget_bytes);
void rms_norm(torch::Tensor norm_out, torch::Tensor sum_out, torch::Tensor x, torch::Tensor residual,
              torch::Tensor weight, double eps);
void silu_and_mul(torch::Tensor out, torch::Tensor gate_up);
void rotary_and_cache(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor signed_sin,
                      torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, int64_t num_heads,
                      int64_t num_kv_heads);
void argmax_rows(torch::Tensor out, torch::Tensor x);
void lora_bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor scales,
               torch::Tensor slots, torch::Tensor rows, int64_t rank);
void bind_decoder_stack(pybind11::module_& m);
bool small_m_linear_supported();
void small_m_linear(torch::Tensor y, torch::Tensor x, torch::Tensor w_packed, torch::Tensor bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "single-query paged attention", py::arg("out"),
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("scale"), py::arg("window"), py::arg("portable") = false);
  m.def("paged_prefill_supported", &paged_prefill_supported, "packed (AMX) brgemm for this dtype here");
  m.def("paged_prefill_attention", &paged_prefill_attention, "multi-query paged attention (brgemm)");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after the residual add");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over [gate | up] rows");
  m.def("rotary_and_cache", &rotary_and_cache, "rotary q/k in place, then the k/v cache write");
  m.def("argmax_rows", &argmax_rows, "first index of each row's largest value (NaN largest)");
  m.def("lora_bgmv", &lora_bgmv, "gathered multi-LoRA: each row's delta from its own adapter slot");
  m.def("small_m_linear_supported", &small_m_linear_supported, "this build has the AVX512-BF16 small-M linear");
  m.def("small_m_linear", &small_m_linear, "y = x W^T (+ b) for a few bf16 rows, W packed in 16-column pairs");
  bind_decoder_stack(m);  // class DecoderStack: a decode step's whole layer stack in one call
}
