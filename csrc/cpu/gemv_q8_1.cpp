#include <torch/csrc/stable/ops.h>

#include "csrc/checks.h"
#include "csrc/cpu/kernels.h"
#include "kernels/quant_traits.h"

namespace torchext::cpu {

#if defined(__x86_64__) || defined(_M_X64)
namespace {
X86Kernels gemv_kernels() {
  static const X86Kernels isa = cpu_kernels();  // TORCHEXT_CPU_KERNELS as the process's first GEMV found it
  return isa;
}
}  // namespace

const char* gemv_kernels_name() { return kernel_set_name(gemv_kernels()); }
#else
const char* gemv_kernels_name() { return "portable"; }
#endif

void gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int64_t rows, void* out,
               FloatType ot) {
#if defined(__x86_64__) || defined(_M_X64)
  const X86Kernels isa = gemv_kernels();
  if (isa != X86Kernels::kPortable) return gemv_q8_1_x86(isa, wt, w, n, k, xq, rows, out, ot);
#endif
  const int64_t xs = q8_1_blocks_per_row(k);
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    const int64_t blocks = weight_row_blocks<T>(k);
    const int64_t row_bytes = blocks * T::kBytes;
    torch::stable::parallel_for(0, n, gemv_grain(k, rows), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const uint8_t* wrow = w + i * row_bytes;
        for (int64_t r = 0; r < rows; ++r) {
          float acc[1] = {0.0f};
          for (int64_t b = 0; b < blocks; ++b) {
            const Q8_1BlockRows<1> x{{xq + r * xs + b * (T::kValues / kQ8Block)}};
            for (int t = 0; t < T::kItems; ++t) T::template dot_item<1>(wrow + b * T::kBytes, t, x, acc);
          }
          store_float(out, r * n + i, ot, acc[0]);
        }
      }
    });
  });
  if (!known) fail_unknown_format(wt, "gemv_q8_1");
}

}  // namespace torchext::cpu
