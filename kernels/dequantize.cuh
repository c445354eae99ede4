#pragma once

#include <cuda_runtime_api.h>

#include "kernels/float_types.h"
#include "kernels/row_index.h"

namespace torchext {

// rows_out x k dense values (element type `ot`): output row i is weight row rows.source(i, n) of
// the n x k quantized weight, NaN for an id out of range; padding past k is dropped.
cudaError_t launch_dequantize(QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out,
                              void* out, FloatType ot, cudaStream_t stream);

}  // namespace torchext
