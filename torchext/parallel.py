"""Tensor-parallel QuantLinear over torch.distributed (gloo on the CPU, NCCL on GPUs).

    up = ColumnParallelQuantLinear.from_gguf(path, "blk.0.ffn_up.weight")      # this rank's rows
    down = RowParallelQuantLinear.from_gguf(path, "blk.0.ffn_down.weight")     # this rank's columns
    y = down(F.gelu(up(x)))                                                    # one all_reduce

Column parallel: the output rows are split over the ranks (the first out % world ranks get one
more); each rank keeps its rows' bytes and bias, and returns its slice of the output, or the whole
output with gather_output=True (an all_gather). Rows are independent, so the result is the
unsharded layer's, bit for bit.

Row parallel: the input features are split over the ranks at block boundaries (256 values for
the k-quants and the other 256-value formats, 64 for NVFP4, 32 for the others), equally; each
rank keeps, of every row, the bytes of its blocks, computes the partial product of its slice of x
and the partial results are summed with an all_reduce; the bias is added once, after it. The Q8_1
activation blocks are the unsharded layer's (the slices start on block boundaries), so only the
order of the float sums differs.

exact=True (QuantLinear's: activations never rounded to Q8_1) carries over: from_quant_linear takes
the layer's, from_cache and from_gguf take it as an argument.

Rank and world size default to torch.distributed's (of `group`); passing them explicitly builds a
shard without a process group (world_size=1 needs none to run either). The collectives are
torch.distributed's in-place ones: inference only, no gradient flows through them.
"""

from __future__ import annotations

import numbers
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .cache import WeightCache
from .gguf_file import ggml_k_n
from .weights import WEIGHT_IDS, weight_format
from .formats import WEIGHT_TYPES, QType, block_bytes, block_values, row_bytes
from .gguf_file import GGUFFile
from .nn import _EXTRA_STATE, QuantLinear, check_bias


def _rank_world(rank: Optional[int], world_size: Optional[int], group) -> tuple[int, int]:
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("rank and world_size: torch.distributed is not initialized; call "
                             "init_process_group first or pass rank= and world_size=")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    for name, value in (("rank", rank), ("world_size", world_size)):  # numpy's integers too; not bools
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}: expected a whole number, got {value!r}")
    rank, world_size = int(rank), int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank and world_size: expected 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    return rank, world_size


def _check_group(world_size: int, group) -> None:
    """Before a collective: a shard built for another world size than its process group's would gather or
    sum the wrong parts (or wait for ranks that do not exist)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) != world_size:
        raise ValueError(f"world_size: this shard was built for world_size={world_size}, but its process group has "
                         f"{dist.get_world_size(group)} ranks")


def row_split(out_features: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, stop) of rank's output rows: as even as possible, the first out % world ranks
    taking one more."""
    base, extra = divmod(out_features, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def column_split(qtype, in_features: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, stop) of rank's input features: an equal number of whole blocks per rank
    (ValueError when in_features does not divide so; a k-quant row whose last super-block is
    padding cannot be split at all)."""
    q = QType.of(qtype)
    bv = block_values(q)
    if world_size > 1 and in_features % (bv * world_size):
        raise ValueError(f"in_features={in_features} does not split into whole {q.name} blocks of {bv} values "
                         f"over world_size={world_size}: each rank needs a multiple of {bv} values "
                         f"(in_features a multiple of {bv * world_size})")
    local = in_features // world_size
    return rank * local, (rank + 1) * local


def _gguf_tensor(path, name: str, reader):
    """(tensor info, qtype, n, k) of a quantized tensor of a GGUF file; a given reader must be
    path's, as it is now (ValueError otherwise, as WeightCache.load_gguf's)."""
    import gguf

    with GGUFFile(path) as g:  # torchext's checks of the header, tables and offsets first: errors name file and tensor
        if reader is not None:
            g.check_reader(reader)  # its offsets and formats are what the bytes are read by
    reader = reader if reader is not None else gguf.GGUFReader(os.fspath(path))
    found = [t for t in reader.tensors if t.name == name]
    if not found:
        raise KeyError(f"name: no tensor {name!r} in {os.fspath(path)!r}")
    t = found[0]
    if t.tensor_type.value not in WEIGHT_IDS:
        raise ValueError(f"{name}: {t.tensor_type.name} is not a weight format the parallel layers shard (a dense "
                         f"or unsupported type); expected one of {[q.name for q in WEIGHT_TYPES]}")
    k, n = ggml_k_n(t)
    return t, QType(t.tensor_type.value), n, k


def _file_rows(path, t, q: QType, n: int, k: int) -> np.memmap:
    return np.memmap(os.fspath(path), dtype=np.uint8, mode="r", offset=int(t.data_offset), shape=(n, row_bytes(q, k)))


def _cached_layer(cache: WeightCache, name: str, bias, exact: bool) -> QuantLinear:
    w, q, n, k = cache.get(name)
    if q is None:
        raise ValueError(f"{name}: a dense weight ({w.dtype}, shape {list(w.shape)}); the parallel layers need a "
                         "quantized one")
    return QuantLinear(w, q, k, n, bias, exact)


def _own(t: torch.Tensor) -> torch.Tensor:
    # a fresh allocation (contiguous, aligned) so the shard does not keep the whole weight alive
    return t.clone(memory_format=torch.contiguous_format)


class _ShardState:
    """A shard's place in its state_dict: rank, world_size and the whole layer's shape. The shards of
    one split are often one size, so another rank's state_dict (or a shard of another split) would
    load without complaint and compute another rank's part of the layer: loading refuses it with a
    ValueError, before anything of the module is overwritten."""

    def get_extra_state(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "in_features": self.in_features,
                "out_features": self.out_features}

    def set_extra_state(self, state) -> None:
        """Checked by _load_from_state_dict, before any tensor of the module loads."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + _EXTRA_STATE
        if key in state_dict and state_dict[key] != self.get_extra_state():
            raise ValueError(f"{key}: the state_dict is of the shard {state_dict[key]!r}, this "
                             f"{type(self).__name__} is {self.get_extra_state()!r}; each rank loads its own shard's")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class ColumnParallelQuantLinear(_ShardState, nn.Module):
    """The rows [start, stop) of an [out_features, in_features] QuantLinear on this rank.

    weight: this rank's rows' bytes (row_split(out_features, rank, world_size) rows), bias: their
    bias slice. forward(x [..., in_features]) -> [..., local_out], or [..., out_features] with
    gather_output=True. forward_q8_1 and in_features let torchext.nn.shared_input quantize an
    input once for several layers, as for QuantLinear. exact: QuantLinear's, of the local layer.
    """

    def __init__(self, weight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: Optional[torch.Tensor] = None, *, rank: int, world_size: int, group=None,
                 gather_output: bool = False, exact: bool = False) -> None:
        super().__init__()
        self.rank, self.world_size = _rank_world(rank, world_size, group)
        if out_features < self.world_size:
            raise ValueError(f"out_features={out_features} is fewer than world_size={self.world_size}: every rank "
                             "needs at least one row")
        self.group, self.gather_output = group, gather_output
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.start, self.stop = row_split(self.out_features, self.rank, self.world_size)
        self.local = QuantLinear(weight, qtype, in_features, self.stop - self.start, bias, exact)
        self.qtype = self.local.qtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output features of x [..., in_features] (all of them with gather_output)."""
        return self._gather(self.local(x))

    def forward_q8_1(self, xq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer on activations already quantized by quantize_q8_1."""
        return self._gather(self.local.forward_q8_1(xq, dtype))

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        if not self.gather_output or self.world_size == 1:
            return y
        # all_gather wants equal shapes: pad to the largest shard, then drop each shard's padding
        width = -(-self.out_features // self.world_size)
        y = F.pad(y, (0, width - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        _check_group(self.world_size, self.group)
        dist.all_gather(parts, y, group=self.group)
        sizes = [b - a for a, b in (row_split(self.out_features, r, self.world_size) for r in range(self.world_size))]
        return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, rank: Optional[int] = None, world_size: Optional[int] = None,
                          group=None, gather_output: bool = False) -> "ColumnParallelQuantLinear":
        """This rank's rows of `layer` (copied; the layer is not changed), exact as it is."""
        rank, world_size = _rank_world(rank, world_size, group)
        a, b = row_split(layer.out_features, rank, world_size)
        bias = None if layer.bias is None else layer.bias.detach()[a:b].clone()
        return cls(_own(layer.weight[a:b]), layer.qtype, layer.in_features, layer.out_features, bias,
                   rank=rank, world_size=world_size, group=group, gather_output=gather_output, exact=layer.exact)

    @classmethod
    def from_cache(cls, cache: WeightCache, name: str, bias: Optional[torch.Tensor] = None, exact: bool = False,
                   **kwargs) -> "ColumnParallelQuantLinear":
        """This rank's rows of a WeightCache entry; bias is the full [out_features] one."""
        return cls.from_quant_linear(_cached_layer(cache, name, bias, exact), **kwargs)

    @classmethod
    def from_gguf(cls, path, name: str, bias: Optional[torch.Tensor] = None, rank: Optional[int] = None,
                  world_size: Optional[int] = None, group=None, gather_output: bool = False, reader=None,
                  device=None, exact: bool = False) -> "ColumnParallelQuantLinear":
        """This rank's rows of tensor `name` of a GGUF file, reading only their bytes (one
        contiguous range). reader: a gguf.GGUFReader already open on path (parsing takes seconds;
        ValueError if its tensor table is not the file's as it is now). bias is the full
        [out_features] one."""
        rank, world_size = _rank_world(rank, world_size, group)
        t, q, n, k = _gguf_tensor(path, name, reader)
        check_bias(bias, n)
        a, b = row_split(n, rank, world_size)
        weight = torch.from_numpy(np.array(_file_rows(path, t, q, n, k)[a:b])).to(device)
        bias = None if bias is None else bias.detach()[a:b].clone()
        return cls(weight, q, k, n, bias, rank=rank, world_size=world_size, group=group, gather_output=gather_output,
                   exact=exact)

    def extra_repr(self) -> str:
        """Format, shape and this rank's rows, for print(module)."""
        return (f"format={self.qtype.name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"local=[{self.start}:{self.stop}] ({self.stop - self.start} rows), rank={self.rank}/"
                f"{self.world_size}, gather_output={self.gather_output}")


class RowParallelQuantLinear(_ShardState, nn.Module):
    """The input features [start, stop) of an [out_features, in_features] QuantLinear on this rank.

    weight: this rank's bytes of every row (column_split(qtype, in_features, rank, world_size)
    values), bias: the full [out_features] bias (added once, after the all_reduce).
    forward(x) -> [..., out_features] on every rank: x is this rank's slice [..., local_in]
    (input_is_parallel=True, what a ColumnParallelQuantLinear without gather gives), or the whole
    [..., in_features] input with input_is_parallel=False. exact: QuantLinear's, of the local layer.
    """

    def __init__(self, weight: torch.Tensor, qtype, in_features: int, out_features: int,
                 bias: Optional[torch.Tensor] = None, *, rank: int, world_size: int, group=None,
                 input_is_parallel: bool = True, exact: bool = False) -> None:
        super().__init__()
        self.rank, self.world_size = _rank_world(rank, world_size, group)
        q = weight_format(qtype)
        self.group, self.input_is_parallel = group, input_is_parallel
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.start, self.stop = column_split(q, self.in_features, self.rank, self.world_size)
        # the bias is not per shard: added once, after the all_reduce
        self.local = QuantLinear(weight, q, self.stop - self.start, out_features, exact=exact)
        self.qtype = q
        check_bias(bias, self.out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole output [..., out_features], the ranks' partial products summed by one all_reduce."""
        width = self.stop - self.start if self.input_is_parallel else self.in_features
        if x.shape[-1] != width:
            raise ValueError(f"x: expected last dimension {width} ({'this rank' if self.input_is_parallel else 'all'}"
                             f" of in_features={self.in_features}), got {list(x.shape)}")
        if not self.input_is_parallel:
            x = x[..., self.start:self.stop]
        y = self.local(x)
        if self.world_size > 1:
            _check_group(self.world_size, self.group)
            dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, rank: Optional[int] = None, world_size: Optional[int] = None,
                          group=None, input_is_parallel: bool = True) -> "RowParallelQuantLinear":
        """This rank's columns of `layer` (copied; the layer is not changed), exact as it is."""
        rank, world_size = _rank_world(rank, world_size, group)
        lo, hi = _byte_range(layer.qtype, layer.in_features, rank, world_size)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return cls(_own(layer.weight[:, lo:hi]), layer.qtype, layer.in_features, layer.out_features, bias,
                   rank=rank, world_size=world_size, group=group, input_is_parallel=input_is_parallel,
                   exact=layer.exact)

    @classmethod
    def from_cache(cls, cache: WeightCache, name: str, bias: Optional[torch.Tensor] = None, exact: bool = False,
                   **kwargs) -> "RowParallelQuantLinear":
        """This rank's columns of a WeightCache entry."""
        return cls.from_quant_linear(_cached_layer(cache, name, bias, exact), **kwargs)

    @classmethod
    def from_gguf(cls, path, name: str, bias: Optional[torch.Tensor] = None, rank: Optional[int] = None,
                  world_size: Optional[int] = None, group=None, input_is_parallel: bool = True, reader=None,
                  device=None, exact: bool = False) -> "RowParallelQuantLinear":
        """This rank's columns of tensor `name` of a GGUF file, reading only their bytes of each row.
        reader: a gguf.GGUFReader already open on path (parsing takes seconds; ValueError if its
        tensor table is not the file's as it is now)."""
        rank, world_size = _rank_world(rank, world_size, group)
        t, q, n, k = _gguf_tensor(path, name, reader)
        lo, hi = _byte_range(q, k, rank, world_size)
        weight = torch.from_numpy(np.array(_file_rows(path, t, q, n, k)[:, lo:hi])).to(device)
        return cls(weight, q, k, n, bias, rank=rank, world_size=world_size, group=group,
                   input_is_parallel=input_is_parallel, exact=exact)

    def extra_repr(self) -> str:
        """Format, shape and this rank's input features, for print(module)."""
        return (f"format={self.qtype.name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"local=[:, {self.start}:{self.stop}] ({self.stop - self.start} features), rank={self.rank}/"
                f"{self.world_size}, input_is_parallel={self.input_is_parallel}, bias={self.bias is not None}")


def _byte_range(qtype, in_features: int, rank: int, world_size: int) -> tuple[int, int]:
    """(lo, hi) bytes of each row that hold rank's input features."""
    a, b = column_split(qtype, in_features, rank, world_size)
    if world_size == 1:
        return 0, row_bytes(qtype, in_features)  # the whole row, a k-quant's padding included
    bv, bb = block_values(qtype), block_bytes(qtype)
    return a // bv * bb, b // bv * bb


__all__ = ["ColumnParallelQuantLinear", "RowParallelQuantLinear", "column_split", "row_split"]
