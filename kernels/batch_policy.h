// Which kernel serves a matmul of `rows` activation rows: the one batch policy that every op,
// QuantLinear and WeightCache.matmul go through (csrc/ops.h asks choose_matmul_path, the CUDA GEMV
// launcher asks choose_gemv_kernel). torchext.ops.gemv_max_rows mirrors max_gemv_rows for
// nn.shared_input, and tests/test_matmul.py::test_gemv_max_rows_is_the_policy pins the two together.
#pragma once

#include <cstdint>

namespace torchext {

enum class GemvKernel : int { Dp4a = 0, Int8Mma = 1 };

// Up to 16 rows a GEMV on Q8_1 activations reads each weight byte once for all rows. Measured on an
// H100 with bench/gemv.py, 2026-11-24, L2 cold: 16 rows by the tensor-core GEMV take 17.7 us on
// 4096x4096 Q4_K and 307 us on 128256x4096 (dense: 36.7 and 1015 us); on the H200 (2026-12-02)
// 4096x14336 takes 41.5 us at 16 rows and the tiled GEMM 36.5 at 17.
constexpr int64_t kMaxGemvRows = 16;

// The DP4A kernel does 4 multiply-adds per instruction and row, so it becomes instruction-bound as
// rows are added (8 rows: 3-6x the 1-row time); the int8 tensor-core kernel (sm_80 and newer)
// computes 16 weight rows x 8 activation rows per mma.sync. Measured as above, 128256x4096:
//   k-quants from 2 rows: Q4_K 2 rows 140 us by MMA against 169 by DP4A (1 row: DP4A 105 against
//     140; 8 rows: 198 against 606); Q6_K 2 rows 271 against 275, 4 rows 285 against 442.
//   32-value formats from 9 rows: their 2-byte-aligned 18-34-byte blocks cost the MMA kernel's
//     quad-per-row loads 2-byte accesses, so DP4A wins up to 8 rows (Q8_0 8 rows: 452 against 497
//     us; Q5_0 368 against 487) and MMA from 16 (Q8_0 608 against 905; Q5_0 600 against 735).
constexpr int64_t kMinMmaRowsSuperBlocks = 2;  // 256-value formats (Q4_K, Q5_K, Q6_K)
constexpr int64_t kMinMmaRowsSmallBlocks = 9;  // 32-value formats, and NVFP4's 64 (not measured)
constexpr int64_t kMaxMmaRows = kMaxGemvRows;  // one launch of the MMA kernel takes up to 16 rows
constexpr int64_t kMaxDp4aRows = 8;            // the DP4A kernel stages up to 8 rows

// What computes a matmul of float activations against a quantized weight: the GEMVs on Q8_1
// activations, the tiled GEMM (qgemm.cu: weights dequantized in registers, activations unrounded) up
// to kMaxTiledGemmRows, and from there a dense GEMM on the dequantized weight (each weight exactly as
// dequantize() gives it). The tiled GEMM runs on CUDA for fp16/bf16 activations on sm_80+ with K a
// multiple of 8 and 16-byte aligned operands; where it does not (the CPU, fp32 activations) the GEMVs
// serve up to kMaxGemvRows rows and the dense GEMM beyond.
// Where it runs, it takes over from the GEMVs at kMinTiledGemmRows rows for weights of at most twice
// as many rows as columns (n <= 2k). Measured on an H200 with bench/paths.py, 2026-12-03, L2 cold,
// bf16, µs, GEMV / tiled GEMM with exact weights (the default, bf16 weights computed in bf16 where the
// format allows, is faster still):
//   4096x14336 Q4_K  8 rows 28.0 / 31.6, 10 rows 34.8 / 31.7, 16 rows 41.2 / 32.0;
//              Q8_0  8 rows 62.7 / 38.8, 16 rows 76.0 / 38.9; IQ2_XS 16 rows 78.9 / 45.6
//   3072x12288 Q4_K 10 rows 30.1 / 24.4; 4096x4096 Q6_K 10 rows 20.7 / 15.4, IQ4_XS 10 rows 16.8 / 16.3
// Wider weights keep the GEMVs to kMaxGemvRows: there the int8-MMA GEMV of Q4_K, Q5_K and IQ4_XS
// wins (14336x4096 Q4_K 10 rows 37.4 / 48.5, 16 rows 45.6 / 50.1; IQ4_XS 16 rows 49.6 / 59.4; 2048x640
// Q5_0 10 rows 8.3 / 9.3) though the tiled GEMM wins for others there (Q6_K 16 rows 67.2 / 58.6, Q8_0
// 82.6 / 63.3). The GEMVs take at most kMaxGemvRows rows; the tiled GEMM serves to kMaxTiledGemmRows
// and the dense GEMM from there (bench/NOTES.md, "past 64 rows").
enum class MatmulPath : int { Gemv = 0, TiledGemm = 1, Dense = 2 };

constexpr int64_t kMinTiledGemmRows = 9;
constexpr int64_t kMaxTiledGemmRows = 64;

// The most rows of an n x k product that qmatmul sends to the GEMVs.
inline int64_t max_gemv_rows(bool tiled_gemm_runs, int64_t n, int64_t k) {
  return tiled_gemm_runs && n <= 2 * k ? kMinTiledGemmRows - 1 : kMaxGemvRows;
}

// exact: the caller asked for unrounded activations (qmatmul's `exact`), so never the GEMVs.
inline MatmulPath choose_matmul_path(int64_t rows, int64_t n, int64_t k, bool tiled_gemm_runs, bool exact) {
  if (!exact && rows <= max_gemv_rows(tiled_gemm_runs, n, k)) return MatmulPath::Gemv;
  return tiled_gemm_runs && rows <= kMaxTiledGemmRows ? MatmulPath::TiledGemm : MatmulPath::Dense;
}

// The expert-indexed matmul (qmatmul_id: T tokens, each routed to top_k of E experts) decides on T
// alone, a static shape, never on the ids (reading them would need a host sync): an expert receives
// at most T activation rows when a token's top_k ids are distinct, so up to kMaxGemvRows tokens one
// GEMV pass per selected expert serves all of its rows, each expert's weight read once whatever
// the number of tokens routed to it; more tokens take the grouped tiled GEMM (unrounded activations,
// as qmatmul from 17 rows), or the dense path where that does not run. Repeated ids in a token are
// allowed: the kernels then take an expert's rows in several groups.
inline MatmulPath choose_matmul_id_path(int64_t tokens, bool grouped_gemm_runs, bool exact) {
  if (!exact && tokens <= kMaxGemvRows) return MatmulPath::Gemv;
  return grouped_gemm_runs ? MatmulPath::TiledGemm : MatmulPath::Dense;
}

// block_values: the weight format's values per block (256, or 32 and NVFP4's 64: the formats of
// smaller blocks, whose MMA items are one block each); int8_mma: the device has int8 mma.sync (compute
// capability 8.0 or newer).
inline GemvKernel choose_gemv_kernel(int64_t rows, int block_values, bool int8_mma) {
  const int64_t min_mma_rows = block_values >= 256 ? kMinMmaRowsSuperBlocks : kMinMmaRowsSmallBlocks;
  return int8_mma && rows >= min_mma_rows ? GemvKernel::Int8Mma : GemvKernel::Dp4a;
}

}  // namespace torchext
