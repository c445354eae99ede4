// Q8_1 quantization of values computed on the way in: an RMSNorm of stored activations, or a gated
// GELU. One launch instead of the norm or GELU, the product, and quantize_q8_1; the bytes are those
// of the unfused ops.
#include "kernels/fused_q8_1.cuh"
#include "kernels/fused_q8_1_math.h"
#include "kernels/gelu_math.h"
#include "kernels/quantize_q8_1_rows.cuh"

namespace torchext {
namespace {

// x / rms(x) * w. Each warp sums its row's squares itself (the rows are short, and the re-reads hit
// L1), in the order fused_q8_1_math.h fixes: lane l is partial sum l.
struct RmsNormValues {
  const void* x;
  const void* w;
  FloatType xt, wt;
  float eps;
  bool vector_ok;  // x's rows and w can both be read 16 bytes at a time
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    const int64_t base = row * k;
    // kBatch loads in flight before their squares are added in order, so a row of up to 32 x kBatch
    // values costs one memory round trip. Measured on the H200 (CUDA graph, [1, k] fp32 / bf16):
    // with 8 in flight 3.9 / 6.4 us at k = 640 and 7.1 / 14.7 us at k = 2048, against quantize_q8_1's
    // 2.0 us.
    constexpr int kBatch = 32;
    float sum = 0.0f;
    for (int64_t j0 = threadIdx.x % kWarp; j0 < k; j0 += kBatch * kWarp) {
      float xj[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t j = j0 + b * kWarp;
        xj[b] = j < k ? load_float(x, base + j, xt) : 0.0f;
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (j0 + b * kWarp < k) sum = add_rn(sum, mul_rn(xj[b], xj[b]));
    }
    static_assert(kRmsLanes == kWarp, "one partial sum per lane");
#pragma unroll
    for (int h = kWarp / 2; h > 0; h /= 2) sum = add_rn(sum, __shfl_xor_sync(0xffffffffu, sum, h));
    const float inverse = rms_inverse(sum, k, eps);
    float wv[8];
    load_group8(x, xt, base, col, k, vector_ok, v);
    load_group8(w, wt, 0, col, k, vector_ok, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = col + i < k ? rms_norm_value(v[i], inverse, wv[i], xt) : 0.0f;  // zero padding
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
  return launch_quantize_q8_1_rows(RmsNormValues{x, w, xt, wt, eps, vector_ok}, rows, k, out, stream);
}

cudaError_t launch_gated_gelu_quantize_q8_1(const void* gate, const void* up, FloatType t, int64_t rows, int64_t k,
                                            bool tanh_form, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(gate, t, k) && rows_allow_vector_loads(up, t, k);
  return launch_quantize_q8_1_rows(GatedGeluValues{gate, up, t, tanh_form, vector_ok}, rows, k, out, stream);
}

}  // namespace torchext
