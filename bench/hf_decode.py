"""Decode speed through transformers: generate() on torchext's packed layers (torchext.hf.from_gguf)
against the same model dequantized to bf16 by transformers' own GGUF loader, and against torchext's
hand-written Gemma 3 (bench/gemma3.py's compiled decode step), on one GGUF file.

    python bench/hf_decode.py [--gguf PATH] [--tokens 128] [--out DIR]

generate() runs as a user would call it: greedy, a static key/value cache (StaticCache, made once
and reset between calls so every call has the same shapes), which on CUDA makes transformers compile
the forward pass (torch.compile, mode "reduce-overhead": CUDA graphs). Decode tokens/s is
(tokens - 1) / (time of a `--tokens` call - time of a 1-token call): the prompt's prefill and the
first token cancel, as llama-bench's tg counts decode steps only. Each time is the best of three
calls after two warm-up calls (which compile). Activations are bf16 in all three models.
Writes DIR/hf_decode.json and prints a table. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate_decode_tok_s(model, prompt: torch.Tensor, tokens: int) -> float:
    """Decode tokens/s of model.generate() (module docstring), batch 1."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens + 8)

    def call(n: int) -> float:
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t0

    for n in (tokens, 1):
        call(n), call(n)  # compiles (the prefill and the decode shapes)
    full = min(call(tokens) for _ in range(3))
    one = min(call(1) for _ in range(3))
    return (tokens - 1) / (full - one)


def handwritten_decode_tok_s(path: Path, tokens: int) -> float:
    """The hand-written Gemma 3's compiled decode step, as bench/gemma3.py times it (bf16)."""
    from gemma3 import decode_loop, timed
    from torchext.models.gemma3 import decode_step, load_gemma3

    model, _, _ = load_gemma3(path, device="cuda", dtype=torch.bfloat16, max_seq_len=tokens + 8)
    step = torch.compile(decode_step(model), mode="reduce-overhead", fullgraph=True)
    run = decode_loop(step, tokens, 0)
    run(), run()
    return tokens / min(timed(run) for _ in range(3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="a GGUF file (default: Gemma 3 270M Q4_K_M)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/hf_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    from torchext import hf
    from torchext.gguf_file import GGUFFile

    if args.gguf is None:
        from torchext.models.gemma3 import gguf_path
        args.gguf = gguf_path()
    path = args.gguf.resolve()
    prompt = torch.randint(1000, 100_000, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "file": path.name, "tokens": args.tokens}
    with torch.no_grad():
        ours = hf.from_gguf(path, device="cuda", dtype=torch.bfloat16)
        res["transformers_torchext_tok_s"] = generate_decode_tok_s(ours, prompt, args.tokens)
        res["torchext_weight_bytes"] = torch.cuda.memory_allocated()
        del ours
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        dense = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.bfloat16).cuda().eval()
        res["transformers_bf16_tok_s"] = generate_decode_tok_s(dense, prompt, args.tokens)
        res["bf16_weight_bytes"] = torch.cuda.memory_allocated()
        del dense
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        with GGUFFile(path) as g:
            architecture = g.string_value("general.architecture")
        if architecture == "gemma3":
            res["handwritten_tok_s"] = handwritten_decode_tok_s(path, args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_decode.json").write_text(json.dumps(res, indent=1))
    ref = res.get("handwritten_tok_s")
    print(f"{res['gpu']}, torch {res['torch']}, transformers {res['transformers']}, {path.name}, "
          f"decode of {args.tokens} tokens, batch 1, bf16 activations")
    for label, key in (("transformers generate() on torchext", "transformers_torchext_tok_s"),
                       ("transformers generate(), dense bf16", "transformers_bf16_tok_s"),
                       ("torchext hand-written Gemma 3", "handwritten_tok_s")):
        if key in res:
            ratio = f"  ({res[key] / ref:.2f}x the hand-written)" if ref else ""
            print(f"  {label:40s} {res[key]:8.0f} tok/s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
