"""dequantize against gguf.quants.dequantize (numpy, the independent oracle).

Tolerance: none. Both compute each value in float32 from the same fields (fp16 scales widened
exactly, small integer codes), and the lead verified the kernels round exactly as gguf does,
so float32 output is bit-identical; float16 / bfloat16 output is that float32 value rounded
once to nearest even, i.e. bit-identical to torch's float32 -> dtype conversion of it.
"""

import numpy as np
import pytest
import torch

import torchext
from torchext.formats import ALIGNMENT, QType, put_scale_field
from conftest import (
    DEVICES,
    DTYPES,
    SCALE_FIELD_OFFSETS,
    K_QUANTS,
    SMALL_BLOCK_QTYPES,
    WEIGHT_QTYPES,
    block_geometry,
    cached_weight,
    qtype_name,
    random_weight,
    requires_cuda,
    row_bytes,
)

from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

# (format, n, k): k-quants at one super-block, K not a multiple of 256 (the padding must be
# dropped), an odd super-block count (3 Q6_K blocks = 630-byte rows, only 2-byte aligned) and a
# real width (2880); 32- and 64-value formats at one block, an odd count (3 MXFP4 blocks = 51-byte
# rows: odd addresses) and 4096.
CASES = [(q, 5, k) for q in K_QUANTS for k in (256, 300, 768, 2880)] + [
    (q, 5, k) for q in SMALL_BLOCK_QTYPES for k in (block_geometry(q)[0], 3 * block_geometry(q)[0], 4096)
]


def case_id(case):
    q, n, k = case
    return f"{qtype_name(q)}-n{n}-k{k}"


def gguf_f32(w, qtype, n, k):
    """gguf's float32 values [n, k] (its output is padded to whole blocks; keep the first k)."""
    out = gguf_dequantize(w.cpu().numpy().reshape(n, -1), Q(int(qtype)))
    assert out.dtype == np.float32
    return out[:, :k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_bit_identical_to_gguf(case, device):
    qtype, n, k = case
    w, _ = cached_weight(qtype, n, k)
    got = torchext.dequantize(w.to(device), qtype, n, k)
    assert got.shape == (n, k) and got.dtype == torch.float32 and got.device.type == device
    ref = gguf_f32(w, qtype, n, k)
    assert np.isfinite(ref).all()  # finite scales by construction
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("case", [(QType.Q4_K, 1, 65536), (QType.Q4_K, 2, 40004), (QType.Q4_K, 700, 256),
                                  (QType.Q5_0, 1, 65536), (QType.Q5_0, 2, 40000), (QType.Q5_0, 700, 256)], ids=case_id)
def test_cpu_threads_split_rows_and_chunks(case):
    """The CPU threads split the output's 32-value chunks in row order, 512 chunks (2^14 values) a task
    at least (csrc/cpu/kernels.h): one row of 2048 chunks across the threads, two rows split inside
    a row (Q4_K's k = 40004: a partial last chunk), and runs of whole rows (700 x 256: 5600 chunks).
    Bit-identical to gguf at 1, 2 and 3 threads."""
    qtype, n, k = case
    w, _ = cached_weight(qtype, n, k)
    ref = gguf_f32(w, qtype, n, k)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got = torchext.dequantize(w, qtype, n, k).numpy()
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), err_msg=f"{t} threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_outputs_are_the_float32_result_rounded(case, dtype, device):
    qtype, n, k = case
    w, _ = cached_weight(qtype, n, k)
    got = torchext.dequantize(w.to(device), qtype, n, k, dtype=dtype)
    assert got.shape == (n, k) and got.dtype == dtype and got.device.type == device
    expected = torch.from_numpy(gguf_f32(w, qtype, n, k).copy()).to(dtype)
    assert torch.equal(got.cpu().view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_default_dtype_is_float32(device):
    w = random_weight(Q.Q4_K, 2, 256, device)
    assert torch.ops.torchext.dequantize(w, int(Q.Q4_K), 2, 256).dtype == torch.float32
    assert torch.ops.torchext.dequantize(w, int(Q.Q4_K), 2, 256, None).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", K_QUANTS, ids=qtype_name)
@pytest.mark.parametrize("k", [1, 255, 257, 511])
def test_padding_past_k_is_dropped(qtype, k, device):
    """Rows of ceil(k/256) super-blocks: [n, k] comes back, the first k values of each padded
    row, and row i starts at byte i * row_bytes (not at value i * k)."""
    n = 3
    w = random_weight(qtype, n, k, device, seed=k)
    got = torchext.dequantize(w, qtype, n, k)
    assert got.shape == (n, k)
    full = gguf_f32(w, qtype, n, -(-k // 256) * 256)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), full[:, :k].view(np.uint32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_q6_k_odd_block_counts_and_2_byte_aligned_rows(n, blocks, device):
    """210-byte Q6_K blocks: with an odd count per row every other row starts 2 (mod 4) bytes
    into the buffer, so a kernel that reads 32-bit words of a row misreads it."""
    k = 256 * blocks
    w = random_weight(Q.Q6_K, n, k, device, seed=blocks * 10 + n)
    got = torchext.dequantize(w, Q.Q6_K, n, k)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), gguf_f32(w, Q.Q6_K, n, k).view(np.uint32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q5_0], ids=qtype_name)
def test_storage_at_2_byte_offset(qtype, device):
    """Formats whose blocks are only 2-byte aligned work on a weight that starts 2 bytes into
    its storage (a slice of a larger buffer)."""
    n, k = 3, 256
    nbytes = n * row_bytes(qtype, k)
    buf = torch.zeros(nbytes + 2, dtype=torch.uint8, device=device)
    w = random_weight(qtype, n, k, device, seed=7).reshape(-1)
    buf[2:] = w
    got = torchext.dequantize(buf[2:], qtype, n, k)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), gguf_f32(w, qtype, n, k).view(np.uint32))


# the formats whose blocks keep 1-byte alignment (MXFP4's 17 bytes): rows and blocks at odd addresses
BYTE_ALIGNED = [q for q in WEIGHT_QTYPES if ALIGNMENT[QType(int(q))] == 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("qtype", BYTE_ALIGNED, ids=qtype_name)
def test_storage_at_odd_offsets(qtype, offset, device):
    """A 1-byte-aligned format's weight at an odd address (a slice of a larger buffer), with rows of
    an odd number of blocks, one and several: every row and block starts at odd and even addresses,
    and the last block ends where the buffer does (a kernel that read whole words would run past it)."""
    values = block_geometry(qtype)[0]
    for n, k in ((7, values), (3, 5 * values)):
        w = random_weight(qtype, n, k, seed=offset + k).reshape(-1)
        buf = torch.zeros(w.numel() + offset, dtype=torch.uint8, device=device)
        buf[offset:] = w.to(device)
        got = torchext.dequantize(buf[offset:], qtype, n, k)
        np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), gguf_f32(w, qtype, n, k).view(np.uint32))


# The formats whose scales are codes of a byte each (MXFP4's E8M0 exponent, NVFP4's unsigned E4M3):
# every one of the 256 codes, which random_weight's rounded Gaussian scales do not reach.
BYTE_SCALES = [Q(int(q)) for q in torchext.formats.BYTE_SCALE_FIELDS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", BYTE_SCALES, ids=qtype_name)
def test_every_scale_code(qtype, device):
    """Each scale field of a block holds each of the 256 codes (0 and 0x7F, which gguf decodes to 0
    for NVFP4, and 0x80 .. 0xFF, whose top bit gguf ignores; MXFP4's subnormal 2^-128 and 2^-127, and
    its largest codes, at which levels of 8 and 12 overflow to infinity in gguf's float32 as here):
    bit for bit gguf's values, infinities and signed zeros included."""
    values, nbytes = block_geometry(qtype)
    n = 256
    w = random_weight(qtype, n, values, "cpu", seed=int(qtype)).reshape(n, nbytes)
    for i, off in enumerate(SCALE_FIELD_OFFSETS[qtype]):
        w[:, off] = torch.roll(torch.arange(256, dtype=torch.int32), 37 * i).to(torch.uint8)
    got = torchext.dequantize(w.to(device), qtype, n, values).cpu().numpy()
    with np.errstate(over="ignore"):  # gguf's float32 products that overflow: the infinities compared
        ref = gguf_f32(w, qtype, n, values)
    assert np.isinf(ref).any() == (qtype == Q.MXFP4)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_every_code_of_every_field(qtype, device):
    """Enough random blocks that every byte value occurs at every byte position of a block
    (1024 blocks: each (position, value) pair is missed with probability ~2%, so nearly all are
    hit), with extreme fp16 scales: large, subnormal, negative."""
    values, nbytes = block_geometry(qtype)
    n, k = 16, 64 * values
    w = random_weight(qtype, n, k, "cpu", seed=int(qtype), scale=1.0)
    wb = w.view(n, k // values, nbytes)
    special = np.array([1000.0, -2.0**-20, 2.0**-24, -0.0, 65504.0], dtype=np.float16)
    for off in SCALE_FIELD_OFFSETS[qtype]:
        put_scale_field(wb[0, :5].numpy(), int(qtype), off, special)  # numpy() shares w's memory
    got = torchext.dequantize(w.to(device), qtype, n, k)
    ref = gguf_f32(w, qtype, n, k)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), ref.view(np.uint32))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_and_cuda_equal(case, dtype):
    qtype, n, k = case
    w, _ = cached_weight(qtype, n, k)
    cpu = torchext.dequantize(w, qtype, n, k, dtype=dtype)
    cuda = torchext.dequantize(w.cuda(), qtype, n, k, dtype=dtype)
    assert torch.equal(cpu, cuda.cpu())
