// qmatmul_id's routing on the device: the slots sorted by expert into whole tiles for the grouped
// GEMM (qgemm.cu), and the row copy of the dense fallback (csrc/ops.h, matmul_id_masked).
#include <algorithm>

#include "kernels/launch.cuh"
#include "kernels/route_slots.cuh"

namespace torchext {
namespace {

constexpr int kRouteThreads = 1024;  // 32 warps: one warp scans the warps' sums

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

__global__ void __launch_bounds__(kRouteThreads)
    route_slots_kernel(ExpertSlots s, int tile_rows, int64_t max_tiles, int32_t* __restrict__ sorted,
                       int32_t* __restrict__ tile_experts, int64_t n, void* __restrict__ out, FloatType ot) {
  // per expert: its slots, then the next free row of its tiles (rows < slots + experts * 63 < 2^32)
  extern __shared__ uint32_t count[];
  uint32_t* next = count + s.experts;
  __shared__ uint32_t warp_sums[kRouteThreads / kWarp];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  for (int64_t e = tid; e < s.experts; e += kRouteThreads) count[e] = 0;
  for (int64_t i = tid; i < max_tiles * tile_rows; i += kRouteThreads) sorted[i] = -1;
  __syncthreads();
  for (int64_t i = tid; i < s.count; i += kRouteThreads) {
    const int64_t e = s.expert(i);
    if (e >= 0) {
      atomicAdd(&count[e], 1u);
    } else {  // rare (a bad id): one thread writes the row
      for (int64_t c = 0; c < n; ++c) store_float(out, i * n + c, ot, nan_value());
    }
  }
  __syncthreads();

  // Thread tid lays out experts [e0, e1): their tiles start after those of the threads before it.
  const int64_t per = (s.experts + kRouteThreads - 1) / kRouteThreads;
  const int64_t e0 = min(s.experts, tid * per), e1 = min(s.experts, e0 + per);
  const auto tiles_of = [&](int64_t e) { return (count[e] + tile_rows - 1) / tile_rows; };
  uint32_t mine = 0;
  for (int64_t e = e0; e < e1; ++e) mine += tiles_of(e);
  uint32_t upto = mine;  // inclusive scan over the warp, then over the warps
  for (int o = 1; o < kWarp; o *= 2) {
    const uint32_t v = __shfl_up_sync(0xffffffffu, upto, o);
    if (lane >= o) upto += v;
  }
  if (lane == kWarp - 1) warp_sums[warp] = upto;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = warp_sums[lane];
    for (int o = 1; o < kWarp; o *= 2) {
      const uint32_t v = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += v;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  uint32_t tile = upto - mine + (warp > 0 ? warp_sums[warp - 1] : 0u);
  for (int64_t e = e0; e < e1; ++e) {
    next[e] = tile * uint32_t(tile_rows);
    for (const uint32_t end = tile + tiles_of(e); tile < end; ++tile) tile_experts[tile] = int32_t(e);
  }
  for (int64_t j = warp_sums[kWarp - 1] + tid; j < max_tiles; j += kRouteThreads) tile_experts[j] = -1;
  __syncthreads();
  for (int64_t i = tid; i < s.count; i += kRouteThreads) {
    const int64_t e = s.expert(i);
    if (e >= 0) sorted[atomicAdd(&next[e], 1u)] = int32_t(i);
  }
}

__global__ void copy_expert_rows_kernel(ExpertSlots s, int64_t expert, const void* __restrict__ src, int64_t n,
                                        void* __restrict__ out, FloatType ot, bool mark_invalid) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < s.count * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t slot = i / n, e = s.expert(slot);
    if (e == expert) store_float(out, i, ot, load_float(src, s.x_row(slot) * n + i % n, ot));
    else if (mark_invalid && e < 0) store_float(out, i, ot, nan_value());
  }
}

}  // namespace

cudaError_t launch_route_slots(const ExpertSlots& slots, int tile_rows, int64_t max_tiles, int32_t* sorted_slots,
                               int32_t* tile_experts, int64_t n, void* out, FloatType ot, cudaStream_t stream) {
  const size_t smem = 2 * sizeof(uint32_t) * size_t(slots.experts);  // <= 32 KB: kMaxExperts
  route_slots_kernel<<<1, kRouteThreads, smem, stream>>>(slots, tile_rows, max_tiles, sorted_slots, tile_experts, n,
                                                          out, ot);
  return cudaGetLastError();
}

cudaError_t launch_copy_expert_rows(const ExpertSlots& slots, int64_t expert, const void* src, int64_t n, void* out,
                                    FloatType ot, bool mark_invalid, cudaStream_t stream) {
  const unsigned grid = unsigned(std::min<int64_t>((slots.count * n + 255) / 256, 4096));
  copy_expert_rows_kernel<<<grid, 256, 0, stream>>>(slots, expert, src, n, out, ot, mark_invalid);
  return cudaGetLastError();
}

}  // namespace torchext
