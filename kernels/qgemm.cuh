#pragma once

#include <cuda_runtime_api.h>

#include "kernels/expert_slots.h"
#include "kernels/float_types.h"

namespace torchext {

// The tiled GEMM for many activation rows (qgemm.cu): out[rows, n] = x[rows, k] @ W^T with W the
// n x k quantized weight dequantized into x's type (fp16 or bf16), products and sums in fp32, out in
// x's type. No dense copy of W is made. exact (and fp16 x): every weight value as launch_dequantize
// gives it; otherwise bf16 values d * q + m are computed in bf16 from d and m rounded to it (within two
// bf16 roundings of |d * q| + |m|; formats whose quants need 8 bits stay exact).
//
// qgemm_supports: whether it runs these operands: fp16/bf16 activations on a device with
// mma.sync (compute capability 8.0 or newer), weight and activations 16-byte aligned, k a multiple
// of 8 (activation rows are copied in 16-byte pieces).
bool qgemm_supports(FloatType xt, const void* w, const void* x, int64_t k, int device);

// The most activation rows launch_qgemm takes for these operands: 0 where qgemm_supports says no,
// wgmma_max_rows(wt) where the build has the wgmma GEMM (TORCHEXT_WGMMA) and qgemm_wgmma_supports
// says yes (past kMaxWgmmaRows in chunks of that many rows), else kMaxTiledGemmRows (batch_policy.h).
int64_t qgemm_max_rows(QType wt, FloatType xt, const void* w, const void* x, int64_t k, int device);

// The first activation row launch_qgemm takes from the GEMVs for these operands of an n x k weight: 0 where
// qgemm_supports says no, else batch_policy.h's tiled_gemm_first_row (earlier where the register-fragment
// wgmma kernel takes the weight).
int64_t qgemm_first_row(QType wt, FloatType xt, const void* w, const void* x, int64_t n, int64_t k, int device);

// fp32 values of scratch memory launch_qgemm needs for these sizes (0: none).
int64_t qgemm_workspace_floats(QType wt, FloatType xt, bool exact, int64_t n, int64_t k, int64_t rows, int device);

cudaError_t launch_qgemm(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt, bool exact,
                         int64_t rows, float* workspace, void* out, int device, cudaStream_t stream);

// qmatmul_id's grouped GEMM, for the operands qgemm_supports: out[s] = x[x_row(s)] @ W_e^T for every
// slot s that route_slots (route_slots.cuh) placed in a tile of expert e, W_e the e-th [n, k] weight of
// w (the experts back to back). Tiles hold qgemm_id_tile_rows(slots, experts) slots each; the grid is
// sized for max_tiles of them, and CTAs of tiles past the ids' real count (tile_experts < 0) exit.
int qgemm_id_tile_rows(int64_t slots, int64_t experts);
cudaError_t launch_qgemm_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt, bool exact,
                            const ExpertSlots& slots, int tile_rows, int64_t max_tiles, const int32_t* sorted_slots,
                            const int32_t* tile_experts, void* out, int device, cudaStream_t stream);

}  // namespace torchext
