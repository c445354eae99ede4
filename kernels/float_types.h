// Element types of activations and outputs, and their conversions to and from fp32,
// identical on host and device (round to nearest even).
#pragma once

#include "blocks.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace torchext {

enum class FloatType : int { F32, F16, BF16 };

TORCHEXT_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

TORCHEXT_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
#endif
}

TORCHEXT_HD float load_float(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::F16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case FloatType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

TORCHEXT_HD void store_float(void* p, int64_t i, FloatType t, float v) {
  switch (t) {
    case FloatType::F16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); break;
    case FloatType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Sizes shared by every Q8_1 producer and consumer: activations are padded to whole
// super-blocks, so one Q8_1 row serves weights of any format with the same K.
inline constexpr int64_t q8_1_blocks_per_row(int64_t k) {
  return (k + kSuperBlock - 1) / kSuperBlock * (kSuperBlock / kQ8Block);
}

// Q8_1 quantization of one 32-value block (block_q8_1 in blocks.h): d = amax/127 rounded up (in
// magnitude) to fp16's 10 mantissa bits, in fp32's exponent range; qs = round-half-away(x/d) with
// that d. Rounding d up keeps |x/d| <= 127, so |x - d*qs| <= d/2 holds for every value, even where
// d is an fp32 subnormal (amax below ~2e-37) and the rounding is coarse; qs = 0 where amax is 0.
// A block with a non-finite input stores d = NaN, sum 0 and qs = 0, so every output it touches is
// NaN.
constexpr uint32_t kQ8SumBits = 13;
constexpr uint32_t kQ8SumMask = (1u << kQ8SumBits) - 1u;
constexpr uint32_t kQ8NaNWord = 0x7fc00000u;  // a quiet NaN d with sum 0

// d of a block whose largest |x| is amax: amax/127 with its low 13 mantissa bits rounded up (no
// overflow: amax/127 is far below FLT_MAX); NaN when amax is not finite.
TORCHEXT_HD float q8_1_scale(float amax) {
  if (!(amax <= 3.402823466e38f)) return bits_float(kQ8NaNWord);
  return bits_float((float_bits(amax / 127.0f) + kQ8SumMask) & ~kQ8SumMask);
}
TORCHEXT_HD int8_t quantize_q8_1_value(float x, float d) {
  if (!(d > 0.0f)) return 0;  // amax 0, or a non-finite block (d NaN)
  return int8_t(roundf(x / d));
}
TORCHEXT_HD uint32_t q8_1_scale_word(float d, int sum_qs) {
  return float_bits(d) | (uint32_t(sum_qs) & kQ8SumMask);
}

// max that keeps a NaN, so that a non-finite input marks its Q8_1 block.
TORCHEXT_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

}  // namespace torchext
