"""diffusers models loaded from GGUF, with their quantized linears on torchext ops.

    import torch
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from torchext.diffusers import convert_gguf_linears

    transformer = FluxTransformer2DModel.from_single_file(
        "flux1-dev-Q4_K_S.gguf", quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16)
    print(convert_gguf_linears(transformer))   # "converted N GGUF linears to torchext (Q4_K ..., ...)"

diffusers' GGUF quantizer (diffusers.quantizers.gguf) loads each quantized 2-D weight as a
GGUFParameter (the tensor's raw GGUF bytes, uint8 [out_features, row_bytes], and its quant_type)
on a GGUFLinear, whose forward dequantizes the whole weight on every call and then runs F.linear
in the quantizer's compute_dtype. convert_gguf_linears replaces every GGUFLinear whose format
torchext runs (torchext.formats.WEIGHT_TYPES) with a GGUFQuantLinear over the same bytes (no copy:
the buffer is the parameter's storage) that calls torchext.qmatmul instead: up to 4, 8 or 16 rows on
CUDA, 4 to 48 by format on the CPU (torchext.ops.gemv_max_rows) a Q8_1 GEMV over the packed weight,
up to 64 rows on CUDA a tiled GEMM over it (16 on weights under 2^23 values, up to 256 on compute
capability 9.0 for weights whose rows are 16-byte multiples, 512 for Q4_K and Q5_K on weights of
2^25 values or more with rows of 4096 or more), more rows (Flux's 4096 image tokens) a dense GEMM on the dequantized
weight: on CUDA one dequantization kernel into a temporary, then cuBLAS (diffusers' dequantization
is a chain of fp16 torch ops), on the CPU in cache-sized row chunks. Layers in other formats (BF16,
F16, formats torchext does not run) stay on diffusers' path and are listed in the returned report.

What stays the same: the output dtype is the compute_dtype (activations are cast to it first,
as diffusers' CUDA path does), the bias is the same tensor, cast to compute_dtype when added,
and requires_grad is kept. What differs, numerically: diffusers dequantizes in fp16 arithmetic
(fp16 scales times quants, rounded to fp16) before casting to compute_dtype; torchext uses the
exact dequantized values (fp32), and on the GEMV path (torchext.ops.gemv_max_rows: Flux's timestep and
modulation linears at batch 1) rounds activations to Q8_1: tests/test_diffusers.py bounds both.

save_gguf writes a diffusers model's weights as a GGUF file with diffusers' own parameter names,
which from_single_file loads without a key conversion (given config=, the model's saved config):
a way to try this on any diffusers transformer, and what the tests and the README use. It writes
only the formats the installed diffusers loads (0.42: not torchext's TQ1_0, TQ2_0, MXFP4 or NVFP4).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from typing import Callable, Optional, Union

import gguf
import numpy as np
import torch
from torch import nn

from torchext.formats import QUANTIZABLE_TYPES, WEIGHT_TYPES, QType
from torchext.nn import QuantLinear
from torchext.ops import quantize

logger = logging.getLogger(__name__)


class GGUFQuantLinear(QuantLinear):
    """diffusers' GGUFLinear computed by torchext: a QuantLinear whose output is in compute_dtype
    (the input is cast to it first; None keeps the input's dtype), as GGUFLinear's is. exact:
    QuantLinear's (never round activations to Q8_1)."""

    def __init__(self, weight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
                 exact: bool = False) -> None:
        super().__init__(weight, qtype, in_features, out_features, bias, exact)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in compute_dtype."""
        return super().forward(x if self.compute_dtype is None else x.to(self.compute_dtype))

    def extra_repr(self) -> str:
        """QuantLinear's description and the compute dtype."""
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"


@dataclasses.dataclass
class GGUFLinearConversion:
    """What convert_gguf_linears did: module name -> GGUF format name, for the layers now on torchext
    (converted) and for those left on diffusers' dequantizing path (kept: torchext has no kernel for
    their format)."""

    converted: dict[str, str]
    kept: dict[str, str]

    def __str__(self) -> str:
        def by_format(layers: dict[str, str]) -> str:
            return ", ".join(f"{name} {count}" for name, count in sorted(Counter(layers.values()).items()))

        text = f"converted {len(self.converted)} GGUF linears to torchext ({by_format(self.converted) or 'none'})"
        if self.kept:
            text += (f"; kept {len(self.kept)} on diffusers' dequantizing path ({by_format(self.kept)}): "
                     f"{', '.join(self.kept)}")
        return text


def convert_gguf_linears(model: nn.Module, exact: bool = False) -> GGUFLinearConversion:
    """Replace, in place, every diffusers GGUFLinear of `model` whose format torchext runs with a
    GGUFQuantLinear over the same bytes; returns which layers were converted and which were kept
    (module docstring). exact=True: activations are never rounded to Q8_1 (torchext.qmatmul's
    exact), giving up the Q8_1 GEMV on layers of few rows. Works on the model's device
    (CPU or CUDA); convert before attaching accelerate hooks (enable_sequential_cpu_offload), since
    the hooks hold the modules they wrap.

    ValueError when `model` holds no GGUFLinear (it was not loaded from a GGUF file with
    GGUFQuantizationConfig, or was converted already), is a GGUFLinear itself (there is no parent
    to replace it in), or when a GGUFLinear carries an accelerate hook.
    """
    from diffusers.quantizers.gguf.utils import GGUFLinear

    if isinstance(model, GGUFLinear):
        raise ValueError("model is a single GGUFLinear: pass the module that holds it, which the layer is replaced in")

    # every name a layer is held under (one module may be held twice): all of them are replaced, by one layer
    layers = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, GGUFLinear)]
    if not layers:
        already = sum(isinstance(m, GGUFQuantLinear) for m in model.modules())
        raise ValueError(
            f"{type(model).__name__} holds no diffusers GGUFLinear layers to convert"
            + (f" (it holds {already} GGUFQuantLinear layers: converted already)" if already else
               "; load it from a GGUF file with quantization_config=GGUFQuantizationConfig(...), e.g. "
               "from_single_file(path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))"))
    hooked = [name for name, m in layers if hasattr(m, "_hf_hook")]
    if hooked:
        raise ValueError(f"{len(hooked)} GGUFLinear layers carry accelerate hooks ({hooked[0]}, ...): convert the "
                         "model before enable_sequential_cpu_offload or device_map dispatch")
    supported = {int(q) for q in WEIGHT_TYPES}
    report = GGUFLinearConversion(converted={}, kept={})
    done: dict[int, GGUFQuantLinear] = {}
    for name, layer in layers:
        quant_type = gguf.GGMLQuantizationType(int(layer.weight.quant_type))
        if quant_type.value not in supported:
            report.kept[name] = quant_type.name
            continue
        if id(layer) not in done:
            bias = layer.bias
            done[id(layer)] = GGUFQuantLinear(layer.weight.as_tensor().detach(), QType(quant_type.value),
                                              layer.in_features, layer.out_features,
                                              None if bias is None else bias.detach(), layer.compute_dtype, exact)
            if bias is not None:
                done[id(layer)].bias.requires_grad_(bias.requires_grad)
        new = done[id(layer)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        report.converted[name] = quant_type.name
    if report.kept:
        logger.info("%s: torchext has no kernel for these layers' formats; they stay on diffusers' path: %s",
                    type(model).__name__, ", ".join(f"{n} ({f})" for n, f in report.kept.items()))
    return report


WeightFormat = Union[str, QType, gguf.GGMLQuantizationType, None]


def save_gguf(model: nn.Module, path: Union[str, os.PathLike],
              weight_format: Union[WeightFormat, Callable[[str, nn.Linear], WeightFormat]] = "Q8_0") -> None:
    """Write `model`'s state_dict to a GGUF file under diffusers' parameter names, the weight of
    every nn.Linear in `weight_format` (a GGUF type name such as "Q4_K" or "BF16", a QType or
    gguf.GGMLQuantizationType, a torchext format's integer id, or a function of (qualified module
    name, layer) giving one; None for float32); everything else as float32. A float such as 12.7 is
    not a format id. diffusers' from_single_file(path, config=DIR,
    quantization_config=GGUFQuantizationConfig(...)) loads it, DIR holding the model's saved config
    (model.save_config(DIR)).

    Quantized with torchext.quantize (llama.cpp's reference quantizers) for torchext's formats and
    with gguf's numpy quantizers for the others gguf can make (BF16, F16). ValueError for an unknown
    format, for one diffusers' loader does not read (its SUPPORTED_GGUF_QUANT_TYPES, and F32, F16;
    not checked where diffusers is not installed), for one neither quantizer makes, or for a layer
    whose in_features is not a whole number of the format's blocks. Every layer's format is read and
    checked against diffusers' list before anything is quantized; nothing is written on an error. A model
    that holds GGUF weights already (diffusers' GGUFParameter, torchext's layers) is a ValueError naming the
    first such entry. A layer shared under several names takes its format under each.
    """
    # every name of a layer shared under several (named_modules gives the first alone: the others went out float32)
    linears = {f"{name}.weight": (name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, nn.Linear)}
    state = model.state_dict()
    loadable = _diffusers_types()
    formats = {}
    for key, tensor in state.items():
        _check_float_state(key, tensor)
        fmt = None
        if key in linears:
            fmt = weight_format(*linears[key]) if callable(weight_format) else weight_format
        if fmt is not None:
            formats[key] = _file_type(key, fmt, loadable)
    writer = gguf.GGUFWriter(os.fspath(path), type(model).__name__)
    for key, tensor in state.items():
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        if key not in formats:
            writer.add_tensor(key, values.numpy())
            continue
        raw = _quantized_bytes(key, values, formats[key])
        writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=formats[key])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_float_state(key: str, value) -> None:
    """ValueError for a state_dict entry save_gguf cannot write as float values: packed GGUF bytes (diffusers'
    GGUFParameter, a torchext layer's uint8 buffer) and the format record of a torchext layer. Written as floats,
    a loaded model's packed bytes made a file diffusers refused ("expected shape [256, 256], got [256, 144]")."""
    quant_type = getattr(value, "quant_type", None)
    if isinstance(value, torch.Tensor) and value.dtype != torch.uint8 and quant_type is None:
        return
    what = (f"packed {gguf.GGMLQuantizationType(int(quant_type)).name} bytes" if quant_type is not None else
            "packed GGUF bytes" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, no tensor")
    raise ValueError(f"{key}: {what}; save_gguf writes a model of float weights, and this one holds weights that are "
                     "GGUF already (loaded from a GGUF file, or converted by convert_gguf_linears): keep the file it "
                     "came from, or save the float model it was made from")


def _diffusers_types() -> Optional[frozenset]:
    """The GGUF types diffusers' from_single_file loads (None without diffusers: nothing to check against)."""
    try:
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES
    except ImportError:
        return None
    # its loader takes F32 and F16 tensors as they are, every other type through its dequantizers
    return frozenset([gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *SUPPORTED_GGUF_QUANT_TYPES])


def _file_type(key: str, fmt, loadable: Optional[frozenset]) -> gguf.GGMLQuantizationType:
    """The GGUF type of save_gguf's format for weight `key`: a GGUF type name or gguf type as it is, anything
    else as QType.of reads a torchext format (so 12.7 is no id, as for QuantLinear)."""
    if isinstance(fmt, gguf.GGMLQuantizationType):
        quant_type = fmt
    elif isinstance(fmt, str):
        if fmt.upper() not in gguf.GGMLQuantizationType.__members__:
            known = (sorted(t.name for t in loadable) if loadable is not None
                     else [q.name for q in QUANTIZABLE_TYPES] + ["BF16", "F16", "F32"])
            raise ValueError(f"{key}: unknown format {fmt!r}; expected one of {known} (or None for float32)")
        quant_type = gguf.GGMLQuantizationType[fmt.upper()]
    else:
        try:
            quant_type = gguf.GGMLQuantizationType(QType.of(fmt).value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    if loadable is not None and quant_type not in loadable:
        raise ValueError(f"{key}: diffusers' from_single_file cannot load {quant_type.name} weights; give this layer "
                         f"one of the formats it loads, {sorted(t.name for t in loadable)} (or None for float32)")
    return quant_type


def _quantized_bytes(key: str, values: torch.Tensor, quant_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """[n, k] float32 values as uint8 [n, row_bytes] of quant_type."""
    block = gguf.GGML_QUANT_SIZES[quant_type][0]
    if values.shape[-1] % block:
        raise ValueError(f"{key}: {quant_type.name} rows are whole {block}-value blocks, and this weight's rows have "
                         f"{values.shape[-1]} values; give this layer another format (or None for float32)")
    if quant_type.value in {int(q) for q in QUANTIZABLE_TYPES}:
        return quantize(values, quant_type.value).numpy()
    try:
        return gguf.quants.quantize(values.numpy(), quant_type)
    except NotImplementedError:
        raise ValueError(f"{key}: neither torchext nor gguf can quantize to {quant_type.name}") from None


__all__ = ["GGUFLinearConversion", "GGUFQuantLinear", "convert_gguf_linears", "save_gguf"]
