// Q8_1 quantization of values computed on the way in: an RMSNorm of stored activations (after a
// residual add), or a gated GELU. One launch instead of the norm or GELU, the add or product, and
// quantize_q8_1; the bytes are those of the unfused ops.
#include "kernels/fused_q8_1.cuh"
#include "kernels/fused_q8_1_math.h"
#include "kernels/gated_values.cuh"
#include "kernels/quantize_q8_1_rows.cuh"

namespace torchext {
namespace {

// ---- the norms: a CTA a row --------------------------------------------------------------------------
// The sums of squares run in the order fused_q8_1_math.h fixes: partial l adds the squares of columns
// l, l + 32, ... in turn, then the 32 partials fold in halves. The threads of the row's CTA compute the
// values and their squares, 8 consecutive columns a thread, and stage the squares in shared memory,
// where one warp adds them up in that order: the same bits as one thread walking the row. Before, each
// warp of a row walked the whole row itself, one warp a scheduler with nothing to hide its latency,
// and the cost grew with k although the row sat in L1 (H200, bf16 [1, 640] / [1, 4096], us, CUDA graph:
// rms_norm_quantize_q8_1 3.41 / 6.98 then, 2.81 / 4.82 now; with a residual add and post-norm 5.45 /
// 15.15, now 4.86 / 8.19; bench/norms.py, bench/NOTES.md).
constexpr int kNormThreads = 256;
constexpr int kNormChunk = kNormThreads * 8;  // columns staged at once

// What a row's values are, before the norm and quantize_q8_1 that every kind ends with.
enum class RowSum {
  kNone,         // v = x
  kAdd,          // v = s = residual + x, and s is stored
  kPostNormAdd,  // v = s = residual + x / rms(x) * x_weight, and s is stored
};

struct NormArgs {
  const void* x;
  const void* residual;  // kAdd, kPostNormAdd
  const void* x_weight;  // kPostNormAdd
  const void* w;
  FloatType wt;
  float eps;
  void* sum;       // kAdd, kPostNormAdd
  bool vector_ok;  // every row and weight can be read and written 16 bytes at a time
};

// Asks for the 128-byte lines of p[base .. base + k) (elements of type t) in L1, a line a thread,
// without waiting: the passes below read x, then the residual and weights, each after the last
// pass's sum; with every line requested at the start they wait for one memory round trip in all.
__device__ __forceinline__ void prefetch_row(const void* p, FloatType t, int64_t base, int64_t k) {
  const int64_t size = t == FloatType::F32 ? 4 : 2;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) + uintptr_t(base * size);
  const uintptr_t end = start + uintptr_t(k * size);
  for (uintptr_t line = (start & ~uintptr_t(127)) + 128 * threadIdx.x; line < end; line += 128 * kNormThreads)
    asm volatile("prefetch.global.L1 [%0];" ::"l"(line));
}

// 1 / rms of the k values that group(col, v) gives, 8 columns from col a call (the whole CTA calls it).
template <class Group>
__device__ float row_rms_inverse(int64_t k, float eps, const Group& group) {
  __shared__ float squares[kNormChunk];
  __shared__ float inverse;
  float partial = 0.0f;  // warp 0's lane l: partial sum l
  for (int64_t c0 = 0; c0 < k; c0 += kNormChunk) {
    const int64_t col = c0 + 8 * int64_t(threadIdx.x);
    if (col < k) {
      float v[8];
      group(col, v);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (col + i < k) squares[8 * threadIdx.x + i] = mul_rn(v[i], v[i]);
    }
    __syncthreads();
    if (threadIdx.x < kWarp) {
      const int n = int(k - c0 < kNormChunk ? k - c0 : kNormChunk);
      for (int j = threadIdx.x; j < n; j += kWarp) partial = add_rn(partial, squares[j]);  // kNormChunk % 32 == 0
    }
    __syncthreads();  // squares is written again by the next chunk
  }
  static_assert(kRmsLanes == kWarp, "one partial sum per lane of warp 0");
  if (threadIdx.x < kWarp) {
#pragma unroll
    for (int h = kWarp / 2; h > 0; h /= 2) partial = add_rn(partial, __shfl_xor_sync(0xffffffffu, partial, h));
    if (threadIdx.x == 0) inverse = rms_inverse(partial, k, eps);
  }
  __syncthreads();
  // Read before any thread can write it again: that takes the next call's first __syncthreads.
  return inverse;
}

// x's type (and x_weight's) is a template argument: read at run time, it put a branch beside each
// load, and bf16 rows took twice fp32's time.
template <FloatType XT, RowSum kSum, FloatType XWT>
__global__ void __launch_bounds__(kNormThreads)
    norm_quantize_q8_1_kernel(NormArgs a, int64_t rows, int64_t k, block_q8_1* __restrict__ out) {
  const int64_t blocks = q8_1_blocks_per_row(k);
  allow_dependent_grids();
  wait_for_prior_grids();  // before any prefetch into L1: lines fetched earlier could be stale
  if constexpr (kSum == RowSum::kPostNormAdd) prefetch_row(a.x_weight, XWT, 0, k);
  prefetch_row(a.w, a.wt, 0, k);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * k;
    if constexpr (kSum != RowSum::kNone) prefetch_row(a.residual, XT, base, k);
    const auto x_group = [&](int64_t col, float (&v)[8]) { load_group8(a.x, XT, base, col, k, a.vector_ok, v); };
    float x_inverse = 0.0f;
    if constexpr (kSum == RowSum::kPostNormAdd) x_inverse = row_rms_inverse(k, a.eps, x_group);
    // the row's values at col .. col + 7 (zeros past k)
    const auto value_group = [&](int64_t col, float (&v)[8]) {
      x_group(col, v);
      if constexpr (kSum != RowSum::kNone) {
        float r[8], xw[8];
        load_group8(a.residual, XT, base, col, k, a.vector_ok, r);
        if constexpr (kSum == RowSum::kPostNormAdd) load_group8(a.x_weight, XWT, 0, col, k, a.vector_ok, xw);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          v[i] = residual_sum_value(
              r[i], kSum == RowSum::kPostNormAdd ? rms_norm_value(v[i], x_inverse, xw[i], XT) : v[i], XT);
      }
    };
    const float inverse = row_rms_inverse(k, a.eps, value_group);
    // A quad of lanes a Q8_1 block: a row's 4 x blocks groups are a whole number of warps (32 a
    // super-block of 256 columns), so every lane of a warp takes the same turns of this loop.
    for (int64_t g = threadIdx.x; g < 4 * blocks; g += kNormThreads) {
      const int64_t col = 8 * g;
      float v[8], w[8];
      value_group(col, v);
      if constexpr (kSum != RowSum::kNone) store_group8(a.sum, XT, base, col, k, a.vector_ok, v);
      load_group8(a.w, a.wt, 0, col, k, a.vector_ok, w);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = col + i < k ? rms_norm_value(v[i], inverse, w[i], XT) : 0.0f;  // padding
      store_q8_1_quad(out, row * blocks + g / 4, int(g % 4), quantize_q8_1_quad(v));
    }
  }
}

template <FloatType XT, RowSum kSum, FloatType XWT>
cudaError_t launch_norm(const NormArgs& a, int64_t rows, int64_t k, block_q8_1* out, cudaStream_t stream) {
  const unsigned grid = unsigned(rows < (int64_t(1) << 20) ? rows : int64_t(1) << 20);  // rows in turn beyond
  return launch_dependent(norm_quantize_q8_1_kernel<XT, kSum, XWT>, grid, kNormThreads, 0, stream, a, rows, k, out);
}

template <FloatType XT>
cudaError_t launch_norm_typed(const NormArgs& a, FloatType xwt, int64_t rows, int64_t k, block_q8_1* out,
                              cudaStream_t stream) {
  if (!a.residual) return launch_norm<XT, RowSum::kNone, XT>(a, rows, k, out, stream);
  if (!a.x_weight) return launch_norm<XT, RowSum::kAdd, XT>(a, rows, k, out, stream);
  if (xwt == FloatType::F32) return launch_norm<XT, RowSum::kPostNormAdd, FloatType::F32>(a, rows, k, out, stream);
  return launch_norm<XT, RowSum::kPostNormAdd, XT>(a, rows, k, out, stream);
}

cudaError_t launch_norm_quantize_q8_1(const NormArgs& a, FloatType xt, FloatType xwt, int64_t rows, int64_t k,
                                      block_q8_1* out, cudaStream_t stream) {
  switch (xt) {
    case FloatType::F32: return launch_norm_typed<FloatType::F32>(a, xwt, rows, k, out, stream);
    case FloatType::F16: return launch_norm_typed<FloatType::F16>(a, xwt, rows, k, out, stream);
    case FloatType::BF16: return launch_norm_typed<FloatType::BF16>(a, xwt, rows, k, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_rms_norm_quantize_q8_1(const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows,
                                          int64_t k, float eps, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(x, xt, k) && rows_allow_vector_loads(w, wt, k);
  return launch_norm_quantize_q8_1(NormArgs{x, nullptr, nullptr, w, wt, eps, nullptr, vector_ok}, xt, xt, rows, k,
                                   out, stream);
}

cudaError_t launch_add_rms_norm_quantize_q8_1(const void* x, const void* residual, FloatType xt, const void* x_weight,
                                              FloatType xwt, const void* w, FloatType wt, int64_t rows, int64_t k,
                                              float eps, void* sum, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(x, xt, k) && rows_allow_vector_loads(residual, xt, k) &&
                         rows_allow_vector_loads(sum, xt, k) && rows_allow_vector_loads(w, wt, k) &&
                         (!x_weight || rows_allow_vector_loads(x_weight, xwt, k));
  return launch_norm_quantize_q8_1(NormArgs{x, residual, x_weight, w, wt, eps, sum, vector_ok}, xt, xwt, rows, k,
                                   out, stream);
}

cudaError_t launch_gated_quantize_q8_1(const void* gate, const void* up, FloatType t, GateActivation act, int64_t rows,
                                       int64_t k, block_q8_1* out, cudaStream_t stream) {
  const bool vector_ok = rows_allow_vector_loads(gate, t, k) && rows_allow_vector_loads(up, t, k);
  return with_gated_values(act, gate, up, t, vector_ok,
                           [&](const auto& source) { return launch_quantize_q8_1_rows(source, rows, k, out, stream); });
}

}  // namespace torchext
