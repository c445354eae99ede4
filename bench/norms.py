"""A decoder's residual add and the next norm's Q8_1 input: add_rms_norm_quantize_q8_1 against the
unfused ops it replaces, in the same run.

    python bench/norms.py [--out DIR] [--dtype bfloat16] [--kernels]

For rows x k activations (k: Gemma 3 270M's 640, 1B's 1152, 4B's 2560, and 4096), µs per call,
each timed as 100 back-to-back calls captured in one CUDA graph (bench/common.GraphTimer):
- fused: add_rms_norm_quantize_q8_1(y, h, w, eps, x_weight=post) (Gemma's post-norm), and without
  x_weight (a pre-norm decoder's h + y);
- unfused: inductor's kernel for h + rms_norm(y) (torch.compile of the model's RMSNorm and add; h + y
  without the post-norm), then rms_norm_quantize_q8_1: what a compiled decoder ran before;
- rms_norm_quantize_q8_1 and quantize_q8_1 alone, for scale.
Operands stay in L2 (a few KB a call): these kernels are latency-bound, not bandwidth-bound.
Writes DIR/norms.json and prints a table. Nothing here is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import latency_bench, time_calls  # noqa: E402

import torchext  # noqa: E402
from torchext.models.gemma3 import RMSNorm  # noqa: E402

EPS = 1e-6
CALLS = 100
SHAPES = [(1, 640), (8, 640), (64, 640), (1, 1152), (1, 2560), (1, 4096)]


def measure(rows: int, k: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(rows * 7919 + k)
    y = torch.randn(rows, k, device="cuda", generator=g).to(dtype)
    h = (torch.randn(rows, k, device="cuda", generator=g) * 30).to(dtype)
    post = RMSNorm(1 + 0.1 * torch.randn(k, device="cuda", generator=g), EPS)
    pre = RMSNorm(1 + 0.1 * torch.randn(k, device="cuda", generator=g), EPS)
    post_add = torch.compile(lambda y, h: h + post(y), fullgraph=True, dynamic=False)
    plain_add = torch.compile(lambda y, h: h + y, fullgraph=True, dynamic=False)
    calls = {
        "fused_post_norm": lambda i: torchext.add_rms_norm_quantize_q8_1(y, h, pre.weight, EPS, x_weight=post.weight),
        "unfused_post_norm": lambda i: torchext.rms_norm_quantize_q8_1(post_add(y, h), pre.weight, EPS),
        "fused_add": lambda i: torchext.add_rms_norm_quantize_q8_1(y, h, pre.weight, EPS),
        "unfused_add": lambda i: torchext.rms_norm_quantize_q8_1(plain_add(y, h), pre.weight, EPS),
        "rms_norm_quantize_q8_1": lambda i: torchext.rms_norm_quantize_q8_1(h, pre.weight, EPS),
        "quantize_q8_1": lambda i: torchext.quantize_q8_1(h),
    }
    row = {"rows": rows, "k": k}
    return time_calls(calls, CALLS, row)


def main() -> None:
    rows = latency_bench(__doc__, "norms", lambda dtype: [measure(r, k, dtype) for r, k in SHAPES], CALLS)
    names = ["fused_post_norm", "unfused_post_norm", "fused_add", "unfused_add", "rms_norm_quantize_q8_1",
             "quantize_q8_1"]
    print(f"{'rows x k':>10} " + " ".join(f"{n:>22}" for n in names))
    for r in rows:
        print(f"{r['rows']:>4} x {r['k']:<4} " + " ".join(f"{r[n]:22.2f}" for n in names))


if __name__ == "__main__":
    main()
