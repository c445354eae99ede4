// rope_cache_write on the CPU: each (batch, row, head) in turn, the arithmetic of kernels/rope_cache.h.
#include <cmath>
#include <cstring>
#include <vector>

#include "csrc/cpu/kernels.h"
#include "kernels/rope_cache.h"

namespace torchext::cpu {
namespace {

// Head x of dim values (type t) -> out (type t, contiguous): normalised when norm.weight is set, then
// rotated by cos and sin [dim].
void rotate_head(const void* x, int64_t x0, HeadNorm norm, float eps, const float* cos, const float* sin,
                 int64_t dim, FloatType t, void* out, int64_t out0, std::vector<float>& v) {
  for (int64_t d = 0; d < dim; ++d) v[d] = load_float(x, x0 + d, t);
  if (norm.weight) {
    const float inverse = rms_inverse(row_sum_squares(x, t, x0, dim), dim, eps);
    for (int64_t d = 0; d < dim; ++d) v[d] = rms_norm_value(v[d], inverse, load_float(norm.weight, d, norm.type), t);
  }
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    float lo, hi;
    rotate_pair(v[i], v[i + half], cos[i], sin[i], cos[i + half], sin[i + half], lo, hi);
    store_float(out, out0 + i, t, lo);
    store_float(out, out0 + i + half, t, hi);
  }
}

}  // namespace

void rope_cache_write(const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos, const float* sin,
                      const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps, const RopeShape& s,
                      FloatType t, void* q_out, void* k_cache, void* v_cache) {
  std::vector<float> buf(size_t(s.dim));
  const size_t value_bytes = t == FloatType::F32 ? 4 : 2;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t r = 0; r < s.rows; ++r) {
      const int64_t p = pos[r];  // ops.h checked the position
      const float* c = cos + p * s.dim;
      const float* sn = sin + p * s.dim;
      for (int64_t h = 0; h < s.heads; ++h)
        rotate_head(q.data, b * q.batch_stride + r * q.row_stride + h * s.dim, q_norm, eps, c, sn, s.dim, t, q_out,
                    ((b * s.heads + h) * s.rows + r) * s.dim, buf);
      for (int64_t h = 0; h < s.kv_heads; ++h) {
        const int64_t cache0 = ((b * s.kv_heads + h) * s.keys + p) * s.dim;
        rotate_head(k.data, b * k.batch_stride + r * k.row_stride + h * s.dim, k_norm, eps, c, sn, s.dim, t, k_cache,
                    cache0, buf);
        const int64_t v0 = b * v.batch_stride + r * v.row_stride + h * s.dim;
        std::memcpy(static_cast<char*>(v_cache) + cache0 * value_bytes,
                    static_cast<const char*>(v.data) + v0 * value_bytes, size_t(s.dim) * value_bytes);
      }
    }
}

}  // namespace torchext::cpu
