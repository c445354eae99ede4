"""QuantLinear: a drop-in for torch.nn.Linear whose weight stays in a GGUF format.

    layer = QuantLinear.from_linear(nn.Linear(512, 256), "Q4_K")   # quantize a float layer
    layer = QuantLinear.from_cache(cache, "blk.0.attn_q.weight")     # share a cached weight
    quantize_linears(model, "Q8_0", filter=lambda name, m: name != "lm_head")
    moe = QuantSparseMoeBlock.from_cache(cache, "blk.0", top_k=8)      # a GGUF's *_exps tensors

The weight is a uint8 buffer [out_features, row_bytes] (so .to(), state_dict and torch.compile see
it like any buffer); the state_dict also records the format and shape, and load_state_dict refuses
bytes of another format or shape, or a weight that is not uint8. forward is torchext.qmatmul,
which picks the Q8_1 GEMV or the dense path by the number of rows. Gradients flow to the input
and the bias (the op's backward multiplies by the dequantized weight); the quantized weight itself
is not trained.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import WeightCache
from .weights import as_weight_rows, check_positive_int, check_weight_bytes, weight_format
from .formats import WEIGHT_TYPES, QType, block_values, row_bytes, whole_blocks_error
from .ops import (_flag, gated_gelu_qmatmul, gated_silu_qmatmul, gemv_max_rows, qmatmul, qmatmul_id, qmatmul_q8_1,
                  quantize, quantize_q8_1)

_EXTRA_STATE = "_extra_state"  # the state_dict key of what get_extra_state returns


class PackedWeightState:
    """The state_dict, pickling and copying of a module whose buffers named in _PACKED hold a weight
    format's raw bytes (QuantLinear and torchext.hf.QuantEmbedding: `weight`; QuantExperts: its three
    projections). get_extra_state gives the layout: the format (`format`, or `formats` for several
    buffers) and the sizes, in _LAYOUT's attributes.

    The bytes mean nothing without their format and shape: Q4_0 and Q4_K rows of 256 values are both
    144 bytes, and a k-quant row of 255 values is one of 256. So the state_dict carries the layout
    beside the bytes, and loading refuses a state_dict of another layout (or non-uint8 bytes, which
    copy_ would cast), leaving the module as it was. A module over views into a larger storage
    (WeightCache's pool) pickles and deep-copies its own bytes, not the whole pool behind the views.
    """

    _PACKED: tuple[str, ...] = ("weight",)  # the buffers that hold raw bytes
    _LAYOUT: tuple[str, ...]                # the size attributes saved beside the format
    _QUANTIZE_HINT: str                     # what makes the bytes from float weights, for the error on float weights

    def _formats(self) -> dict:
        """The format part of the layout: {"format": name} for one packed buffer."""
        return {"format": self.qtype.name}

    def get_extra_state(self) -> dict:
        """The format and sizes, saved in the state_dict beside the bytes."""
        return {**self._formats(), **{a: getattr(self, a) for a in self._LAYOUT}}

    def set_extra_state(self, state) -> None:
        """Check a loaded state's layout against this module's (ValueError if they differ)."""
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
        formats = _format_names(self.get_extra_state())
        for name in self._PACKED:
            packed = state_dict.get(prefix + name)
            if isinstance(packed, torch.Tensor) and packed.dtype != torch.uint8:
                problems.append(f"{prefix}{name}: expected raw {formats} bytes as a uint8 tensor, got "
                                f"{packed.dtype}; quantize float weights first ({self._QUANTIZE_HINT})")
        if problems:  # load_state_dict raises with these; nothing of this module is overwritten
            error_msgs.extend(problems)
            return
        if local_metadata.get("assign_to_params_buffers", False):
            # assign=True installs the tensors themselves: the kernels need their rows contiguous and aligned
            replaced = {prefix + name: self._assignable(name, state_dict[prefix + name]) for name in self._PACKED
                        if isinstance(state_dict.get(prefix + name), torch.Tensor)
                        and state_dict[prefix + name].shape == getattr(self, name).shape}
            state_dict = {**state_dict, **replaced}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _assignable(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """tensor as buffer `name` can hold it (contiguous, aligned rows; a copy where it is not)."""
        rows, length = self._LAYOUT
        return as_weight_rows(tensor, self.qtype, getattr(self, rows), getattr(self, length))

    def _layout_problem(self, state, prefix: str) -> Optional[str]:
        """Why `state` (a get_extra_state result) does not describe this module, or None."""
        own = self.get_extra_state()
        names = {q.name for q in WEIGHT_TYPES}
        readable = (isinstance(state, dict) and set(state) == set(own)
                    and all(type(state[key]) is int for key in self._LAYOUT)
                    and ("format" not in own or state["format"] in names)
                    and ("formats" not in own or (type(state["formats"]) is list
                                                  and len(state["formats"]) == len(own["formats"])
                                                  and all(f in names for f in state["formats"]))))
        name = type(self).__name__
        if not readable:
            keys = "{" + ", ".join(repr(key) for key in own) + "}"
            return f"{prefix}{_EXTRA_STATE}: expected {keys} of a {name}, got {state!r}"
        if state != own:
            return (f"{prefix}{self._PACKED[0] if len(self._PACKED) == 1 else 'weights'}: the state_dict holds "
                    f"{_describe_layout(state)}, this layer is {_describe_layout(own).replace(' bytes', '', 1)}; "
                    f"load it into a {name} of that format and shape")
        return None

    def __getstate__(self) -> dict:
        """pickle, torch.save of the module, copy.deepcopy: a pool view's own bytes."""
        state = dict(super().__getstate__())  # object's is the instance's own __dict__
        buffers = dict(state["_buffers"])
        for name in self._PACKED:
            w = buffers[name]
            if w.device.type != "meta" and w.untyped_storage().nbytes() > w.numel():
                buffers[name] = w.clone()
        state["_buffers"] = buffers
        return state

    def __prepare_scriptable__(self):
        """torch.jit.script's hook: scripting fails on the custom ops' Python wrappers with a message
        about type annotations; say what works instead."""
        raise RuntimeError(f"{type(self).__name__}: torch.jit.script cannot compile torchext's modules (their "
                           "ops are called through Python); use torch.compile or torch.export, or torch.jit.trace")


def _format_names(state: dict) -> str:
    """'Q4_K', or 'Q4_K/Q4_K/Q6_K' for several packed buffers, of a get_extra_state result."""
    return state["format"] if "format" in state else "/".join(state["formats"])


def _describe_layout(state: dict) -> str:
    """'Q4_K bytes (out_features=64, in_features=256)' of a get_extra_state result."""
    sizes = ", ".join(f"{key}={value}" for key, value in state.items() if key not in ("format", "formats"))
    return f"{_format_names(state)} bytes ({sizes})"


class QuantLinear(PackedWeightState, nn.Module):
    """y = x @ W.T + bias with W kept as raw bytes of a torchext weight format.

    Args: weight (uint8 bytes of out_features rows of in_features values, any shape with
    out_features * row_bytes(qtype, in_features) elements), qtype (QType, gguf id or name),
    in_features, out_features, bias (optional [out_features] float tensor).
    x is [..., in_features] in float32, float16 or bfloat16, any strides; the output is in x's
    dtype (the bias is cast to it). The 32-value formats need in_features % 32 == 0 (NVFP4 % 64);
    the 256-value formats take any in_features (the last super-block is padding). exact=True: activations are never
    rounded to 8 bits and weights are exactly dequantize()'s (torchext.qmatmul's exact), at any number
    of rows.
    """

    weight: torch.Tensor
    _LAYOUT = ("out_features", "in_features")
    _QUANTIZE_HINT = "QuantLinear.from_linear"

    def __init__(self, weight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: Optional[torch.Tensor] = None, exact: bool = False) -> None:
        super().__init__()
        q = weight_format(qtype)
        self.exact = _flag(exact, "exact")
        check_weight_bytes(weight, q, out_features, in_features, names=("weight", "out_features", "in_features"))
        self.qtype = q
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.register_buffer("weight", as_weight_rows(weight, q, self.out_features, self.in_features))
        check_bias(bias, self.out_features)
        if bias is not None:
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

    def forward_gated_gelu(self, gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
        """The layer on gelu(gate) * up quantized to Q8_1 (gated_gelu_qmatmul: on CUDA one kernel computes,
        quantizes and multiplies), for rows that takes_q8_1 sends to the GEMV path; output in gate's dtype.
        The same bits as forward_q8_1(gated_gelu_quantize_q8_1(gate, up, approximate), gate.dtype), and
        the gradients of gelu(gate) * up through the dequantized weight (as qmatmul's)."""
        return self._add_bias(gated_gelu_qmatmul(self.weight, self.qtype, gate, up, self.out_features,
                                                 self.in_features, approximate))

    def forward_gated_silu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The layer on silu(gate) * up (a SwiGLU MLP's down projection) by gated_silu_qmatmul, for rows that
        takes_q8_1 sends to the GEMV path: forward_gated_gelu with SiLU."""
        return self._add_bias(gated_silu_qmatmul(self.weight, self.qtype, gate, up, self.out_features,
                                                 self.in_features))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype) -> "QuantLinear":
        """Quantize a float nn.Linear (torchext.quantize, llama.cpp's reference quantizers, on the
        CPU). The bytes go to the linear's device; the bias keeps its dtype. A linear on the meta
        device (accelerate's init_empty_weights) gives a meta layer of the format's byte shape, whose
        bytes a load_state_dict(..., assign=True) then supplies."""
        q = weight_format(qtype)
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            # a Conv1d's 3-D weight was "too many values to unpack"
            got = (f"{type(linear).__name__} with weight {weight.dtype} {list(weight.shape)}"
                   if isinstance(weight, torch.Tensor) else f"{type(linear).__name__} without a weight tensor")
            raise TypeError(f"linear: expected a module with a float weight [out_features, in_features] (a "
                            f"torch.nn.Linear), got {got}")
        out_features, in_features = weight.shape
        if (whole := whole_blocks_error(q, in_features, "in_features")) is not None:
            raise ValueError(f"{whole}, got {in_features}; use a k-quant (Q4_K, Q5_K, Q6_K) or leave this layer "
                             "in float")
        w = linear.weight.detach()
        if w.device.type == "meta":  # no values to quantize: bytes of the right shape, for load_state_dict(assign=True)
            data = torch.empty(out_features, row_bytes(q, in_features), dtype=torch.uint8, device="meta")
            bias = None if linear.bias is None else linear.bias.detach()
        else:
            try:
                data = quantize(w.to("cpu", torch.float32).contiguous(), q).to(w.device)
            except RuntimeError as e:  # the op's refusals (non-finite or too large weights, formats it cannot make)
                raise ValueError(str(e)) from None
            bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(data, q, in_features, out_features, bias)
        # what the linear was: a frozen bias stays frozen (an optimizer over the trainable parameters would
        # otherwise train it), and eval mode stays eval
        if layer.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)

    @classmethod
    def from_cache(cls, cache: WeightCache, name: str, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """A layer over a cached quantized weight; the buffer is the cache's tensor (no copy)."""
        w, q, n, k = cache.get(name)
        if q is None:
            raise ValueError(f"{name}: a dense weight ({w.dtype}, shape {list(w.shape)}); QuantLinear needs a "
                             "quantized one, use nn.Linear for this layer")
        return cls(w, q, k, n, bias)

    def extra_repr(self) -> str:
        """Shape, bias, format and byte count, for print(module)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.qtype.name}, bytes={self.weight.numel()}" + (", exact=True" if self.exact else ""))


def check_bias(bias, out_features: int) -> None:
    """ValueError unless bias is None or a float tensor [out_features] (a layer's bias)."""
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or bias.shape != (out_features,)):
        got = f"{bias.dtype} {list(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected a float tensor of shape [{out_features}], got {got}")


def _calls_forward_alone(m: QuantLinear) -> bool:
    """Whether calling m runs QuantLinear.forward and nothing else: no forward or backward hooks (its own or
    global, which m(x) sets up and forward_q8_1 would skip; a bias's gradient takes the backward through m
    even where x's is not wanted), no subclass forward."""
    from torch.nn.modules import module as torch_module
    return (type(m).forward is QuantLinear.forward
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
            and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                     or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks))


def takes_q8_1(x: torch.Tensor, *layers: QuantLinear) -> bool:
    """Whether the layers, all reading x, take qmatmul's GEMV path on one Q8_1 copy of x: all
    QuantLinear (other modules, such as torchext.parallel's sharded layers, have no forward_q8_1)
    whose call is its forward alone (no forward or backward hooks, no subclass forward: calling
    forward_q8_1 would skip them), at most ops.gemv_max_rows(x, out_features, qtype) rows for each
    (and some), one in_features, and no layer exact (exact ones never round x). Then a caller may
    quantize x itself (quantize_q8_1, or an op that computes and quantizes x in one kernel) and call
    each layer's forward_q8_1.
    Never while autograd wants x's gradient: Q8_1 bytes carry none, so the layers then take x
    itself, whose GEMV rounds it the same way and passes the gradient on (qmatmul's backward).
    Never for a symbolic row count either (torch.export's dynamic dimensions, dynamic compiles): the
    choice would be a guard on it, where each layer's qmatmul makes the same choice inside the op; nor
    for an x that is not the layers' input (whose own errors then name x)."""
    if x.dim() == 0 or not all(isinstance(m, QuantLinear) and _calls_forward_alone(m) for m in layers):
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (not isinstance(rows, torch.SymInt) and rows > 0 and not (x.requires_grad and torch.is_grad_enabled())
            and all(rows <= gemv_max_rows(x, m.out_features, m.qtype) for m in layers)
            and {m.in_features for m in layers} == {x.shape[-1]} and not any(m.exact for m in layers))


def shared_input(x: torch.Tensor, *layers: QuantLinear) -> tuple[torch.Tensor, ...]:
    """(layer(x) for each layer), for layers that read the same input (attention's q/k/v, a gated
    MLP's gate/up): when the rows take the GEMV path, x is quantized to Q8_1 once for all of them
    instead of once per layer. The results are the same bits as calling each layer."""
    if not takes_q8_1(x, *layers):
        return tuple(m(x) for m in layers)
    xq = quantize_q8_1(x.contiguous())
    return tuple(m.forward_q8_1(xq, x.dtype) for m in layers)


#: gated_mlp's activations: SwiGLU's SiLU and GEGLU's two GELU forms (F.gelu's approximate)
GATE_ACTIVATIONS = {"silu": None, "gelu_tanh": "tanh", "gelu": "none"}


def _check_activation(activation) -> None:
    if not isinstance(activation, str) or activation not in GATE_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(map(repr, GATE_ACTIVATIONS))}, got {activation!r}")


def gated_mlp(x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
              activation: str = "silu") -> torch.Tensor:
    """down_proj(act(gate_proj(x)) * up_proj(x)), a gated MLP: SwiGLU (activation "silu", Llama's, Qwen's,
    Mistral's) or GEGLU ("gelu_tanh", Gemma's, or "gelu"). Where the rows take the GEMV path
    (takes_q8_1), gate_proj and up_proj read one Q8_1 copy of x (shared_input); the down projection is
    gated_down's (which checks the activation). Any modules work."""
    gate, up = shared_input(x, gate_proj, up_proj)
    return gated_down(gate, up, down_proj, activation)


def gated_down(gate: torch.Tensor, up: torch.Tensor, down_proj: nn.Module, activation: str = "silu") -> torch.Tensor:
    """down_proj(act(gate) * up), a gated MLP's down projection from its gate and up outputs (views of one
    stacked projection allowed), act being F.silu or F.gelu.
    Not the down GEMV that computes act(gate) * up itself (QuantLinear.forward_gated_silu / _gelu), nor
    gated_*_quantize_q8_1 then forward_q8_1: measured on an H100 (bench/gated_mlp.py, bf16, Q4_K gate and
    up, Q6_K down, CUDA graphs), neither was faster than this composition at 1-8 rows, and both were
    slower in places: Llama 3 8B's MLP at 1 row 94 / 79 us against 78, Qwen3 0.6B's at 8 rows 33 / 33
    against 28.5 (bench/NOTES.md, nineteenth session)."""
    _check_activation(activation)
    approximate = GATE_ACTIVATIONS[activation]
    return down_proj((F.silu(gate) if approximate is None else F.gelu(gate, approximate=approximate)) * up)


def quantize_linears(module: nn.Module, qtype,
                     filter: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Replace, in place, every nn.Linear of `module` (those for which filter(qualified name,
    layer) is true, when a filter is given) with QuantLinear.from_linear(layer, qtype), and
    return the module (the new layer itself when `module` is an nn.Linear).

    Skipped, as their owners read the weights directly: nn.MultiheadAttention's out_proj, and
    nn.TransformerEncoderLayer's linear1 and linear2 (its inference fast path passes them to one fused op).
    A subclass of nn.Linear whose forward is its own is refused (QuantLinear would drop what it adds):
    exclude it with filter=... . Hooks registered on a replaced layer do not carry over. Any error
    (ValueError, naming the layer) leaves the module as it was.
    """
    q = weight_format(qtype)
    read_directly = {id(m) for layer in module.modules() if isinstance(layer, nn.TransformerEncoderLayer)
                     for m in (layer.linear1, layer.linear2)}
    # every (parent, attribute) holding a chosen layer; a layer held twice (tied) is quantized once
    targets = [(name, m) for name, m in module.named_modules(remove_duplicate=False)
               if _replaceable(m) and id(m) not in read_directly and (filter is None or filter(name, m))]
    for name, m in targets:  # check them all before replacing any
        label = name or type(m).__name__
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{label}: {type(m).__name__} has no weight yet; run a forward first (or exclude it "
                             "with filter=...)")
        if type(m).forward is not nn.Linear.forward:
            raise ValueError(f"{label}: {type(m).__name__} has its own forward, which QuantLinear would not run; "
                             "exclude this layer with filter=...")
        if whole_blocks_error(q, m.in_features) is not None:
            raise ValueError(f"{label}: in_features={m.in_features} is not a multiple of {block_values(q)}, which "
                             f"{q.name} needs; exclude this layer with filter=... or use a k-quant")
    done: dict[int, QuantLinear] = {}
    for name, m in targets:  # quantize them all before replacing any
        if id(m) not in done:
            try:
                done[id(m)] = QuantLinear.from_linear(m, q)
            except ValueError as e:
                raise ValueError(f"{name or type(m).__name__}: {e}") from None
    if targets and targets[0][0] == "":  # module is itself the layer
        return done[id(module)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, done[id(m)])
    return module


def _replaceable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)


# ---- mixture of experts ---------------------------------------------------------------------------
# The Qwen2-MoE / Qwen3-MoE sparse block, in the shape of transformers' modules (5.x): a router
# (`gate`: logits, softmax in float32, top-k, optional renormalisation) and the experts (`experts`:
# forward(hidden_states, top_k_index, top_k_weights)), so that either can stand in for transformers'
# own later. The experts' weights stay GGUF *_exps bytes and run through qmatmul_id, which reads
# each selected expert's weight once per call and never syncs with the host: a block traces with
# torch.compile(fullgraph=True) and captures in a CUDA graph, ids and all.

def _expert_formats(qtypes) -> tuple:
    """QuantExperts' qtypes as (gate, up, down): one format for all three, or three."""
    formats = tuple(qtypes) if isinstance(qtypes, (tuple, list)) else (qtypes,) * 3
    if len(formats) != 3:
        raise ValueError(f"qtypes: expected one format or three (gate, up, down), got {len(formats)}")
    return formats


class QuantExperts(PackedWeightState, nn.Module):
    """E SwiGLU experts, down(silu(gate(x)) * up(x)), as three quantized weights [E, n, row_bytes]:
    gate and up [E, intermediate_size, hidden_size], down [E, hidden_size, intermediate_size] (GGUF's
    ffn_gate_exps, ffn_up_exps, ffn_down_exps). qtypes: one format for all three, or (gate, up, down).
    Its state_dict carries the formats and sizes beside the bytes (PackedWeightState: loading another
    format's or size's bytes raises).

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], as transformers'
    Qwen3MoeExperts: sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t]). The
    weighted sum runs in float32 and is rounded once to the hidden states' dtype (transformers adds
    the experts' outputs in that dtype). exact=True: activations never rounded (qmatmul_id's exact).
    """

    _PACKED = ("gate_proj", "up_proj", "down_proj")
    _LAYOUT = ("num_experts", "hidden_size", "intermediate_size")
    _QUANTIZE_HINT = "QuantExperts.from_float"

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, qtypes,
                 num_experts: int, hidden_size: int, intermediate_size: int, exact: bool = False) -> None:
        super().__init__()
        self.qtypes = tuple(weight_format(q) for q in _expert_formats(qtypes))
        for arg, v in (("num_experts", num_experts), ("hidden_size", hidden_size),
                       ("intermediate_size", intermediate_size)):
            check_positive_int(v, arg)  # before int(), which took 4.5 experts as 4 and True as 1
        self.num_experts, self.hidden_size = int(num_experts), int(hidden_size)
        self.intermediate_size, self.exact = int(intermediate_size), _flag(exact, "exact")
        shapes = {"gate_proj": (self.intermediate_size, self.hidden_size),
                  "up_proj": (self.intermediate_size, self.hidden_size),
                  "down_proj": (self.hidden_size, self.intermediate_size)}
        for (name, (n, k)), tensor, q in zip(shapes.items(), (gate_proj, up_proj, down_proj), self.qtypes):
            check_weight_bytes(tensor, q, self.num_experts * n, k, names=(name, "num_experts x rows", "row length"))
            self.register_buffer(name, self._expert_rows(tensor, q, n, k))

    def _expert_rows(self, tensor: torch.Tensor, q: QType, n: int, k: int) -> torch.Tensor:
        """tensor's bytes as [E, n, row_bytes]: contiguous, aligned rows (a copy where they are not)."""
        return as_weight_rows(tensor, q, self.num_experts * n, k).view(self.num_experts, n, row_bytes(q, k))

    def _formats(self) -> dict:
        return {"formats": [q.name for q in self.qtypes]}

    def _assignable(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        h, i = self.hidden_size, self.intermediate_size
        n, k = (h, i) if name == "down_proj" else (i, h)
        return self._expert_rows(tensor, self.qtypes[self._PACKED.index(name)], n, k)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if top_k_weights.shape != top_k_index.shape:  # else a [1, k] or [k] one broadcasts over the tokens
            raise ValueError(f"top_k_weights: expected the shape of top_k_index {list(top_k_index.shape)}, got "
                             f"{list(top_k_weights.shape)}")
        x, ids = hidden_states.contiguous(), top_k_index.contiguous()
        h, i = self.hidden_size, self.intermediate_size
        gate = qmatmul_id(self.gate_proj, self.qtypes[0], x, ids, i, h, self.exact)  # [T, k, I]
        up = qmatmul_id(self.up_proj, self.qtypes[1], x, ids, i, h, self.exact)
        down = qmatmul_id(self.down_proj, self.qtypes[2], F.silu(gate) * up, ids, h, i, self.exact)  # [T, k, H]
        return (down.float() * top_k_weights.float().unsqueeze(-1)).sum(1).to(x.dtype)

    @classmethod
    def from_float(cls, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, qtypes,
                   exact: bool = False) -> "QuantExperts":
        """Quantize float experts: gate and up [E, I, H], down [E, H, I] (transformers keeps gate and
        up as one gate_up_proj [E, 2I, H]: pass its two halves), with torchext.quantize per expert."""
        formats = _expert_formats(qtypes)
        if gate_proj.dim() != 3:
            raise ValueError(f"gate_proj: expected [num_experts, intermediate_size, hidden_size], got "
                             f"{list(gate_proj.shape)}")
        e, i, h = gate_proj.shape
        # the bytes alone cannot tell: a down_proj given as [E, I, H] quantizes to as many bytes as [E, H, I]
        for name, t, want in (("up_proj", up_proj, [e, i, h]), ("down_proj", down_proj, [e, h, i])):
            if list(t.shape) != want:
                raise ValueError(f"{name}: expected {want} for gate_proj of shape [E, I, H] = {[e, i, h]}, got "
                                 f"{list(t.shape)}")
        data = [torch.stack([quantize(w.detach().to("cpu", torch.float32).contiguous(), q) for w in t]).to(t.device)
                for t, q in zip((gate_proj, up_proj, down_proj), formats)]
        return cls(*data, formats, e, h, i, exact)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, formats={'/'.join(q.name for q in self.qtypes)}"
                + (", exact=True" if self.exact else ""))


class TopKRouter(nn.Module):
    """The router of a Qwen2/Qwen3-MoE block: logits = proj(hidden_states) in the hidden states'
    dtype, softmax over the experts in float32, the top_k largest, renormalised to sum to 1 when
    norm_topk_prob, cast to the logits' dtype. proj: a dense [E, H] weight (GGUF's ffn_gate_inp,
    usually F32, cast to the input's dtype as transformers' F.linear does) or a QuantLinear.
    forward(hidden_states [..., H]) -> (logits [T, E], scores [T, top_k], indices [T, top_k])."""

    def __init__(self, proj, top_k: int, norm_topk_prob: bool = True) -> None:
        super().__init__()
        if isinstance(proj, torch.Tensor):
            if proj.dim() != 2 or not proj.is_floating_point():
                raise ValueError(f"proj: expected a float [num_experts, hidden_size] weight, got {proj.dtype} "
                                 f"{list(proj.shape)}")
            linear = nn.Linear(proj.shape[1], proj.shape[0], bias=False, device=proj.device, dtype=proj.dtype)
            with torch.no_grad():
                linear.weight.copy_(proj)
            proj = linear
        self.proj = proj
        self.num_experts, self.hidden_size = proj.out_features, proj.in_features
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 < top_k <= self.num_experts:
            raise ValueError(f"top_k: expected a whole number from 1 to num_experts={self.num_experts}, got {top_k!r}")
        self.top_k, self.norm_topk_prob = int(top_k), _flag(norm_topk_prob, "norm_topk_prob")

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (hidden_states.dim() == 0 or hidden_states.shape[-1] != self.hidden_size
                or not hidden_states.is_floating_point()):
            # else reshape's error, naming nothing, or integer logits of a weight cast to integers
            raise ValueError(f"hidden_states: expected float [..., {self.hidden_size}] (the router's hidden size), got "
                             f"{hidden_states.dtype} {list(hidden_states.shape)}")
        x = hidden_states.reshape(-1, self.hidden_size)
        if isinstance(self.proj, nn.Linear):
            logits = F.linear(x, self.proj.weight.to(x.dtype))
        else:
            logits = self.proj(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        scores, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return logits, scores.to(logits.dtype), indices

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


class QuantGatedMLP(nn.Module):
    """A gated MLP, down_proj(act(gate_proj(x)) * up_proj(x)), through gated_mlp (SwiGLU or GEGLU; on the
    GEMV path one Q8_1 input for gate and up). The layers keep their names, so state_dict keys and peft's
    target_modules are those of the transformers MLP it replaces (torchext.hf.from_gguf)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str = "silu"):
        super().__init__()
        _check_activation(activation)
        # layers that say their widths (nn.Linear, QuantLinear) must chain: x -> gate, up [I] -> down
        widths = [(name, getattr(m, "in_features", None), getattr(m, "out_features", None))
                  for name, m in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj))]
        if all(i is not None and o is not None for _, i, o in widths):
            (_, gi, go), (_, ui, uo), (_, di, _) = widths
            if gi != ui or not go == uo == di:
                raise ValueError("gate_proj, up_proj, down_proj: expected gate_proj and up_proj [in -> I] and "
                                 "down_proj [I -> out], got " + ", ".join(f"{n} [{i} -> {o}]" for n, i, o in widths))
        self.gate_proj, self.up_proj, self.down_proj, self.activation = gate_proj, up_proj, down_proj, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class QuantStackedGatedMLP(nn.Module):
    """A gated MLP whose gate and up projections are one layer, gate_up_proj [in -> 2 I] (gate the first
    I outputs, up the rest: Phi-3's): down_proj(act(gate) * up) through gated_down. The layers keep their
    names, as QuantGatedMLP's do."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, activation: str = "silu"):
        super().__init__()
        _check_activation(activation)
        gu, di = getattr(gate_up_proj, "out_features", None), getattr(down_proj, "in_features", None)
        if gu is not None and di is not None and gu != 2 * di:
            raise ValueError(f"gate_up_proj, down_proj: expected gate_up_proj [in -> 2 I] and down_proj [I -> out], "
                             f"got gate_up_proj out_features {gu} and down_proj in_features {di}")
        self.gate_up_proj, self.down_proj, self.activation = gate_up_proj, down_proj, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return gated_down(gate, up, self.down_proj, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class QuantSharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a SwiGLU MLP of QuantLinear layers that every token goes through,
    scaled by sigmoid(gate_weight . x) (gate_weight [H], GGUF's ffn_gate_inp_shexp)."""

    def __init__(self, gate_proj: QuantLinear, up_proj: QuantLinear, down_proj: QuantLinear,
                 gate_weight: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.register_buffer("gate_weight", gate_weight.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(F.linear(x, self.gate_weight.to(x.dtype).unsqueeze(0)))
        return scale * gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, "silu")


class QuantSparseMoeBlock(nn.Module):
    """A sparse mixture-of-experts block (transformers' Qwen3MoeSparseMoeBlock, and Qwen2-MoE's with a
    shared expert): forward(hidden_states [..., H]) -> [..., H] = experts(x, top-k ids, their scores)
    (+ shared_expert(x)). Built from a GGUF's tensors with from_cache / from_gguf, or from float
    tensors with QuantExperts.from_float. gpt-oss's routing (top-k before the softmax, expert biases,
    clamped SwiGLU) is not this block's."""

    def __init__(self, gate: TopKRouter, experts: QuantExperts, shared_expert: Optional[QuantSharedExpert] = None):
        super().__init__()
        if (gate.num_experts, gate.hidden_size) != (experts.num_experts, experts.hidden_size):
            raise ValueError(f"gate: routes {gate.num_experts} experts of hidden_size {gate.hidden_size}, the "
                             f"experts are {experts.num_experts} of hidden_size {experts.hidden_size}")
        self.gate, self.experts, self.shared_expert = gate, experts, shared_expert

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.experts.hidden_size
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != hidden:  # else reshape's error, naming nothing
            raise ValueError(f"hidden_states: expected [..., {hidden}] (the experts' hidden size), got "
                             f"{list(hidden_states.shape)}")
        x = hidden_states.reshape(-1, hidden)
        _, scores, indices = self.gate(x)
        y = self.experts(x, indices, scores)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y.reshape(hidden_states.shape)

    @classmethod
    def from_cache(cls, cache: WeightCache, prefix: str, top_k: int, norm_topk_prob: bool = True,
                   exact: bool = False) -> "QuantSparseMoeBlock":
        """The block of GGUF layer `prefix` ("blk.0") in a WeightCache: the router {prefix}.ffn_gate_inp
        (dense or quantized), the experts {prefix}.ffn_{gate,up,down}_exps (raw bytes, shared with
        the cache: no copy) and, when the file has them, Qwen2-MoE's shared expert
        {prefix}.ffn_{gate,up,down}_shexp and {prefix}.ffn_gate_inp_shexp. top_k: the GGUF's
        {arch}.expert_used_count; norm_topk_prob: Qwen3-MoE renormalises (True), Qwen2-MoE not."""
        def entry(name):
            return cache.get(f"{prefix}.{name}.weight")

        router = entry("ffn_gate_inp")
        num_experts, hidden = router.n, router.k
        proj = router.tensor if router.qtype is None else QuantLinear(router.tensor, router.qtype, hidden,
                                                                      num_experts)
        exps = [entry(f"ffn_{p}_exps") for p in ("gate", "up", "down")]
        for e in exps:
            if e.qtype is None:
                raise ValueError(f"{prefix}: expert weights must be quantized (a torchext weight format), got a "
                                 f"dense {e.tensor.dtype} tensor")
        inter = exps[0].n // num_experts
        want = [(num_experts * inter, hidden)] * 2 + [(num_experts * hidden, inter)]
        got = [(e.n, e.k) for e in exps]
        if got != want or exps[0].n % num_experts:
            raise ValueError(f"{prefix}: ffn_gate_exps, ffn_up_exps, ffn_down_exps hold (rows, row length) "
                             f"{got}; {num_experts} experts of hidden_size {hidden} need {want}")
        experts = QuantExperts(*(e.tensor for e in exps), [e.qtype for e in exps], num_experts, hidden, inter, exact)
        shared = None
        if f"{prefix}.ffn_gate_shexp.weight" in cache:
            layers = [QuantLinear.from_cache(cache, f"{prefix}.ffn_{p}_shexp.weight") for p in ("gate", "up", "down")]
            for layer in layers:
                layer.exact = exact
            # its own copy: a pooled cache's dense tensors are float views of the pool's uint8 bytes, and
            # torch.save refuses a state_dict with views of one storage as two dtypes
            shared = QuantSharedExpert(*layers, entry("ffn_gate_inp_shexp").tensor.clone())
        return cls(TopKRouter(proj, top_k, norm_topk_prob), experts, shared)

    @classmethod
    def from_gguf(cls, path, layer: int, top_k: Optional[int] = None, norm_topk_prob: bool = True,
                  device=None, exact: bool = False) -> "QuantSparseMoeBlock":
        """Load layer `layer`'s MoE tensors from a GGUF file (WeightCache.load_gguf: the expert
        weights stay raw bytes) and build the block; top_k defaults to the file's
        {general.architecture}.expert_used_count."""
        from .gguf_file import GGUFFile

        prefix = f"blk.{layer}."
        with GGUFFile(path) as g:
            names = [t.name for t in g.tensors if t.name.startswith(prefix) and
                     any(t.name.startswith(prefix + p) for p in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                                                   "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp",
                                                                   "ffn_down_shexp"))]
            if top_k is None:
                arch = g.string_value("general.architecture")
                top_k = g.int_value(f"{arch}.expert_used_count") if arch else None
                if top_k is None:
                    raise ValueError(f"{g.name}: no {arch}.expert_used_count in the metadata; pass top_k")
        cache = WeightCache().load_gguf(path, names=names, device=device)
        return cls.from_cache(cache, prefix.rstrip("."), top_k, norm_topk_prob, exact)


__all__ = ["QuantExperts", "QuantGatedMLP", "QuantLinear", "QuantSharedExpert", "QuantSparseMoeBlock",
           "QuantStackedGatedMLP", "TopKRouter", "gated_down", "gated_mlp", "quantize_linears", "shared_input",
           "takes_q8_1"]
