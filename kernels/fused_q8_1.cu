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
// L1), in the order fused_q8_1_math.h fixes: lane l is partial sum l. x's type is a template argument:
// read at run time, it put a branch beside each of the batched loads below, and bf16 rows took twice
// fp32's time (H200, [1, 640]: 6.5 against 4.0 us; [1, 5120]: 33.3 against 12.8).
template <FloatType XT>
struct RmsNormValues {
  const void* x;
  const void* w;
  FloatType wt;
  float eps;
  bool vector_ok;  // x's rows and w can both be read 16 bytes at a time
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    const int64_t base = row * k;
    // kBatch loads in flight before their squares are added in order, so a row of up to 32 x kBatch
    // values costs one memory round trip. Measured on the H200 (CUDA graph, [1, k], us at k = 640 /
    // 2048 / 5120): fp32 8 in flight 3.05 / 4.80 / 8.64, 32 in flight 5.12 / 9.78 / 21.1; bf16 8 in
    // flight 3.22 / 4.99 / 9.02, 32 in flight 3.01 / 4.32 / 7.36; quantize_q8_1 alone 2.0.
    constexpr int kBatch = XT == FloatType::F32 ? 8 : 32;
    float sum = 0.0f;
    for (int64_t j0 = threadIdx.x % kWarp; j0 < k; j0 += kBatch * kWarp) {
      float xj[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t j = j0 + b * kWarp;
        xj[b] = j < k ? load_float(x, base + j, XT) : 0.0f;
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
    load_group8(x, XT, base, col, k, vector_ok, v);
    load_group8(w, wt, 0, col, k, vector_ok, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = col + i < k ? rms_norm_value(v[i], inverse, wv[i], XT) : 0.0f;  // zero padding
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

cudaError_t launch_gated_gelu_quantize_q8_1(const void* gate, const void* up, FloatType t, int64_t rows, int64_t k,
                                            bool tanh_form, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(gate, t, k) && rows_allow_vector_loads(up, t, k);
  return launch_quantize_q8_1_rows(GatedGeluValues{gate, up, t, tanh_form, vector_ok}, rows, k, out, stream);
}

}  // namespace torchext
