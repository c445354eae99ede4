// Q8_1 quantization of 32-value blocks by quads of lanes: lane j = 0..3 of a quad holds the 8
// consecutive values 8j .. 8j+7 of one block, loaded with 16-byte loads. Shared by the
// standalone quantize kernel and the GEMV, which quantizes its activations into shared memory.
#pragma once

#include "kernels/float_types.h"

namespace torchext {

// v[0..8) = x[row_base + col .. col+8), zero past k. `vector_ok`: rows start 16-byte aligned
// and k is a multiple of 8, so whole groups can be read with 16-byte loads.
__device__ __forceinline__ void load_group8(const void* x, FloatType t, int64_t row_base, int64_t col, int64_t k,
                                            bool vector_ok, float (&v)[8]) {
  if (vector_ok && col + 8 <= k) {
    if (t == FloatType::F32) {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + row_base + col);
      const float4 a = p[0], b = p[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      union {
        uint4 raw;
        uint16_t h[8];
      } u;
      u.raw = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + row_base + col);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = t == FloatType::F16 ? fp16_to_float(u.h[i]) : bf16_to_float(u.h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = col + i < k ? load_float(x, row_base + col + i, t) : 0.0f;
  }
}

// One lane's share of a block: its 8 quants packed in two words, and the block's d and s bits.
struct Q8_1Quad {
  uint32_t qs[2];
  fp16_bits d, s;
};

// Every lane of the warp must call this (it shuffles within quads). The sum follows the fixed
// order of float_types.h, which csrc/cpu mirrors.
__device__ __forceinline__ Q8_1Quad quantize_q8_1_quad(const float (&v)[8]) {
  float amax = fabsf(v[0]), p = v[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) {
    amax = nan_max(amax, fabsf(v[i]));
    p += v[i];
  }
  amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  float s = p + __shfl_xor_sync(0xffffffffu, p, 2);  // p_j + p_{j^2}
  s += __shfl_xor_sync(0xffffffffu, s, 1);          // (p0 + p2) + (p1 + p3)
  Q8_1Quad out{{0u, 0u}, q8_1_scale_bits(amax), q8_1_sum_bits(s, amax)};
#pragma unroll
  for (int i = 0; i < 8; ++i) out.qs[i / 4] |= uint32_t(uint8_t(quantize_q8_1_value(v[i], amax))) << (8 * (i % 4));
  return out;
}

}  // namespace torchext
