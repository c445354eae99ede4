// What cached_attention computes, shared by the CPU and CUDA kernels: the shapes and which cached
// keys a query position sees.
#pragma once

#include <cstdint>

#include "kernels/blocks.h"

namespace torchext {

// q [batch, heads, rows, dim] at positions pos[rows] over the caches [batch, kv_heads, keys, dim];
// query head h reads cache head h / (heads / kv_heads).
struct AttentionShape {
  int64_t batch, heads, kv_heads, rows, keys, dim;
  TORCHEXT_HD int64_t group() const { return heads / kv_heads; }
};

// The cached keys visible from position p: j <= p, and p - j < window when window > 0, as
// [first, last] (p itself is always visible).
TORCHEXT_HD void visible_keys(int64_t p, int64_t window, int64_t& first, int64_t& last) {
  last = p;
  first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
}

// exp(score - max) of a softmax whose largest score is max, 0 for a score of -inf (a span whose
// scores are all -inf adds nothing to the others; a row of them all gives 0 / 0, NaN, as torch's
// softmax does). NaN and +inf propagate.
TORCHEXT_HD float attention_weight(float score, float max) {
  return score == -INFINITY ? 0.0f : expf(score - max);
}

}  // namespace torchext
