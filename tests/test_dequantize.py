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
from torchext.formats import put_fp16_field
from conftest import (
    DEVICES,
    DTYPES,
    FP16_FIELD_OFFSETS,
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
# real width (2880); 32-value formats at one block, an odd count and 4096.
CASES = [(q, 5, k) for q in K_QUANTS for k in (256, 300, 768, 2880)] + [
    (q, 5, k) for q in SMALL_BLOCK_QTYPES for k in (32, 96, 4096)
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
    for off in FP16_FIELD_OFFSETS[qtype]:
        put_fp16_field(wb[0, :5].numpy(), int(qtype), off, special)  # numpy() shares w's memory
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
