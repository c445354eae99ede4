// Q8_1 quantization of values computed on the way in: an RMSNorm of stored activations (after a
// residual add), or a gated GELU. One launch instead of the norm or GELU, the add or product, and
// quantize_q8_1; the bytes are those of the unfused ops.
#include "kernels/fused_q8_1.cuh"
#include "kernels/fused_q8_1_math.h"
#include "kernels/gelu_math.h"
#include "kernels/quantize_q8_1_rows.cuh"

namespace torchext {
namespace {

// Rows are read whole by each of their warps, with x's type a template argument: read at run time, it
// put a branch beside each of the batched loads below, and bf16 rows took twice fp32's time (H200,
// [1, 640]: 6.5 against 4.0 us; [1, 5120]: 33.3 against 12.8).
//
// kBatch loads in flight before their squares are added in order, so a row of up to 32 x kBatch values
// costs one memory round trip. Measured on the H200 (CUDA graph, [1, k], us at k = 640 / 2048 / 5120):
// fp32 8 in flight 3.05 / 4.80 / 8.64, 32 in flight 5.12 / 9.78 / 21.1; bf16 8 in flight 3.22 / 4.99 /
// 9.02, 32 in flight 3.01 / 4.32 / 7.36; quantize_q8_1 alone 2.0.
template <FloatType XT>
constexpr int kRowBatch = XT == FloatType::F32 ? 8 : 32;

// Asks for the 128-byte lines of p[base .. base + k) (elements of type t) in L1, a line a lane, without
// waiting. A norm's steps read x, then the sum, then the weights, each depending on the last: with
// every line requested at the start, they wait for one memory round trip between them, not one each.
__device__ __forceinline__ void prefetch_row(const void* p, FloatType t, int64_t base, int64_t k) {
  const int64_t size = t == FloatType::F32 ? 4 : 2;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) + uintptr_t(base * size);
  const uintptr_t end = start + uintptr_t(k * size);
  for (uintptr_t line = (start & ~uintptr_t(127)) + 128 * (threadIdx.x % kWarp); line < end; line += 128 * kWarp)
    asm volatile("prefetch.global.L1 [%0];" ::"l"(line));
}

// The sum over j < k of value(j)^2, by a whole warp, in the order fused_q8_1_math.h fixes: lane l is
// partial sum l (j = l, l + 32, ...), then the xor shuffles fold the partials in halves.
template <int kBatch, class Value>
__device__ float warp_sum_squares(int64_t k, const Value& value) {
  float sum = 0.0f;
  for (int64_t j0 = threadIdx.x % kWarp; j0 < k; j0 += kBatch * kWarp) {
    float v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t j = j0 + b * kWarp;
      v[b] = j < k ? value(j) : 0.0f;
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      if (j0 + b * kWarp < k) sum = add_rn(sum, mul_rn(v[b], v[b]));
  }
  static_assert(kRmsLanes == kWarp, "one partial sum per lane");
#pragma unroll
  for (int h = kWarp / 2; h > 0; h /= 2) sum = add_rn(sum, __shfl_xor_sync(0xffffffffu, sum, h));
  return sum;
}

// x / rms(x) * w.
template <FloatType XT>
struct RmsNormValues {
  const void* x;
  const void* w;
  FloatType wt;
  float eps;
  bool vector_ok;  // x's rows and w can both be read 16 bytes at a time
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    const int64_t base = row * k;
    prefetch_row(w, wt, 0, k);
    const float inverse =
        rms_inverse(warp_sum_squares<kRowBatch<XT>>(k, [&](int64_t j) { return load_float(x, base + j, XT); }), k, eps);
    float wv[8];
    load_group8(x, XT, base, col, k, vector_ok, v);
    load_group8(w, wt, 0, col, k, vector_ok, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = col + i < k ? rms_norm_value(v[i], inverse, wv[i], XT) : 0.0f;  // zero padding
  }
};

// s = residual + t (t = x, or with kPostNorm x / rms(x) * x_weight, x_weight of type XWT), stored to
// `sum`, then s / rms(s) * w. Each warp computes its row's s twice over (for rms(s), then its own
// columns) rather than staging it: the re-reads hit L1, and the rows are short.
template <FloatType XT, bool kPostNorm, FloatType XWT>
struct AddRmsNormValues {
  const void* x;
  const void* residual;
  const void* x_weight;
  const void* w;
  FloatType wt;
  float eps;
  void* sum;
  bool vector_ok;  // every row and weight can be read and written 16 bytes at a time
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    const int64_t base = row * k;
    prefetch_row(residual, XT, base, k);
    if constexpr (kPostNorm) prefetch_row(x_weight, XWT, 0, k);
    prefetch_row(w, wt, 0, k);
    float x_inverse = 0.0f;
    if constexpr (kPostNorm)
      x_inverse = rms_inverse(
          warp_sum_squares<kRowBatch<XT>>(k, [&](int64_t j) { return load_float(x, base + j, XT); }), k, eps);
    const auto added = [&](float xj, float rj, float xwj) {
      return residual_sum_value(rj, kPostNorm ? rms_norm_value(xj, x_inverse, xwj, XT) : xj, XT);
    };
    const float inverse = rms_inverse(warp_sum_squares<kRowBatch<XT>>(k,
                                                                      [&](int64_t j) {
                                                                        return added(load_float(x, base + j, XT),
                                                                                     load_float(residual, base + j, XT),
                                                                                     kPostNorm ? load_float(x_weight, j, XWT)
                                                                                               : 0.0f);
                                                                      }),
                                      k, eps);
    float xv[8], rv[8], xwv[8] = {}, wv[8];
    load_group8(x, XT, base, col, k, vector_ok, xv);
    load_group8(residual, XT, base, col, k, vector_ok, rv);
    if constexpr (kPostNorm) load_group8(x_weight, XWT, 0, col, k, vector_ok, xwv);
    load_group8(w, wt, 0, col, k, vector_ok, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = added(xv[i], rv[i], xwv[i]);
    store_group8(sum, XT, base, col, k, vector_ok, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = col + i < k ? rms_norm_value(v[i], inverse, wv[i], XT) : 0.0f;
  }
};

// gelu(gate) * up.
struct GatedGeluValues {
  const void* gate;
  const void* up;
  FloatType t;
  bool tanh_form;
  bool vector_ok;
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    float u[8];
    load_group8(gate, t, row * k, col, k, vector_ok, v);
    load_group8(up, t, row * k, col, k, vector_ok, u);
#pragma unroll
    for (int i = 0; i < 8; ++i)  // past k: gelu(0) * 0 = 0, the padding
      v[i] = gated_value(tanh_form ? gelu_tanh(v[i]) : gelu_erf(v[i]), u[i], t);
  }
};

}  // namespace

cudaError_t launch_rms_norm_quantize_q8_1(const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows,
                                          int64_t k, float eps, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(x, xt, k) && rows_allow_vector_loads(w, wt, k);
  switch (xt) {
    case FloatType::F32:
      return launch_quantize_q8_1_rows(RmsNormValues<FloatType::F32>{x, w, wt, eps, vector_ok}, rows, k, out, stream);
    case FloatType::F16:
      return launch_quantize_q8_1_rows(RmsNormValues<FloatType::F16>{x, w, wt, eps, vector_ok}, rows, k, out, stream);
    case FloatType::BF16:
      return launch_quantize_q8_1_rows(RmsNormValues<FloatType::BF16>{x, w, wt, eps, vector_ok}, rows, k, out, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {

template <FloatType XT>
cudaError_t launch_add_rms_norm_typed(const void* x, const void* residual, const void* x_weight, FloatType xwt,
                                      const void* w, FloatType wt, int64_t rows, int64_t k, float eps, void* sum,
                                      bool vector_ok, block_q8_1* out, cudaStream_t stream) {
  if (!x_weight)
    return launch_quantize_q8_1_rows(
        AddRmsNormValues<XT, false, XT>{x, residual, x_weight, w, wt, eps, sum, vector_ok}, rows, k, out, stream);
  if (xwt == FloatType::F32)
    return launch_quantize_q8_1_rows(
        AddRmsNormValues<XT, true, FloatType::F32>{x, residual, x_weight, w, wt, eps, sum, vector_ok}, rows, k, out,
        stream);
  return launch_quantize_q8_1_rows(AddRmsNormValues<XT, true, XT>{x, residual, x_weight, w, wt, eps, sum, vector_ok},
                                   rows, k, out, stream);
}

}  // namespace

cudaError_t launch_add_rms_norm_quantize_q8_1(const void* x, const void* residual, FloatType xt, const void* x_weight,
                                              FloatType xwt, const void* w, FloatType wt, int64_t rows, int64_t k,
                                              float eps, void* sum, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(x, xt, k) && rows_allow_vector_loads(residual, xt, k) &&
                         rows_allow_vector_loads(sum, xt, k) && rows_allow_vector_loads(w, wt, k) &&
                         (!x_weight || rows_allow_vector_loads(x_weight, xwt, k));
  switch (xt) {
    case FloatType::F32:
      return launch_add_rms_norm_typed<FloatType::F32>(x, residual, x_weight, xwt, w, wt, rows, k, eps, sum, vector_ok,
                                                       out, stream);
    case FloatType::F16:
      return launch_add_rms_norm_typed<FloatType::F16>(x, residual, x_weight, xwt, w, wt, rows, k, eps, sum, vector_ok,
                                                       out, stream);
    case FloatType::BF16:
      return launch_add_rms_norm_typed<FloatType::BF16>(x, residual, x_weight, xwt, w, wt, rows, k, eps, sum,
                                                        vector_ok, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gated_gelu_quantize_q8_1(const void* gate, const void* up, FloatType t, int64_t rows, int64_t k,
                                            bool tanh_form, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(gate, t, k) && rows_allow_vector_loads(up, t, k);
  return launch_quantize_q8_1_rows(GatedGeluValues{gate, up, t, tanh_form, vector_ok}, rows, k, out, stream);
}

}  // namespace torchext
