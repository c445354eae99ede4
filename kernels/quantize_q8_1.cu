// Q8_1 quantization of activations: a quad of lanes per 32-value block, 8 values per lane.
#include "kernels/launch.cuh"
#include "kernels/quantize_q8_1.cuh"
#include "kernels/quantize_q8_1_warp.cuh"

namespace torchext {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    quantize_q8_1_kernel(const void* __restrict__ x, FloatType t, int64_t rows, int64_t k, bool vector_ok,
                         block_q8_1* __restrict__ out) {
  const int64_t blocks = q8_1_blocks_per_row(k);
  const int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // group of 8 values
  const int64_t i = g / 4;                                          // Q8_1 block
  const bool real = i < rows * blocks;
  float v[8] = {};
  if (real) load_group8(x, t, (i / blocks) * k, (i % blocks) * kQ8Block + 8 * (g % 4), k, vector_ok, v);
  const Q8_1Quad q = quantize_q8_1_quad(v);
  if (!real) return;
  const int j = g % 4;
  uint32_t* qs = reinterpret_cast<uint32_t*>(out[i].qs);  // qs sits at byte 4: 4-byte aligned
  qs[2 * j] = q.qs[0];
  qs[2 * j + 1] = q.qs[1];
  if (j == 0) {
    out[i].d = q.d;
    out[i].s = q.s;
  }
}

}  // namespace

bool rows_allow_vector_loads(const void* x, FloatType t, int64_t k) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && k % (t == FloatType::F32 ? 4 : 8) == 0;
}

cudaError_t launch_quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out,
                                 cudaStream_t stream) {
  const int64_t groups = rows * q8_1_blocks_per_row(k) * 4;
  quantize_q8_1_kernel<<<grid_for(groups, kThreads), kThreads, 0, stream>>>(x, xt, rows, k,
                                                                            rows_allow_vector_loads(x, xt, k), out);
  return cudaGetLastError();
}

}  // namespace torchext
