// What rope_cache_write computes, shared by the CPU and CUDA kernels (which give the same bits: the
// norm's arithmetic and order are fused_q8_1_math.h's, each product and sum rounded on its own): a
// decoder layer's step between
// its q/k/v projections and its attention. Each q and k head is RMS-normalised over its dim values
// when a weight is given (q_norm / k_norm of Gemma 3, Qwen 3), rotated by the rotary embedding in
// rotate_half's order (pairs i and i + dim/2), and k with v is written into the static caches at the
// row's position; q comes out in cached_attention's layout.
#pragma once

#include <cstdint>

#include "kernels/fused_q8_1_math.h"

namespace torchext {

// q [batch, rows, heads, dim], k and v [batch, rows, kv_heads, dim]; a row's heads lie next to each
// other and a head's values are contiguous, while rows may be strided (views of a stacked projection):
// row (b, r) starts batch_stride * b + row_stride * r elements past data.
struct HeadRows {
  const void* data;
  int64_t batch_stride, row_stride;
};

// The caches are [batch, kv_heads, keys, dim]; pos [rows]; cos and sin (fp32) are the rotary tables by
// position, [at least keys, dim]: row r is rotated by cos[pos[r]] and sin[pos[r]].
struct RopeShape {
  int64_t batch, rows, heads, kv_heads, dim, keys;
};

// An optional per-head RMSNorm's weight [dim], fp32 or the activations' type (null: no norm).
struct HeadNorm {
  const void* weight;
  FloatType type;
};

// The rotation of pair (lo, hi) = (x[i], x[i + dim/2]): x * cos + rotate_half(x) * sin in fp32,
// rotate_half(x) = (-x[i + dim/2], x[i]); each product rounded before the sum.
TORCHEXT_HD void rotate_pair(float lo, float hi, float cos_lo, float sin_lo, float cos_hi, float sin_hi, float& out_lo,
                             float& out_hi) {
  out_lo = add_rn(mul_rn(lo, cos_lo), mul_rn(-hi, sin_lo));
  out_hi = add_rn(mul_rn(hi, cos_hi), mul_rn(lo, sin_hi));
}

}  // namespace torchext
