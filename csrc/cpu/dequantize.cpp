#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>

#include "csrc/checks.h"
#include "csrc/cpu/kernels.h"
#include "kernels/quant_traits.h"

namespace torchext::cpu {

void dequantize(QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out, void* out,
                FloatType ot) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = has_avx2();
  if (avx2) return dequantize_avx2(wt, w, n, k, rows, rows_out, out, ot);
#endif
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    const int64_t blocks = weight_row_blocks<T>(k);
    const int64_t chunks = blocks * (T::kValues / 32);
    torch::stable::parallel_for(0, rows_out, parallel_grain(k), [&](int64_t begin, int64_t end) {
      float v[32];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t src = rows.source(i, n);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t b = c / (T::kValues / 32);
          if (src < 0) std::fill(v, v + 32, std::nanf(""));
          else T::dequantize_chunk(w + (src * blocks + b) * T::kBytes, int(c % (T::kValues / 32)), v);
          for (int l = 0; l < 32 && c * 32 + l < k; ++l) store_float(out, i * k + c * 32 + l, ot, v[l]);  // drop padding
        }
      }
    });
  });
  if (!known) fail_unknown_format(wt, "dequantize");
}

}  // namespace torchext::cpu
