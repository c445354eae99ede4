#pragma once

#include <cuda_runtime_api.h>

#include "kernels/expert_slots.h"
#include "kernels/float_types.h"

namespace torchext {

// The most tiles of tile_rows slots that route_slots can lay out for these slots: each expert's
// slots padded to whole tiles, at most min(experts, slots) experts with any.
inline int64_t route_slots_max_tiles(int64_t slots, int64_t experts, int tile_rows) {
  const int64_t routed = slots < experts ? slots : experts;
  return (slots + routed * (tile_rows - 1)) / tile_rows;
}

// Sorts the slots by expert for the grouped GEMM, on the device (one CTA, no host sync): each
// expert's slots fill whole tiles of tile_rows rows, the experts' tiles back to back; sorted_slots
// [max_tiles * tile_rows] gets each row's slot (-1: padding, and every row past the last tile),
// tile_experts [max_tiles] each tile's expert (-1 past the last tile). A slot whose id is out of
// range gets no row; its output row (out [slots, n], element type ot) is set to NaN here. Within an
// expert the order of its slots is not fixed (each slot's result does not depend on it).
cudaError_t launch_route_slots(const ExpertSlots& slots, int tile_rows, int64_t max_tiles, int32_t* sorted_slots,
                               int32_t* tile_experts, int64_t n, void* out, FloatType ot, cudaStream_t stream);

// out[s] = src[x_row(s)] for the slots routed to `expert` (src [x rows, n], out [slots, n], both of
// type ot); with mark_invalid, NaN rows for the slots whose id is out of range.
cudaError_t launch_copy_expert_rows(const ExpertSlots& slots, int64_t expert, const void* src, int64_t n, void* out,
                                    FloatType ot, bool mark_invalid, cudaStream_t stream);

}  // namespace torchext
