// Launch geometry and launch helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace torchext {

constexpr int kWarp = 32;
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;  // CTAs a grid's x dimension holds

inline unsigned grid_for(int64_t items, int per_cta) { return unsigned((items + per_cta - 1) / per_cta); }

// ---- programmatic dependent launch (sm_90+) -----------------------------------------------------------
// A kernel launched by launch_dependent may start while the kernel before it in the stream is still
// running, once every CTA of that one has called allow_dependent_grids(): its launch, its CTAs' start
// and whatever it reads that no kernel writes (weights) overlap the tail of the one before. Until it
// has called wait_for_prior_grids() it must not read what an earlier kernel wrote, nor write at all
// (its output may be memory an earlier kernel still reads). Before sm_90 both are no-ops and the
// launch is an ordinary one. In a CUDA graph the capture keeps the dependency as a programmatic edge.

// Lets the next kernel in the stream, if it was launched by launch_dependent, start now.
__device__ __forceinline__ void allow_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the kernels before this one in the stream have finished and their writes are visible.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asks L2 for the bytes [p, p + bytes), a 128-byte line a thread of the CTA, without waiting: for
// weights, before wait_for_prior_grids().
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(p), end = start + uintptr_t(bytes);
  for (uintptr_t line = (start & ~uintptr_t(127)) + 128 * threadIdx.x; line < end; line += 128 * blockDim.x)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
}

// The start of a kernel launched by launch_dependent whose CTA reads weight rows [first, first + rows)
// of n first: lets the next kernel start, asks L2 for those rows (they stream in while the kernel
// before, the one that made the activations, finishes), then waits for that kernel.
__device__ __forceinline__ void prefetch_rows_then_wait(const uint8_t* w, int64_t first, int64_t rows, int64_t n,
                                                        int64_t row_bytes) {
  allow_dependent_grids();
  prefetch_l2(w + first * row_bytes, (first + rows < n ? rows : n - first) * row_bytes);
  wait_for_prior_grids();
}

// Whether the current device takes programmatic dependent launches (compute capability 9.0 or later);
// the runtime answers attribute queries from its own cache (sm_count asks the same way).
inline bool current_device_launches_dependents() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch where the device
// takes one. The kernel must call wait_for_prior_grids() before it reads activations or writes.
template <class... Params, class... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = current_device_launches_dependents() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

inline int sm_count(int device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

}  // namespace torchext
