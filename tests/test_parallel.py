"""torchext.parallel: tensor-parallel QuantLinear, two ranks spawned on this machine (gloo on the
CPU; NCCL too where two GPUs are present).

Tolerances, and why:
- Column parallel with gather_output: rows are independent, so the gathered output is the
  unsharded layer's bit for bit.
- Row parallel: each rank's slice of x starts on a block boundary, so its Q8_1 activation blocks
  are the unsharded layer's; the all_reduce sums the per-rank partial products. Against the same
  per-shard products summed in one process: bit for bit (two ranks: the same products, then one add,
  which rounds once whatever the order). Against the unsharded layer only the order of the fp32 sums
  differs: each within conftest.fp32_sum_error of the exact sum (sum_order_tol).
- Gemma 3 with its MLPs sharded: the same greedy tokens as the unsharded model.
- exact=True layers (never rounding x): the column shards and a world of one are the exact layer's
  bits; row shards differ from it only in the order of the fp32 sums of its dense path.
"""

from __future__ import annotations

import os
import re
import socket

import gguf
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchext
from conftest import (dequant_oracle, fp32_sum_error, gaussian_activations, gaussian_linear, gemv_rows, half_ulp,
                      offset_oracle, q8_1_fields, q8_1_reference, skip_without_gemma_gguf)
from torchext import QType, WeightCache
from torchext.nn import QuantLinear, shared_input
from torchext.parallel import ColumnParallelQuantLinear, RowParallelQuantLinear, column_split, row_split

WORLD = 2

BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="NCCL needs two CUDA devices"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, backend: str, port: int, fn, args) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        fn(rank, device, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, backend: str = "gloo") -> None:
    """Run fn(rank, device, *args) on WORLD ranks; a rank's exception fails the test."""
    mp.spawn(_worker, args=(backend, _free_port(), fn, args), nprocs=WORLD, join=True)


@pytest.fixture(autouse=True)
def _nccl_env(monkeypatch):
    # NVLink multicast (NVLS, symmetric memory) is off on the shared GPU hosts
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def sum_order_tol(layer: QuantLinear, x: torch.Tensor, got: torch.Tensor, want: torch.Tensor,
                  exact: bool = False) -> torch.Tensor:
    """How far a row-parallel layer's output `got` may be from the unsharded layer's `want` on x [rows, k]: the
    same terms summed in other orders (a rank's, then the all_reduce's add), each side within fp32_sum_error
    of the exact sum, then the same bias add (one rounding each: 2u of each result covers it). Up to 16 rows
    the Q8_1 GEMV, whose terms are exact integer dot products scaled in fp32 (two roundings, one more for the
    dequantized W's own), k/4 + k/32 of them on the CPU (eight int32 lanes a 32-value block, then the
    offsets), their magnitudes summing to |x^| @ (|W| + 2|m|).T (x^ the Q8_1 values, m the weights' offsets:
    the dot products meet d * q = W + m); beyond, or exact, the dense path, k exact products, |x| @ |W|.T."""
    rows, k = x.shape
    n, q = layer.out_features, layer.qtype
    W = np.abs(dequant_oracle(layer.weight, q, n, k))
    if rows <= 16 and not exact:
        f = q8_1_fields(q8_1_reference(x.detach().cpu().float().numpy()))
        xq = (f.d.astype(np.float64)[..., None] * f.qs).reshape(rows, -1)[:, :k]
        terms = fp32_sum_error(np.abs(xq) @ (W + 2 * offset_oracle(layer.weight, q, n, k)).T, k // 4 + k // 32 + 4)
    else:
        terms = fp32_sum_error(np.abs(x.detach().cpu().double().numpy()) @ W.T, k + 1)
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return 2 * torch.from_numpy(terms) + 2 * half_ulp(torch.float32) * (got.abs() + want.abs())


def assert_sum_order_close(layer, x, got, want, exact=False):
    err = (got.detach().cpu().double() - want.detach().cpu().double()).abs()
    assert (err <= sum_order_tol(layer, x, got, want, exact)).all()


def mlp(gate, up, down, x):
    """Gemma's MLP: down(gelu(gate(x)) * up(x)), x quantized once for gate and up."""
    g, u = shared_input(x, gate, up)
    return down(torchext.gelu(g, "tanh") * u)


# ---- (a) a sharded MLP, (b) column parallel with gather ----------------------------------------

# (format, hidden, ffn); MXFP4's down projection splits its 320 features into 5 blocks of 17 bytes a rank,
# so rank 1's bytes of every row start at an odd offset
MLP_SHAPES = [(QType.Q4_K, 256, 512), (QType.Q8_0, 256, 192), (QType.Q5_0, 320, 320), (QType.MXFP4, 192, 320)]


def _sharded_mlps(rank, device):
    for qtype, hidden, ffn in MLP_SHAPES:
        gate, up, down = (QuantLinear.from_linear(gaussian_linear(i, o, seed=s), qtype).to(device)
                          for i, o, s in ((hidden, ffn, 1), (hidden, ffn, 2), (ffn, hidden, 3)))
        pg, pu = (ColumnParallelQuantLinear.from_quant_linear(m) for m in (gate, up))
        pd = RowParallelQuantLinear.from_quant_linear(down)
        assert pg.local.out_features == pd.local.in_features == ffn // WORLD
        # every rank's shards, built in this process with explicit ranks, for the one-process sum
        shards = [(ColumnParallelQuantLinear.from_quant_linear(gate, r, WORLD),
                   ColumnParallelQuantLinear.from_quant_linear(up, r, WORLD),
                   RowParallelQuantLinear.from_quant_linear(down, r, WORLD)) for r in range(WORLD)]
        with torch.no_grad():
            for rows in (1, 4, gemv_rows(qtype, device) + 1):  # the Q8_1 GEMV path, then the dense path
                x = gaussian_activations((rows, hidden), seed=rows).to(device)
                got = mlp(pg, pu, pd, x)
                summed = sum(d.local(torchext.gelu(g(x), "tanh") * u(x)) for g, u, d in shards) + down.bias
                want = mlp(gate, up, down, x)
                assert torch.equal(got, summed), (qtype.name, rows)
                # gate and up are the unsharded layers' bit for bit, so down's input is too
                h = torchext.gelu(gate(x), "tanh") * up(x)
                assert_sum_order_close(down, h, got, want)


def _gather_and_full_input(rank, device):
    # 255 rows: rank 0 holds 128, rank 1 127 (all_gather of unequal shards)
    layer = QuantLinear.from_linear(gaussian_linear(192, 255, seed=4), QType.Q8_0).to(device)
    col = ColumnParallelQuantLinear.from_quant_linear(layer, gather_output=True)
    a, b = row_split(255, rank, WORLD)
    assert (a, b) == [(0, 128), (128, 255)][rank]
    assert torch.equal(col.local.weight, layer.weight[a:b]) and torch.equal(col.local.bias, layer.bias[a:b])
    row = RowParallelQuantLinear.from_quant_linear(layer, input_is_parallel=False)
    assert torch.equal(row.local.weight, layer.weight[:, rank * 102:(rank + 1) * 102])  # 3 blocks of 34 bytes
    with torch.no_grad():
        for rows in (1, 4, 16):
            x = gaussian_activations((2, rows, 192), seed=rows).to(device)
            assert torch.equal(col(x), layer(x))
            assert all(torch.equal(p, w) for p, w in zip(shared_input(x, col, col), shared_input(x, layer, layer)))
            assert_sum_order_close(layer, x.reshape(-1, 192), row(x).reshape(-1, 255), layer(x).reshape(-1, 255))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_mlp_matches_single_process(backend):
    spawn(_sharded_mlps, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_gather_is_bitwise_and_row_slices_full_input(backend):
    spawn(_gather_and_full_input, backend=backend)


# ---- (c) shards read from the Gemma 3 GGUF, (e) the model with its MLPs sharded ---------------

def _gemma(rank, device, path):
    import gguf

    from torchext.models.gemma3 import generate, load_gemma3

    reader = gguf.GGUFReader(str(path))  # one parse (~14 s) for the model and from_gguf
    model, tok, _ = load_gemma3(path, max_seq_len=64, reader=reader, stack=False)  # gate and up shard apart
    files = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors if t.name.startswith("blk.0.ffn")}

    # (c) blk.0.ffn_gate: Q5_0, 2048 rows of 640 by rows; blk.0.ffn_down: Q6_K, 640 rows of 2048 = 8
    # super-blocks, 4 per rank (840 of each row's 1680 bytes)
    gate = ColumnParallelQuantLinear.from_gguf(path, "blk.0.ffn_gate.weight", reader=reader, gather_output=True)
    down = RowParallelQuantLinear.from_gguf(path, "blk.0.ffn_down.weight", reader=reader)
    assert (gate.qtype, gate.in_features, gate.out_features) == (QType.Q5_0, 640, 2048)
    assert (down.qtype, down.in_features, down.out_features) == (QType.Q6_K, 2048, 640)
    assert torch.equal(gate.local.weight, files["blk.0.ffn_gate.weight"][rank * 1024:(rank + 1) * 1024])
    assert torch.equal(down.local.weight, files["blk.0.ffn_down.weight"][:, rank * 840:(rank + 1) * 840])
    with pytest.raises(ValueError, match=r"blk.0.ffn_norm.weight: F32 is not a weight format"):
        RowParallelQuantLinear.from_gguf(path, "blk.0.ffn_norm.weight", reader=reader)
    mlp0 = model.blocks[0].mlp
    gate_proj, up_proj = mlp0.gate_up_proj  # one QuantLinear each (not stacked)
    assert torch.equal(gate.local.weight, ColumnParallelQuantLinear.from_quant_linear(gate_proj).local.weight)
    assert torch.equal(down.local.weight, RowParallelQuantLinear.from_quant_linear(mlp0.down_proj).local.weight)
    a, b = column_split(QType.Q6_K, 2048, rank, WORLD)
    with torch.no_grad():
        for rows in (1, 16):
            x = gaussian_activations((rows, 640), seed=rows)
            assert torch.equal(gate(x), gate_proj(x))
            h = gaussian_activations((rows, 2048), seed=rows)
            assert_sum_order_close(mlp0.down_proj, h, down(h[:, a:b]), mlp0.down_proj(h))

    # (e) gate and up split by rows, down by input: the same greedy tokens
    prompt = tok.encode("Monday, Tuesday, Wednesday,")
    want = generate(model, prompt, 4)
    for block in model.blocks:
        m = block.mlp
        m.gate_up_proj = torch.nn.ModuleList(ColumnParallelQuantLinear.from_quant_linear(x) for x in m.gate_up_proj)
        m.down_proj = RowParallelQuantLinear.from_quant_linear(m.down_proj)
    assert generate(model, prompt, 4) == want, tok.decode(want)


def test_gemma3_shards_from_gguf_and_sharded_model():
    skip_without_gemma_gguf()
    from torchext.models.gemma3 import gguf_path
    spawn(_gemma, gguf_path())


# ---- (d) errors, in one process (construction needs no process group) -------------------------

@pytest.mark.parametrize("qtype, in_features, match", [
    (QType.Q4_K, 256, r"in_features=256 does not split into whole Q4_K blocks of 256 values over world_size=2"),
    (QType.Q4_K, 300, r"in_features=300 does not split into whole Q4_K blocks of 256 values over world_size=2"),
    (QType.Q8_0, 96, r"in_features=96 does not split into whole Q8_0 blocks of 32 values over world_size=2"),
], ids=["Q4_K-256", "Q4_K-padded", "Q8_0-96"])
def test_split_off_block_boundaries_raises(qtype, in_features, match):
    layer = QuantLinear.from_linear(gaussian_linear(in_features, 8), qtype)
    with pytest.raises(ValueError, match=match):
        RowParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=2)
    ColumnParallelQuantLinear.from_quant_linear(layer, rank=1, world_size=2)  # rows split anywhere


def test_world_of_one_is_the_layer():
    """world_size=1 needs no process group and keeps a k-quant's padded last super-block."""
    layer = QuantLinear.from_linear(gaussian_linear(300, 16), QType.Q4_K)
    x = gaussian_activations((3, 300))
    col = ColumnParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=1, gather_output=True)
    row = RowParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=1)
    with torch.no_grad():
        assert torch.equal(col(x), layer(x)) and torch.equal(row(x), layer(x))
    assert "format=Q4_K" in repr(col) and "rank=0/1" in repr(row) and "in_features=300" in repr(row)


def test_other_errors():
    layer = QuantLinear.from_linear(gaussian_linear(64, 8), QType.Q8_0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            ColumnParallelQuantLinear.from_quant_linear(layer)
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size, got rank=2, world_size=2"):
        RowParallelQuantLinear.from_quant_linear(layer, rank=2, world_size=2)
    with pytest.raises(ValueError, match="^rank: expected a whole number, got True$"):  # was taken as rank 1
        RowParallelQuantLinear.from_quant_linear(layer, rank=True, world_size=2)
    with pytest.raises(ValueError, match="^world_size: expected a whole number, got 2.0$"):
        RowParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=2.0)
    shard = RowParallelQuantLinear.from_quant_linear(layer, rank=np.int64(1), world_size=np.int64(2))  # was refused
    assert (shard.rank, shard.world_size) == (1, 2) and type(shard.rank) is int
    with pytest.raises(ValueError, match="out_features=8 is fewer than world_size=9"):
        ColumnParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=9)
    row = RowParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"x: expected last dimension 32"):
        row(torch.zeros(1, 64))
    cache = WeightCache()
    cache.put("norm", torch.ones(4, 64))
    with pytest.raises(ValueError, match="norm: a dense weight"):
        RowParallelQuantLinear.from_cache(cache, "norm", rank=0, world_size=1)
    cache.put("w", layer.weight, "Q8_0", 8, 64)
    shard = ColumnParallelQuantLinear.from_cache(cache, "w", bias=layer.bias, rank=1, world_size=2)
    assert torch.equal(shard.local.weight, layer.weight[4:]) and torch.equal(shard.local.bias, layer.bias[4:])


@pytest.mark.parametrize("kind", [ColumnParallelQuantLinear, RowParallelQuantLinear], ids=["column", "row"])
def test_state_dict_of_another_shard_is_refused(kind):
    """Rank 0's and rank 1's shards of a 64 x 64 layer are one size; each state_dict loads into its
    own rank's module only (it once loaded into the other's and computed that rank's part)."""
    layer = QuantLinear.from_linear(gaussian_linear(64, 64), QType.Q8_0)
    shards = [kind.from_quant_linear(layer, rank=r, world_size=2) for r in range(2)]
    other = kind.from_quant_linear(layer, rank=0, world_size=4) if kind is ColumnParallelQuantLinear else None
    before = {k: v.clone() for k, v in shards[1].state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"^_extra_state: the state_dict is of the shard \{'rank': 0, 'world_size': 2, "
                                         r".*this \w+ParallelQuantLinear is \{'rank': 1, .*own shard's$"):
        shards[1].load_state_dict(shards[0].state_dict())
    after = shards[1].state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was overwritten
    shards[1].load_state_dict(kind.from_quant_linear(layer, rank=1, world_size=2).state_dict())
    if other is not None:
        with pytest.raises(ValueError, match="'world_size': 4"):
            other.load_state_dict({**shards[0].state_dict()})


def test_a_shard_for_another_world_size_is_refused_at_its_collective(tmp_path):
    """Rank and world size passed explicitly build a shard without a process group; run under a group of
    another size, its all_reduce / all_gather would sum or gather the wrong parts (or wait for ranks
    that do not exist): a ValueError naming both sizes instead."""
    layer = QuantLinear.from_linear(gaussian_linear(64, 8), QType.Q8_0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        row = RowParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=2)
        col = ColumnParallelQuantLinear.from_quant_linear(layer, rank=0, world_size=2, gather_output=True)
        for call in (lambda: row(torch.zeros(1, 32)), lambda: col(torch.zeros(1, 64))):
            with pytest.raises(ValueError, match="^world_size: this shard was built for world_size=2, but its "
                                                 "process group has 1 ranks$"):
                call()
        whole = ColumnParallelQuantLinear.from_quant_linear(layer, gather_output=True)  # the group's own size
        x = gaussian_activations((2, 64), seed=1)
        assert torch.equal(whole(x), layer(x))
    finally:
        dist.destroy_process_group()


# ---- (f) exact layers, the reader, the bias of from_gguf: in one process ------------------------

def write_gguf(path, name: str, layer: QuantLinear) -> None:
    """A GGUF file holding `layer`'s bytes as tensor `name`."""
    raw = layer.weight.numpy()
    writer = gguf.GGUFWriter(str(path), "torchext-test")
    writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType(int(layer.qtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_exact_layers_shard_exact(tmp_path):
    """exact=True carries over from every constructor: a world of one is the exact layer bit for bit, the
    column shards are its rows, the row shards' sum is its dense path's up to the order of the fp32 sums (at 3
    rows, where a shard that rounded x to Q8_1 would be far off both)."""
    layer = QuantLinear.from_linear(gaussian_linear(512, 24), QType.Q4_K)
    layer.exact = True
    cache = WeightCache()
    cache.put("w", layer.weight, "Q4_K", 24, 512)
    write_gguf(tmp_path / "w.gguf", "w", layer)
    x = gaussian_activations((3, 512))
    whole = {"rank": 0, "world_size": 1}
    ones = [cls.from_quant_linear(layer, **whole) for cls in (ColumnParallelQuantLinear, RowParallelQuantLinear)]
    ones += [m for cls in (ColumnParallelQuantLinear, RowParallelQuantLinear)
             for m in (cls.from_cache(cache, "w", layer.bias, exact=True, **whole),
                       cls.from_gguf(tmp_path / "w.gguf", "w", layer.bias, exact=True, **whole))]
    cols = [ColumnParallelQuantLinear.from_quant_linear(layer, r, WORLD) for r in range(WORLD)]
    rows = [RowParallelQuantLinear.from_quant_linear(layer, r, WORLD) for r in range(WORLD)]  # a super-block each
    assert all(m.local.exact for m in ones + cols + rows)
    assert not ColumnParallelQuantLinear.from_cache(cache, "w", **whole).local.exact  # the default, as QuantLinear's
    with torch.no_grad():
        want = layer(x)
        assert not torch.equal(QuantLinear(layer.weight, QType.Q4_K, 512, 24, layer.bias)(x), want)  # Q8_1 shows
        for m in ones:
            assert torch.equal(m(x), want), m
        assert torch.equal(torch.cat([m(x) for m in cols], -1), want)
        got = sum(m.local(x[:, m.start:m.stop]) for m in rows) + layer.bias
        assert_sum_order_close(layer, x, got, want, exact=True)


def test_reader_of_another_file_raises(tmp_path):
    """from_gguf reads a tensor at its reader's offset in its reader's format, so a reader of another file, or
    of this one before it was rewritten, is refused as WeightCache.load_gguf refuses it (either way round:
    Q4_K over Q8_0 bytes gave NaNs, Q8_0's larger rows over Q4_K's a numpy memory-map error)."""
    linear = gaussian_linear(256, 8)
    files = {q: tmp_path / f"{q.name}.gguf" for q in (QType.Q4_K, QType.Q8_0)}
    for q, path in files.items():
        write_gguf(path, "w", QuantLinear.from_linear(linear, q))
    readers = {q: gguf.GGUFReader(str(path)) for q, path in files.items()}
    for (q, path), other in zip(files.items(), (QType.Q8_0, QType.Q4_K)):
        for cls in (ColumnParallelQuantLinear, RowParallelQuantLinear):
            with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: reader: its tensor table is not the "
                                                 r"file's as read now \(was the file rewritten after the reader"):
                cls.from_gguf(path, "w", rank=0, world_size=1, reader=readers[other])
            assert cls.from_gguf(path, "w", rank=0, world_size=1, reader=readers[q]).qtype == q
    os.replace(files[QType.Q8_0], files[QType.Q4_K])  # the Q4_K file rewritten in Q8_0 after its reader opened it
    with pytest.raises(ValueError, match=r"reader: its tensor table is not the file's as read now"):
        ColumnParallelQuantLinear.from_gguf(files[QType.Q4_K], "w", rank=0, world_size=1, reader=readers[QType.Q4_K])


def test_gguf_bias_of_another_shape_raises(tmp_path):
    """The whole bias is checked before a rank takes its slice (a longer one was cut silently), with
    QuantLinear's message."""
    layer = QuantLinear.from_linear(gaussian_linear(256, 64), QType.Q8_0)
    write_gguf(tmp_path / "w.gguf", "w", layer)
    for bias, got in ((torch.zeros(100), r"torch.float32 \[100\]"), (torch.zeros(64, dtype=torch.int64),
                                                                      r"torch.int64 \[64\]")):
        match = rf"^bias: expected a float tensor of shape \[64\], got {got}$"
        with pytest.raises(ValueError, match=match):
            QuantLinear(layer.weight, QType.Q8_0, 256, 64, bias)
        for rank in range(WORLD):
            for cls in (ColumnParallelQuantLinear, RowParallelQuantLinear):
                with pytest.raises(ValueError, match=match):
                    cls.from_gguf(tmp_path / "w.gguf", "w", bias, rank=rank, world_size=WORLD)
