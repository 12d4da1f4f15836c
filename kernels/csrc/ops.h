// The ops our CPU kernel files define, declared once: module.cpp binds them to Python and
// decoder_cpu.cpp calls them directly (a decode step's layers without Python between ops).
#pragma once

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
int64_t small_m_rows(int64_t k);
void small_m_linear(torch::Tensor y, torch::Tensor x, torch::Tensor w_packed, torch::Tensor bias, bool tiles);
bool amx_linear_usable();
void amx_linear(torch::Tensor y, torch::Tensor x, torch::Tensor w_packed, const float* bias);
