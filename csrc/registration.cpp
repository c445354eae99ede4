// Every torchext schema, once. Backends add kernels in ops_cpu.cpp and ops_cuda.cpp; fake
// (meta) kernels live beside the Python wrappers in torchext/ops.py. `qtype` is a gguf
// GGMLQuantizationType id (torchext.QType); activations are [..., K], outputs [..., N].
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(torchext, m) {
  // float activations [..., K] -> Q8_1 bytes [..., ceil(K/256)*8*36], zero-padded; each block's first
  // word is d (fp32, 10 mantissa bits) with sum(qs) in its low 13 bits (kernels/blocks.h)
  m.def("quantize_q8_1(Tensor x) -> Tensor");
  // quantize_q8_1(rms_norm(x)) in one kernel, rms_norm(x) = x / sqrt(mean(x^2) + eps) * weight in fp32
  // rounded to x's dtype, weight [K] float32 or x's dtype; the sum of squares in the fixed order of
  // kernels/fused_q8_1_math.h, so CPU and CUDA give the same bytes
  m.def("rms_norm_quantize_q8_1(Tensor x, Tensor weight, float eps) -> Tensor");
  // a residual add and the next norm's input in one kernel: sum = residual + t rounded to x's dtype
  // (torch's add), t = x, or rms_norm(x) by x_weight (a post-norm on a sublayer's output, Gemma 2/3);
  // -> (sum, rms_norm_quantize_q8_1(sum, weight, eps)); x, residual [..., K] of one dtype and shape
  m.def("add_rms_norm_quantize_q8_1(Tensor x, Tensor residual, Tensor weight, float eps, Tensor? x_weight=None) -> "
        "(Tensor, Tensor)");
  // quantize_q8_1(gelu(gate, approximate) * up) in one kernel, gelu(gate) and the product each rounded to
  // the inputs' dtype as torchext.gelu and torch's multiplication round them; gate and up [..., K]
  m.def("gated_gelu_quantize_q8_1(Tensor gate, Tensor up, str approximate=\"tanh\") -> Tensor");
  // the same with SiLU, quantize_q8_1(silu(gate) * up) (a SwiGLU MLP's down projection input): silu in fp32,
  // on CUDA torch's formula (F.silu's bits), on the CPU correctly rounded (kernels/activation_math.h)
  m.def("gated_silu_quantize_q8_1(Tensor gate, Tensor up) -> Tensor");
  // Q4_K weights [N, ceil(K/256)*144] x Q8_1 activations -> float32 [..., N], integer DP4A dot products
  m.def("q4k_q8_gemv(Tensor w, Tensor xq, int n, int k) -> Tensor");
  // the same computation under the name the first, pre-torchext version of this code gave its
  // packed-nibble kernel, kept for code written against it; bit-identical output
  m.def("q4k_q8_gemv_packed(Tensor w, Tensor xq, int n, int k) -> Tensor");
  // Q4_K weights x float activations [..., K] -> [..., N] in x's dtype (quantize + dot)
  m.def("q4k_gemv(Tensor w, Tensor x, int n, int k) -> Tensor");
  // Q5_K weights [N, ceil(K/256)*176] x float activations -> [..., N] in x's dtype
  m.def("q5k_gemv(Tensor w, Tensor x, int n, int k) -> Tensor");
  // Q6_K weights [N, ceil(K/256)*210] x float activations -> [..., N] in x's dtype
  m.def("q6k_gemv(Tensor w, Tensor x, int n, int k) -> Tensor");
  // any weight format x float activations [..., K] -> [..., N]; the dispatch QuantLinear uses.
  // exact: never round the activations (no Q8_1 GEMV, whatever the number of rows)
  m.def("qmatmul(Tensor w, int qtype, Tensor x, int n, int k, bool exact=False) -> Tensor");
  // any weight format x Q8_1 activations [..., bytes] -> [..., N] in dtype (float32 when None): one
  // quantize_q8_1 shared by several weights that read the same input (q/k/v, gate/up)
  m.def("qmatmul_q8_1(Tensor w, int qtype, Tensor xq, int n, int k, ScalarType? dtype=None) -> Tensor");
  // a gated MLP's down projection from its gate and up outputs [..., K] (same shape and dtype): qmatmul_q8_1
  // of gated_gelu_quantize_q8_1(gate, up, approximate) -> [..., N] in gate's dtype, the same bytes; on CUDA
  // the GEMV computes and quantizes gelu(gate) * up itself for the rows its DP4A kernel takes (one launch)
  m.def("gated_gelu_qmatmul(Tensor w, int qtype, Tensor gate, Tensor up, int n, int k, str approximate=\"tanh\") -> "
        "Tensor");
  // the same of gated_silu_quantize_q8_1(gate, up): a SwiGLU MLP's down projection
  m.def("gated_silu_qmatmul(Tensor w, int qtype, Tensor gate, Tensor up, int n, int k) -> Tensor");
  // the experts' weights [E, n, row bytes] (one GGUF *_exps tensor) x activations x [T, k] (every slot of a
  // token reads its row) or [T, top_k, k] (a row per slot) with expert ids [T, top_k] (int64 or int32)
  // -> [T, top_k, n] in x's dtype: out[t, j] = x[t] (or x[t, j]) @ dequantize(w[ids[t, j]]).T, ggml's
  // mul_mat_id. The path follows the number of tokens T (kernels/batch_policy.h); exact as in qmatmul.
  // An id out of range raises on the CPU and gives a NaN row on CUDA.
  m.def("qmatmul_id(Tensor w, int qtype, Tensor x, Tensor ids, int n, int k, bool exact=False) -> Tensor");
  // attention of queries q [B, H, T, D] at positions pos [T] (int64) over a static key/value cache k_cache,
  // v_cache [B, KV, S, D] of q's dtype (query head h reads cache head h / (H / KV)): key j is visible
  // from position p when j <= p and, with window > 0, p - j < window; out [B, H, T, D] in q's dtype =
  // softmax(scale * q . k_j) . v_j over the visible j, in fp32. D a multiple of 8 up to 256. The work
  // follows the positions, not S. A position outside [0, S) raises on the CPU and gives a NaN row on CUDA.
  m.def("cached_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, float scale, int window=0) -> Tensor");
  // quantize_q8_1(cached_attention(q, k_cache, v_cache, pos, scale, window).transpose(1, 2).reshape(B, T, H * D)),
  // the same bytes, uint8 [B, T, q8_1 bytes of H * D values]: the attention's output as the Q8_1 input of the
  // projection after it (on CUDA written by the attention kernels, no quantize_q8_1 launch). D a multiple of 32.
  m.def("cached_attention_quantize_q8_1(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, float scale, "
        "int window=0) -> Tensor");
  // a decoder layer's step from its q/k/v projections to its attention: q [B, T, H, D], k and v [B, T, KV, D]
  // (views of a stacked projection allowed: rows strided, a row's heads and a head's values contiguous),
  // each q and k head RMS-normalised over D by q_weight / k_weight when given (x / sqrt(mean(x^2) + eps) *
  // weight in fp32, rounded to q's dtype), then rotated in rotate_half's order by row pos[t] (int64) of the
  // rotary tables cos, sin [P, D] (float32, P >= S): x * cos + rotate_half(x) * sin in fp32; k and v are
  // written into k_cache, v_cache [B, KV, S, D] at position pos[t], and q comes back as [B, H, T, D],
  // cached_attention's layout. A position outside [0, S) raises on the CPU; on CUDA that row's k and v are
  // not written and its q row is NaN.
  m.def("rope_cache_write(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor? q_weight=None, Tensor? k_weight=None, float eps=1e-6) -> Tensor");
  // GELU, approximate in {"none", "tanh"} as torch.nn.functional.gelu
  m.def("gelu(Tensor x, str approximate=\"none\") -> Tensor");
  // in-place GELU: overwrites x. It returns nothing, so that functionalization (torch.compile)
  // can rewrite it; torchext.gelu_ returns x
  m.def("gelu_(Tensor(a!) x, str approximate=\"none\") -> ()");
  // GELU(x + bias), bias [K] broadcast over x [..., K], the sum kept in fp32
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate=\"none\") -> Tensor");
  // quantized weight -> dense [N, K] in dtype (float32 when None)
  m.def("dequantize(Tensor w, int qtype, int n, int k, ScalarType? dtype=None) -> Tensor");
  // rows ids [...] of a quantized weight -> dense [..., K] in dtype (float32 when None): a
  // quantized embedding table. Out-of-range ids raise on the CPU and give NaN rows on CUDA.
  m.def("embedding(Tensor w, int qtype, Tensor ids, int n, int k, ScalarType? dtype=None) -> Tensor");
  // dense float [N, K] -> quantized bytes [N, row bytes], llama.cpp's reference quantizers (CPU)
  m.def("quantize(Tensor w, int qtype) -> Tensor");
}
