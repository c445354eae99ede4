// The body of every op, written once and instantiated per backend. A Backend supplies
//   struct Context { explicit Context(const Tensor& on); };   device guard + stream (CUDA) or nothing (CPU)
//   quantize_q8_1, rms_norm_quantize_q8_1, add_rms_norm_quantize_q8_1, gated_quantize_q8_1,
//   gemv_q8_1, dequantize, gelu, cached_attention, cached_attention_quantize_q8_1, rope_cache_write
//   gated_gemv_q8_1                                          the GEMV of computed rows where it can (false: not run)
//   check_positions(pos, rows, keys)                         positions in [0, keys), where it costs no sync
//                                                            the kernels, on raw pointers
//   check_ids(rows, count, n, bound)                         ids in [0, n), where it costs no sync
//   gemv_rows(wt)                                            the most rows its GEMV takes where no tiled GEMM runs
//   runs_tiled_gemm(xt, w, x, k), tiled_gemm_rows(wt, ...)   whether the tiled GEMM takes these operands, and the
//   tiled_gemm_first_row(wt, xt, w, x, n, k)                 most rows and the first row it takes for qmatmul (0:
//                                                            it does not run)
//   kIdsOnHost                                               qmatmul_id groups slots by expert on the host (CPU);
//                                                            otherwise on the device: gemv_q8_1_id, tiled_gemm_id
//                                                            and copy_expert_rows, no host sync
// so that checks, shapes, output allocation and the batch policy are shared by CPU and CUDA.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "csrc/checks.h"
#include "kernels/batch_policy.h"
#include "kernels/cached_attention.h"
#include "kernels/rope_cache.h"

namespace torchext {

// x's shape with the last dimension replaced by `last`.
inline std::vector<int64_t> with_last_dim(const Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

inline int64_t leading_rows(const Tensor& x) {
  const int64_t last = x.size(x.dim() - 1);
  return last == 0 ? 0 : x.numel() / last;
}

// Uninitialised Q8_1 activations for x [..., k]: [..., q8_1_row_bytes(k)] bytes on x's device; `arg` names x
// in the error where that size overflows int64.
inline Tensor new_q8_1(const Tensor& x, int64_t k, const char* arg) {
  return torch::stable::new_empty(x, with_last_dim(x, q8_1_row_bytes(k, arg)), ScalarType::Byte);
}

template <class Backend>
struct Ops {
  using Ctx = typename Backend::Context;

  static Tensor quantize_q8_1(Tensor x) {
    const FloatType xt = check_q8_1_source(x, "x");
    const int64_t k = x.size(x.dim() - 1);
    Tensor out = new_q8_1(x, k, "x");
    const int64_t rows = leading_rows(x);
    if (rows == 0) return out;
    Ctx ctx(x);
    Backend::quantize_q8_1(ctx, x.data_ptr(), xt, rows, k, static_cast<block_q8_1*>(out.data_ptr()));
    return out;
  }

  // quantize_q8_1 of x / rms(x) * weight over the last dimension, rounded to x's dtype first.
  static Tensor rms_norm_quantize_q8_1(Tensor x, Tensor weight, double eps) {
    const FloatType xt = check_q8_1_source(x, "x");
    const int64_t k = x.size(x.dim() - 1);
    const FloatType wt = check_norm_weight(weight, "weight", x, k);
    check_eps(eps);
    Tensor out = new_q8_1(x, k, "x");
    const int64_t rows = leading_rows(x);
    if (rows == 0) return out;
    Ctx ctx(x);
    Backend::rms_norm_quantize_q8_1(ctx, x.data_ptr(), xt, weight.data_ptr(), wt, rows, k, float(eps),
                                    static_cast<block_q8_1*>(out.data_ptr()));
    return out;
  }

  // (sum, xq): sum = residual + x (or + rms_norm(x) by x_weight) in x's dtype, xq = the Q8_1 of rms_norm(sum).
  static std::tuple<Tensor, Tensor> add_rms_norm_quantize_q8_1(Tensor x, Tensor residual, Tensor weight, double eps,
                                                               std::optional<Tensor> x_weight) {
    const FloatType xt = check_q8_1_source(x, "x");
    const int64_t k = x.size(x.dim() - 1);
    check_like(residual, "residual", x, "x");
    const FloatType wt = check_norm_weight(weight, "weight", x, k);
    const FloatType xwt = x_weight ? check_norm_weight(*x_weight, "x_weight", x, k) : FloatType::F32;
    check_eps(eps);
    Tensor sum = torch::stable::empty_like(x);
    Tensor out = new_q8_1(x, k, "x");
    const int64_t rows = leading_rows(x);
    if (rows == 0) return {sum, out};
    Ctx ctx(x);
    Backend::add_rms_norm_quantize_q8_1(ctx, x.data_ptr(), residual.data_ptr(), xt,
                                        x_weight ? x_weight->data_ptr() : nullptr, xwt, weight.data_ptr(), wt, rows, k,
                                        float(eps), sum.data_ptr(), static_cast<block_q8_1*>(out.data_ptr()));
    return {sum, out};
  }

  // quantize_q8_1 of act(gate) * up, each rounded to the inputs' dtype as the unfused ops round it. The
  // activation, act(), is asked for after the tensors' checks: GELU's approximate is the last argument.
  template <class Activation>
  static Tensor gated_quantize_q8_1(const Tensor& gate, const Tensor& up, Activation activation) {
    const FloatType t = check_q8_1_source(gate, "gate");
    const int64_t k = gate.size(gate.dim() - 1);
    check_like(up, "up", gate, "gate");
    const GateActivation act = activation();
    Tensor out = new_q8_1(gate, k, "gate");
    const int64_t rows = leading_rows(gate);
    if (rows == 0) return out;
    Ctx ctx(gate);
    Backend::gated_quantize_q8_1(ctx, gate.data_ptr(), up.data_ptr(), t, act, rows, k,
                                 static_cast<block_q8_1*>(out.data_ptr()));
    return out;
  }

  static Tensor gated_gelu_quantize_q8_1(Tensor gate, Tensor up, std::string approximate) {
    return gated_quantize_q8_1(gate, up, [&] { return gelu_activation(approximate); });
  }

  static Tensor gated_silu_quantize_q8_1(Tensor gate, Tensor up) {
    return gated_quantize_q8_1(gate, up, [] { return GateActivation::Silu; });
  }

  // Weights x pre-quantized Q8_1 activations -> [..., n] in dtype (float32 when None).
  static Tensor gemv_q8_1(const Tensor& w, int64_t qtype, const Tensor& xq, int64_t n, int64_t k,
                          std::optional<ScalarType> dtype = std::nullopt) {
    const FormatInfo f = check_weight(w, qtype, n, k);
    check_q8_1(xq, k);
    check_same_device(w, "w", xq, "xq");
    const ScalarType st = dtype.value_or(ScalarType::Float);
    const FloatType ot = output_float_type(st);
    Tensor out = torch::stable::new_empty(xq, with_last_dim(xq, n), st);
    const int64_t rows = leading_rows(xq);
    if (rows == 0) return out;
    Ctx ctx(w);
    Backend::gemv_q8_1(ctx, f.type, static_cast<const uint8_t*>(w.data_ptr()), n, k,
                       static_cast<const block_q8_1*>(xq.data_ptr()), rows, out.data_ptr(), ot);
    return out;
  }

  // qmatmul_q8_1(w, gated_quantize_q8_1(gate, up, act)) in gate's dtype: a gated MLP's down projection from
  // its gate and up outputs. The backend's GEMV computes and quantizes the rows itself where it can (one
  // launch); otherwise the two ops run in turn. The same bytes either way. act() as in gated_quantize_q8_1.
  template <class Activation>
  static Tensor gated_qmatmul(const Tensor& w, int64_t qtype, const Tensor& gate, const Tensor& up, int64_t n,
                              int64_t k, Activation activation) {
    const FormatInfo f = check_weight(w, qtype, n, k);
    const FloatType t = check_activations(gate, k, "gate");
    check_like(up, "up", gate, "gate");
    check_same_device(w, "w", gate, "gate");
    const GateActivation act = activation();
    Tensor out = torch::stable::new_empty(gate, with_last_dim(gate, n));
    const int64_t rows = leading_rows(gate);
    if (rows == 0) return out;
    Ctx ctx(w);
    const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
    if (Backend::gated_gemv_q8_1(ctx, f.type, wp, n, k, gate.data_ptr(), up.data_ptr(), t, act, rows, out.data_ptr()))
      return out;
    Tensor xq = new_q8_1(gate, k, "gate");
    Backend::gated_quantize_q8_1(ctx, gate.data_ptr(), up.data_ptr(), t, act, rows, k,
                                 static_cast<block_q8_1*>(xq.data_ptr()));
    Backend::gemv_q8_1(ctx, f.type, wp, n, k, static_cast<const block_q8_1*>(xq.data_ptr()), rows, out.data_ptr(), t);
    return out;
  }

  static Tensor gated_gelu_qmatmul(Tensor w, int64_t qtype, Tensor gate, Tensor up, int64_t n, int64_t k,
                                   std::string approximate) {
    return gated_qmatmul(w, qtype, gate, up, n, k, [&] { return gelu_activation(approximate); });
  }

  static Tensor gated_silu_qmatmul(Tensor w, int64_t qtype, Tensor gate, Tensor up, int64_t n, int64_t k) {
    return gated_qmatmul(w, qtype, gate, up, n, k, [] { return GateActivation::Silu; });
  }

  // Weights x float activations -> [..., n] in x's dtype, through the path batch_policy picks.
  static Tensor matmul(const Tensor& w, int64_t qtype, const Tensor& x, int64_t n, int64_t k, bool exact = false) {
    const FormatInfo f = check_weight(w, qtype, n, k);
    const FloatType xt = check_activations(x, k);
    check_same_device(w, "w", x, "x");
    const int64_t rows = leading_rows(x);
    if (rows == 0) return torch::stable::new_empty(x, with_last_dim(x, n));
    const MatmulPath path =
        choose_matmul_path(rows, n, k, Backend::gemv_rows(f.type),
                           Backend::tiled_gemm_first_row(f.type, xt, w, x, n, k),
                           Backend::tiled_gemm_rows(f.type, xt, w, x, k), exact);
    if (path == MatmulPath::TiledGemm) {
      if constexpr (Backend::kHasTiledGemm) {
        Tensor out = torch::stable::new_empty(x, with_last_dim(x, n));
        Ctx ctx(w);
        Backend::tiled_gemm(ctx, f.type, w, n, k, x, xt, exact, rows, out);
        return out;
      }
    }
    if (path == MatmulPath::Dense) {
      // Dense GEMM on the dequantized weight: exact weights, no activation rounding. On the CPU
      // (kDenseTilesPerThread) each thread takes every workers-th tile of dense_tile_rows(k)
      // weight rows into its own cache-sized buffer and multiplies it there (ops run single-threaded
      // inside the parallel region): no fresh 4*n*k bytes to fault in per call. CUDA dequantizes all
      // rows, then one GEMM.
      const ScalarType ct = Backend::dense_compute_type(x.scalar_type());
      Tensor x2 = torch::stable::reshape(x, {rows, k});
      if (x.scalar_type() != ct) x2 = torch::stable::to(x2, ct);
      Tensor y;
      if constexpr (Backend::kDenseTilesPerThread) {
        y = torch::stable::new_empty(x2, {rows, n});
        const int64_t tile = std::min(n, Backend::dense_tile_rows(k));
        const int64_t tiles = (n + tile - 1) / tile;
        const int64_t workers = std::min<int64_t>(torch::stable::get_num_threads(), tiles);
        Tensor wd = torch::stable::new_empty(w, {workers, tile, k}, ct);
        const FloatType dt = output_float_type(ct);
        const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
        const int64_t rb = row_bytes(f, k);
        const size_t elem = x2.element_size();
        char* yp = static_cast<char*>(y.data_ptr());
        // A worker thread carries none of the caller's inference mode, grad mode or autocast state, so
        // its GEMM sees only tensors made here from raw pointers (no autograd history, not inference
        // tensors), and its result reaches y as memory: an op on x2 or y there failed under
        // inference_mode ("Inplace update to inference tensor") and gave y requires_grad under no_grad.
        torch::stable::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
          Ctx ctx(w);
          const Tensor xs = torch::stable::from_blob(x2.data_ptr(), {rows, k}, {x2.stride(0), x2.stride(1)},
                                                     x2.device(), ct);
          for (int64_t t = begin; t < end; ++t) {
            char* buf = static_cast<char*>(wd.data_ptr()) + t * tile * k * elem;
            for (int64_t i = t; i < tiles; i += workers) {
              const int64_t r0 = i * tile, m = std::min(tile, n - r0);
              Backend::dequantize(ctx, f.type, wp + r0 * rb, m, k, RowIndex{}, m, buf, dt);
              const Tensor block = torch::stable::from_blob(buf, {m, k}, {k, 1}, wd.device(), ct);
              const Tensor part = torch::stable::contiguous(
                  torch::stable::matmul(xs, torch::stable::transpose(block, 0, 1)));  // [rows, m]
              const char* pp = static_cast<const char*>(part.data_ptr());
              for (int64_t r = 0; r < rows; ++r) std::memcpy(yp + (r * n + r0) * elem, pp + r * m * elem, m * elem);
            }
          }
        });
      } else {
        y = torch::stable::matmul(x2, torch::stable::transpose(dequantize(w, qtype, n, k, ct), 0, 1));
      }
      if (y.scalar_type() != x.scalar_type()) y = torch::stable::to(y, x.scalar_type());
      return torch::stable::reshape(y, with_last_dim(x, n));
    }
    Tensor out = torch::stable::new_empty(x, with_last_dim(x, n));
    Tensor xq = new_q8_1(x, k, "x");
    Ctx ctx(w);
    Backend::quantize_q8_1(ctx, x.data_ptr(), xt, rows, k, static_cast<block_q8_1*>(xq.data_ptr()));
    Backend::gemv_q8_1(ctx, f.type, static_cast<const uint8_t*>(w.data_ptr()), n, k,
                       static_cast<const block_q8_1*>(xq.data_ptr()), rows, out.data_ptr(), xt);
    return out;
  }

  // Experts' weights w [E, n, row bytes] x activations -> [T, top_k, n] in x's dtype: slot (t, j)
  // multiplies its activation row (x[t] of x [T, k], or x[t, j] of x [T, top_k, k]) by expert ids[t, j]'s
  // weight, through the path the batch policy picks for T tokens (choose_matmul_id_path).
  static Tensor matmul_id(const Tensor& w, int64_t qtype, const Tensor& x, const Tensor& ids, int64_t n, int64_t k,
                          bool exact) {
    const MatmulIdOperands a = check_matmul_id(w, qtype, x, ids, n, k);
    const ExpertSlots& s = a.slots;
    Tensor out = torch::stable::new_empty(x, {a.tokens, s.top_k, n});
    if (s.count == 0) return out;
    Backend::check_ids(s.ids, s.count, s.experts, "E");
    const bool tiled = Backend::runs_tiled_gemm(a.xt, w, x, k);
    const MatmulPath path = choose_matmul_id_path(a.tokens, Backend::gemv_rows(a.format.type), tiled, exact);
    Ctx ctx(w);
    if constexpr (Backend::kIdsOnHost) {
      matmul_id_by_expert(ctx, w, qtype, a, x, n, k, path, out);
    } else if (path == MatmulPath::Gemv) {
      Tensor xq = new_q8_1(x, k, "x");
      Backend::quantize_q8_1(ctx, x.data_ptr(), a.xt, leading_rows(x), k, static_cast<block_q8_1*>(xq.data_ptr()));
      Backend::gemv_q8_1_id(ctx, a.format.type, static_cast<const uint8_t*>(w.data_ptr()), n, k,
                            static_cast<const block_q8_1*>(xq.data_ptr()), s, out.data_ptr(), a.xt);
    } else if (path == MatmulPath::TiledGemm) {
      Backend::tiled_gemm_id(ctx, a.format.type, w, n, k, x, a.xt, exact, s, out);
    } else {
      matmul_id_masked(ctx, w, qtype, a, x, n, k, out);
    }
    return out;
  }

  // qmatmul_id where the ids are readable on the host (CPU): each expert's rows are gathered (Q8_1
  // blocks quantized once for the GEMV path, else float rows), multiplied by the Q8_1 GEMV or the dense
  // path of qmatmul (exact), and the results copied to their slots.
  static void matmul_id_by_expert(Ctx& ctx, const Tensor& w, int64_t qtype, const MatmulIdOperands& a,
                                  const Tensor& x, int64_t n, int64_t k, MatmulPath path, const Tensor& out) {
    const ExpertSlots& s = a.slots;
    std::vector<int64_t> first(s.experts + 1, 0), order(s.count);
    for (int64_t i = 0; i < s.count; ++i) ++first[s.expert(i) + 1];
    for (int64_t e = 0; e < s.experts; ++e) first[e + 1] += first[e];
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < s.count; ++i) order[next[s.expert(i)]++] = i;

    const bool gemv = path == MatmulPath::Gemv;
    Tensor src = torch::stable::reshape(x, {leading_rows(x), k});
    if (gemv) {
      Tensor xq = new_q8_1(src, k, "x");
      Backend::quantize_q8_1(ctx, src.data_ptr(), a.xt, src.size(0), k, static_cast<block_q8_1*>(xq.data_ptr()));
      src = xq;
    }
    const int64_t src_bytes = src.size(1) * int64_t(src.element_size()), out_bytes = n * int64_t(out.element_size());
    const char* src_rows = static_cast<const char*>(src.data_ptr());
    char* out_rows = static_cast<char*>(out.data_ptr());
    for (int64_t e = 0; e < s.experts; ++e) {
      const int64_t count = first[e + 1] - first[e];
      if (count == 0) continue;
      Tensor rows = torch::stable::new_empty(src, {count, src.size(1)});
      for (int64_t i = 0; i < count; ++i)
        std::memcpy(static_cast<char*>(rows.data_ptr()) + i * src_bytes,
                    src_rows + s.x_row(order[first[e] + i]) * src_bytes, src_bytes);
      const Tensor we = torch::stable::select(w, 0, e);
      Tensor y;
      if (gemv) {
        y = torch::stable::new_empty(x, {count, n});
        Backend::gemv_q8_1(ctx, a.format.type, static_cast<const uint8_t*>(we.data_ptr()), n, k,
                           static_cast<const block_q8_1*>(rows.data_ptr()), count, y.data_ptr(), a.xt);
      } else {
        y = torch::stable::contiguous(matmul(we, qtype, rows, n, k, /*exact=*/true));
      }
      for (int64_t i = 0; i < count; ++i)
        std::memcpy(out_rows + order[first[e] + i] * out_bytes, static_cast<const char*>(y.data_ptr()) + i * out_bytes,
                    out_bytes);
    }
  }

  // qmatmul_id's dense path on a device (CUDA without the grouped GEMM: fp32 activations, GPUs before
  // sm_80, misaligned operands). Which rows each expert takes is known on the device only, so every
  // expert multiplies every row and copy_expert_rows keeps the slots routed to it: E dense GEMMs,
  // exact and free of host syncs, a fallback rather than a fast path.
  static void matmul_id_masked(Ctx& ctx, const Tensor& w, int64_t qtype, const MatmulIdOperands& a, const Tensor& x,
                               int64_t n, int64_t k, const Tensor& out) {
    const ScalarType ct = Backend::dense_compute_type(x.scalar_type());
    Tensor x2 = torch::stable::reshape(x, {leading_rows(x), k});
    if (x.scalar_type() != ct) x2 = torch::stable::to(x2, ct);
    Tensor wd = torch::stable::new_empty(w, {n, k}, ct);
    for (int64_t e = 0; e < a.slots.experts; ++e) {
      const uint8_t* we = static_cast<const uint8_t*>(w.data_ptr()) + e * n * row_bytes(a.format, k);
      Backend::dequantize(ctx, a.format.type, we, n, k, RowIndex{}, n, wd.data_ptr(), output_float_type(ct));
      Tensor y = torch::stable::matmul(x2, torch::stable::transpose(wd, 0, 1));
      if (y.scalar_type() != x.scalar_type()) y = torch::stable::to(y, x.scalar_type());
      Backend::copy_expert_rows(ctx, a.slots, e, y.data_ptr(), n, out.data_ptr(), a.xt, /*mark_invalid=*/e == 0);
    }
  }

  // Output rows `rows` of w (all n rows when ids is null) as dense [..., k] in dtype.
  static Tensor gather_rows(const Tensor& w, int64_t qtype, const Tensor* ids, int64_t n, int64_t k,
                            std::optional<ScalarType> dtype) {
    const FormatInfo f = check_weight(w, qtype, n, k);
    const ScalarType st = dtype.value_or(ScalarType::Float);
    const FloatType ot = output_float_type(st);
    RowIndex rows;
    int64_t rows_out = n;
    std::vector<int64_t> shape{n, k};
    if (ids != nullptr) {
      check_defined_contiguous(*ids, "ids");
      TORCHEXT_CHECK(ids->scalar_type() == ScalarType::Long || ids->scalar_type() == ScalarType::Int,
                      "ids: expected int64 or int32 token ids, got ", dtype_name(ids->scalar_type()));
      check_same_device(w, "w", *ids, "ids");
      rows = RowIndex{ids->data_ptr(), ids->scalar_type() == ScalarType::Long};
      rows_out = ids->numel();
      shape.assign(ids->sizes().begin(), ids->sizes().end());
      shape.push_back(k);
      Backend::check_ids(rows, rows_out, n, "n");
    }
    Tensor out = torch::stable::new_empty(w, shape, st);
    if (rows_out == 0) return out;
    Ctx ctx(w);
    Backend::dequantize(ctx, f.type, static_cast<const uint8_t*>(w.data_ptr()), n, k, rows, rows_out, out.data_ptr(),
                        ot);
    return out;
  }

  static Tensor dequantize(const Tensor& w, int64_t qtype, int64_t n, int64_t k, std::optional<ScalarType> dtype) {
    return gather_rows(w, qtype, nullptr, n, k, dtype);
  }

  static void gelu_into(const Tensor& x, const Tensor* bias, const Tensor& out, const std::string& approximate) {
    const bool tanh_form = parse_approximate(approximate);
    const int64_t numel = x.numel();
    int64_t channels = 1;
    const void* bias_ptr = nullptr;
    if (bias != nullptr) {
      channels = bias->numel();
      bias_ptr = bias->data_ptr();
    }
    if (numel == 0) return;
    Ctx ctx(x);
    Backend::gelu(ctx, x.data_ptr(), bias_ptr, out.data_ptr(), numel, channels, float_type(x, "x"), tanh_form);
  }

  static Tensor gelu(Tensor x, std::string approximate) {
    check_defined_contiguous(x, "x");
    float_type(x, "x");
    Tensor out = torch::stable::empty_like(x);
    gelu_into(x, nullptr, out, approximate);
    return out;
  }

  static void gelu_(Tensor x, std::string approximate) {
    check_defined_contiguous(x, "x");
    float_type(x, "x");
    gelu_into(x, nullptr, x, approximate);
  }

  static Tensor bias_gelu(Tensor x, Tensor bias, std::string approximate) {
    check_defined_contiguous(x, "x");
    check_defined_contiguous(bias, "bias");
    float_type(x, "x");
    TORCHEXT_CHECK(bias.scalar_type() == x.scalar_type(), "bias: expected the dtype of x (",
                    dtype_name(x.scalar_type()), "), got ", dtype_name(bias.scalar_type()));
    check_same_device(x, "x", bias, "bias");
    TORCHEXT_CHECK(bias.dim() == 1 && x.dim() >= 1 && bias.size(0) == x.size(x.dim() - 1),
                    "bias: expected a 1-D tensor of x's last dimension (", x.dim() >= 1 ? x.size(x.dim() - 1) : 0,
                    "), got ", bias.dim(), " dimensions of ", bias.dim() == 1 ? bias.size(0) : bias.numel(),
                    " elements");
    Tensor out = torch::stable::empty_like(x);
    gelu_into(x, &bias, out, approximate);
    return out;
  }

  // The checks of cached_attention and cached_attention_quantize_q8_1: (q's shape as the kernels take it, q's type).
  static std::pair<AttentionShape, FloatType> check_attention(const Tensor& q, const Tensor& k_cache,
                                                              const Tensor& v_cache, const Tensor& pos, double scale,
                                                              int64_t window) {
    check_defined_contiguous(q, "q");
    check_defined_contiguous(k_cache, "k_cache");
    check_defined_contiguous(v_cache, "v_cache");
    check_defined_contiguous(pos, "pos");
    const FloatType t = float_type(q, "q");
    TORCHEXT_CHECK(q.dim() == 4, "q: expected [batch, heads, rows, dim], got ", q.dim(), " dimensions");
    TORCHEXT_CHECK(k_cache.dim() == 4, "k_cache: expected [batch, kv_heads, keys, dim], got ", k_cache.dim(),
                    " dimensions");
    check_like(v_cache, "v_cache", k_cache, "k_cache");
    for (const auto& [c, name] : {std::pair<const Tensor*, const char*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
      TORCHEXT_CHECK(c->scalar_type() == q.scalar_type(), name, ": expected the dtype of q (",
                      dtype_name(q.scalar_type()), "), got ", dtype_name(c->scalar_type()));
      check_same_device(q, "q", *c, name);
    }
    check_same_device(q, "q", pos, "pos");
    const AttentionShape s{q.size(0), q.size(1), k_cache.size(1), q.size(2), k_cache.size(2), q.size(3)};
    TORCHEXT_CHECK(k_cache.size(0) == s.batch && k_cache.size(3) == s.dim, "k_cache: expected [", s.batch,
                    ", kv_heads, keys, ", s.dim, "] (q's batch and dim), got ", shape_string(k_cache));
    TORCHEXT_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "k_cache: expected kv_heads dividing q's ", s.heads,
                    " heads, got ", s.kv_heads);
    TORCHEXT_CHECK(s.keys > 0, "k_cache: expected at least one key position");
    TORCHEXT_CHECK(s.dim % 8 == 0 && s.dim > 0 && s.dim <= 256, "q: expected a head dim that is a multiple of 8 up ",
                    "to 256, got ", s.dim);
    TORCHEXT_CHECK(pos.scalar_type() == ScalarType::Long && pos.dim() == 1 && pos.size(0) == s.rows,
                    "pos: expected an int64 tensor of q's ", s.rows, " rows' positions, got ",
                    dtype_name(pos.scalar_type()), " ", shape_string(pos));
    TORCHEXT_CHECK(window >= 0, "window: expected 0 (every earlier key) or a positive number of positions, got ",
                    window);
    // the kernels compute in float: a larger double would become inf there, and the scores NaN
    TORCHEXT_CHECK(std::isfinite(scale) && std::abs(scale) <= std::numeric_limits<float>::max(),
                   "scale: expected a finite number within float32's range, got ", scale);
    // 16-byte loads of 8 values (the CUDA kernels); any tensor torch allocates is aligned.
    check_alignment(q, 16, "q", "rows are read 16 bytes at a time");
    check_alignment(k_cache, 16, "k_cache", "rows are read 16 bytes at a time");
    check_alignment(v_cache, 16, "v_cache", "rows are read 16 bytes at a time");
    checked_mul(checked_mul(checked_mul(s.batch, s.heads, "q"), s.rows, "q"), s.dim, "q");
    return {s, t};
  }

  // softmax(scale * q . k_j) . v_j over the cached keys j each query row's position sees (kernels/cached_attention.h).
  static Tensor cached_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, double scale, int64_t window) {
    const auto [s, t] = check_attention(q, k_cache, v_cache, pos, scale, window);
    Tensor out = torch::stable::empty_like(q);
    if (out.numel() == 0) return out;
    const int64_t* positions = static_cast<const int64_t*>(pos.data_ptr());
    Backend::check_positions(positions, s.rows, s.keys);
    Ctx ctx(q);
    Backend::cached_attention(ctx, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), positions, window,
                              float(scale), s, t, out);
    return out;
  }

  // quantize_q8_1(cached_attention(...).transpose(1, 2).reshape(B, T, H * D)), the same bytes: the attention's
  // output as the Q8_1 input of the projection after it, uint8 [B, T, q8_1 bytes of H * D values].
  static Tensor cached_attention_quantize_q8_1(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, double scale,
                                               int64_t window) {
    const auto [s, t] = check_attention(q, k_cache, v_cache, pos, scale, window);
    TORCHEXT_CHECK(s.dim % kQ8Block == 0, "q: expected a head dim that is a multiple of 32 for ",
                    "cached_attention_quantize_q8_1 (each Q8_1 block of 32 values inside one head), got ", s.dim);
    const int64_t k = checked_mul(s.heads, s.dim, "q");
    const int64_t blocks = q8_1_blocks_per_row(k);
    const std::vector<int64_t> shape{s.batch, s.rows, checked_mul(blocks, int64_t(sizeof(block_q8_1)), "q")};
    checked_mul(checked_mul(s.batch, s.rows, "q"), shape.back(), "q");
    // The kernels write the blocks of values; the padding blocks past H * D are zeros, as quantize_q8_1's.
    Tensor out = blocks * kQ8Block == k ? torch::stable::new_empty(q, shape, ScalarType::Byte)
                                        : torch::stable::new_zeros(q, shape, ScalarType::Byte);
    if (out.numel() == 0) return out;
    const int64_t* positions = static_cast<const int64_t*>(pos.data_ptr());
    Backend::check_positions(positions, s.rows, s.keys);
    Ctx ctx(q);
    Backend::cached_attention_quantize_q8_1(ctx, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), positions,
                                            window, float(scale), s, t, out);
    return out;
  }

  // q [B, T, H, D], k, v [B, T, KV, D] -> q in cached_attention's layout [B, H, T, D], after an optional
  // per-head RMSNorm and the rotary embedding; k (normed and rotated) and v written into the caches at
  // pos (kernels/rope_cache.h). q, k and v may be views of a stacked projection: rows strided, each
  // row's heads and each head's values contiguous.
  static Tensor rope_cache_write(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos, Tensor k_cache,
                                 Tensor v_cache, std::optional<Tensor> q_weight, std::optional<Tensor> k_weight,
                                 double eps) {
    TORCHEXT_CHECK(q.defined() && q.dim() == 4, "q: expected [batch, rows, heads, dim]");
    const FloatType t = float_type(q, "q");
    const RopeShape s{q.size(0), q.size(1), q.size(2), k.defined() && k.dim() == 4 ? k.size(2) : 0, q.size(3),
                      k_cache.defined() && k_cache.dim() == 4 ? k_cache.size(2) : 0};
    TORCHEXT_CHECK(s.heads > 0 && s.dim > 0 && s.dim % 2 == 0, "q: expected heads and an even head dim, got ",
                    shape_string(q));
    const HeadRows qr = head_rows(q, "q", q, s.heads, s.dim);
    TORCHEXT_CHECK(k.defined() && k.dim() == 4 && k.size(0) == s.batch && k.size(1) == s.rows && k.size(2) > 0 &&
                        k.size(3) == s.dim,
                    "k: expected [", s.batch, ", ", s.rows, ", kv_heads, ", s.dim, "] (q's batch, rows and dim), got ",
                    k.defined() ? shape_string(k) : std::string("None"));
    const HeadRows kr = head_rows(k, "k", q, s.kv_heads, s.dim);
    TORCHEXT_CHECK(v.defined() && v.sizes().equals(k.sizes()), "v: expected the shape of k ", shape_string(k),
                    ", got ", v.defined() ? shape_string(v) : std::string("None"));
    const HeadRows vr = head_rows(v, "v", q, s.kv_heads, s.dim);
    for (const auto& [c, name] : {std::pair<const Tensor*, const char*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
      check_defined_contiguous(*c, name);
      TORCHEXT_CHECK(c->scalar_type() == q.scalar_type(), name, ": expected the dtype of q (",
                      dtype_name(q.scalar_type()), "), got ", dtype_name(c->scalar_type()));
      TORCHEXT_CHECK(c->dim() == 4 && c->size(0) == s.batch && c->size(1) == s.kv_heads && c->size(2) > 0 &&
                          c->size(3) == s.dim,
                      name, ": expected [", s.batch, ", ", s.kv_heads, ", keys, ", s.dim, "] (k's batch, heads and ",
                      "dim), got ", shape_string(*c));
      check_same_device(q, "q", *c, name);
    }
    TORCHEXT_CHECK(v_cache.size(2) == s.keys, "v_cache: expected the shape of k_cache ", shape_string(k_cache),
                    ", got ", shape_string(v_cache));
    // one kernel writes both: overlapping caches would hold v where k was written (the fake sees no addresses)
    const uintptr_t kc = reinterpret_cast<uintptr_t>(k_cache.data_ptr());
    const uintptr_t vc = reinterpret_cast<uintptr_t>(v_cache.data_ptr());
    const uintptr_t cache_bytes = uintptr_t(k_cache.numel()) * k_cache.element_size();
    TORCHEXT_CHECK(cache_bytes == 0 || kc + cache_bytes <= vc || vc + cache_bytes <= kc,
                    "v_cache: overlaps k_cache in memory; expected two separate caches");
    for (const auto& [c, name] : {std::pair<const Tensor*, const char*>{&cos, "cos"}, {&sin, "sin"}}) {
      check_defined_contiguous(*c, name);
      TORCHEXT_CHECK(c->scalar_type() == ScalarType::Float && c->dim() == 2 && c->size(0) >= s.keys &&
                          c->size(1) == s.dim,
                      name, ": expected a float32 table [positions >= ", s.keys, ", ", s.dim,
                      "] (a row for each cache position, q's dim), got ", dtype_name(c->scalar_type()), " ",
                      shape_string(*c));
      check_same_device(q, "q", *c, name);
    }
    check_defined_contiguous(pos, "pos");
    TORCHEXT_CHECK(pos.scalar_type() == ScalarType::Long && pos.dim() == 1 && pos.size(0) == s.rows,
                    "pos: expected an int64 tensor of q's ", s.rows, " rows' positions, got ",
                    dtype_name(pos.scalar_type()), " ", shape_string(pos));
    check_same_device(q, "q", pos, "pos");
    const HeadNorm qn = head_norm(q_weight, "q_weight", q, s.dim), kn = head_norm(k_weight, "k_weight", q, s.dim);
    check_eps(eps);
    checked_mul(checked_mul(checked_mul(s.batch, s.rows, "q"), s.heads + s.kv_heads, "q"), s.dim, "q");
    Tensor out = torch::stable::new_empty(q, {s.batch, s.heads, s.rows, s.dim}, q.scalar_type());
    if (out.numel() == 0) return out;
    const int64_t* positions = static_cast<const int64_t*>(pos.data_ptr());
    Backend::check_positions(positions, s.rows, s.keys);
    Ctx ctx(q);
    Backend::rope_cache_write(ctx, qr, kr, vr, static_cast<const float*>(cos.data_ptr()),
                              static_cast<const float*>(sin.data_ptr()), positions, qn, kn, float(eps), s, t,
                              out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr());
    return out;
  }

  // x [B, T, heads, dim] of q's dtype and device, each row's heads and each head's values contiguous,
  // the rows at any non-negative strides.
  static HeadRows head_rows(const Tensor& x, const char* arg, const Tensor& q, int64_t heads, int64_t dim) {
    TORCHEXT_CHECK(x.scalar_type() == q.scalar_type(), arg, ": expected the dtype of q (",
                    dtype_name(q.scalar_type()), "), got ", dtype_name(x.scalar_type()));
    check_same_device(q, "q", x, arg);
    TORCHEXT_CHECK((heads == 1 || x.stride(2) == dim) && (dim == 1 || x.stride(3) == 1) && x.stride(0) >= 0 &&
                        x.stride(1) >= 0,
                    arg, ": expected each row's heads and each head's values contiguous (strides [.., .., ", dim,
                    ", 1]), got strides [", x.stride(0), ", ", x.stride(1), ", ", x.stride(2), ", ", x.stride(3), "]");
    return {x.data_ptr(), x.stride(0), x.stride(1)};
  }

  // An optional per-head norm weight [dim], float32 or q's dtype, on q's device.
  static HeadNorm head_norm(const std::optional<Tensor>& w, const char* arg, const Tensor& q, int64_t dim) {
    if (!w) return {nullptr, FloatType::F32};
    check_defined_contiguous(*w, arg);
    TORCHEXT_CHECK(w->scalar_type() == ScalarType::Float || w->scalar_type() == q.scalar_type(), arg,
                    ": expected float32 or the dtype of q (", dtype_name(q.scalar_type()), "), got ",
                    dtype_name(w->scalar_type()));
    TORCHEXT_CHECK(w->dim() == 1 && w->size(0) == dim, arg, ": expected shape [", dim, "] (the head dim), got ",
                    shape_string(*w));
    check_same_device(q, "q", *w, arg);
    return {w->data_ptr(), float_type(*w, arg)};
  }

  // The k-quant ops kept from the first, pre-torchext version's API, each the generic op at a fixed format.
  static Tensor q4k_q8_gemv(Tensor w, Tensor xq, int64_t n, int64_t k) {
    return gemv_q8_1(w, int64_t(QType::Q4_K), xq, n, k);
  }
  static Tensor q4k_gemv(Tensor w, Tensor x, int64_t n, int64_t k) { return matmul(w, int64_t(QType::Q4_K), x, n, k); }
  static Tensor q5k_gemv(Tensor w, Tensor x, int64_t n, int64_t k) { return matmul(w, int64_t(QType::Q5_K), x, n, k); }
  static Tensor q6k_gemv(Tensor w, Tensor x, int64_t n, int64_t k) { return matmul(w, int64_t(QType::Q6_K), x, n, k); }
  static Tensor qmatmul(Tensor w, int64_t qtype, Tensor x, int64_t n, int64_t k, bool exact) {
    return matmul(w, qtype, x, n, k, exact);
  }
  static Tensor qmatmul_q8_1(Tensor w, int64_t qtype, Tensor xq, int64_t n, int64_t k,
                             std::optional<ScalarType> dtype) {
    return gemv_q8_1(w, qtype, xq, n, k, dtype);
  }
  static Tensor dequantize_op(Tensor w, int64_t qtype, int64_t n, int64_t k, std::optional<ScalarType> dtype) {
    return dequantize(w, qtype, n, k, dtype);
  }
  static Tensor embedding(Tensor w, int64_t qtype, Tensor ids, int64_t n, int64_t k, std::optional<ScalarType> dtype) {
    return gather_rows(w, qtype, &ids, n, k, dtype);
  }
  static Tensor qmatmul_id(Tensor w, int64_t qtype, Tensor x, Tensor ids, int64_t n, int64_t k, bool exact) {
    return matmul_id(w, qtype, x, ids, n, k, exact);
  }
};

// Registers every op of Ops<Backend> for one dispatch key; called from each backend's
// STABLE_TORCH_LIBRARY_IMPL block.
#define TORCHEXT_REGISTER_OPS(m, Backend)                                      \
  do {                                                                         \
    using O = ::torchext::Ops<Backend>;                                        \
    m.impl("quantize_q8_1", TORCH_BOX(&O::quantize_q8_1));                     \
    m.impl("rms_norm_quantize_q8_1", TORCH_BOX(&O::rms_norm_quantize_q8_1));   \
    m.impl("add_rms_norm_quantize_q8_1", TORCH_BOX(&O::add_rms_norm_quantize_q8_1)); \
    m.impl("gated_gelu_quantize_q8_1", TORCH_BOX(&O::gated_gelu_quantize_q8_1)); \
    m.impl("gated_silu_quantize_q8_1", TORCH_BOX(&O::gated_silu_quantize_q8_1)); \
    m.impl("q4k_q8_gemv", TORCH_BOX(&O::q4k_q8_gemv));                         \
    m.impl("q4k_q8_gemv_packed", TORCH_BOX(&O::q4k_q8_gemv));                  \
    m.impl("q4k_gemv", TORCH_BOX(&O::q4k_gemv));                               \
    m.impl("q5k_gemv", TORCH_BOX(&O::q5k_gemv));                               \
    m.impl("q6k_gemv", TORCH_BOX(&O::q6k_gemv));                               \
    m.impl("qmatmul", TORCH_BOX(&O::qmatmul));                                 \
    m.impl("qmatmul_q8_1", TORCH_BOX(&O::qmatmul_q8_1));                       \
    m.impl("gated_gelu_qmatmul", TORCH_BOX(&O::gated_gelu_qmatmul));           \
    m.impl("gated_silu_qmatmul", TORCH_BOX(&O::gated_silu_qmatmul));           \
    m.impl("qmatmul_id", TORCH_BOX(&O::qmatmul_id));                           \
    m.impl("cached_attention", TORCH_BOX(&O::cached_attention));               \
    m.impl("cached_attention_quantize_q8_1", TORCH_BOX(&O::cached_attention_quantize_q8_1)); \
    m.impl("rope_cache_write", TORCH_BOX(&O::rope_cache_write));               \
    m.impl("gelu", TORCH_BOX(&O::gelu));                                       \
    m.impl("gelu_", TORCH_BOX(&O::gelu_));                                     \
    m.impl("bias_gelu", TORCH_BOX(&O::bias_gelu));                             \
    m.impl("dequantize", TORCH_BOX(&O::dequantize_op));                        \
    m.impl("embedding", TORCH_BOX(&O::embedding));                             \
  } while (0)

}  // namespace torchext
