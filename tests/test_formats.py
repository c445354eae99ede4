"""The format contract: torchext's Python enum and sizes, gguf's constants and the C++ block
structs (seen through the ops' byte-count checks) agree for every format: the block layouts are
defined once in C++ (kernels/blocks.h) and Python takes ids and sizes from gguf, so this test is
what keeps the three in step."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

import torchext
from conftest import DEVICES, K_QUANTS, WEIGHT_QTYPES, q8_1_row_bytes, qtype_name, row_bytes

ALL_QTYPES = WEIGHT_QTYPES + [GGMLQuantizationType.Q8_1]


@pytest.mark.parametrize("gq", ALL_QTYPES, ids=qtype_name)
def test_qtype_values_are_gguf_ids(gq):
    assert torchext.QType[gq.name].value == gq.value
    assert int(torchext.QType[gq.name]) == int(gq)
    assert torchext.QType.of(gq) == torchext.QType.of(gq.name) == torchext.QType.of(int(gq))


def test_qtype_has_exactly_the_supported_formats():
    assert {q.name for q in torchext.QType} == {q.name for q in ALL_QTYPES}


@pytest.mark.parametrize("gq", WEIGHT_QTYPES, ids=qtype_name)
def test_block_sizes_are_gguf_sizes(gq):
    values, nbytes = GGML_QUANT_SIZES[gq]
    for fmt in (gq, gq.name, int(gq), torchext.QType[gq.name]):
        assert torchext.block_values(fmt) == values
        assert torchext.block_bytes(fmt) == nbytes
    for k in (values, 3 * values, 300 if values == 256 else 96 * values // 32):
        assert torchext.row_bytes(gq, k) == -(-k // values) * nbytes


@pytest.mark.parametrize("gq", WEIGHT_QTYPES, ids=qtype_name)
def test_scale_fields_are_the_blocks_scales(gq):
    """The catalog's scale fields are every scale of the block: with all other bytes random, gguf
    dequantizes every value to 0 with the fields 0 (MXFP4's E8M0 has no zero: the smallest scale,
    2^-128, leaves values of at most 12 * 2^-128), and to finite values with them 0.5; with them 1.0
    every value is exactly twice that (scales multiply every value, offsets included)."""
    values, nbytes = GGML_QUANT_SIZES[gq]
    offsets = torchext.formats.SCALE_FIELDS[torchext.QType.of(gq)]
    raw = np.random.default_rng(int(gq)).integers(0, 256, size=(64, nbytes), dtype=np.uint8)

    def with_scales(v):
        for off in offsets:
            torchext.formats.put_scale_field(raw, int(gq), off, np.full(64, v, dtype=np.float16))
        return dequantize(raw, gq)

    zero = with_scales(0.0)
    if gq == GGMLQuantizationType.MXFP4:
        assert (np.abs(zero) <= 12 * 2.0**-128).all()
    else:
        assert not zero.any()
    half, one = with_scales(0.5), with_scales(1.0)
    assert np.isfinite(half).all() and half.any()
    np.testing.assert_array_equal(one, 2 * half)


def test_gguf_q8_1_size_is_the_legacy_layout():
    """gguf-py 0.19 lists Q8_1 as (32, 40): the old ggml block with fp32 d and s. ggml's
    block_q8_1 has been {ggml_half d, s; int8 qs[32]} = 36 bytes for years (ggml-common.h
    static_assert), and that is the block torchext's kernels read and write (see
    test_q8_1_row_bytes_are_ggml_blocks). If gguf-py is fixed this fails: then fold Q8_1 into
    test_block_sizes_are_gguf_sizes."""
    assert GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1] == (32, 40)


def test_q8_1_block_size_is_the_kernels_block():
    assert torchext.block_values(torchext.QType.Q8_1) == 32
    assert torchext.block_bytes(torchext.QType.Q8_1) == 36
    assert torchext.row_bytes(torchext.QType.Q8_1, 256) == 8 * 36


@pytest.mark.parametrize("fmt", [99, 1, "Q8_K", "nope"])
def test_qtype_of_rejects_unsupported(fmt):
    with pytest.raises(ValueError):
        torchext.QType.of(fmt)


def _k_cases(gq):
    # k-quants: a whole super-block, a padded one (K not a multiple of 256) and an odd count
    # (3 Q6_K super-blocks = 630 bytes, a row that is only 2-byte aligned); 32- and 64-value formats:
    # one block and an odd number of blocks.
    values = GGML_QUANT_SIZES[gq][0]
    return [256, 300, 768] if gq in K_QUANTS else [values, 3 * values]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gq", WEIGHT_QTYPES, ids=qtype_name)
def test_cpp_row_bytes_agree_with_gguf(gq, device):
    """Each op accepts exactly n * row_bytes weight bytes: the C++ block sizes are gguf's, and
    the C++ id -> format mapping is gguf's (the message names the format)."""
    n = 3
    for k in _k_cases(gq):
        expected = n * row_bytes(gq, k)
        x = torch.zeros(1, k, device=device)
        good = torch.zeros(expected, dtype=torch.uint8, device=device)
        assert torchext.qmatmul(good.view(n, -1), int(gq), x, n, k).shape == (1, n)
        assert torchext.dequantize(good, int(gq), n, k).shape == (n, k)
        # a [n, row_bytes] tensor is the normal shape, but any shape of the right numel works
        assert torchext.qmatmul(good.view(-1, 1), int(gq), x, n, k).shape == (1, n)

        msg = re.escape(f"w: expected {expected} bytes for {gq.name} with n={n}, k={k}")
        for bad_numel in (expected - 1, expected + 1):
            # [:bad_numel] of a larger buffer keeps the storage's alignment, so only the size is wrong
            bad = torch.zeros(expected + 1, dtype=torch.uint8, device=device)[:bad_numel]
            with pytest.raises(RuntimeError, match=msg):
                torchext.qmatmul(bad, int(gq), x, n, k)
            with pytest.raises(RuntimeError, match=msg):
                torchext.dequantize(bad, int(gq), n, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op, gq",
    [
        (torchext.q4k_gemv, GGMLQuantizationType.Q4_K),
        (torchext.q5k_gemv, GGMLQuantizationType.Q5_K),
        (torchext.q6k_gemv, GGMLQuantizationType.Q6_K),
    ],
    ids=["q4k_gemv", "q5k_gemv", "q6k_gemv"],
)
def test_fixed_format_ops_use_their_format(op, gq, device):
    n, k = 2, 300
    expected = n * row_bytes(gq, k)
    x = torch.zeros(2, k, device=device)
    assert op(torch.zeros(n, row_bytes(gq, k), dtype=torch.uint8, device=device), x, n, k).shape == (2, n)
    bad = torch.zeros(expected + 1, dtype=torch.uint8, device=device)[: expected - 1]
    with pytest.raises(RuntimeError, match=re.escape(f"w: expected {expected} bytes for {gq.name} with n={n}, k={k}")):
        op(bad, x, n, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [torchext.q4k_q8_gemv, torchext.q4k_q8_gemv_packed])
def test_q8_1_row_bytes_are_ggml_blocks(op, device):
    """Q8_1 activation rows are ggml's 36-byte, 32-value blocks over K padded to 256."""
    n = 2
    for k in (32, 256, 300, 2880):
        nbytes = -(-k // 256) * 256 // 32 * 36
        assert nbytes == q8_1_row_bytes(k) == torchext.formats.q8_1_row_bytes(k)
        x = torch.zeros(3, k, device=device)
        xq = torchext.quantize_q8_1(x)
        assert xq.shape == (3, nbytes) and xq.dtype == torch.uint8
        w = torch.zeros(n, row_bytes(GGMLQuantizationType.Q4_K, k), dtype=torch.uint8, device=device)
        assert op(w, xq, n, k).shape == (3, n)
        short = torch.zeros(3, nbytes - 36, dtype=torch.uint8, device=device)
        with pytest.raises(RuntimeError, match=re.escape(f"xq: expected the last dimension to be {nbytes} bytes")):
            op(w, short, n, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [int(GGMLQuantizationType.Q8_1), 99, 0, 1, 15])
def test_cpp_rejects_formats_it_does_not_run(qtype, device):
    """Q8_1 (an activation format), F32/F16 and Q8_K are gguf ids but not weight formats here."""
    w = torch.zeros(2, 36 * 8, dtype=torch.uint8, device=device)
    x = torch.zeros(1, 256, device=device)
    with pytest.raises(RuntimeError, match=f"qtype: unknown or unsupported weight format id {qtype}"):
        torch.ops.torchext.qmatmul(w, qtype, x, 2, 256)
    with pytest.raises(RuntimeError, match=f"qtype: unknown or unsupported weight format id {qtype}"):
        torch.ops.torchext.dequantize(w, qtype, 2, 256)


# a qtype is a whole number (or a name): int() would truncate 12.7 to 12 (Q4_K) and read True as 1
NOT_AN_ID = [12.7, 12.0, float("nan"), True, False, np.float64(12.0), torch.tensor(12.5), None, [12]]


@pytest.mark.parametrize("fmt", NOT_AN_ID, ids=repr)
def test_qtype_of_rejects_what_is_not_an_integer_id(fmt):
    with pytest.raises(ValueError, match=re.escape(repr(fmt))):
        torchext.QType.of(fmt)


def test_qtype_of_takes_integer_ids_of_any_integer_type():
    assert torchext.QType.of(np.int64(12)) is torchext.QType.Q4_K
    assert torchext.QType.of(np.uint8(8)) is torchext.QType.Q8_0
    assert torchext.QType.of(torch.tensor(14)) is torchext.QType.Q6_K


def _public_calls_with_qtype():
    """Every public function that takes a qtype, as fmt -> call."""
    w, x = torch.zeros(2, 144, dtype=torch.uint8), torch.zeros(1, 256)
    from torchext.nn import QuantLinear, quantize_linears
    from torchext.parallel import column_split
    return {
        "qmatmul": lambda q: torchext.qmatmul(w, q, x, 2, 256),
        "qmatmul_q8_1": lambda q: torchext.qmatmul_q8_1(w, q, torchext.quantize_q8_1(x), 2, 256),
        "dequantize": lambda q: torchext.dequantize(w, q, 2, 256),
        "embedding": lambda q: torchext.embedding(w, q, torch.tensor([0]), 2, 256),
        "quantize": lambda q: torchext.quantize(torch.zeros(2, 256), q),
        "block_values": torchext.block_values,
        "block_bytes": torchext.block_bytes,
        "row_bytes": lambda q: torchext.row_bytes(q, 256),
        "QuantLinear": lambda q: QuantLinear(w, q, 256, 2),
        "QuantLinear.from_linear": lambda q: QuantLinear.from_linear(torch.nn.Linear(256, 2), q),
        "quantize_linears": lambda q: quantize_linears(torch.nn.Linear(256, 2), q),
        "WeightCache.put": lambda q: torchext.WeightCache().put("w", w, q, 2, 256),
        "column_split": lambda q: column_split(q, 256, 0, 1),
    }


@pytest.mark.parametrize("name", list(_public_calls_with_qtype()))
@pytest.mark.parametrize("fmt", [12.7, True], ids=repr)
def test_every_public_call_rejects_a_qtype_that_is_not_an_id(name, fmt):
    call = _public_calls_with_qtype()[name]
    assert call(torchext.QType.Q4_K) is not None  # the same call with the format named works
    with pytest.raises(ValueError, match=re.escape(repr(fmt))):
        call(fmt)


def test_iq_grid_header_is_generated_from_gguf():
    """kernels/iq_grids.h, the lookup tables of the grid formats, is what tools/gen_iq_grids.py makes
    from the gguf package's dequantizers: the C++ tables are gguf's (the dequantize tests then check
    every format's values against gguf's, bit for bit)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "gen_iq_grids.py"
    spec = importlib.util.spec_from_file_location("gen_iq_grids", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.HEADER.read_text() == gen.render(), "kernels/iq_grids.h is stale: run tools/gen_iq_grids.py"
