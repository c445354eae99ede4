"""Gradients through the ops, against the same computation in dense torch ops.

The matmul ops' gradient w.r.t. x is grad @ dequantize(w): checked against autograd through
x @ dequantize(w).T in float32 (same dense weight, so only fp32 summation order differs: 1e-5
relative). GELU's gradient is aten.gelu_backward at x (or x + bias in fp32): checked against
autograd through F.gelu; bias_gelu's bias gradient is the sum over leading dimensions. gelu_
behaves as torch's in-place ops: it refuses a leaf that requires grad, gives any other tensor
F.gelu's gradient, and moves the version counter of what it overwrites.
"""

import pytest
import torch
import torch.nn.functional as F

import torchext
from conftest import DEVICES, cached_weight

QTYPES = [torchext.QType.Q4_K, torchext.QType.Q6_K, torchext.QType.Q8_0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 12], ids=["gemv", "dense"])
def test_qmatmul_gradient(qtype, rows, device):
    n, k = 24, 512
    w, _ = cached_weight(qtype, n, k)
    w = w.to(device)
    x = torch.randn(2, rows, k, device=device, requires_grad=True)
    g = torch.randn(2, rows, n, device=device)
    torchext.qmatmul(w, qtype, x, n, k).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ torchext.dequantize(w, qtype, n, k).T).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_format_op_gradient(device):
    n, k = 16, 256
    w, _ = cached_weight(torchext.QType.Q5_K, n, k)
    w = w.to(device)
    x = torch.randn(3, k, device=device, requires_grad=True)
    torchext.q5k_gemv(w, x, n, k).sum().backward()
    expected = torchext.dequantize(w, torchext.QType.Q5_K, n, k).sum(0).expand(3, k)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_bias_gelu_gradients(approximate, device):
    x = torch.randn(4, 7, 32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    g = torch.randn(4, 7, 32, device=device)
    torchext.gelu(x, approximate).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    F.gelu(x_ref, approximate=approximate).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)

    x.grad = None
    torchext.bias_gelu(x, b, approximate).backward(g)
    x_ref, b_ref = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.gelu(x_ref + b_ref, approximate=approximate).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-5, atol=1e-5)


def test_weights_take_no_gradient():
    n, k = 8, 256
    w, _ = cached_weight(torchext.QType.Q4_K, n, k)
    x = torch.randn(1, k, requires_grad=True)
    y = torchext.qmatmul(w, torchext.QType.Q4_K, x, n, k)
    (grad_x,) = torch.autograd.grad(y.sum(), (x,))
    assert grad_x.shape == x.shape and not w.requires_grad


# ---- gelu_ under autograd: as torch's in-place ops ------------------------------------------------

INPLACE_GELU = [torchext.gelu_, torch.ops.torchext.gelu_]  # the wrapper and the op itself


@pytest.mark.parametrize("gelu_", INPLACE_GELU, ids=["wrapper", "op"])
def test_gelu_inplace_on_a_leaf_that_requires_grad_raises(gelu_):
    x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place operation"):
        gelu_(x)
    assert torch.equal(x.detach(), torch.tensor([-1.0, 0.5, 2.0]))  # left as it was
    with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad is being used in an in-place"):
        gelu_(x[1:])
    with torch.no_grad():  # as for torch's in-place ops, allowed without grad mode
        gelu_(x)
    torch.testing.assert_close(x.detach(), F.gelu(torch.tensor([-1.0, 0.5, 2.0])))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gelu_", INPLACE_GELU, ids=["wrapper", "op"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_inplace_gradient_is_gelus(gelu_, approximate, device):
    x = torch.tensor([-1.0, 0.5, 2.0], device=device, requires_grad=True)
    y = x * 1  # a non-leaf
    gelu_(y, approximate)
    y.backward(torch.ones(3, device=device))
    x_ref = x.detach().clone().requires_grad_()
    F.gelu(x_ref, approximate=approximate).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    if approximate == "none":
        torch.testing.assert_close(x.grad.cpu(), torch.tensor([-0.0833, 0.8675, 1.0852]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gelu_", INPLACE_GELU, ids=["wrapper", "op"])
def test_gelu_inplace_on_a_view_of_a_non_leaf(gelu_):
    # the in-place result flows back through the view into its base, as x.mul_(2) would
    x = torch.randn(4, 6, requires_grad=True)
    base = x * 1
    gelu_(base[1:3])
    g = torch.randn(4, 6)
    base.backward(g)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1:3] = True
    x_ref = x.detach().clone().requires_grad_()
    torch.where(mask, F.gelu(x_ref), x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("gelu_", INPLACE_GELU, ids=["wrapper", "op"])
def test_gelu_inplace_bumps_the_version_counter(gelu_):
    # another op saved x for its backward: overwriting x afterwards must make that backward fail,
    # not compute a gradient from the new values
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    y = (x * w).sum()
    before = x._version
    gelu_(x)
    assert x._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
