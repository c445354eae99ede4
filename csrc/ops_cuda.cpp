// CUDA kernels for every op: the shared op bodies (ops.h) over the launchers in kernels/.
// Each launch runs on the current stream of the inputs' device, under a guard for that device.
#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include "csrc/ops.h"
#include "kernels/cached_attention.cuh"
#include "kernels/dequantize.cuh"
#include "kernels/fused_q8_1.cuh"
#include "kernels/gelu.cuh"
#include "kernels/gemv_q8_1.cuh"
#include "kernels/qgemm.cuh"
#include "kernels/quantize_q8_1.cuh"
#include "kernels/rope_cache.cuh"
#include "kernels/route_slots.cuh"

namespace torchext {
namespace {

void check_launch(cudaError_t err, const char* kernel) {
  TORCHEXT_CHECK(err == cudaSuccess, "torchext: launching ", kernel, " failed: ", cudaGetErrorString(err));
}

// A launcher that dispatches on the weight format returns cudaErrorInvalidValue for a format the
// catalog lacks (the op's checks reject it first); the message names the format either way.
void check_launch(cudaError_t err, const char* kernel, QType wt) {
  if (err == cudaErrorInvalidValue && !visit_weight_format(wt, [](auto) {})) fail_unknown_format(wt, kernel);
  TORCHEXT_CHECK(err == cudaSuccess, "torchext: launching ", kernel, " for ", qtype_name(wt),
                 " weights failed: ", cudaGetErrorString(err));
}

// The op a gated launch serves, for its error message.
const char* gated_op_name(GateActivation act, bool matmul) {
  if (act == GateActivation::Silu) return matmul ? "gated_silu_qmatmul" : "gated_silu_quantize_q8_1";
  return matmul ? "gated_gelu_qmatmul" : "gated_gelu_quantize_q8_1";
}

struct CudaBackend {
  struct Context {
    torch::stable::accelerator::DeviceGuard guard;
    int device;
    cudaStream_t stream = nullptr;
    explicit Context(const Tensor& on) : guard(on.get_device_index()), device(on.get_device_index()) {
      void* s = nullptr;
      // The stable C shim's view of at::cuda::getCurrentCUDAStream (works on torch >= 2.11).
      TORCHEXT_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &s) == AOTI_TORCH_SUCCESS,
                      "torchext: could not get the current CUDA stream");
      stream = static_cast<cudaStream_t>(s);
    }
  };
  // cuBLAS GEMMs run in the activations' dtype with fp32 accumulation.
  static ScalarType dense_compute_type(ScalarType t) { return t; }
  static constexpr bool kDenseTilesPerThread = false;  // one dequantization launch, one cuBLAS GEMM

  static void quantize_q8_1(Context& c, const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out) {
    check_launch(launch_quantize_q8_1(x, xt, rows, k, out, c.stream), "quantize_q8_1");
  }
  static void rms_norm_quantize_q8_1(Context& c, const void* x, FloatType xt, const void* w, FloatType wt,
                                     int64_t rows, int64_t k, float eps, block_q8_1* out) {
    check_launch(launch_rms_norm_quantize_q8_1(x, xt, w, wt, rows, k, eps, out, c.stream), "rms_norm_quantize_q8_1");
  }
  static void add_rms_norm_quantize_q8_1(Context& c, const void* x, const void* residual, FloatType xt,
                                         const void* x_weight, FloatType xwt, const void* w, FloatType wt, int64_t rows,
                                         int64_t k, float eps, void* sum, block_q8_1* out) {
    check_launch(launch_add_rms_norm_quantize_q8_1(x, residual, xt, x_weight, xwt, w, wt, rows, k, eps, sum, out,
                                                   c.stream),
                 "add_rms_norm_quantize_q8_1");
  }
  static void gated_quantize_q8_1(Context& c, const void* gate, const void* up, FloatType t, GateActivation act,
                                  int64_t rows, int64_t k, block_q8_1* out) {
    check_launch(launch_gated_quantize_q8_1(gate, up, t, act, rows, k, out, c.stream), gated_op_name(act, false));
  }
  static void gemv_q8_1(Context& c, QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                        int64_t rows, void* out, FloatType ot) {
    check_launch(launch_gemv_q8_1(wt, w, n, k, xq, rows, out, ot, c.device, c.stream), "gemv_q8_1", wt);
  }
  // gemv_q8_1 of gated_quantize_q8_1's rows in one launch, where the GEMV can compute them (false: not launched).
  static bool gated_gemv_q8_1(Context& c, QType wt, const uint8_t* w, int64_t n, int64_t k, const void* gate,
                              const void* up, FloatType t, GateActivation act, int64_t rows, void* out) {
    if (!gemv_q8_1_computes_rows(wt, rows, k, c.device)) return false;
    check_launch(launch_gated_gemv_q8_1(wt, w, n, k, gate, up, t, act, rows, out, c.device, c.stream),
                 gated_op_name(act, true), wt);
    return true;
  }
  static int64_t gemv_rows(QType) { return kMaxGemvRows; }  // the GEMV kernels' launch limit
  static constexpr bool kHasTiledGemm = true;
  static bool runs_tiled_gemm(FloatType xt, const Tensor& w, const Tensor& x, int64_t k) {
    return qgemm_supports(xt, w.data_ptr(), x.data_ptr(), k, w.get_device_index());
  }
  static int64_t tiled_gemm_rows(QType wt, FloatType xt, const Tensor& w, const Tensor& x, int64_t k) {
    return qgemm_max_rows(wt, xt, w.data_ptr(), x.data_ptr(), k, w.get_device_index());
  }
  static int64_t tiled_gemm_first_row(QType wt, FloatType xt, const Tensor& w, const Tensor& x, int64_t n, int64_t k) {
    return qgemm_first_row(wt, xt, w.data_ptr(), x.data_ptr(), n, k, w.get_device_index());
  }
  // out [rows, n] in x's type; a K-split plan's fp32 partial sums go to a workspace from torch's allocator.
  static void tiled_gemm(Context& c, QType wt, const Tensor& w, int64_t n, int64_t k, const Tensor& x, FloatType xt,
                         bool exact, int64_t rows, const Tensor& out) {
    const int64_t floats = qgemm_workspace_floats(wt, xt, exact, n, k, rows, c.device);
    Tensor workspace;
    if (floats > 0) workspace = torch::stable::new_empty(x, {floats}, ScalarType::Float);
    check_launch(launch_qgemm(wt, static_cast<const uint8_t*>(w.data_ptr()), n, k, x.data_ptr(), xt, exact, rows,
                              floats > 0 ? static_cast<float*>(workspace.data_ptr()) : nullptr, out.data_ptr(),
                              c.device, c.stream),
                 "qgemm", wt);
  }
  static void dequantize(Context& c, QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows,
                         int64_t rows_out, void* out, FloatType ot) {
    check_launch(launch_dequantize(wt, w, n, k, rows, rows_out, out, ot, c.stream), "dequantize", wt);
  }
  // Reading the positions on the host would synchronise; one out of range gives a NaN row instead.
  static void check_positions(const int64_t*, int64_t, int64_t) {}
  // The spans' partial sums go to a workspace from torch's allocator.
  static Tensor attention_workspace(const Tensor& out, const AttentionShape& s, int64_t window, const char* op) {
    TORCHEXT_CHECK(cached_attention_fits_grid(s, window), op, ": ", s.batch, " x ", s.heads, " heads x ", s.rows,
                    " rows over ", s.keys, " keys need more CUDA thread blocks than one launch holds (2^31 - 1); ",
                    "split the batch or the rows");
    return torch::stable::new_empty(out, {cached_attention_workspace_floats(s, window)}, ScalarType::Float);
  }
  static void cached_attention(Context& c, const void* q, const void* k, const void* v, const int64_t* pos,
                               int64_t window, float scale, const AttentionShape& s, FloatType t, const Tensor& out) {
    Tensor workspace = attention_workspace(out, s, window, "cached_attention");
    check_launch(launch_cached_attention(q, k, v, pos, window, scale, s, t, static_cast<float*>(workspace.data_ptr()),
                                         out.data_ptr(), c.stream),
                 "cached_attention");
  }
  static void cached_attention_quantize_q8_1(Context& c, const void* q, const void* k, const void* v,
                                             const int64_t* pos, int64_t window, float scale, const AttentionShape& s,
                                             FloatType t, const Tensor& out) {
    Tensor workspace = attention_workspace(out, s, window, "cached_attention_quantize_q8_1");
    check_launch(launch_cached_attention_quantize_q8_1(q, k, v, pos, window, scale, s, t,
                                                       static_cast<float*>(workspace.data_ptr()),
                                                       static_cast<block_q8_1*>(out.data_ptr()), c.stream),
                 "cached_attention_quantize_q8_1");
  }
  static void rope_cache_write(Context& c, const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos,
                               const float* sin, const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps,
                               const RopeShape& s, FloatType t, void* q_out, void* k_cache, void* v_cache) {
    TORCHEXT_CHECK(rope_cache_write_fits_grid(s), "rope_cache_write: ", s.batch, " x ", s.rows, " rows of ", s.heads,
                    " q heads and ", s.kv_heads, " k and v heads (a warp each) need more CUDA thread blocks than one "
                    "launch holds (2^31 - 1)");
    check_launch(launch_rope_cache_write(q, k, v, cos, sin, pos, q_norm, k_norm, eps, s, t, q_out, k_cache, v_cache,
                                         c.stream),
                 "rope_cache_write");
  }
  // Reading the ids on the host would synchronise; an id out of range gives a NaN row instead.
  static void check_ids(const RowIndex&, int64_t, int64_t, const char*) {}

  // qmatmul_id: the slots are grouped by expert on the device (ops.h).
  static constexpr bool kIdsOnHost = false;
  static void gemv_q8_1_id(Context& c, QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                           const ExpertSlots& slots, void* out, FloatType ot) {
    check_launch(launch_gemv_q8_1_id(wt, w, n, k, xq, slots, out, ot, c.device, c.stream), "gemv_q8_1_id", wt);
  }
  // The grouped GEMM: route_slots sorts the slots into tiles (its arrays from torch's allocator, sized
  // for the most tiles the ids can need), then the tiled GEMM runs over them.
  static void tiled_gemm_id(Context& c, QType wt, const Tensor& w, int64_t n, int64_t k, const Tensor& x, FloatType xt,
                            bool exact, const ExpertSlots& slots, const Tensor& out) {
    const int tile_rows = qgemm_id_tile_rows(slots.count, slots.experts);
    const int64_t tiles = route_slots_max_tiles(slots.count, slots.experts, tile_rows);
    Tensor routing = torch::stable::new_empty(x, {tiles * tile_rows + tiles}, ScalarType::Int);
    int32_t* sorted = static_cast<int32_t*>(routing.data_ptr());
    int32_t* tile_experts = sorted + tiles * tile_rows;
    check_launch(launch_route_slots(slots, tile_rows, tiles, sorted, tile_experts, n, out.data_ptr(), xt, c.stream),
                 "route_slots");
    check_launch(launch_qgemm_id(wt, static_cast<const uint8_t*>(w.data_ptr()), n, k, x.data_ptr(), xt, exact, slots,
                                 tile_rows, tiles, sorted, tile_experts, out.data_ptr(), c.device, c.stream),
                 "qgemm_id", wt);
  }
  static void copy_expert_rows(Context& c, const ExpertSlots& slots, int64_t expert, const void* src, int64_t n,
                               void* out, FloatType ot, bool mark_invalid) {
    check_launch(launch_copy_expert_rows(slots, expert, src, n, out, ot, mark_invalid, c.stream), "copy_expert_rows");
  }
  static void gelu(Context& c, const void* x, const void* bias, void* out, int64_t numel, int64_t channels,
                   FloatType t, bool tanh_form) {
    check_launch(launch_gelu(x, bias, out, numel, channels, t, tanh_form, c.stream), "gelu");
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchext, CUDA, m) { TORCHEXT_REGISTER_OPS(m, CudaBackend); }

}  // namespace torchext
