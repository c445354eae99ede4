#pragma once

#include <cuda_runtime_api.h>

#include "kernels/float_types.h"

namespace torchext {

// n x k dense values (element type `ot`) of a quantized weight; padding past k is dropped.
cudaError_t launch_dequantize(QType wt, const uint8_t* w, int64_t n, int64_t k, void* out, FloatType ot,
                              cudaStream_t stream);

}  // namespace torchext
