// Dense float32 rows -> GGUF weight blocks: llama.cpp's reference quantizers, written anew.
//
// Rules and constants per llama.cpp ggml/src/ggml-quants.c (as of 0.3.36's vendored copy):
// quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref, quantize_row_{q2_K,q3_K,q4_K,q5_K,q6_K}_ref,
// quantize_row_{iq4_nl,iq4_xs,nvfp4}_ref, make_qkx2_quants, make_qx_quants and nearest_int (and
// ggml-impl.h's ggml_fp32_to_ue4m3). Every intermediate is fp32 and evaluated in the reference's order
// (this file builds with -ffp-contract=off), so the bytes match llama.cpp's; the 32-value formats also
// match the `gguf` package's numpy quantizers bit for bit (tests/test_quantize.py).
// What the bytes mean is defined by dequantize_chunk in kernels/quant_traits.h.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "csrc/checks.h"
#include "csrc/cpu/kernels.h"
#include "kernels/quant_traits.h"

namespace torchext::cpu {
namespace {

// ---------------------------------------------------------------- rounding helpers

// Nearest integer, ties to even, for |v| < 2^22: adding 1.5 * 2^23 leaves the rounded integer in
// the low mantissa bits (llama.cpp's nearest_int). Outside that range the result is garbage but
// defined, exactly as in the reference; callers clamp it.
inline int nearest_even(float v) {
  const float shifted = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

inline int clamp_int(int v, int lo, int hi) { return std::min(hi, std::max(lo, v)); }

// (int)v truncated toward zero, capped at `hi`. For the 32-value formats v >= 0 up to rounding, so
// this is the reference's MIN(hi, (int8_t)v); NaN and negative inputs give 0 instead of a UB cast.
inline int truncate_capped(float v, int hi) {
  if (!(v > 0.0f)) return 0;
  if (v >= float(hi)) return hi;
  return int(v);
}

// ---------------------------------------------------------------- 32-value formats

// Index of the first element of largest magnitude (numpy's argmax(abs(x)), which gguf uses). For an
// all-zero block that is x[0], so the sign of the zero scale follows x[0] as in gguf; llama.cpp starts
// from +0 and stores -0 there whatever x[0] is. The decoded values are the same.
inline int first_abs_max(const float* x) {
  int best = 0;
  float amax = std::fabs(x[0]);
  for (int i = 1; i < 32; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      best = i;
    }
  }
  return best;
}

// Sequential scan, the first extreme wins (the reference's loop). gguf's numpy min/max agree except on
// the sign of a zero extreme when a block holds both +0.0 and -0.0: numpy's SIMD reduction order
// picks it, so no fixed rule reproduces it. That sign only reaches m (or d) as a signed zero.
inline void min_max(const float* x, float& lo, float& hi) {
  lo = x[0];
  hi = x[0];
  for (int i = 1; i < 32; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
  }
}

// 5th bits of 32 values (bit i = bit 4 of q[i]), little-endian into qh[4].
inline void pack_high_bits(const int* q, uint8_t* qh) {
  uint32_t bits = 0;
  for (int i = 0; i < 32; ++i) bits |= uint32_t((q[i] >> 4) & 1) << i;
  for (int b = 0; b < 4; ++b) qh[b] = uint8_t(bits >> (8 * b));
}

// Nibbles: byte l holds value l (low) and value l + 16 (high).
inline void pack_nibbles(const int* q, uint8_t* qs) {
  for (int l = 0; l < 16; ++l) qs[l] = uint8_t((q[l] & 0xF) | ((q[l + 16] & 0xF) << 4));
}

// Q8_0: d = max|x| / 127, q = round-half-away(x / d).
void quantize_block(const float* x, block_q8_0& b) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = amax > std::fabs(x[i]) ? amax : std::fabs(x[i]);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  b.d = float_to_fp16(d);
  for (int i = 0; i < 32; ++i) {
    const float v = std::round(x[i] * id);
    b.qs[i] = int8_t(v == v ? std::min(127.0f, std::max(-127.0f, v)) : 0.0f);
  }
}

// Q4_0 / Q5_0 (symmetric, zero point 8 / 16): d = (signed value of largest magnitude) / -zero, so
// that value maps to q = 0; q = min(2*zero - 1, trunc(x / d + zero + 0.5)).
template <int kZero>
void quantize_symmetric(const float* x, fp16_bits& d_out, int* q) {
  const float max = x[first_abs_max(x)];
  const float d = max / float(-kZero);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  d_out = float_to_fp16(d);
  for (int i = 0; i < 32; ++i) q[i] = truncate_capped(x[i] * id + (float(kZero) + 0.5f), 2 * kZero - 1);
}

// Q4_1 / Q5_1 (asymmetric): d = (max - min) / nmax, m = min, q = min(nmax, trunc((x - min) / d + 0.5)).
template <int kMax>
void quantize_min_max(const float* x, fp16_bits& d_out, fp16_bits& m_out, int* q) {
  float lo, hi;
  min_max(x, lo, hi);
  const float d = (hi - lo) / float(kMax);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  d_out = float_to_fp16(d);
  m_out = float_to_fp16(lo);
  for (int i = 0; i < 32; ++i) q[i] = truncate_capped((x[i] - lo) * id + 0.5f, kMax);
}

void quantize_block(const float* x, block_q4_0& b) {
  int q[32];
  quantize_symmetric<8>(x, b.d, q);
  pack_nibbles(q, b.qs);
}

void quantize_block(const float* x, block_q5_0& b) {
  int q[32];
  quantize_symmetric<16>(x, b.d, q);
  pack_nibbles(q, b.qs);
  pack_high_bits(q, b.qh);
}

void quantize_block(const float* x, block_q4_1& b) {
  int q[32];
  quantize_min_max<15>(x, b.d, b.m, q);
  pack_nibbles(q, b.qs);
}

void quantize_block(const float* x, block_q5_1& b) {
  int q[32];
  quantize_min_max<31>(x, b.d, b.m, q);
  pack_nibbles(q, b.qs);
  pack_high_bits(q, b.qh);
}

// ---------------------------------------------------------------- Q4_K / Q5_K

// Search parameters of make_qkx2_quants as quantize_row_q{2,4,5}_K_ref call it.
struct ScaleSearch {
  int nmax;      // largest quant: 3 (Q2_K), 15 (Q4_K) or 31 (Q5_K)
  float rmin;    // first trial: iscale = (nmax + rmin) / range ...
  float rdelta;  // ... then nmax + rmin + rdelta * s for s = 0..steps
  int steps;
  bool abs_error;  // a fit's error: weighted |diff| (Q2_K) instead of weighted diff^2
};
constexpr ScaleSearch kQ2KSearch{3, -0.5f, 0.1f, 15, true};
constexpr ScaleSearch kQ4KSearch{15, -1.0f, 0.1f, 20, false};
constexpr ScaleSearch kQ5KSearch{31, -0.5f, 0.1f, 15, false};

// Weighted least-squares fit of n values to x ~ scale * q - offset, q in 0..nmax, offset >= 0
// (make_qkx2_quants). Starts from min/max scaling; each trial quantizes with a slightly different
// inverse scale, solves the 2x2 normal equations for (scale, min) given those quants, and keeps the
// fit with the smallest weighted error. Note that a kept trial's min also moves the range that later
// trials scale against, as in the reference. Returns scale; `offset` = -min.
template <int n>
float fit_scale_and_min(const float* x, const float* w, const ScaleSearch& s, uint8_t* q, float& offset) {
  const auto error_of = [&](float diff) { return s.abs_error ? std::fabs(diff) : diff * diff; };
  float lo = x[0], hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;  // the offset only ever lowers values
  if (hi == lo) {      // constant (zero) sub-block
    std::fill(q, q + n, uint8_t(0));
    offset = -lo;
    return 0.0f;
  }
  float iscale = float(s.nmax) / (hi - lo);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    q[i] = uint8_t(clamp_int(nearest_even(iscale * (x[i] - lo)), 0, s.nmax));
    best_error += w[i] * error_of(scale * float(q[i]) + lo - x[i]);
  }
  uint8_t trial[n];
  for (int step = 0; step <= s.steps; ++step) {
    iscale = (s.rmin + s.rdelta * float(step) + float(s.nmax)) / (hi - lo);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clamp_int(nearest_even(iscale * (x[i] - lo)), 0, s.nmax);
      trial[i] = uint8_t(l);
      const float wl = w[i] * float(l);
      sum_l += wl;
      sum_l2 += wl * float(l);
      sum_xl += wl * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (det > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
      if (this_min > 0) {  // a positive min is not representable: refit the scale alone
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float error = 0;
      for (int i = 0; i < n; ++i) error += w[i] * error_of(this_scale * float(trial[i]) + this_min - x[i]);
      if (error < best_error) {
        std::copy(trial, trial + n, q);
        best_error = error;
        scale = this_scale;
        lo = this_min;
      }
    }
  }
  offset = -lo;
  return scale;
}

// Inverse of kquant_scale_min (quant_traits.h): sub-blocks 0..3 keep their 6-bit scale in the low
// bits of bytes 0..3 and their min in bytes 4..7; sub-blocks 4..7 keep the low 4 bits of scale and
// min in the two nibbles of bytes 8..11 and the top 2 bits of each in bits 6..7 of bytes 0..7.
void pack_scales_and_mins(const uint8_t* sc, const uint8_t* m, uint8_t* s) {
  std::fill(s, s + 12, uint8_t(0));
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] = sc[j];
      s[j + 4] = m[j];
    } else {
      s[j + 4] = uint8_t((sc[j] & 0xF) | ((m[j] & 0xF) << 4));
      s[j - 4] |= uint8_t((sc[j] >> 4) << 6);
      s[j] |= uint8_t((m[j] >> 4) << 6);
    }
  }
}

// Shared by Q4_K and Q5_K: fits the 8 sub-blocks, stores d, dmin and the packed 6-bit scales and
// mins, and returns the 256 quants (0..nmax) recomputed against the fp16-rounded scales.
template <class Block>
void quantize_scales_min_kquant(const float* x, const ScaleSearch& search, Block& b, uint8_t* q) {
  float scales[8], mins[8];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    // Weights favour large values, plus the sub-block's RMS so that small ones still count.
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    float w[32];
    for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_and_min<32>(xs, w, search, q + 32 * j, mins[j]);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  // Scales and mins become 6-bit multiples of the super-block's d = max_scale/63, dmin = max_min/63.
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  uint8_t sc6[8], m6[8];
  for (int j = 0; j < 8; ++j) {
    // uint8_t wrap then cap, as the reference stores nearest_int into a uint8_t before MIN(63, .)
    sc6[j] = std::min<uint8_t>(63, uint8_t(nearest_even(inv_scale * scales[j])));
    m6[j] = std::min<uint8_t>(63, uint8_t(nearest_even(inv_min * mins[j])));
  }
  pack_scales_and_mins(sc6, m6, b.scales);
  b.d = float_to_fp16(max_scale / 63.0f);
  b.dmin = float_to_fp16(max_min / 63.0f);

  // Requantize each value against the scale and min the block now stores (x = d*sc*q - dmin*m).
  // A sub-block whose scale rounded to zero keeps the quants of its fit: they dequantize to -dmin*m
  // whatever they are.
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    kquant_scale_min(b.scales, j, sc, m);
    const float d = fp16_to_float(b.d) * float(sc);
    if (d == 0.0f) continue;
    const float dm = fp16_to_float(b.dmin) * float(m);
    for (int l = 0; l < 32; ++l) q[32 * j + l] = uint8_t(clamp_int(nearest_even((x[32 * j + l] + dm) / d), 0, search.nmax));
  }
}

void quantize_block(const float* x, block_q4_K& b) {
  uint8_t q[256];
  quantize_scales_min_kquant(x, kQ4KSearch, b, q);
  // byte 32g + l: low nibble = value 64g + l, high nibble = value 64g + 32 + l
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 32; ++l) b.qs[32 * g + l] = uint8_t(q[64 * g + l] | (q[64 * g + 32 + l] << 4));
}

void quantize_block(const float* x, block_q5_K& b) {
  uint8_t q[256];
  quantize_scales_min_kquant(x, kQ5KSearch, b, q);
  // Low 4 bits as Q4_K; bit j of qh[l] is the 5th bit of value 32j + l.
  std::fill(b.qh, b.qh + 32, uint8_t(0));
  for (int g = 0; g < 4; ++g) {
    for (int l = 0; l < 32; ++l) {
      const int lo = q[64 * g + l], hi = q[64 * g + 32 + l];
      b.qs[32 * g + l] = uint8_t((lo & 0xF) | ((hi & 0xF) << 4));
      b.qh[l] |= uint8_t(((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1)));
    }
  }
}

// ---------------------------------------------------------------- Q2_K, Q3_K

// Value 128h + 32i + l goes to bits 2i, 2i+1 of qs[32h + l] (crumbs, quant_traits.h).
void pack_crumbs(const uint8_t* q, uint8_t* qs) {
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* v = q + 128 * h + l;
      qs[32 * h + l] = uint8_t(v[0] | (v[32] << 2) | (v[64] << 4) | (v[96] << 6));
    }
}

// quantize_row_q2_K_ref: each 16 values fitted as x ~ scale * q - min (q 0..3, weights |x|, the error
// weighted |diff|), scales and mins as 4-bit multiples of d = max_scale/15 and dmin = max_min/15, then
// the quants recomputed against the stored d*sc and dmin*m.
void quantize_block(const float* x, block_q2_K& b) {
  uint8_t q[256];
  float scales[16], mins[16];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 16; ++j) {
    float w[16];
    for (int l = 0; l < 16; ++l) w[l] = std::fabs(x[16 * j + l]);
    scales[j] = fit_scale_and_min<16>(x + 16 * j, w, kQ2KSearch, q + 16 * j, mins[j]);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  // iscale * scales[j] <= 15: the codes fit their nibbles without a clamp, as in the reference
  const float inv_scale = max_scale > 0 ? 15.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 15.0f / max_min : 0.0f;
  for (int j = 0; j < 16; ++j)
    b.scales[j] = uint8_t(nearest_even(inv_scale * scales[j]) | (nearest_even(inv_min * mins[j]) << 4));
  b.d = float_to_fp16(max_scale > 0 ? max_scale / 15.0f : 0.0f);
  b.dmin = float_to_fp16(max_min > 0 ? max_min / 15.0f : 0.0f);

  // A sub-block whose scale code is 0 keeps the quants of its fit (they dequantize to -dmin*m).
  for (int j = 0; j < 16; ++j) {
    const float d = fp16_to_float(b.d) * float(b.scales[j] & 0xF);
    if (d == 0.0f) continue;
    const float dm = fp16_to_float(b.dmin) * float(b.scales[j] >> 4);
    for (int l = 0; l < 16; ++l) q[16 * j + l] = uint8_t(clamp_int(nearest_even((x[16 * j + l] + dm) / d), 0, 3));
  }
  pack_crumbs(q, b.qs);
}

constexpr float kGroupMaxEps = 1e-15f;  // GROUP_MAX_EPS: below this a group counts as all zero

// Fits the 16 sub-blocks of 16 values of a block with `fit` (scales[j], quants into q) and returns
// the scale of largest magnitude, sign kept: Q3_K and Q6_K code the others as multiples of it.
template <class Fit>
float fit_sub_blocks(const float* x, int8_t* q, float* scales, Fit fit) {
  float max_scale = 0, max_abs_scale = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = fit(x + 16 * j, q + 16 * j);
    if (std::fabs(scales[j]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[j]);
      max_scale = scales[j];
    }
  }
  return max_scale;
}

// Signed scale for 16 values, quants -4..3 (make_q3_quants with nmax 4 and its RMSE search): starts
// from iscale = -4 / (value of largest magnitude), then for up to 5 passes moves single quants to
// the value the rest of the fit suggests whenever that raises sumlx^2 / suml2 (weights x^2). Returns
// sumlx / suml2; q[i] = quant + 4 (0..7).
float fit_q3_scale(const float* x, int8_t* q) {
  constexpr int n = 16, nmax = 4;
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    std::fill(q, q + n, int8_t(0));
    return 0.0f;
  }
  const float iscale = float(-nmax) / max;
  int l[n];
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    l[i] = clamp_int(nearest_even(iscale * x[i]), -nmax, nmax - 1);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * float(l[i]);
    suml2 += w * float(l[i]) * float(l[i]);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * float(l[i]);
      if (!(slx > 0)) continue;
      float sl2 = suml2 - w * float(l[i]) * float(l[i]);
      const int moved = clamp_int(nearest_even(x[i] * sl2 / slx), -nmax, nmax - 1);
      if (moved == l[i]) continue;
      slx += w * x[i] * float(moved);
      sl2 += w * float(moved) * float(moved);
      if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
        l[i] = moved;
        sumlx = slx;
        suml2 = sl2;
        ++changed;
      }
    }
    if (changed == 0) break;
  }
  for (int i = 0; i < n; ++i) q[i] = int8_t(l[i] + nmax);
  return sumlx / suml2;
}

// quantize_row_q3_K_ref: signed scales per 16 values (fit_q3_scale), stored as 6-bit multiples of
// d = -max_scale/32 (the scale of largest magnitude maps to -32), then the quants recomputed against
// d * (s - 32) and split into crumbs and hmask bits.
void quantize_block(const float* x, block_q3_K& b) {
  int8_t q[256];
  float scales[16];
  const float max_scale = fit_sub_blocks(x, q, scales, fit_q3_scale);
  std::fill(b.scales, b.scales + 12, uint8_t(0));
  if (max_scale != 0) {
    const float iscale = -32.0f / max_scale;
    for (int j = 0; j < 16; ++j) {
      // the reference keeps nearest_int in an int8_t before clamping: |iscale * scale| <= 32 fits
      const int s = clamp_int(int8_t(nearest_even(iscale * scales[j])), -32, 31) + 32;
      b.scales[j % 8] |= uint8_t((s & 0xF) << (4 * (j / 8)));
      b.scales[8 + j % 4] |= uint8_t((s >> 4) << (2 * (j / 4)));
    }
    b.d = float_to_fp16(1 / iscale);
  } else {
    b.d = float_to_fp16(0.0f);
  }

  uint32_t sw[3];
  std::memcpy(sw, b.scales, 12);
  for (int j = 0; j < 16; ++j) {
    const float d = fp16_to_float(b.d) * float(q3k_scale(sw[0], sw[1], sw[2], j));
    if (d == 0.0f) continue;
    for (int l = 0; l < 16; ++l) q[16 * j + l] = int8_t(4 + clamp_int(nearest_even(x[16 * j + l] / d), -4, 3));
  }
  // quant 4..7: its 3rd bit set in hmask (bit j/32 of hmask[j%32]), the crumb keeps quant - 4
  uint8_t crumb[256];
  std::fill(b.hmask, b.hmask + 32, uint8_t(0));
  for (int j = 0; j < 256; ++j) {
    const bool high = q[j] > 3;
    if (high) b.hmask[j % 32] |= uint8_t(1 << (j / 32));
    crumb[j] = uint8_t(high ? q[j] - 4 : q[j]);
  }
  pack_crumbs(crumb, b.qs);
}

// ---------------------------------------------------------------- TQ2_0, TQ1_0

// gguf's ternary rule: d = max|x| over the block, q = round-half-away(x / d) in -1..1 (x * (1/d) in
// fp32, as numpy computes it); q + 1 into `t`.
void ternary_quants(const float* x, fp16_bits& d_out, uint8_t* t) {
  float d = 0.0f;
  for (int i = 0; i < 256; ++i) d = std::max(d, std::fabs(x[i]));
  const float id = d == 0.0f ? 0.0f : 1.0f / d;
  for (int i = 0; i < 256; ++i) t[i] = uint8_t(int(std::round(x[i] * id)) + 1);
  d_out = float_to_fp16(d);
}

void quantize_block(const float* x, block_tq2_0& b) {
  uint8_t t[256];
  ternary_quants(x, b.d, t);
  pack_crumbs(t, b.qs);
}

// `digits` base-3 digits v[0], v[stride], ... (the first the most significant; 4 digits take the places
// of 3^4 .. 3^1) as gguf's TQ1_0 byte: ceil(256 * n / 243) for their value n, so that digit j is
// ((byte * 3^j mod 256) * 3) >> 8 (base3_trits, quant_traits.h).
uint8_t pack_base3(const uint8_t* v, int stride, int digits) {
  int n = 0;
  for (int j = 0; j < 5; ++j) n = 3 * n + (j < digits ? v[j * stride] : 0);
  return uint8_t((n * 256 + 242) / 243);
}

// TQ1_0: gguf's ternary rule (ternary_quants), values laid out as blocks.h says.
void quantize_block(const float* x, block_tq1_0& b) {
  uint8_t t[256];
  ternary_quants(x, b.d, t);
  for (int l = 0; l < 32; ++l) b.qs[l] = pack_base3(t + l, 32, 5);             // values 32j + l
  for (int l = 0; l < 16; ++l) b.qs[32 + l] = pack_base3(t + 160 + l, 16, 5);  // values 160 + 16j + l
  for (int l = 0; l < 4; ++l) b.qh[l] = pack_base3(t + 240 + l, 4, 4);         // values 240 + 4j + l
}

// ---------------------------------------------------------------- MXFP4

// The index of the FP4 level (kFP4Levels, doubled E2M1 values) nearest to v at scale d: |d * level - v| in
// fp32, the first of equal errors (the smaller magnitude), as llama.cpp's best_index_mxfp4 and gguf's
// numpy quantizer search.
int nearest_fp4_level(float v, float d) {
  int q = 0;
  float best = std::fabs(d * float(kFP4Levels[0]) - v);
  for (int l = 1; l < 16; ++l) {
    const float err = std::fabs(d * float(kFP4Levels[l]) - v);
    if (err < best) best = err, q = l;
  }
  return q;
}

// gguf's numpy MXFP4 quantizer (MXFP4.quantize_blocks): e = floor(log2(max|x|)) - 2 + 127, the scale
// 2^(e - 128) that puts max|x| at a level of 4 to 8 (of 12), and 0 for an all-zero block; every value
// takes the first of the 16 levels whose scaled value is nearest (|d * level - x| in fp32, ties to
// the lower index: the smaller magnitude). Two details follow numpy exactly: log2 is numpy's float32
// log2, which is the float64 log2 rounded to fp32 (for the 2^-24-relative sliver below a power of two
// it rounds up to the integer, so e is one higher there), and e is stored with numpy's float -> uint8
// cast, which on x86-64 wraps: a block whose max|x| is below 2^-125 gets e = 253 .. 255 (a huge scale)
// and quantizes to zeros, where e = 0 would have kept a few of its levels. The scale is a power of two
// up to 2^124 for finite inputs, so no finite block overflows; NaN and infinity have no encoding
// (store_nan_block).
void quantize_block(const float* x, block_mxfp4& b) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const int e = amax > 0.0f ? int(std::floor(float(std::log2(double(amax))))) - 2 + 127 : 0;
  b.e = uint8_t(e & 0xFF);
  const float d = e8m0_half(b.e);
  int q[32];
  for (int i = 0; i < 32; ++i) q[i] = nearest_fp4_level(x[i], d);
  pack_nibbles(q, b.qs);
}

// ---------------------------------------------------------------- NVFP4

// The unsigned E4M3 code of a scale s (llama.cpp's ggml_fp32_to_ue4m3): 0 for s <= 0; s capped at 448;
// below 2^-6 the subnormal code (int)(s * 512 + 0.5), at most 7; else s's top 3 mantissa bits rounded
// half up by the 4th, the carry going into the exponent; exponents from 15 saturate to 0x7E (448), as
// the encoder never writes 0x7F (E4M3's NaN).
uint8_t ue4m3_code(float s) {
  if (!(s > 0.0f)) return 0;
  s = std::min(s, 448.0f);
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  int exponent = int((bits >> 23) & 0xFF) - 127 + 7;
  if (exponent <= 0) return uint8_t(std::min(7, int(s * 512.0f + 0.5f)));
  if (exponent >= 15) return 0x7E;
  int mantissa = int((bits >> 20) & 7) + int((bits >> 19) & 1);
  if (mantissa > 7) {
    mantissa = 0;
    if (++exponent >= 15) return 0x7E;
  }
  return uint8_t((exponent << 3) | mantissa);
}

// llama.cpp's quantize_row_nvfp4_ref (gguf has no NVFP4 quantizer): each 16-value sub-block takes the
// scale code of max|x| / 6 (so that 6, the largest E2M1 value, lands on max|x|), and every value the FP4
// level nearest to it at that code's value (ue4m3_half: halved, as the levels are doubled E2M1 values).
void quantize_block(const float* x, block_nvfp4& b) {
  for (int s = 0; s < 4; ++s) {
    const float* xs = x + 16 * s;
    float amax = 0.0f;
    for (int i = 0; i < 16; ++i) amax = std::max(amax, std::fabs(xs[i]));
    b.d[s] = ue4m3_code(amax / 6.0f);
    const float d = ue4m3_half(b.d[s]);
    for (int l = 0; l < 8; ++l)
      b.qs[8 * s + l] = uint8_t(nearest_fp4_level(xs[l], d) | (nearest_fp4_level(xs[l + 8], d) << 4));
  }
}

// ---------------------------------------------------------------- Q6_K


// Signed scale for 16 values, q in -32..31 (make_qx_quants with nmax 32, rmse_type 1, no weights):
// starts from iscale = -32 / (value of largest magnitude), then tries iscale = -(32 + 0.1 s) / max
// for s = -9..9 and keeps the one whose least-squares scale, weighted by x^2, explains most of the
// data (largest sumlx^2 / suml2). Returns that scale; q[i] = quant + 32 (0..63).
float fit_signed_scale(const float* x, int8_t* q) {
  constexpr int n = 16, nmax = 32;
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    std::fill(q, q + n, int8_t(0));
    return 0.0f;
  }
  // sums of w*x*l and w*l*l for the quants of `iscale`, w = x^2
  auto fit = [&](float iscale, float& sumlx, float& suml2) {
    sumlx = 0;
    suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clamp_int(nearest_even(iscale * x[i]), -nmax, nmax - 1);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * float(l);
      suml2 += w * float(l) * float(l);
    }
  };
  auto store = [&](float iscale) {
    for (int i = 0; i < n; ++i) q[i] = int8_t(nmax + clamp_int(nearest_even(iscale * x[i]), -nmax, nmax - 1));
  };
  float sumlx, suml2;
  float iscale = float(-nmax) / max;
  fit(iscale, sumlx, suml2);
  store(iscale);
  float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int s = -9; s <= 9; ++s) {
    if (s == 0) continue;
    iscale = -(float(nmax) + 0.1f * float(s)) / max;
    fit(iscale, sumlx, suml2);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      store(iscale);
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

void quantize_block(const float* x, block_q6_K& b) {
  std::memset(&b, 0, sizeof b);
  int8_t q[256];
  float scales[16];
  const float max_scale = fit_sub_blocks(x, q, scales, fit_signed_scale);  // maps to -128 exactly
  if (std::fabs(max_scale) < kGroupMaxEps) return;  // all zero: d = 0, every byte 0

  // 16 int8 scales, multiples of d = -max_scale / 128.
  const float iscale = -128.0f / max_scale;
  b.d = float_to_fp16(1 / iscale);
  for (int j = 0; j < 16; ++j) b.scales[j] = int8_t(clamp_int(nearest_even(iscale * scales[j]), -128, 127));

  // Requantize against d * scales[j] as stored; a zero scale keeps the fit's quants (they dequantize to 0).
  for (int j = 0; j < 16; ++j) {
    const float d = fp16_to_float(b.d) * float(b.scales[j]);
    if (d == 0.0f) continue;
    for (int l = 0; l < 16; ++l) q[16 * j + l] = int8_t(32 + clamp_int(nearest_even(x[16 * j + l] / d), -32, 31));
  }

  // Value 128h + 32i + l: low 4 bits in ql[64h + 32(i%2) + l] (low nibble for i < 2, high for
  // i >= 2), high 2 bits in bits 2i, 2i+1 of qh[32h + l].
  for (int h = 0; h < 2; ++h) {
    const int8_t* v = q + 128 * h;
    for (int l = 0; l < 32; ++l) {
      b.ql[64 * h + l] = uint8_t((v[l] & 0xF) | ((v[l + 64] & 0xF) << 4));
      b.ql[64 * h + 32 + l] = uint8_t((v[l + 32] & 0xF) | ((v[l + 96] & 0xF) << 4));
      b.qh[32 * h + l] = uint8_t((v[l] >> 4) | ((v[l + 32] >> 4) << 2) | ((v[l + 64] >> 4) << 4) | ((v[l + 96] >> 4) << 6));
    }
  }
}

// ---------------------------------------------------------------- IQ4_NL, IQ4_XS
// quantize_row_iq4_nl_ref and quantize_row_iq4_xs_ref: llama.cpp's quantize_row_iq4_nl_impl without an
// importance matrix (which these two formats do not need: llama-quantize makes them without one), on
// the 16 non-linear levels kIQ4Levels.

constexpr int kIQ4Trials = 7;  // the scale search's trials on each side of the largest level

// Index of the level nearest to v (best_index_int8's answer); halfway between two levels, the upper one.
// Below level 0 or above level 15 the comparison below picks that level. The levels are counted rather
// than searched (best_index_int8 bisects): the search's branches cost a misprediction a step, and the
// quantizers look up 16 levels a value.
int nearest_iq4_level(float v) {
  const int8_t* level = kIQ4Levels;
  int hi = 1;  // level[hi - 1] <= v < level[hi] for v between level 0 and level 15
  for (int i = 1; i < 15; ++i) hi += v >= float(level[i]);
  return v - float(level[hi - 1]) < float(level[hi]) - v ? hi - 1 : hi;
}

// The scale of 32 values x ~ d * level[q] (weights x^2): q the nearest levels of x * id for the trial
// inverse scales id, d = sum(w level x) / sum(w level^2) of the trial with the largest sumqx^2 / sumq2,
// starting from the one that maps the value of largest magnitude to the top level (+113). 0 for a
// group below kGroupMaxEps.
float fit_iq4_scale(const float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), max = x[j];
  }
  if (amax < kGroupMaxEps) return 0.0f;
  float sumqx, sumq2;
  const auto fit = [&](float id) {
    sumqx = sumq2 = 0.0f;
    for (int j = 0; j < 32; ++j) {
      const float q = kIQ4Levels[nearest_iq4_level(id * x[j])], w = x[j] * x[j];
      sumqx += w * q * x[j];
      sumq2 += w * q * q;
    }
  };
  fit(1 / (-max / float(kIQ4Levels[0])));
  float d = sumqx / sumq2, best = d * sumqx;
  for (int t = -kIQ4Trials; t <= kIQ4Trials; ++t) {
    fit(float(t + kIQ4Levels[0]) / max);  // the value of largest magnitude near level 0 (-127)
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      d = sumqx / sumq2;
      best = d * sumqx;
    }
  }
  return d;
}

// 32 values' level indices against inverse scale id, packed as nibbles (byte l: value l, value l + 16).
void pack_iq4_levels(const float* x, float id, uint8_t* qs) {
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = nearest_iq4_level(id * x[j]);
  pack_nibbles(q, qs);
}

// IQ4_NL: one fp16 d per 32 values; the levels against the fitted d before its rounding.
void quantize_block(const float* x, block_iq4_nl& b) {
  const float d = fit_iq4_scale(x);
  b.d = float_to_fp16(d);
  pack_iq4_levels(x, d != 0.0f ? 1 / d : 0.0f, b.qs);
}

// IQ4_XS: eight sub-blocks' fitted scales as 6-bit multiples ls - 32 of d = -max_scale / 32 (the scale
// of largest magnitude maps to -32), then each sub-block's levels against d * (ls - 32).
void quantize_block(const float* x, block_iq4_xs& b) {
  std::memset(&b, 0, sizeof b);
  float scales[8], max_scale = 0.0f, amax_scale = 0.0f;
  for (int j = 0; j < 8; ++j) {
    scales[j] = fit_iq4_scale(x + 32 * j);
    if (std::fabs(scales[j]) > amax_scale) amax_scale = std::fabs(scales[j]), max_scale = scales[j];
  }
  const float d = -max_scale / 32;
  b.d = float_to_fp16(d);
  const float id = d != 0.0f ? 1 / d : 0.0f;
  for (int j = 0; j < 8; ++j) {
    const int l = clamp_int(nearest_even(id * scales[j]), -32, 31);
    const float dl = d * float(l);
    pack_iq4_levels(x + 32 * j, dl != 0.0f ? 1 / dl : 0.0f, b.qs + 16 * j);
    b.scales_l[j / 2] |= uint8_t(((l + 32) & 0xF) << (4 * (j % 2)));
    b.scales_h |= uint16_t(((l + 32) >> 4) << (2 * j));
  }
}

// ---------------------------------------------------------------- IQ3_S

// IQ3_S's 512 grid points as llama.cpp's quantizer searches them (iq3xs_init_impl(512)): a point's byte i
// is 2 l_i + 1 for a level l_i in 0..7, so a vector of four levels is a 12-bit code u = sum l_i << 3i;
// map[u] is the point of code u, or -1. A code off the grid has as neighbours the points at its three
// smallest squared distances (over the bytes), ordered by distance, then index.
struct IQ3SSearch {
  int16_t map[4096];
  int32_t first[4097];  // code u's neighbours: neighbours[first[u] .. first[u + 1])
  std::vector<uint16_t> neighbours;

  static int byte(int point, int i) { return int((iq3s_grid_host[point] >> (8 * i)) & 0xFF); }

  IQ3SSearch() {
    std::fill(map, map + 4096, int16_t(-1));
    for (int j = 0; j < 512; ++j) {
      int u = 0;
      for (int i = 0; i < 4; ++i) u |= ((byte(j, i) - 1) / 2) << (3 * i);
      map[u] = int16_t(j);
    }
    std::vector<std::pair<int, int>> by_distance(512);
    for (int u = 0; u < 4096; ++u) {
      first[u] = int32_t(neighbours.size());
      if (map[u] >= 0) continue;
      for (int j = 0; j < 512; ++j) {
        int d2 = 0;
        for (int i = 0; i < 4; ++i) {
          const int diff = byte(j, i) - (2 * ((u >> (3 * i)) & 7) + 1);
          d2 += diff * diff;
        }
        by_distance[j] = {d2, j};
      }
      std::sort(by_distance.begin(), by_distance.end());
      int distinct = 1;
      for (int j = 0; j < 512; ++j) {
        if (j > 0 && by_distance[j].first > by_distance[j - 1].first && ++distinct > 3) break;
        neighbours.push_back(uint16_t(by_distance[j].second));
      }
    }
    first[4096] = int32_t(neighbours.size());
  }
};

const IQ3SSearch& iq3s_search() {
  static const IQ3SSearch search;  // built once, on first use (thread-safe)
  return search;
}

// llama.cpp's iq3_find_best_neighbour: of code u's neighbours, the first with the least weighted squared
// error sum w_i (scale * byte_i - x_i)^2; its levels into l. Returns the point.
int iq3s_best_neighbour(const IQ3SSearch& g, int u, const float* x, const float* w, float scale, int8_t* l) {
  float best = std::numeric_limits<float>::max();
  int point = -1;
  for (int n = g.first[u]; n < g.first[u + 1]; ++n) {
    const int j = g.neighbours[n];
    float d2 = 0.0f;
    for (int i = 0; i < 4; ++i) {
      const float diff = scale * float(IQ3SSearch::byte(j, i)) - x[i];
      d2 += w[i] * diff * diff;
    }
    if (d2 < best) best = d2, point = j;
  }
  for (int i = 0; i < 4; ++i) l[i] = int8_t((IQ3SSearch::byte(point, i) - 1) / 2);
  return point;
}

// The 12-bit code of four levels, each 0..7.
inline int iq3s_code(const int8_t* l) { return l[0] | l[1] << 3 | l[2] << 6 | l[3] << 9; }

// Four values' levels at inverse scale id: round(0.5 (id x - 1)) in 0..7, so that 2 l + 1 ~ id x.
inline void iq3s_levels(const float* x, float id, int8_t* l) {
  for (int i = 0; i < 4; ++i) l[i] = int8_t(clamp_int(nearest_even(0.5f * (id * x[i] - 1)), 0, 7));
}

// llama.cpp's quantize_row_iq3_s_impl without an importance matrix (the one IQ format llama-quantize makes
// without one): per 32 values, the magnitudes' levels on the grid (weights x^2) for 19 trial scales,
// keeping the least-squares scale of the trial that explains the most; a code off the grid takes its best
// neighbour; then, if any did, the levels once more at the kept scale. The 8 scales become 4-bit odd
// multiples 2 ls + 1 of d = max_scale / 31, stored as d * 1.033. llama.cpp skips an all-zero 32 values
// without advancing its qs and signs pointers, which moves the sub-blocks after it one place down (so they
// decode wrongly); here every sub-block keeps its place. An all-zero one keeps zero bytes, which decode to
// d (the grid has no 0) unless the whole block is zeros.
void quantize_block(const float* x, block_iq3_s& b) {
  const IQ3SSearch& g = iq3s_search();
  std::memset(&b, 0, sizeof b);
  float scales[8], max_scale = 0.0f;
  for (int ib = 0; ib < 8; ++ib) {
    const float* xb = x + 32 * ib;
    float weight[32], waux[32], xval[32], max = 0.0f;
    for (int i = 0; i < 32; ++i) {
      weight[i] = xb[i] * xb[i];
      waux[i] = std::sqrt(weight[i]);
      xval[i] = std::fabs(xb[i]);
      if (xb[i] < 0) b.signs[4 * ib + i / 8] |= uint8_t(1 << (i % 8));
      max = std::max(max, xval[i]);
    }
    scales[ib] = 0.0f;
    if (max == 0.0f) continue;
    const auto fit = [&](const int8_t* l, float& sumqx, float& sumq2) {
      sumqx = 0.0f, sumq2 = 0.0f;
      for (int i = 0; i < 32; ++i) {
        const float q = float(2 * l[i] + 1);
        sumqx += weight[i] * xval[i] * q;
        sumq2 += weight[i] * q * q;
      }
    };
    int8_t L[32] = {}, trial[32];
    bool on_grid[8] = {}, trial_on_grid[8];
    float best = 0.0f, scale = max / 15;
    for (int step = -9; step <= 9; ++step) {
      const float id = (15 + float(step) * 0.2f) / max, trial_scale = 1 / id;
      for (int k = 0; k < 8; ++k) {
        iq3s_levels(xval + 4 * k, id, trial + 4 * k);
        const int u = iq3s_code(trial + 4 * k);
        trial_on_grid[k] = g.map[u] >= 0;
        if (!trial_on_grid[k]) iq3s_best_neighbour(g, u, xval + 4 * k, waux + 4 * k, trial_scale, trial + 4 * k);
      }
      float sumqx, sumq2;
      fit(trial, sumqx, sumq2);
      if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
        scale = sumqx / sumq2, best = scale * sumqx;
        std::copy(trial, trial + 32, L);
        std::copy(trial_on_grid, trial_on_grid + 8, on_grid);
      }
    }
    if (!std::all_of(on_grid, on_grid + 8, [](bool on) { return on; }) && scale > 0) {
      const float id = 1 / scale;
      for (int k = 0; k < 8; ++k) {
        iq3s_levels(xval + 4 * k, id, L + 4 * k);
        const int u = iq3s_code(L + 4 * k);
        if (g.map[u] < 0) iq3s_best_neighbour(g, u, xval + 4 * k, waux + 4 * k, scale, L + 4 * k);
      }
      float sumqx, sumq2;
      fit(L, sumqx, sumq2);
      if (sumq2 > 0) scale = sumqx / sumq2;
    }
    for (int k = 0; k < 8; ++k) {
      const int point = g.map[iq3s_code(L + 4 * k)];  // every kept code is on the grid
      b.qs[8 * ib + k] = uint8_t(point & 0xFF);
      b.qh[ib] |= uint8_t((point >> 8) << k);
    }
    scales[ib] = scale;
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) return;
  const float d = max_scale / 31;
  b.d = float_to_fp16(d * 1.033f);
  const float id = 1 / d;
  for (int ib = 0; ib < 8; ++ib)
    b.scales[ib / 2] |= uint8_t(clamp_int(nearest_even(0.5f * (id * scales[ib] - 1)), 0, 15) << (4 * (ib % 2)));
}

// ---------------------------------------------------------------- rows

constexpr fp16_bits kNaNBlockScale = 0x7e00;  // a quiet fp16 NaN

// Whether every value of a quantized block dequantizes finite: false where a finite input's fp16
// scales overflowed (their range ends at 65504, so Q8_0's d = amax/127 does from |w| ~ 8.3e6).
template <class Traits>
bool block_is_finite(const uint8_t* blk) {
  float v[32];
  for (int c = 0; c < Traits::kValues / 32; ++c) {
    Traits::dequantize_chunk(blk, c, v);
    if (!std::all_of(v, v + 32, [](float f) { return std::isfinite(f); })) return false;
  }
  return true;
}

// Whether a format's block scale is an fp16 d: every format quantize makes but the FP4 ones, whose scales
// are byte codes: MXFP4's a power of two (an E8M0 exponent), finite for every code and reaching FLT_MAX,
// NVFP4's an unsigned E4M3 value of at most 448.
template <class Block>
constexpr bool kFp16Scales = !std::is_same_v<Block, block_mxfp4> && !std::is_same_v<Block, block_nvfp4>;

// A block holding NaN or +-inf: stored with d = NaN, so that every value of the block (d * (...) +- ...)
// dequantizes to NaN; true. The FP4 formats have no such code (MXFP4's d * 0 is 0, and gguf decodes NVFP4's
// 0x7F, E4M3's NaN, to 0): false, and the row is an error.
template <class Block>
bool store_nan_block(Block& b) {
  if constexpr (!kFp16Scales<Block>) {
    return false;
  } else {
    std::memset(&b, 0, sizeof(Block));
    b.d = kNaNBlockScale;
    return true;
  }
}

// Past this magnitude a block is out of every format's range whose scales are fp16 (the widest, Q6_K
// and IQ4_XS, end at 65504 * 128 * 32 ~ 2.7e8) and refused before its fit: the searches weigh values
// by x^2 and multiply such sums (make_qx_quants, make_q3_quants, the IQ4 fit), which overflow float32
// for huge values, and a fit can then end in a zero scale (Q6_K from ~5e18, Q3_K from ~1e19), whose
// block of zeros would pass block_is_finite. MXFP4's quantizer squares nothing, and its scales reach
// every finite value. NVFP4's largest value is 6 x 448 (its largest scale code at the largest E2M1
// value); llama.cpp's quantizer saturates the scale beyond, and clips the values to it.
template <class Block>
constexpr float kLargestQuantized = std::is_same_v<Block, block_mxfp4>   ? std::numeric_limits<float>::max()
                                    : std::is_same_v<Block, block_nvfp4> ? 6.0f * 448.0f
                                                                         : 4294967296.0f;  // 2^32

// n rows of k values -> n rows of ceil(k / kValues) blocks. A last block that runs past k is
// quantized from a copy padded with zeros (the k-quants' zero padding); a block holding NaN or
// +-inf is stored as NaN (store_nan_block); rows run in parallel. A finite block the format cannot
// hold, or a non-finite one it cannot store, is an error naming its row (one such row).
template <QType T>
void quantize_rows(const float* x, int64_t n, int64_t k, uint8_t* out) {
  using Traits = QuantTraits<T>;
  using Block = typename Traits::block;
  constexpr int kValues = Traits::kValues;
  const int64_t blocks = weight_row_blocks<Traits>(k);
  std::atomic<int64_t> overflow_row{-1}, non_finite_row{-1};
  torch::stable::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    float padded[kValues];
    for (int64_t r = begin; r < end; ++r) {
      Block* dst = reinterpret_cast<Block*>(out + r * blocks * int64_t(sizeof(Block)));
      const float* row = x + r * k;
      for (int64_t b = 0; b < blocks; ++b) {
        const float* src = row + b * kValues;
        const int64_t have = std::min<int64_t>(kValues, k - b * kValues);
        if (have < kValues) {
          std::copy(src, src + have, padded);
          std::fill(padded + have, padded + kValues, 0.0f);
          src = padded;
        }
        if (std::all_of(src, src + kValues, [](float v) { return std::isfinite(v); })) {
          const auto in_range = [](float v) { return std::fabs(v) <= kLargestQuantized<Block>; };
          if (!std::all_of(src, src + kValues, in_range)) {
            overflow_row.store(r);
            continue;
          }
          quantize_block(src, dst[b]);
          if (!block_is_finite<Traits>(reinterpret_cast<const uint8_t*>(&dst[b]))) overflow_row.store(r);
        } else if (!store_nan_block(dst[b])) {  // a non-finite weight keeps its block non-finite, as
          non_finite_row.store(r);                // gguf's numpy Q8_0 does, where the format can
        }
      }
    }
  });
  if (const int64_t r = non_finite_row.load(); r >= 0)
    fail("w: row ", r, " holds NaN or infinite values, which ", qtype_name(T), " cannot represent (no code of its ",
         "block scale is NaN or infinite)");
  const int64_t r = overflow_row.load();
  if (r >= 0) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[r * k + i]));
    fail("w: row ", r, " holds finite values up to ", amax, " in magnitude, beyond what ", qtype_name(T),
         kFp16Scales<Block> ? " can represent (its fp16 block scales overflow; scale the weight down first)"
                            : " can represent (its values end at 6 x 448 = 2688; scale the weight down first)");
  }
}


// Whether this file has a quantizer for blocks of type Block.
template <class Block, class = void>
struct HasQuantizer : std::false_type {};
template <class Block>
struct HasQuantizer<Block, std::void_t<decltype(quantize_block(std::declval<const float*>(), std::declval<Block&>()))>>
    : std::true_type {};

}  // namespace

void quantize(QType wt, const float* x, int64_t n, int64_t k, uint8_t* out) {
  const bool known = visit_weight_format(wt, [&](auto traits) {
    using T = decltype(traits);
    if constexpr (HasQuantizer<typename T::block>::value) {
      quantize_rows<T::kType>(x, n, k, out);
    } else {
      fail("qtype: torchext has no quantizer for ", qtype_name(wt), ": llama.cpp makes it with an importance matrix ",
           "(llama-quantize --imatrix); load such weights from a GGUF file, or quantize to IQ3_S, IQ4_XS, IQ4_NL or a ",
           "k-quant (Q3_K, Q4_K, Q5_K, Q6_K) instead");
    }
  });
  if (!known) fail_unknown_format(wt, "quantize");
}

}  // namespace torchext::cpu
