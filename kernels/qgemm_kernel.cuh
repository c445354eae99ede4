// The tiled GEMM's kernel body and its launches (TiledGemm, qgemm_variants.cuh), included only by
// the three files that each instantiate one set: qgemm_bf16.cu, qgemm_bf16_exact.cu, qgemm_f16.cu.
// qgemm.cu's comment says how the kernel works.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "kernels/launch.cuh"
#include "kernels/qgemm_variants.cuh"
#include "kernels/quant_traits.h"

namespace torchext::qgemm {
namespace {


constexpr int kXStride = kChunk + 16;      // halves per staged activation row (see ChunkCopier)

// A chunk's weight bytes in one row, staged in shared memory. A row's chunk starts at any offset
// (210-byte Q6_K blocks, 18-byte Q4_0 blocks, 17-byte MXFP4 blocks at odd ones ...), so the copy is of
// the 16-byte aligned pieces that cover it, and a row's data starts `(offset % 16)` bytes into its slot
// (the traits then read it with loads of the block's own alignment). An odd number of 16-byte pieces
// per slot puts the 8 rows a warp reads at once in 8 different 4-bank groups.
template <class T>
struct WeightChunk {
  static_assert(kChunk % T::kValues == 0, "a chunk is whole blocks (32, 64 or 256 values)");
  static constexpr int kBlocks = kChunk / T::kValues;
  static constexpr int kBytes = kBlocks * T::kBytes;
  static constexpr int kPieces = (kBytes + 15 + 15) / 16;
  static constexpr int kStride = (kPieces | 1) * 16;
};

// The (d, m) of every slice of a chunk's weight rows, decoded by each warp for its own 32 rows
// (decode_scales) instead of by each of the 4 lanes that share a row. Rows kSlices + 1 float2 apart:
// the 8 rows a warp reads at once fall in different banks.
template <class T>
struct ScaleTable {
  static constexpr int kSlices = WeightChunk<T>::kBlocks * T::kMmaItems * T::kMmaSlices;
  static constexpr int kStride = kSlices + 1;
  static constexpr int kWarpBytes = 32 * kStride * int(sizeof(float2));
};

constexpr int kSmemLimit = 227 * 1024;  // shared memory a Hopper CTA may opt in to

// BM activation rows per CTA, all of them against each warp's 32 weight rows (WM = BM); two pipeline
// stages (more were measured slower: bench/NOTES.md).
template <int BM, int TN>
struct Tile {
  static constexpr int kBM = BM, kWM = BM, kStages = 2, kTileN = TN;
  static constexpr int kWarps = TN / 32;  // warps along N, 32 weight rows each
  static constexpr int kThreads = kWarps * kWarp;
  template <class T>
  static constexpr int stage_bytes() {
    return TN * WeightChunk<T>::kStride + BM * kXStride * 2;
  }
  template <class T>
  static constexpr int scale_table_offset() {
    return kStages * stage_bytes<T>();
  }
  template <class T>
  static constexpr int slot_table_offset() {
    return scale_table_offset<T>() + kWarps * ScaleTable<T>::kWarpBytes;
  }
  // All of the CTA's shared memory is this dynamic allocation (the grouped GEMM's slot table
  // included), so the width check against the device's opt-in limit counts every byte.
  template <class T>
  static constexpr int smem_bytes() {
    return slot_table_offset<T>() + BM * int(sizeof(int32_t));
  }
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The rows of a CTA's tile: its first weight row n0 (an output column), counted from w_row0 (an
// expert's first row in a qmatmul_id weight), and for each of its activation rows r the row of x
// it reads and the output row it writes (-1: none; zeros are read and nothing is stored).
// DenseTile: qmatmul's tile (blockIdx.x, blockIdx.y) of out [rows, n].
struct DenseTile {
  static constexpr int64_t w_row0 = 0;
  int64_t n0, m0, rows;
  __device__ __forceinline__ int64_t x_row(int r) const { return m0 + r < rows ? m0 + r : -1; }
  __device__ __forceinline__ int64_t out_row(int r) const { return x_row(r); }
};

// ExpertTile: BM slots routed to one expert (route_slots), kept in shared memory; slot s reads x's
// row s / x_divisor (1 when x holds a row per slot, else top_k) and writes output row s.
struct ExpertTile {
  int64_t n0, w_row0;
  const int32_t* slot;
  int64_t x_divisor;
  __device__ __forceinline__ int64_t x_row(int r) const { return slot[r] < 0 ? -1 : slot[r] / x_divisor; }
  __device__ __forceinline__ int64_t out_row(int r) const { return slot[r]; }
};

// What a CTA's tile is, from blockIdx. open() is called by every thread of the CTA and returns false
// (in all of them) for a CTA without a tile.
struct DenseTiles {
  using Tile = DenseTile;
  int64_t rows;
  template <int BM, int kTileN>
  __device__ __forceinline__ bool open(int32_t*, Tile& t) const {
    t = Tile{int64_t(blockIdx.x) * kTileN, int64_t(blockIdx.y) * BM, rows};
    return true;
  }
};

// qmatmul_id: blockIdx.x is a tile of route_slots' sorted slots (the grid is sized for the most
// tiles the ids can need; past the real ones tile_experts holds -1), blockIdx.y the weight rows.
struct ExpertTiles {
  using Tile = ExpertTile;
  const int32_t* sorted_slots;
  const int32_t* tile_experts;
  int64_t n, x_divisor;
  template <int BM, int kTileN>
  __device__ __forceinline__ bool open(int32_t* slot, Tile& t) const {
    const int64_t tile = blockIdx.x;
    const int64_t expert = tile_experts[tile];
    if (expert < 0) return false;
    for (int r = threadIdx.x; r < BM; r += blockDim.x) slot[r] = sorted_slots[tile * BM + r];
    __syncthreads();
    t = Tile{int64_t(blockIdx.y) * kTileN, expert * n, slot, x_divisor};
    return true;
  }
};

// Where chunk c of weight row `row` (of the n from w_row0) starts, in bytes from the weight's first:
// rows past n repeat row n-1 (computed but never stored). Its low 4 bits are where the row's data
// starts in its slot.
template <class T>
__device__ __forceinline__ int64_t chunk_start(const GemmArgs& a, int64_t w_row0, int64_t row, int64_t c) {
  return (w_row0 + (row < a.n ? row : a.n - 1)) * a.row_bytes + c * WeightChunk<T>::kBytes;
}

// Copies chunk c of the tile's weight rows (chunk_start) and of its activation rows to a stage (rows
// without one and values past k are zero-filled). Each thread copies the same pieces of every chunk,
// so where a format's chunk is a multiple of 16 bytes (a row's pieces then start at the same offset
// in every chunk) their addresses are worked out once per CTA, and a chunk costs an add and a
// cp.async a piece; elsewhere, and for the chunks that reach the weight's last bytes, every piece
// works out its row's offset and checks (copy_any). Consecutive threads copy consecutive pieces of
// a row, so a warp's copies stay coalesced.
template <class T, class H, int BM, int kThreads, int kTileN>
struct ChunkCopier {
  using L = WeightChunk<T>;
  static constexpr bool kHoisted = L::kBytes % 16 == 0;
  static constexpr int kXPieces = kChunk * 2 / 16;  // an activation row's
  static_assert(kThreads == kTileN && (BM * kXPieces) % kThreads == 0, "a thread per weight row, whole rows");

  static constexpr int kXRows = BM * kXPieces / kThreads;  // activation rows a thread copies from

  const uint8_t* src[kHoisted ? L::kPieces : 1];  // the thread's pieces of chunk 0 (kHoisted)
  int dst[kHoisted ? L::kPieces : 1];             // their offsets in the stage
  int64_t hoisted_chunks = 0;                     // chunks 0 .. hoisted_chunks - 1 take the hoisted copy
  const H* x_src[kXRows];                         // the thread's activation rows (null: none)

  template <class Tile>
  __device__ __forceinline__ ChunkCopier(const GemmArgs& a, const Tile& tile) {
#pragma unroll
    for (int j = 0; j < kXRows; ++j) {
      const int64_t row = tile.x_row(threadIdx.x / kXPieces + j * (kThreads / kXPieces));
      x_src[j] = row < 0 ? nullptr : static_cast<const H*>(a.x) + row * a.k + 8 * (threadIdx.x % kXPieces);
    }
    if constexpr (kHoisted) {
#pragma unroll
      for (int j = 0; j < L::kPieces; ++j) {  // kTileN x kPieces pieces over kTileN threads
        const int i = threadIdx.x + j * kThreads, r = i / L::kPieces, p = i % L::kPieces;
        src[j] = a.w + (chunk_start<T>(a, tile.w_row0, tile.n0 + r, 0) & ~int64_t(15)) + 16 * p;
        dst[j] = r * L::kStride + 16 * p;
      }
      // The tile's last row starts latest: chunks whose pieces of it end inside the weight are safe.
      const int64_t last = chunk_start<T>(a, tile.w_row0, tile.n0 + kTileN - 1, 0) & ~int64_t(15);
      const int64_t room = a.w_bytes - last - 16 * L::kPieces;
      hoisted_chunks = room < 0 ? 0 : room / L::kBytes + 1;
    }
  }

  template <class Tile>
  __device__ __forceinline__ void copy(const GemmArgs& a, const Tile& tile, int64_t c, uint8_t* ws, H* xs) const {
    if (kHoisted && c < hoisted_chunks) {
      const int64_t offset = c * L::kBytes;
#pragma unroll
      for (int j = 0; j < L::kPieces; ++j) cp_async_16(ws + dst[j], src[j] + offset, 16);
    } else {
      copy_any(a, tile, c, ws);
    }
    // Rows of kXStride halves: 544 bytes, 8 banks apart, so the 16 lanes of a half-warp's 8-byte loads
    // (4 rows x 4 lanes, 8 bytes each) cover the 32 banks once. Lane l takes the piece at value 8l.
    const int p = threadIdx.x % kXPieces;
    const bool col_in = c * kChunk + 8 * p < a.k;  // k % 8 == 0: a piece is wholly in or out
#pragma unroll
    for (int j = 0; j < kXRows; ++j) {
      const int r = threadIdx.x / kXPieces + j * (kThreads / kXPieces);
      const bool in = col_in && x_src[j] != nullptr;
      cp_async_16(xs + r * kXStride + 8 * p, in ? x_src[j] + c * kChunk : a.x, in ? 16 : 0);
    }
  }

  // The weight pieces, each from its row's chunk_start, with the checks for the weight's end.
  template <class Tile>
  __device__ __forceinline__ static void copy_any(const GemmArgs& a, const Tile& tile, int64_t c, uint8_t* ws) {
    for (int i = threadIdx.x; i < kTileN * L::kPieces; i += kThreads) {
      const int r = i / L::kPieces, p = i % L::kPieces;
      const int64_t off = (chunk_start<T>(a, tile.w_row0, tile.n0 + r, c) & ~int64_t(15)) + 16 * p;
      const int64_t left = a.w_bytes - off;  // the last pieces may run past the weight's end
      uint8_t* dst_piece = ws + r * L::kStride + 16 * p;
      if (left >= 16) {
        cp_async_16(dst_piece, a.w + off, 16);
      } else if (left <= 0) {
        cp_async_16(dst_piece, a.w, 0);  // zero-fill, nothing read
      } else {
        // The weight's last 1 to 15 bytes: copied here a byte at a time (MXFP4's 17-byte blocks leave an
        // odd count), since a 16-byte cp.async names 16 bytes even when told to read fewer
        // (compute-sanitizer flags the rest).
        const uint8_t* from = a.w + off;
        for (int b = 0; b < 16; ++b) dst_piece[b] = b < left ? from[b] : uint8_t(0);
      }
    }
  }
};

template <class H>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<H, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Values j and j+1 of word w of a slice, as d * q + m rounded to H. The signed byte q becomes a float
// through its bits: 0x4B0000uu is 2^23 + uu, with uu = q + 128.
template <class H, int W>
__device__ __forceinline__ uint32_t slice_pair(const MmaSlice<W>& s, int w, int j) {
  const uint32_t biased = s.q[w] ^ 0x80808080u;
  const float q0 = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540 + j)) - 8388736.0f;
  const float q1 = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7541 + j)) - 8388736.0f;
  return pack_pair<H>(fmaf(s.d, q0, s.m), fmaf(s.d, q1, s.m));
}

// a * b + c for both bf16 halves of the words, each rounded once.
__device__ __forceinline__ uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r = 0;
#if __CUDA_ARCH__ >= 800
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
#else
  __trap();
#endif
  return r;
}

// Values j and j+1 of slice word q as bf16, computed in bf16: d2 and m2 hold d and m rounded to bf16
// (in both halves), q becomes exact in bf16 through its bits, and one fma rounds d2 * q + m2. Under
// the exponent of 2^7 a byte b below 128 reads as 2^7 + b, so b = q + 64 (q's low 7 bits with bit 6
// flipped) for |q| <= 63 (kComputesInBf16); subtracting the bias is exact. 3.5 instructions a pair (half a
// LOP3, a PRMT, two FMAs) where slice_pair takes 7.5.
__device__ __forceinline__ uint32_t packed_pair(uint32_t q, uint32_t d2, uint32_t m2, int j) {
  constexpr uint32_t kOne = 0x3F803F80u, kMinusBias = 0xC340C340u;  // 1, -(2^7 + 64)
  const uint32_t b = (q & 0x7F7F7F7Fu) ^ 0x40404040u;
  const uint32_t v = __byte_perm(b, 0x43434343u, j == 0 ? 0x4140 : 0x4342);
  return fma_bf16x2(fma_bf16x2(v, kOne, kMinusBias), d2, m2);
}

// A scale table entry: (d, m) as fp32 for slice_pair, or each rounded to bf16 in both halves of a
// word for packed_pair.
template <class H, bool kExact>
__device__ __forceinline__ float2 scale_entry(float d, float m) {
  if constexpr (kExact) return make_float2(d, m);
  else return make_float2(__uint_as_float(pack_pair<H>(d, d)), __uint_as_float(pack_pair<H>(m, m)));
}

// Values j and j+1 of word w of slice s, whose d and m are the table's entry.
template <class H, bool kExact, int W>
__device__ __forceinline__ uint32_t fragment_pair(const MmaSlice<W>& s, int w, int j) {
  if constexpr (kExact) return slice_pair<H>(s, w, j);
  else return packed_pair(s.q[w], __float_as_uint(s.d), __float_as_uint(s.m), j);
}

// c += a * b: 16 weight rows x 16 values (a) times 16 values x 8 activation rows (b), fp32 sums.
template <class H>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint2 b) {
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<H, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
#else
  __trap();  // qgemm_supports sends only compute capability 8.0 and newer here
#endif
}

// Fills a warp's scale table from a staged chunk: lane l decodes the slices of (row, block, item)
// units l, l + 32, ... of the warp's 32 rows.
template <class T, class H, bool kExact>
__device__ __forceinline__ void decode_scales(const uint8_t* ws, const GemmArgs& a, int64_t w_row0, int64_t n0,
                                              int64_t c, int blocks, int lane, float2* table) {
  using L = WeightChunk<T>;
  constexpr int kUnits = L::kBlocks * T::kMmaItems;
#pragma unroll
  for (int i = lane; i < 32 * kUnits; i += kWarp) {
    const int r = i / kUnits, u = i % kUnits, blk = u / T::kMmaItems, item = u % T::kMmaItems;
    if (blk >= blocks) continue;
    const uint8_t* p = ws + r * L::kStride + (chunk_start<T>(a, w_row0, n0 + r, c) & 15) + blk * T::kBytes;
    typename T::MmaRaw raw;
    T::mma_load(p, item, 0, raw);
#pragma unroll
    for (int s = 0; s < T::kMmaSlices; ++s) {
      const auto sl = T::mma_slice(raw, s);
      table[r * ScaleTable<T>::kStride + u * T::kMmaSlices + s] = scale_entry<H, kExact>(sl.d, sl.m);
    }
  }
}

// One staged chunk against this warp's WM activation rows. wrow[i]: the lane's weight row 8i + g of
// the warp's 32 (MMA tile i / 2, fragment rows g or g + 8); xs: its activation row g at value 4t.
// `blocks`: the chunk's weight blocks inside the row (fewer than kBlocks only at the last chunk of a
// format of 32 or 64 values a block).
template <class T, class H, bool kExact, int WM>
__device__ __forceinline__ void mma_chunk(const uint8_t* const (&wrow)[4], const float2* const (&scales)[4],
                                          const H* xs, int blocks, int t, float (&acc)[2][WM / 8][4]) {
  constexpr int kW = T::kMmaWords;
#pragma unroll
  for (int blk = 0; blk < WeightChunk<T>::kBlocks; ++blk) {
    if (blk >= blocks) break;
#pragma unroll
    for (int item = 0; item < T::kMmaItems; ++item) {
      typename T::MmaRaw raw[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) T::mma_load(wrow[i] + blk * T::kBytes, item, t, raw[i]);
#pragma unroll
      for (int s = 0; s < T::kMmaSlices; ++s) {
        const int unit = (blk * T::kMmaItems + item) * T::kMmaSlices + s;
        // the quants from the lane's registers (the compiler drops mma_slice's unused scale
        // arithmetic), d and m from the scale table
        MmaSlice<kW> sl[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sl[i] = T::mma_slice(raw[i], s);
          const float2 dm = scales[i][unit];
          sl[i].d = dm.x, sl[i].m = dm.y;
        }
        const int first = blk * T::kValues + T::mma_slice_first(item, s);
#pragma unroll
        for (int w = 0; w < kW; ++w) {  // one 16-value MMA step per slice word
          uint32_t a[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            a[mt][0] = fragment_pair<H, kExact>(sl[2 * mt], w, 0);
            a[mt][1] = fragment_pair<H, kExact>(sl[2 * mt + 1], w, 0);
            a[mt][2] = fragment_pair<H, kExact>(sl[2 * mt], w, 2);
            a[mt][3] = fragment_pair<H, kExact>(sl[2 * mt + 1], w, 2);
          }
          const H* xp = xs + first + 16 * w;
#pragma unroll
          for (int nt = 0; nt < WM / 8; ++nt) {
            const uint2 b = *reinterpret_cast<const uint2*>(xp + nt * 8 * kXStride);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) mma_16816<H>(acc[mt][nt], a[mt], b);
          }
        }
      }
    }
  }
}

template <class T, class H, bool kExact, class Cfg, class Tiles>
__global__ void __launch_bounds__(Cfg::kThreads, 1) qgemm_kernel(GemmArgs a, Tiles tiles) {
  using L = WeightChunk<T>;
  constexpr int BM = Cfg::kBM, WM = Cfg::kWM;
  constexpr int kStages = Cfg::kStages, kStageBytes = Cfg::template stage_bytes<T>(), kTileN = Cfg::kTileN;
  extern __shared__ int4 smem_vec[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_vec);
  const auto stage_w = [&](int s) { return smem + s * kStageBytes; };
  const auto stage_x = [&](int s) { return reinterpret_cast<H*>(smem + s * kStageBytes + kTileN * L::kStride); };

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int warp_n = warp;
  float2* table = reinterpret_cast<float2*>(smem + Cfg::template scale_table_offset<T>() +
                                            warp * ScaleTable<T>::kWarpBytes);
  int32_t* tile_slots = reinterpret_cast<int32_t*>(smem + Cfg::template slot_table_offset<T>());
  typename Tiles::Tile tile;
  if (!tiles.template open<BM, kTileN>(tile_slots, tile)) return;
  const int64_t n0 = tile.n0;
  const int64_t chunks = (a.k + kChunk - 1) / kChunk, blocks = weight_row_blocks<T>(a.k);
  const int64_t c0 = int64_t(blockIdx.z) * a.chunks_per_split, c1 = std::min(chunks, c0 + a.chunks_per_split);

  const ChunkCopier<T, H, BM, Cfg::kThreads, kTileN> copier(a, tile);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (c0 + s < c1) copier.copy(a, tile, c0 + s, stage_w(s), stage_x(s));
    cp_async_commit();
  }

  float acc[2][WM / 8][4] = {};
  for (int64_t c = c0; c < c1; ++c) {
    const int s = int((c - c0) % kStages);
    cp_async_wait<kStages - 2>();  // chunk c has landed
    __syncthreads();               // and every warp is done with the stage refilled next
    const int64_t next = c + kStages - 1;
    if (next < c1) {
      const int ns = int((next - c0) % kStages);
      copier.copy(a, tile, next, stage_w(ns), stage_x(ns));
    }
    cp_async_commit();

    const int valid = int(std::min<int64_t>(L::kBlocks, blocks - c * L::kBlocks));
    decode_scales<T, H, kExact>(stage_w(s) + 32 * warp_n * L::kStride, a, tile.w_row0, n0 + 32 * warp_n, c, valid,
                                lane, table);
    __syncwarp();

    const uint8_t* wrow[4];
    const float2* scales[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int local = 32 * warp_n + 8 * i + g;
      wrow[i] = stage_w(s) + local * L::kStride + (chunk_start<T>(a, tile.w_row0, n0 + local, c) & 15);
      scales[i] = table + (8 * i + g) * ScaleTable<T>::kStride;
    }
    const H* xs = stage_x(s) + g * kXStride + 4 * t;
    mma_chunk<T, H, kExact, WM>(wrow, scales, xs, valid, t, acc);
  }


  constexpr FloatType kOut = std::is_same_v<H, __nv_bfloat16> ? FloatType::BF16 : FloatType::F16;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < WM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t col = n0 + 32 * warp_n + 16 * mt + g + 8 * (e / 2);  // weight row: output column
        const int64_t row = tile.out_row(8 * nt + 2 * t + e % 2);          // activation row: output row
        if (col >= a.n || row < 0) continue;
        if (gridDim.z > 1)
          a.partial[(int64_t(blockIdx.z) * a.rows + row) * a.n + col] = acc[mt][nt][e];
        else
          store_float(a.out, row * a.n + col, kOut, acc[mt][nt][e]);
      }
}

// Calls f(Tile) for the tile that serves `rows` activation rows (up to kMaxTiledGemmRows): 256
// weight rows (8 warps) where two stages of them fit in the device's shared memory, else 128.
// Measured on the H200 (bench/NOTES.md, "Tile width"): at 64 rows the 256-row tile took Q4_K
// 4096x14336 from 60.7 to 45.8 us and Q6_K from 80.4 to 53.6 (14336x4096: within 5% either way);
// Q8_0, whose 64-row wide tile does not fit, gained at 17-32 rows (58.1 -> 40.4 us).
template <class T, int BM, class F>
void visit_width(int smem_optin, F&& f) {
  using Wide = Tile<BM, 256>;
  if constexpr (Wide::template smem_bytes<T>() <= kSmemLimit) {
    if (Wide::template smem_bytes<T>() <= smem_optin) return f(Wide{});
  }
  f(Tile<BM, 128>{});
}

template <class T, class F>
void visit_tile(int64_t rows, int device, F&& f) {
  int smem_optin = 0;
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (rows <= 32) visit_width<T, 32>(smem_optin, f);
  else visit_width<T, 64>(smem_optin, f);
}

// Kernel F's resident CTAs an SM on `device` (the current one) with its kSmem bytes of dynamic shared
// memory, opted in (kernel_facts: asked once per device); 0 when it cannot run there.
template <auto F, int kThreads, int kSmem>
int opt_in(int device) {
  const KernelFacts facts = kernel_facts<F, kThreads, kSmem>(device);
  return facts.err == cudaSuccess ? facts.ctas_per_sm : 0;
}

// One instantiation of the kernel: its shared memory, occupancy, plan and launch.
template <class T, class H, bool kExact, class Cfg>
struct Kernel {
  static constexpr auto fn = qgemm_kernel<T, H, kExact, Cfg, DenseTiles>;
  static constexpr auto fn_id = qgemm_kernel<T, H, kExact, Cfg, ExpertTiles>;
  static constexpr int smem = Cfg::template smem_bytes<T>();
  static_assert(smem <= kSmemLimit, "more shared memory than a Hopper CTA may have");

  static Plan plan(int64_t n, int64_t k, int64_t rows, int device) {
    return make_plan(n, k, rows, Cfg::kBM, Cfg::kTileN, opt_in<fn, Cfg::kThreads, smem>(device), device);
  }

  static cudaError_t launch(const GemmArgs& args, const Plan& p, cudaStream_t stream) {
    const dim3 grid(unsigned((args.n + Cfg::kTileN - 1) / Cfg::kTileN), unsigned((args.rows + Cfg::kBM - 1) / Cfg::kBM),
                    unsigned(p.splits));
    fn<<<grid, Cfg::kThreads, smem, stream>>>(args, DenseTiles{args.rows});
    return cudaGetLastError();
  }

  // qmatmul_id: one CTA per possible tile of routed slots and kTileN weight rows; no K split.
  static cudaError_t launch_id(const GemmArgs& args, const ExpertTiles& tiles, int64_t max_tiles, int device,
                               cudaStream_t stream) {
    if (opt_in<fn_id, Cfg::kThreads, smem>(device) == 0) return cudaErrorInvalidConfiguration;
    const dim3 grid(unsigned(max_tiles), unsigned((args.n + Cfg::kTileN - 1) / Cfg::kTileN));
    fn_id<<<grid, Cfg::kThreads, smem, stream>>>(args, tiles);
    return cudaGetLastError();
  }
};

}  // namespace

// ---- TiledGemm: one format visit per call, then the tile that serves the rows ----

template <class H, bool kExact>
Plan TiledGemm<H, kExact>::plan(QType wt, int64_t n, int64_t k, int64_t rows, int device) {
  Plan p{1, 0};
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    if constexpr (!kExact && !kComputesInBf16<T>) {
      p = TiledGemm<H, true>::plan(wt, n, k, rows, device);
    } else {
      visit_tile<T>(rows, device,
                    [&](auto tile) { p = Kernel<T, H, kExact, decltype(tile)>::plan(n, k, rows, device); });
    }
  });
  return p;
}

template <class H, bool kExact>
cudaError_t TiledGemm<H, kExact>::launch(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x,
                                         int64_t rows, const Plan& p, float* workspace, void* out, int device,
                                         cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    if constexpr (!kExact && !kComputesInBf16<T>) {
      err = TiledGemm<H, true>::launch(wt, w, n, k, x, rows, p, workspace, out, device, stream);
    } else {
      const int64_t row_bytes = weight_row_bytes<T>(k);
      const GemmArgs args{w, n, k, row_bytes, row_bytes * n, x, rows, p.chunks_per_split, workspace, out};
      visit_tile<T>(rows, device,
                    [&](auto tile) { err = Kernel<T, H, kExact, decltype(tile)>::launch(args, p, stream); });
    }
  });
  return err;
}

template <class H, bool kExact>
cudaError_t TiledGemm<H, kExact>::launch_id(QType wt, const uint8_t* w, int64_t n, int64_t k, const void* x,
                                            const ExpertSlots& slots, int tile_rows, int64_t max_tiles,
                                            const int32_t* sorted_slots, const int32_t* tile_experts, void* out,
                                            int device, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    if constexpr (!kExact && !kComputesInBf16<T>) {
      err = TiledGemm<H, true>::launch_id(wt, w, n, k, x, slots, tile_rows, max_tiles, sorted_slots, tile_experts, out,
                                          device, stream);
    } else {
      const int64_t row_bytes = weight_row_bytes<T>(k);
      const int64_t chunks = (k + kChunk - 1) / kChunk;  // one split: all of K
      const GemmArgs args{w, n, k, row_bytes, row_bytes * n * slots.experts, x, slots.count, chunks, nullptr, out};
      const ExpertTiles tiles{sorted_slots, tile_experts, n, slots.x_per_slot ? 1 : slots.top_k};
      visit_tile<T>(tile_rows, device, [&](auto tile) {
        err = Kernel<T, H, kExact, decltype(tile)>::launch_id(args, tiles, max_tiles, device, stream);
      });
    }
  });
  return err;
}

}  // namespace torchext::qgemm
