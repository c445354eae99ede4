"""Gemma 3 270M decode with each fused decode op against the ops it replaces, in one process.

    python bench/gemma3_fusions.py [--tokens 128] [--start 0 512] [--rounds 1] [--batch 1] [--synthetic]

The model's decode step calls cached_attention_quantize_q8_1 (the attention writes the output
projection's Q8_1 input) and QuantLinear.forward_gated_gelu (gated_gelu_qmatmul: at one row the down
projection's GEMV quantizes gelu(gate) * up itself; from two rows, where the k-quants take the MMA
GEMV, gated_gelu_quantize_q8_1 and the GEMV). Each variant puts one or both back to the unfused pair of
ops (the same bytes, one launch more a layer each), or the MLP to its composition (torchext.gelu, the
product, then the down layer: qmatmul's quantize_q8_1 and GEMV; the same bytes again), compiles the
decode step as bench/gemma3.py does (torch.compile, reduce-overhead: a CUDA graph) and times --tokens
steps of --batch sequences from each start position, twice, and counts its kernels a step (36 more
with both unfused). Variants run in turn in one process, --rounds times, so that they share the GPU's
state; the printed spread is what separates them from noise. bf16 activations. --synthetic: random
weights of the file's sizes and formats (bench/gemma3.py's synthetic_gemma3), no file needed. Never
asserts on a timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gemma3 import decode_loop, kernel_split, synthetic_gemma3, timed  # noqa: E402
from torchext import ops  # noqa: E402
from torchext.models.gemma3 import decode_step, gguf_path, load_gemma3  # noqa: E402
from torchext.nn import QuantLinear  # noqa: E402

FUSED_ATTENTION = ops.cached_attention_quantize_q8_1
FUSED_MLP = QuantLinear.forward_gated_gelu


def unfused_attention(q, k_cache, v_cache, pos, scale, window=0):
    """cached_attention, then quantize_q8_1 of its output as the projection reads it."""
    o = ops.cached_attention(q, k_cache, v_cache, pos, scale, window)
    b, h, t, d = o.shape
    return ops.quantize_q8_1(o.transpose(1, 2).reshape(b, t, h * d))


def unfused_mlp(self, gate, up, approximate="tanh"):
    """gated_gelu_quantize_q8_1, then the layer's GEMV on its bytes."""
    return self.forward_q8_1(ops.gated_gelu_quantize_q8_1(gate, up, approximate), gate.dtype)


def composed_mlp(self, gate, up, approximate="tanh"):
    """The down layer on torchext.gelu(gate) * up, as a model without the gated ops computes it."""
    return self(ops.gelu(gate, approximate) * up)


VARIANTS = {"fused": (FUSED_ATTENTION, FUSED_MLP), "attention unfused": (unfused_attention, FUSED_MLP),
            "MLP unfused": (FUSED_ATTENTION, unfused_mlp), "both unfused": (unfused_attention, unfused_mlp),
            "MLP composed": (FUSED_ATTENTION, composed_mlp)}


def use(variant: str) -> None:
    """Points the model's calls (resolved at trace time) at the variant's functions."""
    ops.cached_attention_quantize_q8_1, QuantLinear.forward_gated_gelu = VARIANTS[variant]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="tokens a timed decode loop")
    ap.add_argument("--start", type=int, nargs="+", default=[0, 512], help="start positions of the loops")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the variants")
    ap.add_argument("--batch", type=int, default=1, help="sequences a decode step")
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the gemma3 package's)")
    ap.add_argument("--synthetic", action="store_true", help="random weights of the file's sizes and formats")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gemma3_fusions.py needs a CUDA GPU", file=sys.stderr)
        return 2
    max_len = max(args.start) + args.tokens + 8
    if args.synthetic:
        model, _ = synthetic_gemma3(torch.bfloat16, max_len, batch=args.batch)
    else:
        model, _, _ = load_gemma3(args.gguf or gguf_path(), device="cuda", dtype=torch.bfloat16, batch=args.batch,
                                  max_seq_len=max_len)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tok/s (all {args.batch} sequences) over "
          f"{args.tokens} steps, two loops from each start position {args.start}")
    results: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    use(variant)
                    torch._dynamo.reset()
                    step = torch.compile(decode_step(model), mode="reduce-overhead", fullgraph=True)
                    line = []
                    for start in args.start:
                        run = decode_loop(step, args.tokens, start, args.batch)
                        run()
                        tok_s = [args.batch * args.tokens / timed(run) for _ in range(2)]
                        results.setdefault(f"{variant} @{start}", []).extend(tok_s)
                        line.append(f"@{start}: " + " ".join(f"{t:.0f}" for t in tok_s))
                    # the kernels a step: that the variant took effect
                    kernels = kernel_split(step, 8, args.start[0], args.batch)["kernels_per_token"]
                    print(f"{variant:18s} {kernels:5.0f} kernels/step   " + "   ".join(line), flush=True)
                    del step, run
    finally:
        use("fused")
    print("median (min-max) tok/s:")
    for name, values in results.items():
        values = sorted(values)
        print(f"  {name:24s} {values[len(values) // 2]:.0f} ({values[0]:.0f}-{values[-1]:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
