"""Gemma 3 270M (Q4_K_M GGUF) end to end: greedy batch-1 decode and 512-token prefill speed.

    python bench/gemma3.py --out DIR [--gguf PATH | --synthetic] [--tokens 128] [--prefill 512]

Decode: a static key/value cache and one decode step (forward + argmax + position increment)
compiled with torch.compile(mode="reduce-overhead", fullgraph=True), i.e. replayed as a CUDA graph;
tokens are fed back on the device, so the timed loop never waits on the host. tokens/s counts
`--tokens` generated tokens between two events after a warm-up run, as llama-bench's tg128 does.
Batched decode (`--batches`, default 8 32 64): the same compiled step over that many sequences at
once (every sequence at the same position), tokens/s counting every sequence's tokens.
Prefill: one forward pass over a `--prefill`-token prompt (eager and compiled), as pp512.
The per-token split (GEMV kernels, attention, the rest) and the kernel launches per token come
from torch.profiler's CUDA kernel times over the decode loop, each kernel counted from the later of
its start and the previous kernel's end (kernels overlap under programmatic dependent launch).
Weight memory is reported against the file and dense bf16.
--synthetic times a model of the same sizes and weight formats with random weights (synthetic_gemma3),
built on the GPU without the 241 MiB file: the same kernels on the same shapes, so the same speed,
and no text to print.
Writes DIR/gemma3.json and prints a summary. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py

from torchext.models.gemma3 import Gemma3, Gemma3Config, decode_step, gguf_path, load_gemma3  # noqa: E402

LLAMA_CPP = {"decode_tok_s": 957.0, "prefill_tok_s": (44_000.0, 63_000.0)}  # H100, llama-bench tg128 / pp512


# Gemma 3 270M's sizes as its GGUF metadata gives them, and the weight formats of its Q4_K_M file by
# tensor (blk.N.-prefixed ones for every layer N; attn_v and ffn_down alternate as the list says). eps is
# 1e-6 as the file stores it, in float32.
SIZES_270M = Gemma3Config(vocab_size=262144, hidden=640, layers=18, heads=4, kv_heads=1, head_dim=256, ffn=2048,
                          eps=9.999999974752427e-07, rope_base_global=1e6, sliding_window=512, context_length=32768)
Q4_K_M_FORMATS = {"token_embd.weight": "Q8_0", "attn_q.weight": "Q5_0", "attn_k.weight": "Q5_0",
                  "attn_output.weight": "Q4_K", "ffn_gate.weight": "Q5_0", "ffn_up.weight": "Q5_0"}
Q8_0_V_LAYERS = {0, 1, 4, 7, 10, 13, 15, 16, 17}  # the layers of the first format of each pair below
Q4_K_M_ALTERNATING = {"attn_v.weight": ("Q8_0", "Q5_0"), "ffn_down.weight": ("Q6_K", "Q4_K")}


def synthetic_gemma3(dtype: torch.dtype, max_seq_len: int, batch: int = 1, seed: int = 0,
                     device="cuda") -> tuple[Gemma3, dict]:
    """(model, stats) of Gemma 3 270M's sizes and Q4_K_M's formats with random weights on device: random
    quantized bytes with small positive scales (common.random_quant_weight) and norm weights near 1."""
    from common import random_quant_weight

    from torchext import WeightCache, row_bytes
    from torchext.models.gemma3 import weight_shapes

    cfg, gen, cache = SIZES_270M, torch.Generator(device=device).manual_seed(seed), WeightCache()
    for name, (n, k) in weight_shapes(cfg).items():
        if n == 1:  # a norm: Gemma's files hold 1 + w
            cache.put(name, 1 + 0.1 * torch.randn(k, device=device, generator=gen))
            continue
        parts = name.split(".")  # blk.N.attn_v.weight, token_embd.weight
        base = ".".join(parts[2:]) if parts[0] == "blk" else name
        if base in Q4_K_M_FORMATS:
            fmt = Q4_K_M_FORMATS[base]
        else:
            fmt = Q4_K_M_ALTERNATING[base][int(parts[1]) not in Q8_0_V_LAYERS]
        cache.put(name, random_quant_weight(fmt, n, k, 1, device, gen)[0], fmt, n, k)
    quantized = sum(e.n * row_bytes(e.qtype, e.k) for _, e in cache.items() if e.qtype is not None)  # before stacking
    model = Gemma3(cache, cfg, batch=batch, max_seq_len=max_seq_len, dtype=dtype, device=device)
    values = sum(n * k for n, k in weight_shapes(cfg).values())
    stats = {"load_s": 0.0, "pool_bytes": cache.total_bytes(), "file_bytes": quantized, "bf16_bytes": 2 * values,
             "params": values}
    return model, stats


def timed(fn, reps: int = 1) -> float:
    """Seconds per call of fn() between CUDA events (after the caller's warm-up)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def decode_loop(step, n: int, start_pos: int, batch: int = 1):
    token = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), start_pos, dtype=torch.long, device="cuda")

    def run():
        nonlocal token, pos
        t, p = token, pos
        for _ in range(n):
            t, p = (x.clone() for x in step(t, p))  # as generate(): graph outputs are overwritten by the next replay
    return run


# torchext's kernels by the family their name starts with, in this order (the norms' kernel also holds
# "quantize_q8_1").
TORCHEXT_KINDS = (("gemv", "gemv"), ("norm_quantize_q8_1", "norm_q8_1"), ("quantize_q8_1", "quantize_q8_1"),
                  ("rope_cache_write", "rope"), ("attention_span", "attention"), ("merge_spans", "attention"))
KINDS = tuple(dict.fromkeys(kind for _, kind in TORCHEXT_KINDS)) + ("torchext_other", "other")


def kernel_kind(key: str) -> str:
    """A kernel's family: torchext's by TORCHEXT_KINDS; cuBLAS/cutlass/flash kernels are attention's (a
    prompt's SDPA: all weight matmuls are torchext's); inductor's fused kernels are "other"."""
    k = key.lower()
    if "torchext" in k:
        return next((kind for part, kind in TORCHEXT_KINDS if part in k), "torchext_other")
    if "triton" not in k and any(s in k for s in ("gemv", "gemm", "xmma", "cutlass", "fmha", "flash", "sdpa")):
        return "attention"
    return "other"


def attribute_stream_time(kernels: list[tuple[float, float, str]]) -> list[tuple[str, float]]:
    """(start, end, name) of one stream's kernels -> (name, us) with each kernel's time counted from
    the later of its start and the end of every kernel before it. With programmatic dependent launch a
    kernel starts while the one before still runs and then waits for it, so the kernels' own spans
    overlap and add up to more than the stream was busy; these times add up to the busy time."""
    out, frontier = [], float("-inf")
    for start, end, name in sorted(kernels):
        out.append((name, max(0.0, end - max(start, frontier))))
        frontier = max(frontier, end)
    return out


def kernel_split(step, n: int, start_pos: int, batch: int = 1) -> dict:
    """Per-token CUDA kernel time (us) by kind, from torch.profiler over n decode steps of `batch`
    sequences: each kernel's time on the stream's critical path (attribute_stream_time), and the
    launches per step ("per token": a step's)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run = decode_loop(step, n, start_pos, batch)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
               and not e.name.startswith(("ProfilerStep", "cudaGraph"))]
    split = {kind: 0.0 for kind in KINDS}
    names: dict[str, list[float]] = {}  # kernel -> [us, launches] per token
    for name, us in attribute_stream_time(kernels):
        split[kernel_kind(name)] += us / n
        entry = names.setdefault(name[:90], [0.0, 0.0])
        entry[0] += us / n
        entry[1] += 1 / n
    split["busy_us_per_token"] = sum(us for us, _ in names.values())
    split["kernels_per_token"] = sum(launches for _, launches in names.values())
    split["top_kernels_us_launches_per_token"] = dict(sorted(names.items(), key=lambda kv: -kv[1][0])[:30])
    return split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the gemma3 package's)")
    ap.add_argument("--synthetic", action="store_true", help="random weights of the file's sizes and formats")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32, 64], help="batched decode sizes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gemma3.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    max_len = args.prefill + args.tokens + 8
    if args.synthetic:
        (model, stats), tok = synthetic_gemma3(dtype, max_len), None
    else:
        model, tok, stats = load_gemma3(args.gguf or gguf_path(), device="cuda", dtype=dtype, max_seq_len=max_len)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "dtype": args.dtype, "synthetic": args.synthetic, "load": stats, "llama_cpp_h100": LLAMA_CPP,
                 "gpu_weight_bytes_allocated": torch.cuda.memory_allocated()}

    with torch.no_grad():
        # prefill: eager, then compiled into a CUDA graph (one prompt length)
        prompt = torch.randint(1000, 200_000, (1, args.prefill), device="cuda")
        positions = torch.arange(args.prefill, device="cuda")
        for name, fn in (("eager", model), ("compiled", torch.compile(model, mode="reduce-overhead", fullgraph=True))):
            fn(prompt, positions)
            fn(prompt, positions)
            s = timed(lambda: fn(prompt, positions), reps=5)
            res[f"prefill_{name}_ms"] = s * 1e3
            res[f"prefill_{name}_tok_s"] = args.prefill / s

        # decode, batch 1: as tg128, --tokens tokens from an empty context with a cache of that
        # length; then the same after the --prefill prompt (attention over a longer cache)
        tg = model.with_max_seq_len(args.tokens + 8)
        run = decode_loop(decode_step(tg), 16, 0)
        run()
        res["decode_eager_tok_s"] = 16 / timed(run)
        for name, m, start in (("decode", tg, 0), (f"decode_after_{args.prefill}", model, args.prefill)):
            t0 = time.perf_counter()
            step = torch.compile(decode_step(m), mode="reduce-overhead", fullgraph=True)
            run = decode_loop(step, args.tokens, start)
            run()
            res[f"{name}_compile_s"] = time.perf_counter() - t0
            run()
            res[f"{name}_tok_s"] = args.tokens / timed(run)
            res[f"{name}_us_per_token"] = 1e6 / res[f"{name}_tok_s"]
            res[f"{name}_split_us_per_token"] = kernel_split(step, 32, start)

        # batched decode: B sequences a step, from an empty context
        for b in args.batches:
            batched = Gemma3(model.weights, model.cfg, batch=b, max_seq_len=args.tokens + 8, dtype=dtype, device="cuda")
            step_b = torch.compile(decode_step(batched), mode="reduce-overhead", fullgraph=True)
            run = decode_loop(step_b, args.tokens, 0, batch=b)
            run()
            run()
            res[f"decode_batch{b}_tok_s"] = b * args.tokens / timed(run)
            del batched, step_b, run

        # the text, as a sanity check of what was timed
        if tok is not None:
            from torchext.models.gemma3 import generate
            ids = tok.encode("The three primary colors are")
            res["sample"] = tok.decode(generate(model, ids, 24, step=step))  # step: the 512-context model's

    (args.out / "gemma3.json").write_text(json.dumps(res, indent=1))
    mb = 2**20
    print(f"{res['gpu']}, torch {res['torch']}, CUDA {res['cuda']}, activations {args.dtype}")
    print(f"weights{' (synthetic)' if args.synthetic else ''}: pool {stats['pool_bytes'] / mb:.1f} MiB on the GPU "
          f"(file {stats['file_bytes'] / mb:.1f} MiB, "
          f"dense bf16 {stats['bf16_bytes'] / mb:.1f} MiB), loaded in {stats['load_s']:.1f} s")
    print(f"decode ({args.tokens} tokens from an empty context, as tg{args.tokens}): {res['decode_tok_s']:.0f} tok/s "
          f"({res['decode_us_per_token']:.0f} us/token; eager {res['decode_eager_tok_s']:.0f} tok/s; "
          f"llama.cpp tg128 {LLAMA_CPP['decode_tok_s']:.0f})")
    after = f"decode_after_{args.prefill}"
    print(f"decode after a {args.prefill}-token prompt: {res[after + '_tok_s']:.0f} tok/s "
          f"({res[after + '_us_per_token']:.0f} us/token)")
    for name in ("decode", after):
        split = res[f"{name}_split_us_per_token"]
        print(f"  {name}, per token, us: "
              + ", ".join(f"{k} {v:.1f}" for k, v in split.items() if isinstance(v, float)))
    print("  decode's kernels by time, per token (us, launches):")
    for kernel, (us, calls) in res["decode_split_us_per_token"]["top_kernels_us_launches_per_token"].items():
        print(f"    {us:6.1f} {calls:5.1f}  {kernel}")
    if args.batches:
        print("batched decode, tok/s (all sequences): " +
              ", ".join(f"batch {b} {res[f'decode_batch{b}_tok_s']:.0f}" for b in args.batches))
    print(f"prefill {args.prefill}: compiled {res['prefill_compiled_tok_s']:.0f} tok/s "
          f"({res['prefill_compiled_ms']:.2f} ms), eager {res['prefill_eager_tok_s']:.0f} tok/s; "
          f"llama.cpp {LLAMA_CPP['prefill_tok_s'][0]:.0f}-{LLAMA_CPP['prefill_tok_s'][1]:.0f}")
    print(f"sample: {res['sample']!r}" if "sample" in res else "sample: none (synthetic weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
