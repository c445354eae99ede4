"""The fused Q8_1 producers: rms_norm_quantize_q8_1, gated_gelu_quantize_q8_1 and gated_silu_quantize_q8_1.

Each must give the bytes of the unfused composition it replaces, exactly:
- rms_norm_quantize_q8_1(x, w, eps) == quantize_q8_1(rms_norm_reference(x, w, eps)), where the
  reference spells out in torch ops the norm's documented arithmetic (every step a float32
  rounding, the sum of squares in the op's fixed order); on CUDA too, with the reference computed
  on the CPU (both backends sum in the same order);
- gated_gelu_quantize_q8_1(gate, up, a) == quantize_q8_1(torchext.gelu(gate, a) * up) on the same
  device (the CPU's GELU and CUDA's round differently, each fused op reuses its own backend's);
- gated_silu_quantize_q8_1(gate, up) == quantize_q8_1(silu(gate) * up), silu being F.silu on CUDA (the
  kernel uses torch's CUDA formula) and on the CPU silu_oracle, SiLU in float64 rounded to float32 (the
  CPU kernel's value is the correctly rounded one, which torch's CPU F.silu is not always).
Then: torch.compile(fullgraph=True), the error messages of the kernels and of the fakes, K not a
multiple of 32 or 256 (zero padding), huge magnitudes (opcheck and the fakes against the real ops:
tests/test_opcheck.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES, DTYPES, q8_1_fields
from torch._subclasses.fake_tensor import FakeTensorMode

import torchext
from torchext.models.gemma3 import RMSNorm

ops = torch.ops.torchext
EPS = 1e-6
# (leading shape, K): K = 1, 33, 300 and 1000 are neither multiples of 32 nor of 256; 640 is Gemma 3
# 270M's hidden size, 2048 its MLP's width
SHAPES = [((1,), 640), ((3,), 256), ((2, 3), 300), ((5,), 1), ((4,), 33), ((1,), 1000), ((2,), 2048), ((17,), 64),
          ((129,), 1536)]
# the gated ops' activations: GELU's two forms (gated_gelu_quantize_q8_1's approximate) and SiLU
# (gated_silu_quantize_q8_1)
ACTIVATIONS = ["gelu-tanh", "gelu-none", "silu"]
NAMES = ["rms_norm_quantize_q8_1", "gated_gelu_quantize_q8_1", "gated_silu_quantize_q8_1"]


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm rms_norm_quantize_q8_1 documents, on the CPU in torch ops (each a float32 rounding):
    32 partial sums of squares, partial l over columns l, l + 32, ... in turn, folded in halves."""
    k = x.shape[-1]
    xf = x.cpu().float().reshape(-1, k)
    cols = torch.nn.functional.pad(xf, (0, -k % 32)).view(xf.shape[0], -1, 32)
    partial = torch.zeros(xf.shape[0], 32)
    for j in range(cols.shape[1]):
        partial = partial + cols[:, j] * cols[:, j]
    for h in (16, 8, 4, 2, 1):
        partial = partial[:, :h] + partial[:, h:2 * h]
    mean = partial / torch.full_like(partial, k)  # a true division, not a product with 1/k
    # numpy's float32 sqrt is the IEEE one; torch's CPU sqrt is not always correctly rounded (seen:
    # 1.0180761814 for sqrt(1.0364792347), where 1.0180763006 is nearer)
    inverse = torch.ones_like(mean) / torch.from_numpy(np.sqrt((mean + eps).numpy()))
    return ((xf * inverse) * w.cpu().float()).to(x.dtype).reshape(x.shape)


def silu_oracle(g: torch.Tensor) -> torch.Tensor:
    """SiLU g / (1 + exp(-g)) in float64, rounded to float32, then to g's dtype: the CPU kernel's value,
    which is the correctly rounded fp32 one. An oracle of its own, not torch's CPU F.silu: that mixes a
    vectorized and a scalar exp and is not correctly rounded, so it can differ in the last bit. The
    float64 value rounds to the same float32 as the exact one except within a few float64 ulps of a
    float32 midpoint: with probability ~2^-29 per element."""
    gd = g.double()
    return (gd / (1 + torch.exp(-gd))).float().to(g.dtype)


def gated_activation(activation: str, gate: torch.Tensor) -> torch.Tensor:
    """The activation (of ACTIVATIONS) that a gated op multiplies up by, as its documented composition
    computes it on gate's device: torchext.gelu(gate, approximate); for SiLU F.silu on CUDA and
    silu_oracle on the CPU."""
    if activation == "silu":
        return silu_oracle(gate) if gate.device.type == "cpu" else torch.nn.functional.silu(gate)
    return torchext.gelu(gate, activation.removeprefix("gelu-"))


def gated_quantize_q8_1(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The fused op of an activation of ACTIVATIONS: gated_gelu_quantize_q8_1(gate, up, approximate) or
    gated_silu_quantize_q8_1(gate, up)."""
    if activation == "silu":
        return ops.gated_silu_quantize_q8_1(gate, up)
    return ops.gated_gelu_quantize_q8_1(gate, up, activation.removeprefix("gelu-"))


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def _norm_weight(k, dtype, seed):
    # Gemma's stored weights hold 1 + w: around 1, some near 0
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(k, generator=g)).to(dtype)


def _assert_bytes_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.uint8 and got.shape == want.shape, (got.shape, want.shape)
    if not torch.equal(got.cpu(), want.cpu()):
        diff = (got.cpu() != want.cpu()).nonzero()
        pytest.fail(f"{len(diff)} bytes differ, the first at {diff[0].tolist()}")


# ---- rms_norm_quantize_q8_1 ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_float32", [True, False], ids=["w_f32", "w_xdtype"])
@pytest.mark.parametrize("lead,k", SHAPES)
def test_rms_norm_bytes_equal_the_composition(device, dtype, weight_float32, lead, k):
    x = _randn((*lead, k), dtype, "cpu", seed=k)
    w = _norm_weight(k, torch.float32 if weight_float32 else dtype, seed=k + 1)
    want = ops.quantize_q8_1(rms_norm_reference(x, w, EPS))
    _assert_bytes_equal(ops.rms_norm_quantize_q8_1(x.to(device), w.to(device), EPS), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k", SHAPES)
def test_rms_norm_reference_is_the_models_rmsnorm_up_to_the_sum_order(dtype, lead, k):
    """The documented norm is Gemma 3's RMSNorm but for the order of the sum of squares: a sum of k
    positive terms has a relative rounding error below (k - 1) 2^-24 in any order, so the two
    inverse square roots differ by less than (k + 3) 2^-24 relative (half the sum's difference,
    plus the sqrt, division and products of each); rounding to a half-precision dtype may then
    part them by one unit in its last place (finfo.eps relative)."""
    x = _randn((*lead, k), dtype, "cpu", seed=k)
    w = _norm_weight(k, torch.float32, seed=k + 1)
    model = RMSNorm(w, EPS)(x)
    rtol = (k + 3) * 2.0**-24 + (0.0 if dtype == torch.float32 else torch.finfo(dtype).eps)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS).float(), model.float(), rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_huge_and_tiny_magnitudes(device, dtype):
    """Rows of 1e4, 1e30 (float32, bfloat16) and 1e-30, constant rows, a zero row (eps keeps it
    finite) and one with a NaN: the composition's bytes, and no NaN but the NaN row's."""
    k = 300
    big = 1e4 if dtype == torch.float16 else 1e30
    rows = [_randn(k, torch.float32, "cpu", 0, scale=s) for s in (1e4, big, 1e-30 if dtype != torch.float16 else 1e-3)]
    rows += [torch.full((k,), big), torch.zeros(k), torch.full((k,), -3.0)]
    nan_row = _randn(k, torch.float32, "cpu", 5)
    nan_row[7] = float("nan")
    x = torch.stack(rows + [nan_row]).to(dtype)
    w = _norm_weight(k, torch.float32, seed=1)
    got = ops.rms_norm_quantize_q8_1(x.to(device), w.to(device), EPS)
    _assert_bytes_equal(got, ops.quantize_q8_1(rms_norm_reference(x, w, EPS)))
    d = torch.from_numpy(q8_1_fields(got).d)
    assert not d[:-1].isnan().any() and d[-1].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_overflowing_squares_normalise_to_zeros(device):
    """|x| = 1e20: x^2 overflows float32, so the formula (and the model's RMSNorm) gives x * 0."""
    x = torch.full((1, 64), 1e20)
    xq = ops.rms_norm_quantize_q8_1(x.to(device), torch.ones(64, device=device), EPS)
    _assert_bytes_equal(xq, ops.quantize_q8_1(torch.zeros(1, 64)))
    _assert_bytes_equal(xq, ops.quantize_q8_1(RMSNorm(torch.ones(64), EPS)(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_in_a_gemv_equals_the_unfused_layer(device):
    """What the model does with it: qmatmul_q8_1 of the fused bytes is qmatmul of the normalised
    input, bit for bit (the GEMV path, 4 rows)."""
    k, n = 640, 96
    x = _randn((4, k), torch.bfloat16, device, 3)
    w = _norm_weight(k, torch.float32, 4).to(device)
    layer = torchext.nn.QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), "Q4_K").to(device)
    want = layer(rms_norm_reference(x, w, EPS).to(device))
    got = layer.forward_q8_1(ops.rms_norm_quantize_q8_1(x, w, EPS), x.dtype)
    assert torch.equal(got, want)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a contiguous tensor whose data starts one element past a 16-byte boundary (the
    CUDA kernels read such rows one value at a time, aligned ones 16 bytes at a time)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_inputs_give_the_same_bytes(device, dtype):
    k = 512
    x = _randn((3, k), dtype, device, 0)
    w = _norm_weight(k, dtype, 1).to(device)
    gate, up = _randn((3, k), dtype, device, 2), _randn((3, k), dtype, device, 3)
    norm = ops.rms_norm_quantize_q8_1(x, w, EPS)
    for xx, ww in ((_misaligned(x), w), (x, _misaligned(w)), (_misaligned(x), _misaligned(w))):
        _assert_bytes_equal(ops.rms_norm_quantize_q8_1(xx, ww, EPS), norm)
    for activation in ("gelu-tanh", "silu"):
        gated = gated_quantize_q8_1(activation, gate, up)
        for g, u in ((_misaligned(gate), up), (gate, _misaligned(up))):
            _assert_bytes_equal(gated_quantize_q8_1(activation, g, u), gated)


# ---- gated_gelu_quantize_q8_1, gated_silu_quantize_q8_1 --------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k", SHAPES)
def test_gated_bytes_equal_the_composition(device, dtype, activation, lead, k):
    gate = _randn((*lead, k), dtype, device, seed=k, scale=2.0)
    up = _randn((*lead, k), dtype, device, seed=k + 1)
    want = ops.quantize_q8_1(gated_activation(activation, gate) * up)
    _assert_bytes_equal(gated_quantize_q8_1(activation, gate, up), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_huge_magnitudes(device, dtype, activation):
    """Gates of +-1e4 and +-1e30 (GELU and SiLU are x or -0 there; float16 tops out at 65504) times ups
    that keep the product finite, gates from -80 to -110 (fp32's exp(-x) overflows from -88.7: torch's SiLU
    formula, CUDA's, gives -0 there, the CPU's correctly rounded SiLU tiny values), and a NaN and a -inf
    gate (GELU and SiLU of -inf are NaN, as torch's): the composition's bytes, NaN only in the two blocks
    that hold them."""
    k = 300
    big = 1e4 if dtype == torch.float16 else 1e30
    gate = torch.stack([_randn(k, torch.float32, "cpu", 0, scale=s) for s in (1e4, big, 1e-30)] + [
        torch.full((k,), -big), torch.zeros(k), -torch.linspace(80, 110, k), _randn(k, torch.float32, "cpu", 9)])
    up = torch.stack([_randn(k, torch.float32, "cpu", 1, scale=s) for s in (1.0, 1.0, 1e4)] + [
        torch.full((k,), 2.0), _randn(k, torch.float32, "cpu", 2), torch.full((k,), 1e3),
        _randn(k, torch.float32, "cpu", 3)])
    gate[-1, 100], gate[-1, 200] = float("nan"), float("-inf")  # blocks 3 and 6
    gate, up = gate.to(dtype).to(device), up.to(dtype).to(device)
    got = gated_quantize_q8_1(activation, gate, up)
    _assert_bytes_equal(got, ops.quantize_q8_1(gated_activation(activation, gate) * up))
    d = torch.from_numpy(q8_1_fields(got).d)
    assert not d[:-1].isnan().any() and d[-1].isnan().nonzero().flatten().tolist() == [3, 6]


@pytest.mark.parametrize("device", DEVICES)
def test_gated_gelu_default_is_the_tanh_form(device):
    gate, up = _randn((2, 64), torch.float32, device, 0), _randn((2, 64), torch.float32, device, 1)
    _assert_bytes_equal(torchext.gated_gelu_quantize_q8_1(gate, up), ops.gated_gelu_quantize_q8_1(gate, up, "tanh"))


@pytest.mark.parametrize("device", DEVICES)
def test_gated_silu_wrapper_is_the_op(device):
    gate, up = _randn((2, 64), torch.float32, device, 0), _randn((2, 64), torch.float32, device, 1)
    _assert_bytes_equal(torchext.gated_silu_quantize_q8_1(gate, up), ops.gated_silu_quantize_q8_1(gate, up))


# ---- empty inputs, compile -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_give_empty_q8_1(device):
    x = torch.zeros(0, 3, 300, device=device)
    assert ops.rms_norm_quantize_q8_1(x, torch.ones(300, device=device), EPS).shape == (0, 3, 2 * 288)
    assert ops.gated_gelu_quantize_q8_1(x, x).shape == (0, 3, 2 * 288)
    assert ops.gated_silu_quantize_q8_1(x, x).shape == (0, 3, 2 * 288)


# the Python wrappers of the gated ops, by activation (the compiled graphs call them)
GATED_WRAPPERS = {"gelu-tanh": lambda gate, up: torchext.gated_gelu_quantize_q8_1(gate, up, "tanh"),
                  "silu": torchext.gated_silu_quantize_q8_1}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", list(GATED_WRAPPERS))
def test_compiles_fullgraph_into_the_gemv(device, dtype, activation):
    """An MLP input norm, gate/up GEMVs, the gated GELU or SiLU and the down GEMV in one compiled graph,
    with the eager bytes and outputs."""
    k, f = 256, 512
    layers = [torchext.nn.QuantLinear.from_linear(torch.nn.Linear(a, b, bias=False), "Q4_K").to(device)
              for a, b in ((k, f), (k, f), (f, k))]
    norm = _norm_weight(k, torch.float32, 0).to(device)

    def mlp(x):
        xq = torchext.rms_norm_quantize_q8_1(x, norm, EPS)
        gate, up = (m.forward_q8_1(xq, x.dtype) for m in layers[:2])
        return layers[2].forward_q8_1(GATED_WRAPPERS[activation](gate, up), x.dtype)

    x = _randn((3, k), dtype, device, 1)
    compiled = torch.compile(mlp, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), mlp(x))


# ---- errors: the kernels' and the fakes' messages ----------------------------------------------------

def _bad_calls(device):
    """(call, the start of its message); device: where the well-formed arguments live."""
    x = torch.randn(2, 64, device=device)
    w = torch.ones(64, device=device)
    bf = x.to(torch.bfloat16)
    cases = [
        (lambda: ops.rms_norm_quantize_q8_1(x.to(torch.float64), w, EPS), "x: expected a float32, float16 or bfloat16"),
        (lambda: ops.rms_norm_quantize_q8_1(x.t(), w, EPS), "x: expected a contiguous tensor"),
        (lambda: ops.rms_norm_quantize_q8_1(x[:, :0], w[:0], EPS), "x: expected a positive last dimension (K), got 0"),
        (lambda: ops.rms_norm_quantize_q8_1(x[0, 0], w, EPS), r"x: expected activations of shape [..., K]"),
        (lambda: ops.rms_norm_quantize_q8_1(x, torch.ones(63, device=device), EPS),
         "weight: expected shape [64] (x's last dimension), got [63]"),
        (lambda: ops.rms_norm_quantize_q8_1(x, torch.ones(1, 64, device=device), EPS),
         "weight: expected shape [64] (x's last dimension), got [1, 64]"),
        (lambda: ops.rms_norm_quantize_q8_1(bf, w.half(), EPS),
         "weight: expected float32 or the dtype of x (bfloat16), got float16"),
        (lambda: ops.rms_norm_quantize_q8_1(x, torch.ones(64, 2, device=device)[:, 0], EPS),
         "weight: expected a contiguous tensor"),
        (lambda: ops.rms_norm_quantize_q8_1(x, w, -1.0), "eps: expected a number >= 0 that float32 holds"),
        (lambda: ops.rms_norm_quantize_q8_1(x, w, float("nan")), "eps: expected a number >= 0 that float32 holds"),
        (lambda: ops.rms_norm_quantize_q8_1(x, w, 1e39), "eps: expected a number >= 0 that float32 holds"),
        (lambda: ops.gated_gelu_quantize_q8_1(x, x, "erf"), "approximate: expected 'none' or 'tanh'"),
    ]
    for gated in (lambda gate, up: ops.gated_gelu_quantize_q8_1(gate, up, "tanh"), ops.gated_silu_quantize_q8_1):
        cases += _gated_bad_calls(gated, x, bf, device)
    return cases


def _gated_bad_calls(call, x, bf, device):
    """_bad_calls' cases for a gated op, call(gate, up) (the same messages for GELU and SiLU)."""
    return [
        (lambda: call(x.to(torch.int32), x), "gate: expected a float32, float16 or bfloat16 tensor, got int32"),
        (lambda: call(x, bf), "up: expected the dtype of gate (float32), got bfloat16"),
        (lambda: call(x, x[:1]), "up: expected the shape of gate [2, 64], got [1, 64]"),
        (lambda: call(x, x[None]), "up: expected the shape of gate [2, 64], got [1, 2, 64]"),
        (lambda: call(x, torch.randn(64, 2, device=device).t()), "up: expected a contiguous tensor"),
        (lambda: call(torch.randn(64, 2, device=device).t(), x), "gate: expected a contiguous tensor"),
        (lambda: call(x[:, :0], x[:, :0]), "gate: expected a positive last dimension"),
        (lambda: call(x[0, 0], x[0, 0]), "gate: expected activations of shape [..., K]"),
    ]


def assert_error_starts_with(call, message: str) -> None:
    """call raises a RuntimeError starting with message, from the kernels and under FakeTensorMode (the fakes)."""
    with pytest.raises(RuntimeError) as real:
        call()
    assert str(real.value).startswith(message), str(real.value)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError) as fake:
            call()
    assert str(fake.value).startswith(message), str(fake.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
def test_errors_name_the_argument(device, case):
    assert_error_starts_with(*_bad_calls(device)[case])


def _with_other(name, x, other):
    """The arguments of op `name` (of NAMES) for its two tensors, x and other (weight or up)."""
    if name == "rms_norm_quantize_q8_1":
        return x, other, EPS
    return (x, other, "tanh") if name == "gated_gelu_quantize_q8_1" else (x, other)


@pytest.mark.parametrize("name", NAMES)
def test_device_mismatch(name):
    """A meta tensor with a CPU one (the fake rejects it: no uninitialised result); CUDA's case
    below runs the kernels' check."""
    x = torch.randn(2, 64)
    other = torch.ones(64 if name == "rms_norm_quantize_q8_1" else (2, 64), device="meta")
    args = _with_other(name, x, other)
    second = "weight" if name == "rms_norm_quantize_q8_1" else "up"
    first = "x" if name == "rms_norm_quantize_q8_1" else "gate"
    with pytest.raises(RuntimeError, match=f"{first} and {second}: expected tensors on the same device"):
        getattr(ops, name)(*args)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_device_mismatch_cuda(name, device):
    x = torch.randn(2, 64, device=device)
    other = torch.ones(64 if name == "rms_norm_quantize_q8_1" else (2, 64))
    args = _with_other(name, x, other)
    with pytest.raises(RuntimeError, match="expected tensors on the same device, got .* on cuda:0 and .* on cpu"):
        getattr(ops, name)(*args)


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_cuda_runs_on_the_current_stream_and_the_inputs_device(device):
    """The kernels launch on the current stream (a side stream here: its work is done once it is
    synchronised) and under a guard for the inputs' device (the last GPU while cuda:0 is current)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, w = _randn((3, 640), torch.bfloat16, dev, 0), _norm_weight(640, torch.float32, 1).to(dev)
    gate, up = _randn((3, 2048), torch.bfloat16, dev, 2), _randn((3, 2048), torch.bfloat16, dev, 3)
    want = (ops.quantize_q8_1(rms_norm_reference(x, w, EPS)), ops.quantize_q8_1(torchext.gelu(gate, "tanh") * up),
            ops.quantize_q8_1(torch.nn.functional.silu(gate) * up))
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.device(0), torch.cuda.stream(side):
        got = (ops.rms_norm_quantize_q8_1(x, w, EPS), ops.gated_gelu_quantize_q8_1(gate, up, "tanh"),
               ops.gated_silu_quantize_q8_1(gate, up))
    side.synchronize()
    for g, ww in zip(got, want):
        assert g.device == dev
        _assert_bytes_equal(g, ww)
