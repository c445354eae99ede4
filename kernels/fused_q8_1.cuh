#pragma once

#include <cuda_runtime_api.h>

#include "kernels/activation_math.h"
#include "kernels/float_types.h"

namespace torchext {

// rows x k activations x (type xt), normalised per row (x / rms(x) * w, w [k] of type wt; the
// arithmetic of fused_q8_1_math.h) and rounded to xt -> rows x q8_1_blocks_per_row(k) Q8_1 blocks.
cudaError_t launch_rms_norm_quantize_q8_1(const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows,
                                          int64_t k, float eps, block_q8_1* out, cudaStream_t stream);

// sum = residual + t rounded to xt (rows x k, t = x, or x normalised by x_weight [k] of type xwt where
// x_weight is not null), written to `sum`, then launch_rms_norm_quantize_q8_1's output for sum.
cudaError_t launch_add_rms_norm_quantize_q8_1(const void* x, const void* residual, FloatType xt, const void* x_weight,
                                              FloatType xwt, const void* w, FloatType wt, int64_t rows, int64_t k,
                                              float eps, void* sum, block_q8_1* out, cudaStream_t stream);

// act(gate) * up (rows x k, both of type t), rounded as the unfused ops round it -> rows x
// q8_1_blocks_per_row(k) Q8_1 blocks.
cudaError_t launch_gated_quantize_q8_1(const void* gate, const void* up, FloatType t, GateActivation act, int64_t rows,
                                       int64_t k, block_q8_1* out, cudaStream_t stream);

}  // namespace torchext
