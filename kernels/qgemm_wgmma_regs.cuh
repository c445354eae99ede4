// The Hopper GEMM with the dequantized weights as wgmma's A operand in registers, for the formats that
// say how a thread builds its fragments (RegFragments below: Q4_K, Q5_K, Q6_K); qgemm_wgmma.cu launches it, and the
// other formats take qgemm_wgmma.cuh's kernel, which stages them in shared memory.
//
// A CTA owns 128 weight rows x Tile::kM activation rows (32, 64, 128, or 256 past 128 rows). Warpgroups 0 and 1
// each take 64 of the weight rows: thread (warp w, lane 4g + t) dequantizes rows 16w + g and + 8 of its
// warpgroup's, values 2t, 2t + 1, 2t + 8, 2t + 9 of every 16, straight into the A fragment of m64n32k16,
// m64n64k16 or m64n128k16, and issues the MMAs against the activation stage (B, in shared memory). The
// fragments of stage j + 1 are computed while the MMAs of stage j run. Warpgroup 2 copies: one thread the raw
// weight chunks, one the activation stages, both by the tensor memory accelerator (zeros past the
// weight's rows and K).
// Against the shared-memory kernel this drops the dequantized tile's stores, proxy fences and
// barriers, and the dequantizing warps' share of the register file: Q4_K 9-28% faster at 65-512
// rows, Q6_K 25-39% at 33-256 (bench/NOTES.md, twenty-ninth and thirty-first sessions); below 33 rows it
// replaced the mma.sync kernels' tiles (batch_policy.h, kMinWgmmaRegsRows).
#pragma once

#include <cstddef>

#include "kernels/qgemm_wgmma.cuh"

namespace torchext::qgemm {
namespace {

constexpr int kRegsThreads = 3 * 128;

// kSubs m64n(kMmaN) MMAs a 16-value step; kCtas CTAs an SM. Registers: kLaunchRegs a thread at launch (the
// register file's share of kCtas x 384 threads), of which the copy warpgroup keeps kCopyRegs and gives the rest
// to the MMA warpgroups (kMathRegs): 168, 40 and 232 at one CTA an SM, 80, 24 and 104 at two.
template <int M, int Ctas = 1>
struct RegsTile {
  static constexpr int kM = M, kN = 128, kMmaN = M < 128 ? M : 128, kSubs = M / kMmaN, kCtas = Ctas;
  static constexpr int kLaunchRegs = 65536 / (kRegsThreads * kCtas) / 8 * 8;
  static constexpr int kCopyRegs = kCtas == 1 ? 40 : 24;
  static constexpr int kMathRegs = (kLaunchRegs + (kLaunchRegs - kCopyRegs) / 2) / 8 * 8;
  static_assert((kMathRegs - kLaunchRegs) * 256 <= (kLaunchRegs - kCopyRegs) * 128,
                "the MMA warpgroups take no more registers than the copy warpgroup gives back");
};
using RegsTileShort = RegsTile<32>;
using RegsTileNarrow = RegsTile<64>;
// The 32- and 64-row tiles at two CTAs an SM (qgemm_wgmma.cu, visit_wgmma_tile, says where): their 16 and 32
// accumulators a thread fit the 104 registers (ptxas: no spills, for Q4_K, Q5_K and Q6_K, bf16 and fp16, exact
// or not).
using RegsTileShortPaired = RegsTile<32, 2>;
using RegsTileNarrowPaired = RegsTile<64, 2>;
using RegsTileWide = RegsTile<128>;
using RegsTileTall = RegsTile<256>;

// The quants of v & kMask (each below 2^7, in the halves of a word) as reg_pair takes them: as they are for
// the exact conversion, else under 0x43 (bf16 2^7 + q), the mask and the bias in one LOP3 (ptxas keeps two
// immediates as two instructions: the bias goes in as a register).
template <bool kExact, uint32_t kMask>
__device__ __forceinline__ uint32_t pair_quants(uint32_t v) {
  if constexpr (kExact) {
    return v & kMask;
  } else {
    uint32_t q;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(q) : "r"(v), "n"(kMask), "r"(0x43004300u));  // (v & mask) | bias
    return q;
  }
}

// Quants q0, q1 in the halves of p (pair_quants) as d * q + m in H, (d, m) = s from scale_entry: exact,
// each an fp32 fma rounded to H (q through its bits under 2^23), as dequantize computes it; else in
// bf16, as packed_pair: 0x43 over q is bf16 2^7 + q, taking 2^7 away is exact, and one fma rounds.
template <class H, bool kExact>
__device__ __forceinline__ uint32_t reg_pair(uint32_t p, float2 s) {
  if constexpr (kExact) {
    const float q0 = __uint_as_float(__byte_perm(p, 0x4B000000u, 0x7410)) - 8388608.0f;
    const float q1 = __uint_as_float(__byte_perm(p, 0x4B000000u, 0x7432)) - 8388608.0f;
    return pack_pair<H>(fmaf(s.x, q0, s.y), fmaf(s.x, q1, s.y));
  } else {
    constexpr uint32_t kOne = 0x3F803F80u, kMinusBias = 0xC300C300u;  // 1, -2^7
    return fma_bf16x2(fma_bf16x2(p, kOne, kMinusBias), __float_as_uint(s.x),
                      __float_as_uint(s.y));
  }
}

// the word at shared address addr + offset (a constant after unrolling: ptxas puts it in the load's
// immediate, where a generic pointer's conversion took an add a load)
__device__ __forceinline__ uint32_t lds32_at(uint32_t addr, int offset) {
  uint32_t v;
  asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr + offset));
  return v;
}
__device__ __forceinline__ uint32_t lds32(const void* p) { return lds32_at(smem_addr(p), 0); }
__device__ __forceinline__ uint32_t lds16(const void* p) {  // zero-extended into 32 bits
  uint32_t v;
  asm("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(smem_addr(p)));
  return v;
}

// How a thread builds its A fragments from a raw chunk: kHas, and for the formats that have it, Rows
// (what the thread reads once a chunk for its two weight rows: open) and stage<Q>(rows, f), the
// fragments f[kk] of the chunk's 64-value stage Q, f[kk][i]: A register i of 16-value step kk.
template <class T>
struct RegFragments {
  static constexpr bool kHas = false;
};

// Q4_K and Q5_K: stage Q is sub-blocks 2Q (low nibbles of qs bytes 32Q .. 32Q + 31) and 2Q + 1 (their
// high nibbles); steps 0 and 1 are the low nibbles of bytes 32Q .. + 15 and + 16 .. + 31, steps 2 and 3
// the high ones. Lane t needs bytes 2t, 2t + 1, 2t + 8, 2t + 9 of each 16: two words and one byte_perm
// (Q5_K: the same of qh, whose bit j is the 5th bit of sub-block j's value).
template <bool kHasHigh>
struct KQuantRegFragments {
  static constexpr bool kHas = true;
  static_assert(WeightChunk<QuantTraits<kHasHigh ? QType::Q5_K : QType::Q4_K>>::kBytes % 16 == 0,
                "open's 16-byte load: every chunk starts its box row");
  static constexpr int kQs = kHasHigh ? 48 : 16;  // the quants' offset in the block (Q5_K: qh[32] first)
  struct Rows {
    uint32_t lane[2];     // the shared address of the word at 4 (t / 2) in the chunk's block of rows g and g + 8
    uint32_t head[2][4];  // their first 16 bytes: d, dmin, the packed scales
    float d[2], dmin[2];
    uint32_t sel;  // bytes 2t, 2t + 8, 2t + 1, 2t + 9 of the words at 4 (t / 2) and + 8
  };
  __device__ __forceinline__ static void open(const uint8_t* row0, const uint8_t* row1, int t, Rows& r) {
    r.sel = t % 2 ? 0x7362u : 0x5140u;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint8_t* block = i == 0 ? row0 : row1;
      r.lane[i] = smem_addr(block) + 4 * (t / 2);
      const uint4 h = lds128(block);
      r.head[i][0] = h.x, r.head[i][1] = h.y, r.head[i][2] = h.z, r.head[i][3] = h.w;
      r.d[i] = fp16_to_float(fp16_bits(h.x & 0xFFFFu));
      r.dmin[i] = fp16_to_float(fp16_bits(h.x >> 16));
    }
  }
  // the quants of bytes b and b + 2 of x (b = 0, 1), nibble n, sub-block j, in the halves of a word (pair_quants)
  template <bool kExact, int b, int n, int j>
  __device__ __forceinline__ static uint32_t quants(uint32_t x, uint32_t xh) {
    uint32_t q = pair_quants<kExact, 0x000F000Fu>(x >> (8 * b + 4 * n));
    if constexpr (kHasHigh) q |= ((xh >> (8 * b + j)) & 0x00010001u) << 4;
    return q;
  }
  template <class H, bool kExact, int Q>
  __device__ __forceinline__ static void stage(const Rows& r, int t, uint32_t (&f)[4][4]) {
    float2 lo[2], hi[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int sc, m;
      kquant_scale_min(r.head[i][1], r.head[i][2], r.head[i][3], 2 * Q, sc, m);
      lo[i] = scale_entry<H, kExact>(r.d[i] * float(sc), -r.dmin[i] * float(m));
      kquant_scale_min(r.head[i][1], r.head[i][2], r.head[i][3], 2 * Q + 1, sc, m);
      hi[i] = scale_entry<H, kExact>(r.d[i] * float(sc), -r.dmin[i] * float(m));
    }
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int q = kQs + 32 * Q + 16 * e;
        const uint32_t x = __byte_perm(lds32_at(r.lane[i], q), lds32_at(r.lane[i], q + 8), r.sel);
        uint32_t xh = 0;
        if constexpr (kHasHigh)
          xh = __byte_perm(lds32_at(r.lane[i], 16 + 16 * e), lds32_at(r.lane[i], 24 + 16 * e), r.sel);
        f[e][i] = reg_pair<H, kExact>(quants<kExact, 0, 0, 2 * Q>(x, xh), lo[i]);  // values 2t, 2t + 1 of row i
        f[e][2 + i] = reg_pair<H, kExact>(quants<kExact, 1, 0, 2 * Q>(x, xh), lo[i]);  // 2t + 8, 2t + 9
        f[2 + e][i] = reg_pair<H, kExact>(quants<kExact, 0, 1, 2 * Q + 1>(x, xh), hi[i]);
        f[2 + e][2 + i] = reg_pair<H, kExact>(quants<kExact, 1, 1, 2 * Q + 1>(x, xh), hi[i]);
      }
  }
};
template <>
struct RegFragments<QuantTraits<QType::Q4_K>> : KQuantRegFragments<false> {};
template <>
struct RegFragments<QuantTraits<QType::Q5_K>> : KQuantRegFragments<true> {};

// Q6_K (quant_traits.h): stage Q is half h = Q / 2's quarters i = 2 (Q % 2) and + 1, whose low 4 bits are
// nibble Q % 2 of ql[64h + l] and ql[64h + 32 + l] and whose high 2 bits are bits 2i, 2i + 1 of
// qh[32h + l]; step kk takes quarter 2 (Q % 2) + kk / 2, l = 16 (kk % 2) .. + 15, scale scales[4Q + kk].
// Blocks are 210 bytes, so a chunk starts 2 bytes past a word in every other chunk: lane t's bytes 2t, 2t + 1
// (and 2t + 8, 2t + 9) of each 16 then sit in either half of a word, so open() sets the lane's word offset
// (-2 .. 6 from the 16: the copy starts at the 16-byte boundary below the chunk, so 2 bytes before a block
// are in the slot) and byte_perm selector once a chunk; stage() reads two words and permutes, as Q4_K.
// Values are q - 32 for q = 0 .. 63: d (q - 32) = d q - 32 d, one fma as for the formats with a min (and
// exact: the same fp32 value as dequantize's d (q - 32)).
template <>
struct RegFragments<QuantTraits<QType::Q6_K>> {
  static constexpr bool kHas = true;
  static constexpr int kQh = offsetof(block_q6_K, qh), kScales = offsetof(block_q6_K, scales);
  static constexpr int kD = offsetof(block_q6_K, d);
  struct Rows {
    const uint8_t* block[2];  // the chunk's block of rows g and g + 8
    float d[2];
    int lane;      // where the word holding bytes 2t, 2t + 1 starts, from the block
    uint32_t sel;  // bytes 2t, 2t + 8, 2t + 1, 2t + 9 of that word and the one 8 bytes on
  };
  __device__ __forceinline__ static void open(const uint8_t* row0, const uint8_t* row1, int t, Rows& r) {
    r.block[0] = row0, r.block[1] = row1;
    // both blocks start on a word or 2 bytes past one, alike (rows are 16-byte multiples apart)
    const bool odd = smem_addr(row0) & 2;
    r.lane = odd ? 4 * ((t + 1) / 2) - 2 : 4 * (t / 2);
    r.sel = (t % 2) != odd ? 0x7362u : 0x5140u;
#pragma unroll
    for (int i = 0; i < 2; ++i) r.d[i] = fp16_to_float(fp16_bits(lds16(r.block[i] + kD)));
  }
  // [p[2t], p[2t + 8], p[2t + 1], p[2t + 9]] for p a multiple of 16 bytes into the block: two word loads
  // and a byte_perm (16-bit loads made ptxas serialize the MMAs: C7515, as did the word's address
  // written p + 2t - 2 (upper half))
  __device__ __forceinline__ static uint32_t pairs(const uint8_t* p, const Rows& r) {
    return __byte_perm(lds32(p + r.lane), lds32(p + r.lane + 8), r.sel);
  }
  template <class H, bool kExact, int Q>
  __device__ __forceinline__ static void stage(const Rows& r, int, uint32_t (&f)[4][4]) {
    constexpr int h = Q / 2, n = Q % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint8_t* b = r.block[i];
      const uint32_t sc = lds16(b + kScales + 4 * Q) | (lds16(b + kScales + 4 * Q + 2) << 16);  // scales[4Q .. + 3]
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint32_t xh = pairs(b + kQh + 32 * h + 16 * e, r);
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // quarter 2n + half, step kk = 2 half + e
          const int kk = 2 * half + e, quarter = 2 * n + half;
          const uint32_t x = pairs(b + 64 * h + 32 * half + 16 * e, r);
          const float s = r.d[i] * float(int8_t(sc >> (8 * kk)));
          const float2 entry = scale_entry<H, kExact>(s, -32.0f * s);
          const uint32_t lo =
              pair_quants<kExact, 0x000F000Fu>(x >> (4 * n)) | (((xh >> (2 * quarter)) & 0x00030003u) << 4);
          const uint32_t hi =
              pair_quants<kExact, 0x000F000Fu>(x >> (8 + 4 * n)) | (((xh >> (8 + 2 * quarter)) & 0x00030003u) << 4);
          f[kk][i] = reg_pair<H, kExact>(lo, entry);      // values 2t, 2t + 1 of row i
          f[kk][2 + i] = reg_pair<H, kExact>(hi, entry);  // 2t + 8, 2t + 9
        }
      }
    }
  }
};

template <class T>
constexpr bool kHasRegFragments = RegFragments<T>::kHas;

template <class T, class Tile>
struct RegsLayout {
  static constexpr int kRawStride = raw_stride(WeightChunk<T>::kBytes);
  static constexpr int kATileBytes = Tile::kM * kWgStageK * 2, kRawBytes = Tile::kN * kRawStride;
  static constexpr int kBarrierBytes = 256, kAlignBytes = 1024;  // 2 x 11 barriers at most
  // an SM's 228 KiB (kSmemLimit, a CTA's opt-in limit, and the 1 KiB the SM reserves a CTA) over kCtas CTAs,
  // less each one's reserved 1 KiB
  static constexpr int kLimit = (kSmemLimit + 1024) / Tile::kCtas - 1024;
  // Three raw chunks in flight where four activation stages still fit beside them, else two (Q6_K's 64-row
  // tile at two CTAs an SM)
  static constexpr int kRingBytes = kLimit - kAlignBytes - kBarrierBytes;  // the two rings' share
  static constexpr int kRawSlots = kRingBytes - 3 * kRawBytes >= 4 * kATileBytes ? 3 : 2;
  static constexpr int kASlots = std::min(8, (kRingBytes - kRawSlots * kRawBytes) / kATileBytes);
  static constexpr int kA = 0;
  static constexpr int kRaw = kA + kASlots * kATileBytes;
  static constexpr int kBarriers = kRaw + kRawSlots * kRawBytes;
  static constexpr int kBytes = kBarriers + kBarrierBytes + kAlignBytes;
  static_assert(kASlots >= 4 && kBytes <= kLimit, "a chunk's activation stages and the raw ring fit a Hopper CTA");
};

// d[N / 2] += a (registers: this thread's part of 64 rows x 16 values) * b[N x 16]^T (descriptor).
#define TORCHEXT_WGMMA_REGS_64x64x16(TYPE)                                                                        \
  asm volatile(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                                 \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
      "%23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                  \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),        \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),       \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                     \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
#define TORCHEXT_WGMMA_REGS_64x32x16(TYPE)                                                                        \
  asm volatile(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                                \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE                                                 \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},"                                  \
      " {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])                     \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))
#define TORCHEXT_WGMMA_REGS_64x128x16(TYPE)                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                       \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " TORCHEXT_WGMMA_D64               \
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                   \
               : TORCHEXT_WGMMA_D64_OPERANDS(d)                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1))

template <class H, int N>
__device__ __forceinline__ void wgmma_regs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  static_assert(N == 32 || N == 64 || N == 128, "the tiles' MMA widths");
  if constexpr (N == 32) {
    if constexpr (std::is_same_v<H, __nv_bfloat16>) TORCHEXT_WGMMA_REGS_64x32x16("bf16");
    else TORCHEXT_WGMMA_REGS_64x32x16("f16");
  } else if constexpr (N == 64) {
    if constexpr (std::is_same_v<H, __nv_bfloat16>) TORCHEXT_WGMMA_REGS_64x64x16("bf16");
    else TORCHEXT_WGMMA_REGS_64x64x16("f16");
  } else {
    if constexpr (std::is_same_v<H, __nv_bfloat16>) TORCHEXT_WGMMA_REGS_64x128x16("bf16");
    else TORCHEXT_WGMMA_REGS_64x128x16("f16");
  }
}
#undef TORCHEXT_WGMMA_REGS_64x32x16
#undef TORCHEXT_WGMMA_REGS_64x64x16
#undef TORCHEXT_WGMMA_REGS_64x128x16

// Keeps fragments' registers as they are up to here: an MMA issued earlier may still read them.
__device__ __forceinline__ void keep_fragments(uint32_t (&f)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(f[i][j])::"memory");
}

// xmap: x [rows, k] in boxes of kWgStageK values x Tile::kM rows, 128-byte swizzle; wmap: the weight's
// bytes [n, row_bytes] in boxes of RegsLayout::kRawStride bytes x 128 rows (qgemm_wgmma.cu). Rows are
// whole chunks (RegFragments' formats are 256-value blocks): past the row's end the box holds zeros,
// which decode to zero.
template <class T, class H, bool kExact, class Tile>
__global__ void __launch_bounds__(kRegsThreads, Tile::kCtas)
    qgemm_wgmma_regs_kernel(GemmArgs a, const __grid_constant__ CUtensorMap xmap,
                            const __grid_constant__ CUtensorMap wmap) {
  using Lay = RegsLayout<T, Tile>;
  using F = RegFragments<T>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // the swizzle's alignment
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Lay::kBarriers);
  const Ring<Lay::kASlots> xring{bars, bars + Lay::kASlots};
  const Ring<Lay::kRawSlots> rawring{bars + 2 * Lay::kASlots, bars + 2 * Lay::kASlots + Lay::kRawSlots};
  const int64_t n0 = int64_t(blockIdx.x) * Tile::kN, m0 = int64_t(blockIdx.y) * Tile::kM;
  const int64_t chunks = (a.k + kChunk - 1) / kChunk;
  const int64_t c0 = int64_t(blockIdx.z) * a.chunks_per_split, c1 = std::min(chunks, c0 + a.chunks_per_split);
  constexpr int kStagesPerChunk = kChunk / kWgStageK;
  static_assert(kStagesPerChunk == 4, "the MMA loop below takes a chunk's stages one by one");
  const int64_t stages = (c1 - c0) * kStagesPerChunk;
  if (threadIdx.x == 0) {
    for (int i = 0; i < Lay::kASlots; ++i) mbar_init(&xring.full[i], 1), mbar_init(&xring.empty[i], 2);
    for (int i = 0; i < Lay::kRawSlots; ++i) mbar_init(&rawring.full[i], 1), mbar_init(&rawring.empty[i], 256);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (warp >= 8) {  // copies: warps 8 and 9, one thread each
    regs_dec<Tile::kCopyRegs>();
    if (warp < 10 && lane == 0) copy_operands<T, Lay>(warp - 8, smem, rawring, xring, &wmap, &xmap, c0, c1, n0, m0);
    return;
  }

  regs_inc<Tile::kMathRegs>();
  const int cw = warp / 4, g = lane / 4, t = lane % 4, tid = threadIdx.x % 128;
  const int row0 = 64 * cw + 16 * (warp % 4) + g;  // the thread's weight rows: row0, row0 + 8
  constexpr int kMmaN = Tile::kMmaN;
  float acc[Tile::kSubs][kMmaN / 2];
#pragma unroll
  for (int s = 0; s < Tile::kSubs; ++s)
#pragma unroll
    for (int i = 0; i < kMmaN / 2; ++i) acc[s][i] = 0.0f;
  typename F::Rows rows;
  const auto open_chunk = [&](int64_t u) {
    const uint8_t* base = smem + Lay::kRaw + rawring.slot(u) * Lay::kRawBytes + raw_chunk_lead<T>(c0 + u) +
                          rawring.wait_full_token(u);
    F::open(base + row0 * Lay::kRawStride, base + (row0 + 8) * Lay::kRawStride, t, rows);
  };
  // stage j's MMAs on fragments f, committed as one group
  const auto issue = [&](int64_t j, uint32_t (&f)[4][4]) {
    xring.wait_full(j);
    // the stage's descriptor, then each MMA's as an offset in its address field (bits 0-13, the shared
    // address / 16: under 228 KiB, plus at most 16 KiB, never carries out of it)
    const uint64_t xd = tile_descriptor(smem_addr(smem + Lay::kA + xring.slot(j) * Lay::kATileBytes));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kWgStageK / 16; ++kk)
#pragma unroll
      for (int s = 0; s < Tile::kSubs; ++s)  // activation rows kMmaN s .. + kMmaN - 1, 128 bytes a row
        wgmma_regs<H, kMmaN>(acc[s], f[kk], xd + ((s * kMmaN * 128 + 32 * kk) >> 4));
    wgmma_commit();
  };
  // stage j - 1's MMAs are done: its activations are free, and so are the fragments it read
  const auto retire = [&](int64_t j, uint32_t (&f)[4][4]) {
    wgmma_wait<1>();
    if (j > 0 && tid == 0) mbar_arrive(&xring.empty[xring.slot(j - 1)]);
    keep_fragments(f);
  };
  // Two sets of fragments: the next stage's are computed into one while the MMAs read the other.
  uint32_t f0[4][4] = {}, f1[4][4] = {};
  if (stages > 0) {
    open_chunk(0);
    F::template stage<H, kExact, 0>(rows, t, f0);
  }
  for (int64_t u = 0; u < c1 - c0; ++u) {
    const int64_t j = u * kStagesPerChunk;
    issue(j, f0);
    retire(j, f1);
    F::template stage<H, kExact, 1>(rows, t, f1);
    issue(j + 1, f1);
    retire(j + 1, f0);
    F::template stage<H, kExact, 2>(rows, t, f0);
    issue(j + 2, f0);
    retire(j + 2, f1);
    F::template stage<H, kExact, 3>(rows, t, f1);
    issue(j + 3, f1);  // the chunk's last reads went into these MMAs' operands
    mbar_arrive(&rawring.empty[rawring.slot(u)]);
    retire(j + 3, f0);
    if (u + 1 < c1 - c0) {
      open_chunk(u + 1);
      F::template stage<H, kExact, 0>(rows, t, f0);
    }
  }
  wgmma_wait<0>();
  keep_fragments(f1);
  // The next kernel may start (add_splits_kernel, a programmatic dependent launch, waits for this grid before it
  // reads the partial sums); the copy warps have exited.
  allow_dependent_grids();

  // accumulator i of sub-tile s: weight row row0 + 8 (i / 2 % 2), activation row kMmaN s + 8 (i / 4) + 2t + i % 2
  constexpr FloatType kOut = std::is_same_v<H, __nv_bfloat16> ? FloatType::BF16 : FloatType::F16;
#pragma unroll
  for (int s = 0; s < Tile::kSubs; ++s)
#pragma unroll
    for (int i = 0; i < kMmaN / 2; ++i) {
      const int64_t col = n0 + row0 + 8 * (i / 2 % 2);
      const int64_t row = m0 + kMmaN * s + 8 * (i / 4) + 2 * t + i % 2;
      if (row >= a.rows || col >= a.n) continue;
      if (gridDim.z > 1) a.partial[(int64_t(blockIdx.z) * a.rows + row) * a.n + col] = acc[s][i];
      else store_float(a.out, row * a.n + col, kOut, acc[s][i]);
    }
}

}  // namespace
}  // namespace torchext::qgemm
