// GELU and bias + GELU: 16-byte loads and stores, math in fp32.
#include "kernels/gelu.cuh"
#include "kernels/activation_math.h"
#include "kernels/launch.cuh"

namespace torchext {
namespace {

constexpr int kThreads = 256;

template <FloatType T>
struct Storage {
  using type = uint16_t;
};
template <>
struct Storage<FloatType::F32> {
  using type = float;
};

template <FloatType T, bool kTanh>
__device__ __forceinline__ float gelu_at(const void* x, const void* bias, int64_t i, int64_t c) {
  float v = load_float(x, i, T);
  if (bias != nullptr) v += load_float(bias, c, T);
  return kTanh ? gelu_tanh(v) : gelu_erf(v);
}

// Each thread takes kVec consecutive elements (16 bytes) when x and out are 16-byte aligned,
// one element otherwise.
template <FloatType T, bool kTanh, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    gelu_kernel(const void* x, const void* __restrict__ bias, void* out, int64_t numel, int64_t channels) {
  using S = typename Storage<T>::type;
  constexpr int kVec = kVectorized ? 16 / sizeof(S) : 1;
  const int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (i0 >= numel) return;
  if (kVectorized && i0 + kVec <= numel) {
    union {
      uint4 raw;
      S s[kVec];
    } in, res;
    in.raw = *reinterpret_cast<const uint4*>(static_cast<const S*>(x) + i0);
    int64_t c = bias != nullptr ? i0 % channels : 0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float v = load_float(in.s, j, T);
      if (bias != nullptr) {
        v += load_float(bias, c, T);
        c = c + 1 == channels ? 0 : c + 1;
      }
      store_float(res.s, j, T, kTanh ? gelu_tanh(v) : gelu_erf(v));
    }
    *reinterpret_cast<uint4*>(static_cast<S*>(out) + i0) = res.raw;
  } else {
    for (int64_t i = i0; i < numel && i < i0 + kVec; ++i)
      store_float(out, i, T, gelu_at<T, kTanh>(x, bias, i, bias != nullptr ? i % channels : 0));
  }
}

template <FloatType T, bool kTanh>
cudaError_t launch_typed(const void* x, const void* bias, void* out, int64_t numel, int64_t channels,
                         cudaStream_t stream) {
  using S = typename Storage<T>::type;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned) {
    constexpr int kVec = 16 / sizeof(S);
    gelu_kernel<T, kTanh, true><<<grid_for((numel + kVec - 1) / kVec, kThreads), kThreads, 0, stream>>>(
        x, bias, out, numel, channels);
  } else {
    gelu_kernel<T, kTanh, false><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(x, bias, out, numel, channels);
  }
  return cudaGetLastError();
}

template <FloatType T>
cudaError_t launch_form(const void* x, const void* bias, void* out, int64_t numel, int64_t channels, bool tanh_form,
                        cudaStream_t stream) {
  return tanh_form ? launch_typed<T, true>(x, bias, out, numel, channels, stream)
                   : launch_typed<T, false>(x, bias, out, numel, channels, stream);
}

}  // namespace

cudaError_t launch_gelu(const void* x, const void* bias, void* out, int64_t numel, int64_t channels, FloatType t,
                        bool tanh_form, cudaStream_t stream) {
  switch (t) {
    case FloatType::F32: return launch_form<FloatType::F32>(x, bias, out, numel, channels, tanh_form, stream);
    case FloatType::F16: return launch_form<FloatType::F16>(x, bias, out, numel, channels, tanh_form, stream);
    case FloatType::BF16: return launch_form<FloatType::BF16>(x, bias, out, numel, channels, tanh_form, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace torchext
