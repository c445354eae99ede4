// QuantTraits of the grid-based imatrix formats (block layouts: blocks.h). Part of quant_traits.h,
// which includes this file after its helpers (dp4a, load_u32, MmaSlice, FormatTraits) and before the
// format visit; include quant_traits.h, not this file.
//
// A sub-block of 32 values decodes to 8 words of 4 signed bytes q (grid value times sign; IQ1: 8 times
// the grid value plus the delta's sign) and a float scale d per 16 or 32 values, so that x = d * q. Every
// such product is exact in fp32: fp16 d has 11 significant bits, the sub-block scale's odd factor
// (2 ls + 1) at most 5 and |q| at most 6, 22 in all (the factors 1/2, 1/4, 1/8 are exponents). So x has
// the bits of gguf's db * grid * sign whatever the order of rounding (and the tiled GEMM's fmaf(d, q, 0)
// too), and the integer dot products and MMA fragments take q as they take any int8 quant.
#pragma once

#include <cstddef>
#include <type_traits>

#include "kernels/iq_grids.h"

namespace torchext {

// ---- the grid and sign tables (kernels/iq_grids.h, generated from gguf) ----
// Host code reads constexpr arrays. Device code reads copies in global memory through the read-only
// cache: each lane looks up its own grid point, and __constant__ memory serializes a warp's
// different addresses (as llama.cpp's CUDA backend, global tables). `static __device__`: each CUDA
// translation unit has its own copy, as whole-program (non-rdc) compilation requires.
//
// A translation unit that defines TORCHEXT_IQ_GRIDS_IN_SHARED before including quant_traits.h (the
// GEMVs) reads the grids from copies in shared memory instead, which each of its kernels fills first
// (stage_iq_grid<T>, below). A warp's 32 lookups from global memory touch up to 32 cache lines of
// the 1-16 KB grid: the DP4A GEMV's lookups read 12 sectors a request, and its warps stalled on them
// (H200, ncu, 4096x14336 IQ2_XS batch 1: 10.3 M sectors for 0.84 M requests, 92.8% L1 hits, 6.5
// cycles of long-scoreboard stall per issued instruction). The 128-byte sign table stays global.
#if defined(__CUDACC__)
#define TORCHEXT_IQ_TABLE(type, name, values)   \
  inline constexpr type name##_host[] = {values}; \
  static __device__ const type name##_device[] = {values};
#else
#define TORCHEXT_IQ_TABLE(type, name, values) inline constexpr type name##_host[] = {values};
#endif
#if defined(__CUDA_ARCH__)
#define TORCHEXT_IQ_READ(name, i) __ldg(&name##_device[i])
#else
#define TORCHEXT_IQ_READ(name, i) name##_host[i]
#endif
#if defined(__CUDACC__) && defined(TORCHEXT_IQ_GRIDS_IN_SHARED)
#define TORCHEXT_IQ_SHARED_GRID(type, name) \
  static __shared__ type name##_shared[sizeof(name##_host) / sizeof(type)];
#else
#define TORCHEXT_IQ_SHARED_GRID(type, name)
#endif
#if defined(__CUDA_ARCH__) && defined(TORCHEXT_IQ_GRIDS_IN_SHARED)
#define TORCHEXT_IQ_GRID_READ(name, i) name##_shared[i]
#else
#define TORCHEXT_IQ_GRID_READ(name, i) TORCHEXT_IQ_READ(name, i)
#endif

TORCHEXT_IQ_TABLE(uint64_t, iq2xxs_grid, TORCHEXT_IQ2XXS_GRID)
TORCHEXT_IQ_TABLE(uint64_t, iq2xs_grid, TORCHEXT_IQ2XS_GRID)
TORCHEXT_IQ_TABLE(uint64_t, iq2s_grid, TORCHEXT_IQ2S_GRID)
TORCHEXT_IQ_TABLE(uint32_t, iq3xxs_grid, TORCHEXT_IQ3XXS_GRID)
TORCHEXT_IQ_TABLE(uint32_t, iq3s_grid, TORCHEXT_IQ3S_GRID)
TORCHEXT_IQ_TABLE(uint64_t, iq1s_grid, TORCHEXT_IQ1S_GRID)
TORCHEXT_IQ_TABLE(uint8_t, iq2_signs, TORCHEXT_IQ2_SIGNS)
TORCHEXT_IQ_SHARED_GRID(uint64_t, iq2xxs_grid)
TORCHEXT_IQ_SHARED_GRID(uint64_t, iq2xs_grid)
TORCHEXT_IQ_SHARED_GRID(uint32_t, iq3xxs_grid)
TORCHEXT_IQ_SHARED_GRID(uint32_t, iq3s_grid)
TORCHEXT_IQ_SHARED_GRID(uint64_t, iq1s_grid)
#undef TORCHEXT_IQ_SHARED_GRID
#undef TORCHEXT_IQ_TABLE

// A Grid struct's table (one line in each): its size, and where TORCHEXT_IQ_GRIDS_IN_SHARED is
// defined, stage_grid(), which copies it into shared memory (every thread of the CTA takes part).
#if defined(__CUDACC__) && defined(TORCHEXT_IQ_GRIDS_IN_SHARED)
#define TORCHEXT_IQ_GRID_OF(name)                                     \
  static constexpr size_t kGridBytes = sizeof(name##_host);           \
  static __device__ __forceinline__ void stage_grid() {               \
    constexpr unsigned kPoints = sizeof(name##_host) / sizeof(name##_host[0]); \
    for (unsigned i = threadIdx.x; i < kPoints; i += blockDim.x) name##_shared[i] = name##_device[i]; \
  }
#else
#define TORCHEXT_IQ_GRID_OF(name) static constexpr size_t kGridBytes = sizeof(name##_host);
#endif

// Signs from bits: 4 values (bytes of g, each 1..127) made negative where bit i of `bits` is set:
// (g ^ 0xFF) + 1 = -g per byte, with no carry between bytes since g > 0.
TORCHEXT_HD uint32_t apply_signs(uint32_t g, uint32_t bits) {
  const uint32_t ones = ((bits & 0xFu) * 0x00204081u) & 0x01010101u;  // bit i -> bit 8i
  return (g ^ (ones * 0xFFu)) + ones;
}

// w[1] if `second`, else w[0], by a select: the MMA GEMV's quad index is the lane's t, not known at
// compile time, and indexing a register array with it would move the array to local memory.
TORCHEXT_HD uint32_t pick_word(const uint32_t (&w)[2], bool second) { return second ? w[1] : w[0]; }

// Quad i's half of an 8-value grid point (values 8(i/2) .. of the sub-block): its low word for even i.
TORCHEXT_HD uint32_t point_half(uint64_t point, int i) { return uint32_t(point >> (32 * (i % 2))); }

// The 4 sign bits of quad i from a word of four 7-bit sign-pattern indexes (IQ2_XXS, IQ3_XXS): pattern
// i / 2 covers 8 values, the quad its low or high half.
TORCHEXT_HD uint32_t pattern_signs(uint32_t patterns, int i) {
  return uint32_t(TORCHEXT_IQ_READ(iq2_signs, (patterns >> (7 * (i / 2))) & 0x7Fu)) >> (4 * (i % 2));
}

// Loads a sub-block and decodes it: the QuantTraits interface from a format's Grid, which supplies
//   Raw                      the bytes of sub-block j that decoding reads (loaded into registers)
//   load(p, j, raw)          their loads, and nothing else (the MMA GEMV issues loads before any use)
//   quad(raw, i)             values 4i .. 4i+3 of the sub-block as signed bytes
//   scale(raw, h)            d of values 16h .. 16h+15 (kScaleValues 16) or of all 32 (h = 0)
//   kQuantMax                the largest |q| a quad holds
template <class Grid>
struct GridTraits : UnpackedChunks<GridTraits<Grid>> {
  using block = typename Grid::block;
  static constexpr int kValues = 256;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = Grid::kAlign;
  static constexpr int kItems = 8;  // item j: sub-block j, one Q8_1 block
  static constexpr bool kHalfScales = Grid::kScaleValues == 16;
  static constexpr size_t kGridBytes = Grid::kGridBytes;
#if defined(__CUDACC__) && defined(TORCHEXT_IQ_GRIDS_IN_SHARED)
  static __device__ __forceinline__ void stage_grid() { Grid::stage_grid(); }
#endif

  // Sub-block j as words q[i] (values 4i .. 4i+3) and the scales of its halves (UnpackedChunks).
  static TORCHEXT_HD void unpack(const uint8_t* p, int j, uint32_t (&q)[8], float (&d)[2]) {
    typename Grid::Raw r;
    Grid::load(p, j, r);
    TORCHEXT_UNROLL
    for (int i = 0; i < 8; ++i) q[i] = Grid::quad(r, i);
    d[0] = Grid::scale(r, 0);
    d[1] = kHalfScales ? Grid::scale(r, 1) : d[0];
  }

  // MMA item j: sub-block j, one 32-value slice, or two 16-value ones where scales cover 16 values.
  // Lane t's words are quads t and 4 + t (32-value slice) or 4s + t (16-value slice s), so MmaRaw
  // keeps t for mma_slice.
  static constexpr int kMmaItems = 8, kMmaSlices = kHalfScales ? 2 : 1, kMmaWords = kHalfScales ? 1 : 2;
  static constexpr bool kMmaMins = false;  // signed grid values times a scale: no min
  static constexpr int kMmaQuantMax = Grid::kQuantMax;
  struct MmaRaw {
    typename Grid::Raw raw;
    int t;
  };
  static TORCHEXT_HD int mma_slice_first(int j, int s) { return 32 * j + 16 * s; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int j, int t, MmaRaw& r) {
    Grid::load(p, j, r.raw);
    r.t = t;
  }
  static TORCHEXT_HD MmaSlice<kMmaWords> mma_slice(const MmaRaw& r, int s) {
    MmaSlice<kMmaWords> out;
    if constexpr (kHalfScales) {
      out.q[0] = Grid::quad(r.raw, 4 * s + r.t);
    } else {
      out.q[0] = Grid::quad(r.raw, r.t);
      out.q[1] = Grid::quad(r.raw, 4 + r.t);
    }
    out.d = Grid::scale(r.raw, s);
    out.m = 0.0f;
    return out;
  }
};

#if defined(__CUDACC__) && defined(TORCHEXT_IQ_GRIDS_IN_SHARED)
template <class T, class = void>
struct HasGrid : std::false_type {};
template <class T>
struct HasGrid<T, std::void_t<decltype(T::kGridBytes)>> : std::true_type {};

// The static shared memory that stage_iq_grid<T> fills: the grid of format T, none for the others
// (and IQ2_S, whose grid stays global).
template <class T>
constexpr size_t shared_grid_bytes() {
  if constexpr (HasGrid<T>::value) return T::kGridBytes;
  return 0;
}

// Called by every thread of the CTA before any decoding: format T's grid (if it has one) copied
// into shared memory. It reads only the tables, so a kernel may call it before waiting for the
// kernels it depends on.
template <class T>
__device__ __forceinline__ void stage_iq_grid() {
  if constexpr (shared_grid_bytes<T>() > 0) {
    T::stage_grid();
    __syncthreads();
  }
}
#endif

// ---------------------------------------------------------------- IQ2_XXS, IQ2_XS, IQ2_S
// 8-value grid points of 8, 25, 43. IQ2_XXS: sub-block j is qs[4j .. 4j+3] as two words (4 point
// indexes; 4 sign-pattern indexes and ls), d = fp16 d * (0.5 + ls) / 4.
struct IQ2XXSGrid {
  TORCHEXT_IQ_GRID_OF(iq2xxs_grid)
  using block = block_iq2_xxs;
  static constexpr int kAlign = 2;  // 66-byte blocks
  static constexpr int kScaleValues = 32;
  static constexpr int kQuantMax = 43;
  struct Raw {
    uint32_t points, signs_scale;
    fp16_bits d;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    const uint8_t* q = reinterpret_cast<const uint8_t*>(b.qs + 4 * j);
    r.points = load_u32<kAlign>(q);
    r.signs_scale = load_u32<kAlign>(q + 4);
    r.d = b.d;
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const uint64_t point = TORCHEXT_IQ_GRID_READ(iq2xxs_grid, (r.points >> (8 * (i / 2))) & 0xFFu);
    return apply_signs(point_half(point, i), pattern_signs(r.signs_scale, i));
  }
  static TORCHEXT_HD float scale(const Raw& r, int) { return fp16f(r.d) * (0.5f + float(r.signs_scale >> 28)) * 0.25f; }
};
template <> struct QuantTraits<QType::IQ2_XXS> : FormatTraits<QType::IQ2_XXS, GridTraits<IQ2XXSGrid>> {};

// d of half h of an IQ2_XS / IQ2_S sub-block: fp16 d * (0.5 + ls) / 4, ls nibble h of its scale byte.
TORCHEXT_HD float iq2_half_scale(fp16_bits d, uint8_t scales, int h) {
  return fp16f(d) * (0.5f + float((scales >> (4 * h)) & 0xF)) * 0.25f;
}

// IQ2_XS: qs[4j + g] = point index (9 bits) | sign-pattern index << 9 for values 8g .. 8g+7.
struct IQ2XSGrid {
  TORCHEXT_IQ_GRID_OF(iq2xs_grid)
  using block = block_iq2_xs;
  static constexpr int kAlign = 2;  // 74-byte blocks
  static constexpr int kScaleValues = 16;
  static constexpr int kQuantMax = 43;
  struct Raw {
    uint32_t codes[2];
    uint8_t scales;
    fp16_bits d;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    const uint8_t* q = reinterpret_cast<const uint8_t*>(b.qs + 4 * j);
    r.codes[0] = load_u32<kAlign>(q);
    r.codes[1] = load_u32<kAlign>(q + 4);
    r.scales = b.scales[j];
    r.d = b.d;
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const uint32_t code = (pick_word(r.codes, i >= 4) >> (16 * ((i / 2) % 2))) & 0xFFFFu;
    const uint32_t signs = uint32_t(TORCHEXT_IQ_READ(iq2_signs, code >> 9)) >> (4 * (i % 2));
    return apply_signs(point_half(TORCHEXT_IQ_GRID_READ(iq2xs_grid, code & 0x1FFu), i), signs);
  }
  static TORCHEXT_HD float scale(const Raw& r, int h) { return iq2_half_scale(r.d, r.scales, h); }
};
template <> struct QuantTraits<QType::IQ2_XS> : FormatTraits<QType::IQ2_XS, GridTraits<IQ2XSGrid>> {};

// IQ2_S: point index qs[4j + g] | bits 2g, 2g+1 of qh[j] << 8 (10 bits), signs[4j + g] its 8 signs.
struct IQ2SGrid {
  // Its grid stays in global memory: in shared memory the 1-row DP4A GEMV took 40 registers instead
  // of 32 (3 CTAs an SM instead of 4) and 26.3 us instead of 21.6 (H200, 4096x14336, L2 cold).
  static constexpr size_t kGridBytes = 0;
  using block = block_iq2_s;
  static constexpr int kAlign = 2;  // 82-byte blocks
  static constexpr int kScaleValues = 16;
  static constexpr int kQuantMax = 43;
  struct Raw {
    uint32_t points, signs;
    uint8_t qh, scales;
    fp16_bits d;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.points = load_u32<kAlign>(b.qs + 4 * j);
    r.signs = load_u32<kAlign>(b.signs + 4 * j);
    r.qh = b.qh[j];
    r.scales = b.scales[j];
    r.d = b.d;
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const int g = i / 2;
    const uint32_t index = ((r.points >> (8 * g)) & 0xFFu) | (uint32_t(r.qh >> (2 * g)) & 3u) << 8;
    return apply_signs(point_half(TORCHEXT_IQ_READ(iq2s_grid, index), i), r.signs >> (4 * i));
  }
  static TORCHEXT_HD float scale(const Raw& r, int h) { return iq2_half_scale(r.d, r.scales, h); }
};
template <> struct QuantTraits<QType::IQ2_S> : FormatTraits<QType::IQ2_S, GridTraits<IQ2SGrid>> {};

// ---------------------------------------------------------------- IQ3_XXS
// Quad i of sub-block j: grid point qs[8j + i]; signs and ls from the word signs_scales[4j ..];
// d = fp16 d * (0.5 + ls) / 2.
struct IQ3XXSGrid {
  TORCHEXT_IQ_GRID_OF(iq3xxs_grid)
  using block = block_iq3_xxs;
  static constexpr int kAlign = 2;  // 98-byte blocks
  static constexpr int kScaleValues = 32;
  static constexpr int kQuantMax = 62;
  struct Raw {
    uint32_t qs[2], signs_scale;
    fp16_bits d;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.qs[0] = load_u32<kAlign>(b.qs + 8 * j);
    r.qs[1] = load_u32<kAlign>(b.qs + 8 * j + 4);
    r.signs_scale = load_u32<kAlign>(b.signs_scales + 4 * j);
    r.d = b.d;
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const uint32_t grid = TORCHEXT_IQ_GRID_READ(iq3xxs_grid, (pick_word(r.qs, i >= 4) >> (8 * (i % 4))) & 0xFFu);
    return apply_signs(grid, pattern_signs(r.signs_scale, i));
  }
  static TORCHEXT_HD float scale(const Raw& r, int) { return fp16f(r.d) * (0.5f + float(r.signs_scale >> 28)) * 0.5f; }
};
template <> struct QuantTraits<QType::IQ3_XXS> : FormatTraits<QType::IQ3_XXS, GridTraits<IQ3XXSGrid>> {};

// ---------------------------------------------------------------- IQ3_S
// Quad i of sub-block j: grid point qs[8j + i] | (bit i of qh[j]) << 8, signs bits 4(i%2) .. of
// signs[4j + i/2]; d = fp16 d * (1 + 2 ls).
struct IQ3SGrid {
  TORCHEXT_IQ_GRID_OF(iq3s_grid)
  using block = block_iq3_s;
  static constexpr int kAlign = 2;  // 110-byte blocks
  static constexpr int kScaleValues = 32;
  static constexpr int kQuantMax = 15;
  struct Raw {
    uint32_t qs[2], signs;
    uint8_t qh, scales, shift;  // ls is bits shift .. shift+3 of scales
    fp16_bits d;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.qs[0] = load_u32<kAlign>(b.qs + 8 * j);
    r.qs[1] = load_u32<kAlign>(b.qs + 8 * j + 4);
    r.signs = load_u32<kAlign>(b.signs + 4 * j);
    r.qh = b.qh[j];
    r.scales = b.scales[j / 2];
    r.shift = uint8_t(4 * (j % 2));
    r.d = b.d;
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const uint32_t index = ((pick_word(r.qs, i >= 4) >> (8 * (i % 4))) & 0xFFu) | (uint32_t(r.qh >> i) & 1u) << 8;
    return apply_signs(TORCHEXT_IQ_GRID_READ(iq3s_grid, index), r.signs >> (4 * i));
  }
  static TORCHEXT_HD float scale(const Raw& r, int) {
    return fp16f(r.d) * float(1 + 2 * ((r.scales >> r.shift) & 0xF));
  }
};
template <> struct QuantTraits<QType::IQ3_S> : FormatTraits<QType::IQ3_S, GridTraits<IQ3SGrid>> {};

// ---------------------------------------------------------------- IQ1_S
// x = dl * (grid + delta), grid values -1, 0, 1 (stored + 1), delta = +-1/8 per sub-block (IQ1_S) or
// per 8 values (IQ1_M). Counted in eighths, q = 8 * grid +- 1 is an int8 (|q| <= 9) and d = dl / 8,
// exact: the slice form d * q with no offset, whatever the delta's granularity.

// Quad i's eighths from its half of an IQ1 grid point (bytes grid + 1): 8 * (grid + 1) + (7 or 9) - 16,
// the subtraction done on biased bytes (no borrow between bytes).
TORCHEXT_HD uint32_t iq1_eighths(uint64_t point, int i, bool negative_delta) {
  const uint32_t biased = (point_half(point, i) << 3) + (negative_delta ? 0x07070707u : 0x09090909u);
  return ((biased | 0x80808080u) - 0x10101010u) ^ 0x80808080u;
}

// Sub-block j: point indexes qs[4j + g] | bits 3g .. 3g+2 of qh[j] << 8; qh[j]'s bits 12-14 are ls
// (dl = fp16 d * (2 ls + 1)), bit 15 the delta's sign.
struct IQ1SGrid {
  TORCHEXT_IQ_GRID_OF(iq1s_grid)
  using block = block_iq1_s;
  static constexpr int kAlign = 2;  // 50-byte blocks
  static constexpr int kScaleValues = 32;
  static constexpr int kQuantMax = 9;
  struct Raw {
    uint32_t points;
    uint16_t qh;
    fp16_bits d;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.points = load_u32<kAlign>(b.qs + 4 * j);
    r.qh = b.qh[j];
    r.d = b.d;
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const int g = i / 2;
    const uint32_t index = ((r.points >> (8 * g)) & 0xFFu) | ((uint32_t(r.qh) >> (3 * g)) & 7u) << 8;
    return iq1_eighths(TORCHEXT_IQ_GRID_READ(iq1s_grid, index), i, r.qh & 0x8000u);
  }
  static TORCHEXT_HD float scale(const Raw& r, int) { return fp16f(r.d) * float(2 * ((r.qh >> 12) & 7) + 1) * 0.125f; }
};
template <> struct QuantTraits<QType::IQ1_S> : FormatTraits<QType::IQ1_S, GridTraits<IQ1SGrid>> {};

// ---------------------------------------------------------------- IQ1_M
// Sub-block j: point indexes qs[4j + g] | (nibble g of qh[2j .. 2j+1]) & 7 << 8, the nibble's bit 3
// the delta's sign; 3-bit ls per 16 values (dl = d * (2 ls + 1)), fp16 d from the scale words' top
// nibbles.
struct IQ1MGrid {
  TORCHEXT_IQ_GRID_OF(iq1s_grid)
  using block = block_iq1_m;
  static constexpr int kAlign = 8;  // 56-byte blocks
  static constexpr int kScaleValues = 16;
  static constexpr int kQuantMax = 9;
  struct Raw {
    uint32_t points, scales[2];
    uint16_t qh;
    uint8_t j;
  };
  static TORCHEXT_HD void load(const uint8_t* p, int j, Raw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.points = load_u32<kAlign>(b.qs + 4 * j);
    r.qh = *reinterpret_cast<const uint16_t*>(b.qh + 2 * j);
    r.scales[0] = load_u32<kAlign>(reinterpret_cast<const uint8_t*>(b.scales));
    r.scales[1] = load_u32<kAlign>(reinterpret_cast<const uint8_t*>(b.scales) + 4);
    r.j = uint8_t(j);
  }
  static TORCHEXT_HD uint32_t quad(const Raw& r, int i) {
    const int g = i / 2;
    const uint32_t nibble = (uint32_t(r.qh) >> (4 * g)) & 0xFu;
    const uint32_t index = ((r.points >> (8 * g)) & 0xFFu) | (nibble & 7u) << 8;
    return iq1_eighths(TORCHEXT_IQ_GRID_READ(iq1s_grid, index), i, nibble & 8u);
  }
  static TORCHEXT_HD float scale(const Raw& r, int h) {
    const uint32_t w0 = r.scales[0], w1 = r.scales[1];  // scale words 0 | 1 << 16, 2 | 3 << 16
    const fp16_bits d =
        fp16_bits(((w0 >> 12) & 0xFu) | ((w0 >> 24) & 0xF0u) | ((w1 >> 4) & 0xF00u) | ((w1 >> 16) & 0xF000u));
    // ls of values 16h .. of sub-block j: bits 3(2(j % 2) + h) of scale word j / 2
    const int ls = (pick_word(r.scales, r.j >= 4) >> (16 * ((r.j / 2) % 2) + 3 * (2 * (r.j % 2) + h))) & 7;
    return fp16f(d) * float(2 * ls + 1) * 0.125f;
  }
};
template <> struct QuantTraits<QType::IQ1_M> : FormatTraits<QType::IQ1_M, GridTraits<IQ1MGrid>> {};

#undef TORCHEXT_IQ_GRID_OF
#undef TORCHEXT_IQ_GRID_READ
#undef TORCHEXT_IQ_READ

}  // namespace torchext
