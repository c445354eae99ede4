"""GPU-only behaviour: CUDA graphs, streams, other devices, > 2^31-byte weights, CUDA vs CPU,
and no host synchronisation. The whole module is skipped without CUDA.

CUDA vs CPU tolerances (per output, |y_cuda - y_cpu| <= tol):
  * Q8_1 GEMV path (test_matmul.takes_gemv: up to 8 or 16 rows, DP4A or int8 tensor cores; the
    CPU reference then takes its GEMV too): both backends produce identical Q8_1 bytes (tested below) and
    exact integer dot products per block; only the fp32 sum of the per-block terms runs in a
    different order. Each term is bounded by its share of sum |x||w|, so the difference is a
    few fp32 ulp of absdot = (|x| @ |W|.T): 1e-5 * absdot is generous (measured against a
    float64 reference: <= 4e-8 * absdot). Plus one ulp of the output dtype: two fp32 values
    that differ slightly can round to neighbouring outputs.
  * beyond the GEMVs (the CPU reference with exact=True, unrounded): the CPU dequantizes to fp32
    and multiplies in fp32; CUDA dequantizes to x's dtype and multiplies in x's dtype with cuBLAS
    (fp32 accumulate), or up to 64 rows of fp16/bf16 (256 on compute capability 9.0, most formats)
    runs the tiled GEMM on the same rounded weights (bf16 weights computed in bf16 by default: 2
    half-ulps and the offsets'; fp32 sums). Each weight is rounded once to the dtype (relative
    2^-24 / 2^-11 / 2^-8, and absolute conftest.tiny below its normal range: fp16's 2^-25 times
    sum |x| matters for the IQ formats' small weights, IQ1_M 20005x256 measured 7e-7 on an output
    of 2e-5) and cuBLAS may reduce
    split-K partials in the dtype, so tol = c * absdot with c = 3e-5 (fp32, no TF32), 2e-3
    (fp16), 1.6e-2 (bf16), about 4x the rounding bound, plus one ulp of the output and
    tiny(dtype) * sum |x|. Since a
    per-output bound that loose could miss a wrong block in bf16, the relative norm error
    ||y_cuda - y_cpu|| / ||y_cpu|| must also stay below c (measured rounding noise is ~c/8; a
    wrong block of a 16-block row gives ~25%).
  * dequantize and quantize_q8_1: bit-identical (one fp32 formula, one rounding).
  * q4k_q8_gemv on the same Q8_1 bytes: a worst-case bound of the two fp32 summations of the same
    terms (check_q4k_q8_gemv_vs_cpu); gelu and bias_gelu: test_gelu.py's bound with both devices' units.
"""

import gc

import numpy as np
import pytest
import torch

import torchext  # noqa: F401
from conftest import (DTYPES, WEIGHT_QTYPES, capture_graph, dequant_oracle, fp32_sum_error, offset_oracle, q8_1_fields,
                      random_weight, tiny)
from test_gelu import _units, assert_gelu_close
from test_matmul import takes_gemv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

ops = torch.ops.torchext
Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, Q5_0, IQ1_S = 12, 13, 14, 8, 2, 6, 19
DENSE_TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GEMV_TOL = 1e-5


def _randn(shape, dtype=torch.float32, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of `dtype` at |v| (v float64, on the CPU)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.abs())
    ulp = torch.ldexp(torch.full_like(v, fi.eps), (e - 1).to(torch.int32))
    return torch.clamp(ulp, min=fi.smallest_normal * fi.eps)


def check_matmul_vs_cpu(y: torch.Tensor, w: torch.Tensor, qtype: int, x: torch.Tensor, n: int, k: int):
    """y (a CUDA result of qmatmul(w, qtype, x, n, k)) against the CPU op on the same bytes,
    with the tolerances of the module docstring."""
    w_cpu, x_cpu = w.cpu(), x.cpu()
    rows = x_cpu.numel() // k if k else 0
    # the CPU's GEMV where CUDA took the GEMV (called as such: the CPU's own GEMV limit is the format's,
    # often below CUDA's 8 or 16 rows), else its unrounded dense path (x: CUDA's, or its CPU copy, whose
    # alignment says nothing of CUDA's)
    aligned = w.data_ptr() % 16 == 0 and (x.device != y.device or x.data_ptr() % 16 == 0)
    gemv = takes_gemv(rows, y.device, x.dtype, n, k, qtype, aligned)
    if gemv:
        ref = ops.qmatmul_q8_1(w_cpu, qtype, ops.quantize_q8_1(x_cpu), n, k, x.dtype)
    else:
        ref = ops.qmatmul(w_cpu, qtype, x_cpu, n, k, True)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if rows == 0:
        return
    wd = ops.dequantize(w_cpu, qtype, n, k, None).double()
    absdot = (x_cpu.double().abs().reshape(rows, k) @ wd.abs().t()).reshape(ref.shape)
    c = GEMV_TOL if gemv else DENSE_TOL[x.dtype]
    y64, r64 = y.detach().cpu().double(), ref.double()
    assert torch.isfinite(r64).all()
    tol = c * absdot + _ulp(torch.maximum(y64.abs(), r64.abs()), y.dtype)
    if not gemv:  # weights rounded to x's dtype below its normal range: conftest.tiny a weight
        tol = tol + tiny(x.dtype) * x_cpu.double().abs().sum(-1, keepdim=True)
    err = (y64 - r64).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{int(bad.sum())}/{err.numel()} outputs out of tolerance (rows={rows}, {x.dtype}); worst err/absdot "
        f"{(err / absdot).max().item():.3g}, got {y64[bad][:4].tolist()} vs cpu {r64[bad][:4].tolist()}")
    if not gemv:
        rel = (torch.linalg.vector_norm(y64 - r64) / torch.linalg.vector_norm(r64)).item()
        assert rel <= c, f"relative norm error {rel:.3g} > {c}"


def check_q4k_q8_gemv_vs_cpu(y: torch.Tensor, w_cpu: torch.Tensor, xq_cpu: torch.Tensor, n: int, k: int):
    """y (a CUDA result of q4k_q8_gemv(w, xq, n, k)) against the CPU op on the same Q4_K and Q8_1 bytes.
    Both sum the same exact integer dot products, each scaled in fp32 (d * sc times d_x, then times the
    dot product; the offsets dmin * m times d_x * sum(qs)): at most two roundings a term, one more for
    the dequantized W's own rounding, in orders of their own: the CPU in k/4 terms (eight int32 lanes a
    32-value block) and k/32 offsets, CUDA in fewer. The dot products meet d * sc * q = W + m (m the
    block's offset dmin * m, conftest.offset_oracle), so with x^ = d_x * qs the activations the bytes hold
    the terms' magnitudes sum to at most |x^| @ (|W| + 2|m|).T: each side within fp32_sum_error of it."""
    ref = ops.q4k_q8_gemv(w_cpu, xq_cpu, n, k)
    f = q8_1_fields(xq_cpu)
    rows = ref.numel() // n
    xd = (f.d.astype(np.float64)[..., None] * f.qs).reshape(rows, -1)[:, :k]
    absterms = np.abs(xd) @ (np.abs(dequant_oracle(w_cpu, Q4_K, n, k)) + 2 * offset_oracle(w_cpu, Q4_K, n, k)).T
    tol = 2 * fp32_sum_error(absterms, k // 4 + k // 32 + 3)
    err = (y.cpu().double() - ref.double()).abs().reshape(rows, n).numpy()
    assert (err <= tol).all(), f"worst err / tol {(err / tol).max():.3g}"


# ---- CUDA graph capture -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [Q4_K, Q6_K, Q8_0], ids=["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 4, 12, 17])
def test_cuda_graph_qmatmul(rows, qtype, dtype):
    n, k = 96, 512
    w = random_weight(qtype, n, k, "cuda", seed=rows)
    static_x = torch.zeros(rows, k, dtype=dtype, device="cuda")
    g, out = capture_graph(lambda: ops.qmatmul(w, qtype, static_x, n, k))
    previous = None
    for seed in (1, 2, 3):
        x = _randn((rows, k), dtype, seed=100 * rows + seed)
        static_x.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        got = out.clone()
        check_matmul_vs_cpu(got, w, qtype, x, n, k)
        if takes_gemv(rows, x.device, dtype, n, k, qtype):  # the GEMVs are deterministic: replay == eager, bit for bit
            assert torch.equal(got, ops.qmatmul(w, qtype, x, n, k))
        if previous is not None:
            assert not torch.equal(got, previous), "the replay did not see the new input"
        previous = got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_quantize_q8_1(dtype):
    static_x = torch.zeros(3, 300, dtype=dtype, device="cuda")
    g, out = capture_graph(lambda: ops.quantize_q8_1(static_x))
    for seed in (1, 2):
        x = _randn((3, 300), dtype, seed=seed)
        static_x.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), ops.quantize_q8_1(x.cpu()))  # identical bytes on CPU and CUDA


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_gelu_and_bias_gelu(dtype):
    static_x = torch.zeros(5, 1000, dtype=dtype, device="cuda")
    static_b = torch.zeros(1000, dtype=dtype, device="cuda")
    g, (y1, y2) = capture_graph(lambda: (ops.gelu(static_x, "tanh"), ops.bias_gelu(static_x, static_b, "none")))
    for seed in (1, 2):
        x, b = _randn((5, 1000), dtype, seed=seed), _randn((1000,), dtype, seed=seed + 10)
        static_x.copy_(x)
        static_b.copy_(b)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y1, ops.gelu(x, "tanh"))
        assert torch.equal(y2, ops.bias_gelu(x, b, "none"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", [Q4_K, Q6_K, Q4_0], ids=["Q4_K", "Q6_K", "Q4_0"])
def test_cuda_graph_dequantize(qtype, dtype):
    n, k = 8, 512
    static_w = random_weight(qtype, n, k, "cuda", seed=0)
    g, out = capture_graph(lambda: ops.dequantize(static_w, qtype, n, k, dtype))
    for seed in (1, 2):
        w = random_weight(qtype, n, k, "cpu", seed=seed)
        static_w.copy_(w)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), ops.dequantize(w, qtype, n, k, dtype))


# ---- a non-default stream --------------------------------------------------------------------------

SLEEP_CYCLES = 1 << 30  # ~0.5 s at H100 clocks: far longer than anything the test does meanwhile


def _side_stream_case(case):
    """(fn, load, check): fn runs the op on CUDA inputs that start out holding other values
    (so that a warm-up leaves different results behind), load() copies the real inputs in,
    check(host) asserts that fn's result, copied to the CPU, is right for the real inputs."""
    w4, w6 = random_weight(Q4_K, 64, 512, "cpu", seed=1), random_weight(Q6_K, 64, 512, "cpu", seed=2)
    x1, x8 = _randn((1, 512), torch.float16, "cpu", seed=3), _randn((8, 512), torch.bfloat16, "cpu", seed=7)
    x17 = _randn((17, 512), torch.float32, "cpu", seed=4)
    xb, b = _randn((7, 1000), torch.bfloat16, "cpu", seed=5), _randn((1000,), torch.bfloat16, "cpu", seed=6)
    real = (w4, w6, x1, x8, x17, xb, b)
    cw4, cw6 = random_weight(Q4_K, 64, 512, "cuda", seed=11), random_weight(Q6_K, 64, 512, "cuda", seed=12)
    cx1, cx8, cx17, cxb, cb = (torch.zeros_like(t).cuda() for t in (x1, x8, x17, xb, b))
    on_gpu = (cw4, cw6, cx1, cx8, cx17, cxb, cb)

    def load():
        for dst, src in zip(on_gpu, real):
            dst.copy_(src)

    def exact(expected):
        return lambda host: torch.testing.assert_close(host, expected, rtol=0, atol=0)

    def gelu_close(expected, x32):
        # test_gelu.py's bound, CPU op against CUDA op: its units (4 on the CPU, 8 on CUDA) cover two fp32 GELUs
        # of a device, so each op is within them of the exact GELU and the two within their sum; then one bf16
        # ulp apart after rounding (x32: GELU's fp32 argument)
        return lambda host: assert_gelu_close(host, expected, x32, _units("cpu") + _units("cuda"))

    fn, check = {
        "qmatmul_gemv": (lambda: ops.qmatmul(cw4, Q4_K, cx1, 64, 512),
                         lambda host: check_matmul_vs_cpu(host, w4, Q4_K, x1, 64, 512)),
        "qmatmul_mma": (lambda: ops.qmatmul(cw4, Q4_K, cx8, 64, 512),
                        lambda host: check_matmul_vs_cpu(host, w4, Q4_K, x8, 64, 512)),
        "q6k_gemv_dense": (lambda: ops.q6k_gemv(cw6, cx17, 64, 512),
                           lambda host: check_matmul_vs_cpu(host, w6, Q6_K, x17, 64, 512)),
        "quantize_q8_1": (lambda: ops.quantize_q8_1(cxb), exact(ops.quantize_q8_1(xb))),
        "gelu": (lambda: ops.gelu(cxb, "none"), gelu_close(ops.gelu(xb, "none"), xb.float())),
        "bias_gelu": (lambda: ops.bias_gelu(cxb, cb, "tanh"),
                      gelu_close(ops.bias_gelu(xb, b, "tanh"), xb.float() + b.float())),
        "dequantize": (lambda: ops.dequantize(cw6, Q6_K, 64, 512, torch.bfloat16),
                       exact(ops.dequantize(w6, Q6_K, 64, 512, torch.bfloat16))),
    }[case]
    return fn, load, check


@pytest.mark.parametrize("case", ["qmatmul_gemv", "qmatmul_mma", "q6k_gemv_dense", "quantize_q8_1", "gelu", "bias_gelu", "dequantize"])
def test_side_stream(case):
    # The default stream is kept busy (a ~0.5 s sleep kernel) while the op runs under
    # torch.cuda.stream(s) and its result is copied back on s (a copy that waits for s only).
    # If the op ran on the default stream, that copy would read its output before it was
    # written (the memory would still hold the warm-up's different result); if it
    # synchronised the device, the default stream would be idle afterwards.
    fn, load, check = _side_stream_case(case)
    s = torch.cuda.Stream()  # a pool stream: non-blocking, no implicit sync with the default stream
    # Warm up on s itself: loads the kernels, creates cuBLAS's workspace for s and leaves the
    # caching allocator with blocks for s, so the timed call below makes no cudaMalloc (a
    # device allocation may serialise streams, which would blame the op for the allocator).
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    load()
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # on the default stream
    with torch.cuda.stream(s):
        out = fn()
        host = out.to("cpu")  # blocking copy on s: waits for s, not for the sleeping default stream
        s_done = s.query()
    default_busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert s_done
    assert default_busy, "the default stream finished early: something synchronised the device"
    check(host)


# ---- a tensor on another device than the current one ---------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_weight_on_cuda1_while_cuda0_is_current():
    dev = torch.device("cuda:1")
    n, k = 64, 512
    w_cpu = random_weight(Q4_K, n, k, "cpu", seed=7)
    x1_cpu, x16_cpu = _randn((1, k), device="cpu", seed=8), _randn((16, k), torch.bfloat16, "cpu", seed=9)
    w, x1, x16 = w_cpu.to(dev), x1_cpu.to(dev), x16_cpu.to(dev)
    torch.cuda.synchronize(dev)
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(0)
        before = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        y1 = ops.qmatmul(w, Q4_K, x1, n, k)
        y16 = ops.qmatmul(w, Q4_K, x16, n, k)
        xq = ops.quantize_q8_1(x1)
        yq = ops.q4k_q8_gemv(w, xq, n, k)
        d = ops.dequantize(w, Q4_K, n, k, torch.float16)
        g = ops.bias_gelu(x16, x16[0].clone(), "tanh")
        torch.cuda.synchronize(dev)
        assert torch.cuda.max_memory_allocated(0) == before, "an op allocated memory on cuda:0"
        assert torch.cuda.memory_allocated(0) == before
    for t in (y1, y16, xq, yq, d, g):
        assert t.device == dev
    check_matmul_vs_cpu(y1, w_cpu, Q4_K, x1_cpu, n, k)
    check_matmul_vs_cpu(y16, w_cpu, Q4_K, x16_cpu, n, k)
    assert torch.equal(xq.cpu(), ops.quantize_q8_1(x1_cpu))
    assert torch.equal(d.cpu(), ops.dequantize(w_cpu, Q4_K, n, k, torch.float16))
    check_q4k_q8_gemv_vs_cpu(yq, w_cpu, ops.quantize_q8_1(x1_cpu), n, k)


# ---- a weight larger than 2^31 bytes ----------------------------------------------------------------------

def test_q6k_weight_over_2_31_bytes_huge():
    # K = 4096: 16 Q6_K super-blocks of 210 bytes = 3360 bytes a row; N = 640000 rows is
    # 2_150_400_000 bytes > 2^31, and its dense form has 2.6e9 > 2^31 elements. Byte offsets of
    # the last rows (and element offsets of their dequantized values) overflow 32 bits.
    N, K = 640_000, 4096
    assert N * 3360 > 2**31 and N * K > 2**31
    need = N * 3360 + 2 * N * K * 2 + (2 << 30)  # weight, two fp16 dense copies (ours, the dense path's), slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    try:
        check_big_q6k(N, K, "cuda")
    finally:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def check_big_q6k(N, K, device):
    """A random Q6_K weight [N, K] built on `device`; the outputs of its first and last 8 rows
    (GEMV with 1 and 4 rows, dense with 16) and their dequantized values match the CPU op on
    those rows' bytes."""
    RB = K // 256 * 210
    gen = torch.Generator(device=device).manual_seed(1234)
    w = torch.randint(0, 256, (N, RB), dtype=torch.uint8, device=device, generator=gen)
    # finite scales: d (fp16 at byte 208 of every 210-byte block) ~ N(0, 0.01)
    d = (torch.randn(N, K // 256, device=device, generator=gen) * 0.01).half()
    w.view(N, K // 256, 210)[:, :, 208:210] = d.view(torch.uint8).view(N, K // 256, 2)
    del d
    first, last = w[:8].cpu(), w[-8:].cpu()

    # GEMV path, 1 and 4 rows of fp32 activations
    for rows in (1, 4):
        x = _randn((rows, K), device=device, seed=rows)
        y = ops.q6k_gemv(w, x, N, K)
        assert y.shape == (rows, N)
        check_matmul_vs_cpu(y[:, -8:].contiguous(), last, Q6_K, x, 8, K)
        check_matmul_vs_cpu(y[:, :8].contiguous(), first, Q6_K, x, 8, K)
        del y

    # dequantize: exact on the first and last rows (element offsets > 2^31 for the last)
    deq = ops.dequantize(w, Q6_K, N, K, torch.float16)
    assert torch.equal(deq[-8:].cpu(), ops.dequantize(last, Q6_K, 8, K, torch.float16))
    assert torch.equal(deq[:8].cpu(), ops.dequantize(first, Q6_K, 8, K, torch.float16))
    del deq

    # dense path, 17 rows of fp16 activations
    x = _randn((17, K), torch.float16, device=device, seed=16)
    y = ops.qmatmul(w, Q6_K, x, N, K)
    assert y.shape == (17, N)
    check_matmul_vs_cpu(y[:, -8:].contiguous(), last, Q6_K, x, 8, K)
    check_matmul_vs_cpu(y[:, :8].contiguous(), first, Q6_K, x, 8, K)
    del y, w


# ---- CUDA vs CPU for every format ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=lambda q: q.name)
# The tensor-core GEMV gives each warp 16 weight rows and splits a row's items over up to 8 warps
# when there are few rows: 7 rows (one partial tile, 8 warps), 33 rows of an odd super-block count
# (3 tiles), 20005 rows of one super-block (no split, 8 tiles a CTA, a partial last CTA and tile).
@pytest.mark.parametrize("n,k", [(7, 4096), (33, 2880), (20005, 256)], ids=["7x4096", "33x2880", "20005x256"])
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 12, 16, 24])
def test_qmatmul_cuda_matches_cpu(rows, n, k, qtype, dtype):
    qtype = int(qtype)
    w = random_weight(qtype, n, k, "cuda", seed=n + rows)
    shape = (2, rows // 2, k) if rows in (4, 16, 24) else (rows, k)  # leading batch dims too
    x = _randn(shape, dtype, seed=rows + k)
    check_matmul_vs_cpu(ops.qmatmul(w, qtype, x, n, k), w, qtype, x, n, k)


# The DP4A GEMV stages up to 8 activation rows in shared memory, 40 bytes per 32 values, up to the
# device's opt-in limit (223 KB usable on an H100): 8 rows of k = 24576 (240 KB) do not fit and go
# as two groups of 4; a row of k = 183296 (229 KB) does not fit at all and is read from global
# memory (kernels/gemv_q8_1.cu). The tensor-core GEMV, which takes k-quants from 2 rows on an H100
# (kernels/batch_policy.h), reads activations from global memory at any K. One staged IQ1_S row of k = 32768
# (40 KB) beside the kernel's 16 KB static grid passes the 48 KB that a launch takes without the opt-in.
@pytest.mark.parametrize("qtype,n,k,rows", [(Q4_K, 5, 24576, 8), (Q5_0, 5, 24576, 8), (Q8_0, 3, 183296, 2),
                                            (Q6_K, 2, 183296, 1), (IQ1_S, 3, 32768, 1)],
                         ids=["8rows_long_mma", "8rows_in_2_groups", "unstaged_2rows", "unstaged_q6k",
                              "1row_static_grid_over_48k"])
def test_qmatmul_rows_too_long_to_stage(qtype, n, k, rows):
    qtype = int(qtype)
    w = random_weight(qtype, n, k, "cuda", seed=k)
    x = _randn((rows, k), torch.float32, seed=rows)
    check_matmul_vs_cpu(ops.qmatmul(w, qtype, x, n, k), w, qtype, x, n, k)


# Where the staged rows meet the shared memory's edge: the launcher stages a group of rows only if they fit
# beside the kernel's own static arrays, as the runtime reports them for each kernel, and halves the group
# otherwise. 8 rows of Q5_0 (DP4A up to 8 rows) and 8 tokens of qmatmul_id, at every K within a few
# blocks of the device's opt-in limit, 40 bytes a row per 32 values: whichever side of the edge a K
# falls, the result is right and no launch fails.
def edge_ks(rows: int) -> list[int]:
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    blocks = optin // (rows * 40)
    return [32 * b for b in range(blocks - 8 * 1024 // (rows * 40), blocks + 2)]


def test_qmatmul_rows_at_the_shared_memory_edge():
    n, rows = 3, 8
    for k in edge_ks(rows):
        w = random_weight(Q5_0, n, k, "cuda", seed=k)
        x = _randn((rows, k), torch.float32, seed=k)
        check_matmul_vs_cpu(ops.qmatmul(w, Q5_0, x, n, k), w, Q5_0, x, n, k)


def test_qmatmul_id_tokens_at_the_shared_memory_edge():
    from test_matmul_id import assert_slots_close, expert_weights
    experts, n, tokens, top_k = 4, 3, 8, 2
    ids = torch.arange(tokens * top_k).reshape(tokens, top_k) % experts  # 4 tokens an expert
    for k in edge_ks(tokens):
        w, Ws, Ms = expert_weights(Q8_0, experts, n, k, seed=k)
        x = _randn((tokens, k), torch.float32, "cpu", seed=k)
        y = ops.qmatmul_id(w.cuda(), Q8_0, x.cuda(), ids.cuda(), n, k)
        assert_slots_close(y, x, ids, Ws, Ms, rounded=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,qtype", [("q4k_gemv", Q4_K), ("q5k_gemv", Q5_K), ("q6k_gemv", Q6_K)])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_fixed_format_ops_cuda_match_cpu(rows, op, qtype, dtype):
    n, k = 40, 2816  # 11 super-blocks
    w = random_weight(qtype, n, k, "cuda", seed=rows)
    x = _randn((rows, k), dtype, seed=rows)
    y = getattr(ops, op)(w, x, n, k)
    assert torch.equal(y, ops.qmatmul(w, qtype, x, n, k))
    check_matmul_vs_cpu(y, w, qtype, x, n, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=lambda q: q.name)
def test_dequantize_cuda_matches_cpu_and_gguf(qtype, dtype):
    qtype = int(qtype)
    n, k = 33, 2880
    w_cpu = random_weight(qtype, n, k, "cpu", seed=5)
    got = ops.dequantize(w_cpu.cuda(), qtype, n, k, dtype).cpu()
    assert torch.equal(got, ops.dequantize(w_cpu, qtype, n, k, dtype))
    oracle = torch.from_numpy(dequant_oracle(w_cpu, qtype, n, k)).float().to(dtype)
    assert torch.equal(got, oracle)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4096), (3, 2880), (2, 3, 300), (5, 1), (9, 33), (0, 64)], ids=str)
def test_quantize_q8_1_cuda_matches_cpu(shape, dtype):
    x = _randn(shape, dtype, "cpu", seed=sum(shape))
    if x.numel() > 8:  # non-finite inputs mark their blocks (d = NaN): same bytes too
        x.view(-1)[3] = float("inf")
        x.view(-1)[-1] = float("nan")
    assert torch.equal(ops.quantize_q8_1(x.cuda()).cpu(), ops.quantize_q8_1(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 8, 12])
def test_q4k_q8_gemv_cuda_matches_cpu(rows, dtype):
    n, k = 50, 2304
    w_cpu = random_weight(Q4_K, n, k, "cpu", seed=rows)
    xq_cpu = ops.quantize_q8_1(_randn((rows, k), dtype, "cpu", seed=rows))
    w, xq = w_cpu.cuda(), xq_cpu.cuda()
    y = ops.q4k_q8_gemv(w, xq, n, k)
    assert torch.equal(y, ops.q4k_q8_gemv_packed(w, xq, n, k))
    check_q4k_q8_gemv_vs_cpu(y, w_cpu, xq_cpu, n, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [256, 300, 36, 33])
def test_unaligned_activations(k, dtype):
    # x a contiguous view one element into its buffer: 2 or 4 bytes past a 16-byte boundary, and
    # for k not a multiple of 8 every row starts at a different misalignment. The Q8_1 kernels
    # must fall back to scalar loads and give the same bytes / results as an aligned copy.
    rows, n = 3, 24
    buf = _randn((rows * k + 1,), dtype, seed=k)
    x = buf[1:].view(rows, k)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    aligned = x.clone()
    assert aligned.data_ptr() % 16 == 0
    xq = ops.quantize_q8_1(x)
    assert torch.equal(xq, ops.quantize_q8_1(aligned))
    assert torch.equal(xq.cpu(), ops.quantize_q8_1(aligned.cpu()))
    w = random_weight(Q4_K, n, k, "cuda", seed=k)
    y = ops.qmatmul(w, Q4_K, x, n, k)
    assert torch.equal(y, ops.qmatmul(w, Q4_K, aligned, n, k))
    check_matmul_vs_cpu(y, w, Q4_K, aligned, n, k)


# ---- no host synchronisation -------------------------------------------------------------------------------

def test_no_host_sync():
    n, k = 64, 512
    w = random_weight(Q4_K, n, k, "cuda", seed=1)
    x1, x16 = _randn((1, k), seed=2), _randn((16, k), torch.bfloat16, seed=3)
    b = _randn((n,), torch.bfloat16, seed=4)

    def run():
        y1 = ops.qmatmul(w, Q4_K, x1, n, k)
        y16 = ops.qmatmul(w, Q4_K, x16, n, k)
        xq = ops.quantize_q8_1(x1)
        yq = ops.q4k_q8_gemv_packed(w, xq, n, k)
        d = ops.dequantize(w, Q4_K, n, k, torch.float16)
        g = ops.bias_gelu(y16, b, "tanh")
        torchext.gelu_(g)
        return y1, y16, xq, yq, d, ops.gelu(g, "none")

    expected = run()  # warm-up: kernel loading, cuBLAS handles, allocator blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()  # raises RuntimeError on any synchronising CUDA call made through torch
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)  # the same computation again (cuBLAS included)
