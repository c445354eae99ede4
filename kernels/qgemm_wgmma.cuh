// The tiled GEMM for many activation rows on Hopper's warpgroup MMA (sm_90a; qgemm_wgmma.cu launches
// it): out = x @ W^T with W quantized, for every weight format through QuantTraits' mma_load /
// mma_slice, fp16 or bf16 activations, fp32 sums. The formats whose threads can build wgmma's A
// fragments themselves (Q4_K, Q5_K, Q6_K) take qgemm_wgmma_regs.cuh's kernel instead, which shares this file's
// copies, barriers and descriptors.
//
// A CTA owns Tile::kN weight rows x Tile::kM activation rows (256 x 128 for up to 128 rows, 128 x 256
// beyond), and its warps specialise, each role running ahead of the next as far as its ring of
// shared-memory stages allows (mbarriers say when a stage is full and when it is free again):
// - one thread of warp 16 issues the tensor memory accelerator's copies of each 256-value chunk of the
//   tile's weight bytes (one box of rows x chunk bytes), one thread of warp 17 those of each 64-value
//   stage of the activations (one box in the 128-byte swizzle); past the weight's or the activations'
//   end the copies fill zeros;
// - two dequantizing warpgroups turn each stage of the raw chunk into x's type, written in the
//   128-byte swizzled K-major layout wgmma reads (thread t: weight row t % kN, half stages as kN says);
// - two consumer warpgroups each multiply half the activation rows by all kN weight rows: two
//   m64n128k16 MMAs per 16 values, both operands from shared memory, 128 fp32 sums a thread.
// Every weight byte is read from memory and dequantized once per CTA; activations once per CTA.
// Registers move to the consumers by setmaxnreg (below). Measured against the alternatives
// (128 x 128 tiles, cp.async copies, one producer warpgroup) in bench/NOTES.md.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/qgemm_kernel.cuh"

namespace torchext::qgemm {
namespace {

constexpr int kWgStageK = 64;  // K values per operand stage: one 128-byte swizzle row of 16-bit values
constexpr int kWgThreads = 20 * 32;  // warps 0-7 dequantize, 8-15 consume, 16 and 17 copy, 18-19 idle
// setmaxnreg moves registers within the CTA's own allocation (kWgThreads x 96 at launch, the most that
// 640 threads get): what the consumers ask for must not exceed what the other warpgroups give back, or
// their setmaxnreg.inc waits forever (a first build asked 152 x 256 against 13,312 given back, and
// hung). 160 is the least the consumers' 128 accumulators take without spilling (ptxas, CUDA 13.0).
constexpr int kLaunchRegs = 96, kCopyRegs = 24, kDequantRegs = 64, kMathRegs = 160;
static_assert((kMathRegs - kLaunchRegs) * 256 <= (kLaunchRegs - kDequantRegs) * 256 + (kLaunchRegs - kCopyRegs) * 128,
              "the consumers take no more registers than the others give back");

// kM activation rows x kN weight rows; each consumer warpgroup runs kSubM x kSubN m64n128 MMAs a step.
template <int M, int N>
struct WgTile {
  static constexpr int kM = M, kN = N, kCtas = 1;  // one CTA an SM
  static constexpr int kSubM = M / 128, kSubN = N / 128;
  static_assert(kSubM * kSubN == 2, "two 64 x 128 accumulator sets a consumer thread: kMathRegs");
  static constexpr int kHalves = N / 128;  // half stages each of the 256 dequantizing threads computes
};
using WgTileWide = WgTile<128, 256>;  // up to 128 activation rows: a weight byte read by fewer CTAs
using WgTileTall = WgTile<256, 128>;  // more: each dequantized value serves 256 rows

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// 16 bytes of shared memory in one load that the compiler may drop (unused) but not split; p must not be
// read before the data is there, so it should depend on the barrier wait (wait_token).
__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 v;
  asm("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem_addr(p)));
  return v;
}
// Waits until the barrier's phase of that parity has completed, and returns 0, which the compiler cannot
// see through (a load that must not move above the wait can depend on it).
__device__ __forceinline__ uint32_t mbar_wait_token(uint64_t* bar, uint32_t parity) {
  uint32_t token;
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%1], %2;\n"
      "@!done bra WAIT_%=;\n"
      "mov.u32 %0, 0;\n}\n"
      : "=r"(token)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return token;
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) { (void)mbar_wait_token(bar, parity); }
// The tensor map's box at (x = k offset, y = row) into dst, completing `bytes` on the barrier.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// A wgmma shared-memory descriptor of a K-major tile in the 128-byte swizzle: rows of 128 bytes, 8-row
// groups 1024 bytes apart (the stride offset), the leading offset unused.
__device__ __forceinline__ uint64_t tile_descriptor(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Where 16-byte piece p (values 8p .. 8p+7) of row r of a tile lives: the 128-byte swizzle XORs the
// piece index with the row's position in its 8-row group.
__device__ __forceinline__ int swizzled(int r, int p) { return r * 128 + ((p ^ (r & 7)) << 4); }

// The 64 fp32 sums of an m64n128 wgmma: their operand list in the asm template (%0 .. %63) and as
// operands of d, for the MMAs of both kernels (this file's and qgemm_wgmma_regs.cuh's).
#define TORCHEXT_WGMMA_D64                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define TORCHEXT_WGMMA_D64_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
  "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),          \
  "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),         \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),         \
  "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),         \
  "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),         \
  "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),         \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d[64] += a[64 x 16] * b[128 x 16]^T, a and b by descriptor (bf16 or fp16 operands, fp32 sums).
#define TORCHEXT_WGMMA_64x128x16(TYPE)                                                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                       \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " TORCHEXT_WGMMA_D64               \
               ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                 \
               : TORCHEXT_WGMMA_D64_OPERANDS(d)                                                                  \
               : "l"(a), "l"(b), "r"(1))

template <class H>
__device__ __forceinline__ void wgmma_64x128x16(float (&d)[64], uint64_t a, uint64_t b) {
  if constexpr (std::is_same_v<H, __nv_bfloat16>) TORCHEXT_WGMMA_64x128x16("bf16");
  else TORCHEXT_WGMMA_64x128x16("f16");
}
#undef TORCHEXT_WGMMA_64x128x16


// Shared memory: rings of activation tiles, weight tiles (x's type) and raw chunks, then the barriers.
// A raw chunk's box starts at the 16-byte boundary at or before the chunk (the tensor memory
// accelerator reads from 16-byte aligned addresses: Q2_K's and Q6_K's chunks at unaligned offsets came
// back wrong or faulted, H200), so a row's chunk starts (chunk offset % 16) bytes into its box row,
// and the box row is the chunk plus up to 15 bytes, rounded up to an odd number of 16-byte pieces: the
// dequantizing threads read the same byte of consecutive rows at once, so rows a multiple of 128 bytes
// apart would put a warp's 32 loads in one bank (Q3_K's 110-byte, IQ3_XXS's 98 and IQ3_S's 110-byte
// chunks took 128-byte rows and ran 1.5-3x slower than the dense path; an odd count of pieces leaves 4
// loads a bank, as the mma.sync kernel's WeightChunk::kStride: H200, 4096x14336, 256 rows, L2 cold,
// Q3_K 344 -> 83 us, IQ3_XXS 122 -> 69, IQ3_S 138 -> 72, Q5_1 85 -> 70, TQ2_0 83 -> 68; Q4_K 62 both).
// kFits: whether that is one box row (at most 256 bytes) and two raw chunks fit beside at least two
// activation tiles (Q8_0's 272-byte chunk does not; Q6_K's 210 bytes take 240 and leave two).
constexpr int raw_stride(int chunk_bytes) {
  return ((chunk_bytes + (chunk_bytes % 16 == 0 ? 0 : 15) + 15) / 16 | 1) * 16;
}
// Chunk c of a weight row starts at byte c * kBytes: its copy starts at the 16-byte boundary below
// (raw_copy_start) and the chunk raw_chunk_lead bytes into the copy's box row.
template <class T>
__device__ __forceinline__ int raw_copy_start(int64_t c) {
  return int(c * WeightChunk<T>::kBytes) & ~15;
}
template <class T>
__device__ __forceinline__ int raw_chunk_lead(int64_t c) {
  return int(c * WeightChunk<T>::kBytes) & 15;
}
template <class T, class Tile>
struct WgLayout {
  static constexpr int kChunkBytes = WeightChunk<T>::kBytes;
  static constexpr int kRawStride = raw_stride(kChunkBytes);
  static constexpr int kATileBytes = Tile::kM * kWgStageK * 2, kBTileBytes = Tile::kN * kWgStageK * 2;
  static constexpr int kRawBytes = Tile::kN * kRawStride;
  static constexpr int kBSlots = Tile::kN == 128 ? 3 : 2, kRawSlots = 2;
  static constexpr int kBarrierBytes = 256, kAlignBytes = 1024;  // 2 x 9 barriers; the swizzle's alignment
  static constexpr int kASlots =
      std::min(4, (kSmemLimit - kAlignBytes - kBarrierBytes - kBSlots * kBTileBytes - kRawSlots * kRawBytes) /
                      kATileBytes);
  static constexpr bool kFits = kRawStride <= 256 && kASlots >= 2;
  static constexpr int kA = 0;
  static constexpr int kB = kA + kASlots * kATileBytes;
  static constexpr int kRaw = kB + kBSlots * kBTileBytes;
  static constexpr int kBarriers = kRaw + kRawSlots * kRawBytes;
  static constexpr int kBytes = kBarriers + kBarrierBytes + kAlignBytes;
  static_assert(!kFits || kBytes <= kSmemLimit, "the layout fits a Hopper CTA");
};

template <int N>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
// (both are warpgroup-wide: all 4 warps of a warpgroup execute them)
template <int N>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}

// A ring's mbarriers: full[i] and empty[i] of slot i; use u of the ring (u = 0, 1, ...) takes slot
// u % kSlots, and waits for full's phase u / kSlots (the consumer) or for empty's previous one (the
// producer: a fresh barrier counts as just completed, so the first kSlots uses do not wait).
template <int kSlots>
struct Ring {
  uint64_t* full;
  uint64_t* empty;
  // u counts a CTA's chunks or stages (at most K / 64 < 2^32): 32-bit division by a slot count that is
  // not a power of two is a multiply and a shift, 64-bit about fifteen instructions
  __device__ __forceinline__ int slot(int64_t u) const { return int(uint32_t(u) % kSlots); }
  __device__ __forceinline__ uint32_t parity(int64_t u) const { return (uint32_t(u) / kSlots) & 1; }
  __device__ __forceinline__ void wait_full(int64_t u) const { mbar_wait(&full[slot(u)], parity(u)); }
  __device__ __forceinline__ uint32_t wait_full_token(int64_t u) const {
    return mbar_wait_token(&full[slot(u)], parity(u));
  }
  __device__ __forceinline__ void wait_empty(int64_t u) const { mbar_wait(&empty[slot(u)], parity(u) ^ 1); }
};

// The copy warps of both Hopper kernels (this file's and qgemm_wgmma_regs.cuh's), one thread a ring so
// that neither waits for the other's ring to free a slot: copier 0 brings the CTA's raw weight chunks
// c0 .. c1 - 1 (n0's kN rows, each copy from the 16-byte boundary below the chunk: raw_stride),
// copier 1 their activation stages (m0's kM rows). Lay: the kernel's layout.
template <class T, class Lay>
__device__ __forceinline__ void copy_operands(int copier, uint8_t* smem, const Ring<Lay::kRawSlots>& rawring,
                                              const Ring<Lay::kASlots>& xring, const CUtensorMap* wmap,
                                              const CUtensorMap* xmap, int64_t c0, int64_t c1, int64_t n0,
                                              int64_t m0) {
  constexpr int kStagesPerChunk = kChunk / kWgStageK;
  if (copier == 0) {
    for (int64_t u = 0; u < c1 - c0; ++u) {
      rawring.wait_empty(u);
      tma_load_2d(smem + Lay::kRaw + rawring.slot(u) * Lay::kRawBytes, wmap,
                  raw_copy_start<T>(c0 + u), int(n0), &rawring.full[rawring.slot(u)],
                  Lay::kRawBytes);
    }
  } else {
    for (int64_t j = 0; j < (c1 - c0) * kStagesPerChunk; ++j) {
      xring.wait_empty(j);
      tma_load_2d(smem + Lay::kA + xring.slot(j) * Lay::kATileBytes, xmap, int((c0 * kStagesPerChunk + j) * kWgStageK),
                  int(m0), &xring.full[xring.slot(j)], Lay::kATileBytes);
    }
  }
}

// Values 64Q + 32h .. +31 of a row of a staged chunk (raw: the row's first byte of the chunk), as x's
// type: v[i] holds values 8i .. 8i+7 of the 32, the stage's 16-byte piece 4h + i. Every format's
// slices are 16 or 32 values and start at multiples of their size, so a half stage is whole slices.
// Computed into registers before the weight tile is free (the caller waits, then stores), so that
// the loads and arithmetic overlap the wait.
template <class T, class H, bool kExact, int Q, int h>
__device__ __forceinline__ void dequantize_half_stage(const uint8_t* raw, int valid_blocks, uint4 (&v)[4]) {
  constexpr int kW = T::kMmaWords, kSliceValues = 16 * kW;
  constexpr int kFirst = Q * kWgStageK + 32 * h, kLast = kFirst + 32;
#pragma unroll
  for (int blk = 0; blk < WeightChunk<T>::kBlocks; ++blk) {
#pragma unroll
    for (int item = 0; item < T::kMmaItems; ++item) {
      constexpr int kItemValues = T::kValues / T::kMmaItems;
      const int item_first = blk * T::kValues + item * kItemValues;
      if (item_first + kItemValues <= kFirst || item_first >= kLast) continue;
      typename T::MmaRaw rw[4];
      if constexpr (T::kBytes % 16 == 0) {  // the block in 16-byte loads, then the traits read registers
        uint4 buf[T::kBytes / 16];
#pragma unroll
        for (int i = 0; i < T::kBytes / 16; ++i) buf[i] = lds128(raw + blk * T::kBytes + 16 * i);
#pragma unroll
        for (int t = 0; t < 4; ++t) T::mma_load(reinterpret_cast<const uint8_t*>(buf), item, t, rw[t]);
      } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) T::mma_load(raw + blk * T::kBytes, item, t, rw[t]);
      }
#pragma unroll
      for (int s = 0; s < T::kMmaSlices; ++s) {
        const int first = blk * T::kValues + T::mma_slice_first(item, s);
        if (first < kFirst || first >= kLast) continue;
        MmaSlice<kW> sl[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) sl[t] = T::mma_slice(rw[t], s);
        const float2 dm = scale_entry<H, kExact>(sl[0].d, sl[0].m);
#pragma unroll
        for (int t = 0; t < 4; ++t) sl[t].d = dm.x, sl[t].m = dm.y;
        const bool in = blk < valid_blocks;
#pragma unroll
        for (int piece = 0; piece < kSliceValues / 8; ++piece) {
          // values 8 piece .. +7 of the slice: word piece / 2 of lanes 2 (piece % 2) and + 1
          const int w = piece / 2, ta = 2 * (piece % 2);
          uint4& out = v[(first - kFirst) / 8 + piece];
          out = make_uint4(0, 0, 0, 0);
          if (in) {
            out.x = fragment_pair<H, kExact>(sl[ta], w, 0);
            out.y = fragment_pair<H, kExact>(sl[ta], w, 2);
            out.z = fragment_pair<H, kExact>(sl[ta + 1], w, 0);
            out.w = fragment_pair<H, kExact>(sl[ta + 1], w, 2);
          }
        }
      }
    }
  }
}

// xmap: x [rows, k] in boxes of kWgStageK values x Tile::kM rows, 128-byte swizzle; wmap: the weight's
// bytes [n, row_bytes] in boxes of WgLayout::kRawStride bytes x Tile::kN rows (qgemm_wgmma.cu).
template <class T, class H, bool kExact, class Tile>
__global__ void __launch_bounds__(kWgThreads, 1)
    qgemm_wgmma_kernel(GemmArgs a, const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap) {
  using Lay = WgLayout<T, Tile>;
  using L = WeightChunk<T>;
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte aligned for the swizzle, kept a shared-memory pointer (plain loads and stores stay LDS/STS)
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Lay::kBarriers);
  const Ring<Lay::kASlots> xring{bars, bars + Lay::kASlots};
  const Ring<Lay::kBSlots> wring{bars + 2 * Lay::kASlots, bars + 2 * Lay::kASlots + Lay::kBSlots};
  const Ring<Lay::kRawSlots> rawring{bars + 2 * (Lay::kASlots + Lay::kBSlots),
                                     bars + 2 * (Lay::kASlots + Lay::kBSlots) + Lay::kRawSlots};
  const int64_t n0 = int64_t(blockIdx.x) * Tile::kN, m0 = int64_t(blockIdx.y) * Tile::kM;
  const int64_t chunks = (a.k + kChunk - 1) / kChunk, blocks = weight_row_blocks<T>(a.k);
  const int64_t c0 = int64_t(blockIdx.z) * a.chunks_per_split, c1 = std::min(chunks, c0 + a.chunks_per_split);
  constexpr int kStagesPerChunk = kChunk / kWgStageK;
  const int64_t stages = (c1 - c0) * kStagesPerChunk;
  if (threadIdx.x == 0) {
    for (int i = 0; i < Lay::kASlots; ++i) mbar_init(&xring.full[i], 1), mbar_init(&xring.empty[i], 2);
    for (int i = 0; i < Lay::kBSlots; ++i) mbar_init(&wring.full[i], 256), mbar_init(&wring.empty[i], 2);
    for (int i = 0; i < Lay::kRawSlots; ++i) mbar_init(&rawring.full[i], 1), mbar_init(&rawring.empty[i], 256);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (warp >= 16) {  // copies: warps 16 and 17, one thread each
    regs_dec<kCopyRegs>();
    if (warp < 18 && lane == 0) copy_operands<T, Lay>(warp - 16, smem, rawring, xring, &wmap, &xmap, c0, c1, n0, m0);
    return;
  }
  if (warp < 8) {  // dequantize: thread t takes weight row t % kN, half stages t / kN .. + kHalves - 1
    regs_dec<kDequantRegs>();
    const int r = threadIdx.x % Tile::kN, h0 = threadIdx.x / Tile::kN;
    for (int64_t u = 0; u < c1 - c0; ++u) {
      const int64_t c = c0 + u;
      // the token orders the loads after the wait
      const uint32_t token = rawring.wait_full_token(u);
      const uint8_t* raw = smem + Lay::kRaw + rawring.slot(u) * Lay::kRawBytes + r * Lay::kRawStride +
                           raw_chunk_lead<T>(c) + token;
      const int valid = int(std::min<int64_t>(L::kBlocks, blocks - c * L::kBlocks));
      const auto stage = [&](auto q) {
        constexpr int Q = decltype(q)::value;
        const int64_t j = u * kStagesPerChunk + Q;
        uint4 v[Tile::kHalves][4];
        if constexpr (Tile::kHalves == 2) {
          dequantize_half_stage<T, H, kExact, Q, 0>(raw, valid, v[0]);
          dequantize_half_stage<T, H, kExact, Q, 1>(raw, valid, v[1]);
        } else if (h0 == 0) {
          dequantize_half_stage<T, H, kExact, Q, 0>(raw, valid, v[0]);
        } else {
          dequantize_half_stage<T, H, kExact, Q, 1>(raw, valid, v[0]);
        }
        wring.wait_empty(j);
        uint8_t* ws = smem + Lay::kB + wring.slot(j) * Lay::kBTileBytes;
#pragma unroll
        for (int hh = 0; hh < Tile::kHalves; ++hh)
#pragma unroll
          for (int i = 0; i < 4; ++i) *reinterpret_cast<uint4*>(ws + swizzled(r, 4 * (h0 + hh) + i)) = v[hh][i];
        fence_proxy_async();  // the generic-proxy stores, before the async proxy (wgmma) reads them
        mbar_arrive(&wring.full[wring.slot(j)]);
      };
      stage(std::integral_constant<int, 0>{});
      stage(std::integral_constant<int, 1>{});
      stage(std::integral_constant<int, 2>{});
      stage(std::integral_constant<int, 3>{});
      mbar_arrive(&rawring.empty[rawring.slot(u)]);
    }
    return;
  }

  // consumers: warpgroup cw (warps 8-11, 12-15) takes activation rows cw kM/2 .. +kM/2 - 1 of the tile
  regs_inc<kMathRegs>();
  constexpr int kSubs = Tile::kSubM * Tile::kSubN;
  const int cw = (warp - 8) / 4, tid = threadIdx.x % 128;
  float acc[kSubs][64];
#pragma unroll
  for (int s = 0; s < kSubs; ++s)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[s][i] = 0.0f;
  for (int64_t j = 0; j < stages; ++j) {
    xring.wait_full(j);
    wring.wait_full(j);
    const uint32_t xa = smem_addr(smem + Lay::kA + xring.slot(j) * Lay::kATileBytes + cw * (Lay::kATileBytes / 2));
    const uint32_t wa = smem_addr(smem + Lay::kB + wring.slot(j) * Lay::kBTileBytes);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kWgStageK / 16; ++kk)
#pragma unroll
      for (int s = 0; s < kSubs; ++s) {  // 64 activation rows x 128 weight rows: 8 KiB and 16 KiB into the tiles
        const int sm = s / Tile::kSubN, sn = s % Tile::kSubN;
        wgmma_64x128x16<H>(acc[s], tile_descriptor(xa + sm * 8192 + 32 * kk),
                           tile_descriptor(wa + sn * 16384 + 32 * kk));
      }
    wgmma_commit();
    wgmma_wait<1>();  // the step before has finished reading its tiles: free them
    if (j > 0 && tid == 0) mbar_arrive(&xring.empty[xring.slot(j - 1)]), mbar_arrive(&wring.empty[wring.slot(j - 1)]);
  }
  wgmma_wait<0>();

  // accumulator i of warp w's thread `lane`: row 16 w + lane / 4 + 8 (i / 2 % 2),
  // column 8 (i / 4) + 2 (lane % 4) + i % 2
  constexpr FloatType kOut = std::is_same_v<H, __nv_bfloat16> ? FloatType::BF16 : FloatType::F16;
  const int cwarp = tid / 32;
  const bool pairs = a.n % 2 == 0;  // columns col, col + 1 (col even) as one 4- or 8-byte store
#pragma unroll
  for (int s = 0; s < kSubs; ++s)
#pragma unroll
    for (int jj = 0; jj < 16; ++jj)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int sm = s / Tile::kSubN, sn = s % Tile::kSubN;
        const int64_t row = m0 + cw * (Tile::kM / 2) + 64 * sm + 16 * cwarp + lane / 4 + 8 * i;
        const int64_t col = n0 + 128 * sn + 8 * jj + 2 * (lane % 4);
        if (row >= a.rows || col >= a.n) continue;
        const float v0 = acc[s][4 * jj + 2 * i], v1 = acc[s][4 * jj + 2 * i + 1];
        if (gridDim.z > 1) {
          float* p = a.partial + (int64_t(blockIdx.z) * a.rows + row) * a.n + col;
          if (pairs) {
            *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
          } else {
            p[0] = v0;
            if (col + 1 < a.n) p[1] = v1;
          }
        } else if (pairs) {
          *reinterpret_cast<uint32_t*>(static_cast<H*>(a.out) + row * a.n + col) = pack_pair<H>(v0, v1);
        } else {
          store_float(a.out, row * a.n + col, kOut, v0);
          if (col + 1 < a.n) store_float(a.out, row * a.n + col + 1, kOut, v1);
        }
      }
}

}  // namespace
}  // namespace torchext::qgemm
