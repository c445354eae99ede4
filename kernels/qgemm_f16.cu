// The tiled GEMM's kernels for fp16 activations (exact weights) (qgemm_variants.cuh).
#include "kernels/qgemm_kernel.cuh"

template struct torchext::qgemm::TiledGemm<__half, true>;
