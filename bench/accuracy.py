"""Accuracy of the Q8_1 GEMV on real weights: Gemma 3 270M Q4_K_M's matrices.

For every 2-D weight of the file, in its own format (Q4_K, Q6_K, Q5_0, Q8_0 there) and requantized
by torchext.quantize into each other format it writes (not the grid IQ formats but IQ3_S), y =
qmatmul(w, x) for one row of Gaussian activations (the GEMV path: x rounded to Q8_1) against x @ W.T
in float64 on the same dequantized weight W; the error is norm-relative, ||y - ref|| / ||ref||, per
tensor. Prints one row per format: tensors, median and largest error, and the median of the same
error had the GEMV met each block's offset with the sum of the unrounded inputs (ggml's fp16 `s`,
the rule torchext used before) instead of d * sum(q), computed in numpy from the same bytes.

    python bench/accuracy.py [--gguf PATH] [--device cpu|cuda] [--rows 1] [--limit-n 8192]
    python bench/accuracy.py --synthetic 4096x4096 --device cuda --rows 32 --dtype bfloat16

The weight is the file's (or its requantization): the error is the activations' rounding alone.
--synthetic takes a Gaussian weight (std 0.02) quantized into every format `quantize` writes
instead of a file, and prints the error with exact=False and exact=True: beyond the GEMVs' rows
(torchext.ops.gemv_max_rows; no activation rounding) on CUDA in bf16 the tiled GEMM computes the
weights in bf16 unless exact=True (the same float64 reference: x as rounded to the dtype).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchext  # noqa: E402
from torchext.cli import gguf_file_arg, int_at_least, shape_arg  # noqa: E402
from torchext.formats import QUANTIZABLE_TYPES, WEIGHT_TYPES, QType, whole_blocks_error  # noqa: E402
from torchext.cli import device_arg  # noqa: E402

# The formats whose offset unrounded_offset_error splits from the scaled part (the old rule's column).
OFFSET_FORMATS = (QType.Q4_K, QType.Q5_K, QType.Q4_0, QType.Q5_0, QType.Q4_1, QType.Q5_1)


def q8_1_dequantized(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x^, s): the activations as the GEMV sees them (d * q per 32-value block, from
    torchext.quantize_q8_1's bytes) and each block's sum of the unrounded inputs in fp16."""
    xq = torchext.quantize_q8_1(torch.from_numpy(x)).numpy()
    k = x.shape[-1]
    blk = xq.reshape(x.shape[0], -1, 36)
    word = np.ascontiguousarray(blk[..., :4]).view("<u4")[..., 0]
    d = (word & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
    q = blk[..., 4:].view(np.int8).astype(np.float64)
    xhat = (d[..., None] * q).reshape(x.shape[0], -1)[:, :k]
    xp = np.zeros_like(xhat, shape=(x.shape[0], blk.shape[1] * 32))
    xp[:, :k] = x
    return xhat, xp.reshape(x.shape[0], -1, 32).sum(-1).astype(np.float16).astype(np.float64)  # ggml's fp16 s


def unrounded_offset_error(W: np.ndarray, w_bytes: np.ndarray, qtype: QType, x: np.ndarray, ref: np.ndarray):
    """Norm-relative error of the old rule, for formats with a per-block offset (Q4_K/Q5_K mins,
    Q4_0/Q5_0 zero points, Q4_1/Q5_1 mins): the scaled term meets x^, the offset term meets the sum
    of the unrounded x. None for the other formats: Q6_K and Q8_0 have no offset, and the byte layouts of
    the rest (Q2_K, Q3_K, TQ*, MXFP4, IQ*) are not split here."""
    from gguf.quants import dequantize as gguf_dequantize
    from gguf import GGMLQuantizationType as G
    if qtype not in OFFSET_FORMATS:
        return None
    n, k = W.shape
    xhat, s = q8_1_dequantized(x)
    # split W into its scaled part and its per-32-value offset: W = A - off (off constant per block)
    raw = w_bytes.reshape(n, -1)
    if qtype in (QType.Q4_K, QType.Q5_K):
        blk = raw.reshape(n, -1, raw.shape[1] // (-(-k // 256)))
        zeroed = blk.copy()
        zeroed[..., 2:4] = 0  # dmin = 0: the scaled part alone
        A = gguf_dequantize(zeroed.reshape(n, -1), G(int(qtype)))[:, :k].astype(np.float64)
    else:
        size = {QType.Q4_0: 18, QType.Q5_0: 22, QType.Q4_1: 20, QType.Q5_1: 24}[qtype]
        blk = raw.reshape(n, -1, size)
        zeroed = blk.copy()
        if qtype in (QType.Q4_1, QType.Q5_1):
            zeroed[..., 2:4] = 0  # m = 0
            A = gguf_dequantize(zeroed.reshape(n, -1), G(int(qtype)))[:, :k].astype(np.float64)
        else:  # zero point z: W = d*q - z*d; A = d*q
            z = 8 if qtype == QType.Q4_0 else 16
            d = blk[..., :2].copy().view("<f2")[..., 0].astype(np.float64)
            A = W + np.repeat(z * d, 32, axis=1)[:, :k]
    off = A - W  # constant over each 32-value block
    off_blocks = off[:, ::32]
    y_old = xhat @ A.T - s[:, : off_blocks.shape[1]] @ off_blocks.T
    return np.linalg.norm(y_old - ref) / np.linalg.norm(ref)


def synthetic(a) -> None:
    n, k = a.synthetic
    g = torch.Generator().manual_seed(a.seed)
    dense = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(a.rows, k, generator=g).to(getattr(torch, a.dtype))
    x64 = x.double().numpy()
    print(f"Gaussian {n}x{k} weight, {a.rows} Gaussian row(s), {a.dtype}, {a.device}; norm-relative error, "
          "exact=False then exact=True")
    for fmt in QUANTIZABLE_TYPES:
        w = torchext.quantize(dense, fmt)
        ref = x64 @ torchext.dequantize(w, fmt, n, k).double().numpy().T
        errs = []
        for exact in (False, True):
            y = torchext.qmatmul(w.to(a.device), fmt, x.to(a.device), n, k, exact=exact).double().cpu().numpy()
            errs.append(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        print(f"{fmt.name:7} {errs[0]:10.2e} {errs[1]:10.2e}")


def main(argv=None) -> None:
    """Run the measurement with command-line arguments argv (default sys.argv[1:])."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # bad values were tracebacks (a missing file, no GPU, --limit-n 0) or NaN errors (--rows 0)
    p.add_argument("--gguf", type=gguf_file_arg, help="a GGUF file (default: the gemma extra's Gemma 3 270M Q4_K_M)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:INDEX] (default cpu)")
    p.add_argument("--rows", type=int_at_least(1), default=1,
                   help="activation rows (a file's matrices take float32: <= 16 is the GEMV path)")
    p.add_argument("--limit-n", type=int_at_least(1), default=8192, help="use at most this many rows of each weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", metavar="NxK", type=shape_arg, help="a Gaussian weight instead of a file")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the activations' dtype (with --synthetic; a file's matrices take float32)")
    a = p.parse_args(argv)
    if a.synthetic:
        return synthetic(a)
    if a.dtype != "float32":
        p.error("--dtype needs --synthetic")

    from gguf import GGUFReader
    from torchext.gguf_file import ggml_k_n
    path = a.gguf
    if path is None:
        from torchext.models.gemma3 import gguf_path
        try:
            path = gguf_path()
        except RuntimeError as e:  # the gemma extra is not installed: say how to get the file
            p.error(f"no --gguf given, and {e}, or pass --gguf PATH")
    reader = GGUFReader(str(path))
    rng = np.random.default_rng(a.seed)
    errs = defaultdict(list)
    old = defaultdict(list)
    native = {}
    for t in reader.tensors:
        if len(t.shape) != 2 or int(t.tensor_type) not in {int(q) for q in WEIGHT_TYPES}:
            continue
        k, n = ggml_k_n(t)
        qt = QType(int(t.tensor_type))
        w_file = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(n, -1))[: a.limit_n].contiguous()
        n = w_file.shape[0]
        W = torchext.dequantize(w_file, qt, n, k).double().numpy()
        native.setdefault(qt.name, 0)
        native[qt.name] += 1
        x = rng.standard_normal((a.rows, k)).astype(np.float32)
        for fmt in WEIGHT_TYPES:
            if fmt != qt and fmt not in QUANTIZABLE_TYPES:  # no quantizer: the file's own format only
                continue
            if fmt != qt and whole_blocks_error(fmt, k):  # rows this format cannot take
                continue
            w = w_file if fmt == qt else torchext.quantize(torch.from_numpy(W).float(), fmt)
            Wf = W if fmt == qt else torchext.dequantize(w, fmt, n, k).double().numpy()
            ref = x.astype(np.float64) @ Wf.T
            y = torchext.qmatmul(w.to(a.device), fmt, torch.from_numpy(x).to(a.device), n, k).double().cpu().numpy()
            key = (fmt.name, "file" if fmt == qt else "requantized")
            errs[key].append(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            e_old = unrounded_offset_error(Wf, w.numpy(), fmt, x, ref)
            if e_old is not None:
                old[key].append(e_old)
    print(f"{path.name}: {sum(native.values())} matrices {dict(native)}; {a.rows} Gaussian row(s), {a.device}")
    print(f"{'format':7} {'weights':12} {'tensors':>7} {'median':>8} {'max':>8} {'old rule median':>16} {'old max':>8}")
    for key in sorted(errs, key=lambda kv: (kv[1] != "file", kv[0])):
        e, o = errs[key], old.get(key)
        old_cols = f"{100 * statistics.median(o):15.2f}% {100 * max(o):7.2f}%" if o else f"{'-':>16} {'-':>8}"
        print(f"{key[0]:7} {key[1]:12} {len(e):7d} {100 * statistics.median(e):7.2f}% {100 * max(e):7.2f}% {old_cols}")


if __name__ == "__main__":
    main()
