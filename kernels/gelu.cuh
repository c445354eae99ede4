#pragma once

#include <cuda_runtime_api.h>

#include "kernels/float_types.h"

namespace torchext {

// out = gelu(x + bias[i % channels]) elementwise (bias may be null; out may alias x), in fp32.
cudaError_t launch_gelu(const void* x, const void* bias, void* out, int64_t numel, int64_t channels, FloatType t,
                        bool tanh_form, cudaStream_t stream);

}  // namespace torchext
