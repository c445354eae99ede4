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
      // The CUDA kernels' order (float_types.h): four groups of 8 left to right, then pairs.
      float p[4];
      for (int j = 0; j < 4; ++j) {
        p[j] = v[8 * j];
        for (int l = 1; l < 8; ++l) p[j] += v[8 * j + l];
      }
      const float sum = (p[0] + p[2]) + (p[1] + p[3]);
      block_q8_1& b = out[i];
      b.d = q8_1_scale_bits(amax);
      b.s = q8_1_sum_bits(sum, amax);
      for (int l = 0; l < kQ8Block; ++l) b.qs[l] = quantize_q8_1_value(v[l], amax);
    }
  });
}

}  // namespace torchext::cpu
