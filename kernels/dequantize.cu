// Dequantization: one thread per 32-value chunk, through the format's dequantize_chunk.
#include "kernels/dequantize.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, void* __restrict__ out, FloatType ot) {
  constexpr int kChunks = T::kValues / 32;
  const int64_t blocks = (k + T::kValues - 1) / T::kValues;
  const int64_t chunks_per_row = (k + 31) / 32;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n * chunks_per_row) return;
  const int64_t row = i / chunks_per_row, c = i % chunks_per_row;
  float v[32];
  T::dequantize_chunk(w + (row * blocks + c / kChunks) * T::kBytes, int(c % kChunks), v);
#pragma unroll
  for (int l = 0; l < 32; ++l)
    if (c * 32 + l < k) store_float(out, row * k + c * 32 + l, ot, v[l]);
}

}  // namespace

cudaError_t launch_dequantize(QType wt, const uint8_t* w, int64_t n, int64_t k, void* out, FloatType ot,
                              cudaStream_t stream) {
  const unsigned grid = grid_for(n * ((k + 31) / 32), kThreads);
  const bool known = visit_weight_format(wt, [&](auto traits) {
    dequantize_kernel<decltype(traits)><<<grid, kThreads, 0, stream>>>(w, n, k, out, ot);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace torchext
