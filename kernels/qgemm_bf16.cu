// The tiled GEMM's kernels for bf16 activations, weights computed in bf16 (qgemm_variants.cuh).
#include "kernels/qgemm_kernel.cuh"

template struct torchext::qgemm::TiledGemm<__nv_bfloat16, false>;
