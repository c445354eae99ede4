#include <torch/csrc/stable/ops.h>

#include "csrc/cpu/kernels.h"

namespace torchext::cpu {

void quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out) {
  const int64_t blocks = q8_1_blocks_per_row(k);
  torch::stable::parallel_for(0, rows * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / blocks, col0 = (i % blocks) * kQ8Block;
      float v[kQ8Block], sum[kQ8Block];
      float amax = 0.0f;
      for (int l = 0; l < kQ8Block; ++l) {
        v[l] = col0 + l < k ? load_float(x, row * k + col0 + l, xt) : 0.0f;  // zero padding past K
        sum[l] = v[l];
        amax = nan_max(amax, std::fabs(v[l]));
      }
      // The CUDA kernel's warp butterfly: lane l adds lane l^m, for m = 16, 8, 4, 2, 1.
      for (int m = kQ8Block / 2; m > 0; m /= 2) {
        float next[kQ8Block];
        for (int l = 0; l < kQ8Block; ++l) next[l] = sum[l] + sum[l ^ m];
        std::copy(next, next + kQ8Block, sum);
      }
      block_q8_1& b = out[i];
      b.d = q8_1_scale_bits(amax);
      b.s = float_to_fp16(sum[0]);
      for (int l = 0; l < kQ8Block; ++l) b.qs[l] = quantize_q8_1_value(v[l], amax);
    }
  });
}

}  // namespace torchext::cpu
