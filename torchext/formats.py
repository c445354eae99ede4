"""The weight formats torchext runs, with ids and sizes taken from the `gguf` package: the Python
side of the format catalog (kernels/blocks.h's TORCHEXT_WEIGHT_FORMATS is the C++ side). The tests,
the benchmarks and torchext.report take their format lists and block facts from here;
tests/test_formats.py checks this table against gguf and against the C++ ops.
"""

import enum
import operator

import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class QType(enum.IntEnum):
    """A gguf GGMLQuantizationType that torchext supports (Q8_1 is the activation format)."""

    Q4_0 = GGMLQuantizationType.Q4_0.value
    Q4_1 = GGMLQuantizationType.Q4_1.value
    Q5_0 = GGMLQuantizationType.Q5_0.value
    Q5_1 = GGMLQuantizationType.Q5_1.value
    Q8_0 = GGMLQuantizationType.Q8_0.value
    Q8_1 = GGMLQuantizationType.Q8_1.value
    Q2_K = GGMLQuantizationType.Q2_K.value
    Q3_K = GGMLQuantizationType.Q3_K.value
    Q4_K = GGMLQuantizationType.Q4_K.value
    Q5_K = GGMLQuantizationType.Q5_K.value
    Q6_K = GGMLQuantizationType.Q6_K.value
    IQ4_NL = GGMLQuantizationType.IQ4_NL.value
    IQ4_XS = GGMLQuantizationType.IQ4_XS.value
    TQ2_0 = GGMLQuantizationType.TQ2_0.value
    TQ1_0 = GGMLQuantizationType.TQ1_0.value
    # FP4 E2M1 values with a power-of-two (MXFP4) or an unsigned E4M3 (NVFP4) scale
    MXFP4 = GGMLQuantizationType.MXFP4.value
    NVFP4 = GGMLQuantizationType.NVFP4.value
    # the grid-based imatrix formats (kernels/quant_traits_iq_grid.h)
    IQ2_XXS = GGMLQuantizationType.IQ2_XXS.value
    IQ2_XS = GGMLQuantizationType.IQ2_XS.value
    IQ3_XXS = GGMLQuantizationType.IQ3_XXS.value
    IQ1_S = GGMLQuantizationType.IQ1_S.value
    IQ3_S = GGMLQuantizationType.IQ3_S.value
    IQ2_S = GGMLQuantizationType.IQ2_S.value
    IQ1_M = GGMLQuantizationType.IQ1_M.value

    @classmethod
    def of(cls, fmt) -> "QType":
        """A QType from a QType, a GGMLQuantizationType, its integer id (int, numpy integer, integer
        tensor of one element) or its name ("Q4_K")."""
        if isinstance(fmt, cls):  # first: also what torch.compile traces (dynamo 2.12-2.13 recurse in operator.index)
            return fmt
        if isinstance(fmt, str):
            try:
                return cls[fmt.upper()]
            except KeyError:
                raise ValueError(f"unknown quantization format {fmt!r}; expected one of "
                                 f"{[q.name for q in cls]}") from None
        # operator.index, not int(): int() would truncate 12.7 to 12 (Q4_K); a bool is no id either.
        # An int (gguf's IntEnum included) is taken as it is: dynamo 2.12-2.13 recurse in operator.index.
        if isinstance(fmt, (bool, np.bool_)):
            value = None
        elif isinstance(fmt, int):
            value = int(fmt)
        else:
            try:
                value = operator.index(fmt)
            except TypeError:
                value = None
        if value is None:
            raise ValueError(f"unsupported quantization format {fmt!r}: expected a QType, a gguf "
                             f"GGMLQuantizationType, its integer id or its name, got a {type(fmt).__name__}")
        member = _QTYPE_OF_ID.get(value)  # a dict: cls(value) costs an eager op call about 1 µs
        if member is None:
            raise ValueError(f"unsupported quantization format {fmt!r}; expected one of {[q.name for q in cls]}")
        return member


_QTYPE_OF_ID = {q.value: q for q in QType}


WEIGHT_TYPES = tuple(q for q in QType if q != QType.Q8_1)
K_QUANTS = tuple(q for q in WEIGHT_TYPES if GGML_QUANT_SIZES[GGMLQuantizationType(q.value)][0] == 256)
SMALL_BLOCK_TYPES = tuple(q for q in WEIGHT_TYPES if q not in K_QUANTS)  # 32 values a block, NVFP4 64

#: The most activation rows the CPU's qmatmul sends through its Q8_1 GEMV (and qmatmul_id's most tokens),
#: by format: the catalog's CPU GEMV rows (kernels/blocks.h, where each has its measurement;
#: batch_policy.h, cpu_max_gemv_rows), where the CPU's GEMV stops being faster than the dense path
#: (bench/NOTES.md, twenty-second session). torchext.ops.gemv_max_rows reads it; CUDA's limit is
#: torchext.ops.GEMV_MAX_ROWS.
CPU_GEMV_MAX_ROWS = {
    QType.Q4_0: 16, QType.Q4_1: 16, QType.Q5_0: 16, QType.Q5_1: 16, QType.Q8_0: 16, QType.Q2_K: 8, QType.Q3_K: 16,
    QType.Q4_K: 48, QType.Q5_K: 32, QType.Q6_K: 16, QType.IQ4_NL: 16, QType.IQ4_XS: 24, QType.TQ2_0: 16,
    QType.TQ1_0: 16, QType.MXFP4: 16, QType.NVFP4: 4,
    QType.IQ2_XXS: 4, QType.IQ2_XS: 4, QType.IQ3_XXS: 8, QType.IQ1_S: 4, QType.IQ3_S: 8, QType.IQ2_S: 4,
    QType.IQ1_M: 4,
}

#: Byte offsets of each weight format's scale fields in one block: d, then dmin (k-quants) or m
#: (Q4_1, Q5_1); Q2_K's d and dmin follow scales[16] and qs[64], Q3_K's d hmask[32], qs[64] and
#: scales[12], Q6_K's d ql[128], qh[64] and scales[16], TQ2_0's d qs[64], TQ1_0's qs[48] and qh[4]
#: (layouts per llama.cpp's ggml-common.h, as kernels/blocks.h spells them). The fields are fp16 but
#: for MXFP4's E8M0 exponent byte and NVFP4's four unsigned E4M3 bytes (one per 16 values); IQ1_M's is
#: split (SPLIT_FP16_FIELDS). Every other byte is quants or packed scale codes, valid whatever its
#: value: random bytes with finite values written here (put_scale_field) decode to finite weights.
SCALE_FIELDS = {
    QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2), QType.Q8_0: (0,),
    QType.Q2_K: (80, 82), QType.Q3_K: (108,), QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,),
    QType.IQ4_NL: (0,), QType.IQ4_XS: (0,), QType.TQ2_0: (64,), QType.TQ1_0: (52,),
    QType.MXFP4: (0,), QType.NVFP4: (0, 1, 2, 3),
    QType.IQ2_XXS: (0,), QType.IQ2_XS: (0,), QType.IQ3_XXS: (0,), QType.IQ3_S: (0,), QType.IQ2_S: (0,),
    QType.IQ1_S: (0,), QType.IQ1_M: (48,),
}

#: Formats whose fp16 field at SCALE_FIELDS' offset is not two bytes: IQ1_M keeps bits 4w .. 4w+3 of d
#: in the top nibble of the 16-bit scale word w = 0..3 from that offset. put_scale_field writes either.
SPLIT_FP16_FIELDS = (QType.IQ1_M,)

#: Formats whose scale fields are single bytes: MXFP4's E8M0 exponent, NVFP4's unsigned E4M3 codes.
BYTE_SCALE_FIELDS = (QType.MXFP4, QType.NVFP4)


def scale_field_bytes(qtype) -> int:
    """Bytes put_scale_field writes (and reads) at a scale field's offset: 2 for an fp16 field, 8 for
    IQ1_M's split one (the four scale words), 1 for MXFP4's and NVFP4's."""
    q = QType.of(qtype)
    return 1 if q in BYTE_SCALE_FIELDS else 8 if q in SPLIT_FP16_FIELDS else 2

#: The values of NVFP4's unsigned E4M3 scale codes 0 .. 0x7E (0x7F is E4M3's NaN, which gguf decodes
#: as 0), before the format's halving: code = exponent (bias 7) << 3 | mantissa.
_UE4M3 = np.array([m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0**(e - 7)
                   for e in range(16) for m in range(8)][:0x7F])


def put_scale_field(blocks: np.ndarray, qtype, off: int, values) -> None:
    """Stores scales `values` [...] into the scale field at byte `off` of `blocks` [..., block bytes]
    (uint8, written in place), in the field's encoding: fp16 (rounded to nearest); MXFP4's E8M0
    exponent e of the nearest power of two, the scale being 2^(e - 128) (|value| below 2^-128, zero
    included, gives e = 0: E8M0 has no zero); NVFP4's E4M3 code of the nearest value to 2 |value|, its
    scale being that value halved. The two FP4 scales are unsigned: a value's sign is dropped."""
    qtype = QType.of(qtype)
    if qtype == QType.MXFP4:
        with np.errstate(divide="ignore"):
            e = np.rint(np.log2(np.abs(np.asarray(values, dtype=np.float64)))) + 128
        blocks[..., off] = np.clip(np.nan_to_num(e, neginf=0.0), 0, 255).astype(np.uint8)
        return
    if qtype == QType.NVFP4:
        target = 2 * np.abs(np.asarray(values, dtype=np.float64))
        blocks[..., off] = np.abs(target[..., None] - _UE4M3).argmin(axis=-1).astype(np.uint8)
        return
    bits = np.asarray(values, dtype=np.float16).astype("<f2").view("<u2")
    if qtype in SPLIT_FP16_FIELDS:
        words = blocks[..., off:off + 8].copy().view("<u2")
        nibbles = (bits[..., None] >> np.array([0, 4, 8, 12], dtype="<u2")) & 0xF
        blocks[..., off:off + 8] = ((words & 0x0FFF) | (nibbles << 12)).astype("<u2").view(np.uint8)
    else:
        blocks[..., off:off + 2] = bits[..., None].view(np.uint8)

#: The byte alignment a weight's data must keep: each format's blocks are read with loads of that
#: size (kernels/quant_traits.h, kAlign: 16-byte headers of Q4_K/Q5_K, 4-byte words of 20/24/36/84-byte
#: blocks, 8 for IQ4_XS's 136-byte and IQ1_M's 56-byte blocks, single bytes of MXFP4's 17-byte blocks,
#: 2 for the rest); the ops reject anything less.
ALIGNMENT = {
    QType.Q4_0: 2, QType.Q4_1: 4, QType.Q5_0: 2, QType.Q5_1: 4, QType.Q8_0: 2, QType.Q2_K: 4, QType.Q3_K: 2,
    QType.Q4_K: 16, QType.Q5_K: 16, QType.Q6_K: 2, QType.IQ4_NL: 2, QType.IQ4_XS: 8, QType.TQ2_0: 2,
    QType.TQ1_0: 2, QType.MXFP4: 1, QType.NVFP4: 4,
    QType.IQ2_XXS: 2, QType.IQ2_XS: 2, QType.IQ3_XXS: 2, QType.IQ3_S: 2, QType.IQ2_S: 2,
    QType.IQ1_S: 2, QType.IQ1_M: 8,
}

#: The grid-based imatrix formats (kernels/quant_traits_iq_grid.h): the IQ formats but the non-linear
#: IQ4_NL and IQ4_XS, whose values are a 16-entry table.
GRID_TYPES = tuple(q for q in WEIGHT_TYPES if q.name.startswith("IQ") and q not in (QType.IQ4_NL, QType.IQ4_XS))

#: The formats torchext.quantize makes (llama.cpp's reference quantizers, or gguf's numpy ones where
#: llama.cpp has none): all but the grid formats llama.cpp makes with an importance matrix (every one but
#: IQ3_S), which come from GGUF files.
QUANTIZABLE_TYPES = tuple(q for q in WEIGHT_TYPES if q not in GRID_TYPES or q == QType.IQ3_S)


def block_values(qtype) -> int:
    """Values per block: 256 for the k-quants, TQ1_0, TQ2_0 and the IQ grid formats, 64 for NVFP4, 32
    otherwise."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(QType.of(qtype).value)][0]


def whole_blocks_error(qtype, k: int, k_name: str = "k"):
    """The message for a row length k that a format cannot take, or None: rows of the 256-value
    formats may end inside their last block (it is zero-padded), the others' rows are whole blocks."""
    qtype, bv = QType.of(qtype), block_values(qtype)
    if bv == 256 or k % bv == 0:
        return None
    return f"{k_name}: {qtype.name} rows are whole {bv}-value blocks, so {k_name} must be a multiple of {bv}"


def block_bytes(qtype) -> int:
    """Bytes per block."""
    qtype = QType.of(qtype)
    if qtype == QType.Q8_1:
        # ggml's block_q8_1 is 36 bytes (fp16 d and s); gguf-py still lists the old fp32 layout (40).
        return 36
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype.value)][1]


def row_bytes(qtype, k: int) -> int:
    """Bytes of one weight row of k values: ceil(k / block_values) blocks."""
    return -(-k // block_values(qtype)) * block_bytes(qtype)


def q8_1_row_bytes(k: int) -> int:
    """Bytes of one Q8_1 activation row: k padded to whole 256-value super-blocks."""
    return -(-k // 256) * 8 * 36
