// Which kernel serves a matmul of `rows` activation rows: the one batch policy that every op,
// QuantLinear and WeightCache.matmul go through (tests/test_policy.py pins it).
#pragma once

#include <cstdint>

namespace torchext {

enum class MatmulPath : int { GemvQ8_1 = 0, DequantizeDense = 1 };

// Up to 8 rows the DP4A GEMV reads each weight byte once for all rows and stays memory-bound
// (SPEC: batch 8 within 1.5x of batch 1). Beyond that a dense GEMM on the dequantized weight
// wins: its cost is one dequantization pass plus tensor-core math.
// TODO(perf issue): re-measure the crossover on H100 with bench/gemv.py.
constexpr int64_t kMaxGemvRows = 8;

inline MatmulPath choose_matmul_path(int64_t rows) {
  return rows <= kMaxGemvRows ? MatmulPath::GemvQ8_1 : MatmulPath::DequantizeDense;
}

}  // namespace torchext
