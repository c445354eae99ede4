// Dequantization: one thread per 32-value chunk, through the format's dequantize_chunk. Where the
// output is one contiguous span (k a multiple of 32, 16-byte aligned), a warp's 32 chunks are
// staged in shared memory and leave as 16-byte stores of consecutive lanes to consecutive
// addresses: a lane storing its own 64-128 contiguous bytes would make each store instruction
// touch 32 sectors half or a quarter at a time. Elsewhere each lane stores its chunk itself.
#include "kernels/dequantize.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

// One chunk's 32 values as 16-byte pieces of the output type: 8 for fp32, 4 for fp16/bf16.
template <FloatType OT>
struct ChunkPieces {
  static constexpr int kCount = OT == FloatType::F32 ? 8 : 4;
  uint4 piece[kCount];

  __device__ __forceinline__ explicit ChunkPieces(const float (&v)[32]) {
    if constexpr (OT == FloatType::F32) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        piece[i] = make_uint4(__float_as_uint(v[4 * i]), __float_as_uint(v[4 * i + 1]), __float_as_uint(v[4 * i + 2]),
                              __float_as_uint(v[4 * i + 3]));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float a = v[8 * i + 2 * j], b = v[8 * i + 2 * j + 1];
          w[j] = OT == FloatType::F16 ? uint32_t(float_to_fp16(a)) | uint32_t(float_to_fp16(b)) << 16
                                      : uint32_t(float_to_bf16(a)) | uint32_t(float_to_bf16(b)) << 16;
        }
        piece[i] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
};

template <class T, FloatType OT>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out,
                      bool vector_ok, void* __restrict__ out) {
  using Pieces = ChunkPieces<OT>;
  constexpr int kChunks = T::kValues / 32, kPieces = Pieces::kCount;
  // [warp][32 chunks x kPieces], piece p of chunk c at c * kPieces + (p ^ swizzle(c)): the 8 lanes
  // of a shared-memory phase (one chunk each, 16 bytes) land in 8 different 16-byte bank groups
  __shared__ uint4 staged[kWarps][32 * kPieces];
  const auto swizzle = [](int chunk) { return (chunk * kPieces / 8) % kPieces; };
  const int64_t blocks = weight_row_blocks<T>(k);
  const int64_t chunks_per_row = (k + 31) / 32, total = rows_out * chunks_per_row;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  // k a multiple of 32: chunk i's outputs start at 32 i, so a warp's chunks are one contiguous span.
  // Uniform over the grid, so every lane of a warp takes the same branch (and reaches __syncwarp).
  const bool span = vector_ok && k % 32 == 0;
  if (!span && i >= total) return;
  const int64_t row = i / chunks_per_row, c = i % chunks_per_row;
  float v[32];
  if (i < total) {
    const int64_t src = rows.source(row, n);
    if (src >= 0) {
      T::dequantize_chunk(w + (src * blocks + c / kChunks) * T::kBytes, int(c % kChunks), v);
    } else {  // an id out of range: checking it on the host would need a sync
#pragma unroll
      for (int l = 0; l < 32; ++l) v[l] = __int_as_float(0x7fc00000);
    }
  }
  if (span) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (i < total) {
      const Pieces pieces(v);
#pragma unroll
      for (int p = 0; p < kPieces; ++p) staged[warp][lane * kPieces + (p ^ swizzle(lane))] = pieces.piece[p];
    }
    __syncwarp();
    const int64_t first = i - lane;  // the warp's first chunk
    uint4* dst = reinterpret_cast<uint4*>(static_cast<char*>(out) + first * 32 * (OT == FloatType::F32 ? 4 : 2));
#pragma unroll
    for (int r = 0; r < kPieces; ++r) {
      const int j = 32 * r + lane, chunk = j / kPieces, p = j % kPieces;
      if (first + chunk < total) dst[j] = staged[warp][chunk * kPieces + (p ^ swizzle(chunk))];
    }
    return;
  }
  const int64_t offset = row * k + c * 32;
  if (vector_ok && c * 32 + 32 <= k) {
    const Pieces pieces(v);
    uint4* dst = reinterpret_cast<uint4*>(static_cast<char*>(out) + offset * (OT == FloatType::F32 ? 4 : 2));
#pragma unroll
    for (int p = 0; p < kPieces; ++p) dst[p] = pieces.piece[p];
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
