"""WeightCache: named weights, quantized (raw GGUF bytes) or dense, and a GGUF file loader.

An entry is (tensor, qtype, n, k): a quantized weight is a uint8 tensor [n, row_bytes(qtype, k)]
holding n rows of k values in a torchext weight format; a dense weight (qtype None) is a float
tensor as it was stored ([n, k] for a matrix, [k] for a norm vector, ...).

The cache is a plain dict with checks. It holds nothing the ops need: they take tensors, so model
code can take the tensors out (or use QuantLinear.from_cache) and trace, compile and capture them.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .formats import WEIGHT_TYPES, QType, block_values, row_bytes
from .ops import qmatmul

# Raw bytes must start on a 16-byte boundary for Q4_K/Q5_K (the kernels' 16-byte header loads;
# the other formats need less, see csrc/checks.h). Fresh torch allocations are 64-byte aligned.
_ALIGN = 16


class CacheEntry(NamedTuple):
    """One cached weight: unpacks as (tensor, qtype, n, k); qtype is None for a dense tensor."""

    tensor: torch.Tensor
    qtype: Optional[QType]
    n: int
    k: int

    @property
    def quantized(self) -> bool:
        return self.qtype is not None


def weight_format(qtype) -> QType:
    """The QType of a weight format torchext runs (ValueError for anything else, Q8_1 included:
    that is the activation format)."""
    try:
        q = QType.of(qtype)
    except (ValueError, TypeError):
        q = None
    if q not in WEIGHT_TYPES:
        raise ValueError(f"qtype: unsupported weight format {getattr(qtype, 'name', qtype)!r}; "
                         f"expected one of {[t.name for t in WEIGHT_TYPES]} (or None for a dense tensor)")
    return q


def check_weight_bytes(tensor: torch.Tensor, qtype: QType, n: int, k: int,
                       names: tuple[str, str, str] = ("tensor", "n", "k")) -> None:
    """ValueError unless `tensor` can hold an [n, k] weight of format qtype as raw bytes; the
    messages call the three arguments by `names` (QuantLinear's are weight, out_features,
    in_features)."""
    what, n_name, k_name = names
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{what}: expected raw {qtype.name} bytes as a uint8 tensor, got {got}")
    for arg, v in ((n_name, n), (k_name, k)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    if block_values(qtype) == 32 and k % 32:
        raise ValueError(f"{k_name}: {qtype.name} rows are whole 32-value blocks, so {k_name} must be a multiple "
                         f"of 32, got {k}")
    expected = n * row_bytes(qtype, k)
    if tensor.numel() != expected:
        raise ValueError(f"{what}: expected {expected} bytes for {qtype.name} with {n_name}={n}, {k_name}={k} "
                         f"({n} rows of {row_bytes(qtype, k)}), got {tensor.numel()} (shape {list(tensor.shape)})")


def as_weight_rows(tensor: torch.Tensor, qtype: QType, n: int, k: int) -> torch.Tensor:
    """The bytes as a contiguous, aligned [n, row_bytes] tensor: a view when they already are,
    else one copy."""
    rows = tensor.reshape(n, row_bytes(qtype, k))
    if not rows.is_contiguous() or rows.data_ptr() % _ALIGN:
        rows = rows.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    return rows


class WeightCache:
    """Named weights: name -> CacheEntry(tensor, qtype, n, k).

        cache = WeightCache().load_gguf("model.gguf", device="cuda")
        y = cache.matmul("blk.0.ffn_up.weight", x)       # x [..., k] -> [..., n]
        w, qtype, n, k = cache["blk.0.ffn_up.weight"]

    Supports `name in cache`, len, iteration over names (insertion order), `cache[name]`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}

    # ---- entries -----------------------------------------------------------------------------

    def put(self, name: str, tensor: torch.Tensor, qtype=None, n: Optional[int] = None,
            k: Optional[int] = None) -> CacheEntry:
        """Add (or replace) a weight and return its entry.

        Quantized (qtype a weight format, its QType, gguf id or name): tensor holds the raw bytes
        of n rows of k values, any shape with n * row_bytes(qtype, k) elements; it is kept as
        [n, row_bytes] (a view, or a copy when not contiguous or 16-byte aligned).
        Dense (qtype None): a float (or signed integer) tensor kept as given; k is its last
        dimension and n the product of the others (n and k, when given, must agree).
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
        self._entries[name] = entry
        return entry

    @staticmethod
    def _dense_entry(tensor, n, k) -> CacheEntry:
        # uint8 is what raw bytes come as: a dense one is far more likely a forgotten qtype
        if not isinstance(tensor, torch.Tensor) or tensor.dtype in (torch.uint8, torch.bool):
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"tensor: expected a float (or signed integer) tensor for a dense weight (qtype=None), "
                             f"got {got}; pass qtype for raw quantized bytes")
        if tensor.dim() == 0:
            raise ValueError("tensor: expected at least one dimension, got a scalar")
        dk = tensor.shape[-1]
        dn = math.prod(tensor.shape[:-1])
        if (n is not None and n != dn) or (k is not None and k != dk):
            raise ValueError(f"n and k: a dense tensor of shape {list(tensor.shape)} holds n={dn}, k={dk}, "
                             f"got n={n}, k={k}")
        return CacheEntry(tensor, None, dn, dk)

    def get(self, name: str) -> CacheEntry:
        """The entry of `name`; KeyError naming a few known names when there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self._missing(name)) from None

    __getitem__ = get

    def remove(self, name: str) -> CacheEntry:
        """Drop `name` and return its entry (KeyError when there is none)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def _missing(self, name) -> str:
        known = list(self._entries)
        if not known:
            return f"no weight named {name!r}: the cache is empty"
        shown = ", ".join(repr(s) for s in known[:5])
        more = f" and {len(known) - 5} more" if len(known) > 5 else ""
        return f"no weight named {name!r}; the cache holds {len(known)}: {shown}{more}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))  # a snapshot: removing while iterating is safe

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, CacheEntry]]:
        return iter(list(self._entries.items()))

    def total_bytes(self) -> int:
        """Bytes held by every entry (quantized bytes plus dense tensors' storage)."""
        return sum(e.tensor.numel() * e.tensor.element_size() for e in self._entries.values())

    def to(self, device) -> "WeightCache":
        """Move every entry to `device` (in place) and return self."""
        device = torch.device(device)
        for name, e in self._entries.items():
            t = e.tensor.to(device)
            if e.qtype is not None:
                t = as_weight_rows(t, e.qtype, e.n, e.k)
            self._entries[name] = e._replace(tensor=t)
        return self

    def __repr__(self) -> str:
        quant = sum(e.qtype is not None for e in self._entries.values())
        return (f"WeightCache({len(self)} weights: {quant} quantized, {len(self) - quant} dense; "
                f"{self.total_bytes() / 2**20:.1f} MiB)")

    # ---- compute ---------------------------------------------------------------------------------

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] (any strides) @ weight.T -> [..., n] in x's dtype: torchext.qmatmul for
        quantized bytes (which picks the GEMV or dense path by batch size), F.linear for a dense
        [n, k] weight (cast to x's dtype)."""
        e = self.get(name)
        if e.qtype is not None:
            return qmatmul(e.tensor, e.qtype, x.contiguous(), e.n, e.k)  # any strides, as F.linear
        if e.tensor.dim() != 2:
            raise ValueError(f"{name}: a dense weight of shape {list(e.tensor.shape)} is not a matrix")
        return F.linear(x, e.tensor.to(x.dtype))

    # ---- GGUF ------------------------------------------------------------------------------------

    def load_gguf(self, path: str | os.PathLike, names: Optional[Iterable[str]] = None, device=None,
                  progress: Optional[Callable[[int, int, str], None]] = None) -> "WeightCache":
        """Add the tensors of a GGUF file (all, or those in `names`) and return self.

        Read with gguf.GGUFReader. A tensor in a torchext weight format (Q4_0 ... Q6_K) stays raw
        bytes, [n, row_bytes] with k = ne0 (the row length, first in GGUF's dimension list) and n
        the product of the other dimensions. Every other tensor is dense, in the file's shape
        (numpy order, [n, k] for a matrix): F32, F16 and F64 as they are, BF16 as bfloat16, integer
        types as their integer dtype, any other quantized type dequantized to float32 with
        gguf.quants.dequantize (ValueError if gguf cannot). `device` (default CPU) is where the
        tensors go; `progress(done, total, name)` is called after each tensor.
        """
        import gguf
        from gguf.quants import dequantize as gguf_dequantize

        reader = gguf.GGUFReader(os.fspath(path))
        tensors = {t.name: t for t in reader.tensors}
        if names is None:
            wanted = list(tensors)
        else:
            wanted = list(dict.fromkeys(names))
            missing = [s for s in wanted if s not in tensors]
            if missing:
                known = ", ".join(repr(s) for s in list(tensors)[:5])
                raise KeyError(f"names: {missing[:5]} not in {os.fspath(path)!r}, which holds {len(tensors)} "
                               f"tensors: {known}{' ...' if len(tensors) > 5 else ''}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        for i, name in enumerate(wanted):
            t = tensors[name]
            gtype = t.tensor_type
            dims = [int(d) for d in t.shape]  # ggml order: dims[0] = ne0 = the row length
            if gtype.value in {q.value for q in WEIGHT_TYPES}:
                q = QType(gtype.value)
                k, n = dims[0], math.prod(dims[1:])
                self.put(name, _to_torch(t.data, device), q, n, k)
            else:
                self.put(name, _dense(t.data, gtype, name, gguf_dequantize, device))
            if progress is not None:
                progress(i + 1, len(wanted), name)
        return self

    @classmethod
    def from_gguf(cls, path, **kwargs) -> "WeightCache":
        """A new cache holding a GGUF file's tensors: WeightCache().load_gguf(path, **kwargs)."""
        return cls().load_gguf(path, **kwargs)


def _to_torch(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A torch copy of a (read-only, memory-mapped) numpy array, in a fresh aligned allocation."""
    out = torch.empty(a.shape, dtype=_TORCH_DTYPES[np.dtype(a.dtype)], device=device)
    src = torch.from_numpy(np.array(a, copy=True))  # a writable copy; torch refuses read-only memory
    out.copy_(src)
    return out


_TORCH_DTYPES = {
    np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8, np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
}


def _dense(data: np.ndarray, gtype, name: str, gguf_dequantize, device) -> torch.Tensor:
    from gguf import GGMLQuantizationType as G

    if gtype in (G.F32, G.F16, G.F64, G.I8, G.I16, G.I32, G.I64):
        return _to_torch(data, device)  # GGUFReader already gives these their numpy dtype and shape
    try:
        dense = gguf_dequantize(data, gtype)  # float32, the byte rows expanded to values
    except NotImplementedError:
        raise ValueError(f"{name}: gguf cannot dequantize tensor type {gtype.name}; "
                         "leave it out with names=...") from None
    out = _to_torch(dense, device)
    return out.to(torch.bfloat16) if gtype == G.BF16 else out  # bf16 -> f32 -> bf16 is exact
