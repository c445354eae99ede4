// AVX2 helpers shared by the CPU kernels' x86-64 paths. Functions marked TORCHEXT_AVX2 may use
// AVX2, FMA and F16C; callers reach them only when has_avx2() (kernels.h) says the CPU has all three,
// so the library still loads and runs on any x86-64 CPU.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cmath>

#include "kernels/float_types.h"

#define TORCHEXT_AVX2_TARGET "avx2,fma,f16c"
#define TORCHEXT_AVX2 __attribute__((target(TORCHEXT_AVX2_TARGET)))
#define TORCHEXT_AVX2_INLINE __attribute__((target(TORCHEXT_AVX2_TARGET), always_inline)) inline

namespace torchext::cpu {

// fp16 -> fp32 in one instruction (the portable fp16_to_float is bit arithmetic; same result)
TORCHEXT_AVX2_INLINE float half(fp16_bits h) { return _cvtsh_ss(h); }

// Eight elements of type t at p + i as floats (exact widening).
TORCHEXT_AVX2_INLINE __m256 load_eight(const void* p, int64_t i, FloatType t) {
  if (t == FloatType::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (t == FloatType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Eight floats stored as `ot`, rounded to nearest even as store_float rounds them (bf16: NaN stays a
// quiet NaN).
TORCHEXT_AVX2_INLINE void store_eight(void* out, int64_t i, FloatType ot, __m256 v) {
  if (ot == FloatType::F32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  } else if (ot == FloatType::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i h = _mm256_blendv_epi8(rounded, quiet, is_nan);  // 8 x uint16 in the low halves
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), packed);
  }
}

// Eight floats rounded to `t` and widened back, as round_to gives them (fused_q8_1_math.h).
TORCHEXT_AVX2_INLINE __m256 round_eight(__m256 v, FloatType t) {
  if (t == FloatType::F32) return v;
  uint16_t h[8];
  store_eight(h, 0, t, v);
  return load_eight(h, 0, t);
}

// rms_norm_value (fused_q8_1_math.h) of eight floats: (x * inverse) * w, each product rounded on its own,
// then rounded to t.
TORCHEXT_AVX2_INLINE __m256 rms_norm_eight(__m256 x, __m256 inverse, __m256 w, FloatType t) {
  return round_eight(_mm256_mul_ps(_mm256_mul_ps(x, inverse), w), t);
}

// The sum of eight floats.
TORCHEXT_AVX2_INLINE float sum_lanes(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// exp(x) for eight floats: x = n ln2 + r (|r| <= ln2/2, ln2 split in two so n ln2 is exact), a
// degree-6 polynomial for exp(r), 2^n through the exponent bits; within ~2 ulp of expf, 0 below
// -87.3 and inf above 88.7 (as expf).
TORCHEXT_AVX2_INLINE __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.3365f);
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n in two halves, so that n = 128 (x near 88.7) does not overflow the exponent field
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half_n = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half_n, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half_n), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

}  // namespace torchext::cpu

#endif  // x86-64
