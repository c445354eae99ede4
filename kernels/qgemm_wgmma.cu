// The tiled GEMM on Hopper's warpgroup MMA for qmatmul's 65 (9: kMinWgmmaRegsRows) to kMaxWgmmaRows rows: the
// formats with register fragments (Q4_K, Q5_K, Q6_K) by kernels/qgemm_wgmma_regs.cuh's kernel, the others by
// kernels/qgemm_wgmma.cuh's (each file says how its kernel works). Compiled for sm_90a alone (wgmma and
// setmaxnreg exist only there), by setup.py's own rule, when the build targets compute capability
// 9.0; the other CUDA sources then see TORCHEXT_WGMMA. The sm_90a code loads only on a 9.0 device,
// which qgemm_wgmma_supports checks.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>

#include "kernels/qgemm.cuh"
#include "kernels/qgemm_wgmma.cuh"
#include "kernels/qgemm_wgmma_regs.cuh"

namespace torchext {
namespace {

using qgemm::GemmArgs;
using qgemm::kHasRegFragments;
using qgemm::kWgStageK;
using qgemm::kWgThreads;
using qgemm::Plan;
using qgemm::RegsLayout;
using qgemm::RegsTileNarrow;
using qgemm::RegsTileNarrowPaired;
using qgemm::RegsTileShort;
using qgemm::RegsTileShortPaired;
using qgemm::RegsTileTall;
using qgemm::RegsTileWide;
using qgemm::WgLayout;
using qgemm::WgTileTall;
using qgemm::WgTileWide;

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static std::atomic<PFN_cuTensorMapEncodeTiled_v12000> encode{nullptr};
  PFN_cuTensorMapEncodeTiled_v12000 f = encode.load(std::memory_order_relaxed);
  if (f == nullptr) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return nullptr;
    f = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    encode.store(f, std::memory_order_relaxed);
  }
  return f;
}

// A 2-D map over [rows][cols] elements (row stride in bytes, a multiple of 16) in boxes of box_cols x
// box_rows; zeros past either end.
bool encode_map(CUtensorMap& map, CUtensorMapDataType type, const void* base, int64_t cols, int64_t rows,
                int64_t row_bytes, int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)}, strides[1] = {cuuint64_t(row_bytes)};
  const cuuint32_t box[2] = {cuuint32_t(box_cols), cuuint32_t(box_rows)}, element_strides[2] = {1, 1};
  return encode(&map, type, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Calls f(tile) with the tile shape that serves `rows` of format T against n weight rows on the device: the
// register-fragment kernel's (qgemm_wgmma_regs.cuh) where T has its fragments (the short tile up to 32 rows, the
// narrow one up to 64), else the shared-memory one's; the wide tile up to 128 rows, the tall one beyond.
// The short and narrow tiles run two CTAs an SM where their 128-row output tiles alone are a wave of one CTA an
// SM or more: ncu has half of the one-CTA loop's cycles issuing nothing (its two MMA warps a scheduler wait on
// their dequantizing chains), and a second CTA's warps fill them. Where K splits fill the GPU instead, the
// pair's split count doubles and its shared memory halves, and it loses. H100, L2 cold, bf16, µs, one CTA an
// SM -> two (bench/paths.py, 2026-12-07): 128256x4096 (1002 tiles) at 9 / 16 / 32 rows Q4_K 167.7 / 170.5 /
// 174.3 -> 147.4 / 148.8 / 151.3, Q6_K 221.7 / 226.9 / 229.1 -> 200.8 / 203.1 / 210.5, Q5_K 209.5 -> 184.4 at
// 9; at 33 / 48 / 64 rows Q4_K 192.6 / 190.4 / 196.0 -> 180.5 / 171.4 / 179.2, Q6_K 246.6 / 246.4 / 248.2 ->
// 229.8 / 223.4 / 233.5; 14336x4096 (112 tiles) Q4_K 23.5 / 23.4 / 23.7 -> 26.2 / 26.3 / 27.3; 4096x14336 (32
// tiles) 22.9 / 23.8 / 24.2 -> 24.2 / 25.0 / 25.6.
template <class T, class F>
void visit_wgmma_tile(int64_t rows, int64_t n, int device, F&& f) {
  if constexpr (kHasRegFragments<T>) {
    const bool tiles_fill_gpu = (n + RegsTileShort::kN - 1) / RegsTileShort::kN >= sm_count(device);
    if (rows <= RegsTileShort::kM) return tiles_fill_gpu ? f(RegsTileShortPaired{}) : f(RegsTileShort{});
    if (rows <= RegsTileNarrow::kM) return tiles_fill_gpu ? f(RegsTileNarrowPaired{}) : f(RegsTileNarrow{});
    if (rows <= RegsTileWide::kM) return f(RegsTileWide{});
    f(RegsTileTall{});
  } else {
    if (rows <= WgTileWide::kM) return f(WgTileWide{});
    f(WgTileTall{});
  }
}

// The kernel, its threads and its layout for format T and the tile.
template <class T, class H, bool kExact, class Tile>
struct WgmmaKernel {
  static constexpr auto kernel = qgemm::qgemm_wgmma_kernel<T, H, kExact, Tile>;
  static constexpr int kThreads = kWgThreads;
  using Layout = WgLayout<T, Tile>;
};
template <class T, class H, bool kExact, int M, int C>
struct WgmmaKernel<T, H, kExact, qgemm::RegsTile<M, C>> {
  static constexpr auto kernel = qgemm::qgemm_wgmma_regs_kernel<T, H, kExact, qgemm::RegsTile<M, C>>;
  static constexpr int kThreads = qgemm::kRegsThreads;
  using Layout = RegsLayout<T, qgemm::RegsTile<M, C>>;
};

template <class T, class H, bool kExact, class Tile>
cudaError_t launch_kernel(const GemmArgs& args, const Plan& p, FloatType xt, cudaStream_t stream) {
  if constexpr (!WgLayout<T, WgTileWide>::kFits || !WgLayout<T, WgTileTall>::kFits) {
    return cudaErrorNotSupported;  // qgemm_wgmma_supports said no
  } else {
    using K = WgmmaKernel<T, H, kExact, Tile>;
    using Lay = typename K::Layout;
    CUtensorMap xmap, wmap;
    const CUtensorMapDataType x_type =
        xt == FloatType::BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    if (!encode_map(xmap, x_type, args.x, args.k, args.rows, args.k * 2, kWgStageK, Tile::kM,
                    CU_TENSOR_MAP_SWIZZLE_128B) ||
        !encode_map(wmap, CU_TENSOR_MAP_DATA_TYPE_UINT8, args.w, args.row_bytes, args.n, args.row_bytes,
                    Lay::kRawStride, Tile::kN, CU_TENSOR_MAP_SWIZZLE_NONE))
      return cudaErrorNotSupported;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const KernelFacts facts = kernel_facts<K::kernel, K::kThreads, Lay::kBytes>(device);  // the opt-in, once per device
    if (facts.err != cudaSuccess) return facts.err;
    if (facts.ctas_per_sm == 0) return cudaErrorInvalidConfiguration;
    const dim3 grid(unsigned((args.n + Tile::kN - 1) / Tile::kN), unsigned((args.rows + Tile::kM - 1) / Tile::kM),
                    unsigned(p.splits));
    K::kernel<<<grid, K::kThreads, Lay::kBytes, stream>>>(args, xmap, wmap);
    return cudaGetLastError();
  }
}

// Whether the device runs this file's sm_90a code (compute capability 9.0) and the driver encodes tensor maps.
bool runs_wgmma(int device) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0 && tensor_map_encoder() != nullptr;
}

}  // namespace

namespace qgemm {

bool qgemm_wgmma_supports(QType wt, FloatType xt, const void* w, const void* x, int64_t k, int device) {
  bool fits = false;  // TMA: the weight's row stride a multiple of 16 bytes (as x's: k % 8), both bases aligned
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    fits = WgLayout<T, WgTileWide>::kFits && WgLayout<T, WgTileTall>::kFits && weight_row_bytes<T>(k) % 16 == 0;
  });
  return fits && xt != FloatType::F32 && k % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && runs_wgmma(device);
}

bool qgemm_wgmma_regs_supports(QType wt, int64_t k, int device) {
  bool has = false;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    has = kHasRegFragments<T> && weight_row_bytes<T>(k) % 16 == 0;
  });
  return has && runs_wgmma(device);
}

// make_plan's K splits, but only while the grid is under one wave: a split's fp32 partial sums cost
// a write and a read of rows x n floats each, which make_plan's count of chunks does not see
// (14336x4096 Q4_K at 1024 rows, 448 CTAs of 256 x 128: 433 us in 2 splits, H200, the prototype).
Plan qgemm_wgmma_plan(QType wt, int64_t n, int64_t k, int64_t rows, int device) {
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  Plan p{1, chunks};
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    visit_wgmma_tile<T>(rows, n, device, [&](auto tile) {
      using Tile = decltype(tile);
      const int64_t tiles = (n + Tile::kN - 1) / Tile::kN * ((rows + Tile::kM - 1) / Tile::kM);
      const int64_t most = sm_count(device) * Tile::kCtas / tiles;  // splits whose CTAs all fit one wave
      if (most < 2) return;
      p = make_plan(n, k, rows, Tile::kM, Tile::kN, Tile::kCtas, device);
      if (p.splits > most) {
        p.chunks_per_split = (chunks + most - 1) / most;
        p.splits = int((chunks + p.chunks_per_split - 1) / p.chunks_per_split);
      }
    });
  });
  return p;
}

cudaError_t launch_qgemm_wgmma(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x, FloatType xt,
                               bool exact, int64_t rows, const Plan& p, float* workspace, void* out, int device,
                               cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    const int64_t row_bytes = weight_row_bytes<T>(k);
    const GemmArgs args{w, n, k, row_bytes, row_bytes * n, x, rows, p.chunks_per_split, workspace, out};
    visit_wgmma_tile<T>(rows, n, device, [&](auto tile) {
      using Tile = decltype(tile);
      if (xt != FloatType::BF16) err = launch_kernel<T, __half, true, Tile>(args, p, xt, stream);
      else if (exact || !kComputesInBf16<T>) err = launch_kernel<T, __nv_bfloat16, true, Tile>(args, p, xt, stream);
      else err = launch_kernel<T, __nv_bfloat16, false, Tile>(args, p, xt, stream);
    });
  });
  return err;
}

}  // namespace qgemm
}  // namespace torchext
