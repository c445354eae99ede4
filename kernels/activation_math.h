// The activations of the gelu ops and of the gated MLPs' fused ops, in fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "blocks.h"

namespace torchext {

// x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
TORCHEXT_HD float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
TORCHEXT_HD float gelu_tanh(float x) {
  const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

// x * sigmoid(x). On the GPU torch's CUDA formula, x / (1 + expf(-x)) in fp32, so that the fused ops give
// the bits of torch.nn.functional.silu there. On the CPU the correctly rounded value, computed in float64
// and rounded once: torch's CPU kernel takes a vectorized exp for most elements and the C library's for
// the rest, so there is no one CPU formula to match, and this one an oracle can check bit for bit. Below
// x = -88.7, where expf(-x) overflows, the formula gives -0 and the correctly rounded value a tiny number.
TORCHEXT_HD float silu(float x) {
#ifdef __CUDA_ARCH__
  return x / (1.0f + expf(-x));
#else
  return float(double(x) / (1.0 + std::exp(-double(x))));
#endif
}

// The activation of a gated MLP, act(gate) * up: GEGLU's two GELUs and SwiGLU's SiLU.
enum class GateActivation : uint8_t { GeluErf, GeluTanh, Silu };

}  // namespace torchext
