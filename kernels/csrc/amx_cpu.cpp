// Small-batch bf16 linears on AMX tiles: y[M, N] = x[M, K] W^T (+ bias) for up to 16 rows, W in
// the small-M layout of gemv_cpu.cpp ([N / 16][K / 2][16][2]), for K a multiple of 32.
//
// Why: from ~5 rows on, gemv_cpu.cpp's VDPBF16PS passes lose to oneDNN's AMX kernels, but
// oneDNN costs ~19 us of fixed setup a call (a 16-row wo, 576 x 576, took 30 us of which the
// multiply is a third; 121 calls a decode step; ad hoc). Here a call is one parallel loop, and
// the small-M layout is already what a tile multiply reads: one block of 16 output columns is
// K / 2 rows of 64 bytes, the (k, k + 1) pairs of its columns, so a B tile (16 pair rows x 16
// columns) is one contiguous KB. Tiles: 0-3 the float32 sums of four column blocks (M rows x 16
// columns), 4 the rows' next 32 inputs (A), 5 and 6 the blocks' weights (B), alternating so the
// next load does not wait for the multiply before it. Past 16 rows, groups of 16 rows sharing
// each weight tile (tried: 17-64 rows, 2 groups x 2 blocks a task) only matched oneDNN, whose
// fixed cost no longer dominates there, and lost at K = 1536 (ad hoc): 16 is the limit.
//
// Numerics: TDPBF16PS multiplies bf16 pairs exactly and adds them into float32 (Intel's SDM:
// two roundings per pair at most; denormals flushed); bias added in float32; one rounding to
// bf16 (to nearest, ties to even). A row's sums never see another row: results do not depend on
// M. Linux hands out tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); where that
// fails, or the build has no AMX, amx_linear_usable() is false and callers keep the passes.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define ALIGNSERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define ALIGNSERVE_AMX 0
#endif

namespace {

#if ALIGNSERVE_AMX
constexpr int64_t kBlock = 16;      // output columns per block (a C tile's columns)
constexpr int64_t kChunk = 32;      // inputs per A tile row (64 bytes of bf16)
constexpr int64_t kTileBlocks = 4;  // C tiles

struct alignas(64) TileConfig {  // the LDTILECFG memory layout, palette 1
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles(int64_t rows) {
  TileConfig cfg;
  for (int t = 0; t <= 4; ++t) {  // C tiles and A: one row per input row, 64 bytes
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  for (int t = 5; t <= 6; ++t) {  // B: 16 pair rows of 16 columns
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// NB (1-4) column blocks starting at w (blocks block_elems apart) into sums [rows][64] floats.
template <int NB>
inline void multiply_blocks(const at::BFloat16* x, int64_t x_stride_bytes, const at::BFloat16* w,
                            int64_t block_elems, int64_t chunks, float* sums) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, x + c * kChunk, x_stride_bytes);
    const at::BFloat16* wc = w + c * kChunk * kBlock;  // 16 pair rows of this block's 16 columns
    _tile_loadd(5, wc, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NB > 1) {
      _tile_loadd(6, wc + block_elems, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NB > 2) {
      _tile_loadd(5, wc + 2 * block_elems, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NB > 3) {
      _tile_loadd(6, wc + 3 * block_elems, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  constexpr int64_t stride = kTileBlocks * kBlock * sizeof(float);
  _tile_stored(0, sums, stride);
  if constexpr (NB > 1) _tile_stored(1, sums + kBlock, stride);
  if constexpr (NB > 2) _tile_stored(2, sums + 2 * kBlock, stride);
  if constexpr (NB > 3) _tile_stored(3, sums + 3 * kBlock, stride);
}

// y[r][0 .. 16 * nb) = bf16(sums[r] + bias), rounded to nearest even as gemv_cpu.cpp rounds.
inline void write_rows(const float* sums, int64_t rows, int64_t nb, const float* bias, at::BFloat16* y,
                       int64_t y_stride) {
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + b * kBlock) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 s = _mm512_loadu_ps(sums + r * kTileBlocks * kBlock + b * kBlock);
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(s, bv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + b * kBlock), (__m256i)out);
    }
  }
}
#endif

}  // namespace

bool amx_linear_usable() {
#if ALIGNSERVE_AMX
  // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): granted once for the process.
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

// Checked by small_m_linear (gemv_cpu.cpp), which routes here: rows in 1..16, K % 32 == 0,
// contiguous packed weights, bf16 rows with unit column stride.
void amx_linear(torch::Tensor y, torch::Tensor x, torch::Tensor w_packed, const float* bias) {
#if ALIGNSERVE_AMX
  const int64_t rows = x.size(0), blocks = w_packed.size(0), k_pairs = w_packed.size(1);
  // The tile shapes below hold only for these (an A tile has 16 rows of 32 inputs at most).
  TORCH_CHECK(1 <= rows && rows <= 16 && (2 * k_pairs) % kChunk == 0, "amx_linear: 1-16 rows and K % 32 == 0");
  const int64_t chunks = 2 * k_pairs / kChunk, block_elems = 2 * k_pairs * kBlock;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w_packed.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t x_stride_bytes = x.stride(0) * 2, y_stride = y.stride(0);
  const int64_t groups = (blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    // Tile configuration is per thread, and oneDNN's kernels set their own before each use.
    configure_tiles(rows);
    alignas(64) float sums[16 * kTileBlocks * kBlock];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b0 = g * kTileBlocks, nb = std::min(kTileBlocks, blocks - b0);
      const at::BFloat16* w = wp + b0 * block_elems;
      switch (nb) {
        case 1: multiply_blocks<1>(xp, x_stride_bytes, w, block_elems, chunks, sums); break;
        case 2: multiply_blocks<2>(xp, x_stride_bytes, w, block_elems, chunks, sums); break;
        case 3: multiply_blocks<3>(xp, x_stride_bytes, w, block_elems, chunks, sums); break;
        default: multiply_blocks<4>(xp, x_stride_bytes, w, block_elems, chunks, sums); break;
      }
      write_rows(sums, rows, nb, bias != nullptr ? bias + b0 * kBlock : nullptr, yp + b0 * kBlock, y_stride);
    }
    _tile_release();  // back to the initial state: nothing else on this thread sees our tiles
  });
#else
  TORCH_CHECK(false, "amx_linear: this build has no AMX");
#endif
}
