"""Typed wrappers over torch.ops.torchext, each with its fake (meta) kernel beside it.

The fakes give output shape, dtype and device without running anything, so torch.compile
(fullgraph=True) and FakeTensor tracing see through every op. tests/test_opcheck.py checks each
fake against the real op on every dtype.
"""

from __future__ import annotations

import torch

from .formats import QType, q8_1_row_bytes, row_bytes

_ops = torch.ops.torchext
_register_fake = torch.library.register_fake


def _with_last(x: torch.Tensor, last: int) -> list[int]:
    return [*x.shape[:-1], last]


# ---- activations -------------------------------------------------------------------------

def quantize_q8_1(x: torch.Tensor) -> torch.Tensor:
    """Q8_1 blocks of x [..., K] (f32/f16/bf16): uint8 [..., ceil(K/256)*8*36], zero-padded.
    Each block stores d = amax/127 (fp16), s = the sum of its 32 inputs (fp16), 32 int8 quants;
    CPU and CUDA produce identical bytes."""
    return _ops.quantize_q8_1(x)


@_register_fake("torchext::quantize_q8_1")
def _(x):
    return x.new_empty(_with_last(x, q8_1_row_bytes(x.shape[-1])), dtype=torch.uint8)


# ---- quantized matmul ----------------------------------------------------------------------

def q4k_q8_gemv(w: torch.Tensor, xq: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q4_K weights [n, ceil(k/256)*144] x Q8_1 activations [..., bytes] -> float32 [..., n]."""
    return _ops.q4k_q8_gemv(w, xq, n, k)


def q4k_q8_gemv_packed(w: torch.Tensor, xq: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The seed's packed-nibble name for q4k_q8_gemv; the kernel already feeds four nibbles per
    DP4A operand, so both names run it and return identical bits."""
    return _ops.q4k_q8_gemv_packed(w, xq, n, k)


def _fake_gemv_q8_1(w, xq, n, k):
    return xq.new_empty(_with_last(xq, n), dtype=torch.float32)


_register_fake("torchext::q4k_q8_gemv")(_fake_gemv_q8_1)
_register_fake("torchext::q4k_q8_gemv_packed")(_fake_gemv_q8_1)


def qmatmul(w: torch.Tensor, qtype, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """x [..., k] @ dequantize(w).T -> [..., n] in x's dtype, for any weight format.
    Up to GEMV_MAX_ROWS (16) rows: Q8_1 activations and integer dot products (DP4A, or int8 tensor
    cores from 2 rows on sm_80+); more rows: dense GEMM on the dequantized weight."""
    return _ops.qmatmul(w, int(QType.of(qtype)), x, n, k)


def q4k_gemv(w: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qmatmul for Q4_K weights."""
    return _ops.q4k_gemv(w, x, n, k)


def q5k_gemv(w: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qmatmul for Q5_K weights."""
    return _ops.q5k_gemv(w, x, n, k)


def q6k_gemv(w: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qmatmul for Q6_K weights."""
    return _ops.q6k_gemv(w, x, n, k)


def _fake_matmul(w, x, n, k):
    return x.new_empty(_with_last(x, n))


for _name in ("q4k_gemv", "q5k_gemv", "q6k_gemv"):
    _register_fake(f"torchext::{_name}")(_fake_matmul)


@_register_fake("torchext::qmatmul")
def _(w, qtype, x, n, k):
    return x.new_empty(_with_last(x, n))


def qmatmul_q8_1(w: torch.Tensor, qtype, xq: torch.Tensor, n: int, k: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights of any format x Q8_1 activations xq [..., bytes] (from quantize_q8_1) -> [..., n]
    in dtype: qmatmul's GEMV path with the quantization done by the caller, so that several
    weights reading the same input share one quantize_q8_1. With dtype = x's dtype,
    qmatmul_q8_1(w, qtype, quantize_q8_1(x), n, k, x.dtype) equals qmatmul(w, qtype, x, n, k)
    bit for bit whenever qmatmul takes the GEMV path (up to GEMV_MAX_ROWS rows)."""
    return _ops.qmatmul_q8_1(w, int(QType.of(qtype)), xq, n, k, dtype)


@_register_fake("torchext::qmatmul_q8_1")
def _(w, qtype, xq, n, k, dtype=None):
    return xq.new_empty(_with_last(xq, n), dtype=dtype or torch.float32)


#: The most activation rows qmatmul sends through the Q8_1 GEMV; more rows take the dense path
#: (kernels/batch_policy.h, kMaxGemvRows: tests/test_matmul.py checks that the two agree).
GEMV_MAX_ROWS = 16


# ---- weights ---------------------------------------------------------------------------------

def dequantize(w: torch.Tensor, qtype, n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [n, k] values of quantized weight bytes (values past k, the padding, are dropped)."""
    return _ops.dequantize(w, int(QType.of(qtype)), n, k, dtype)


@_register_fake("torchext::dequantize")
def _(w, qtype, n, k, dtype=None):
    return w.new_empty((n, k), dtype=dtype or torch.float32)


def embedding(w: torch.Tensor, qtype, ids: torch.Tensor, n: int, k: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ids [...] (int64 or int32) of a quantized [n, k] weight as dense [..., k]: a token
    embedding that stays quantized. An id outside [0, n) raises on the CPU; on CUDA, where
    checking would synchronise with the host, its row comes out NaN."""
    return _ops.embedding(w, int(QType.of(qtype)), ids, n, k, dtype)


@_register_fake("torchext::embedding")
def _(w, qtype, ids, n, k, dtype=None):
    return w.new_empty((*ids.shape, k), dtype=dtype or torch.float32)


def quantize(w: torch.Tensor, qtype) -> torch.Tensor:
    """Quantized bytes [n, row_bytes] of a dense float [n, k] weight (llama.cpp's reference
    quantizers; the last k-quant super-block is zero-padded). Runs on the CPU; a tensor on
    another device is quantized there and the bytes are moved back."""
    qt = int(QType.of(qtype))
    if w.device.type != "cpu":
        return _ops.quantize(w.detach().float().cpu().contiguous(), qt).to(w.device)
    return _ops.quantize(w, qt)


@_register_fake("torchext::quantize")
def _(w, qtype):
    return w.new_empty((w.shape[0], row_bytes(qtype, w.shape[1])), dtype=torch.uint8)


# ---- GELU ------------------------------------------------------------------------------------

def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU as torch.nn.functional.gelu (approximate "none" or "tanh"), computed in fp32."""
    return _ops.gelu(x, approximate)


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """In-place GELU: overwrites x and returns it (the op itself returns nothing, as mutating
    custom ops must for torch.compile's functionalization)."""
    _ops.gelu_(x, approximate)
    return x


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x + bias) with bias [K] over x [..., K]; the sum is kept in fp32 (one rounding)."""
    return _ops.bias_gelu(x, bias, approximate)


@_register_fake("torchext::gelu")
def _(x, approximate="none"):
    return torch.empty_like(x)


@_register_fake("torchext::gelu_")
def _(x, approximate="none"):
    return None


@_register_fake("torchext::bias_gelu")
def _(x, bias, approximate="none"):
    return torch.empty_like(x)


# ---- autograd ------------------------------------------------------------------------------------
# Gradients flow to the activations (and the bias), so layers upstream of a quantized one train;
# the quantized weights are uint8 bytes and take none. Backward runs dense torch ops.

def _setup_matmul_qtype(ctx, inputs, output):
    w, qtype, x, n, k = inputs
    ctx.w, ctx.qtype, ctx.n, ctx.k = w, qtype, n, k


def _backward_matmul_qtype(ctx, grad):
    return None, None, grad @ dequantize(ctx.w, ctx.qtype, ctx.n, ctx.k, grad.dtype), None, None


torch.library.register_autograd("torchext::qmatmul", _backward_matmul_qtype, setup_context=_setup_matmul_qtype)
for _name, _qtype in (("q4k_gemv", QType.Q4_K), ("q5k_gemv", QType.Q5_K), ("q6k_gemv", QType.Q6_K)):
    def _setup(ctx, inputs, output, _qtype=_qtype):
        w, x, n, k = inputs
        ctx.w, ctx.qtype, ctx.n, ctx.k = w, int(_qtype), n, k

    def _backward(ctx, grad):
        return None, grad @ dequantize(ctx.w, ctx.qtype, ctx.n, ctx.k, grad.dtype), None, None

    torch.library.register_autograd(f"torchext::{_name}", _backward, setup_context=_setup)


def _setup_gelu(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward_gelu(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate), None


def _setup_bias_gelu(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward_bias_gelu(ctx, grad):
    x, bias = ctx.saved_tensors
    z = x.float() + bias.float()  # the op keeps x + bias in fp32
    grad_z = torch.ops.aten.gelu_backward(grad.float(), z, approximate=ctx.approximate)
    grad_bias = grad_z.reshape(-1, grad_z.shape[-1]).sum(0)
    return grad_z.to(x.dtype), grad_bias.to(bias.dtype), None


torch.library.register_autograd("torchext::gelu", _backward_gelu, setup_context=_setup_gelu)
torch.library.register_autograd("torchext::bias_gelu", _backward_bias_gelu, setup_context=_setup_bias_gelu)
