// One DP4A GEMV body for every weight format (QuantTraits supplies the block arithmetic) and every
// batch of up to 8 activation rows, and the launcher that sends each group of rows to it or to the
// tensor-core GEMV (gemv_q8_1_mma.cu), as batch_policy.h says.
//
// A persistent grid: each CTA first copies the Q8_1 activations into shared memory, split into
// quants and scales (Q8_1SplitRows) so that 16 bytes of activations are one load, then walks
// over output rows. `split` warps share one output row when there are too few rows to fill the
// GPU; each weight item is loaded once and dotted with every activation row.
//
// Float activations are quantized by quantize_q8_1 first. Quantizing them here instead, in
// every CTA, saves a launch but was measured slower at every shape and batch (H100, bench/gemv.py,
// 2026-11-24: 4096x4096 Q4_K batch 1 10.6 us against 9.1 us; 4096x14336 batch 8 102.6 against 77.9).
#include <algorithm>

#include "kernels/batch_policy.h"
#include "kernels/gemv_q8_1.cuh"
#include "kernels/gemv_q8_1_mma.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kWarps = 16;  // large CTAs: fewer of them copy the same activations
constexpr int kThreads = kWarps * kWarp;
constexpr int kUnroll = 4;

// Shared memory for `rows` staged rows: 32 quants and one Q8Scales per 32 values.
size_t staged_bytes(int64_t k, int64_t rows) {
  return size_t(rows) * q8_1_blocks_per_row(k) * (kQ8Block + sizeof(Q8Scales));
}

// Copies rows x q8_1_blocks_per_row(k) Q8_1 blocks into shared memory, quants to `qs` and
// scales to `ds`. Each thread keeps kUnroll loads in flight before it stores: one load at a time
// would make this prologue a chain of L2 round trips.
__device__ void stage_activations(const block_q8_1* x, int64_t k, int rows, int8_t* qs, Q8Scales* ds) {
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x);  // word 0: d and s; words 1..8: quants
  uint32_t* qs_words = reinterpret_cast<uint32_t*>(qs);
  const int64_t words = rows * q8_1_blocks_per_row(k) * 9;
  for (int64_t base = threadIdx.x; base < words; base += kThreads * kUnroll) {
    uint32_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = base + u * kThreads < words ? src[base + u * kThreads] : 0u;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads, block = i / 9, word = i % 9;
      if (i >= words) continue;
      if (word == 0)
        ds[block] = Q8Scales::of_word(v[u]);
      else
        qs_words[block * 8 + word - 1] = v[u];
    }
  }
}

// kStaged: activations in shared memory (any B); otherwise Q8_1 blocks read from global memory
// (B = 1, for rows too long to stage).
template <class T, int B, bool kStaged>
__global__ void __launch_bounds__(kThreads)
    gemv_q8_1_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, const block_q8_1* __restrict__ x, int rows,
                     int split, void* __restrict__ out, FloatType ot) {
  extern __shared__ int4 smem[];
  __shared__ float partial[kWarps][B];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t xb = q8_1_blocks_per_row(k);
  int8_t* qs = reinterpret_cast<int8_t*>(smem);
  Q8Scales* ds = reinterpret_cast<Q8Scales*>(qs + rows * xb * kQ8Block);
  if constexpr (kStaged) {
    stage_activations(x, k, rows, qs, ds);
    __syncthreads();
  }

  constexpr int kBlocksPerItem = T::kValues / kQ8Block;  // Q8_1 blocks per weight block
  const int64_t blocks = (k + T::kValues - 1) / T::kValues;
  const int64_t row_bytes = blocks * T::kBytes;
  const int64_t items = blocks * T::kItems;
  const int rows_per_step = kWarps / split, part = warp % split;
  for (int64_t row0 = int64_t(blockIdx.x) * rows_per_step; row0 < n; row0 += int64_t(gridDim.x) * rows_per_step) {
    const int64_t row = row0 + warp / split;
    float acc[B] = {};
    if (row < n) {
      const uint8_t* wrow = w + row * row_bytes;
      // Several items in flight per lane; with 8 activation rows the registers go to the rows.
#pragma unroll(B <= 2 ? 4 : 2)
      for (int64_t it = part * kWarp + lane; it < items; it += split * kWarp) {
        const int64_t b = it / T::kItems;
        // B is rounded up to a power of two: rows past `rows` read the last row again, and are dropped.
        if constexpr (kStaged) {
          Q8_1SplitRows<B> xr;
#pragma unroll
          for (int r = 0; r < B; ++r) {
            const int64_t first = (r < rows ? r : rows - 1) * xb + b * kBlocksPerItem;
            xr.qs[r] = qs + first * kQ8Block;
            xr.ds[r] = ds + first;
          }
          T::template dot_item<B>(wrow + b * T::kBytes, int(it % T::kItems), xr, acc);
        } else {
          const Q8_1BlockRows<B> xr{{x + b * kBlocksPerItem}};
          T::template dot_item<B>(wrow + b * T::kBytes, int(it % T::kItems), xr, acc);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < B; ++r)
      for (int m = kWarp / 2; m > 0; m /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], m);
    if (split > 1) {  // the split warps of a row add their sums through shared memory
      if (lane == 0)
        for (int r = 0; r < B; ++r) partial[warp][r] = acc[r];
      __syncthreads();
      if (part == 0 && lane == 0)
        for (int r = 0; r < B; ++r)
          for (int p = 1; p < split; ++p) acc[r] += partial[warp + p][r];
      __syncthreads();
    }
    if (part == 0 && lane == 0 && row < n)
      for (int r = 0; r < B && r < rows; ++r) store_float(out, r * n + row, ot, acc[r]);
  }
}

// Shared memory a CTA may stage activations in: the device's opt-in limit (227 KB on Hopper,
// 163 KB on A100, 99 KB on consumer GPUs) less room for the kernel's static arrays.
size_t max_staged_bytes(int device) {
  int limit = 0;
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return limit > 4096 ? size_t(limit) - 4096 : 0;
}

template <class T, int B, bool kStaged>
cudaError_t launch_rows(const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, int rows, void* out,
                        FloatType ot, int device, cudaStream_t stream) {
  auto kernel = gemv_q8_1_kernel<T, B, kStaged>;
  const size_t smem = kStaged ? staged_bytes(k, rows) : 0;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  int ctas_per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const int sms = sm_count(device);
  // Split rows over warps while that still fits in one wave of resident warps, keeping >= 32
  // items per warp: few rows then still fill the GPU, and many rows get whole warps each.
  const int64_t items = (k + T::kValues - 1) / T::kValues * T::kItems;
  const int64_t resident_warps = int64_t(sms) * std::max(ctas_per_sm, 1) * kWarps;
  int split = 1;
  while (split < kWarps && 2 * split * kWarp <= items && 2 * split * n <= resident_warps) split *= 2;
  const int64_t steps = (n + kWarps / split - 1) / (kWarps / split);
  const unsigned grid = unsigned(std::min<int64_t>(steps, int64_t(sms) * std::max(ctas_per_sm, 1)));
  kernel<<<grid, kThreads, smem, stream>>>(w, n, k, x, rows, split, out, ot);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, int64_t rows,
                             void* out, FloatType ot, int device, cudaStream_t stream) {
  const size_t out_elem = ot == FloatType::F32 ? 4 : 2;
  const int64_t xb = q8_1_blocks_per_row(k);
  const size_t max_staged = max_staged_bytes(device);
  const bool int8_mma = has_int8_mma(device);
  cudaError_t err = cudaSuccess;
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    // Groups of up to 16 rows for the tensor-core kernel; for DP4A up to 8, as many as shared memory
    // holds, and rows too long to stage at all are read from global memory one at a time.
    for (int64_t r0 = 0; r0 < rows && err == cudaSuccess;) {
      const block_q8_1* xg = x + r0 * xb;
      void* o = static_cast<char*>(out) + r0 * n * out_elem;
      if (choose_gemv_kernel(rows - r0, T::kValues, int8_mma) == GemvKernel::Int8Mma) {
        const int g = int(std::min<int64_t>(rows - r0, kMaxMmaRows));
        err = launch_gemv_q8_1_mma(wt, w, n, k, xg, g, o, ot, device, stream);
        r0 += g;
        continue;
      }
      int g = int(std::min<int64_t>(rows - r0, kMaxDp4aRows));
      while (g > 1 && staged_bytes(k, g) > max_staged) g /= 2;
      if (staged_bytes(k, g) > max_staged) err = launch_rows<T, 1, false>(w, n, k, xg, 1, o, ot, device, stream);
      else if (g == 1) err = launch_rows<T, 1, true>(w, n, k, xg, g, o, ot, device, stream);
      else if (g == 2) err = launch_rows<T, 2, true>(w, n, k, xg, g, o, ot, device, stream);
      else if (g <= 4) err = launch_rows<T, 4, true>(w, n, k, xg, g, o, ot, device, stream);
      else err = launch_rows<T, 8, true>(w, n, k, xg, g, o, ot, device, stream);
      r0 += g;
    }
  });
  return known ? err : cudaErrorInvalidValue;
}

}  // namespace torchext
