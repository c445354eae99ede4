// Which kernel serves a matmul of `rows` activation rows: the one batch policy that every op,
// QuantLinear and WeightCache.matmul go through (csrc/ops.h asks gemv_serves, the CUDA GEMV
// launcher asks choose_gemv_kernel). torchext.ops.GEMV_MAX_ROWS mirrors kMaxGemvRows for
// nn.shared_input, and tests/test_matmul.py::test_gemv_max_rows_is_the_policy pins the two together.
#pragma once

#include <cstdint>

namespace torchext {

enum class GemvKernel : int { Dp4a = 0, Int8Mma = 1 };

// Up to 16 rows a GEMV on Q8_1 activations reads each weight byte once for all rows; beyond that
// a dense GEMM on the dequantized weight, its cost one dequantization pass plus tensor-core math.
// Measured on an H100 with bench/gemv.py, 2026-11-24, L2 cold: 16 rows by the tensor-core GEMV
// take 17.7 us on 4096x4096 Q4_K and 307 us on 128256x4096 (dense: 36.7 and 1015 us).
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
constexpr int64_t kMinMmaRowsSmallBlocks = 9;  // 32-value formats
constexpr int64_t kMaxMmaRows = kMaxGemvRows;  // one launch of the MMA kernel takes up to 16 rows
constexpr int64_t kMaxDp4aRows = 8;            // the DP4A kernel stages up to 8 rows

inline bool gemv_serves(int64_t rows) { return rows <= kMaxGemvRows; }

// block_values: the weight format's values per block (256 or 32); int8_mma: the device has int8
// mma.sync (compute capability 8.0 or newer).
inline GemvKernel choose_gemv_kernel(int64_t rows, int block_values, bool int8_mma) {
  const int64_t min_mma_rows = block_values == 256 ? kMinMmaRowsSuperBlocks : kMinMmaRowsSmallBlocks;
  return int8_mma && rows >= min_mma_rows ? GemvKernel::Int8Mma : GemvKernel::Dp4a;
}

}  // namespace torchext
