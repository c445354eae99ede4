// One GEMV body for every weight format (QuantTraits supplies the block arithmetic) and every
// batch of up to 8 activation rows.
//
// A persistent grid: each CTA first brings the activations into shared memory as Q8_1 blocks
// (quantizing float rows there, so that no separate quantize launch is needed), then walks over
// output rows. `split` warps share one output row when there are too few rows to fill
// the GPU; each weight item is loaded once and dotted with every activation row.
#include <algorithm>

#include "kernels/gemv_q8_1.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"
#include "kernels/quantize_q8_1.cuh"
#include "kernels/quantize_q8_1_warp.cuh"

namespace torchext {
namespace {

constexpr int kWarps = 16;  // large CTAs: fewer of them quantize the same activations
constexpr int kThreads = kWarps * kWarp;
constexpr int kMaxRows = 8;
constexpr size_t kMaxStagedBytes = 200 * 1024;  // of the 227 KB a Hopper CTA may use

size_t staged_bytes(int64_t k, int64_t rows) { return size_t(rows) * q8_1_blocks_per_row(k) * sizeof(block_q8_1); }

// Brings rows x q8_1_blocks_per_row(k) activation blocks into `dst` (shared memory). Each
// thread keeps kUnroll loads in flight before it stores: one load at a time per thread would
// make this prologue a chain of L2 round trips.
constexpr int kUnroll = 4;

__device__ void stage_activations(GemvActivations x, int64_t k, int rows, bool vector_ok, block_q8_1* dst) {
  const int64_t blocks = q8_1_blocks_per_row(k);
  if (x.is_q8_1) {  // 36-byte blocks, copied as words
    const int* src = static_cast<const int*>(x.data);
    int* d = reinterpret_cast<int*>(dst);
    const int64_t words = rows * blocks * int64_t(sizeof(block_q8_1) / 4);
    for (int64_t base = threadIdx.x; base < words; base += kThreads * kUnroll) {
      int v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = base + u * kThreads < words ? src[base + u * kThreads] : 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kThreads < words) d[base + u * kThreads] = v[u];
    }
    return;
  }
  // Float rows: a quad of lanes quantizes each block (quantize_q8_1_warp.cuh).
  const int64_t groups = rows * blocks * 4;
  for (int64_t base = threadIdx.x; base < groups; base += kThreads * kUnroll) {
    float v[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = base + u * kThreads, i = g / 4;
      for (int e = 0; e < 8; ++e) v[u][e] = 0.0f;
      if (g < groups)
        load_group8(x.data, x.float_type, (i / blocks) * k, (i % blocks) * kQ8Block + 8 * (g % 4), k, vector_ok, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t g = base + u * kThreads;
      quantize_q8_1_quad(v[u], g < groups, dst[g < groups ? g / 4 : 0]);
    }
  }
}

template <class T, int B>
__global__ void __launch_bounds__(kThreads)
    gemv_q8_1_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, GemvActivations x, int rows, int split,
                     bool staged, bool vector_ok, void* __restrict__ out, FloatType ot) {
  extern __shared__ block_q8_1 smem_x[];
  __shared__ float partial[kWarps][B];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t xb = q8_1_blocks_per_row(k);
  const int64_t blocks = (k + T::kValues - 1) / T::kValues;
  const int64_t row_bytes = blocks * T::kBytes;
  const int rows_per_step = kWarps / split, part = warp % split;
  if (staged) {
    stage_activations(x, k, rows, vector_ok, smem_x);
    __syncthreads();
  }
  const block_q8_1* xs = staged ? smem_x : static_cast<const block_q8_1*>(x.data);

  const int64_t items = blocks * T::kItems;
  const int64_t stride = int64_t(gridDim.x) * rows_per_step;
  for (int64_t row0 = int64_t(blockIdx.x) * rows_per_step; row0 < n; row0 += stride) {
    const int64_t row = row0 + warp / split;
    float acc[B] = {};
    if (row < n) {
      const uint8_t* wrow = w + row * row_bytes;
#pragma unroll 4
      for (int64_t it = part * kWarp + lane; it < items; it += split * kWarp) {
        const int64_t b = it / T::kItems;
        // B is rounded up to a power of two: rows past `rows` read the last row again, and are dropped.
        const block_q8_1* xr[B];
#pragma unroll
        for (int r = 0; r < B; ++r) xr[r] = xs + (r < rows ? r : rows - 1) * xb + b * (T::kValues / kQ8Block);
        T::template dot_item<B>(wrow + b * T::kBytes, int(it % T::kItems), xr, acc);
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

int sm_count(int device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

template <class T, int B>
cudaError_t launch_rows(const uint8_t* w, int64_t n, int64_t k, GemvActivations x, int rows, void* out, FloatType ot,
                        int device, cudaStream_t stream) {
  auto kernel = gemv_q8_1_kernel<T, B>;
  const bool staged = staged_bytes(k, rows) <= kMaxStagedBytes;
  if (!staged && !x.is_q8_1) return cudaErrorInvalidValue;  // float rows must be quantized first
  const size_t smem = staged ? staged_bytes(k, rows) : 0;
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
  const bool vector_ok = !x.is_q8_1 && rows_allow_vector_loads(x.data, x.float_type, k);
  kernel<<<grid, kThreads, smem, stream>>>(w, n, k, x, rows, split, staged, vector_ok, out, ot);
  return cudaGetLastError();
}

}  // namespace

bool gemv_stages_activations(int64_t k, int64_t rows, int) {
  return staged_bytes(k, std::min<int64_t>(rows, kMaxRows)) <= kMaxStagedBytes;
}

cudaError_t launch_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, GemvActivations x, int64_t rows,
                             void* out, FloatType ot, int device, cudaStream_t stream) {
  const size_t out_elem = ot == FloatType::F32 ? 4 : 2;
  const size_t x_row_bytes = x.is_q8_1 ? q8_1_blocks_per_row(k) * sizeof(block_q8_1)
                                       : size_t(k) * (x.float_type == FloatType::F32 ? 4 : 2);
  cudaError_t err = cudaSuccess;
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    // Groups of up to 8 rows; the batch policy keeps larger batches off this path.
    for (int64_t r0 = 0; r0 < rows && err == cudaSuccess; r0 += kMaxRows) {
      const int g = int(std::min<int64_t>(rows - r0, kMaxRows));
      GemvActivations xg = x;
      xg.data = static_cast<const char*>(x.data) + r0 * x_row_bytes;
      void* o = static_cast<char*>(out) + r0 * n * out_elem;
      if (g == 1) err = launch_rows<T, 1>(w, n, k, xg, g, o, ot, device, stream);
      else if (g == 2) err = launch_rows<T, 2>(w, n, k, xg, g, o, ot, device, stream);
      else if (g <= 4) err = launch_rows<T, 4>(w, n, k, xg, g, o, ot, device, stream);
      else err = launch_rows<T, 8>(w, n, k, xg, g, o, ot, device, stream);
    }
  });
  return known ? err : cudaErrorInvalidValue;
}

}  // namespace torchext
