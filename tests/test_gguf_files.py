"""GGUF files, valid and broken: WeightCache.load_gguf (through torchext.gguf_file.GGUFFile)
either loads a file as gguf reads it or raises a ValueError naming the file, and the tensor
where there is one; never another exception, never a crash.

Files are written with gguf.GGUFWriter and then cut or patched at byte offsets taken from
gguf.GGUFReader's reading of the valid file, an account of the layout independent of torchext's.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
import subprocess
import sys
import threading
from typing import NamedTuple

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import event, given, settings
from hypothesis import strategies as st

import torchext
from conftest import DEVICES, dequant_oracle, exact_activations, random_weight
from test_matmul import assert_exact_close
from torchext import WeightCache
from torchext.gguf_file import GGUFFile

# name -> (type, n, k), in file order: three weight formats (quantized by torchext) and a dense vector
TENSORS = {
    "blk.0.ffn_up.weight": (G.Q4_K, 2, 256),
    "blk.0.attn_q.weight": (G.Q8_0, 3, 64),
    "blk.0.ffn_down.weight": (G.Q6_K, 1, 256),
    "output_norm.weight": (G.F32, 1, 36),  # 144 bytes: the file ends in padding
}
ALIGNMENT = 32  # GGUFWriter's default
HEADER_BYTES = 24


def write_gguf(path, tensors: dict[str, np.ndarray], endianess=GGUFEndian.LITTLE, metadata=True) -> None:
    """A GGUF file of `tensors` (uint8 rows for a weight format, tagged by TENSORS' type)."""
    writer = GGUFWriter(str(path), "torchext-test", endianess=endianess)
    if metadata:
        writer.add_name("tiny")
        writer.add_string("tiny.license", "mit")  # a key as long as general.name
        writer.add_uint32("tiny.context_length", 128)
        writer.add_token_list(["<s>", "a", "bc"])
        writer.add_array("tiny.scores", [0.5, -1.0])
    for name, a in tensors.items():
        qtype = TENSORS.get(name, (G.F32,))[0]
        if qtype == G.F32:
            writer.add_tensor(name, a)
        else:  # raw bytes: raw_shape is the byte shape, the writer derives the ggml shape
            writer.add_tensor(name, a, raw_shape=a.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    arrays = {}
    for name, (qtype, n, k) in TENSORS.items():
        values = torch.randn(n, k, generator=gen) * 0.1
        arrays[name] = values[0].numpy() if qtype == G.F32 else torchext.quantize(values, qtype.name).numpy()
    return arrays


class Field(NamedTuple):
    name: str
    offset: int  # of its first byte (the name's u64 length)
    end: int


class Layout(NamedTuple):
    """Where a valid file's parts lie, as gguf.GGUFReader reads them."""

    data: bytes
    kv: list[Field]  # the key/value pairs, in file order
    infos: list[Field]  # the tensor infos
    type_at: dict[str, int]  # tensor name -> offset of its u32 type field (its u64 data offset follows)
    dims_at: dict[str, int]  # tensor name -> offset of its u32 n_dims (its u64 dims follow)
    tensor_data: dict[str, tuple[int, int]]  # tensor name -> (offset of its data, bytes)

    @property
    def data_offset(self) -> int:
        return next(iter(self.tensor_data.values()))[0]


def layout_of(path) -> Layout:
    data = path.read_bytes()
    reader = GGUFReader(str(path))
    kv = [Field(f.name, f.offset, f.offset + sum(int(p.nbytes) for p in f.parts))
          for f in reader.fields.values() if f.offset >= HEADER_BYTES]
    infos, type_at, dims_at, tensor_data = [], {}, {}, {}
    for t in reader.tensors:
        start = t.field.offset
        infos.append(Field(t.name, start, start + sum(int(p.nbytes) for p in t.field.parts)))
        dims_at[t.name] = start + 8 + len(t.name.encode())
        type_at[t.name] = dims_at[t.name] + 4 + 8 * len(t.shape)
        tensor_data[t.name] = (int(t.data_offset), int(t.n_bytes))
    return Layout(data, kv, infos, type_at, dims_at, tensor_data)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(path, layout, arrays) of a valid file."""
    path = tmp_path_factory.mktemp("gguf_files") / "model.gguf"
    arrays = tensor_arrays()
    write_gguf(path, arrays)
    return path, layout_of(path), arrays


def patched(tmp_path, data: bytes, *patches: tuple[int, bytes], name="bad.gguf"):
    """A copy of `data` with bytes replaced at offsets, written to tmp_path/name."""
    buf = bytearray(data)
    for offset, new in patches:
        buf[offset:offset + len(new)] = new
    path = tmp_path / name
    path.write_bytes(bytes(buf))
    return path


def load_error(path, **kwargs) -> str:
    """The message of the ValueError that loading `path` raises (any other exception fails the test);
    it starts with the file's name."""
    with pytest.raises(ValueError) as e:
        WeightCache.from_gguf(path, **kwargs)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


def assert_loads_as_gguf_reads(path, cache: WeightCache) -> None:
    """Every tensor holds the bytes gguf's reader finds, and every quantized one dequantizes as
    gguf.quants.dequantize does those bytes (NaN where it gives NaN)."""
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert list(cache) == list(tensors)
    for name, e in cache.items():
        t = tensors[name]
        raw = np.array(t.data)  # a copy: the mapping is dropped with the reader
        if e.quantized:
            assert np.array_equal(e.tensor.numpy(), raw.reshape(e.n, -1)), name
            got = torchext.dequantize(e.tensor, e.qtype, e.n, e.k).numpy()
            np.testing.assert_array_equal(got, gguf_dequantize(raw.reshape(e.n, -1), t.tensor_type)[:, :e.k])
        elif t.tensor_type in (G.F32, G.F16, G.F64, G.I8, G.I16, G.I32, G.I64):
            np.testing.assert_array_equal(e.tensor.numpy(), raw)
        else:  # BF16 and the quantized types torchext does not run: gguf's float32 values
            np.testing.assert_array_equal(e.tensor.float().numpy(), gguf_dequantize(raw, t.tensor_type))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---- valid files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", [False, True])
def test_valid_file_loads_as_gguf_reads_it(valid, pool):
    path, layout, arrays = valid
    with GGUFFile(path) as g:
        assert (g.version, g.alignment, g.size, g.data_offset) == (3, ALIGNMENT, len(layout.data), layout.data_offset)
        assert [(t.name, t.data_offset, t.n_bytes) for t in g.tensors] == [
            (name, *layout.tensor_data[name]) for name in TENSORS]
        assert [t.shape for t in g.tensors] == [(k, n) if q != G.F32 else (k,) for q, n, k in TENSORS.values()]
        assert all(torch.equal(g.read(t), torch.frombuffer(bytearray(arrays[t.name].tobytes()), dtype=torch.uint8))
                   for t in g.tensors)
    cache = WeightCache.from_gguf(path, pool=pool)
    assert_loads_as_gguf_reads(path, cache)
    assert [cache[name].qtype for name in TENSORS] == [torchext.QType(q) if q != G.F32 else None
                                                       for q, _, _ in TENSORS.values()]


# one tensor of every format of torchext's catalog: n rows (odd, so that 17-byte MXFP4 rows end at odd
# offsets), k of an odd number of blocks (whole 256-value blocks: GGUF rows are whole blocks)
EVERY_FORMAT = {f"blk.{i}.{q.name.lower()}.weight": (G(int(q)), 5 + 2 * i, 3 * GGML_QUANT_SIZES[G(int(q))][0])
                for i, q in enumerate(torchext.formats.WEIGHT_TYPES)}


@pytest.mark.parametrize("device", DEVICES)
def test_every_weight_format_in_a_file_pooled(tmp_path, device):
    """A file written by gguf.GGUFWriter with a tensor of every weight format loads with pool=True as
    views of the file's bytes (not dequantized), and each multiplies as the float64 product with
    gguf's numpy dequantization: 1 and 5 rows (the GEMVs: DP4A, and on CUDA int8 MMA for the
    256-value formats), 20 rows (the dense path; in float32 on CUDA too). The activations are exact
    in Q8_1 (conftest.exact_activations), so the bound is test_matmul's for them: 1e-5 * |x| @ |W|.T
    (fp32 accumulation, measured below 4e-8 of it)."""
    path = tmp_path / "every.gguf"
    writer = GGUFWriter(str(path), "torchext-test")
    written = {}
    for i, (name, (q, n, k)) in enumerate(EVERY_FORMAT.items()):
        written[name] = random_weight(q, n, k, seed=100 + i).numpy()
        writer.add_tensor(name, written[name], raw_shape=written[name].shape, raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    cache = WeightCache.from_gguf(path, pool=True, device=device)
    assert list(cache) == list(EVERY_FORMAT) and cache.pool_bytes > 0
    base = cache[next(iter(EVERY_FORMAT))].tensor.untyped_storage().data_ptr()
    for i, (name, (q, n, k)) in enumerate(EVERY_FORMAT.items()):
        e = cache[name]
        assert (e.qtype, e.n, e.k) == (torchext.QType(int(q)), n, k), name
        assert e.tensor.dtype == torch.uint8 and e.tensor.device.type == device, name
        assert e.tensor.untyped_storage().data_ptr() == base, f"{name} is not a view of the pool"
        assert np.array_equal(e.tensor.cpu().numpy(), written[name]), name  # the file's very bytes
        W = dequant_oracle(torch.from_numpy(written[name]), q, n, k)
        for rows in (1, 5, 20):
            x = exact_activations((rows, k), seed=10 * i + rows)
            assert_exact_close(cache.matmul(name, x.to(device)), x, W, q)


def test_dense_tensors_off_their_element_alignment_load_pooled(tmp_path):
    """A file may set general.alignment below a dense type's element size (1 here): the pool cannot view
    such a tensor as its dtype, so it gets a copy of its own, and the other tensors stay views."""
    path = tmp_path / "align1.gguf"
    writer = GGUFWriter(str(path), "torchext-test")
    writer.add_custom_alignment(1)
    values = {"a.i8": np.array([1, 2, 3], dtype=np.int8), "b.f32": np.arange(4, dtype=np.float32),
              "c.f16": np.arange(5, dtype=np.float16), "d.i64": np.arange(2, dtype=np.int64)}
    for name, v in values.items():
        writer.add_tensor(name, v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    pooled, alone = WeightCache.from_gguf(path, pool=True), WeightCache.from_gguf(path)
    for name, v in values.items():
        assert np.array_equal(pooled[name].tensor.numpy(), v) and torch.equal(pooled[name].tensor, alone[name].tensor)
    assert pooled.pool_bytes > 0 and pooled["a.i8"].tensor.untyped_storage().nbytes() == pooled.pool_bytes  # a view


def test_version_2_and_nested_arrays_load(valid, tmp_path):
    _, layout, _ = valid
    v2 = patched(tmp_path, layout.data, (4, struct.pack("<I", 2)))
    assert_loads_as_gguf_reads(v2, WeightCache.from_gguf(v2))
    nested = tmp_path / "nested.gguf"
    writer = GGUFWriter(str(nested), "torchext-test")
    writer.add_array("tiny.nested", [[1, 2], [3]])
    writer.add_array("tiny.nested_strings", [["a", "bc"], ["d"]])
    writer.add_tensor("v", np.arange(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_loads_as_gguf_reads(nested, WeightCache.from_gguf(nested))


def test_a_file_without_the_last_tensors_padding_loads(valid, tmp_path):
    _, layout, _ = valid
    last_start, last_bytes = layout.tensor_data["output_norm.weight"]
    assert len(layout.data) == round_up(last_start + last_bytes, ALIGNMENT) > last_start + last_bytes
    cut = patched(tmp_path, layout.data[:last_start + last_bytes])
    assert_loads_as_gguf_reads(cut, WeightCache.from_gguf(cut, pool=True))


# ---- truncation ----------------------------------------------------------------------------------

def truncation_message(layout: Layout, cut: int) -> str | None:
    """A regex for the error of `layout`'s file cut to `cut` bytes (None: it still loads)."""
    if cut < HEADER_BYTES:
        return rf"the header: [\w /]+ \[\d+, \d+\) runs past the end of the file \(size {cut}\)"
    least = HEADER_BYTES + len(layout.infos) * 32 + len(layout.kv) * 13  # the smallest infos and pairs
    if cut < least:
        return (rf"the header: {len(layout.infos)} tensors and {len(layout.kv)} key/value pairs cannot fit in a "
                rf"file of {cut} bytes")
    for what, fields in (("key/value pair", layout.kv), ("tensor info", layout.infos)):
        for i, f in enumerate(fields):
            if cut < f.end:  # the name is known once its length and bytes are read
                label = f"{what} {i}" if cut < f.offset + 8 + len(f.name.encode()) else (
                    f"key '{f.name}'" if what == "key/value pair" else f"tensor '{f.name}'")
                return (rf"{re.escape(label)}: (.* runs past the end of the file \(size {cut}\)|"
                        rf"an array of \d+ elements cannot fit in a file of {cut} bytes)")
    for name, (start, n_bytes) in layout.tensor_data.items():
        if cut < start + n_bytes:
            return rf"tensor '{name}': data \[{start}, {start + n_bytes}\) runs past the end of the file \(size {cut}\)"
    return None


def test_truncated_at_every_offset(valid, tmp_path):
    """Cut anywhere in the header, the key/value table or the tensor table, and in the data at each
    tensor's ends and every 5th byte between."""
    _, layout, _ = valid
    regions = {"header": 0, "kv": 0, "infos": 0, "data": 0}
    data_cuts = {c for start, n_bytes in layout.tensor_data.values() for c in (start - 1, start, start + 1,
                                                                               start + n_bytes - 1, start + n_bytes)}
    data_cuts.update(range(layout.data_offset, len(layout.data), 5))
    for cut in sorted({*range(layout.data_offset), *data_cuts} - {len(layout.data)}):
        bad = patched(tmp_path, layout.data[:cut])
        expected = truncation_message(layout, cut)
        if expected is None:  # only the last tensor's padding is gone
            assert_loads_as_gguf_reads(bad, WeightCache.from_gguf(bad, pool=cut % 2 == 1))
            continue
        assert re.fullmatch(expected, load_error(bad, pool=cut % 2 == 1)), (cut, expected)
        region = ("header" if cut < HEADER_BYTES else "kv" if cut < layout.kv[-1].end
                  else "infos" if cut < layout.infos[-1].end else "data")
        regions[region] += 1
    assert min(regions.values()) >= 20, regions


def test_file_cut_after_the_reader_mapped_it_is_no_bus_error(tmp_path):
    """A case that crashed: gguf's reader maps a file, the file is cut (its mapped pages past the new
    end are gone), then load_gguf with that reader, which used to touch those pages (SIGBUS). In a
    fresh process, so that a crash fails this test instead of ending the run."""
    path = tmp_path / "pages.gguf"
    weight = torchext.quantize(torch.randn(256, 256), "Q8_0").numpy()  # 68 KiB: many pages
    write_gguf(path, {"blk.0.attn_q.weight": weight}, metadata=False)
    code = (
        "import os, gguf, torchext\n"
        f"path = {str(path)!r}\n"
        "reader = gguf.GGUFReader(path)\n"
        "os.truncate(path, reader.data_offset)\n"
        "for pool in (False, True):\n"
        "    try:\n"
        "        torchext.WeightCache.from_gguf(path, reader=reader, pool=pool)\n"
        "    except ValueError as e:\n"
        "        print('raised:', e)\n"
    )
    start = layout_of(path).data_offset
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stderr[-2000:]}"
    expected = (f"raised: {path}: tensor 'blk.0.attn_q.weight': data [{start}, {start + weight.nbytes}) runs past "
                f"the end of the file (size {start})")
    assert result.stdout.splitlines() == [expected, expected]  # pool=False and pool=True


@pytest.mark.parametrize("pool", [False, True])
def test_file_cut_after_the_reader_opened_it(valid, tmp_path, pool):
    """As above, cut in each tensor's data and in the tables: the error names the tensor (or the
    table entry) the cut leaves incomplete."""
    _, layout, _ = valid
    for name, (start, n_bytes) in layout.tensor_data.items():
        for cut in (start, start + n_bytes // 2, start + n_bytes - 1):
            path = patched(tmp_path, layout.data, name=f"cut_{cut}.gguf")
            reader = GGUFReader(str(path))
            os.truncate(path, cut)
            message = load_error(path, reader=reader, pool=pool)
            assert re.match(rf"tensor '{re.escape(name)}': data \[{start}, {start + n_bytes}\) runs past the end of "
                            rf"the file \(size {cut}\)", message), message
    # cut inside the tables: the reader's own parse is done, torchext's fails
    path = patched(tmp_path, layout.data, name="cut_table.gguf")
    reader = GGUFReader(str(path))
    os.truncate(path, layout.infos[1].offset + 3)
    assert load_error(path, reader=reader, pool=pool).startswith("tensor info 1: ")


def test_file_cut_while_its_data_is_read(valid, tmp_path):
    _, layout, _ = valid
    path = patched(tmp_path, layout.data)
    with GGUFFile(path) as g:
        os.truncate(path, layout.data_offset + 10)
        first, second = g.tensors[:2]
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: tensor '{first.name}': data "
                                             rf"\[{first.data_offset}, \d+\) runs past the end of the file \(size "
                                             rf"{layout.data_offset + 10}; it was {len(layout.data)} when"):
            g.read(first)
        with pytest.raises(ValueError, match=rf"tensor '{second.name}': data .* runs past the end"):
            g.read(second)
        with pytest.raises(ValueError, match="the data section: data .* runs past the end"):
            g.read_data_section()


def test_reader_of_another_file(valid, tmp_path):
    path, layout, _ = valid
    other = tmp_path / "other.gguf"
    write_gguf(other, {"output_norm.weight": np.ones(36, dtype=np.float32)})
    assert load_error(path, reader=GGUFReader(str(other))) == (
        "reader: its tensor table is not the file's as read now (was the file rewritten after the reader opened it?)")


# ---- the tensor table ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TENSORS))
def test_changed_tensor_type(valid, tmp_path, name):
    """Every other type id in a tensor's type field: refused when its byte size (padded) differs
    from the data's, else (the same padded size, or for the last tensor any size the file holds, as
    bytes may follow it: undetectable) loaded or refused by gguf."""
    _, layout, _ = valid
    qtype, n, k = TENSORS[name]
    shape = [k, n] if qtype != G.F32 else [k]
    start, n_bytes = layout.tensor_data[name]
    for other in G:
        if other == qtype:
            continue
        bad = patched(tmp_path, layout.data, (layout.type_at[name], struct.pack("<I", other)))
        block_values, block_bytes = GGML_QUANT_SIZES[other]
        if k % block_values:
            assert load_error(bad) == (f"tensor '{name}': {other.name} rows are whole blocks of {block_values} "
                                       f"values, but ne0 is {k}")
            continue
        other_bytes = math.prod(shape) // block_values * block_bytes
        last = name == layout.infos[-1].name  # bytes may follow the last tensor
        if (round_up(other_bytes, ALIGNMENT) == round_up(n_bytes, ALIGNMENT)
                or (last and start + other_bytes <= len(layout.data))):
            try:  # what the table cannot tell: the bytes are another type's of the same size, or fewer
                WeightCache.from_gguf(bad)
            except ValueError as e:
                assert str(e).startswith(f"{bad}: tensor '{name}': gguf cannot dequantize"), e
            continue
        message = load_error(bad, pool=other % 2 == 1)
        if start + other_bytes > len(layout.data):
            expected = f"tensor '{name}': data [{start}, {start + other_bytes}) runs past the end"
            assert message.startswith(expected), message
        else:
            assert message.startswith(f"tensor '{name}': {other.name} of shape {shape} takes {other_bytes} bytes "
                                      f"({round_up(other_bytes, ALIGNMENT)} padded to the alignment 32), but "), message
            assert message.endswith("the table's type or shape does not match the file's data")


def test_q4_k_read_as_q8_0(valid, tmp_path):
    """A case that used to load, then give NaN logits."""
    _, layout, _ = valid
    bad = patched(tmp_path, layout.data, (layout.type_at["blk.0.ffn_up.weight"], struct.pack("<I", G.Q8_0)))
    assert load_error(bad) == ("tensor 'blk.0.ffn_up.weight': Q8_0 of shape [256, 2] takes 544 bytes (544 padded to "
                               "the alignment 32), but the next tensor, 'blk.0.attn_q.weight', starts 288 bytes after "
                               "its start: the table's type or shape does not match the file's data")


@pytest.mark.parametrize("name", list(TENSORS))
def test_bad_data_offsets(valid, tmp_path, name):
    _, layout, _ = valid
    at = layout.type_at[name] + 4
    (offset,) = struct.unpack_from("<Q", layout.data, at)
    start, n_bytes = layout.tensor_data[name]
    size = len(layout.data)
    for new in (round_up(size, ALIGNMENT), 2**64 - ALIGNMENT, 2**32):  # past the end of the file
        message = load_error(patched(tmp_path, layout.data, (at, struct.pack("<Q", new))), pool=True)
        begin = layout.data_offset + new
        assert message == (f"tensor '{name}': data [{begin}, {begin + n_bytes}) runs past the end of the file "
                           f"(size {size})")
    for new in (offset + 1, offset + 16, 2**64 - 1):
        assert load_error(patched(tmp_path, layout.data, (at, struct.pack("<Q", new)))) == (
            f"tensor '{name}': data offset {new} is not a multiple of the file's alignment 32")
    names = list(TENSORS)
    i = names.index(name)
    neighbour = names[i - 1] if i else names[i + 1]
    swapped = patched(tmp_path, layout.data, (at, layout.data[layout.type_at[neighbour] + 4:][:8]),
                      (layout.type_at[neighbour] + 4, struct.pack("<Q", offset)))
    message = load_error(swapped)  # blames the tensor before the first that moved, or one that now runs past the end
    assert re.fullmatch(r"tensor '[\w.]+': (.* does not match the file's data|data offset .* starts the data section "
                        r"\(offset 0\)|data .* runs past the end of the file .*)", message), message


def test_data_not_back_to_back(valid, tmp_path):
    """Bytes before the first tensor's data: a table that does not describe the data. Bytes after the
    last one's padding are allowed, as llama.cpp's loader and gguf's reader allow them (torchext
    refused such a file, blaming its table)."""
    _, layout, arrays = valid
    first = layout.infos[0].name
    moved = patched(tmp_path, layout.data, (layout.type_at[first] + 4, struct.pack("<Q", ALIGNMENT)))
    assert load_error(moved) == (f"tensor '{first}': data offset 32, but the first tensor's data starts the data "
                                 "section (offset 0)")
    longer = patched(tmp_path, layout.data + bytes(3 * ALIGNMENT + 5))
    for pool in (False, True):
        cache = WeightCache.from_gguf(longer, pool=pool)
        assert all(np.array_equal(cache[name].tensor.numpy(), arrays[name]) for name in arrays)


def test_a_scalar_tensor_is_one_value(tmp_path):
    """GGUFWriter writes a numpy scalar with n_dims = 0, and llama.cpp reads it as one value (a missing
    dimension is 1); torchext refused the whole file."""
    path = tmp_path / "scalar.gguf"
    writer = GGUFWriter(str(path), "torchext-test")
    writer.add_tensor("scale", np.array(2.5, dtype=np.float32))
    writer.add_tensor("v", np.arange(3, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for pool in (False, True):
        cache = WeightCache.from_gguf(path, pool=pool)
        assert cache["scale"].tensor.tolist() == [2.5] and cache["v"].tensor.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("name", list(TENSORS))
def test_bad_dims(valid, tmp_path, name):
    _, layout, _ = valid
    qtype, n, k = TENSORS[name]
    at = layout.dims_at[name]
    n_dims = 1 if qtype == G.F32 else 2
    prefix = f"tensor '{name}': "
    for bad_n_dims in (5, 2**32 - 1):
        assert load_error(patched(tmp_path, layout.data, (at, struct.pack("<I", bad_n_dims)))) == (
            f"{prefix}{bad_n_dims} dimensions; a GGUF tensor has at most 4")
    last = at + 4 + 8 * (n_dims - 1)  # the last dim: k for a vector, n for a matrix
    assert load_error(patched(tmp_path, layout.data, (last, struct.pack("<Q", 0)))) == (
        f"{prefix}shape {[k, 0] if n_dims == 2 else [0]} holds no values (an empty tensor)")
    block = GGML_QUANT_SIZES[qtype][0]
    for dim in (2**63, 2**64 - 256, 2**62):  # elements or bytes past int64 (2**62 F32 values are 2**64 bytes)
        shape = [k, dim] if n_dims == 2 else [dim]
        n_bytes = math.prod(shape) // block * GGML_QUANT_SIZES[qtype][1]
        assert load_error(patched(tmp_path, layout.data, (last, struct.pack("<Q", dim)))) == (
            f"{prefix}{qtype.name} of shape {shape} is {n_bytes} bytes, more than int64 holds")
    shape = [k, 2**20] if n_dims == 2 else [2**20 * block]  # within int64, past the end of the file
    message = load_error(patched(tmp_path, layout.data, (last, struct.pack("<Q", shape[-1]))), pool=True)
    assert re.fullmatch(rf"{re.escape(prefix)}data \[\d+, \d+\) runs past the end of the file \(size "
                        rf"{len(layout.data)}\)", message), message
    if n_dims == 2:
        assert load_error(patched(tmp_path, layout.data, (at + 4, struct.pack("<Q", k + 1)))) == (
            f"{prefix}{qtype.name} rows are whole blocks of {block} values, but ne0 is {k + 1}")


@pytest.mark.parametrize("type_id", [4, 5, max(G) + 1, 2**32 - 1])  # 4, 5: ids ggml retired
def test_unknown_tensor_type(valid, tmp_path, type_id):
    _, layout, _ = valid
    bad = patched(tmp_path, layout.data, (layout.type_at["blk.0.attn_q.weight"], struct.pack("<I", type_id)))
    assert load_error(bad) == f"tensor 'blk.0.attn_q.weight': unknown tensor type id {type_id}"


def test_bad_tensor_names(valid, tmp_path):
    _, layout, _ = valid
    first, second = layout.infos[:2]
    assert load_error(patched(tmp_path, layout.data, (first.offset + 8, b"\xff"))) == "tensor info 0: name is not UTF-8"
    assert load_error(patched(tmp_path, layout.data, (second.offset, struct.pack("<Q", 2**40)))) == (
        f"tensor info 1: name of {2**40} bytes; torchext reads names of up to 65536")
    # the second name made the first's (they are of the same length)
    assert len(first.name) == len(second.name)
    same = patched(tmp_path, layout.data, (second.offset + 8, first.name.encode()))
    assert load_error(same) == f"tensor '{first.name}': appears twice in the tensor table"


# ---- the header and the key/value table ------------------------------------------------------------

def test_a_path_that_is_no_regular_file(tmp_path):
    """A FIFO hung the load (open() waits for a writer); a pipe (bash's <(...)) or a device read as a file
    of size 0 ("magic [0, 4) runs past the end of the file"); a directory was an IsADirectoryError."""
    assert load_error(tmp_path) == "expected a GGUF file, got a directory"
    assert load_error("/dev/null") == "expected a GGUF file, got a device or socket"
    read_end, write_end = os.pipe()
    try:
        assert load_error(f"/dev/fd/{read_end}") == "expected a GGUF file, got a pipe"
    finally:
        os.close(read_end)
        os.close(write_end)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(load_error(fifo)), daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # blocked in open(): a writer lets it return, and the test fail
        with open(fifo, "wb"):
            pass
        thread.join()
    assert errors == ["expected a GGUF file, got a pipe"]


@pytest.mark.parametrize("magic", [b"GGUG", b"\0\0\0\0", b"GGML", b"FUGG"])
def test_bad_magic(valid, tmp_path, magic):
    _, layout, _ = valid
    assert load_error(patched(tmp_path, layout.data, (0, magic))) == (
        f"the header: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


@pytest.mark.parametrize("version", [0, 1, 4, 2**32 - 1])
def test_bad_version(valid, tmp_path, version):
    _, layout, _ = valid
    assert load_error(patched(tmp_path, layout.data, (4, struct.pack("<I", version)))) == (
        f"the header: GGUF version {version} is not supported (torchext reads versions 2 and 3)")


def test_big_endian_file(tmp_path):
    path = tmp_path / "big.gguf"
    write_gguf(path, {"output_norm.weight": np.ones(36, dtype=np.float32)}, endianess=GGUFEndian.BIG)
    assert load_error(path) == "the header: a big-endian GGUF file; torchext reads little-endian ones"


def test_counts_that_cannot_fit(valid, tmp_path):
    _, layout, _ = valid
    size = len(layout.data)
    for tensors, pairs in ((2**64 - 1, len(layout.kv)), (len(layout.infos), 2**63), (size // 32, 0)):
        bad = patched(tmp_path, layout.data, (8, struct.pack("<QQ", tensors, pairs)))
        assert load_error(bad) == (f"the header: {tensors} tensors and {pairs} key/value pairs cannot fit in a file "
                                   f"of {size} bytes")


def kv_field(layout: Layout, key: str) -> Field:
    return next(f for f in layout.kv if f.name == key)


def test_bad_key_values(valid, tmp_path):
    _, layout, _ = valid
    data = layout.data
    ctx = kv_field(layout, "tiny.context_length")
    vtype_at = ctx.offset + 8 + len(ctx.name)
    assert load_error(patched(tmp_path, data, (vtype_at, struct.pack("<I", 13)))) == (
        "key 'tiny.context_length': unknown value type 13")
    assert load_error(patched(tmp_path, data, (ctx.offset + 8, b"\xfe"))).endswith(": key is not UTF-8")
    assert re.fullmatch(r"key/value pair \d+: key of 1099511627776 bytes; torchext reads names of up to 65536",
                        load_error(patched(tmp_path, data, (ctx.offset, struct.pack("<Q", 2**40))))), "key length"
    # a key that names another of the same length
    name = kv_field(layout, "general.name")
    twin = next(f for f in layout.kv if f.name != name.name and len(f.name) == len(name.name))
    assert load_error(patched(tmp_path, data, (twin.offset + 8, name.name.encode()))) == (
        "key 'general.name': appears twice")
    # a string value whose length runs past the end; arrays with a bad element type or count
    assert re.fullmatch(rf"key 'general.name': string \[\d+, \d+\) runs past the end of the file \(size {len(data)}\)",
                        load_error(patched(tmp_path, data, (name.offset + 8 + len(name.name) + 4,
                                                            struct.pack("<Q", 2**50)))))
    tokens = kv_field(layout, "tokenizer.ggml.tokens")
    array_at = tokens.offset + 8 + len(tokens.name) + 4  # element type, then count
    assert load_error(patched(tmp_path, data, (array_at, struct.pack("<I", 99)))) == (
        "key 'tokenizer.ggml.tokens': unknown array element type 99")
    assert load_error(patched(tmp_path, data, (array_at + 4, struct.pack("<Q", 2**61)))) == (
        f"key 'tokenizer.ggml.tokens': an array of {2**61} elements cannot fit in a file of {len(data)} bytes")
    scores = kv_field(layout, "tiny.scores")
    count_at = scores.offset + 8 + len(scores.name) + 4 + 4
    assert re.fullmatch(r"key 'tiny.scores': array of 1152921504606846976 elements \[\d+, \d+\) runs past the end "
                        rf"of the file \(size {len(data)}\)",
                        load_error(patched(tmp_path, data, (count_at, struct.pack("<Q", 2**60)))))


@pytest.mark.parametrize("value, vtype, expected", [
    (0, GGUFValueType.UINT32, "0 is not a power of two"),
    (48, GGUFValueType.UINT32, "48 is not a power of two"),
    (32, GGUFValueType.INT32, "value type 5, expected UINT32 (4)"),
])
def test_bad_alignment(tmp_path, value, vtype, expected):
    path = tmp_path / "aligned.gguf"
    writer = GGUFWriter(str(path), "torchext-test")
    writer.add_custom_alignment(64)
    writer.add_tensor("v", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFFile(path).alignment == 64
    alignment = layout_of(path).kv[-1]
    assert alignment.name == "general.alignment"
    vtype_at = alignment.offset + 8 + len(alignment.name)
    bad = patched(tmp_path, path.read_bytes(), (vtype_at, struct.pack("<II", vtype, value)))
    assert load_error(bad) == f"key 'general.alignment': {expected}"


def test_arrays_nested_too_deep(tmp_path):
    path = tmp_path / "deep.gguf"
    writer = GGUFWriter(str(path), "torchext-test")
    deep = [1]
    for _ in range(9):
        deep = [deep]
    writer.add_array("tiny.deep", deep)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert load_error(path) == "key 'tiny.deep': arrays nested more than 8 deep"


# ---- random damage ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_fuzz")


_fuzz_files = itertools.count()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_damage_loads_as_gguf_reads_or_raises(valid, fuzz_dir, data):
    """A valid file cut short and/or with bytes overwritten (in the header and tables, where
    damage changes the layout, or in the tensors' data): either it loads, holding the bytes gguf's
    reader finds and dequantizing as gguf does, or it raises a ValueError naming the file."""
    _, layout, _ = valid
    size = len(layout.data)
    tables = st.integers(0, layout.data_offset - 1)
    tensor_data = st.integers(layout.data_offset, size - 1)
    byte = st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
    patches = data.draw(st.lists(st.tuples(st.one_of(tables, tensor_data), byte), max_size=6), "patches")
    cut = data.draw(st.one_of(st.just(size), st.just(size), st.integers(0, size - 1)), "cut")
    buf = bytearray(layout.data)
    for at, value in patches:
        buf[at] = value
    path = fuzz_dir / f"fuzz{next(_fuzz_files)}.gguf"  # a fresh file: gguf's reader may still map the last
    path.write_bytes(bytes(buf[:cut]))
    try:
        cache = WeightCache.from_gguf(path, pool=data.draw(st.booleans(), "pool"))
    except ValueError as e:
        assert str(e).startswith(f"{path}: "), e
        event("raises ValueError")  # the outcomes' shares: pytest --hypothesis-show-statistics
    else:
        assert_loads_as_gguf_reads(path, cache)
        event("loads")
    path.unlink()
