"""Parity and speed of the basic ops on the device present, every weight format: `python -m torchext.report`
(qmatmul, dequantize, embedding, q4k_q8_gemv, the GELUs, quantize_q8_1 and quantize; the fused decoder ops,
the expert-indexed matmul and attention have their own benchmarks in bench/).

Parity is against independent references (gguf's numpy dequantization with a float64 matmul,
torch.nn.functional.gelu, the activations themselves for quantize_q8_1); times are medians of
repeated calls (CUDA events on a GPU). For the careful, graph-timed, L2-cold figures see
bench/gemv.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import torchext
from torchext.cli import default_device, device_arg
from torchext.formats import SCALE_FIELDS, WEIGHT_TYPES, QType, put_scale_field, row_bytes


def random_weight(qtype: QType, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    """Random quantized bytes with small finite scales: every code path, no zeros."""
    bb = torchext.block_bytes(qtype)
    nb = row_bytes(qtype, k) // bb
    raw = gen.integers(0, 256, size=(n, nb, bb), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        put_scale_field(raw, qtype, off, (gen.standard_normal((n, nb)) * 0.01).astype(np.float16))
    return torch.from_numpy(raw.reshape(n, nb * bb))


def q8_1_values(xq: torch.Tensor, k: int) -> torch.Tensor:
    """The values d * qs that Q8_1 bytes [..., bytes] stand for, [..., k] float32. A 36-byte block
    is a word holding d's fp32 bits (their low 13 bits replaced by sum(qs)) and 32 int8 qs."""
    blocks = xq.cpu().view(*xq.shape[:-1], -1, 36)
    d = (blocks[..., :4].contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    qs = blocks[..., 4:].contiguous().view(torch.int8).float()
    return (d * qs).flatten(-2)[..., :k]


def time_us(fn, device: torch.device, reps: int = 20) -> float:
    """Median microseconds of fn() over reps calls after one warm-up call: CUDA events on a GPU,
    perf_counter on the CPU."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main(argv=None) -> None:
    """Print the report for command-line arguments argv (default sys.argv[1:])."""
    parser = argparse.ArgumentParser(prog="python -m torchext.report", description=__doc__)
    parser.add_argument("--device", type=device_arg, default=default_device(),
                        help="cpu or cuda[:INDEX] (default: cuda where a GPU is visible and the library has CUDA "
                             "kernels)")
    args = parser.parse_args(argv)
    device = args.device
    gen = np.random.default_rng(0)
    n, k = (4096, 4096) if device.type == "cuda" else (512, 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torchext report on {name} (torch {torch.__version__}); weights {n}x{k}")
    print("rel. error: norm-relative against gguf's numpy dequantization and a float64 matmul (GEMV:")
    print("Q8_1 activation rounding), F.gelu in float64, the activations (quantize_q8_1: the 8-bit")
    print("rounding, d * qs against x) or the float weights (quantize: its error's norm over theirs).")
    print(f"{'op':<28}{'rows':>5}{'rel. error':>12}{'us/call':>11}{'GB/s':>9}")

    def row(op, rows, err, us, nbytes):
        print(f"{op:<28}{rows:>5}{err:>12.2e}{us:>11.1f}{nbytes / us / 1e3:>9.1f}")

    for qtype in WEIGHT_TYPES:
        w_cpu = random_weight(qtype, n, k, gen)
        dense = torch.from_numpy(gguf_dequantize(w_cpu.numpy(), GGMLQuantizationType(qtype.value)))
        dense = dense.reshape(n, -1)[:, :k].double()
        w = w_cpu.to(device)
        for rows in (1, 8, 64):
            x = torch.randn(rows, k, device=device)
            y = torchext.qmatmul(w, qtype, x, n, k).double().cpu()
            ref = x.double().cpu() @ dense.T
            err = ((y - ref).norm() / ref.norm()).item()
            us = time_us(lambda: torchext.qmatmul(w, qtype, x, n, k), device)
            row(f"qmatmul {qtype.name}", rows, err, us, w.numel() + x.numel() * 4 + rows * n * 4)
        y = torchext.dequantize(w, qtype, n, k).double().cpu()
        err = ((y - dense).norm() / dense.norm()).item()
        row(f"dequantize {qtype.name}", n, err, time_us(lambda: torchext.dequantize(w, qtype, n, k), device),
            w.numel() + n * k * 4)
        ids = torch.randint(0, n, (64,), device=device)
        y = torchext.embedding(w, qtype, ids, n, k).double().cpu()
        err = ((y - dense[ids.cpu()]).norm() / dense[ids.cpu()].norm()).item()
        row(f"embedding {qtype.name}", 64, err, time_us(lambda: torchext.embedding(w, qtype, ids, n, k), device),
            64 * (w.numel() // n + k * 4))
        if qtype == QType.Q4_K:  # the Q4_K op on activations quantized beforehand
            x = torch.randn(1, k, device=device)
            xq = torchext.quantize_q8_1(x)
            y = torchext.q4k_q8_gemv(w, xq, n, k).double().cpu()
            err = ((y - x.double().cpu() @ dense.T).norm() / (x.double().cpu() @ dense.T).norm()).item()
            row("q4k_q8_gemv", 1, err, time_us(lambda: torchext.q4k_q8_gemv(w, xq, n, k), device),
                w.numel() + xq.numel() + n * 4)

    x = torch.randn(1 << 22, device=device, dtype=torch.bfloat16)
    bias = torch.randn(1024, device=device, dtype=torch.bfloat16)
    for approx in ("none", "tanh"):
        y = torchext.gelu(x, approximate=approx)
        ref = F.gelu(x.double(), approximate=approx)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        row(f"gelu {approx} bf16", 1, err, time_us(lambda: torchext.gelu(x, approximate=approx), device), x.numel() * 4)
        y = torchext.bias_gelu(x.view(-1, 1024), bias, approximate=approx)
        ref = F.gelu(x.view(-1, 1024).double() + bias.double(), approximate=approx)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        row(f"bias_gelu {approx} bf16", 1, err,
            time_us(lambda: torchext.bias_gelu(x.view(-1, 1024), bias, approximate=approx), device), x.numel() * 4)
    z = torchext.gelu_(x.clone())
    ref = F.gelu(x.double())
    err = ((z.double() - ref).norm() / ref.norm()).item()
    # timed on z over and over: GELU of GELU of ..., the same work whatever the values
    row("gelu_ bf16 (in place)", 1, err, time_us(lambda: torchext.gelu_(z), device), x.numel() * 4)
    xf = torch.randn(64, 4096, device=device)
    back = q8_1_values(torchext.quantize_q8_1(xf), 4096).double()
    err = ((back - xf.double().cpu()).norm() / xf.double().cpu().norm()).item()
    row("quantize_q8_1 f32", 64, err, time_us(lambda: torchext.quantize_q8_1(xf), device),
        xf.numel() * 4 + xf.numel() // 32 * 36)
    wf = torch.randn(256, 4096)
    for qtype in (QType.Q4_K, QType.Q6_K, QType.Q8_0):
        wq = torchext.quantize(wf, qtype)
        back = torchext.dequantize(wq, qtype, 256, 4096)
        err = ((back - wf).norm() / wf.norm()).item()
        t = time_us(lambda: torchext.quantize(wf, qtype), torch.device("cpu"), 3)
        row(f"quantize {qtype.name} (CPU)", 256, err, t, wf.numel() * 4 + wq.numel())


if __name__ == "__main__":
    main()
