"""Hugging Face transformers models over a GGUF file's packed weights, and peft LoRA around them.

    from transformers import AutoTokenizer
    from torchext.hf import from_gguf

    model = from_gguf("models", gguf_file="model-Q4_K_M.gguf")          # or from_gguf("models/model.gguf")
    tokenizer = AutoTokenizer.from_pretrained("models", gguf_file="model-Q4_K_M.gguf")
    out = model.generate(**tokenizer("The Moon", return_tensors="pt"), max_new_tokens=20, do_sample=False)

from_gguf builds the transformers model of the file's architecture from transformers' own reading
of the GGUF metadata (AutoConfig, gguf_file=...) and fills it from the file: every nn.Linear whose
tensor is in one of torchext's formats (torchext.formats.WEIGHT_TYPES: Q4_0 ... Q6_K, TQ1_0, TQ2_0, MXFP4,
NVFP4, the IQ formats) becomes a
torchext.nn.QuantLinear over the file's bytes, a token embedding in such a format a QuantEmbedding
(torchext.embedding), and a tied output head a QuantLinear over the embedding's bytes. Norms,
biases and F32/F16/BF16 tensors load as transformers loads them (its tensor processors, cast to
`dtype`); a tensor in a quantized format torchext does not run (not in WEIGHT_TYPES) is dequantized
by gguf, as transformers does, with a warning naming it. No dense copy of a packed weight is made:
the model is built with its nn.Linear and nn.Embedding parameters on the meta device (its buffers,
such as rotary tables, are computed as usual) and the bytes are read tensor by tensor.

Names and layouts are transformers' legacy GGUF loader's (transformers.modeling_gguf_pytorch_utils:
get_gguf_hf_weights_map and the per-architecture TENSOR_PROCESSORS), so what transformers maps,
this maps. A processor's transform of a packed tensor must be a row permutation (rows are
independent in every format): llama's (and mistral's) reverse permutation of attn_q/attn_k is
found by running the processor on the row indices and applied to the packed rows. Anything else
(a transpose, a split, a change of values) is refused with an error naming the tensor.

Why a function and not a transformers quantizer: transformers 5.24 already answers
from_pretrained(..., gguf_file=...) with its own GGUF quantizer (GgufHfQuantizer), whose hooks
(read_header, get_state_dict, ...) are new in 5.2x and private; a second quantizer would have to
replace it through those hooks. The functions used here (AutoConfig with gguf_file,
AutoModel*.from_config, get_gguf_hf_weights_map, TENSOR_PROCESSORS, GGUF_SUPPORTED_ARCHITECTURES)
date from transformers 4.x and keep their form in 5.24 (from_config's dtype= from 4.56); 5.24 is
the version tested here. The map is built for the file's own
architecture name: transformers derives it from config.model_type, which fails for Mistral files
(general.architecture "llama"; gguf knows no "mistral"), so this loads Mistral files that
transformers 5.24 itself cannot. The architectures are those of that loader that keep their
weights in nn.Linear and nn.Embedding, and MoE experts in transformers' 3-D experts modules (llama,
mistral, qwen2, qwen3, phi3, gemma2, gemma3, qwen2moe, qwen3moe and others;
tests/test_transformers.py checks those nine); transformers 5.24's new loader
(qwen35, lfm2) keeps its own packed weights and is not used here.

Memory, measured (CPU, 2 cores, transformers 5.24; `python -m torchext.hf --memory FILE` repeats
it in a fresh process): Gemma 3 270M Q4_K_M, a 241 MiB file, loads in 6.8 s with a peak
resident-memory increase of 242 MiB above a process that has imported transformers' Gemma 3 code:
the packed tensors (235 MiB, the file's bytes) and the float32 norms. transformers reads the config
from a metadata-only copy of the file (_metadata_file): its gguf.GGUFReader parsed the whole
262,144-token vocabulary of the original (+732 MiB). transformers' own GGUF path
(from_pretrained(..., gguf_file=...)), which dequantizes to float32, takes 37.3 s and +2,401 MiB
(10x the file) for the same file.

Mixture of experts (qwen2moe, qwen3moe files): a layer's ffn_{gate,up,down}_exps tensors [E, rows, k]
become one torchext.nn.QuantExperts over their bytes (torchext.qmatmul_id) in place of
transformers' experts module (gate_up_proj, down_proj; built on the meta device); the router and
the shared expert load like any other tensor.

Gated MLPs: every module whose forward is transformers' down_proj(act_fn(gate_proj(x)) * up_proj(x)) (the same
bytecode: Llama's, Mistral's, Qwen2/3's, Gemma 2/3's MLPs, Qwen2-MoE's shared expert) with an act_fn that is
F.silu or F.gelu becomes a torchext.nn.QuantGatedMLP over the same layers (the same parameter names; Phi-3's,
with gate and up stacked in gate_up_proj, a QuantStackedGatedMLP): on decode steps gate and up share one Q8_1
input (torchext.nn.gated_mlp).

peft: register_lora(LoraConfig(...)) registers QuantLoraLinear for QuantLinear through peft's
custom-module mechanism (LoraConfig._register_custom_module); the adapters train around the
packed weights (QuantLinear's gradient reaches its input), and merging is refused, as is DoRA and
every init_lora_weights that reads the base weight as a float matrix (PiSSA, OLoRA, CorDA, LoRA-GA,
LoftQ, MiCA); True, "gaussian", "orthogonal", "eva" and False work as on nn.Linear.
target_modules="all-linear" needs register_lora(config, model), which expands it by peft's rule.

Saving: the GGUF file is the checkpoint; save_pretrained is refused (from_gguf's docstring).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import ops
from .formats import QType
from .gguf_file import GGUFFile, GGUFTensor, tensor_from_bytes
from .weights import WEIGHT_IDS, as_weight_rows, check_weight_bytes, weight_format
from .nn import PackedWeightState, QuantGatedMLP, QuantLinear, QuantStackedGatedMLP

logger = logging.getLogger(__name__)


class QuantEmbedding(PackedWeightState, nn.Module):
    """A token embedding whose table stays in a torchext weight format: forward(ids) gathers the
    rows with torchext.embedding, dense in `dtype`, times `embed_scale` when given (Gemma 3's
    scaled embedding, rounded to `dtype` as transformers rounds it).

    Args: weight (uint8 bytes of num_embeddings rows of embedding_dim values), qtype,
    num_embeddings, embedding_dim, padding_idx (kept for code that reads it), embed_scale
    (optional float tensor), dtype (float32, float16 or bfloat16).

    The output dtype follows the module's floating-point conversions as nn.Embedding's does
    (.to(torch.bfloat16), .half(), .float()): it is the dtype of an empty non-persistent buffer,
    which nn.Module converts with the floating tensors and the state_dict leaves out.
    """

    weight: torch.Tensor
    _LAYOUT = ("num_embeddings", "embedding_dim")  # its state_dict: PackedWeightState's, as QuantLinear's
    _QUANTIZE_HINT = "torchext.quantize"

    def __init__(self, weight: torch.Tensor, qtype, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, embed_scale: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        q = weight_format(qtype)
        check_weight_bytes(weight, q, num_embeddings, embedding_dim,
                           names=("weight", "num_embeddings", "embedding_dim"))
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(map(str, _DTYPES))}, got {dtype!r}")
        if padding_idx is not None:  # as nn.Embedding: within the table, a negative one counted from its end
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral) or not (
                    -num_embeddings <= padding_idx < num_embeddings):
                raise ValueError(f"padding_idx: expected a row of the {num_embeddings}-row table, got {padding_idx!r}")
            padding_idx %= num_embeddings
        self.qtype = q
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        self.register_buffer("weight", as_weight_rows(weight, q, self.num_embeddings, self.embedding_dim))
        self._hold_out_dtype(dtype)
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale, persistent=False)
        else:
            self.embed_scale = None

    def __setstate__(self, state: dict) -> None:
        dtype = state.pop("dtype", None)  # a module pickled when the dtype was a plain attribute
        super().__setstate__(state)
        if dtype is not None:
            self._hold_out_dtype(dtype)

    def _hold_out_dtype(self, dtype: torch.dtype) -> None:
        # in an empty buffer, which nn.Module converts: a plain attribute would keep its dtype through
        # model.to(torch.bfloat16)
        self.register_buffer("_out_dtype", torch.empty(0, dtype=dtype, device=self.weight.device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The output dtype: dtype= at construction, then that of the module's last floating conversion."""
        return self._out_dtype.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [...] of the table: [..., embedding_dim] in self.dtype."""
        out = ops.embedding(self.weight, self.qtype, ids.contiguous(), self.num_embeddings, self.embedding_dim,
                            self.dtype)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def extra_repr(self) -> str:
        """Shape, format and byte count, for print(module)."""
        return (f"{self.num_embeddings}, {self.embedding_dim}, format={self.qtype.name}, dtype={self.dtype}, "
                f"bytes={self.weight.numel()}")


def from_gguf(path_or_dir: str | os.PathLike, gguf_file: Optional[str] = None, *, device=None,
              dtype: torch.dtype | str | None = None, model_class=None, **config_kwargs):
    """The transformers model of a GGUF file, its packed weights on torchext layers (module
    docstring). Arguments follow from_pretrained's: `path_or_dir` is a local folder and
    `gguf_file` a file name in it (or a path), or `path_or_dir` is the file itself.
    device: where the model goes (default CPU; from_pretrained's device_map is taken for it where it
    names one device); dtype: of activations, norms and dense weights (float32 default, bfloat16,
    float16, or their names; torch_dtype is taken for it as from_pretrained takes it); model_class: a
    transformers Auto class or model class (default AutoModelForCausalLM); the other keyword arguments
    go to AutoConfig.from_pretrained (for example attn_implementation="eager"), and one it does not use
    is a ValueError, where from_pretrained would pass it over.

    Errors (ValueError, FileNotFoundError) name the file and, where there is one, the tensor: a
    missing file, a malformed GGUF (torchext.gguf_file's checks), metadata that contradicts the
    tensors (more layers than blk.N tensors, a width other than token_embd's) or from which
    transformers cannot build the config or the model, an architecture transformers cannot read, a
    packed tensor that transformers would transform other than by permuting its rows or that lands
    elsewhere than an nn.Linear or nn.Embedding of its shape, and a model parameter the file does not
    hold. A dtype other than the three, or a device_map spreading the model over devices ("auto", a
    dict), is a ValueError naming the argument.

    Saving: the GGUF file is the model's checkpoint. model.save_pretrained (and push_to_hub) raise
    NotImplementedError: safetensors cannot hold the packed layers' format records (QuantLinear's
    extra state), and from_pretrained would rebuild dense nn.Linear layers that the bytes do not
    fit. torch.save(model.state_dict()) and load_state_dict into a from_gguf model of the same
    file work; a peft model's save_pretrained saves its adapters alone, which works.
    """
    import transformers

    dtype, device = _dtype_and_device(dtype, device, config_kwargs)
    path = _gguf_path(path_or_dir, gguf_file)
    with GGUFFile(path) as g:  # checks header, tables and offsets before transformers reads anything
        architecture = _architecture(path, g)
        _check_sizes(path, g, architecture)
        config = _config(path, g, architecture, config_kwargs)
        model_class = transformers.AutoModelForCausalLM if model_class is None else model_class
        if hasattr(model_class, "from_config"):  # an Auto class
            build = model_class.from_config
        else:  # a model class: _from_config, which an Auto class's from_config calls
            config_class = getattr(model_class, "config_class", None)
            if config_class is not None and not isinstance(config, config_class):
                raise ValueError(f"{path}: {model_class.__name__} takes a {config_class.__name__}; this file's "
                                 f"architecture {architecture!r} gives a {type(config).__name__}")
            build = model_class._from_config
        with _linear_and_embedding_weights_on_meta(config.model_type):
            try:
                model = build(config, dtype=dtype)
            except (ValueError, AssertionError) as e:  # no model for the config, or one its sizes do not fit
                raise ValueError(f"{path}: transformers cannot build {getattr(model_class, '__name__', model_class)} "
                                 f"for this file's architecture {architecture!r} (model_type {config.model_type!r}) "
                                 f"and metadata: {type(e).__name__}: {e}") from e
        _load_tensors(model, g, architecture, dtype)
    _fuse_gated_mlps(model)
    for method in ("save_pretrained", "push_to_hub"):  # this instance's, not the class's
        setattr(model, method, _SavePretrainedRefused(type(model).__name__, method))
    return model.to(device if device is not None else "cpu").eval()


_DTYPES = ops._FLOAT_DTYPES  # the kernels' activation dtypes


class _SavePretrainedRefused:
    """A from_gguf model's save_pretrained (and push_to_hub, which would create the Hub repository before
    it saves): NotImplementedError saying what to do instead (from_gguf's docstring). A picklable object
    holding no reference to the model, so that torch.save(model) and copy.deepcopy(model) keep working."""

    def __init__(self, model_name: str, method: str = "save_pretrained") -> None:
        self.model_name, self.method = model_name, method

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{self.method} of a torchext.hf.from_gguf {self.model_name}: its QuantLinear layers hold the GGUF "
            "file's packed bytes, which safetensors cannot store with their formats and which from_pretrained "
            "could not load into dense nn.Linear layers. Keep the GGUF file and load it again with from_gguf; "
            "save LoRA adapters with the peft model's save_pretrained (adapters only); or save the state with "
            "torch.save(model.state_dict()) and load_state_dict it into a from_gguf model of the same file")


def _gguf_path(path_or_dir, gguf_file) -> Path:
    base = Path(path_or_dir)
    path = base / gguf_file if gguf_file is not None else base
    if not path.is_file():
        what = "a GGUF file" if gguf_file is None else f"{gguf_file!r} in {str(base)!r}"
        hint = "; pass the file name as gguf_file=..." if gguf_file is None and base.is_dir() else ""
        raise FileNotFoundError(f"{path}: no such file (expected {what}{hint})")
    return path


def _architecture(path: Path, g: GGUFFile) -> str:
    """general.architecture, checked against what transformers' GGUF loader reads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = g.string_value("general.architecture")
    if architecture is None:
        raise ValueError(f"{path}: no general.architecture in the GGUF metadata, so transformers cannot tell which "
                         "model this is")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and _MOE_ARCHITECTURES.get(architecture) not in \
            GGUF_SUPPORTED_ARCHITECTURES:
        import transformers
        readable = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ValueError(f"{path}: architecture {architecture!r} is not one transformers {transformers.__version__} "
                         f"reads from GGUF; it reads {', '.join(readable)}")
    return architecture


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw


@contextlib.contextmanager
def _metadata_file(path: Path, g: GGUFFile, architecture: str):
    """A temporary GGUF file with `path`'s metadata and tensor names but none of its data, for
    transformers' config reader: it opens the file with gguf.GGUFReader, which decodes every field
    (a 262,144-token vocabulary: 33 s and 730 MiB for Gemma 3 270M). Arrays of more than 1024 values
    (the tokenizer's tokens, scores, token types and merges) are left out and the vocabulary's size
    kept as {architecture}.vocab_size, where transformers otherwise counts the tokens; tensors stay
    in the table (transformers reads their names: a missing output.weight means a tied head) as
    one-value F32 tensors."""
    from gguf import GGUFValueType

    vocab_key = f"{architecture}.vocab_size"
    entries = {kv.key: kv for kv in g.key_values}
    for kv in g.key_values:  # a value that is not UTF-8: ValueError naming the key (transformers' names the copy)
        if kv.value_type == GGUFValueType.STRING:
            g.string_value(kv.key)
    kept = [g.entry_bytes(kv) for kv in g.key_values if kv.value_type != GGUFValueType.ARRAY or kv.length <= 1024]
    tokens = entries.get("tokenizer.ggml.tokens")
    if tokens is not None and vocab_key not in entries:
        kept.append(_gguf_string(vocab_key) + int(GGUFValueType.UINT32).to_bytes(4, "little") +
                    tokens.length.to_bytes(4, "little"))
    infos = b"".join(_gguf_string(t.name) + (1).to_bytes(4, "little") + (1).to_bytes(8, "little") +
                     (0).to_bytes(4, "little") + (g.alignment * i).to_bytes(8, "little")
                     for i, t in enumerate(g.tensors))
    head = b"GGUF" + (3).to_bytes(4, "little") + len(g.tensors).to_bytes(8, "little") + len(kept).to_bytes(8, "little")
    tables = head + b"".join(kept) + infos
    padding = -len(tables) % g.alignment
    with tempfile.TemporaryDirectory(prefix="torchext-gguf-metadata-") as folder:
        meta = Path(folder) / path.name
        meta.write_bytes(tables + bytes(padding + g.alignment * len(g.tensors)))
        yield meta


def _dtype_and_device(dtype, device, config_kwargs: dict) -> tuple[torch.dtype, object]:
    """from_gguf's dtype and device, from its own arguments or from_pretrained's names for them, which
    config_kwargs would otherwise carry to AutoConfig unused (the model stayed float32 on the CPU)."""
    if "torch_dtype" in config_kwargs:  # from_pretrained's older name for dtype, which it still takes
        if dtype is not None:
            raise ValueError("dtype and torch_dtype (its older name) both given: pass dtype alone")
        dtype = config_kwargs.pop("torch_dtype")
    if dtype is None:
        dtype = torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)  # "bfloat16", as from_pretrained takes it
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(map(str, _DTYPES))} or its name (the activations, norms "
                         f"and dense weights; torchext's kernels compute in these), got {dtype!r}")
    if "device_map" in config_kwargs:
        device_map = config_kwargs.pop("device_map")
        if device is not None:
            raise ValueError("device and device_map both given: pass device alone")
        try:  # one device: "cuda:0", 0, torch.device("cpu")
            device = torch.device(device_map)
        except (RuntimeError, TypeError):
            raise ValueError(f"device_map={device_map!r}: from_gguf puts the whole model on one device; pass "
                             "device=... (for example 'cuda:0')") from None
    return dtype, device


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def _check_sizes(path: Path, g: GGUFFile, architecture: str) -> None:
    """The metadata's layer count and width against the tensors, before transformers reads either:
    a block_count of 10**9 in a corrupted file had it build a billion layers, never returning, and a
    width of 10**9 would allocate every norm at that size."""
    layers = 1 + max((int(m[1]) for t in g.tensors if (m := _BLOCK_TENSOR.match(t.name))), default=-1)
    blocks = g.int_value(f"{architecture}.block_count")
    if blocks is not None and blocks > layers:
        held = f"{layers} layers (blk.0 to blk.{layers - 1})" if layers else "no layer (no blk.N tensor)"
        raise ValueError(f"{path}: {architecture}.block_count is {blocks}, but the file's tensors are of {held}")
    width = g.int_value(f"{architecture}.embedding_length")
    embedding = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if width is not None and embedding is not None and width != embedding.k:
        raise ValueError(f"{path}: {architecture}.embedding_length is {width}, but token_embd.weight has rows of "
                         f"{embedding.k} values")


def _config(path: Path, g: GGUFFile, architecture: str, config_kwargs: dict):
    from transformers import AutoConfig

    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's config validation
    except ImportError:
        StrictDataclassError = ValueError
    with _metadata_file(path, g, architecture) as meta:
        try:
            config, unused = AutoConfig.from_pretrained(str(meta.parent), gguf_file=meta.name,
                                                        return_unused_kwargs=True, **config_kwargs)
        except (ValueError, KeyError, OSError, StrictDataclassError) as e:  # the message names the copy: say path
            raise ValueError(f"{path}: transformers cannot build a config from this {architecture!r} file's "
                             f"metadata: {type(e).__name__}: {str(e).replace(str(meta), str(path))}") from e
    unused.pop("gguf_file", None)
    if unused:
        raise ValueError(f"from_gguf: {', '.join(map(repr, unused))}: neither from_gguf (device, dtype, "
                         "model_class) nor transformers' AutoConfig.from_pretrained, which takes the other keyword "
                         "arguments, uses it")
    return config


@contextlib.contextmanager
def _linear_and_embedding_weights_on_meta(model_type: str):
    """nn.Linear and nn.Embedding (subclasses included), and the architecture's experts modules
    (_experts_classes), create their parameters on the meta device while the model is built: no
    memory, no random initialisation. Everything else (norms, rotary tables, scale buffers) is
    built as usual, so buffers computed at construction keep their values. The classes are
    patched for the duration of the block."""
    originals = {cls: cls.__init__ for cls in (nn.Linear, nn.Embedding)}
    experts = {cls: cls.__init__ for cls in _experts_classes(model_type)}

    def on_meta(init):
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            kwargs["device"] = torch.device("meta")
            init(self, *args, **kwargs)
        return wrapped

    def under_meta(init):  # experts modules make their nn.Parameter(torch.empty(...)) themselves
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            with torch.device("meta"):
                init(self, *args, **kwargs)
        return wrapped

    for cls, init in originals.items():
        cls.__init__ = on_meta(init)
    for cls, init in experts.items():
        cls.__init__ = under_meta(init)
    try:
        yield
    finally:
        for cls, init in {**originals, **experts}.items():
            cls.__init__ = init


#: general.architecture of the MoE files transformers reads -> its model_type
_MOE_ARCHITECTURES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def _experts_classes(model_type: str) -> list[type]:
    """The modules of a transformers MoE architecture that hold all experts' weights as 3-D tensors
    (Qwen2MoeExperts, Qwen3MoeExperts: gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    if model_type not in _MOE_ARCHITECTURES.values():
        return []
    import importlib

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return [cls for name, cls in vars(module).items()
            if name.endswith("Experts") and isinstance(cls, type) and issubclass(cls, nn.Module)]


def _load_tensors(model: nn.Module, g: GGUFFile, architecture: str, dtype: torch.dtype) -> None:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    # the map from gguf's names for the file's own architecture: transformers derives that name from
    # config.model_type, which fails for Mistral files (general.architecture "llama", model_type
    # "mistral", which gguf's tables do not know)
    names = get_gguf_hf_weights_map(model, processor, model_type=architecture)
    dequantized, unmapped = [], []
    experts: dict[str, dict[str, GGUFTensor]] = {}  # experts module -> its *_exps tensors by projection
    for t in g.tensors:
        # what MoE processors write under transformers' names instead of returning a tensor
        produced: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
        if t.tensor_type.value in WEIGHT_IDS and len(t.shape) == 3:
            _collect_experts(model, g, t, names, experts)
            continue
        if t.tensor_type.value in WEIGHT_IDS:
            _load_packed(model, g, t, processor, names, produced, dtype)
            continue
        raw = tensor_from_bytes(g.read(t), t, g.name, torch.device("cpu"))
        if t.tensor_type.name not in ("F32", "F16", "BF16", "F64") and raw.is_floating_point():
            dequantized.append(f"{t.name} ({t.tensor_type.name})")
        values = raw.float().numpy() if raw.is_floating_point() else raw.numpy()
        result = processor.process(weights=values, name=t.name, tensor_key_mapping=names,
                                   parsed_parameters=produced)
        for hf_name, tensor in produced["tensors"].items():
            _set_dense(model, hf_name, tensor, dtype, g.name, t.name)
        if result.name is None:
            continue
        if result.name not in names:
            unmapped.append(t.name)  # transformers skips these too (rope_freqs and the like)
            continue
        _set_dense(model, names[result.name], torch.from_numpy(np.copy(result.weights)), dtype, g.name, t.name)
    for module_name, tensors in experts.items():
        _load_experts(model, g, module_name, tensors)
    if dequantized:
        logger.warning("%s: torchext has no kernel for these tensors' formats; dequantized to %s as transformers "
                       "does: %s", g.name, dtype, ", ".join(dequantized))
    if unmapped:
        logger.info("%s: tensors transformers does not map for this architecture, skipped: %s", g.name,
                    ", ".join(unmapped))
    _tie_output_head(model)
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{g.name}: the file holds no tensor for {len(missing)} parameters of "
                         f"{type(model).__name__}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _load_packed(model: nn.Module, g: GGUFFile, t: GGUFTensor, processor, names: dict, produced: dict,
                 dtype: torch.dtype) -> None:
    """A tensor in a torchext format onto a QuantLinear or QuantEmbedding, rows permuted as
    transformers' processor would permute the dequantized values."""
    q = QType(t.tensor_type.value)
    where = f"{g.name}: tensor {t.name!r} ({q.name}, {'x'.join(map(str, t.numpy_shape))})"
    if len(t.shape) != 2:
        raise ValueError(f"{where}: a packed tensor of {len(t.shape)} dimensions; torchext keeps 2-D weights "
                         "(nn.Linear, nn.Embedding) packed")
    # the processor run on the row indices shows what it does to the rows
    with np.errstate(all="ignore"):
        try:
            result = processor.process(weights=np.arange(t.n, dtype=np.float64)[:, None], name=t.name,
                                       tensor_key_mapping=names, parsed_parameters=produced)
            rows = result.weights
        except (ValueError, IndexError, TypeError) as e:
            raise ValueError(f"{where}: transformers' {type(processor).__name__} reshapes this tensor ({e}); "
                             "torchext can only permute a packed tensor's rows") from None
    if result.name is None or produced["tensors"]:
        raise ValueError(f"{where}: transformers' {type(processor).__name__} splits or merges this tensor into "
                         "others; torchext keeps only whole 2-D tensors packed")
    if result.name not in names:
        logger.info("%s: not mapped by transformers for this architecture, skipped", where)
        return
    rows = np.asarray(rows)
    if rows.shape != (t.n, 1) or not np.array_equal(np.sort(rows[:, 0]), np.arange(t.n)):
        raise ValueError(f"{where}: transformers' {type(processor).__name__} transforms this tensor other than by "
                         "permuting its rows (transposing it or changing its values); torchext cannot do that to "
                         "packed bytes")
    data = g.read(t).view(t.n, -1)
    order = rows[:, 0].astype(np.int64)
    if not np.array_equal(order, np.arange(t.n)):
        data = data[torch.from_numpy(order)]  # rows are independent in every format
    hf_name = names[result.name]
    module_name, _, leaf = hf_name.rpartition(".")
    module = model.get_submodule(module_name)
    shape = tuple(getattr(module, "weight", torch.empty(0)).shape)
    if leaf == "weight" and shape == (t.n, t.k) and _is_plain(module, nn.Linear):
        _set_module(model, module_name, QuantLinear(data, q, t.k, t.n, module.bias))
    elif leaf == "weight" and shape == (t.n, t.k) and _is_plain(module, nn.Embedding):
        _set_module(model, module_name, QuantEmbedding(data, q, t.n, t.k, module.padding_idx,
                                                       getattr(module, "embed_scale", None), dtype))
    else:
        raise ValueError(f"{where}: maps to {hf_name}, of a {type(module).__name__} (weight shape {list(shape)}); "
                         f"torchext keeps a packed tensor only as the weight of an nn.Linear or nn.Embedding of "
                         f"shape [{t.n}, {t.k}]")


_EXPERTS_TENSOR = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")


def _collect_experts(model: nn.Module, g: GGUFFile, t: GGUFTensor, names: dict,
                     experts: dict[str, dict[str, GGUFTensor]]) -> None:
    """A packed 3-D tensor: one of a MoE layer's ffn_{gate,up,down}_exps [E, rows, k], kept for the
    experts module transformers maps it to (the processor would merge gate and up into one dense
    gate_up_proj); _load_experts replaces the module once the file has given all three."""
    where = f"{g.name}: tensor {t.name!r} ({QType(t.tensor_type.value).name}, {'x'.join(map(str, t.numpy_shape))})"
    m = _EXPERTS_TENSOR.fullmatch(t.name)
    # transformers' map holds gguf's names without ".weight" (blk.0.ffn_gate_exps -> ...experts.gate_up_proj)
    hf_name = names.get(t.name.removesuffix(".weight")) if m else None
    if hf_name is None:
        raise ValueError(f"{where}: a packed tensor of 3 dimensions that is no MoE layer's ffn_gate_exps, "
                         "ffn_up_exps or ffn_down_exps mapped by transformers; torchext keeps only those and "
                         "2-D weights packed")
    experts.setdefault(hf_name.rpartition(".")[0], {})[m.group(1)] = t


def _load_experts(model: nn.Module, g: GGUFFile, module_name: str, tensors: dict[str, GGUFTensor]) -> None:
    """Replaces transformers' experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I], SiLU
    gating) by a QuantExperts over the file's ffn_{gate,up,down}_exps bytes."""
    from .nn import QuantExperts

    module = model.get_submodule(module_name)
    missing = [p for p in ("gate", "up", "down") if p not in tensors]
    if missing:
        raise ValueError(f"{g.name}: {module_name} has {', '.join(f'ffn_{p}_exps' for p in tensors)} but no "
                         f"{', '.join(f'ffn_{p}_exps' for p in missing)}; torchext runs the three together")
    gate, up, down = (tensors[p] for p in ("gate", "up", "down"))
    e, inter, hidden = gate.numpy_shape
    gate_up = getattr(module, "gate_up_proj", None)
    down_proj = getattr(module, "down_proj", None)
    act = getattr(model.config, "hidden_act", None)
    if (gate_up is None or down_proj is None or tuple(gate_up.shape) != (e, 2 * inter, hidden)
            or tuple(down_proj.shape) != (e, hidden, inter) or up.numpy_shape != gate.numpy_shape
            or down.numpy_shape != (e, hidden, inter) or act != "silu"):
        raise ValueError(f"{g.name}: {module_name} ({type(module).__name__}, act {act!r}) is not E SiLU-gated experts "
                         f"of gate_up_proj [E, 2I, H] and down_proj [E, H, I] matching ffn_gate_exps "
                         f"{list(gate.numpy_shape)}, ffn_up_exps {list(up.numpy_shape)} and ffn_down_exps "
                         f"{list(down.numpy_shape)}; torchext cannot run these experts packed")
    data = [g.read(t).view(t.n, -1) for t in (gate, up, down)]
    _set_module(model, module_name, QuantExperts(*data, [QType(t.tensor_type.value) for t in (gate, up, down)], e,
                                                 hidden, inter))


def _gated_mlp_formula(self, x):  # transformers' gated MLPs' forward (Llama, Mistral, Qwen2/3, Gemma 2/3, ...)
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _stacked_gated_mlp_formula(self, hidden_states):  # Phi-3's: gate and up stacked in one gate_up_proj
    up_states = self.gate_up_proj(hidden_states)

    gate, up_states = up_states.chunk(2, dim=-1)
    up_states = up_states * self.activation_fn(gate)

    return self.down_proj(up_states)


def _gate_activation(act) -> Optional[str]:
    """gated_mlp's name for an MLP's act_fn when it is exactly F.silu or F.gelu (transformers' SiLUActivation,
    GELUTanh, GELUActivation hold or call those; torch's nn.SiLU, nn.GELU), else None."""
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    f = getattr(act, "act", None)
    if f is torch.nn.functional.gelu:
        return "gelu"
    if (isinstance(f, functools.partial) and f.func is torch.nn.functional.gelu and not f.args
            and f.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    return None


def _fuse_gated_mlps(model: nn.Module) -> None:
    """Each MLP whose forward is _gated_mlp_formula (the same bytecode: a subclass that changes it keeps its
    own), whose act_fn gated_mlp has and whose down_proj is a QuantLinear becomes a QuantGatedMLP over the
    same layers: on the GEMV path gate and up then share one quantize_q8_1 (gated_mlp). One whose forward is
    _stacked_gated_mlp_formula (Phi-3's gate_up_proj) becomes a QuantStackedGatedMLP."""
    def same_code(f, g) -> bool:
        return f is not None and (f.co_code, f.co_names) == (g.co_code, g.co_names)

    for name, module in list(model.named_modules()):
        code = getattr(type(module).forward, "__code__", None)
        if not isinstance(getattr(module, "down_proj", None), QuantLinear):
            continue
        if same_code(code, _gated_mlp_formula.__code__):
            activation = _gate_activation(getattr(module, "act_fn", None))
            if activation is not None:
                _set_module(model, name, QuantGatedMLP(module.gate_proj, module.up_proj, module.down_proj, activation))
        elif same_code(code, _stacked_gated_mlp_formula.__code__):
            activation = _gate_activation(getattr(module, "activation_fn", None))
            if activation is not None:
                _set_module(model, name, QuantStackedGatedMLP(module.gate_up_proj, module.down_proj, activation))


def _is_plain(module: nn.Module, cls: type) -> bool:
    """An instance of cls whose forward is cls's (an embedding may add a scale, which QuantEmbedding keeps)."""
    if not isinstance(module, cls):
        return False
    return type(module).forward is cls.forward or (cls is nn.Embedding and hasattr(module, "embed_scale"))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _set_dense(model: nn.Module, hf_name: str, tensor: torch.Tensor, dtype: torch.dtype, file: str,
               gguf_name: str) -> None:
    module_name, _, leaf = hf_name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf, module._buffers.get(leaf))
    if old is None:
        raise ValueError(f"{file}: tensor {gguf_name!r} maps to {hf_name}, which {type(model).__name__} does not have")
    if tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{file}: tensor {gguf_name!r} has shape {list(tensor.shape)} after transformers' "
                         f"processing, but {hf_name} is {list(old.shape)}")
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    else:
        module._buffers[leaf] = tensor


def _tie_output_head(model: nn.Module) -> None:
    """A tied output head (no output.weight in the file) reads the token embedding's weight: the
    same bytes (a QuantLinear over the QuantEmbedding's buffer) or the same dense parameter."""
    output = model.get_output_embeddings()
    if not isinstance(output, nn.Linear) or not output.weight.is_meta:
        return
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantEmbedding):
        head = QuantLinear(embedding.weight, embedding.qtype, embedding.embedding_dim, embedding.num_embeddings,
                           output.bias)
        name = next(n for n, m in model.named_modules() if m is output)
        _set_module(model, name, head)
    elif isinstance(embedding, nn.Embedding) and embedding.weight.shape == output.weight.shape:
        output.weight = embedding.weight


# ---- peft ------------------------------------------------------------------------------------------

def register_lora(config, model: Optional[nn.Module] = None):
    """`config` (a peft LoraConfig) with QuantLoraLinear registered for QuantLinear, through peft's
    custom-module mechanism; returns config. target_modules then picks QuantLinear layers as it
    picks nn.Linear ones:

        peft_model = get_peft_model(model, register_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
        peft_model.save_pretrained("adapter")
        # later, onto a model from from_gguf (peft does not save the registration):
        config = register_lora(LoraConfig.from_pretrained("adapter"))
        peft_model = PeftModel.from_pretrained(model, "adapter", config=config)

    target_modules="all-linear" needs the model, register_lora(config, model): peft expands that
    option itself to the nn.Linear layers alone (it knows no QuantLinear), so register_lora expands
    it first, to the layers peft picks plus every QuantLinear by peft's rule (all but the output
    head: transformers' get_output_embeddings, or for a SEQ_CLS task without one its classifier
    head; none inside an adapter layer). use_dora=True is refused (ValueError): DoRA rescales by
    the norm of the dense weight plus the update, and a QuantLinear's weight is packed bytes.

    init_lora_weights: True (default), "gaussian", "orthogonal" and False set the adapters alone, and
    "eva" (then peft.initialize_lora_eva_weights) the SVD of the layers' inputs; these work as on
    nn.Linear. Those that read the base weight as a float matrix are refused (ValueError naming the
    option), here and at each layer: "pissa" ("pissa_niter_N"), "olora", "corda" and "lora_ga", which
    also rewrite it to a residual, "loftq" and "mica". Initialize those on transformers' dequantized
    model of the file instead; a PiSSA, OLoRA, CorDA or LoRA-GA adapter saved there converted to plain
    LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)) loads here.

    modules_to_save naming a layer that holds packed bytes (a QuantLinear, QuantEmbedding or
    QuantExperts, or a module around one) is refused (ValueError naming it): peft trains and saves a
    full copy of such a layer, whose bytes are a buffer that cannot train, and safetensors cannot save
    its format record. Telling those layers apart takes the model: register_lora(config, model)
    whenever modules_to_save is set (it also checks the heads peft adds for classification tasks).
    """
    _check_no_dora(getattr(config, "use_dora", False), None)
    _check_init(getattr(config, "init_lora_weights", True), None)  # before preprocess_corda reads the bytes as floats
    _check_modules_to_save(config, model)
    if isinstance(getattr(config, "target_modules", None), str) and config.target_modules.lower() == "all-linear":
        if model is None:
            raise ValueError("target_modules='all-linear': pass the model, register_lora(config, model), so that it "
                             "is expanded to the model's QuantLinear layers too (peft's own expansion picks nn.Linear "
                             "layers alone), or list the layers in target_modules")
        config.target_modules = _all_linear_modules(config, model)
    config._register_custom_module({QuantLinear: quant_lora_linear_class()})
    return config


# the heads peft's task models add to modules_to_save (PeftModelForSequenceClassification, ...ForTokenClassification,
# ...ForQuestionAnswering)
_TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                         "QUESTION_ANS": ("qa_outputs",)}


def _check_modules_to_save(config, model: Optional[nn.Module]) -> None:
    """ValueError naming a layer that modules_to_save would copy and train whose weights are packed bytes: peft's
    copy trained nothing but a bias, without a word, and the adapter's save_pretrained failed in safetensors on
    the layer's format record (a dict)."""
    named = list(getattr(config, "modules_to_save", None) or ())
    if named and model is None:
        raise ValueError(f"modules_to_save={named!r}: pass the model, register_lora(config, model), so that layers "
                         "holding packed GGUF bytes among them are refused (peft would copy them to train, and their "
                         "bytes cannot train)")
    if model is None:
        return
    task = getattr(config, "task_type", None)
    named += _TASK_MODULES_TO_SAVE.get(getattr(task, "value", task), ())
    if not named:
        return
    for name, module in model.named_modules():
        if not any(name.endswith(n) for n in named):  # peft's match: the name's end
            continue
        packed = next((m for m in module.modules() if isinstance(m, PackedWeightState)), None)
        if packed is not None:
            raise ValueError(f"modules_to_save: {name} ({type(module).__name__}) holds packed GGUF bytes "
                             f"({type(packed).__name__}), which peft would copy to train in full; "
                             "they are a buffer that cannot train, and safetensors cannot save the layer. Leave it out "
                             "of modules_to_save, or target its QuantLinear layers with LoRA (target_modules)")


def _check_no_dora(use_dora: bool, base: Optional[QuantLinear]) -> None:
    if not use_dora:
        return
    layer = f" ({base.qtype.name}, {base.out_features}x{base.in_features})" if base is not None else ""
    raise ValueError(f"use_dora=True: DoRA is not supported on a torchext QuantLinear{layer}. DoRA rescales each "
                     "output by the norm of the dense weight plus the LoRA update, and a QuantLinear's weight is "
                     "packed GGUF bytes (uint8), not that dense weight; use plain LoRA (use_dora=False)")


# init_lora_weights values whose initialization reads the base weight as a float matrix, by peft's prefix
# for them: peft would take a QuantLinear's uint8 bytes for that matrix (its TypeError names no layer, LoftQ
# would write its NF4 dequantization back as uint8). All but MiCA also rewrite the weight to the residual
# W - scaling * B @ A, which the adapter is then relative to.
_FLOAT_WEIGHT_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA", "loftq": "LoftQ",
                       "mica": "MiCA"}


def _check_init(init, base: Optional[QuantLinear]) -> None:
    """ValueError naming `init` (init_lora_weights) when it is one of _FLOAT_WEIGHT_INITS, saying what works instead."""
    key = init.lower() if isinstance(init, str) else ""
    prefix = next((p for p in _FLOAT_WEIGHT_INITS if key.startswith(p)), None)
    if prefix is None:
        return
    name = _FLOAT_WEIGHT_INITS[prefix]
    layer = f" ({base.qtype.name}, {base.out_features}x{base.in_features})" if base is not None else ""
    start = f"init_lora_weights={init!r}: {name} initialization is not supported on a torchext QuantLinear{layer}"
    plain = "init_lora_weights=True (the default), 'gaussian', 'orthogonal', 'eva' or False"
    if prefix == "loftq":
        raise ValueError(f"{start}. LoftQ quantizes a float base weight with bitsandbytes (NF4 or int8) and fits the "
                         "adapters to that quantization's error; a QuantLinear's weight is already packed GGUF bytes "
                         f"(uint8), and the file holds no float original to quantize. Use {plain} here, or LoftQ on "
                         "the float model the GGUF file was made from")
    if prefix == "mica":
        raise ValueError(f"{start}. MiCA sets lora_B from the base weight's singular vectors, and a QuantLinear's "
                         "weight is packed GGUF bytes (uint8), no float matrix. Initialize the adapter on the dense "
                         "model (transformers' from_pretrained(..., gguf_file=...)) and save it: MiCA leaves the base "
                         "weight as it is, so the adapter loads here with init_lora_weights=True in its config. Or "
                         f"use {plain} here")
    source = {"pissa": "the base weight's singular vectors", "olora": "the base weight's QR decomposition",
              "corda": "the base weight's decomposition by its inputs' covariance",
              "lora_ga": "the base weight's gradient"}[prefix]
    raise ValueError(f"{start}. {name} sets the adapters from {source} and rewrites that weight to the residual "
                     "W - scaling * B @ A; a QuantLinear's weight is packed GGUF bytes (uint8), a buffer that is no "
                     "float matrix, has no gradient and cannot be rewritten. Initialize the adapter on the dense "
                     "model (transformers' from_pretrained(..., gguf_file=...)), train it there, save it converted "
                     "to plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load "
                     f"that here; or use {plain} here")


def _all_linear_modules(config, model: nn.Module) -> set[str]:
    """peft's "all-linear" for a model holding QuantLinear layers: the names peft's own expansion
    picks (peft.tuners.tuners_utils._maybe_include_all_linear_layers: nn.Linear and Conv1D layers
    and existing adapter layers, less the output head) and the QuantLinear layers by its rule."""
    import copy

    from peft import PeftModel, TaskType
    from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):  # peft matches names within the model it wraps
        model = model.get_base_model()
    names = set(_maybe_include_all_linear_layers(copy.copy(config), model).target_modules)
    excluded = set()
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and config.task_type == TaskType.SEQ_CLS:
            head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
        if head is not None:
            excluded.add(id(head))
    for layer in model.modules():  # adapters are not nested
        if isinstance(layer, BaseTunerLayer):
            excluded.update(id(m) for m in layer.modules() if m is not layer)
    names.update(name for name, m in model.named_modules() if isinstance(m, QuantLinear) and id(m) not in excluded)
    return names


@functools.cache
def quant_lora_linear_class() -> type:
    """QuantLoraLinear, peft's LoRA Linear around a QuantLinear (made on first use, so that torchext.hf
    imports without peft): y = QuantLinear(x) + B(A(dropout(x))) * scaling. The adapters train;
    merging is refused, since the base weight is GGUF bytes that cannot absorb a dense update."""
    from peft.tuners.lora.layer import Linear

    class QuantLoraLinear(Linear):
        """LoRA adapters around a torchext QuantLinear (see quant_lora_linear_class)."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def update_layer(self, adapter_name, r, lora_alpha, *args, **kwargs) -> None:
            """peft's, but DoRA and the inits that read the base weight (_check_init) are refused (ValueError):
            they would read the uint8 bytes as a dense weight."""
            # peft 0.21 passes the LoraConfig next; earlier releases passed its fields, use_dora by keyword
            config = args[0] if args else kwargs.get("config")
            use_dora = getattr(config, "use_dora", False) or kwargs.get("use_dora", False)
            _check_no_dora(use_dora, self.get_base_layer())  # also for a config changed after register_lora
            init = getattr(config, "init_lora_weights", kwargs.get("init_lora_weights", True))
            _check_init(init, self.get_base_layer())
            super().update_layer(adapter_name, r, lora_alpha, *args, **kwargs)

        @torch.no_grad()
        def orthogonal_init(self, adapter_name) -> None:
            """peft's orthogonal init (LoraLayer.orthogonal_init, peft 0.21), in the adapters' own dtype: peft's
            casts them to the base weight's, uint8 here, which a Parameter cannot hold."""
            rank = self.r[adapter_name]
            if rank % 2 != 0:
                raise ValueError(f"init_lora_weights='orthogonal': needs an even r, got r={rank}")
            dtype = self.lora_A[adapter_name].weight.dtype
            q, _ = torch.linalg.qr(torch.randn(rank, rank))
            lora_a = torch.randn(self.in_features, rank // 2).mm(q[0::2, :]).T / 10.0
            lora_b = torch.randn(rank // 2, self.out_features).T.mm(q[1::2, :]) / 10.0
            self.lora_A[adapter_name].weight = nn.Parameter(lora_a.contiguous().to(dtype))
            self.lora_B[adapter_name].weight = nn.Parameter(lora_b.contiguous().to(dtype))

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            """Refused: ValueError."""
            base = self.get_base_layer()
            raise ValueError(f"merging a LoRA adapter into a torchext QuantLinear ({base.qtype.name}, "
                             f"{base.out_features}x{base.in_features}) is not supported: its weight is packed GGUF "
                             "bytes, which a dense update cannot be added to. Keep the adapter unmerged (it runs "
                             "beside the packed weight), or merge into a dense copy of the model")

    # pickle finds a class by module and name: torchext.hf.QuantLoraLinear (the module's __getattr__)
    QuantLoraLinear.__module__, QuantLoraLinear.__qualname__ = __name__, "QuantLoraLinear"
    return QuantLoraLinear


def __getattr__(name: str):
    """torchext.hf.QuantLoraLinear, made on first use (quant_lora_linear_class): pickle and torch.load of
    a peft model over torchext layers look the class up here."""
    if name == "QuantLoraLinear":
        return quant_lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _measure_load_memory(path: str) -> None:
    """Print the peak resident-memory increase of from_gguf(path) against the file's size (run in
    a fresh process: ru_maxrss is the process's peak). The baseline is taken after importing the
    file's transformers model code (for Gemma 3 that import alone is ~226 MiB), which any way of
    loading the model with transformers pays."""
    import resource
    import time

    import transformers

    with GGUFFile(path) as g, torch.device("meta"):  # imports the architecture's model code, builds nothing
        transformers.AutoModelForCausalLM.from_config(_config(Path(path), g, _architecture(Path(path), g), {}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = from_gguf(path)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    size = os.path.getsize(path)
    packed = sum({m.weight.data_ptr(): m.weight.numel() for m in model.modules()
                  if isinstance(m, (QuantLinear, QuantEmbedding))}.values())  # a tied head's bytes once
    print(f"{path}: file {size / 2**20:.0f} MiB, packed weights {packed / 2**20:.0f} MiB; loaded in {seconds:.1f} s "
          f"with a peak resident-memory increase of {(peak - before) / 1024:.0f} MiB")


if __name__ == "__main__":
    import argparse

    from torchext.cli import gguf_file_arg

    parser = argparse.ArgumentParser(prog="python -m torchext.hf",
                                     description="torchext.hf: measure from_gguf's peak memory on a GGUF file")
    parser.add_argument("--memory", required=True, metavar="FILE", type=gguf_file_arg, help="a GGUF file")
    path = parser.parse_args().memory
    try:
        _measure_load_memory(path)
    except ValueError as e:  # a file from_gguf refuses (its tensors do not fit the architecture, ...)
        parser.error(f"--memory: {e}")
    except ModuleNotFoundError as e:  # transformers is an optional dependency of torchext
        parser.error(f"--memory needs {e.name}, which is not installed (pip install 'torchext[gemma]')")
