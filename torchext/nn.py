"""QuantLinear: a drop-in for torch.nn.Linear whose weight stays in a GGUF format.

    layer = QuantLinear.from_linear(nn.Linear(512, 256), "Q4_K")   # quantize a float layer
    layer = QuantLinear.from_cache(cache, "blk.0.attn_q.weight")     # share a cached weight
    quantize_linears(model, "Q8_0", filter=lambda name, m: name != "lm_head")

The weight is a uint8 buffer [out_features, row_bytes] (so .to(), state_dict and torch.compile see
it like any buffer); the state_dict also records the format and shape, and load_state_dict refuses
bytes of another format or shape, or a weight that is not uint8. forward is torchext.qmatmul,
which picks the Q8_1 GEMV or the dense path by the number of rows. Gradients flow to the input
and the bias (the op's backward multiplies by the dequantized weight); the quantized weight itself
is not trained.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .cache import WeightCache
from .weights import as_weight_rows, check_weight_bytes, weight_format
from .formats import WEIGHT_TYPES, block_values, whole_blocks_error
from .ops import GEMV_MAX_ROWS, qmatmul, qmatmul_q8_1, quantize, quantize_q8_1

_EXTRA_STATE = "_extra_state"  # the state_dict key of what get_extra_state returns


class QuantLinear(nn.Module):
    """y = x @ W.T + bias with W kept as raw bytes of a torchext weight format.

    Args: weight (uint8 bytes of out_features rows of in_features values, any shape with
    out_features * row_bytes(qtype, in_features) elements), qtype (QType, gguf id or name),
    in_features, out_features, bias (optional [out_features] float tensor).
    x is [..., in_features] in float32, float16 or bfloat16, any strides; the output is in x's
    dtype (the bias is cast to it). The 32-value formats need in_features % 32 == 0 (NVFP4 % 64);
    the 256-value formats take any in_features (the last super-block is padding). exact=True: activations are never
    rounded to 8 bits (torchext.qmatmul's exact), at any number of rows.
    """

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: Optional[torch.Tensor] = None, exact: bool = False) -> None:
        super().__init__()
        q = weight_format(qtype)
        self.exact = bool(exact)
        check_weight_bytes(weight, q, out_features, in_features, names=("weight", "out_features", "in_features"))
        self.qtype = q
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.register_buffer("weight", as_weight_rows(weight, q, self.out_features, self.in_features))
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.shape != (self.out_features,):
                got = f"{bias.dtype} {list(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias: expected a float tensor of shape [{self.out_features}], got {got}")
            self.bias = nn.Parameter(bias.detach())  # trainable, as in nn.Linear
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] @ W.T (+ bias) -> [..., out_features] in x's dtype."""
        # any strides, as nn.Linear takes (the op wants contiguous rows; a no-op when they are)
        y = qmatmul(self.weight, self.qtype, x.contiguous(), self.out_features, self.in_features, self.exact)
        return self._add_bias(y)

    def forward_q8_1(self, xq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer on activations already quantized by quantize_q8_1 (GEMV path), output in dtype."""
        return self._add_bias(qmatmul_q8_1(self.weight, self.qtype, xq, self.out_features, self.in_features, dtype))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype) -> "QuantLinear":
        """Quantize a float nn.Linear (torchext.quantize, llama.cpp's reference quantizers, on the
        CPU). The bytes go to the linear's device; the bias keeps its dtype."""
        q = weight_format(qtype)
        out_features, in_features = linear.weight.shape
        if (whole := whole_blocks_error(q, in_features, "in_features")) is not None:
            raise ValueError(f"{whole}, got {in_features}; use a k-quant (Q4_K, Q5_K, Q6_K) or leave this layer "
                             "in float")
        w = linear.weight.detach()
        data = quantize(w.to("cpu", torch.float32).contiguous(), q).to(w.device)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(data, q, in_features, out_features, bias)

    @classmethod
    def from_cache(cls, cache: WeightCache, name: str, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """A layer over a cached quantized weight; the buffer is the cache's tensor (no copy)."""
        w, q, n, k = cache.get(name)
        if q is None:
            raise ValueError(f"{name}: a dense weight ({w.dtype}, shape {list(w.shape)}); QuantLinear needs a "
                             "quantized one, use nn.Linear for this layer")
        return cls(w, q, k, n, bias)

    # ---- state_dict: the bytes mean nothing without their format and shape ---------------------
    # Q4_0 and Q4_K rows of 256 values are both 144 bytes, and a k-quant row of 255 values is one of
    # 256: the state_dict carries format, out_features and in_features beside the weight, and
    # loading refuses a state_dict of another layout (or non-uint8 weights, which copy_ would cast).

    def get_extra_state(self) -> dict:
        """The format and shape, saved in the state_dict beside the weight's bytes."""
        return {"format": self.qtype.name, "out_features": self.out_features, "in_features": self.in_features}

    def set_extra_state(self, state) -> None:
        """Check a loaded state's format and shape against this layer's (ValueError if they differ)."""
        problem = self._layout_problem(state, prefix="")
        if problem is not None:
            raise ValueError(problem)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        problems = []
        if prefix + _EXTRA_STATE in state_dict:
            layout = self._layout_problem(state_dict[prefix + _EXTRA_STATE], prefix)
            if layout is not None:
                problems.append(layout)
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and weight.dtype != torch.uint8:
            problems.append(f"{prefix}weight: expected raw {self.qtype.name} bytes as a uint8 tensor, got "
                            f"{weight.dtype}; quantize float weights first (QuantLinear.from_linear)")
        if problems:  # load_state_dict raises with these; nothing of this layer is overwritten
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _layout_problem(self, state, prefix: str) -> Optional[str]:
        """Why `state` (a get_extra_state result) does not describe this layer, or None."""
        readable = (isinstance(state, dict) and set(state) == {"format", "out_features", "in_features"}
                    and state["format"] in {q.name for q in WEIGHT_TYPES}
                    and all(type(state[key]) is int for key in ("out_features", "in_features")))
        if not readable:
            return (f"{prefix}{_EXTRA_STATE}: expected {{'format', 'out_features', 'in_features'}} of a "
                    f"QuantLinear, got {state!r}")
        if state != self.get_extra_state():
            return (f"{prefix}weight: the state_dict holds {state['format']} bytes (out_features="
                    f"{state['out_features']}, in_features={state['in_features']}), this layer is {self.qtype.name} "
                    f"(out_features={self.out_features}, in_features={self.in_features}); load it into a "
                    "QuantLinear of that format and shape")
        return None

    def extra_repr(self) -> str:
        """Shape, bias, format and byte count, for print(module)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.qtype.name}, bytes={self.weight.numel()}" + (", exact=True" if self.exact else ""))


def takes_q8_1(x: torch.Tensor, *layers: QuantLinear) -> bool:
    """Whether the layers, all reading x, take qmatmul's GEMV path on one Q8_1 copy of x: all
    QuantLinear (other modules, such as torchext.parallel's sharded layers, have no forward_q8_1),
    at most GEMV_MAX_ROWS rows (and some), one in_features, and no layer exact (exact ones never
    round x). Then a caller may quantize x itself (quantize_q8_1, or an op that computes and
    quantizes x in one kernel) and call each layer's forward_q8_1."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= GEMV_MAX_ROWS and all(isinstance(m, QuantLinear) for m in layers)
            and len({m.in_features for m in layers}) == 1 and not any(m.exact for m in layers))


def shared_input(x: torch.Tensor, *layers: QuantLinear) -> tuple[torch.Tensor, ...]:
    """(layer(x) for each layer), for layers that read the same input (attention's q/k/v, a gated
    MLP's gate/up): when the rows take the GEMV path, x is quantized to Q8_1 once for all of them
    instead of once per layer. The results are the same bits as calling each layer."""
    if not takes_q8_1(x, *layers):
        return tuple(m(x) for m in layers)
    xq = quantize_q8_1(x.contiguous())
    return tuple(m.forward_q8_1(xq, x.dtype) for m in layers)


def quantize_linears(module: nn.Module, qtype,
                     filter: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Replace, in place, every nn.Linear of `module` (those for which filter(qualified name,
    layer) is true, when a filter is given) with QuantLinear.from_linear(layer, qtype), and
    return the module (the new layer itself when `module` is an nn.Linear).

    nn.MultiheadAttention's out_proj is skipped: that module reads its weight directly.
    """
    q = weight_format(qtype)
    if _replaceable(module) and (filter is None or filter("", module)):
        return QuantLinear.from_linear(module, q)
    # every (parent, attribute) holding a chosen layer; a layer held twice (tied) is quantized once
    targets = [(name, m) for name, m in module.named_modules(remove_duplicate=False)
               if _replaceable(m) and (filter is None or filter(name, m))]
    for name, m in targets:  # check them all before replacing any, so an error leaves the module as it was
        if whole_blocks_error(q, m.in_features) is not None:
            raise ValueError(f"{name}: in_features={m.in_features} is not a multiple of {block_values(q)}, which "
                             f"{q.name} needs; exclude this layer with filter=... or use a k-quant")
    done: dict[int, QuantLinear] = {}
    for name, m in targets:
        if id(m) not in done:
            done[id(m)] = QuantLinear.from_linear(m, q)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, done[id(m)])
    return module


def _replaceable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)


__all__ = ["QuantLinear", "quantize_linears", "shared_input", "takes_q8_1"]
