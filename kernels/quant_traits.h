// Per-format constants and arithmetic, chosen at compile time by the format's traits.
//
// Every format exposes the same three things, used by the CPU kernels and the CUDA
// kernels alike, so that both compute the same function:
//   dequantize_chunk(blk, c, out)   the 32 contiguous values 32c .. 32c+31 of a block, as float
//   dot_item<B>(blk, t, x, acc)     item t of kItems in a block (a group of values that suits the
//                                   bit layout) against B rows of Q8_1 activations x (q8_1_rows.h):
//                                   integer DP4A dot products scaled in fp32, added to acc[0..B)
//   mma_load(blk, i, t, raw)        lane t of a quad's loads for item i of kMmaItems, and
//   mma_slice(raw, s)               slice s of kMmaSlices from them, as an int8 MMA fragment
//                                   (MmaSlice below; the tensor-core GEMV, CUDA only)
#pragma once

#include <cstddef>

#include "kernels/blocks.h"
#include "kernels/q8_1_rows.h"

namespace torchext {

// ---- small integer helpers, identical on host and device ----

// Sum of the four signed-byte products of a and b, plus c.
TORCHEXT_HD int dp4a(int a, int b, int c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(a, b, c);
#else
  TORCHEXT_UNROLL
  for (int i = 0; i < 4; ++i) c += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return c;
#endif
}

// A 32-bit word from memory that is at least `Align`-byte aligned (the block's alignment:
// Q4_K/Q5_K blocks keep 16-byte alignment, Q6_K and several 32-value formats only 2, MXFP4's
// 17-byte blocks 1). Only the word's own 4 bytes are read, whatever the alignment: a wider aligned
// load around them could run past the end of the weight.
template <int Align>
TORCHEXT_HD uint32_t load_u32(const uint8_t* p) {
  if constexpr (Align >= 4) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (Align >= 2) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return uint32_t(h[0]) | (uint32_t(h[1]) << 16);
  } else {
    return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
  }
}

// 16 bytes at a 16-byte aligned address, as four words (one vector load on the GPU).
TORCHEXT_HD void load_16_bytes(const uint8_t* p, uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__)
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
#else
  std::memcpy(w, p, 16);
#endif
}

// Bits s .. s+31 of the 64-bit value hi:lo, 0 <= s <= 32: one funnel shift on the GPU.
TORCHEXT_HD uint32_t funnel_right(uint32_t lo, uint32_t hi, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_rc(lo, hi, s);
#else
  return uint32_t(((uint64_t(hi) << 32) | lo) >> s);
#endif
}

// The GPU reads the blocks of 2-byte alignment as whole words and a half (BlockWords below); the CPU
// does not: x86's and Arm's loads take any alignment, and there the compiler already makes one load
// of load_u32's two halves (its portable GEMV was 10-100% slower reading words and a half:
// bench/NOTES.md, thirteenth session). tests/cpp/test_block_words.cpp checks that arithmetic on the host.
#if defined(__CUDA_ARCH__)
constexpr bool kReadWordsAndHalf = true;
#else
constexpr bool kReadWordsAndHalf = false;
#endif

// The S bytes of one weight block at p, kept `Align`-byte aligned, read as 32-bit words: word(j) is
// bytes j .. j+3 (j even where Align is 2; a constant once the caller's loop unrolls), half0() bytes 0
// and 1. Here each word is loaded when asked for, by load_u32; ...
template <int S, int Align, bool kTwoAligned = (kReadWordsAndHalf && Align == 2 && S % 4 == 2)>
struct BlockWords {
  const uint8_t* p;
  TORCHEXT_HD explicit BlockWords(const uint8_t* block) : p(block) {}
  TORCHEXT_HD uint32_t word(int j) const { return load_u32<Align>(p + j); }
  TORCHEXT_HD uint32_t half0() const {
    if constexpr (Align >= 2) return *reinterpret_cast<const uint16_t*>(p);
    return uint32_t(p[0]) | uint32_t(p[1]) << 8;
  }
};

// ... except for blocks of S % 4 == 2 bytes at 2-byte alignment (Q8_0's 34, Q5_0's 22, Q4_0's and
// IQ4_NL's 18), which alternate between starting on a word and 2 bytes past one. Such a block is read
// at once as its (S - 2) / 4 aligned words and one 2-byte half, at whichever end of the block is off a
// word; a word is then one funnel shift of two of them by the block's own amount. On the GPU that is
// half the load instructions of reading 2 bytes at a time (Q8_0: 9 against 17), and no byte outside
// the block is read (the weight's last block may end where its memory does).
template <int S, int Align>
struct BlockWords<S, Align, true> {
  static constexpr int kWords = (S - 2) / 4;
  uint32_t w[kWords + 1];  // the aligned words in address order, then the half
  uint32_t shift;          // 16 where the block starts 2 bytes past a word (its half is bytes 0, 1), else 0
  TORCHEXT_HD explicit BlockWords(const uint8_t* p) : shift(uint32_t(reinterpret_cast<uintptr_t>(p) & 2u) * 8u) {
    const uint8_t* words = p + shift / 8;
    TORCHEXT_UNROLL
    for (int i = 0; i < kWords; ++i) w[i] = load_u32<4>(words + 4 * i);
    w[kWords] = *reinterpret_cast<const uint16_t*>(shift ? p : p + S - 2);
  }
  TORCHEXT_HD uint32_t word(int j) const {
    if (j == 0) return shift ? w[kWords] | w[0] << 16 : w[0];
    // Where the block starts 2 bytes past a word, bytes 4i + 2 .. 4i + 5 are aligned word i and bytes
    // 4i .. 4i + 3 the upper half of word i - 1 and the lower of word i; where it starts on a word, the
    // former are the upper half of word i and the lower of word i + 1 (the half, past the last word),
    // the latter word i.
    if (j % 4 == 2) return funnel_right(w[j / 4], w[j / 4 + 1], 16 - shift);
    return funnel_right(w[j / 4 - 1], w[j / 4], 32 - shift);
  }
  TORCHEXT_HD uint32_t half0() const { return shift ? w[kWords] : w[0] & 0xFFFFu; }
};

// Bytes o .. o + 7 of a block of 2-byte alignment at p, as two words (o a multiple of 4, o + 10 at most the block's
// size). On the GPU (kWords) a block that starts 2 bytes past a word is read as the three aligned words around those
// bytes and two funnel shifts: 3 loads where 2-byte halves take 4 (ncu ranks L1 first in Q6_K's GEMV; H100, 1 row of
// 4096x14336: 41.6 -> 34.9 µs). The first word starts 2 bytes before byte o: inside the block for o >= 4, else in the 2
// bytes before a block that starts off a word, which therefore is no allocation's start (allocations start on words).
// tests/cpp/test_block_words.cpp checks both ways on the host.
struct TwoWords {
  uint32_t lo, hi;
};
template <bool kWords = kReadWordsAndHalf>
TORCHEXT_HD TwoWords load_8_bytes_2_aligned(const uint8_t* p, int o) {
  if constexpr (kWords) {
    const uint32_t off = uint32_t(reinterpret_cast<uintptr_t>(p)) & 2u;  // 2 where the block starts past a word
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p + o - off);
    const uint32_t w0 = w[0], w1 = w[1], w2 = off ? w[2] : 0u;
    return {funnel_right(w0, w1, 8 * off), funnel_right(w1, w2, 8 * off)};
  } else {
    return {load_u32<2>(p + o), load_u32<2>(p + o + 4)};
  }
}

// Bytes q in 0..127 become q - z (z in 0..127) as signed bytes, with no borrow between bytes.
TORCHEXT_HD int bytes_minus(uint32_t q, uint32_t z) {
  return int(((q | 0x80808080u) - z * 0x01010101u) ^ 0x80808080u);
}

// Bits 2i, 2i+1 of each byte of w: four 2-bit quants (Q2_K, Q3_K, TQ2_0 keep four per byte).
TORCHEXT_HD uint32_t crumbs(uint32_t w, int i) { return (w >> (2 * i)) & 0x03030303u; }

// The sum of four signed bytes (four Q8_1 activations), plus c.
TORCHEXT_HD int byte_sum(int x, int c) { return dp4a(0x01010101, x, c); }

// Bit j of `bits` (j = 0..3) moved to bit 4 of byte j: the 5th bits of four values.
TORCHEXT_HD uint32_t spread_bits_to_bit4(uint32_t bits) {
  return ((bits & 1u) << 4) | ((bits & 2u) << 11) | ((bits & 4u) << 18) | ((bits & 8u) << 25);
}

// a*b - c and a*b + c rounded twice, never contracted to an FMA, so that host and device
// dequantize to the same bits as the gguf package's numpy reference.
TORCHEXT_HD float mul_sub(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(__fmul_rn(a, b), c);
#else
  return a * b - c;  // CPU sources build with -ffp-contract=off
#endif
}
TORCHEXT_HD float mul_add(float a, float b, float c) { return mul_sub(a, b, -c); }

TORCHEXT_HD float fp16f(fp16_bits h) { return fp16_to_float(h); }

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j, packed in the 12 scale bytes, here as
// the words s0..s3, s4..s7, s8..s11. Sub-blocks 0-3 keep scale and min in the low 6 bits of
// bytes j and j+4; sub-blocks 4-7 keep their low 4 bits in byte j+4's nibbles and their high 2
// bits in the top bits of bytes j-4 (scale) and j (min). Shifts, not byte indexing, so that the
// words stay in registers.
TORCHEXT_HD void kquant_scale_min(uint32_t w0, uint32_t w1, uint32_t w2, int j, int& sc, int& m) {
  const int shift = 8 * (j % 4);
  const int a = (w0 >> shift) & 0xFF, b = (w1 >> shift) & 0xFF, c = (w2 >> shift) & 0xFF;
  if (j < 4) {
    sc = a & 63;
    m = b & 63;
  } else {
    sc = (c & 0xF) | ((a >> 6) << 4);
    m = (c >> 4) | ((b >> 6) << 4);
  }
}

TORCHEXT_HD void kquant_scale_min(const uint8_t* scales, int j, int& sc, int& m) {
  uint32_t w[3];
  std::memcpy(w, scales, 12);
  kquant_scale_min(w[0], w[1], w[2], j, sc, m);
}

// The first 16 bytes of a Q4_K / Q5_K block (d, dmin, scales[12]) in one 16-byte load, and the
// scales and mins of sub-blocks 2g and 2g+1 unpacked from it.
struct KQuantHeader {
  float d, dmin;
  int sc_lo, m_lo, sc_hi, m_hi;

  TORCHEXT_HD KQuantHeader(const uint8_t* block, int g) {
    uint32_t w[4];
    load_16_bytes(block, w);
    d = fp16_to_float(fp16_bits(w[0] & 0xffffu));
    dmin = fp16_to_float(fp16_bits(w[0] >> 16));
    kquant_scale_min(w[1], w[2], w[3], 2 * g, sc_lo, m_lo);
    kquant_scale_min(w[1], w[2], w[3], 2 * g + 1, sc_hi, m_hi);
  }
};

// The tensor-core GEMV (gemv_q8_1_mma.cu) takes a weight row in items (kMmaItems per block): lane t
// (0..3) of a quad first issues every load of an item (mma_load into MmaRaw, loads only: any use of
// a loaded value would stall the lane before it issues the next item's loads), then takes slices
// from the registers (mma_slice). A slice is 32 values (one
// Q8_1 block; W = 2 words: values 4t..4t+3 and 16+4t..16+4t+3 as signed bytes) or 16 values (W = 1:
// values 4t..4t+3), the order in which mma.sync's m16n8k32 and m16n8k16 fragments take their k
// index. Value v of a slice is d * q + m: m meets the sum of the slice's rounded activations (a
// 32-value slice: the Q8_1 block's input sum; a 16-value slice, only where the format sets kMmaMins:
// an MMA of ones). mma_slice_first(item, s) is the block's value where slice s starts, and
// kMmaQuantMax bounds |q| (the tiled GEMM's packed conversion to bf16 takes q of 7 bits).
template <int W>
struct MmaSlice {
  uint32_t q[W];
  float d, m;
};

// QuantTraits<T>: the arithmetic of format T, with kType its catalog id (FormatTraits adds it to the
// family templates that several formats share).
template <QType T>
struct QuantTraits;

// Blocks and bytes of a weight row of k values of format traits T: whole blocks, the last one padded
// past k.
template <class T>
TORCHEXT_HD constexpr int64_t weight_row_blocks(int64_t k) {
  return (k + T::kValues - 1) / T::kValues;
}
template <class T>
TORCHEXT_HD constexpr int64_t weight_row_bytes(int64_t k) {
  return weight_row_blocks<T>(k) * T::kBytes;
}

template <QType T, class Family>
struct FormatTraits : Family {
  static constexpr QType kType = T;
};

// ---------------------------------------------------------------- Q4_K, Q5_K
// 8 sub-blocks of 32 values with 6-bit scales and mins; Q5_K adds a 5th bit per value in qh.
template <class Block, bool kHasHigh>
struct KQuantTraits {
  using block = Block;
  static constexpr int kValues = 256;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = 16;
  static constexpr int kItems = 4;

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    int sc, m;
    kquant_scale_min(b.scales, c, sc, m);
    const float d = fp16f(b.d) * float(sc), dm = fp16f(b.dmin) * float(m);
    const uint8_t* q = b.qs + 32 * (c / 2);
    const int shift = 4 * (c % 2);
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> shift) & 0xF;
      if constexpr (kHasHigh) v |= ((b.qh[l] >> c) & 1) << 4;
      out[l] = mul_sub(d, float(v), dm);
    }
  }

  // Item g holds the 32 qs bytes 32g .. 32g+31: low nibbles are sub-block 2g, high nibbles 2g+1;
  // their 5th bits are bits 2g and 2g+1 of qh[0 .. 31].
  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int g, const X& x, float (&acc)[B]) {
    const block& b = *reinterpret_cast<const block*>(p);
    uint32_t q_lo[2][4], q_hi[2][4];
    TORCHEXT_UNROLL
    for (int half = 0; half < 2; ++half) {
      uint32_t qs[4];
      load_16_bytes(b.qs + 32 * g + 16 * half, qs);
      TORCHEXT_UNROLL
      for (int w = 0; w < 4; ++w) {
        q_lo[half][w] = qs[w] & 0x0F0F0F0Fu;
        q_hi[half][w] = (qs[w] >> 4) & 0x0F0F0F0Fu;
      }
      if constexpr (kHasHigh) {
        uint32_t qh[4];
        load_16_bytes(b.qh + 16 * half, qh);
        TORCHEXT_UNROLL
        for (int w = 0; w < 4; ++w) {
          q_lo[half][w] |= ((qh[w] >> (2 * g)) & 0x01010101u) << 4;
          q_hi[half][w] |= ((qh[w] >> (2 * g + 1)) & 0x01010101u) << 4;
        }
      }
    }
    const KQuantHeader hd(p, g);
    TORCHEXT_UNROLL
    for (int r = 0; r < B; ++r) {
      int sum_lo = 0, sum_hi = 0;
      TORCHEXT_UNROLL
      for (int half = 0; half < 2; ++half) {
        int lo[4], hi[4];
        x.quants(r, 2 * g, 4 * half, lo);
        x.quants(r, 2 * g + 1, 4 * half, hi);
        TORCHEXT_UNROLL
        for (int w = 0; w < 4; ++w) {
          sum_lo = dp4a(int(q_lo[half][w]), lo[w], sum_lo);
          sum_hi = dp4a(int(q_hi[half][w]), hi[w], sum_hi);
        }
      }
      // The min term goes through the Q8_1 sums: sum((d*sc*q - dmin*m) * x) = d*sc*d8*isum - dmin*m*s.
      // Weight scales multiply first, then the activation scale, then the integer sum: every
      // partial product stays near the size of its contribution. s is scaled (Q8Scales).
      const Q8Scales lo = x.scales(r, 2 * g), hi = x.scales(r, 2 * g + 1);
      acc[r] += hd.d * float(hd.sc_lo) * lo.d * float(sum_lo) + hd.d * float(hd.sc_hi) * hi.d * float(sum_hi) -
                hd.dmin * float(hd.m_lo) * kQ8SumScale * lo.s - hd.dmin * float(hd.m_hi) * kQ8SumScale * hi.s;
    }
  }

  // One MMA item per block, 8 slices: sub-block j is the low (j even) or high nibbles of qs bytes
  // 32*(j/2) .. +31, its 5th bits bit j of qh[0..31].
  static constexpr int kMmaItems = 1, kMmaSlices = 8, kMmaWords = 2;
  static constexpr int kMmaQuantMax = kHasHigh ? 31 : 15;
  struct MmaRaw {
    uint32_t head[4];  // d, dmin, scales
    uint32_t qs[4][2];
    uint32_t qh[kHasHigh ? 2 : 1];
  };
  static TORCHEXT_HD int mma_slice_first(int, int s) { return 32 * s; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    load_16_bytes(p, r.head);
    TORCHEXT_UNROLL
    for (int w = 0; w < 2; ++w) {
      TORCHEXT_UNROLL
      for (int g = 0; g < 4; ++g) r.qs[g][w] = load_u32<kAlign>(b.qs + 32 * g + 16 * w + 4 * t);
      if constexpr (kHasHigh) r.qh[w] = load_u32<kAlign>(b.qh + 16 * w + 4 * t);
    }
  }
  static TORCHEXT_HD MmaSlice<2> mma_slice(const MmaRaw& r, int j) {
    MmaSlice<2> s;
    TORCHEXT_UNROLL
    for (int w = 0; w < 2; ++w) {
      s.q[w] = (r.qs[j / 2][w] >> (4 * (j % 2))) & 0x0F0F0F0Fu;
      if constexpr (kHasHigh) s.q[w] |= ((r.qh[w] >> j) & 0x01010101u) << 4;
    }
    int sc, m;
    kquant_scale_min(r.head[1], r.head[2], r.head[3], j, sc, m);
    s.d = fp16_to_float(fp16_bits(r.head[0] & 0xffffu)) * float(sc);
    s.m = -fp16_to_float(fp16_bits(r.head[0] >> 16)) * float(m);
    return s;
  }
};

template <> struct QuantTraits<QType::Q4_K> : FormatTraits<QType::Q4_K, KQuantTraits<block_q4_K, false>> {};
template <> struct QuantTraits<QType::Q5_K> : FormatTraits<QType::Q5_K, KQuantTraits<block_q5_K, true>> {};

// Item (h, l0) of the formats with 16-value sub-blocks (Q2_K, Q3_K, Q6_K): values l0 .. l0+7 of the
// quarters i = 0..3 of half h, value 128h + 32i + l in Q8_1 block 4h + i. Calls f(r, i, xq, d_x) with
// each activation row's two quant words of those values and its block's scale.
template <int B, class X, class F>
TORCHEXT_HD void for_quarters(int h, int l0, const X& x, F&& f) {
  TORCHEXT_UNROLL
  for (int r = 0; r < B; ++r) {
    TORCHEXT_UNROLL
    for (int i = 0; i < 4; ++i) {
      int xq[2];
      x.quants(r, 4 * h + i, l0 / 4, xq);
      f(r, i, xq, x.scales(r, 4 * h + i).d);
    }
  }
}

// ---------------------------------------------------------------- Q6_K
// Values 128h + 32i + l (h = 0..1, i = 0..3, l = 0..31) take their low 4 bits from
// ql[64h + 32*(i%2) + l] (low nibble for i < 2, high for i >= 2) and their high 2 bits from
// bits 2i, 2i+1 of qh[32h + l]; sub-block (16 values) 8h + 2i + l/16 gives the scale.
template <>
struct QuantTraits<QType::Q6_K> {
  static constexpr QType kType = QType::Q6_K;
  using block = block_q6_K;
  static constexpr int kValues = 256;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = 2;  // 210-byte blocks: rows are only 2-byte aligned
  static constexpr int kItems = 8;

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = c / 4, i = c % 4;
    const uint8_t* ql = b.ql + 64 * h + 32 * (i % 2);
    const uint8_t* qh = b.qh + 32 * h;
    const float d = fp16f(b.d);
    for (int l = 0; l < 32; ++l) {
      const int q = (((ql[l] >> (4 * (i / 2))) & 0xF) | (((qh[l] >> (2 * i)) & 3) << 4)) - 32;
      out[l] = mul_sub(d * float(b.scales[8 * h + 2 * i + l / 16]), float(q), 0.0f);
    }
  }

  // Item t covers l = 8r .. 8r+7 (r = t%4) of half h = t/4, for all four i: 8 values each.
  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int t, const X& x, float (&acc)[B]) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = t / 4, l0 = 8 * (t % 4);
    const TwoWords ql_lo = load_8_bytes_2_aligned(p, int(offsetof(block, ql)) + 64 * h + l0);  // quarters 0, 2
    const TwoWords ql_hi = load_8_bytes_2_aligned(p, int(offsetof(block, ql)) + 64 * h + 32 + l0);  // 1, 3
    const TwoWords qh = load_8_bytes_2_aligned(p, int(offsetof(block, qh)) + 32 * h + l0);
    // scales[8h .. 8h + 7]: quarter i's is byte l0 / 16 + 2i of them
    const TwoWords sc = load_8_bytes_2_aligned(p, int(offsetof(block, scales)) + 8 * h);
    int q[4][2];  // [i][word]: eight signed 6-bit values of quarter i
    TORCHEXT_UNROLL
    for (int w = 0; w < 2; ++w) {
      const uint32_t a = w ? ql_lo.hi : ql_lo.lo, c = w ? ql_hi.hi : ql_hi.lo, hb = w ? qh.hi : qh.lo;
      q[0][w] = bytes_minus((a & 0x0F0F0F0Fu) | ((hb & 0x03030303u) << 4), 32);
      q[1][w] = bytes_minus((c & 0x0F0F0F0Fu) | (((hb >> 2) & 0x03030303u) << 4), 32);
      q[2][w] = bytes_minus(((a >> 4) & 0x0F0F0F0Fu) | (((hb >> 4) & 0x03030303u) << 4), 32);
      q[3][w] = bytes_minus(((c >> 4) & 0x0F0F0F0Fu) | (((hb >> 6) & 0x03030303u) << 4), 32);
    }
    const float d = fp16f(b.d);
    const int sc_shift = 8 * (l0 / 16);
    for_quarters<B>(h, l0, x, [&](int r, int i, const int (&xq)[2], float xd) {
      const int sum = dp4a(q[i][1], xq[1], dp4a(q[i][0], xq[0], 0));
      const int scale = int8_t(((i < 2 ? sc.lo : sc.hi) >> (sc_shift + 16 * (i % 2))) & 0xFFu);
      acc[r] += d * float(scale) * xd * float(sum);  // weight scales first
    });
  }

  // Scales cover 16 values, so MMA slices are 16 values: item h is half h of the block, slice
  // s = 2i + (l >= 16) its quarter i's values l = 0..15 or 16..31, with scale scales[8h + s].
  static constexpr int kMmaItems = 2, kMmaSlices = 8, kMmaWords = 1;
  static constexpr bool kMmaMins = false;
  static constexpr int kMmaQuantMax = 32;  // 6 bits - 32
  struct MmaRaw {
    uint32_t ql[4];  // ql[64h + 16j + 4t ..]: quarters j/2 (low nibbles) and j/2 + 2 (high)
    uint32_t qh[2];  // qh[32h + 16j + 4t ..]
    uint32_t sc[2];  // scales[8h .. 8h+7]
    fp16_bits d;
  };
  static TORCHEXT_HD int mma_slice_first(int h, int s) { return 128 * h + 16 * s; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int h, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    TORCHEXT_UNROLL
    for (int j = 0; j < 4; ++j) r.ql[j] = load_u32<kAlign>(b.ql + 64 * h + 16 * j + 4 * t);
    TORCHEXT_UNROLL
    for (int j = 0; j < 2; ++j) {
      r.qh[j] = load_u32<kAlign>(b.qh + 32 * h + 16 * j + 4 * t);
      r.sc[j] = load_u32<kAlign>(reinterpret_cast<const uint8_t*>(b.scales) + 8 * h + 4 * j);
    }
    r.d = b.d;
  }
  static TORCHEXT_HD MmaSlice<1> mma_slice(const MmaRaw& r, int s) {
    const int i = s / 2, half = s % 2;
    const uint32_t ql = (r.ql[2 * (i % 2) + half] >> (4 * (i / 2))) & 0x0F0F0F0Fu;
    const uint32_t qh = ((r.qh[half] >> (2 * i)) & 0x03030303u) << 4;
    MmaSlice<1> out;
    out.q[0] = uint32_t(bytes_minus(ql | qh, 32));
    out.d = fp16f(r.d) * float(int8_t(r.sc[s / 4] >> (8 * (s % 4))));
    out.m = 0.0f;
    return out;
  }
};

// ---------------------------------------------------------------- Q2_K, Q3_K
// 16 sub-blocks of 16 values; value 128h + 32i + l is crumb i (bits 2i, 2i+1) of qs[32h + l] and
// belongs to sub-block 8h + 2i + l/16. Q2_K: x = d*sc*q - dmin*m with 4-bit sc, m; Q3_K: x = d*s*q
// with q = crumb + 4*hbit - 4 (hbit: bit 4h + i of hmask[l]) and s a 6-bit scale - 32. Items and
// MMA slices follow Q6_K: item t covers l = 8(t%4) .. +7 of half t/4 for all four i; MMA item h is
// half h, slice s = 2i + l/16 its sub-block 8h + s.
template <QType T, class Block, int Align>
struct CrumbKQuantGeometry {
  static constexpr QType kType = T;
  using block = Block;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = Align;
  static constexpr int kValues = 256;
  static constexpr int kItems = 8;
  static constexpr int kMmaItems = 2, kMmaSlices = 8, kMmaWords = 1;
  static TORCHEXT_HD int mma_slice_first(int h, int s) { return 128 * h + 16 * s; }
};

template <>
struct QuantTraits<QType::Q2_K> : CrumbKQuantGeometry<QType::Q2_K, block_q2_K, 4> {  // 84-byte blocks
  static constexpr bool kMmaMins = true;
  static constexpr int kMmaQuantMax = 3;

  // d*sc and dmin*m of a sub-block from its scale byte and the word d | dmin << 16.
  static TORCHEXT_HD float scale_of(uint32_t dd, int sc) { return fp16f(fp16_bits(dd & 0xFFFFu)) * float(sc & 0xF); }
  static TORCHEXT_HD float min_of(uint32_t dd, int sc) { return fp16f(fp16_bits(dd >> 16)) * float(sc >> 4); }

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = c / 4, i = c % 4;
    const uint32_t dd = load_u32<kAlign>(reinterpret_cast<const uint8_t*>(&b.d));
    for (int l = 0; l < 32; ++l) {
      const int sc = b.scales[8 * h + 2 * i + l / 16];
      out[l] = mul_sub(scale_of(dd, sc), float((b.qs[32 * h + l] >> (2 * i)) & 3), min_of(dd, sc));
    }
  }

  // The min term meets the integer sum of the rounded activations, as every format's offset does.
  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int t, const X& x, float (&acc)[B]) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = t / 4, l0 = 8 * (t % 4);
    const uint32_t q0 = load_u32<kAlign>(b.qs + 32 * h + l0), q1 = load_u32<kAlign>(b.qs + 32 * h + l0 + 4);
    const uint32_t dd = load_u32<kAlign>(reinterpret_cast<const uint8_t*>(&b.d));
    for_quarters<B>(h, l0, x, [&](int r, int i, const int (&xq)[2], float xd) {
      const int sum = dp4a(int(crumbs(q1, i)), xq[1], dp4a(int(crumbs(q0, i)), xq[0], 0));
      const int xsum = byte_sum(xq[1], byte_sum(xq[0], 0));
      const int sc = b.scales[8 * h + 2 * i + l0 / 16];
      acc[r] += scale_of(dd, sc) * xd * float(sum) - min_of(dd, sc) * xd * float(xsum);  // weight scales first
    });
  }

  struct MmaRaw {
    uint32_t qs[2];  // qs[32h + 16j + 4t ..]: values l = 16j + 4t .. of every quarter i
    uint32_t sc[2];  // scales[8h .. 8h+7]
    uint32_t dd;     // d | dmin << 16
  };
  static TORCHEXT_HD void mma_load(const uint8_t* p, int h, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    TORCHEXT_UNROLL
    for (int j = 0; j < 2; ++j) {
      r.qs[j] = load_u32<kAlign>(b.qs + 32 * h + 16 * j + 4 * t);
      r.sc[j] = load_u32<kAlign>(b.scales + 8 * h + 4 * j);
    }
    r.dd = load_u32<kAlign>(reinterpret_cast<const uint8_t*>(&b.d));
  }
  static TORCHEXT_HD MmaSlice<1> mma_slice(const MmaRaw& r, int s) {
    const int sc = int((r.sc[s / 4] >> (8 * (s % 4))) & 0xFFu);
    return {{crumbs(r.qs[s % 2], s / 2)}, scale_of(r.dd, sc), -min_of(r.dd, sc)};
  }
};

// Q3_K's 6-bit scale of sub-block j, minus 32, from the 12 scale bytes as words w0..w2: its low 4
// bits are nibble j/8 of byte j%8, its high 2 bits bits 2(j/4) of byte 8 + j%4.
TORCHEXT_HD int q3k_scale(uint32_t w0, uint32_t w1, uint32_t w2, int j) {
  const uint32_t low = ((j % 8 < 4 ? w0 : w1) >> (8 * (j % 4) + 4 * (j / 8))) & 0xFu;
  const uint32_t high = (w2 >> (8 * (j % 4) + 2 * (j / 4))) & 3u;
  return int(low | (high << 4)) - 32;
}

template <>
struct QuantTraits<QType::Q3_K> : CrumbKQuantGeometry<QType::Q3_K, block_q3_K, 2> {  // 110-byte blocks
  static constexpr bool kMmaMins = false;
  static constexpr int kMmaQuantMax = 4;

  // d * (s - 32) of sub-block j.
  static TORCHEXT_HD float sub_d(const block& b, int j) {
    const uint8_t* sc = b.scales;
    return fp16f(b.d) * float(q3k_scale(load_u32<kAlign>(sc), load_u32<kAlign>(sc + 4), load_u32<kAlign>(sc + 8), j));
  }
  // Four signed quants from four qs bytes and their four hmask bytes: crumb i, 3rd bit 4h + i.
  static TORCHEXT_HD uint32_t quants(uint32_t qs, uint32_t hm, int h, int i) {
    return uint32_t(bytes_minus(crumbs(qs, i) | (((hm >> (4 * h + i)) & 0x01010101u) << 2), 4));
  }

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = c / 4, i = c % 4;
    const float d_lo = sub_d(b, 8 * h + 2 * i), d_hi = sub_d(b, 8 * h + 2 * i + 1);
    for (int l = 0; l < 32; ++l) {
      const int q = int((b.qs[32 * h + l] >> (2 * i)) & 3) + 4 * int((b.hmask[l] >> (4 * h + i)) & 1) - 4;
      out[l] = mul_sub(l < 16 ? d_lo : d_hi, float(q), 0.0f);
    }
  }

  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int t, const X& x, float (&acc)[B]) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = t / 4, l0 = 8 * (t % 4);
    uint32_t qs[2], hm[2];
    TORCHEXT_UNROLL
    for (int w = 0; w < 2; ++w) {
      qs[w] = load_u32<kAlign>(b.qs + 32 * h + l0 + 4 * w);
      hm[w] = load_u32<kAlign>(b.hmask + l0 + 4 * w);
    }
    for_quarters<B>(h, l0, x, [&](int r, int i, const int (&xq)[2], float xd) {
      const int sum = dp4a(int(quants(qs[1], hm[1], h, i)), xq[1], dp4a(int(quants(qs[0], hm[0], h, i)), xq[0], 0));
      acc[r] += sub_d(b, 8 * h + 2 * i + l0 / 16) * xd * float(sum);  // weight scales first
    });
  }

  struct MmaRaw {
    uint32_t qs[2];  // qs[32h + 16j + 4t ..]
    uint32_t hm[2];  // hmask[16j + 4t ..]
    uint32_t sc[3];  // the 12 scale bytes
    fp16_bits d;
    int h;
  };
  static TORCHEXT_HD void mma_load(const uint8_t* p, int h, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    TORCHEXT_UNROLL
    for (int j = 0; j < 2; ++j) {
      r.qs[j] = load_u32<kAlign>(b.qs + 32 * h + 16 * j + 4 * t);
      r.hm[j] = load_u32<kAlign>(b.hmask + 16 * j + 4 * t);
    }
    TORCHEXT_UNROLL
    for (int j = 0; j < 3; ++j) r.sc[j] = load_u32<kAlign>(b.scales + 4 * j);
    r.d = b.d;
    r.h = h;
  }
  static TORCHEXT_HD MmaSlice<1> mma_slice(const MmaRaw& r, int s) {
    const float d = fp16f(r.d) * float(q3k_scale(r.sc[0], r.sc[1], r.sc[2], 8 * r.h + s));
    return {{quants(r.qs[s % 2], r.hm[s % 2], r.h, s / 2)}, d, 0.0f};
  }
};

// ---------------------------------------------------------------- TQ2_0
// Ternary, one fp16 d per 256 values: x = d * (q - 1), q the crumb Q2_K's layout puts there. Its
// items and slices are Q2_K's; with no sub-block scales a slice's d is the block's.
template <>
struct QuantTraits<QType::TQ2_0> : CrumbKQuantGeometry<QType::TQ2_0, block_tq2_0, 2> {  // 66-byte blocks
  static constexpr bool kMmaMins = false;
  static constexpr int kMmaQuantMax = 1;

  static TORCHEXT_HD uint32_t trits(uint32_t qs, int i) { return uint32_t(bytes_minus(crumbs(qs, i), 1)); }

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    const float d = fp16f(b.d);
    for (int l = 0; l < 32; ++l)
      out[l] = mul_sub(d, float(int((b.qs[32 * (c / 4) + l] >> (2 * (c % 4))) & 3) - 1), 0.0f);
  }

  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int t, const X& x, float (&acc)[B]) {
    const block& b = *reinterpret_cast<const block*>(p);
    const int h = t / 4, l0 = 8 * (t % 4);
    const uint32_t q0 = load_u32<kAlign>(b.qs + 32 * h + l0), q1 = load_u32<kAlign>(b.qs + 32 * h + l0 + 4);
    const float d = fp16f(b.d);
    for_quarters<B>(h, l0, x, [&](int r, int i, const int (&xq)[2], float xd) {
      acc[r] += d * xd * float(dp4a(int(trits(q1, i)), xq[1], dp4a(int(trits(q0, i)), xq[0], 0)));
    });
  }

  struct MmaRaw {
    uint32_t qs[2];  // qs[32h + 16j + 4t ..]
    fp16_bits d;
  };
  static TORCHEXT_HD void mma_load(const uint8_t* p, int h, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    TORCHEXT_UNROLL
    for (int j = 0; j < 2; ++j) r.qs[j] = load_u32<kAlign>(b.qs + 32 * h + 16 * j + 4 * t);
    r.d = b.d;
  }
  static TORCHEXT_HD MmaSlice<1> mma_slice(const MmaRaw& r, int s) {
    return {{trits(r.qs[s % 2], s / 2)}, fp16f(r.d), 0.0f};
  }
};

// ---------------------------------------------------------------- 32-value formats
// One item per block. `Offset` and the zero point make Q4_0/Q5_0 symmetric formats:
// sum((q - z) * x) = d8 * sum(q * xq) - z * s, with s the Q8_1 block's input sum.
template <>
struct QuantTraits<QType::Q8_0> {
  static constexpr QType kType = QType::Q8_0;
  using block = block_q8_0;
  static constexpr int kValues = 32;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = 2;
  static constexpr int kItems = 1;

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    const float d = fp16f(b.d);
    for (int l = 0; l < 32; ++l) out[l] = mul_sub(d, float(b.qs[l]), 0.0f);
  }

  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int, const X& x, float (&acc)[B]) {
    const BlockWords<kBytes, kAlign> b(p);  // d in bytes 0, 1, the quants from byte 2
    int q[8];
    TORCHEXT_UNROLL
    for (int w = 0; w < 8; ++w) q[w] = int(b.word(2 + 4 * w));
    const float d = fp16f(fp16_bits(b.half0()));
    TORCHEXT_UNROLL
    for (int r = 0; r < B; ++r) {
      int lo[4], hi[4];
      x.quants(r, 0, 0, lo);
      x.quants(r, 0, 4, hi);
      int sum = 0;
      TORCHEXT_UNROLL
      for (int w = 0; w < 4; ++w) sum = dp4a(q[w + 4], hi[w], dp4a(q[w], lo[w], sum));
      acc[r] += d * x.scales(r, 0).d * float(sum);
    }
  }

  static constexpr int kMmaItems = 1, kMmaSlices = 1, kMmaWords = 2;
  static constexpr int kMmaQuantMax = 128;
  struct MmaRaw {
    uint32_t q[2];
    fp16_bits d;
  };
  static TORCHEXT_HD int mma_slice_first(int, int) { return 0; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    const uint8_t* qs = reinterpret_cast<const uint8_t*>(b.qs);
    r.q[0] = load_u32<kAlign>(qs + 4 * t);
    r.q[1] = load_u32<kAlign>(qs + 16 + 4 * t);
    r.d = b.d;
  }
  static TORCHEXT_HD MmaSlice<2> mma_slice(const MmaRaw& r, int) { return {{r.q[0], r.q[1]}, fp16f(r.d), 0.0f}; }
};

// Shared by Q4_0, Q4_1, Q5_0, Q5_1: 16 bytes of nibbles (value l low, l+16 high), an optional
// 5th bit per value from a 32-bit qh, and either a zero point (Q4_0: 8, Q5_0: 16) or a min m.
template <class Block, bool kHasMin, bool kHasHigh>
struct NibbleTraits {
  using block = Block;
  static constexpr int kValues = 32;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = kBytes % 4 == 0 ? 4 : 2;
  static constexpr int kItems = 1;
  static constexpr int kZero = kHasMin ? 0 : (kHasHigh ? 16 : 8);

  static TORCHEXT_HD float min_of(const block& b) {
    if constexpr (kHasMin) return fp16f(b.m); else return 0.0f;
  }
  static TORCHEXT_HD uint32_t high_bits(const block& b) {
    if constexpr (kHasHigh) return load_u32<kAlign>(b.qh); else return 0u;
  }
  static constexpr int kQsOffset = int(offsetof(block, qs));
  static_assert(offsetof(block, d) == 0, "d is bytes 0, 1 of the block");

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    const float d = fp16f(b.d), m = min_of(b);
    const uint32_t qh = high_bits(b);
    for (int l = 0; l < 16; ++l) {
      const int lo = (b.qs[l] & 0xF) | (((qh >> l) & 1) << 4);
      const int hi = (b.qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
      if constexpr (kHasMin) {
        out[l] = mul_add(d, float(lo), m);
        out[l + 16] = mul_add(d, float(hi), m);
      } else {
        out[l] = mul_sub(d, float(lo - kZero), 0.0f);
        out[l + 16] = mul_sub(d, float(hi - kZero), 0.0f);
      }
    }
  }

  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int, const X& x, float (&acc)[B]) {
    const block& b = *reinterpret_cast<const block*>(p);
    const BlockWords<kBytes, kAlign> words(p);
    uint32_t qh = 0;
    if constexpr (kHasHigh) qh = words.word(int(offsetof(block, qh)));
    int lo[4], hi[4];
    TORCHEXT_UNROLL
    for (int w = 0; w < 4; ++w) {
      const uint32_t q = words.word(kQsOffset + 4 * w);
      lo[w] = int((q & 0x0F0F0F0Fu) | spread_bits_to_bit4((qh >> (4 * w)) & 0xF));
      hi[w] = int(((q >> 4) & 0x0F0F0F0Fu) | spread_bits_to_bit4((qh >> (16 + 4 * w)) & 0xF));
    }
    const float d = fp16f(fp16_bits(words.half0()));
    const float scaled_offset = (kHasMin ? min_of(b) : -d * float(kZero)) * kQ8SumScale;  // meets s (Q8Scales)
    TORCHEXT_UNROLL
    for (int r = 0; r < B; ++r) {
      int xl[4], xh[4];
      x.quants(r, 0, 0, xl);  // values 0..15 meet the low nibbles, 16..31 the high ones
      x.quants(r, 0, 4, xh);
      int sum = 0;
      TORCHEXT_UNROLL
      for (int w = 0; w < 4; ++w) sum = dp4a(hi[w], xh[w], dp4a(lo[w], xl[w], sum));
      const Q8Scales xs = x.scales(r, 0);
      // d * d8 before the integer sum, as every format: partial products stay near the result's size
      acc[r] += d * xs.d * float(sum) + scaled_offset * xs.s;
    }
  }

  // Byte 4t..4t+3's low nibbles are values 4t..4t+3, its high nibbles values 16+4t..16+4t+3:
  // one load gives both words. The zero point becomes a min of -z*d.
  static constexpr int kMmaItems = 1, kMmaSlices = 1, kMmaWords = 2;
  static constexpr int kMmaQuantMax = kHasHigh ? 31 : 15;  // the raw quant; m holds -z*d
  struct MmaRaw {
    uint32_t q, qh;
    fp16_bits d, m;
  };
  static TORCHEXT_HD int mma_slice_first(int, int) { return 0; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.q = load_u32<kAlign>(b.qs + 4 * t);
    r.qh = high_bits(b) >> (4 * t);
    r.d = b.d;
    if constexpr (kHasMin) r.m = b.m;
  }
  static TORCHEXT_HD MmaSlice<2> mma_slice(const MmaRaw& r, int) {
    const float d = fp16f(r.d);
    return {{(r.q & 0x0F0F0F0Fu) | spread_bits_to_bit4(r.qh & 0xF),
             ((r.q >> 4) & 0x0F0F0F0Fu) | spread_bits_to_bit4((r.qh >> 16) & 0xF)},
            d, kHasMin ? fp16f(r.m) : -float(kZero) * d};
  }
};

template <> struct QuantTraits<QType::Q4_0> : FormatTraits<QType::Q4_0, NibbleTraits<block_q4_0, false, false>> {};
template <> struct QuantTraits<QType::Q4_1> : FormatTraits<QType::Q4_1, NibbleTraits<block_q4_1, true, false>> {};
template <> struct QuantTraits<QType::Q5_0> : FormatTraits<QType::Q5_0, NibbleTraits<block_q5_0, false, true>> {};
template <> struct QuantTraits<QType::Q5_1> : FormatTraits<QType::Q5_1, NibbleTraits<block_q5_1, true, true>> {};

// ---------------------------------------------------------------- nibble levels: IQ4_NL, IQ4_XS, MXFP4
// A nibble indexes 16 int8 levels: IQ4_NL's and IQ4_XS's non-linear ones (llama.cpp's kvalues_iq4nl)
// or the FP4 E2M1 values doubled (MXFP4, NVFP4: kvalues_mxfp4; the format's scale carries the halving).
// IQ4_NL has one fp16 d per 32 values, IQ4_XS eight 32-value sub-blocks with 6-bit scales ls:
// x = d * (ls - 32) * level; MXFP4 one power of two per 32 values (its E8M0 exponent), NVFP4 one UE4M3
// scale per 16. Levels are int8, so the integer dot products are those of Q8_0; d * level is exact in
// fp32 for every format's d.
constexpr int8_t kIQ4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int8_t kFP4Levels[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// The lookups and 32-value kernels of one level table L.
template <const int8_t (&L)[16]>
struct NibbleLevels {
  static constexpr const int8_t (&kTable)[16] = L;
  static constexpr int max_abs() {
    int m = 0;
    for (int v : L) m = v < -m ? -v : (v > m ? v : m);
    return m;
  }
  static constexpr int kMaxAbs = max_abs();

  // Levels 4w .. 4w+3 as the bytes of one word.
  static constexpr uint32_t word(int w) {
    return uint32_t(uint8_t(L[4 * w])) | uint32_t(uint8_t(L[4 * w + 1])) << 8 | uint32_t(uint8_t(L[4 * w + 2])) << 16 |
           uint32_t(uint8_t(L[4 * w + 3])) << 24;
  }

  // Four nibble indexes (bytes of 0..15) -> their four levels as signed bytes.
  static TORCHEXT_HD uint32_t of(uint32_t idx) {
#if defined(__CUDA_ARCH__)
    // The table as 4 words: prmt picks bytes 0-7 of (t0, t1) or (t2, t3) by the index's low 3 bits, its
    // bit 3 chooses between the two.
    constexpr uint32_t t0 = word(0), t1 = word(1), t2 = word(2), t3 = word(3);
    const uint32_t x = idx & 0x07070707u;
    const uint32_t sel = (x & 0xFu) | ((x >> 4) & 0xF0u) | ((x >> 8) & 0xF00u) | ((x >> 12) & 0xF000u);
    const uint32_t hi = ((idx & 0x08080808u) >> 3) * 0xFFu;
    return (__byte_perm(t2, t3, sel) & hi) | (__byte_perm(t0, t1, sel) & ~hi);
#else
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t(uint8_t(L[(idx >> (8 * i)) & 15])) << (8 * i);
    return v;
#endif
  }

  // 32 values from 16 bytes of nibbles (value l low, l + 16 high) scaled by d, as gguf computes them.
  static TORCHEXT_HD void dequantize_32(const uint8_t* qs, float d, float* out) {
    TORCHEXT_UNROLL
    for (int w = 0; w < 4; ++w) {
      uint32_t q;
      std::memcpy(&q, qs + 4 * w, 4);
      const uint32_t lo = of(q & 0x0F0F0F0Fu), hi = of((q >> 4) & 0x0F0F0F0Fu);
      TORCHEXT_UNROLL
      for (int i = 0; i < 4; ++i) {
        out[4 * w + i] = mul_sub(d, float(int8_t(lo >> (8 * i))), 0.0f);
        out[16 + 4 * w + i] = mul_sub(d, float(int8_t(hi >> (8 * i))), 0.0f);
      }
    }
  }

  // The dot products of 32 values from 16 bytes of nibbles, bytes j0 .. j0+15 of the block `words`,
  // with B rows of Q8_1 block j, scaled by the weights' d: acc[r] += d * d_x * isum.
  template <int B, class Words, class X>
  static TORCHEXT_HD void dot_32(const Words& words, int j0, float d, int j, const X& x, float (&acc)[B]) {
    int lo[4], hi[4];
    TORCHEXT_UNROLL
    for (int w = 0; w < 4; ++w) {
      const uint32_t q = words.word(j0 + 4 * w);
      lo[w] = int(of(q & 0x0F0F0F0Fu));
      hi[w] = int(of((q >> 4) & 0x0F0F0F0Fu));
    }
    TORCHEXT_UNROLL
    for (int r = 0; r < B; ++r) {
      int xl[4], xh[4];
      x.quants(r, j, 0, xl);  // values 0..15 meet the low nibbles, 16..31 the high ones
      x.quants(r, j, 4, xh);
      int sum = 0;
      TORCHEXT_UNROLL
      for (int w = 0; w < 4; ++w) sum = dp4a(hi[w], xh[w], dp4a(lo[w], xl[w], sum));
      acc[r] += d * x.scales(r, j).d * float(sum);
    }
  }
};
using IQ4Levels = NibbleLevels<kIQ4Levels>;
using FP4Levels = NibbleLevels<kFP4Levels>;

// IQ4_NL and MXFP4: 32 values as 16 bytes of nibbles (byte l: value l low, l + 16 high) and one scale a
// block, F::scale(F::field(block)); F also names the block, its level table and its alignment.
template <class F>
struct LevelNibbleTraits {
  using Format = F;
  using block = typename F::block;
  using Levels = typename F::Levels;
  static constexpr int kValues = 32;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = F::kAlign;
  static constexpr int kItems = 1;

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int, float* out) {
    const block& b = *reinterpret_cast<const block*>(p);
    Levels::dequantize_32(b.qs, F::scale(F::field(b)), out);
  }
  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int, const X& x, float (&acc)[B]) {
    const BlockWords<kBytes, kAlign> words(p);
    Levels::template dot_32<B>(words, int(offsetof(block, qs)), F::scale(F::field(words)), 0, x, acc);
  }

  // Byte 4t..4t+3's low nibbles are values 4t..4t+3, its high nibbles 16+4t..16+4t+3.
  static constexpr int kMmaItems = 1, kMmaSlices = 1, kMmaWords = 2;
  static constexpr int kMmaQuantMax = Levels::kMaxAbs;
  struct MmaRaw {
    uint32_t q;
    typename F::Field scale;
  };
  static TORCHEXT_HD int mma_slice_first(int, int) { return 0; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.q = load_u32<kAlign>(b.qs + 4 * t);
    r.scale = F::field(b);
  }
  static TORCHEXT_HD MmaSlice<2> mma_slice(const MmaRaw& r, int) {
    return {{Levels::of(r.q & 0x0F0F0F0Fu), Levels::of((r.q >> 4) & 0x0F0F0F0Fu)}, F::scale(r.scale), 0.0f};
  }
};

struct IQ4NLFormat {
  using block = block_iq4_nl;
  using Levels = IQ4Levels;
  using Field = fp16_bits;
  static constexpr int kAlign = 2;  // 18-byte blocks
  static TORCHEXT_HD Field field(const block& b) { return b.d; }
  template <class Words>
  static TORCHEXT_HD Field field(const Words& words) { return Field(words.half0()); }  // d: bytes 0, 1
  static TORCHEXT_HD float scale(Field d) { return fp16f(d); }
};
static_assert(offsetof(block_iq4_nl, d) == 0, "IQ4NLFormat::field");
template <> struct QuantTraits<QType::IQ4_NL> : FormatTraits<QType::IQ4_NL, LevelNibbleTraits<IQ4NLFormat>> {};

// MXFP4's E8M0 exponent e as its scale halved, 2^(e - 128) (gguf's e8m0_to_fp32_half, llama.cpp's
// ggml_e8m0_to_fp32_half): the fp32 bits of that power of two, a subnormal for e < 2, 2^127 for e = 255
// (no code is NaN or infinite; levels of 8 and 12 times 2^127 overflow to infinity, as in gguf).
TORCHEXT_HD float e8m0_half(uint8_t e) { return bits_float(e < 2 ? 0x00200000u << e : uint32_t(e - 1) << 23); }

struct MXFP4Format {
  using block = block_mxfp4;
  using Levels = FP4Levels;
  using Field = uint8_t;
  static constexpr int kAlign = 1;  // 17-byte blocks: a row or a block may start at any byte
  static TORCHEXT_HD Field field(const block& b) { return b.e; }
  template <class Words>
  static TORCHEXT_HD Field field(const Words& words) { return words.p[offsetof(block, e)]; }
  static TORCHEXT_HD float scale(Field e) { return e8m0_half(e); }
};
template <> struct QuantTraits<QType::MXFP4> : FormatTraits<QType::MXFP4, LevelNibbleTraits<MXFP4Format>> {};

template <>
struct QuantTraits<QType::IQ4_XS> {
  static constexpr QType kType = QType::IQ4_XS;
  using block = block_iq4_xs;
  static constexpr int kValues = 256;
  static constexpr int kBytes = sizeof(block);
  static constexpr int kAlign = 8;  // 136-byte blocks
  static constexpr int kItems = 8;  // item j: sub-block j

  // ls - 32 of sub-block j, from the scale words: w0 = d | scales_h << 16, w1 = scales_l[0..3].
  static TORCHEXT_HD int sub_scale(uint32_t w0, uint32_t w1, int j) {
    return int(((w1 >> (4 * j)) & 0xFu) | (((w0 >> (16 + 2 * j)) & 3u) << 4)) - 32;
  }
  static TORCHEXT_HD float sub_d(const uint8_t* p, int j) {
    const uint32_t lo = load_u32<kAlign>(p), hi = load_u32<kAlign>(p + 4);
    return fp16f(fp16_bits(lo & 0xFFFFu)) * float(sub_scale(lo, hi, j));
  }

  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    IQ4Levels::dequantize_32(reinterpret_cast<const block*>(p)->qs + 16 * c, sub_d(p, c), out);
  }
  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int j, const X& x, float (&acc)[B]) {
    IQ4Levels::dot_32<B>(BlockWords<kBytes, kAlign>(p), int(offsetof(block, qs)) + 16 * j, sub_d(p, j), j, x, acc);
  }

  // One MMA item per block, 8 slices: slice j is sub-block j (its 16 bytes at 16j; lane t's word at
  // 16j + 4t holds values 4t..4t+3 in its low nibbles, 16+4t..16+4t+3 in its high ones).
  static constexpr int kMmaItems = 1, kMmaSlices = 8, kMmaWords = 2;
  static constexpr int kMmaQuantMax = IQ4Levels::kMaxAbs;
  struct MmaRaw {
    uint32_t head[2];  // d | scales_h << 16, scales_l
    uint32_t qs[8];
  };
  static TORCHEXT_HD int mma_slice_first(int, int s) { return 32 * s; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    r.head[0] = load_u32<kAlign>(p);
    r.head[1] = load_u32<kAlign>(p + 4);
    TORCHEXT_UNROLL
    for (int j = 0; j < 8; ++j) r.qs[j] = load_u32<kAlign>(b.qs + 16 * j + 4 * t);
  }
  static TORCHEXT_HD MmaSlice<2> mma_slice(const MmaRaw& r, int j) {
    const float d = fp16f(fp16_bits(r.head[0] & 0xFFFFu)) * float(sub_scale(r.head[0], r.head[1], j));
    return {{IQ4Levels::of(r.qs[j] & 0x0F0F0F0Fu), IQ4Levels::of((r.qs[j] >> 4) & 0x0F0F0F0Fu)}, d, 0.0f};
  }
};

// ---------------------------------------------------------------- formats decoded chunk by chunk
// dequantize_chunk and dot_item of a format D that decodes its 32-value chunk c into 8 words of signed
// bytes q[i] (values 4i .. 4i+3) and the scales d[0], d[1] of its halves (equal where one scale covers
// all 32, D::kHalfScales false): D::unpack(p, c, q, d), so that x = d * q. Item j is chunk j, one Q8_1
// block. The grid formats (quant_traits_iq_grid.h), TQ1_0 and NVFP4; the AVX2 GEMV takes the same unpack.
template <class D>
struct UnpackedChunks {
  static TORCHEXT_HD void dequantize_chunk(const uint8_t* p, int c, float* out) {
    uint32_t q[8];
    float d[2];
    D::unpack(p, c, q, d);
    for (int l = 0; l < 32; ++l) out[l] = mul_sub(d[l / 16], float(int8_t(q[l / 4] >> (8 * (l % 4)))), 0.0f);
  }

  template <int B, class X>
  static TORCHEXT_HD void dot_item(const uint8_t* p, int j, const X& x, float (&acc)[B]) {
    uint32_t q[8];
    float d[2];
    D::unpack(p, j, q, d);
    TORCHEXT_UNROLL
    for (int r = 0; r < B; ++r) {
      int xl[4], xh[4];
      x.quants(r, j, 0, xl);
      x.quants(r, j, 4, xh);
      int sum_lo = 0, sum_hi = 0;
      TORCHEXT_UNROLL
      for (int w = 0; w < 4; ++w) {
        sum_lo = dp4a(int(q[w]), xl[w], sum_lo);
        sum_hi = dp4a(int(q[4 + w]), xh[w], sum_hi);
      }
      const float xd = x.scales(r, j).d;  // weight scale, activation scale, then the integer sum
      if constexpr (D::kHalfScales) acc[r] += d[0] * xd * float(sum_lo) + d[1] * xd * float(sum_hi);
      else acc[r] += d[0] * xd * float(sum_lo + sum_hi);
    }
  }
};

// The constants of such a format (TQ1_0, NVFP4): item j is chunk j.
template <QType T, class Block, int Values, int Align, bool HalfScales>
struct ChunkGeometry {
  static constexpr QType kType = T;
  using block = Block;
  static constexpr int kValues = Values;
  static constexpr int kBytes = sizeof(Block);
  static constexpr int kAlign = Align;
  static constexpr int kItems = Values / 32;
  static constexpr bool kHalfScales = HalfScales;
};

// ---------------------------------------------------------------- NVFP4
// 64 values in 4 sub-blocks of 16: x = ue4m3_half(d[s]) * level[q], FP4 levels (kFP4Levels). Chunk c
// (item c) is sub-blocks 2c and 2c + 1, one scale per half; MMA slices are the 16-value sub-blocks.

// An unsigned E4M3 scale code (bias 7) as its value halved, as gguf's NVFP4.ue4m3_to_fp32 decodes it:
// exponent bits 3-6, mantissa bits 0-2, bit 7 ignored (0x80 decodes as 0x00, 0xFF as 0x7F's 240 / 2);
// codes 0 and 0x7F (E4M3's NaN) give 0. Exact fp32 values, all normal but 0: 2^-10 * m for exponent 0,
// else (1 + m / 8) * 2^(e - 8), written as fp32 bits.
TORCHEXT_HD float ue4m3_half(uint32_t code) {
  const uint32_t e = (code >> 3) & 0xFu, m = code & 7u;
  if (code == 0x7Fu) return 0.0f;
  return e == 0 ? float(m) * 0.0009765625f : bits_float(((e + 119u) << 23) | (m << 20));
}

template <>
struct QuantTraits<QType::NVFP4> : ChunkGeometry<QType::NVFP4, block_nvfp4, 64, 4, true>,  // 36-byte blocks
                                   UnpackedChunks<QuantTraits<QType::NVFP4>> {

  // A sub-block's bytes as two words w0, w1: its values 0..3 and 4..7 are the low nibbles of w0 and w1,
  // 8..11 and 12..15 their high nibbles. quad(w, h): the levels of w's low (h = 0) or high nibbles.
  static TORCHEXT_HD uint32_t quad(uint32_t w, int h) { return FP4Levels::of((w >> (4 * h)) & 0x0F0F0F0Fu); }

  static TORCHEXT_HD void unpack(const uint8_t* p, int c, uint32_t (&q)[8], float (&d)[2]) {
    const block& b = *reinterpret_cast<const block*>(p);
    TORCHEXT_UNROLL
    for (int i = 0; i < 8; ++i) q[i] = quad(load_u32<kAlign>(b.qs + 16 * c + 8 * (i / 4) + 4 * (i % 2)), (i / 2) % 2);
    const uint32_t scales = load_u32<kAlign>(b.d);
    d[0] = ue4m3_half((scales >> (16 * c)) & 0xFFu);
    d[1] = ue4m3_half((scales >> (16 * c + 8)) & 0xFFu);
  }

  // One MMA item a block, slice s its sub-block s: lane t's values 4t .. 4t+3 are the low (t < 2) or
  // high nibbles of the sub-block's word t % 2.
  static constexpr int kMmaItems = 1, kMmaSlices = 4, kMmaWords = 1;
  static constexpr bool kMmaMins = false;
  static constexpr int kMmaQuantMax = FP4Levels::kMaxAbs;
  struct MmaRaw {
    uint32_t qs[4];  // bytes 8s + 4(t % 2) .. of sub-block s
    uint32_t scales;
    int h;  // t / 2
  };
  static TORCHEXT_HD int mma_slice_first(int, int s) { return 16 * s; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int, int t, MmaRaw& r) {
    const block& b = *reinterpret_cast<const block*>(p);
    TORCHEXT_UNROLL
    for (int s = 0; s < 4; ++s) r.qs[s] = load_u32<kAlign>(b.qs + 8 * s + 4 * (t % 2));
    r.scales = load_u32<kAlign>(b.d);
    r.h = t / 2;
  }
  static TORCHEXT_HD MmaSlice<1> mma_slice(const MmaRaw& r, int s) {
    return {{quad(r.qs[s], r.h)}, ue4m3_half((r.scales >> (8 * s)) & 0xFFu), 0.0f};
  }
};

// ---------------------------------------------------------------- TQ1_0
// Ternary, one fp16 d per 256 values, 5 values a byte in base 3 (blocks.h). Chunk c < 5 is digit c of
// qs[0 .. 31]; the last 96 values are six groups of 16, g = 0..5 (values 160 + 16g ..): digit g of
// qs[32 .. 47] for g < 5, then qh's digits 0..3 (values 240 + 4j + l: digit j of qh[l]); chunk c >= 5 is
// groups 2(c - 5) and 2(c - 5) + 1. A 32-value MMA slice per chunk.

// 3^j for a digit j = 0..4.
TORCHEXT_HD uint32_t pow3(int j) { return j == 0 ? 1u : j == 1 ? 3u : j == 2 ? 9u : j == 3 ? 27u : 81u; }

// Digit j of each byte of w as a trit -1..1 in that byte, from p3 = 3^j: ((b * 3^j mod 256) * 3) >> 8,
// minus 1. Two bytes at a time in 16-bit lanes, where b * 81 * 3 < 2^16 leaves no carry between lanes.
TORCHEXT_HD uint32_t base3_trits(uint32_t w, uint32_t p3) {
  const uint32_t even = ((w & 0x00FF00FFu) * p3) & 0x00FF00FFu;  // bytes 0 and 2, times 3^j mod 256
  const uint32_t odd = (((w >> 8) & 0x00FF00FFu) * p3) & 0x00FF00FFu;
  const uint32_t digits = (((even * 3u) >> 8) & 0x00030003u) | ((((odd * 3u) >> 8) & 0x00030003u) << 8);
  return uint32_t(bytes_minus(digits, 1));
}

template <>
struct QuantTraits<QType::TQ1_0> : ChunkGeometry<QType::TQ1_0, block_tq1_0, 256, 2, false>,  // 54-byte blocks
                                   UnpackedChunks<QuantTraits<QType::TQ1_0>> {

  // Where values 4i .. 4i+3 of chunk c are: the byte offset of their 4 bytes in the block, and the digit.
  static TORCHEXT_HD int quad_offset(int c, int i) { return c < 5 ? 4 * i : c == 7 && i >= 4 ? 48 : 32 + 4 * (i % 4); }
  static TORCHEXT_HD int quad_digit(int c, int i) { return c < 5 ? c : c == 7 && i >= 4 ? i - 4 : 2 * (c - 5) + i / 4; }

  static TORCHEXT_HD void unpack(const uint8_t* p, int c, uint32_t (&q)[8], float (&d)[2]) {
    TORCHEXT_UNROLL
    for (int i = 0; i < 8; ++i) q[i] = base3_trits(load_u32<kAlign>(p + quad_offset(c, i)), pow3(quad_digit(c, i)));
    d[0] = d[1] = fp16f(reinterpret_cast<const block*>(p)->d);
  }

  // MMA item c: chunk c, one 32-value slice; lane t's words are quads t and 4 + t.
  static constexpr int kMmaItems = 8, kMmaSlices = 1, kMmaWords = 2;
  static constexpr bool kMmaMins = false;
  static constexpr int kMmaQuantMax = 1;
  struct MmaRaw {
    uint32_t qs[2], p3[2];
    fp16_bits d;
  };
  static TORCHEXT_HD int mma_slice_first(int c, int) { return 32 * c; }
  static TORCHEXT_HD void mma_load(const uint8_t* p, int c, int t, MmaRaw& r) {
    TORCHEXT_UNROLL
    for (int h = 0; h < 2; ++h) {
      r.qs[h] = load_u32<kAlign>(p + quad_offset(c, 4 * h + t));
      r.p3[h] = pow3(quad_digit(c, 4 * h + t));
    }
    r.d = reinterpret_cast<const block*>(p)->d;
  }
  static TORCHEXT_HD MmaSlice<2> mma_slice(const MmaRaw& r, int) {
    return {{base3_trits(r.qs[0], r.p3[0]), base3_trits(r.qs[1], r.p3[1])}, fp16f(r.d), 0.0f};
  }
};

}  // namespace torchext

#include "kernels/quant_traits_iq_grid.h"  // the grid-based imatrix formats

namespace torchext {

// Calls f(QuantTraits<T>{}) for the weight format `t`; false (f not called) if `t` is not one of
// the catalog's weight formats (blocks.h). Every caller turns false into an error naming the id.
template <class F>
bool visit_weight_format(QType t, F&& f) {
  switch (t) {
#define TORCHEXT_VISIT_FORMAT(name, id, cpu_gemv_rows, wgmma_rows) \
  case QType::name:                                                \
    f(QuantTraits<QType::name>{});                                 \
    return true;
    TORCHEXT_WEIGHT_FORMATS(TORCHEXT_VISIT_FORMAT)
#undef TORCHEXT_VISIT_FORMAT
    default: return false;  // Q8_1 is an activation format; anything else is unknown
  }
}

}  // namespace torchext
