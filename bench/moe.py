"""torchext mixture-of-experts benchmark: qmatmul_id (the expert-indexed quantized matmul) at real MoE
shapes against the dense bf16 alternative in the same run, kernel time from CUDA events over CUDA-graph
replays, L2 cold (rotating weight copies and ids) and warm.

    python bench/moe.py --out DIR [--models qwen3_30b_a3b gpt_oss_20b] [--batches 1 8 64 512] [--l2 both]
    python bench/moe.py --out DIR --dry-run    # no GPU: tiny shapes on the CPU, fake timings

Per model, projection and batch T (tokens, each routed to top_k of E experts by random distinct ids):
  up    x [T, H] -> [T, top_k, I]   (gate has the same shape)
  down  x [T, top_k, I] -> [T, top_k, H]   (a row per slot)
and per label:
  Q4_K, Q8_0, ...    torchext.qmatmul_id on the format's [E, N, K] bytes
  bf16 grouped_mm    the dense, sync-free PyTorch path: slots sorted by expert (argsort), counts by
                     scatter_add, their rows gathered, torch._grouped_mm over bf16 [E, K, N] experts,
                     results scattered back; what torchtitan-style MoE code runs
  bf16 gather+bmm    each slot's bf16 expert gathered ([S, N, K]) and one bmm: reads an expert once per
                     slot, not once per call (batches up to 8 only: S x N x K x 2 bytes)
The dense baselines run only where they run (torch._grouped_mm: bf16 on sm_90/sm_100); a failure is a
CSV row with its error, as every failure here.

Writes DIR/moe.csv (every row) and DIR/summary.txt (the table printed at the end). Columns: us per
call; bytes = the weight bytes of the experts the call's ids select (mean over the rotated id sets)
+ activations + outputs; GB/s = bytes / time; x_dense = the best dense baseline's time / this time
(same model, projection, T, L2 mode). Never asserts on a timing.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from common import short_error  # noqa: E402


@dataclass(frozen=True)
class Model:
    name: str
    experts: int
    top_k: int
    hidden: int        # H
    intermediate: int  # I, per expert
    formats: tuple[str, ...]


def models(dry_run: bool) -> dict[str, Model]:
    import torchext

    names = {q.name for q in torchext.formats.WEIGHT_TYPES}
    # gpt-oss ships its experts in MXFP4 (beside Q4_K, for comparison with the other shape); a build
    # without that format runs the shape with Q4_K and Q8_0 (the summary says which)
    gpt_oss = ("MXFP4", "Q4_K") if "MXFP4" in names else ("Q4_K", "Q8_0")
    if dry_run:
        return {"qwen3_30b_a3b": Model("qwen3_30b_a3b", 8, 2, 256, 128, ("Q4_K", "Q8_0")),
                "gpt_oss_20b": Model("gpt_oss_20b", 4, 2, 160, 160, gpt_oss)}
    return {"qwen3_30b_a3b": Model("qwen3_30b_a3b", 128, 8, 2048, 768, ("Q4_K", "Q8_0")),
            "gpt_oss_20b": Model("gpt_oss_20b", 32, 4, 2880, 2880, gpt_oss)}


PROJECTIONS = {"up": lambda m: (m.intermediate, m.hidden, False), "down": lambda m: (m.hidden, m.intermediate, True)}
BATCHES = [1, 8, 64, 512]
GATHER_MAX_TOKENS = 8
FIELDS = ["section", "label", "op", "model", "proj", "format", "E", "top_k", "N", "K", "batch", "l2", "us", "bytes",
          "gbps", "x_dense", "calls", "copies", "footprint_mb", "method", "note", "error"]


def new_row(**kw) -> dict:
    row = {f: "" for f in FIELDS}
    row.update(kw)
    return row


# ---- operands -------------------------------------------------------------------------------------

def routed_ids(tokens: int, m: Model, sets: int, device, gen) -> torch.Tensor:
    """[sets, T, top_k] int64: per token top_k distinct experts, uniformly at random."""
    scores = torch.rand((sets, tokens, m.experts), device=device, generator=gen)
    return scores.topk(m.top_k, dim=-1).indices.contiguous()


def selected_bytes(ids: torch.Tensor, expert_bytes: int) -> float:
    """Mean over the id sets of the bytes of the experts they select (each read once)."""
    distinct = [len(torch.unique(s)) for s in ids.reshape(ids.shape[0], -1).cpu()]
    return sum(distinct) / len(distinct) * expert_bytes


def dense_weights(m: Model, n: int, k: int, copies: int, device, gen) -> torch.Tensor:
    """bf16 experts [copies, E, K, N] (grouped_mm's layout: K before N, as x @ W^T)."""
    w = torch.randn((copies, m.experts, n, k), dtype=torch.bfloat16, device=device, generator=gen).mul_(0.02)
    return w.transpose(-1, -2)


def grouped_mm_call(w, x, ids, m: Model, per_slot: bool):
    """The dense path, free of host syncs: sort the slots by expert, gather, one grouped GEMM, scatter."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(m.experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    rows = x.reshape(-1, x.shape[-1])[order if per_slot else order // m.top_k]
    y = torch._grouped_mm(rows, w, offs)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(*ids.shape, -1)


def gather_bmm_call(w, x, ids, m: Model, per_slot: bool):
    rows = x.reshape(-1, x.shape[-1]) if per_slot else x.repeat_interleave(m.top_k, dim=0)
    wg = w[ids.reshape(-1)]  # [S, K, N]
    return torch.bmm(rows.unsqueeze(1), wg).view(*ids.shape, -1)


# ---- measuring ------------------------------------------------------------------------------------

class Ctx(common.Measurements):
    def copies(self, bytes_per_copy: int, mode: str) -> int:
        if mode == "warm":
            return 1
        # each call reads only the experts its ids select, so the pool of (copy, expert) pairs must
        # dwarf L2 for the selected ones to miss it: --l2-factor x L2 in all
        c = common.plan_copies(bytes_per_copy, self.l2, l2_factor=self.args.l2_factor,
                               mem_cap_bytes=self.args.mem_cap_gb * 1e9, max_copies=self.args.max_copies)
        return min(c, 2) if self.args.dry_run else c


def run_projection(ctx: Ctx, m: Model, proj: str, batches: list[int], modes: list[str]) -> None:
    import torchext

    n, k, per_slot = PROJECTIONS[proj](m)
    labels = list(m.formats) + ["bf16 grouped_mm", "bf16 gather+bmm"]
    for label in labels:
        dense = label.startswith("bf16")
        expert_bytes = n * k * 2 if dense else n * torchext.row_bytes(label, k)
        for mode in modes:
            copies = ctx.copies(m.experts * expert_bytes, mode)
            todo = [b for b in batches if not (label == "bf16 gather+bmm" and b > GATHER_MAX_TOKENS)]
            rows = {b: new_row(section="moe", label=label, model=m.name, proj=proj, format="bf16" if dense else label,
                               E=m.experts, top_k=m.top_k, N=n, K=k, batch=b, l2=mode, copies=copies)
                    for b in todo}
            ctx.rows.extend(rows.values())
            try:
                w = (dense_weights(m, n, k, copies, ctx.device, ctx.gen) if dense else
                     common.random_quant_weight(label, m.experts * n, k, copies, ctx.device, ctx.gen)
                     .view(copies, m.experts, n, -1))
            except Exception as e:  # noqa: BLE001
                for row in rows.values():
                    ctx.fail(row, e)
                continue
            for b, row in rows.items():
                try:
                    sets = max(copies, ctx.args.id_sets if mode == "cold" else 1)
                    ids = routed_ids(b, m, sets, ctx.device, ctx.gen)
                    x_shape = (sets, b, m.top_k, k) if per_slot else (sets, b, k)
                    x = torch.randn(x_shape, dtype=torch.bfloat16, device=ctx.device, generator=ctx.gen)
                    if dense:
                        grouped = label == "bf16 grouped_mm"
                        fn = grouped_mm_call if grouped else gather_bmm_call
                        row["op"] = "torch._grouped_mm (sorted slots)" if grouped else "gather + torch.bmm"
                        call = (lambda i, fn=fn: fn(w[i % copies], x[i % sets], ids[i % sets], m, per_slot))
                    else:
                        row["op"] = "torchext.qmatmul_id"
                        qt = int(torchext.QType.of(label))
                        call = (lambda i: torch.ops.torchext.qmatmul_id(
                            w[i % copies], qt, x[i % sets], ids[i % sets], n, k, False))
                    gather = label == "bf16 gather+bmm"
                    weight = (b * m.top_k * expert_bytes if gather else selected_bytes(ids, expert_bytes))
                    row["bytes"] = round(weight + x[0].numel() * 2 + b * m.top_k * n * 2)
                    row["calls"] = common.plan_calls(sets, ctx.args.repeat)
                    row["footprint_mb"] = round((copies * m.experts * expert_bytes + x.numel() * 2) / 1e6, 1)
                    if ctx.args.dry_run:
                        row["note"] = "fake timing"
                    ctx.measure(row, call, row["calls"])
                    del x, ids
                except Exception as e:  # noqa: BLE001
                    ctx.fail(row, e)
            del w
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()


# ---- report ---------------------------------------------------------------------------------------

def derive(rows: list[dict]) -> None:
    best = {}
    for r in rows:
        if r["us"] != "" and not r["error"]:
            r["gbps"] = r["bytes"] / r["us"] / 1e3
            if r["label"].startswith("bf16"):
                key = (r["model"], r["proj"], r["batch"], r["l2"])
                best[key] = min(best.get(key, math.inf), r["us"])
    for r in rows:
        ref = best.get((r["model"], r["proj"], r["batch"], r["l2"]))
        if ref is not None and r["us"] != "" and not r["error"]:
            r["x_dense"] = ref / r["us"]


def summary_text(ctx: Ctx, header: str, ms: dict[str, Model]) -> str:
    out = [header]
    for mode in ("cold", "warm"):
        sel = [r for r in ctx.rows if r["l2"] == mode]
        if not sel:
            continue
        labels = list(dict.fromkeys(r["label"] for r in sel))
        labels = [lb for lb in labels if not lb.startswith("bf16")] + [lb for lb in labels if lb.startswith("bf16")]
        idx = {(r["model"], r["proj"], r["batch"], r["label"]): r for r in sel}
        body = []
        for name in dict.fromkeys(r["model"] for r in sel):
            for proj in PROJECTIONS:
                for b in sorted({r["batch"] for r in sel if r["model"] == name and r["proj"] == proj}):
                    cells = [name, proj, str(b)]
                    for lb in labels:
                        r = idx.get((name, proj, b, lb))
                        cells.append(common.cell(r) + ("" if r is None or r["gbps"] == "" else
                                                       f" {r['gbps']:.0f}"))
                    quant = [idx.get((name, proj, b, lb)) for lb in labels if not lb.startswith("bf16")]
                    cells.append(" ".join(common.fmt_f(r and r["x_dense"], ".2f") for r in quant))
                    body.append(cells)
        out += ["", f"== L2 {mode}: us per call and GB/s (selected experts' bytes + activations + outputs); "
                "x dense = best bf16 time / torchext time, per format",
                common.render(["model", "proj", "T"] + labels + ["x dense"], body)]
    for m in ms.values():
        out.append(f"{m.name}: E={m.experts}, top_k={m.top_k}, H={m.hidden}, I={m.intermediate}, formats "
                   f"{', '.join(m.formats)}" + ("" if m.name != "gpt_oss_20b" or "MXFP4" in m.formats else
                                               " (MXFP4 not in this build: Q4_K and Q8_0 at its shape)"))
    errs = [r for r in ctx.rows if r["error"] and not r["error"].startswith("skipped")]
    ok = sum(1 for r in ctx.rows if r["us"] != "" and not r["error"])
    out.append(f"rows: {ok} measured, {len(errs)} errors; elapsed {ctx.watch.elapsed():.0f} s")
    for u in list(dict.fromkeys(f"{r['label']}: {r['error'][:150]}" for r in errs))[:6]:
        out.append(f"  error {u}")
    return "\n".join(out)


def write_outputs(ctx: Ctx, outdir: Path, header: str, ms: dict[str, Model], final: bool) -> str:
    derive(ctx.rows)
    with open(outdir / "moe.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        wr.writeheader()
        for r in ctx.rows:
            wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    if not final:
        return ""
    text = summary_text(ctx, header, ms)
    (outdir / "summary.txt").write_text(text + "\n")
    return text


def self_check(ctx: Ctx) -> list[str]:
    """--dry-run: the calls ran, the derived columns follow from the fake timings."""
    bad = []
    ok = [r for r in ctx.rows if r["us"] != "" and not r["error"]]
    if not any(r["op"] == "torchext.qmatmul_id" for r in ok):
        bad.append("no qmatmul_id row measured")
    for r in ok:
        if not math.isclose(r["gbps"], r["bytes"] / r["us"] / 1e3, rel_tol=1e-9):
            bad.append(f"gbps {r['label']}")
    errors = [r for r in ctx.rows if r["error"] and r["op"] != "torch._grouped_mm (sorted slots)"]
    bad += [f"{r['label']} {r['proj']} T={r['batch']}: {r['error'][:120]}" for r in errors]
    return bad


def check_results(ctx: Ctx, ms: dict[str, Model]) -> list[str]:
    """--dry-run: qmatmul_id and the dense baselines compute the same products (dequantized weights)."""
    import torchext

    bad = []
    m = ms["qwen3_30b_a3b"]
    for proj, (n, k, per_slot) in ((p, f(m)) for p, f in PROJECTIONS.items()):
        w = common.random_quant_weight("Q8_0", m.experts * n, k, 1, "cpu", torch.Generator().manual_seed(1))[0]
        wd = torchext.dequantize(w, "Q8_0", m.experts * n, k).view(m.experts, n, k).transpose(1, 2)
        ids = routed_ids(3, m, 1, "cpu", torch.Generator().manual_seed(2))[0]
        x = torch.randn((3, m.top_k, k) if per_slot else (3, k))
        y = torchext.qmatmul_id(w.view(m.experts, n, -1), "Q8_0", x, ids, n, k, exact=True)
        ref = gather_bmm_call(wd, x, ids, m, per_slot)
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-4):
            bad.append(f"{proj}: qmatmul_id and gather+bmm disagree")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (moe.csv, summary.txt)")
    p.add_argument("--models", nargs="+", choices=["qwen3_30b_a3b", "gpt_oss_20b"])
    p.add_argument("--batches", nargs="+", type=int, help=f"tokens per call (default {BATCHES})")
    p.add_argument("--projections", nargs="+", choices=list(PROJECTIONS), default=list(PROJECTIONS))
    p.add_argument("--l2", choices=["cold", "warm", "both"], default="both")
    p.add_argument("--l2-factor", type=float, default=16.0,
                   help="cold: rotated weight copies total this many times L2 (a call reads only its experts)")
    p.add_argument("--id-sets", type=int, default=64, help="cold: distinct id sets (and activations) rotated")
    p.add_argument("--repeat", type=int, default=20, help="calls per captured graph (at least; whole rotations)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--replays", type=int, default=7)
    p.add_argument("--max-copies", type=int, default=64)
    p.add_argument("--mem-cap-gb", type=float, default=20.0)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes on the CPU, fake timings")
    args = p.parse_args(argv)

    if args.dry_run:
        device, timer = torch.device("cpu"), common.FakeTimer()
        args.batches = args.batches or [1, 8, 20]
        args.id_sets = min(args.id_sets, 4)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or use --dry-run", file=sys.stderr)
            return 2
        device, timer = torch.device("cuda", torch.cuda.current_device()), common.GraphTimer(args.warmup, args.replays)
    import torchext

    ms = {k: v for k, v in models(args.dry_run).items() if not args.models or k in args.models}
    batches = args.batches or BATCHES
    modes = {"cold": ["cold"], "warm": ["warm"], "both": ["cold", "warm"]}[args.l2]
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args, device, timer)
    common.stop_on_sigterm()
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        gpu = f"{prop.name}, sm_{prop.major}{prop.minor}, {prop.multi_processor_count} SMs, L2 {ctx.l2 / 2**20:.0f} MiB"
    else:
        gpu = f"none (dry run on {platform.processor() or platform.machine()})"
    header = (f"GPU: {gpu}\ntorch {torch.__version__}, CUDA {torch.version.cuda}, torchext from "
              f"{Path(torchext.__file__).parent}; batches {batches}, L2 {modes}")
    print(header, flush=True)
    try:
        for m in ms.values():
            for proj in args.projections:
                run_projection(ctx, m, proj, batches, modes)
                print(f"[{ctx.watch.elapsed():6.1f}s] {m.name} {proj} done", flush=True)
                write_outputs(ctx, args.out, header, ms, final=False)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}): writing what was measured", flush=True)
    finally:
        text = write_outputs(ctx, args.out, header, ms, final=True)
        print("\n" + text, flush=True)
    if args.dry_run:
        bad = self_check(ctx) + check_results(ctx, ms)
        print(f"self-check: {'OK' if not bad else 'FAILED: ' + '; '.join(bad[:10])}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
