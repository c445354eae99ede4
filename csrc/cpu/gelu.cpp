#include <torch/csrc/stable/ops.h>

#include <cmath>

#include "csrc/cpu/kernels.h"
#include "kernels/gelu_math.h"

namespace torchext::cpu {

void gelu(const void* x, const void* bias, void* out, int64_t numel, int64_t channels, FloatType t, bool tanh_form) {
  torch::stable::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float v = load_float(x, i, t);
      if (bias != nullptr) v += load_float(bias, i % channels, t);
      store_float(out, i, t, tanh_form ? gelu_tanh(v) : gelu_erf(v));
    }
  });
}

}  // namespace torchext::cpu
