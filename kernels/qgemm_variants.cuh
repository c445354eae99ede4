// The tiled GEMM's three sets of kernels (qgemm.cu says how the kernel works): bf16 activations with
// the weights computed in bf16 (qgemm_bf16.cu), bf16 with exact weights (qgemm_bf16_exact.cu) and
// fp16 (qgemm_f16.cu, exact weights). Each file compiles one set, so a build compiles the three in
// parallel: as one file they were the build's longest step by minutes (qgemm.cu alone took ~10 min
// for sm_90 on a 2-core machine, and CMake's build of the CUDA sources did not finish in 7 minutes on
// the 16-core GPU machine, 2026-12-03). qgemm.cu picks the set and adds K splits up.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/expert_slots.h"
#include "kernels/float_types.h"
#include "kernels/quant_traits.h"

namespace torchext::qgemm {

constexpr int kChunk = 256;  // values of K per pipeline stage

// A product's operands and how K is split, as the kernel reads them.
struct GemmArgs {
  const uint8_t* w;
  int64_t n, k, row_bytes, w_bytes;
  const void* x;
  int64_t rows;
  int64_t chunks_per_split;
  float* partial;  // [splits][rows][n] when grid.z > 1
  void* out;
};

// How a product is cut: K in `splits` parts of chunks_per_split chunks each.
struct Plan {
  int splits;
  int64_t chunks_per_split;
};

// The plan for an n x k weight and `rows` activation rows in tiles of tile_n x bm, ctas_per_sm of
// them resident per SM (qgemm.cu).
Plan make_plan(int64_t n, int64_t k, int64_t rows, int bm, int tile_n, int ctas_per_sm, int device);

// Whether bf16 weight values of format T are computed in bf16 (packed_pair): where its quants fit in
// 7 bits (Q8_0, IQ4_NL and IQ4_XS bytes reach +-127). Never in fp16: a slice's d is often below
// fp16's normal range (2^-14) where the weights themselves are not (IQ2_XS's d is the fp16 d times
// (0.5 + ls) / 4), and rounded there it lost up to 7% of an output (H200, tests/test_cuda.py,
// 2026-12-03); bf16 has fp32's exponent range.
template <class T>
constexpr bool kComputesInBf16 = T::kMmaQuantMax <= 63;

// The kernels of activation type H (__nv_bfloat16 or __half), weights exact or computed in H, for
// every weight format; with kExact false a format that cannot compute its weights in H takes the exact
// set's kernel. plan: how launch will cut these rows of format wt ({1, 0}: not a weight format).
// launch: x [rows, k] against the n x k weight w, out [rows, n] in H, or with p.splits > 1 fp32
// partial sums in workspace [splits][rows][n]. launch_id: qmatmul_id's grouped GEMM over the tiles
// of sorted_slots (route_slots).
template <class H, bool kExact>
struct TiledGemm {
  static Plan plan(QType wt, int64_t n, int64_t k, int64_t rows, int device);
  static cudaError_t launch(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, int64_t rows,
                            const Plan& p, float* workspace, void* out, int device, cudaStream_t stream);
  static cudaError_t launch_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x,
                               const ExpertSlots& slots, int tile_rows, int64_t max_tiles, const int32_t* sorted_slots,
                               const int32_t* tile_experts, void* out, int device, cudaStream_t stream);
};

// The wgmma GEMM (qgemm_wgmma.cu; built only where the build targets compute capability 9.0, which
// defines TORCHEXT_WGMMA): operands as launch_qgemm's, on a 9.0 device (its code is sm_90a), copied
// by the tensor memory accelerator, so both operands' rows a multiple of 16 bytes (k a multiple of 8)
// and a weight chunk (256 values) at most 256 bytes (not Q8_0).
bool qgemm_wgmma_supports(QType wt, FloatType xt, const void* w, const void* x, int64_t k, int device);
// Whether the wgmma GEMM's register-fragment kernel takes format wt's rows of k values on the device,
// for operands that qgemm_supports (which checks the rest): it serves those from kMinWgmmaRegsRows rows.
bool qgemm_wgmma_regs_supports(QType wt, int64_t k, int device);
Plan qgemm_wgmma_plan(QType wt, int64_t n, int64_t k, int64_t rows, int device);
cudaError_t launch_qgemm_wgmma(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt,
                               bool exact, int64_t rows, const Plan& p, float* workspace, void* out, int device,
                               cudaStream_t stream);

// Each set is compiled in its own file only.
extern template struct TiledGemm<__nv_bfloat16, false>;
extern template struct TiledGemm<__nv_bfloat16, true>;
extern template struct TiledGemm<__half, true>;

}  // namespace torchext::qgemm
