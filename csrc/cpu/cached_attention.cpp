// cached_attention on the CPU: each (batch, head, row) in turn, over the keys its position sees, in
// fp32 (the arithmetic of kernels/cached_attention.h, as the CUDA kernels do it in one span).
#include <cmath>
#include <vector>

#include "csrc/cpu/kernels.h"
#include "kernels/cached_attention.h"

namespace torchext::cpu {

void cached_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window, float scale,
                      const AttentionShape& s, FloatType t, void* out) {
  std::vector<float> qrow(s.dim), acc(s.dim), score;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t cache_row0 = (b * s.kv_heads + h / s.group()) * s.keys;
      for (int64_t r = 0; r < s.rows; ++r) {
        const int64_t row = (b * s.heads + h) * s.rows + r;
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
    }
}

}  // namespace torchext::cpu
