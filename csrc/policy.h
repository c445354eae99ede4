// Which kernel serves a matmul of `rows` activation rows: the one batch policy that every op,
// QuantLinear and WeightCache.matmul go through; torchext.ops.GEMV_MAX_ROWS mirrors kMaxGemvRows for
// nn.shared_input, and tests/test_matmul.py::test_gemv_max_rows_is_the_policy pins the two together.
#pragma once

#include <cstdint>

namespace torchext {

enum class MatmulPath : int { GemvQ8_1 = 0, DequantizeDense = 1 };

// Up to 8 rows the DP4A GEMV reads each weight byte once for all rows; beyond that a dense GEMM
// on the dequantized weight wins, its cost one dequantization pass plus tensor-core math.
// Measured on an H100 with bench/gemv.py, 2026-11-24, Q4_K, L2 cold: 4096x4096 takes 26.7 us for
// 8 rows by GEMV, 36.7 us for 16 rows dense (two 8-row GEMVs: 53 us); 128256x4096 takes 605 us
// for 8 rows, 1015 us for 16 dense (two GEMVs: 1210 us).
constexpr int64_t kMaxGemvRows = 8;

inline MatmulPath choose_matmul_path(int64_t rows) {
  return rows <= kMaxGemvRows ? MatmulPath::GemvQ8_1 : MatmulPath::DequantizeDense;
}

}  // namespace torchext
