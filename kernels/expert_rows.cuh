// The activation rows a GEMV body reads and the output rows it writes: rows 0 .. count-1 of a Q8_1
// matrix into the same output rows (qmatmul), or the slots of one expert (qmatmul_id), which a CTA
// first collects from the ids (collect_slots). Both GEMV kernels (gemv_q8_1.cu, gemv_q8_1_mma.cu)
// take either.
#pragma once

#include "kernels/expert_slots.h"
#include "kernels/float_types.h"

namespace torchext {

// Rows r of a [count, row_blocks] Q8_1 matrix, into output rows r.
struct ContiguousRows {
  static constexpr bool kContiguous = true;
  const block_q8_1* x;
  int64_t row_blocks;
  int count;

  __device__ __forceinline__ const block_q8_1* in(int r) const { return x + r * row_blocks; }
  __device__ __forceinline__ int64_t out(int r) const { return r; }
};

// The slots slot[0 .. count-1] (in shared memory) of one expert: slot s reads activation row
// s / x_divisor (1 when x holds a row per slot, else top_k) and writes output row s.
struct SlotRows {
  static constexpr bool kContiguous = false;
  const block_q8_1* x;
  int64_t row_blocks;
  const int* slot;
  int count;
  int64_t x_divisor;

  __device__ __forceinline__ const block_q8_1* in(int r) const { return x + slot[r] / x_divisor * row_blocks; }
  __device__ __forceinline__ int64_t out(int r) const { return slot[r]; }
};

// Collects into list[0 ..) the slots in [base, base + blockDim.x) routed to `expert` (-1: the slots
// whose id is out of range), in slot order, and returns how many (the same in every thread). Every
// thread of the CTA calls it; warp_hits holds one int per warp. list holds blockDim.x ints.
__device__ __forceinline__ int collect_slots(const ExpertSlots& s, int64_t base, int64_t expert, int* list,
                                             int* warp_hits) {
  const int64_t i = base + threadIdx.x;
  const bool hit = i < s.count && s.expert(i) == expert;
  const unsigned mask = __ballot_sync(0xffffffffu, hit);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_hits[warp] = __popc(mask);
  __syncthreads();
  int before = 0, total = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    before += w < warp ? warp_hits[w] : 0;
    total += warp_hits[w];
  }
  if (hit) list[before + __popc(mask & ((1u << lane) - 1u))] = int(i);
  __syncthreads();
  return total;
}

// The shared memory of a qmatmul_id GEMV CTA of kThreads threads (gemv_expert_slots).
template <int kThreads>
struct ExpertCtaShared {
  int slot[kThreads];                  // a window's slots routed to the CTA's expert
  int warp_hits[kThreads / 32];
  uint32_t routed[kMaxExperts / 32];   // a bit per expert that some slot is routed to
  int64_t expert;
};

// The which-th smallest expert that some slot is routed to, or -1 when fewer are. Each CTA finds its
// own, so that the grid has min(E, slots) rows of CTAs rather than E (at decode, top_k rows instead
// of all the experts, most of whose CTAs would only start and exit). Every thread calls it.
template <int kThreads>
__device__ __forceinline__ int64_t routed_expert(const ExpertSlots& s, int64_t which, ExpertCtaShared<kThreads>& sh) {
  const int64_t words = (s.experts + 31) / 32;
  for (int64_t i = threadIdx.x; i < words; i += kThreads) sh.routed[i] = 0;
  if (threadIdx.x == 0) sh.expert = -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < s.count; i += kThreads) {
    const int64_t e = s.expert(i);
    if (e >= 0) atomicOr(&sh.routed[e / 32], 1u << (e % 32));
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // one warp counts the set bits, 32 words at a time
    const int lane = threadIdx.x;
    int64_t before = 0;  // set bits in the words before this step's
    for (int64_t w0 = 0; w0 < words && before <= which; w0 += 32) {
      uint32_t bits = w0 + lane < words ? sh.routed[w0 + lane] : 0u;
      const int count = __popc(bits);
      int upto = count;  // inclusive prefix over the lanes
      for (int o = 1; o < 32; o *= 2) {
        const int v = __shfl_up_sync(0xffffffffu, upto, o);
        if (lane >= o) upto += v;
      }
      const int64_t first = before + upto - count;  // the rank of this word's lowest set bit
      if (first <= which && which < before + upto) {
        for (int64_t r = first; r < which; ++r) bits &= bits - 1;  // drop the lower set bits
        sh.expert = (w0 + lane) * 32 + __ffs(bits) - 1;
      }
      before += __shfl_sync(0xffffffffu, upto, 31);
    }
  }
  __syncthreads();
  return sh.expert;
}

// The loop of a qmatmul_id GEMV CTA: it finds its expert (routed_expert, blockIdx.y-th), collects
// the expert's slots and calls gemv(expert, rows) on them, G at a time (SlotRows), so the expert's
// weight is read once for all of its rows. Every thread of the CTA calls it.
template <int G, int kThreads, class Gemv>
__device__ __forceinline__ void gemv_expert_slots(const ExpertSlots& s, const block_q8_1* x, int64_t k,
                                                  ExpertCtaShared<kThreads>& sh, Gemv&& gemv) {
  const int64_t expert = routed_expert(s, blockIdx.y, sh);
  if (expert < 0) return;
  const int64_t row_blocks = q8_1_blocks_per_row(k), divisor = s.x_per_slot ? 1 : s.top_k;
  for (int64_t base = 0; base < s.count; base += kThreads) {
    const int hits = collect_slots(s, base, expert, sh.slot, sh.warp_hits);
    for (int g = 0; g < hits; g += G) {
      gemv(expert, SlotRows{x, row_blocks, sh.slot + g, min(G, hits - g), divisor});
      __syncthreads();  // the next group reuses the body's shared memory, the next window the list
    }
  }
}

// NaN in columns [c0, c1) of the output rows of the slots whose id is out of range: what the CPU
// refuses with an error, which here would need a host sync to raise.
__device__ __forceinline__ void mark_invalid_slots(const ExpertSlots& s, int64_t c0, int64_t c1, int64_t n,
                                                   int* list, int* warp_hits, void* out, FloatType ot) {
  const int64_t width = c1 - c0;
  for (int64_t base = 0; base < s.count; base += blockDim.x) {
    const int hits = collect_slots(s, base, -1, list, warp_hits);
    for (int64_t i = threadIdx.x; i < hits * width; i += blockDim.x)
      store_float(out, list[i / width] * n + c0 + i % width, ot, __int_as_float(0x7fc00000));
    __syncthreads();  // list is refilled next
  }
}

}  // namespace torchext
