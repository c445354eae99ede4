"""torchext.WeightCache: entries, errors, device moves, matmul, and GGUF files via load_gguf.

GGUF files are written here with gguf.GGUFWriter (raw quantized bytes through raw_dtype) and the
loader is checked against what was written and against gguf's own numpy dequantization.

Tolerances: cache.matmul must be bit-identical to torchext.qmatmul / F.linear on the same tensors (it
only forwards to them). Against the float64 oracle x @ dequant(W).T with Gaussian x: tests/test_matmul.py's
bounds, per output: the Q8_1 rounding of the activations (q8_1_bound) where qmatmul takes the GEMV, fp32
accumulation of exact weights beyond. A dense F32 weight: F.linear's fp32 sums (conftest.fp32_sum_error).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    DTYPES,
    K_QUANTS,
    WEIGHT_QTYPES,
    dequant_oracle,
    fp32_sum_error,
    gaussian_activations,
    gemv_rows,
    offset_oracle,
    qtype_name,
    random_weight,
    row_bytes,
)
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize as gguf_dequantize

import torchext
from test_matmul import assert_exact_close, assert_gaussian_close, takes_gemv
from torchext import QType, WeightCache


def small_cache(device="cpu") -> WeightCache:
    cache = WeightCache()
    cache.put("q4k", random_weight(G.Q4_K, 64, 512, device, seed=1), QType.Q4_K, 64, 512)
    cache.put("q8_0", random_weight(G.Q8_0, 32, 96, device, seed=2), "Q8_0", 32, 96)
    cache.put("dense", torch.randn(16, 64, device=device))
    cache.put("norm", torch.randn(64, dtype=torch.float16, device=device))
    return cache


# ---- entries -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_put_get_contains_len_iter(device):
    cache = WeightCache()
    assert len(cache) == 0 and list(cache) == [] and cache.total_bytes() == 0 and "x" not in cache
    w4 = random_weight(G.Q4_K, 64, 512, device, seed=1)
    e = cache.put("blk.0.ffn_up.weight", w4, QType.Q4_K, 64, 512)
    assert e.tensor is cache.get("blk.0.ffn_up.weight").tensor
    assert e.tensor.data_ptr() == w4.data_ptr()  # kept as given, no copy
    w, q, n, k = cache["blk.0.ffn_up.weight"]
    assert (q, n, k) == (QType.Q4_K, 64, 512) and e.quantized and w.shape == (64, 2 * 144)

    # every way of naming a format; a flat byte tensor is kept as [n, row_bytes]
    w8 = random_weight(G.Q8_0, 32, 96, device, seed=2)
    for fmt in ("Q8_0", "q8_0", G.Q8_0, 8, QType.Q8_0):
        e8 = cache.put("blk.0.attn_q.weight", w8.flatten(), fmt, 32, 96)
        assert e8.qtype is QType.Q8_0 and e8.tensor.shape == (32, 102) and e8.tensor.data_ptr() == w8.data_ptr()
    dense = torch.randn(16, 64, device=device)
    norm = torch.randn(64, dtype=torch.float16, device=device)
    ed = cache.put("output.weight", dense)
    en = cache.put("output_norm.weight", norm, None, 1, 64)
    assert (ed.qtype, ed.n, ed.k, ed.quantized) == (None, 16, 64, False) and ed.tensor is dense
    assert (en.n, en.k) == (1, 64) and en.tensor is norm

    names = ["blk.0.ffn_up.weight", "blk.0.attn_q.weight", "output.weight", "output_norm.weight"]
    assert len(cache) == 4 and list(cache) == names and cache.names() == names  # insertion order
    assert all(s in cache for s in names) and "blk.1.ffn_up.weight" not in cache and 3 not in cache
    assert cache.total_bytes() == w4.numel() + w8.numel() + dense.numel() * 4 + norm.numel() * 2
    assert "4 weights: 2 quantized, 2 dense" in repr(cache)

    # replacing keeps one entry; removing while iterating is safe (iteration is over a snapshot)
    cache.put("output.weight", dense * 2)
    assert len(cache) == 4 and torch.equal(cache["output.weight"].tensor, dense * 2)
    for name in cache:
        if name.startswith("blk."):
            assert cache.remove(name).tensor.dtype == torch.uint8
    assert list(cache) == ["output.weight", "output_norm.weight"]
    assert cache.total_bytes() == dense.numel() * 4 + norm.numel() * 2


def test_put_copies_only_unaligned_or_strided_bytes():
    w = random_weight(G.Q4_K, 8, 256, seed=3)
    buf = torch.zeros(w.numel() + 1, dtype=torch.uint8)
    buf[1:] = w.flatten()
    misaligned = buf[1:]  # Q4_K needs 16-byte aligned storage; this starts one byte past an aligned one
    assert misaligned.data_ptr() % 16 == 1
    e = WeightCache().put("w", misaligned, "Q4_K", 8, 256)
    assert e.tensor.data_ptr() % 16 == 0 and torch.equal(e.tensor, w)
    x = gaussian_activations((1, 256), seed=4)
    assert torch.equal(torchext.qmatmul(e.tensor, "Q4_K", x, 8, 256), torchext.qmatmul(w, "Q4_K", x, 8, 256))

    strided = torch.cat([w, w], dim=1)[:, ::2]  # a non-contiguous [8, 144] view
    e = WeightCache().put("w", strided, "Q4_K", 8, 256)
    assert e.tensor.is_contiguous() and torch.equal(e.tensor, strided)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(64, 287, dtype=torch.uint8), "Q4_K", 64, 512),
         r"tensor: expected 18432 bytes for Q4_K with n=64, k=512 \(64 rows of 288\), got 18368"),
        ((torch.zeros(64, 288), "Q4_K", 64, 512),
         r"tensor: expected raw Q4_K bytes as a uint8 tensor, got torch.float32"),
        ((torch.zeros(10, 36, dtype=torch.uint8), "Q8_1", 10, 32), r"qtype: unsupported weight format 'Q8_1'"),
        ((torch.zeros(10, 292, dtype=torch.uint8), G.Q8_K, 10, 256), r"qtype: unsupported weight format 'Q8_K'"),
        ((torch.zeros(10, 84, dtype=torch.uint8), 99, 10, 256), r"qtype: unsupported weight format 99"),
        ((torch.zeros(10, 292, dtype=torch.uint8), "Q8_K", 10, 256), r"qtype: unsupported weight format 'Q8_K'"),
        ((torch.zeros(10, 84, dtype=torch.uint8), "nonsense", 10, 256), r"qtype: unsupported weight format 'nonsense'"),
        ((torch.zeros(10, 144, dtype=torch.uint8), "Q4_K"), r"n and k: required for a quantized \(Q4_K\) weight"),
        ((torch.zeros(0, 144, dtype=torch.uint8), "Q4_K", 0, 256), r"n: expected a positive int, got 0"),
        ((torch.zeros(1, 144, dtype=torch.uint8), "Q4_K", 1, -256), r"k: expected a positive int, got -256"),
        ((torch.zeros(1, 144, dtype=torch.uint8), "Q4_K", 1, 256.0), r"k: expected a positive int, got 256.0"),
        ((torch.zeros(4, 68, dtype=torch.uint8), "Q8_0", 4, 40),
         r"k: Q8_0 rows are whole 32-value blocks, so k must be a multiple of 32, got 40"),
        ((torch.zeros(4, 68, dtype=torch.uint8),), r"tensor: expected a float .* got torch.uint8; pass qtype"),
        ((torch.zeros(4, 8, dtype=torch.complex64),), r"tensor: expected a float .* got torch.complex64"),
        ((torch.zeros(4, 8, dtype=torch.uint16),), r"tensor: expected a float .* got torch.uint16"),
        ((torch.zeros(4, 8, dtype=torch.bool),), r"tensor: expected a float .* got torch.bool"),
        ((torch.zeros(4, 8), None, 8, 4), r"n and k: a dense tensor of shape \[4, 8\] holds n=4, k=8, got n=8, k=4"),
        ((torch.zeros(4, 8), None, "4", 8), r"n and k: .* holds n=4, k=8, got n='4', k=8"),  # was "got n=4"
        ((torch.tensor(1.0),), r"tensor: expected at least one dimension"),
    ],
    ids=lambda a: a if isinstance(a, str) else None,
)
def test_put_errors(args, match):
    cache = WeightCache()
    with pytest.raises(ValueError, match=match):
        cache.put("w", *args)
    assert len(cache) == 0  # nothing half-added
    with pytest.raises(TypeError, match="name: expected a str"):
        cache.put(3, torch.zeros(4))


def test_missing_name_is_a_clear_key_error():
    with pytest.raises(KeyError, match="no weight named 'w': the cache is empty"):
        WeightCache().get("w")
    cache = WeightCache()
    for i in range(7):
        cache.put(f"blk.{i}.w", torch.zeros(2, 2))
    message = (r"no weight named 'blk.9.w'; the cache holds 7: "
               r"'blk.0.w', 'blk.1.w', 'blk.2.w', 'blk.3.w', 'blk.4.w' and 2 more")
    for call in (cache.get, cache.__getitem__, cache.remove, lambda s: cache.matmul(s, torch.zeros(2))):
        with pytest.raises(KeyError, match=message):
            call("blk.9.w")
    assert len(cache) == 7


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_moves_every_entry(device):
    cache = small_cache("cpu")
    before = {name: e.tensor.clone() for name, e in cache.items()}
    assert cache.to(device) is cache
    for name, e in cache.items():
        assert e.tensor.device.type == device and torch.equal(e.tensor.cpu(), before[name])
        assert e.tensor.dtype == before[name].dtype and e.tensor.data_ptr() % 16 == 0
    assert [(e.qtype, e.n, e.k) for _, e in cache.items()] == [(QType.Q4_K, 64, 512), (QType.Q8_0, 32, 96),
                                                               (None, 16, 64), (None, 1, 64)]
    # the meta device (shapes only) runs everywhere, so a move to another device is always tested
    assert cache.to("meta") is cache
    assert all(e.tensor.is_meta and e.tensor.shape == before[name].shape for name, e in cache.items())
    assert cache.total_bytes() == sum(t.numel() * t.element_size() for t in before.values())


# ---- matmul --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_forwards_to_the_ops(device, dtype):
    cache = small_cache(device)
    past = max(gemv_rows(cache[name][1], device) for name in ("q4k", "q8_0")) + 1
    for rows in (1, 3, past):  # past both formats' Q8_1 GEMV rows: the op's dense path
        for name in ("q4k", "q8_0"):
            w, q, n, k = cache[name]
            x = gaussian_activations((rows, k), seed=rows).to(dtype).to(device)
            got = cache.matmul(name, x)
            assert got.shape == (rows, n) and got.dtype == dtype
            assert torch.equal(got, torchext.qmatmul(w, q, x, n, k))
        x = gaussian_activations((2, rows, 64), seed=rows).to(dtype).to(device)
        dense = cache["dense"].tensor
        assert torch.equal(cache.matmul("dense", x), F.linear(x, dense.to(dtype)))  # weight cast to x's dtype
    xt = gaussian_activations((512, 2), seed=9).to(dtype).to(device).t()  # any strides, as F.linear
    w, q, n, k = cache["q4k"]
    assert torch.equal(cache.matmul("q4k", xt), torchext.qmatmul(w, q, xt.contiguous(), n, k))
    with pytest.raises(ValueError, match=r"norm: a dense weight of shape \[64\] is not a matrix"):
        cache.matmul("norm", x)


def test_matmul_errors():
    """x that is no tensor was an AttributeError (or a TypeError from Tensor.to); for a dense weight, an integer
    x silently truncated the weight to integers (all zeros here) and a wrong k was F.linear's "mat1 and mat2
    shapes cannot be multiplied", which names neither."""
    cache = small_cache()
    for name in ("q4k", "dense"):
        with pytest.raises(TypeError, match="x: expected a torch.Tensor, got ndarray"):
            cache.matmul(name, np.zeros((1, cache[name].k), dtype=np.float32))
    with pytest.raises(ValueError, match="x: expected a floating-point tensor, got torch.int32"):
        cache.matmul("dense", torch.ones(1, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x: expected the last dimension to be k=64 \(dense's\), got 63"):
        cache.matmul("dense", torch.ones(2, 63))
    with pytest.raises(ValueError, match=r"x: expected at least one dimension \[..., K\], got a scalar"):
        cache.matmul("dense", torch.tensor(1.0))
    x = torch.ones(2, 64, dtype=torch.float64)  # a float dtype F.linear takes stays allowed
    assert torch.equal(cache.matmul("dense", x), F.linear(x, cache["dense"].tensor.double()))


# ---- GGUF files ----------------------------------------------------------------------------------

# A quantized type torchext does not run is dequantized to float32 by the loader (through gguf). gguf
# 0.19 dequantizes no quantized type outside torchext's catalog, so NVFP4 stands in for one here: the
# loader's weight ids lose it for every test of this module (the autouse fixture below), and it is
# left out of QUANT_TENSORS. tests/test_gguf_files.py loads a file of every catalog format, NVFP4 too.
UNRUN = G.NVFP4


@pytest.fixture(autouse=True)
def nvfp4_is_not_run(monkeypatch):
    ids = torchext.weights.WEIGHT_IDS - {int(UNRUN)}
    monkeypatch.setattr(torchext.cache, "WEIGHT_IDS", ids)
    monkeypatch.setattr(torchext.gguf_file, "WEIGHT_IDS", ids)


def nvfp4_bytes(n: int, k: int, seed: int) -> np.ndarray:
    """Random NVFP4 rows (the stand-in for a format torchext does not run): every byte pattern decodes
    finite (its scales are unsigned E4M3 bytes, at most 240)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, k // 64 * 36), dtype=np.uint8)


# name -> (ggml type, N, K): every weight format but UNRUN, N >= 32 (see the tolerance note), plus dense
# tensors
QUANT_TENSORS = {f"blk.{i}.{qtype_name(q).lower()}.weight": (q, 32 + 8 * i, 512 if q in K_QUANTS else 96)
                 for i, q in enumerate(q for q in WEIGHT_QTYPES if q != UNRUN)}
Q4_K_TENSOR = next(name for name, (q, _, _) in QUANT_TENSORS.items() if q == G.Q4_K)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF file with a tensor of every torchext weight format but UNRUN, a 3-D (expert-stacked) Q8_0
    tensor, F32, F16, BF16 and I32 tensors and an NVFP4 one (dequantized by the loader: UNRUN).
    Returns (path, {name: the numpy array written})."""
    path = tmp_path_factory.mktemp("gguf") / "weights.gguf"
    rng = np.random.default_rng(0)
    written = {}
    for i, (name, (q, n, k)) in enumerate(QUANT_TENSORS.items()):
        written[name] = random_weight(q, n, k, seed=10 + i).numpy()
    written["blk.0.ffn_up_exps.weight"] = random_weight(G.Q8_0, 2 * 3, 64, seed=30).numpy().reshape(2, 3, 68)
    written["output.weight"] = rng.standard_normal((40, 64)).astype(np.float32)
    written["output_norm.weight"] = rng.standard_normal(64).astype(np.float16)
    bf16 = (rng.standard_normal((4, 32)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    written["token_embd.weight"] = bf16.view(np.uint8).reshape(4, 64)
    written["positions"] = np.arange(12, dtype=np.int32).reshape(3, 4)
    written["blk.0.nvfp4.weight"] = nvfp4_bytes(8, 512, seed=31)

    writer = GGUFWriter(str(path), "torchext-test")
    raw_types = {name: q for name, (q, _, _) in QUANT_TENSORS.items()}
    raw_types.update({"blk.0.ffn_up_exps.weight": G.Q8_0, "token_embd.weight": G.BF16, "blk.0.nvfp4.weight": G.NVFP4})
    for name, a in written.items():
        if name in raw_types:  # raw bytes: raw_shape is the byte shape, the writer derives the ggml shape
            writer.add_tensor(name, a, raw_shape=a.shape, raw_dtype=raw_types[name])
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, written


def test_gguf_reader_layout(gguf_file):
    """The convention load_gguf relies on: GGUFReader's `shape` lists ggml dims, ne0 (the row
    length K) first, so a 2-D [N, K] weight reads as [K, N]; its `data` for a quantized type is
    the uint8 byte rows [N, row_bytes] (numpy order), for F32 the values [N, K]."""
    path, _ = gguf_file
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    name = Q4_K_TENSOR
    q, n, k = QUANT_TENSORS[name]
    t = tensors[name]
    assert t.tensor_type == G.Q4_K and [int(d) for d in t.shape] == [k, n]
    assert t.data.dtype == np.uint8 and t.data.shape == (n, row_bytes(q, k))
    assert [int(d) for d in tensors["blk.0.ffn_up_exps.weight"].shape] == [64, 3, 2]
    t = tensors["output.weight"]
    assert [int(d) for d in t.shape] == [64, 40] and t.data.shape == (40, 64) and t.data.dtype == np.float32


@pytest.mark.parametrize("device", DEVICES)
def test_load_gguf(gguf_file, device):
    path, written = gguf_file
    calls = []
    cache = WeightCache()
    assert cache.load_gguf(path, names=[s for s in written if s != "blk.0.nvfp4.weight"] + ["blk.0.nvfp4.weight"],
                           device=device, progress=lambda *a: calls.append(a)) is cache
    assert list(cache) == list(written) and len(calls) == len(written)
    assert calls[0] == (1, len(written), "blk.0.q4_0.weight") and calls[-1] == (len(written), len(written),
                                                                                  "blk.0.nvfp4.weight")
    for name, (q, n, k) in QUANT_TENSORS.items():
        w, qtype, en, ek = cache[name]
        assert (qtype, en, ek) == (QType(q), n, k)
        assert w.dtype == torch.uint8 and w.device.type == device and w.data_ptr() % 16 == 0
        assert np.array_equal(w.cpu().numpy(), written[name])  # the very bytes of the file
    w, qtype, n, k = cache["blk.0.ffn_up_exps.weight"]  # 3-D: all the experts' rows, k = ne0
    assert (qtype, n, k) == (QType.Q8_0, 6, 64)
    assert np.array_equal(w.cpu().numpy(), written["blk.0.ffn_up_exps.weight"].reshape(6, 68))

    out = cache["output.weight"]  # F32 as is, numpy order [N, K]
    assert (out.qtype, out.n, out.k) == (None, 40, 64) and out.tensor.dtype == torch.float32
    assert np.array_equal(out.tensor.cpu().numpy(), written["output.weight"])
    norm = cache["output_norm.weight"].tensor  # F16 kept as float16
    assert norm.dtype == torch.float16 and np.array_equal(norm.cpu().numpy(), written["output_norm.weight"])
    embd = cache["token_embd.weight"].tensor  # BF16 kept as bfloat16, values as gguf dequantizes them
    assert embd.dtype == torch.bfloat16 and embd.shape == (4, 32)
    assert np.array_equal(embd.float().cpu().numpy(), gguf_dequantize(written["token_embd.weight"], G.BF16))
    pos = cache["positions"].tensor
    assert pos.dtype == torch.int32 and np.array_equal(pos.cpu().numpy(), written["positions"])
    unrun = cache["blk.0.nvfp4.weight"]  # a type torchext does not run: dequantized to float32 by gguf
    assert (unrun.qtype, unrun.n, unrun.k, unrun.tensor.dtype) == (None, 8, 512, torch.float32)
    assert np.array_equal(unrun.tensor.cpu().numpy(), gguf_dequantize(written["blk.0.nvfp4.weight"], G.NVFP4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 9])
def test_load_gguf_matmul_matches_oracle(gguf_file, device, rows):
    path, written = gguf_file
    cache = WeightCache.from_gguf(path, names=list(QUANT_TENSORS) + ["output.weight"], device=device)
    for i, (name, (q, n, k)) in enumerate(QUANT_TENSORS.items()):
        x = gaussian_activations((rows, k), seed=40 + i)
        W = dequant_oracle(torch.from_numpy(written[name]), q, n, k)  # gguf's numpy dequantization
        got = cache.matmul(name, x.to(device))
        assert got.shape == (rows, n)
        if takes_gemv(rows, device, x.dtype, n, k, q):
            assert_gaussian_close(got, x, W)
        else:
            assert_exact_close(got, x, W, q, offset_oracle(torch.from_numpy(written[name]), q, n, k))
    x = gaussian_activations((rows, 64), seed=50)
    ref = x.double().numpy() @ written["output.weight"].astype(np.float64).T
    # dense fp32: 64-term fp32 sums of exact products
    absref = np.abs(x.double().numpy()) @ np.abs(written["output.weight"].astype(np.float64)).T
    got = cache.matmul("output.weight", x.to(device)).double().cpu().numpy()
    assert np.all(np.abs(got - ref) <= fp32_sum_error(absref, 64))


def test_load_gguf_errors(gguf_file, tmp_path):
    path, written = gguf_file
    with pytest.raises(KeyError, match=r"names: \['nope', 'blk.99'\] not in .*weights.gguf', which holds "
                                       rf"{len(written)} tensors: 'blk.0.q4_0.weight'"):
        WeightCache().load_gguf(path, names=["output.weight", "nope", "blk.99"])
    with pytest.raises(TypeError, match=r"names: expected a list of tensor names, got the string 'output.weight' "
                                        r"\(write \['output.weight'\]\)"):
        WeightCache().load_gguf(path, names="output.weight")  # its characters were taken for names
    with pytest.raises(TypeError, match="names: expected a list of tensor names, got int"):
        WeightCache().load_gguf(path, names=3)
    with pytest.raises(TypeError, match="pool: expected a bool, got str"):
        WeightCache().load_gguf(path, pool="False")  # was a pooled load
    with pytest.raises(TypeError, match="reader: expected a gguf.GGUFReader, got str"):
        WeightCache().load_gguf(path, reader=str(path))  # was an AttributeError
    # a type gguf cannot dequantize (Q8_K, llama.cpp's intermediate format) is a clear error; names= skips it
    bad = tmp_path / "q8k.gguf"
    writer = GGUFWriter(str(bad), "torchext-test")
    qk = GGML_QUANT_SIZES[G.Q8_K][1]
    writer.add_tensor("odd", np.zeros((2, qk), dtype=np.uint8), raw_shape=(2, qk), raw_dtype=G.Q8_K)
    writer.add_tensor("ok", np.ones((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"q8k.gguf: tensor 'odd': gguf cannot dequantize tensor type Q8_K"):
        WeightCache().load_gguf(bad)
    assert list(WeightCache().load_gguf(bad, names=["ok"])) == ["ok"]


# ---- the weight pool (load_gguf(pool=True)) ------------------------------------------------------

def gguf_data_bytes(path) -> int:
    """Bytes of a GGUF file's data section: from the reader's data_offset to the end of the file."""
    return path.stat().st_size - GGUFReader(str(path)).data_offset


def shares_pool(t: torch.Tensor, cache: WeightCache) -> bool:
    """Whether t views a storage of exactly the pool's size (the one the pool's entries share)."""
    return t.untyped_storage().nbytes() == cache.pool_bytes


@pytest.mark.parametrize("device", DEVICES)
def test_load_gguf_pool(gguf_file, device):
    path, written = gguf_file
    calls = []
    cache = WeightCache().load_gguf(path, device=device, progress=lambda *a: calls.append(a), pool=True)
    plain = WeightCache().load_gguf(path, device=device)
    assert list(cache) == list(written) == cache.names() and len(cache) == len(written)
    assert calls == [(i + 1, len(written), name) for i, name in enumerate(written)]  # once per tensor
    assert cache.pool_bytes == gguf_data_bytes(path) and plain.pool_bytes == 0
    assert isinstance(cache.load_seconds, float) and cache.load_seconds >= 0

    pooled = [name for name in written if name != "blk.0.nvfp4.weight"]  # NVFP4 is dequantized, not a view
    base = cache[pooled[0]].tensor.untyped_storage().data_ptr()
    for name in written:
        e, p = cache[name], plain[name]
        assert (e.qtype, e.n, e.k) == (p.qtype, p.n, p.k), name
        assert e.tensor.dtype == p.tensor.dtype and e.tensor.shape == p.tensor.shape, name
        assert torch.equal(e.tensor, p.tensor), name  # the same bytes / values as a tensor-by-tensor load
        assert e.tensor.device.type == device and e.tensor.is_contiguous()
        in_pool = e.tensor.untyped_storage().data_ptr() == base
        assert in_pool == (name in pooled), name
        if e.quantized:
            assert e.tensor.data_ptr() % 16 == 0  # Q4_K/Q5_K's block loads need it
    assert all(shares_pool(cache[name].tensor, cache) for name in pooled)
    out = cache["output.weight"].tensor  # a typed view: F32 values as written
    assert np.array_equal(out.cpu().numpy(), written["output.weight"])
    # the pool once (its entries are views) plus the one tensor of its own
    nvfp4 = cache["blk.0.nvfp4.weight"].tensor
    assert cache.total_bytes() == cache.pool_bytes + nvfp4.numel() * 4
    quantized = len(QUANT_TENSORS) + 1  # and the expert-stacked Q8_0; NVFP4 and the float tensors are dense
    assert f"{len(written)} weights: {quantized} quantized, {len(written) - quantized} dense" in repr(cache)
    assert "pool of" in repr(cache)
    assert "pool" not in repr(plain)
    assert WeightCache.from_gguf(path, pool=True).names() == cache.names()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 9])
def test_pool_matmul_matches_plain_load(gguf_file, device, rows):
    path, _ = gguf_file
    cache = WeightCache.from_gguf(path, device=device, pool=True)
    plain = WeightCache.from_gguf(path, device=device)
    for i, (name, (_, n, k)) in enumerate(QUANT_TENSORS.items()):
        x = gaussian_activations((rows, k), seed=60 + i).to(device)
        got = cache.matmul(name, x)
        assert got.shape == (rows, n) and torch.equal(got, plain.matmul(name, x)), name
    x = gaussian_activations((rows, 64), seed=70).to(device)
    assert torch.equal(cache.matmul("output.weight", x), plain.matmul("output.weight", x))


def test_pool_lookup_put_remove(gguf_file):
    path, written = gguf_file
    cache = WeightCache()
    cache.put("output.weight", torch.zeros(2, 2))  # the file's tensor of this name replaces it
    cache.put("mine", torch.ones(3, 8))
    cache.load_gguf(path, pool=True)
    pooled = [name for name in written if name != "blk.0.nvfp4.weight"]
    assert list(cache) == [*pooled, "mine", "blk.0.nvfp4.weight"]  # the pool's (file order), then the others
    assert cache["output.weight"].tensor.shape == (40, 64) and shares_pool(cache["output.weight"].tensor, cache)
    pool_bytes, total = cache.pool_bytes, cache.total_bytes()
    assert total == pool_bytes + 3 * 8 * 4 + 8 * 512 * 4

    # put shadows a pooled name: the new weight wins, the pool keeps its bytes
    name = Q4_K_TENSOR
    q, n, k = QUANT_TENSORS[name]
    w = random_weight(q, n, k, seed=80)
    assert cache.put(name, w, q, n, k).tensor.data_ptr() == w.data_ptr()
    assert cache[name].tensor.data_ptr() == w.data_ptr() and torch.equal(cache.get(name).tensor, w)
    assert len(cache) == len(written) + 1 and cache.names()[-1] == name  # now an individual entry
    assert cache.pool_bytes == pool_bytes and cache.total_bytes() == total + w.numel()
    x = gaussian_activations((1, k), seed=81)
    assert torch.equal(cache.matmul(name, x), torchext.qmatmul(w, q, x, n, k))

    # remove takes from whichever map holds the name
    e = cache.remove("output.weight")
    assert shares_pool(e.tensor, cache) and "output.weight" not in cache and cache.pool_bytes == pool_bytes
    assert cache.remove(name).tensor.data_ptr() == w.data_ptr() and name not in cache
    assert cache.remove("mine").tensor.shape == (3, 8)
    with pytest.raises(KeyError, match="no weight named 'output.weight'; the cache holds"):
        cache.remove("output.weight")
    assert len(cache) == len(written) - 2 and cache.total_bytes() == pool_bytes + 8 * 512 * 4
    # the pool is freed with the last entry that views it
    for s in list(cache):
        if s != "blk.0.nvfp4.weight":
            cache.remove(s)
    assert list(cache) == ["blk.0.nvfp4.weight"] and cache.pool_bytes == 0 and "pool" not in repr(cache)
    assert cache.total_bytes() == 8 * 512 * 4


@pytest.mark.parametrize("device", DEVICES)
def test_pool_to_device(gguf_file, device):
    path, written = gguf_file
    cache = WeightCache.from_gguf(path, pool=True)
    cache.put("mine", torch.ones(3, 8))
    before = {name: e.tensor.clone() for name, e in cache.items()}
    pool_bytes, total = cache.pool_bytes, cache.total_bytes()
    ptrs = [e.tensor.data_ptr() for _, e in cache.items()]
    assert cache.to("cpu") is cache and [e.tensor.data_ptr() for _, e in cache.items()] == ptrs  # no copy

    assert cache.to(device) is cache
    pooled = [name for name in written if name != "blk.0.nvfp4.weight"]
    base = cache[pooled[0]].tensor.untyped_storage().data_ptr()
    for name, e in cache.items():
        assert e.tensor.device.type == device and torch.equal(e.tensor.cpu(), before[name]), name
        assert (e.tensor.untyped_storage().data_ptr() == base) == (name in pooled), name  # still views
    assert cache.pool_bytes == pool_bytes and cache.total_bytes() == total
    x = gaussian_activations((1, 512), seed=90).to(device)
    q, n, k = QUANT_TENSORS[Q4_K_TENSOR]
    w = before[Q4_K_TENSOR].to(device)
    assert torch.equal(cache.matmul(Q4_K_TENSOR, x), torchext.qmatmul(w, q, x, n, k))

    # the meta device (shapes only) runs everywhere
    assert cache.to("meta") is cache
    assert all(e.tensor.is_meta and e.tensor.shape == before[name].shape and e.tensor.dtype == before[name].dtype
               for name, e in cache.items())
    assert all(shares_pool(cache[name].tensor, cache) for name in pooled)
    assert cache.pool_bytes == pool_bytes and cache.total_bytes() == total


def test_pool_pickles_once(gguf_file, tmp_path):
    """pickle (and copy.deepcopy, torch.save) keep the pool one tensor: its entries travel as their
    places in it, not as views, each of which pickle would write with the whole pool behind it."""
    import copy

    path, written = gguf_file
    cache = WeightCache.from_gguf(path, pool=True)
    cache.put("mine", torch.ones(3, 8))
    data = pickle.dumps(cache)
    assert len(data) < cache.pool_bytes + 64 * 1024
    saved = tmp_path / "cache.pt"
    torch.save(cache, saved)  # refused before: the views were tensors of one storage as different types
    # a cache pickled before: its state the instance's own __dict__, each pooled entry a view
    old = WeightCache.__new__(WeightCache)
    old.__setstate__(dict(cache.__dict__))
    for other in (pickle.loads(data), copy.deepcopy(cache), torch.load(saved, weights_only=False), old):
        assert other.names() == cache.names() and other.pool_bytes == cache.pool_bytes
        for name, e in cache.items():
            o = other[name]
            assert torch.equal(o.tensor, e.tensor) and (o.qtype, o.n, o.k) == (e.qtype, e.n, e.k), name
            assert shares_pool(o.tensor, other) == shares_pool(e.tensor, cache), name


def test_load_gguf_pool_errors(gguf_file, tmp_path):
    path, _ = gguf_file
    cache = WeightCache()
    with pytest.raises(ValueError, match="pool: a pool holds the whole file, so names must be None"):
        cache.load_gguf(path, names=["output.weight"], pool=True)
    assert len(cache) == 0 and cache.pool_bytes == 0
    cache.load_gguf(path, pool=True)
    with pytest.raises(ValueError, match="pool: this cache already holds a pool"):
        cache.load_gguf(path, pool=True)

    # a file cut inside its last tensor, and one cut after gguf's reader opened (and mapped) it
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut.gguf: tensor 'blk.0.nvfp4.weight': data \[\d+, \d+\) runs past the end "
                                         rf"of the file \(size {len(data) - 100}\)"):
        WeightCache().load_gguf(cut, pool=True)
    shrinking = tmp_path / "shrinking.gguf"
    shrinking.write_bytes(data)
    reader = GGUFReader(str(shrinking))
    os.truncate(shrinking, len(data) - 100)
    empty = WeightCache()
    with pytest.raises(ValueError, match=r"shrinking.gguf: tensor 'blk.0.nvfp4.weight': data .* runs past the end"):
        empty.load_gguf(shrinking, pool=True, reader=reader)
    assert len(empty) == 0 and empty.pool_bytes == 0

    # an 8-byte aligned file can put a Q4_K tensor off a 16-byte boundary: copied into an entry of its own
    # (the pooled load was refused, and the demo, which pools, could not run such a file)
    odd = tmp_path / "align8.gguf"
    writer = GGUFWriter(str(odd), "torchext-test")
    writer.add_custom_alignment(8)
    writer.add_tensor("scale", np.ones(2, dtype=np.float32))  # 8 bytes: the next tensor starts at 8
    writer.add_tensor("w", random_weight(G.Q4_K, 2, 256, seed=5).numpy(), raw_shape=(2, 144), raw_dtype=G.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    pooled = WeightCache().load_gguf(odd, pool=True)
    assert "w" in pooled._entries and "scale" in pooled._pooled and pooled["w"].tensor.data_ptr() % 16 == 0
    copied = WeightCache().load_gguf(odd)
    assert torch.equal(pooled["w"].tensor, copied["w"].tensor) and copied["w"].tensor.data_ptr() % 16 == 0

    # a type gguf cannot dequantize fails before anything is stored
    bad = tmp_path / "q8k.gguf"
    writer = GGUFWriter(str(bad), "torchext-test")
    qk = GGML_QUANT_SIZES[G.Q8_K][1]
    writer.add_tensor("ok", np.ones((2, 32), dtype=np.float32))
    writer.add_tensor("odd", np.zeros((2, qk), dtype=np.uint8), raw_shape=(2, qk), raw_dtype=G.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"q8k.gguf: tensor 'odd': gguf cannot dequantize tensor type Q8_K"):
        empty.load_gguf(bad, pool=True)
    assert len(empty) == 0 and empty.pool_bytes == 0


# ---- stacking rows ---------------------------------------------------------------------------------

# name -> (ggml type, N, K) or None for a dense tensor; Q8_0 rows of 96 values are 102 bytes, so 32 or
# 40 rows end on a 16-byte boundary and 36 do not
STACK_TENSORS = {"a.weight": (G.Q8_0, 32, 96), "norm": None, "b.weight": (G.Q8_0, 40, 96),
                 "c.weight": (G.Q4_K, 16, 512), "d.weight": (G.Q8_0, 36, 96), "e.weight": (G.Q4_K, 8, 512),
                 "f.weight": (G.Q8_0, 8, 96)}
STACK_GROUPS = {"ab": ["a.weight", "b.weight"], "ce": ["c.weight", "e.weight"]}


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "stack.gguf"
    writer = GGUFWriter(str(path), "torchext-test")
    for i, (name, spec) in enumerate(STACK_TENSORS.items()):
        if spec is None:
            writer.add_tensor(name, np.random.default_rng(i).standard_normal(64).astype(np.float32))
        else:
            a = random_weight(spec[0], spec[1], spec[2], seed=100 + i).numpy()
            writer.add_tensor(name, a, raw_shape=a.shape, raw_dtype=spec[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def check_stacked(cache: WeightCache, before: dict, device: str) -> None:
    """Every entry holds its bytes of before; each group is its members' rows, which view it, and
    multiplies as its members side by side."""
    for name, t in before.items():
        assert torch.equal(cache[name].tensor.cpu(), t), name
    for group, members in STACK_GROUPS.items():
        g = cache[group]
        assert (g.qtype, g.k, g.n) == (cache[members[0]].qtype, cache[members[0]].k, sum(cache[m].n for m in members))
        assert torch.equal(g.tensor.cpu(), torch.cat([before[m] for m in members]))
        at = g.tensor.data_ptr()
        for m in members:
            assert cache[m].tensor.data_ptr() == at and cache[m].tensor.data_ptr() % 16 == 0, m
            at += cache[m].tensor.numel()
        for rows in (1, 9):
            x = gaussian_activations((rows, g.k), seed=rows).to(device)
            parts = torch.cat([cache.matmul(m, x) for m in members], dim=-1)
            got = cache.matmul(group, x)
            if device == "cpu":  # a row's dot product does not depend on the other rows
                assert torch.equal(got, parts), group
            else:  # a CUDA GEMV may split a row's sum between warps by the launch's row count: fp32
                # sums in another order, each within k * 2^-24 of sum |w x| (k terms, one rounding each)
                w = torch.from_numpy(np.concatenate([dequant_oracle(before[m], cache[m].qtype, cache[m].n, g.k)
                                                     for m in members]))
                bound = g.k * 2.0**-24 * (w.abs() @ x.double().abs().T.cpu()).T * 2
                assert ((got - parts).double().abs().cpu() <= bound + 1e-30).all(), group


@pytest.mark.parametrize("device", DEVICES)
def test_stack_rows_in_a_pool(stack_file, device):
    cache = WeightCache.from_gguf(stack_file, device=device, pool=True)
    before = {name: e.tensor.cpu().clone() for name, e in cache.items()}
    old_pool = cache.pool_bytes
    assert cache.stack_rows(STACK_GROUPS) is cache
    # each group where its first member was, its members after it, the others in file order
    assert cache.names() == ["ab", "a.weight", "b.weight", "norm", "ce", "c.weight", "e.weight", "d.weight",
                             "f.weight"]
    assert all(shares_pool(e.tensor, cache) for _, e in cache.items())
    assert cache.total_bytes() == cache.pool_bytes <= old_pool  # one pool, the old one let go
    check_stacked(cache, before, device)
    ptrs = [e.tensor.data_ptr() for _, e in cache.items()]
    assert cache.stack_rows(STACK_GROUPS) is cache and [e.tensor.data_ptr() for _, e in cache.items()] == ptrs


@pytest.mark.parametrize("device", DEVICES)
def test_stack_rows_group_by_group_in_a_pool(stack_file, device):
    """Groups stacked one call at a time: a later call's new pool keeps each earlier group's members
    views of it (its bytes copied once), the same layout as stacking all at once."""
    cache = WeightCache.from_gguf(stack_file, device=device, pool=True)
    before = {name: e.tensor.cpu().clone() for name, e in cache.items()}
    at_once = WeightCache.from_gguf(stack_file, device=device, pool=True).stack_rows(STACK_GROUPS)
    for group, members in STACK_GROUPS.items():
        cache.stack_rows({group: members})
    assert cache.names() == at_once.names() and cache.pool_bytes == at_once.pool_bytes
    check_stacked(cache, before, device)
    ptrs = [e.tensor.data_ptr() for _, e in cache.items()]
    assert cache.stack_rows(STACK_GROUPS) is cache and [e.tensor.data_ptr() for _, e in cache.items()] == ptrs


@pytest.mark.parametrize("device", DEVICES)
def test_stack_rows_of_individual_entries(stack_file, device):
    pooled = WeightCache.from_gguf(stack_file, device=device, pool=True)
    cache = WeightCache()
    for name, e in pooled.items():  # copies, not views of a pool
        cache.put(name, e.tensor.clone(), e.qtype, e.n, e.k) if e.quantized else cache.put(name, e.tensor.clone())
    before = {name: e.tensor.cpu().clone() for name, e in cache.items()}
    cache.stack_rows(STACK_GROUPS)
    assert cache.pool_bytes == 0 and set(cache.names()) == set(before) | set(STACK_GROUPS)
    check_stacked(cache, before, device)
    assert cache.stackable_runs(["a.weight", "b.weight", "f.weight", "c.weight", "d.weight", "a.weight"]) == [
        ["a.weight", "b.weight", "f.weight"], ["c.weight"], ["d.weight"], ["a.weight"]]
    assert cache.stackable_runs(["a.weight", "a.weight", "b.weight"]) == [["a.weight"], ["a.weight", "b.weight"]]


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("change", ["put", "remove", "load"])
def test_replacing_a_member_drops_its_group(stack_file, pool, change):
    """After stack_rows, replacing a member (put, or load_gguf of a file holding its name) left the
    group's entry with the old bytes: a model built on the group (Gemma3(cache, stack=False)) ran them
    silently, and stacking again said the group's name was taken. Now the group's entry goes with the
    change, and stacking again builds it from the members as they are."""
    cache = WeightCache.from_gguf(stack_file, pool=pool).stack_rows(STACK_GROUPS)
    a = cache["a.weight"]
    new_a = torch.flip(a.tensor, [0]).clone()
    if change == "put":
        cache.put("a.weight", new_a, a.qtype, a.n, a.k)
    elif change == "remove":
        cache.remove("a.weight")
    else:
        cache.load_gguf(stack_file, names=["a.weight"])
    assert "ab" not in cache and "ce" in cache  # only the changed member's group
    if change == "remove":
        return
    cache.stack_rows(STACK_GROUPS)
    expected = new_a if change == "put" else a.tensor
    assert torch.equal(cache["ab"].tensor[:a.n], expected) and torch.equal(cache["a.weight"].tensor, expected)
    x = gaussian_activations((2, a.k), seed=1)
    torch.testing.assert_close(cache.matmul("ab", x)[:, :a.n], cache.matmul("a.weight", x), rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(cache))  # the record of the groups survives pickling
    again.put("b.weight", again["b.weight"].tensor.clone(), a.qtype, again["b.weight"].n, a.k)
    assert "ab" not in again


@pytest.mark.parametrize("pool", [False, True])
def test_a_load_that_fails_midway_changes_nothing(stack_file, pool):
    """An error while the tensors are read (here the progress callback's, after the second tensor)
    leaves the cache as it was: no tensor of the file added, a same-named entry of the user's kept
    (pool=False once kept the tensors read before the error, replacing the user's)."""
    cache = WeightCache()
    first = WeightCache.from_gguf(stack_file).names()[0]
    own = torch.full((3,), 7.0)
    cache.put(first, own)

    def progress(done, total, name):
        if done == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        cache.load_gguf(stack_file, progress=progress, pool=pool)
    assert cache.names() == [first] and cache[first].tensor is own and cache.pool_bytes == 0


def test_stacked_individual_entries_stay_views(stack_file, tmp_path):
    """A group stack_rows made of individual entries holds its members' bytes once: total_bytes counts
    them once, and pickle, deepcopy, torch.save and .to() keep the members views of the group (pickle
    and .to() once gave each member a copy: 2-4x the memory, and stack_rows again then refused the
    group's name)."""
    import copy

    pooled = WeightCache.from_gguf(stack_file, pool=True)
    cache = WeightCache()
    for name, e in pooled.items():
        cache.put(name, e.tensor.clone(), e.qtype, e.n, e.k) if e.quantized else cache.put(name, e.tensor.clone())
    total = cache.total_bytes()
    cache.stack_rows(STACK_GROUPS)
    values = {name: e.tensor.clone() for name, e in cache.items()}

    def shares(c):
        storages = {e.tensor.untyped_storage()._cdata for _, e in c.items()}
        return len(storages) == len(c) - sum(len(ms) for ms in STACK_GROUPS.values())

    torch.save(cache, tmp_path / "cache.pt")
    copies = [pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache),
              torch.load(tmp_path / "cache.pt", weights_only=False), cache]
    for c in copies:
        assert c.total_bytes() == total and shares(c)
        assert all(torch.equal(c[name].tensor, v) for name, v in values.items())
        ptrs = [e.tensor.data_ptr() for _, e in c.items()]
        assert c.stack_rows(STACK_GROUPS) is c and [e.tensor.data_ptr() for _, e in c.items()] == ptrs  # a no-op
    moved = copy.deepcopy(cache).to("meta")
    assert moved.total_bytes() == total and shares(moved) and all(e.tensor.is_meta for _, e in moved.items())


@pytest.mark.parametrize("groups, error, match", [
    ({"x": ["a.weight", "c.weight"]}, ValueError, r"x: members must be quantized weights of one format and k; "
                                                  r"a.weight is Q8_0 with k=96, c.weight is Q4_K with k=512"),
    ({"x": ["a.weight", "norm"]}, ValueError, r"norm is a dense tensor"),
    ({"x": ["a.weight", "nope"]}, KeyError, r"no weight named 'nope'"),
    ({"x": ["a.weight", "a.weight"]}, ValueError, r"x: a member appears twice"),
    ({"x": ["a.weight", "b.weight"], "y": ["b.weight", "f.weight"]}, ValueError, r"y: b.weight is in two groups"),
    ({"x": ["d.weight", "a.weight"]}, ValueError, r"x: a.weight's rows would start 3672 bytes into the group, "
                                                  r"not on a 16-byte boundary"),
    ({"norm": ["a.weight", "b.weight"]}, ValueError, r"norm: the name is taken by another weight"),
    ({"x": []}, ValueError, r"x: a group needs at least one member"),
    ({"x": "a.weight"}, TypeError, r"x: expected a list of tensor names, got the string 'a.weight'"),
    ({"x": None}, TypeError, r"x: expected a list of tensor names, got NoneType"),
    ([("x", ["a.weight", "b.weight"])], TypeError, r"groups: expected a dict of group name -> member names, got list"),
    # a name that is no str was stacked into the pool (3 in cache.names()), or refused after the groups before it
    ({"x": ["a.weight", "b.weight"], 3: ["c.weight", "e.weight"]}, TypeError, r"groups: expected str group names, "
                                                                               r"got 3"),
])
def test_stack_rows_errors(stack_file, groups, error, match):
    cache = WeightCache.from_gguf(stack_file, pool=True)
    names, ptrs = cache.names(), [e.tensor.data_ptr() for _, e in cache.items()]
    with pytest.raises(error, match=match):
        cache.stack_rows(groups)
    assert cache.names() == names and [e.tensor.data_ptr() for _, e in cache.items()] == ptrs  # untouched


def test_stack_rows_of_members_on_two_devices(stack_file):
    """Was torch.cat's "Tensor on device meta is not on the expected device cpu!", naming no weight."""
    cache = WeightCache.from_gguf(stack_file)
    b = cache["b.weight"]
    cache.put("b.weight", b.tensor.to("meta"), b.qtype, b.n, b.k)
    names = cache.names()
    with pytest.raises(ValueError, match="ab: members must be on one device; a.weight is on cpu, b.weight is on meta"):
        cache.stack_rows(STACK_GROUPS)
    assert cache.names() == names


def test_total_bytes_counts_the_storage_an_entry_keeps():
    """An entry put as a view of a larger tensor keeps all of it allocated: total_bytes counted the view's
    bytes (4,352 of 1,114,112); it counts each storage behind the individual entries once."""
    q, n, k = QType.Q8_0, 256, 4096
    big = random_weight(q, n, k, seed=3)
    cache = WeightCache()
    cache.put("small", big[:1], q, 1, k)
    cache.put("other", big[1:2], q, 1, k)
    assert cache.total_bytes() == big.numel()
    cache.put("dense", torch.ones(3, 8))
    assert cache.total_bytes() == big.numel() + 3 * 8 * 4
