// The tiled GEMM for up to 64 activation rows (from 9, or 5: batch_policy.h; beyond 64 on compute
// capability 9.0 its Hopper kernel, qgemm_wgmma.cu, where the build has it): out = x @ W^T with W
// quantized, one body for every weight format (QuantTraits' mma_load / mma_slice, the tensor-core
// GEMV's fragments) and for fp16 and bf16 activations, on fp16/bf16 mma.sync with fp32 accumulation.
// The body is qgemm_kernel.cuh, compiled as three sets of kernels (qgemm_variants.cuh); this file
// picks the set, plans the K split and adds the splits up.
//
// - A CTA owns kTileN = 256 or 128 weight rows x BM (32 or 64) activation rows (visit_tile). Each of
//   its 8 or 4 warps owns 32 weight rows (two 16-row MMA tiles) against all BM rows: every weight
//   byte is read from memory and dequantized once per CTA.
// - K advances kChunk = 256 values per pipeline stage (one k-quant super-block, eight 32-value
//   blocks). The stage's weight bytes and activations are copied to shared memory with cp.async
//   while the warps compute the previous stage; each warp first decodes its rows' slice scales into
//   a table (decode_scales), so the 4 lanes that share a row do not each decode them.
// - Weight values become A fragments in registers: a slice word holds 4 consecutive values as signed
//   bytes; value = fmaf(d, q, m). d*q is exact in fp32 for every format: at most 24 significant bits
//   (fp16 d 11, Q6_K's scale 7 and |q| 6; IQ4_XS: 11, |ls - 32| 5, its level 7; MXFP4 and NVFP4: a
//   power of two or a 4-bit E4M3 scale times a 2-bit FP4 level), so the one FMA
//   rounds exactly as dequantize's multiply-then-add, and after rounding to x's type the fragments hold exactly the
//   values the dense path multiplies.
// - That is the exact path (qmatmul's exact=True, and every fp16 product). By default bf16 values
//   are computed in bf16 (packed_pair): q exact through its bits, d and m rounded to bf16, packed
//   fmas on two values: 3.5 instructions a pair where the exact conversion takes 7.5. That needs
//   quants of 7 bits; Q8_0, IQ4_NL and IQ4_XS keep the exact conversion.
// - The k order inside a 16-value MMA step is permuted: lane t's A registers hold the step's values
//   4t..4t+3 (MMA k 2t, 2t+1, 2t+8, 2t+9), its B registers the same four activations, one 8-byte
//   shared-memory load. A dot product does not depend on the order of its terms.
// - Too few tiles to fill the GPU: K is split over grid.z; each split writes fp32 partial sums to a
//   workspace that add_splits_kernel adds up in split order (deterministic, no atomics).
// - qmatmul_id's grouped GEMM is the same body over other tiles (ExpertTiles): BM slots that
//   route_slots sorted to one expert, their activation rows gathered and output rows scattered
//   through the slot table, the expert's rows of the weight.
//
// What limits it (H200, bench/NOTES.md): latency, with one 8-warp CTA per SM. At 64 rows the exact
// path issued about 10 instructions per weight value (4 of them the dequantization, a third the
// chunk copies' per-piece address and bounds arithmetic, since hoisted: ChunkCopier) at about 0.4
// per scheduler and cycle, the tensor pipe a third busy; stalls on fixed-latency dependencies and on
// the stage's data cost about a cycle per issued instruction each. Computing bf16 weights in bf16
// issues 18% fewer and takes 8% less time. More pipeline stages, two warps per tile splitting each
// chunk, 128-row tiles, per-row chunk copies and Hopper's wgmma in this design (the MMAs off the
// warps, every warp still dequantizing its own fragments) were each measured no faster.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/batch_policy.h"
#include "kernels/launch.cuh"
#include "kernels/qgemm.cuh"
#include "kernels/qgemm_variants.cuh"

namespace torchext {
namespace {

// out[i] = the sum over splits of partial[s][i], in split order. Launched by launch_dependent, so that its launch
// overlaps the end of the GEMM that writes the partial sums; it waits for that GEMM before it reads them or writes.
__global__ void add_splits_kernel(const float* __restrict__ partial, int splits, int64_t count, void* out,
                                  FloatType ot) {
  wait_for_prior_grids();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += partial[s * count + i];
    store_float(out, i, ot, v);
  }
}

// Calls f(TiledGemm<H, kExact>{}) for the set of kernels that serves x's type and `exact`
// (qgemm_variants.cuh): fp16 weights are never computed in fp16.
template <class F>
void visit_kernel_set(FloatType xt, bool exact, F&& f) {
  if (xt != FloatType::BF16) return f(qgemm::TiledGemm<__half, true>{});
  if (exact) return f(qgemm::TiledGemm<__nv_bfloat16, true>{});
  f(qgemm::TiledGemm<__nv_bfloat16, false>{});
}

constexpr int kMaxSplits = 16;
constexpr int64_t kMaxWorkspaceFloats = int64_t(1) << 26;  // 256 MiB of partial sums at most

}  // namespace

// The K split count that minimises waves x (chunks per split + 1), so that the tiles of a short,
// wide product still fill the GPU. The + 1 is a CTA's fixed cost, about a chunk: its first stage's
// copy, which no computation overlaps, and its partial sums. Without it the plan cut 14336x4096 into
// 16 splits of one chunk (7 waves of 896 CTAs), where this plan's 2 splits of 8 chunks (one wave of
// 112) take a third less time or more (H200, bench/paths.py, L2 cold, bf16, Q4_K at 17 / 32 / 64
// rows: 47.1 / 52.4 / 76.0 us before, 31.6 / 32.6 / 43.2 with it). Every count up to kMaxSplits is
// a candidate, not only powers of two: a split that leaves two chunks to each CTA where three splits
// would leave one costs a chunk's time when the grid is a fraction of the GPU (4096x640 Q8_0, 3
// chunks, 2 splits: 14.6 us; 3 splits 9.8).
qgemm::Plan qgemm::make_plan(int64_t n, int64_t k, int64_t rows, int bm, int tile_n, int ctas_per_sm, int device) {
  Plan p{1, 0};
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  const int64_t tiles = (n + tile_n - 1) / tile_n * ((rows + bm - 1) / bm);
  const int64_t slots = int64_t(sm_count(device)) * std::max(ctas_per_sm, 1);
  int64_t best = -1;
  for (int s = 1; s <= kMaxSplits && s <= chunks; ++s) {
    if (s > 1 && int64_t(s) * rows * n > kMaxWorkspaceFloats) break;
    const int64_t cost = (tiles * s + slots - 1) / slots * ((chunks + s - 1) / s + 1);
    if (best < 0 || cost < best) best = cost, p.splits = s;
  }
  p.chunks_per_split = (chunks + p.splits - 1) / p.splits;
  p.splits = int((chunks + p.chunks_per_split - 1) / p.chunks_per_split);  // no empty split
  return p;
}

bool qgemm_supports(FloatType xt, const void* w, const void* x, int64_t k, int device) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return xt != FloatType::F32 && major >= 8 && k % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

int64_t qgemm_first_row(QType wt, FloatType xt, const void* w, const void* x, int64_t n, int64_t k, int device) {
  if (!qgemm_supports(xt, w, x, k, device)) return 0;
  bool register_kernel = false;  // the wgmma GEMM's register-fragment kernel takes these operands
#ifdef TORCHEXT_WGMMA
  register_kernel =
      qgemm::qgemm_wgmma_supports(wt, xt, w, x, k, device) && qgemm::qgemm_wgmma_regs_supports(wt, k, device);
#endif
  int block_values = 0;
  visit_weight_format(wt, [&](auto traits) { block_values = decltype(traits)::kValues; });
  return tiled_gemm_first_row(block_values, n, k, register_kernel);
}

int64_t qgemm_max_rows(QType wt, FloatType xt, const void* w, const void* x, int64_t k, int device) {
  if (!qgemm_supports(xt, w, x, k, device)) return 0;
#ifdef TORCHEXT_WGMMA
  if (qgemm::qgemm_wgmma_supports(wt, xt, w, x, k, device)) return wgmma_max_rows(wt);
#endif
  return kMaxTiledGemmRows;
}

namespace {

// More rows than the mma.sync kernels take go to the wgmma GEMM (the policy sends them only where
// qgemm_max_rows said it runs), and from regs_tiled_gemm_first_row on those of its register-fragment kernel
// (where it was measured; smaller weights keep the mma.sync tiles).
bool takes_wgmma(QType wt, int64_t n, int64_t k, int64_t rows, int device) {
#ifdef TORCHEXT_WGMMA
  const int64_t first = regs_tiled_gemm_first_row(n, k);
  return rows > kMaxTiledGemmRows || (first > 0 && rows >= first && qgemm::qgemm_wgmma_regs_supports(wt, k, device));
#else
  return false;
#endif
}

qgemm::Plan plan_for(QType wt, FloatType xt, bool exact, int64_t n, int64_t k, int64_t rows, int device) {
#ifdef TORCHEXT_WGMMA
  if (takes_wgmma(wt, n, k, rows, device)) return qgemm::qgemm_wgmma_plan(wt, n, k, rows, device);
#endif
  qgemm::Plan p{1, 0};
  visit_kernel_set(xt, exact, [&](auto set) { p = set.plan(wt, n, k, rows, device); });
  return p;
}

}  // namespace

int64_t qgemm_workspace_floats(QType wt, FloatType xt, bool exact, int64_t n, int64_t k, int64_t rows, int device) {
  if (rows > kMaxWgmmaRows) {  // the chunks of launch_qgemm, one after another, share it
    const int64_t last = rows % kMaxWgmmaRows;
    return std::max(qgemm_workspace_floats(wt, xt, exact, n, k, kMaxWgmmaRows, device),
                    last > 0 ? qgemm_workspace_floats(wt, xt, exact, n, k, last, device) : 0);
  }
  const qgemm::Plan p = plan_for(wt, xt, exact, n, k, rows, device);
  return p.splits > 1 ? int64_t(p.splits) * rows * n : 0;
}

cudaError_t launch_qgemm(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt, bool exact,
                         int64_t rows, float* workspace, void* out, int device, cudaStream_t stream) {
  if (rows > kMaxWgmmaRows) {  // chunks of kMaxWgmmaRows rows, the last what is left; x and out hold 2 bytes a value
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxWgmmaRows) {
      const cudaError_t err = launch_qgemm(wt, w, n, k, static_cast<const char*>(x) + r0 * k * 2, xt, exact,
                                           std::min(kMaxWgmmaRows, rows - r0), workspace,
                                           static_cast<char*>(out) + r0 * n * 2, device, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  cudaError_t err = cudaErrorInvalidValue;
  const qgemm::Plan p = plan_for(wt, xt, exact, n, k, rows, device);
#ifdef TORCHEXT_WGMMA
  if (takes_wgmma(wt, n, k, rows, device))
    err = qgemm::launch_qgemm_wgmma(wt, w, n, k, x, xt, exact, rows, p, workspace, out, device, stream);
  else
#endif
    visit_kernel_set(xt, exact,
                     [&](auto set) { err = set.launch(wt, w, n, k, x, rows, p, workspace, out, device, stream); });
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t count = rows * n;
  const unsigned grid = unsigned(std::min<int64_t>((count + 255) / 256, int64_t(sm_count(device)) * 8));
  return launch_dependent(add_splits_kernel, grid, 256, 0, stream, workspace, p.splits, count, out, xt);
}

int qgemm_id_tile_rows(int64_t slots, int64_t experts) { return slots <= 32 * experts ? 32 : 64; }

cudaError_t launch_qgemm_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt, bool exact,
                            const ExpertSlots& slots, int tile_rows, int64_t max_tiles, const int32_t* sorted_slots,
                            const int32_t* tile_experts, void* out, int device, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  visit_kernel_set(xt, exact, [&](auto set) {
    err = set.launch_id(wt, w, n, k, x, slots, tile_rows, max_tiles, sorted_slots, tile_experts, out, device, stream);
  });
  return err;
}

}  // namespace torchext
