"""The fake (meta) kernels check what the real kernels check, with the same messages.

A fake runs wherever the real kernel does not: under FakeTensorMode (torch.compile's tracing) and
for every call with a meta tensor among its arguments, including a meta tensor mixed with CPU or
CUDA ones (the dispatcher picks the Meta kernel then). Each bad call below runs on the CPU kernel,
on meta tensors and under FakeTensorMode, and all three must raise a RuntimeError with the same
message. Two checks need data the fakes do not have, so they are not here: storage alignment
(an address) and embedding ids in range (values).

Every pair of devices among the tensor arguments of an op (cpu, meta and, where present, cuda)
must raise the error that names both devices, never return a tensor.
"""

from __future__ import annotations

import re
from itertools import permutations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import torchext  # noqa: F401  (loads the op library)
from conftest import random_weight, requires_cuda, row_bytes

ops = torch.ops.torchext
Q4_0, Q8_0, Q8_1, Q4_K, Q5_K, Q6_K = 2, 8, 9, 12, 13, 14
N, K = 4, 256


def _w(qtype=Q4_K, n=N, k=K):
    return random_weight(qtype, n, k, "cpu", seed=qtype)


def _x(shape=(2, K), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _xq(shape=(2, K)):
    return ops.quantize_q8_1(_x(shape))


def _transposed(t):
    return t.t().contiguous().t()


def _experts(qtype=Q4_K, experts=3, n=N, k=K):
    return torch.stack([random_weight(qtype, n, k, "cpu", seed=e) for e in range(experts)])


def _ids(tokens=2, top_k=2, experts=3):
    return (torch.arange(tokens * top_k) % experts).reshape(tokens, top_k)


# (id, op name, args): each call fails one check of the real kernel
BAD_CALLS = [
    # the weight checks every weight op shares (qmatmul stands for them, the others name theirs)
    ("qtype-unknown", "qmatmul", lambda: (_w(), 99, _x(), N, K)),
    ("qtype-q8_1", "qmatmul", lambda: (_w(), Q8_1, _x(), N, K)),
    ("qtype-negative", "dequantize", lambda: (_w(), -1, N, K, None)),
    ("n-zero", "qmatmul", lambda: (_w(), Q4_K, _x(), 0, K)),
    ("n-negative", "dequantize", lambda: (_w(), Q4_K, -3, K, None)),
    ("k-zero", "qmatmul", lambda: (_w(), Q4_K, _x((2, 0)), N, 0)),
    ("k-not-multiple-of-32", "qmatmul", lambda: (torch.zeros(N, 34, dtype=torch.uint8), Q8_0, _x((2, 40)), N, 40)),
    ("w-float", "qmatmul", lambda: (torch.zeros(N, 144), Q4_K, _x(), N, K)),
    ("w-int8", "q4k_q8_gemv", lambda: (torch.zeros(N, 144, dtype=torch.int8), _xq(), N, K)),
    ("w-non-contiguous", "qmatmul", lambda: (_transposed(_w()), Q4_K, _x(), N, K)),
    ("w-bytes-n", "qmatmul", lambda: (_w(), Q4_K, _x(), N + 1, K)),
    ("w-bytes-k", "dequantize", lambda: (_w(), Q4_K, N, 512, torch.float16)),
    ("w-other-format", "q6k_gemv", lambda: (_w(Q4_K), _x(), N, K)),
    ("w-other-format-q5k", "q5k_gemv", lambda: (_w(Q6_K), _x(), N, K)),
    ("w-bytes-q4k_gemv", "q4k_gemv", lambda: (_w()[:-1], _x(), N, K)),
    ("w-bytes-embedding", "embedding", lambda: (_w(Q8_0), Q8_0, torch.tensor([0]), N + 1, K, None)),
    ("w-bytes-qmatmul_q8_1", "qmatmul_q8_1", lambda: (_w(Q4_0), Q4_0, _xq(), N, 512, None)),
    # sizes past int64 (a wrapped product once passed the byte check)
    ("n-overflows", "dequantize", lambda: (_w(n=1), Q4_K, 2**64 // 144 + 1, K, None)),
    ("n-overflows-embedding", "embedding", lambda: (_w(Q4_K, n=1), Q4_K, torch.tensor([2**40]), 2**60 + 1, K, None)),
    ("k-overflows", "dequantize", lambda: (_w(Q8_0, n=1), Q8_0, 1, (2**63 - 1) // 32 * 32, None)),
    # float activations
    ("x-int64", "qmatmul", lambda: (_w(), Q4_K, torch.ones(2, K, dtype=torch.int64), N, K)),
    ("x-float64", "q5k_gemv", lambda: (_w(Q5_K), _x(dtype=torch.float64), N, K)),
    ("x-non-contiguous", "qmatmul", lambda: (_w(), Q4_K, _transposed(_x((3, K))), N, K)),
    ("x-scalar", "q4k_gemv", lambda: (_w(), torch.tensor(1.0), N, K)),
    ("x-last-dim", "qmatmul", lambda: (_w(), Q4_K, _x((2, K - 32)), N, K)),
    ("x-transposed-shape", "q6k_gemv", lambda: (_w(Q6_K), _x((K, 2)), N, K)),
    # Q8_1 activations
    ("xq-float", "q4k_q8_gemv", lambda: (_w(), _xq().float(), N, K)),
    ("xq-int8", "q4k_q8_gemv_packed", lambda: (_w(), _xq().view(torch.int8), N, K)),
    ("xq-non-contiguous", "qmatmul_q8_1", lambda: (_w(), Q4_K, _transposed(_xq((3, K))), N, K, None)),
    ("xq-scalar", "q4k_q8_gemv", lambda: (_w(), torch.tensor(0, dtype=torch.uint8), N, K)),
    ("xq-last-dim", "qmatmul_q8_1", lambda: (_w(Q8_0), Q8_0, _xq()[:, :-36].contiguous(), N, K, None)),
    ("xq-last-dim-odd-k", "q4k_q8_gemv", lambda: (_w(k=300), torch.zeros(1, 360, dtype=torch.uint8), N, 300)),
    # output dtypes
    ("dtype-int32-qmatmul_q8_1", "qmatmul_q8_1", lambda: (_w(Q8_0), Q8_0, _xq(), N, K, torch.int32)),
    ("dtype-float64-dequantize", "dequantize", lambda: (_w(), Q4_K, N, K, torch.float64)),
    ("dtype-uint8-embedding", "embedding", lambda: (_w(), Q4_K, torch.tensor([1]), N, K, torch.uint8)),
    # embedding ids
    ("ids-float", "embedding", lambda: (_w(), Q4_K, torch.tensor([1.0]), N, K, None)),
    ("ids-int16", "embedding", lambda: (_w(), Q4_K, torch.tensor([1], dtype=torch.int16), N, K, None)),
    ("ids-non-contiguous", "embedding", lambda: (_w(), Q4_K, _transposed(torch.zeros(2, 3, dtype=torch.long)), N, K,
                                                  None)),
    # qmatmul_id: experts [E, n, row bytes], x [T, k] or [T, top_k, k], ids [T, top_k]
    ("id-w-2d", "qmatmul_id", lambda: (_w(), Q4_K, _x(), _ids(), N, K, False)),
    ("id-w-rows", "qmatmul_id", lambda: (_experts(n=N + 1), Q4_K, _x(), _ids(), N, K, False)),
    ("id-w-no-experts", "qmatmul_id", lambda: (_experts()[:0], Q4_K, _x(), _ids(), N, K, False)),
    ("id-w-too-many-experts", "qmatmul_id", lambda: (torch.zeros(4097, 1, 144, dtype=torch.uint8), Q4_K, _x(), _ids(),
                                                     1, K, False)),
    ("id-w-float", "qmatmul_id", lambda: (_experts().float(), Q4_K, _x(), _ids(), N, K, False)),
    ("id-w-k", "qmatmul_id", lambda: (_experts(), Q4_K, _x((2, 512)), _ids(), N, 512, False)),
    ("id-x-4d", "qmatmul_id", lambda: (_experts(), Q4_K, _x((2, 2, 1, K)), _ids(), N, K, False)),
    ("id-x-int", "qmatmul_id", lambda: (_experts(), Q4_K, torch.ones(2, K, dtype=torch.int32), _ids(), N, K, False)),
    ("id-x-per-slot", "qmatmul_id", lambda: (_experts(), Q4_K, _x((2, 3, K)), _ids(), N, K, False)),
    ("id-ids-float", "qmatmul_id", lambda: (_experts(), Q4_K, _x(), _ids().float(), N, K, False)),
    ("id-ids-1d", "qmatmul_id", lambda: (_experts(), Q4_K, _x(), _ids()[:, 0].contiguous(), N, K, False)),
    ("id-ids-tokens", "qmatmul_id", lambda: (_experts(), Q4_K, _x(), _ids(tokens=3), N, K, False)),
    ("id-ids-non-contiguous", "qmatmul_id", lambda: (_experts(), Q4_K, _x((3, K)), _transposed(_ids(tokens=2, top_k=3)),
                                                     N, K, False)),
    # quantize_q8_1
    ("q8_1-int", "quantize_q8_1", lambda: (torch.ones(2, K, dtype=torch.int32),)),
    ("q8_1-bool", "quantize_q8_1", lambda: (torch.ones(2, K, dtype=torch.bool),)),
    ("q8_1-scalar", "quantize_q8_1", lambda: (torch.tensor(1.0),)),
    ("q8_1-zero-k", "quantize_q8_1", lambda: (torch.ones(3, 0),)),
    ("q8_1-non-contiguous", "quantize_q8_1", lambda: (_transposed(_x((4, K))),)),
    # a K whose Q8_1 bytes overflow int64: the fake gave a wrapped shape, the kernel an error naming no argument
    ("q8_1-bytes-overflow", "quantize_q8_1", lambda: (torch.empty(0, 2**63 - 1),)),
    ("gated-q8_1-bytes-overflow", "gated_silu_quantize_q8_1",
     lambda: (torch.empty(0, 2**63 - 1), torch.empty(0, 2**63 - 1))),
    # GELU
    ("gelu-int", "gelu", lambda: (torch.ones(3, dtype=torch.int64), "none")),
    ("gelu-approximate", "gelu", lambda: (_x(), "exact")),
    ("gelu-non-contiguous", "gelu", lambda: (_transposed(_x((3, 5))), "tanh")),
    ("gelu_-float64", "gelu_", lambda: (_x(dtype=torch.float64), "none")),
    ("gelu_-approximate", "gelu_", lambda: (_x(), "bad")),
    ("bias_gelu-x-dtype", "bias_gelu", lambda: (torch.ones(2, 3, dtype=torch.int32), torch.ones(3), "none")),
    ("bias_gelu-bias-dtype", "bias_gelu", lambda: (_x((2, 3)), torch.ones(3, dtype=torch.float16), "none")),
    ("bias_gelu-bias-length", "bias_gelu", lambda: (_x((2, 3)), torch.ones(2), "none")),
    ("bias_gelu-bias-2d", "bias_gelu", lambda: (_x((2, 3)), torch.ones(1, 3), "none")),
    ("bias_gelu-bias-non-contiguous", "bias_gelu", lambda: (_x((3, 3)), _transposed(torch.ones(3, 3))[0], "none")),
    ("bias_gelu-approximate", "bias_gelu", lambda: (_x((2, 3)), torch.ones(3), "sigmoid")),
    # quantize (dense float32 [n, k] -> bytes)
    ("quantize-float64", "quantize", lambda: (_x((2, K), torch.float64), Q4_K)),
    ("quantize-1d", "quantize", lambda: (_x((K,)), Q4_K)),
    ("quantize-qtype", "quantize", lambda: (_x((2, K)), 99)),
    ("quantize-k-not-multiple-of-32", "quantize", lambda: (_x((2, 40)), Q8_0)),
    ("quantize-no-rows", "quantize", lambda: (_x((0, K)), Q4_K)),
    ("quantize-non-contiguous", "quantize", lambda: (_transposed(_x((K, 2))), Q4_K)),
    ("quantize-no-quantizer", "quantize", lambda: (_x((2, K)), int(torchext.QType.IQ2_XXS))),  # an imatrix format
]


def _on_meta(a):
    # a meta tensor with a's strides (.to("meta") makes a gapped tensor contiguous)
    if not isinstance(a, torch.Tensor):
        return a
    return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")


def _real_message(name, args):
    with pytest.raises(RuntimeError) as real:
        getattr(ops, name)(*args)
    return str(real.value)


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_fake_raises_what_the_kernel_raises(case):
    _, name, make_args = case
    args = make_args()
    message = _real_message(name, args)
    on_meta = tree_map(_on_meta, args)
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        getattr(ops, name)(*on_meta)
    with FakeTensorMode() as mode:
        fake = tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, args)
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            getattr(ops, name)(*fake)


def test_fakes_pass_what_the_kernel_passes():
    # the boundaries of the checks above, accepted by both: a k-quant at any k, a 1-D x, int32
    # ids, flat weight bytes, an empty batch
    w5 = torch.zeros(N * row_bytes(Q4_K, 48), dtype=torch.uint8)
    calls = [
        ("qmatmul", (w5, Q4_K, _x((1, 48)), N, 48)),
        ("qmatmul", (_w(Q8_0).flatten(), Q8_0, _x((K,)), N, K)),
        ("embedding", (_w(), Q4_K, torch.tensor([[0, 3]], dtype=torch.int32), N, K, torch.bfloat16)),
        ("qmatmul_q8_1", (_w(), Q4_K, _xq((0, K)), N, K, torch.float16)),
        ("qmatmul_id", (_experts(), Q4_K, _x((0, K)).bfloat16(), _ids(tokens=0).int(), N, K, False)),
        ("qmatmul_id", (_experts(), Q4_K, _x((2, 2, K)), _ids().int(), N, K, True)),
        ("bias_gelu", (_x((0, 3)), torch.ones(3), "tanh")),
    ]
    for name, args in calls:
        real = getattr(ops, name)(*args)
        meta = getattr(ops, name)(*tree_map(_on_meta, args))
        assert meta.shape == real.shape and meta.dtype == real.dtype and meta.is_meta, name


# ---- mixed devices -------------------------------------------------------------------------------

_CUDA = "cuda:0"
PAIRS = [pytest.param(a, b, marks=[requires_cuda] if _CUDA in (a, b) else [], id=f"{a}-{b}")
         for a, b in permutations(["cpu", "meta", _CUDA], 2)]


def _device_error(a_name, a_dev, b_name, b_dev):
    return pytest.raises(RuntimeError, match=re.escape(
        f"{a_name} and {b_name}: expected tensors on the same device, got {a_name} on {a_dev} and {b_name} on {b_dev}"))


# (id, a call with its first tensor argument on one device and its second on another, their names)
MIXED = [
    ("qmatmul-gemv", lambda a, b: ops.qmatmul(_w().to(a), Q4_K, _x((1, K)).to(b), N, K), ("w", "x")),
    ("qmatmul-dense", lambda a, b: ops.qmatmul(_w(Q8_0).to(a), Q8_0, _x((17, K)).to(b), N, K), ("w", "x")),
    ("q4k_gemv", lambda a, b: ops.q4k_gemv(_w().to(a), _x().to(b), N, K), ("w", "x")),
    ("q5k_gemv", lambda a, b: ops.q5k_gemv(_w(Q5_K).to(a), _x((17, K)).to(b), N, K), ("w", "x")),
    ("q6k_gemv", lambda a, b: ops.q6k_gemv(_w(Q6_K).to(a), _x().to(b), N, K), ("w", "x")),
    ("q4k_q8_gemv", lambda a, b: ops.q4k_q8_gemv(_w().to(a), _xq().to(b), N, K), ("w", "xq")),
    ("q4k_q8_gemv_packed", lambda a, b: ops.q4k_q8_gemv_packed(_w().to(a), _xq().to(b), N, K), ("w", "xq")),
    ("qmatmul_q8_1", lambda a, b: ops.qmatmul_q8_1(_w(Q8_0).to(a), Q8_0, _xq().to(b), N, K, None), ("w", "xq")),
    ("embedding", lambda a, b: ops.embedding(_w().to(a), Q4_K, torch.tensor([0, 3]).to(b), N, K, None),
     ("w", "ids")),
    ("qmatmul_id-x", lambda a, b: ops.qmatmul_id(_experts().to(a), Q4_K, _x().to(b), _ids().to(a), N, K, False),
     ("w", "x")),
    ("qmatmul_id-ids", lambda a, b: ops.qmatmul_id(_experts().to(a), Q4_K, _x().to(a), _ids().to(b), N, K, False),
     ("w", "ids")),
    ("bias_gelu", lambda a, b: ops.bias_gelu(_x((2, 3)).to(a), torch.ones(3).to(b), "none"), ("x", "bias")),
]


@pytest.mark.parametrize("first, second", PAIRS)
@pytest.mark.parametrize("case", MIXED, ids=[c[0] for c in MIXED])
def test_mixed_devices_raise_naming_both(case, first, second):
    _, call, (a_name, b_name) = case
    with _device_error(a_name, first, b_name, second):
        call(first, second)


@pytest.mark.parametrize("first, second", PAIRS)
def test_mixed_devices_through_the_wrappers(first, second):
    # the Python API on top: QuantLinear's weight on one device and its input on another
    layer = torchext.nn.QuantLinear(_w(Q8_0), "Q8_0", K, N).to(first)
    with _device_error("w", first, "x", second):
        layer(_x((1, K)).to(second))
    with _device_error("w", first, "ids", second):
        torchext.embedding(_w().to(first), "Q4_K", torch.tensor([1]).to(second), N, K)

