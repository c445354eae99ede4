// act(gate) * up as a source of rows for a Q8_1 quantization (quantize_q8_1_rows.cuh's Source):
// gated_quantize_q8_1 quantizes it into memory, the gated GEMV into each CTA's shared memory.
#pragma once

#include "kernels/activation_math.h"
#include "kernels/fused_q8_1_math.h"
#include "kernels/quantize_q8_1_rows.cuh"

namespace torchext {

// Rows of act(gate) * up, gate and up [rows, k] of type t, rounded as the unfused ops round them. SiLU
// is a kernel of its own (kSilu), GELU's two forms one kernel: a kernel that holds every activation's
// code keeps more registers live (the gated GEMV's 2-8 row tiles took up to 82 against 64).
template <bool kSilu>
struct GatedValues {
  const void* gate;
  const void* up;
  FloatType t;
  bool tanh_form;  // GELU's form (kSilu false)
  bool vector_ok;  // rows_allow_vector_loads for gate and up
  __device__ void load(int64_t row, int64_t col, int64_t k, float (&v)[8]) const {
    float u[8];
    load_group8(gate, t, row * k, col, k, vector_ok, v);
    load_group8(up, t, row * k, col, k, vector_ok, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // past k: act(0) * 0 = 0, the padding
      const float a = kSilu ? silu(v[i]) : tanh_form ? gelu_tanh(v[i]) : gelu_erf(v[i]);
      v[i] = gated_value(a, u[i], t);
    }
  }
};

// f(source) with the GatedValues of activation act.
template <class F>
decltype(auto) with_gated_values(GateActivation act, const void* gate, const void* up, FloatType t, bool vector_ok,
                                 F&& f) {
  if (act == GateActivation::Silu) return f(GatedValues<true>{gate, up, t, false, vector_ok});
  return f(GatedValues<false>{gate, up, t, act == GateActivation::GeluTanh, vector_ok});
}

}  // namespace torchext
