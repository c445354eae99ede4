// The slots of an expert-indexed matmul (qmatmul_id): T tokens x top_k expert ids, slot s = t * top_k
// + j. Slot s computes output row s from expert ids[s]'s weight and one activation row: the token's
// (x [T, k], read by all its slots) or the slot's own (x [T, top_k, k], as a down projection reads
// its slots' gated activations).
#pragma once

#include <cstdint>

#include "kernels/row_index.h"

namespace torchext {

// The most experts one weight may hold: the grouped GEMM's routing kernel counts them in shared
// memory (8 bytes each), and the GEMV's grid has one CTA row per expert. MoE models ship up to a
// few hundred.
constexpr int64_t kMaxExperts = 4096;

struct ExpertSlots {
  RowIndex ids;      // [slots] expert ids, int64 or int32
  int64_t count;     // slots: tokens * top_k (< 2^31, checked by the op)
  int64_t experts;   // E
  int64_t top_k;
  bool x_per_slot;   // x [T, top_k, k] rather than [T, k]

  // The expert of slot s, or -1 for an id outside [0, E) (its output row is NaN on CUDA).
  TORCHEXT_HD int64_t expert(int64_t s) const { return ids.source(s, experts); }
  // The activation row that slot s reads.
  TORCHEXT_HD int64_t x_row(int64_t s) const { return x_per_slot ? s : s / top_k; }
};

}  // namespace torchext
