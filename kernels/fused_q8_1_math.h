// The arithmetic of rms_norm_quantize_q8_1, add_rms_norm_quantize_q8_1 and gated_gelu_quantize_q8_1,
// shared by the CPU and the CUDA kernels so that both give the same bits. Every product and sum is
// rounded to fp32 on its own: the device code names the rounding (nvcc would otherwise contract
// a*b + c into one fma), the host code is built with -ffp-contract=off.
#pragma once

#include <cmath>

#include "float_types.h"

namespace torchext {

TORCHEXT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

TORCHEXT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// v rounded to the element type t, as storing it in t and reading it back gives it.
TORCHEXT_HD float round_to(float v, FloatType t) {
  switch (t) {
    case FloatType::F16: return fp16_to_float(float_to_fp16(v));
    case FloatType::BF16: return bf16_to_float(float_to_bf16(v));
    default: return v;
  }
}

// A row's sum of squares is accumulated in a fixed order, the same on every backend: kRmsLanes
// partial sums, partial l adding x[j]^2 for j = l, l + 32, l + 64, ... in turn, then folded in
// halves (partial l += partial l + h for h = 16, 8, 4, 2, 1), the order of a warp's xor shuffles.
constexpr int kRmsLanes = 32;

// The sum of squares of x[base .. base+k) in that order, one thread doing the lanes' work in turn
// (the CPU kernels), from the partial sums of its first `done` values (a multiple of kRmsLanes: the
// AVX2 kernel's vectors).
inline float finish_row_sum_squares(float (&partial)[kRmsLanes], const void* x, FloatType t, int64_t base,
                                    int64_t done, int64_t k) {
  for (int64_t j = done; j < k; ++j) {
    const float v = load_float(x, base + j, t);
    partial[j % kRmsLanes] = add_rn(partial[j % kRmsLanes], mul_rn(v, v));
  }
  for (int h = kRmsLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) partial[l] = add_rn(partial[l], partial[l + h]);
  return partial[0];
}

// 1 / sqrt(sum_squares / k + eps), each step rounded to fp32 (IEEE division and square root).
TORCHEXT_HD float rms_inverse(float sum_squares, int64_t k, float eps) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum_squares, float(k)), eps)));
#else
  return 1.0f / std::sqrt(sum_squares / float(k) + eps);
#endif
}

// One normalised value, (x * inverse) * w, rounded to the activations' type t.
TORCHEXT_HD float rms_norm_value(float x, float inverse, float w, FloatType t) {
  return round_to(mul_rn(mul_rn(x, inverse), w), t);
}

// residual + value rounded to t, as torch's addition of two tensors of type t gives it.
TORCHEXT_HD float residual_sum_value(float residual, float value, FloatType t) {
  return round_to(add_rn(residual, value), t);
}

// act(gate) * up as the unfused ops give it: the activation rounded to t (torchext.gelu's output),
// then the product rounded to t (torch's multiplication, which computes in fp32).
TORCHEXT_HD float gated_value(float activation, float up, FloatType t) {
  return round_to(mul_rn(round_to(activation, t), up), t);
}

}  // namespace torchext
