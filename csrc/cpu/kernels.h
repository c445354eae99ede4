// CPU kernels: raw pointers in, the same block formats and traits as the CUDA kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/activation_math.h"
#include "kernels/cached_attention.h"
#include "kernels/float_types.h"
#include "kernels/rope_cache.h"
#include "kernels/row_index.h"

namespace torchext::cpu {

// The fewest items a parallel task of the CPU kernels takes, each costing work_per_item (multiply-adds,
// or values written): 2^14 work at least. A parallel region for less costs more than it saves, and
// where the process has more threads than free cores its barrier waits for threads that are not
// running (a 64x256 Q8_0 GEMV on 2 threads of a 2-core machine running 3 other busy processes: 113 us,
// against 9 us with one parallel task).
inline int64_t parallel_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, work_per_item));
}

// The GEMVs' grain in output rows (k * rows multiply-adds each), 16 at least: a 64-byte line of fp32 outputs.
inline int64_t gemv_grain(int64_t k, int64_t rows) { return std::max<int64_t>(16, parallel_grain(k * rows)); }

// rows x k activations -> rows x q8_1_blocks_per_row(k) Q8_1 blocks, bytes identical to CUDA's.
void quantize_q8_1(const void* x, FloatType xt, int64_t rows, int64_t k, block_q8_1* out);

// out[r, i] = sum_j w[i, j] * xq[r, j] for i < n, r < rows (output element type `ot`): the x86-64
// kernel of cpu_kernels() (VNNI or AVX2 dot products), else the portable one.
void gemv_q8_1(QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq, int64_t rows, void* out,
               FloatType ot);

// The kernels the GEMVs run, by the name TORCHEXT_CPU_KERNELS gives them ("portable" off x86-64), for
// torchext.info.
const char* gemv_kernels_name();

#if defined(__x86_64__) || defined(_M_X64)
// The x86-64 kernels the CPU runs, best first; TORCHEXT_CPU_KERNELS may ask for a lesser one.
enum class X86Kernels { kAvx512Vnni, kAvxVnni, kAvx2, kPortable };
X86Kernels cpu_kernels();  // read at each call: callers keep the answer of their first
const char* kernel_set_name(X86Kernels set);  // as TORCHEXT_CPU_KERNELS names it
inline bool has_avx2() { return cpu_kernels() != X86Kernels::kPortable; }  // AVX2, FMA and F16C at least
void gemv_q8_1_x86(X86Kernels isa, QType wt, const uint8_t* w, int64_t n, int64_t k, const block_q8_1* xq,
                   int64_t rows, void* out, FloatType ot);
void dequantize_avx2(QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out, void* out,
                     FloatType ot);
#endif

// rows_out x k dense values: output row i is weight row rows.source(i, n) of the n x k quantized
// weight (NaN for an id out of range); AVX2 where the CPU has it, the same bits either way.
void dequantize(QType wt, const uint8_t* w, int64_t n, int64_t k, RowIndex rows, int64_t rows_out, void* out,
                FloatType ot);

// out [batch, heads, rows, dim] = softmax(scale * q . k_j) . v_j over the keys visible from each row's
// position (kernels/cached_attention.h), in fp32; q, k, v and out of type t; pos already checked.
void cached_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window, float scale,
                      const AttentionShape& s, FloatType t, void* out);

// q_out [batch, heads, rows, dim] = rope(norm(q)); rope(norm(k)) and v into the caches at pos[r]
// (kernels/rope_cache.h); everything but cos and sin of type t; positions already checked.
void rope_cache_write(const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos, const float* sin,
                      const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps, const RopeShape& s,
                      FloatType t, void* q_out, void* k_cache, void* v_cache);

// out = gelu(x + bias[i % channels]) (bias may be null), computed in fp32.
void gelu(const void* x, const void* bias, void* out, int64_t numel, int64_t channels, FloatType t, bool tanh_form);

// The sum of squares of x[base .. base+k) (type t) in kernels/fused_q8_1_math.h's order (the bits of
// finish_row_sum_squares walking the whole row), in AVX2 vectors where the CPU has them.
float sum_squares(const void* x, FloatType t, int64_t base, int64_t k);

// x (rows x k, type xt) normalised per row, x / rms(x) * w with w [k] of type wt, rounded to xt, then
// quantize_q8_1: the arithmetic of kernels/fused_q8_1_math.h.
void rms_norm_quantize_q8_1(const void* x, FloatType xt, const void* w, FloatType wt, int64_t rows, int64_t k,
                            float eps, block_q8_1* out);

// sum = residual + t rounded to xt (t = x, or x normalised by x_weight where it is not null, of type xwt),
// then rms_norm_quantize_q8_1 of sum: the arithmetic of kernels/fused_q8_1_math.h.
void add_rms_norm_quantize_q8_1(const void* x, const void* residual, FloatType xt, const void* x_weight, FloatType xwt,
                                const void* w, FloatType wt, int64_t rows, int64_t k, float eps, void* sum,
                                block_q8_1* out);

// quantize_q8_1 of gelu(gate) * up (rows x k, both of type t), each rounded to t as the unfused ops round.
void gated_quantize_q8_1(const void* gate, const void* up, FloatType t, GateActivation act, int64_t rows, int64_t k,
                         block_q8_1* out);

// n x k float32 rows -> n rows of quantized bytes (llama.cpp's reference quantizers).
void quantize(QType wt, const float* x, int64_t n, int64_t k, uint8_t* out);

}  // namespace torchext::cpu
