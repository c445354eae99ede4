#pragma once

#include <cuda_runtime_api.h>

#include "kernels/expert_slots.h"
#include "kernels/float_types.h"

namespace torchext {

// Whether `device` has int8 mma.sync (compute capability 8.0 or newer).
bool has_int8_mma(int device);

// launch_gemv_q8_1's result for 1 to kMaxMmaRows (batch_policy.h) activation rows, on int8 tensor
// cores; only for devices where has_int8_mma holds.
cudaError_t launch_gemv_q8_1_mma(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int rows,
                                 void* out, FloatType ot, int device, cudaStream_t stream);

// launch_gemv_q8_1_id's result on int8 tensor cores: 8 slots of an expert per MMA column group,
// 16 when slots / top_k (the tokens) is above 8; only for devices where has_int8_mma holds.
cudaError_t launch_gemv_q8_1_mma_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                                    const ExpertSlots& slots, void* out, FloatType ot, int device,
                                    cudaStream_t stream);

}  // namespace torchext
