"""Flux's linear layers at 4096 image tokens: diffusers' GGUF path, torchext, and bf16, in one run.

    python bench/diffusers_linear.py                 # CUDA: Flux's shapes, Q4_K and Q8_0, bf16 activations
    python bench/diffusers_linear.py --formats Q4_K Q5_K Q6_K Q8_0 --tokens 4096 --csv flux.csv
    python bench/diffusers_linear.py --dry-run       # no GPU: tiny shapes on the CPU, fake timings

Per shape N x K (out x in features: 3072x3072 attention projections, 12288x3072 MLP up,
3072x12288 MLP down) and weight format, three layers with a bias on the same [tokens, K] bf16
activations, computing the same function:

- `diffusers`: diffusers' GGUFLinear (compute_dtype bf16) over a GGUFParameter, the layer
  from_single_file(..., quantization_config=GGUFQuantizationConfig(...)) builds: its forward
  dequantizes the whole weight with torch ops on every call, then F.linear;
- `torchext`: the same layer after torchext.diffusers.convert_gguf_linears (GGUFQuantLinear:
  torchext.qmatmul on the same bytes);
- `bf16`: F.linear with the dequantized weight as a dense bf16 tensor.

Weights are random bytes with small positive fp16 scales (bench/common.py's random_quant_weight).
Before timing, each quantized layer's output is compared with bf16's (norm-relative error, in the table).
Timing: bench/common.py's GraphTimer (median of CUDA-graph replays between events; a layer that
cannot be captured, such as diffusers' dequantization, which copies small index tensors from the
host, is timed eagerly and the table says so) over enough weight copies that they exceed 4x L2
(L2 cold). The table gives microseconds per call and time / bf16's time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diffusers  # noqa: E402
import gguf  # noqa: E402
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter  # noqa: E402

import common  # noqa: E402
import torchext  # noqa: E402
from common import fmt_us, new_row, plan_calls, plan_copies, render, short_error  # noqa: E402
from torchext.diffusers import convert_gguf_linears  # noqa: E402

FLUX_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288)]  # (N, K): attention, MLP up, MLP down
FLUX_TOKENS = 4096  # a 1024x1024 image: 64x64 latent patches
LABELS = ["bf16", "diffusers", "torchext"]


def make_layers(fmt: str, n: int, k: int, copies: int, device, gen) -> dict:
    """label -> `copies` callables on x (layers over independent weight copies), and the dense
    bf16 weights they all compute with."""
    raw = common.random_quant_weight(fmt, n, k, copies, device, gen)
    bias = torch.randn(n, device=device, generator=gen).to(torch.bfloat16)
    diffusers_layers = []
    for c in range(copies):
        layer = GGUFLinear(k, n, bias=True, compute_dtype=torch.bfloat16, device="meta")
        layer.weight = GGUFParameter(raw[c], quant_type=gguf.GGMLQuantizationType[fmt])
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        diffusers_layers.append(layer)
    dense = [torchext.dequantize(raw[c], fmt, n, k, torch.bfloat16) for c in range(copies)]
    converted = torch.nn.ModuleList(diffusers_layers)
    convert_gguf_linears(converted)  # replaces the list's entries; diffusers_layers keeps the originals
    return {"bf16": [lambda x, w=w: F.linear(x, w, bias) for w in dense],
            "diffusers": diffusers_layers, "torchext": list(converted)}


def measure(args, device, timer) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    l2 = common.l2_cache_bytes(device) if device.type == "cuda" else common.L2_FALLBACK_BYTES
    rows = []
    for n, k in args.shapes:
        x = torch.randn(args.tokens, k, device=device, generator=gen).to(torch.bfloat16)
        for fmt in args.formats:
            weight_bytes = n * torchext.row_bytes(fmt, k)
            copies = 2 if args.dry_run else plan_copies(weight_bytes + n * k * 2, l2)
            calls = plan_calls(copies, args.repeat)
            try:
                layers = make_layers(fmt, n, k, copies, device, gen)
            except Exception as e:  # noqa: BLE001  (one format's failure does not stop the others)
                rows += [new_row(label=lb, format=fmt, N=n, K=k, batch=args.tokens, rel_err="",
                                 error=short_error(e)) for lb in LABELS]
                continue
            with torch.no_grad():
                want = layers["bf16"][0](x).float()
                for label in LABELS:
                    row = new_row(section="diffusers", label=label, rel_err="", format=fmt, dtype="bf16", N=n, K=k,
                                  batch=args.tokens, l2="cold", copies=copies, calls=calls,
                                  bytes=(n * k * 2 if label == "bf16" else weight_bytes) + 2 * args.tokens * (n + k))
                    fns = layers[label]
                    try:
                        got = fns[0](x).float()
                        row["rel_err"] = ((got - want).norm() / want.norm()).item()
                        us, method, note = timer(lambda i: fns[i % copies](x), calls, row)
                        row.update(us=us, method=method, note=note)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = short_error(e)
                    rows.append(row)
            del layers
            print(f"{n}x{k} {fmt}: " + ", ".join(f"{r['label']} {fmt_us(r['us'])} us" for r in rows[-3:]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per shape and format: microseconds per call and time / bf16's time of each layer,
    the quantized layers' error against bf16 and how each was timed (g: CUDA graph, e: eagerly, f: fake)."""
    quantized = LABELS[1:]
    header = (["N x K", "format"] + [f"{lb} us" for lb in LABELS] + [f"{lb} / bf16" for lb in quantized]
              + [f"{lb} err" for lb in quantized] + ["timed", "notes"])
    body = []
    for n, k, fmt in dict.fromkeys((r["N"], r["K"], r["format"]) for r in rows):
        by = {r["label"]: r for r in rows if (r["N"], r["K"], r["format"]) == (n, k, fmt)}
        bf16 = by["bf16"]["us"] or None
        ratios = [f"{by[lb]['us'] / bf16:.2f}" if bf16 and by[lb]["us"] else "-" for lb in quantized]
        errors = [f"{by[lb]['rel_err']:.1e}" if by[lb]["rel_err"] != "" else "-" for lb in quantized]
        timed = "/".join((by[lb]["method"] or "-")[0] for lb in LABELS)
        notes = "; ".join(f"{lb}: {by[lb]['error'] or by[lb]['note']}" for lb in LABELS
                          if by[lb]["error"] or by[lb]["note"])
        body.append([f"{n}x{k}", fmt] + [common.cell(by[lb]) for lb in LABELS] + ratios + errors + [timed, notes])
    return render(header, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", nargs="+", default=["Q4_K", "Q8_0"], help="GGUF weight formats (default Q4_K Q8_0)")
    p.add_argument("--tokens", type=int, default=FLUX_TOKENS, help=f"activation rows (default {FLUX_TOKENS})")
    p.add_argument("--repeat", type=int, default=10, help="calls per captured graph (at least; whole passes)")
    p.add_argument("--warmup", type=int, default=2, help="graph replays before timing")
    p.add_argument("--replays", type=int, default=7, help="timed replays (median)")
    p.add_argument("--csv", type=Path, help="also write every row (errors included) to this CSV file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes on the CPU, fake timings")
    args = p.parse_args(argv)
    args.formats = [f.upper() for f in args.formats]
    if args.dry_run:
        device, timer = torch.device("cpu"), common.FakeTimer()
        args.shapes, args.tokens = [(256, 256), (1024, 256), (256, 1024)], min(args.tokens, 32)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or use --dry-run", file=sys.stderr)
            return 2
        device, timer = torch.device("cuda", torch.cuda.current_device()), common.GraphTimer(args.warmup,
                                                                                               args.replays)
        args.shapes = FLUX_SHAPES
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"none (dry run on {platform.machine()}, fake timings)")
    print(f"GPU: {where}\ntorch {torch.__version__}, diffusers {diffusers.__version__}, torchext from "
          f"{Path(torchext.__file__).parent}; {args.tokens} tokens, bf16 activations, L2 cold", flush=True)
    rows = measure(args, device, timer)
    print("\n" + table(rows))
    if args.csv:
        common.write_csv(args.csv, [{k: v for k, v in r.items() if k in common.CSV_FIELDS} for r in rows])
    failed = [r for r in rows if r["error"]]
    return 1 if args.dry_run and failed else 0


if __name__ == "__main__":
    sys.exit(main())
