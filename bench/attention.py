"""A decode step's attention over a static key/value cache: torchext.cached_attention and
torchext.rope_cache_write against what the Gemma 3 model's decode steps compiled before them
(torchext/models/gemma3.py), in the same run.

    python bench/attention.py [--out DIR] [--dtype bfloat16] [--kernels]

Gemma 3 270M's attention (4 query heads, 1 key/value head, head dim 256), one decode row, at several
cache fills (the position) and capacities (max_seq_len), µs per call, each timed as 100 back-to-back
calls captured in one CUDA graph (bench/common.GraphTimer):
- cached_attention: reads the keys up to the position (and within a window of 512 for a local layer);
- products: the masked products and sums over the whole cache that the model's decode steps spelled
  out for inductor to fuse (torch.compile of the same expression);
- sdpa: F.scaled_dot_product_attention over the whole cache with the mask (the prompt path).
Then the step before it, at Gemma's shapes (one row of q/k/v as views of the stacked projection):
- rope_cache_write: q/k per-head RMSNorm, rotary embedding by the tables' row at the position, and
  the k/v cache writes, one kernel;
- compiled: the same in torch (RMSNorm in fp32, rotate_half, index_copy_), torch.compile'd, as the
  model ran it before.
The caches (at most 2 x 16 MB) stay in L2 between calls of a graph: these are latency figures.
Writes DIR/attention.json and prints two tables. Nothing here is asserted.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import latency_bench, time_calls  # noqa: E402

import torchext  # noqa: E402

CALLS = 100
HEADS, KV_HEADS, DIM = 4, 1, 256
# (capacity, position, window): Gemma's global layers (window 0) and local ones (512); a capacity of
# 136 is bench/gemma3.py's decode (128 tokens)
CASES = [(136, 40, 0), (136, 130, 0), (1024, 16, 0), (1024, 512, 0), (1024, 1000, 0), (8192, 16, 0), (8192, 4000, 0),
         (8192, 8000, 0), (8192, 8000, 512), (32768, 30000, 512)]
ROPE_CASES = [(136, 40), (8192, 4000)]  # (capacity, position)


def grouped(q, k, pos, window):
    """q's heads as rows of their cache head's matrix, [b, kv_heads, group * t, d], and the mask of
    the keys each row sees (j <= p, and p - j < window when window > 0)."""
    kpos = torch.arange(k.shape[2], device=q.device)
    visible = kpos[None, :] <= pos[:, None]
    if window:
        visible = visible & (pos[:, None] - kpos[None, :] < window)
    b, h, t, d = q.shape
    group = h // k.shape[1]
    return q.reshape(b, k.shape[1], group * t, d), visible.repeat(group, 1)


def products(q, k, v, pos, scale, window):
    """The model's decode attention: every cached key, the invisible ones masked."""
    qg, mask = grouped(q, k, pos, window)
    scores = (qg.unsqueeze(-2) * k.unsqueeze(-3)).float().sum(-1) * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (p.unsqueeze(-1) * v.unsqueeze(-3).float()).sum(-2).to(q.dtype).reshape(q.shape)


def sdpa(q, k, v, pos, scale, window):
    qg, mask = grouped(q, k, pos, window)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).reshape(q.shape)


def measure(capacity: int, position: int, window: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(capacity + position)
    q = torch.randn(1, HEADS, 1, DIM, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, KV_HEADS, capacity, DIM, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, KV_HEADS, capacity, DIM, device="cuda", generator=g).to(dtype)
    pos = torch.tensor([position], device="cuda")
    scale = 1.0 / math.sqrt(DIM)
    compiled = torch.compile(products, fullgraph=True, dynamic=False)
    calls = {
        "cached_attention": lambda i: torchext.cached_attention(q, k, v, pos, scale, window),
        "products": lambda i: compiled(q, k, v, pos, scale, window),
        "sdpa": lambda i: sdpa(q, k, v, pos, scale, window),
    }
    ref = products(q, k, v, pos, scale, window).float()
    row = {"capacity": capacity, "position": position, "window": window,
           "max_abs_diff": (torchext.cached_attention(q, k, v, pos, scale, window).float() - ref).abs().max().item()}
    return time_calls(calls, CALLS, row)


def rms_norm_heads(x, weight, eps):
    """Gemma's q/k norm as torch writes it: fp32, rounded to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rope_step(q, k, v, cos, sin, pos, k_cache, v_cache, q_weight, k_weight, eps):
    """What rope_cache_write does, in torch: q [B, H, T, D] out, the caches written at pos."""
    def rotate(x):
        half = x.shape[-1] // 2
        c, s = cos[pos][:, None, :], sin[pos][:, None, :]
        return (x.float() * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1).float() * s).to(x.dtype)
    q = rotate(rms_norm_heads(q, q_weight, eps))
    k_cache.index_copy_(2, pos, rotate(rms_norm_heads(k, k_weight, eps)).transpose(1, 2))
    v_cache.index_copy_(2, pos, v.transpose(1, 2))
    return q.transpose(1, 2)


def measure_rope(capacity: int, position: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(capacity + position)
    proj = torch.randn(1, 1, (HEADS + 2 * KV_HEADS) * DIM, device="cuda", generator=g).to(dtype)
    q, k, v = (x.view(1, 1, -1, DIM) for x in proj.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1))
    angles = torch.rand(capacity, DIM, device="cuda", generator=g)
    cos, sin = angles.cos(), angles.sin()
    weights = [1 + 0.1 * torch.randn(DIM, device="cuda", generator=g) for _ in range(2)]
    caches = [torch.zeros(1, KV_HEADS, capacity, DIM, device="cuda", dtype=dtype) for _ in range(4)]
    pos = torch.tensor([position], device="cuda")
    compiled = torch.compile(rope_step, fullgraph=True, dynamic=False)
    calls = {
        "rope_cache_write": lambda i: torchext.rope_cache_write(q, k, v, cos, sin, pos, *caches[:2], *weights, 1e-6),
        "compiled": lambda i: compiled(q, k, v, cos, sin, pos, *caches[2:], *weights, 1e-6),
    }
    got = calls["rope_cache_write"](0).float()
    row = {"op": "rope_cache_write", "capacity": capacity, "position": position,
           "max_abs_diff": max((got - calls["compiled"](0).float()).abs().max().item(),
                               (caches[0] - caches[2]).float().abs().max().item())}
    return time_calls(calls, CALLS, row)


def main() -> None:
    def measure_rows(dtype):
        return ([{"op": "cached_attention", **measure(c, p, w, dtype)} for c, p, w in CASES]
                + [measure_rope(c, p, dtype) for c, p in ROPE_CASES])
    rows = latency_bench(__doc__, "attention", measure_rows, CALLS)
    names = ["cached_attention", "products", "sdpa"]
    print(f"{'capacity':>8} {'position':>8} {'window':>6} " + " ".join(f"{n:>16}" for n in names) + "  max |diff|")
    for r in rows:
        if r["op"] == "cached_attention":
            print(f"{r['capacity']:>8} {r['position']:>8} {r['window']:>6} "
                  + " ".join(f"{r[n]:16.2f}" for n in names) + f"  {r['max_abs_diff']:.2e}")
    names = ["rope_cache_write", "compiled"]
    print(f"{'capacity':>8} {'position':>8} " + " ".join(f"{n:>16}" for n in names) + "  max |diff|")
    for r in rows:
        if r["op"] == "rope_cache_write":
            print(f"{r['capacity']:>8} {r['position']:>8} " + " ".join(f"{r[n]:16.2f}" for n in names)
                  + f"  {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
