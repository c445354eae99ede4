// Dequantization: one thread per 32-value chunk, through the format's dequantize_chunk; the 32
// contiguous outputs leave as 16-byte stores (one 2-byte store per value would write a sector
// per element and run at a few percent of bandwidth).
#include "kernels/dequantize.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kThreads = 256;

template <FloatType OT>
__device__ __forceinline__ void store_chunk(void* out, int64_t offset, const float (&v)[32]) {
  if constexpr (OT == FloatType::F32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(out) + offset);
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  } else {
    union {
      uint4 raw[4];
      uint16_t h[32];
    } u;
#pragma unroll
    for (int i = 0; i < 32; ++i) u.h[i] = OT == FloatType::F16 ? float_to_fp16(v[i]) : float_to_bf16(v[i]);
    uint4* p = reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + offset);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = u.raw[i];
  }
}

template <class T, FloatType OT>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out,
                      bool vector_ok, void* __restrict__ out) {
  constexpr int kChunks = T::kValues / 32;
  const int64_t blocks = (k + T::kValues - 1) / T::kValues;
  const int64_t chunks_per_row = (k + 31) / 32;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= rows_out * chunks_per_row) return;
  const int64_t row = i / chunks_per_row, c = i % chunks_per_row, src = rows.source(row, n);
  float v[32];
  if (src >= 0) {
    T::dequantize_chunk(w + (src * blocks + c / kChunks) * T::kBytes, int(c % kChunks), v);
  } else {  // an id out of range: checking it on the host would need a sync
#pragma unroll
    for (int l = 0; l < 32; ++l) v[l] = __int_as_float(0x7fc00000);
  }
  const int64_t offset = row * k + c * 32;
  if (vector_ok && c * 32 + 32 <= k) {
    store_chunk<OT>(out, offset, v);
  } else {  // rows not 16-byte aligned, or the chunk that ends at k
#pragma unroll
    for (int l = 0; l < 32; ++l)
      if (c * 32 + l < k) store_float(out, offset + l, OT, v[l]);
  }
}

template <class T>
void launch_typed(const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out, void* out, FloatType ot,
                  cudaStream_t stream) {
  const unsigned grid = grid_for(rows_out * ((k + 31) / 32), kThreads);
  const int elem = ot == FloatType::F32 ? 4 : 2;
  const bool vector_ok = reinterpret_cast<uintptr_t>(out) % 16 == 0 && (k * elem) % 16 == 0;
  auto kernel = ot == FloatType::F32   ? dequantize_kernel<T, FloatType::F32>
                : ot == FloatType::F16 ? dequantize_kernel<T, FloatType::F16>
                                       : dequantize_kernel<T, FloatType::BF16>;
  kernel<<<grid, kThreads, 0, stream>>>(w, n, k, rows, rows_out, vector_ok, out);
}

}  // namespace

cudaError_t launch_dequantize(QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out,
                              void* out, FloatType ot, cudaStream_t stream) {
  const bool known = visit_weight_format(
      wt, [&](auto traits) { launch_typed<decltype(traits)>(w, n, k, rows, rows_out, out, ot, stream); });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace torchext
