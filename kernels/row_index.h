// Which weight row an output row is read from: row i itself (dequantize), or ids[i] (embedding).
#pragma once

#include <cstdint>

#include "kernels/blocks.h"

namespace torchext {

struct RowIndex {
  const void* ids = nullptr;  // int64 or int32 token ids; null: the identity
  bool ids_are_64bit = true;

  TORCHEXT_HD int64_t id(int64_t i) const {
    if (ids == nullptr) return i;
    return ids_are_64bit ? static_cast<const int64_t*>(ids)[i] : static_cast<const int32_t*>(ids)[i];
  }
  // The weight row of output row i, or -1 for an id outside [0, n) (its output row is NaN).
  TORCHEXT_HD int64_t source(int64_t i, int64_t n) const {
    const int64_t row = id(i);
    return row >= 0 && row < n ? row : -1;
  }
};

}  // namespace torchext
