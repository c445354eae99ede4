"""Typed wrappers over torch.ops.torchext, each with its fake (meta) kernel beside it.

The fakes give output shape, dtype and device without running anything, so torch.compile
(fullgraph=True) and FakeTensor tracing see through every op. They also run for any call with a
meta tensor among its arguments, so they check what the kernels check (csrc/checks.h), with the
same RuntimeError messages: a bad call fails while tracing, and a meta tensor mixed with a CPU or
CUDA one is an error rather than an uninitialised result. Only what needs data is left to the
kernels: storage alignment and embedding ids in range. tests/test_opcheck.py checks each fake
against the real op on every dtype; tests/test_fakes.py checks that both reject the same inputs.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.autograd.graph import increment_version

from . import _C
from .formats import (CPU_GEMV_MAX_ROWS, QUANTIZABLE_TYPES, WEIGHT_TYPES, QType, block_bytes, block_values,
                      q8_1_row_bytes, row_bytes)

_ops = torch.ops.torchext
_register_fake = torch.library.register_fake


def _call(op, *args):
    """op(*args), dispatched below its Autograd kernel when no gradient can be wanted (grad mode off, or no
    argument requires grad): the kernel torch.library.register_autograd adds is Python, and reaching it
    only to find that out cost an eager call about 3.6 µs of the 8.2 a small qmatmul took under no_grad
    (2-core CPU, Q8_0 32x256, one row; 4.6 µs in inference mode, which skips it). Traced code
    (torch.compile, export) calls the op as it is, and so does inference mode, which skips the kernel itself."""
    if torch.compiler.is_compiling():  # first: dynamo refuses torch.is_inference_mode_enabled()
        return op(*args)
    if torch.is_grad_enabled():
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return op(*args)
    elif torch.is_inference_mode_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _with_last(x: torch.Tensor, last: int) -> list[int]:
    return [*x.shape[:-1], last]


# ---- the kernels' argument checks, for the fakes ------------------------------------------------
# torch._check raises RuntimeError(message) and, on a symbolic condition, guards on it (or
# defers it to run time) instead of failing the trace.

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT64_MAX = 2**63 - 1
_FLOAT32_MAX = 3.4028234663852886e38
_WEIGHT_NAMES = [q.name for q in WEIGHT_TYPES]
# the dtypes csrc/checks.h (dtype_name) names; any other it calls "an unsupported dtype"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.uint8: "uint8", torch.int8: "int8", torch.int32: "int32", torch.int64: "int64",
                torch.float64: "float64", torch.bool: "bool", torch.int16: "int16", torch.complex64: "complex64",
                torch.complex128: "complex128"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, "an unsupported dtype")


def _check_contiguous(t: torch.Tensor, arg: str) -> None:
    torch._check(t.is_contiguous(), lambda: f"{arg}: expected a contiguous tensor (call .contiguous() first)")


def _check_float(t: torch.Tensor, arg: str) -> None:
    torch._check(t.dtype in _FLOAT_DTYPES,
                 lambda: f"{arg}: expected a float32, float16 or bfloat16 tensor, got {_dtype_name(t.dtype)}")


def _output_dtype(dtype) -> torch.dtype:
    dtype = torch.float32 if dtype is None else dtype
    torch._check(dtype in _FLOAT_DTYPES,
                 lambda: f"dtype: expected float32, float16 or bfloat16, got {_dtype_name(dtype)}")
    return dtype


def _check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    torch._check(a.device == b.device,
                 lambda: f"{a_name} and {b_name}: expected tensors on the same device, got {a_name} on {a.device} "
                         f"and {b_name} on {b.device}")


def _check_shape_nk(n: int, k: int) -> None:
    torch._check(n > 0, lambda: f"n: expected a positive number of output rows, got {n}")
    torch._check(k > 0, lambda: f"k: expected a positive row length, got {k}")


def _weight_format(qtype: int) -> QType:
    try:
        q = QType(qtype)
    except ValueError:
        q = None
    torch._check(q in WEIGHT_TYPES,
                 lambda: f"qtype: unknown or unsupported weight format id {qtype} (expected a gguf "
                         f"GGMLQuantizationType of {', '.join(_WEIGHT_NAMES[:-1])} or {_WEIGHT_NAMES[-1]})")
    return q


def _check_whole_blocks(q: QType, k: int, arg: str) -> None:
    bv = block_values(q)
    torch._check(bv == 256 or k % bv == 0,
                 lambda: f"{arg}: {q.name} rows are whole {bv}-value blocks, so k must be a multiple of {bv}; got {k}")


def _checked_mul(a: int, b: int, what: str) -> int:
    """a * b for positive a and b, as the kernels compute sizes: an error naming `what` where the
    product overflows int64."""
    torch._check(a * b <= _INT64_MAX, lambda: f"{what}: the size overflows int64 ({a} x {b})")
    return a * b


def _q8_1_shape(x: torch.Tensor, arg: str) -> list[int]:
    """x's shape with its last dimension K replaced by the bytes of a Q8_1 row of K values (an error naming
    arg where they overflow int64, as the kernels' check)."""
    k = x.shape[-1]
    return _with_last(x, _checked_mul(-(-k // 256), q8_1_row_bytes(256), arg))


def _check_weight_bytes(w: torch.Tensor, qtype: int, n: int, k: int) -> tuple[QType, int]:
    """(format, bytes per row) of a quantized weight's format, n and k, and its bytes: uint8, contiguous."""
    q = _weight_format(qtype)
    _check_shape_nk(n, k)
    _check_whole_blocks(q, k, "k")
    _check_contiguous(w, "w")
    torch._check(w.dtype == torch.uint8,
                 lambda: f"w: expected raw {q.name} bytes as a uint8 tensor, got {_dtype_name(w.dtype)}")
    return q, _checked_mul(-(-k // block_values(q)), block_bytes(q), "k")


def _check_weight(w: torch.Tensor, qtype: int, n: int, k: int) -> QType:
    """A quantized weight: uint8, contiguous, exactly n rows of row_bytes(qtype, k)."""
    q, rb = _check_weight_bytes(w, qtype, n, k)
    torch._check(w.numel() == _checked_mul(n, rb, "n"),
                 lambda: f"w: expected {n * rb} bytes for {q.name} with n={n}, k={k} ({n} rows of {rb} bytes), "
                         f"got {w.numel()}")
    return q


def _check_activations(x: torch.Tensor, k: int, arg: str = "x") -> None:
    """Float activations [..., k]."""
    _check_contiguous(x, arg)
    _check_float(x, arg)
    torch._check(x.dim() >= 1, lambda: f"{arg}: expected at least one dimension [..., K], got a scalar")
    torch._check(x.shape[-1] == k, lambda: f"{arg}: expected the last dimension to be k={k}, got {x.shape[-1]}")


def _check_q8_1(xq: torch.Tensor, k: int) -> None:
    """Q8_1 activations [..., q8_1_row_bytes(k)], as quantize_q8_1 makes them."""
    _check_contiguous(xq, "xq")
    torch._check(xq.dtype == torch.uint8,
                 lambda: f"xq: expected Q8_1 bytes as a uint8 tensor, got {_dtype_name(xq.dtype)}")
    torch._check(xq.dim() >= 1, lambda: "xq: expected at least one dimension [..., bytes], got a scalar")
    expected = q8_1_row_bytes(k)
    torch._check(xq.shape[-1] == expected,
                 lambda: f"xq: expected the last dimension to be {expected} bytes (k={k} padded to whole 256-value "
                         f"super-blocks, 36 bytes per 32 values), got {xq.shape[-1]}")


def _check_approximate(approximate: str) -> None:
    torch._check(approximate in ("none", "tanh"),
                 lambda: f"approximate: expected 'none' or 'tanh' (as torch.nn.functional.gelu), got '{approximate}'")


def _check_gelu_input(x: torch.Tensor) -> None:
    _check_contiguous(x, "x")
    _check_float(x, "x")


def _check_like(t: torch.Tensor, arg: str, ref: torch.Tensor, ref_arg: str) -> None:
    """t, a second input of ref's dtype and shape (no broadcasting), contiguous, on ref's device."""
    _check_contiguous(t, arg)
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{arg}: expected the dtype of {ref_arg} ({_dtype_name(ref.dtype)}), "
                         f"got {_dtype_name(t.dtype)}")
    torch._check(t.shape == ref.shape,
                 lambda: f"{arg}: expected the shape of {ref_arg} {list(ref.shape)}, got {list(t.shape)}")
    _check_same_device(ref, ref_arg, t, arg)


def _check_norm_weight(weight: torch.Tensor, arg: str, x: torch.Tensor) -> None:
    _check_contiguous(weight, arg)
    torch._check(weight.dtype in (torch.float32, x.dtype),
                 lambda: f"{arg}: expected float32 or the dtype of x ({_dtype_name(x.dtype)}), got "
                         f"{_dtype_name(weight.dtype)}")
    k = x.shape[-1]
    torch._check(weight.dim() == 1 and weight.shape[0] == k,
                 lambda: f"{arg}: expected shape [{k}] (x's last dimension), got {list(weight.shape)}")
    _check_same_device(x, "x", weight, arg)


def _flag(value, arg: str) -> bool:
    """A bool argument as it is (TypeError for anything else: bool("False") would be True)."""
    if not isinstance(value, bool):
        kind = type(value)  # numpy's bool is also named "bool": say whose
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{arg}: expected a bool, got {name}")
    return value


def _number(value, arg: str) -> float:
    """A float argument: a real number (TypeError for anything else, such as a string)."""
    _check_real(value, arg)
    return float(value)


def _check_real(value, arg: str) -> None:
    """TypeError unless value is a real number (not a bool, which the dispatcher would take as 1.0 or 0.0)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{arg}: expected a number, got {type(value).__name__}")


def _check_whole(value, arg: str) -> None:
    """TypeError unless value is a whole number (not a bool, which the dispatcher would take as 1 or 0)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{arg}: expected a whole number, got {type(value).__name__}")


def _check_sizes(n, k) -> None:
    """TypeError unless n and k are whole numbers: the dispatcher takes a bool as 1 or 0, so n=True ran a
    one-row weight."""
    if type(n) is not int or type(k) is not int:  # the common case costs two type tests
        _check_whole(n, "n")
        _check_whole(k, "k")


def _check_eps(eps: float) -> None:
    torch._check(0.0 <= eps <= _FLOAT32_MAX, lambda: "eps: expected a number >= 0 that float32 holds")


# ---- activations -------------------------------------------------------------------------

def quantize_q8_1(x: torch.Tensor) -> torch.Tensor:
    """Q8_1 blocks of x [..., K] (f32/f16/bf16): uint8 [..., ceil(K/256)*8*36], zero-padded.
    Each 36-byte block of 32 values is a word holding d = amax/127 as fp32 rounded up to 10
    mantissa bits, with sum(qs) in its low 13 bits, then the 32 int8 quants qs = round(x/d);
    CPU and CUDA produce identical bytes (the README's "Q8_1 activations" has the details)."""
    return _ops.quantize_q8_1(x)


def _check_q8_1_source(x: torch.Tensor, arg: str) -> None:
    """Activations [..., K] with K > 0, the input of every op that produces Q8_1 activations."""
    torch._check(x.dim() >= 1, lambda: f"{arg}: expected activations of shape [..., K]")
    torch._check(x.shape[-1] > 0, lambda: f"{arg}: expected a positive last dimension (K), got {x.shape[-1]}")
    _check_activations(x, x.shape[-1], arg)


@_register_fake("torchext::quantize_q8_1")
def _(x):
    _check_q8_1_source(x, "x")
    return x.new_empty(_q8_1_shape(x, "x"), dtype=torch.uint8)


def rms_norm_quantize_q8_1(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """quantize_q8_1(rms_norm(x)) in one kernel, for the GEMVs that read a normalised input
    (qmatmul_q8_1): the same bytes as quantize_q8_1 of

        xf = x.float();  rms_norm(x) = ((xf * (1 / sqrt(sum(xf**2) / K + eps))) * weight.float()).to(x.dtype)

    over the last dimension K of x [..., K] (float32, float16 or bfloat16), weight [K] float32 or x's
    dtype, every step rounded to float32 (no fused multiply-add). The sum of squares runs in a fixed
    order, the same on the CPU and CUDA: 32 partial sums, partial l adding xf[j]**2 for j = l, l + 32,
    l + 64, ... in turn, then folded in halves (partial l += partial l + h for h = 16, 8, 4, 2, 1).
    A model's RMSNorm that sums in another order (torch's mean) agrees up to that sum's float32
    rounding. Where xf**2 overflows float32 (|x| above ~1.8e19) the row normalises to zeros, as
    that formula gives it. Returns uint8 [..., ceil(K/256)*8*36], the layout of quantize_q8_1."""
    return _ops.rms_norm_quantize_q8_1(x, weight, _number(eps, "eps"))


@_register_fake("torchext::rms_norm_quantize_q8_1")
def _(x, weight, eps):
    _check_q8_1_source(x, "x")
    _check_norm_weight(weight, "weight", x)
    _check_eps(eps)
    return x.new_empty(_q8_1_shape(x, "x"), dtype=torch.uint8)


def add_rms_norm_quantize_q8_1(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               x_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the next layer's normalised Q8_1 input in one kernel:

        t = x if x_weight is None else rms_norm(x, x_weight, eps)
        s = residual + t                                  # in x's dtype, as torch adds
        return s, rms_norm_quantize_q8_1(s, weight, eps)

    with rms_norm the arithmetic rms_norm_quantize_q8_1 documents (both norms), so the bytes and
    values are those of the unfused ops. x_weight is a post-norm on a sublayer's output before it
    joins the residual stream (Gemma 2 and 3); without it this is a pre-norm decoder's
    `h = h + attn(...)` followed by the MLP's input norm. x and residual: [..., K] of one float dtype
    and shape; weight and x_weight: [K], float32 or x's dtype. Returns s (a new tensor like x) and
    uint8 [..., ceil(K/256)*8*36], the layout of quantize_q8_1."""
    return _call(_ops.add_rms_norm_quantize_q8_1, x, residual, weight, _number(eps, "eps"), x_weight)


@_register_fake("torchext::add_rms_norm_quantize_q8_1")
def _(x, residual, weight, eps, x_weight=None):
    _check_q8_1_source(x, "x")
    _check_like(residual, "residual", x, "x")
    _check_norm_weight(weight, "weight", x)
    if x_weight is not None:
        _check_norm_weight(x_weight, "x_weight", x)
    _check_eps(eps)
    return torch.empty_like(x), x.new_empty(_q8_1_shape(x, "x"), dtype=torch.uint8)


def gated_gelu_quantize_q8_1(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """quantize_q8_1(gelu(gate, approximate) * up) in one kernel, for a gated MLP's down projection
    (qmatmul_q8_1): the same bytes as quantize_q8_1(torchext.gelu(gate, approximate) * up) on the same
    device, GELU's output and the product each rounded to the inputs' dtype. gate and up: [..., K] of
    one float dtype and shape (no broadcasting); approximate "tanh" (the default, Gemma's and GeGLU's
    form) or "none". Returns uint8 [..., ceil(K/256)*8*36], the layout of quantize_q8_1."""
    return _ops.gated_gelu_quantize_q8_1(gate, up, approximate)


@_register_fake("torchext::gated_gelu_quantize_q8_1")
def _(gate, up, approximate="tanh"):
    _check_q8_1_source(gate, "gate")
    _check_like(up, "up", gate, "gate")
    _check_approximate(approximate)
    return gate.new_empty(_q8_1_shape(gate, "gate"), dtype=torch.uint8)


def gated_silu_quantize_q8_1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """quantize_q8_1(silu(gate) * up) in one kernel, for a SwiGLU MLP's down projection (qmatmul_q8_1):
    SiLU's output and the product each rounded to the inputs' dtype, as silu(gate) * up rounds them.
    SiLU is x / (1 + exp(-x)) in fp32: on CUDA torch's formula, so the bytes are those of
    quantize_q8_1(F.silu(gate) * up) there; on the CPU the correctly rounded value (torch's own CPU SiLU
    mixes two exp implementations, which differ in the last bit). Below x of about -88.7, where exp(-x)
    overflows fp32, the formula gives -0 and the CPU the tiny true value (silu(-80) = -1.4e-33). gate
    and up: [..., K] of one float dtype and shape. Returns uint8 [..., ceil(K/256)*8*36], the layout of
    quantize_q8_1."""
    return _ops.gated_silu_quantize_q8_1(gate, up)


@_register_fake("torchext::gated_silu_quantize_q8_1")
def _(gate, up):
    _check_q8_1_source(gate, "gate")
    _check_like(up, "up", gate, "gate")
    return gate.new_empty(_q8_1_shape(gate, "gate"), dtype=torch.uint8)


# ---- quantized matmul ----------------------------------------------------------------------

def q4k_q8_gemv(w: torch.Tensor, xq: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Q4_K weights [n, ceil(k/256)*144] x Q8_1 activations [..., bytes] -> float32 [..., n]."""
    _check_sizes(n, k)
    return _ops.q4k_q8_gemv(w, xq, n, k)


def q4k_q8_gemv_packed(w: torch.Tensor, xq: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """q4k_q8_gemv under the name that the first, pre-torchext version of this code gave its
    packed-nibble kernel, kept so that code written against it runs: the kernel already feeds
    four nibbles per DP4A operand, so both names run it and return identical bits."""
    _check_sizes(n, k)
    return _ops.q4k_q8_gemv_packed(w, xq, n, k)


def _fake_gemv_q8_1(w, qtype, xq, n, k, dtype=None):
    _check_weight(w, qtype, n, k)
    _check_q8_1(xq, k)
    _check_same_device(w, "w", xq, "xq")
    return xq.new_empty(_with_last(xq, n), dtype=_output_dtype(dtype))


def _fake_q4k_q8_gemv(w, xq, n, k):
    return _fake_gemv_q8_1(w, int(QType.Q4_K), xq, n, k)


_register_fake("torchext::q4k_q8_gemv")(_fake_q4k_q8_gemv)
_register_fake("torchext::q4k_q8_gemv_packed")(_fake_q4k_q8_gemv)


def qmatmul(w: torch.Tensor, qtype, x: torch.Tensor, n: int, k: int, exact: bool = False) -> torch.Tensor:
    """x [..., k] @ dequantize(w).T -> [..., n] in x's dtype, for any weight format.
    Up to gemv_max_rows(x, n, qtype) rows (4, 8 or 16 on CUDA, 4 to 48 by format on the CPU): Q8_1
    activations and integer dot products (DP4A, or int8 tensor cores from 2 rows on sm_80+). From there
    to 64 rows of fp16/bf16 on CUDA (sm_80+) (to 16 on weights under 2^23 values, where it loses to
    the dense path beyond), and to 256 on compute capability 9.0 for weights whose rows are a
    multiple of 16 bytes (not Q8_0; Q4_K and Q5_K on weights of 2^25 values or more, with rows of 4096
    values or more, to 512 in 256-row chunks): a tiled GEMM over the quantized weight with the activations unrounded
    (fp32 products and sums); in bf16 it computes each weight d * q + m in bf16 from d and m rounded
    to it (not for Q8_0, IQ4_NL and IQ4_XS), in fp16 it multiplies each weight exactly as dequantize()
    gives it, rounded to fp16.
    Otherwise: a dense GEMM on the dequantized weight (each weight exactly as dequantize() gives it,
    rounded to x's dtype; the same activations).
    exact=True takes exact weights and unrounded activations at any row count: the tiled GEMM
    multiplying each weight exactly as dequantize() gives it (fp16/bf16 on CUDA), or the dense GEMM."""
    _check_sizes(n, k)
    return _call(_ops.qmatmul, w, int(QType.of(qtype)), x, n, k, _flag(exact, "exact"))


def q4k_gemv(w: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qmatmul for Q4_K weights."""
    _check_sizes(n, k)
    return _call(_ops.q4k_gemv, w, x, n, k)


def q5k_gemv(w: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qmatmul for Q5_K weights."""
    _check_sizes(n, k)
    return _call(_ops.q5k_gemv, w, x, n, k)


def q6k_gemv(w: torch.Tensor, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qmatmul for Q6_K weights."""
    _check_sizes(n, k)
    return _call(_ops.q6k_gemv, w, x, n, k)


@_register_fake("torchext::qmatmul")
def _fake_matmul(w, qtype, x, n, k, exact=False):
    _check_weight(w, qtype, n, k)
    _check_activations(x, k)
    _check_same_device(w, "w", x, "x")
    return x.new_empty(_with_last(x, n))


def _fake_fixed_format_matmul(qtype: QType):
    def fake(w, x, n, k):
        return _fake_matmul(w, int(qtype), x, n, k)
    return fake


for _name, _qtype in (("q4k_gemv", QType.Q4_K), ("q5k_gemv", QType.Q5_K), ("q6k_gemv", QType.Q6_K)):
    _register_fake(f"torchext::{_name}")(_fake_fixed_format_matmul(_qtype))


def qmatmul_q8_1(w: torch.Tensor, qtype, xq: torch.Tensor, n: int, k: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights of any format x Q8_1 activations xq [..., bytes] (from quantize_q8_1) -> [..., n]
    in dtype: qmatmul's GEMV path with the quantization done by the caller, so that several
    weights reading the same input share one quantize_q8_1. With dtype = x's dtype,
    qmatmul_q8_1(w, qtype, quantize_q8_1(x), n, k, x.dtype) equals qmatmul(w, qtype, x, n, k)
    bit for bit whenever qmatmul takes the GEMV path (up to gemv_max_rows(x, n, qtype) rows)."""
    _check_sizes(n, k)
    return _ops.qmatmul_q8_1(w, int(QType.of(qtype)), xq, n, k, dtype)


_register_fake("torchext::qmatmul_q8_1")(_fake_gemv_q8_1)


def gated_gelu_qmatmul(w: torch.Tensor, qtype, gate: torch.Tensor, up: torch.Tensor, n: int, k: int,
                       approximate: str = "tanh") -> torch.Tensor:
    """A gated MLP's down projection from its gate and up outputs [..., k] (one float dtype and shape):
    qmatmul_q8_1(w, qtype, gated_gelu_quantize_q8_1(gate, up, approximate), n, k, gate.dtype) -> [..., n]
    in gate's dtype, the same bits. On CUDA, when the GEMV's DP4A kernel takes the rows (up to 8; one
    row of the 256-value formats where the int8 tensor-core GEMV takes 2 or more), each of its CTAs
    computes and quantizes gelu(gate) * up itself: one launch instead of two. Otherwise, and on the
    CPU, the two ops run in turn."""
    _check_sizes(n, k)
    return _call(_ops.gated_gelu_qmatmul, w, int(QType.of(qtype)), gate, up, n, k, approximate)


@_register_fake("torchext::gated_gelu_qmatmul")
def _(w, qtype, gate, up, n, k, approximate="tanh"):
    _check_weight(w, qtype, n, k)
    _check_activations(gate, k, "gate")
    _check_like(up, "up", gate, "gate")
    _check_same_device(w, "w", gate, "gate")
    _check_approximate(approximate)
    return gate.new_empty(_with_last(gate, n))


def gated_silu_qmatmul(w: torch.Tensor, qtype, gate: torch.Tensor, up: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A SwiGLU MLP's down projection from its gate and up outputs [..., k] (one float dtype and shape):
    qmatmul_q8_1(w, qtype, gated_silu_quantize_q8_1(gate, up), n, k, gate.dtype) -> [..., n] in gate's
    dtype, the same bits; on CUDA one launch for the rows gated_gelu_qmatmul fuses, as it does."""
    _check_sizes(n, k)
    return _call(_ops.gated_silu_qmatmul, w, int(QType.of(qtype)), gate, up, n, k)


@_register_fake("torchext::gated_silu_qmatmul")
def _(w, qtype, gate, up, n, k):
    _check_weight(w, qtype, n, k)
    _check_activations(gate, k, "gate")
    _check_like(up, "up", gate, "gate")
    _check_same_device(w, "w", gate, "gate")
    return gate.new_empty(_with_last(gate, n))


def qmatmul_id(w: torch.Tensor, qtype, x: torch.Tensor, ids: torch.Tensor, n: int, k: int,
               exact: bool = False) -> torch.Tensor:
    """The expert-indexed matmul of a mixture of experts (ggml's mul_mat_id): E experts' quantized
    weights w, uint8 [E, n, row_bytes(qtype, k)] (one GGUF *_exps tensor), activations x [T, k] (every
    slot of token t reads x[t]: gate and up projections) or [T, top_k, k] (slot (t, j) reads x[t, j]:
    the down projection), expert ids [T, top_k] (int64 or int32) -> [T, top_k, n] in x's dtype with

        out[t, j] = x[t] (or x[t, j]) @ dequantize(w[ids[t, j]]).T

    Ids may repeat within a token (each slot is computed on its own). The path follows the number of
    tokens T, never the ids (no host sync: capturable in a CUDA graph, traceable with data-dependent
    ids): up to gemv_max_tokens(x, qtype) tokens (16 on CUDA, the format's CPU_GEMV_MAX_ROWS on the
    CPU) the Q8_1 GEMV, which reads each selected expert's weight once for all the rows routed to it;
    more tokens (or exact=True) leave the activations unrounded, through a grouped tiled GEMM over the
    routed rows on CUDA (fp16/bf16, sm_80+; bf16 weights computed in bf16 as qmatmul's unless
    exact=True) or a dense GEMM per expert.
    An id outside [0, E) raises on the CPU and gives a NaN output row on CUDA."""
    _check_sizes(n, k)
    return _call(_ops.qmatmul_id, w, int(QType.of(qtype)), x, ids, n, k, _flag(exact, "exact"))


#: The most experts one qmatmul_id weight may hold (kernels/expert_slots.h, kMaxExperts).
MAX_EXPERTS = 4096


@_register_fake("torchext::qmatmul_id")
def _(w, qtype, x, ids, n, k, exact=False):
    q, rb = _check_weight_bytes(w, qtype, n, k)
    torch._check(w.dim() == 3 and w.shape[0] > 0 and w.shape[1] == n and w.shape[2] == rb,
                 lambda: f"w: expected {q.name} experts of shape [E, n, row bytes] = [E, {n}, {rb}] with E > 0, "
                         f"got {list(w.shape)}")
    torch._check(w.shape[0] <= MAX_EXPERTS, lambda: f"w: at most {MAX_EXPERTS} experts, got {w.shape[0]}")
    _check_activations(x, k)
    torch._check(x.dim() in (2, 3), lambda: f"x: expected [T, k] or [T, top_k, k], got {x.dim()} dimensions")
    _check_contiguous(ids, "ids")
    torch._check(ids.dtype in (torch.int64, torch.int32),
                 lambda: f"ids: expected int64 or int32 expert ids, got {_dtype_name(ids.dtype)}")
    torch._check(ids.dim() == 2 and ids.shape[0] == x.shape[0] and (x.dim() == 2 or x.shape[1] == ids.shape[1]),
                 lambda: f"ids: expected [T, top_k] for x of shape [T, k] or [T, top_k, k], got ids "
                         f"{list(ids.shape)} and x {list(x.shape)}")
    _check_same_device(w, "w", x, "x")
    _check_same_device(w, "w", ids, "ids")
    slots = _checked_mul(ids.shape[0], ids.shape[1], "ids")
    torch._check(slots <= 2**31 - 1, lambda: f"ids: at most 2^31 - 1 slots (T x top_k), got {slots}")
    return x.new_empty((ids.shape[0], ids.shape[1], n))


#: The most activation rows qmatmul sends through the Q8_1 GEMV (and qmatmul_id's most tokens) on CUDA
#: where the tiled GEMM does not serve them (kernels/batch_policy.h, kMaxGemvRows); more rows leave the
#: activations unrounded. tests/test_matmul.py checks these against the kernels' behaviour.
GEMV_MAX_ROWS = 16

def gemv_max_tokens(x: torch.Tensor, qtype) -> int:
    """The most tokens of activations like x (its device) that qmatmul_id sends through the Q8_1 GEMV
    against experts of format qtype (kernels/batch_policy.h, choose_matmul_id_path): on the CPU
    CPU_GEMV_MAX_ROWS[qtype], elsewhere GEMV_MAX_ROWS."""
    return CPU_GEMV_MAX_ROWS[QType.of(qtype)] if x.device.type == "cpu" else GEMV_MAX_ROWS


def gemv_max_rows(x: torch.Tensor, n: int, qtype) -> int:
    """The most rows of activations like x (its device, dtype and last dimension K) that qmatmul
    sends through the Q8_1 GEMV against an n x K weight of format qtype (kernels/batch_policy.h,
    max_gemv_rows). Where the tiled GEMM runs (CUDA, fp16 or bf16, compute capability 8.0 or newer,
    K a multiple of 8) one less than the first row it takes, which the library's own policy says
    (tiled_gemm_first_row: 8 rows, 4 for a format of 32 or 64 values a block on a weight of 2^23
    values or more, 1 for Q4_K, Q5_K and Q6_K on one of 2^25 or more on compute capability 9.0);
    elsewhere gemv_max_tokens: the format's CPU_GEMV_MAX_ROWS on the CPU, GEMV_MAX_ROWS on CUDA. The
    tiled GEMM also needs 16-byte aligned operands, which this does not look at (so that it holds for
    traced tensors too): an x that is not aligned takes the GEMV up to GEMV_MAX_ROWS rows."""
    if not isinstance(x, torch.Tensor):  # a list was an AttributeError
        raise TypeError(f"x: expected a tensor of activations [..., K], got {type(x).__name__}")
    if x.dim() == 0:  # was an IndexError
        raise ValueError("x: expected at least one dimension [..., K], got a scalar")
    k = x.shape[-1]
    if x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16) and k % 8 == 0:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        first = _tiled_gemm_first_row(int(QType.of(qtype)), int(n), int(k), x.dtype == torch.bfloat16, index)
        if first:
            return first - 1
    return gemv_max_tokens(x, qtype)


@torch.compiler.assume_constant_result  # a fact of the library and the device: torch.compile takes it as a constant
def _tiled_gemm_first_row(qtype: int, n: int, k: int, bf16: bool, device: int) -> int:
    return _C.tiled_gemm_first_row(qtype, n, k, bf16, device) if hasattr(_C, "tiled_gemm_first_row") else 0


# ---- weights ---------------------------------------------------------------------------------

def dequantize(w: torch.Tensor, qtype, n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [n, k] values of quantized weight bytes (values past k, the padding, are dropped)."""
    _check_sizes(n, k)
    return _ops.dequantize(w, int(QType.of(qtype)), n, k, dtype)


@_register_fake("torchext::dequantize")
def _(w, qtype, n, k, dtype=None):
    _check_weight(w, qtype, n, k)
    return w.new_empty((n, k), dtype=_output_dtype(dtype))


def embedding(w: torch.Tensor, qtype, ids: torch.Tensor, n: int, k: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ids [...] (int64 or int32) of a quantized [n, k] weight as dense [..., k]: a token
    embedding that stays quantized. An id outside [0, n) raises on the CPU; on CUDA, where
    checking would synchronise with the host, its row comes out NaN."""
    _check_sizes(n, k)
    return _ops.embedding(w, int(QType.of(qtype)), ids, n, k, dtype)


@_register_fake("torchext::embedding")
def _(w, qtype, ids, n, k, dtype=None):
    _check_weight(w, qtype, n, k)
    dtype = _output_dtype(dtype)
    _check_contiguous(ids, "ids")
    torch._check(ids.dtype in (torch.int64, torch.int32),
                 lambda: f"ids: expected int64 or int32 token ids, got {_dtype_name(ids.dtype)}")
    _check_same_device(w, "w", ids, "ids")
    return w.new_empty((*ids.shape, k), dtype=dtype)


def quantize(w: torch.Tensor, qtype) -> torch.Tensor:
    """Quantized bytes [n, row_bytes] of a dense float [n, k] weight (llama.cpp's reference
    quantizers; the last k-quant super-block is zero-padded). Runs on the CPU; a tensor on
    another device is quantized there and the bytes are moved back; a meta tensor gives a meta
    result (the fake)."""
    qt = int(QType.of(qtype))
    if w.device.type not in ("cpu", "meta"):
        return _ops.quantize(w.detach().float().cpu().contiguous(), qt).to(w.device)
    return _ops.quantize(w, qt)


@_register_fake("torchext::quantize")
def _(w, qtype):
    q = _weight_format(qtype)
    _check_contiguous(w, "w")
    torch._check(w.dim() == 2, lambda: f"w: expected a 2-D weight [n, k], got {w.dim()} dimensions")
    torch._check(w.dtype == torch.float32,
                 lambda: f"w: expected a float32 tensor, got {_dtype_name(w.dtype)} (call .float() first)")
    n, k = w.shape
    _check_shape_nk(n, k)
    _check_whole_blocks(q, k, "w")
    torch._check(q in QUANTIZABLE_TYPES, lambda: (
        f"qtype: torchext has no quantizer for {q.name}: llama.cpp makes it with an importance matrix (llama-quantize "
        "--imatrix); load such weights from a GGUF file, or quantize to IQ3_S, IQ4_XS, IQ4_NL or a k-quant (Q3_K, "
        "Q4_K, Q5_K, Q6_K) instead"))
    return w.new_empty((n, row_bytes(q, k)), dtype=torch.uint8)


# ---- GELU ------------------------------------------------------------------------------------

def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU as torch.nn.functional.gelu (approximate "none" or "tanh"), computed in fp32."""
    return _call(_ops.gelu, x, approximate)


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """In-place GELU: overwrites x and returns it (the op itself returns nothing, as mutating
    custom ops must for torch.compile's functionalization). Under autograd it behaves as torch's
    in-place ops: a leaf that requires grad (or a view of one) is refused, any other tensor that
    requires grad gets F.gelu's gradient, and x's version counter moves, so a backward that saved
    x before it was overwritten fails instead of using the new values. An inference tensor is refused
    outside inference mode, as torch's in-place ops refuse it (_check_not_inference)."""
    _check_not_inference(x, "x")
    _ops.gelu_(x, approximate)
    return x


def _check_not_inference(t, arg: str) -> None:
    """RuntimeError for an inference tensor that an op would update in place outside inference mode, as torch's
    in-place ops refuse it (it has no autograd key: the op alone would write it; not checked while torch.compile
    traces, which cannot trace the check)."""
    if (not torch.compiler.is_compiling() and isinstance(t, torch.Tensor) and t.is_inference()
            and not torch.is_inference_mode_enabled()):
        raise RuntimeError(f"{arg}: an in-place update of an inference tensor outside InferenceMode is not allowed, "
                           "as for torch's in-place ops")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x + bias) with bias [K] over x [..., K]; the sum is kept in fp32 (one rounding)."""
    return _call(_ops.bias_gelu, x, bias, approximate)


@_register_fake("torchext::gelu")
def _(x, approximate="none"):
    _check_gelu_input(x)
    _check_approximate(approximate)
    return torch.empty_like(x)


@_register_fake("torchext::gelu_")
def _(x, approximate="none"):
    _check_gelu_input(x)
    _check_approximate(approximate)


@_register_fake("torchext::bias_gelu")
def _(x, bias, approximate="none"):
    _check_contiguous(x, "x")
    _check_contiguous(bias, "bias")
    _check_float(x, "x")
    torch._check(bias.dtype == x.dtype, lambda: f"bias: expected the dtype of x ({_dtype_name(x.dtype)}), "
                                                f"got {_dtype_name(bias.dtype)}")
    _check_same_device(x, "x", bias, "bias")
    channels = x.shape[-1] if x.dim() >= 1 else 0
    torch._check(bias.dim() == 1 and x.dim() >= 1 and bias.shape[0] == channels,
                 lambda: f"bias: expected a 1-D tensor of x's last dimension ({channels}), got {bias.dim()} "
                         f"dimensions of {bias.shape[0] if bias.dim() == 1 else bias.numel()} elements")
    _check_approximate(approximate)
    return torch.empty_like(x)


# ---- attention over a static key/value cache ------------------------------------------------------

def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, window: int = 0) -> torch.Tensor:
    """Attention of queries q [B, H, T, D] at positions pos [T] (int64) over a static key/value cache
    k_cache, v_cache [B, KV, S, D] of q's dtype, query head h reading cache head h // (H // KV): key j
    is visible from position p when j <= p and, with window > 0, p - j < window (a sliding window).
    Returns softmax(scale * q . k_j) . v_j over the visible j, [B, H, T, D] in q's dtype, computed in
    fp32. D is a multiple of 8 up to 256. Only the visible keys are read, so a decode step costs what
    the cache holds, not its capacity. A position outside [0, S) raises on the CPU and gives a NaN row
    on CUDA (checking it there would synchronise)."""
    _check_real(scale, "scale")
    _check_whole(window, "window")
    return _call(_ops.cached_attention, q, k_cache, v_cache, pos, scale, window)


def _check_attention(q, k_cache, v_cache, pos, scale, window) -> None:
    """The checks of cached_attention and cached_attention_quantize_q8_1 (ops.h, check_attention)."""
    for t, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (pos, "pos")):
        _check_contiguous(t, name)
    _check_float(q, "q")
    torch._check(q.dim() == 4, lambda: f"q: expected [batch, heads, rows, dim], got {q.dim()} dimensions")
    torch._check(k_cache.dim() == 4,
                 lambda: f"k_cache: expected [batch, kv_heads, keys, dim], got {k_cache.dim()} dimensions")
    _check_like(v_cache, "v_cache", k_cache, "k_cache")
    for c, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        torch._check(c.dtype == q.dtype,
                     lambda: f"{name}: expected the dtype of q ({_dtype_name(q.dtype)}), got {_dtype_name(c.dtype)}")
        _check_same_device(q, "q", c, name)
    _check_same_device(q, "q", pos, "pos")
    batch, heads, rows, dim = q.shape
    kv_heads, keys = k_cache.shape[1], k_cache.shape[2]
    torch._check(k_cache.shape[0] == batch and k_cache.shape[3] == dim,
                 lambda: f"k_cache: expected [{batch}, kv_heads, keys, {dim}] (q's batch and dim), got "
                         f"{list(k_cache.shape)}")
    torch._check(kv_heads > 0 and heads % kv_heads == 0,
                 lambda: f"k_cache: expected kv_heads dividing q's {heads} heads, got {kv_heads}")
    torch._check(keys > 0, lambda: "k_cache: expected at least one key position")
    torch._check(dim % 8 == 0 and 0 < dim <= 256,
                 lambda: f"q: expected a head dim that is a multiple of 8 up to 256, got {dim}")
    torch._check(pos.dtype == torch.int64 and pos.dim() == 1 and pos.shape[0] == rows,
                 lambda: f"pos: expected an int64 tensor of q's {rows} rows' positions, got {_dtype_name(pos.dtype)} "
                         f"{list(pos.shape)}")
    torch._check(window >= 0,
                 lambda: f"window: expected 0 (every earlier key) or a positive number of positions, got {window}")
    torch._check(math.isfinite(scale) and abs(scale) <= _FLOAT32_MAX,  # the kernels compute in float
                 lambda: f"scale: expected a finite number within float32's range, got {scale}")


@_register_fake("torchext::cached_attention")
def _(q, k_cache, v_cache, pos, scale, window=0):
    _check_attention(q, k_cache, v_cache, pos, scale, window)
    return torch.empty_like(q)


def cached_attention_quantize_q8_1(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   pos: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """quantize_q8_1(cached_attention(q, k_cache, v_cache, pos, scale, window).transpose(1, 2).reshape(B, T,
    H * D)), the same bytes: the attention's output as the Q8_1 input of the projection after it
    (QuantLinear.forward_q8_1), uint8 [B, T, q8_1 bytes of H * D values]. On CUDA the attention kernels
    write the blocks themselves (no quantize_q8_1 launch); on the CPU it is the two ops. D is a multiple
    of 32 (each 32-value block inside one head). A position outside [0, S) raises on the CPU and, on
    CUDA, gives the blocks that quantize_q8_1 makes of a NaN row."""
    _check_real(scale, "scale")
    _check_whole(window, "window")
    return _ops.cached_attention_quantize_q8_1(q, k_cache, v_cache, pos, scale, window)


@_register_fake("torchext::cached_attention_quantize_q8_1")
def _(q, k_cache, v_cache, pos, scale, window=0):
    _check_attention(q, k_cache, v_cache, pos, scale, window)
    batch, heads, rows, dim = q.shape
    torch._check(dim % 32 == 0,
                 lambda: f"q: expected a head dim that is a multiple of 32 for cached_attention_quantize_q8_1 (each "
                         f"Q8_1 block of 32 values inside one head), got {dim}")
    return q.new_empty((batch, rows, q8_1_row_bytes(heads * dim)), dtype=torch.uint8)


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """A decoder layer's step from its q/k/v projections to cached_attention, in one kernel on CUDA.

    q [B, T, H, D], k and v [B, T, KV, D] (views of a stacked projection are fine: rows at any stride,
    each row's heads and each head's values contiguous). Each q and k head is RMS-normalised over D
    when q_weight / k_weight [D] is given (x / sqrt(mean(x^2) + eps) * weight in fp32, rounded to q's
    dtype; the weight as the model holds it, e.g. Gemma's 1 + w; a head with values beyond ~1.8e19,
    whose squares overflow fp32, normalises to zeros, as that formula gives it), then rotated in
    rotate_half's order,
    x * cos + rotate_half(x) * sin in fp32, by the rows pos[t] of the rotary tables cos, sin [P, D]
    (float32, P >= S: a row for each cache position). k and v are written into k_cache, v_cache
    [B, KV, S, D] at position pos[t] (int64 [T]); returns q as [B, H, T, D] in q's dtype, the layout
    cached_attention takes. A position outside [0, S) raises on the CPU; on CUDA (checking it would
    synchronise) that row's k and v are not written and its q is NaN. The caches must not overlap, and
    inference tensors are refused outside inference mode, as gelu_ refuses them (not checked while
    torch.compile traces)."""
    _check_not_inference(k_cache, "k_cache")
    _check_not_inference(v_cache, "v_cache")
    return _ops.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, q_weight, k_weight, _number(eps, "eps"))


def _check_head_rows(x: torch.Tensor, arg: str, q: torch.Tensor, heads: int, dim: int) -> None:
    torch._check(x.dtype == q.dtype,
                 lambda: f"{arg}: expected the dtype of q ({_dtype_name(q.dtype)}), got {_dtype_name(x.dtype)}")
    _check_same_device(q, "q", x, arg)
    st = x.stride()
    torch._check((heads == 1 or st[2] == dim) and (dim == 1 or st[3] == 1) and st[0] >= 0 and st[1] >= 0,
                 lambda: f"{arg}: expected each row's heads and each head's values contiguous (strides [.., .., "
                         f"{dim}, 1]), got strides [{st[0]}, {st[1]}, {st[2]}, {st[3]}]")


def _check_head_norm(w, arg: str, q: torch.Tensor, dim: int) -> None:
    if w is None:
        return
    _check_contiguous(w, arg)
    torch._check(w.dtype in (torch.float32, q.dtype),
                 lambda: f"{arg}: expected float32 or the dtype of q ({_dtype_name(q.dtype)}), got "
                         f"{_dtype_name(w.dtype)}")
    torch._check(w.dim() == 1 and w.shape[0] == dim,
                 lambda: f"{arg}: expected shape [{dim}] (the head dim), got {list(w.shape)}")
    _check_same_device(q, "q", w, arg)


@_register_fake("torchext::rope_cache_write")
def _(q, k, v, cos, sin, pos, k_cache, v_cache, q_weight=None, k_weight=None, eps=1e-6):
    torch._check(q.dim() == 4, lambda: "q: expected [batch, rows, heads, dim]")
    _check_float(q, "q")
    batch, rows, heads, dim = q.shape
    kv_heads = k.shape[2] if k.dim() == 4 else 0
    keys = k_cache.shape[2] if k_cache.dim() == 4 else 0
    torch._check(heads > 0 and dim > 0 and dim % 2 == 0,
                 lambda: f"q: expected heads and an even head dim, got {list(q.shape)}")
    _check_head_rows(q, "q", q, heads, dim)
    torch._check(k.dim() == 4 and k.shape[0] == batch and k.shape[1] == rows and k.shape[2] > 0 and k.shape[3] == dim,
                 lambda: f"k: expected [{batch}, {rows}, kv_heads, {dim}] (q's batch, rows and dim), got "
                         f"{list(k.shape)}")
    _check_head_rows(k, "k", q, kv_heads, dim)
    torch._check(v.shape == k.shape, lambda: f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    _check_head_rows(v, "v", q, kv_heads, dim)
    for c, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_contiguous(c, name)
        torch._check(c.dtype == q.dtype,
                     lambda: f"{name}: expected the dtype of q ({_dtype_name(q.dtype)}), got {_dtype_name(c.dtype)}")
        torch._check(c.dim() == 4 and c.shape[0] == batch and c.shape[1] == kv_heads and c.shape[2] > 0
                     and c.shape[3] == dim,
                     lambda: f"{name}: expected [{batch}, {kv_heads}, keys, {dim}] (k's batch, heads and dim), got "
                             f"{list(c.shape)}")
        _check_same_device(q, "q", c, name)
    torch._check(v_cache.shape[2] == keys,
                 lambda: f"v_cache: expected the shape of k_cache {list(k_cache.shape)}, got {list(v_cache.shape)}")
    for c, name in ((cos, "cos"), (sin, "sin")):
        _check_contiguous(c, name)
        torch._check(c.dtype == torch.float32 and c.dim() == 2 and c.shape[0] >= keys and c.shape[1] == dim,
                     lambda: f"{name}: expected a float32 table [positions >= {keys}, {dim}] (a row for each cache "
                             f"position, q's dim), got {_dtype_name(c.dtype)} {list(c.shape)}")
        _check_same_device(q, "q", c, name)
    _check_contiguous(pos, "pos")
    torch._check(pos.dtype == torch.int64 and pos.dim() == 1 and pos.shape[0] == rows,
                 lambda: f"pos: expected an int64 tensor of q's {rows} rows' positions, got {_dtype_name(pos.dtype)} "
                         f"{list(pos.shape)}")
    _check_same_device(q, "q", pos, "pos")
    _check_head_norm(q_weight, "q_weight", q, dim)
    _check_head_norm(k_weight, "k_weight", q, dim)
    _check_eps(eps)
    return q.new_empty((batch, heads, rows, dim))


# ---- autograd ------------------------------------------------------------------------------------
# Gradients flow to the activations (and the bias), so layers upstream of a quantized one train;
# the quantized weights are uint8 bytes and take none. Backward runs dense torch ops.

def _backward_dtype(grad: torch.Tensor) -> torch.dtype:
    """What the backward's dense matmuls compute in: the gradient's dtype, but float32 for float16, whose
    range the weights can exceed (Q8_0 holds values to about 8e6; above 65504 they were inf, and so the
    gradient, though the forward and the true gradient are finite)."""
    return torch.float32 if grad.dtype == torch.float16 else grad.dtype


def _grad_through_weight(ctx, grad: torch.Tensor) -> torch.Tensor:
    """grad @ W, W the weight ctx.w (ctx.qtype, ctx.n x ctx.k) dequantized: the gradient of x @ W.T."""
    dtype = _backward_dtype(grad)
    return (grad.to(dtype) @ dequantize(ctx.w, ctx.qtype, ctx.n, ctx.k, dtype)).to(grad.dtype)


def _setup_matmul_qtype(ctx, inputs, output):
    w, qtype, x, n, k, exact = inputs
    ctx.w, ctx.qtype, ctx.n, ctx.k = w, qtype, n, k


def _backward_matmul_qtype(ctx, grad):
    return None, None, _grad_through_weight(ctx, grad), None, None, None


torch.library.register_autograd("torchext::qmatmul", _backward_matmul_qtype, setup_context=_setup_matmul_qtype)
for _name, _qtype in (("q4k_gemv", QType.Q4_K), ("q5k_gemv", QType.Q5_K), ("q6k_gemv", QType.Q6_K)):
    def _setup(ctx, inputs, output, _qtype=_qtype):
        w, x, n, k = inputs
        ctx.w, ctx.qtype, ctx.n, ctx.k = w, int(_qtype), n, k

    def _backward(ctx, grad):
        return None, _grad_through_weight(ctx, grad), None, None

    torch.library.register_autograd(f"torchext::{_name}", _backward, setup_context=_setup)


def _setup_matmul_id(ctx, inputs, output):
    w, qtype, x, ids, n, k, exact = inputs
    ctx.w, ctx.qtype, ctx.n, ctx.k, ctx.x_per_slot = w, qtype, n, k, x.dim() == 3
    ctx.save_for_backward(ids)


def _backward_matmul_id(ctx, grad):
    # slot (t, j)'s gradient goes through expert ids[t, j]'s dequantized weight, taken expert by expert
    # (which experts are used is known on the device only)
    (ids,) = ctx.saved_tensors
    dtype = _backward_dtype(grad)
    g = grad.to(dtype)
    grad_x = g.new_zeros((*grad.shape[:2], ctx.k))
    for e in range(ctx.w.shape[0]):
        w_e = dequantize(ctx.w[e], ctx.qtype, ctx.n, ctx.k, dtype)
        grad_x += torch.where((ids == e).unsqueeze(-1), g @ w_e, 0)
    return None, None, (grad_x if ctx.x_per_slot else grad_x.sum(1)).to(grad.dtype), None, None, None, None


torch.library.register_autograd("torchext::qmatmul_id", _backward_matmul_id, setup_context=_setup_matmul_id)


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


def _gelu_inplace_autograd(keyset, x, approximate="none"):
    # what the kernel refuses, refused on the copy path too
    torch._check(x.is_contiguous(), lambda: "x: expected a contiguous tensor (call .contiguous() first)")
    if torch.is_grad_enabled() and x.requires_grad:
        # GELU's backward needs the input that the kernel overwrites: take the gradient through
        # the functional op on a copy, then copy_ records the overwrite (and refuses a leaf, as
        # every in-place op does)
        x.copy_(gelu(x.clone(), approximate))
        return
    _ops.gelu_.default.redispatch(keyset & torch._C._after_autograd_keyset, x, approximate)
    increment_version(x)  # the dispatcher does not know that the kernel wrote x


def _setup_gated_gelu_qmatmul(ctx, inputs, output):
    w, qtype, gate, up, n, k, approximate = inputs
    ctx.w, ctx.qtype, ctx.n, ctx.k, ctx.approximate = w, qtype, n, k, approximate
    ctx.save_for_backward(gate, up)


def _backward_gated_gelu_qmatmul(ctx, grad):
    # the gradients of torchext.gelu(gate) * up, then qmatmul's: the composition the op's bytes equal
    gate, up = ctx.saved_tensors
    grad_h = _grad_through_weight(ctx, grad)
    grad_gate = torch.ops.aten.gelu_backward(grad_h * up, gate, approximate=ctx.approximate)
    return None, None, grad_gate, grad_h * gelu(gate, ctx.approximate), None, None, None


torch.library.register_autograd("torchext::gated_gelu_qmatmul", _backward_gated_gelu_qmatmul,
                                setup_context=_setup_gated_gelu_qmatmul)


def _setup_gated_silu_qmatmul(ctx, inputs, output):
    w, qtype, gate, up, n, k = inputs
    ctx.w, ctx.qtype, ctx.n, ctx.k = w, qtype, n, k
    ctx.save_for_backward(gate, up)


def _backward_gated_silu_qmatmul(ctx, grad):
    # the gradients of silu(gate) * up, then qmatmul's. SiLU's as torch's autograd takes it: aten's kernel,
    # or, when this backward is itself differentiated (create_graph), its formula in differentiable ops
    gate, up = ctx.saved_tensors
    grad_h = _grad_through_weight(ctx, grad)
    if torch.is_grad_enabled():
        s = torch.sigmoid(gate)
        grad_gate = grad_h * up * s * (1.0 + gate * (1.0 - s))
    else:
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
    return None, None, grad_gate, grad_h * torch.nn.functional.silu(gate), None, None


torch.library.register_autograd("torchext::gated_silu_qmatmul", _backward_gated_silu_qmatmul,
                                setup_context=_setup_gated_silu_qmatmul)


def _setup_add_rms_norm(ctx, inputs, output):
    x, residual, weight, eps, x_weight = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, x_weight)


def _backward_add_rms_norm(ctx, grad_s, grad_q):
    # s = residual + t, t = x or rms_norm(x, x_weight): the norm's gradient from its fp32 formula. The Q8_1
    # output is bytes and passes none back (weight, the norm of that output alone, takes none).
    x, x_weight = ctx.saved_tensors
    if x_weight is None:
        return grad_s, grad_s, None, None, None
    with torch.enable_grad():
        xd, wd = x.detach().requires_grad_(), x_weight.detach().requires_grad_()
        xf = xd.float()
        t = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps) * wd.float()).to(x.dtype)
        grad_x, grad_xw = torch.autograd.grad(t, (xd, wd), grad_s)
    return grad_x, grad_s, None, None, grad_xw


torch.library.register_autograd("torchext::add_rms_norm_quantize_q8_1", _backward_add_rms_norm,
                                setup_context=_setup_add_rms_norm)

# Decode-time attention over a static cache, and the cache writes before it, have no gradient formula:
# a backward that reaches their outputs raises (torch's fallback for an op without one would warn and
# pass no gradient on). It raises when it runs, not when torch.compile traces it (AOTAutograd traces the
# backward of any graph whose inputs require grad): through no_gradient, whose fake is a tensor like the
# input's gradient and whose kernel raises. It reads the output's gradient, so that it stays in the
# backward graph (AOTAutograd's partitioner moves what needs only forward values into the forward).
@torch.library.custom_op("torchext::no_gradient", mutates_args=())
def _no_gradient(grad: torch.Tensor, like: torch.Tensor, message: str) -> torch.Tensor:
    raise RuntimeError(message)


@_no_gradient.register_fake
def _(grad, like, message):
    return torch.empty_like(like)


_NO_GRADIENT = {
    "cached_attention": "cached_attention has no gradient: it is decode-time attention over a static key/value "
                        "cache; for training use torch.nn.functional.scaled_dot_product_attention",
    "rope_cache_write": "rope_cache_write has no gradient: it writes a decode step into a static key/value cache; "
                        "for training apply the norms and the rotary embedding with torch ops",
}


def _setup_cached_attention(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_cached_attention(ctx, grad):
    (q,) = ctx.saved_tensors
    return _no_gradient(grad, q, _NO_GRADIENT["cached_attention"]), None, None, None, None, None


torch.library.register_autograd("torchext::cached_attention", _backward_cached_attention,
                                setup_context=_setup_cached_attention)


class _NoGradient(torch.autograd.Function):
    """compute()'s output, whose backward raises `message` (no_gradient): for an op with no gradient
    formula whose inputs (passed on, to join the graph) require grad."""

    @staticmethod
    def forward(ctx, message, compute, *inputs):
        ctx.message = message
        ctx.save_for_backward(*inputs)
        return compute()

    @staticmethod
    def backward(ctx, *grads):
        return None, None, *(_no_gradient(grads[0], t, ctx.message) for t in ctx.saved_tensors)


def _rope_cache_write_autograd(keyset, q, k, v, cos, sin, pos, k_cache, v_cache, q_weight=None, k_weight=None,
                               eps=1e-6):
    def compute():
        return _ops.rope_cache_write.default.redispatch(keyset & torch._C._after_autograd_keyset, q, k, v, cos, sin,
                                                        pos, k_cache, v_cache, q_weight, k_weight, eps)

    inputs = [t for t in (q, k, v, cos, sin, q_weight, k_weight) if t is not None and t.requires_grad]
    out = _NoGradient.apply(_NO_GRADIENT["rope_cache_write"], compute, *inputs) if (
        inputs and torch.is_grad_enabled()) else compute()
    increment_version(k_cache)  # the dispatcher does not know that the kernel wrote the caches
    increment_version(v_cache)
    return out


# register_autograd does not take mutating ops, so their Autograd kernels are registered directly (and the
# Autocast kernels below)
_impl_lib = torch.library.Library("torchext", "IMPL")
_impl_lib.impl("gelu_", _gelu_inplace_autograd, "Autograd", with_keyset=True)
_impl_lib.impl("rope_cache_write", _rope_cache_write_autograd, "Autograd", with_keyset=True)


# ---- autocast ------------------------------------------------------------------------------------
# Every op computes in its inputs' dtypes, as documented, inside torch.autocast too: autocast does not
# reach into it. Without this, the dense path's inner matmul (a dispatcher call) ran in autocast's
# bfloat16 on the calling thread and in float32 on parallel_for's other threads, whose autocast state
# is their own: one float32 output of mixed precision, exact=True included. Autocast dispatches before
# autograd, so the op called again with autocast off runs its autograd and kernels as usual.

def _without_autocast(op, device_type: str):
    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return kernel


for _name in sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("torchext::")):
    for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _impl_lib.impl(_name, _without_autocast(getattr(_ops, _name).default, _device), _key)
