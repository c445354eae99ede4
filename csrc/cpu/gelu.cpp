#include <torch/csrc/stable/ops.h>

#include <cmath>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/kernels.h"
#include "kernels/activation_math.h"

namespace torchext::cpu {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
// GELU of eight floats. tanh form: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)). erf form: erf by
// Abramowitz and Stegun 7.1.26 (absolute error <= 1.5e-7, with erf(-z) = -erf(z)), so that the
// output's error stays within a few fp32 ulp of |x|, as glibc's erff gives it; non-finite inputs
// give what 0.5 x (1 + f(x)) gives (NaN for -inf, inf for inf).
template <bool kTanh>
TORCHEXT_AVX2_INLINE __m256 gelu8(__m256 x) {
  if constexpr (kTanh) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
  } else {
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
    const __m256 az = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    const __m256 e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), az), az));
    const __m256 erf_abs = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
    const __m256 erf = _mm256_or_ps(erf_abs, sign);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
  }
}

// bias[(i + l) % channels] for l = 0..7, as floats.
TORCHEXT_AVX2_INLINE __m256 bias_eight(const void* bias, int64_t i, int64_t channels, FloatType t) {
  const int64_t c = i % channels;
  if (c + 8 <= channels) return load_eight(bias, c, t);
  alignas(32) float lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = load_float(bias, (i + l) % channels, t);
  return _mm256_load_ps(lanes);
}

template <bool kTanh>
TORCHEXT_AVX2 void gelu_avx2(const void* x, const void* bias, void* out, int64_t begin, int64_t end, int64_t channels,
                             FloatType t) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 v = load_eight(x, i, t);
    if (bias != nullptr) v = _mm256_add_ps(v, bias_eight(bias, i, channels, t));
    store_eight(out, i, t, gelu8<kTanh>(v));
  }
  for (; i < end; ++i) {  // the tail, one lane at a time through the same arithmetic
    float v = load_float(x, i, t);
    if (bias != nullptr) v += load_float(bias, i % channels, t);
    alignas(32) float lanes[8] = {v};
    _mm256_store_ps(lanes, gelu8<kTanh>(_mm256_load_ps(lanes)));
    store_float(out, i, t, lanes[0]);
  }
}
#endif

}  // namespace

void gelu(const void* x, const void* bias, void* out, int64_t numel, int64_t channels, FloatType t, bool tanh_form) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = has_avx2();
  if (avx2) {
    torch::stable::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
      if (tanh_form) gelu_avx2<true>(x, bias, out, begin, end, channels, t);
      else gelu_avx2<false>(x, bias, out, begin, end, channels, t);
    });
    return;
  }
#endif
  torch::stable::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float v = load_float(x, i, t);
      if (bias != nullptr) v += load_float(bias, i % channels, t);
      store_float(out, i, t, tanh_form ? gelu_tanh(v) : gelu_erf(v));
    }
  });
}

}  // namespace torchext::cpu
