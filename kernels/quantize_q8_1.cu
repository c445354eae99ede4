// Q8_1 quantization of stored activations (the kernel: quantize_q8_1_rows.cuh).
#include "kernels/quantize_q8_1.cuh"
#include "kernels/quantize_q8_1_rows.cuh"

namespace torchext {
namespace {

// The activations as they are stored.
struct StoredValues {
  const void* x;
  FloatType t;
  bool vector_ok;
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    load_group8(x, t, row * k, col, k, vector_ok, v);
  }
};

}  // namespace

cudaError_t launch_quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out,
                                 cudaStream_t stream) {
  return launch_quantize_q8_1_rows(StoredValues{x, xt, rows_allow_vector_loads(x, xt, k)}, rows, k, out, stream);
}

}  // namespace torchext
