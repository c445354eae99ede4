"""WeightCache: named weights, quantized (raw GGUF bytes) or dense, loaded from GGUF files (whose
reading and checks are torchext.gguf_file's).

An entry is (tensor, qtype, n, k): a quantized weight is a uint8 tensor [n, row_bytes(qtype, k)]
holding n rows of k values in a torchext weight format; a dense weight (qtype None) is a float
tensor as it was stored ([n, k] for a matrix, [k] for a norm vector, ...).

The cache is a plain dict with checks. It holds nothing the ops need: they take tensors, so model
code can take the tensors out (or use QuantLinear.from_cache) and trace, compile and capture them.

load_gguf(..., pool=True) keeps a file's whole data section as one uint8 tensor, the pool, and
its entries are views into it: one read and one device copy instead of one per tensor.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .formats import QType, row_bytes
from .gguf_file import VIEW_DTYPES, GGUFFile, GGUFTensor, tensor_from_bytes
from .ops import _flag, qmatmul
from .weights import WEIGHT_ALIGN, WEIGHT_IDS, as_weight_rows, check_weight_bytes, weight_format


class CacheEntry(NamedTuple):
    """One cached weight: unpacks as (tensor, qtype, n, k); qtype is None for a dense tensor."""

    tensor: torch.Tensor
    qtype: QType | None
    n: int
    k: int

    @property
    def quantized(self) -> bool:
        """Whether the entry holds raw bytes of a weight format (else a dense tensor)."""
        return self.qtype is not None


def _name_list(names, arg: str) -> list[str]:
    """names as a list; a single str is refused (its characters would be taken for names)."""
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{arg}: expected a list of tensor names, got the string {names!r} (write [{names!r}])")
    if not isinstance(names, Iterable):
        raise TypeError(f"{arg}: expected a list of tensor names, got {type(names).__name__}")
    return list(names)


class WeightCache:
    """Named weights: name -> CacheEntry(tensor, qtype, n, k).

        cache = WeightCache().load_gguf("model.gguf", device="cuda")
        y = cache.matmul("blk.0.ffn_up.weight", x)       # x [..., k] -> [..., n]
        w, qtype, n, k = cache["blk.0.ffn_up.weight"]

    Supports `name in cache`, len, iteration over names (insertion order), `cache[name]`.

    Two maps: the pool's entries (views into one uint8 tensor, see load_gguf(pool=True)) and
    individually added ones. Lookups check the pool first, then the individual entries; iteration
    gives the pool's names (file order), then the others. A name is held by one map at a time.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}  # individually added (put, load_gguf without pool)
        self._pooled: dict[str, CacheEntry] = {}  # views into self._pool, in file order
        self._pool: torch.Tensor | None = None  # a GGUF data section as one uint8 tensor
        self._groups: dict[str, tuple[str, ...]] = {}  # stack_rows' groups: name -> its members
        self.load_seconds: float | None = None  # wall time of the last load_gguf (host side)

    # ---- entries -----------------------------------------------------------------------------

    def put(self, name: str, tensor: torch.Tensor, qtype=None, n: int | None = None,
            k: int | None = None) -> CacheEntry:
        """Add (or replace) a weight and return its entry.

        Quantized (qtype a weight format, its QType, gguf id or name): tensor holds the raw bytes
        of n rows of k values, any shape with n * row_bytes(qtype, k) elements; it is kept as
        [n, row_bytes] (a view, or a copy when not contiguous or 16-byte aligned).
        Dense (qtype None): a float (or signed integer) tensor kept as given; k is its last
        dimension and n the product of the others (n and k, when given, must agree).
        A name held by the pool leaves the pool's map: the new weight wins, and the pool keeps its
        bytes (one allocation) while any of its entries remain.
        """
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__}")
        if qtype is None:
            entry = self._dense_entry(tensor, n, k)
        else:
            q = weight_format(qtype)
            if n is None or k is None:
                raise ValueError(f"n and k: required for a quantized ({q.name}) weight")
            check_weight_bytes(tensor, q, n, k)
            n, k = int(n), int(k)
            entry = CacheEntry(as_weight_rows(tensor, q, n, k), q, n, k)
        self._store(name, entry)
        return entry

    def _store(self, name: str, entry: CacheEntry) -> None:
        """Hold entry as an individual one; a name held by the pool leaves the pool's map."""
        self._drop_groups_of(name)
        if name in self._pooled:
            self._unpool(name)
        self._entries[name] = entry

    def _drop_groups_of(self, name: str) -> None:
        """Forget the stacked groups that `name` is (or is a member of), removing each group's entry:
        once a member is replaced or removed, the group's bytes are no longer its members' (a model
        built on the group would silently run the old weights)."""
        for group, members in list(self._groups.items()):
            if name == group or name in members:
                del self._groups[group]
                if group != name and group in self:
                    self.remove(group)

    @staticmethod
    def _dense_entry(tensor, n, k) -> CacheEntry:
        # uint8 is what raw bytes come as: a dense one is far more likely a forgotten qtype. Complex and unsigned
        # weights were kept, and F.linear then multiplied complex activations or refused unsigned ones at first use.
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex() or not (
                tensor.is_floating_point() or tensor.dtype.is_signed):
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"tensor: expected a float (or signed integer) tensor for a dense weight (qtype=None), "
                             f"got {got}; pass qtype for raw quantized bytes")
        if tensor.dim() == 0:
            raise ValueError("tensor: expected at least one dimension, got a scalar")
        dk = tensor.shape[-1]
        dn = math.prod(tensor.shape[:-1])
        if (n is not None and n != dn) or (k is not None and k != dk):
            raise ValueError(f"n and k: a dense tensor of shape {list(tensor.shape)} holds n={dn}, k={dk}, "
                             f"got n={n!r}, k={k!r}")
        return CacheEntry(tensor, None, dn, dk)

    def get(self, name: str) -> CacheEntry:
        """The entry of `name` (the pool's, else the individual one); KeyError naming a few known
        names when there is none."""
        entry = self._pooled.get(name)
        if entry is None:
            entry = self._entries.get(name)
        if entry is None:
            raise KeyError(self._missing(name))
        return entry

    __getitem__ = get

    def remove(self, name: str) -> CacheEntry:
        """Drop `name` and return its entry (KeyError when there is none)."""
        entry = self.get(name)
        self._drop_groups_of(name)
        if name in self._pooled:
            self._unpool(name)
        else:
            del self._entries[name]
        return entry

    def stack_rows(self, groups: Mapping[str, Sequence[str]]) -> WeightCache:
        """Lay each group's quantized weights out as adjacent rows of one weight, added under the
        group's name, and return self: one matmul of the group then serves layers that read the same
        input (attention's q/k/v, a gated MLP's gate/up), one GEMV launch instead of one per layer.

        groups: {group name: member names}. The members of a group share a format and k; the
        group's entry is [sum of their n, row_bytes], and each member keeps its name as a view of
        its rows (the same bytes; the group's outputs are the members' outputs side by side, in the
        order given). A member's rows must start on a 16-byte boundary of the group (ValueError).
        Pooled entries move into a new pool laid out with each all-pooled group's members together
        (one device copy of the pool; the old one is freed once nothing else views it); a group with
        an individual member becomes one new tensor. A group whose name is already cached with its
        members as views of its rows is left as it is, so calling this again is a no-op. Replacing or
        removing a member (put, remove, load_gguf) later removes the group's entry.
        """
        if not isinstance(groups, Mapping):
            raise TypeError(f"groups: expected a dict of group name -> member names, got {type(groups).__name__}")
        todo = {}
        for group, members in groups.items():
            if not isinstance(group, str):  # checked before any group is stacked: a bad one changes nothing
                raise TypeError(f"groups: expected str group names, got {group!r}")
            members = _name_list(members, group)
            if group in self and self._members_view(group, members):
                self._groups[group] = tuple(members)
                continue
            if group in self or not members:
                raise ValueError(f"{group}: " + ("the name is taken by another weight" if members else
                                                 "a group needs at least one member"))
            entries = [self.get(m) for m in members]  # KeyError names an unknown member
            first = entries[0]
            if len(set(members)) != len(members):
                raise ValueError(f"{group}: a member appears twice in {members}")
            for m, e in zip(members, entries):
                if e.qtype is None or (e.qtype, e.k) != (first.qtype, first.k):
                    got = "a dense tensor" if e.qtype is None else f"{e.qtype.name} with k={e.k}"
                    raise ValueError(f"{group}: members must be quantized weights of one format and k; {members[0]} is "
                                     f"{first.qtype.name if first.qtype else 'dense'} with k={first.k}, {m} is {got}")
                if e.tensor.device != first.tensor.device:  # torch.cat's error named neither
                    raise ValueError(f"{group}: members must be on one device; {members[0]} is on "
                                     f"{first.tensor.device}, {m} is on {e.tensor.device}")
                if any(m in ms for ms in todo.values()):
                    raise ValueError(f"{group}: {m} is in two groups")
            starts = itertools.accumulate([e.tensor.numel() for e in entries[:-1]], initial=0)
            for m, start in zip(members, starts):
                if start % WEIGHT_ALIGN:
                    raise ValueError(f"{group}: {m}'s rows would start {start} bytes into the group, not on a "
                                     f"{WEIGHT_ALIGN}-byte boundary; order the members so that they do")
            todo[group] = members
        pooled = {g: ms for g, ms in todo.items() if all(m in self._pooled for m in ms)}
        if pooled:
            self._relayout_pool(pooled)
        for group, members in todo.items():
            if group not in pooled:
                entries = [self.get(m) for m in members]
                g = self.put(group, torch.cat([e.tensor for e in entries]), entries[0].qtype,
                             sum(e.n for e in entries), entries[0].k)
                for m, e, row in zip(members, entries, itertools.accumulate([e.n for e in entries], initial=0)):
                    self.put(m, g.tensor[row:row + e.n], e.qtype, e.n, e.k)
        self._groups.update((group, tuple(members)) for group, members in todo.items())
        return self

    def stackable_runs(self, names: Sequence[str]) -> list[list[str]]:
        """`names` cut into runs that stack_rows can stack, in order: consecutive quantized weights of
        one format and k, each starting on a 16-byte boundary of its run, none twice in a run (a run of
        one stays alone)."""
        runs: list[list[str]] = []
        run_bytes = 0  # the last run's (kept, not summed again for each name: 4000 names took 2.3 s)
        for name in _name_list(names, "names"):
            e, run = self.get(name), runs[-1] if runs else None
            lead = self.get(run[0]) if run else None
            if (run and name not in run and e.qtype is not None and (e.qtype, e.k) == (lead.qtype, lead.k)
                    and run_bytes % WEIGHT_ALIGN == 0):
                run.append(name)
            else:
                runs.append([name])
                run_bytes = 0
            run_bytes += e.tensor.numel()
        return runs

    def _members_view(self, group: str, members: list[str]) -> bool:
        """Whether `members` are cached as consecutive row views of `group`'s tensor, in order."""
        g = self.get(group)
        at = g.tensor.data_ptr()
        for m in members:
            if m not in self:
                return False
            e = self.get(m)
            if e.qtype != g.qtype or e.k != g.k or e.tensor.data_ptr() != at:
                return False
            at += e.tensor.numel()
        return at == g.tensor.data_ptr() + g.tensor.numel()

    def _relayout_pool(self, groups: dict[str, list[str]]) -> None:
        """A new pool holding the pooled entries in their order, each group's members moved together
        to where its first member was, and the group's entry just before them. An entry that views
        part of another's bytes (a member of a group stacked before) stays a view of that one's copy."""
        lead = {ms[0]: g for g, ms in groups.items()}
        grouped = {m for ms in groups.values() for m in ms}
        inside = self._pooled_inside(grouped)
        order = []  # (name, entry) of the new pool, groups as (group, None)
        for name, e in self._pooled.items():
            if name in lead:
                order.append((lead[name], None))
                order.extend((m, self._pooled[m]) for m in groups[lead[name]])
            elif name not in grouped:
                order.append((name, e))
        offsets, size = {}, 0
        for name, e in order:
            if name in inside:
                continue
            if e is None or name not in grouped:  # a group's members follow it unpadded (stack_rows checked)
                size += -size % WEIGHT_ALIGN
            offsets[name] = size
            if e is not None:
                size += e.tensor.numel() * e.tensor.element_size()
        for name, (outer, delta) in inside.items():
            offsets[name] = offsets[outer] + delta
        pool = torch.empty(size, dtype=torch.uint8, device=self._pool.device)
        new = {}
        for name, e in order:
            if e is None:
                members = groups[name]
                n = sum(self._pooled[m].n for m in members)
                first = self._pooled[members[0]]
                rows = _pool_view(pool, offsets[name], torch.uint8, (n, first.tensor.shape[1]))
                new[name] = CacheEntry(rows, first.qtype, n, first.k)
            else:
                t = e.tensor
                view = _pool_view(pool, offsets[name], t.dtype, t.shape)
                if name not in inside:
                    view.copy_(t)
                new[name] = e._replace(tensor=view)
        self._pool, self._pooled = pool, new

    def _pooled_inside(self, moving: set[str]) -> dict[str, tuple[str, int]]:
        """{name: (outer, offset in outer's bytes)} for the pooled entries, none of `moving`, whose bytes
        lie within an outer entry's (the first of the widest that holds them)."""
        spans = []
        for name, e in self._pooled.items():
            offset, dtype, shape = _place_in_pool(e.tensor)
            spans.append((offset, -(offset + _view_bytes(dtype, shape)), name))
        inside, outer = {}, None
        for start, neg_end, name in sorted(spans):
            if outer is None or -neg_end > outer[1]:
                outer = (start, -neg_end, name)
            elif name not in moving:
                inside[name] = (outer[2], start - outer[0])
        return inside

    def _unpool(self, name: str) -> None:
        del self._pooled[name]
        if not self._pooled:
            self._pool = None  # no entry views it any more: let the allocation go

    def _missing(self, name) -> str:
        known = self.names()
        if not known:
            return f"no weight named {name!r}: the cache is empty"
        shown = ", ".join(repr(s) for s in known[:5])
        more = f" and {len(known) - 5} more" if len(known) > 5 else ""
        return f"no weight named {name!r}; the cache holds {len(known)}: {shown}{more}"

    def __contains__(self, name: object) -> bool:
        return name in self._pooled or name in self._entries

    def __len__(self) -> int:
        return len(self._pooled) + len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())  # a snapshot: removing while iterating is safe

    def names(self) -> list[str]:
        """Every name, in iteration order."""
        return [*self._pooled, *self._entries]

    def items(self) -> Iterator[tuple[str, CacheEntry]]:
        """(name, entry) pairs, in iteration order."""
        return iter([*self._pooled.items(), *self._entries.items()])

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool tensor (0 when there is none)."""
        return 0 if self._pool is None else self._pool.numel()

    def _views_inside(self) -> dict[str, tuple[str, int]]:
        """{name: (outer, offset in outer's bytes)} for the individual entries whose bytes lie within
        another individual entry's (the first of the widest that holds them; both contiguous, on one
        storage): the members of a group that stack_rows made, which views of the group keep."""
        spans: dict[int, list] = {}
        for name, e in self._entries.items():
            t = e.tensor
            if t.is_contiguous():
                start = t.storage_offset() * t.element_size()
                spans.setdefault(t.untyped_storage()._cdata, []).append(
                    (start, -(start + t.numel() * t.element_size()), name))
        inside = {}
        for storage_spans in spans.values():
            outer = None
            for start, neg_end, name in sorted(storage_spans):
                if outer is None or -neg_end > outer[1]:
                    outer = (start, -neg_end, name)
                else:
                    inside[name] = (outer[2], start - outer[0])
        return inside

    def total_bytes(self) -> int:
        """Bytes held: the pool once (its entries are views, and bytes that no entry uses any more
        are still allocated) plus the storage behind the individual entries, each storage once (entries
        that share bytes, and an entry put as a view of a larger tensor, which keeps all of it)."""
        storages = {}
        for e in self._entries.values():
            storage = e.tensor.untyped_storage()
            storages[storage._cdata] = storage.nbytes()  # _cdata: the storage itself (meta ones have no address)
        return self.pool_bytes + sum(storages.values())

    def __getstate__(self) -> dict:
        """pickle's (and copy.deepcopy's) state: the pool once, and each of its entries as its place in
        it; an individual entry inside another's bytes as its place in that one. Pickled as tensors, the
        views would each write the whole pool (a model's, hundreds of times), and a stacked group's
        members would come back as copies beside the group."""
        state = self.__dict__.copy()
        state["_pooled"] = {name: (e._replace(tensor=None), _place_in_pool(e.tensor))
                            for name, e in self._pooled.items()}
        inside = self._views_inside()
        state["_entries"] = {name: (e._replace(tensor=None), (*inside[name], *_place_in_pool(e.tensor)[1:]))
                             if name in inside else e for name, e in self._entries.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._groups = state.get("_groups", {})  # older pickles kept no record of their groups
        # a cache pickled before __getstate__ existed holds its entries themselves
        self._pooled = {name: v if isinstance(v, CacheEntry) else v[0]._replace(tensor=_pool_view(self._pool, *v[1]))
                        for name, v in state["_pooled"].items()}
        entries = state["_entries"]  # (entry, (outer, offset, dtype, shape)) for a view of another entry
        self._entries = {name: v if isinstance(v, CacheEntry) else
                         v[0]._replace(tensor=_bytes_view(entries[v[1][0]].tensor, *v[1][1:]))
                         for name, v in entries.items()}

    def to(self, device) -> WeightCache:
        """Move every entry to `device` (in place) and return self; the pool moves in one copy and
        its entries stay views into it, as do individual entries inside another's bytes (a stacked
        group's members)."""
        device = torch.device(device)
        if self._pool is not None and self._pool.device != device:
            self._pool = self._pool.to(device)
            for name, e in self._pooled.items():
                self._pooled[name] = e._replace(tensor=_pool_view(self._pool, *_place_in_pool(e.tensor)))
        inside = self._views_inside()
        for name, e in self._entries.items():
            if name not in inside:
                t = e.tensor.to(device)
                if e.qtype is not None:
                    t = as_weight_rows(t, e.qtype, e.n, e.k)
                self._entries[name] = e._replace(tensor=t)
        for name, (outer, offset) in inside.items():
            e = self._entries[name]
            self._entries[name] = e._replace(tensor=_bytes_view(self._entries[outer].tensor, offset, e.tensor.dtype,
                                                                tuple(e.tensor.shape)))
        return self

    def __repr__(self) -> str:
        quant = sum(e.qtype is not None for _, e in self.items())
        pool = (f"; pool of {self.pool_bytes / 2**20:.1f} MiB holding {len(self._pooled)}"
                if self._pool is not None else "")
        return (f"WeightCache({len(self)} weights: {quant} quantized, {len(self) - quant} dense; "
                f"{self.total_bytes() / 2**20:.1f} MiB{pool})")

    # ---- compute ---------------------------------------------------------------------------------

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] (any strides) @ weight.T -> [..., n] in x's dtype: torchext.qmatmul for
        quantized bytes (which picks the GEMV or dense path by batch size), F.linear for a dense
        [n, k] weight (cast to x's dtype)."""
        e = self.get(name)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if e.qtype is not None:
            return qmatmul(e.tensor, e.qtype, x.contiguous(), e.n, e.k)  # any strides, as F.linear
        if e.tensor.dim() != 2:
            raise ValueError(f"{name}: a dense weight of shape {list(e.tensor.shape)} is not a matrix")
        # the op's checks, which F.linear lacks: an integer x truncated the weight to integers (silently)
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("x: expected at least one dimension [..., K], got a scalar")
        if x.shape[-1] != e.k:
            raise ValueError(f"x: expected the last dimension to be k={e.k} ({name}'s), got {x.shape[-1]}")
        return F.linear(x, e.tensor.to(x.dtype))

    # ---- GGUF ------------------------------------------------------------------------------------

    def load_gguf(self, path: str | os.PathLike, names: Iterable[str] | None = None, device=None,
                  progress: Callable[[int, int, str], None] | None = None,
                  pool: bool = False, reader=None) -> WeightCache:
        """Add the tensors of a GGUF file (all, or those in `names`) and return self.

        The file's header and tables are read and checked first (torchext.gguf_file.GGUFFile):
        anything malformed (not a regular file, not GGUF, a version other than 2 or 3, big-endian, cut
        short, a tensor whose type, shape or offset does not fit the file's data) is a ValueError naming
        the file and the tensor, before any entry is added. Tensor data is read with ordinary reads, so a
        file that shrinks during the load is a ValueError too, never a bus error.

        A tensor in a torchext weight format (formats.WEIGHT_TYPES) stays raw bytes, [n, row_bytes] with
        k = ne0 (the row length, first in GGUF's dimension list) and n the product of the other
        dimensions. Every other tensor is dense, in the file's shape (numpy order, [n, k] for a
        matrix): F32, F16, BF16, F64 and the integer types as their dtype, any other quantized type
        dequantized to float32 with gguf.quants.dequantize (ValueError if gguf cannot). `device`
        (default CPU) is where the tensors go; `progress(done, total, name)` is called after each
        tensor.

        pool=True (names must be None) reads the file's data section into one uint8 tensor, the
        pool, in one read (into pinned memory for CUDA) and moves it in one copy; every weight-format
        and F32/F16/BF16/F64/integer tensor is then a view into it (but a weight that a file alignment
        below 16 puts off the kernels' 16-byte boundary, or a dense tensor off its element size, is
        copied into an individual entry). Other quantized types are
        dequantized into individual entries as above (their bytes stay in the pool, unused). The
        file's tensors replace same-named individual entries. One pool per cache. An error while
        reading the tensors (a raising `progress` too) leaves the cache as it was, either way.
        `self.load_seconds` records the call's wall time (a non-blocking GPU copy may still run).
        `reader`: a gguf.GGUFReader a caller opened on `path` for the metadata; its tensor table
        must be the file's as read now (ValueError otherwise). Nothing is read through it.
        """
        start = time.perf_counter()
        pool = _flag(pool, "pool")  # pool="False" would pool
        if pool and names is not None:
            raise ValueError("pool: a pool holds the whole file, so names must be None; "
                             "load chosen tensors with pool=False")
        if pool and self._pool is not None:
            raise ValueError("pool: this cache already holds a pool; load another file into a new WeightCache "
                             "(or with pool=False)")
        if progress is not None and not callable(progress):  # before the file is read, not after its first tensor
            raise ValueError(f"progress: expected a function of (done, total, name) or None, got {progress!r}")
        with GGUFFile(path) as g:
            if reader is not None:
                g.check_reader(reader)
            tensors = {t.name: t for t in g.tensors}
            if names is None:
                wanted = list(tensors)
            else:
                wanted = list(dict.fromkeys(_name_list(names, "names")))
                missing = [s for s in wanted if s not in tensors]
                if missing:
                    known = ", ".join(repr(s) for s in list(tensors)[:5])
                    raise KeyError(f"names: {missing[:5]} not in {g.name!r}, which holds {len(tensors)} "
                                   f"tensors: {known}{' ...' if len(tensors) > 5 else ''}")
            device = torch.device(device) if device is not None else torch.device("cpu")
            if pool:
                self._load_pool(g, device, progress)
            else:  # every entry made before any is stored: an error midway leaves the cache as it was
                entries = {}
                for i, name in enumerate(wanted):
                    t = tensors[name]
                    entries[name] = self._gguf_entry(t, tensor_from_bytes(g.read(t), t, g.name, device))
                    if progress is not None:
                        progress(i + 1, len(wanted), name)
                for name, entry in entries.items():
                    self._store(name, entry)
        self.load_seconds = time.perf_counter() - start
        return self

    def _gguf_entry(self, t: GGUFTensor, tensor: torch.Tensor) -> CacheEntry:
        """The entry of a GGUF tensor's torch tensor: raw bytes [n, row_bytes] for a weight format, else dense."""
        if t.tensor_type.value in WEIGHT_IDS:
            q = QType(t.tensor_type.value)
            check_weight_bytes(tensor, q, t.n, t.k)
            return CacheEntry(as_weight_rows(tensor, q, t.n, t.k), q, t.n, t.k)
        return self._dense_entry(tensor, None, None)

    def _load_pool(self, g: GGUFFile, device: torch.device, progress) -> None:
        views = {}  # name -> (offset in the pool, view dtype, view shape), for the tensors the pool serves
        for t in g.tensors:
            offset = t.data_offset - g.data_offset
            if t.tensor_type.value in WEIGHT_IDS:
                if offset % WEIGHT_ALIGN == 0:  # GGUF's default alignment is 32; a file may set less
                    views[t.name] = (offset, torch.uint8, (t.n, row_bytes(QType(t.tensor_type.value), t.k)))
            elif t.tensor_type.name in VIEW_DTYPES and offset % VIEW_DTYPES[t.tensor_type.name].itemsize == 0:
                views[t.name] = (offset, VIEW_DTYPES[t.tensor_type.name], t.numpy_shape)
        # pinned host memory lets the GPU copy run asynchronously
        host = g.read_data_section(pin_memory=device.type == "cuda")
        pool = host if device.type == "cpu" else host.to(device, non_blocking=True)
        assert device.type == "meta" or pool.data_ptr() % WEIGHT_ALIGN == 0, "offsets keep the pool's alignment"

        # entries first, stored at the end: an error (a type gguf cannot dequantize) leaves the cache as it was
        pooled, others = {}, {}
        for i, t in enumerate(g.tensors):
            if t.name in views:
                offset, dtype, shape = views[t.name]
                view = _pool_view(pool, offset, dtype, shape)
                if dtype == torch.uint8:
                    q = QType(t.tensor_type.value)
                    check_weight_bytes(view, q, t.n, t.k)
                    pooled[t.name] = CacheEntry(view, q, t.n, t.k)
                else:
                    pooled[t.name] = self._dense_entry(view, None, None)
            else:  # a quantized type torchext does not run (dequantized), or a tensor the pool cannot view
                # (a file alignment below a weight's 16 bytes or a dense element's size): into a tensor of its own
                raw = host[t.data_offset - g.data_offset:][:t.n_bytes].clone()
                others[t.name] = self._gguf_entry(t, tensor_from_bytes(raw, t, g.name, device))
            if progress is not None:
                progress(i + 1, len(g.tensors), t.name)
        for name in pooled:
            if name in self._entries:  # the file's tensor replaces an individual one of that name
                self._drop_groups_of(name)
                del self._entries[name]
        for name in others:
            self._drop_groups_of(name)
        self._entries.update(others)
        self._pool, self._pooled = (pool if pooled else None), pooled  # a pool lives while an entry views it

    @classmethod
    def from_gguf(cls, path, **kwargs) -> WeightCache:
        """A new cache holding a GGUF file's tensors: WeightCache().load_gguf(path, **kwargs)."""
        return cls().load_gguf(path, **kwargs)


def _view_bytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * dtype.itemsize


def _place_in_pool(view: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """_pool_view's (offset, dtype, shape) of one of its views (their base is the pool itself)."""
    return view.storage_offset() * view.element_size(), view.dtype, tuple(view.shape)


def _pool_view(pool: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """The bytes pool[offset:] as a `dtype` tensor of `shape`, a view (no copy)."""
    return pool[offset:offset + _view_bytes(dtype, shape)].view(dtype).view(shape)


def _bytes_view(outer: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """The bytes of a contiguous tensor from `offset` as a `dtype` tensor of `shape`, a view (no copy)."""
    return _pool_view(outer.reshape(-1).view(torch.uint8), offset, dtype, shape)
