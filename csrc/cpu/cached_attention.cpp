// cached_attention on the CPU: each (batch, head, row) on its own, over the keys its position sees, in
// fp32 (the arithmetic of kernels/cached_attention.h, as the CUDA kernels do it in one span); the rows
// are spread over torch's threads, each row's arithmetic the same wherever it runs.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "csrc/cpu/kernels.h"
#include "kernels/cached_attention.h"

namespace torchext::cpu {

void cached_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window, float scale,
                      const AttentionShape& s, FloatType t, void* out) {
  // a row reads up to keys x dim of k and of v: a decode step's few short rows do not pay for a fork
  const int64_t grain = parallel_grain(s.keys * s.dim);
  torch::stable::parallel_for(0, s.batch * s.heads * s.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qrow(s.dim), acc(s.dim), score;
    for (int64_t row = begin; row < end; ++row) {  // row = (b * heads + h) * rows + r
      const int64_t r = row % s.rows, h = row / s.rows % s.heads, b = row / s.rows / s.heads;
      const int64_t cache_row0 = (b * s.kv_heads + h / s.group()) * s.keys;
      int64_t first, last;
      visible_keys(pos[r], window, first, last);  // ops.h checked 0 <= pos[r] < keys
      for (int64_t d = 0; d < s.dim; ++d) qrow[d] = load_float(q, row * s.dim + d, t);
      score.assign(size_t(last - first + 1), 0.0f);
      float m = -INFINITY;
      for (int64_t j = first; j <= last; ++j) {
        const int64_t key = (cache_row0 + j) * s.dim;
        float dot = 0.0f;
        for (int64_t d = 0; d < s.dim; ++d) dot = std::fma(qrow[d], load_float(k, key + d, t), dot);
        score[j - first] = dot * scale;
        m = nan_max(m, score[j - first]);
      }
      float total = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = first; j <= last; ++j) {
        const int64_t value = (cache_row0 + j) * s.dim;
        const float e = attention_weight(score[j - first], m);
        total += e;
        for (int64_t d = 0; d < s.dim; ++d) acc[d] = std::fma(e, load_float(v, value + d, t), acc[d]);
      }
      for (int64_t d = 0; d < s.dim; ++d) store_float(out, row * s.dim + d, t, acc[d] / total);
    }
  });
}

}  // namespace torchext::cpu
