"""The tiled GEMM (kernels/qgemm.cu): qmatmul's path for 9 to 64 activation rows (from 5 rows for
the 32- and 64-value formats on weights of 2^23 values or more; to 16 on weights under 2^23 values)
on CUDA for fp16 and bf16 activations, and on compute capability 9.0 from 65 to 256 rows by its
wgmma kernel, for Q4_K, Q5_K and Q6_K on weights of 2^25 values or more and rows of 4096 values or
more to 512 in 256-row chunks (kernels/qgemm_wgmma.cu: the same values with the same bounds, every weight
dequantized once into x's type, in registers for Q4_K, Q5_K and Q6_K (and from 9 rows on weights of
2^22 values or more) and through shared memory for the others, and
the products summed in fp32; for weights whose rows are a multiple of 16 bytes and whose 256-value
chunk is at most 256 bytes, so not Q8_0) (kernels/batch_policy.h).

What it computes with exact=True, and so the bounds used here: every weight value exactly as
`dequantize` gives it, rounded to x's dtype (half an ulp, conftest.half_ulp: relative 2^-11 for
fp16, 2^-8 for bf16, plus fp16's absolute 2^-25 below its normal range), times the activations as
given (no rounding); the products are exact in fp32 and summed in fp32, then the sum is rounded
once to x's dtype. So for every output
    |y - x @ W.T| <= u * absref + 1e-5 * absref + u * |ref| + tiny * sum|x|
with W the float64 oracle (gguf's dequantization), absref = |x| @ |W|.T, and 1e-5 * absref a
generous allowance for fp32 summation (measured well below 1e-6). Half the tolerance of the dense
path (dequantize + cuBLAS in that dtype, test_matmul.output_rounding), which may also reduce in
the half type.

With exact=False (the default) bf16 weight values d * q + m are computed in bf16 instead: d and m
rounded to it, q exact, one fma (two roundings of |d q| + |m|, u^2 between them):
conftest.half_weight_rounding, with |d q| + |m| <= |W| + 2|m| and m from conftest.offset_oracle.
Q8_0, IQ4_NL and IQ4_XS stay exact (their quants need 8 bits), and so does fp16 (whose range would
cut the scales of small weights).

Bit-exact checks: identity rows return the dequantized weights themselves, and the K-split plan
(partial sums in an fp32 workspace, added in split order) is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchext
from conftest import (
    K_QUANTS,
    WEIGHT_QTYPES,
    Q,
    dequant_oracle,
    gaussian_activations,
    half_ulp,
    half_weight_rounding,
    offset_oracle,
    qtype_name,
    random_weight,
    requires_cuda,
    tiny,
)
from torchext.formats import block_bytes, block_values, row_bytes

pytestmark = requires_cuda
HALF_DTYPES = [torch.float16, torch.bfloat16]

# (n, k) per format family: n not a multiple of the 128-row tile; for the 32- and 64-value formats a
# k whose last 256-value chunk holds only half its blocks (640), rows of one block and of 19 (odd row
# lengths for MXFP4's 17-byte blocks: rows and chunks at odd offsets, a weight whose last bytes are an
# odd count, copied without the 16-byte cp.async); for the k-quants a k that is not a multiple of 256
# (a padded last super-block, 1000 = 3 blocks + 232 values).
# (300, 2048): a K-quant shape whose rows are a multiple of 16 bytes for every K-quant (Q6_K's 210-byte
# blocks: 8 of them), so that the wgmma kernel takes it
SHAPES = {q: [(200, 512), (77, 1000), (1100, 2304), (300, 2048)] if q in K_QUANTS else
          [(200, 512), (77, 640), (1100, 2304), (9, block_values(q)), (33, 19 * block_values(q))]
          for q in WEIGHT_QTYPES}
# These are all small weights, which the tiled GEMM serves to 16 rows only; past that also a weight of
# 2^23 values and 4 x 2048 more (n not a multiple of the tiles) whose rows are a multiple of 16 bytes in
# every format, so that the wgmma kernel takes it where it takes the format
LARGE_WEIGHT_VALUES = 1 << 23
LARGE_SHAPE = (4100, 2048)
# the 32-row tile (9, the default path's first tiled row count, and 17: partial; 32: full), the
# 64-row tile (33: partial, 64: full; on compute capability 9.0 both the register-fragment wgmma
# kernel's for Q4_K, Q5_K and Q6_K on weights of 2^23 values or more), and on compute capability 9.0
# the wgmma kernels' 128-row tile (65: their first row count, partial; 128: full) and 256-row tile
# (129: partial; 256: full); elsewhere these take the dense path (its chunks past 256 rows:
# test_chunks_are_their_rows_multiplied_alone)
ROWS = [9, 17, 32, 33, 64, 65, 128, 129, 256]


# The catalog's wgmma rows (kernels/blocks.h): past 256 rows, in 256-row chunks, on weights of 2^25
# values or more whose rows hold 3072 values or more (batch_policy.h, tiled_gemm_rows_for); 256 for
# the others.
WGMMA_MAX_ROWS = {Q.Q4_K: 512, Q.Q5_K: 512, Q.Q6_K: 512}
WGMMA_CHUNKED_VALUES, WGMMA_CHUNKED_K = 1 << 25, 3072
CHUNKED_SHAPE = (4100, 8192)  # 2^25 values and 4 x 8192 more
SHORT_CHUNKED_SHAPE = (10924, 3072)  # rows of WGMMA_CHUNKED_K values: 2^25 values and 4096 more


def takes_wgmma_gemm(qtype, k):
    """Whether the wgmma kernel (compute capability 9.0) takes this weight: it copies it by TMA (rows
    a multiple of 16 bytes, a 256-value chunk at most 256 bytes)."""
    chunk = block_bytes(qtype) * (256 // block_values(qtype))
    return torch.cuda.get_device_capability() == (9, 0) and row_bytes(qtype, k) % 16 == 0 and chunk <= 256


def takes_tiled_gemm(qtype, n, k, rows):
    """Whether qmatmul sends these rows to the tiled GEMM (kernels/batch_policy.h,
    tiled_gemm_rows_for) rather than the dense path: on weights under 2^23 values up to 16 rows; on
    larger ones up to 64, and where the wgmma kernel takes the weight up to 256, on weights of 2^25
    values or more and rows of 3072 values or more up to the format's wgmma rows."""
    if n * k < LARGE_WEIGHT_VALUES:
        return rows <= 16
    chunks = n * k >= WGMMA_CHUNKED_VALUES and k >= WGMMA_CHUNKED_K
    most = WGMMA_MAX_ROWS.get(qtype, 256) if chunks else 256
    return rows <= 64 or (takes_wgmma_gemm(qtype, k) and rows <= most)


def assert_within_dense_bound(y, x, W):
    """The dense path's bound: dequantize + cuBLAS in x's dtype, which may also reduce in it (2
    half-ulps: test_matmul.output_rounding)."""
    u = half_ulp(y.dtype)
    x64 = x.double().numpy()
    ref, absref = x64 @ W.T, np.abs(x64) @ np.abs(W).T
    xabs = np.abs(x64).sum(1, keepdims=True)
    err = np.abs(y.double().cpu().numpy() - ref)
    assert (err <= (2 * u + 1e-5) * absref + u * np.abs(ref) + tiny(y.dtype) * (xabs + 1)).all()


def assert_within_bound(y, x, W, M=None):
    """The exact path's bound, or with offsets M (exact=False) the computed weights' one."""
    x64 = x.double().cpu().numpy()
    ref = x64 @ W.T
    absref = np.abs(x64) @ np.abs(W).T
    xabs = np.abs(x64).sum(1, keepdims=True)
    u = half_ulp(y.dtype)
    if M is None:
        tol = (u + 1e-5) * absref + u * np.abs(ref) + tiny(y.dtype) * (xabs + 1)
    else:
        offabs = np.abs(x64) @ M.T
        tol = (half_weight_rounding(y.dtype, absref, offabs, xabs) + 1e-5 * (absref + 2 * offabs) + u * np.abs(ref)
               + tiny(y.dtype))
    err = np.abs(y.double().cpu().numpy() - ref)
    assert np.isfinite(err).all()
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    assert (err <= tol).all(), f"output {worst}: |err| {err[worst]:.3e} > tol {tol[worst]:.3e}"


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "computed"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_within_the_bound(qtype, rows, dtype, exact):
    for n, k in SHAPES[qtype] + ([LARGE_SHAPE] if rows > 16 else []):
        w = random_weight(qtype, n, k, seed=n + k)
        W = dequant_oracle(w, qtype, n, k)
        x = gaussian_activations((rows, k), seed=rows + k).to(dtype)
        y = torchext.qmatmul(w.cuda(), int(qtype), x.cuda(), n, k, exact=exact)
        if takes_tiled_gemm(qtype, n, k, rows):
            assert_within_bound(y, x, W, None if exact else offset_oracle(w, qtype, n, k))
        else:
            assert_within_dense_bound(y, x, W)


@pytest.mark.parametrize("qtype", list(WGMMA_MAX_ROWS), ids=qtype_name)
def test_register_kernel_32_and_64_row_tiles_within_the_bound(qtype):
    """On compute capability 9.0 the register kernel's 32-row tile serves 9-32 rows of Q4_K, Q5_K and
    Q6_K on weights of 2^22 values or more (test_within_the_bound's shapes are smaller at 9-16 rows),
    and from 2 rows on weights of 2^25 values or more, from 1 with exact=True, which never takes the GEMVs
    (8200 x 4096 at 1, 2, 4 and 8 rows; exact=False where qmatmul takes the tiled GEMM for those rows); it and the
    64-row tile run two CTAs an SM where their 128-row output tiles number the GPU's SMs or more
    (qgemm_wgmma.cu, visit_wgmma_tile: sms * 128 + 4 rows at 9-64 rows); on other GPUs the mma.sync
    tiles serve them. Within the tiled GEMM's bound either way."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = (((2052, 2048), (9, 16)), ((sms * 128 + 4, 2048), (9, 17, 32, 33, 64)), ((8200, 4096), (1, 2, 4, 8)))
    for (n, k), row_counts in shapes:
        w = random_weight(qtype, n, k, seed=n)
        W = dequant_oracle(w, qtype, n, k)
        M = offset_oracle(w, qtype, n, k)
        wc = w.cuda()
        for rows in row_counts:
            for dtype in HALF_DTYPES:
                x = gaussian_activations((rows, k), seed=rows).to(dtype)
                xc = x.cuda()
                past_gemv = rows > torchext.ops.gemv_max_rows(xc, n, qtype)
                for exact in (True, False) if past_gemv else (True,):
                    y = torchext.qmatmul(wc, int(qtype), xc, n, k, exact=exact)
                    assert takes_tiled_gemm(qtype, n, k, rows)
                    assert_within_bound(y, x, W, None if exact else M)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_default_computes_bf16_weights_in_bf16(dtype):
    """exact=False takes the computed-weight kernel in bf16 (Q4_K: its results differ from the
    exact path's somewhere on random data) and the exact one in fp16 (the same bits)."""
    qtype, n, k = Q.Q4_K, 256, 1024
    w = random_weight(qtype, n, k, "cuda", seed=4)
    x = gaussian_activations((12, k), seed=6).to(dtype).cuda()  # the tiled GEMM's rows on a small weight
    same = torch.equal(torchext.qmatmul(w, int(qtype), x, n, k), torchext.qmatmul(w, int(qtype), x, n, k, exact=True))
    assert same == (dtype == torch.float16)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_identity_rows_give_the_dequantized_weights(qtype, dtype):
    """Row i of the identity picks column i of W: each output is one product w * 1.0 summed with
    zeros, so with exact=True it must equal dequantize's value rounded to dtype exactly, for every
    weight value. A weight of 2^23 values and more, which the tiled GEMM serves past 16 rows."""
    n, k = 8200, 1024
    w = random_weight(qtype, n, k, "cuda", seed=7)
    wd = torchext.dequantize(w, int(qtype), n, k, dtype=dtype)
    for rows in (17, 40, 64, 100, 200):
        eye = torch.eye(k, dtype=dtype, device="cuda")[:rows]
        y = torchext.qmatmul(w, int(qtype), eye, n, k, exact=True)
        assert torch.equal(y, wd[:, :rows].T), f"{rows} rows"


def test_split_k_is_deterministic():
    """17 rows (and 100 and 200, the wgmma kernels' on compute capability 9.0: Q4_K's register-fragment
    one, the shared-memory one for the others) of a 1024 x 8192 weight: four to eight tiles, so K is
    split (up to 16 ways) and the partial sums meet in a workspace; repeated calls give the same bits
    and stay within the bound."""
    n, k = 1024, 8192  # 2^23 values: the tiled GEMM serves it past 16 rows
    for fmt in (WEIGHT_QTYPES[0], K_QUANTS[0], Q.Q4_K):
        w = random_weight(fmt, n, k, seed=3)
        W = dequant_oracle(w, fmt, n, k)
        for rows in (17, 100, 200):
            x = gaussian_activations((rows, k), seed=5).to(torch.bfloat16)
            wc, xc = w.cuda(), x.cuda()
            y = torchext.qmatmul(wc, int(fmt), xc, n, k)
            if takes_tiled_gemm(fmt, n, k, rows):
                assert_within_bound(y, x, W, offset_oracle(w, fmt, n, k))
            else:
                assert_within_dense_bound(y, x, W)
            for _ in range(3):
                assert torch.equal(torchext.qmatmul(wc, int(fmt), xc, n, k), y)


@pytest.mark.parametrize("shape", [CHUNKED_SHAPE, SHORT_CHUNKED_SHAPE], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "computed"])
@pytest.mark.parametrize("qtype", list(WGMMA_MAX_ROWS), ids=qtype_name)
def test_chunks_are_their_rows_multiplied_alone(qtype, exact, shape):
    """Past 256 rows, on a weight of 2^25 values or more (rows of 3072 or more), the wgmma kernel runs
    on 256-row chunks, the last one what is left (by the tiled GEMM's kernels up to 64 rows), one
    after another sharing the K-split workspace: every chunk's output rows are bit for bit those of its rows multiplied
    alone (by the tiled GEMM: with exact=False from 9 rows, fewer go to the GEMV). The rows alone are
    within the bound (test_within_the_bound); the dense path, summing in another order, gives other bits."""
    n, k = shape
    if not takes_wgmma_gemm(qtype, k):
        pytest.skip("the wgmma kernel runs on compute capability 9.0, on rows of a multiple of 16 bytes")
    w = random_weight(qtype, n, k, "cuda", seed=7)
    for rows in (257, 300, 400, 512):
        x = gaussian_activations((rows, k), seed=rows).to(torch.bfloat16).cuda()
        y = torchext.qmatmul(w, int(qtype), x, n, k, exact=exact)
        for r0 in range(0, rows, 256):
            part = x[r0:r0 + 256]
            if exact or part.shape[0] >= 9:
                alone = torchext.qmatmul(w, int(qtype), part, n, k, exact=exact)
                assert torch.equal(y[r0:r0 + 256], alone), f"{rows} rows, chunk at {r0}"


def test_chunks_replay_from_a_cuda_graph():
    """400 rows of a chunked weight (two launches sharing the workspace) captured in a CUDA graph and
    replayed on new inputs: bit for bit the eager result."""
    qtype, (n, k) = Q.Q4_K, CHUNKED_SHAPE
    if not takes_wgmma_gemm(qtype, k):
        pytest.skip("the wgmma kernel runs on compute capability 9.0")
    w = random_weight(qtype, n, k, "cuda", seed=7)
    x = gaussian_activations((400, k), seed=400).to(torch.bfloat16).cuda()
    static_x = x.clone()
    torchext.qmatmul(w, int(qtype), static_x, n, k)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = torchext.qmatmul(w, int(qtype), static_x, n, k)
    static_x.copy_(x.flip(0))
    graph.replay()
    assert torch.equal(static_y, torchext.qmatmul(w, int(qtype), x.flip(0), n, k))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_misaligned_activations_take_the_dense_path(dtype):
    """The tiled GEMM copies activation rows in 16-byte pieces; a view 2 bytes into its storage
    (or k not a multiple of 8) goes to the dense path instead, with the same result within the
    dense path's bound (2 half-ulps: test_matmul.output_rounding)."""
    qtype, n, k, rows = K_QUANTS[0], 64, 300, 20  # k % 8 != 0
    w = random_weight(qtype, n, k, seed=1)
    W = dequant_oracle(w, qtype, n, k)
    x = gaussian_activations((rows, k), seed=2).to(dtype)
    y = torchext.qmatmul(w.cuda(), int(qtype), x.cuda(), n, k)
    k2 = 512
    w2 = random_weight(qtype, n, k2, seed=1)
    x2 = gaussian_activations((rows, k2), seed=2).to(dtype)
    storage = torch.empty(rows * k2 + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view(rows, k2)
    shifted.copy_(x2)
    assert shifted.data_ptr() % 16 != 0
    y2 = torchext.qmatmul(w2.cuda(), int(qtype), shifted, n, k2)
    assert_within_dense_bound(y, x, W)
    assert_within_dense_bound(y2, x2, dequant_oracle(w2, qtype, n, k2))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_graph_replay(dtype):
    """Captured in a CUDA graph (workspace and all) and replayed on new inputs, bit for bit the
    eager result, for a K-split plan (17 rows), a 64-row tile and the wgmma kernels' tiles (Q4_K's
    register-fragment kernel, the shared-memory one for the other format)."""
    n, k = 2048, 4096  # 2^23 values: the tiled GEMM serves it past 16 rows
    for qtype in (K_QUANTS[0], Q.Q4_K):
        w = random_weight(qtype, n, k, "cuda", seed=11)
        for rows in (17, 64, 128, 256):
            static_x = torch.zeros(rows, k, dtype=dtype, device="cuda")
            torchext.qmatmul(w, int(qtype), static_x, n, k)  # warm-up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = torchext.qmatmul(w, int(qtype), static_x, n, k)
            for seed in range(2):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()
                static_x.copy_(x)
                graph.replay()
                assert torch.equal(static_y, torchext.qmatmul(w, int(qtype), x, n, k))
