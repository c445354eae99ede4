"""Gradients through the ops, against the same computation in dense torch ops.

The matmul ops' gradient w.r.t. x is grad @ dequantize(w): checked against autograd through
x @ dequantize(w).T in float32. The dense weight is the same, so each side is an fp32 sum of n
products grad_j * W_jk in an order of its own, within conftest.fp32_sum_error(|grad| @ |W|, n) of the
exact sum: the two within twice that. GELU's gradient is aten.gelu_backward at x (or x + bias in
fp32), the very op and operands of autograd through F.gelu: the same bits. bias_gelu's bias gradient
sums those over the leading dimensions, in an order of its own (fp32_sum_error again). gelu_
behaves as torch's in-place ops: it refuses a leaf that requires grad, gives any other tensor
F.gelu's gradient, and moves the version counter of what it overwrites. gated_gelu_qmatmul's and
gated_silu_qmatmul's gradients are those of autograd through qmatmul(w, torchext.gelu(gate) * up) and
qmatmul(w, F.silu(gate) * up), the same bits (the same ops on the same operands: aten.gelu_backward or
aten.silu_backward); their values those of the ops' documented compositions (for SiLU on the CPU,
test_fused.silu_oracle's, the correctly rounded SiLU that the CPU kernel computes).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import torchext
from conftest import DEVICES, cached_weight, fp32_sum_error, gaussian_activations, gaussian_linear, half_ulp
from test_fused import gated_activation
from test_gelu import _units, assert_gelu_close

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
    W = torchext.dequantize(w, qtype, n, k)
    (x_ref @ W.T).backward(g)
    # both are g @ W, n-term fp32 sums in orders of their own (module docstring)
    tol = 2 * fp32_sum_error(g.double().abs() @ W.double().abs(), n)
    assert ((x.grad.double() - x_ref.grad.double()).abs() <= tol).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["qmatmul", "qmatmul_id"])
def test_float16_gradient_of_weights_past_its_range(op, device):
    """Q8_0 holds weights to about 8e6; float16 only to 65504. The backward takes float16 gradients through
    the weight in float32 (it dequantized in float16: inf weights, an inf gradient, while the forward and
    the true gradient, about 3e3 here, are finite). Within fp32_sum_error of the float64 product, then
    float16's rounding."""
    n, k = 16, 256
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 2e5
    w = torchext.quantize(W, "Q8_0").to(device)
    Wd = torchext.dequantize(w, "Q8_0", n, k).double().cpu()
    x = (torch.randn(20, k, device=device) * 1e-4).half().requires_grad_()
    if op == "qmatmul":
        y = torchext.qmatmul(w, "Q8_0", x, n, k)
    else:
        ids = torch.zeros(20, 1, dtype=torch.int64, device=device)
        y = torchext.qmatmul_id(w.unsqueeze(0), "Q8_0", x, ids, n, k)
    g = torch.full_like(y, 1e-3)
    (gx,) = torch.autograd.grad(y, x, g)
    want = g.double().cpu().reshape(20, n) @ Wd
    u16 = half_ulp(torch.float16)
    tol = (1 + u16) * fp32_sum_error(g.double().cpu().reshape(20, n).abs() @ Wd.abs(), n) + u16 * want.abs()
    assert torch.isfinite(gx).all() and ((gx.double().cpu() - want).abs() <= tol).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_format_op_gradient(device):
    n, k = 16, 256
    w, _ = cached_weight(torchext.QType.Q5_K, n, k)
    w = w.to(device)
    x = torch.randn(3, k, device=device, requires_grad=True)
    torchext.q5k_gemv(w, x, n, k).sum().backward()
    W = torchext.dequantize(w, torchext.QType.Q5_K, n, k)
    expected = W.sum(0).expand(3, k)
    # ones @ W and W.sum(0): each an fp32 sum of the n values W_jk (times 1, exact) in its own order
    tol = 2 * fp32_sum_error(W.double().abs().sum(0), n)
    assert ((x.grad.double() - expected.double()).abs() <= tol).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_bias_gelu_gradients(approximate, device):
    x = torch.randn(4, 7, 32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    g = torch.randn(4, 7, 32, device=device)
    torchext.gelu(x, approximate).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    F.gelu(x_ref, approximate=approximate).backward(g)
    assert torch.equal(x.grad, x_ref.grad)  # aten.gelu_backward(g, x) both

    x.grad = None
    torchext.bias_gelu(x, b, approximate).backward(g)
    x_ref, b_ref = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.gelu(x_ref + b_ref, approximate=approximate).backward(g)
    assert torch.equal(x.grad, x_ref.grad)  # aten.gelu_backward(g, x + b), the sum in fp32 both
    # the bias gradient sums that over the 4 * 7 leading positions, each side in its own order
    tol = 2 * fp32_sum_error(x_ref.grad.double().abs().sum((0, 1)), 4 * 7)
    assert ((b.grad.double() - b_ref.grad.double()).abs() <= tol).all()


def test_weights_take_no_gradient():
    n, k = 8, 256
    w, _ = cached_weight(torchext.QType.Q4_K, n, k)
    x = torch.randn(1, k, requires_grad=True)
    y = torchext.qmatmul(w, torchext.QType.Q4_K, x, n, k)
    (grad_x,) = torch.autograd.grad(y.sum(), (x,))
    assert grad_x.shape == x.shape and not w.requires_grad


# ---- gelu_ under autograd: as torch's in-place ops ------------------------------------------------

def gelu_derivative(xs):
    """GELU's derivative Phi(x) + x phi(x) at float32 values xs, in float64, and the error bound of
    aten.gelu_backward's fp32 evaluation of it (unit gradient), 0.5 (1 + erf(x / sqrt2)) + x exp(-x^2 / 2) /
    sqrt(2 pi): erff and expf within 2 ulp (CUDA's documented bounds; glibc's, which torch's CPU loop calls for
    three elements, are tighter), every other step one rounding, u = 2^-24. The cdf: x / sqrt2, rounded twice,
    moves erf by at most 2u max|t erf'(t)| < u, erff adds 2u, 1 + erf u, halved: 2u. x phi(x): x^2's rounding
    moves the exponential by x^2 u / 2 relative, expf 4u, 1 / sqrt(2 pi) and the two products 3u. Their sum
    u |result|. Doubled, for the second-order terms."""
    x = torch.tensor(xs, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    xpdf = x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    u = half_ulp(torch.float32)
    return cdf + xpdf, 2 * u * (2 + (x * x / 2 + 7) * xpdf.abs() + (cdf + xpdf).abs())


INPLACE_GELU = [torchext.gelu_, torch.ops.torchext.gelu_]  # the wrapper and the op itself


def test_gelu_inplace_refuses_what_torch_refuses():
    """gelu_ wrote an inference tensor outside inference mode (torch's in-place ops refuse it), and took a
    non-contiguous tensor when it required grad (the copy path) while refusing it otherwise."""
    with torch.inference_mode():
        x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="x: an in-place update of an inference tensor outside InferenceMode"):
        torchext.gelu_(x)
    with torch.inference_mode():
        torchext.gelu_(x)  # inside it, as relu_
    for requires_grad in (False, True):
        y = (torch.randn(4, 8, requires_grad=requires_grad) * 1)[:, 2:4]
        with pytest.raises(RuntimeError, match=r"x: expected a contiguous tensor"):
            torchext.gelu_(y)


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
    x0 = torch.tensor([-1.0, 0.5, 2.0])
    assert_gelu_close(x.detach(), F.gelu(x0), x0, _units("cpu"))  # the CPU kernel against torch's (test_gelu.py)


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
    assert torch.equal(x.grad, x_ref.grad)  # aten.gelu_backward(1, x) both (times the exact 1 of x * 1)
    if approximate == "none":
        want, tol = gelu_derivative([-1.0, 0.5, 2.0])
        assert ((x.grad.cpu().double() - want).abs() <= tol).all(), (x.grad, want)


@pytest.mark.parametrize("gelu_", INPLACE_GELU, ids=["wrapper", "op"])
def test_gelu_inplace_on_a_view_of_a_non_leaf(gelu_):
    # the in-place result flows back through the view into its base, as x.mul_(2) would
    x = torch.randn(4, 6, requires_grad=True)
    base = x * 1
    gelu_(base[1:3])
    g = torch.randn(4, 6)
    base.backward(g)
    x_ref = x.detach().clone().requires_grad_()
    ref = x_ref * 1
    torch.cat([ref[:1], F.gelu(ref[1:3]), ref[3:]]).backward(g)
    # aten.gelu_backward on the same contiguous 2 x 6 slice both (so the same lanes of torch's CPU loop)
    assert torch.equal(x.grad, x_ref.grad)


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


# ---- paths that share a Q8_1 input, fused ops, ops without a gradient ----------------------------------
# Q8_1 bytes carry no gradient, so while autograd wants x's, takes_q8_1 says no and shared_input calls
# each layer on x itself: the same gradients as calling the layers, the same values as the shared path.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [4, 32], ids=["gemv", "dense"])
def test_shared_input_gradient_is_each_layers(rows, device):
    from torchext.nn import QuantLinear, shared_input
    a, b = (QuantLinear.from_linear(gaussian_linear(256, 48, seed=s), "Q8_0").to(device) for s in (1, 2))
    x = gaussian_activations((rows, 256), seed=rows).to(device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ya, yb = shared_input(x, a, b)
    g = torch.randn(rows, 48, device=device)
    (ya * g + yb).sum().backward()
    (a(x_ref) * g + b(x_ref)).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    with torch.no_grad():
        shared = shared_input(x, a, b)
    assert torch.equal(shared[0], ya) and torch.equal(shared[1], yb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["gelu-none", "gelu-tanh", "silu"])
def test_gated_qmatmul_gradients_are_the_compositions(activation, device):
    """gated_gelu_qmatmul's bytes are qmatmul's of torchext.gelu(gate) * up; its backward runs the very ops
    autograd runs through that composition (qmatmul's, the product's, aten.gelu_backward): the same bits.
    gated_silu_qmatmul's backward those through qmatmul(w, F.silu(gate) * up) (aten.silu_backward): the same
    bits; its bytes are qmatmul's of silu(gate) * up, silu being F.silu on CUDA and the float64 oracle on
    the CPU (torch's CPU F.silu can differ from the kernel's correctly rounded value in the last bit)."""
    qtype, n, k = torchext.QType.Q4_K, 24, 512
    w, _ = cached_weight(qtype, n, k)
    w = w.to(device)
    gate = gaussian_activations((3, k), seed=1).to(device).requires_grad_()
    up = gaussian_activations((3, k), seed=2).to(device).requires_grad_()
    g = torch.randn(3, n, device=device)
    approximate = activation.removeprefix("gelu-")

    def differentiated(x):  # the activation of the composition that autograd runs through
        return F.silu(x) if activation == "silu" else torchext.gelu(x, approximate)

    y = (torchext.gated_silu_qmatmul(w, qtype, gate, up, n, k) if activation == "silu" else
         torchext.gated_gelu_qmatmul(w, qtype, gate, up, n, k, approximate))
    y.backward(g)
    gate_ref, up_ref = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y_ref = torchext.qmatmul(w, qtype, differentiated(gate_ref) * up_ref, n, k)
    y_ref.backward(g)
    with torch.no_grad():
        assert torch.equal(y, torchext.qmatmul(w, qtype, gated_activation(activation, gate) * up, n, k))
    assert torch.equal(gate.grad, gate_ref.grad) and torch.equal(up.grad, up_ref.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gated_silu_qmatmul_second_derivatives_are_the_compositions(device):
    """With create_graph, gated_silu_qmatmul's backward takes SiLU's derivative in differentiable ops, as
    torch's autograd of F.silu does then (aten.silu_backward has no derivative): the second derivatives
    (gate's gradient differentiated again) are those of qmatmul(w, F.silu(gate) * up), bit for bit."""
    qtype, n, k = torchext.QType.Q8_0, 16, 256
    w, _ = cached_weight(qtype, n, k)
    w = w.to(device)
    g = torch.randn(2, n, device=device)
    grads = []
    for fused in (True, False):
        gate = gaussian_activations((2, k), seed=4).to(device).requires_grad_()
        up = gaussian_activations((2, k), seed=5).to(device).requires_grad_()
        y = (torchext.gated_silu_qmatmul(w, qtype, gate, up, n, k) if fused
             else torchext.qmatmul(w, qtype, F.silu(gate) * up, n, k))
        (grad_gate,) = torch.autograd.grad(y, gate, g, create_graph=True)
        grads.append((grad_gate, *torch.autograd.grad(grad_gate.square().sum(), (gate, up))))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("post_norm", [False, True], ids=["add", "post_norm_add"])
def test_add_rms_norm_quantize_q8_1_gradient_of_the_sum(post_norm, device):
    """s = residual + t, t = x or rms_norm(x) * x_weight. Without the post-norm, both gradients are the
    incoming one. With it, against float64 autograd of the same formula: each fp32 gradient is a sum of
    K + 1 terms (the norm's Jacobian applied to grad), within fp32_sum_error of its exact value, plus the
    error of the factors the fp32 side computes them from: r = rsqrt(mean(x^2) + eps) from a K-term sum of
    squares (relative gamma_K, its terms all positive), the eps add and rsqrt's own roundings (2 u each),
    halved by the square root, is within gamma_K / 2 + 3 u of r; a term carries r up to cubed (x r^3 / K),
    so 3 (gamma_K / 2 + 3 u), and its own product's roundings, 4 u more. The Q8_1 output passes no
    gradient, so `weight` takes none."""
    k = 256
    x = gaussian_activations((3, k), seed=3).to(device).requires_grad_()
    residual = gaussian_activations((3, k), seed=4).to(device).requires_grad_()
    weight = torch.rand(k, device=device) + 0.5
    x_weight = (torch.rand(k, device=device) + 0.5).requires_grad_() if post_norm else None
    s, xq = torchext.add_rms_norm_quantize_q8_1(x, residual, weight, 1e-6, x_weight)
    assert not xq.requires_grad
    g = torch.randn(3, k, device=device)
    s.backward(g)
    assert torch.equal(residual.grad, g)
    if not post_norm:
        assert torch.equal(x.grad, g)
        return
    x64, w64 = x.detach().double().requires_grad_(), x_weight.detach().double().requires_grad_()
    r64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    (x64 * r64 * w64).backward(g.double())
    # magnitudes of the terms: grad_x_i = g_i w_i r - x_i r^3 / K * sum_j g_j w_j x_j, grad_w_i = sum_rows g x r
    r, gw, xd = r64.detach(), (g.double() * w64.detach()), x64.detach()
    terms_x = gw.abs() * r + xd.abs() * r ** 3 / k * (gw * xd).abs().sum(-1, keepdim=True)
    terms_w = (g.double() * xd * r).abs().sum(0)
    u = 2.0**-24
    for got, want, terms, n in ((x.grad, x64.grad, terms_x, k + 1), (x_weight.grad, w64.grad, terms_w, 3)):
        err = (got.cpu().double() - want.cpu()).abs()
        tol = fp32_sum_error(terms.cpu(), n) + (1.5 * fp32_sum_error(1.0, k) + 13 * u) * terms.cpu()
        assert (err <= tol).all(), (err / terms.cpu()).max()


def decode_inputs(device, requires_grad: bool):
    """A one-row decode step's rope_cache_write and cached_attention inputs: 2 query heads over 1 cache head."""
    B, T, H, KV, D, S = 1, 1, 2, 1, 64, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(device).requires_grad_(requires_grad) for h in (H, KV, KV))
    cos, sin = torch.randn(2, S, D, generator=g).to(device).unbind(0)
    caches = [torch.zeros(B, KV, S, D, device=device) for _ in range(2)]
    return q, k, v, cos, sin, torch.tensor([3], device=device), caches


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_ops_raise_in_backward(device):
    """cached_attention and rope_cache_write have no gradient formula: with inputs that require grad they
    compute the values they compute without, and a backward that reaches them raises, naming the op
    (torch's fallback would warn and pass no gradient on). rope_cache_write moves the caches' versions."""
    q, k, v, cos, sin, pos, (kc, vc) = decode_inputs(device, requires_grad=True)
    before = kc._version, vc._version
    qr = torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc)
    assert kc._version > before[0] and vc._version > before[1]
    o = torchext.cached_attention(qr, kc, vc, pos, 0.125)
    with torch.no_grad():
        q2, k2, v2, cos, sin, pos, (kc2, vc2) = decode_inputs(device, requires_grad=False)
        assert torch.equal(torchext.rope_cache_write(q2, k2, v2, cos, sin, pos, kc2, vc2), qr)
        assert torch.equal(kc2, kc) and torch.equal(vc2, vc)
        assert torch.equal(torchext.cached_attention(qr, kc, vc, pos, 0.125), o)
    with pytest.raises(RuntimeError, match="cached_attention has no gradient"):
        o.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="rope_cache_write has no gradient"):
        qr.sum().backward()



def test_decode_attention_ops_compile_with_inputs_that_require_grad():
    """AOTAutograd traces the backward of a compiled graph whose inputs require grad: the raise happens
    when that backward runs, not while compiling, and the forward is eager's."""
    def step(q, k, v, cos, sin, pos, kc, vc):
        return torchext.cached_attention(torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc), kc, vc, pos, 0.125)

    q, k, v, cos, sin, pos, caches = decode_inputs("cpu", requires_grad=True)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, cos, sin, pos, *caches)
    q2, k2, v2, cos, sin, pos, caches2 = decode_inputs("cpu", requires_grad=True)
    assert torch.equal(out, step(q2, k2, v2, cos, sin, pos, *caches2))
    with pytest.raises(RuntimeError, match="cached_attention has no gradient"):
        out.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_no_gradient_wanted_skips_the_autograd_kernels_with_the_same_results(device):
    """Where no gradient can be wanted (no_grad, or no input that requires grad) the Python wrappers call the
    ops below their Autograd kernels (ops._call: those kernels are Python and cost an eager call a few µs to
    pass through): the same bits as through them, no output that requires grad, and a gradient as before
    where one is wanted."""
    n, k = 24, 512
    qtype = torchext.QType.Q4_K
    w, _ = cached_weight(qtype, n, k)
    w = w.to(device)
    x = gaussian_activations((3, k), seed=1).to(device)
    bias = torch.randn(k, device=device)
    calls = {
        "qmatmul": lambda x: torchext.qmatmul(w, qtype, x, n, k),
        "qmatmul exact": lambda x: torchext.qmatmul(w, qtype, x, n, k, exact=True),
        "q4k_gemv": lambda x: torchext.q4k_gemv(w, x, n, k),
        "gelu": lambda x: torchext.gelu(x, "tanh"),
        "bias_gelu": lambda x: torchext.bias_gelu(x, bias),
        "gated_gelu_qmatmul": lambda x: torchext.gated_gelu_qmatmul(w, qtype, x, x * 0.5, n, k),
        "gated_silu_qmatmul": lambda x: torchext.gated_silu_qmatmul(w, qtype, x, x * 0.5, n, k),
        "add_rms_norm_quantize_q8_1": lambda x: torchext.add_rms_norm_quantize_q8_1(x, x * 2, bias, 1e-6)[0],
    }
    for name, call in calls.items():
        through = call(x)  # grad mode on, no input that requires grad: below the Autograd kernel
        with torch.no_grad():
            assert torch.equal(call(x.clone().requires_grad_()), through), name
        with torch.inference_mode():
            assert torch.equal(call(x), through), name
        wanted = x.clone().requires_grad_()
        y = call(wanted)
        assert y.requires_grad and torch.equal(y.detach(), through), name
        y.sum().backward()
        assert wanted.grad is not None and wanted.grad.abs().sum() > 0, name
