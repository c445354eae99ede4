// rope_cache_write on the CPU: each (batch, row, head) in turn, the arithmetic of kernels/rope_cache.h;
// on x86-64 its pairs (i, i + dim/2) eight at a time, each product and sum rounded on its own (no FMA):
// the same bits.
#include <cmath>
#include <cstring>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/kernels.h"
#include "kernels/rope_cache.h"

namespace torchext::cpu {
namespace {

// Pair i of a head: x[i] and x[i + half], normalised by `inverse` and the weights when norm.weight is
// set (rounded to t), rotated by cos and sin, stored into out.
void rotate_pair_at(const void* x, int64_t x0, HeadNorm norm, float inverse, const float* cos, const float* sin,
                    int64_t half, FloatType t, void* out, int64_t out0, int64_t i) {
  float v_lo = load_float(x, x0 + i, t), v_hi = load_float(x, x0 + i + half, t);
  if (norm.weight) {
    v_lo = rms_norm_value(v_lo, inverse, load_float(norm.weight, i, norm.type), t);
    v_hi = rms_norm_value(v_hi, inverse, load_float(norm.weight, i + half, norm.type), t);
  }
  float lo, hi;
  rotate_pair(v_lo, v_hi, cos[i], sin[i], cos[i + half], sin[i + half], lo, hi);
  store_float(out, out0 + i, t, lo);
  store_float(out, out0 + i + half, t, hi);
}

#if defined(__x86_64__) || defined(_M_X64)
// rotate_pair_at for pairs 0 .. 8m-1, eight at a time; returns 8m, the pairs done.
TORCHEXT_AVX2 int64_t rotate_pairs_avx2(const void* x, int64_t x0, HeadNorm norm, float inverse, const float* cos,
                                        const float* sin, int64_t half, FloatType t, void* out, int64_t out0) {
  const __m256 inv = _mm256_set1_ps(inverse), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    __m256 lo = load_eight(x, x0 + i, t), hi = load_eight(x, x0 + i + half, t);
    if (norm.weight) {
      lo = rms_norm_eight(lo, inv, load_eight(norm.weight, i, norm.type), t);
      hi = rms_norm_eight(hi, inv, load_eight(norm.weight, i + half, norm.type), t);
    }
    const __m256 lo_out = _mm256_add_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(cos + i)),
                                        _mm256_mul_ps(_mm256_xor_ps(hi, sign), _mm256_loadu_ps(sin + i)));
    const __m256 hi_out = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(cos + i + half)),
                                        _mm256_mul_ps(lo, _mm256_loadu_ps(sin + i + half)));
    store_eight(out, out0 + i, t, lo_out);
    store_eight(out, out0 + i + half, t, hi_out);
  }
  return i;
}
#endif

// Head x of dim values (type t) -> out (type t, contiguous): normalised when norm.weight is set, then
// rotated by cos and sin [dim].
void rotate_head(const void* x, int64_t x0, HeadNorm norm, float eps, const float* cos, const float* sin,
                 int64_t dim, FloatType t, void* out, int64_t out0) {
  const float inverse = norm.weight ? rms_inverse(sum_squares(x, t, x0, dim), dim, eps) : 1.0f;
  const int64_t half = dim / 2;
  int64_t i = 0;
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = has_avx2();
  if (avx2) i = rotate_pairs_avx2(x, x0, norm, inverse, cos, sin, half, t, out, out0);
#endif
  for (; i < half; ++i) rotate_pair_at(x, x0, norm, inverse, cos, sin, half, t, out, out0, i);
}

}  // namespace

void rope_cache_write(const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos, const float* sin,
                      const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps, const RopeShape& s,
                      FloatType t, void* q_out, void* k_cache, void* v_cache) {
  const size_t value_bytes = t == FloatType::F32 ? 4 : 2;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t r = 0; r < s.rows; ++r) {
      const int64_t p = pos[r];  // ops.h checked the position
      const float* c = cos + p * s.dim;
      const float* sn = sin + p * s.dim;
      for (int64_t h = 0; h < s.heads; ++h)
        rotate_head(q.data, b * q.batch_stride + r * q.row_stride + h * s.dim, q_norm, eps, c, sn, s.dim, t, q_out,
                    ((b * s.heads + h) * s.rows + r) * s.dim);
      for (int64_t h = 0; h < s.kv_heads; ++h) {
        const int64_t cache0 = ((b * s.kv_heads + h) * s.keys + p) * s.dim;
        rotate_head(k.data, b * k.batch_stride + r * k.row_stride + h * s.dim, k_norm, eps, c, sn, s.dim, t, k_cache,
                    cache0);
        const int64_t v0 = b * v.batch_stride + r * v.row_stride + h * s.dim;
        std::memcpy(static_cast<char*>(v_cache) + cache0 * value_bytes,
                    static_cast<const char*>(v.data) + v0 * value_bytes, size_t(s.dim) * value_bytes);
      }
    }
}

}  // namespace torchext::cpu
