// One GEMV body for every weight format (QuantTraits supplies the block arithmetic) and every
// batch of up to 8 activation rows: each weight item is loaded once and dotted with all rows.
#include "kernels/gemv_q8_1.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kRowsPerCta = 4;  // one warp per output row

template <class T, int B>
__global__ void __launch_bounds__(kRowsPerCta * kWarp)
    gemv_q8_1_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, const block_q8_1* __restrict__ xq,
                     int rows, void* __restrict__ out, FloatType ot) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;
  const int64_t blocks = (k + T::kValues - 1) / T::kValues;
  const int64_t xs = q8_1_blocks_per_row(k);
  const uint8_t* wrow = w + row * blocks * T::kBytes;
  float acc[B] = {};
  const int64_t items = blocks * T::kItems;
#pragma unroll 4
  for (int64_t it = lane; it < items; it += kWarp) {
    const int64_t b = it / T::kItems;
    // B is rounded up to a power of two: rows past `rows` read the last row again, and are dropped.
    const block_q8_1* x[B];
#pragma unroll
    for (int r = 0; r < B; ++r) x[r] = xq + (r < rows ? r : rows - 1) * xs + b * (T::kValues / kQ8Block);
    T::template dot_item<B>(wrow + b * T::kBytes, int(it % T::kItems), x, acc);
  }
#pragma unroll
  for (int r = 0; r < B; ++r) {
    float v = acc[r];
    for (int m = kWarp / 2; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
    if (lane == 0 && r < rows) store_float(out, r * n + row, ot, v);
  }
}

template <class T, int B>
cudaError_t launch_rows(const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int rows, void* out,
                        FloatType ot, cudaStream_t stream) {
  gemv_q8_1_kernel<T, B><<<grid_for(n, kRowsPerCta), kRowsPerCta * kWarp, 0, stream>>>(w, n, k, xq, rows, out, ot);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int64_t rows,
                             void* out, FloatType ot, cudaStream_t stream) {
  constexpr int kMaxRows = 8;
  const int64_t xs = q8_1_blocks_per_row(k);
  const size_t out_elem = ot == FloatType::F32 ? 4 : 2;
  cudaError_t err = cudaSuccess;
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    // Groups of up to 8 rows; the batch policy keeps larger batches off this path.
    for (int64_t r0 = 0; r0 < rows && err == cudaSuccess; r0 += kMaxRows) {
      const int g = int(rows - r0 < kMaxRows ? rows - r0 : kMaxRows);
      const block_q8_1* x = xq + r0 * xs;
      void* o = static_cast<char*>(out) + r0 * n * out_elem;
      if (g == 1) err = launch_rows<T, 1>(w, n, k, x, g, o, ot, stream);
      else if (g == 2) err = launch_rows<T, 2>(w, n, k, x, g, o, ot, stream);
      else if (g <= 4) err = launch_rows<T, 4>(w, n, k, x, g, o, ot, stream);
      else err = launch_rows<T, 8>(w, n, k, x, g, o, ot, stream);
    }
  });
  return known ? err : cudaErrorInvalidValue;
}

}  // namespace torchext
