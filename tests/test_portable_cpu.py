"""The portable CPU kernels (what a CPU without AVX2, FMA and F16C runs), forced on this CPU with
TORCHEXT_CPU_KERNELS=portable in a subprocess, against the default (AVX2) kernels in this process.

dequantize, quantize_q8_1 and embedding compute one formula per value and must give the same bits.
The GEMV (1 to 16 rows) sums the same exact per-block terms in a different order: within fp32
summation error, 1e-5 * (|x^| @ |W|.T) with x^ the Q8_1-rounded activations (test_matmul's bound for
fp32 accumulation; |x^| <= 2|x| elementwise up to blocks' rounding, so 2e-5 * (|x| @ |W|.T) is used). GELU's vector exp/erf differ from libm's in the last bits:
within 4 fp32 ulps (measured <= 1). The dense path (17+ rows) is torch's GEMM either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchext
from conftest import WEIGHT_QTYPES, random_weight

REPO = Path(__file__).resolve().parent.parent
SHAPES = {q: (48, 512) for q in WEIGHT_QTYPES}


def outputs() -> dict:
    """Every CPU op on fixed inputs; keys name the op and its arguments."""
    torch.manual_seed(0)
    out = {}
    for q in WEIGHT_QTYPES:
        n, k = SHAPES[q]
        w = random_weight(q, n, k, seed=int(q))
        out[f"dequantize-{q.name}"] = torchext.dequantize(w, int(q), n, k)
        out[f"embedding-{q.name}"] = torchext.embedding(w, int(q), torch.tensor([3, 0, 47]), n, k, dtype=torch.bfloat16)
        for rows in (1, 5, 16):
            x = torch.randn(rows, k)
            out[f"qmatmul-{q.name}-{rows}"] = torchext.qmatmul(w, int(q), x, n, k)
            out[f"x-{q.name}-{rows}"] = x
    x = torch.randn(7, 300) * 3
    out["x-gelu"] = x
    out["quantize_q8_1"] = torchext.quantize_q8_1(x)
    out["gelu"] = torchext.gelu(x)
    out["gelu-tanh"] = torchext.gelu(x, approximate="tanh")
    return out


def test_portable_kernels_agree_with_the_default_ones(tmp_path):
    saved = tmp_path / "portable.pt"
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; import torch; "
            f"import test_portable_cpu as t; torch.save(t.outputs(), {str(saved)!r})")
    env = dict(os.environ, TORCHEXT_CPU_KERNELS="portable", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    portable, default = torch.load(saved), outputs()
    assert portable.keys() == default.keys()
    differs = False
    for key, p in portable.items():
        d = default[key]
        if key.startswith(("dequantize", "embedding", "quantize", "x-")):
            assert torch.equal(p, d), key
        elif key.startswith("gelu"):
            assert ((p - d).abs() <= 2.0**-20 * default["x-gelu"].abs() + 1e-37).all(), key
        elif key.startswith("qmatmul"):
            _, name, rows = key.split("-")
            q = torchext.QType[name]
            n, k = SHAPES[q]
            wd = torchext.dequantize(random_weight(q, n, k, seed=int(q)), int(q), n, k).double()
            absref = default[f"x-{name}-{rows}"].double().abs() @ wd.abs().T
            assert ((p.double() - d.double()).abs() <= 2e-5 * absref + 1e-30).all(), key
            differs |= not torch.equal(p, d)
    # the variable took effect: the summation order differs somewhere
    assert differs, "TORCHEXT_CPU_KERNELS=portable changed nothing: were the portable kernels run?"


def test_unknown_choice_is_an_error():
    code = "import torch, torchext; torchext.quantize_q8_1(torch.ones(1, 32))"
    env = dict(os.environ, TORCHEXT_CPU_KERNELS="avx9000", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TORCHEXT_CPU_KERNELS: expected 'portable' or 'auto', got 'avx9000'" in r.stderr
