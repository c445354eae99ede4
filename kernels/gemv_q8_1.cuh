#pragma once

#include <cuda_runtime_api.h>

#include "kernels/activation_math.h"
#include "kernels/expert_slots.h"
#include "kernels/float_types.h"

namespace torchext {

// out[r, i] = sum_j w[i, j] * xq[r, j] for i < n, r < rows, for any weight format: integer DP4A or
// int8 tensor-core dot products against Q8_1 activations (quantize_q8_1's rows), fp32 accumulation, output
// element type `ot`.
cudaError_t launch_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int64_t rows,
                             void* out, FloatType ot, int device, cudaStream_t stream);

// Whether launch_gated_gemv_q8_1 takes `rows` activation rows of k values for a weight of format wt:
// the rows the DP4A kernel takes (batch_policy.h), few enough to quantize into a CTA's shared memory.
bool gemv_q8_1_computes_rows(QType wt, int64_t rows, int64_t k, int device);

// launch_gemv_q8_1 of launch_gated_quantize_q8_1's rows (act(gate) * up, gate and up [rows, k] of type t),
// which each CTA computes and quantizes itself: the same bytes, one launch; output of type t. For the
// rows gemv_q8_1_computes_rows accepts.
cudaError_t launch_gated_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* gate, const void* up,
                                   FloatType t, GateActivation act, int64_t rows, void* out, int device,
                                   cudaStream_t stream);

// qmatmul_id's GEMV: out[s, i] = sum_j w[e, i, j] * xq[x_row(s), j] for every slot s routed to expert e
// (ExpertSlots), w holding the experts' [n, k] weights back to back; a NaN row for a slot whose id is
// out of range. Each routed expert's weight is read once for all of its slots; the kernel (DP4A or
// tensor cores) follows choose_gemv_kernel for T = slots / top_k rows, the most one expert receives.
cudaError_t launch_gemv_q8_1_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                                const ExpertSlots& slots, void* out, FloatType ot, int device, cudaStream_t stream);

}  // namespace torchext
