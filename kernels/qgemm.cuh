#pragma once

#include <cuda_runtime_api.h>

#include "kernels/float_types.h"

namespace torchext {

// The tiled GEMM for many activation rows (qgemm.cu): out[rows, n] = x[rows, k] @ W^T with W the
// n x k quantized weight dequantized exactly as launch_dequantize dequantizes it into x's type
// (fp16 or bf16), products and sums in fp32, out in x's type. No dense copy of W is made.
//
// qgemm_supports: whether it runs these operands: fp16/bf16 activations on a device with
// mma.sync (compute capability 8.0 or newer), weight and activations 16-byte aligned, k a multiple
// of 8 (activation rows are copied in 16-byte pieces).
bool qgemm_supports(FloatType xt, const void* w, const void* x, int64_t k, int device);

// fp32 values of scratch memory launch_qgemm needs for these sizes (0: none).
int64_t qgemm_workspace_floats(QType wt, FloatType xt, int64_t n, int64_t k, int64_t rows, int device);

cudaError_t launch_qgemm(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt, int64_t rows,
                         float* workspace, void* out, int device, cudaStream_t stream);

}  // namespace torchext
