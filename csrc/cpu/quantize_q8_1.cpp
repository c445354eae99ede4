#include <torch/csrc/stable/ops.h>

#include <cmath>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/kernels.h"

namespace torchext::cpu {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
// round-half-away-from-zero of eight floats, exactly (as roundf): truncate, then step away from zero
// where the dropped fraction is at least one half (v - trunc(v) is exact).
TORCHEXT_AVX2_INLINE __m256 round_half_away(__m256 v) {
  const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
  const __m256 step = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, _mm256_set1_ps(-0.0f)));
  return _mm256_add_ps(t, _mm256_and_ps(step, _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ)));
}

// One block of 32 values x[0..31] (all inside K) -> out: the scalar rule, vectorized.
TORCHEXT_AVX2 void quantize_block_avx2(const void* x, int64_t i, FloatType xt, block_q8_1& out) {
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 nan = _mm256_setzero_ps();
  for (int g = 0; g < 4; ++g) {
    v[g] = load_eight(x, i + 8 * g, xt);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[g], abs_mask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[g], v[g], _CMP_UNORD_Q));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  const float a = _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(m);  // max_ps drops NaN: mark it
  const float d = q8_1_scale(a);
  if (!(d > 0.0f)) {  // zero or non-finite block: qs = 0 (q8_1_scale_word keeps d's bits)
    out.scale = q8_1_scale_word(d, 0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.qs), _mm256_setzero_si256());
    return;
  }
  const __m256 dv = _mm256_set1_ps(d);
  __m256i q[4];
  for (int g = 0; g < 4; ++g) q[g] = _mm256_cvtps_epi32(round_half_away(_mm256_div_ps(v[g], dv)));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  // int32 -> int8 in value order: the packs interleave 128-bit halves, the permute restores the order
  const __m256i w16 = _mm256_packs_epi32(_mm256_permute2x128_si256(q[0], q[1], 0x20),
                                         _mm256_permute2x128_si256(q[0], q[1], 0x31));
  const __m256i x16 = _mm256_packs_epi32(_mm256_permute2x128_si256(q[2], q[3], 0x20),
                                         _mm256_permute2x128_si256(q[2], q[3], 0x31));
  const __m256i b8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(w16, x16), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.qs), b8);
  out.scale = q8_1_scale_word(d, _mm_cvtsi128_si32(s));
}
#endif

// The rule of float_types.h for block i of the rows (values past K are zeros).
void quantize_block(const void* x, FloatType xt, int64_t k, int64_t blocks, int64_t i, block_q8_1& b) {
  const int64_t row = i / blocks, col0 = (i % blocks) * kQ8Block;
  float v[kQ8Block];
  float amax = 0.0f;
  for (int l = 0; l < kQ8Block; ++l) {
    v[l] = col0 + l < k ? load_float(x, row * k + col0 + l, xt) : 0.0f;  // zero padding past K
    amax = nan_max(amax, std::fabs(v[l]));
  }
  const float d = q8_1_scale(amax);
  int sum = 0;
  for (int l = 0; l < kQ8Block; ++l) {
    b.qs[l] = quantize_q8_1_value(v[l], d);
    sum += b.qs[l];
  }
  b.scale = q8_1_scale_word(d, sum);
}

}  // namespace

void quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out) {
  const int64_t blocks = q8_1_blocks_per_row(k);
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = has_avx2();
#else
  constexpr bool avx2 = false;
#endif
  torch::stable::parallel_for(0, rows * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
#if defined(__x86_64__) || defined(_M_X64)
      const int64_t col0 = (i % blocks) * kQ8Block;
      if (avx2 && col0 + kQ8Block <= k) {
        quantize_block_avx2(x, (i / blocks) * k + col0, xt, out[i]);
        continue;
      }
#endif
      quantize_block(x, xt, k, blocks, i, out[i]);
    }
  });
}

}  // namespace torchext::cpu
