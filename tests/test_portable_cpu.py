"""The CPU kernels chosen with TORCHEXT_CPU_KERNELS, each in a subprocess: the portable ones (what a
CPU without AVX2, FMA and F16C runs) against the default ones in this process, and the VNNI GEMV
against the AVX2 one where the CPU has VNNI.

dequantize, quantize_q8_1, embedding, the fused norms (rms_norm_quantize_q8_1,
add_rms_norm_quantize_q8_1) and rope_cache_write compute one formula per value, in one order, and must give
the same bits (but for which NaN a NaN is).
The GEMV (1 to 16 rows) sums the same exact per-block terms in a different order: within fp32
summation error, 1e-5 * (|x^| @ |W|.T) with x^ the Q8_1-rounded activations (test_matmul's bound for
fp32 accumulation; |x^| <= 2|x| elementwise up to blocks' rounding, so 2e-5 * (|x| @ |W|.T) is used). GELU's vector exp/erf differ from libm's in the last bits:
within 4 fp32 ulps (measured <= 1). cached_attention (the AVX2 path's vector exp and summation order, and
a decode row cut into spans) is checked on both sides against test_attention's float64 oracle within its
bound. The GEMV runs as qmatmul_q8_1 (qmatmul's GEMV path, bit for bit, at any row count); the dense
path is torch's GEMM either way. The VNNI
and AVX2 GEMVs differ only in the instructions of their exact integer dot products: every output
is the same bits.
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
from test_attention import bound as attention_bound
from test_attention import inputs as attention_inputs
from test_attention import oracle as attention_oracle
from test_rope_cache import inputs as rope_inputs

REPO = Path(__file__).resolve().parent.parent
SHAPES = {q: (48, 512) for q in WEIGHT_QTYPES}
# (batch, heads, kv_heads, keys, dim, positions, window): a decode row of several spans, and rows of one
ATTENTION_CASES = {"decode": (1, 4, 1, 600, 256, [599], 0), "rows": (2, 8, 2, 129, 40, [128, 3], 0)}
ATTENTION_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def outputs() -> dict:
    """Every CPU op on fixed inputs; keys name the op and its arguments."""
    torch.manual_seed(0)
    out = {}
    for q in WEIGHT_QTYPES:
        n, k = SHAPES[q]
        w = random_weight(q, n, k, seed=int(q))
        out[f"dequantize-{q.name}"] = torchext.dequantize(w, int(q), n, k)
        out[f"embedding-{q.name}"] = torchext.embedding(w, int(q), torch.tensor([3, 0, 47]), n, k, dtype=torch.bfloat16)
        for rows in (1, 6, 7, 16):  # the GEMV's tiles of 1, 2, 3 and 4 rows, past some formats' qmatmul limit
            x = torch.randn(rows, k)
            out[f"qmatmul-{q.name}-{rows}"] = torchext.qmatmul_q8_1(w, int(q), torchext.quantize_q8_1(x), n, k)
            out[f"x-{q.name}-{rows}"] = x
    x = torch.randn(7, 300) * 3
    out["x-gelu"] = x
    out["quantize_q8_1"] = torchext.quantize_q8_1(x)
    # the fused norms (their sums of squares in vectors on x86-64, the same order): rows of 300 values end
    # in a partial vector, fp16 rows hold a NaN and an inf; both outputs of the residual form compared
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        h, y = (x * 7).to(dtype), torch.randn(7, 300).to(dtype)
        if dtype == torch.float16:
            h[1, 5], h[2, 290] = float("nan"), float("inf")
        w, post = 1 + 0.3 * torch.randn(300), (1 + 0.3 * torch.randn(300)).to(dtype)
        name = str(dtype).removeprefix("torch.")
        out[f"quantize-rms_norm-{name}"] = torchext.rms_norm_quantize_q8_1(h, w, 1e-6)
        for form, x_weight in (("add", None), ("post", post)):
            s, q = torchext.add_rms_norm_quantize_q8_1(y, h, w, 1e-6, x_weight=x_weight)
            out[f"quantize-{form}_rms_norm-{name}"], out[f"same-{form}_rms_norm-sum-{name}"] = q, s
    out["gelu"] = torchext.gelu(x)
    out["gelu-tanh"] = torchext.gelu(x, approximate="tanh")
    # rope_cache_write (pairs in vectors on x86-64): a dim of 72 leaves pairs past the last vector; with and
    # without the per-head norm; q's bits and the written cache rows
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for norm in (False, True):
            q, k, v, cos, sin, pos, kc, vc, qw, kw = rope_inputs((2, 3, 4, 2, 72, 16, [5, 0, 15]), dtype, "cpu", norm)
            if dtype == torch.float16:
                q[0, 1, 2, 7] = float("nan")
            key = f"same-rope-{str(dtype).removeprefix('torch.')}-{'norm' if norm else 'plain'}"
            out[key] = torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc, qw, kw)
            out[key + "-k_cache"] = kc
    for case, shape in ATTENTION_CASES.items():
        for name, dtype in ATTENTION_DTYPES.items():
            out[f"attention-{case}-{name}"] = torchext.cached_attention(*attention_inputs(shape, dtype, "cpu"))
    return out


def assert_same(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """The same bits; for the "same-" outputs the same values and a NaN where the other has one (which
    NaN, its sign and payload, follows the order in which the compiler's scalar code takes an operation's
    two NaN operands)."""
    if key.startswith("same"):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=key)
    else:
        assert torch.equal(a, b), key


def outputs_with(kernels: str, tmp_path: Path) -> dict:
    """outputs() in a subprocess run with TORCHEXT_CPU_KERNELS=kernels."""
    saved = tmp_path / f"{kernels}.pt"
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; import torch; "
            f"import test_portable_cpu as t; torch.save(t.outputs(), {str(saved)!r})")
    env = dict(os.environ, TORCHEXT_CPU_KERNELS=kernels, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    return torch.load(saved)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty elsewhere)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))


def test_portable_kernels_agree_with_the_default_ones(tmp_path):
    portable, default = outputs_with("portable", tmp_path), outputs()
    assert portable.keys() == default.keys()
    differs = False
    for key, p in portable.items():
        d = default[key]
        if key.startswith(("dequantize", "embedding", "quantize", "x-")):
            assert torch.equal(p, d), key
        elif key.startswith("same"):
            assert_same(key, p, d)
        elif key.startswith("gelu"):
            assert ((p - d).abs() <= 2.0**-20 * default["x-gelu"].abs() + 1e-37).all(), key
        elif key.startswith("attention"):
            _, case, name = key.split("-")
            dtype = ATTENTION_DTYPES[name]
            q, k, v, pos, scale, window = attention_inputs(ATTENTION_CASES[case], dtype, "cpu")
            ref = attention_oracle(q, k, v, pos, scale, window)
            tol = attention_bound(q, k, v, scale, ref, dtype)
            assert ((p.double() - ref).abs() <= tol).all() and ((d.double() - ref).abs() <= tol).all(), key
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


# TORCHEXT_CPU_KERNELS's name and the CPU flags each needs
VNNI = {"avxvnni": {"avx_vnni"}, "avx512vnni": {"avx512_vnni", "avx512vl", "avx512bw"}}


@pytest.fixture(scope="module")
def avx2_outputs(tmp_path_factory):
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("this CPU lacks AVX2, FMA or F16C")
    return outputs_with("avx2", tmp_path_factory.mktemp("avx2"))


@pytest.mark.parametrize("kernels", sorted(VNNI))
def test_vnni_gemv_gives_the_avx2_bits(kernels, avx2_outputs, tmp_path):
    if not VNNI[kernels] <= cpu_flags():
        pytest.skip(f"this CPU lacks {kernels}")
    vnni, avx2 = outputs_with(kernels, tmp_path), avx2_outputs
    assert vnni.keys() == avx2.keys()
    for key, v in vnni.items():
        assert_same(key, v, avx2[key])


def best_kernels(flags: set[str]) -> str:
    """The kernels TORCHEXT_CPU_KERNELS=auto picks on a CPU of these flags."""
    if not {"avx2", "fma", "f16c"} <= flags:
        return "portable"
    return next((name for name in ("avx512vnni", "avxvnni") if VNNI[name] <= flags), "avx2")


@pytest.mark.parametrize("choice", ["", "auto", "portable", "avx2"])
def test_info_names_the_kernels_the_gemvs_run(choice):
    """torchext.info printed torch's CPU capability, not the kernels torchext's GEMVs pick (_C.cpu_kernels)."""
    flags = cpu_flags()
    if choice == "avx2" and not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU lacks AVX2, FMA or F16C")
    code = "import torchext.info; torchext.info.main([])"
    env = dict(os.environ, TORCHEXT_CPU_KERNELS=choice, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    expected = choice if choice not in ("", "auto") else best_kernels(flags) if sys.platform == "linux" else None
    if expected is not None:
        assert f"torchext's GEMVs run its {expected} kernels" in r.stdout


def test_info_reports_an_unknown_choice():
    code = "import torchext.info; torchext.info.main([])"
    env = dict(os.environ, TORCHEXT_CPU_KERNELS="avx9000", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "torchext's kernels: TORCHEXT_CPU_KERNELS: expected one of" in r.stdout


def test_unknown_choice_is_an_error():
    code = "import torch, torchext; torchext.quantize_q8_1(torch.ones(1, 32))"
    env = dict(os.environ, TORCHEXT_CPU_KERNELS="avx9000", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and ("TORCHEXT_CPU_KERNELS: expected one of 'auto', 'portable', 'avx2', 'avxvnni', "
                                 "'avx512vnni', got 'avx9000'") in r.stderr
