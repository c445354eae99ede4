// Activation rows as the dot products read them: row r's Q8_1 blocks, numbered from the block
// that covers the weight block's first value. Two storages behind one interface:
//   Q8_1BlockRows  36-byte blocks as quantize_q8_1 writes them (CPU; long rows on the GPU)
//   Q8_1SplitRows  quants and scales apart, as the GPU stages them in shared memory: each 16
//                  bytes of quants is one aligned 16-byte load, (d, s) one 8-byte load
#pragma once

#include "kernels/float_types.h"

namespace torchext {

// s below is the block's sum scaled down by kQ8SumScale, and a weight's offset meets it scaled up by as
// much: d * sum(qs) reaches 32x fp32's largest value (a block of activations near 3.4e38, or same-signed
// ones from ~1.06e37), which would make every output it meets inf or NaN (0 * inf where a format has no
// offset), while d * sum(qs) / 2^7 stays below 8.6e37 and the largest offset times 2^7 (fp16's 65504
// times a 6-bit min) below 5.4e8. Both scalings are exact, so each product is the bits of
// offset * (d * sum(qs)) wherever that was finite (but for block sums below ~1.5e-36, where the scaled
// sum is an fp32 subnormal: an error under 2^-150 * 2^7 a block, far inside the GEMVs' bound).
constexpr float kQ8SumScale = 128.0f;

struct alignas(8) Q8Scales {
  float d, s;

  // From a Q8_1 block's scale word (blocks.h): d, and s = d * sum(qs) / kQ8SumScale, the sum of the
  // rounded inputs that a weight block's offset (min, zero point) times kQ8SumScale meets.
  static TORCHEXT_HD Q8Scales of_word(uint32_t v) {
    const float d = bits_float(v & ~kQ8SumMask);
    const int sum_qs = int(v << (32 - kQ8SumBits)) >> (32 - kQ8SumBits);  // sign-extend 13 bits
    return Q8Scales{d, d * (float(sum_qs) * (1.0f / kQ8SumScale))};
  }
};

template <int B>
struct Q8_1BlockRows {
  const block_q8_1* row[B];

  // words w0 .. w0+N-1 of the 8 quant words of block j
  template <int N>
  TORCHEXT_HD void quants(int r, int j, int w0, int (&q)[N]) const {
    const int* words = reinterpret_cast<const int*>(row[r][j].qs);  // qs sits at byte 4
    TORCHEXT_UNROLL
    for (int i = 0; i < N; ++i) q[i] = words[w0 + i];
  }
  TORCHEXT_HD Q8Scales scales(int r, int j) const { return Q8Scales::of_word(row[r][j].scale); }
};

template <int B>
struct Q8_1SplitRows {
  const int8_t* qs[B];      // 32 quants per block, 16-byte aligned
  const Q8Scales* ds[B];

  template <int N>
  TORCHEXT_HD void quants(int r, int j, int w0, int (&q)[N]) const {
    static_assert(N == 4 || N == 2, "16 or 8 bytes at a time");
    const int8_t* p = qs[r] + 32 * j + 4 * w0;
#if defined(__CUDA_ARCH__)
    if constexpr (N == 4) {
      const int4 v = *reinterpret_cast<const int4*>(p);
      q[0] = v.x, q[1] = v.y, q[2] = v.z, q[3] = v.w;
    } else {
      const int2 v = *reinterpret_cast<const int2*>(p);
      q[0] = v.x, q[1] = v.y;
    }
#else
    std::memcpy(q, p, 4 * N);
#endif
  }
  TORCHEXT_HD Q8Scales scales(int r, int j) const { return ds[r][j]; }
};

}  // namespace torchext
