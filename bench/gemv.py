"""torchext GEMV / quantized-matmul benchmark: kernel time from CUDA events over
CUDA-graph replays, with L2 cold (rotating weight copies > 4x L2) and warm (one weight), as
effective GB/s next to bf16 F.linear and PyTorch's int4 path in the same run.

    python bench/gemv.py --out DIR [--quick] [--shapes 4096x4096 640x1024:Q4_K ...] [--batches 1 8]
    python bench/gemv.py --out DIR --dry-run    # no GPU: fake timings, checks the reporting code

Writes DIR/gemv.csv (every row, errors included), DIR/gemv.png and, over 3 or more batches,
DIR/batches.png (GB/s and TFLOP/s against the batch; both when matplotlib is importable),
DIR/summary.txt (the tables printed at the end of stdout) and DIR/summary.md (the timings as markdown
tables, a line per batch, for the README). Never asserts on a timing.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import new_row, plan_calls, plan_copies, short_error  # noqa: E402

# ---- what runs --------------------------------------------------------------------------------

DECODER_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
DECODER_FORMATS = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0"]
# Gemma 3 270M: token embedding / lm head (Q8_0), MLP gate/up and q_proj (Q5_0), MLP down (Q6_K),
# o_proj (Q4_K), as in its Q4_K_M GGUF.
GEMMA_SHAPES = [(262144, 640, "Q8_0"), (2048, 640, "Q5_0"), (1024, 640, "Q5_0"),
                (640, 2048, "Q6_K"), (640, 1024, "Q4_K")]
GEMV_BATCHES = [1, 2, 4, 8]           # the small batches of decoding (b8/b1 is a target)
LARGE_BATCHES = [16, 32, 64, 128, 512]  # the tiled GEMM's and the dense path's (x bf16 targets below)
MAX_GEMV_ROWS = 16                 # kernels/batch_policy.h: the most rows a Q8_1 GEMV serves

# Column order of the printed tables (labels): baselines, then torchext per weight format.
# Every format of torchext's catalog has a column (--shapes NxK:FMT measures any of them).
CATALOG_FORMATS = [q.name for q in common.formats.WEIGHT_TYPES]
GEMV_LABELS = ["bf16", "int4", "Q4_K", "q4k_q8", "q8_1+q4k_q8", "q8_1", "Q5_K", "Q6_K", "Q8_0", "Q5_0"]
GEMV_LABELS += [f for f in CATALOG_FORMATS if f not in GEMV_LABELS]
PLOT_LABELS = [lb for lb in GEMV_LABELS if lb != "q8_1"]  # the plot shows matmuls; q8_1 has no weight
ELEMENTWISE_LABELS = ["copy", "q8_1", "gelu", "gelu tanh", "gelu_", "bias_gelu", "F.gelu",
                      "F.gelu tanh", "F.gelu(x+b)"]
# The targets the summary checks (the project's, same run as bf16 F.linear): batch 1 at >= 90% of
# bf16's achieved GB/s (Q6_K 85%, the grid-based IQ formats 80%), batch 8 <= 1.5x batch 1's time,
# and from 32 rows a speed against bf16 of at least X_BF16_TARGET (the exact path's 0.9x at 512+
# rows is bench/paths.py's column).
B1_PCT_BF16_TARGET = {"Q6_K": 85, **{q.name: 80 for q in common.formats.GRID_TYPES}}  # else 90
X_BF16_TARGET = {32: 1.5, 64: 1.5, 128: 1.0, 512: 1.0, 2048: 1.0, 4096: 1.0}
NAMED_OP = {"Q4_K": "q4k_gemv", "Q5_K": "q5k_gemv", "Q6_K": "q6k_gemv"}


def q8_1_bytes(k: int) -> int:
    """Bytes of one Q8_1 activation row: k padded to 256-value super-blocks, 36 bytes per 32."""
    return -(-k // 256) * 8 * 36


@dataclass
class OpSpec:
    label: str                 # table column
    op: str                    # what is called (CSV)
    fmt: str                   # weight format (CSV)
    out_bytes: int             # bytes per output element
    act: str                   # activation kind: "x" (bf16 [B, K]) or "xq" (Q8_1 bytes)
    gemv_only: bool            # only for batches the GEMV path serves
    make: Callable             # make(state, x, xq, n, k, c) -> call(i), c = copies rotated


def specs_for(group: str) -> list[OpSpec]:
    if group == "bf16":
        return [OpSpec("bf16", "torch.nn.functional.linear", "bf16", 2, "x", False,
                       lambda S, x, xq, n, k, c: lambda i: F.linear(x[i % c], S["w"][i % c]))]
    if group == "int4":
        mm = torch.ops.aten._weight_int4pack_mm
        return [OpSpec("int4", "aten._weight_int4pack_mm(g=32)", "int4", 2, "x", False,
                       lambda S, x, xq, n, k, c: lambda i: mm(x[i % c], S["w"][i % c], 32, S["sz"][i % c]))]
    import torchext  # the baselines above run even when it fails to import

    if group == "act":
        return [OpSpec("q8_1", "torchext.quantize_q8_1", "Q8_1", 0, "x", True,
                       lambda S, x, xq, n, k, c: lambda i: torchext.quantize_q8_1(x[i % c]))]
    specs = []
    if group in NAMED_OP:
        fn = getattr(torchext, NAMED_OP[group])
        specs.append(OpSpec(group, f"torchext.{NAMED_OP[group]}", group, 2, "x", False,
                            lambda S, x, xq, n, k, c, fn=fn: lambda i: fn(S["w"][i % c], x[i % c], n, k)))
    else:
        qt = int(torchext.QType.of(group))
        specs.append(OpSpec(group, "torchext.qmatmul", group, 2, "x", False,
                            lambda S, x, xq, n, k, c, qt=qt: lambda i: torch.ops.torchext.qmatmul(
                                S["w"][i % c], qt, x[i % c], n, k)))
    if group == "Q4_K":
        g = torchext.q4k_q8_gemv
        q = torchext.quantize_q8_1
        specs.append(OpSpec("q4k_q8", "torchext.q4k_q8_gemv", "Q4_K", 4, "xq", True,
                            lambda S, x, xq, n, k, c: lambda i: g(S["w"][i % c], xq[i % c], n, k)))
        specs.append(OpSpec("q8_1+q4k_q8", "torchext.quantize_q8_1 + q4k_q8_gemv", "Q4_K", 4, "x", True,
                            lambda S, x, xq, n, k, c: lambda i: g(S["w"][i % c], q(x[i % c]), n, k)))
    return specs


def act_bytes(spec: OpSpec, b: int, k: int) -> int:
    return b * q8_1_bytes(k) if spec.act == "xq" else b * k * 2


def out_bytes(spec: OpSpec, b: int, n: int, k: int) -> int:
    if spec.label == "q8_1":
        return b * q8_1_bytes(k)
    return b * n * spec.out_bytes


# ---- weights ------------------------------------------------------------------------------------

def build_weights(ctx, group: str, n: int, k: int, copies: int) -> dict:
    """`copies` copies of a random weight of this group on the device, and its bytes per copy."""
    dev, gen = ctx.device, ctx.gen
    if group == "act":
        return {"wbytes": 0}
    if group == "bf16":
        w = torch.randn((copies, n, k), dtype=torch.bfloat16, device=dev, generator=gen).mul_(0.02)
        return {"w": w, "wbytes": n * k * 2}
    if group == "int4":
        return build_int4(ctx, n, k, copies)
    w = common.random_quant_weight(group, n, k, copies, dev, gen)
    return {"w": w, "wbytes": w[0].numel()}


def build_int4(ctx, n: int, k: int, copies: int) -> dict:
    """PyTorch's tinygemm int4 layout: _convert_weight_to_int4pack(uint8 [n, k/2], innerKTiles) ->
    int32 [n/8, k/(16*innerKTiles), 32, innerKTiles/2]; scales and zeros bf16 [k/32, n, 2]."""
    dev, gen = ctx.device, ctx.gen
    tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    if tiles is None or n % 8:
        raise ValueError(f"int4pack needs k % 32 == 0 and n % 8 == 0 (n={n}, k={k})")
    conv = torch.ops.aten._convert_weight_to_int4pack
    note = ""
    try:  # torch >= 2.5: two 4-bit values per uint8
        packed = conv(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=gen), tiles)
    except Exception as e:  # noqa: BLE001  (older torch took int32 [n, k] values 0..15)
        try:
            packed = conv(torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev, generator=gen), tiles)
            note = "int4pack from int32 [n, k] (old signature)"
        except Exception:  # noqa: BLE001
            raise RuntimeError(f"_convert_weight_to_int4pack(uint8 [n, k/2], {tiles}): {short_error(e, 200)}") from e
    w = packed.unsqueeze(0).repeat(copies, *([1] * packed.dim()))
    sz = torch.empty((copies, k // 32, n, 2), dtype=torch.bfloat16, device=dev)
    sz[..., 0] = torch.rand((copies, k // 32, n), device=dev, generator=gen).mul_(0.01).add_(0.001)
    sz[..., 1] = torch.randn((copies, k // 32, n), device=dev, generator=gen).mul_(0.01)
    return {"w": w, "sz": sz, "wbytes": packed.numel() * 4 + sz[0].numel() * 2, "note": note}


# ---- measuring ----------------------------------------------------------------------------------

class Ctx(common.Measurements):
    def __init__(self, args, device, timer):
        super().__init__(args, device, timer)
        self.copy_gbps: float | None = None

    def copies(self, bytes_per_copy: int) -> int:
        c = plan_copies(bytes_per_copy, self.l2, mem_cap_bytes=self.args.mem_cap_gb * 1e9,
                        max_copies=self.args.max_copies)
        return min(c, 2) if self.args.dry_run else c  # dry run: rotation exercised, no big CPU buffers


def settle(ctx: Ctx) -> None:
    """Leaves the GPU idle for --settle-s seconds before a group's first, lightest batch. The group
    before ended on its largest batches, which can hold the board at its power cap: an H100 (700 W)
    drew up to 707 W with its SM clock at 1170-1500 MHz (nvidia-smi: the power cap) through most of
    128256x4096's groups, whose second timed 1 and 128 rows 11% and 5-12% slower than a run of that
    shape alone; the clock was back at 1980 MHz within 0.5 s of the load's end (bench/NOTES.md,
    thirty-seventh session)."""
    if ctx.device.type == "cuda" and not ctx.args.dry_run and ctx.args.settle_s > 0:
        torch.cuda.synchronize()
        time.sleep(ctx.args.settle_s)


def run_group(ctx: Ctx, group: str, n: int, k: int, batches: list[int], modes: list[str]) -> None:
    settle(ctx)
    try:
        specs = specs_for(group)
    except Exception as e:  # noqa: BLE001  (torchext failed to import: the baselines still run)
        row = new_row(section="gemv", label=group, op=group, format=group, N=n, K=k, batch=0, l2="")
        ctx.rows.append(row)
        ctx.fail(row, e)
        return
    plan = [(b, m, s) for b in batches for m in modes for s in specs
            if not (s.gemv_only and b > MAX_GEMV_ROWS)]
    if not plan:
        return
    rows = {}
    for b, m, s in plan:
        rows[(b, m, s.label)] = row = new_row(section="gemv", label=s.label, op=s.op, format=s.fmt,
                                              dtype="bfloat16", N=n, K=k, batch=b, l2=m)
        ctx.rows.append(row)
    if group == "act":  # activations only: the copies are planned per batch below
        state, copies_w = {"wbytes": 0}, 0
    else:
        # weight bytes per copy, known before allocating: rotate enough copies for a cold L2
        wbytes = {"bf16": n * k * 2, "int4": n * k // 2 + (k // 32) * n * 4}.get(group)
        if wbytes is None:
            import torchext
            wbytes = n * torchext.row_bytes(group, k)
        copies_w = ctx.copies(wbytes) if "cold" in modes else 1
        # the activation copies [copies, batch, k] count against the memory cap too
        copies_w = max(1, min(copies_w, int(ctx.args.mem_cap_gb * 1e9 // (wbytes + max(batches) * k * 2))))
        try:
            state = build_weights(ctx, group, n, k, copies_w)
        except Exception as e:  # noqa: BLE001
            for row in rows.values():
                ctx.fail(row, e)
            return
    try:
        for b in batches:
            todo = [(m, s) for (bb, m, s) in plan if bb == b]
            if not todo:
                continue
            xb = b * k * 2
            c_all = copies_w or (ctx.copies(xb) if "cold" in modes else 1)
            try:
                x = torch.randn((c_all, b, k), dtype=torch.bfloat16, device=ctx.device, generator=ctx.gen)
                xq = None
                if any(s.act == "xq" for _, s in todo):
                    import torchext
                    xq = torchext.quantize_q8_1(x)
            except Exception as e:  # noqa: BLE001
                for m, s in todo:
                    ctx.fail(rows[(b, m, s.label)], e)
                continue
            for m, s in todo:
                row = rows[(b, m, s.label)]
                c = c_all if m == "cold" else 1
                ab, ob = act_bytes(s, b, k), out_bytes(s, b, n, k)
                row["bytes"] = state["wbytes"] + ab + ob
                row["copies"] = c
                row["calls"] = plan_calls(c, ctx.args.repeat)
                foot = c * (state["wbytes"] + ab)
                row["footprint_mb"] = round(foot / 1e6, 1)
                row["note"] = state.get("note", "")
                if m == "cold" and foot < 4 * ctx.l2 and not ctx.args.dry_run:
                    row["note"] = (row["note"] + f" not fully cold: {c} copies = {foot / 1e6:.1f} MB"
                                   f" < 4xL2").strip()
                try:
                    call = s.make(state, x, xq, n, k, c)
                except Exception as e:  # noqa: BLE001
                    ctx.fail(row, e)
                    continue
                ctx.measure(row, call, row["calls"])
            del x, xq
    finally:
        state.clear()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def run_copy(ctx: Ctx, nbytes: int) -> None:
    """The roofline: device-to-device copy of one large buffer, bytes read + written."""
    # float32 elements: torch's copy kernel moves uint8 tensors in narrower accesses and
    # measured ~20% below the float copy on the H100, which made a poor roofline.
    row = new_row(section="copy", label="copy", op="Tensor.copy_ (float32)", format="", dtype="float32",
                  N=nbytes, K=1, batch=0, l2="cold", bytes=2 * nbytes, copies=1, calls=ctx.args.repeat_elementwise,
                  footprint_mb=round(2 * nbytes / 1e6, 1))
    ctx.rows.append(row)
    try:
        src = torch.randn((nbytes // 4,), dtype=torch.float32, device=ctx.device, generator=ctx.gen)
        dst = torch.empty_like(src)
        ctx.measure(row, lambda i: dst.copy_(src), row["calls"])
        del src, dst
    except Exception as e:  # noqa: BLE001
        ctx.fail(row, e)
    if not row["error"] and row["us"] != "":
        ctx.copy_gbps = row["bytes"] / row["us"] / 1e3


def run_elementwise(ctx: Ctx, numel: int) -> None:
    """quantize_q8_1, gelu, gelu_, bias_gelu against F.gelu and a copy, on [numel/4096, 4096]."""
    try:
        import torchext
    except Exception:  # noqa: BLE001  (its rows then record the AttributeError; the torch rows still run)
        torchext = None

    k = 4096
    rows_ = max(1, numel // k)
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.tensor([], dtype=dtype).element_size()
        nb = rows_ * k * es
        try:
            x = torch.randn((rows_, k), dtype=dtype, device=ctx.device, generator=ctx.gen)
            bias = torch.randn((k,), dtype=dtype, device=ctx.device, generator=ctx.gen)
            y = x.clone()
            out = torch.empty_like(x)
        except Exception as e:  # noqa: BLE001
            row = new_row(section="elementwise", label="alloc", op="alloc", dtype=str(dtype).split(".")[-1],
                          N=rows_, K=k, batch=0)
            ctx.rows.append(row)
            ctx.fail(row, e)
            continue
        cases = [
            ("copy", "Tensor.copy_", lambda i: out.copy_(x), 2 * nb),
            ("q8_1", "torchext.quantize_q8_1", lambda i: torchext.quantize_q8_1(x), nb + rows_ * q8_1_bytes(k)),
            ("gelu", "torchext.gelu", lambda i: torchext.gelu(x), 2 * nb),
            ("gelu tanh", "torchext.gelu(tanh)", lambda i: torchext.gelu(x, "tanh"), 2 * nb),
            ("gelu_", "torchext.gelu_ (in place)", lambda i: torchext.gelu_(y), 2 * nb),
            ("bias_gelu", "torchext.bias_gelu", lambda i: torchext.bias_gelu(x, bias), 2 * nb + k * es),
            ("F.gelu", "torch.nn.functional.gelu", lambda i: F.gelu(x), 2 * nb),
            ("F.gelu tanh", "torch.nn.functional.gelu(tanh)", lambda i: F.gelu(x, approximate="tanh"), 2 * nb),
            # counted at the fused op's ideal traffic, so it compares directly with bias_gelu
            ("F.gelu(x+b)", "F.gelu(x + bias) (two kernels)", lambda i: F.gelu(x + bias), 2 * nb + k * es),
        ]
        for label, op, call, nbytes in cases:
            row = new_row(section="elementwise", label=label, op=op, format="", dtype=str(dtype).split(".")[-1],
                          N=rows_, K=k, batch=0, l2="cold" if 2 * nb >= 4 * ctx.l2 else "warm", bytes=nbytes,
                          copies=1, calls=ctx.args.repeat_elementwise, footprint_mb=round(nbytes / 1e6, 1))
            ctx.rows.append(row)
            ctx.measure(row, call, row["calls"])
        del x, bias, y, out
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


# ---- report -------------------------------------------------------------------------------------

def summary_text(ctx: Ctx, header: str) -> str:
    rows = ctx.rows
    gemv = [r for r in rows if r["section"] == "gemv"]
    mode = "cold" if any(r["l2"] == "cold" for r in gemv) else "warm"
    sel = [r for r in gemv if r["l2"] == mode]
    idx = {(r["N"], r["K"], r["batch"], r["label"]): r for r in sel}
    out = [header]
    if ctx.copy_gbps:
        out.append(f"copy bandwidth (read + write bytes of a {ctx.args.copy_mib} MiB copy_): "
                   f"{ctx.copy_gbps:.0f} GB/s")

    if sel:
        shapes = list(dict.fromkeys((r["N"], r["K"]) for r in sel))
        fmts_of = {s: [f for f in CATALOG_FORMATS if any((r["N"], r["K"]) == s and r["label"] == f for r in sel)]
                   for s in shapes}
        wide = [s for s in shapes if len(fmts_of[s]) > 1]
        narrow = [s for s in shapes if len(fmts_of[s]) <= 1]
        out += ["", f"== GEMV, L2 {mode}: us per call (median over CUDA-graph replays). Q*_* = torchext "
                "q4k/q5k/q6k_gemv or qmatmul, bf16 in/out; q4k_q8 = q4k_q8_gemv on pre-quantized Q8_1; "
                "q8_1 = quantize_q8_1 alone"]
        if wide:
            labels = [lb for lb in GEMV_LABELS if any(r["label"] == lb and (r["N"], r["K"]) in wide for r in sel)]
            body = []
            for n, k in wide:
                for b in sorted({r["batch"] for r in sel if (r["N"], r["K"]) == (n, k)}):
                    body.append([f"{n}x{k}", str(b)] + [common.cell(idx.get((n, k, b, lb))) for lb in labels])
            out.append(common.render(["NxK", "B"] + labels, body))
        if narrow:
            body = []
            for n, k in narrow:
                fmt = (fmts_of[(n, k)] or [""])[0]
                for b in sorted({r["batch"] for r in sel if (r["N"], r["K"]) == (n, k)}):
                    r = idx.get((n, k, b, fmt))
                    body.append([f"{n}x{k}", fmt or "-", str(b), common.cell(idx.get((n, k, b, "bf16"))),
                                 common.cell(idx.get((n, k, b, "int4"))), common.cell(r),
                                 common.fmt_f(r and r["x_bf16"], ".2f")])
            if wide:
                out.append("")
            out.append(common.render(["NxK", "fmt", "B", "bf16", "int4", "torchext", "x bf16"], body))

        body = []
        checked = [b for b in X_BF16_TARGET if any(r["batch"] == b for r in sel)]
        for n, k in shapes:
            bf1 = idx.get((n, k, 1, "bf16"))
            for fmt in CATALOG_FORMATS + ["int4"]:
                r1 = idx.get((n, k, 1, fmt))
                if r1 is None:
                    continue
                r8 = idx.get((n, k, 8, fmt))
                big = {b: idx.get((n, k, b, fmt)) for b in checked}
                pct_bf16 = (r1["gbps"] / bf1["gbps"] * 100 if r1["gbps"] != "" and bf1 and bf1["gbps"] != ""
                            else "")
                target = "" if fmt == "int4" else B1_PCT_BF16_TARGET.get(fmt, 90)
                misses = []
                if target != "" and pct_bf16 != "" and pct_bf16 < target:
                    misses.append(f"b1<{target}%bf16")
                if fmt != "int4" and r8 and r8["b8_over_b1"] != "" and r8["b8_over_b1"] > 1.5:
                    misses.append("b8/b1>1.5")
                for b, r in big.items():
                    if fmt != "int4" and r and r["x_bf16"] != "" and r["x_bf16"] < X_BF16_TARGET[b]:
                        misses.append(f"b{b}<{X_BF16_TARGET[b]:g}x")
                body.append([f"{n}x{k}", fmt, common.cell(r1), common.fmt_f(r1["gbps"], ".0f"),
                             common.fmt_f(r1["pct_copy"], ".0f"), common.fmt_f(r1["x_bf16"], ".2f"),
                             common.fmt_f(pct_bf16, ".0f"), str(target), common.fmt_f(r8 and r8["b8_over_b1"], ".2f")]
                            + [common.fmt_f(r and r["x_bf16"], ".2f") for r in big.values()] + [",".join(misses)])
        if body:
            goals = ", ".join(f"{b}: {X_BF16_TARGET[b]:g}" for b in checked)
            out += ["", f"== targets, L2 {mode}: batch 1 GB/s, %copy-BW, x = speed-up over bf16 F.linear, "
                    f"%bf16 GB/s (target tgt%), b8/b1 time (<=1.5), x bf16 by batch (targets {goals or 'none measured'})",
                    common.render(["NxK", "fmt", "b1 us", "GB/s", "%copy", "x bf16", "%bf16", "tgt%", "b8/b1"]
                                  + [f"x@{b}" for b in checked] + ["misses"], body)]

    ew = [r for r in rows if r["section"] == "elementwise"]
    if ew:
        ref = {"gelu": "F.gelu", "gelu tanh": "F.gelu tanh", "gelu_": "F.gelu", "bias_gelu": "F.gelu(x+b)"}
        eidx = {(r["label"], r["dtype"]): r for r in ew}
        body = []
        for r in ew:
            base = eidx.get((ref.get(r["label"], ""), r["dtype"]))
            vs = (base["us"] / r["us"] if base and base["us"] != "" and r["us"] != "" and not r["error"]
                  and not base["error"] else "")
            body.append([r["label"], r["dtype"], common.cell(r), common.fmt_f(r["gbps"], ".0f"),
                         common.fmt_f(r["pct_copy"], ".0f"), common.fmt_f(vs, ".2f")])
        n0 = ew[0]["N"] * ew[0]["K"]
        out += ["", f"== elementwise on [{ew[0]['N']}, {ew[0]['K']}] ({n0 / 2**20:.3g} Mi elements): GB/s = read + "
                "write bytes / time; %copy target >= 80 (q8_1, gelu); x torch = speed-up over the F.gelu form",
                common.render(["op", "dtype", "us", "GB/s", "%copy", "x torch"], body, right=True)]

    errs = [r for r in rows if r["error"] and not r["error"].startswith("skipped")]
    skipped = sum(1 for r in rows if r["error"].startswith("skipped"))
    ok = sum(1 for r in rows if not r["error"] and r["us"] != "")
    out.append("")
    out.append(f"rows: {ok} measured, {len(errs)} errors, {skipped} skipped; elapsed {ctx.watch.elapsed():.0f} s")
    uniq = list(dict.fromkeys(f"{r['label']}: {r['error'][:150]}" for r in errs))
    for u in uniq[:6]:
        out.append(f"  error {u}")
    if len(uniq) > 6:
        out.append(f"  ... {len(uniq) - 6} more distinct errors in the CSV")
    return "\n".join(out)


def markdown_tables(rows: list[dict], header: str) -> str:
    """The GEMV timings as markdown for the README, a table per shape and L2 mode: a line per batch,
    µs per call of bf16 F.linear, the int4 path and each weight format, each format's speed over bf16."""
    gemv = [r for r in rows if r["section"] == "gemv"]
    out = [f"<!-- {header.strip()} -->"] if header.strip() else []
    for mode in ("cold", "warm"):
        sel = [r for r in gemv if r["l2"] == mode]
        for n, k in dict.fromkeys((r["N"], r["K"]) for r in sel):
            here = {(r["batch"], r["label"]): r for r in sel if (r["N"], r["K"]) == (n, k)}
            present = {label for _, label in here}
            labels = [lb for lb in ["bf16", "int4"] + CATALOG_FORMATS if lb in present]
            fmts = [lb for lb in labels if lb in CATALOG_FORMATS]
            head = ["rows"] + [f"{lb} µs" for lb in labels] + [f"{f} ×bf16" for f in fmts]
            out += ["", f"{n}×{k}, L2 {mode}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for b in sorted({key[0] for key in here}):
                cells = [str(b)] + [common.cell(here.get((b, lb))) for lb in labels]
                cells += [common.fmt_f((here.get((b, f)) or {}).get("x_bf16"), ".2f") for f in fmts]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_outputs(ctx: Ctx, outdir: Path, final: bool, header: str = "") -> str:
    common.derive(ctx.rows, ctx.copy_gbps)
    common.write_csv(outdir / "gemv.csv", ctx.rows)
    if not final:
        return ""
    text = summary_text(ctx, header)
    (outdir / "summary.txt").write_text(text + "\n")
    (outdir / "summary.md").write_text(markdown_tables(ctx.rows, header))
    msg = common.plot(outdir / "gemv.png", ctx.rows, ctx.copy_gbps, PLOT_LABELS, ELEMENTWISE_LABELS)
    msg += "\n" + common.plot_batches(outdir / "batches.png", ctx.rows, PLOT_LABELS)
    return text + "\n" + msg + f"\nCSV written: {outdir / 'gemv.csv'}"


# ---- self-check (--dry-run) ------------------------------------------------------------------

def self_check(ctx: Ctx, outdir: Path, text: str) -> list[str]:
    """Checks the reporting arithmetic on the fake timings; returns the failures."""
    bad = []
    def check(cond, what):
        if not cond:
            bad.append(what)

    # copy planning: 4 x 50 MiB over a 9.4 MB Q4_K 4096x4096 weight needs 23 copies; caps apply
    l2 = 50 * 2**20
    q4k = 4096 * 16 * 144
    check(plan_copies(q4k, l2) == math.ceil(4 * l2 / q4k) == 23, "plan_copies Q4_K 4096x4096")
    check(plan_copies(q4k, l2) * q4k >= 4 * l2, "cold footprint >= 4x L2")
    check(plan_copies(2 * 2**30, l2) == 1, "one copy when a copy exceeds 4x L2")
    check(plan_copies(1000, l2, max_copies=1024) == 1024, "max_copies cap")
    check(plan_copies(2**30, 1e12, mem_cap_bytes=20e9) == 18, "memory cap")
    check(plan_calls(23, 20) == 23 and plan_calls(1, 20) == 20 and plan_calls(7, 20) == 21, "plan_calls")

    # the random weights decode to finite values, not all zero, with the scale fields as written
    import torchext
    gen = torch.Generator().manual_seed(1)
    for fmt in DECODER_FORMATS:
        w = common.random_quant_weight(fmt, 4, 512, 2, "cpu", gen)
        for c in range(2):
            d = torchext.dequantize(w[c], fmt, 4, 512)
            check(bool(torch.isfinite(d).all()) and bool((d != 0).any()), f"random {fmt} weight decodes")
        blk = w.view(2, 4, -1, torchext.block_bytes(fmt))
        for off in common.SCALE_FIELDS[fmt] if common.plain_fp16_scales(fmt) else ():
            v = blk[..., off:off + 2].contiguous().view(torch.float16).float()
            check(bool(((v >= 0.001) & (v < 0.0111)).all()), f"{fmt} fp16 field at byte {off}")

    rows = ctx.rows
    byk = {}
    for r in rows:
        if r["section"] == "gemv" and not r["error"]:
            byk[(r["label"], r["N"], r["K"], r["batch"], r["l2"])] = r
    n_ok = 0
    for r in rows:
        if r["error"] or r["us"] == "":
            continue
        n_ok += 1
        check(math.isclose(r["us"], common.fake_us(r), rel_tol=1e-12), f"fake time {r['label']}")
        check(math.isclose(r["gbps"], r["bytes"] / (r["us"] * 1e-6) / 1e9, rel_tol=1e-9), f"gbps {r['label']}")
        check(math.isclose(r["pct_copy"], 100 * r["gbps"] / ctx.copy_gbps, rel_tol=1e-9), "pct_copy")
        if r["section"] != "gemv":
            continue
        bf = byk.get(("bf16", r["N"], r["K"], r["batch"], r["l2"]))
        if bf:
            check(math.isclose(r["x_bf16"], bf["us"] / r["us"], rel_tol=1e-9), f"x_bf16 {r['label']}")
        if r["batch"] == 8:
            one = byk.get((r["label"], r["N"], r["K"], 1, r["l2"]))
            if one:
                check(math.isclose(r["b8_over_b1"], r["us"] / one["us"], rel_tol=1e-9), "b8_over_b1")
            else:
                check(r["b8_over_b1"] == "", "b8_over_b1 without batch 1")
        else:
            check(r["b8_over_b1"] == "", "b8_over_b1 only at batch 8")
    check(n_ok > 0, "some rows measured")
    # bytes: bf16 F.linear 256x512 batch 2 = weight + x + out
    r = byk.get(("bf16", 256, 512, 2, "cold"))
    if r:
        check(r["bytes"] == 256 * 512 * 2 + 2 * 512 * 2 + 2 * 256 * 2, "bf16 bytes")
    r = byk.get(("Q4_K", 256, 512, 1, "cold"))
    if r:
        check(r["bytes"] == 256 * 2 * 144 + 512 * 2 + 256 * 2, "Q4_K bytes")
    r = byk.get(("q4k_q8", 256, 512, 1, "cold"))
    if r:
        check(r["bytes"] == 256 * 2 * 144 + 2 * 288 + 256 * 4, "q4k_q8 bytes")
    # CSV round trip
    with open(outdir / "gemv.csv", newline="") as f:
        back = list(csv.DictReader(f))
    check(len(back) == len(rows), "CSV row count")
    check(all(set(b) == set(common.CSV_FIELDS) for b in back), "CSV fields")
    for b, r in zip(back, rows):
        if r["gbps"] != "":
            check(math.isclose(float(b["gbps"]), r["gbps"], rel_tol=1e-5), "CSV gbps")
    check(len(text) < 10_000, f"summary is {len(text)} chars (keep < 10k)")
    # the markdown: a line per shape, L2 mode and batch measured, each as wide as its header
    md = (outdir / "summary.md").read_text().splitlines()
    gemv = {(r["N"], r["K"], r["batch"], r["l2"]) for r in rows if r["section"] == "gemv"}
    lines = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| rows")]
    check(len(lines) == len(gemv), f"summary.md: {len(lines)} batch lines for {len(gemv)} measured")
    width = 0
    for ln in md:
        if ln.startswith("| rows"):
            width = ln.count("|")
        elif ln.startswith("|"):
            check(ln.count("|") == width, f"summary.md: {ln!r} is not as wide as its header")
    return bad


# ---- main ---------------------------------------------------------------------------------------

def parse_shapes(items: list[str]) -> list[tuple[int, int, list[str]]]:
    """'NxK' (decoder formats) or 'NxK:FMT[,FMT]'."""
    out = []
    for item in items:
        for part in item.split():
            shape, _, fmts = part.partition(":")
            n, k = (int(v) for v in shape.lower().split("x"))
            out.append((n, k, [f.upper() for f in fmts.split(",")] if fmts else list(DECODER_FORMATS)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (gemv.csv, gemv.png, summary.txt)")
    p.add_argument("--quick", action="store_true",
                   help="batch 1 and 8, the four decoder shapes, L2 cold only")
    p.add_argument("--shapes", nargs="+", help="NxK or NxK:FMT[,FMT] (default: decoder + Gemma-3-270M shapes)")
    p.add_argument("--batches", nargs="+", type=int, help=f"default {GEMV_BATCHES + LARGE_BATCHES}")
    p.add_argument("--l2", choices=["cold", "warm", "both"], help="default both (--quick: cold)")
    p.add_argument("--repeat", type=int, default=20, help="calls per captured graph (at least; cold: whole passes)")
    p.add_argument("--repeat-elementwise", type=int, default=10, help="calls per graph, elementwise and copy")
    p.add_argument("--warmup", type=int, default=2, help="graph replays before timing")
    p.add_argument("--replays", type=int, default=7, help="timed replays (median)")
    p.add_argument("--max-copies", type=int, default=1024, help="cap on rotated copies (= calls per graph)")
    p.add_argument("--mem-cap-gb", type=float, default=20.0, help="cap on the bytes of rotated copies")
    p.add_argument("--elementwise-numel", type=int, default=64 * 2**20, help="elements of the elementwise tensors")
    # 256 MiB (512 MB moved a copy, > 4x L2): the size of the operands measured here. On the H100
    # the same graph-timed copy_ ran at 3015 GB/s for 256 MiB but 2433-2437 GB/s for 512 and 1024
    # MiB (2026-11-24), so a larger buffer understated the roofline by ~20%.
    p.add_argument("--copy-mib", type=int, default=256, help="MiB of the copy-bandwidth roofline buffer")
    p.add_argument("--no-elementwise", action="store_true")
    p.add_argument("--no-int4", action="store_true", help="skip the aten int4 baseline")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop measuring after this many seconds (rows left are 'skipped'); outputs still written")
    p.add_argument("--settle-s", type=float, default=1.0,
                   help="idle seconds before each weight group, for the GPU's clock to leave its power cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: tiny shapes on the CPU, fake timings; checks the tables, CSV and plot")
    args = p.parse_args(argv)

    if args.quick:
        args.batches = args.batches or [1, 8]
        args.l2 = args.l2 or "cold"
    if args.dry_run:
        device = torch.device("cpu")
        timer = common.FakeTimer()
        args.shapes = args.shapes or ["256x512", "512x256", "1024x640:Q8_0", "640x1024:Q4_K"]
        args.batches = args.batches or [1, 2, 8, 16]
        args.elementwise_numel = min(args.elementwise_numel, 64 * 1024)
        args.copy_mib = 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or use --dry-run", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        timer = common.GraphTimer(args.warmup, args.replays)
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    elif args.quick:
        shapes = [(n, k, list(DECODER_FORMATS)) for n, k in DECODER_SHAPES]
    else:
        shapes = [(n, k, list(DECODER_FORMATS)) for n, k in DECODER_SHAPES] + \
                 [(n, k, [f]) for n, k, f in GEMMA_SHAPES]
    batches = args.batches or GEMV_BATCHES + LARGE_BATCHES
    modes = {"cold": ["cold"], "warm": ["warm"], "both": ["cold", "warm"], None: ["cold", "warm"]}[args.l2]
    args.out.mkdir(parents=True, exist_ok=True)

    try:
        import torchext
        tx_where = f"torchext from {Path(torchext.__file__).parent}"
    except Exception as e:  # noqa: BLE001  (measure the baselines anyway)
        tx_where = f"torchext IMPORT FAILED: {short_error(e)}"

    ctx = Ctx(args, device, timer)
    common.stop_on_sigterm()
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        gpu = (f"{prop.name}, sm_{prop.major}{prop.minor}, {prop.multi_processor_count} SMs, "
               f"{prop.total_memory / 2**30:.0f} GiB, L2 {ctx.l2 / 2**20:.0f} MiB")
    else:
        gpu = f"none (dry run on {platform.processor() or platform.machine()}), fake L2 {ctx.l2 / 2**20:.0f} MiB"
    header = (f"GPU: {gpu}\ntorch {torch.__version__}, CUDA {torch.version.cuda}, python "
              f"{platform.python_version()}, {tx_where}")
    print(header, flush=True)
    shape_list = " ".join(f"{n}x{k}:{','.join(f)}" for n, k, f in shapes)
    print(f"shapes: {shape_list}\nbatches: {batches}, L2: {modes}, "
          f"repeat {args.repeat}, replays {args.replays} (+{args.warmup} warm-up), budget {args.budget_s:.0f} s",
          flush=True)

    try:
        run_copy(ctx, args.copy_mib * 2**20)
        print(f"[{ctx.watch.elapsed():6.1f}s] copy bandwidth: "
              f"{ctx.copy_gbps and round(ctx.copy_gbps)} GB/s", flush=True)
        if not args.no_elementwise:
            run_elementwise(ctx, args.elementwise_numel)
            print(f"[{ctx.watch.elapsed():6.1f}s] elementwise done", flush=True)
            write_outputs(ctx, args.out, final=False)
        for n, k, fmts in shapes:
            # the baseline's int4pack layout is CUDA's (a --dry-run on the CPU would time an ERR row)
            int4 = [] if args.no_int4 or ctx.device.type != "cuda" else ["int4"]
            groups = ["bf16"] + int4 + fmts + (["act"] if "Q4_K" in fmts else [])
            for g in groups:
                run_group(ctx, g, n, k, batches, modes)
            errs = sum(1 for r in ctx.rows if r["section"] == "gemv" and r["N"] == n and r["K"] == k
                       and r["error"])
            print(f"[{ctx.watch.elapsed():6.1f}s] {n}x{k} {','.join(fmts)} done ({errs} errors)", flush=True)
            write_outputs(ctx, args.out, final=False)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}): writing what was measured", flush=True)
    finally:
        text = write_outputs(ctx, args.out, final=True, header=header)
        print("\n" + "=" * 30 + " torchext bench summary " + "=" * 30)
        print(text, flush=True)

    if args.dry_run:
        bad = self_check(ctx, args.out, (args.out / "summary.txt").read_text())
        print(f"self-check: {'OK' if not bad else 'FAILED: ' + '; '.join(bad[:10])}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
