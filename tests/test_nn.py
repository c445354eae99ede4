"""torchext.nn.QuantLinear and quantize_linears; torch.compile of models built from them.

Tolerances, and why:
- QuantLinear.forward is qmatmul plus a bias add, so it must equal those two ops bit for bit.
- from_linear against the float layer: the error is the format's quantization error (plus, for
  <= 16 rows, the Q8_1 rounding of the activations). On N(0, 0.05^2) weights [256, 512] and N(0, 1)
  inputs, the norm-relative error ||y - x @ W.T|| / ||x @ W.T|| measured (max over 5 seeds, rows
  1 / 4 / 16; llama.cpp's reference quantizers):
      Q8_0 0.81%  Q6_K 2.0%  Q5_K 3.9%  Q5_1 4.3%  Q5_0 4.8%  Q4_K 7.7%  Q4_1 8.5%  Q4_0 9.3%
      MXFP4 13.6%  TQ1_0 87% (gguf's rules: FP4 levels under a power-of-two scale; ternary with
      d = max|w| over 256 values, which rounds most Gaussian weights to 0)
  It is an average over 131072 weights, so it hardly moves between seeds: we assert 1.3x the
  measurement as the upper bound, and half of it as a lower bound (a layer that silently kept
  float weights, or quantized to the wrong format, fails one or the other).
- torch.compile with backend="aot_eager" runs the same kernels on the same inputs: bit-identical
  to eager, for the MLP (only custom ops and an add) and for the transformer block too: AOTAutograd
  records the aten kernels that eager dispatches to (RMSNorm's pow, mean, rsqrt, mul; SDPA's
  CompositeImplicit body traced into the backend kernel eager picks) and decomposes none of them.
- CUDA graphs (mode="reduce-overhead", inductor): inductor generates the elementwise code and may
  reorder reductions: 1e-3 relative/absolute on O(1) float32 outputs.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchext
from conftest import DEVICES, DTYPES, gaussian_activations, gaussian_linear, gemv_rows, random_weight, requires_cuda
from torchext import QType, WeightCache
from torchext.nn import (QuantExperts, QuantGatedMLP, QuantLinear, QuantStackedGatedMLP, TopKRouter, gated_mlp,
                         quantize_linears, shared_input)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- the layer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype, n, k",
                         [(QType.Q4_K, 64, 300), (QType.Q6_K, 48, 512), (QType.Q8_0, 40, 96), (QType.Q5_1, 32, 64),
                          (QType.TQ1_0, 24, 300), (QType.MXFP4, 24, 96), (QType.NVFP4, 24, 128)],
                         ids=lambda v: getattr(v, "name", None))
def test_forward_is_qmatmul_plus_bias(device, dtype, qtype, n, k):
    w = random_weight(qtype, n, k, device, seed=n)
    bias = gaussian_activations((n,), seed=k).to(device)  # float32: the forward casts it to x's dtype
    with_bias = QuantLinear(w, qtype, k, n, bias)
    without = QuantLinear(w.flatten(), int(qtype), k, n)  # flat bytes and an int id are fine too
    assert without.weight.shape == with_bias.weight.shape == (n, w.shape[1]) and without.bias is None
    for shape in [(k,), (1, k), (2, 3, k), (gemv_rows(qtype, device) + 1, k)]:  # the GEMV path, unrounded beyond
        x = gaussian_activations(shape, seed=len(shape)).to(dtype).to(device)
        y = torchext.qmatmul(w, qtype, x, n, k)
        assert torch.equal(without(x), y)
        got = with_bias(x)
        assert got.shape == (*shape[:-1], n) and got.dtype == dtype
        assert torch.equal(got, y + bias.to(dtype))
    # any strides, as nn.Linear (the op itself wants contiguous rows)
    x = gaussian_activations((2 * k, 3), seed=5).to(dtype).to(device)[::2].t()
    assert not x.is_contiguous()
    assert torch.equal(with_bias(x), torchext.qmatmul(w, qtype, x.contiguous(), n, k) + bias.to(dtype))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(8, 143, dtype=torch.uint8), "Q4_K", 256, 8),
         r"weight: expected 1152 bytes for Q4_K with out_features=8, in_features=256"),
        ((torch.zeros(8, 144), "Q4_K", 256, 8),
         r"weight: expected raw Q4_K bytes as a uint8 tensor, got torch.float32"),
        ((torch.zeros(8, 68, dtype=torch.uint8), "Q8_0", 40, 8),
         r"in_features: Q8_0 rows are whole 32-value blocks, so in_features must be a multiple of 32, got 40"),
        ((torch.zeros(8, 36, dtype=torch.uint8), "Q8_1", 32, 8), r"qtype: unsupported weight format 'Q8_1'"),
        ((torch.zeros(8, 54, dtype=torch.uint8), "NVFP4", 96, 8),
         r"in_features: NVFP4 rows are whole 64-value blocks, so in_features must be a multiple of 64, got 96"),
        ((torch.zeros(8, 144, dtype=torch.uint8), "Q4_K", 256, 0), r"out_features: expected a positive int, got 0"),
        ((torch.zeros(8, 144, dtype=torch.uint8), "Q4_K", 256, 8, torch.zeros(7)),
         r"bias: expected a float tensor of shape \[8\], got torch.float32 \[7\]"),
    ],
    ids=["bytes", "dtype", "in_features", "format", "in_features_nvfp4", "out_features", "bias"],
)
def test_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear(*args)


# Norm-relative error bounds of from_linear (see the module docstring): (lower, upper).
FROM_LINEAR_BOUNDS = {
    QType.Q8_0: (0.004, 0.0105), QType.Q6_K: (0.010, 0.026), QType.Q5_K: (0.019, 0.051),
    QType.Q5_1: (0.020, 0.056), QType.Q5_0: (0.022, 0.062), QType.Q4_K: (0.036, 0.10),
    QType.Q4_1: (0.040, 0.11), QType.Q4_0: (0.044, 0.12), QType.MXFP4: (0.068, 0.18), QType.TQ1_0: (0.44, 1.13),
}


@pytest.mark.parametrize("qtype", list(FROM_LINEAR_BOUNDS), ids=lambda q: q.name)
def test_from_linear_error_per_format(qtype):
    linear = gaussian_linear(512, 256, bias=True, seed=int(qtype))
    layer = QuantLinear.from_linear(linear, qtype)
    assert layer.qtype is qtype and layer.weight.dtype == torch.uint8
    assert torch.equal(layer.bias, linear.bias)
    lower, upper = FROM_LINEAR_BOUNDS[qtype]
    for rows in (1, 16):
        x = gaussian_activations((rows, 512), seed=rows)
        with torch.no_grad():
            ref = (x.double() @ linear.weight.double().T)
            got = layer(x).double() - linear.bias.double()
        rel = ((got - ref).norm() / ref.norm()).item()
        assert lower < rel < upper, (qtype.name, rows, rel)


def test_from_linear_refuses_what_is_no_linear():
    """A Conv1d's 3-D weight was "too many values to unpack"; a module without a weight an AttributeError."""
    with pytest.raises(TypeError, match=r"linear: expected a module with a float weight .* got Conv1d with weight "
                                        r"torch.float32 \[3, 3, 1\]"):
        QuantLinear.from_linear(torch.nn.Conv1d(3, 3, 1), "Q4_K")
    with pytest.raises(TypeError, match="got ReLU without a weight tensor"):
        QuantLinear.from_linear(torch.nn.ReLU(), "Q4_K")
    int_linear = torch.nn.Linear(256, 4)
    int_linear.weight = torch.nn.Parameter(torch.ones(4, 256, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"got Linear with weight torch.int32 \[4, 256\]"):
        QuantLinear.from_linear(int_linear, "Q4_K")


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_keeps_device_and_bias_dtype(device):
    linear = gaussian_linear(300, 40, seed=1).to(device=device, dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(linear, "Q4_K")  # a k-quant takes any in_features (padded super-block)
    assert layer.weight.device.type == device and layer.weight.shape == (40, 2 * 144)
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, linear.bias)
    assert layer.bias.requires_grad and [p for p in layer.parameters()] == [layer.bias]  # as nn.Linear's
    x = gaussian_activations((3, 300), seed=2).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device.type == device
    with torch.no_grad():
        ref = linear.float()(x.float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.1
    with pytest.raises(ValueError, match="in_features: Q5_0 rows are whole 32-value blocks, .* got 300; use a k-quant"):
        QuantLinear.from_linear(linear, "Q5_0")


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_module_moves(device):
    layer = QuantLinear.from_linear(gaussian_linear(256, 64, seed=3), "Q5_K").to(device)
    assert layer.weight.device.type == device
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "_extra_state"} and sd["weight"].dtype == torch.uint8
    assert sd["_extra_state"] == {"format": "Q5_K", "out_features": 64, "in_features": 256}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = QuantLinear(torch.zeros_like(sd["weight"]), "Q5_K", 256, 64, torch.zeros(64, device=device))
    fresh.load_state_dict(loaded)
    x = gaussian_activations((2, 256), seed=4).to(device)
    assert torch.equal(fresh(x), layer(x))
    # .half() converts the float bias but leaves the uint8 weight bytes alone
    half = fresh.half()
    assert half.weight.dtype == torch.uint8 and torch.equal(half.weight, sd["weight"])
    assert half.bias.dtype == torch.float16 and half(x.half()).dtype == torch.float16
    moved = fresh.to("meta")  # a device move of every buffer, testable without a GPU
    assert moved.weight.is_meta and moved.bias.is_meta


# ---- state_dict: the format and shape travel with the bytes ---------------------------------------

def _load_error(match):
    return pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict(.|\n)*" + match)


def test_state_dict_of_another_format_is_refused():
    # Q4_0 and Q4_K rows of 256 values are both 144 bytes: only the format tells them apart
    q4_0 = QuantLinear(random_weight(QType.Q4_0, 8, 256, seed=1), "Q4_0", 256, 8)
    q4_k = QuantLinear(random_weight(QType.Q4_K, 8, 256, seed=2), "Q4_K", 256, 8)
    assert q4_0.weight.shape == q4_k.weight.shape
    before = q4_k.weight.clone()
    model = nn.Sequential(nn.Identity(), q4_k)
    with _load_error(r"1\.weight: the state_dict holds Q4_0 bytes \(out_features=8, in_features=256\), this layer "
                     r"is Q4_K \(out_features=8, in_features=256\)"):
        model.load_state_dict({f"1.{key}": v for key, v in q4_0.state_dict().items()})
    assert torch.equal(q4_k.weight, before)  # nothing was loaded


def test_state_dict_of_another_k_with_the_same_bytes_is_refused():
    # a k-quant row of 255 values is a row of 256 (one padded super-block): same bytes, other layer
    a = QuantLinear(random_weight(QType.Q6_K, 4, 255), "Q6_K", 255, 4)
    b = QuantLinear(random_weight(QType.Q6_K, 4, 256), "Q6_K", 256, 4)
    with _load_error(r"weight: the state_dict holds Q6_K bytes \(out_features=4, in_features=255\), this layer is "
                     r"Q6_K \(out_features=4, in_features=256\)"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float16], ids=str)
def test_state_dict_weight_that_is_not_bytes_is_refused(dtype):
    layer = QuantLinear(random_weight(QType.Q8_0, 8, 64), "Q8_0", 64, 8)
    sd = layer.state_dict()
    sd["weight"] = sd["weight"].to(dtype)  # same shape: load_state_dict would cast it into the buffer
    before = layer.weight.clone()
    with _load_error(rf"weight: expected raw Q8_0 bytes as a uint8 tensor, got {dtype}"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.weight, before)


def test_state_dict_without_the_format_needs_strict_false():
    # a state_dict saved before the format was part of it: strict loading reports the missing
    # entry; strict=False loads the bytes unchecked, as for any missing key
    layer = QuantLinear(random_weight(QType.Q8_0, 8, 64, seed=3), "Q8_0", 64, 8)
    sd = {"weight": layer.weight}
    fresh = QuantLinear(torch.zeros(8, 68, dtype=torch.uint8), "Q8_0", 64, 8)
    with _load_error(r'Missing key\(s\) in state_dict: "_extra_state"'):
        fresh.load_state_dict(sd)
    result = fresh.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["_extra_state"] and torch.equal(fresh.weight, layer.weight)


def test_state_dict_with_an_unreadable_format_is_refused():
    layer = QuantLinear(random_weight(QType.Q8_0, 8, 64), "Q8_0", 64, 8)
    sd = layer.state_dict()
    sd["_extra_state"] = {"format": "Q9_9"}
    with _load_error(r"_extra_state: expected \{'format', 'out_features', 'in_features'\} of a QuantLinear, got "
                     r"\{'format': 'Q9_9'\}"):
        layer.load_state_dict(sd)


def test_extra_repr():
    layer = QuantLinear.from_linear(gaussian_linear(512, 256, seed=5), QType.Q4_K)
    assert layer.extra_repr() == "in_features=512, out_features=256, bias=True, format=Q4_K, bytes=73728"
    assert repr(QuantLinear(torch.zeros(8, 102, dtype=torch.uint8), "Q8_0", 96, 8)) == (
        "QuantLinear(in_features=96, out_features=8, bias=False, format=Q8_0, bytes=816)")


def test_state_dict_assigned_weight_is_made_runnable():
    """load_state_dict(assign=True) installs the state_dict's tensor as the buffer: one that is not
    contiguous becomes contiguous, aligned rows (the kernels need them), with the same bytes."""
    layer = QuantLinear(random_weight(QType.Q4_K, 64, 256, seed=3), "Q4_K", 256, 64)
    sd = layer.state_dict()
    sd["weight"] = sd["weight"].t().contiguous().t()  # the same bytes, column-major
    fresh = QuantLinear(random_weight(QType.Q4_K, 64, 256, seed=4), "Q4_K", 256, 64)
    fresh.load_state_dict(sd, assign=True)
    assert fresh.weight.is_contiguous() and torch.equal(fresh.weight, layer.weight)
    x = gaussian_activations((2, 256), seed=5)
    assert torch.equal(fresh(x), layer(x))


def test_a_view_into_a_pool_pickles_its_own_bytes():
    """A layer over a view into a larger storage (WeightCache's pool: QuantLinear.from_cache) pickles,
    saves and deep-copies its own bytes, not the whole pool behind the view."""
    import copy
    import pickle

    q, n, k = QType.Q4_K, 8, 256
    rb = torchext.row_bytes(q, k)
    pool = torch.zeros(1 << 20, dtype=torch.uint8)
    pool[: n * rb] = random_weight(q, n, k, seed=6).reshape(-1)
    layer = QuantLinear(pool[: n * rb], q, k, n)
    assert layer.weight.untyped_storage().nbytes() == pool.numel()  # a view, as from_cache's
    buf = io.BytesIO()
    torch.save(layer, buf)
    copies = [pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), torch.load(io.BytesIO(buf.getvalue()),
                                                                                  weights_only=False)]
    assert len(pickle.dumps(layer)) < 4 * n * rb and buf.tell() < 4 * n * rb + 4096
    x = gaussian_activations((2, k), seed=7)
    for other in copies:
        assert other.weight.untyped_storage().nbytes() == n * rb and torch.equal(other(x), layer(x))
    assert layer.weight.untyped_storage().nbytes() == pool.numel()  # the layer itself still views the pool


@pytest.mark.parametrize("device", DEVICES)
def test_from_cache_shares_the_cached_bytes(device):
    cache = WeightCache()
    cache.put("blk.0.attn_q.weight", random_weight(QType.Q6_K, 64, 256, device, seed=6), "Q6_K", 64, 256)
    cache.put("blk.0.attn_norm.weight", torch.ones(256, device=device))
    bias = torch.randn(64, device=device)
    layer = QuantLinear.from_cache(cache, "blk.0.attn_q.weight", bias=bias)
    assert layer.weight.data_ptr() == cache["blk.0.attn_q.weight"].tensor.data_ptr()
    assert (layer.qtype, layer.in_features, layer.out_features) == (QType.Q6_K, 256, 64)
    x = gaussian_activations((5, 256), seed=7).to(device)
    assert torch.equal(layer(x), cache.matmul("blk.0.attn_q.weight", x) + bias)
    with pytest.raises(ValueError, match=r"blk.0.attn_norm.weight: a dense weight .* use nn.Linear"):
        QuantLinear.from_cache(cache, "blk.0.attn_norm.weight")
    with pytest.raises(KeyError, match="no weight named 'blk.1.attn_q.weight'"):
        QuantLinear.from_cache(cache, "blk.1.attn_q.weight")


# ---- quantize_linears --------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, head_in=256):
        super().__init__()
        self.attn = nn.ModuleDict({"q": gaussian_linear(256, 256, seed=10),
                                   "o": gaussian_linear(256, 256, False, 11)})
        self.mlp = nn.Sequential(gaussian_linear(256, 512, seed=12), nn.GELU(), gaussian_linear(512, 256, seed=13))
        self.head = gaussian_linear(head_in, 10, seed=14)
        self.mha = nn.MultiheadAttention(256, 4, batch_first=True)  # its out_proj must stay float

    def forward(self, x):
        h = self.attn["o"](self.attn["q"](x))
        h = h + self.mlp(h)
        return self.head(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_input_equals_each_layer(device, dtype):
    """shared_input quantizes x once for layers of any formats (and biases): the same bits as
    calling each layer, on the GEMV path (up to ops.gemv_max_rows rows, batch dims) and beyond."""
    k = 512
    layers = [QuantLinear(random_weight(q, n, k, device, seed=i), q, k, n,
                          bias=torch.randn(n, device=device) if i == 1 else None)
              for i, (q, n) in enumerate([(QType.Q5_0, 8), (QType.Q4_K, 3), (QType.Q8_0, 5)])]
    # 17 rows: on the CPU past Q5_0's and Q8_0's GEMV, not Q4_K's (which then quantizes x itself)
    for lead in [(1,), (2, 4), (3, 5), (17,), (max(gemv_rows(m.qtype, device) for m in layers) + 1,)]:
        x = gaussian_activations(lead + (k,), seed=lead[0]).to(dtype).to(device)
        outs = shared_input(x, *layers)
        assert len(outs) == 3
        for m, y in zip(layers, outs):
            assert torch.equal(y, m(x)), (m, lead)


def _gated_layers(device, k=512, inter=384, bias=False):
    """gate, up [inter, k] and down [k, inter] QuantLinear layers of three formats."""
    return [QuantLinear(random_weight(q, n, kk, device, seed=i), q, kk, n,
                        bias=torch.randn(n, device=device) if bias and i == 2 else None)
            for i, (q, n, kk) in enumerate([(QType.Q4_K, inter, k), (QType.Q8_0, inter, k), (QType.Q6_K, k, inter)])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_gated_mlp_equals_its_composition(device, dtype, activation):
    """gated_mlp is bit for bit shared_input's gate and up (one Q8_1 input on the GEMV path: up to
    gemv_max_rows rows, batch dims), then the down projection of F.silu(gate) * up or F.gelu(gate) * up."""
    gate_proj, up_proj, down_proj = _gated_layers(device, bias=True)
    past = max(gemv_rows(m.qtype, device) for m in (gate_proj, up_proj, down_proj)) + 1
    for lead in [(1,), (2, 4), (33,), (past,)]:
        x = gaussian_activations(lead + (512,), seed=lead[0]).to(dtype).to(device)
        gate, up = shared_input(x, gate_proj, up_proj)
        act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh" if activation == "gelu_tanh"
                                                               else "none")
        want = down_proj(act * up)
        got = gated_mlp(x, gate_proj, up_proj, down_proj, activation)
        assert got.dtype == dtype and torch.equal(got, want), lead
        assert torch.equal(QuantGatedMLP(gate_proj, up_proj, down_proj, activation)(x), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_gated_is_the_gated_op_plus_bias(device, dtype):
    """QuantLinear.forward_gated_silu / forward_gated_gelu: forward_q8_1 of the gated Q8_1 producer (the
    gated qmatmuls' bits) plus the bias, for 1 and 3 rows."""
    *_, down = _gated_layers(device, bias=True)
    for rows in (1, 3):
        gate, up = (gaussian_activations((rows, 384), seed=s).to(dtype).to(device) for s in (rows, rows + 1))
        assert torch.equal(down.forward_gated_silu(gate, up),
                           down.forward_q8_1(torchext.gated_silu_quantize_q8_1(gate, up), dtype))
        for a in ("tanh", "none"):
            assert torch.equal(down.forward_gated_gelu(gate, up, a),
                               down.forward_q8_1(torchext.gated_gelu_quantize_q8_1(gate, up, a), dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_gated_mlp_of_float_layers_is_the_plain_formula(device):
    """Layers that are not QuantLinear (a float down projection, as a peft-wrapped one looks) never fuse."""
    gate_proj, up_proj, _ = _gated_layers(device)
    down = gaussian_linear(384, 512, seed=3).to(device)
    x = gaussian_activations((2, 512), seed=1).to(device)
    want = down(F.silu(gate_proj(x)) * up_proj(x))
    assert torch.equal(gated_mlp(x, gate_proj, up_proj, down), want)


def test_gated_mlp_activation_is_checked_and_the_module_keeps_the_layer_names():
    layers = _gated_layers("cpu")
    for call in (lambda: gated_mlp(torch.zeros(1, 512), *layers, "relu"), lambda: QuantGatedMLP(*layers, "swish"),
                 lambda: gated_mlp(torch.zeros(1, 512), *layers, ["silu"])):
        with pytest.raises(ValueError, match="activation: expected one of 'silu', 'gelu_tanh', 'gelu', got"):
            call()
    with pytest.raises(ValueError, match=r"gate_proj, up_proj, down_proj: expected gate_proj and up_proj \[in -> I\] "
                                         r"and down_proj \[I -> out\], got gate_proj \[512 -> 384\], up_proj "
                                         r"\[512 -> 384\], down_proj \[512 -> 512\]"):
        QuantGatedMLP(layers[0], layers[1], QuantLinear(random_weight(QType.Q8_0, 512, 512, "cpu"), QType.Q8_0, 512,
                                                        512))
    mlp = QuantGatedMLP(*layers, "gelu_tanh")
    assert [k for k in mlp.state_dict() if k.endswith("weight")] == ["gate_proj.weight", "up_proj.weight",
                                                                     "down_proj.weight"]
    assert "activation='gelu_tanh'" in repr(mlp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_stacked_gated_mlp_is_the_chunked_formula(device, activation):
    """QuantStackedGatedMLP (Phi-3's gate_up_proj): gate and up are the two halves of one layer's output,
    then gated_down. On the CPU the same bits as QuantGatedMLP over the halves' weights taken apart (a row's
    dot product there does not depend on the weight's other rows); on CUDA the kernels' K splits follow
    the weight's row count, so there it is checked against gated_down of the chunked output."""
    k, inter = 512, 384
    q = QType.Q4_K
    w = random_weight(q, 2 * inter, k, device, seed=7)
    gate_up = QuantLinear(w, q, k, 2 * inter)
    halves = [QuantLinear(w[:inter].contiguous(), q, k, inter), QuantLinear(w[inter:].contiguous(), q, k, inter)]
    down = _gated_layers(device)[2]
    stacked, plain = QuantStackedGatedMLP(gate_up, down, activation), QuantGatedMLP(*halves, down, activation)
    for rows in (1, 3, 33):
        x = gaussian_activations((rows, k), seed=rows).to(device)
        with torch.no_grad():
            want = plain(x) if device == "cpu" else torchext.nn.gated_down(*gate_up(x).chunk(2, dim=-1), down,
                                                                           activation)
            assert torch.equal(stacked(x), want), rows
    with pytest.raises(ValueError, match="gate_up_proj, down_proj: expected gate_up_proj \\[in -> 2 I\\] and "
                                         "down_proj \\[I -> out\\], got gate_up_proj out_features 768 and "
                                         "down_proj in_features 512"):
        QuantStackedGatedMLP(gate_up, QuantLinear(random_weight(QType.Q8_0, 512, 512, device), QType.Q8_0, 512, 512))


@pytest.mark.parametrize("rows", [2, 40], ids=["gemv", "tiled"])
def test_gated_mlp_errors_name_x(rows):
    """An input of the wrong width, or a 0-d one, is refused as QuantLinear refuses it, whichever path the
    rows would take (the shared Q8_1 input would have named its own bytes, xq)."""
    mlp = QuantGatedMLP(*_gated_layers("cpu"))
    with pytest.raises(RuntimeError, match="x: expected the last dimension to be k=512, got 384"):
        mlp(torch.zeros(rows, 384))
    with pytest.raises(RuntimeError, match="x: expected at least one dimension"):
        mlp(torch.tensor(1.0))


def test_gated_mlp_exports_with_a_dynamic_row_count():
    """torch.export with a dynamic row dimension: takes_q8_1 leaves a symbolic row count to each layer's
    qmatmul (which chooses its path inside the op), so no guard on the rows is added, and the exported
    program gives eager's bits on both sides of the GEMV's row limit."""
    mlp = QuantGatedMLP(*_gated_layers("cpu"))
    rows = torch.export.Dim("rows", min=1, max=64)
    ep = torch.export.export(mlp, (torch.randn(4, 512),), dynamic_shapes=({0: rows},))
    for n in (1, 3, 40):
        x = gaussian_activations((n, 512), seed=n)
        with torch.no_grad():
            assert torch.equal(ep.module()(x), mlp(x)), n


def test_quantize_linears_leaves_the_encoder_layers_fast_path_its_weights():
    """nn.TransformerEncoderLayer's inference fast path (eval, no grad) hands linear1.weight and
    linear2.weight to one fused op: quantize_linears leaves them float, so that path still runs, and
    quantizes the rest of the model."""
    model = nn.Sequential(gaussian_linear(64, 256, seed=1),
                          nn.TransformerEncoderLayer(256, 4, dim_feedforward=512, batch_first=True)).eval()
    quantize_linears(model, "Q8_0")
    enc = model[1]
    assert isinstance(model[0], QuantLinear)
    assert type(enc.linear1) is nn.Linear and type(enc.linear2) is nn.Linear
    assert type(enc.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():  # the fast path: it raised on QuantLinear's uint8 weights
        y = model(gaussian_activations((2, 5, 64), seed=2))
    assert y.shape == (2, 5, 256) and torch.isfinite(y).all()


def test_quantize_linears_with_filter():
    net = Net()
    x = gaussian_activations((4, 256), seed=15)
    with torch.no_grad():
        ref = net(x)
    seen = []

    def keep_head(name, m):
        seen.append(name)
        return name != "head"

    assert quantize_linears(net, "Q8_0", filter=keep_head) is net
    assert "head" in seen and "mha.out_proj" not in seen  # MultiheadAttention reads out_proj.weight itself
    assert isinstance(net.head, nn.Linear) and isinstance(net.mha.out_proj, nn.Linear)
    for layer in (net.attn["q"], net.attn["o"], net.mlp[0], net.mlp[2]):
        assert isinstance(layer, QuantLinear) and layer.qtype is QType.Q8_0
    assert net.attn["o"].bias is None and net.mlp[0].bias is not None
    with torch.no_grad():
        got = net(x)
    # Q8_0 on every layer but the head: ~1% per layer (see FROM_LINEAR_BOUNDS), a few layers deep
    assert ((got - ref).norm() / ref.norm()).item() < 0.03


def test_quantize_linears_tied_root_and_errors():
    shared = gaussian_linear(256, 256, seed=20)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_linears(model, QType.Q4_K)
    assert isinstance(model[0], QuantLinear) and model[0] is model[2]  # a tied layer stays tied

    root = quantize_linears(gaussian_linear(64, 8, seed=21), "Q4_K")
    assert isinstance(root, QuantLinear) and root.in_features == 64

    net = Net(head_in=256)
    net.head = gaussian_linear(256, 10, seed=22)
    net.mlp[2] = gaussian_linear(500, 256, seed=23)  # 500 is not a multiple of 32
    with pytest.raises(ValueError, match=r"mlp.2: in_features=500 is not a multiple of 32, which Q4_0 needs"):
        quantize_linears(net, "Q4_0")
    assert not any(isinstance(m, QuantLinear) for m in net.modules())  # nothing replaced before the error
    quantize_linears(net, "Q4_0", filter=lambda name, m: m.in_features % 32 == 0)
    assert isinstance(net.mlp[0], QuantLinear) and isinstance(net.mlp[2], nn.Linear)
    with pytest.raises(ValueError, match="qtype: unsupported weight format 'Q8_K'"):
        quantize_linears(net, "Q8_K")


@pytest.mark.parametrize("fmt, bad, message", [
    ("MXFP4", float("nan"), "w: row 3 holds NaN or infinite values"),
    ("Q4_K", 3e38, "w: row 3 holds finite values up to .* beyond what Q4_K can represent"),
])
def test_quantize_linears_is_all_or_nothing(fmt, bad, message):
    """A layer the quantizer refuses (a weight MXFP4 or a k-quant's fp16 scales cannot hold) is named in a
    ValueError, and no layer before it has been replaced: all are quantized before any is swapped in."""
    model = nn.Sequential(gaussian_linear(64, 64, seed=1), nn.ReLU(), gaussian_linear(64, 64, seed=2))
    with torch.no_grad():
        model[2].weight[3, 5] = bad
    with pytest.raises(ValueError, match="^2: " + message):
        quantize_linears(model, fmt)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match=message):  # from_linear's refusal is a ValueError too
        QuantLinear.from_linear(model[2], fmt)


def test_quantize_linears_refuses_linears_it_would_change():
    """A subclass of nn.Linear with its own forward would lose it (a silently different output), and a
    LazyLinear before its first forward has no weight: both are refused, naming the layer and the filter
    that leaves them out. A subclass that keeps nn.Linear's forward is replaced."""
    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Initialised(nn.Linear):  # its own init, nn.Linear's forward
        def reset_parameters(self):
            nn.init.normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)

    model = nn.Sequential(Initialised(64, 64), Doubled(64, 8))
    with pytest.raises(ValueError, match="^1: Doubled has its own forward, which QuantLinear would not run; exclude "
                                         "this layer with filter=..."):
        quantize_linears(model, "Q8_0")
    assert type(model[0]) is Initialised
    quantize_linears(model, "Q8_0", filter=lambda name, m: not isinstance(m, Doubled))
    assert type(model[0]) is QuantLinear and type(model[1]) is Doubled
    with pytest.raises(ValueError, match="^LazyLinear: LazyLinear has no weight yet; run a forward first"):
        quantize_linears(nn.LazyLinear(8), "Q8_0")


# ---- torch.compile -------------------------------------------------------------------------------

class MLP(nn.Module):
    """up (Q4_K, no bias) -> torchext.bias_gelu (tanh) -> down (Q8_0, with bias) -> torchext.gelu."""

    def __init__(self, d=256, hidden=512, dtype=torch.float32):
        super().__init__()
        self.up = QuantLinear.from_linear(gaussian_linear(d, hidden, bias=False, seed=30), "Q4_K")
        self.up_bias = nn.Parameter(torch.randn(hidden, generator=torch.Generator().manual_seed(31)).to(dtype),
                                    requires_grad=False)
        self.down = QuantLinear.from_linear(gaussian_linear(hidden, d, seed=32).to(dtype), "Q8_0")

    def forward(self, x):
        return torchext.gelu(self.down(torchext.bias_gelu(self.up(x), self.up_bias, "tanh")))


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d), requires_grad=False)

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight).to(x.dtype)


class Block(nn.Module):
    """A pre-norm transformer block: causal attention (SDPA) with quantized q/k/v/o projections
    (Q4_K, Q5_K, Q6_K, Q8_0), then a gated GELU-tanh MLP (gate Q4_K, up Q5_0, down Q6_K) whose
    GELU is the torchext op."""

    def __init__(self, d=256, heads=4, hidden=512):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        std = d ** -0.5
        self.q = QuantLinear.from_linear(gaussian_linear(d, d, False, 40, std), "Q4_K")
        self.k = QuantLinear.from_linear(gaussian_linear(d, d, False, 41, std), "Q5_K")
        self.v = QuantLinear.from_linear(gaussian_linear(d, d, False, 42, std), "Q6_K")
        self.o = QuantLinear.from_linear(gaussian_linear(d, d, True, 43, std), "Q8_0")
        self.gate = QuantLinear.from_linear(gaussian_linear(d, hidden, False, 44, std), "Q4_K")
        self.up = QuantLinear.from_linear(gaussian_linear(d, hidden, False, 45, std), "Q5_0")
        self.down = QuantLinear.from_linear(gaussian_linear(hidden, d, False, 46, hidden ** -0.5), "Q6_K")

    def forward(self, x):  # x [batch, seq, d]
        b, s, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        h = self.mlp_norm(x)
        return x + self.down(torchext.gelu(self.gate(h), "tanh") * self.up(h))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp_compiles_fullgraph(device, dtype):
    model = MLP(dtype=dtype).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for shape in [(1, 256), (2, 6, 256)]:  # 1 row: Q8_1 GEMV; 12 rows: dense; the policy is inside the op
        x = gaussian_activations(shape, seed=shape[0]).to(dtype).to(device)
        with torch.no_grad():
            expected = model(x)
            got = compiled(x)
        assert got.shape == (*shape[:-1], 256) and got.dtype == dtype
        assert torch.equal(got, expected)


def test_mlp_and_block_have_no_graph_break():
    x = gaussian_activations((1, 4, 256), seed=50)
    for model in (MLP(), Block()):
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("device", DEVICES)
def test_block_compiles_fullgraph(device):
    model = Block().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for shape in [(1, 1, 256), (2, 9, 256)]:  # one decode token (GEMV) and a prompt of 18 rows (dense)
        x = gaussian_activations(shape, seed=shape[1]).to(device)
        with torch.no_grad():
            expected = model(x)
            got = compiled(x)
        assert got.shape == shape
        assert torch.equal(got, expected)


@requires_cuda
def test_block_cuda_graphs_reduce_overhead():
    model = Block().to("cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        # several calls: warm-up, graph recording, then replays; new input values each time, so a
        # replay that ignored its input (or read a stale buffer) would fail
        for step in range(5):
            x = gaussian_activations((1, 1, 256), seed=60 + step).to("cuda")
            got = compiled(x).clone()  # a replay's output is overwritten by the next replay
            torch.testing.assert_close(got, model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_input_and_bias(device):
    """Training around a quantized layer: x and the bias get the gradients of x @ W.T + b, with W
    the dequantized weight (the bytes themselves are not trained). The same bits as g @ W and g.sum(0):
    the op's backward is that matmul on the same operands (torchext.ops), and a sum of two values
    rounds once whatever the order."""
    linear = gaussian_linear(256, 32, seed=3).to(device)
    layer = QuantLinear.from_linear(linear, "Q6_K")
    x = gaussian_activations((2, 256), seed=4).to(device).requires_grad_()
    g = torch.randn(2, 32, device=device)
    layer(x).backward(g)
    w = torchext.dequantize(layer.weight, "Q6_K", 32, 256)
    assert torch.equal(x.grad, g @ w)
    assert torch.equal(layer.bias.grad, g.sum(0))


# ---- what a user's hooks, subclasses and lifecycle calls see --------------------------------------

def _q8_0_linear(i, o, seed):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(i, o, bias=False), "Q8_0")


@pytest.mark.parametrize("rows", [3, 40])
def test_hooks_of_shared_input_layers_run_on_the_gemv_path(rows):
    """gated_mlp and shared_input called forward_q8_1 on a few rows (every decode step), skipping the
    layers' forward hooks and a subclass's forward, which ran from 17 rows: now the layers are called
    whenever one has hooks (its own or global) or its own forward."""
    mlp = QuantGatedMLP(_q8_0_linear(256, 512, 1), _q8_0_linear(256, 512, 2), _q8_0_linear(512, 256, 3), "silu")
    x = torch.randn(rows, 256)
    handle = mlp.up_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    with torch.no_grad():
        assert mlp(x).abs().max() == 0  # silu(gate) * 0 through the down projection
    handle.remove()
    pre = mlp.gate_proj.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    with torch.no_grad():
        assert mlp(x).abs().max() == 0  # silu(0) = 0
    pre.remove()
    calls = []
    with torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__)):
        with torch.no_grad():
            shared_input(x, mlp.gate_proj, mlp.up_proj)
    assert calls == ["QuantLinear", "QuantLinear"]

    class Doubled(QuantLinear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(mlp.up_proj.weight, "Q8_0", 256, 512)
    with torch.no_grad():
        gate, up = shared_input(x, mlp.gate_proj, doubled)
        torch.testing.assert_close(up, 2 * mlp.up_proj(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch notes no input wants a gradient
def test_backward_hooks_of_shared_input_layers_run():
    """With a bias that wants its gradient, backward runs through the layers even where x's is not wanted, and
    m(x) would run their full backward hooks: gated_mlp called forward_q8_1 and skipped them. Now a layer with
    backward hooks (its own or global) is called as a module."""
    mlp = QuantGatedMLP(*(QuantLinear.from_linear(nn.Linear(i, o), "Q8_0") for i, o in ((256, 128), (256, 128),
                                                                                     (128, 256))), "silu")
    x = torch.randn(1, 256)
    calls = []
    handle = mlp.gate_proj.register_full_backward_hook(lambda m, gi, go: calls.append("gate"))
    mlp(x).sum().backward()
    assert calls == ["gate"]
    handle.remove()
    with torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append(type(m).__name__)):
        mlp(x).sum().backward()
    assert calls.count("QuantLinear") == 3


def test_from_linear_keeps_what_the_linear_was():
    """quantize_linears gave every layer a trainable bias in training mode: a frozen model's biases came back
    trainable (an optimizer over the trainable parameters would train them), an eval model's layers in
    training mode. Now each layer keeps its linear's bias requires_grad and its mode, on meta too."""
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 32))
        model.requires_grad_(False).eval()
        model[2].bias.requires_grad_(True)
        quantize_linears(model, "Q4_K")
        assert [p.requires_grad for p in model.parameters()] == [False, True]
        assert not any(m.training for m in model.modules())


def test_from_linear_on_meta_gives_a_meta_layer_to_assign_into():
    """accelerate's init_empty_weights builds nn.Linear on meta: quantize_linears failed with "Cannot copy
    out of meta tensor"; now the layer is a meta one of the format's byte shape, filled by
    load_state_dict(assign=True)."""
    torch.manual_seed(0)
    real = quantize_linears(nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32)), "Q4_K")
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize_linears(empty, "Q4_K")
    assert empty[0].weight.device.type == "meta" and empty[0].weight.shape == real[0].weight.shape
    empty.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 256)
    torch.testing.assert_close(empty(x), real(x), rtol=0, atol=0)


def test_jit_script_says_what_works_instead():
    with pytest.raises(RuntimeError, match=r"QuantLinear: torch.jit.script cannot compile torchext's modules .* "
                                           r"torch.compile or torch.export, or torch.jit.trace"):
        torch.jit.script(_q8_0_linear(256, 64, 0))


# ---- the mixture-of-experts modules' arguments ------------------------------------------------------

def _float_experts(e=4, h=64, i=96):
    g = torch.Generator().manual_seed(0)
    return torch.randn(e, i, h, generator=g), torch.randn(e, i, h, generator=g), torch.randn(e, h, i, generator=g)


def test_experts_from_float_checks_the_three_shapes():
    """A down_proj given as [E, I, H] (gate's layout) quantizes to as many bytes as [E, H, I], and from_float read
    only gate_proj's shape: it built experts of scrambled weights. Each shape is now checked, naming the tensor."""
    gate, up, down = _float_experts()
    with pytest.raises(ValueError, match=r"^down_proj: expected \[4, 64, 96\] for gate_proj of shape \[E, I, H\] = "
                                         r"\[4, 96, 64\], got \[4, 96, 64\]$"):
        QuantExperts.from_float(gate, up, down.transpose(1, 2), "Q8_0")
    with pytest.raises(ValueError, match=r"^up_proj: expected \[4, 96, 64\] .* got \[2, 96, 64\]$"):
        QuantExperts.from_float(gate, up[:2], down, "Q8_0")
    with pytest.raises(ValueError, match=r"^gate_proj: expected \[num_experts, intermediate_size, hidden_size\], "
                                         r"got \[96, 64\]$"):  # was "not enough values to unpack"
        QuantExperts.from_float(gate[0], up[0], down[0], "Q8_0")


@pytest.mark.parametrize("arg, bad", [("num_experts", 4.5), ("num_experts", True), ("hidden_size", 64.0),
                                      ("intermediate_size", "96")], ids=str)
def test_experts_sizes_are_positive_ints(arg, bad):
    """The sizes went through int() unchecked: 4.5 experts ran as 4, True as 1 (on one expert's bytes)."""
    experts = QuantExperts.from_float(*_float_experts(), "Q8_0")
    sizes = {"num_experts": 4, "hidden_size": 64, "intermediate_size": 96, arg: bad}
    with pytest.raises(ValueError, match=f"^{arg}: expected a positive int, got {bad!r}$"):
        QuantExperts(experts.gate_proj, experts.up_proj, experts.down_proj, "Q8_0", **sizes)


def test_experts_top_k_weights_must_match_the_ids():
    """top_k_weights [1, k] broadcast over every token (each weighted by the first token's scores), and [T, k + 1]
    failed in torch's multiply, naming no argument."""
    experts = QuantExperts.from_float(*_float_experts(), "Q8_0")
    x, ids = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [1, 1]])
    for weights in (torch.rand(1, 2), torch.rand(3, 3), torch.rand(3)):
        with pytest.raises(ValueError, match=rf"^top_k_weights: expected the shape of top_k_index \[3, 2\], got "
                                             rf"{re.escape(str(list(weights.shape)))}$"):
            experts(x, ids, weights)


def test_router_refuses_integer_or_misshapen_hidden_states():
    """Integer hidden states cast the router's weight to integers (F.linear ran, the logits truncated), and a wrong
    hidden size was reshape's error, naming nothing."""
    router = TopKRouter(torch.randn(4, 64), top_k=2)
    for bad in (torch.ones(3, 64, dtype=torch.long), torch.randn(3, 65), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=rf"^hidden_states: expected float \[\.\.\., 64\] \(the router's hidden "
                                             rf"size\), got {bad.dtype} {re.escape(str(list(bad.shape)))}$"):
            router(bad)
