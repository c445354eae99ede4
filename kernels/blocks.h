// GGUF block formats, bit-compatible with llama.cpp (layout per ggml/src/ggml-common.h).
// Shared by the CPU kernels (csrc/cpu) and the CUDA kernels (kernels/): the one place
// where a block's size and field order are written down.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define TORCHEXT_HD __host__ __device__ __forceinline__
#define TORCHEXT_UNROLL _Pragma("unroll")
#else
#define TORCHEXT_HD inline
#define TORCHEXT_UNROLL
#endif

namespace torchext {

// The format catalog: every weight format torchext runs, as X(name, gguf GGMLQuantizationType id,
// CPU GEMV rows, wgmma rows). Everything that lists or dispatches on formats expands it: the QType
// ids below, their names (qtype_name), the format visit every kernel dispatches through
// (quant_traits.h), the error messages that list the formats and the batch policy. Adding a format
// means: its block struct here, its QuantTraits (quant_traits.h), its row in this table and in
// torchext/formats.py's FORMATS, its CPU GEMV rows in torchext/formats.py's CPU_GEMV_MAX_ROWS, and
// tests. torchext/formats.py takes the ids from the `gguf` package; tests/test_formats.py checks
// that the two tables agree.
// CPU GEMV rows: the most activation rows qmatmul sends to the CPU's Q8_1 GEMV (batch_policy.h,
// cpu_max_gemv_rows, says how they were measured); beside each, ms GEMV / dense path, 2 threads,
// 4096x4096 fp32, at that many rows and at the next step measured (1T: one thread). wgmma rows: the
// most rows qmatmul sends to the Hopper tiled GEMM where it runs (kMaxWgmmaRows, or past it in
// chunks of that many; batch_policy.h, wgmma_max_rows, has the measurements).
#define TORCHEXT_WEIGHT_FORMATS(X)                                                       \
  X(Q4_0, 2, 16, 256)    /* 4.4 / 4.7, 24 rows 7.1 / 5.7 */                              \
  X(Q4_1, 3, 16, 256)    /* 4.9 / 4.7, 24 rows 6.9 / 5.4; 1T 10.1 / 17.6 */              \
  X(Q5_0, 6, 16, 256)    /* 5.0 / 4.9, 24 rows 7.6 / 6.1; 1T 9.4 / 15.9 */               \
  X(Q5_1, 7, 16, 256)    /* 5.3 / 5.0, 24 rows 7.7 / 5.6; 1T 11.1 / 17.1 */              \
  X(Q8_0, 8, 16, 256)    /* 4.6 / 5.2, 24 rows 7.0 / 5.8 */                              \
  X(Q2_K, 10, 8, 256)    /* 4.3 / 4.9, 12 rows 6.2 / 5.8 (1T 12.2 / 11.6) */             \
  X(Q3_K, 11, 16, 256)   /* 7.2 / 6.8, 24 rows 10.9 / 7.6; 1T 15.9 / 21.5 */             \
  X(Q4_K, 12, 48, 512)   /* 8.2 / 8.6, 64 rows 12.0 / 12.3; 1T 64 rows 23.6 / 28.8 */    \
  X(Q5_K, 13, 32, 512)   /* 6.2 / 7.1, 48 rows 9.1 / 8.8 */                              \
  X(Q6_K, 14, 16, 512)   /* 4.9 / 5.7, 24 rows 7.3 / 6.7 */                              \
  X(IQ4_NL, 20, 16, 256) /* 5.7 / 5.1, 24 rows 8.4 / 5.8; 1T 9.4 / 14.8 */               \
  X(IQ4_XS, 23, 24, 256) /* 6.0 / 6.5, 32 rows 8.3 / 7.7 */                              \
  X(TQ2_0, 35, 16, 256)  /* 5.0 / 5.3, 24 rows 7.3 / 6.1 */                              \
  X(TQ1_0, 34, 16, 256)  /* 7.8 / 7.0, 24 rows 11.6 / 7.8; 1T 12.5 / 17.9 */             \
  X(MXFP4, 39, 16, 256)  /* 5.4 / 4.9, 24 rows 7.9 / 5.6; 1T 9.4 / 15.4 */               \
  X(NVFP4, 40, 4, 256)   /* 3.5 / 5.6, 8 rows 6.7 / 6.4 */                               \
  TORCHEXT_IQ_GRID_FORMATS(X)

// The grid-based imatrix formats, the catalog's last rows (blocks below, traits in
// quant_traits_iq_grid.h).
#define TORCHEXT_IQ_GRID_FORMATS(X)                                                      \
  X(IQ2_XXS, 16, 4, 256) /* 3.5 / 5.7, 8 rows 6.9 / 6.4 */                               \
  X(IQ2_XS, 17, 4, 256)  /* 5.8 / 5.9, 8 rows 11.6 / 6.9 */                              \
  X(IQ3_XXS, 18, 8, 256) /* 5.5 / 5.8, 12 rows 8.0 / 6.7 */                              \
  X(IQ1_S, 19, 4, 256)   /* 3.0 / 4.7, 8 rows 6.1 / 5.5 */                               \
  X(IQ3_S, 21, 8, 256)   /* 6.4 / 7.9, 12 rows 9.5 / 8.5 */                              \
  X(IQ2_S, 22, 4, 256)   /* 4.8 / 5.8, 8 rows 9.4 / 6.7 */                               \
  X(IQ1_M, 29, 4, 256)   /* 4.1 / 6.6, 8 rows 8.2 / 7.4 */

enum class QType : int64_t {
#define TORCHEXT_QTYPE_ID(name, id, cpu_gemv_rows, wgmma_rows) name = id,
  TORCHEXT_WEIGHT_FORMATS(TORCHEXT_QTYPE_ID)
#undef TORCHEXT_QTYPE_ID
  Q8_1 = 9,  // the activation format (block_q8_1 below), not a weight format
};

constexpr int kSuperBlock = 256;  // values in one k-quant super-block (QK_K)
constexpr int kQ8Block = 32;      // values in one Q8_1 activation block

// fp16 fields are kept as raw bits so that host code needs no half type.
using fp16_bits = uint16_t;

// Activations: x[i] = d * qs[i]. ggml's block_q8_1 holds fp16 d and fp16 s (the sum of the inputs);
// fp16 overflows for |x| above about 8e6 (d) or a block sum above 65504 (s, so |x| ~ 2e3 already)
// and flushes blocks below about 1e-5 to zero. torchext keeps the 36 bytes and widens the first
// word: the fp32 bits of d rounded up to 10 mantissa bits (fp16's precision, fp32's range), whose
// low 13 bits hold sum(qs) as a two's-complement integer (|sum| <= 32 * 127 < 2^12). The dot products
// meet a weight block's offset with d * sum(qs), the rounded inputs, as llama.cpp's MMVQ does (the
// sum of the unrounded inputs does not cancel the rounding of the scaled term). Encoding and
// decoding: float_types.h (q8_1_scale_word) and q8_1_rows.h (Q8Scales::of_word).
struct block_q8_1 {
  uint32_t scale;  // d and sum(qs), as above
  int8_t qs[32];
};
struct block_q4_K {  // 8 sub-blocks of 32: x = d*sc[j]*q - dmin*m[j], 6-bit sc/m packed in scales
  fp16_bits d;
  fp16_bits dmin;
  uint8_t scales[12];
  uint8_t qs[128];  // byte 32*g + l: low nibble = value 64g + l, high nibble = value 64g + 32 + l
};
struct block_q5_K {  // as Q4_K, plus a 5th bit per value
  fp16_bits d;
  fp16_bits dmin;
  uint8_t scales[12];
  uint8_t qh[32];  // bit j of qh[l] is the 5th bit of value 32*j + l
  uint8_t qs[128];
};
struct block_q6_K {  // 16 sub-blocks of 16: x = d*scales[j]*(q - 32), q 6 bits
  uint8_t ql[128];  // low 4 bits, two values per byte
  uint8_t qh[64];   // high 2 bits, four values per byte
  int8_t scales[16];
  fp16_bits d;
};
// Q2_K / Q3_K: value 128h + 32i + l (h = 0..1, i = 0..3, l = 0..31) is bits 2i, 2i+1 of qs[32h + l];
// 16 sub-blocks of 16 values, sub-block 8h + 2i + l/16.
struct block_q2_K {  // x = d*sc*q - dmin*m, sc / m the low / high nibble of scales[sub-block]
  uint8_t scales[16];
  uint8_t qs[64];
  fp16_bits d;
  fp16_bits dmin;
};
struct block_q3_K {  // x = d*(s - 32)*(q - 4*(1 - hbit)), s a 6-bit scale
  uint8_t hmask[32];   // bit 4h + i of hmask[l]: value 128h + 32i + l's 3rd bit
  uint8_t qs[64];
  uint8_t scales[12];  // s of sub-block j: low 4 bits nibble j/8 of byte j%8, high 2 bits bits 2(j/4) of byte 8 + j%4
  fp16_bits d;
};
struct block_q8_0 {  // x = d * qs[i]
  fp16_bits d;
  int8_t qs[32];
};
struct block_q4_0 {  // x = d * (q - 8); byte l: low nibble = value l, high nibble = value l + 16
  fp16_bits d;
  uint8_t qs[16];
};
struct block_q4_1 {  // x = d * q + m
  fp16_bits d;
  fp16_bits m;
  uint8_t qs[16];
};
struct block_q5_0 {  // x = d * (q - 16); bit i of qh (little-endian u32) is value i's 5th bit
  fp16_bits d;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct block_q5_1 {  // x = d * q + m
  fp16_bits d;
  fp16_bits m;
  uint8_t qh[4];
  uint8_t qs[16];
};

struct block_tq2_0 {  // ternary: x = d * (q - 1), q the crumb of a value laid out as Q2_K's (0..2)
  uint8_t qs[64];
  fp16_bits d;
};

// TQ1_0: ternary, 5 values a byte in base 3 (3^5 = 243 <= 256), x = d * (digit - 1). A byte b holding
// digits t0 .. t4 (t0 the most significant) is ceil(256 * (81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) / 243), so
// digit j is ((b * 3^j mod 256) * 3) >> 8. Value 32j + l (j = 0..4, l = 0..31) is digit j of qs[l],
// value 160 + 16j + l (l = 0..15) digit j of qs[32 + l], value 240 + 4j + l (j = 0..3, l = 0..3) digit j
// of qh[l] (whose 5th digit is always 0).
struct block_tq1_0 {
  uint8_t qs[48];
  uint8_t qh[4];
  fp16_bits d;
};

// FP4 E2M1 codes: a nibble indexes the doubled E2M1 values kFP4Levels (quant_traits.h), 0, 1, 2, 3, 4,
// 6, 8, 12 and their negatives, as llama.cpp's kvalues_mxfp4; the block scale carries the halving.
struct block_mxfp4 {  // 32 values: x = 2^(e - 128) * level[q]; byte l: low nibble value l, high nibble l + 16
  uint8_t e;          // E8M0 exponent: the OCP MX scale 2^(e - 127), halved
  uint8_t qs[16];
};
struct block_nvfp4 {  // 64 values in 4 sub-blocks of 16: x = ue4m3(d[s]) / 2 * level[q]
  uint8_t d[4];       // unsigned E4M3 scale of sub-block s (bias 7; codes 0 and 0x7F decode to 0)
  uint8_t qs[32];     // bytes 8s .. 8s+7: low nibble value 16s + l, high nibble value 16s + 8 + l
};

static_assert(sizeof(block_q8_1) == 36, "Q8_1 block is 36 bytes");
// IQ4_NL / IQ4_XS (non-linear 4-bit): each nibble indexes the 16 levels of kIQ4Levels (quant_traits.h).
struct block_iq4_nl {  // 32 values: x = d * level[q]; byte l: low nibble value l, high nibble value l + 16
  fp16_bits d;
  uint8_t qs[16];
};
struct block_iq4_xs {  // 8 sub-blocks of 32: x = d * (ls - 32) * level[q], ls a 6-bit scale
  fp16_bits d;
  uint16_t scales_h;    // bits 2j, 2j+1: the high 2 bits of sub-block j's ls
  uint8_t scales_l[4];  // nibble j % 2 of byte j / 2: its low 4 bits
  uint8_t qs[128];      // bytes 16j .. 16j+15: sub-block j, low nibble value l, high nibble value l + 16
};

static_assert(sizeof(block_q2_K) == 84, "Q2_K block is 84 bytes");
static_assert(sizeof(block_q3_K) == 110, "Q3_K block is 110 bytes");
static_assert(sizeof(block_tq2_0) == 66, "TQ2_0 block is 66 bytes");
static_assert(sizeof(block_tq1_0) == 54, "TQ1_0 block is 54 bytes");
static_assert(sizeof(block_mxfp4) == 17, "MXFP4 block is 17 bytes");
static_assert(sizeof(block_nvfp4) == 36, "NVFP4 block is 36 bytes");

// Grid-based imatrix formats: 256 values in 8 sub-blocks of 32 (sub-block j: values 32j ..); each
// group of 8 values (IQ3: 4) is a point of a fixed grid (kernels/iq_grids.h) chosen by an index, with
// a sign per value (x = scale * grid value * sign) and a 4-bit scale ls per sub-block (IQ2_XS, IQ2_S:
// per 16 values).
struct block_iq2_xxs {  // x = d * (0.5 + ls) / 4 * grid * sign
  fp16_bits d;
  uint16_t qs[32];  // sub-block j: qs[4j .. 4j+3] as two words: 4 grid indexes (a byte per 8 values),
                    // then 4 7-bit indexes of sign patterns (7g .. 7g+6) and ls (bits 28-31)
};
struct block_iq2_xs {  // x = d * (0.5 + ls) / 4 * grid * sign
  fp16_bits d;
  uint16_t qs[32];     // qs[4j + g]: values 8g .. 8g+7 of sub-block j: 9-bit grid index | 7-bit sign pattern << 9
  uint8_t scales[8];   // scales[j]: ls of values 0 .. 15 (low nibble) and 16 .. 31 (high)
};
struct block_iq2_s {  // x = d * (0.5 + ls) / 4 * grid * sign
  fp16_bits d;
  uint8_t qs[32];      // qs[4j + g]: low 8 bits of the 10-bit grid index of values 8g .. 8g+7
  uint8_t signs[32];   // bit i of signs[4j + g]: value 8g + i is negative
  uint8_t qh[8];       // bits 2g, 2g+1 of qh[j]: the index's high bits
  uint8_t scales[8];   // as IQ2_XS
};
struct block_iq3_xxs {  // x = d * (0.5 + ls) / 2 * grid * sign
  fp16_bits d;
  uint8_t qs[64];            // grid indexes, a byte per 4 values
  uint8_t signs_scales[32];  // sub-block j: bytes 4j .. 4j+3 as a word: 4 7-bit indexes of sign
                             // patterns (bits 7g .. 7g+6: values 8g .. 8g+7) and ls (bits 28-31)
};
struct block_iq3_s {  // x = d * (1 + 2 ls) * grid * sign
  fp16_bits d;
  uint8_t qs[64];     // low 8 bits of the 9-bit grid index, a byte per 4 values
  uint8_t qh[8];      // bit i of qh[j]: the 9th bit of qs[8j + i]'s index
  uint8_t signs[32];  // bit i of signs[l]: value 8l + i is negative
  uint8_t scales[4];  // nibble j % 2 of scales[j / 2]: ls of sub-block j
};
struct block_iq1_s {  // x = d * (2 ls + 1) * (grid + delta), grid values -1, 0, 1, delta +-1/8
  fp16_bits d;
  uint8_t qs[32];   // qs[4j + g]: low 8 bits of the 11-bit grid index of values 8g .. 8g+7
  uint16_t qh[8];   // qh[j]: bits 3g .. 3g+2 the indexes' high bits, 12-14 ls, 15 delta < 0
};
struct block_iq1_m {  // x = d * (2 ls + 1) * (grid + delta), as IQ1_S with ls and delta per 16 / 8 values
  uint8_t qs[32];       // as IQ1_S
  uint8_t qh[16];       // nibble g % 2 of qh[2j + g / 2]: the index's high 3 bits, bit 3 delta < 0
  uint16_t scales[4];   // ls of values 16s .. 16s+15 (s = 0..15) in bits 3(s % 4) of scales[s / 4];
                        // bits 12-15 of scales[w]: bits 4w .. 4w+3 of the fp16 d
};

static_assert(sizeof(block_q4_K) == 144, "Q4_K block is 144 bytes");
static_assert(sizeof(block_q5_K) == 176, "Q5_K block is 176 bytes");
static_assert(sizeof(block_q6_K) == 210, "Q6_K block is 210 bytes");
static_assert(sizeof(block_iq4_nl) == 18, "IQ4_NL block is 18 bytes");
static_assert(sizeof(block_iq4_xs) == 136, "IQ4_XS block is 136 bytes");
static_assert(sizeof(block_iq2_xxs) == 66, "IQ2_XXS block is 66 bytes");
static_assert(sizeof(block_iq2_xs) == 74, "IQ2_XS block is 74 bytes");
static_assert(sizeof(block_iq2_s) == 82, "IQ2_S block is 82 bytes");
static_assert(sizeof(block_iq3_xxs) == 98, "IQ3_XXS block is 98 bytes");
static_assert(sizeof(block_iq3_s) == 110, "IQ3_S block is 110 bytes");
static_assert(sizeof(block_iq1_s) == 50, "IQ1_S block is 50 bytes");
static_assert(sizeof(block_iq1_m) == 56, "IQ1_M block is 56 bytes");
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block is 34 bytes");
static_assert(sizeof(block_q4_0) == 18, "Q4_0 block is 18 bytes");
static_assert(sizeof(block_q4_1) == 20, "Q4_1 block is 20 bytes");
static_assert(sizeof(block_q5_0) == 22, "Q5_0 block is 22 bytes");
static_assert(sizeof(block_q5_1) == 24, "Q5_1 block is 24 bytes");

// ---- fp32 bit patterns, and fp16 <-> fp32 bit-exact on host and device (round to nearest even) ----

TORCHEXT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
TORCHEXT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}


TORCHEXT_HD float fp16_to_float(fp16_bits h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    uint32_t e = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return bits_float(bits);
#endif
}

TORCHEXT_HD fp16_bits float_to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan (keep nan quiet)
    return fp16_bits(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u | ((absx >> 13) & 0x3ffu) : 0u));
  }
  if (absx >= 0x477ff000u) return fp16_bits(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (absx < 0x38800000u) {  // below 2^-14: subnormal or zero
    if (absx < 0x33000000u) return fp16_bits(sign);  // below half the smallest subnormal
    const uint32_t e = absx >> 23;
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // value = mant * 2^(e-150); unit = 2^-24
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return fp16_bits(sign | q);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return fp16_bits(sign | r);
#endif
}

}  // namespace torchext
