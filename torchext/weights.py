"""Raw weight bytes: which formats are weight formats, and whether a tensor can hold a weight of
one (the checks QuantLinear, WeightCache and the integrations share)."""

from __future__ import annotations

import numbers

import torch

from .formats import ALIGNMENT, WEIGHT_TYPES, QType, row_bytes, whole_blocks_error

#: The GGUF type ids of the weight formats torchext runs: tensors of these types stay raw bytes.
WEIGHT_IDS = frozenset(q.value for q in WEIGHT_TYPES)

#: The alignment that serves every weight format (the largest of formats.ALIGNMENT); fresh torch
#: allocations are 64-byte aligned.
WEIGHT_ALIGN = max(ALIGNMENT.values())


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


def check_positive_int(value, arg: str) -> None:
    """ValueError unless value is a positive whole number: a bool is none, and int() would take 4.5 as 4."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg}: expected a positive int, got {value!r}")


def check_weight_bytes(tensor: torch.Tensor, qtype: QType, n: int, k: int,
                       names: tuple[str, str, str] = ("tensor", "n", "k")) -> None:
    """ValueError unless `tensor` can hold an [n, k] weight of format qtype as raw bytes; the
    messages call the three arguments by `names` (QuantLinear's are weight, out_features,
    in_features)."""
    what, n_name, k_name = names
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{what}: expected raw {qtype.name} bytes as a uint8 tensor, got {got}")
    check_positive_int(n, n_name)
    check_positive_int(k, k_name)
    if (whole := whole_blocks_error(qtype, k, k_name)) is not None:
        raise ValueError(f"{whole}, got {k}")
    expected = n * row_bytes(qtype, k)
    if tensor.numel() != expected:
        raise ValueError(f"{what}: expected {expected} bytes for {qtype.name} with {n_name}={n}, {k_name}={k} "
                         f"({n} rows of {row_bytes(qtype, k)}), got {tensor.numel()} (shape {list(tensor.shape)})")


def as_weight_rows(tensor: torch.Tensor, qtype: QType, n: int, k: int) -> torch.Tensor:
    """The bytes as a contiguous, aligned [n, row_bytes] tensor: a view when they already are,
    else one copy."""
    rows = tensor.reshape(n, row_bytes(qtype, k))
    if not rows.is_contiguous() or rows.data_ptr() % WEIGHT_ALIGN:
        rows = rows.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    return rows
