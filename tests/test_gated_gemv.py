"""gated_gelu_qmatmul and gated_silu_qmatmul: a gated (GeGLU, SwiGLU) MLP's down projection from its gate
and up outputs.

The meaning of each is a composition of two tested ops, qmatmul_q8_1(w, qtype, gated_gelu_quantize_q8_1(gate,
up, approximate), n, k, gate.dtype), or the same with gated_silu_quantize_q8_1(gate, up) (test_fused.py
checks the Q8_1 bytes, against torchext.gelu, F.silu on CUDA and a float64 SiLU on the CPU; test_matmul.py
the GEMV against the float64 oracle), and it must return that composition's bits on the same device, whichever
way it runs: on CUDA each CTA of the DP4A GEMV quantizes the rows itself with the same arithmetic (one
launch), or, for rows the DP4A kernel does not take, the two ops run in turn; the CPU always composes.
So every check here is bit equality, no tolerance. Then: the launch count on CUDA, graph replay,
compile, and the error messages (opcheck and fake against real: tests/test_opcheck.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, WEIGHT_QTYPES, capture_graph, random_weight
from torch._subclasses.fake_tensor import FakeTensorMode

import torchext
from test_fused import ACTIVATIONS, gated_quantize_q8_1

ops = torch.ops.torchext
Q4_K, Q6_K, Q5_0, Q8_0 = 12, 14, 6, 8


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and bits (torch.equal would call two NaNs different)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def _gated(w, qtype, gate, up, n, k, activation="gelu-tanh"):
    """The op of an activation of test_fused.ACTIVATIONS: gated_gelu_qmatmul(..., approximate) or gated_silu_qmatmul."""
    if activation == "silu":
        return ops.gated_silu_qmatmul(w, qtype, gate, up, n, k)
    return ops.gated_gelu_qmatmul(w, qtype, gate, up, n, k, activation.removeprefix("gelu-"))


def _composed(w, qtype, gate, up, n, k, activation="gelu-tanh"):
    return ops.qmatmul_q8_1(w, qtype, gated_quantize_q8_1(activation, gate, up), n, k, gate.dtype)


def _inputs(lead, k, dtype, device, seed):
    return _randn((*lead, k), dtype, device, seed, scale=2.0), _randn((*lead, k), dtype, device, seed + 1)


# Every format at Gemma's down projection (640 x 2048) and at K = 320 (not a multiple of 256: padding),
# one row (the fused kernel on CUDA for every format), GELU's tanh form and SiLU.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n,k", [(640, 2048), (33, 320)], ids=["640x2048", "33x320"])
@pytest.mark.parametrize("activation", ["gelu-tanh", "silu"])
def test_every_format_equals_the_composition(device, qtype, n, k, activation):
    qtype = int(qtype)
    w = random_weight(qtype, n, k, device, seed=n)
    gate, up = _inputs((1,), k, torch.bfloat16, device, k)
    assert _same_bits(_gated(w, qtype, gate, up, n, k, activation), _composed(w, qtype, gate, up, n, k, activation))


# Rows 1-8 (the fused kernel's B = 1, 2, 4, 8; 32-value formats to 8 rows, the k-quants 1 on GPUs with
# int8 tensor cores), 9 and 17 rows (the two ops in turn), leading dimensions, both GELU forms and SiLU, dtypes.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("qtype", [Q4_K, Q6_K, Q5_0, Q8_0], ids=["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (5,), (8,), (2, 4), (9,), (17,)], ids=str)
def test_rows_equal_the_composition(device, dtype, activation, qtype, lead):
    n, k = 96, 1024
    w = random_weight(qtype, n, k, device, seed=len(lead))
    gate, up = _inputs(lead, k, dtype, device, sum(lead))
    got = _gated(w, qtype, gate, up, n, k, activation)
    assert got.shape == (*lead, n) and got.dtype == dtype
    assert _same_bits(got, _composed(w, qtype, gate, up, n, k, activation))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu-tanh", "silu"])
def test_huge_magnitudes_and_nan(device, dtype, activation):
    """Gates of +-1e4 (GELU and SiLU are x or -0 there), ups that keep products finite in float16, a NaN
    gate in one row and a -inf one in another (GELU and SiLU of -inf are NaN, as torch's): the composition's
    bits, NaN outputs only in those rows."""
    n, k = 64, 512
    w = random_weight(Q5_0, n, k, device, seed=1)
    gate = torch.stack([_randn(k, torch.float32, "cpu", 0, scale=1e4), torch.full((k,), -1e4),
                        _randn(k, torch.float32, "cpu", 1), _randn(k, torch.float32, "cpu", 4)])
    up = torch.stack([_randn(k, torch.float32, "cpu", 2, scale=1e-3), torch.full((k,), 2.0),
                      _randn(k, torch.float32, "cpu", 3), _randn(k, torch.float32, "cpu", 5)])
    gate[2, 7], gate[3, 300] = float("nan"), float("-inf")
    gate, up = gate.to(dtype).to(device), up.to(dtype).to(device)
    got = _gated(w, Q5_0, gate, up, n, k, activation)
    assert _same_bits(got, _composed(w, Q5_0, gate, up, n, k, activation))
    assert not got[:2].isnan().any() and got[2:].isnan().all()


def test_default_is_the_tanh_form():
    w = random_weight(Q8_0, 32, 64, seed=2)
    gate, up = _inputs((2,), 64, torch.float32, "cpu", 4)
    assert torch.equal(torchext.gated_gelu_qmatmul(w, Q8_0, gate, up, 32, 64),
                       ops.gated_gelu_qmatmul(w, Q8_0, gate, up, 32, 64, "tanh"))


def test_silu_wrapper_is_the_op():
    w = random_weight(Q8_0, 32, 64, seed=2)
    gate, up = _inputs((2,), 64, torch.float32, "cpu", 4)
    assert torch.equal(torchext.gated_silu_qmatmul(w, torchext.QType.Q8_0, gate, up, 32, 64),
                       ops.gated_silu_qmatmul(w, Q8_0, gate, up, 32, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["gelu-tanh", "silu"])
def test_empty_rows(device, activation):
    w = random_weight(Q4_K, 16, 256, device)
    gate = torch.zeros(0, 3, 256, device=device)
    assert _gated(w, Q4_K, gate, gate, 16, 256, activation).shape == (0, 3, 16)


# ---- CUDA: one launch, graph replay --------------------------------------------------------------------

def _kernel_launches(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# One kernel where the DP4A GEMV takes the rows; else gated_*_quantize_q8_1, then the GEMV: 16 rows of
# Q5_0 are one int8 tensor-core launch (kernels/batch_policy.h: from 9 rows of the 32-value formats on
# compute capability 8.0 and later), 2 rows of Q6_K too (from 2 rows of the 256-value formats).
@pytest.mark.parametrize("rows,qtype,launches", [(1, Q6_K, 1), (1, Q5_0, 1), (8, Q5_0, 1), (16, Q5_0, 2),
                                                 (2, Q6_K, 2)])
@pytest.mark.parametrize("activation", ["gelu-tanh", "silu"])
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with int8 tensor cores (compute capability 8.0 or later)")
def test_one_launch_where_the_gemv_computes_the_rows(rows, qtype, launches, activation):
    n, k = 640, 2048
    w = random_weight(qtype, n, k, "cuda")
    gate, up = _inputs((rows,), k, torch.bfloat16, "cuda", 0)
    _gated(w, qtype, gate, up, n, k, activation)  # warm-up
    assert _kernel_launches(lambda: _gated(w, qtype, gate, up, n, k, activation)) == launches


@pytest.mark.parametrize("activation", ["gelu-tanh", "silu"])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_graph_replay(activation):
    n, k = 640, 2048
    w = random_weight(Q6_K, n, k, "cuda")
    gate, up = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16), torch.zeros(1, k, device="cuda",
                                                                                dtype=torch.bfloat16)
    g, out = capture_graph(lambda: _gated(w, Q6_K, gate, up, n, k, activation))
    for seed in (1, 2):
        new_gate, new_up = _inputs((1,), k, torch.bfloat16, "cuda", seed)
        gate.copy_(new_gate), up.copy_(new_up)
        g.replay()
        torch.cuda.synchronize()
        assert _same_bits(out, _composed(w, Q6_K, new_gate, new_up, n, k, activation))


# ---- compile (opcheck and the fake: tests/test_opcheck.py) -------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrapper", [torchext.gated_gelu_qmatmul, torchext.gated_silu_qmatmul], ids=["gelu", "silu"])
def test_compiles_fullgraph(device, wrapper):
    n, k = 64, 512
    w = random_weight(Q4_K, n, k, device)
    gate, up = _inputs((1,), k, torch.bfloat16, device, 3)
    fn = torch.compile(lambda g, u: wrapper(w, Q4_K, g * 2, u, n, k) + 1, fullgraph=True)
    assert torch.equal(fn(gate, up), wrapper(w, Q4_K, gate * 2, up, n, k) + 1)


# ---- errors: the kernels' and the fakes' messages --------------------------------------------------------

def _bad_calls(device, activation):
    """(call, the start of its message); device: where the well-formed arguments live. The same
    messages for GELU and SiLU, but approximate's, GELU's only."""
    w = random_weight(Q4_K, 8, 256, device)
    x = torch.randn(2, 256, device=device)
    bf = x.to(torch.bfloat16)

    def call(*args):
        return _gated(*args, activation=activation)

    return [
        (lambda: call(w, Q4_K, x.to(torch.float64), x.to(torch.float64), 8, 256),
         "gate: expected a float32, float16 or bfloat16"),
        (lambda: call(w, Q4_K, x, bf, 8, 256), "up: expected the dtype of gate (float32), got bfloat16"),
        (lambda: call(w, Q4_K, x, x[:1], 8, 256), "up: expected the shape of gate [2, 256], got [1, 256]"),
        (lambda: call(w, Q4_K, x, torch.randn(256, 2, device=device).t(), 8, 256), "up: expected a contiguous tensor"),
        (lambda: call(w, Q4_K, torch.randn(256, 2, device=device).t(), x, 8, 256),
         "gate: expected a contiguous tensor"),
        (lambda: call(w, Q4_K, x[:, 1:].contiguous(), x[:, 1:].contiguous(), 8, 256),
         "gate: expected the last dimension to be k=256"),
        (lambda: call(w, Q4_K, x, x, 9, 256), "w: expected"),
        (lambda: call(w.float(), Q4_K, x, x, 8, 256), "w: expected"),
        (lambda: call(w, 99, x, x, 8, 256), "qtype"),
    ] + ([(lambda: ops.gated_gelu_qmatmul(w, Q4_K, x, x, 8, 256, "erf"), "approximate: expected 'none' or 'tanh'")]
         if activation != "silu" else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation,case", [(a, i) for a in ("gelu-tanh", "silu")
                                             for i in range(len(_bad_calls("cpu", a)))])
def test_errors_name_the_argument(device, activation, case):
    call, message = _bad_calls(device, activation)[case]
    with pytest.raises(RuntimeError) as real:
        call()
    assert message in str(real.value), str(real.value)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError) as fake:
            call()
    assert message in str(fake.value), str(fake.value)


@pytest.mark.parametrize("activation", ["gelu-tanh", "silu"])
def test_device_mismatch(activation):
    w = random_weight(Q4_K, 8, 256)
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match="gate and up: expected tensors on the same device"):
        _gated(w, Q4_K, x, x.to("meta"), 8, 256, activation)
    with pytest.raises(RuntimeError, match="w and gate: expected tensors on the same device"):
        _gated(w, Q4_K, x.to("meta"), x.to("meta"), 8, 256, activation)
