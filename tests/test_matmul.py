"""qmatmul, q4k_gemv / q5k_gemv / q6k_gemv and q4k_q8_gemv(_packed) against the oracle
x @ dequant_oracle(w).T in float64 (gguf.quants.dequantize for the weights).

Tolerances, and why (absref = |x| @ |W|.T, the sum of the magnitudes of an output's terms):
- exact activations (conftest.exact_activations: every 32-block lossless in Q8_1, so the DP4A
  path sees the true x): what is left is fp32 accumulation, measured |err| <= 4e-8 * absref;
  we allow 1e-5 * absref, still far below what one wrong scale, nibble or block would cost
  (that is the size of a whole term, ~1/K of absref or more). The dense path (beyond the GEMV's rows)
  on CPU is an fp32 GEMM of exact values: the same bound.
- Q8_1-rounded activations (the GEMV path, up to 16 rows on CUDA, the format's limit on the CPU:
  conftest.gemv_rows): each activation becomes x^ = d * q with
  |x - x^| <= d / 2, d its 32-value block's scale (kernels/blocks.h); the kernels then compute
  x^ @ W.T exactly up to fp32 accumulation, every weight block's offset meeting d * sum(q), the
  rounded inputs. So each output's error is at most sum_b (d_b / 2) * sum_{i in b} |W_i| (the
  activation bound, computed from the oracle's d) plus 1e-5 * (absref + that bound) for fp32
  accumulation. No statistical slack: the bound holds for every output, every input.
- f16/bf16 outputs add one rounding of the fp32 result: half an ulp relative to |y|
  (conftest.half_ulp: 2^-11, 2^-8), plus float16's absolute 2^-25 below its normal range.
- CUDA's dense path in f16/bf16 dequantizes the weight to that dtype (one more rounding of
  every weight: half_ulp * absref) and cuBLAS may reduce in that dtype (another half_ulp *
  absref): 2 * half_ulp * absref more. The tiled GEMM that serves 17 to 64 rows there (to 256 on
  compute capability 9.0, tests/test_qgemm.py says for which weights) computes
  each bf16 weight value d * q + m in bf16 unless exact=True (two roundings of |d q| + |m|,
  tests/test_qgemm.py): conftest.half_weight_rounding bounds both, with the weights' offsets m
  from conftest.offset_oracle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchext
from conftest import (
    DEVICES,
    DTYPES,
    K_QUANTS,
    Q,
    QUANTIZABLE_QTYPES,
    SHAPE_MATRIX_QTYPES,
    WEIGHT_QTYPES,
    cached_offsets,
    cached_weight,
    dequant_oracle,
    exact_activations,
    gaussian_activations,
    gemv_rows,
    half_ulp,
    half_weight_rounding,
    offset_oracle,
    q8_1_fields,
    q8_1_reference,
    q8_1_row_bytes,
    qtype_name,
    random_weight,
    requires_cuda,
    row_bytes,
    tiny,
)
from torchext.formats import QType, block_values

# kernels/batch_policy.h: the Q8_1 GEMVs (DP4A or int8 MMA) serve up to 16 rows on CUDA (the CPU's
# limit is the format's: conftest.gemv_rows), or up to 8 where the tiled GEMM runs (CUDA, fp16/bf16, K
# a multiple of 8, aligned operands: every GPU these tests run on is sm_80 or newer), and up to 4 there
# for the 32- and 64-value formats on weights of 2^23 values or more, and 1 for Q4_K, Q5_K and Q6_K on
# weights of 2^25 values or more where the register-fragment wgmma kernel takes them (compute capability
# 9.0, a build with its sm_90a code, rows a multiple of 16 bytes); more rows are unrounded.
MAX_GEMV_ROWS = 16
TILED_GEMM_MIN_ROWS = 9
TILED_GEMM_MIN_ROWS_SMALL_BLOCKS = 5
LARGE_WEIGHT_VALUES = 1 << 23
REGISTER_KERNEL_QTYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
REGISTER_KERNEL_MIN_ROWS_LARGE_WEIGHT, REGISTER_KERNEL_EARLY_VALUES = 2, 1 << 25


def runs_register_kernel(device, qtype, k) -> bool:
    """Whether the register-fragment wgmma kernel takes qtype's rows of k values on device (CUDA):
    compute capability 9.0, torchext built for it (torchext/_build_info.py, which setup.py writes), and
    rows a multiple of 16 bytes (its copies by the tensor memory accelerator)."""
    try:
        from torchext import _build_info
        built = "sm_90" in _build_info.CUDA_TARGETS
    except ImportError:
        built = False
    return (built and torch.cuda.get_device_capability(torch.device(device)) == (9, 0)
            and Q(int(qtype)) in REGISTER_KERNEL_QTYPES and row_bytes(qtype, k) % 16 == 0)


def takes_gemv(rows, device, dtype, n, k, qtype, aligned=True) -> bool:
    """Whether qmatmul sends `rows` rows of dtype on device through the Q8_1 GEMV (n x k weight of
    format qtype); aligned: x and w start on 16-byte boundaries (the tiled GEMM copies both in 16-byte
    pieces)."""
    if not (aligned and torch.device(device).type == "cuda" and dtype != torch.float32 and k % 8 == 0):
        return rows <= gemv_rows(qtype, device)
    if n * k >= REGISTER_KERNEL_EARLY_VALUES and runs_register_kernel(device, qtype, k):
        return rows < REGISTER_KERNEL_MIN_ROWS_LARGE_WEIGHT
    if block_values(qtype) < 256 and n * k >= LARGE_WEIGHT_VALUES:
        return rows < TILED_GEMM_MIN_ROWS_SMALL_BLOCKS
    return rows < TILED_GEMM_MIN_ROWS

# Row counts the policy names: the most rows the GEMV takes where no tiled GEMM runs, and one more.
LAST_GEMV, PAST_GEMV = "last-gemv", "past-gemv"


def rows_of_case(rows, qtype, device) -> int:
    """A parametrized row count: an int as it is, LAST_GEMV and PAST_GEMV from conftest.gemv_rows."""
    if rows in (LAST_GEMV, PAST_GEMV):
        return gemv_rows(qtype, device) + (rows == PAST_GEMV)
    return rows


NAMED_OPS = {Q.Q4_K: torchext.q4k_gemv, Q.Q5_K: torchext.q5k_gemv, Q.Q6_K: torchext.q6k_gemv}

# (k, n): for the k-quants K in {256, 4096, 2880, 11008 + 128} and a padded 300; N in {1, 7, 4096},
# 4096 only with a small K (a 2-core CPU). 32- and 64-value formats: K of 1, 19 and 20 blocks (32, 608
# and 640 values a row for the 32-value ones: 1 and 19 give MXFP4's 17-byte blocks rows of odd length)
# and 4096. The formats outside SHAPE_MATRIX_QTYPES take the padded and multi-block shapes only
# (conftest says why).
KQ_SHAPES = [(256, 1), (256, 4096), (300, 7), (4096, 7), (2880, 7), (11008 + 128, 1)]
KQ_SHAPES_PART = [(300, 7), (2880, 7)]


def shapes_of(q):
    full = q in SHAPE_MATRIX_QTYPES
    if q in K_QUANTS:
        return KQ_SHAPES if full else KQ_SHAPES_PART
    values = block_values(q)
    return [(values, 7), (19 * values, 1), (20 * values, 4096), (4096, 7)] if full else [(values, 7), (4096, 7)]


SHAPE_CASES = [(q, k, n) for q in WEIGHT_QTYPES for k, n in shapes_of(q)]


def case_id(case):
    q, k, n = case
    return f"{qtype_name(q)}-k{k}-n{n}"


# ---- running the op and the oracle -------------------------------------------------------------

def same_bits(a, b) -> bool:
    """Bitwise equality (NaN == NaN when the bits agree), shape and dtype included."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def run_matmul(w, qtype, x, n, k):
    """qmatmul, and for a k-quant also its named op, which must return the very same bits."""
    y = torchext.qmatmul(w, qtype, x, n, k)
    if Q(int(qtype)) in NAMED_OPS:
        assert same_bits(NAMED_OPS[Q(int(qtype))](w, x, n, k), y)
    assert y.shape == x.shape[:-1] + (n,)
    assert y.dtype == x.dtype and y.device == x.device
    return y


def oracle(x, W):
    """(ref, absref, xabs) in float64 with x's leading shape: x @ W.T, |x| @ |W|.T and the
    row sums of |x| (x as the op sees it, i.e. after rounding to its dtype)."""
    k = W.shape[1]
    x64 = x.detach().double().cpu().numpy().reshape(-1, k)
    shape = tuple(x.shape[:-1]) + (W.shape[0],)
    ref = (x64 @ W.T).reshape(shape)
    absref = (np.abs(x64) @ np.abs(W).T).reshape(shape)
    xabs = np.abs(x64).sum(1).reshape(tuple(x.shape[:-1]) + (1,))
    return ref, absref, xabs


def offsets_term(x, M):
    """|x| @ M.T with x's leading shape (0 without offsets M)."""
    if M is None:
        return 0.0
    x64 = np.abs(x.detach().double().cpu().numpy().reshape(-1, M.shape[1]))
    return (x64 @ M.T).reshape(tuple(x.shape[:-1]) + (M.shape[0],))


def rows_of(x) -> int:
    return math.prod(x.shape[:-1])


def output_rounding(y, ref, absref, xabs, rel_abs, offabs=0.0, *, gemv):
    """Tolerance terms that do not depend on the activations: the op's own error bound
    rel_abs * absref carried through one rounding to y's dtype, and where y is not a GEMV's result
    (gemv false) on CUDA in f16/bf16 the weights computed in that dtype
    (conftest.half_weight_rounding; offabs = |x| @ |m|.T, needed for the formats with offsets)."""
    u = half_ulp(y.dtype) if y.dtype != torch.float32 else 0.0
    tol = rel_abs * absref * (1 + u) + u * np.abs(ref) + (tiny(y.dtype) if u else 0.0)
    if y.device.type == "cuda" and y.dtype != torch.float32 and not gemv:
        tol = tol + half_weight_rounding(y.dtype, absref, offabs, xabs)
    return tol


def report(err, tol, absref):
    i = np.unravel_index(np.argmax(err / np.maximum(tol, 1e-300)), err.shape)
    return f"worst output {tuple(int(j) for j in i)}: |err| {err[i]:.3e} > tol {tol[i]:.3e} (absref {absref[i]:.3e})"


def assert_exact_close(y, x, W, qtype, M=None, exact=False):
    """The tight check for exact activations: |y - ref| <= 1e-5 * absref (+ output rounding; W: the
    dense weight of format qtype; M: the weights' offsets, conftest.offset_oracle; exact: y is from
    qmatmul(exact=True))."""
    ref, absref, xabs = oracle(x, W)
    y64 = y.detach().double().cpu().numpy()
    err = np.abs(y64 - ref)
    gemv = not exact and takes_gemv(rows_of(y), y.device, y.dtype, *W.shape, qtype)
    tol = output_rounding(y, ref, absref, xabs, 1e-5, offsets_term(x, M), gemv=gemv)
    assert np.isfinite(y64).all()
    assert (err <= tol).all(), report(err, tol, absref)


def q8_1_bound(x, W):
    """sum_b (d_b / 2) * sum_{i in b} |W_i| per output: the largest error Q8_1 rounding of x can
    cause (d_b from the numpy oracle of quantize_q8_1, per 32-value block of each row)."""
    k = W.shape[1]
    x32 = x.detach().float().cpu().numpy().reshape(-1, k)
    d = q8_1_fields(q8_1_reference(x32)).d.astype(np.float64)  # [rows, blocks]
    half_d = np.repeat(d, 32, axis=1)[:, :k] / 2
    return (half_d @ np.abs(W).T).reshape(tuple(x.shape[:-1]) + (W.shape[0],))


def assert_gaussian_close(y, x, W):
    """Q8_1-rounded activations (the GEMV path): within the rounding bound of every output."""
    ref, absref, xabs = oracle(x, W)
    bound = q8_1_bound(x, W)
    y64 = y.detach().double().cpu().numpy()
    err = np.abs(y64 - ref)
    u = half_ulp(y.dtype) if y.dtype != torch.float32 else 0.0
    tol = output_rounding(y, ref, absref, xabs, 1e-5, gemv=True) + bound * (1 + 1e-5) * (1 + u)
    assert np.isfinite(y64).all()
    assert (err <= tol).all(), report(err, tol, absref)


# ---- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [3, 12, PAST_GEMV], ids=str)
@pytest.mark.parametrize("case", SHAPE_CASES, ids=case_id)
def test_exact_activations(case, rows, dtype, device):
    qtype, k, n = case
    rows = rows_of_case(rows, qtype, device)
    w, W = cached_weight(qtype, n, k)
    x = exact_activations((rows, k), seed=k + n + rows).to(dtype)
    y = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
    assert_exact_close(y, x, W, qtype, cached_offsets(qtype, n, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 6, 16, 24, LAST_GEMV, PAST_GEMV], ids=str)
@pytest.mark.parametrize("case", SHAPE_CASES, ids=case_id)
def test_gaussian_activations(case, rows, dtype, device):
    qtype, k, n = case
    rows = rows_of_case(rows, qtype, device)
    w, W = cached_weight(qtype, n, k)
    x = gaussian_activations((rows, k), seed=k + n + rows).to(dtype)
    y = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
    if not takes_gemv(rows, device, dtype, n, k, qtype):  # unrounded activations
        assert_exact_close(y, x, W, qtype, cached_offsets(qtype, n, k))
    else:
        assert_gaussian_close(y, x, W)


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q8_0], ids=qtype_name)
def test_dense_path_in_several_passes(qtype):
    """The CPU's dense path dequantizes tiles of max(128, 2^19 / k) weight rows, each thread every
    workers-th tile into its own buffer (csrc/ops_cpu.cpp, ops.h): n = 4 whole tiles and a partial
    one at k = 256 (2048 rows a tile), every output column from its own tile, against the oracle,
    on one thread and on two."""
    k, n = 256, 4 * 2048 + 77
    w, W = cached_weight(qtype, n, k)
    x = exact_activations((gemv_rows(qtype) + 1, k), seed=3)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert_exact_close(run_matmul(w, int(qtype), x, n, k), x, W, qtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_dense_path_threads_keep_the_callers_modes(mode):
    """The dense path's worker threads carry none of the caller's inference or grad mode: ops on the
    caller's tensors there once failed under inference_mode ("Inplace update to inference tensor
    outside InferenceMode") and, under no_grad, gave an output that requires grad when x did (a later
    in-place op on it then failed). Two threads, three tiles of 2048 rows at k = 256; the same bits
    as in grad mode."""
    k, n = 256, 2 * 2048 + 77
    w, _ = cached_weight(QType.Q8_0, n, k)
    x = exact_activations((gemv_rows(QType.Q8_0) + 1, k), seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = run_matmul(w, int(QType.Q8_0), x, n, k)
        with getattr(torch, mode)():
            got = run_matmul(w, int(QType.Q8_0), x.detach().requires_grad_(mode == "no_grad"), n, k)
            assert not got.requires_grad
            got.add_(0.0)  # an in-place op on the output works in the mode it was made in
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_exact_argument_never_rounds_activations(qtype, rows, dtype, device):
    """exact=True at GEMV-sized batches: Gaussian activations (which Q8_1 would round by far more
    than fp32 error) meet the exact bound: the dense path's fp32 error on the CPU; on CUDA for
    f16/bf16 the weights' rounding to that dtype (the tiled GEMM or the dense path, 2 half-ulps:
    output_rounding's term for the paths other than the GEMVs, at any row count)."""
    k, n = (512, 40) if qtype in K_QUANTS else (3 * block_values(qtype), 40)
    w, W = cached_weight(qtype, n, k)
    x = gaussian_activations((rows, k), seed=rows + 3).to(dtype)
    y = torchext.qmatmul(w.to(device), int(qtype), x.to(device), n, k, exact=True)
    assert y.shape == (rows, n) and y.dtype == dtype
    ref, absref, xabs = oracle(x, W)
    tol = output_rounding(y, ref, absref, xabs, 1e-5, gemv=False)
    err = np.abs(y.double().cpu().numpy() - ref)
    assert (err <= tol).all(), report(err, tol, absref)
    layer = torchext.nn.QuantLinear(w.to(device), qtype, k, n, exact=True)
    assert torch.equal(layer(x.to(device)), y) and "exact=True" in repr(layer)


# a moderate shape per format for the batch-shape tests: K padded for the k-quants, 3 blocks for the others
ROW_SHAPES = {q: (556 if q in K_QUANTS else 3 * block_values(q)) for q in WEIGHT_QTYPES}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lead",
    [(), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (9,), (15,), (16,), (17,), (2, 3), (1, 1, 8), (3, 3),
     (4, 5), LAST_GEMV, PAST_GEMV],
    ids=lambda s: s if isinstance(s, str) else "x".join(map(str, s)) or "1d",
)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_rows_and_batch_dims(qtype, lead, device):
    """Rows 1..9, 15 and 16 (the GEMV: on CUDA one row DP4A, more int8 MMA, 8 and 16 rows per
    launch; on the CPU as far as the format's limit), 17, [4, 5, k] and the CPU's limit and one more
    (the GEMV or the dense path), leading dims [2, 3, k], [3, 3, k] and a 1-D x [k] -> [n]; every row
    must be right, so a wrong row stride shows."""
    if isinstance(lead, str):
        lead = (rows_of_case(lead, qtype, device),)
    k, n = ROW_SHAPES[qtype], 7
    w, W = cached_weight(qtype, n, k)
    x = exact_activations(lead + (k,), seed=len(lead) * 31 + sum(lead))
    y = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
    assert y.shape == lead + (n,)
    assert_exact_close(y, x, W, qtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
@pytest.mark.parametrize("shape", [(0, 0), (2, 0, 0), (0, 3, 0)], ids=["0xk", "2x0xk", "0x3xk"])
def test_empty_batch(shape, qtype, dtype, device):
    k, n = ROW_SHAPES[qtype], 5
    x = torch.empty(shape[:-1] + (k,), dtype=dtype, device=device)
    w = random_weight(qtype, n, k, device)
    y = run_matmul(w, int(qtype), x, n, k)
    assert y.shape == shape[:-1] + (n,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [torchext.q4k_q8_gemv, torchext.q4k_q8_gemv_packed])
def test_q8_gemv_empty_batch(op, device):
    w = random_weight(Q.Q4_K, 5, 300, device)
    for lead in [(0,), (2, 0)]:
        xq = torch.empty(lead + (q8_1_row_bytes(300),), dtype=torch.uint8, device=device)
        y = op(w, xq, 5, 300)
        assert y.shape == lead + (5,) and y.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [768, 300])
@pytest.mark.parametrize("rows", [1, 9, PAST_GEMV], ids=str)
def test_q6_k_2_byte_aligned_rows(k, rows, device):
    """Q6_K rows of an odd number of 210-byte blocks start 2 (mod 4) bytes apart, and the whole
    weight may start 2 bytes into its storage: kernels must not read rows as 32-bit words."""
    n, rows = 7, rows_of_case(rows, Q.Q6_K, device)
    w, W = cached_weight(Q.Q6_K, n, k)
    buf = torch.zeros(w.numel() + 2, dtype=torch.uint8, device=device)
    buf[2:] = w.reshape(-1).to(device)
    x = exact_activations((rows, k), seed=rows).to(device)
    assert_exact_close(torchext.q6k_gemv(buf[2:], x, n, k), x, W, Q.Q6_K)
    assert_exact_close(torchext.qmatmul(buf[2:], int(Q.Q6_K), x, n, k), x, W, Q.Q6_K)


# ---- activations of any finite magnitude ------------------------------------------------------

MAGNITUDES = {torch.float32: [-30, -20, -10, -3, 0, 4, 10, 20, 30],
              torch.bfloat16: [-37, -30, -10, 0, 4, 10, 30, 34]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 4, 16, LAST_GEMV, PAST_GEMV], ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
@pytest.mark.parametrize("dtype", list(MAGNITUDES), ids=str)
def test_any_finite_magnitude(dtype, qtype, rows, device):
    """Gaussian activations scaled by 10^e, for f32 from 1e-30 to 1e30 and bf16 from 1e-37 to
    1e34 (the largest where |x| @ |W|.T stays inside fp32 for these weights): finite outputs within
    the Q8_1 bound on the GEMV path and fp32 error on the dense one. ggml's fp16 Q8_1 scales gave
    NaN from |x| ~ 1e4 (the block sum overflowed) and zeros below ~1e-5. From 1e-37 the blocks'
    d is an fp32 subnormal: coarser, still inside the bound (computed from that d)."""
    k, n = (512, 16) if qtype in K_QUANTS else (128, 16)
    rows = rows_of_case(rows, qtype, device)
    w, W = cached_weight(qtype, n, k)
    for e in MAGNITUDES[dtype]:
        x = (gaussian_activations((rows, k), seed=e + 50) * 10.0**e).to(dtype)
        y = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
        # fp32 products below its normal range round to multiples of 2^-149: one per term
        assert_finite_within_bound(y, x, W, cached_offsets(qtype, n, k), qtype, device, f"1e{e}: ",
                                   subnormal_terms=2 * k)


def assert_finite_within_bound(y, x, W, M, qtype, device, what="", subnormal_terms=0):
    """y = qmatmul(x) finite and within the Q8_1 bound where the GEMVs served x's rows (fp32 error on
    the unrounded paths), plus subnormal_terms multiples of 2^-149; M: the weights' offsets."""
    rows, k = x.reshape(-1, x.shape[-1]).shape
    n = W.shape[0]
    ref, absref, xabs = oracle(x, W)
    y64 = y.double().cpu().numpy()
    assert np.isfinite(y64).all(), f"{what}non-finite outputs"
    gemv = takes_gemv(rows, device, x.dtype, n, k, qtype)
    bound = q8_1_bound(x, W) if gemv else 0.0
    u = half_ulp(x.dtype) if x.dtype != torch.float32 else 0.0
    offabs = offsets_term(x, M)
    tol = (output_rounding(y, ref, absref, xabs, 1e-5, offabs, gemv=gemv) + bound * (1 + 1e-5) * (1 + u)
           + subnormal_terms * 2.0**-149)
    err = np.abs(y64 - ref)
    assert (err <= tol).all(), what + report(err, tol, absref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 4, LAST_GEMV, PAST_GEMV], ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_sums_past_fp32(dtype, qtype, rows, device):
    """One 32-value block of each row holds same-signed values of 1.1e37 to 1.5e37 (the rest Gaussian):
    the block's sum, 32 of them, passes fp32's largest value, while the outputs stay finite (weights of
    small scales: under 16 in |W| summed over any 32 values). The GEMVs met a weight's offset with d *
    sum(qs) itself and gave inf or NaN there (NaN also for formats without an offset on the CPU's AVX
    kernels, 0 * inf); kernels/q8_1_rows.h scales that sum down by 2^7. Within the bound of
    test_any_finite_magnitude, every row on the GEMVs (1 to the last GEMV row, by DP4A or, on CUDA in
    float32, the int8 MMA kernel) and beyond."""
    k, n = ROW_SHAPES[qtype], 7
    rows = rows_of_case(rows, qtype, device)
    w = random_weight(qtype, n, k, scale=1e-4)
    W = dequant_oracle(w, qtype, n, k)
    blocks = k // 32
    assert np.abs(W[:, :32 * blocks]).reshape(n, blocks, 32).sum(-1).max() < 16  # outputs below 2.4e38
    x = gaussian_activations((rows, k), seed=rows)
    rng = np.random.default_rng(rows)
    for r in range(rows):
        b, sign = r % blocks, (-1.0) ** r
        x[r, 32 * b:32 * b + 32] = torch.from_numpy(sign * rng.uniform(1.1e37, 1.5e37, 32))
    x = x.to(dtype)
    y = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
    assert_finite_within_bound(y, x, W, offset_oracle(w, qtype, n, k), qtype, device)


# ---- the batch policy, pinned by behaviour ------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_batch_policy_boundary(qtype, device):
    """float32 activations (no tiled GEMM): at the GEMV's last row (16 on CUDA, the format's on the CPU)
    the result carries Q8_1 activation rounding (differs from the dense result by far more than fp32
    error on Gaussian data); one row more it is the dense fp32 GEMM on the exact weights, within fp32
    error of float64."""
    k, n, m = 1024, 64, gemv_rows(qtype, device)
    w, W = cached_weight(qtype, n, k)
    x = gaussian_activations((m + 1, k), seed=3)
    y_gemv = run_matmul(w.to(device), int(qtype), x[:m].to(device), n, k)
    y_dense = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
    ref, absref, _ = oracle(x, W)
    err_gemv = np.abs(y_gemv.double().cpu().numpy() - ref[:m]) / absref[:m]
    err_dense = np.abs(y_dense.double().cpu().numpy() - ref) / absref
    assert err_dense.max() <= 1e-5, f"{m + 1} rows: {err_dense.max():.2e} is not fp32 GEMM error"
    # Q8_1 rounding: typical per-output error/absref ~1e-3 (median), never near 1e-5
    assert np.median(err_gemv) > 1e-4, f"{m} rows: median {np.median(err_gemv):.2e} shows no Q8_1 rounding"
    assert_gaussian_close(y_gemv, x[:m], W)
    # the first m rows of the dense result differ from the GEMV result accordingly
    diff = np.abs(y_dense[:m].double().cpu().numpy() - y_gemv.double().cpu().numpy()) / absref[:m]
    assert np.median(diff) > 1e-4


# ---- non-finite activations ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_non_finite_activations_dp4a(qtype, dtype, device):
    """A NaN or inf in row r marks its Q8_1 block (d = NaN), so exactly the outputs of row r are
    NaN; the other rows are bit-for-bit what they are without it (rows are independent). 4 rows, as
    far as every format's GEMV goes (conftest.gemv_rows)."""
    k, n, rows = ROW_SHAPES[qtype], 7, 4
    assert rows <= gemv_rows(qtype, device)
    w, W = cached_weight(qtype, n, k)
    x = gaussian_activations((rows, k), seed=9).to(dtype)
    clean = run_matmul(w.to(device), int(qtype), x.to(device), n, k)
    x[1, k // 2] = float("nan")
    x[3, k - 1] = float("inf")
    x[3, 0] = float("-inf")
    y = run_matmul(w.to(device), int(qtype), x.to(device), n, k).cpu()
    assert torch.isnan(y[[1, 3]]).all()
    assert torch.equal(y[[0, 2]], clean.cpu()[[0, 2]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_non_finite_activations_dense(qtype, device):
    """On the dense path non-finite values propagate as through any matmul: a NaN makes its row
    NaN, an inf makes its row non-finite, other rows stay finite and correct."""
    k, n, rows = ROW_SHAPES[qtype], 7, 12
    w, W = cached_weight(qtype, n, k)
    x = exact_activations((rows, k), seed=10)
    x[1, k // 2] = float("nan")
    x[3, 5] = float("inf")
    y = run_matmul(w.to(device), int(qtype), x.to(device), n, k).cpu()
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[3]).any()
    keep = [r for r in range(rows) if r not in (1, 3)]
    assert_exact_close(y[keep], x[keep], W, qtype)


# ---- q4k_q8_gemv: the pre-quantized entry points ----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [256, 300, 2880])
@pytest.mark.parametrize("lead", [(1,), (5,), (8,), (2, 3), (16,)], ids=lambda s: "x".join(map(str, s)))
def test_q4k_q8_gemv(lead, k, device):
    """q4k_q8_gemv and q4k_q8_gemv_packed: bit-identical to each other; float32 output; exact
    against the oracle on lossless activations, for any number of rows (no dense switch here);
    and quantize_q8_1 + q4k_q8_gemv is exactly q4k_gemv's DP4A path in float32."""
    n = 7
    w, W = cached_weight(Q.Q4_K, n, k)
    w = w.to(device)
    x = exact_activations(lead + (k,), seed=k + sum(lead)).to(device)
    xq = torchext.quantize_q8_1(x)
    y = torchext.q4k_q8_gemv(w, xq, n, k)
    assert y.shape == lead + (n,) and y.dtype == torch.float32
    assert torch.equal(torchext.q4k_q8_gemv_packed(w, xq, n, k), y)
    assert_exact_close(y, x, W, Q.Q4_K)
    if math.prod(lead) <= gemv_rows(Q.Q4_K, device):
        assert torch.equal(torchext.q4k_gemv(w, x, n, k), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q4k_q8_gemv_gaussian_equals_fused(dtype, device):
    """On Gaussian data too (where Q8_1 rounds): q4k_gemv in f32 == quantize_q8_1 + q4k_q8_gemv,
    and its f16/bf16 output is that float32 result rounded once."""
    k, n = 4096, 7
    w, W = cached_weight(Q.Q4_K, n, k)
    w = w.to(device)
    x = gaussian_activations((6, k), seed=1).to(dtype).to(device)
    y32 = torchext.q4k_q8_gemv(w, torchext.quantize_q8_1(x), n, k)
    assert torch.equal(torchext.q4k_q8_gemv_packed(w, torchext.quantize_q8_1(x), n, k), y32)
    assert torch.equal(torchext.q4k_gemv(w, x, n, k), y32.to(dtype))
    assert_gaussian_close(y32, x, W)


# ---- qmatmul_q8_1: one quantize_q8_1 shared by several weights ---------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_qmatmul_q8_1_is_qmatmuls_gemv_path(qtype, dtype, device):
    """quantize_q8_1 + qmatmul_q8_1 in x's dtype is bit for bit qmatmul's GEMV path, for every
    format, 1 row to the GEMV's last (4 to 48 on the CPU, 8 or 16 on CUDA) with batch dims; float32
    (the default dtype) is that result before its one rounding; and the result is close to the
    oracle (Gaussian tolerance)."""
    n, k = 5, 512
    w, W = cached_weight(qtype, n, k)
    w = w.to(device)
    for lead in [(1,), (3,), (2, 4), (4, 4), (gemv_rows(qtype, device),)]:
        if not takes_gemv(math.prod(lead), device, dtype, n, k, qtype):
            continue
        x = gaussian_activations(lead + (k,), seed=len(lead) + lead[0]).to(dtype).to(device)
        xq = torchext.quantize_q8_1(x)
        y = torchext.qmatmul_q8_1(w, qtype, xq, n, k, dtype)
        assert y.shape == lead + (n,) and y.dtype == dtype
        assert torch.equal(y, torchext.qmatmul(w, qtype, x, n, k))
        y32 = torchext.qmatmul_q8_1(w, qtype, xq, n, k)
        assert y32.dtype == torch.float32 and torch.equal(y32.to(dtype), y)
        assert_gaussian_close(y32, x, W)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype, n, k", [(Q.Q4_K, 6, 256), (Q.Q4_K, 600, 256), (Q.Q4_K, 40, 300), (Q.Q8_0, 40, 256),
                                         (Q.Q8_0, 1024, 8192), (Q.NVFP4, 2047, 4096), (Q.Q4_K, 8200, 4096),
                                         (Q.Q6_K, 8200, 4096), (Q.Q4_K, 8190, 4096)]
                         + [(q, 40, ROW_SHAPES[q]) for q in WEIGHT_QTYPES],
                         ids=["Q4_K-narrow", "Q4_K-wide", "Q4_K-k300", "Q8_0-small", "Q8_0-2^23", "NVFP4-under-2^23",
                              "Q4_K-2^25", "Q6_K-2^25", "Q4_K-under-2^25"]
                         + [qtype_name(q) for q in WEIGHT_QTYPES])
def test_gemv_max_rows_is_the_policy(qtype, n, k, dtype, device):
    """torchext.ops.gemv_max_rows (what nn.shared_input uses) is where qmatmul switches paths: at
    that many rows qmatmul equals the Q8_1 GEMV bit for bit, within the GEMV's bound; one more row
    leaves the activations unrounded (the tiled GEMM or the dense path). This module's takes_gemv says
    the same: for f16/bf16 on CUDA with K a multiple of 8, 4 rows for a 32- or 64-value format on a
    weight of 2^23 values or more (1024 x 8192; 2047 x 4096 is one row short of it), 1 for Q4_K, Q5_K
    and Q6_K on one of 2^25 or more where the register-fragment wgmma kernel runs (8200 x 4096; 8190 x
    4096 is 8 rows short), else 8; otherwise 16 on CUDA and on the CPU the format's CPU_GEMV_MAX_ROWS,
    every format's checked here (the catalog's CPU GEMV rows in kernels/blocks.h)."""
    if torch.device(device).type == "cpu" and n * k >= 1 << 24:
        pytest.skip("the CPU's GEMV rows do not follow the weight's size: the other cases check them")
    assert torchext.ops.GEMV_MAX_ROWS == MAX_GEMV_ROWS
    w, W = cached_weight(qtype, n, k)
    w = w.to(device)
    last = torchext.ops.gemv_max_rows(torch.empty(0, k, dtype=dtype, device=device), n, qtype)
    assert takes_gemv(last, device, dtype, n, k, qtype) and not takes_gemv(last + 1, device, dtype, n, k, qtype)
    if torch.device(device).type == "cpu":
        assert last == gemv_rows(qtype)  # qmatmul_id's limit too
    for rows in (last, last + 1):
        x = gaussian_activations((rows, k), seed=rows).to(dtype).to(device)
        gemv = torchext.qmatmul_q8_1(w, qtype, torchext.quantize_q8_1(x), n, k, dtype)
        y = torchext.qmatmul(w, qtype, x, n, k)
        assert torch.equal(y, gemv) == (rows == last), rows
        if rows > last:
            assert_exact_close(y, x.cpu(), W, qtype, cached_offsets(qtype, n, k))
        else:
            assert_gaussian_close(y, x.cpu(), W)


def test_gemv_max_rows_refuses_what_is_no_activations():
    """A scalar x was an IndexError from its shape, a list an AttributeError."""
    with pytest.raises(ValueError, match=r"x: expected at least one dimension \[\.\.\., K\], got a scalar"):
        torchext.ops.gemv_max_rows(torch.tensor(1.0), 8, "Q4_K")
    with pytest.raises(TypeError, match="x: expected a tensor of activations .*, got list"):
        torchext.ops.gemv_max_rows([1.0, 2.0], 8, "Q4_K")


# ---- weights from torchext.quantize (once it exists) --------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [q for q in K_QUANTS if q in QUANTIZABLE_QTYPES], ids=qtype_name)
def test_quantizer_weights(qtype, device):
    n, k = 16, 512
    dense = gaussian_activations((n, k), seed=4) * 0.05
    try:
        w = torchext.quantize(dense, int(qtype))
    except RuntimeError as e:
        if "not yet implemented" in str(e):
            pytest.skip("torchext.quantize is not implemented yet")
        raise
    W = dequant_oracle(w, qtype, n, k)
    for rows in (2, gemv_rows(qtype, device) + 1):
        x = exact_activations((rows, k), seed=rows)
        assert_exact_close(run_matmul(w.to(device), int(qtype), x.to(device), n, k), x, W, qtype)


# ---- property test --------------------------------------------------------------------------

@st.composite
def matmul_cases(draw):
    qtype = draw(st.sampled_from(WEIGHT_QTYPES))
    n = draw(st.integers(1, 16))
    if qtype in K_QUANTS:
        k = draw(st.integers(1, 1200))
    else:
        k = block_values(qtype) * draw(st.integers(1, 1200 // block_values(qtype)))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**20))
    return qtype, n, k, lead, dtype, seed


@settings(max_examples=40, deadline=None)
@given(matmul_cases())
def test_qmatmul_property(case):
    """Any format, N, K valid for the format, 0..2 leading dims of size 0..5 (0 to 25 rows: both
    paths and empty batches), any dtype: qmatmul on CPU within the Gaussian tolerance."""
    qtype, n, k, lead, dtype, seed = case
    w = random_weight(qtype, n, k, "cpu", seed)
    x = gaussian_activations(lead + (k,), seed).to(dtype)
    y = run_matmul(w, int(qtype), x, n, k)
    assert y.shape == lead + (n,)
    if y.numel():
        assert_gaussian_close(y, x, dequant_oracle(w, qtype, n, k))


# ---- CPU and CUDA agree --------------------------------------------------------------------------

def assert_cpu_cuda_close(y_cpu, y_cuda, absref):
    """Same integer dot products, different fp32 summation order: within 1e-6 * absref, plus one
    ulp of the output dtype (2 * half_ulp * |y|) where the two fp32 values round differently."""
    a = y_cpu.double().numpy()
    b = y_cuda.cpu().double().numpy()
    u = half_ulp(y_cpu.dtype) if y_cpu.dtype != torch.float32 else 0.0
    tol = 1e-6 * absref + 2 * u * np.abs(a) + (2 * tiny(y_cpu.dtype) if u else 0.0)
    err = np.abs(a - b)
    assert (err <= tol).all(), report(err, tol, absref)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("case", SHAPE_CASES, ids=case_id)
def test_cpu_and_cuda_agree_dp4a(case, rows, dtype):
    """The GEMVs on both devices, called as such (the CPU's GEMV limit is the format's, as low as 4
    rows); qmatmul on CUDA gives the same bits, as it takes its GEMV at these rows."""
    qtype, k, n = case
    w, W = cached_weight(qtype, n, k)
    x = gaussian_activations((rows, k), seed=k + rows).to(dtype)
    xq = torchext.quantize_q8_1(x)
    y_cpu = torchext.ops.qmatmul_q8_1(w, int(qtype), xq, n, k, dtype)
    y_cuda = torchext.ops.qmatmul_q8_1(w.cuda(), int(qtype), xq.cuda(), n, k, dtype)
    assert takes_gemv(rows, "cuda", dtype, n, k, qtype)
    assert same_bits(run_matmul(w.cuda(), int(qtype), x.cuda(), n, k), y_cuda)
    assert_cpu_cuda_close(y_cpu, y_cuda, oracle(x, W)[1])


@requires_cuda
@pytest.mark.parametrize("case", SHAPE_CASES, ids=case_id)
def test_cpu_and_cuda_agree_dense_float32(case):
    """The dense path in float32 (exact=True: float32 has no tiled GEMM, and at 16 rows the GEMVs would
    serve): both are fp32 GEMMs of the same exact weights."""
    qtype, k, n = case
    w, W = cached_weight(qtype, n, k)
    x = gaussian_activations((16, k), seed=k)
    y_cpu = torchext.qmatmul(w, int(qtype), x, n, k, exact=True)
    y_cuda = torchext.qmatmul(w.cuda(), int(qtype), x.cuda(), n, k, exact=True)
    assert_cpu_cuda_close(y_cpu, y_cuda, oracle(x, W)[1])


@requires_cuda
@pytest.mark.parametrize("k", [256, 300, 2880])
def test_cpu_and_cuda_agree_q4k_q8_gemv(k):
    n = 7
    w, W = cached_weight(Q.Q4_K, n, k)
    x = gaussian_activations((2, 3, k), seed=k)
    xq = torchext.quantize_q8_1(x)
    assert torch.equal(torchext.quantize_q8_1(x.cuda()).cpu(), xq)
    for op in (torchext.q4k_q8_gemv, torchext.q4k_q8_gemv_packed):
        assert_cpu_cuda_close(op(w, xq, n, k), op(w.cuda(), xq.cuda(), n, k), oracle(x, W)[1])


# ---- torch.autocast ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, exact", [(1, False), (1, True), (40, False)], ids=["gemv", "exact", "dense"])
def test_autocast_does_not_reach_into_the_ops(rows, exact, device):
    """The ops compute in their inputs' dtypes inside torch.autocast too: the same bits and gradients as
    outside it. (The dense path's inner matmul once ran in autocast's bfloat16 on the calling thread and
    float32 on parallel_for's others: one float32 output of mixed precision, exact=True included.)"""
    q, n, k = QType.Q4_K, 4096, 256  # n large enough that the CPU's dense path splits it over threads
    w = random_weight(q, n, k, device, seed=rows)
    x = gaussian_activations((rows, k), seed=rows).to(device)
    results = []
    for autocast in (False, True):
        xg = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = torchext.qmatmul(w, q, xg, n, k, exact)
            z = torchext.gelu(xg)
        (y.sum() + z.sum()).backward()
        results.append((y, z, xg.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
