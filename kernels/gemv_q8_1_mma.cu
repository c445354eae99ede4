// The GEMV for 2 to 16 activation rows on int8 tensor cores: one body for every weight format
// (QuantTraits::mma_load and mma_slice supply each format's int8 fragments and scales).
//
// A warp owns 16 weight rows and computes them against up to 8 (NT = 1) or 16 (NT = 2) activation
// rows with mma.sync: per slice of 32 values (16 for Q2_K, Q3_K, Q6_K, whose scales cover 16), one
// m16n8k32 (m16n8k16) product per 8 activation rows gives exact int32 dot products, which are scaled
// in fp32 as the DP4A kernel scales them: acc += d_w * d_x * isum + m_w * s_x. The 8 warps of a CTA
// split the rows' items between them when there are too few rows to fill the GPU; their partial
// sums meet in shared memory. Activations are read straight from the Q8_1 blocks (no staging
// prologue): the warps of a CTA read the same blocks, which L1 serves.
//
// Each lane issues the loads of several items before it uses any (kAhead): with one item in flight
// per warp the first version streamed at 1.4 TB/s whatever the batch (H100, 2026-11-24:
// 128256x4096 Q4_K 216 us for 2 rows against 106 us for the 1-row DP4A GEMV).
// The grid formats' lookups go to shared memory (quant_traits_iq_grid.h): every kernel here stages
// its format's grid first.
#define TORCHEXT_IQ_GRIDS_IN_SHARED
#include <algorithm>

#include "kernels/batch_policy.h"
#include "kernels/expert_rows.cuh"
#include "kernels/gemv_q8_1_mma.cuh"
#include "kernels/launch.cuh"
#include "kernels/quant_traits.h"

namespace torchext {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr int kTileRows = 16;  // weight rows per warp: the MMA's M

// c += a * b over one slice: A is 16 weight rows x K int8 (row-major), B is K x 8 activation rows
// (column-major), C is 16 x 8 int32. Register j of a / b holds the k index 4t + 16j .. +3 (t: lane
// % 4) of row lane / 4 (a[0], a[2]) or lane / 4 + 8 (a[1], a[3]), and of column lane / 4 (b).
template <int W>
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[2 * W], const uint32_t (&b)[W]) {
#if __CUDA_ARCH__ >= 800
  if constexpr (W == 2) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  }
#else
  __trap();  // the launcher sends only devices with int8 mma.sync here
#endif
}

// Q8_1 scales (d, s) of a block as one 32-bit load.
__device__ __forceinline__ Q8Scales q8_1_scales(const block_q8_1& b) {
  return Q8Scales::of_word(*reinterpret_cast<const uint32_t*>(&b));
}

// Items whose loads a lane issues before it uses the first: about 24 registers of loads per row
// (two CTAs of 128-register threads per SM). The words of a 1-byte-aligned format (MXFP4) arrive as
// single bytes, a register each until they are combined (counted as one word, 12 items ahead spilled
// 56-88 bytes a thread, ptxas -v).
template <class T>
constexpr int items_ahead() {
  constexpr int words = int(sizeof(typename T::MmaRaw) / 4) * (T::kAlign == 1 ? 4 : 1);
  return words >= 12 ? 2 : 24 / words;
}

// The tiles of weight w [n, k] that this CTA owns against the rows x (ContiguousRows or SlotRows, up
// to 8 * NT of them), called by every thread of the CTA.
template <class T, int NT, class Rows>
__device__ __forceinline__ void gemv_mma_rows(const uint8_t* __restrict__ w, int64_t n, int64_t k, const Rows& x,
                                              int split, void* __restrict__ out, FloatType ot) {
  constexpr int kW = T::kMmaWords, kAhead = items_ahead<T>();
  __shared__ float partial[kWarps][kTileRows][8 * NT];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int part = warp % split;
  const int64_t row0 = (int64_t(blockIdx.x) * (kWarps / split) + warp / split) * kTileRows;

  // This lane's two weight rows (clamped: rows past n compute garbage that is never stored) and
  // activation rows: column g of B, and columns 2t, 2t+1 of C (rows past x.count re-read the last).
  const int64_t blocks = weight_row_blocks<T>(k);
  const auto w_row = [&](int64_t r) { return w + (r < n ? r : n - 1) * blocks * T::kBytes; };
  const uint8_t *w_lo = w_row(row0 + g), *w_hi = w_row(row0 + g + 8);
  const int rows = x.count;
  const auto x_row = [&](int r) { return x.in(r < rows ? r : rows - 1); };
  const block_q8_1 *xq[NT], *xs[NT][2];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    xq[j] = x_row(8 * j + g);
    xs[j][0] = x_row(8 * j + 2 * t), xs[j][1] = x_row(8 * j + 2 * t + 1);
  }

  float acc[NT][4] = {};
  const int64_t items = blocks * T::kMmaItems;
  for (int64_t it0 = part; it0 < items; it0 += int64_t(kAhead) * split) {
    typename T::MmaRaw lo[kAhead], hi[kAhead];
    // Unconditional loads (past the end: the last item again, never used), so that no branch
    // separates them.
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t next = it0 + int64_t(u) * split, it = next < items ? next : items - 1, b = it / T::kMmaItems;
      T::mma_load(w_lo + b * T::kBytes, int(it % T::kMmaItems), t, lo[u]);
      T::mma_load(w_hi + b * T::kBytes, int(it % T::kMmaItems), t, hi[u]);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t it = it0 + int64_t(u) * split, b = it / T::kMmaItems;
      if (it >= items) break;
#pragma unroll
      for (int s = 0; s < T::kMmaSlices; ++s) {
        const MmaSlice<kW> sl = T::mma_slice(lo[u], s), sh = T::mma_slice(hi[u], s);
        const int first = T::mma_slice_first(int(it % T::kMmaItems), s);
        const int64_t xblock = b * (T::kValues / kQ8Block) + first / kQ8Block;
        const int word = (first % kQ8Block) / 4 + t;  // of the block's 8 quant words
        uint32_t a[2 * kW];
#pragma unroll
        for (int i = 0; i < kW; ++i) a[2 * i] = sl.q[i], a[2 * i + 1] = sh.q[i];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(xq[j][xblock].qs);
          uint32_t bq[kW];
#pragma unroll
          for (int i = 0; i < kW; ++i) bq[i] = xw[word + 4 * i];
          int c[4] = {0, 0, 0, 0};
          mma_s8<kW>(c, a, bq);
          const Q8Scales s0 = q8_1_scales(xs[j][0][xblock]), s1 = q8_1_scales(xs[j][1][xblock]);
          acc[j][0] += sl.d * s0.d * float(c[0]);
          acc[j][1] += sl.d * s1.d * float(c[1]);
          acc[j][2] += sh.d * s0.d * float(c[2]);
          acc[j][3] += sh.d * s1.d * float(c[3]);
          if constexpr (kW == 2) {  // a 32-value slice's min meets its Q8_1 block's input sum (scaled: Q8Scales)
            acc[j][0] += sl.m * kQ8SumScale * s0.s;
            acc[j][1] += sl.m * kQ8SumScale * s1.s;
            acc[j][2] += sh.m * kQ8SumScale * s0.s;
            acc[j][3] += sh.m * kQ8SumScale * s1.s;
          } else if constexpr (T::kMmaMins) {
            // a 16-value slice's min meets the sum of its 16 activations: ones times B gives it for
            // columns 2t, 2t+1 in every row of C
            const uint32_t ones[2] = {0x01010101u, 0x01010101u};
            int xsum[4] = {0, 0, 0, 0};
            mma_s8<1>(xsum, ones, bq);
            acc[j][0] += sl.m * s0.d * float(xsum[0]);
            acc[j][1] += sl.m * s1.d * float(xsum[1]);
            acc[j][2] += sh.m * s0.d * float(xsum[0]);
            acc[j][3] += sh.m * s1.d * float(xsum[1]);
          }
        }
      }
    }
  }

  if (split > 1) {  // the warps that split a tile's items add their sums through shared memory
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) partial[warp][g + 8 * (e / 2)][8 * j + 2 * t + e % 2] = acc[j][e];
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        for (int p = 1; p < split; ++p) acc[j][e] += partial[warp + p][g + 8 * (e / 2)][8 * j + 2 * t + e % 2];
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = row0 + g + 8 * (e / 2);
      const int col = 8 * j + 2 * t + e % 2;
      if (row < n && col < rows) store_float(out, x.out(col) * n + row, ot, acc[j][e]);
    }
}

template <class T, int NT>
__global__ void __launch_bounds__(kThreads, 2)
    gemv_q8_1_mma_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, const block_q8_1* __restrict__ x,
                         int rows, int split, void* __restrict__ out, FloatType ot) {
  stage_iq_grid<T>();
  const int64_t tile_rows = (kWarps / split) * kTileRows;  // this CTA's weight tiles
  prefetch_rows_then_wait(w, int64_t(blockIdx.x) * tile_rows, tile_rows, n, weight_row_bytes<T>(k));
  gemv_mma_rows<T, NT>(w, n, k, ContiguousRows{x, q8_1_blocks_per_row(k), rows}, split, out, ot);
  allow_dependent_grids();
}

// qmatmul_id: row y of the grid serves the y-th expert routed to (gemv_expert_slots), the last row of
// CTAs marks the slots whose id is out of range.
template <class T, int NT>
__global__ void __launch_bounds__(kThreads, 2)
    gemv_q8_1_mma_id_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, const block_q8_1* __restrict__ x,
                            ExpertSlots slots, int split, void* __restrict__ out, FloatType ot) {
  __shared__ ExpertCtaShared<kThreads> sh;
  if (blockIdx.y + 1 == gridDim.y) {
    const int64_t c0 = int64_t(blockIdx.x) * (kWarps / split) * kTileRows;
    mark_invalid_slots(slots, c0, std::min(n, c0 + (kWarps / split) * kTileRows), n, sh.slot, sh.warp_hits, out, ot);
    return;
  }
  stage_iq_grid<T>();  // after the branch above (uniform per CTA): the marking CTAs read no weights
  const int64_t expert_bytes = n * weight_row_bytes<T>(k);
  gemv_expert_slots<8 * NT>(slots, x, k, sh, [&](int64_t expert, const SlotRows& rows) {
    gemv_mma_rows<T, NT>(w + expert * expert_bytes, n, k, rows, split, out, ot);
  });
}

// How many warps share a tile's items, and the CTAs that cover n rows, for a launch of kKernel whose
// CTAs cover `tiles` 16-row tiles in all (n's, or n's per routed expert).
template <class T, auto kKernel>
cudaError_t plan_tiles(int64_t n, int64_t k, int64_t tiles, int device, int& split, int64_t& ctas) {
  const KernelFacts facts = kernel_facts<kKernel, kThreads>(device);
  if (facts.err != cudaSuccess) return facts.err;
  const int ctas_per_sm = facts.ctas_per_sm;
  // Split a tile's items over 2, 4 or 8 warps while the tiles alone would leave most resident warp
  // slots empty, down to one item a warp: a short row is latency-bound, and more warps on it beat fewer
  // CTAs (2-8 rows, L2 cold, against a floor of four items a warp: H100 Q4_K 3072x1024 8.0-9.3 -> 6.2-7.1
  // us, 1024x3072 9.7-11.2 -> 6.8-8.8, 640x1024 6.3-7.0 -> 5.4-5.8, Q6_K 3072x1024 7.8-8.7 -> 6.4-7.1;
  // rows of 16 items or more, 4096x4096 Q4_K's and 640x2048 Q6_K's among them, split as before).
  const int64_t items = weight_row_blocks<T>(k) * T::kMmaItems;
  const int64_t resident_warps = int64_t(sm_count(device)) * std::max(ctas_per_sm, 1) * kWarps;
  split = 1;
  while (split < kWarps && 2 * split <= items && 2 * split * tiles <= resident_warps) split *= 2;
  const int64_t tiles_per_cta = kWarps / split;
  ctas = ((n + kTileRows - 1) / kTileRows + tiles_per_cta - 1) / tiles_per_cta;
  return cudaSuccess;
}

template <class T, int NT>
cudaError_t launch_tiles(const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, int rows, void* out,
                         FloatType ot, int device, cudaStream_t stream) {
  constexpr auto kernel = gemv_q8_1_mma_kernel<T, NT>;
  int split = 1;
  int64_t ctas = 0;
  const cudaError_t err = plan_tiles<T, kernel>(n, k, (n + kTileRows - 1) / kTileRows, device, split, ctas);
  if (err != cudaSuccess) return err;
  return launch_dependent(kernel, unsigned(ctas), kThreads, 0, stream, w, n, k, x, rows, split, out, ot);
}

// A row of CTAs (one per group of tiles) for each expert that can be routed to, at most one per
// slot, and a row for the ids out of range; the split counts the tiles of the routed experts.
template <class T, int NT>
cudaError_t launch_id_tiles(const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, const ExpertSlots& slots,
                            void* out, FloatType ot, int device, cudaStream_t stream) {
  constexpr auto kernel = gemv_q8_1_mma_id_kernel<T, NT>;
  const int64_t routed = std::min(slots.experts, slots.count);
  const int64_t tiles = (n + kTileRows - 1) / kTileRows * routed;
  int split = 1;
  int64_t ctas = 0;
  const cudaError_t err = plan_tiles<T, kernel>(n, k, tiles, device, split, ctas);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(ctas), unsigned(routed + 1)), kThreads, 0, stream>>>(w, n, k, x, slots, split, out, ot);
  return cudaGetLastError();
}

}  // namespace

bool has_int8_mma(int device) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major >= 8;
}

cudaError_t launch_gemv_q8_1_mma(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x, int rows,
                                 void* out, FloatType ot, int device, cudaStream_t stream) {
  if (rows < 1 || rows > kMaxMmaRows) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    err = rows <= 8 ? launch_tiles<T, 1>(w, n, k, x, rows, out, ot, device, stream)
                    : launch_tiles<T, 2>(w, n, k, x, rows, out, ot, device, stream);
  });
  return err;
}

cudaError_t launch_gemv_q8_1_mma_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* x,
                                    const ExpertSlots& slots, void* out, FloatType ot, int device,
                                    cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    err = slots.count / slots.top_k <= 8 ? launch_id_tiles<T, 1>(w, n, k, x, slots, out, ot, device, stream)
                                         : launch_id_tiles<T, 2>(w, n, k, x, slots, out, ot, device, stream);
  });
  return err;
}

}  // namespace torchext
