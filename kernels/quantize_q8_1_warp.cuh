// Q8_1 quantization of one 32-value block by one warp, lane l holding value l: shared by the
// standalone quantize kernel and the GEMV, which quantizes its activations into shared memory.
#pragma once

#include "kernels/float_types.h"

namespace torchext {

__device__ __forceinline__ void quantize_q8_1_warp(float v, int lane, block_q8_1& out) {
  float amax = fabsf(v), sum = v;
#pragma unroll
  for (int m = 16; m > 0; m /= 2) {  // xor butterfly: the order csrc/cpu/quantize_q8_1.cpp mirrors
    amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    sum += __shfl_xor_sync(0xffffffffu, sum, m);
  }
  out.qs[lane] = quantize_q8_1_value(v, amax);
  if (lane == 0) {
    out.d = q8_1_scale_bits(amax);
    out.s = float_to_fp16(sum);
  }
}

}  // namespace torchext
