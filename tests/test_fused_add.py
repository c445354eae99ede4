"""add_rms_norm_quantize_q8_1: a residual add and the next norm's Q8_1 input in one kernel.

op(x, residual, weight, eps, x_weight) returns s = residual + t, with t = x or, given x_weight, x's
RMS norm (a post-norm, as Gemma 2/3 apply to a sublayer's output before adding it to the residual
stream), and xq = rms_norm_quantize_q8_1(s, weight, eps). Its arithmetic is fixed: the add is
torch's (a float32 sum rounded to x's dtype) and both norms are rms_norm_quantize_q8_1's (every step
a float32 rounding, the sum of squares in one fixed order, the same on the CPU and CUDA). So every
comparison here is exact, s value for value and xq byte for byte, against references computed on
the CPU (tests/test_fused.py's rms_norm_reference, then quantize_q8_1), CUDA's results included:
every dtype and shape, huge, tiny, infinite and NaN values, misaligned inputs; the unfused ops on
the same device; torch.compile(fullgraph=True), the error messages of the kernels and of the fake
(opcheck and the fake against the real op: tests/test_opcheck.py). Only the Gemma 3 test compares
with the model's RMSNorm, whose sum of squares runs in torch's order, within a stated bound.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES
from test_fused import (EPS, SHAPES, _assert_bytes_equal, _misaligned, _norm_weight, _randn, assert_error_starts_with,
                        rms_norm_reference)

import torchext
from torchext.models.gemma3 import RMSNorm

ops = torch.ops.torchext
#: the post-norm weight (x_weight) of a case: none, float32 or x's dtype
POST_NORMS = ["none", "post_f32", "post_xdtype"]


def _x_weight(post_norm, k, dtype, seed):
    if post_norm == "none":
        return None
    return _norm_weight(k, torch.float32 if post_norm == "post_f32" else dtype, seed)


def _reference(x, residual, weight, x_weight=None):
    """The op's (s, xq), composed on the CPU: torch's add, rms_norm_reference, quantize_q8_1."""
    t = x.cpu() if x_weight is None else rms_norm_reference(x, x_weight, EPS)
    s = residual.cpu() + t
    return s, ops.quantize_q8_1(rms_norm_reference(s, weight, EPS))


def _assert_values_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Exactly equal values (infinities included, NaN where want has NaN), dtype and shape."""
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def _assert_outputs_equal(got, want) -> None:
    _assert_values_equal(got[0], want[0])
    _assert_bytes_equal(got[1], want[1])


# ---- the values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("post_norm", POST_NORMS)
@pytest.mark.parametrize("weight_float32", [True, False], ids=["w_f32", "w_xdtype"])
@pytest.mark.parametrize("lead,k", SHAPES)
def test_outputs_equal_the_composition(device, dtype, post_norm, weight_float32, lead, k):
    x = _randn((*lead, k), dtype, "cpu", seed=k)
    residual = _randn((*lead, k), dtype, "cpu", seed=k + 2, scale=4.0)
    weight = _norm_weight(k, torch.float32 if weight_float32 else dtype, seed=k + 1)
    x_weight = _x_weight(post_norm, k, dtype, seed=k + 3)
    want = _reference(x, residual, weight, x_weight)
    got = ops.add_rms_norm_quantize_q8_1(x.to(device), residual.to(device), weight.to(device), EPS,
                                         x_weight=None if x_weight is None else x_weight.to(device))
    _assert_outputs_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("post_norm", POST_NORMS)
@pytest.mark.parametrize("shape", [(1, 640), (2, 3, 300)], ids=str)
def test_outputs_equal_the_unfused_ops_on_the_device(device, dtype, post_norm, shape):
    k = shape[-1]
    x = _randn(shape, dtype, device, seed=0)
    residual = _randn(shape, dtype, device, seed=1, scale=4.0)
    weight = _norm_weight(k, torch.float32, seed=2).to(device)
    x_weight = _x_weight(post_norm, k, dtype, seed=3)
    if x_weight is None:
        t = x
    else:
        t, x_weight = rms_norm_reference(x, x_weight, EPS).to(device), x_weight.to(device)
    s = residual + t
    got = ops.add_rms_norm_quantize_q8_1(x, residual, weight, EPS, x_weight=x_weight)
    assert got[0].device == got[1].device == s.device
    _assert_outputs_equal(got, (s, ops.rms_norm_quantize_q8_1(s, weight, EPS)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("post_norm", ["none", "post_f32"])
def test_huge_tiny_infinite_and_nan_values(device, dtype, post_norm):
    """Rows: a residual stream of 1e4; residual and x near the dtype's largest value (3e38, or 6e4 in
    float16), their signs alternating in x, so that the sum overflows to inf where they agree (with
    a post-norm, x^2 overflows and x normalises to zeros instead); tiny values (1e-30, float16's
    subnormal 1e-6); zeros; a NaN in x. s is torch's add, NaN and inf included, and xq the
    reference's bytes, whatever Q8_1 makes of an infinite or NaN row."""
    k = 300
    big = 6e4 if dtype == torch.float16 else 3e38
    tiny = 1e-6 if dtype == torch.float16 else 1e-30
    signs = torch.tensor([1.0, -1.0]).repeat(k // 2)
    nan_x = _randn(k, torch.float32, "cpu", 4)
    nan_x[7] = float("nan")
    x = torch.stack([_randn(k, torch.float32, "cpu", 0), big * signs, _randn(k, torch.float32, "cpu", 1, scale=tiny),
                     torch.zeros(k), nan_x]).to(dtype)
    residual = torch.stack([_randn(k, torch.float32, "cpu", 2, scale=1e4), torch.full((k,), big),
                            _randn(k, torch.float32, "cpu", 3, scale=tiny), torch.zeros(k),
                            _randn(k, torch.float32, "cpu", 5)]).to(dtype)
    weight = _norm_weight(k, torch.float32, seed=6)
    x_weight = _x_weight(post_norm, k, dtype, seed=7)
    want = _reference(x, residual, weight, x_weight)
    assert want[0][-1].isnan().any() and (x_weight is not None or want[0][1].isinf().any())
    got = ops.add_rms_norm_quantize_q8_1(x.to(device), residual.to(device), weight.to(device), EPS,
                                         x_weight=None if x_weight is None else x_weight.to(device))
    _assert_outputs_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_inputs_give_the_same_outputs(device, dtype):
    k = 512
    args = [_randn((3, k), dtype, device, 0), _randn((3, k), dtype, device, 1), _norm_weight(k, dtype, 2).to(device),
            _norm_weight(k, dtype, 3).to(device)]
    want = ops.add_rms_norm_quantize_q8_1(*args[:3], EPS, x_weight=args[3])
    for i in range(len(args)):
        x, residual, weight, x_weight = (_misaligned(a) if j == i else a for j, a in enumerate(args))
        _assert_outputs_equal(ops.add_rms_norm_quantize_q8_1(x, residual, weight, EPS, x_weight=x_weight), want)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_give_empty_outputs(device):
    x = torch.zeros(0, 3, 300, device=device)
    s, xq = ops.add_rms_norm_quantize_q8_1(x, x.clone(), torch.ones(300, device=device), EPS,
                                           x_weight=torch.ones(300, device=device))
    assert (s.shape, s.dtype, xq.shape, xq.dtype) == ((0, 3, 300), torch.float32, (0, 3, 2 * 288), torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
def test_gemma3_post_norm_residual_add_and_pre_norm(device):
    """A Gemma 3 layer adds its sublayer's output y, post-normed, to the residual stream h, and
    pre-normalises the sum for the next sublayer: the op's s is h + post(y) with the documented norm
    for post, exactly, and xq the next input's bytes. Against the model's h + post(y): where the two
    norms of y agree the sums are equal; elsewhere the norms part by less than rtol |t'| (t' the
    model's; test_fused's test_rms_norm_reference_is_the_models_rmsnorm_up_to_the_sum_order bounds
    it), and each sum is rounded to float32 and then to bfloat16 (relative error below 2^-8 + 2^-23),
    so |s - s'| <= rtol |t'| + (2^-8 + 2^-23)(|h + t| + |h + t'|): about one bfloat16 unit of t."""
    k = 640
    h = _randn((1, k), torch.bfloat16, "cpu", 0, scale=4.0)
    y = _randn((1, k), torch.bfloat16, "cpu", 1)
    post, pre = RMSNorm(_norm_weight(k, torch.float32, 2), EPS), RMSNorm(_norm_weight(k, torch.float32, 3), EPS)
    s, xq = ops.add_rms_norm_quantize_q8_1(y.to(device), h.to(device), pre.weight.to(device), EPS,
                                           x_weight=post.weight.to(device))
    t = rms_norm_reference(y, post.weight, EPS)
    _assert_values_equal(s, h + t)
    _assert_bytes_equal(xq, ops.rms_norm_quantize_q8_1(h + t, pre.weight, EPS))

    s, t_model = s.cpu(), post(y)
    s_model = h + t_model
    agree = t == t_model
    assert torch.equal(s[agree], s_model[agree])
    rtol = (k + 3) * 2.0**-24 + torch.finfo(torch.bfloat16).eps
    t, t_model, hf = t.float(), t_model.float(), h.float()
    bound = rtol * t_model.abs() + (2.0**-8 + 2.0**-23) * ((hf + t).abs() + (hf + t_model).abs())
    assert ((s.float() - s_model.float()).abs() <= bound).all()


# ---- compile -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiles_fullgraph_into_the_gemv(device, dtype):
    """A decoder layer's tail: the post-normed sublayer output added to the residual stream, the
    next norm's Q8_1 input and its first GEMV, in one compiled graph, with the eager outputs."""
    k, n = 256, 512
    layer = torchext.nn.QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), "Q4_K").to(device)
    post, pre = _norm_weight(k, torch.float32, 0).to(device), _norm_weight(k, torch.float32, 1).to(device)

    def tail(y, h):
        s, xq = torchext.add_rms_norm_quantize_q8_1(y, h, pre, EPS, x_weight=post)
        return s, layer.forward_q8_1(xq, y.dtype)

    y, h = _randn((3, k), dtype, device, 2), _randn((3, k), dtype, device, 3, scale=4.0)
    compiled = torch.compile(tail, fullgraph=True, dynamic=False)
    for got, want in zip(compiled(y, h), tail(y, h)):
        assert torch.equal(got, want)


# ---- errors: the kernels' and the fake's messages ------------------------------------------------------

def _bad_calls(device):
    """(call, the start of its message); device: where the well-formed arguments live. Each call has
    one argument wrong."""
    op = ops.add_rms_norm_quantize_q8_1
    x, r = torch.randn(2, 64, device=device), torch.randn(2, 64, device=device)
    w = torch.ones(64, device=device)
    bf, rbf = x.to(torch.bfloat16), r.to(torch.bfloat16)
    calls = [
        (lambda: op(x.double(), r.double(), w, EPS), "x: expected a float32, float16 or bfloat16"),
        (lambda: op(torch.randn(2, 64, device=device).t(), torch.randn(64, 2, device=device),
                    torch.ones(2, device=device), EPS), "x: expected a contiguous tensor"),
        (lambda: op(x[:, :0], r[:, :0], w[:0], EPS), "x: expected a positive last dimension (K), got 0"),
        (lambda: op(x[0, 0], r[0, 0], w, EPS), "x: expected activations of shape [..., K]"),
        (lambda: op(x, rbf, w, EPS), "residual: expected the dtype of x (float32), got bfloat16"),
        (lambda: op(x, r[:1], w, EPS), "residual: expected the shape of x [2, 64], got [1, 64]"),
        (lambda: op(x, r[None], w, EPS), "residual: expected the shape of x [2, 64], got [1, 2, 64]"),
        (lambda: op(x, torch.randn(64, 2, device=device).t(), w, EPS), "residual: expected a contiguous tensor"),
    ]

    def with_norm_weight(name, bad, x=x, r=r):
        """The call with `bad` for the norm weight `name` (weight or x_weight), the rest well-formed."""
        if name == "weight":
            return lambda: op(x, r, bad, EPS)
        return lambda: op(x, r, w, EPS, x_weight=bad)

    for name in ("weight", "x_weight"):  # the same checks, the messages under each one's name
        calls += [
            (with_norm_weight(name, torch.ones(63, device=device)),
             f"{name}: expected shape [64] (x's last dimension), got [63]"),
            (with_norm_weight(name, torch.ones(1, 64, device=device)),
             f"{name}: expected shape [64] (x's last dimension), got [1, 64]"),
            (with_norm_weight(name, w.half(), bf, rbf),
             f"{name}: expected float32 or the dtype of x (bfloat16), got float16"),
            (with_norm_weight(name, torch.ones(64, 2, device=device)[:, 0]), f"{name}: expected a contiguous tensor"),
        ]
    calls += [(lambda eps=eps: op(x, r, w, eps), "eps: expected a number >= 0 that float32 holds")
              for eps in (-1.0, float("nan"), 1e39)]
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
def test_errors_name_the_argument(device, case):
    assert_error_starts_with(*_bad_calls(device)[case])


def _call_with_one_elsewhere(device, arg, elsewhere):
    """The op on tensors on `device` but for `arg` (residual, weight or x_weight), on `elsewhere`."""
    args = {"x": torch.randn(2, 64, device=device), "residual": torch.randn(2, 64, device=device),
            "weight": torch.ones(64, device=device), "x_weight": torch.ones(64, device=device)}
    args[arg] = args[arg].to(elsewhere)
    return ops.add_rms_norm_quantize_q8_1(args["x"], args["residual"], args["weight"], EPS, x_weight=args["x_weight"])


@pytest.mark.parametrize("arg", ["residual", "weight", "x_weight"])
def test_device_mismatch(arg):
    """A meta tensor with CPU ones (the fake rejects it: no uninitialised result); CUDA's case below
    runs the kernels' check."""
    with pytest.raises(RuntimeError, match=f"x and {arg}: expected tensors on the same device"):
        _call_with_one_elsewhere("cpu", arg, "meta")


@pytest.mark.parametrize("arg", ["residual", "weight", "x_weight"])
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_device_mismatch_cuda(arg, device):
    with pytest.raises(RuntimeError, match=f"x and {arg}: expected tensors on the same device, got x on cuda:0 and "
                                           f"{arg} on cpu"):
        _call_with_one_elsewhere(device, arg, "cpu")


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_cuda_runs_on_the_current_stream_and_the_inputs_device(device):
    """The kernel launches on the current stream (a side stream here: its work is done once it is
    synchronised) and under a guard for the inputs' device (the last GPU while cuda:0 is current)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, residual = _randn((3, 640), torch.bfloat16, dev, 0), _randn((3, 640), torch.bfloat16, dev, 1, scale=4.0)
    weight, x_weight = _norm_weight(640, torch.float32, 2).to(dev), _norm_weight(640, torch.float32, 3).to(dev)
    want = _reference(x, residual, weight, x_weight)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.device(0), torch.cuda.stream(side):
        got = ops.add_rms_norm_quantize_q8_1(x, residual, weight, EPS, x_weight=x_weight)
    side.synchronize()
    assert got[0].device == got[1].device == dev
    _assert_outputs_equal(got, want)
