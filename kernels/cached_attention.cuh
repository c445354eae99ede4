#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cached_attention.h"
#include "kernels/float_types.h"

namespace torchext {

// Whether shape s with that window fits the kernels' one-dimensional grids (2^31 - 1 CTAs).
bool cached_attention_fits_grid(const AttentionShape& s, int64_t window);

// The fp32 floats launch_cached_attention needs as its workspace for shape s and that window.
int64_t cached_attention_workspace_floats(const AttentionShape& s, int64_t window);

// out [batch, heads, rows, dim] = softmax(scale * q . k_j) . v_j over the keys j visible from each row's
// position (visible_keys); q, k, v and out of type t. A position outside [0, keys) gives a NaN row.
cudaError_t launch_cached_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window,
                                    float scale, const AttentionShape& s, FloatType t, float* workspace, void* out,
                                    cudaStream_t stream);

}  // namespace torchext
