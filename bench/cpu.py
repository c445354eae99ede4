"""torchext's CPU kernels against llama.cpp's CPU backend on the same machine and threads.

    python bench/cpu.py [--llama-cpp DIR] [--threads 2] [--gemv-threads T] [--rows 1]
                        [--formats Q4_K Q8_0 ...] [--gemma] [--dense]
    python bench/cpu.py --crossover [--threads 2] [--shape 4096x4096] [--dtype float32] [--formats ...]

GEMV, batch 1 (--rows), N x K = 4096 x 14336 per format: torchext.qmatmul (activation quantization
included, as llama.cpp's MUL_MAT includes it), the median of timed calls, against `test-backend-ops
perf -b CPU -o MUL_MAT` for the same type and shape (llama.cpp's own timing loop). That loop runs the
op on one weight again and again, so torchext's compared column does the same ("1 weight"); the
"2 weights" column alternates two copies, which on the 2-core VM CI runs on (480 MiB of L3 shared
with other guests) doubled or tripled the time: a 62 MB Q8_0 weight stayed in cache, two did not
(2026-12-03: 3.1-3.4 against 7.9-8.4 ms). test-backend-ops runs its CPU backend on half the
hardware threads (one on a 2-core machine), so torchext's GEMV runs on as many here unless
--gemv-threads says otherwise (llama.cpp's figure is then for its own thread count). The kernels
are those TORCHEXT_CPU_KERNELS picks (README, "On the CPU"): set it to time, say, the AVX2 GEMV on
a CPU with VNNI. With --gemma, Gemma 3 270M Q4_K_M decode tok/s:
torchext's eager generate() against `llama-bench -n 32 -p 0`. With --dense, the dense path (rows past
the format's GEMV limit, here forced by exact=True: each thread dequantizes tiles of weight rows to
fp32 and multiplies each by torch's GEMM) against F.linear on the whole dequantized fp32 weight,
--threads threads, 17 / 64 / 256 rows, for --formats at 4096x4096, 14336x4096 and 4096x14336 (the
median of 9 calls each). With --crossover, where the CPU's GEMV stops beating the dense path (the
catalog's CPU GEMV rows, kernels/batch_policy.h): for every format (or --formats), ms of the GEMV
(quantize_q8_1 + qmatmul_q8_1, at any row count) / the dense path (qmatmul exact=True) on --shape,
best of 3 twice with the paths alternating, at 1 to 128 rows until the GEMV has lost twice in a row;
random blocks with finite scales (the times do not depend on the values), 256 rows repeated.

DIR is a llama.cpp CPU build (its bin/ holds test-backend-ops and llama-bench). To make one from
PyPI's llama-cpp-python sdist, which vendors llama.cpp:
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=ON && \\
        cmake --build build -j --target llama-bench test-backend-ops
Without DIR only torchext's side is measured.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchext  # noqa: E402
from torchext.cli import int_at_least, shape_arg  # noqa: E402
from torchext.formats import (QUANTIZABLE_TYPES, SCALE_FIELDS, WEIGHT_TYPES, QType, block_bytes,  # noqa: E402
                               block_values, put_scale_field)

N, K = 4096, 14336
FORMATS = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def time_torchext(fmt: str, rows: int, reps: int, copies: int, warmup_s: float = 2.0) -> float:
    """Median µs of qmatmul on `rows` rows, `copies` weight copies taken in turn, after warmup_s
    seconds of calls: on a 2-core VM (2026-12-02) the first hundred or so calls on freshly written
    weights ran up to 3x slower."""
    g = torch.Generator().manual_seed(0)
    ws = [torchext.quantize(torch.randn(N, K, generator=g) * 0.02, fmt) for _ in range(copies)]
    x = torch.randn(rows, K, generator=g)
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        for w in ws:
            torchext.qmatmul(w, fmt, x, N, K)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        torchext.qmatmul(ws[i % copies], fmt, x, N, K)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def time_llama_cpp(bin_dir: Path, fmt: str, rows: int) -> float | None:
    """µs per MUL_MAT of test-backend-ops perf (CPU backend, f32 activations, `rows` rows)."""
    exe = bin_dir / "test-backend-ops"
    params = rf"type_a={fmt[0].lower() + fmt[1:]},type_b=f32,m={N},n={rows},k={K},"  # ggml: q4_K, q8_0
    out = subprocess.run([str(exe), "perf", "-b", "CPU", "-o", "MUL_MAT", "-p", re.escape(params)],
                         capture_output=True, text=True, timeout=600)
    m = re.search(r"([\d.]+) us/run", out.stdout)
    return float(m.group(1)) if m else None


def gemma_torchext(tokens: int = 32) -> float:
    from torchext.models.gemma3 import gguf_path, generate, load_gemma3
    model, tok, _ = load_gemma3(gguf_path(), device="cpu", max_seq_len=256)
    prompt = tok.encode("The three primary colors are")
    with torch.inference_mode():
        generate(model, prompt, 2)
        start = time.perf_counter()
        generate(model, prompt, tokens, stop=set())  # all `tokens` of them, as llama-bench -n
        return tokens / (time.perf_counter() - start)


def gemma_llama_cpp(bin_dir: Path, threads: int) -> float | None:
    from torchext.models.gemma3 import gguf_path
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf_path()), "-t", str(threads), "-p", "0",
                          "-n", "32", "-o", "csv"], capture_output=True, text=True, timeout=900)
    rows = [line.split(",") for line in out.stdout.splitlines()]
    if len(rows) < 2:
        return None
    head = [h.strip('"') for h in rows[0]]
    return float(rows[-1][head.index("avg_ts")].strip('"'))


DENSE_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
DENSE_ROWS = [17, 64, 256]


def call_ms(fn, reps: int, warmup: int) -> list[float]:
    """ms of each of reps calls of fn, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def median_ms(fn, reps: int = 9) -> float:
    return statistics.median(call_ms(fn, reps, warmup=2))


def dense_rows(formats: list[str]) -> None:
    """The dense path against F.linear on the dequantized fp32 weight (see the module docstring)."""
    print(f"dense path, {torch.get_num_threads()} threads: F.linear on the fp32 weight / torchext, ms (ratio)")
    for fmt in formats:
        for n, k in DENSE_SHAPES:
            g = torch.Generator().manual_seed(0)
            # 256 quantized rows repeated (the reference quantizers take minutes for 58M values;
            # the time of either path does not depend on the values)
            w = torchext.quantize(torch.randn(256, k, generator=g) * 0.02, fmt).view(256, -1).repeat(n // 256, 1)
            dense = torchext.dequantize(w, fmt, n, k, torch.float32)
            cells = []
            for rows in DENSE_ROWS:
                x = torch.randn(rows, k, generator=g)
                ours = median_ms(lambda: torchext.qmatmul(w, fmt, x, n, k, exact=True))
                theirs = median_ms(lambda: torch.nn.functional.linear(x, dense))
                cells.append(f"{rows} rows {theirs:.2f} / {ours:.2f} ({theirs / ours:.2f})")
            print(f"{fmt} {n}x{k}: " + ", ".join(cells), flush=True)


CROSSOVER_ROWS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]


def random_blocks(q: QType, n: int, k: int) -> torch.Tensor:
    """n rows of k values of format q: 256 rows of random bytes with N(0, 0.01) scales, repeated."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(256, k // block_values(q), block_bytes(q)), dtype=np.uint8)
    for off in SCALE_FIELDS[q]:
        put_scale_field(raw, q, off, rng.standard_normal(raw.shape[:2]) * 0.01)
    return torch.from_numpy(raw.reshape(256, -1)).repeat(-(-n // 256), 1)[:n].contiguous()


def crossover(formats: list[QType], n: int, k: int, dtype: torch.dtype) -> None:
    """GEMV / dense-path ms per format and row count (see the module docstring)."""
    print(f"GEMV / dense path, ms, {n}x{k}, {dtype}, {torch.get_num_threads()} threads")
    for q in formats:
        w, g, cells, losses = random_blocks(q, n, k), torch.Generator().manual_seed(1), [], 0
        for rows in CROSSOVER_ROWS:
            x = torch.randn(rows, k, generator=g).to(dtype)
            paths = (lambda: torchext.qmatmul_q8_1(w, q, torchext.quantize_q8_1(x), n, k, dtype),
                     lambda: torchext.qmatmul(w, q, x, n, k, exact=True))
            gemv, dense = (min(t) for t in zip(*[[min(call_ms(f, 3, warmup=1)) for f in paths] for _ in range(2)]))
            cells.append(f"{rows}: {gemv:.2f} / {dense:.2f}")
            losses = losses + 1 if gemv > dense else 0
            if losses == 2:
                break
        print(f"{q.name}: " + ", ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, help="a llama.cpp CPU build folder (with bin/)")
    # counts below 1 and unknown formats were tracebacks (set_num_threads, the median of nothing, quantize)
    p.add_argument("--threads", type=int_at_least(1), default=2, help="threads for the Gemma decode (both sides)")
    p.add_argument("--gemv-threads", type=int_at_least(1), default=max(1, (os.cpu_count() or 2) // 2),
                   help="threads for torchext's GEMV (default: test-backend-ops' CPU thread count)")
    p.add_argument("--rows", type=int_at_least(1), default=1, help="GEMV batch (activation rows)")
    p.add_argument("--formats", nargs="+", type=str.upper, choices=[q.name for q in WEIGHT_TYPES],
                   metavar="FORMAT", help=f"default: {' '.join(FORMATS)} (--dense: Q4_K; --crossover: every format)")
    p.add_argument("--reps", type=int_at_least(1), default=21)
    p.add_argument("--gemma", action="store_true", help="also Gemma 3 270M decode (needs the gemma extra)")
    p.add_argument("--dense", action="store_true", help="only the dense path against F.linear")
    p.add_argument("--crossover", action="store_true", help="the GEMV against the dense path, by format and rows")
    p.add_argument("--shape", type=shape_arg, default=(4096, 4096), metavar="NxK", help="--crossover's weight")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="--crossover's")
    a = p.parse_args()
    unquantizable = [f for f in a.formats or [] if QType[f] not in QUANTIZABLE_TYPES]
    if unquantizable and not a.crossover:  # the other modes quantize float weights
        p.error(f"--formats: torchext.quantize does not make {' '.join(unquantizable)} (--crossover times them)")
    # checked before minutes of timing: a missing program was a traceback, the gemma extra one at the very end
    if a.llama_cpp and not a.dense:
        for exe in ["test-backend-ops"] + (["llama-bench"] if a.gemma else []):
            if not (a.llama_cpp / "bin" / exe).is_file():
                p.error(f"--llama-cpp {a.llama_cpp}: expected a llama.cpp build folder holding bin/{exe}")
    if a.gemma and not a.dense:
        from torchext.models.gemma3 import gguf_path
        try:
            gguf_path()
        except RuntimeError as e:
            p.error(f"--gemma: {e}")
    if a.dense:
        torch.set_num_threads(a.threads)
        dense_rows(a.formats or ["Q4_K"])
        return
    if a.crossover:
        torch.set_num_threads(a.threads)
        n, k = a.shape
        crossover([QType[f] for f in a.formats] if a.formats else list(WEIGHT_TYPES), n, k, getattr(torch, a.dtype))
        return
    a.formats = a.formats or FORMATS
    bin_dir = a.llama_cpp / "bin" if a.llama_cpp else None
    torch.set_num_threads(a.gemv_threads)
    kernels = os.environ.get("TORCHEXT_CPU_KERNELS") or "auto"
    print(f"CPU, torch {torch.__version__}, TORCHEXT_CPU_KERNELS={kernels}; GEMV batch {a.rows}, "
          f"N x K = {N} x {K}, {a.gemv_threads} thread(s), µs")
    print(f"{'format':7} {'torchext, 1 weight':>19} {'llama.cpp':>10} {'llama.cpp / torchext':>21} "
          f"{'torchext, 2 weights':>20}")
    for fmt in a.formats:
        ours = time_torchext(fmt, a.rows, a.reps, copies=1)
        theirs = time_llama_cpp(bin_dir, fmt, a.rows) if bin_dir else None
        ratio = f"{theirs / ours:21.2f}" if theirs else f"{'-':>21}"
        two = time_torchext(fmt, a.rows, a.reps, copies=2)
        print(f"{fmt:7} {ours:19.1f} {theirs if theirs else '-':>10} {ratio} {two:20.1f}")
    if a.gemma:
        torch.set_num_threads(a.threads)
        ours = gemma_torchext()
        theirs = gemma_llama_cpp(bin_dir, a.threads) if bin_dir else None
        print(f"Gemma 3 270M Q4_K_M decode, tok/s: torchext {ours:.1f} (eager), llama.cpp "
              f"{theirs if theirs else '-'}" + (f" ({ours / theirs:.2f}x)" if theirs else ""))


if __name__ == "__main__":
    main()
