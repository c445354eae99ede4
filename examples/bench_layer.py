"""Time one quantized layer against the dense layer it replaces.

    python examples/bench_layer.py [--n 2048] [--k 2048] [--format Q4_K] [--batches 1 8 64] [--reps 20]

For each batch size: microseconds per call of torchext.qmatmul on the quantized bytes (whichever path
its batch policy picks: the Q8_1 GEMVs for few rows, then the tiled GEMM on a GPU, then the dense path;
torchext.ops.gemv_max_rows says where the GEMVs stop) and of torch.nn.functional.linear on the dense weight
(float32 on the CPU, bfloat16 on a GPU), and the weight bytes each reads. Times are medians of
--reps calls after a warm-up call, with CUDA events on a GPU; a quick look, not bench/gemv.py's
careful L2-cold, graph-timed measurement.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torchext
from torchext.formats import QUANTIZABLE_TYPES, whole_blocks_error
from torchext.cli import default_device
from torchext.report import time_us


def main(argv=None) -> None:
    """Run the benchmark with command-line arguments argv (default sys.argv[1:])."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="output features (weight rows)")
    ap.add_argument("--k", type=int, default=2048, help="input features (row length)")
    # torchext.quantize makes these (the grid IQ formats but IQ3_S come from files only): any other name was a traceback
    formats = [q.name for q in QUANTIZABLE_TYPES]
    ap.add_argument("--format", default="Q4_K", type=str.upper, choices=formats, metavar="FORMAT",
                    help=f"one of {', '.join(formats)} (default Q4_K)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per figure (at least 1)")
    args = ap.parse_args(argv)
    for name in ("n", "k", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected at least 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        ap.error(f"--batches: expected sizes of at least 1, got {args.batches}")
    if (problem := whole_blocks_error(torchext.QType.of(args.format), args.k, "--k")) is not None:
        ap.error(f"{problem}, got {args.k}")
    device = torch.device(default_device())  # the CPU also where the library was built without CUDA kernels
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    qtype = torchext.QType.of(args.format)
    dense = torch.randn(args.n, args.k) * 0.02
    w = torchext.quantize(dense, qtype).to(device)  # llama.cpp's bytes, [n, row bytes]
    dense = dense.to(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.n}x{args.k} layer on {name}: {args.format} {w.numel() / 2**20:.2f} MiB, "
          f"dense {dtype} {dense.numel() * dense.element_size() / 2**20:.2f} MiB")
    print(f"{'batch':>5} {'torchext us':>12} {'F.linear us':>12} {'speed-up':>9}")
    for b in args.batches:
        x = torch.randn(b, args.k, device=device, dtype=dtype)
        ours = time_us(lambda x=x: torchext.qmatmul(w, qtype, x, args.n, args.k), device, args.reps)
        theirs = time_us(lambda x=x: F.linear(x, dense), device, args.reps)
        print(f"{b:>5} {ours:>12.1f} {theirs:>12.1f} {theirs / ours:>8.2f}x")


if __name__ == "__main__":
    main()
