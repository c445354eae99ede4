#pragma once

#include <cuda_runtime_api.h>

#include "kernels/float_types.h"

namespace torchext {

// Whether the GEMV can hold `rows` rows of Q8_1 activations for row length k in shared memory.
// When it cannot, the caller quantizes them into global memory first (is_q8_1 = true).
bool gemv_stages_activations(int64_t k, int64_t rows, int device);

// out[r, i] = sum_j w[i, j] * x[r, j] for i < n, r < rows, for any weight format: integer DP4A
// dot products against Q8_1 activations, fp32 accumulation, output element type `ot`.
cudaError_t launch_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, GemvActivations x, int64_t rows,
                             void* out, FloatType ot, int device, cudaStream_t stream);

}  // namespace torchext
