"""Timing, weight generation, derived columns and text/CSV/PNG output for the torchext benchmarks.

Everything that does not need a GPU lives here too (derived columns, tables, CSV, plot), so that
`python bench/gemv.py --dry-run` exercises it on a CPU machine with fake timings.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from torchext import formats

# ---- timing ------------------------------------------------------------------------------------

L2_FALLBACK_BYTES = 50 * 2**20  # H100's L2, used when the device does not report one


def l2_cache_bytes(device) -> int:
    """The device's L2 size in bytes (get_device_properties), else 50 MiB."""
    try:
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    except Exception:  # noqa: BLE001  (no CUDA, or an old torch without the field)
        size = 0
    return size if size > 0 else L2_FALLBACK_BYTES


def plan_copies(bytes_per_copy: int, l2_bytes: int, *, l2_factor: float = 4.0,
                mem_cap_bytes: float = 20e9, max_copies: int = 1024) -> int:
    """How many copies of the operands a cold-L2 measurement rotates through: enough that their
    total bytes exceed l2_factor x L2, but never more than mem_cap_bytes in all, nor max_copies
    (each copy costs one call in the captured graph). At least 1: one copy larger than 4x L2 is
    already cold, since each call streams it all through L2 before the next call starts again."""
    bytes_per_copy = max(1, int(bytes_per_copy))
    need = math.ceil(l2_factor * l2_bytes / bytes_per_copy)
    by_memory = int(mem_cap_bytes // bytes_per_copy)
    return max(1, min(need, by_memory, max_copies))


def plan_calls(copies: int, repeat: int) -> int:
    """Calls per captured graph: at least `repeat`, and whole passes over the copies so that every
    copy is read equally often."""
    return copies * math.ceil(max(1, repeat) / copies)


class GraphTimer:
    """Median per-call time of `calls` back-to-back calls captured in one CUDA graph.

    call(i) issues the i-th call (the caller rotates operand copies by i). One eager call on a side
    stream first does lazy initialisation (cuBLAS handles, workspaces) outside the capture, as the
    torch.cuda.graphs docs advise; then `warmup` replays, then `replays` replays each between two
    events, all queued before one synchronize. If capture fails (an op that is not capturable), the
    same calls are timed eagerly between events and the row says so (method "eager")."""

    method = "graph"

    def __init__(self, warmup: int = 2, replays: int = 7):
        self.warmup, self.replays = warmup, replays

    def __call__(self, call, calls: int, row: dict) -> tuple[float, str, str]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(0)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                for i in range(calls):
                    call(i)
        except Exception as e:  # noqa: BLE001  (record why, then time eagerly)
            torch.cuda.synchronize()
            note = f"graph capture failed ({short_error(e, 120)}); timed eagerly"
            return self._eager(call, calls), "eager", note
        try:
            for _ in range(self.warmup):
                graph.replay()
            ms = self._events(graph.replay, self.replays)
        finally:
            del graph
        return statistics.median(ms) * 1e3 / calls, "graph", ""

    def _eager(self, call, calls: int) -> float:
        def run():
            for i in range(calls):
                call(i)
        run()
        ms = self._events(run, self.replays)
        return statistics.median(ms) * 1e3 / calls

    @staticmethod
    def _events(fn, n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


# Fake bandwidths (GB/s) for --dry-run: arbitrary, deterministic, only there to exercise the
# derived columns, tables, CSV and plot on a machine without a GPU.
FAKE_GBPS = {"bf16": 2600.0, "int4": 1500.0, "Q4_K": 2300.0, "Q5_K": 2250.0, "Q6_K": 2200.0,
             "Q8_0": 2400.0, "Q5_0": 2100.0, "q4k_q8": 2350.0, "q8_1+q4k_q8": 2000.0, "q8_1": 900.0,
             "copy": 3000.0}


def fake_us(row: dict) -> float:
    """A made-up kernel time: 2 us of launch plus bytes at a per-label bandwidth, a little slower
    per extra activation row (so batch-8 / batch-1 ratios differ from 1)."""
    gbps = FAKE_GBPS.get(row["label"], 1800.0)
    batch = max(1, int(row.get("batch") or 1))
    return 2.0 + row["bytes"] / (gbps * 1e3) * (1.0 + 0.05 * (min(batch, 64) - 1))


class FakeTimer:
    """--dry-run: runs call(0) and call(calls - 1) for real (on the CPU; checks that the call and the
    copy rotation work), then reports fake_us instead of a measurement."""

    method = "fake"

    def __call__(self, call, calls: int, row: dict) -> tuple[float, str, str]:
        call(0)
        call(calls - 1)
        return fake_us(row), "fake", ""


def kernel_profile(call, calls: int) -> list[list]:
    """[kernel name, µs, launches] per call, most time first: torch.profiler over `calls` eager calls
    (one stream: the kernels do not overlap, and their sum is the call's busy time without the gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    call(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call(i)
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            entry = kernels.setdefault(e.name[:100], [e.name[:100], 0.0, 0.0])
            entry[1] += (e.time_range.end - e.time_range.start) / calls
            entry[2] += 1 / calls
    return sorted(kernels.values(), key=lambda entry: -entry[1])


# Set by latency_bench's --kernels: time_calls then also profiles each call's kernels.
PROFILE_KERNELS = False


def time_calls(calls: dict, repeat: int, row: dict) -> dict:
    """row with each named call's µs and method ("graph" or "eager"): GraphTimer over `repeat` calls;
    with PROFILE_KERNELS, also "<name>_kernels": kernel_profile's list."""
    timer = GraphTimer()
    for name, call in calls.items():
        row[name], row[f"{name}_method"], _ = timer(call, repeat, row)
        if PROFILE_KERNELS:
            row[f"{name}_kernels"] = kernel_profile(call, repeat)
    return row


def latency_bench(doc: str, stem: str, measure_rows, repeat: int) -> list[dict]:
    """The command line of the latency benchmarks (bench/norms.py, bench/attention.py, bench/gated_mlp.py):
    --out DIR, --dtype and --kernels (each call's kernels too, printed per row); exits without a CUDA
    device; measure_rows(dtype) gives the rows, written with the GPU, torch and dtype to
    DIR/<stem>.json; prints the heading line of the table and returns the rows."""
    global PROFILE_KERNELS
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--kernels", action="store_true",
                    help="profile each call's kernels (torch.profiler, eager) and print them, µs and launches a call")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"bench/{stem}.py needs a CUDA device")
    PROFILE_KERNELS = args.kernels
    rows = measure_rows(getattr(torch, args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype}
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"{meta['gpu']}, torch {meta['torch']}, {args.dtype}; us per call (CUDA graph of {repeat} calls)")
    for row in rows if args.kernels else []:
        described = ", ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, (float, list)) and
                              not k.endswith("_method"))
        for name in (k[:-len("_kernels")] for k in row if k.endswith("_kernels")):
            print(f"{described}, {name}: {row[name]:.2f} us by graph; eager kernels:")
            for kernel, us, launches in row[f"{name}_kernels"]:
                print(f"    {us:8.2f} us {launches:5.2f}x  {kernel}")
    return rows


def short_error(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


FATAL_MARKERS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                 "misaligned address", "an illegal instruction")


def is_fatal_cuda_error(text: str) -> bool:
    """A sticky CUDA error: every later call on this context fails too, so the run stops measuring."""
    return any(m in text for m in FATAL_MARKERS)


class Stopwatch:
    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def out_of_time(self) -> bool:
        return self.elapsed() > self.budget_s


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, the device tool's limit) raises KeyboardInterrupt: a run stops measuring
    and still writes its outputs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


class Measurements:
    """A run's rows and their measuring: args (seed, budget_s), the device, a timer (GraphTimer or
    FakeTimer), a generator, the L2 size. Each measurement is in its own try/except: a failure is
    recorded in its row and the run goes on, except after a sticky CUDA error (the rest is skipped)
    or once the time budget is spent."""

    def __init__(self, args, device, timer):
        self.args, self.device, self.timer = args, device, timer
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(args.seed)
        self.l2 = l2_cache_bytes(device) if device.type == "cuda" else L2_FALLBACK_BYTES
        self.watch = Stopwatch(args.budget_s)
        self.rows: list[dict] = []
        self.fatal = ""

    def measure(self, row: dict, call, calls: int) -> None:
        if self.fatal:
            row["error"] = f"skipped: earlier fatal CUDA error ({self.fatal[:80]})"
            return
        if self.watch.out_of_time():
            row["error"] = f"skipped: time budget of {self.args.budget_s:.0f} s spent"
            return
        try:
            us, method, note = self.timer(call, calls, row)
            row.update(us=us, method=method, note=" ".join(x for x in (row["note"], note) if x))
        except Exception as e:  # noqa: BLE001  (record and go on)
            self.fail(row, e)

    def fail(self, row: dict, e: BaseException) -> None:
        row["error"] = short_error(e) or "error"
        if is_fatal_cuda_error(row["error"]):
            self.fatal = row["error"]
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e2:  # noqa: BLE001
                self.fatal = self.fatal or short_error(e2)


# ---- random-but-realistic quantized weights ---------------------------------------------------

# Byte offsets of the scale fields inside one block, by format name (torchext's catalog).
SCALE_FIELDS = {q.name: offsets for q, offsets in formats.SCALE_FIELDS.items()}


def plain_fp16_scales(fmt: str) -> bool:
    """Whether the format's scale fields are plain fp16 words (not IQ1_M's split d, not FP4 scales)."""
    return formats.scale_field_bytes(fmt) == 2


def random_quant_weight(fmt: str, n: int, k: int, copies: int, device, gen) -> torch.Tensor:
    """`copies` independent random weights [copies, n, row_bytes] uint8, made on `device`: random
    bytes (every 6-bit scale code, nibble and sign occurs) with each scale field overwritten by a
    small positive finite value in [0.001, 0.011) (fp16; MXFP4's and NVFP4's scales round it to
    their codes), so no block decodes to inf/NaN and none is 0. Each copy w[c] is contiguous and
    keeps the format's alignment (row bytes are multiples of it)."""
    import torchext

    bb = torchext.block_bytes(fmt)
    rb = torchext.row_bytes(fmt, k)
    nb = rb // bb
    w = torch.randint(0, 256, (copies, n, rb), dtype=torch.uint8, device=device, generator=gen)
    blocks = w.view(copies, n, nb, bb)
    width = formats.scale_field_bytes(fmt)
    for off in SCALE_FIELDS[fmt]:
        d = torch.rand((copies, n, nb), device=device, generator=gen).mul_(0.01).add_(0.001).half()
        if plain_fp16_scales(fmt):
            blocks[..., off:off + 2] = d.view(torch.uint8).view(copies, n, nb, 2)
        else:  # encoded by the catalog (on the CPU: these formats' fields are a small part of the bytes)
            field = blocks[..., off:off + width].cpu().numpy()
            formats.put_scale_field(field, fmt, 0, d.cpu().numpy())
            blocks[..., off:off + width] = torch.from_numpy(field).to(device)
    return w


# ---- derived columns ---------------------------------------------------------------------------

CSV_FIELDS = ["section", "label", "op", "format", "dtype", "N", "K", "batch", "l2", "us", "bytes",
              "gbps", "tflops", "pct_copy", "x_bf16", "b8_over_b1", "calls", "copies", "footprint_mb",
              "method", "note", "error"]


def new_row(**kw) -> dict:
    row = {f: "" for f in CSV_FIELDS}
    row.update(kw)
    return row


def _num(v):
    return None if v in ("", None) else float(v)


def derive(rows: list[dict], copy_gbps: float | None) -> None:
    """Fill gbps, tflops (2 * batch * N * K multiply-adds' flops per second, matmuls), pct_copy,
    x_bf16 (bf16 F.linear time / this time, same N, K, batch, L2) and b8_over_b1 (this op's batch-8
    time / its batch-1 time, same N, K, L2) in place."""
    bf16 = {}
    b1 = {}
    for r in rows:
        us = _num(r["us"])
        if us is None or us <= 0 or r["error"]:
            continue
        r["gbps"] = float(r["bytes"]) / us / 1e3  # bytes / (us * 1e-6) / 1e9
        if copy_gbps:
            r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
        if r["section"] == "gemv":
            r["tflops"] = 2.0 * int(r["batch"]) * int(r["N"]) * int(r["K"]) / us / 1e6
            key = (r["N"], r["K"], r["batch"], r["l2"])
            if r["label"] == "bf16":
                bf16[key] = us
            if int(r["batch"]) == 1:
                b1[(r["label"], r["format"], r["N"], r["K"], r["l2"])] = us
    for r in rows:
        us = _num(r["us"])
        if us is None or us <= 0 or r["error"] or r["section"] != "gemv":
            continue
        ref = bf16.get((r["N"], r["K"], r["batch"], r["l2"]))
        if ref is not None:
            r["x_bf16"] = ref / us
        if int(r["batch"]) == 8:
            one = b1.get((r["label"], r["format"], r["N"], r["K"], r["l2"]))
            if one is not None:
                r["b8_over_b1"] = us / one


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ---- text tables -------------------------------------------------------------------------------

def fmt_us(v) -> str:
    v = _num(v)
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_f(v, spec: str) -> str:
    v = _num(v)
    return "-" if v is None else format(v, spec)


def render(header: list[str], body: list[list[str]], right: bool = True) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    def line(cells):
        return " ".join((str(c).rjust(w) if (right and i) else str(c).ljust(w))
                        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def cell(row: dict | None) -> str:
    """A table cell: the time, or why there is none."""
    if row is None:
        return "-"
    if row["error"]:
        return "skip" if row["error"].startswith("skipped") else "ERR"
    return fmt_us(row["us"])


# ---- plot ----------------------------------------------------------------------------------------

def plot_batches(path, rows: list[dict], labels: list[str]) -> str:
    """Per shape (one column): effective GB/s (top) and TFLOP/s (bottom) against the batch, one line
    per op, L2 cold. For runs over several batches (--batches); returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"batch plot skipped: matplotlib is not importable ({short_error(e, 80)})"
    ok = [r for r in rows if r["section"] == "gemv" and not r["error"] and r["gbps"] != "" and r["l2"] == "cold"
          and r["label"] in labels]
    shapes = list(dict.fromkeys((int(r["N"]), int(r["K"])) for r in ok))
    if not shapes or len({int(r["batch"]) for r in ok}) < 3:
        return "batch plot skipped: fewer than 3 batches measured (L2 cold)"
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 8), squeeze=False)
    palette = plt.get_cmap("tab10").colors
    for col, (n, k) in enumerate(shapes):
        for i, lb in enumerate(labels):
            pts = sorted((int(r["batch"]), r["gbps"], r["tflops"]) for r in ok
                         if r["label"] == lb and (int(r["N"]), int(r["K"])) == (n, k))
            if not pts:
                continue
            style = dict(color="k", linewidth=2) if lb == "bf16" else dict(color=palette[i % len(palette)])
            for row, metric in ((0, 1), (1, 2)):
                axes[row, col].plot([p[0] for p in pts], [p[metric] for p in pts], marker=".", label=lb, **style)
        for row, unit in ((0, "effective GB/s"), (1, "TFLOP/s")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("activation rows (batch)")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", linewidth=0.3)
        axes[0, col].set_title(f"{n}x{k}, L2 cold")
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"batch plot written: {path}"


def plot(path, rows: list[dict], copy_gbps: float | None, gemv_labels: list[str],
         elementwise_labels: list[str]) -> str:
    """GB/s at batch 1 per shape and op (one panel per L2 mode) with the bf16 F.linear level of each
    shape and the copy-bandwidth roofline; below, the large elementwise ops. Returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"plot skipped: matplotlib is not importable ({short_error(e, 80)})"

    ok = [r for r in rows if not r["error"] and r["gbps"] != ""]
    modes = [m for m in ("cold", "warm") if any(r["section"] == "gemv" and r["l2"] == m for r in ok)]
    ew = [r for r in ok if r["section"] == "elementwise"]
    nrows = len(modes) + (1 if ew else 0)
    if nrows == 0:
        return "plot skipped: no successful measurement"
    fig, axes = plt.subplots(nrows, 1, figsize=(14, 4.6 * nrows), squeeze=False)
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # 7 is grey: bf16's
    color_of = {lb: ("0.6" if lb == "bf16" else palette[j % len(palette)])
                for j, lb in enumerate(lb for lb in gemv_labels if lb != "bf16")}
    color_of["bf16"] = "0.6"
    for ax, mode in zip(axes[:, 0], modes):
        b1 = [r for r in ok if r["section"] == "gemv" and r["l2"] == mode and int(r["batch"]) == 1
              and r["label"] in color_of]
        shapes = list(dict.fromkeys((int(r["N"]), int(r["K"])) for r in b1))
        seen = set()
        for i, s in enumerate(shapes):
            here = [lb for lb in gemv_labels if any(r["label"] == lb and (int(r["N"]), int(r["K"])) == s
                                                    for r in b1)]
            width = 0.8 / max(1, len(here))
            for j, lb in enumerate(here):
                hit = [r for r in b1 if r["label"] == lb and (int(r["N"]), int(r["K"])) == s]
                ax.bar(i - 0.4 + (j + 0.5) * width, hit[0]["gbps"], width, color=color_of[lb],
                       label=None if lb in seen else lb)
                seen.add(lb)
        for i, s in enumerate(shapes):
            ref = [r for r in b1 if r["label"] == "bf16" and (int(r["N"]), int(r["K"])) == s]
            if ref:
                ax.hlines(ref[0]["gbps"], i - 0.45, i + 0.45, colors="k", linewidth=1.2,
                          label="bf16 F.linear" if i == 0 else None)
        if copy_gbps:
            ax.axhline(copy_gbps, color="r", linestyle="--", linewidth=1,
                       label=f"copy bandwidth {copy_gbps:.0f} GB/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{n}x{k}" for n, k in shapes], fontsize=8)
        ax.set_ylabel("effective GB/s")
        ax.set_title(f"batch 1, L2 {mode}: (weight + activation + output bytes) / kernel time")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    if ew:
        ax = axes[-1, 0]
        dtypes = list(dict.fromkeys(r["dtype"] for r in ew))
        labels = [lb for lb in elementwise_labels if any(r["label"] == lb for r in ew)]
        width = 0.8 / max(1, len(dtypes))
        for j, dt in enumerate(dtypes):
            xs, ys = [], []
            for i, lb in enumerate(labels):
                hit = [r for r in ew if r["label"] == lb and r["dtype"] == dt]
                if hit:
                    xs.append(i - 0.4 + (j + 0.5) * width)
                    ys.append(hit[0]["gbps"])
            ax.bar(xs, ys, width, label=dt, color=palette[j % len(palette)])
        if copy_gbps:
            ax.axhline(copy_gbps, color="r", linestyle="--", linewidth=1, label="copy bandwidth")
            ax.axhline(0.8 * copy_gbps, color="r", linestyle=":", linewidth=1, label="80% of copy")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title("large elementwise ops")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written: {path}"
