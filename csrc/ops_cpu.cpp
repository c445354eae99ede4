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
  // The dense path (ops.h): each thread dequantizes a tile of weight rows into its own buffer and
  // multiplies it (MKL single-threaded inside the region), tile after tile: one fork-join a call,
  // and the tile stays in that core's 2 MiB L2 between the two. A tile is about 2 MiB of fp32, at
  // least 128 rows. The 2-core Xeon VM, 2026-12-03, x F.linear's speed on the dense fp32 weight at
  // 17 / 64 / 256 rows, Q4_K / Q6_K, two runs each (bench/cpu.py --dense): 4096x4096 0.84-0.89 /
  // 0.80-0.87 / 0.85-0.88 and 0.79-0.80 / 0.84 / 0.84-0.89, 4096x14336 1.07-1.08 / 0.85-0.90 /
  // 0.84-0.92 and 1.00-1.13 / 0.89-0.92 / 0.88-0.93, where 2 MiB passes shared by both threads
  // (two fork-joins a pass) gave 0.78-0.85 / 0.81-0.89 / 0.81-0.82 on 4096x4096 Q4_K. 1 MiB tiles
  // lost at 256 rows (0.72-0.81), 4 MiB ones were level (17 rows 0.77-0.86, 256 rows 0.85-0.96).
  static constexpr bool kDenseTilesPerThread = true;
  static int64_t dense_tile_rows(int64_t k) { return std::max<int64_t>(128, (int64_t(1) << 19) / k); }
  // The GEMV up to the format's rows (batch_policy.h, cpu_max_gemv_rows), the dense path beyond: no tiled GEMM.
  static int64_t gemv_rows(QType wt) { return cpu_max_gemv_rows(wt); }
  static constexpr bool kHasTiledGemm = false;
  static bool runs_tiled_gemm(FloatType, const Tensor&, const Tensor&, int64_t) { return false; }
  static int64_t tiled_gemm_rows(QType, FloatType, const Tensor&, const Tensor&, int64_t) { return 0; }
  static int64_t tiled_gemm_first_row(QType, FloatType, const Tensor&, const Tensor&, int64_t, int64_t) { return 0; }

  static void quantize_q8_1(Context&, const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out) {
    cpu::quantize_q8_1(x, xt, rows, k, out);
  }
  static void rms_norm_quantize_q8_1(Context&, const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows,
                                     int64_t k, float eps, block_q8_1* out) {
    cpu::rms_norm_quantize_q8_1(x, xt, w, wt, rows, k, eps, out);
  }
  static void add_rms_norm_quantize_q8_1(Context&, const void* x, const void* residual, FloatType xt,
                                         const void* x_weight, FloatType xwt, const void* w, FloatType wt, int64_t rows,
                                         int64_t k, float eps, void* sum, block_q8_1* out) {
    cpu::add_rms_norm_quantize_q8_1(x, residual, xt, x_weight, xwt, w, wt, rows, k, eps, sum, out);
  }
  static void gated_quantize_q8_1(Context&, const void* gate, const void* up, FloatType t, GateActivation act,
                                  int64_t rows, int64_t k, block_q8_1* out) {
    cpu::gated_quantize_q8_1(gate, up, t, act, rows, k, out);
  }
  static void gemv_q8_1(Context&, QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                        int64_t rows, void* out, FloatType ot) {
    cpu::gemv_q8_1(wt, w, n, k, xq, rows, out, ot);
  }
  // The CPU composes gated_quantize_q8_1 and gemv_q8_1 (Ops::gated_qmatmul).
  static bool gated_gemv_q8_1(Context&, QType, const uint8_t*, int64_t, int64_t, const void*, const void*, FloatType,
                              GateActivation, int64_t, void*) {
    return false;
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
  static void check_positions(const int64_t* pos, int64_t rows, int64_t keys) {
    for (int64_t r = 0; r < rows; ++r)
      TORCHEXT_CHECK(pos[r] >= 0 && pos[r] < keys, "pos: expected positions in [0, keys=", keys, "), got ", pos[r],
                      " at index ", r);
  }
  static void cached_attention(Context&, const void* q, const void* k, const void* v, const int64_t* pos,
                               int64_t window, float scale, const AttentionShape& s, FloatType t, const Tensor& out) {
    cpu::cached_attention(q, k, v, pos, window, scale, s, t, out.data_ptr());
  }
  // The composition itself, so that the CPU's bytes are those of the two ops.
  static void cached_attention_quantize_q8_1(Context&, const void* q, const void* k, const void* v,
                                             const int64_t* pos, int64_t window, float scale, const AttentionShape& s,
                                             FloatType t, const Tensor& out) {
    Tensor o = torch::stable::new_empty(out, {s.batch, s.heads, s.rows, s.dim}, scalar_type_of(t));
    cpu::cached_attention(q, k, v, pos, window, scale, s, t, o.data_ptr());
    const Tensor x = torch::stable::contiguous(torch::stable::transpose(o, 1, 2));  // [B, T, H, D]
    cpu::quantize_q8_1(x.data_ptr(), t, s.batch * s.rows, s.heads * s.dim, static_cast<block_q8_1*>(out.data_ptr()));
  }
  static void rope_cache_write(Context&, const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos,
                               const float* sin, const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps,
                               const RopeShape& s, FloatType t, void* q_out, void* k_cache, void* v_cache) {
    cpu::rope_cache_write(q, k, v, cos, sin, pos, q_norm, k_norm, eps, s, t, q_out, k_cache, v_cache);
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
