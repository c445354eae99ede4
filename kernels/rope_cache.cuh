#pragma once

#include <cuda_runtime_api.h>

#include "kernels/rope_cache.h"

namespace torchext {

// Whether shape s fits the kernel's one-dimensional grid (2^31 - 1 CTAs).
bool rope_cache_write_fits_grid(const RopeShape& s);

// q_out [batch, heads, rows, dim] = rope(norm(q)); rope(norm(k)) and v into the caches at pos[r]
// (kernels/rope_cache.h). A position outside [0, keys) leaves the caches alone and q's row NaN.
cudaError_t launch_rope_cache_write(const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos,
                                    const float* sin, const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps,
                                    const RopeShape& s, FloatType t, void* q_out, void* k_cache, void* v_cache,
                                    cudaStream_t stream);

}  // namespace torchext
