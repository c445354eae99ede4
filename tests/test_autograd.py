"""Gradients through the ops, against the same computation in dense torch ops.

The matmul ops' gradient w.r.t. x is grad @ dequantize(w): checked against autograd through
x @ dequantize(w).T in float32 (same dense weight, so only fp32 summation order differs: 1e-5
relative). GELU's gradient is aten.gelu_backward at x (or x + bias in fp32): checked against
autograd through F.gelu; bias_gelu's bias gradient is the sum over leading dimensions.
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
