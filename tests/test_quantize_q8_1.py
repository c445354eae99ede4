"""quantize_q8_1: bytes against the numpy Q8_1 oracle (conftest.q8_1_reference).

Tolerance: none. d, qs and sum(qs) are all determined bit for bit by the rule (fp32 amax / 127
rounded up to 10 mantissa bits, fp32 division, round half away from zero, an integer sum), so every
byte must match the oracle, on CPU and CUDA alike.
"""

import math

import numpy as np
import pytest
import torch

import torchext
from conftest import (
    DEVICES,
    DTYPES,
    exact_activations,
    gaussian_activations,
    q8_1_fields,
    q8_1_reference,
    q8_1_row_bytes,
    requires_cuda,
)

KS = [32, 256, 300, 4096, 2880]
NAN_WORD = 0x7FC00000  # d = NaN, sum(qs) = 0


def realistic_activations(shape, seed, decades=(-3, 2)):
    """Gaussian values with a per-row magnitude from 10^decades[0] to 10^decades[1]."""
    x = gaussian_activations(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = decades
    mag = 10.0 ** (torch.rand(shape[:-1] + (1,), generator=g) * (hi - lo) + lo)
    return x * mag


def assert_same_bytes(got, ref):
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == ref.shape and got.dtype == np.uint8
    if not np.array_equal(got, ref):
        g, r = q8_1_fields(got), q8_1_fields(ref)
        raise AssertionError(
            f"Q8_1 bytes differ: {int((g.word != r.word).sum())} scale words and "
            f"{int((g.qs != r.qs).any(-1).sum())} qs blocks of {g.d.size}; first block "
            f"{np.argwhere((got != ref).reshape(got.shape[:-1] + (-1, 36)).any(-1))[0].tolist()}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("lead", [(1,), (2, 3)], ids=["1row", "2x3"])
def test_bytes_match_oracle(k, dtype, device, lead):
    x = realistic_activations(lead + (k,), seed=k).to(dtype)
    xq = torchext.quantize_q8_1(x.to(device))
    assert xq.dtype == torch.uint8 and xq.device.type == device
    assert xq.shape == lead + (q8_1_row_bytes(k),)
    # f16/bf16 inputs widen to float32 exactly; the oracle sees the same values as the kernel
    assert_same_bytes(xq, q8_1_reference(x.float().numpy()))


@pytest.mark.parametrize("device", DEVICES)
def test_one_dimensional_input(device):
    x = realistic_activations((300,), seed=3)
    xq = torchext.quantize_q8_1(x.to(device))
    assert xq.shape == (q8_1_row_bytes(300),)
    assert_same_bytes(xq, q8_1_reference(x.numpy()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_is_half_away_from_zero(dtype, device):
    """amax = 127 gives d = 1, so x / d is x itself and every tie is explicit."""
    x = torch.zeros(32)
    ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.25, -0.75, 3.0]
    x[: len(ties)] = torch.tensor(ties)
    xq = torchext.quantize_q8_1(x.to(dtype).to(device))
    f = q8_1_fields(xq)
    assert f.d[0] == 1.0
    expected = [127, 1, 2, 3, -1, -2, -3, 127, -127, 0, -1, 3]
    assert f.qs[0, : len(ties)].tolist() == expected
    assert (f.qs[0, len(ties):] == 0).all()
    assert f.sum_qs[0] == sum(expected)
    assert_same_bytes(xq, q8_1_reference(x.numpy()[None, :])[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_activations_are_lossless(dtype, device):
    """The generator behind the tight matmul tests: d = 2^-e, qs = x / d, d * sum(qs) = sum(x)."""
    x = exact_activations((3, 300), seed=5)
    assert torch.equal(x.to(dtype).float(), x)  # exact in every dtype
    f = q8_1_fields(torchext.quantize_q8_1(x.to(dtype).to(device)))
    xp = np.zeros((3, 512), np.float64)
    xp[:, :300] = x.double().numpy()
    blocks = xp.reshape(3, 16, 32)
    d64 = f.d.astype(np.float64)
    np.testing.assert_array_equal(d64[..., None] * f.qs, blocks)
    np.testing.assert_array_equal(d64 * f.sum_qs, blocks.sum(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_blocks(dtype, device):
    x = realistic_activations((3, 256), seed=7)
    x[0] = 0.0  # a whole zero row
    x[1, 64:96] = 0.0  # one zero block between non-zero ones
    xq = torchext.quantize_q8_1(x.to(dtype).to(device)).cpu().numpy()
    assert (xq[0] == 0).all()  # d = 0, sum 0, qs = 0 everywhere
    assert (xq[1].reshape(8, 36)[2] == 0).all()
    assert (xq[1].reshape(8, 36)[[0, 1, 3]] != 0).any(-1).all()
    assert_same_bytes(xq, q8_1_reference(x.to(dtype).float().numpy()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 31, 32, 300, 2880])
def test_padding_past_k_is_zero(k, dtype, device):
    """Values past K count as zeros: the partial block matches the oracle (no value of the next
    row leaks in: rows are adjacent in memory) and every block past K is 36 zero bytes."""
    rows = 3
    x = realistic_activations((rows, k), seed=k + 11)
    x = x + torch.sign(x) * 1e-3  # no accidental zero
    xq = torchext.quantize_q8_1(x.to(dtype).to(device)).cpu().numpy()
    blocks = xq.reshape(rows, -1, 36)
    assert blocks.shape[1] == math.ceil(k / 256) * 8
    used = math.ceil(k / 32)
    assert (blocks[:, used:] == 0).all()
    assert (blocks[:, :used].reshape(rows * used, 36) != 0).any(-1).all()
    assert_same_bytes(xq, q8_1_reference(x.to(dtype).float().numpy()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decade", [-30, -20, -8, -3, 0, 4, 8, 20, 30], ids=lambda e: f"1e{e}")
def test_any_finite_magnitude(decade, dtype, device):
    """The scale keeps fp32's exponent range: |x| from 1e-30 to 1e30 (as far as dtype holds it)
    quantizes to the oracle's bytes with |x - d * qs| <= d / 2 in every block, and d * sum(qs) is
    finite; ggml's fp16 d and s overflowed from |x| ~ 2e3 (the sum) and flushed below ~1e-5."""
    info = torch.finfo(dtype)
    if 10.0**decade * 4 > info.max or 10.0**decade < info.tiny:
        pytest.skip(f"{dtype} does not hold 1e{decade}")
    x = (gaussian_activations((4, 300), seed=decade + 40) * 10.0**decade).to(dtype)
    xq = torchext.quantize_q8_1(x.to(device))
    assert_same_bytes(xq, q8_1_reference(x.float().numpy()))
    f = q8_1_fields(xq)
    xp = np.zeros((4, 512), np.float64)
    xp[:, :300] = x.double().numpy()
    d = f.d.astype(np.float64)[..., None]
    assert np.isfinite(d).all() and (d[:, :10] > 0).all()  # blocks 10.. are padding (d = 0)
    assert (np.abs(xp.reshape(4, 16, 32) - d * f.qs) <= d / 2).all()
    assert np.isfinite(d[..., 0] * f.sum_qs).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_input_marks_its_block(dtype, device):
    """A block holding NaN, +inf or -inf stores the scale word 0x7fc00000 (d NaN, sum 0) and
    qs = 0; every other block is exactly what it would be without the bad value."""
    x = realistic_activations((3, 300), seed=13)
    bad = [(0, 40, float("nan")), (1, 299, float("inf")), (2, 0, float("-inf")), (2, 33, float("nan"))]
    clean = x.clone()
    for r, c, v in bad:
        x[r, c] = v
    xq = torchext.quantize_q8_1(x.to(dtype).to(device))
    f = q8_1_fields(xq)
    marked = np.zeros(f.d.shape, bool)
    for r, c, _ in bad:
        marked[r, c // 32] = True
    assert (f.word[marked] == NAN_WORD).all()
    assert (f.qs[marked] == 0).all()
    # the other blocks: as if the bad values were zeros (nothing leaks across blocks)
    for r, c, _ in bad:
        clean[r, c] = 0.0
    c = q8_1_fields(torchext.quantize_q8_1(clean.to(dtype).to(device)))
    np.testing.assert_array_equal(f.word[~marked], c.word[~marked])
    np.testing.assert_array_equal(f.qs[~marked], c.qs[~marked])
    assert_same_bytes(xq, q8_1_reference(x.to(dtype).float().numpy()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 300), (2, 0, 256), (0, 0, 32)])
def test_empty_batch(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    xq = torchext.quantize_q8_1(x)
    assert xq.shape == shape[:-1] + (q8_1_row_bytes(shape[-1]),)
    assert xq.dtype == torch.uint8 and xq.device.type == device


# ---- CPU and CUDA produce the same bytes ----------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
def test_cpu_and_cuda_bytes_identical(k, dtype):
    x = realistic_activations((2, 3, k), seed=k + 17).to(dtype)
    x[0, 0, : min(k, 32)] = 0.0  # a zero block
    cpu = torchext.quantize_q8_1(x)
    cuda = torchext.quantize_q8_1(x.cuda())
    assert torch.equal(cpu, cuda.cpu())


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_and_cuda_bytes_identical_with_non_finite(dtype):
    """CPU and CUDA give identical bytes, non-finite blocks included (word 0x7fc00000, qs = 0)."""
    x = realistic_activations((2, 300), seed=19)
    x[0, 3], x[1, 100], x[1, 299] = float("nan"), float("inf"), float("-inf")
    assert torch.equal(torchext.quantize_q8_1(x.to(dtype)), torchext.quantize_q8_1(x.to(dtype).cuda()).cpu())
