// Q8_1 quantization of activations: one warp per 32-value block, one value per lane.
#include "kernels/launch.cuh"
#include "kernels/quantize_q8_1.cuh"
#include "kernels/quantize_q8_1_warp.cuh"

namespace torchext {
namespace {

constexpr int kWarpsPerCta = 8;

template <FloatType T>
__global__ void __launch_bounds__(kWarpsPerCta * kWarp)
    quantize_q8_1_kernel(const void* __restrict__ x, int64_t rows, int64_t k, block_q8_1* __restrict__ out) {
  const int64_t blocks = q8_1_blocks_per_row(k);
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;  // Q8_1 block index
  const int lane = threadIdx.x % kWarp;
  if (i >= rows * blocks) return;
  const int64_t row = i / blocks, col = (i % blocks) * kQ8Block + lane;
  const float v = col < k ? load_float(x, row * k + col, T) : 0.0f;  // zero padding past K
  quantize_q8_1_warp(v, lane, out[i]);
}

}  // namespace

cudaError_t launch_quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out,
                                 cudaStream_t stream) {
  const unsigned grid = grid_for(rows * q8_1_blocks_per_row(k), kWarpsPerCta);
  const unsigned threads = kWarpsPerCta * kWarp;
  switch (xt) {
    case FloatType::F32: quantize_q8_1_kernel<FloatType::F32><<<grid, threads, 0, stream>>>(x, rows, k, out); break;
    case FloatType::F16: quantize_q8_1_kernel<FloatType::F16><<<grid, threads, 0, stream>>>(x, rows, k, out); break;
    case FloatType::BF16: quantize_q8_1_kernel<FloatType::BF16><<<grid, threads, 0, stream>>>(x, rows, k, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace torchext
