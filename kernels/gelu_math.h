// GELU in fp32, the two forms of torch.nn.functional.gelu.
#pragma once

#include "blocks.h"

namespace torchext {

// x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
TORCHEXT_HD float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
TORCHEXT_HD float gelu_tanh(float x) {
  const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

}  // namespace torchext
