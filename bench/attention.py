"""Decode attention over a static key/value cache: torchext.cached_attention against what the Gemma 3
model's decode steps run (torchext/models/gemma3.py), in the same run.

    python bench/attention.py [--out DIR] [--dtype bfloat16]

Gemma 3 270M's attention (4 query heads, 1 key/value head, head dim 256), one decode row, at several
cache fills (the position) and capacities (max_seq_len), µs per call, each timed as 100 back-to-back
calls captured in one CUDA graph (bench/common.GraphTimer):
- cached_attention: reads the keys up to the position (and within a window of 512 for a local layer);
- products: the masked products and sums over the whole cache that the model's decode steps spell
  out for inductor to fuse (torch.compile of the same expression);
- sdpa: F.scaled_dot_product_attention over the whole cache with the mask (the prompt path).
The caches (at most 2 x 16 MB) stay in L2 between calls of a graph: these are latency figures.
Writes DIR/attention.json and prints a table. Nothing here is asserted.
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


def main() -> None:
    rows = latency_bench(__doc__, "attention", lambda dtype: [measure(c, p, w, dtype) for c, p, w in CASES], CALLS)
    names = ["cached_attention", "products", "sdpa"]
    print(f"{'capacity':>8} {'position':>8} {'window':>6} " + " ".join(f"{n:>16}" for n in names) + "  max |diff|")
    for r in rows:
        print(f"{r['capacity']:>8} {r['position']:>8} {r['window']:>6} "
              + " ".join(f"{r[n]:16.2f}" for n in names) + f"  {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
