// Launch geometry and launch helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
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

// The start of a kernel launched by launch_dependent whose CTA reads weight rows [first, first + rows) of n first:
// asks L2 for those rows (they stream in while the kernel before, the one that made the activations, finishes), then
// waits for that kernel. Such a kernel (the GEMVs) lets the next one start only once its CTA is done with the
// weight, not here, where a next kernel started early would wait in the SM slots this one leaves free and the next
// call's GEMV prefetch its rows beside this one's stream (which of the two costs was not profiled). H100, L2 cold, a
// stream of qmatmul calls (bench/paths.py, 2026-12-07), µs, the next kernel allowed here -> after the rows: 640x2048
// Q4_K at 1 / 2 / 4 rows 4.4 / 5.7 / 6.0 -> 3.9 / 5.0 / 5.1, Q6_K 5.3 / 6.8 / 7.2 -> 4.2 / 5.7 / 5.8; 4096x4096 Q6_K
// 14.2 -> 11.5 at 1 row (14.0 / 14.3 -> 14.6 / 15.1 at 2 / 4, the one loss); 4096x14336 Q4_K 18.7 -> 17.9, Q6_K 42.5
// / 39.7 / 40.9 -> 39.9 / 38.3 / 39.1.
__device__ __forceinline__ void prefetch_rows_then_wait(const uint8_t* w, int64_t first, int64_t rows, int64_t n,
                                                        int64_t row_bytes) {
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

// ---- what a kernel's launches need from the runtime, asked once per device ---------------------------
// A launch needs the kernel's resident CTAs an SM (to size a grid of one wave) and, above 48 KB of
// shared memory, the kernel's opt-in to more. Both depend only on the kernel and the device, while
// asking costs microseconds of host time a launch (cudaFuncGetAttributes is a driver call for each of
// its fields), and an eager decode step launches hundreds of kernels: so the answers are kept for the
// process, one per device (devices past kCachedDevices are asked each time).
constexpr int kCachedDevices = 64;

struct KernelFacts {
  cudaError_t err = cudaSuccess;  // the runtime's refusal, if any; the fields below hold only on success
  size_t max_dynamic_smem = 0;    // what a launch may ask for: all the device allows beside the static arrays
  int ctas_per_sm = 0;            // resident CTAs an SM at kSmem bytes of dynamic shared memory (0: none fit)
};

template <auto F, int kThreads, size_t kSmem>
KernelFacts ask_kernel_facts(int device) {
  KernelFacts f;
  cudaFuncAttributes attr;
  int optin = 0;
  if ((f.err = cudaFuncGetAttributes(&attr, F)) != cudaSuccess ||
      (f.err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
    return f;
  f.max_dynamic_smem = size_t(optin) > attr.sharedSizeBytes ? size_t(optin) - attr.sharedSizeBytes : 0;
  // opted in once to the most it may take: a launch asking for less needs nothing more
  f.err = cudaFuncSetAttribute(F, cudaFuncAttributeMaxDynamicSharedMemorySize, int(f.max_dynamic_smem));
  if (f.err != cudaSuccess) return f;
  if constexpr (kSmem > 0) {
    if (f.max_dynamic_smem < kSmem) return f;  // ctas_per_sm 0: it cannot run with kSmem bytes
  }
  f.err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&f.ctas_per_sm, F, kThreads, kSmem);
  return f;
}

// Kernel F's facts on `device`, the current device, for CTAs of kThreads threads (and kSmem bytes of
// dynamic shared memory for ctas_per_sm). The first call for a device asks the runtime and opts F in;
// later calls read the answer (a refusal is kept too: it does not change while the process runs).
template <auto F, int kThreads, size_t kSmem = 0>
KernelFacts kernel_facts(int device) {
  if (device < 0 || device >= kCachedDevices) return ask_kernel_facts<F, kThreads, kSmem>(device);
  static KernelFacts known[kCachedDevices];
  static std::once_flag asked[kCachedDevices];
  std::call_once(asked[device], [device] { known[device] = ask_kernel_facts<F, kThreads, kSmem>(device); });
  return known[device];
}

inline int sm_count(int device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

}  // namespace torchext
