// The CPU GEMV on x86-64: weight x Q8_1 activations, one body for every weight format and
// instruction set (AVX2, AVX-VNNI, AVX512-VNNI).
//
// A weight block is taken 32 values at a time (a chunk: one Q8_1 block of the activations). Each
// format's Avx2Chunk (below) turns chunk c of a block into 32 quants in one register, as unsigned
// bytes or, for Q6_K, Q8_0 and others, signed ones (the sign trick: |w| times x carrying w's sign),
// with the chunk's weight scales and offset. The bit layouts are kernels/quant_traits.h's
// (dequantize_chunk), here in vector form. Per chunk and activation row, dot_lanes gives eight
// int32 sums of four products (maddubs + madd on AVX2, vpdpbusd with VNNI; exact either way), which
// meet the scales in fp32 as in the scalar kernel, acc += dw * dx * isum + m * dx * sum(qx); the
// eight lanes are added at the end of the row. The k-quants with kBlockScales (Q4_K, Q5_K, Q6_K)
// decode a block's eight chunk scales at once (BlockScales) and sum their offsets a block at a
// time. Results equal the scalar kernel's up to fp32 summation order, and are the same bits on
// every instruction set.
//
// Compiled for every x86-64 CPU: only functions with a target attribute use more than x86-64's
// base, and gemv_q8_1 (gemv_q8_1.cpp) calls them only when cpu_kernels() says the CPU has it.
#if defined(__x86_64__) || defined(_M_X64)

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "csrc/checks.h"
#include "csrc/cpu/avx2.h"
#include "csrc/cpu/kernels.h"
#include "kernels/quant_traits.h"

namespace torchext::cpu {
namespace {

// 32 quants of one chunk and how they scale: value l = d_l * (q_l - zero) - sub_l, rounded as
// dequantize_chunk rounds it (product, then difference), d_l, sub_l = d_lo, sub_lo for l < 16 and
// d_hi, sub_hi for l >= 16 (equal except for the formats whose scales cover 16 values: kHalfScales,
// and Q2_K's mins: kHalfMins). zero is Q4_0's / Q5_0's zero point.
struct Chunk {
  __m256i q;
  float d_lo, d_hi;
  int zero;
  float sub_lo, sub_hi;

  // The offsets m of value = d_l * q_l + m that the dot products meet with d_x * sum(q_x).
  float offset_lo() const { return -sub_lo - float(zero) * d_lo; }
  float offset_hi() const { return -sub_hi - float(zero) * d_hi; }
};

// The scales of a 256-value block's eight chunks at once, for the formats whose Avx2Chunk has
// kBlockScales: lane c is chunk c's d_lo, d_hi (as Chunk's) and offset (offset_lo()). Decoded with a
// few vector steps per block instead of scalar ones per chunk: Q4_K's 225 instructions a block
// (scale unpacking, 40 scalar multiplies) were what bounded its GEMV, not the dot products (one
// thread, 4096 x 14336, weight in cache: 3.3 -> 2.0 ms; bench/NOTES.md).
struct BlockScales {
  __m256 d_lo, d_hi, offset;
};

TORCHEXT_AVX2_INLINE __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
TORCHEXT_AVX2_INLINE __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
TORCHEXT_AVX2_INLINE __m256i high_nibbles(__m256i v) {
  return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
}
// 16 bytes of nibbles (value l low, value l + 16 high) as 32 quants in value order: the bytes in
// both halves (a broadcast load), the upper half shifted, then masked. No cross-lane shuffle: those
// share one port with the scale broadcasts and the 5th-bit spreading.
TORCHEXT_AVX2_INLINE __m256i split_nibbles(const uint8_t* p) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0), _mm256_set1_epi8(0x0F));
}
// Bit l of the 32-bit word bits as 0x10 in byte l (a 5th bit), 0 elsewhere.
TORCHEXT_AVX2_INLINE __m256i bits_to_bit4(uint32_t bits) {
  // byte l takes word byte l / 8, then tests its bit l % 8
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(int(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// The 8 bytes of a word as 8 floats. A function, not a lambda: a lambda returning __m256 in a file
// built without -mavx draws GCC's ABI warning (-Wpsabi) even when it is always inlined.
TORCHEXT_AVX2_INLINE __m256 bytes_to_floats(uint64_t bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(bytes))));
}

// Keyed by the format's traits (QuantTraits<T>), which visit_weight_format hands out.
template <class Traits>
struct Avx2Chunk;

// Q4_K / Q5_K: chunk c is sub-block c: the low (c even) or high nibbles of qs[32 * (c / 2) ..],
// with Q5_K's 5th bits from bit c of qh[0 .. 31].
template <class Block, bool kHasHigh>
struct KQuantChunk {
  static constexpr bool kSigned = false, kHalfScales = false, kHalfMins = false, kBlockScales = true;
  // The 12 scale bytes as words a, b, c hold sub-block j's 6-bit scale and min (kquant_scale_min):
  // j < 4: byte j of a and of b, low 6 bits; j >= 4: the low / high nibble of byte j - 4 of c, with
  // the top two bits of byte j - 4 of a / b above it. As bytes j of two 64-bit words, widened to
  // floats: d * sc and -(dmin * m), the products load() forms.
  TORCHEXT_AVX2_INLINE static BlockScales block_scales(const uint8_t* p) {
    const Block& b = *reinterpret_cast<const Block*>(p);
    uint32_t w[3];
    std::memcpy(w, b.scales, 12);
    const uint32_t six = 0x3f3f3f3fu, nib = 0x0f0f0f0fu, top = 0x30303030u;
    const uint64_t sc = uint64_t(w[0] & six) | uint64_t((w[2] & nib) | ((w[0] >> 2) & top)) << 32;
    const uint64_t m = uint64_t(w[1] & six) | uint64_t(((w[2] >> 4) & nib) | ((w[1] >> 2) & top)) << 32;
    const __m256 d = _mm256_mul_ps(_mm256_set1_ps(half(b.d)), bytes_to_floats(sc));
    const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(half(b.dmin)), bytes_to_floats(m));
    return BlockScales{d, d, _mm256_xor_ps(dm, _mm256_set1_ps(-0.0f))};  // -dm, exactly
  }
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    const Block& b = *reinterpret_cast<const Block*>(p);
    const __m256i qs = load32(b.qs + 32 * (c / 2));
    __m256i q = c % 2 ? high_nibbles(qs) : low_nibbles(qs);
    if constexpr (kHasHigh) {
      const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(load32(b.qh), c), _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    int sc, m;
    kquant_scale_min(b.scales, c, sc, m);
    const float d = half(b.d) * float(sc);
    const float dm = half(b.dmin) * float(m);
    return Chunk{q, d, d, 0, dm, dm};
  }
};
template <> struct Avx2Chunk<QuantTraits<QType::Q4_K>> : KQuantChunk<block_q4_K, false> {};
template <> struct Avx2Chunk<QuantTraits<QType::Q5_K>> : KQuantChunk<block_q5_K, true> {};

// Q6_K: chunk c = 4h + i holds values 128h + 32i + l; signed quants q - 32, sub-block scales of 16.
template <>
struct Avx2Chunk<QuantTraits<QType::Q6_K>> {
  static constexpr bool kSigned = true, kHalfScales = true, kHalfMins = false;  // a scale per 16 values
  static constexpr bool kBlockScales = true;
  // Chunk c's scales are the int8 scales[2c] and scales[2c + 1]: even bytes to d_lo, odd to d_hi.
  TORCHEXT_AVX2_INLINE static BlockScales block_scales(const uint8_t* p) {
    const block_q6_K& b = *reinterpret_cast<const block_q6_K*>(p);
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
    const __m128i split = _mm_shuffle_epi8(sc, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    const __m256 d = _mm256_set1_ps(half(b.d));
    const __m256 lo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(split)));
    const __m256 hi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(split, split))));
    return BlockScales{lo, hi, _mm256_setzero_ps()};
  }
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    const block_q6_K& b = *reinterpret_cast<const block_q6_K*>(p);
    const int h = c / 4, i = c % 4;
    const __m256i ql = load32(b.ql + 64 * h + 32 * (i % 2));
    const __m256i low = i < 2 ? low_nibbles(ql) : high_nibbles(ql);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(load32(b.qh + 32 * h), 2 * i), _mm256_set1_epi8(3));
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
    const float d = half(b.d);
    return Chunk{q, d * float(b.scales[8 * h + 2 * i]), d * float(b.scales[8 * h + 2 * i + 1]), 0, 0.0f, 0.0f};
  }
};

// Q2_K / Q3_K: chunk c = 4h + i holds values 128h + 32i + l, crumb i of qs[32h + l]; scales (and
// Q2_K's mins) of 16 values. Q3_K's 3rd bit is bit c of hmask[l]: signed quants crumb + 4*bit - 4.
TORCHEXT_AVX2_INLINE __m256i chunk_crumbs(const uint8_t* qs, int c) {
  return _mm256_and_si256(_mm256_srli_epi16(load32(qs + 32 * (c / 4)), 2 * (c % 4)), _mm256_set1_epi8(3));
}
template <>
struct Avx2Chunk<QuantTraits<QType::Q2_K>> {
  static constexpr bool kSigned = false, kHalfScales = true, kHalfMins = true;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    using T = QuantTraits<QType::Q2_K>;
    const block_q2_K& b = *reinterpret_cast<const block_q2_K*>(p);
    const uint32_t dd = load_u32<T::kAlign>(reinterpret_cast<const uint8_t*>(&b.d));
    const int lo = b.scales[2 * c], hi = b.scales[2 * c + 1];  // sub-blocks 8h + 2i, 8h + 2i + 1
    return Chunk{chunk_crumbs(b.qs, c), T::scale_of(dd, lo), T::scale_of(dd, hi), 0, T::min_of(dd, lo), T::min_of(dd, hi)};
  }
};
template <>
struct Avx2Chunk<QuantTraits<QType::Q3_K>> {
  static constexpr bool kSigned = true, kHalfScales = true, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    using T = QuantTraits<QType::Q3_K>;
    const block_q3_K& b = *reinterpret_cast<const block_q3_K*>(p);
    const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(load32(b.hmask), c), _mm256_set1_epi8(1));
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(chunk_crumbs(b.qs, c), _mm256_slli_epi16(bit, 2)), _mm256_set1_epi8(4));
    return Chunk{q, T::sub_d(b, 2 * c), T::sub_d(b, 2 * c + 1), 0, 0.0f, 0.0f};
  }
};

template <>
struct Avx2Chunk<QuantTraits<QType::TQ2_0>> {
  static constexpr bool kSigned = true, kHalfScales = false, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    const block_tq2_0& b = *reinterpret_cast<const block_tq2_0*>(p);
    const float d = half(b.d);
    return Chunk{_mm256_sub_epi8(chunk_crumbs(b.qs, c), _mm256_set1_epi8(1)), d, d, 0, 0.0f, 0.0f};
  }
};

template <>
struct Avx2Chunk<QuantTraits<QType::Q8_0>> {
  static constexpr bool kSigned = true, kHalfScales = false, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int) {
    const block_q8_0& b = *reinterpret_cast<const block_q8_0*>(p);
    const float d = half(b.d);
    return Chunk{load32(reinterpret_cast<const uint8_t*>(b.qs)), d, d, 0, 0.0f, 0.0f};
  }
};

// Q4_0 / Q4_1 / Q5_0 / Q5_1: nibbles (and 5th bits), a zero point as the offset -z * d, or a min.
template <class Traits, bool kHasMin, bool kHasHigh>
struct NibbleChunk {
  using Block = typename Traits::block;
  static constexpr bool kSigned = false, kHalfScales = false, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int) {
    const Block& b = *reinterpret_cast<const Block*>(p);
    __m256i q = split_nibbles(b.qs);
    if constexpr (kHasHigh) q = _mm256_or_si256(q, bits_to_bit4(load_u32<Traits::kAlign>(b.qh)));
    const float d = half(b.d);
    if constexpr (kHasMin) return Chunk{q, d, d, 0, -half(b.m), -half(b.m)};
    else return Chunk{q, d, d, Traits::kZero, 0.0f, 0.0f};
  }
};
template <> struct Avx2Chunk<QuantTraits<QType::Q4_0>> : NibbleChunk<QuantTraits<QType::Q4_0>, false, false> {};
template <> struct Avx2Chunk<QuantTraits<QType::Q4_1>> : NibbleChunk<QuantTraits<QType::Q4_1>, true, false> {};
template <> struct Avx2Chunk<QuantTraits<QType::Q5_0>> : NibbleChunk<QuantTraits<QType::Q5_0>, false, true> {};
template <> struct Avx2Chunk<QuantTraits<QType::Q5_1>> : NibbleChunk<QuantTraits<QType::Q5_1>, true, true> {};

// IQ4_NL / IQ4_XS / MXFP4 / NVFP4: nibble indexes (32 bytes of 0..15) looked up in a format's 16
// levels with one byte shuffle: signed quants.
TORCHEXT_AVX2_INLINE __m256i chunk_levels(const int8_t (&table)[16], __m256i nibbles) {
  const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
  return _mm256_shuffle_epi8(levels, nibbles);
}
// IQ4_NL and MXFP4: one scale a block (LevelNibbleTraits' F::scale of F::field).
template <class Traits>
struct LevelNibbleChunk {
  static constexpr bool kSigned = true, kHalfScales = false, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int) {
    using F = typename Traits::Format;
    const typename F::block& b = *reinterpret_cast<const typename F::block*>(p);
    const float d = F::scale(F::field(b));
    return Chunk{chunk_levels(Traits::Levels::kTable, split_nibbles(b.qs)), d, d, 0, 0.0f, 0.0f};
  }
};
template <> struct Avx2Chunk<QuantTraits<QType::IQ4_NL>> : LevelNibbleChunk<QuantTraits<QType::IQ4_NL>> {};
template <> struct Avx2Chunk<QuantTraits<QType::MXFP4>> : LevelNibbleChunk<QuantTraits<QType::MXFP4>> {};
// IQ4_XS: its eight sub-blocks' scales d * (ls - 32) at once (kBlockScales), ls the low nibble j of
// scales_l and bits 2j, 2j+1 of scales_h. Per chunk (sub_d), the scalar unpacking and fp16 conversion
// made it 2.5-3x slower than Q4_K: one thread, one row, best of 9, per chunk / per block, same bits:
// 4096 x 4096 2151 / 845 us, 4096 x 14336 7789 / 2876 us (Q4_K 640-780 and 2210-2880; 2-core Xeon VM
// with other work running, 2026-12-05).
template <>
struct Avx2Chunk<QuantTraits<QType::IQ4_XS>> {
  static constexpr bool kSigned = true, kHalfScales = false, kHalfMins = false, kBlockScales = true;
  TORCHEXT_AVX2_INLINE static BlockScales block_scales(const uint8_t* p) {
    const block_iq4_xs& b = *reinterpret_cast<const block_iq4_xs*>(p);
    uint32_t low;
    std::memcpy(&low, b.scales_l, 4);
    uint64_t ls = 0;
    for (int j = 0; j < 8; ++j) {
      const uint32_t code = ((low >> (4 * j)) & 0xFu) | ((uint32_t(b.scales_h) >> (2 * j) & 3u) << 4);
      ls |= uint64_t(code) << (8 * j);
    }
    const __m256 sub_scales = _mm256_sub_ps(bytes_to_floats(ls), _mm256_set1_ps(32.0f));  // ls - 32, exact
    const __m256 d = _mm256_mul_ps(_mm256_set1_ps(half(b.d)), sub_scales);
    return BlockScales{d, d, _mm256_setzero_ps()};
  }
  // the whole chunk, for dequantize; the GEMV takes only its quants (the scale's arithmetic, unused, goes)
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    const __m256i q = chunk_levels(kIQ4Levels, split_nibbles(reinterpret_cast<const block_iq4_xs*>(p)->qs + 16 * c));
    const float d = QuantTraits<QType::IQ4_XS>::sub_d(p, c);
    return Chunk{q, d, d, 0, 0.0f, 0.0f};
  }
};
// NVFP4: chunk c is the 16 bytes at qs + 16c, sub-blocks 2c and 2c + 1 of 8 bytes each, whose low
// nibbles are values 0..7 and high nibbles 8..15: low and high nibbles interleaved by 8-byte halves.
template <>
struct Avx2Chunk<QuantTraits<QType::NVFP4>> {
  static constexpr bool kSigned = true, kHalfScales = true, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    const block_nvfp4& b = *reinterpret_cast<const block_nvfp4*>(p);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs + 16 * c));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m256i nibbles = _mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi));
    return Chunk{chunk_levels(kFP4Levels, nibbles), ue4m3_half(b.d[2 * c]), ue4m3_half(b.d[2 * c + 1]), 0, 0.0f,
                 0.0f};
  }
};

// Formats decoded by their scalar traits' unpack (UnpackedChunks, quant_traits.h): the grid formats
// IQ2_XXS .. IQ1_M (a grid lookup per 4 or 8 values, then the signs; vector gathers would save little
// next to the integer work) and TQ1_0's base-3 digits; one vector load takes the 32 signed quants.
// Scales per 16 values for IQ2_XS, IQ2_S and IQ1_M.
template <class Traits>
struct UnpackedChunk {
  static constexpr bool kSigned = true, kHalfScales = Traits::kHalfScales, kHalfMins = false;
  TORCHEXT_AVX2_INLINE static Chunk load(const uint8_t* p, int c) {
    alignas(32) uint32_t q[8];
    float d[2];
    Traits::unpack(p, c, q, d);
    return Chunk{_mm256_load_si256(reinterpret_cast<const __m256i*>(q)), d[0], d[1], 0, 0.0f};
  }
};
#define TORCHEXT_GRID_CHUNK(name, id, cpu_gemv_rows, wgmma_rows) \
  template <>                                                    \
  struct Avx2Chunk<QuantTraits<QType::name>> : UnpackedChunk<QuantTraits<QType::name>> {};
TORCHEXT_IQ_GRID_FORMATS(TORCHEXT_GRID_CHUNK)
#undef TORCHEXT_GRID_CHUNK
template <> struct Avx2Chunk<QuantTraits<QType::TQ1_0>> : UnpackedChunk<QuantTraits<QType::TQ1_0>> {};

// Whether format C decodes a block's scales at once (block_scales) rather than per chunk.
template <class C, class = void>
struct HasBlockScales : std::false_type {};
template <class C>
struct HasBlockScales<C, std::enable_if_t<C::kBlockScales>> : std::true_type {};

// The products of a chunk's quants w and an activation block x: as unsigned u times signed s bytes,
// which both instructions below want (signed quants meet x as |w| times x with w's sign).
struct DotOperands {
  __m256i u, s;
};
template <bool kSigned>
TORCHEXT_AVX2_INLINE DotOperands dot_operands(__m256i w, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (kSigned) return DotOperands{_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)};
  else return DotOperands{w, xv};
}

// The instruction sets' tags; each one's dot_lanes gives the same eight int32 sums of four products
// u * s (lanes 0-3: values 0-15, lanes 4-7: values 16-31), exactly.
// AVX2: maddubs (pair sums, exact: |u| <= 128 and |s| <= 127 keep them below 2^15), then madd.
struct Avx2 {
  TORCHEXT_AVX2_INLINE static __m256i dot_lanes(DotOperands o) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(o.u, o.s), _mm256_set1_epi16(1));
  }
};
// VNNI: one vpdpbusd, in its VEX form (AVX-VNNI) or its EVEX one (AVX512-VNNI with AVX512VL, whose
// gemv_rows may also use 32 vector registers).
#define TORCHEXT_AVXVNNI_TARGET TORCHEXT_AVX2_TARGET ",avxvnni"
#define TORCHEXT_AVX512VNNI_TARGET TORCHEXT_AVX2_TARGET ",avx512f,avx512vl,avx512bw,avx512vnni"
struct AvxVnni {
  __attribute__((target(TORCHEXT_AVXVNNI_TARGET), always_inline)) static __m256i dot_lanes(DotOperands o) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), o.u, o.s);
  }
};
struct Avx512Vnni {
  __attribute__((target(TORCHEXT_AVX512VNNI_TARGET), always_inline)) static __m256i dot_lanes(DotOperands o) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), o.u, o.s);
  }
};

// d_x times the sums of a Q8_1 block's quants 0..15 and 16..31, scaled as Q8Scales::s: what mins of 16
// values times kQ8SumScale meet.
struct HalfSums {
  float lo, hi;
};

// Every activation block's scales, decoded once per call: d, s = d * sum(qs) / kQ8SumScale (Q8Scales) as two
// arrays, so that a 256-value weight block's eight are one load each; halves only for kHalfMins.
struct XScales {
  std::vector<float> d, s;
  std::vector<HalfSums> halves;
};

// How far ahead of the block being multiplied its weight row is prefetched, in bytes (each of a
// block's cache lines; prefetches past the weight's end are harmless hints). The
// hardware's streamer stays within a 4 KiB page, so a weight that is not in cache streamed at 8 GB/s
// a core on the 2-core Xeon VM (Q8_0 262144x640, 1 thread); 4, 6 and 8 KiB ahead gave 17.5, 19.2
// and 14.6 GB/s there, 2 threads 36-39 GB/s against 16.8 (bench/NOTES.md, "CPU GEMV: prefetching").
constexpr int kPrefetchAhead = 6144;

#define TORCHEXT_GEMV_ISA Avx2
#define TORCHEXT_GEMV_TARGET TORCHEXT_AVX2_TARGET
#include "csrc/cpu/gemv_q8_1_rows.h"
#undef TORCHEXT_GEMV_ISA
#undef TORCHEXT_GEMV_TARGET
#define TORCHEXT_GEMV_ISA AvxVnni
#define TORCHEXT_GEMV_TARGET TORCHEXT_AVXVNNI_TARGET
#include "csrc/cpu/gemv_q8_1_rows.h"
#undef TORCHEXT_GEMV_ISA
#undef TORCHEXT_GEMV_TARGET
#define TORCHEXT_GEMV_ISA Avx512Vnni
#define TORCHEXT_GEMV_TARGET TORCHEXT_AVX512VNNI_TARGET
#include "csrc/cpu/gemv_q8_1_rows.h"
#undef TORCHEXT_GEMV_ISA
#undef TORCHEXT_GEMV_TARGET

template <class Isa, class T>
void gemv_format(const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int64_t rows, void* out,
                 FloatType ot) {
  const int64_t x_stride = q8_1_blocks_per_row(k);  // a multiple of 8: whole super-blocks
  const size_t count = size_t(rows * x_stride);
  XScales xs{std::vector<float>(count), std::vector<float>(count), {}};
  for (size_t j = 0; j < count; ++j) {
    const Q8Scales sc = Q8Scales::of_word(xq[j].scale);
    xs.d[j] = sc.d, xs.s[j] = sc.s;
  }
  if (Avx2Chunk<T>::kHalfMins) xs.halves.resize(count);
  for (size_t j = 0; j < xs.halves.size(); ++j) {
    int lo = 0, hi = 0;
    for (int l = 0; l < 16; ++l) lo += xq[j].qs[l], hi += xq[j].qs[16 + l];
    const float scale = 1.0f / kQ8SumScale;
    xs.halves[j] = HalfSums{xs.d[j] * (float(lo) * scale), xs.d[j] * (float(hi) * scale)};
  }
  torch::stable::parallel_for(0, n, gemv_grain(k, rows), [&](int64_t begin, int64_t end) {
    // Up to four activation rows share each unpacked chunk.
    const auto rows_from = [&](auto tile, int64_t r0) {
      gemv_rows<T, decltype(tile)::value>(Isa{}, w, k, xq, xs, x_stride, r0, n, begin, end, out, ot);
    };
    int64_t r0 = 0;
    for (; r0 + 4 <= rows; r0 += 4) rows_from(std::integral_constant<int, 4>{}, r0);
    switch (rows - r0) {
      case 3: rows_from(std::integral_constant<int, 3>{}, r0); break;
      case 2: rows_from(std::integral_constant<int, 2>{}, r0); break;
      case 1: rows_from(std::integral_constant<int, 1>{}, r0); break;
      default: break;
    }
  });
}

// A chunk's 32 values as d * (q - zero) - sub, rounded twice as dequantize_chunk does (no FMA): the
// same bits. The bytes are widened from registers, 8 at a time.
template <bool kSigned>
TORCHEXT_AVX2_INLINE void dequantize_chunk_to(const Chunk& ch, void* out, int64_t at, FloatType ot) {
  const __m128i lo = _mm256_castsi256_si128(ch.q), hi = _mm256_extracti128_si256(ch.q, 1);
  const __m128i eights[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  const __m256i zero = _mm256_set1_epi32(ch.zero);
  for (int g = 0; g < 4; ++g) {
    const __m256i q = kSigned ? _mm256_cvtepi8_epi32(eights[g]) : _mm256_cvtepu8_epi32(eights[g]);
    const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, zero));
    store_eight(out, at + 8 * g, ot, _mm256_sub_ps(_mm256_mul_ps(v, _mm256_set1_ps(g < 2 ? ch.d_lo : ch.d_hi)),
                                                   _mm256_set1_ps(g < 2 ? ch.sub_lo : ch.sub_hi)));
  }
}

// Rows a dequantizing thread prefetches ahead, in the columns it walks: gathered rows (an embedding's
// ids) come in no order that the hardware's streamer (within a 4 KiB page) could follow.
constexpr int kPrefetchRows = 4;

// Chunks [begin, end) of the rows_out x k output, counted row by row in chunks of 32 values (the last
// of a row may be partial), stored as kOut (a template argument: the stores then carry no branch on the
// type). A span is a run of whole rows, or part of one row where there are fewer rows than threads.
template <class Traits, FloatType kOut>
TORCHEXT_AVX2 void dequantize_span(const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out,
                                   int64_t begin, int64_t end, void* out) {
  using C = Avx2Chunk<Traits>;
  constexpr int kChunks = Traits::kValues / kQ8Block, kChunkBytes = Traits::kBytes / kChunks;
  const int64_t row_bytes = weight_row_bytes<Traits>(k);
  const int64_t chunks = (k + 31) / 32, whole = k / 32;  // a last partial chunk goes the scalar way
  for (int64_t i = begin / chunks; i < rows_out && i * chunks < end; ++i) {
    const int64_t src = rows.source(i, n);
    const int64_t ahead = i + kPrefetchRows < rows_out ? rows.source(i + kPrefetchRows, n) : -1;
    const int64_t c_begin = std::max<int64_t>(begin - i * chunks, 0), c_end = std::min(end - i * chunks, chunks);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t at = c / kChunks * Traits::kBytes + c % kChunks * kChunkBytes;  // the chunk's bytes in a row
      if (ahead >= 0) _mm_prefetch(reinterpret_cast<const char*>(w + ahead * row_bytes + at), _MM_HINT_T0);
      const uint8_t* blk = src >= 0 ? w + src * row_bytes + c / kChunks * Traits::kBytes : nullptr;
      if (src >= 0 && c < whole) {
        dequantize_chunk_to<C::kSigned>(C::load(blk, int(c % kChunks)), out, i * k + 32 * c, kOut);
        continue;
      }
      float v[32];
      if (src < 0) std::fill(v, v + 32, std::nanf(""));  // an id out of range
      else Traits::dequantize_chunk(blk, int(c % kChunks), v);
      for (int l = 0; l < 32 && 32 * c + l < k; ++l) store_float(out, i * k + 32 * c + l, kOut, v[l]);
    }
  }
}

}  // namespace

namespace {
// The kernel sets by the names TORCHEXT_CPU_KERNELS and torchext.info give them, lesser first.
constexpr struct {
  const char* name;
  X86Kernels kernels;
} kKernelSets[] = {{"portable", X86Kernels::kPortable},
                   {"avx2", X86Kernels::kAvx2},
                   {"avxvnni", X86Kernels::kAvxVnni},
                   {"avx512vnni", X86Kernels::kAvx512Vnni}};
}  // namespace

X86Kernels cpu_kernels() {
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avxvnni = avx2 && __builtin_cpu_supports("avxvnni");
  const bool avx512vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  const auto runs = [&](X86Kernels set) {
    return set == X86Kernels::kPortable || (set == X86Kernels::kAvx2 && avx2) ||
           (set == X86Kernels::kAvxVnni && avxvnni) || (set == X86Kernels::kAvx512Vnni && avx512vnni);
  };
  const char* env = std::getenv("TORCHEXT_CPU_KERNELS");
  const std::string choice = env ? env : "";
  if (choice.empty() || choice == "auto") {  // the best set the CPU runs
    for (int i = std::size(kKernelSets) - 1; i > 0; --i)
      if (runs(kKernelSets[i].kernels)) return kKernelSets[i].kernels;
    return X86Kernels::kPortable;
  }
  // TORCHEXT_CPU_KERNELS names lesser kernels (portable: what a CPU without AVX2 runs), so that each
  // can be tested and compared on one CPU.
  for (const auto& set : kKernelSets) {
    if (choice != set.name) continue;
    TORCHEXT_CHECK(runs(set.kernels), "TORCHEXT_CPU_KERNELS=", choice, ": this CPU lacks its instructions");
    return set.kernels;
  }
  std::string names = "'auto'";
  for (const auto& set : kKernelSets) names += std::string(", '") + set.name + "'";
  fail("TORCHEXT_CPU_KERNELS: expected one of ", names, ", got '", choice, "'");
}

const char* kernel_set_name(X86Kernels set) {
  for (const auto& s : kKernelSets)
    if (s.kernels == set) return s.name;
  return "?";
}

void gemv_q8_1_x86(X86Kernels isa, QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                   int64_t rows, void* out, FloatType ot) {
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    if (isa == X86Kernels::kAvx512Vnni) gemv_format<Avx512Vnni, T>(w, n, k, xq, rows, out, ot);
    else if (isa == X86Kernels::kAvxVnni) gemv_format<AvxVnni, T>(w, n, k, xq, rows, out, ot);
    else gemv_format<Avx2, T>(w, n, k, xq, rows, out, ot);
  });
  if (!known) fail_unknown_format(wt, "gemv_q8_1");
}

void dequantize_avx2(QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out, void* out,
                     FloatType ot) {
  // The threads split the output's 32-value chunks in row order: runs of whole rows, and one row (an
  // embedding lookup) across every thread. (The dense qmatmul path calls this inside its own parallel
  // region, where it runs on the calling thread alone.)
  const int64_t chunks = (k + 31) / 32;
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    torch::stable::parallel_for(0, rows_out * chunks, parallel_grain(32), [&](int64_t begin, int64_t end) {
      if (ot == FloatType::F32) dequantize_span<T, FloatType::F32>(w, n, k, rows, rows_out, begin, end, out);
      else if (ot == FloatType::F16) dequantize_span<T, FloatType::F16>(w, n, k, rows, rows_out, begin, end, out);
      else dequantize_span<T, FloatType::BF16>(w, n, k, rows, rows_out, begin, end, out);
    });
  });
  if (!known) fail_unknown_format(wt, "dequantize");
}

}  // namespace torchext::cpu

#endif  // x86-64
