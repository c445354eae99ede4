"""Every bad-input path of every op raises a RuntimeError whose message names the argument.

Each case calls the op through the dispatcher (torch.ops.torchext.*), so the message is the
one csrc/checks.h writes; the Python wrappers only add ValueError for a format they cannot
name (tested at the end). Messages carry a "function, file:line, " prefix from the C++
check macro, so every pattern starts with `(?:^|, |\\n)` and then the argument name: "x:"
never matches inside "w and x:" or "xq:".

Cases run on CPU and, where present, on CUDA (same checks, but a CUDA kernel must never be
launched on a bad input: a crash or an illegal address there would take the process down).
"""

import re

import numpy as np
import pytest
import torch

import torchext
from conftest import DEVICES, gemv_rows, random_weight, row_bytes

ops = torch.ops.torchext
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 9, 12, 13, 14
TQ1_0, MXFP4, NVFP4 = 34, 39, 40
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K",
         TQ1_0: "TQ1_0", MXFP4: "MXFP4", NVFP4: "NVFP4"}
SMALL_BLOCK = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, NVFP4]  # rows of whole 32-value (NVFP4: 64-value) blocks
BLOCK_VALUES = {q: 64 if q == NVFP4 else 32 for q in SMALL_BLOCK}
ALL_WEIGHTS = SMALL_BLOCK + [Q4_K, Q5_K, Q6_K, TQ1_0]
# the catalog's alignments (torchext/formats.py); the tests below check that the ops enforce them
ALIGN = {int(q): a for q, a in torchext.formats.ALIGNMENT.items()}
# the catalog's formats as the error messages list them: "Q4_0, Q4_1, ... or IQ4_XS"
_names = [q.name for q in torchext.formats.WEIGHT_TYPES]
CATALOG_NAMES = ", ".join(_names[:-1]) + " or " + _names[-1]

N, K = 4, 256  # the default good shape: one super-block / eight 32-blocks per row


def err(pattern: str):
    """pytest.raises for a RuntimeError whose message part starts with `pattern` (a regex)."""
    return pytest.raises(RuntimeError, match=r"(?:^|, |\n)" + pattern)


def lit(text: str) -> str:
    return re.escape(text)


# ---- inputs ---------------------------------------------------------------------------------

def weight(qtype=Q4_K, n=N, k=K, device="cpu", seed=0):
    return random_weight(qtype, n, k, device, seed=seed)


def acts(shape=(2, K), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def q8(shape=(2, K), device="cpu"):
    return ops.quantize_q8_1(acts(shape, device=device))


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of uint8 `t` whose storage starts `offset` bytes past a 16-byte boundary."""
    assert t.dtype == torch.uint8
    buf = torch.zeros(t.numel() + 32, dtype=torch.uint8, device=t.device)
    start = (-buf.data_ptr()) % 16 + offset
    view = buf[start:start + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 == offset % 16 and view.is_contiguous()
    return view


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as 2-D `t`, in a transposed (non-contiguous) layout."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous() and torch.equal(v, t)
    return v


# ---- quantize_q8_1 ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
class TestQuantizeQ8_1:
    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.uint8, torch.bool], ids=str)
    def test_dtype(self, device, dtype):
        name = {torch.int64: "int64", torch.int32: "int32", torch.float64: "float64", torch.uint8: "uint8",
                torch.bool: "bool"}[dtype]
        with err(lit(f"x: expected a float32, float16 or bfloat16 tensor, got {name}")):
            ops.quantize_q8_1(torch.ones(2, K, device=device).to(dtype))

    def test_non_contiguous(self, device):
        with err(lit("x: expected a contiguous tensor")):
            ops.quantize_q8_1(non_contiguous(acts((4, K), device=device)))

    def test_scalar(self, device):
        with err(lit("x: expected activations of shape [..., K]")):
            ops.quantize_q8_1(torch.tensor(1.0, device=device))

    def test_zero_k(self, device):
        with err(lit("x: expected a positive last dimension (K), got 0")):
            ops.quantize_q8_1(torch.ones(3, 0, device=device))


# ---- q4k_q8_gemv / q4k_q8_gemv_packed ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["q4k_q8_gemv", "q4k_q8_gemv_packed"])
class TestGemvQ8_1:
    def call(self, op, w, xq, n=N, k=K):
        return getattr(ops, op)(w, xq, n, k)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.int32], ids=str)
    def test_weight_dtype(self, device, op, dtype):
        w = weight(device=device)
        name = {torch.float32: "float32", torch.int8: "int8", torch.int32: "int32"}[dtype]
        bad = torch.zeros(w.numel(), dtype=dtype, device=device).view(w.shape)
        with err(lit(f"w: expected raw Q4_K bytes as a uint8 tensor, got {name}")):
            self.call(op, bad, q8(device=device))

    def test_weight_non_contiguous(self, device, op):
        with err(lit("w: expected a contiguous tensor")):
            self.call(op, non_contiguous(weight(device=device)), q8(device=device))

    @pytest.mark.parametrize("n,k,expected", [(5, 256, 720), (3, 256, 432), (4, 257, 1152), (4, 512, 1152)])
    def test_weight_byte_count(self, device, op, n, k, expected):
        # a 4 x 256 Q4_K weight (576 bytes) described with the wrong n or k
        xq = q8((1, k), device=device)
        with err(lit(f"w: expected {expected} bytes for Q4_K with n={n}, k={k} ({n} rows of {expected // n} bytes), "
                     f"got 576")):
            self.call(op, weight(device=device), xq, n, k)

    @pytest.mark.parametrize("n", [0, -1])
    def test_n_not_positive(self, device, op, n):
        with err(lit(f"n: expected a positive number of output rows, got {n}")):
            self.call(op, weight(device=device), q8(device=device), n=n)

    @pytest.mark.parametrize("k", [0, -256])
    def test_k_not_positive(self, device, op, k):
        with err(lit(f"k: expected a positive row length, got {k}")):
            self.call(op, weight(device=device), q8(device=device), k=k)

    @pytest.mark.parametrize("offset", [2, 4, 8])
    def test_weight_misaligned(self, device, op, offset):
        w = at_offset(weight(device=device), offset)
        with err(lit(f"w: storage must be 16-byte aligned (the alignment of its blocks); got an address {offset} "
                     f"bytes past that")):
            self.call(op, w, q8(device=device))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.int8], ids=str)
    def test_xq_dtype(self, device, op, dtype):
        xq = q8(device=device)
        name = {torch.float32: "float32", torch.int8: "int8"}[dtype]
        with err(lit(f"xq: expected Q8_1 bytes as a uint8 tensor, got {name}")):
            self.call(op, weight(device=device), xq.to(dtype))

    def test_xq_non_contiguous(self, device, op):
        with err(lit("xq: expected a contiguous tensor")):
            self.call(op, weight(device=device), non_contiguous(q8((3, K), device=device)))

    @pytest.mark.parametrize("last", [287, 289, 576, 36, 0])
    def test_xq_last_dim(self, device, op, last):
        xq = torch.zeros(2, last, dtype=torch.uint8, device=device)
        with err(lit(f"xq: expected the last dimension to be 288 bytes (k=256 padded to whole 256-value "
                     f"super-blocks, 36 bytes per 32 values), got {last}")):
            self.call(op, weight(device=device), xq)

    def test_xq_last_dim_for_odd_k(self, device, op):
        # k = 300 needs two super-blocks of Q8_1 (576 bytes), not ceil(300/32)*36 = 360
        w = weight(k=300, device=device)
        xq = torch.zeros(1, 360, dtype=torch.uint8, device=device)
        with err(lit("xq: expected the last dimension to be 576 bytes (k=300")):
            self.call(op, w, xq, k=300)

    def test_xq_scalar(self, device, op):
        with err(lit("xq: expected at least one dimension [..., bytes], got a scalar")):
            self.call(op, weight(device=device), torch.tensor(0, dtype=torch.uint8, device=device))

    def test_xq_misaligned(self, device, op):
        xq = at_offset(q8((1, K), device=device), 2)
        with err(lit("xq: storage must be 4-byte aligned (Q8_1 quants are read as 32-bit words); got an address 2 "
                     "bytes past that")):
            self.call(op, weight(device=device), xq)

    def test_xq_aligned_to_4_works(self, device, op):
        w, xq = weight(device=device), q8((1, K), device=device)
        assert torch.equal(self.call(op, w, at_offset(xq, 4)), self.call(op, w, xq))

    def test_devices_differ(self, device, op):
        if device != "cuda":
            pytest.skip("needs a CUDA device")
        with err(lit("w and xq: expected tensors on the same device, got w on cuda:0 and xq on cpu")):
            self.call(op, weight(device="cuda"), q8(device="cpu"))
        with err(lit("w and xq: expected tensors on the same device, got w on cpu and xq on cuda:0")):
            self.call(op, weight(device="cpu"), q8(device="cuda"))


# ---- q4k_gemv / q5k_gemv / q6k_gemv / qmatmul: weight checks -------------------------------------

FIXED = {"q4k_gemv": Q4_K, "q5k_gemv": Q5_K, "q6k_gemv": Q6_K}


def matmul_call(op, qtype):
    """A function (w, x, n, k) running `op` (qmatmul at `qtype`, or a fixed-format op)."""
    if op == "qmatmul":
        return lambda w, x, n=N, k=K: ops.qmatmul(w, qtype, x, n, k)
    assert FIXED[op] == qtype
    return lambda w, x, n=N, k=K: getattr(ops, op)(w, x, n, k)


# (op, qtype): each fixed-format op at its format, and qmatmul at every format
MATMUL_CASES = [(op, q) for op, q in FIXED.items()] + [("qmatmul", q) for q in ALL_WEIGHTS]
MATMUL_IDS = [f"{op}-{NAMES[q]}" for op, q in MATMUL_CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,qtype", MATMUL_CASES, ids=MATMUL_IDS)
class TestMatmulWeight:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float16], ids=str)
    def test_weight_dtype(self, device, op, qtype, dtype):
        nb = row_bytes(qtype, K) * N
        bad = torch.zeros(N, nb // N, dtype=dtype, device=device)
        name = {torch.float32: "float32", torch.int8: "int8", torch.float16: "float16"}[dtype]
        with err(lit(f"w: expected raw {NAMES[qtype]} bytes as a uint8 tensor, got {name}")):
            matmul_call(op, qtype)(bad, acts(device=device))

    def test_weight_non_contiguous(self, device, op, qtype):
        with err(lit("w: expected a contiguous tensor")):
            matmul_call(op, qtype)(non_contiguous(weight(qtype, device=device)), acts(device=device))

    @pytest.mark.parametrize("dn", [-1, 1])
    def test_weight_byte_count_n(self, device, op, qtype, dn):
        rb = row_bytes(qtype, K)
        n = N + dn
        with err(lit(f"w: expected {n * rb} bytes for {NAMES[qtype]} with n={n}, k={K} ({n} rows of {rb} bytes), "
                     f"got {N * rb}")):
            matmul_call(op, qtype)(weight(qtype, device=device), acts(device=device), n=n)

    def test_weight_byte_count_k(self, device, op, qtype):
        # the row length of a 512-value row on a weight made for k = 256
        rb = row_bytes(qtype, 512)
        with err(lit(f"w: expected {N * rb} bytes for {NAMES[qtype]} with n={N}, k=512 ({N} rows of {rb} bytes), "
                     f"got {N * row_bytes(qtype, K)}")):
            matmul_call(op, qtype)(weight(qtype, device=device), acts((1, 512), device=device), k=512)

    def test_weight_of_another_format(self, device, op, qtype):
        other = Q6_K if qtype != Q6_K else Q4_K  # 210 vs 144 bytes per super-block
        w = weight(other, device=device)
        with err(lit(f"w: expected {N * row_bytes(qtype, K)} bytes for {NAMES[qtype]} with n={N}, k={K}")):
            matmul_call(op, qtype)(w, acts(device=device))

    def test_weight_flat_shape_works(self, device, op, qtype):
        # any shape with n * row_bytes elements is accepted (the bytes are what count)
        w, x = weight(qtype, device=device), acts((1, K), device=device)
        f = matmul_call(op, qtype)
        assert torch.equal(f(w.flatten(), x), f(w, x))

    @pytest.mark.parametrize("n", [0, -3])
    def test_n_not_positive(self, device, op, qtype, n):
        with err(lit(f"n: expected a positive number of output rows, got {n}")):
            matmul_call(op, qtype)(weight(qtype, device=device), acts(device=device), n=n)

    @pytest.mark.parametrize("k", [0, -32])
    def test_k_not_positive(self, device, op, qtype, k):
        with err(lit(f"k: expected a positive row length, got {k}")):
            matmul_call(op, qtype)(weight(qtype, device=device), acts(device=device), k=k)

    def test_weight_misaligned(self, device, op, qtype):
        # one byte below the format's alignment (Q4_K/Q5_K at +2 as well: 16-byte blocks)
        a = ALIGN[qtype]
        if a == 1:
            pytest.skip("1-byte-aligned blocks (MXFP4): no address is misaligned; test_weight_at_its_alignment_works")
        offsets = [1] if a == 2 else [a // 2, 1] if a == 4 else [2, 8]
        for off in offsets:
            w = at_offset(weight(qtype, device=device), off)
            with err(lit(f"w: storage must be {a}-byte aligned (the alignment of its blocks); got an address {off % a} "
                         f"bytes past that")):
                matmul_call(op, qtype)(w, acts(device=device))

    @pytest.mark.parametrize("path", ["gemv", "dense"])
    def test_weight_at_its_alignment_works(self, device, op, qtype, path):
        # Q6_K (210-byte blocks), Q8_0, Q4_0, Q5_0 rows are only 2-byte aligned in a GGUF file;
        # Q4_1/Q5_1 4-byte: a weight at exactly that offset must work, with the same result as an
        # aligned copy (the kernels may not assume more alignment than the block keeps).
        a, rows = ALIGN[qtype], 1 if path == "gemv" else gemv_rows(qtype, device) + 1
        w, x = weight(qtype, device=device), acts((rows, K), device=device)
        f = matmul_call(op, qtype)
        ref = f(w, x)
        for off in sorted({a, 2 * a % 16}):
            assert torch.equal(f(at_offset(w, off), x), ref), f"offset {off}"

    @pytest.mark.parametrize("rows", [2, 17], ids=["gemv", "dense"])
    def test_devices_differ(self, device, op, qtype, rows):
        if device != "cuda":
            pytest.skip("needs a CUDA device")
        f = matmul_call(op, qtype)
        with err(lit("w and x: expected tensors on the same device, got w on cuda:0 and x on cpu")):
            f(weight(qtype, device="cuda"), acts((rows, K), device="cpu"))
        with err(lit("w and x: expected tensors on the same device, got w on cpu and x on cuda:0")):
            f(weight(qtype, device="cpu"), acts((rows, K), device="cuda"))


def test_q6k_weight_at_byte_offset_2_works():
    # The case the brief names: a Q6_K weight viewed from a buffer at byte offset 2 works, and
    # a Q4_K weight there fails with the alignment message.
    x = acts((1, K))
    w6 = weight(Q6_K)
    assert torch.equal(ops.q6k_gemv(at_offset(w6, 2), x, N, K), ops.q6k_gemv(w6, x, N, K))
    assert torch.equal(ops.dequantize(at_offset(w6, 2), Q6_K, N, K, None), ops.dequantize(w6, Q6_K, N, K, None))
    with err(lit("w: storage must be 16-byte aligned")):
        ops.q4k_gemv(at_offset(weight(Q4_K), 2), x, N, K)


# ---- qmatmul: format checks -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
class TestQmatmulFormat:
    @pytest.mark.parametrize("qtype", [99, Q8_1, -1, 0, 1, 15, 1 << 40])
    def test_unknown_qtype(self, device, qtype):
        # 9 = Q8_1 is the activation format, 0/1 = F32/F16, 15 = Q8_K: not weight formats here
        with err(lit(f"qtype: unknown or unsupported weight format id {qtype} (expected a gguf "
                     f"GGMLQuantizationType of {CATALOG_NAMES})")):
            ops.qmatmul(weight(Q4_K, device=device), qtype, acts(device=device), N, K)

    @pytest.mark.parametrize("qtype", SMALL_BLOCK, ids=lambda q: NAMES[q])
    @pytest.mark.parametrize("k", [48, 100, 31, 1, 96])
    def test_k_not_multiple_of_the_block(self, device, qtype, k):
        v = BLOCK_VALUES[qtype]
        if k % v == 0:
            pytest.skip(f"{k} is whole {NAMES[qtype]} blocks")  # 96: only NVFP4's 64-value blocks leave a part
        w = torch.zeros(N, row_bytes(qtype, k), dtype=torch.uint8, device=device)
        with err(lit(f"k: {NAMES[qtype]} rows are whole {v}-value blocks, so k must be a multiple of {v}; got {k}")):
            ops.qmatmul(w, qtype, acts((1, k), device=device), N, k)
        with err(lit(f"k: {NAMES[qtype]} rows are whole {v}-value blocks, so k must be a multiple of {v}; got {k}")):
            ops.dequantize(w, qtype, N, k, None)

    @pytest.mark.parametrize("qtype", [Q4_K, Q5_K, Q6_K, TQ1_0], ids=lambda q: NAMES[q])
    def test_kquant_any_k_is_not_an_error(self, device, qtype):
        # the 256-value formats pad the last super-block, so k = 48 is valid (no "multiple of 32" error)
        y = ops.qmatmul(weight(qtype, k=48, device=device), qtype, acts((1, 48), device=device), N, 48)
        assert y.shape == (1, N)


# ---- matmul ops: activation checks -----------------------------------------------------------------

MATMUL_OPS = ["q4k_gemv", "q5k_gemv", "q6k_gemv", "qmatmul-Q4_K", "qmatmul-Q8_0"]


def matmul_op(name):
    if name.startswith("qmatmul"):
        qtype = {"Q4_K": Q4_K, "Q8_0": Q8_0}[name.split("-")[1]]
        return qtype, matmul_call("qmatmul", qtype)
    return FIXED[name], matmul_call(name, FIXED[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MATMUL_OPS)
class TestMatmulActivations:
    @pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.uint8, torch.int32], ids=str)
    def test_x_dtype(self, device, name, dtype):
        qtype, f = matmul_op(name)
        tname = {torch.int64: "int64", torch.float64: "float64", torch.uint8: "uint8", torch.int32: "int32"}[dtype]
        with err(lit(f"x: expected a float32, float16 or bfloat16 tensor, got {tname}")):
            f(weight(qtype, device=device), torch.ones(2, K, device=device).to(dtype))

    def test_x_non_contiguous(self, device, name):
        qtype, f = matmul_op(name)
        with err(lit("x: expected a contiguous tensor")):
            f(weight(qtype, device=device), non_contiguous(acts((3, K), device=device)))

    @pytest.mark.parametrize("last", [K - 32, K + 32, 1])
    def test_x_last_dim(self, device, name, last):
        qtype, f = matmul_op(name)
        with err(lit(f"x: expected the last dimension to be k={K}, got {last}")):
            f(weight(qtype, device=device), acts((2, last), device=device))

    def test_x_transposed_shape(self, device, name):
        # x given as [K, rows] instead of [rows, K]
        qtype, f = matmul_op(name)
        with err(lit(f"x: expected the last dimension to be k={K}, got 2")):
            f(weight(qtype, device=device), acts((K, 2), device=device))

    def test_x_scalar(self, device, name):
        qtype, f = matmul_op(name)
        with err(lit("x: expected at least one dimension [..., K], got a scalar")):
            f(weight(qtype, device=device), torch.tensor(1.0, device=device))


# ---- dequantize ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
class TestDequantize:
    @pytest.mark.parametrize("dtype,name", [(torch.int32, "int32"), (torch.float64, "float64"),
                                            (torch.uint8, "uint8"), (torch.int64, "int64")])
    def test_dtype(self, device, dtype, name):
        with err(lit(f"dtype: expected float32, float16 or bfloat16, got {name}")):
            ops.dequantize(weight(device=device), Q4_K, N, K, dtype)

    @pytest.mark.parametrize("qtype", [99, Q8_1, 0])
    def test_unknown_qtype(self, device, qtype):
        with err(lit(f"qtype: unknown or unsupported weight format id {qtype}")):
            ops.dequantize(weight(device=device), qtype, N, K, None)

    def test_weight_dtype(self, device):
        with err(lit("w: expected raw Q6_K bytes as a uint8 tensor, got float32")):
            ops.dequantize(torch.zeros(N, 210, device=device), Q6_K, N, K, None)

    def test_weight_non_contiguous(self, device):
        with err(lit("w: expected a contiguous tensor")):
            ops.dequantize(non_contiguous(weight(Q5_K, device=device)), Q5_K, N, K, None)

    def test_weight_byte_count(self, device):
        with err(lit("w: expected 880 bytes for Q5_K with n=5, k=256 (5 rows of 176 bytes), got 704")):
            ops.dequantize(weight(Q5_K, device=device), Q5_K, 5, K, None)

    @pytest.mark.parametrize("n,k,pattern", [(0, K, "n: expected a positive number of output rows, got 0"),
                                             (-1, K, "n: expected a positive number of output rows, got -1"),
                                             (N, 0, "k: expected a positive row length, got 0"),
                                             (N, -5, "k: expected a positive row length, got -5")])
    def test_shape_not_positive(self, device, n, k, pattern):
        with err(lit(pattern)):
            ops.dequantize(weight(device=device), Q4_K, n, k, None)

    def test_k_not_multiple_of_32(self, device):
        with err(lit("k: Q4_1 rows are whole 32-value blocks, so k must be a multiple of 32; got 40")):
            ops.dequantize(torch.zeros(N, 40, dtype=torch.uint8, device=device), Q4_1, N, 40, None)

    def test_weight_misaligned(self, device):
        with err(lit("w: storage must be 16-byte aligned (the alignment of its blocks); got an address 2 bytes")):
            ops.dequantize(at_offset(weight(Q4_K, device=device), 2), Q4_K, N, K, None)
        with err(lit("w: storage must be 4-byte aligned (the alignment of its blocks); got an address 2 bytes")):
            ops.dequantize(at_offset(weight(Q5_1, device=device), 2), Q5_1, N, K, None)


# ---- gelu / gelu_ ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["gelu", "gelu_"])
class TestGelu:
    @pytest.mark.parametrize("dtype,name", [(torch.int64, "int64"), (torch.float64, "float64"),
                                            (torch.int32, "int32"), (torch.uint8, "uint8")])
    def test_dtype(self, device, op, dtype, name):
        x = torch.ones(3, 5, device=device).to(dtype)
        x0 = x.clone()
        with err(lit(f"x: expected a float32, float16 or bfloat16 tensor, got {name}")):
            getattr(ops, op)(x, "none")
        assert torch.equal(x, x0)

    def test_non_contiguous(self, device, op):
        x = non_contiguous(acts((6, 10), device=device))
        x0 = x.clone()
        with err(lit("x: expected a contiguous tensor")):
            getattr(ops, op)(x, "none")
        assert torch.equal(x, x0)

    @pytest.mark.parametrize("approximate", ["exact", "", "Tanh", "NONE", "none ", "erf", "sigmoid"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_bad_approximate(self, device, op, approximate, dtype):
        x = acts((4, 33), dtype, device=device)
        x0 = x.clone()
        with err(lit(f"approximate: expected 'none' or 'tanh' (as torch.nn.functional.gelu), got '{approximate}'")):
            getattr(ops, op)(x, approximate)
        assert torch.equal(x, x0), f"{op} with a bad approximate modified x"

    def test_bad_approximate_on_empty(self, device, op):
        # checked before the empty early-out: the argument is wrong whatever x holds
        with err(lit("approximate: expected 'none' or 'tanh'")):
            getattr(ops, op)(torch.empty(0, 8, device=device), "exact")


# ---- bias_gelu ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
class TestBiasGelu:
    def test_x_dtype(self, device):
        with err(lit("x: expected a float32, float16 or bfloat16 tensor, got int64")):
            ops.bias_gelu(torch.ones(2, 8, dtype=torch.int64, device=device),
                          torch.ones(8, dtype=torch.int64, device=device), "none")

    def test_x_non_contiguous(self, device):
        with err(lit("x: expected a contiguous tensor")):
            ops.bias_gelu(non_contiguous(acts((8, 8), device=device)), acts((8,), device=device), "none")

    def test_bias_non_contiguous(self, device):
        bias = acts((16,), device=device)[::2]
        assert not bias.is_contiguous()
        with err(lit("bias: expected a contiguous tensor")):
            ops.bias_gelu(acts((2, 8), device=device), bias, "none")

    @pytest.mark.parametrize("xd,bd,xn,bn", [(torch.float32, torch.float16, "float32", "float16"),
                                             (torch.bfloat16, torch.float32, "bfloat16", "float32"),
                                             (torch.float16, torch.bfloat16, "float16", "bfloat16"),
                                             (torch.float32, torch.float64, "float32", "float64")])
    def test_bias_dtype(self, device, xd, bd, xn, bn):
        with err(lit(f"bias: expected the dtype of x ({xn}), got {bn}")):
            ops.bias_gelu(acts((2, 8), xd, device=device), acts((8,), bd, device=device), "none")

    @pytest.mark.parametrize("bshape,desc", [((7,), "1 dimensions of 7 elements"), ((9,), "1 dimensions of 9 elements"),
                                             ((1, 8), "2 dimensions of 8 elements"),
                                             ((2, 8), "2 dimensions of 16 elements"),
                                             ((), "0 dimensions of 1 elements"), ((0,), "1 dimensions of 0 elements")])
    def test_bias_shape(self, device, bshape, desc):
        with err(lit(f"bias: expected a 1-D tensor of x's last dimension (8), got {desc}")):
            ops.bias_gelu(acts((3, 8), device=device), acts(bshape, device=device), "none")

    def test_bias_for_the_first_dim(self, device):
        # bias of x's *first* dimension is still wrong (bias runs along the last one)
        with err(lit("bias: expected a 1-D tensor of x's last dimension (8), got 1 dimensions of 3 elements")):
            ops.bias_gelu(acts((3, 8), device=device), acts((3,), device=device), "none")

    def test_x_scalar(self, device):
        with err(lit("bias: expected a 1-D tensor of x's last dimension (0), got 1 dimensions of 1 elements")):
            ops.bias_gelu(torch.tensor(1.0, device=device), acts((1,), device=device), "none")

    @pytest.mark.parametrize("approximate", ["exact", "", "TANH"])
    def test_bad_approximate(self, device, approximate):
        with err(lit(f"approximate: expected 'none' or 'tanh' (as torch.nn.functional.gelu), got '{approximate}'")):
            ops.bias_gelu(acts((2, 8), device=device), acts((8,), device=device), approximate)

    def test_devices_differ(self, device):
        if device != "cuda":
            pytest.skip("needs a CUDA device")
        with err(lit("x and bias: expected tensors on the same device, got x on cuda:0 and bias on cpu")):
            ops.bias_gelu(acts((2, 8), device="cuda"), acts((8,), device="cpu"), "none")
        with err(lit("x and bias: expected tensors on the same device, got x on cpu and bias on cuda:0")):
            ops.bias_gelu(acts((2, 8), device="cpu"), acts((8,), device="cuda"), "none")


# ---- quantize (qtype / dtype / dim only; tests/test_quantize.py covers the rest) ----------------------

class TestQuantize:
    @pytest.mark.parametrize("qtype", [99, Q8_1, -1, 1])
    def test_unknown_qtype(self, qtype):
        with err(lit(f"qtype: unknown or unsupported weight format id {qtype}")):
            ops.quantize(torch.zeros(2, 256), qtype)

    @pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.float64, "float64"),
                                            (torch.bfloat16, "bfloat16"), (torch.int32, "int32")])
    def test_dtype(self, dtype, name):
        with err(lit(f"w: expected a float32 tensor, got {name}")):
            ops.quantize(torch.zeros(2, 256, dtype=dtype), Q4_K)

    @pytest.mark.parametrize("shape", [(256,), (1, 2, 256), ()], ids=str)
    def test_dim(self, shape):
        with err(lit(f"w: expected a 2-D weight [n, k], got {len(shape)} dimensions")):
            ops.quantize(torch.zeros(shape), Q6_K)


# ---- the Python wrappers: a format they cannot name is a ValueError before the op runs ----------------

def test_wrappers_reject_unknown_format_names():
    w, x = weight(), acts()
    with pytest.raises(ValueError, match="unsupported quantization format 99"):
        torchext.qmatmul(w, 99, x, N, K)
    with pytest.raises(ValueError, match="unknown quantization format 'Q3_X'"):
        torchext.qmatmul(w, "Q3_X", x, N, K)
    with pytest.raises(ValueError, match="unsupported quantization format 99"):
        torchext.dequantize(w, 99, N, K)
    # Q8_1 has a QType (it is the activation format) but is still refused by the op
    with err(lit("qtype: unknown or unsupported weight format id 9")):
        torchext.qmatmul(w, "Q8_1", x, N, K)


@pytest.mark.parametrize("bad", ["False", 1, None, np.bool_(True)], ids=repr)
def test_wrappers_take_exact_as_a_bool_and_eps_as_a_number(bad):
    """bool("False") is True: a flag that is not a bool is a TypeError naming it (QuantLinear's, QuantExperts'
    and TopKRouter's flags too), and eps must be a number (a string was float()'s message, naming nothing).
    numpy's bool, also named "bool", is named with its module ("expected a bool, got bool" was the message)."""
    from torchext.nn import QuantLinear

    w, x = weight(), acts()
    ids = torch.zeros(1, 1, dtype=torch.long)
    name = f"numpy.{np.bool_.__qualname__}" if isinstance(bad, np.bool_) else type(bad).__name__
    for call in (lambda: torchext.qmatmul(w, Q4_K, x, N, K, exact=bad),
                 lambda: torchext.qmatmul_id(w.unsqueeze(0), Q4_K, x[:1], ids, N, K, exact=bad),
                 lambda: QuantLinear(w, Q4_K, K, N, exact=bad)):
        with pytest.raises(TypeError, match=f"^exact: expected a bool, got {name}$"):
            call()
    with pytest.raises(TypeError, match="^eps: expected a number, got str$"):
        torchext.rms_norm_quantize_q8_1(x, torch.ones(K), "1e-6")
    with pytest.raises(TypeError, match="^eps: expected a number, got NoneType$"):
        torchext.add_rms_norm_quantize_q8_1(x, x, torch.ones(K), None)


# ---- qmatmul_q8_1 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_qmatmul_q8_1_errors(device):
    w8, xq = weight(Q8_0, device=device), q8(device=device)
    with err(lit("dtype: expected float32, float16 or bfloat16, got int32")):
        ops.qmatmul_q8_1(w8, Q8_0, xq, N, K, torch.int32)
    with err("qtype"):
        ops.qmatmul_q8_1(w8, 99, xq, N, K)
    with err("xq"):
        ops.qmatmul_q8_1(w8, Q8_0, xq[:, :-4], N, K)
    with err("xq"):
        ops.qmatmul_q8_1(w8, Q8_0, xq.view(torch.int8), N, K)
    with err(lit("w: expected")):
        ops.qmatmul_q8_1(w8[:-1], Q8_0, xq, N, K)


# ---- qmatmul_id -------------------------------------------------------------------------------------

def experts(qtype=Q4_K, count=3, device="cpu"):
    return torch.stack([weight(qtype, seed=e) for e in range(count)]).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_qmatmul_id_errors(device):
    """The checks test_fakes.py does not reach: storage alignment, and the kernels' own messages."""
    w, x = experts(device=device), acts(device=device)
    ids = torch.tensor([[0, 2], [1, 1]], device=device)
    with err(lit("w: storage must be 16-byte aligned (the alignment of its blocks); got an address 2 bytes")):
        ops.qmatmul_id(at_offset(w, 2), Q4_K, x, ids, N, K, False)
    with err(lit(f"w: expected Q4_K experts of shape [E, n, row bytes] = [E, {N}, 144] with E > 0, got [3, {N}, 143]")):
        ops.qmatmul_id(w[..., :-1].contiguous(), Q4_K, x, ids, N, K, False)
    with err(lit("ids: expected [T, top_k] for x of shape [T, k] or [T, top_k, k], got ids [2, 2] and x [2, 3, 256]")):
        ops.qmatmul_id(w, Q4_K, acts((2, 3, K), device=device), ids, N, K, False)
    with err(lit("ids: expected int64 or int32 expert ids, got int16")):
        ops.qmatmul_id(w, Q4_K, x, ids.short(), N, K, False)


# ---- an error leaves nothing behind -----------------------------------------------------------------

def _good_and_bad(device):
    """(name, good call, bad call) per op: the bad call fails in a check after the good one's
    tensors exist, so any state it could corrupt (cached buffers, streams) is the good call's."""
    w4, w6, w8 = weight(Q4_K, device=device), weight(Q6_K, device=device), weight(Q8_0, device=device)
    x1, x9 = acts((1, K), device=device, seed=1), acts((9, K), device=device, seed=2)
    xq = ops.quantize_q8_1(x1)
    b = acts((K,), device=device, seed=3)
    bad_x = acts((1, K - 32), device=device)
    we, ids = experts(device=device), torch.tensor([[0, 2]], device=device)
    return [
        ("quantize_q8_1", lambda: ops.quantize_q8_1(x1), lambda: ops.quantize_q8_1(x1.double())),
        ("q4k_q8_gemv", lambda: ops.q4k_q8_gemv(w4, xq, N, K), lambda: ops.q4k_q8_gemv(w4, xq[:, :-4], N, K)),
        ("q4k_q8_gemv_packed", lambda: ops.q4k_q8_gemv_packed(w4, xq, N, K),
         lambda: ops.q4k_q8_gemv_packed(at_offset(w4, 2), xq, N, K)),
        ("q4k_gemv", lambda: ops.q4k_gemv(w4, x1, N, K), lambda: ops.q4k_gemv(w4, bad_x, N, K)),
        ("q5k_gemv", lambda: ops.q5k_gemv(weight(Q5_K, device=device), x9, N, K),
         lambda: ops.q5k_gemv(w4, x9, N, K)),
        ("q6k_gemv", lambda: ops.q6k_gemv(w6, x1, N, K), lambda: ops.q6k_gemv(w6, x1, N + 1, K)),
        ("qmatmul", lambda: ops.qmatmul(w8, Q8_0, x9, N, K), lambda: ops.qmatmul(w8, 99, x9, N, K)),
        ("qmatmul_q8_1", lambda: ops.qmatmul_q8_1(w8, Q8_0, xq, N, K, torch.float16),
         lambda: ops.qmatmul_q8_1(w8, Q8_0, xq, N, K, torch.int32)),
        ("dequantize", lambda: ops.dequantize(w6, Q6_K, N, K, torch.bfloat16),
         lambda: ops.dequantize(w6, Q6_K, N, K, torch.int32)),
        ("gelu", lambda: ops.gelu(x9, "tanh"), lambda: ops.gelu(x9, "exact")),
        ("gelu_", lambda: torchext.gelu_(x9.clone(), "none"), lambda: ops.gelu_(x9, "bad")),
        ("bias_gelu", lambda: ops.bias_gelu(x9, b, "none"), lambda: ops.bias_gelu(x9, b[:-1], "none")),
        ("qmatmul_id", lambda: ops.qmatmul_id(we, Q4_K, x1, ids, N, K, False),
         lambda: ops.qmatmul_id(we, Q4_K, x1, ids.float(), N, K, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(13), ids=lambda i: ["quantize_q8_1", "q4k_q8_gemv", "q4k_q8_gemv_packed",
                                                           "q4k_gemv", "q5k_gemv", "q6k_gemv", "qmatmul",
                                                           "qmatmul_q8_1", "dequantize", "gelu", "gelu_",
                                                           "bias_gelu", "qmatmul_id"][i])
def test_op_still_works_after_an_error(device, index):
    name, good, bad = _good_and_bad(device)[index]
    before = good()
    for _ in range(3):
        with pytest.raises(RuntimeError):
            bad()
    after = good()
    assert torch.equal(before, after), f"{name} gives a different result after a failed call"
    if device == "cuda":
        torch.cuda.synchronize()  # a kernel launched on bad input would surface here


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs_are_not_errors(device):
    # An empty batch returns an empty result of the right shape; only n, k <= 0 are errors.
    w = weight(device=device)
    assert ops.quantize_q8_1(torch.empty(0, K, device=device)).shape == (0, 288)
    assert ops.quantize_q8_1(torch.empty(2, 0, K, device=device)).shape == (2, 0, 288)
    assert ops.q4k_q8_gemv(w, torch.empty(0, 288, dtype=torch.uint8, device=device), N, K).shape == (0, N)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = ops.qmatmul(w, Q4_K, torch.empty(2, 0, K, dtype=dtype, device=device), N, K)
        assert y.shape == (2, 0, N) and y.dtype == dtype
    assert ops.gelu(torch.empty(0, 3, device=device), "none").shape == (0, 3)
    assert ops.bias_gelu(torch.empty(0, 3, device=device), torch.ones(3, device=device), "none").shape == (0, 3)


# ---- sizes that overflow int64 -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [Q4_K, Q5_K, Q4_1, Q5_1, Q6_K, Q8_0])
def test_byte_count_overflow_raises(device, qtype):
    """n * row_bytes that wraps int64 once passed the byte check with a 144-byte weight (2^60 + 1
    rows of 144 bytes wrap to 144) and the kernels read far out of bounds; now it names n."""
    w = weight(qtype, n=1, k=256, device=device)
    rb = row_bytes(qtype, 256)
    n = 2**64 // rb + 1  # n * rb = 2^64 + (rb - 2^64 % rb): wraps to a small count
    n = min(n, 2**63 - 1)
    with err(lit("n: the size overflows int64")):
        ops.embedding(w, qtype, torch.tensor([2**40], device=device), n, 256, None)
    with err(lit("n: the size overflows int64")):
        ops.dequantize(w, qtype, n, 256, None)
    with err(lit("n: the size overflows int64")):
        ops.qmatmul(w, qtype, acts((1, 256), device=device), n, 256)
    # k near 2^63: a row of more bytes than values (Q8_0: 34 per 32) overflows; the others fit
    k = (2**63 - 1) // 32 * 32
    big_rows = qtype == Q8_0
    with err(lit("k: the size overflows int64") if big_rows else lit("w: expected ")):
        ops.dequantize(w, qtype, 1, k, None)
