// The Python module of our CPU kernels (kernels/cpu_ext.py builds it): one binding per op.
#include <torch/extension.h>

#include "ops.h"

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
  m.def("small_m_linear", &small_m_linear, "y = x W^T (+ b) for a few bf16 rows, W packed in 16-column pairs",
        py::arg("y"), py::arg("x"), py::arg("w_packed"), py::arg("bias"), py::arg("tiles") = true);
  m.def("small_m_rows", &small_m_rows, "rows up to which small_m_linear beats oneDNN for K inputs (0: none)");
  m.def("amx_linear_usable", &amx_linear_usable, "this build has AMX tiles and the OS granted them");
  bind_decoder_stack(m);  // class DecoderStack: a decode step's whole layer stack in one call
}
