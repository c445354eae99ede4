// CPU kernels for every op: the shared op bodies (ops.h) over csrc/cpu.
#include <torch/csrc/stable/library.h>

#include <algorithm>

#include "csrc/cpu/kernels.h"
#include "csrc/ops.h"

namespace torchext {
namespace {

struct CpuBackend {
  struct Context {
    explicit Context(const Tensor&) {}
  };
  // CPU GEMMs on the dequantized weight run in fp32: half-precision CPU matmul is slow and
  // rounds differently from one torch release to the next.
  static ScalarType dense_compute_type(ScalarType) { return ScalarType::Float; }
  // Rows dequantized per dense pass: about 4 MiB of fp32 (at least 128 rows), which stays in cache
  // between the dequantization and the GEMM (4096x4096 Q4_K, 64 rows, 2 threads: 38 ms in one pass,
  // most of it faulting in a fresh 64 MiB buffer; F.linear on the dense weight 15 ms). The 2-core
  // Xeon VM, Q4_K, 17 / 64 / 256 rows, x F.linear's speed on the dense fp32 weight, 1 MiB passes
  // (at least 16 rows) against these: 4096x14336 0.72 / 0.42 / 0.33 -> 0.97 / 0.84 / 0.86,
  // 14336x4096 1.01 / 0.84 / 0.69 -> 1.04 / 0.89 / 0.86, 4096x4096 0.75 / 0.74 / 0.66 -> 0.72 /
  // 0.78 / 0.79; 8 MiB passes lost at 17 rows (4096x4096 0.49).
  static int64_t dense_rows_per_pass(int64_t k) { return std::max<int64_t>(128, (int64_t(1) << 20) / k); }
  // No tiled GEMM on the CPU: from 17 rows the dense path.
  static constexpr bool kHasTiledGemm = false;
  static bool tiled_gemm_runs(FloatType, const Tensor&, const Tensor&, int64_t) { return false; }

  static void quantize_q8_1(Context&, const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out) {
    cpu::quantize_q8_1(x, xt, rows, k, out);
  }
  static void rms_norm_quantize_q8_1(Context&, const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows,
                                     int64_t k, float eps, block_q8_1* out) {
    cpu::rms_norm_quantize_q8_1(x, xt, w, wt, rows, k, eps, out);
  }
  static void gated_gelu_quantize_q8_1(Context&, const void* gate, const void* up, FloatType t, int64_t rows,
                                       int64_t k, bool tanh_form, block_q8_1* out) {
    cpu::gated_gelu_quantize_q8_1(gate, up, t, rows, k, tanh_form, out);
  }
  static void gemv_q8_1(Context&, QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                        int64_t rows, void* out, FloatType ot) {
    cpu::gemv_q8_1(wt, w, n, k, xq, rows, out, ot);
  }
  static void dequantize(Context&, QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows,
                         int64_t rows_out, void* out, FloatType ot) {
    cpu::dequantize(wt, w, n, k, rows, rows_out, out, ot);
  }
  // On the CPU an id out of range is an error, as in torch.nn.functional.embedding; `bound` names n
  // in the message ("n": a weight's rows, "E": experts).
  static void check_ids(const RowIndex& rows, int64_t count, int64_t n, const char* bound) {
    for (int64_t i = 0; i < count; ++i)
      TORCHEXT_CHECK(rows.source(i, n) >= 0, "ids: expected ids in [0, ", bound, "=", n, "), got ", rows.id(i),
                      " at flat position ", i);
  }
  // qmatmul_id reads the ids here and groups each expert's rows (ops.h, matmul_id_by_expert).
  static constexpr bool kIdsOnHost = true;
  static void gelu(Context&, const void* x, const void* bias, void* out, int64_t numel, int64_t channels,
                   FloatType t, bool tanh_form) {
    cpu::gelu(x, bias, out, numel, channels, t, tanh_form);
  }
};

// dense float32 [n, k] -> quantized rows; padding past k is quantized as zeros.
Tensor quantize(Tensor w, int64_t qtype) {
  const FormatInfo f = format_info(qtype);
  check_defined_contiguous(w, "w");
  TORCHEXT_CHECK(w.dim() == 2, "w: expected a 2-D weight [n, k], got ", w.dim(), " dimensions");
  TORCHEXT_CHECK(w.scalar_type() == ScalarType::Float, "w: expected a float32 tensor, got ",
                  dtype_name(w.scalar_type()), " (call .float() first)");
  const int64_t n = w.size(0), k = w.size(1);
  check_shape_nk(n, k);
  check_whole_blocks(f, k, "w");
  Tensor out = torch::stable::new_empty(w, {n, row_bytes(f, k)}, ScalarType::Byte);
  cpu::quantize(f.type, static_cast<const float*>(w.data_ptr()), n, k, static_cast<uint8_t*>(out.data_ptr()));
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchext, CPU, m) {
  TORCHEXT_REGISTER_OPS(m, CpuBackend);
  m.impl("quantize", TORCH_BOX(&quantize));
}

}  // namespace torchext
