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
  // Rows dequantized per dense pass: about 2 MiB of fp32 (at least 128 rows: fewer leave MKL's GEMM
  // on a pass short of its rate), reused from pass to pass, so that each core's slice stays in its
  // 2 MiB L2 between the dequantization and the GEMM. The 2-core Xeon VM, 2026-12-03, Q4_K, x
  // F.linear's speed on the dense fp32 weight at 17 / 64 / 256 rows, 4 MiB passes -> 2 MiB (with
  // the dequantizer's column split, bench/NOTES.md): 4096x4096 0.73 / 0.79 / 0.86 -> 0.85 / 0.89 /
  // 0.82, 14336x4096 1.14 / 0.90 / 0.90 -> 1.22 / 0.97 / 0.88 (4096x14336: 128 rows either way).
  // With a Q4_K-only dequantizer (tried, not kept) 3 MiB passes gave 4096x4096 0.80 / 0.84 / 0.87,
  // 4 MiB 0.76 / 0.79 / 0.86: many activation rows would take larger passes (the GEMM dominates
  // there), but k alone decides.
  static int64_t dense_rows_per_pass(int64_t k) { return std::max<int64_t>(128, (int64_t(1) << 19) / k); }
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
