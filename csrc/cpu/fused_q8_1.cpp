// Fused producers of Q8_1 activations on the CPU. There is no launch to save here: each computes its
// values with the arithmetic of kernels/fused_q8_1_math.h (torchext.gelu's kernel for the GELU),
// stores them in the activations' type as the unfused ops do, and quantizes them with quantize_q8_1's
// own kernel, so that the bytes are those of the unfused ops and of the CUDA kernels.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <vector>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/kernels.h"
#include "kernels/activation_math.h"
#include "kernels/fused_q8_1_math.h"

namespace torchext::cpu {
namespace {

size_t element_bytes(FloatType t) { return t == FloatType::F32 ? sizeof(float) : sizeof(uint16_t); }

// One row's work, x[base .. base+k): its sum of squares, its normalised values y = (x * inverse) * w
// rounded to xt, and the residual sum s = residual + t (t = x, or x normalised by x_weight) rounded to xt.
// The portable loops, and on x86-64 the same arithmetic eight values at a time (products and sums
// rounded one by one, no FMA: the same bits; the sum of squares keeps its 32 partial sums in four
// vectors, lane l of vector v partial sum 8v + l), the scalar loops finishing the row.
struct RowNorm {
  const void* x;
  FloatType xt;
  int64_t base, k;

  float sum_squares() const {
    float partial[kRmsLanes] = {};
    int64_t done = 0;
#if defined(__x86_64__) || defined(_M_X64)
    static const bool avx2 = has_avx2();
    if (avx2) done = sum_squares_avx2(partial);
#endif
    return finish_row_sum_squares(partial, x, xt, base, done, k);
  }

  void normalise(float inverse, const void* w, FloatType wt, void* y) const {
    int64_t j = 0;
#if defined(__x86_64__) || defined(_M_X64)
    static const bool avx2 = has_avx2();
    if (avx2) j = normalise_avx2(inverse, w, wt, y);
#endif
    for (; j < k; ++j)
      store_float(y, base + j, xt, rms_norm_value(load_float(x, base + j, xt), inverse, load_float(w, j, wt), xt));
  }

  void add_to(const void* residual, float inverse, const void* x_weight, FloatType xwt, void* sum) const {
    int64_t j = 0;
#if defined(__x86_64__) || defined(_M_X64)
    static const bool avx2 = has_avx2();
    if (avx2) j = add_to_avx2(residual, inverse, x_weight, xwt, sum);
#endif
    for (; j < k; ++j) {
      const float v = load_float(x, base + j, xt);
      const float t = x_weight ? rms_norm_value(v, inverse, load_float(x_weight, j, xwt), xt) : v;
      store_float(sum, base + j, xt, residual_sum_value(load_float(residual, base + j, xt), t, xt));
    }
  }

#if defined(__x86_64__) || defined(_M_X64)
  // The x86-64 loops: each returns how many of the row's values it did (whole vectors).
  TORCHEXT_AVX2 int64_t sum_squares_avx2(float (&partial)[kRmsLanes]) const {
    __m256 acc[kRmsLanes / 8] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t j = 0;
    for (; j + kRmsLanes <= k; j += kRmsLanes) {
      for (int v = 0; v < kRmsLanes / 8; ++v) {
        const __m256 x8 = load_eight(x, base + j + 8 * v, xt);
        acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(x8, x8));
      }
    }
    for (int v = 0; v < kRmsLanes / 8; ++v) _mm256_storeu_ps(partial + 8 * v, acc[v]);
    return j;
  }

  TORCHEXT_AVX2 int64_t normalise_avx2(float inverse, const void* w, FloatType wt, void* y) const {
    const __m256 inv = _mm256_set1_ps(inverse);
    int64_t j = 0;
    for (; j + 8 <= k; j += 8)
      store_eight(y, base + j, xt, _mm256_mul_ps(_mm256_mul_ps(load_eight(x, base + j, xt), inv), load_eight(w, j, wt)));
    return j;
  }

  TORCHEXT_AVX2 int64_t add_to_avx2(const void* residual, float inverse, const void* x_weight, FloatType xwt,
                                    void* sum) const {
    const __m256 inv = _mm256_set1_ps(inverse);
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
      __m256 t = load_eight(x, base + j, xt);
      if (x_weight) t = rms_norm_eight(t, inv, load_eight(x_weight, j, xwt), xt);
      store_eight(sum, base + j, xt, _mm256_add_ps(load_eight(residual, base + j, xt), t));
    }
    return j;
  }
#endif
};

}  // namespace

float sum_squares(const void* x, FloatType t, int64_t base, int64_t k) {
  return RowNorm{x, t, base, k}.sum_squares();
}

void rms_norm_quantize_q8_1(const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows, int64_t k,
                            float eps, block_q8_1* out) {
  std::vector<uint8_t> normed(size_t(rows) * size_t(k) * element_bytes(xt));
  void* y = normed.data();
  torch::stable::parallel_for(0, rows, parallel_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowNorm row{x, xt, r * k, k};
      row.normalise(rms_inverse(row.sum_squares(), k, eps), w, wt, y);
    }
  });
  quantize_q8_1(y, xt, rows, k, out);
}

void add_rms_norm_quantize_q8_1(const void* x, const void* residual, FloatType xt, const void* x_weight, FloatType xwt,
                                const void* w, FloatType wt, int64_t rows, int64_t k, float eps, void* sum,
                                block_q8_1* out) {
  torch::stable::parallel_for(0, rows, parallel_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowNorm row{x, xt, r * k, k};
      row.add_to(residual, x_weight ? rms_inverse(row.sum_squares(), k, eps) : 0.0f, x_weight, xwt, sum);
    }
  });
  rms_norm_quantize_q8_1(sum, xt, w, wt, rows, k, eps, out);
}

void gated_quantize_q8_1(const void* gate, const void* up, FloatType t, GateActivation act, int64_t rows, int64_t k,
                         block_q8_1* out) {
  const int64_t numel = rows * k;
  std::vector<uint8_t> product(size_t(numel) * element_bytes(t));
  void* p = product.data();
  // GELU through torchext.gelu's kernel (vectorized), SiLU here; each activation value rounded to t
  const bool gelu_done = act != GateActivation::Silu;
  if (gelu_done) gelu(gate, nullptr, p, numel, 1, t, act == GateActivation::GeluTanh);
  torch::stable::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float a = gelu_done ? load_float(p, i, t) : silu(load_float(gate, i, t));
      store_float(p, i, t, gated_value(a, load_float(up, i, t), t));
    }
  });
  quantize_q8_1(p, t, rows, k, out);
}

}  // namespace torchext::cpu
