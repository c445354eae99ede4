"""Fuzz tests (hypothesis) of every op and of the GGUF loader: shapes, dtypes, magnitudes, strides,
storage offsets, devices and corrupted files.

The contract, per call. Every test is parametrized by a fault (a misaligned weight, an id out of
range, ...): half its cases have that fault, at times with a second one, the other half none. Each
case is classified before the call from the properties of its arguments and the ops' documented
rules (tests/test_errors.py states them one by one):
- invalid input (an unknown format, n or k not positive or too large for int64, k not whole
  blocks, weight bytes of the wrong dtype, count, layout or alignment, activations of the wrong
  dtype, layout or length, tensors on different devices, ...) must raise a RuntimeError or
  ValueError whose message starts with the name of an argument it is wrong about ("w: ...",
  "w and x: ...", as csrc/checks.h, the fakes and the Python wrappers write them);
- valid input must return a result matching the oracle below.
Anything else fails: another exception type, an error on valid input or one naming no faulty
argument, a result for invalid input, a result off the oracle. A crash or a hang kills the run.
Tensors all on the meta device give a meta result of the right shape and dtype (the fakes check
what the kernels check, except alignment and id ranges, which need data).

Oracles and tolerances, and where they come from:
- qmatmul, q4k/q5k/q6k_gemv, QuantLinear, qmatmul_q8_1, q4k_q8_gemv(_packed), WeightCache.matmul:
  ref = x @ W.T in float64, W = gguf.quants.dequantize of the bytes, absref = |x| @ |W|.T
  (test_matmul.oracle). Per output |y - ref| <= tol, tol as in tests/test_matmul.py: on the Q8_1
  GEMV path (for qmatmul up to 16 rows on CUDA and the format's conftest.gemv_rows on the CPU, any
  number for the ops that take Q8_1 bytes) the largest error Q8_1 rounding of x can cause,
  sum_b (d_b / 2) * sum_{i in b} |W_i| (d_b from conftest.q8_1_reference), plus 1e-5 * absref for
  fp32 accumulation; on the dense path (beyond) 1e-5 * absref; plus one rounding to an f16/bf16
  output (half_ulp * |ref| + tiny) and, on CUDA's f16/bf16 paths beyond 16 rows, the weights
  computed in that dtype
  (conftest.half_weight_rounding, through test_matmul.output_rounding); plus one fp32
  subnormal step per term (2k * 2^-149, for products below fp32's normal range, as test_matmul's
  magnitude test). Activations are Gaussian times 10^e, e drawn per call from float32's [-30, 30],
  bfloat16's [-37, 34] or float16's [-7, 4] (where Gaussian values stay finite and mostly normal):
  outputs must be finite and within tol wherever |ref| and absref are below a quarter of the
  output dtype's largest value (above, they may overflow). A row holding a NaN or inf gives
  non-finite outputs only (every output reads every block of its row); the other rows are checked
  as above.
- qmatmul_id: tests/test_matmul_id.py's oracle, each slot its activation row @ its expert's gguf
  dequantization (the Q8_1 bound up to conftest.gemv_rows tokens unless exact, unrounded beyond); an
  id outside [0, E) raises on the CPU and gives that slot a NaN row on CUDA.
- quantize_q8_1: bytes equal to conftest.q8_1_reference(x.float()), torchext's Q8_1 rule in numpy.
- dequantize, embedding: equal, bit for bit (NaN matching NaN), to gguf's float32 values rounded
  once to the output dtype (the op dequantizes with the same fp32 arithmetic,
  tests/test_embedding.py), also for random bytes whose fp16 scales are inf or NaN. An id outside
  [0, n) raises on the CPU and gives a NaN row on CUDA.
- gelu, gelu_, bias_gelu: test_gelu.assert_gelu_close against torch.nn.functional.gelu in float64
  rounded once to x's dtype: 4 (CPU) or 8 (CUDA) fp32 ulps of |ref| + |z| (erf/tanh evaluated in
  fp32; the cancellation in 1 + erf(z) for negative z scales with |z|), one fp32 subnormal step,
  and one ulp of an f16/bf16 output; gelu(+inf) = +inf, gelu(-inf) = gelu(NaN) = NaN. z is x, or
  for bias_gelu x + bias rounded once to fp32 (the op keeps the sum in fp32). A refused call
  leaves x as it was.
- gated_gelu_quantize_q8_1, gated_gelu_qmatmul: the bytes of quantize_q8_1(torchext.gelu(gate, a) * up)
  and qmatmul_q8_1's bits on them in gate's dtype, on the same device (the ops' documented
  equalities; the parts are checked against their oracles above). gated_silu_quantize_q8_1,
  gated_silu_qmatmul: the same with silu(gate), F.silu on CUDA and on the CPU test_fused.silu_oracle
  (SiLU in float64 rounded to float32: the CPU kernel's correctly rounded value, which F.silu's is not).
- rms_norm_quantize_q8_1, add_rms_norm_quantize_q8_1: exactly tests/test_fused.py's reference (the
  norm's arithmetic in torch ops on the CPU, every step a float32 rounding, the sum of squares in the
  op's order), bytes and the residual sum, on either device, for any values (NaN and inf included).
- cached_attention: tests/test_attention.py's float64 oracle within its bound (activations Gaussian
  times 10^-2 .. 10^2); a position outside the cache raises on the CPU and gives a NaN row on CUDA.
  cached_attention_quantize_q8_1: the bytes of quantize_q8_1 of cached_attention's output.
- rope_cache_write: tests/test_rope_cache.py's float64 oracle and bounds for q and the written k
  rows, v copied bit for bit, the other cache rows unchanged (distinct positions within a call); a
  refused call writes nothing.
- quantize: gguf's dequantization of the bytes is finite for finite input (magnitudes 10^-30 to
  10^4, where the formats' fp16 scales hold) and NaN over every block holding a NaN or inf; the
  32-value formats' bytes equal gguf.quants.quantize's for finite input (tests/test_quantize.py).
- WeightCache.from_gguf of a valid file damaged (bytes set, u64 fields overwritten, bytes inserted
  or deleted, cut short, also after the caller's gguf.GGUFReader mapped it): a ValueError naming
  the file, or the cache holds what gguf.GGUFReader reads from the same bytes (names, formats,
  shapes, bytes), every quantized entry dequantizes as gguf does, bit for bit, and multiplies as
  the matmul oracle says.

Every test is derandomized (the same examples on every run; each parametrization draws its own) and
sized for a 2-core CPU; on a machine with CUDA each runs again with CUDA as the main device, mixed
with cpu and meta tensors.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import torchext
from conftest import (
    DEVICES,
    DTYPES,
    K_QUANTS,
    NO_NAN_QTYPES,
    QUANTIZABLE_QTYPES,
    SMALL_BLOCK_QTYPES,
    WEIGHT_QTYPES,
    Q,
    block_geometry,
    gemv_rows,
    half_ulp,
    offset_oracle,
    q8_1_reference,
    q8_1_row_bytes,
    random_weight,
    row_bytes,
)
from test_errors import ALIGN
from test_attention import bound as attention_bound
from test_attention import composition as attention_composition
from test_attention import oracle as attention_oracle
from test_fused import gated_activation, rms_norm_reference
from test_gelu import _units as gelu_units
from test_rope_cache import oracle_heads as rope_oracle
from test_gelu import assert_gelu_close
from test_matmul_id import assert_rows_close
from test_matmul import PAST_GEMV, offsets_term, oracle, output_rounding, q8_1_bound, report, rows_of_case, takes_gemv
from test_quantize import EXACT_PORTS, NVFP4_LARGEST


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- running one call against the contract ----------------------------------------------------

def check_call(call, problems: list[str], check) -> None:
    """call() must raise a RuntimeError/ValueError whose message starts, in one of its parts
    (checks.h prefixes "function, file:line, "), with one of the `problems` (regexes of argument
    names, colon included) when there are any; else it must return, and check(result) runs."""
    try:
        result = call()
    except (RuntimeError, ValueError) as e:
        assert problems, f"valid input refused: {type(e).__name__}: {e}"
        pattern = r"(?:^|, |\n)(?:" + "|".join(problems) + ")"
        assert re.search(pattern, str(e)), f"the error names none of {problems}: {type(e).__name__}: {e}"
        event(f"raised ({problems[0].split(':')[0]})")
        return
    assert not problems, f"invalid input accepted ({problems}): returned {describe(result)}"
    event("computed")
    check(result)


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return (f"{str(t.dtype)[6:]}{list(t.shape)} strides {list(t.stride())} offset {t.storage_offset()} "
                f"on {t.device}")
    return type(t).__name__


def check_meta(y, shape, dtype) -> None:
    assert y.is_meta and tuple(y.shape) == tuple(shape) and y.dtype == dtype, describe(y)


# ---- shared strategies -------------------------------------------------------------------------

QTYPE = r"qtype:|unsupported quantization format|unknown quantization format"
FORMATS = [int(q) for q in WEIGHT_QTYPES]
K_QUANT_IDS = {int(q) for q in K_QUANTS}
# no weight format: F32, F16, Q8_1 (the activation format), Q8_K, BF16, Q1_0 (not run), unknown ids, a
# float (once truncated to an id), a bool, None, unknown names
BAD_QTYPES = [0, 1, 9, 15, 30, 41, 99, -1, 12.7, True, None, "Q3_X", "Q8_1"]
BAD_FLOAT_DTYPES = [torch.float64, torch.int32, torch.uint8]
INT64_MAX = 2**63 - 1
# 10^e activation scales: as wide as Gaussian values stay finite in the dtype
EXPONENTS = {torch.float32: (-30, 30), torch.bfloat16: (-37, 34), torch.float16: (-7, 4)}


def draw_faults(draw, fault: str, possible) -> set[str]:
    """A case's faults: half the time none (a valid case, whose result is checked), else `fault`,
    the test's parameter (so that every fault gets its share of cases), at times with another of
    the `possible` ones. A case with a single fault shows the one check that misses it."""
    if draw(st.booleans()):
        return set()
    return {fault, draw(st.sampled_from(possible))} if draw(st.sampled_from([False] * 5 + [True])) else {fault}


def draw_qtype(draw, bad: bool, bytes_fmt: int, formats=FORMATS) -> tuple[object, int]:
    """(the format argument, the weight format of the bytes). The wrappers take a weight format as
    an id, a QType or gguf enum, a numpy integer or a name in any case; `bad` draws one that names
    no weight format (the bytes are then bytes_fmt's)."""
    if bad:
        return draw(st.sampled_from(BAD_QTYPES)), bytes_fmt
    fmt = draw(st.sampled_from(formats))
    spelling = draw(st.sampled_from(["id", "QType", "gguf", "numpy", "name"]))
    return {"id": fmt, "QType": torchext.QType(fmt), "gguf": Q(fmt), "numpy": np.int64(fmt),
            "name": Q(fmt).name.lower()}[spelling], fmt


def draw_k(draw, fmt: int) -> int:
    """A row length valid for the format: any for the 256-value formats (the last super-block is
    padding), whole 32- or 64-value blocks for the others."""
    return draw(st.integers(1, 700)) if fmt in K_QUANT_IDS else block_geometry(fmt)[0] * draw(st.integers(1, 20))


def partial_block(draw, fmt: int) -> int:
    """1 .. block values - 1: added to a valid k, a row that ends inside a block."""
    return draw(st.integers(1, block_geometry(fmt)[0] - 1))


SHAPE_FAULTS = ("n-not-positive", "k-not-positive", "n-huge", "k-huge", "k-partial-block")


def shape_fault(draw, faults: set[str], fmt: int, n: int, k: int) -> tuple[int, int, list[str]]:
    """(n, k) as the op is told them, and the arguments it may name: n or k not positive, near
    int64's limit (n * row bytes overflows, or the byte count cannot match), or k not whole 32- or
    64-value blocks (the 256-value formats take any k)."""
    problems = []
    if "n-not-positive" in faults:
        n = draw(st.integers(-3, 0))
        problems.append("n:")
    if "n-huge" in faults:
        n = draw(st.integers(2**60, INT64_MAX))
        problems += ["n:", "w:"]
    if "k-not-positive" in faults:
        k = draw(st.integers(-300, 0))
        problems.append("k:")
    if "k-huge" in faults:
        k = draw(st.integers(2**60, INT64_MAX))
        problems += ["k:", "n:", "w:"]
    if "k-partial-block" in faults and fmt not in K_QUANT_IDS:
        k += partial_block(draw, fmt)
        problems += ["k:", "w:"]
    return n, k, problems


def draw_lead(draw) -> tuple[int, ...]:
    """Leading dims holding 1 to 64 rows, at times none (a 1-D tensor) or 0."""
    form = draw(st.sampled_from(["1 dim"] * 6 + ["2 dims", "2 dims", "3 dims", "1-D", "empty"]))
    if form == "1-D":
        return ()
    if form == "empty":
        return draw(st.sampled_from([(0,), (2, 0), (0, 3)]))
    # as often 1..16 rows (the Q8_1 GEMV on CUDA) as 17..24 (qmatmul's dense path there) and as 25..64
    # (past every format's GEMV on the CPU, 4 to 48 rows)
    rows = draw(st.sampled_from(range(1, 17)) | st.sampled_from(range(17, 25)) | st.sampled_from(range(25, 65)))
    a = draw(st.sampled_from([d for d in range(1, rows + 1) if rows % d == 0]))
    return {"2 dims": (a, rows // a), "3 dims": (1, a, rows // a)}.get(form, (rows,))


def draw_devices(draw, main: str, count: int, mixed: bool) -> list[str]:
    """A device per tensor argument: all the main one (at times all meta), or, mixed, the first
    two different ones among cpu, meta and the main one."""
    if not mixed:
        return [draw(st.sampled_from([main] * 5 + ["meta"]))] * count
    devices = draw(st.permutations(sorted({"cpu", "meta", main})))[:2]
    return devices + [main] * (count - 2)


def gaussian(shape, seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def draw_activations(draw, shape, dtype) -> torch.Tensor:
    """Gaussian values times 10^e in `dtype` (e per call: half the time 0, else anywhere in the
    range of EXPONENTS, float32's for other dtypes), at times with a few NaN/inf. CPU, contiguous."""
    e = draw(st.one_of(st.just(0), st.integers(*EXPONENTS.get(dtype, EXPONENTS[torch.float32]))))
    x = gaussian(shape, draw(st.integers(0, 2**16))) * 10.0**e
    if x.numel() and draw(st.sampled_from([False] * 5 + [True])):
        for _ in range(draw(st.integers(1, 3))):
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x.to(dtype)


def at_offset(draw, x: torch.Tensor) -> torch.Tensor:
    """x's values, contiguous, at times at a storage offset of 1 to 3 elements (on x's device)."""
    j = draw(st.sampled_from([0, 0, 1, 2, 3]))
    if j == 0:
        return x
    buf = torch.zeros(x.numel() + j, dtype=x.dtype, device=x.device)
    buf[j:] = x.reshape(-1)
    return buf[j:].view(x.shape)


def strided(draw, x: torch.Tensor) -> torch.Tensor:
    """x's values in a non-contiguous layout where its shape has one: a slice of every other
    element, transposed, or one row broadcast over the rows (stride 0)."""
    layout = draw(st.sampled_from(["slice", "transposed", "broadcast"]))
    if layout == "transposed" and x.dim() >= 2:
        return x.mT.contiguous().mT
    if layout == "broadcast" and x.dim() >= 2 and x.shape[0] > 1:
        return x[:1].expand(x.shape)
    if x.dim() >= 1:
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def at_byte_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of uint8 t whose data starts `offset` bytes past a 16-byte boundary
    (for meta, whose address is 0, at that storage offset)."""
    buf = torch.zeros(t.numel() + 32, dtype=torch.uint8, device=t.device)
    start = (-buf.data_ptr()) % 16 + offset
    view = buf[start:start + t.numel()].view(t.shape)
    view.copy_(t)
    return view


WEIGHT_FAULTS = ("w-misaligned", "w-transposed", "w-short", "w-long", "w-dtype")


def weight_bytes(draw, faults: set[str], w: torch.Tensor, fmt: int) -> torch.Tensor:
    """The weight bytes w (on its device) as the op gets them: flat or [n, row bytes], at a byte
    offset 0..15 that keeps the format's alignment; with the faults, at one that does not,
    transposed, a few bytes short or long, or of another dtype."""
    if "w-transposed" not in faults and draw(st.booleans()):
        w = w.reshape(-1)
    if "w-misaligned" in faults:  # 1-byte-aligned blocks (MXFP4): no offset is misaligned, any is taken
        w = at_byte_offset(w, draw(st.sampled_from([o for o in range(16) if o % ALIGN[fmt]] or list(range(16)))))
    else:
        w = at_byte_offset(w, draw(st.sampled_from(range(0, 16, ALIGN[fmt]))))
    if "w-transposed" in faults and w.dim() == 2:
        w = w.t().contiguous().t()
    if "w-short" in faults or "w-long" in faults:
        d, flat = draw(st.integers(1, 40)), w.reshape(-1)
        w = flat[:max(flat.numel() - d, 0)] if "w-short" in faults else torch.cat([flat, flat[:1].expand(d)])
    if "w-dtype" in faults:
        w = w.view(torch.int8) if draw(st.booleans()) else w.to(torch.float32)
    return w


def weight_problems(w: torch.Tensor, fmt: int, n0: int, k0: int) -> list[str]:
    """What is wrong with weight bytes made for (n0, k0) as the op gets them."""
    misaligned = not w.is_meta and w.numel() and w.data_ptr() % ALIGN[fmt]
    if (w.dtype != torch.uint8 or not w.is_contiguous() or misaligned
            or w.numel() != n0 * row_bytes(fmt, k0)):
        return ["w:"]
    return []


def weight_oracle(w: torch.Tensor, fmt: int, n: int, k: int) -> np.ndarray:
    """gguf's float32 dequantization of the bytes, [n, k] (padding dropped)."""
    raw = w.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(n, -1)
    with np.errstate(all="ignore"):
        return gguf_dequantize(raw, Q(fmt))[:, :k]


def same_bits(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Bitwise equality, any NaN matching any NaN."""
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return False
    nan = torch.isnan(y)
    if not torch.equal(nan, torch.isnan(ref)):
        return False
    ints = {4: torch.int32, 2: torch.int16}[y.element_size()]
    return torch.equal(y[~nan].view(ints), ref[~nan].view(ints))


# ---- qmatmul, the named GEMV ops, QuantLinear, qmatmul_q8_1, q4k_q8_gemv --------------------------

NAMED = {int(Q.Q4_K): "q4k_gemv", int(Q.Q5_K): "q5k_gemv", int(Q.Q6_K): "q6k_gemv"}
ENTRIES = ["qmatmul", "named", "QuantLinear", "qmatmul_q8_1", "q4k_q8_gemv"]
Q8_1_ENTRIES = ("qmatmul_q8_1", "q4k_q8_gemv")  # x goes through quantize_q8_1 first
# QuantLinear's own checks call its arguments by the layer's names; the op's checks (x, devices) keep theirs
LAYER_NAMES = {"w:": "weight:", "n:": "out_features:", "k:": "in_features:"}


class MatmulCase(NamedTuple):
    entry: str  # which API: one of ENTRIES
    qtype: object  # the format argument
    fmt: int  # the weight bytes' format
    w: torch.Tensor
    x: torch.Tensor
    n: int
    k: int
    out_dtype: torch.dtype
    xq_offset: int  # byte offset of the Q8_1 activations
    packed: bool  # q4k_q8_gemv_packed rather than q4k_q8_gemv
    problems: list[str]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: the layouts, not the values
        return (f"MatmulCase({self.entry}, qtype={self.qtype!r}, n={self.n}, k={self.k}, w={describe(self.w)}, "
                f"x={describe(self.x)}, out_dtype={self.out_dtype}, xq_offset={self.xq_offset}, "
                f"packed={self.packed}, problems={self.problems})")

    def took_gemv(self) -> bool:
        """Whether call() computes through the Q8_1 GEMV (kernels/batch_policy.h): the Q8_1 entry
        points always, the others as test_matmul.takes_gemv says for the operands the op receives.
        QuantLinear keeps its own aligned copy of w and passes x.contiguous() (a strided x: a new,
        aligned copy)."""
        if self.entry in Q8_1_ENTRIES:
            return True
        x, layer = self.x, self.entry == "QuantLinear"
        copied = layer and not x.is_contiguous()
        aligned = (copied or x.data_ptr() % 16 == 0) and (layer or self.w.data_ptr() % 16 == 0)
        return takes_gemv(math.prod(x.shape[:-1]), x.device, x.dtype, self.n, self.k, self.fmt, aligned)

    def call(self):
        entry, qtype, w, x, n, k = self.entry, self.qtype, self.w, self.x, self.n, self.k
        if entry == "qmatmul":
            return torchext.qmatmul(w, qtype, x, n, k)
        if entry == "named":
            return getattr(torchext, NAMED[self.fmt])(w, x, n, k)
        if entry == "QuantLinear":
            return torchext.nn.QuantLinear(w, qtype, k, n)(x)
        xq = at_byte_offset(torchext.quantize_q8_1(x), self.xq_offset)
        if entry == "qmatmul_q8_1":
            return torchext.qmatmul_q8_1(w, qtype, xq, n, k, self.out_dtype)
        return (torchext.q4k_q8_gemv_packed if self.packed else torchext.q4k_q8_gemv)(w, xq, n, k)


# QuantLinear takes any layout and alignment of its bytes (it keeps an aligned contiguous copy) and
# any strides of x: variations there, faults for the ops
LAYOUTS = ("w-misaligned", "w-transposed", "x-strided")


def matmul_faults(entry: str) -> tuple[str, ...]:
    """The faults an entry point can be given."""
    faults = (*SHAPE_FAULTS, *WEIGHT_FAULTS, "devices", "x-dtype", "x-length", "x-strided",
              *(() if entry in ("named", "q4k_q8_gemv") else ("qtype",)),
              *(("xq-misaligned",) if entry in Q8_1_ENTRIES else ()),
              *(("out-dtype",) if entry == "qmatmul_q8_1" else ()))
    return tuple(f for f in faults if f not in LAYOUTS) if entry == "QuantLinear" else faults


MATMUL_FAULTS = matmul_faults("qmatmul_q8_1")  # all of them


@st.composite
def matmul_cases(draw, main_device, fault) -> MatmulCase:
    entry = draw(st.sampled_from([e for e in ENTRIES if fault in matmul_faults(e)]))
    fixed_format = entry in ("named", "q4k_q8_gemv")  # no format argument
    layer = entry == "QuantLinear"
    faults = draw_faults(draw, fault, matmul_faults(entry))
    if layer:
        faults |= {v for v in LAYOUTS if draw(st.booleans())}
    if fixed_format:
        fmt = draw(st.sampled_from(sorted(NAMED))) if entry == "named" else int(Q.Q4_K)
        qtype = fmt
    else:
        qtype, fmt = draw_qtype(draw, "qtype" in faults, int(Q.Q4_K))
    problems = [QTYPE] if "qtype" in faults else []
    n0, k0 = draw(st.integers(1, 12)), draw_k(draw, fmt)
    n, k, shape_problems = shape_fault(draw, faults, fmt, n0, k0)
    problems += shape_problems
    w_dev, x_dev = draw_devices(draw, main_device, 2, "devices" in faults)
    if w_dev != x_dev:
        problems.append("w and xq:" if entry in Q8_1_ENTRIES else "w and x:")

    w = weight_bytes(draw, faults, random_weight(fmt, n0, k0, seed=draw(st.integers(0, 2**16))).to(w_dev), fmt)
    if layer:
        problems += ["w:"] if w.dtype != torch.uint8 or w.numel() != n0 * row_bytes(fmt, k0) else []
    else:
        problems += weight_problems(w, fmt, n0, k0)

    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "x-dtype" in faults else DTYPES))
    kx = k if 0 <= k <= 10**6 else k0  # x's length: k, unless k is absurd
    if "x-length" in faults:
        # for Q8_1 bytes a length off by whole super-blocks: within one, x pads to the same bytes
        deltas = [256, -256] if entry in Q8_1_ENTRIES else [1, 32, 256, -1, -32]
        kx += draw(st.sampled_from([d for d in deltas if kx + d > 0]))
    x = draw_activations(draw, draw_lead(draw) + (kx,), dtype).to(x_dev)
    x = strided(draw, x) if "x-strided" in faults else at_offset(draw, x)
    if dtype not in DTYPES or (not x.is_contiguous() and not layer):
        problems.append("x:")
    if kx != k:
        problems.append("xq:" if entry in Q8_1_ENTRIES else "x:")
    if kx == 0 and entry in Q8_1_ENTRIES:
        problems.append("x:")  # quantize_q8_1 needs a positive K

    out_dtype, xq_offset = dtype, 0
    if entry == "qmatmul_q8_1":
        out_dtype = torch.int32 if "out-dtype" in faults else draw(st.sampled_from(DTYPES))
        problems += ["dtype:"] if "out-dtype" in faults else []
    elif entry == "q4k_q8_gemv":
        out_dtype = torch.float32
    if entry in Q8_1_ENTRIES:
        xq_offset = draw(st.sampled_from([1, 2, 3] if "xq-misaligned" in faults else [0, 4, 8]))
        if xq_offset % 4 and x_dev != "meta" and x.numel():  # an empty xq has no data to misread
            problems.append("xq:")
    if layer:
        problems = [LAYER_NAMES.get(p, p) for p in problems]
    return MatmulCase(entry, qtype, fmt, w, x, n, k, out_dtype, xq_offset, draw(st.booleans()), problems)


def check_matmul(y, x, W, out_dtype, gemv, M=None):
    """y against x @ W.T with the module docstring's tolerance (M: the weights' offsets,
    conftest.offset_oracle); rows holding a NaN or inf give non-finite outputs only."""
    n, k = W.shape
    assert tuple(y.shape) == tuple(x.shape[:-1]) + (n,) and y.dtype == out_dtype and y.device == x.device, describe(y)
    if y.numel() == 0:
        return
    x2, y2 = x.detach().reshape(-1, k), y.detach().reshape(-1, n)
    with np.errstate(over="ignore", invalid="ignore"):
        ref, absref, xabs = oracle(x2, W)
        bound = q8_1_bound(x2, W) if gemv else 0.0
        u = 0.0 if out_dtype == torch.float32 else half_ulp(out_dtype)
        tol = output_rounding(y2, ref, absref, xabs, 1e-5, offsets_term(x2, M), gemv=gemv)
        tol = tol + bound * (1 + 1e-5) * (1 + u)
        tol = tol + 2 * k * 2.0**-149
    got = y2.double().cpu().numpy()
    bad_rows = ~torch.isfinite(x2.float()).all(1).cpu().numpy()
    assert not np.isfinite(got[bad_rows]).any(), "an output of a row holding a NaN or inf is finite"
    limit = torch.finfo(out_dtype).max / 4
    in_range = ~bad_rows[:, None] & np.isfinite(ref) & (np.abs(ref) < limit) & (absref < limit)
    assert np.isfinite(got[in_range]).all(), "non-finite output where the float64 oracle is in range"
    with np.errstate(invalid="ignore"):  # inf - inf where outputs may overflow
        err = np.where(in_range, np.abs(got - ref), 0.0)
    tol = np.where(in_range, tol, 1.0)
    assert (err <= tol).all(), report(err, tol, absref)


@pytest.mark.parametrize("fault", MATMUL_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(60)
@given(data=st.data())
def test_matmul_family(device, fault, data):
    case = data.draw(matmul_cases(device, fault))
    x, n = case.x, case.n
    gemv = case.took_gemv()

    def check(y):
        if x.is_meta:
            return check_meta(y, tuple(x.shape[:-1]) + (n,), case.out_dtype)
        W = weight_oracle(case.w, case.fmt, n, case.k).astype(np.float64)
        check_matmul(y, x, W, case.out_dtype, gemv, offset_oracle(case.w, case.fmt, n, case.k))

    check_call(case.call, case.problems, check)


# ---- qmatmul_id ---------------------------------------------------------------------------------------

ID_FAULTS = (*SHAPE_FAULTS, "w-misaligned", "w-dtype", "w-dims", "qtype", "x-dtype", "x-strided", "x-dims",
             "ids-dtype", "ids-shape", "ids-strided", "ids-out-of-range", "devices")


@pytest.mark.parametrize("fault", ID_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(30)
@given(data=st.data())
def test_qmatmul_id(device, fault, data):
    """qmatmul_id against test_matmul_id's oracle (each slot its activation row @ its expert's gguf
    dequantization, the Q8_1 bound up to gemv_rows tokens unless exact, unrounded beyond), an id outside
    [0, E) raising on the CPU and giving that slot a NaN row on CUDA."""
    draw = data.draw
    faults = draw_faults(draw, fault, ID_FAULTS)
    problems = []
    qtype, fmt = draw_qtype(draw, "qtype" in faults, int(Q.Q4_K))
    problems += [QTYPE] if "qtype" in faults else []
    experts, n0, k0 = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw_k(draw, fmt)
    n, k, shape_problems = shape_fault(draw, faults, fmt, n0, k0)
    problems += shape_problems
    w_dev, x_dev, i_dev = draw(st.permutations(draw_devices(draw, device, 3, "devices" in faults)))
    problems += ["w and x:"] if w_dev != x_dev else []
    problems += ["w and ids:"] if w_dev != i_dev else []
    experts_w = [random_weight(fmt, n0, k0, seed=draw(st.integers(0, 2**16))) for _ in range(experts)]
    w = torch.stack(experts_w).to(w_dev)
    if "w-dims" in faults:
        w = w.reshape(experts * n0, -1)
        problems.append("w:")
    w = at_byte_offset(w, draw(st.sampled_from([o for o in range(16) if o % ALIGN[fmt]] or [0]))
                       if "w-misaligned" in faults else 0)
    if "w-misaligned" in faults and ALIGN[fmt] > 1 and w_dev != "meta":
        problems.append("w:")
    if "w-dtype" in faults:
        w = w.view(torch.int8)
        problems.append("w:")
    # up to 20 tokens, or just past the GEMV's (the format's limit on the CPU)
    tokens = draw(st.integers(0, 20) | st.integers(1, 4).map(lambda more: gemv_rows(fmt, w_dev) + more))
    top_k = draw(st.integers(0, 3))
    per_slot = draw(st.booleans())
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "x-dtype" in faults else DTYPES))
    x_shape = (tokens, top_k, k0) if per_slot else (tokens, k0)
    if "x-dims" in faults:
        x_shape = draw(st.sampled_from([(k0,), (1, 1) + x_shape]))  # 1-D, 4-D or 5-D
        problems += ["x:", "ids:"]
    x = (gaussian(x_shape, draw(st.integers(0, 2**16)))).to(dtype).to(x_dev)
    x = strided(draw, x) if "x-strided" in faults else at_offset(draw, x)
    if dtype not in DTYPES or not x.is_contiguous() or k != k0:
        problems.append("x:")
    ids = torch.randint(0, experts, (tokens, top_k), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if "ids-out-of-range" in faults and ids.numel():
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = draw(st.sampled_from([-1, experts, experts + 9]))
        problems += ["ids:"] if i_dev == "cpu" and w_dev == "cpu" and x_dev == "cpu" else []  # CUDA: a NaN row
    if "ids-dtype" in faults:
        ids = ids.to(draw(st.sampled_from([torch.int16, torch.float32, torch.uint8])))
        problems.append("ids:")
    elif draw(st.booleans()):
        ids = ids.int()
    if "ids-shape" in faults:
        ids = ids[:max(tokens - 1, 0)] if tokens and draw(st.booleans()) else ids.reshape(-1)
        if tuple(ids.shape) != (tokens, top_k):
            problems.append("ids:")
    ids = ids.to(i_dev)
    if "ids-strided" in faults:
        ids = strided(draw, ids)
        problems += [] if ids.is_contiguous() else ["ids:"]
    exact = draw(st.booleans())

    def check(y):
        if w.is_meta or x.is_meta:
            return check_meta(y, (tokens, top_k, n), dtype)
        assert tuple(y.shape) == (tokens, top_k, n) and y.dtype == dtype and y.device == x.device, describe(y)
        if not y.numel():
            return
        flat = ids.cpu().long().reshape(-1)
        inside = (flat >= 0) & (flat < experts)
        ys = y.reshape(-1, n)
        assert ys.cpu()[~inside].isnan().all(), "a slot with an id outside [0, E) must give a NaN row"
        Ws = [weight_oracle(e, fmt, n, k).astype(np.float64) for e in experts_w]
        Ms = [offset_oracle(e, fmt, n, k) for e in experts_w]
        xs = x.reshape(-1, k) if per_slot else x.repeat_interleave(top_k, dim=0)
        for e in flat[inside].unique().tolist():
            sel = (flat == e).to(ys.device)
            assert_rows_close(ys[sel], xs[sel.to(xs.device)].cpu(), Ws[e], Ms[e],
                              rounded=tokens <= gemv_rows(fmt, y.device) and not exact, what=f"expert {e}")

    check_call(lambda: torchext.qmatmul_id(w, qtype, x, ids, n, k, exact), problems, check)


# ---- quantize_q8_1 ------------------------------------------------------------------------------

Q8_1_FAULTS = ("x-dtype", "x-strided", "scalar", "k-zero")


@pytest.mark.parametrize("fault", Q8_1_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(80)
@given(data=st.data())
def test_quantize_q8_1(device, fault, data):
    draw = data.draw
    faults = draw_faults(draw, fault, Q8_1_FAULTS)
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "x-dtype" in faults else DTYPES))
    k = 0 if "k-zero" in faults else draw(st.integers(1, 700))
    shape = () if "scalar" in faults else draw_lead(draw) + (k,)
    x = draw_activations(draw, shape, dtype).to(draw_devices(draw, device, 1, False)[0])
    x = strided(draw, x) if "x-strided" in faults else at_offset(draw, x)
    problems = []
    if dtype not in DTYPES or not x.is_contiguous() or x.dim() == 0 or k == 0:
        problems.append("x:")

    def check(xq):
        expected = tuple(x.shape[:-1]) + (q8_1_row_bytes(k),)
        if x.is_meta:
            return check_meta(xq, expected, torch.uint8)
        assert xq.dtype == torch.uint8 and tuple(xq.shape) == expected and xq.device == x.device, describe(xq)
        ref, got = q8_1_reference(x.float().cpu().numpy()), xq.cpu().numpy()
        if not np.array_equal(got, ref):
            i = tuple(np.argwhere(got != ref)[0])
            pytest.fail(f"Q8_1 bytes differ from the reference, first at {i}: {got[i]} != {ref[i]}")

    check_call(lambda: torchext.quantize_q8_1(x), problems, check)


# ---- dequantize, embedding ------------------------------------------------------------------------

def raw_weight(draw, fmt: int, n: int, k: int) -> torch.Tensor:
    """Realistic bytes (finite scales), or at times every byte random: fp16 scales that are inf or
    NaN, as in a corrupted file."""
    seed = draw(st.integers(0, 2**16))
    if draw(st.sampled_from([False] * 3 + [True])):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, row_bytes(fmt, k)), generator=g, dtype=torch.uint8)
    return random_weight(fmt, n, k, seed=seed)


DEQUANTIZE_FAULTS = ("qtype", *SHAPE_FAULTS, *WEIGHT_FAULTS, "out-dtype")
EMBEDDING_FAULTS = (*DEQUANTIZE_FAULTS, "devices", "ids-dtype", "ids-strided", "ids-out-of-range")


@pytest.mark.parametrize("fault", EMBEDDING_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(50)
@given(data=st.data())
def test_dequantize_and_embedding(device, fault, data):
    draw = data.draw
    op = draw(st.sampled_from(["dequantize", "embedding"] if fault in DEQUANTIZE_FAULTS else ["embedding"]))
    faults = draw_faults(draw, fault, DEQUANTIZE_FAULTS if op == "dequantize" else EMBEDDING_FAULTS)
    qtype, fmt = draw_qtype(draw, "qtype" in faults, int(Q.Q8_0))
    problems = [QTYPE] if "qtype" in faults else []
    n0, k0 = draw(st.integers(1, 10)), draw_k(draw, fmt)
    n, k, shape_problems = shape_fault(draw, faults, fmt, n0, k0)
    problems += shape_problems
    w_dev, ids_dev = draw_devices(draw, device, 2, "devices" in faults)
    w = weight_bytes(draw, faults, raw_weight(draw, fmt, n0, k0).to(w_dev), fmt)
    problems += weight_problems(w, fmt, n0, k0)
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "out-dtype" in faults else DTYPES))
    problems += ["dtype:"] if "out-dtype" in faults else []

    if op == "dequantize":
        shape = (n, k)
        call = lambda: torchext.dequantize(w, qtype, n, k, dtype)  # noqa: E731
    else:
        lead = draw_lead(draw)
        ids = torch.tensor(draw(st.lists(st.integers(0, n0 - 1), min_size=math.prod(lead), max_size=math.prod(lead))),
                           dtype=torch.int64).reshape(lead)
        if "ids-out-of-range" in faults and ids.numel():
            ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = draw(st.sampled_from([n0, -1, 2**40]))
        ids_dtype = draw(st.sampled_from([torch.float32, torch.int16, torch.uint8] if "ids-dtype" in faults
                                         else [torch.int64, torch.int32]))
        ids = ids.to(ids_dtype).to(ids_dev)
        ids = strided(draw, ids) if "ids-strided" in faults else at_offset(draw, ids)
        if ids_dtype not in (torch.int64, torch.int32) or not ids.is_contiguous():
            problems.append("ids:")
        elif not ids.is_meta and ((ids.long() < 0) | (ids.long() >= n)).any() and ids_dev == w_dev == "cpu":
            problems.append("ids:")  # out of range: the CPU raises (CUDA gives a NaN row)
        if w_dev != ids_dev:
            problems.append("w and ids:")
        shape = tuple(ids.shape) + (k,)
        call = lambda: torchext.embedding(w, qtype, ids, n, k, dtype)  # noqa: E731

    def check(y):
        if w.is_meta:
            return check_meta(y, shape, dtype)
        assert tuple(y.shape) == shape and y.dtype == dtype and y.device == w.device, describe(y)
        ref = torch.from_numpy(weight_oracle(w, fmt, n, k))
        if op == "embedding":
            flat = ids.cpu().long().reshape(-1)
            inside = (flat >= 0) & (flat < n)
            rows = torch.full((flat.numel(), k), math.nan)
            rows[inside] = ref[flat[inside]]
            ref = rows.reshape(shape)
        assert same_bits(y.cpu(), ref.to(dtype)), "not gguf's values"

    check_call(call, problems, check)


# ---- gelu, gelu_, bias_gelu ----------------------------------------------------------------------

LEAF = r"a leaf Variable|a view of a leaf Variable"  # torch's own refusal of in-place ops on leaves


def unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN matching NaN."""
    if a.is_meta:
        return True
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


GELU_FAULTS = {"gelu": ("x-dtype", "x-strided", "approximate")}
GELU_FAULTS.update(gelu_=(*GELU_FAULTS["gelu"], "leaf"),
                   bias_gelu=(*GELU_FAULTS["gelu"], "devices", "bias-dtype", "bias-shape", "bias-strided", "scalar"))


@pytest.mark.parametrize("fault", sorted(set(GELU_FAULTS["gelu_"] + GELU_FAULTS["bias_gelu"])))
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(70)
@given(data=st.data())
def test_gelu_family(device, fault, data):
    draw = data.draw
    op = draw(st.sampled_from([op for op, faults in GELU_FAULTS.items() if fault in faults]))
    faults = draw_faults(draw, fault, GELU_FAULTS[op])
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "x-dtype" in faults else DTYPES))
    approximate = draw(st.sampled_from(["exact", "", "Tanh", "erf"] if "approximate" in faults else ["none", "tanh"]))
    # a scalar is a fine argument for gelu and gelu_
    scalar = "scalar" in faults or (op != "bias_gelu" and draw(st.sampled_from([False] * 6 + [True])))
    shape = () if scalar else draw_lead(draw) + (draw(st.integers(1, 40)),)
    x_dev, b_dev = draw_devices(draw, device, 2, "devices" in faults)
    x = draw_activations(draw, shape, dtype).to(x_dev)
    x = strided(draw, x) if "x-strided" in faults else at_offset(draw, x)
    problems = []
    if dtype not in DTYPES or not x.is_contiguous():
        problems.append("x:")
    if "approximate" in faults:
        problems.append("approximate:")
    # a leaf that requires grad: in place it is refused, as torch's own in-place ops refuse it
    if x.is_floating_point() and ("leaf" in faults or (op != "gelu_" and draw(st.booleans()))):
        x.requires_grad_()
        problems += [LEAF] if op == "gelu_" else []
    bias = None
    if op == "bias_gelu":
        c = x.shape[-1] if x.dim() else 0
        b_dtype = draw(st.sampled_from([d for d in DTYPES + [torch.float64] if d != dtype])) if "bias-dtype" in faults \
            else dtype
        b_shape = draw(st.sampled_from([(c + 1,), (1, c), ()])) if "bias-shape" in faults else (c,)
        bias = draw_activations(draw, b_shape, torch.float32).to(b_dtype).to(b_dev)
        bias = strided(draw, bias) if "bias-strided" in faults else at_offset(draw, bias)
        if b_dtype != dtype or not bias.is_contiguous() or b_shape != (c,) or x.dim() == 0:
            problems.append("bias:")
        if b_dev != x_dev:
            problems.append("x and bias:")
    x0 = x.detach().clone()

    def call():
        if op == "gelu":
            return torchext.gelu(x, approximate)
        if op == "bias_gelu":
            return torchext.bias_gelu(x, bias, approximate)
        out = torchext.gelu_(x, approximate)
        assert out is x, "gelu_ must return its argument"
        return out

    def check(y):
        if x.is_meta:
            return check_meta(y, x.shape, dtype)
        z = x0.float() if op != "bias_gelu" else x0.float() + bias.detach().float()  # one fp32 rounding
        ref = F.gelu(z.double(), approximate=approximate).to(dtype).to(y.device)
        assert_gelu_close(y, ref, z, gelu_units(x.device))

    try:
        check_call(call, problems, check)
    finally:
        if problems:
            assert unchanged(x.detach(), x0), f"{op} modified x before refusing it"


# ---- rms_norm_quantize_q8_1, add_rms_norm_quantize_q8_1 ----------------------------------------------

NORM_FAULTS = {"rms_norm_quantize_q8_1": ("x-dtype", "x-strided", "scalar", "k-zero", "weight-dtype", "weight-shape",
                                          "weight-strided", "eps", "devices")}
NORM_FAULTS["add_rms_norm_quantize_q8_1"] = (*NORM_FAULTS["rms_norm_quantize_q8_1"], "residual-dtype",
                                             "residual-shape", "residual-strided", "x_weight-dtype", "x_weight-shape")
BAD_EPS = [-1.0, -1e-30, math.nan, math.inf, 1e39]


@pytest.mark.parametrize("fault", sorted(set(NORM_FAULTS["add_rms_norm_quantize_q8_1"])))
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(40)
@given(data=st.data())
def test_norm_family(device, fault, data):
    """rms_norm_quantize_q8_1 must give the bytes of quantize_q8_1 of test_fused.rms_norm_reference (the
    norm's arithmetic spelled out in torch ops on the CPU, every step a float32 rounding, the sum of
    squares in the op's order), and add_rms_norm_quantize_q8_1 the sum s = residual + t (t = x, or x's
    norm by x_weight) value for value and that norm's bytes of s, on either device."""
    draw = data.draw
    op = draw(st.sampled_from([op for op, faults in NORM_FAULTS.items() if fault in faults]))
    faults = draw_faults(draw, fault, NORM_FAULTS[op])
    add = op == "add_rms_norm_quantize_q8_1"
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "x-dtype" in faults else DTYPES))
    k = 0 if "k-zero" in faults else draw(st.integers(1, 700))
    shape = () if "scalar" in faults else draw_lead(draw) + (k,)

    def other_dtype(fault_name, allowed):
        return draw(st.sampled_from([d for d in DTYPES + BAD_FLOAT_DTYPES if d not in allowed])) \
            if fault_name in faults else draw(st.sampled_from(allowed))

    def vector(fault_shape, fault_strided, fault_dtype, dev):
        """A norm weight [k] (or, with the shape fault, another shape) on dev."""
        w_shape = draw(st.sampled_from([(k + 1,), (1, k), ()])) if fault_shape in faults else (k,)
        w = draw_activations(draw, w_shape, torch.float32).to(other_dtype(fault_dtype, [torch.float32, dtype]))
        w = w.to(dev)
        return strided(draw, w) if fault_strided in faults else at_offset(draw, w), w_shape

    x_dev, w_dev, r_dev = draw_devices(draw, device, 3, "devices" in faults)
    if draw(st.booleans()):
        x_dev, w_dev = w_dev, x_dev
    x = draw_activations(draw, shape, dtype).to(x_dev)
    x = strided(draw, x) if "x-strided" in faults else at_offset(draw, x)
    weight, w_shape = vector("weight-shape", "weight-strided", "weight-dtype", w_dev)
    eps = draw(st.sampled_from(BAD_EPS)) if "eps" in faults else draw(st.sampled_from([0.0, 1e-6, 1e-5, 1.0]))
    problems = []
    if dtype not in DTYPES or not x.is_contiguous() or x.dim() == 0 or k == 0:
        problems.append("x:")
    if (weight.dtype not in (torch.float32, dtype) or w_shape != (k,) or not weight.is_contiguous()):
        problems.append("weight:")
    if w_dev != x_dev:
        problems.append("x and weight:")
    if "eps" in faults:
        problems.append("eps:")
    residual = x_weight = None
    if add:
        r_dtype = other_dtype("residual-dtype", [dtype])
        r_shape = draw(st.sampled_from([shape + (1,), (2,) + shape, shape[:-1] + (k + 1,)])) \
            if "residual-shape" in faults else shape
        residual = draw_activations(draw, r_shape, r_dtype).to(r_dev)
        residual = strided(draw, residual) if "residual-strided" in faults else at_offset(draw, residual)
        if r_dtype != dtype or r_shape != shape or not residual.is_contiguous():
            problems.append("residual:")
        if r_dev != x_dev:
            problems.append("x and residual:")
        if draw(st.booleans()) or "x_weight-dtype" in faults or "x_weight-shape" in faults:
            x_weight, xw_shape = vector("x_weight-shape", "x_weight-strided", "x_weight-dtype", x_dev)
            if x_weight.dtype not in (torch.float32, dtype) or xw_shape != (k,) or not x_weight.is_contiguous():
                problems.append("x_weight:")

    def call():
        if add:
            return torchext.add_rms_norm_quantize_q8_1(x, residual, weight, eps, x_weight)
        return torchext.rms_norm_quantize_q8_1(x, weight, eps)

    def check(result):
        xq_shape = tuple(shape[:-1]) + (q8_1_row_bytes(k),)
        if x.is_meta:
            if add:
                check_meta(result[0], shape, dtype)
                result = result[1]
            return check_meta(result, xq_shape, torch.uint8)
        if x.numel() == 0:  # no rows (the reference reshapes by rows)
            outputs = result if add else (result,)
            assert [tuple(o.shape) for o in outputs] == ([shape] if add else []) + [xq_shape], describe(outputs[-1])
            return
        if add:
            s, xq = result
            t = x.cpu() if x_weight is None else rms_norm_reference(x, x_weight, eps)
            ref_s = residual.cpu() + t
            assert s.device == x.device and same_bits(s.cpu(), ref_s), "s is not residual + t"
            normed = ref_s
        else:
            xq, normed = result, x
        assert tuple(xq.shape) == xq_shape and xq.dtype == torch.uint8 and xq.device == x.device, describe(xq)
        ref = torchext.quantize_q8_1(rms_norm_reference(normed, weight, eps))
        assert torch.equal(xq.cpu(), ref), "not the bytes of quantize_q8_1(rms_norm_reference(...))"

    check_call(call, problems, check)


# ---- gated_gelu_quantize_q8_1, gated_gelu_qmatmul, gated_silu_quantize_q8_1, gated_silu_qmatmul ------------

GATED_FAULTS = {"gated_gelu_quantize_q8_1": ("gate-dtype", "gate-strided", "up-dtype", "up-shape", "up-strided",
                                             "approximate", "devices", "k-zero", "scalar")}
GATED_FAULTS["gated_gelu_qmatmul"] = (*GATED_FAULTS["gated_gelu_quantize_q8_1"], *SHAPE_FAULTS, *WEIGHT_FAULTS,
                                      "qtype", "gate-length")
# the SiLU twins: the same checks, and no approximate argument
GATED_FAULTS.update({op.replace("gelu", "silu"): tuple(f for f in faults if f != "approximate")
                     for op, faults in GATED_FAULTS.items()})


@pytest.mark.parametrize("activation,fault", [(a, f) for a in ("gelu", "silu")
                                              for f in sorted(set(GATED_FAULTS[f"gated_{a}_qmatmul"]))])
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(40)
@given(data=st.data())
def test_gated_family(device, activation, fault, data):
    """gated_gelu_quantize_q8_1(gate, up, a) must give the bytes of quantize_q8_1(gelu(gate, a) * up),
    gated_silu_quantize_q8_1(gate, up) those of quantize_q8_1(silu(gate) * up) (F.silu on CUDA,
    test_fused.silu_oracle on the CPU), and gated_gelu_qmatmul and gated_silu_qmatmul the bits of
    qmatmul_q8_1 on those bytes in gate's dtype, on the same device (each op's documented equality;
    test_quantize_q8_1 and test_matmul_family check the parts against their oracles). On CUDA the GEMV
    computes the bytes itself for up to 8 rows, so this also compares its rows with the standalone kernel's."""
    draw = data.draw
    op = draw(st.sampled_from([op for op, faults in GATED_FAULTS.items()
                               if op.startswith(f"gated_{activation}_") and fault in faults]))
    faults = draw_faults(draw, fault, GATED_FAULTS[op])
    problems = []
    qmatmul = op.endswith("_qmatmul")
    if qmatmul:
        qtype, fmt = draw_qtype(draw, "qtype" in faults, int(Q.Q4_K))
        problems += [QTYPE] if "qtype" in faults else []
        n0, k0 = draw(st.integers(1, 12)), draw_k(draw, fmt)
        n, k, shape_problems = shape_fault(draw, faults, fmt, n0, k0)
        problems += shape_problems
    else:
        k0 = k = draw(st.integers(1, 700))
    kx = 0 if "k-zero" in faults else k0 + (draw(st.sampled_from([1, 32, 256])) if "gate-length" in faults else 0)
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "gate-dtype" in faults else DTYPES))
    up_dtype = draw(st.sampled_from([d for d in DTYPES + BAD_FLOAT_DTYPES if d != dtype])) if "up-dtype" in faults \
        else dtype
    shape = () if "scalar" in faults else draw_lead(draw) + (kx,)
    up_shape = draw(st.sampled_from([shape + (1,), (2,) + shape, shape[:-1] + (kx + 1,)])) if "up-shape" in faults \
        else shape
    devices = draw_devices(draw, device, 3, "devices" in faults)  # gate, up, w; two of them differ when mixed
    gate_dev, up_dev, w_dev = draw(st.permutations(devices)) if qmatmul else devices
    gate = draw_activations(draw, shape, dtype).to(gate_dev)
    gate = strided(draw, gate) if "gate-strided" in faults else at_offset(draw, gate)
    up = draw_activations(draw, up_shape, up_dtype).to(up_dev)
    up = strided(draw, up) if "up-strided" in faults else at_offset(draw, up)
    if activation == "gelu":  # SiLU has no approximate
        forms = ["exact", "", "Tanh", "erf"] if "approximate" in faults else ["none", "tanh"]
        approximate = draw(st.sampled_from(forms))
    if dtype not in DTYPES or not gate.is_contiguous() or gate.dim() == 0 or (not qmatmul and kx == 0):
        problems.append("gate:")
    if qmatmul and gate.dim() and kx != k:
        problems.append("gate:")
    if up_dtype != dtype or up_shape != shape or not up.is_contiguous():
        problems.append("up:")
    if gate_dev != up_dev:
        problems.append("gate and up:")
    if "approximate" in faults:
        problems.append("approximate:")
    if qmatmul:
        w = weight_bytes(draw, faults, random_weight(fmt, n0, k0, seed=draw(st.integers(0, 2**16))).to(w_dev), fmt)
        problems += weight_problems(w, fmt, n0, k0)
        if w_dev != gate_dev:
            problems.append("w and gate:")

    def call():
        if activation == "silu":
            if qmatmul:
                return torchext.gated_silu_qmatmul(w, qtype, gate, up, n, k)
            return torchext.gated_silu_quantize_q8_1(gate, up)
        if qmatmul:
            return torchext.gated_gelu_qmatmul(w, qtype, gate, up, n, k, approximate)
        return torchext.gated_gelu_quantize_q8_1(gate, up, approximate)

    def check(y):
        expected = tuple(shape[:-1]) + ((n,) if qmatmul else (q8_1_row_bytes(k),))
        out_dtype = dtype if qmatmul else torch.uint8
        if gate.is_meta:
            return check_meta(y, expected, out_dtype)
        assert tuple(y.shape) == expected and y.dtype == out_dtype and y.device == gate.device, describe(y)
        act = gated_activation("silu" if activation == "silu" else f"gelu-{approximate}", gate)
        xq = torchext.quantize_q8_1(act * up)
        if not qmatmul:
            assert torch.equal(y, xq), f"not the bytes of quantize_q8_1({activation}(gate) * up)"
            return
        assert same_bits(y, torchext.qmatmul_q8_1(w, qtype, xq, n, k, dtype)), "not qmatmul_q8_1's bits"

    check_call(call, problems, check)


# ---- cached_attention, cached_attention_quantize_q8_1 ------------------------------------------------

ATTENTION_FAULTS = ("q-dtype", "q-strided", "q-dims", "cache-dtype", "cache-strided", "cache-shape", "kv-heads",
                    "dim", "keys-zero", "pos-dtype", "pos-length", "pos-range", "window", "scale", "devices")


@pytest.mark.parametrize("fault", ATTENTION_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(40)
@given(data=st.data())
def test_attention_family(device, fault, data):
    """cached_attention within test_attention's bound of its float64 oracle (a position outside the
    cache: the CPU raises, CUDA gives that row NaN), and cached_attention_quantize_q8_1 the bytes of
    quantize_q8_1 of cached_attention's output as [B, T, H * D] on the same device."""
    draw = data.draw
    op = draw(st.sampled_from(["cached_attention", "cached_attention_quantize_q8_1"]))
    q8_1 = op == "cached_attention_quantize_q8_1"
    faults = draw_faults(draw, fault, ATTENTION_FAULTS)
    problems = []
    batch, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    heads = kv_heads * group
    if "kv-heads" in faults:
        kv_heads, heads = 2, 2 * group + 1
        problems.append("k_cache:")
    rows = draw(st.integers(1 if "pos-range" in faults else 0, 3))
    keys = 0 if "keys-zero" in faults else draw(st.integers(1, 40))
    problems += ["k_cache:"] if keys == 0 else []
    dim = draw(st.sampled_from(range(32 if q8_1 else 8, 257, 32 if q8_1 else 8)))
    if "dim" in faults:
        dim = draw(st.sampled_from([0, 12, 264] + ([8, 40, 200] if q8_1 else [])))
        problems.append("q:")
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "q-dtype" in faults else DTYPES))
    c_dtypes = [dtype, dtype]
    if "cache-dtype" in faults:
        other = draw(st.sampled_from([d for d in DTYPES if d != dtype]))
        c_dtypes = draw(st.sampled_from([[other, other], [dtype, other]]))
        problems += ["k_cache:", "v_cache:"]
    e = draw(st.integers(-2, 2))
    q_dev, c_dev, p_dev = draw_devices(draw, device, 3, "devices" in faults)
    q_dev, c_dev, p_dev = draw(st.permutations([q_dev, c_dev, p_dev]))
    q = (gaussian((batch, heads, rows, dim), draw(st.integers(0, 2**16))) * 10.0**e).to(dtype).to(q_dev)
    caches = [(gaussian((batch, kv_heads, keys, dim), draw(st.integers(0, 2**16))) * 10.0**e).to(t).to(c_dev)
              for t in c_dtypes]
    if "cache-shape" in faults:
        which = draw(st.sampled_from([0, 1]))
        caches[which] = caches[which][:, :, :max(keys - 1, 0)].contiguous() if draw(st.booleans()) else \
            torch.zeros(batch + 1, kv_heads, keys, dim, dtype=c_dtypes[which], device=c_dev)
        problems += ["k_cache:", "v_cache:"]
    if "cache-strided" in faults:
        which = draw(st.sampled_from([0, 1]))
        caches[which] = strided(draw, caches[which])
        if not caches[which].is_contiguous():
            problems += ["k_cache:", "v_cache:"]
    if "q-strided" in faults:
        q = strided(draw, q)
        problems += [] if q.is_contiguous() else ["q:"]
    if "q-dims" in faults:
        q = q[0]
        problems.append("q:")
    if dtype not in DTYPES:
        problems.append("q:")
    if q_dev != c_dev:
        problems.append("q and k_cache:")
    if q_dev != p_dev:
        problems.append("q and pos:")
    positions = [draw(st.integers(0, max(keys - 1, 0))) for _ in range(rows)]
    outside = "pos-range" in faults and rows and keys
    if outside:
        positions[draw(st.integers(0, rows - 1))] = draw(st.sampled_from([-1, keys, keys + 5, -(2**40)]))
        problems += ["pos:"] if p_dev == "cpu" and q_dev == "cpu" else []  # CUDA gives a NaN row; meta can't see
    pos = torch.tensor(positions, dtype=torch.int64)
    if "pos-dtype" in faults:
        pos = pos.to(draw(st.sampled_from([torch.int32, torch.float32])))
        problems.append("pos:")
    if "pos-length" in faults:
        pos = torch.cat([pos, pos[:1] if rows else torch.zeros(1, dtype=torch.int64)])
        problems.append("pos:")
    pos = pos.to(p_dev)
    window = draw(st.integers(-3, -1)) if "window" in faults else draw(st.sampled_from([0, 0, 1, 5, 16]))
    problems += ["window:"] if window < 0 else []
    scale = draw(st.sampled_from([math.inf, -math.inf, math.nan])) if "scale" in faults else 1 / math.sqrt(max(dim, 1))
    problems += ["scale:"] if "scale" in faults else []
    k_cache, v_cache = caches

    def check(y):
        shape = (batch, rows, q8_1_row_bytes(heads * dim)) if q8_1 else (batch, heads, rows, dim)
        if q.is_meta:
            return check_meta(y, shape, torch.uint8 if q8_1 else dtype)
        assert tuple(y.shape) == shape and y.device == q.device, describe(y)
        if q8_1:
            want = attention_composition(q, k_cache, v_cache, pos, scale, window)
            assert torch.equal(y, want), "not the bytes of quantize_q8_1(cached_attention(...))"
            return
        if rows == 0:
            return
        inside = torch.tensor([0 <= p < keys for p in positions], dtype=torch.bool)
        got = y.cpu()
        assert got[:, :, ~inside].isnan().all(), "a position outside the cache must give a NaN row"
        clamped = pos.cpu().clamp(0, keys - 1)
        ref = attention_oracle(q, k_cache, v_cache, clamped, scale, window)
        tol = attention_bound(q, k_cache, v_cache, scale, ref, dtype)
        err = (got.double() - ref).abs()
        assert (err <= tol)[:, :, inside].all(), f"off the oracle by {err[:, :, inside].max().item():.3g}"

    call = lambda: getattr(torchext, op)(q, k_cache, v_cache, pos, scale, window)  # noqa: E731
    check_call(call, problems, check)


# ---- rope_cache_write ---------------------------------------------------------------------------------

ROPE_FAULTS = ("q-dtype", "q-layout", "dim-odd", "k-shape", "kv-dtype", "v-shape", "cache-dtype", "cache-strided",
               "cache-shape", "table", "pos-dtype", "pos-range", "weight", "eps", "devices")


@pytest.mark.parametrize("fault", ROPE_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(40)
@given(data=st.data())
def test_rope_cache_write(device, fault, data):
    """rope_cache_write on q, k, v as views of one stacked projection (or their own tensors): q's heads
    and cache rows pos[t] of k within test_rope_cache's float64 oracle bounds, v's rows copied bit for
    bit, every other cache row unchanged; a position outside the cache raises on the CPU and on CUDA
    gives q's row NaN and writes nothing. Positions within a call are distinct (which of two rows
    writing one cache position lands is not specified). A refused call leaves the caches unchanged."""
    draw = data.draw
    faults = draw_faults(draw, fault, ROPE_FAULTS)
    problems = []
    batch, rows, kv_heads = draw(st.integers(1, 2)), draw(st.integers(1 if "pos-range" in faults else 0, 3)), \
        draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    dim = 2 * draw(st.integers(1, 64)) + (1 if "dim-odd" in faults else 0)
    keys = draw(st.integers(max(rows, 1), 24))
    dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES if "q-dtype" in faults else DTYPES))
    problems += ["q:"] if dtype not in DTYPES or dim % 2 else []
    q_dev, c_dev, p_dev = draw(st.permutations(draw_devices(draw, device, 3, "devices" in faults)))
    problems += ["q and k_cache:"] if c_dev != q_dev else []
    problems += ["q and pos:"] if p_dev != q_dev else []
    # the projection's q, k and v views (the layout a fused q/k/v GEMV gives), or separate tensors
    e = draw(st.integers(-2, 2))
    kv_dtype = draw(st.sampled_from([d for d in DTYPES if d != dtype])) if "kv-dtype" in faults else dtype
    proj = (gaussian((batch, rows, (heads + 2 * kv_heads) * dim), draw(st.integers(0, 2**16))) * 10.0**e).to(dtype)
    q, k, v = proj.to(q_dev).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.view(batch, rows, h, dim) for t, h in ((q, heads), (k, kv_heads), (v, kv_heads)))
    if draw(st.booleans()):
        q, k, v = (t.contiguous() for t in (q, k, v))
    if "kv-dtype" in faults:
        which = draw(st.sampled_from(["k", "v"]))
        k, v = (k.to(kv_dtype), v) if which == "k" else (k, v.to(kv_dtype))
        problems += [f"{which}:"]
    if "q-layout" in faults:
        q = q.transpose(2, 3).contiguous().transpose(2, 3)  # each head's values strided
        if not ((heads == 1 or q.stride(2) == dim) and (dim == 1 or q.stride(3) == 1)):  # the op's rule
            problems.append("q:")
    if "k-shape" in faults:
        k = k[:, :, :0] if draw(st.booleans()) else torch.zeros(batch + 1, rows, kv_heads, dim, dtype=k.dtype,
                                                                 device=k.device)
        problems += ["k:", "v:"]
    if "v-shape" in faults:
        v = torch.zeros(batch, rows, kv_heads + 1, dim, dtype=v.dtype, device=v.device)
        problems.append("v:")
    c_dtype = draw(st.sampled_from([d for d in DTYPES if d != dtype])) if "cache-dtype" in faults else dtype
    caches = [(gaussian((batch, kv_heads, keys, dim), draw(st.integers(0, 2**16)))).to(c_dtype).to(c_dev)
              for _ in range(2)]
    problems += ["k_cache:", "v_cache:"] if c_dtype != dtype else []
    if "cache-shape" in faults:
        which = draw(st.sampled_from([0, 1]))
        caches[which] = caches[which][:, :, :keys - 1].contiguous() if keys > 1 and draw(st.booleans()) else \
            torch.zeros(batch, kv_heads + 1, keys, dim, dtype=c_dtype, device=c_dev)
        problems += ["k_cache:", "v_cache:"]
    if "cache-strided" in faults and keys > 1 and dim > 1:
        which = draw(st.sampled_from([0, 1]))
        caches[which] = caches[which].transpose(2, 3).contiguous().transpose(2, 3)
        problems += ["k_cache:", "v_cache:"]
    k_cache, v_cache = caches
    angles = torch.rand(keys + draw(st.integers(0, 3)), max(dim // 2, 1), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) * 2 * math.pi
    angles = torch.cat([angles, angles], dim=-1)[:, :dim]
    tables = [angles.cos().float().to(q_dev), angles.sin().float().to(q_dev)]
    if "table" in faults:
        which = draw(st.sampled_from([0, 1]))
        bad = draw(st.sampled_from(["dtype", "short", "dim"]))
        t = tables[which]
        tables[which] = (t.double() if bad == "dtype" else t[:keys - 1].contiguous() if bad == "short"
                         else torch.cat([t, t], dim=-1))
        problems += ["cos:", "sin:"]
    cos, sin = tables
    positions = draw(st.permutations(range(keys)))[:rows]
    if "pos-range" in faults:
        positions[draw(st.integers(0, rows - 1))] = draw(st.sampled_from([-1, keys, keys + 7, -(2**40)]))
        problems += ["pos:"] if p_dev == "cpu" and q_dev == "cpu" else []  # CUDA: a NaN row; meta can't see
    pos = torch.tensor(positions, dtype=torch.int64)
    if "pos-dtype" in faults:
        pos = pos.to(torch.int32)
        problems.append("pos:")
    pos = pos.to(p_dev)
    weights = [None, None]
    if draw(st.booleans()) or "weight" in faults:
        weights = [(1.0 + 0.5 * gaussian((dim,), draw(st.integers(0, 2**16)))).float().to(q_dev) for _ in range(2)]
        if "weight" in faults:
            which = draw(st.sampled_from([0, 1]))
            weights[which] = weights[which].double() if draw(st.booleans()) else weights[which][: max(dim - 2, 0)]
            problems += ["q_weight:", "k_weight:"]
    eps = draw(st.sampled_from(BAD_EPS)) if "eps" in faults else draw(st.sampled_from([1e-6, 0.0, 1.0]))
    problems += ["eps:"] if "eps" in faults else []
    k_before, v_before = k_cache.clone(), v_cache.clone()

    def call():
        return torchext.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, weights[0], weights[1], eps)

    def check(out):
        if q.is_meta:
            return check_meta(out, (batch, heads, rows, dim), dtype)
        assert tuple(out.shape) == (batch, heads, rows, dim) and out.dtype == dtype, describe(out)
        p = pos.cpu()
        inside = (p >= 0) & (p < keys)
        written = torch.zeros(keys, dtype=torch.bool)
        written[p[inside]] = True
        assert out.cpu()[:, :, ~inside].isnan().all(), "a position outside the cache must give q's row NaN"
        assert torch.equal(k_cache.cpu()[:, :, ~written], k_before.cpu()[:, :, ~written]), "other k rows changed"
        assert torch.equal(v_cache.cpu()[:, :, ~written], v_before.cpu()[:, :, ~written]), "other v rows changed"
        if not inside.any():
            return
        t = p[inside]
        c, s_ = cos.cpu()[t], sin.cpu()[t]
        q_ref, q_bound = rope_oracle(q[:, inside.to(q.device)], weights[0], c, s_, eps)
        err = (out.cpu()[:, :, inside].double() - q_ref.permute(0, 2, 1, 3)).abs()
        assert (err <= q_bound.permute(0, 2, 1, 3)).all(), f"q off the oracle by {err.max().item():.3g}"
        k_ref, k_bound = rope_oracle(k[:, inside.to(k.device)], weights[1], c, s_, eps)
        err = (k_cache.cpu()[:, :, t].double() - k_ref.permute(0, 2, 1, 3)).abs()
        assert (err <= k_bound.permute(0, 2, 1, 3)).all(), f"k off the oracle by {err.max().item():.3g}"
        v_bits = v.cpu()[:, inside].permute(0, 2, 1, 3).contiguous().view(torch.uint8)
        assert torch.equal(v_cache.cpu()[:, :, t].contiguous().view(torch.uint8), v_bits), "v not copied"

    try:
        check_call(call, problems, check)
    finally:
        if problems:
            assert unchanged(k_cache, k_before) and unchanged(v_cache, v_before), "caches written before refusing"


# ---- quantize ---------------------------------------------------------------------------------

QUANTIZE_FAULTS = ("qtype", "k-partial-block", "w-shape", "w-dtype", "w-strided")


@pytest.mark.parametrize("fault", QUANTIZE_FAULTS)
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(60)
@given(data=st.data())
def test_quantize(device, fault, data):
    draw = data.draw
    faults = draw_faults(draw, fault, QUANTIZE_FAULTS)
    qtype, fmt = draw_qtype(draw, "qtype" in faults, int(Q.Q8_0), [int(q) for q in QUANTIZABLE_QTYPES])
    problems = [QTYPE] if "qtype" in faults else []
    n, k = draw(st.integers(1, 6)), draw_k(draw, fmt)
    if "k-partial-block" in faults and fmt not in K_QUANT_IDS:
        k += partial_block(draw, fmt)
        problems.append("w:")
    # 1-D, 3-D or empty: an empty dim is n or k not positive
    shape = draw(st.sampled_from([(k,), (1, n, k), (n, 0), (0, k)])) if "w-shape" in faults else (n, k)
    if shape != (n, k):
        problems += ["w:", "n:", "k:"]
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32])) if "w-dtype" in faults \
        else torch.float32
    # 10^-30 to 10^4: above that the formats' fp16 scales overflow (Q8_0's d = amax / 127)
    w = gaussian(shape, draw(st.integers(0, 2**16))) * 10.0 ** draw(st.one_of(st.just(0), st.integers(-30, 4)))
    # non-finite values only in float dtypes: casting NaN or inf to int32 is undefined (CPU and CUDA
    # give different huge integers, which no format holds)
    if w.numel() and dtype.is_floating_point and draw(st.sampled_from([False] * 3 + [True])):
        for _ in range(draw(st.integers(1, 3))):
            w.view(-1)[draw(st.integers(0, w.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if fmt in {int(q) for q in NO_NAN_QTYPES}:  # no NaN block to store them in: an error naming w
            problems.append("w:")
    w = w.to(dtype).to(draw_devices(draw, device, 1, False)[0])
    if fmt == int(Q.NVFP4) and not w.is_meta and w.numel() \
            and w.float().nan_to_num(0.0, 0.0, 0.0).abs().amax() > NVFP4_LARGEST:
        problems.append("w:")  # beyond NVFP4's largest value (6 x 448): an error naming w
    w = strided(draw, w) if "w-strided" in faults else at_offset(draw, w)
    # on CUDA, the wrapper quantizes a contiguous float32 CPU copy
    if w.device.type in ("cpu", "meta") and (dtype != torch.float32 or not w.is_contiguous()):
        problems.append("w:")

    def check(q):
        if w.is_meta:
            return check_meta(q, (n, row_bytes(fmt, k)), torch.uint8)
        assert q.dtype == torch.uint8 and tuple(q.shape) == (n, row_bytes(fmt, k)) and q.device == w.device, describe(q)
        dense = w.float().cpu().numpy()
        with np.errstate(all="ignore"):
            got = gguf_dequantize(q.cpu().numpy(), Q(fmt))[:, :k]
        values = block_geometry(fmt)[0]
        padded = np.zeros((n, -(-k // values) * values), np.float32)
        padded[:, :k] = dense
        bad_block = ~np.isfinite(padded).reshape(n, -1, values).all(-1)  # [n, blocks]
        bad = bad_block[:, np.arange(k) // values]  # [n, k]: the values of those blocks
        assert np.isnan(got[bad]).all(), "a block holding a NaN or inf dequantizes to values that are not NaN"
        assert np.isfinite(got[~bad]).all(), "finite input gave non-finite values"
        if not bad_block.any() and fmt in {int(t) for t in SMALL_BLOCK_QTYPES}:
            # gguf's numpy quantizers; for IQ4_NL and NVFP4, which gguf does not make, tests/test_quantize.py's
            # ports of llama.cpp's quantizers
            port = {int(t): f for t, f in EXACT_PORTS.items()}.get(fmt)
            ref = port(dense) if port else gguf_quantize(dense, Q(fmt))
            assert np.array_equal(q.cpu().numpy(), ref), "bytes differ from the reference quantizer's"

    check_call(lambda: torchext.quantize(w, qtype), problems, check)


# ---- GGUF files, damaged ---------------------------------------------------------------------------

# name -> (format, n, k): every weight format, at k that is not whole super-blocks for the k-quants,
# then a dense matrix and vector
GGUF_TENSORS = {f"blk.{i}.{q.name.lower()}.weight": (q, 2 + i % 2, 300 if q in K_QUANTS else 64)
                for i, q in enumerate(WEIGHT_QTYPES)}
GGUF_TENSORS.update({"token_embd.weight": (Q.F16, 3, 40), "output_norm.weight": (Q.F32, 1, 36)})


class ValidGGUF(NamedTuple):
    """A valid GGUF file's bytes and data offset, and a folder for damaged copies."""

    data: bytes
    data_offset: int
    folder: Path

    def __repr__(self) -> str:  # the bytes would swamp hypothesis's report of a failing example
        return f"ValidGGUF({len(self.data)} bytes)"


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> ValidGGUF:
    """A GGUF file of the tensors above and some metadata."""
    folder = tmp_path_factory.mktemp("fuzz_gguf")
    path = folder / "valid.gguf"
    writer = GGUFWriter(str(path), "fuzz")
    writer.add_name("fuzz")
    writer.add_uint32("fuzz.context_length", 64)
    writer.add_token_list(["<s>", "a", "bc"])
    writer.add_array("fuzz.scores", [0.5, -1.0])
    for i, (name, (q, n, k)) in enumerate(GGUF_TENSORS.items()):
        if q in (Q.F16, Q.F32):
            writer.add_tensor(name, gaussian((n, k) if n > 1 else (k,), i).numpy().astype(
                np.float16 if q == Q.F16 else np.float32))
        else:  # raw bytes: raw_shape is the byte shape, the writer derives ggml's
            w = random_weight(q, n, k, seed=i).numpy()
            writer.add_tensor(name, w, raw_shape=w.shape, raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ValidGGUF(path.read_bytes(), int(GGUFReader(str(path)).tensors[0].data_offset), folder)


@st.composite
def damage(draw, size: int, data_offset: int):
    """Mostly one, at times two or three edits of a file of `size` bytes: a byte set, a u64 field
    overwritten (counts, lengths, dims and offsets are u64), bytes inserted or deleted (everything
    after shifts), the file cut short. Half of the positions fall in the header and tables, where
    damage moves things; the other half in the tensors' data, which then mostly loads (damaged
    values are still values) and must hold what gguf reads."""
    edits = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["set", "set", "u64", "insert", "delete", "cut"]))
        at = draw(st.one_of(st.integers(0, data_offset - 1), st.integers(data_offset, size - 1)))
        if kind == "set":
            arg = draw(st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])))
        elif kind == "u64":
            arg = draw(st.one_of(st.sampled_from([0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]),
                                 st.integers(0, 2**64 - 1)))
        elif kind == "insert":
            arg = draw(st.binary(min_size=1, max_size=8))
        else:
            arg = draw(st.integers(1, 8))
        edits.append((kind, at, arg))
    return edits


def damaged(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, at, arg in edits:
        at = min(at, len(buf))
        if kind == "set" and at < len(buf):
            buf[at] = arg
        elif kind == "u64":
            buf[at:at + 8] = arg.to_bytes(8, "little")
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at:at + arg]
        elif kind == "cut":
            del buf[at:]
    return bytes(buf)


def assert_holds_what_gguf_reads(path, cache, device, rows) -> None:
    """The cache holds the tensors gguf.GGUFReader reads from the file, byte for byte (on meta: of
    their sizes); every quantized one dequantizes (torchext.dequantize, on its device) as gguf does,
    and multiplies `rows` activation rows (cache.matmul; test_matmul.rows_of_case) as the oracle says."""
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    assert list(cache) == list(tensors)
    for name, e in cache.items():
        t = tensors[name]
        raw = np.array(t.data)  # a copy: the reader's mapping goes with it
        assert e.tensor.device.type == device
        if e.quantized:
            assert (int(e.qtype), e.k, e.n) == (int(t.tensor_type), int(t.shape[0]), math.prod(map(int, t.shape[1:])))
            m = rows_of_case(rows, e.qtype, device)
        if device == "meta":
            assert e.tensor.numel() * e.tensor.element_size() == raw.nbytes, name
            if e.quantized:
                check_meta(cache.matmul(name, torch.empty(m, e.k, device="meta")), (m, e.n), torch.float32)
            continue
        got = e.tensor.cpu()
        if e.quantized:
            assert np.array_equal(got.numpy().reshape(-1), raw.reshape(-1).view(np.uint8)), name
            W = weight_oracle(got, e.qtype, e.n, e.k)
            y = torchext.dequantize(e.tensor, e.qtype, e.n, e.k)
            assert same_bits(y.cpu(), torch.from_numpy(W)), name
            x = gaussian((m, e.k), m).float().to(device)
            check_matmul(cache.matmul(name, x), x, W.astype(np.float64), torch.float32, m <= gemv_rows(e.qtype, device))
        else:
            assert got.numpy().tobytes() == raw.tobytes(), name


_damaged_files = itertools.count()


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(200)
@given(data=st.data())
def test_damaged_gguf(device, data, valid_gguf):
    """WeightCache.from_gguf: a ValueError that names the file, or the tensors gguf reads."""
    draw = data.draw
    path = valid_gguf.folder / f"damaged{next(_damaged_files)}.gguf"  # fresh: a reader may still map the last
    path.write_bytes(damaged(valid_gguf.data, draw(damage(len(valid_gguf.data), valid_gguf.data_offset))))
    device = draw(st.sampled_from([device] * 3 + ["meta"]))
    kwargs = {"pool": draw(st.booleans()), "device": device}
    if draw(st.sampled_from([False] * 4 + [True])):
        # the caller's reader maps the file, which then shrinks: the loader must not touch the mapping
        try:
            kwargs["reader"] = GGUFReader(str(path))
        except Exception:  # noqa: BLE001  (gguf's reader fails on damaged files in many ways: no reader then)
            pass
        os.truncate(path, draw(st.integers(0, path.stat().st_size)))
    try:
        cache = torchext.WeightCache.from_gguf(path, **kwargs)
    except ValueError as e:
        assert str(e).startswith(f"{path}: "), f"the error does not name the file: {e}"
        event("raised")
    else:
        event("loaded")
        assert_holds_what_gguf_reads(path, cache, device, draw(st.sampled_from([1, 3, PAST_GEMV])))
    path.unlink()
