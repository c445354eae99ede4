// Launch geometry helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchext {

constexpr int kWarp = 32;

inline unsigned grid_for(int64_t items, int per_cta) { return unsigned((items + per_cta - 1) / per_cta); }

inline int sm_count(int device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 1;
}

}  // namespace torchext
