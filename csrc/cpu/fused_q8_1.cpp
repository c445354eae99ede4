// Fused producers of Q8_1 activations on the CPU. There is no launch to save here: each computes its
// values with the arithmetic of kernels/fused_q8_1_math.h (torchext.gelu's kernel for the GELU),
// stores them in the activations' type as the unfused ops do, and quantizes them with quantize_q8_1's
// own kernel, so that the bytes are those of the unfused ops and of the CUDA kernels.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <vector>

#include "csrc/cpu/kernels.h"
#include "kernels/activation_math.h"
#include "kernels/fused_q8_1_math.h"

namespace torchext::cpu {
namespace {

size_t element_bytes(FloatType t) { return t == FloatType::F32 ? sizeof(float) : sizeof(uint16_t); }

}  // namespace

void rms_norm_quantize_q8_1(const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows, int64_t k,
                            float eps, block_q8_1* out) {
  std::vector<uint8_t> normed(size_t(rows) * size_t(k) * element_bytes(xt));
  void* y = normed.data();
  torch::stable::parallel_for(0, rows, parallel_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float inverse = rms_inverse(row_sum_squares(x, xt, r * k, k), k, eps);
      for (int64_t j = 0; j < k; ++j)
        store_float(y, r * k + j, xt, rms_norm_value(load_float(x, r * k + j, xt), inverse, load_float(w, j, wt), xt));
    }
  });
  quantize_q8_1(y, xt, rows, k, out);
}

void add_rms_norm_quantize_q8_1(const void* x, const void* residual, FloatType xt, const void* x_weight, FloatType xwt,
                                const void* w, FloatType wt, int64_t rows, int64_t k, float eps, void* sum,
                                block_q8_1* out) {
  torch::stable::parallel_for(0, rows, parallel_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float inverse = x_weight ? rms_inverse(row_sum_squares(x, xt, r * k, k), k, eps) : 0.0f;
      for (int64_t j = r * k; j < (r + 1) * k; ++j) {
        const float v = load_float(x, j, xt);
        const float t = x_weight ? rms_norm_value(v, inverse, load_float(x_weight, j - r * k, xwt), xt) : v;
        store_float(sum, j, xt, residual_sum_value(load_float(residual, j, xt), t, xt));
      }
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
