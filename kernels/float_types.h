// Element types of activations and outputs, and their conversions to and from fp32,
// identical on host and device (round to nearest even).
#pragma once

#include "blocks.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace torchext {

enum class FloatType : int { F32, F16, BF16 };

TORCHEXT_HD float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  std::memcpy(&f, &bits, 4);
#endif
  return f;
}

TORCHEXT_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
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

// Q8_1 quantization of one 32-value block (ggml's CUDA rule): d = amax/127,
// qs = round-half-away(x/d) (0 where amax is 0), s = sum of the inputs. A block with a
// non-finite input stores d = s = NaN and qs = 0, so every output it touches is NaN.
// The fp32 sum is taken in a fixed order, so that every device stores the same s: the four
// groups of 8 consecutive values are summed left to right into p0..p3, then
// s = (p0 + p2) + (p1 + p3) (the CUDA kernels' lane-quad reduction).
constexpr fp16_bits kFp16NaN = 0x7e00;

TORCHEXT_HD int8_t quantize_q8_1_value(float x, float amax) {
  if (amax == 0.0f || !(amax <= 3.402823466e38f)) return 0;
  return int8_t(roundf(x / (amax / 127.0f)));
}
TORCHEXT_HD fp16_bits q8_1_scale_bits(float amax) {
  return amax <= 3.402823466e38f ? float_to_fp16(amax / 127.0f) : kFp16NaN;
}
TORCHEXT_HD fp16_bits q8_1_sum_bits(float sum, float amax) {
  return amax <= 3.402823466e38f ? float_to_fp16(sum) : kFp16NaN;  // one NaN on every device
}

// max that keeps a NaN, so that a non-finite input marks its Q8_1 block.
TORCHEXT_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

}  // namespace torchext
