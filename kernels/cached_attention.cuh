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

// The same attention, written as quantize_q8_1 writes out.transpose(1, 2).reshape(batch, rows, heads * dim):
// out [batch, rows, q8_1_blocks_per_row(heads * dim)] Q8_1 blocks of the values rounded to t, the same bytes.
// dim % 32 == 0 (a block inside one head); the blocks past heads * dim (padding) are not written, the caller
// zeroes them. A NaN row (a position outside [0, keys)) gives the blocks quantize_q8_1 makes of NaNs.
cudaError_t launch_cached_attention_quantize_q8_1(const void* q, const void* k, const void* v, const int64_t* pos,
                                                  int64_t window, float scale, const AttentionShape& s, FloatType t,
                                                  float* workspace, block_q8_1* out, cudaStream_t stream);

}  // namespace torchext
