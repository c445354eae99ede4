"""Where the batch policy's paths cross: every path that can serve a row count, timed in one run.

    python bench/paths.py [--shapes 4096x14336 14336x4096] [--formats Q4_K Q8_0] [--rows 8 12 16 17 32 64 96 128 256]

Columns, µs per call (CUDA graph replays, L2 cold: weight copies rotated past 4x the L2, bf16
activations): `policy` qmatmul as shipped (the Q8_1 GEMVs up to 8 or 16 rows, then the tiled GEMM:
kernels/batch_policy.h), `exact` qmatmul(exact=True) (the tiled GEMM up to 64 rows, or 256 on compute
capability 9.0 where its Hopper kernel takes the weight; dense beyond),
`dense` dequantize + F.linear, `bf16` F.linear on a dense bf16 weight. bench/NOTES.md ("Where the
paths cross") has a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchext  # noqa: E402
from common import GraphTimer, l2_cache_bytes, plan_calls, plan_copies, random_quant_weight  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x14336", "14336x4096"], help="NxK")
    ap.add_argument("--formats", nargs="+", default=["Q4_K", "Q8_0"])
    ap.add_argument("--rows", nargs="+", type=int, default=[8, 12, 16, 17, 32, 64, 96, 128, 256])
    args = ap.parse_args()
    if not torch.cuda.is_available():  # it times CUDA graphs: without a GPU the first CUDA call raised a traceback
        sys.exit("bench/paths.py needs a CUDA device")
    timer, l2 = GraphTimer(warmup=2, replays=7), l2_cache_bytes(0)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def us(call, copies: int) -> float:
        return timer(call, plan_calls(copies, 20), {})[0]

    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        cb = plan_copies(n * k * 2, l2, max_copies=8)
        dense = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(cb)]
        for fmt in args.formats:
            c = plan_copies(n * torchext.row_bytes(fmt, k), l2, max_copies=16)
            w = random_quant_weight(fmt, n, k, c, "cuda", gen)
            print(f"{fmt} {n}x{k}, µs:  rows  policy   exact   dense    bf16", flush=True)
            for r in args.rows:
                x = torch.randn(r, k, device="cuda", generator=gen, dtype=torch.bfloat16)
                times = [us(lambda i: torchext.qmatmul(w[i % c], fmt, x, n, k), c),
                         us(lambda i: torchext.qmatmul(w[i % c], fmt, x, n, k, exact=True), c),
                         us(lambda i: F.linear(x, torchext.dequantize(w[i % c], fmt, n, k, torch.bfloat16)), c),
                         us(lambda i: F.linear(x, dense[i % cb]), cb)]
                print(f"{'':24s}{r:5d} " + " ".join(f"{t:7.1f}" for t in times), flush=True)
            del w
        del dense


if __name__ == "__main__":
    main()
