"""torchext.diffusers.convert_gguf_linears against diffusers' own GGUF path, on a tiny random Flux
transformer (one double-stream and one single-stream block, width 256) written to GGUF here.

The file (torchext.diffusers.save_gguf, diffusers' parameter names) quantizes the linears in a mix
of the eight formats torchext.quantize makes, one in BF16 (a GGUF format torchext has no kernel
for: it must stay on diffusers' path) and the 16-input x_embedder in float32 (a plain nn.Linear).
diffusers loads it with from_single_file(..., quantization_config=GGUFQuantizationConfig(...)):
its GGUFLinear dequantizes with fp16 arithmetic (fp16 scales times quants, rounded to fp16), then
runs F.linear in compute_dtype. The converted layers run torchext.qmatmul on the same bytes:

- past torchext.ops.gemv_max_rows (the 64 image tokens; on the CPU 16 to 48 rows for these formats):
  exact dequantized weights, unrounded activations;
- up to it (the 8 text tokens, and the timestep / modulation linears' one row): the Q8_1 GEMV,
  activations rounded per 32-value block, d = amax/127 (README "Accuracy").

So per layer, every output differs from diffusers' by at most
|x| @ |W_diffusers - W_exact|.T (diffusers' fp16 rounding of the weights, itself checked to be
within 2^-8 of the largest weight) + 2e-5 |x| @ |W|.T (fp32 accumulation, both sides) + on the
GEMV path sum_b (d_b/2) sum_{i in b} |W_i|: test_each_layer_within_the_documented_bound checks
that bound at every output of every converted layer.
"""

from __future__ import annotations

import re
import sys

import gguf
import pytest
import torch
from conftest import DEVICES

import torchext
from torchext import QType
from torchext.ops import gemv_max_rows

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate", reason="diffusers needs accelerate to load GGUF files")
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig  # noqa: E402
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFLinear, dequantize_gguf_tensor  # noqa: E402

from torchext.diffusers import GGUFQuantLinear, convert_gguf_linears, save_gguf  # noqa: E402

FORMATS = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
IMAGE_SIDE, TEXT_TOKENS, WIDTH, CONTEXT = 8, 8, 256, 64


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=WIDTH // 128,
                                  joint_attention_dim=CONTEXT, pooled_projection_dim=CONTEXT,
                                  guidance_embeds=False, axes_dims_rope=(16, 56, 56))


def file_format(names: list[str], name: str, layer: torch.nn.Linear):
    """The mix: formats in turn over the linears (a k-quant needs whole 256-value rows, else Q8_0),
    proj_out in BF16, the 16-input x_embedder in float32."""
    if name == "proj_out":
        return "BF16"
    if layer.in_features % 32:
        return None
    fmt = FORMATS[names.index(name) % len(FORMATS)]
    return "Q8_0" if fmt.endswith("_K") and layer.in_features % 256 else fmt


@pytest.fixture(scope="module")
def flux_gguf(tmp_path_factory):
    """(folder holding config.json and flux.gguf, {linear name: its format in the file})."""
    folder = tmp_path_factory.mktemp("flux")
    model = tiny_flux()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    formats = {n: file_format(names, n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model.save_config(folder)
    save_gguf(model, folder / "flux.gguf", lambda name, layer: formats[name])
    return folder, formats


def load(folder, dtype=torch.float32, device="cpu") -> FluxTransformer2DModel:
    """diffusers' GGUF loading of the file: GGUFLinear layers computing in dtype."""
    return FluxTransformer2DModel.from_single_file(
        str(folder / "flux.gguf"), config=str(folder), device=device, torch_dtype=dtype,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))


def inputs(dtype=torch.float32, device="cpu") -> dict:
    """One 8x8-token image and 8 text tokens."""
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(IMAGE_SIDE), torch.arange(IMAGE_SIDE), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    values = dict(hidden_states=torch.randn(1, IMAGE_SIDE**2, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT_TOKENS, CONTEXT, generator=g),
                  pooled_projections=torch.randn(1, CONTEXT, generator=g))
    return dict({k: v.to(device, dtype) for k, v in values.items()}, timestep=torch.tensor([0.5], device=device),
                img_ids=img_ids.to(device), txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device), return_dict=False)


def test_converts_every_gguf_linear_of_a_torchext_format_over_the_same_bytes(flux_gguf):
    folder, formats = flux_gguf
    model = load(folder)
    before = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    report = convert_gguf_linears(model)

    expected = {n: f for n, f in formats.items() if f not in (None, "BF16")}
    assert report.converted == expected and len(expected) == 26
    assert report.kept == {"proj_out": "BF16"}
    assert str(report).startswith("converted 26 GGUF linears to torchext (Q4_0 4, Q4_1 3, Q4_K 2, Q5_0 4,")
    assert str(report).endswith("kept 1 on diffusers' dequantizing path (BF16 1): proj_out")
    for name, fmt in expected.items():
        new, old = model.get_submodule(name), before[name]
        assert isinstance(new, GGUFQuantLinear) and new.qtype.name == fmt
        assert new.weight.data_ptr() == old.weight.data_ptr()  # the loaded bytes, not a copy
        assert new.bias.data_ptr() == old.bias.data_ptr() and not new.bias.requires_grad
        assert new.compute_dtype == old.compute_dtype == torch.float32
    assert model.get_submodule("proj_out") is before["proj_out"]
    assert type(model.x_embedder) is torch.nn.Linear


def gemv_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """README "Accuracy": sum over 32-value blocks b of (d_b / 2) sum_{i in b} |W_i|, with d_b
    amax_b/127 rounded up to 10 mantissa bits (at most 1 + 2^-10 times more)."""
    d = x.abs().reshape(x.shape[0], -1, 32).amax(-1) / 127 * (1 + 2**-10)
    return (d / 2) @ w.abs().reshape(w.shape[0], -1, 32).sum(-1).T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 24], ids=["gemv", "dense"])
def test_each_layer_within_the_documented_bound(flux_gguf, rows, device):
    folder, _ = flux_gguf
    model = load(folder, device=device)
    before = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    report = convert_gguf_linears(model)
    g = torch.Generator().manual_seed(rows)
    for name in report.converted:
        new, old = model.get_submodule(name), before[name]
        x = torch.randn(rows, new.in_features, generator=g).to(device)
        with torch.no_grad():
            got, want = new(x).double(), old(x).double()
        w_exact = torchext.dequantize(new.weight, new.qtype, new.out_features, new.in_features).double()
        w_diffusers = dequantize_gguf_tensor(old.weight).double()
        # the same weights, up to diffusers' fp16 arithmetic (a few roundings of 2^-11 each)
        assert (w_diffusers - w_exact).abs().max() <= 2**-8 * w_exact.abs().max(), name
        x64 = x.double()
        bound = x64.abs() @ (w_diffusers - w_exact).abs().T + 2e-5 * (x64.abs() @ w_exact.abs().T + new.bias.abs())
        if rows <= gemv_max_rows(x, new.out_features, new.qtype):
            bound = bound + gemv_rounding_bound(x64, w_exact)
        excess = (got - want).abs() - bound
        assert excess.max() <= 0, f"{name} ({new.qtype.name}): {excess.max().item():.3g} over the bound"


# End to end, norm-relative: the per-layer differences above through two blocks whose linears read
# LayerNorm'd (or SiLU'd conditioning) inputs, so the tolerance is a per-layer relative one, not
# multiplied by depth. Weight rounding: diffusers' dequantized weights are fp16 roundings (a few
# half-ulps, 2^-12 each, of the exact values): 2^-11 in float32 (measured 5.7e-5 with exact=True).
# In bfloat16 both sides round at different points (diffusers its weights, torchext's CPU dense
# path keeps them fp32; products and outputs), 2^-9 each, a few of them: 2^-7 (measured 3.5e-3).
# Q8_1: a <= 16-row layer's inputs move by up to amax/254 of their 32-value block, and an upstream
# difference can move one across a rounding boundary (a full step, amax/127): 1/127 more (measured
# 1.1e-3 in float32, 3.9e-3 in bfloat16, where it adds to the bf16 roundings).
WEIGHT_ROUNDING = {torch.float32: 2**-11, torch.bfloat16: 2**-7}
Q8_1_STEP = 1 / 127


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, exact", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)],
                         ids=["float32-exact", "float32", "bfloat16"])
def test_model_output_matches_diffusers(flux_gguf, dtype, exact, device):
    folder, _ = flux_gguf
    reference, model = load(folder, dtype, device), load(folder, dtype, device)
    convert_gguf_linears(model, exact=exact)
    with torch.no_grad():
        got, want = model(**inputs(dtype, device))[0], reference(**inputs(dtype, device))[0]
    assert got.dtype == want.dtype == dtype and got.shape == (1, IMAGE_SIDE**2, 16)
    error = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert error <= WEIGHT_ROUNDING[dtype] + (0 if exact else Q8_1_STEP), error


def test_compiles_without_graph_breaks(flux_gguf):
    """fullgraph=True traces the converted model with torchext's fake kernels (no graph break). The
    aot_eager backend (AOTAutograd, eager kernels) keeps it to ~10 s on the CPU: inductor takes
    ~170 s for this model on a 2-core machine, and tests/test_compile.py covers QuantLinear under
    inductor."""
    folder, _ = flux_gguf
    model = load(folder)
    convert_gguf_linears(model)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs())[0]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs())[0]
    # proj_out stays a diffusers GGUFLinear, and compiled, diffusers' GGUFParameter subclass then
    # wraps the model's output (as it does with no layer converted)
    torch.testing.assert_close(compiled.as_tensor(), eager, rtol=0, atol=0)


def test_errors_name_the_problem(flux_gguf, tmp_path, monkeypatch):
    folder, _ = flux_gguf
    with pytest.raises(ValueError, match=r"FluxTransformer2DModel holds no diffusers GGUFLinear layers to convert; "
                                         r"load it from a GGUF file with quantization_config=GGUFQuantizationConfig"):
        convert_gguf_linears(tiny_flux())
    model = load(folder)
    convert_gguf_linears(model)
    again = convert_gguf_linears(model)  # what is left: the BF16 layer
    assert again.converted == {} and again.kept == {"proj_out": "BF16"}
    with pytest.raises(ValueError, match=r"FluxTransformerBlock holds no diffusers GGUFLinear layers to convert \(it "
                                         r"holds 14 GGUFQuantLinear layers: converted already\)"):
        convert_gguf_linears(model.transformer_blocks[0])
    with pytest.raises(ValueError, match=r"x_embedder.weight: Q8_0 rows are whole 32-value blocks, and this weight's "
                                         r"rows have 16 values"):
        save_gguf(tiny_flux(), tmp_path / "x.gguf", "Q8_0")
    # a format no quantizer makes: diffusers (5.x) loads none such, but a later one might, or none is installed
    monkeypatch.setattr(torchext.diffusers, "_diffusers_types", lambda: None)
    with pytest.raises(ValueError, match=r"neither torchext nor gguf can quantize to IQ2_XS"):
        save_gguf(tiny_flux(), tmp_path / "x.gguf", lambda name, layer: "IQ2_XS" if name == "proj_out" else None)


def test_a_layer_held_under_two_names_is_converted_under_both():
    """One GGUFLinear held twice (a shared projection): both names were diffusers' layer after the first
    was converted, the second left on diffusers' path and out of the report. Both now hold one
    GGUFQuantLinear, as quantize_linears keeps a tied layer tied."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    data, bias = torchext.quantize(torch.randn(8, 64), QType.Q8_0), torch.randn(8)
    layer = GGUFLinear(64, 8, bias=True, compute_dtype=torch.float32, device="meta")
    layer.weight = GGUFParameter(data, quant_type=gguf.GGMLQuantizationType.Q8_0)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    model = torch.nn.Module()
    model.a = model.b = layer
    report = convert_gguf_linears(model)
    assert report.converted == {"a": "Q8_0", "b": "Q8_0"} and report.kept == {}
    assert isinstance(model.a, GGUFQuantLinear) and model.a is model.b
    x = torch.randn(3, 64)
    assert torch.equal(model.a(x), GGUFQuantLinear(data, QType.Q8_0, 64, 8, bias, torch.float32)(x))  # the same bytes


def file_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_save_gguf_reads_formats_as_torchext_does(tmp_path):
    """A format is a name, QType, gguf type or integer id, as QType.of reads one: a float such as 12.7 is no id
    (int() made it 12, Q4_K), and an unknown name is a ValueError (was a KeyError), before anything is written."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 64))
    for fmt in ("q4_k", QType.Q4_K, gguf.GGMLQuantizationType.Q4_K, 12):
        save_gguf(model, tmp_path / "x.gguf", fmt)
        assert file_types(tmp_path / "x.gguf") == {"0.weight": "Q4_K", "0.bias": "F32"}, fmt
    path = tmp_path / "y.gguf"
    with pytest.raises(ValueError, match=r"^0.weight: unsupported quantization format 12.7: expected a QType, a gguf "
                                         r"GGMLQuantizationType, its integer id or its name, got a float$"):
        save_gguf(model, path, 12.7)
    with pytest.raises(ValueError, match=r"^0.weight: unknown format 'Q4K'; expected one of \['BF16', 'F16', 'F32', "
                                         r"'IQ4_NL', .*'Q4_K', .*\] \(or None for float32\)$"):
        save_gguf(model, path, "Q4K")
    assert not path.exists()


@pytest.mark.parametrize("fmt", ["TQ1_0", "TQ2_0", "MXFP4", "NVFP4"])
def test_save_gguf_refuses_formats_diffusers_cannot_load(tmp_path, fmt):
    """torchext's formats that diffusers' from_single_file refuses (not in its SUPPORTED_GGUF_QUANT_TYPES) are a
    ValueError naming the format and those it loads, read from diffusers, before anything is written."""
    loads = sorted([t.name for t in SUPPORTED_GGUF_QUANT_TYPES] + ["F16", "F32"])
    assert fmt not in loads
    path = tmp_path / "flux.gguf"
    with pytest.raises(ValueError, match=rf"^[\w.]+\.weight: diffusers' from_single_file cannot load {fmt} weights; "
                                         rf"give this layer one of the formats it loads, {re.escape(str(loads))} "
                                         r"\(or None for float32\)$"):
        save_gguf(tiny_flux(), path, lambda name, layer: fmt if layer.in_features % 256 == 0 else None)
    assert not path.exists()


def test_save_gguf_without_diffusers_writes_any_format(tmp_path, monkeypatch):
    """Without diffusers' GGUF loader to ask, the formats are not checked against it."""
    monkeypatch.setitem(sys.modules, "diffusers.quantizers.gguf.utils", None)  # its import raises ImportError
    save_gguf(torch.nn.Sequential(torch.nn.Linear(256, 64)), tmp_path / "x.gguf", "TQ2_0")
    assert file_types(tmp_path / "x.gguf") == {"0.weight": "TQ2_0", "0.bias": "F32"}


def test_save_gguf_writes_a_shared_layer_in_its_format_under_every_name(tmp_path):
    """named_modules gives a layer held twice under its first name alone: the second name's weight went out float32."""
    model = torch.nn.Module()
    model.a = model.b = torch.nn.Linear(64, 8)
    save_gguf(model, tmp_path / "x.gguf", "Q8_0")
    assert file_types(tmp_path / "x.gguf") == {"a.weight": "Q8_0", "a.bias": "F32", "b.weight": "Q8_0",
                                               "b.bias": "F32"}


def test_save_gguf_refuses_a_model_that_holds_gguf_weights(flux_gguf, tmp_path):
    """A model loaded from a GGUF file holds its packed bytes: save_gguf wrote them as float32 values (a file
    diffusers then refused: 'expected shape [256, 256], got [256, 144]'), or quantized bytes as values, and after
    convert_gguf_linears failed on the layers' format record ('dict' object has no attribute 'detach'). A ValueError
    names the first such entry, before anything is written."""
    folder, _ = flux_gguf
    path = tmp_path / "again.gguf"
    model = load(folder)
    with pytest.raises(ValueError, match=r"^[\w.]+\.weight: packed \w+ bytes; save_gguf writes a model of float "
                                         r"weights, and this one holds weights that are GGUF already"):
        save_gguf(model, path, None)
    convert_gguf_linears(model)
    with pytest.raises(ValueError, match=r"^[\w.]+: (packed GGUF bytes|a dict, no tensor); save_gguf writes"):
        save_gguf(model, path, "Q8_0")
    assert not path.exists()
