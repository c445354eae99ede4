#include <torch/csrc/stable/ops.h>

#include "csrc/cpu/kernels.h"

namespace torchext::cpu {

void quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out) {
  const int64_t blocks = q8_1_blocks_per_row(k);
  torch::stable::parallel_for(0, rows * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / blocks, col0 = (i % blocks) * kQ8Block;
      float v[kQ8Block];
      float amax = 0.0f;
      for (int l = 0; l < kQ8Block; ++l) {
        v[l] = col0 + l < k ? load_float(x, row * k + col0 + l, xt) : 0.0f;  // zero padding past K
        amax = nan_max(amax, std::fabs(v[l]));
      }
      const float d = q8_1_scale(amax);
      block_q8_1& b = out[i];
      int sum = 0;
      for (int l = 0; l < kQ8Block; ++l) {
        b.qs[l] = quantize_q8_1_value(v[l], d);
        sum += b.qs[l];
      }
      b.scale = q8_1_scale_word(d, sum);
    }
  });
}

}  // namespace torchext::cpu
