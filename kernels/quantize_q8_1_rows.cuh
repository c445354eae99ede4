// The Q8_1 quantization kernel, over any source of float rows: a quad of lanes per 32-value block,
// lane j = 0..3 of a quad holding the 8 consecutive values 8j .. 8j+7, read with 16-byte loads.
// quantize_q8_1.cu quantizes stored activations; fused_q8_1.cu computes the values (RMSNorm, a gated
// GELU) on the way in, so that they are never written to memory.
#pragma once

#include "kernels/launch.cuh"
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

// x[row_base + col .. col+8) = v rounded to t, the columns below k: load_group8's layout, written.
__device__ __forceinline__ void store_group8(void* x, FloatType t, int64_t row_base, int64_t col, int64_t k,
                                             bool vector_ok, const float (&v)[8]) {
  if (vector_ok && col + 8 <= k) {
    if (t == FloatType::F32) {
      float4* p = reinterpret_cast<float4*>(static_cast<float*>(x) + row_base + col);
      p[0] = make_float4(v[0], v[1], v[2], v[3]);
      p[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      union {
        uint4 raw;
        uint16_t h[8];
      } u;
#pragma unroll
      for (int i = 0; i < 8; ++i) u.h[i] = t == FloatType::F16 ? float_to_fp16(v[i]) : float_to_bf16(v[i]);
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(x) + row_base + col) = u.raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (col + i < k) store_float(x, row_base + col + i, t, v[i]);
  }
}

// Whether float rows [rows, k] at x can be read (or written) 16 bytes at a time (every row start aligned).
inline bool rows_allow_vector_loads(const void* x, FloatType t, int64_t k) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && k % (t == FloatType::F32 ? 4 : 8) == 0;
}

// One lane's share of a block: its 8 quants packed in two words, and the block's scale word.
struct Q8_1Quad {
  uint32_t qs[2];
  uint32_t scale;
};

// Every lane of the warp must call this (it shuffles within quads).
__device__ __forceinline__ Q8_1Quad quantize_q8_1_quad(const float (&v)[8]) {
  float amax = fabsf(v[0]);
#pragma unroll
  for (int i = 1; i < 8; ++i) amax = nan_max(amax, fabsf(v[i]));
  amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  const float d = q8_1_scale(amax);
  Q8_1Quad out{{0u, 0u}, 0u};
  int sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int8_t q = quantize_q8_1_value(v[i], d);
    sum += q;
    out.qs[i / 4] |= uint32_t(uint8_t(q)) << (8 * (i % 4));
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  out.scale = q8_1_scale_word(d, sum);
  return out;
}

// Lane j (0..3) of a quad writes its share q of Q8_1 block i.
__device__ __forceinline__ void store_q8_1_quad(block_q8_1* out, int64_t i, int j, const Q8_1Quad& q) {
  uint32_t* qs = reinterpret_cast<uint32_t*>(out[i].qs);  // qs sits at byte 4: 4-byte aligned
  qs[2 * j] = q.qs[0];
  qs[2 * j + 1] = q.qs[1];
  if (j == 0) out[i].scale = q.scale;
}

constexpr int kQuantizeThreads = 256;

// Thread g quantizes values 8g .. 8g+7 of the padded rows. A warp covers 8 blocks, and a row is a
// whole number of 8-block super-blocks, so every warp lies inside one row (or wholly past the last):
// Source::load(row, col, k, v) may be warp-collective, and gets all 32 lanes. It fills v with the
// values at columns col .. col+7 of row, zeros past k.
template <class Source>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_q8_1_rows_kernel(Source source, int64_t rows, int64_t k, block_q8_1* __restrict__ out) {
  allow_dependent_grids();
  wait_for_prior_grids();
  const int64_t blocks = q8_1_blocks_per_row(k);
  const int64_t g = int64_t(blockIdx.x) * kQuantizeThreads + threadIdx.x;  // group of 8 values
  const int64_t i = g / 4;                                                  // Q8_1 block
  if (i >= rows * blocks) return;  // whole warps: the shuffles below keep all 32 lanes
  float v[8];
  source.load(i / blocks, (i % blocks) * kQ8Block + 8 * (g % 4), k, v);
  store_q8_1_quad(out, i, int(g % 4), quantize_q8_1_quad(v));
}

// rows x k values of `source` -> rows x q8_1_blocks_per_row(k) Q8_1 blocks on `stream`.
template <class Source>
cudaError_t launch_quantize_q8_1_rows(const Source& source, int64_t rows, int64_t k, block_q8_1* out,
                                      cudaStream_t stream) {
  const int64_t groups = rows * q8_1_blocks_per_row(k) * 4;
  return launch_dependent(quantize_q8_1_rows_kernel<Source>, grid_for(groups, kQuantizeThreads), kQuantizeThreads, 0,
                          stream, source, rows, k, out);
}

}  // namespace torchext
