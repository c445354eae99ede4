// One DP4A GEMV body for every weight format (QuantTraits supplies the block arithmetic) and every
// batch of up to 8 activation rows, and the launcher that sends each group of rows to it or to the
// tensor-core GEMV (gemv_q8_1_mma.cu), as batch_policy.h says.
//
// A persistent grid: each CTA first copies the Q8_1 activations into shared memory, split into
// quants and scales (Q8_1SplitRows) so that 16 bytes of activations are one load, then walks
// over output rows. `split` warps share one output row when there are too few rows to fill the
// GPU; each weight item is loaded once and dotted with every activation row.
//
// Float activations are quantized by quantize_q8_1 first. Quantizing them here instead, in
// every CTA, saves a launch but was measured slower at every shape and batch (H100, bench/gemv.py,
// 2026-11-24: 4096x4096 Q4_K batch 1 10.6 us against 9.1 us; 4096x14336 batch 8 102.6 against 77.9).
// The grid formats' lookups go to shared memory (quant_traits_iq_grid.h): every kernel here stages
// its format's grid first.
#define TORCHEXT_IQ_GRIDS_IN_SHARED
#include <algorithm>
#include <type_traits>

#include "kernels/batch_policy.h"
#include "kernels/expert_rows.cuh"
#include "kernels/gated_values.cuh"
#include "kernels/gemv_q8_1.cuh"
#include "kernels/gemv_q8_1_mma.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kWarps = 16;  // large CTAs: fewer of them copy the same activations
constexpr int kThreads = kWarps * kWarp;
constexpr int kUnroll = 4;

// Shared memory for `rows` staged rows: 32 quants and one Q8Scales per 32 values.
size_t staged_bytes(int64_t k, int64_t rows) {
  return size_t(rows) * q8_1_blocks_per_row(k) * (kQ8Block + sizeof(Q8Scales));
}

// Copies the x.count rows' q8_1_blocks_per_row(k) Q8_1 blocks into shared memory, quants to `qs`
// and scales to `ds`. Each thread keeps kUnroll loads in flight before it stores: one load at a
// time would make this prologue a chain of L2 round trips.
template <class Rows>
__device__ void stage_activations(const Rows& x, int64_t k, int8_t* qs, Q8Scales* ds) {
  uint32_t* qs_words = reinterpret_cast<uint32_t*>(qs);
  const int64_t row_words = q8_1_blocks_per_row(k) * 9, words = x.count * row_words;
  // word i of the staged rows (word 0 of a block: d and s; words 1..8: quants); staged rows fit in
  // shared memory, so i and row_words fit in 32 bits
  const auto word = [&](int64_t i) {
    if constexpr (Rows::kContiguous) return reinterpret_cast<const uint32_t*>(x.in(0))[i];
    const uint32_t r = uint32_t(i) / uint32_t(row_words);
    return reinterpret_cast<const uint32_t*>(x.in(int(r)))[i - r * row_words];
  };
  for (int64_t base = threadIdx.x; base < words; base += kThreads * kUnroll) {
    uint32_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = base + u * kThreads < words ? word(base + u * kThreads) : 0u;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads, block = i / 9, word = i % 9;
      if (i >= words) continue;
      if (word == 0)
        ds[block] = Q8Scales::of_word(v[u]);
      else
        qs_words[block * 8 + word - 1] = v[u];
    }
  }
}

// Activation rows that the CTA computes and quantizes itself, from a Source of float rows (the
// sources of quantize_q8_1_rows.cuh: the same values, the same Q8_1 bytes). One launch fewer than
// quantizing into memory first, for each CTA's read of the rows' inputs: 2 x 4 KB of gate and up a
// row of Gemma's 640x2048 down projection, from L2.
template <class Source>
struct ComputedRows {
  Source source;
  int count;
  __device__ __forceinline__ int64_t out(int r) const { return r; }
};

// x.count rows of x.source's values, quantized to Q8_1 into shared memory as stage_activations lays
// them out. Thread g takes values 8g .. 8g+7 of the padded rows (a quad of lanes a block): a row is a
// whole number of 8-block super-blocks, so each warp's lanes take the same turns of the loop and
// quantize_q8_1_quad's shuffles see all 32 of them.
template <class Source>
__device__ void stage_activations(const ComputedRows<Source>& x, int64_t k, int8_t* qs, Q8Scales* ds) {
  uint32_t* qs_words = reinterpret_cast<uint32_t*>(qs);
  const int64_t blocks = q8_1_blocks_per_row(k), groups = x.count * blocks * 4;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const int64_t i = g / 4;  // the block
    const int j = int(g % 4);
    float v[8];
    x.source.load(i / blocks, (i % blocks) * kQ8Block + 8 * j, k, v);
    const Q8_1Quad q = quantize_q8_1_quad(v);
    qs_words[i * 8 + 2 * j] = q.qs[0];
    qs_words[i * 8 + 2 * j + 1] = q.qs[1];
    if (j == 0) ds[i] = Q8Scales::of_word(q.scale);
  }
}

// The GEMV of weight w [n, k] against the rows x (ContiguousRows, SlotRows or ComputedRows, up to B):
// a CTA's share of the n output columns, called by every thread of the CTA. kStaged: activations in
// shared memory (any B); otherwise Q8_1 blocks read from global memory (B = 1, for rows too long to
// stage).
template <class T, int B, bool kStaged, class Rows>
__device__ __forceinline__ void gemv_rows(const uint8_t* __restrict__ w, int64_t n, int64_t k, const Rows& x,
                                          int split, void* __restrict__ out, FloatType ot) {
  extern __shared__ int4 smem[];
  __shared__ float partial[kWarps][B];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int rows = x.count;
  const int64_t xb = q8_1_blocks_per_row(k);
  int8_t* qs = reinterpret_cast<int8_t*>(smem);
  Q8Scales* ds = reinterpret_cast<Q8Scales*>(qs + rows * xb * kQ8Block);
  if constexpr (kStaged) {
    stage_activations(x, k, qs, ds);
    __syncthreads();
  }

  constexpr int kBlocksPerItem = T::kValues / kQ8Block;  // Q8_1 blocks per weight block
  const int64_t blocks = weight_row_blocks<T>(k);
  const int64_t row_bytes = blocks * T::kBytes;
  const int64_t items = blocks * T::kItems;
  const int rows_per_step = kWarps / split, part = warp % split;
  for (int64_t row0 = int64_t(blockIdx.x) * rows_per_step; row0 < n; row0 += int64_t(gridDim.x) * rows_per_step) {
    const int64_t row = row0 + warp / split;
    float acc[B] = {};
    if (row < n) {
      const uint8_t* wrow = w + row * row_bytes;
      // Several items in flight per lane; with 8 activation rows the registers go to the rows.
#pragma unroll(B <= 2 ? 4 : 2)
      for (int64_t it = part * kWarp + lane; it < items; it += split * kWarp) {
        const int64_t b = it / T::kItems;
        // B is rounded up to a power of two: rows past `rows` read the last row again, and are dropped.
        if constexpr (kStaged) {
          Q8_1SplitRows<B> xr;
#pragma unroll
          for (int r = 0; r < B; ++r) {
            const int64_t first = (r < rows ? r : rows - 1) * xb + b * kBlocksPerItem;
            xr.qs[r] = qs + first * kQ8Block;
            xr.ds[r] = ds + first;
          }
          T::template dot_item<B>(wrow + b * T::kBytes, int(it % T::kItems), xr, acc);
        } else {
          const Q8_1BlockRows<B> xr{{x.in(0) + b * kBlocksPerItem}};
          T::template dot_item<B>(wrow + b * T::kBytes, int(it % T::kItems), xr, acc);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < B; ++r)
      for (int m = kWarp / 2; m > 0; m /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], m);
    if (split > 1) {  // the split warps of a row add their sums through shared memory
      if (lane == 0)
        for (int r = 0; r < B; ++r) partial[warp][r] = acc[r];
      __syncthreads();
      if (part == 0 && lane == 0)
        for (int r = 0; r < B; ++r)
          for (int p = 1; p < split; ++p) acc[r] += partial[warp + p][r];
      __syncthreads();
    }
    if (part == 0 && lane == 0 && row < n)
      for (int r = 0; r < B && r < rows; ++r) store_float(out, x.out(r) * n + row, ot, acc[r]);
  }
}

template <class T, int B, bool kStaged, class Rows>
__device__ __forceinline__ void gemv_kernel_body(const uint8_t* __restrict__ w, int64_t n, int64_t k, const Rows& x,
                                                 int split, void* __restrict__ out, FloatType ot) {
  stage_iq_grid<T>();
  const int64_t rows_per_step = kWarps / split;  // this CTA's first step's weight rows
  prefetch_rows_then_wait(w, int64_t(blockIdx.x) * rows_per_step, rows_per_step, n, weight_row_bytes<T>(k));
  gemv_rows<T, B, kStaged>(w, n, k, x, split, out, ot);
  allow_dependent_grids();
}

template <class T, int B, bool kStaged>
__global__ void __launch_bounds__(kThreads)
    gemv_q8_1_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, const block_q8_1* __restrict__ x, int rows,
                     int split, void* __restrict__ out, FloatType ot) {
  gemv_kernel_body<T, B, kStaged>(w, n, k, ContiguousRows{x, q8_1_blocks_per_row(k), rows}, split, out, ot);
}

// The GEMV of `rows` rows of source's values, which each CTA quantizes into shared memory itself.
template <class T, int B, class Source>
__global__ void __launch_bounds__(kThreads)
    gemv_q8_1_computed_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, Source source, int rows, int split,
                              void* __restrict__ out, FloatType ot) {
  gemv_kernel_body<T, B, true>(w, n, k, ComputedRows<Source>{source, rows}, split, out, ot);
}

// qmatmul_id: row y of the grid serves the y-th expert routed to (gemv_expert_slots), the last row of
// CTAs marks the slots whose id is out of range.
template <class T, int B, bool kStaged>
__global__ void __launch_bounds__(kThreads)
    gemv_q8_1_id_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, const block_q8_1* __restrict__ x,
                        ExpertSlots slots, int split, void* __restrict__ out, FloatType ot) {
  __shared__ ExpertCtaShared<kThreads> sh;
  const int64_t rows_per_step = kWarps / split;
  if (blockIdx.y + 1 == gridDim.y) {
    for (int64_t c0 = int64_t(blockIdx.x) * rows_per_step; c0 < n; c0 += int64_t(gridDim.x) * rows_per_step)
      mark_invalid_slots(slots, c0, std::min(n, c0 + rows_per_step), n, sh.slot, sh.warp_hits, out, ot);
    return;
  }
  stage_iq_grid<T>();  // after the branch above (uniform per CTA): the marking CTAs read no weights
  const int64_t expert_bytes = n * weight_row_bytes<T>(k);
  gemv_expert_slots<B>(slots, x, k, sh, [&](int64_t expert, const SlotRows& rows) {
    gemv_rows<T, B, kStaged>(w + expert * expert_bytes, n, k, rows, split, out, ot);
  });
}

// A launch of a GEMV kernel whose CTAs cover `columns` output columns in all (n, or n per routed
// expert): its dynamic shared memory (opted in), resident CTAs, and how many warps share a row.
struct GemvPlan {
  size_t smem;
  int split;
  int64_t rows_per_step, steps, resident_ctas;
};

template <class T, auto kKernel>
cudaError_t plan_gemv(int64_t n, int64_t k, int64_t columns, size_t smem, int device, GemvPlan& p) {
  const KernelFacts facts = kernel_facts<kKernel, kThreads>(device);  // opted in to all the shared memory it may take
  if (facts.err != cudaSuccess) return facts.err;
  if (smem > facts.max_dynamic_smem) return cudaErrorInvalidValue;  // the launchers stage no more (staged_group)
  int ctas_per_sm = facts.ctas_per_sm;
  if (smem > 0) {  // the staged rows' size follows k and the rows: asked each launch
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kKernel, kThreads, smem);
    if (err != cudaSuccess) return err;
  }
  // Split rows over warps while that still fits in one wave of resident warps, keeping >= 32
  // items per warp: few rows then still fill the GPU, and many rows get whole warps each.
  const int64_t items = weight_row_blocks<T>(k) * T::kItems;
  p.smem = smem;
  p.resident_ctas = int64_t(sm_count(device)) * std::max(ctas_per_sm, 1);
  p.split = 1;
  while (p.split < kWarps && 2 * p.split * kWarp <= items && 2 * p.split * columns <= p.resident_ctas * kWarps)
    p.split *= 2;
  p.rows_per_step = kWarps / p.split;
  p.steps = (n + p.rows_per_step - 1) / p.rows_per_step;
  return cudaSuccess;
}

// A launch of kKernel (gemv_q8_1_kernel, gemv_q8_1_computed_kernel) over `rows` activation rows, which it
// takes as the argument x (staged: in shared memory).
template <class T, auto kKernel, class X>
cudaError_t launch_rows(const uint8_t* w, int64_t n, int64_t k, const X& x, int rows, bool staged, void* out,
                        FloatType ot, int device, cudaStream_t stream) {
  GemvPlan p;
  const cudaError_t err = plan_gemv<T, kKernel>(n, k, n, staged ? staged_bytes(k, rows) : 0, device, p);
  if (err != cudaSuccess) return err;
  const unsigned grid = unsigned(std::min(p.steps, p.resident_ctas));
  return launch_dependent(kKernel, grid, kThreads, p.smem, stream, w, n, k, x, rows, p.split, out, ot);
}

// f(std::integral_constant<int, B>) for the staged kernels' B: rows rounded up to a power of two.
template <class F>
decltype(auto) with_staged_tile(int rows, F&& f) {
  if (rows == 1) return f(std::integral_constant<int, 1>{});
  if (rows == 2) return f(std::integral_constant<int, 2>{});
  if (rows <= 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}

// The most of `rows` activation rows, kMaxDp4aRows at most and halved until they fit, whose copy fits
// the shared memory of the staged kernel of their tile B (facts_of(B): that kernel's kernel_facts, so its
// static arrays, a grid format's table among them, are counted as they were compiled); 0 when not even
// one row of k values fits (the kernel that reads activations from global memory takes them then).
template <class FactsOf>
int staged_group(int64_t rows, int64_t k, FactsOf&& facts_of) {
  for (int g = int(std::min<int64_t>(rows, kMaxDp4aRows)); g >= 1; g /= 2) {
    const KernelFacts f = with_staged_tile(g, facts_of);
    if (f.err == cudaSuccess && staged_bytes(k, g) <= f.max_dynamic_smem) return g;
  }
  return 0;
}

// A row of CTAs (one per step of rows) for each expert that can be routed to, at most one per slot,
// and a row for the ids out of range; the split counts the columns of the routed experts.
template <class T, int B, bool kStaged>
cudaError_t launch_id_rows(const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, const ExpertSlots& slots,
                           void* out, FloatType ot, int device, cudaStream_t stream) {
  constexpr auto kernel = gemv_q8_1_id_kernel<T, B, kStaged>;
  GemvPlan p;
  const int64_t routed = std::min(slots.experts, slots.count);
  const cudaError_t err = plan_gemv<T, kernel>(n, k, n * routed, kStaged ? staged_bytes(k, B) : 0, device, p);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.steps), unsigned(routed + 1));
  kernel<<<grid, kThreads, p.smem, stream>>>(w, n, k, x, slots, p.split, out, ot);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, int64_t rows,
                             void* out, FloatType ot, int device, cudaStream_t stream) {
  const size_t out_elem = ot == FloatType::F32 ? 4 : 2;
  const int64_t xb = q8_1_blocks_per_row(k);
  const bool int8_mma = has_int8_mma(device);
  cudaError_t err = cudaSuccess;
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    const auto staged_facts = [device](auto b) {
      return kernel_facts<gemv_q8_1_kernel<T, decltype(b)::value, true>, kThreads>(device);
    };
    // Groups of up to 16 rows for the tensor-core kernel; for DP4A up to 8, as many as shared memory
    // holds, and rows too long to stage at all are read from global memory one at a time.
    for (int64_t r0 = 0; r0 < rows && err == cudaSuccess;) {
      const block_q8_1* xg = x + r0 * xb;
      void* o = static_cast<char*>(out) + r0 * n * out_elem;
      if (choose_gemv_kernel(rows - r0, T::kValues, int8_mma) == GemvKernel::Int8Mma) {
        const int g = int(std::min<int64_t>(rows - r0, kMaxMmaRows));
        err = launch_gemv_q8_1_mma(wt, w, n, k, xg, g, o, ot, device, stream);
        r0 += g;
        continue;
      }
      const int g = staged_group(rows - r0, k, staged_facts);
      if (g == 0) {
        err = launch_rows<T, gemv_q8_1_kernel<T, 1, false>>(w, n, k, xg, 1, false, o, ot, device, stream);
      } else {
        err = with_staged_tile(g, [&](auto b) {
          constexpr int B = decltype(b)::value;
          return launch_rows<T, gemv_q8_1_kernel<T, B, true>>(w, n, k, xg, g, true, o, ot, device, stream);
        });
      }
      r0 += std::max(g, 1);
    }
  });
  return known ? err : cudaErrorInvalidValue;
}

bool gemv_q8_1_computes_rows(QType wt, int64_t rows, int64_t k, int device) {
  if (rows < 1 || rows > kMaxDp4aRows) return false;
  bool fits = false;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    // the activations' kernels differ in registers only: either one's shared memory answers
    const auto computed_facts = [device](auto b) {
      return kernel_facts<gemv_q8_1_computed_kernel<T, decltype(b)::value, GatedValues<false>>, kThreads>(device);
    };
    fits = choose_gemv_kernel(rows, T::kValues, has_int8_mma(device)) == GemvKernel::Dp4a &&
           staged_group(rows, k, computed_facts) == rows;
  });
  return fits;
}

cudaError_t launch_gated_gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* gate, const void* up,
                                   FloatType t, GateActivation act, int64_t rows, void* out, int device,
                                   cudaStream_t stream) {
  if (!gemv_q8_1_computes_rows(wt, rows, k, device)) return cudaErrorInvalidValue;
  const bool vector_ok = rows_allow_vector_loads(gate, t, k) && rows_allow_vector_loads(up, t, k);
  cudaError_t err = cudaSuccess;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    err = with_gated_values(act, gate, up, t, vector_ok, [&](const auto& source) {
      using Source = std::decay_t<decltype(source)>;
      return with_staged_tile(int(rows), [&](auto b) {
        constexpr int B = decltype(b)::value;
        return launch_rows<T, gemv_q8_1_computed_kernel<T, B, Source>>(w, n, k, source, int(rows), true, out, t,
                                                                       device, stream);
      });
    });
  });
  return err;
}

cudaError_t launch_gemv_q8_1_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x,
                                const ExpertSlots& slots, void* out, FloatType ot, int device, cudaStream_t stream) {
  // an expert receives at most `tokens` rows unless ids repeat in a token (then it takes several groups)
  const int64_t tokens = slots.count / slots.top_k;
  cudaError_t err = cudaErrorInvalidValue;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    if (choose_gemv_kernel(tokens, T::kValues, has_int8_mma(device)) == GemvKernel::Int8Mma) {
      err = launch_gemv_q8_1_mma_id(wt, w, n, k, x, slots, out, ot, device, stream);
      return;
    }
    // a tile stages all of its B rows, whatever an expert receives
    int tile = 1;
    while (tile < std::min<int64_t>(tokens, kMaxDp4aRows)) tile *= 2;
    const int g = staged_group(tile, k, [device](auto b) {
      return kernel_facts<gemv_q8_1_id_kernel<T, decltype(b)::value, true>, kThreads>(device);
    });
    if (g == 0) {
      err = launch_id_rows<T, 1, false>(w, n, k, x, slots, out, ot, device, stream);
    } else {
      err = with_staged_tile(g, [&](auto b) {
        return launch_id_rows<T, decltype(b)::value, true>(w, n, k, x, slots, out, ot, device, stream);
      });
    }
  });
  return err;
}

}  // namespace torchext
