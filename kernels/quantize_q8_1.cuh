#pragma once

#include <cuda_runtime_api.h>

#include "kernels/float_types.h"

namespace torchext {

// rows x k activations -> rows x q8_1_blocks_per_row(k) Q8_1 blocks (zero-padded), ggml's CUDA rule.
cudaError_t launch_quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out,
                                 cudaStream_t stream);

}  // namespace torchext
