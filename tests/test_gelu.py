"""gelu, gelu_ and bias_gelu against torch.nn.functional.gelu.

The oracle is torch's own GELU (both `approximate` forms) on the same device, and for
bias_gelu F.gelu(x.float() + bias.float()).to(dtype), i.e. the sum kept in fp32 and rounded
once, as the op documents.

Tolerances (per element, |y - ref| <= tol):
  * float32: UNITS * eps32 * (|ref| + |x|). Both sides evaluate 0.5 * x * (1 + erf(x / sqrt2))
    (or the tanh form) in fp32 with different erff / tanhf implementations (glibc, CUDA's
    libdevice, torch's vectorized CPU code). Those agree to a couple of ulp of the erf/tanh
    value, whose size is ~1, so the error of the *output* scales with |x| (cancellation in
    1 + erf(x) for negative x), not only with |ref|. Measured on CPU over 3M points in
    [-12, 12] and N(0, 3): at most 1.6 units (erf) and 0.93 (tanh); CUDA's erff/tanhf are
    documented to 2 ulp each, hence UNITS = 4 on CPU and 8 on CUDA.
    Plus one fp32 subnormal step (2^-149), the absolute resolution of tiny results.
  * float16 / bfloat16: one ulp of the output dtype (each side rounds an fp32 result once, and
    two fp32 values that differ by the fp32 tolerance above can round to neighbouring values)
    plus that fp32 tolerance.
Non-finite values must match exactly (NaN where torch gives NaN, +-inf where it gives +-inf).
"""

import pytest
import torch
import torch.nn.functional as F

import torchext
from conftest import DEVICES, DTYPES

APPROXIMATE = ["none", "tanh"]

# Numbers of elements: empty, below one 16-byte vector (4 f32 / 8 f16), odd tails after whole
# vectors, and a large one (2^20 + 3: many CUDA blocks plus a 3-element scalar tail).
SHAPES = [(0,), (1,), (3,), (7,), (13,), (33,), (1000,), (3, 0, 5), (2, 3, 37), (4, 1, 64), (5, 127)]
LARGE = ((1 << 20) + 3,)


def _units(device):
    return 4.0 if torch.device(device).type == "cpu" else 8.0


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at |v| (v float64), subnormals included."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.abs())  # |v| = m * 2^e, m in [0.5, 1)
    ulp = torch.ldexp(torch.full_like(v, fi.eps), (e - 1).to(torch.int32)).to(torch.float64)
    return torch.clamp(ulp, min=fi.smallest_normal * fi.eps)


def assert_gelu_close(y: torch.Tensor, ref: torch.Tensor, x32: torch.Tensor, units: float):
    """y (the op) vs ref (torch) with the tolerance of the module docstring; x32 is the fp32
    argument GELU was evaluated at (x, or x + bias)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.device == ref.device
    y64, r64 = y.detach().cpu().double(), ref.detach().cpu().double()
    x64 = x32.detach().cpu().double()
    # Non-finite arguments follow IEEE arithmetic on 0.5 x (1 + erf(..)) / (1 + tanh(..)):
    # gelu(+inf) = +inf, gelu(-inf) = -inf * 0 = NaN, gelu(NaN) = NaN. Checked against that
    # rule rather than F.gelu, whose CPU kernels disagree across torch releases at +inf
    # (torch 2.11's float16 CPU path returns NaN there; 2.14 and CUDA return inf).
    special = ~torch.isfinite(x64)
    pos_inf = special & (x64 > 0)
    assert torch.equal(y64[pos_inf], x64[pos_inf]), "gelu(+inf) must be +inf"
    assert torch.isnan(y64[special & ~pos_inf]).all(), "gelu(-inf) and gelu(nan) must be NaN"
    y64, r64, x64 = y64[~special], r64[~special], x64[~special]
    nan_y, nan_r = torch.isnan(y64), torch.isnan(r64)
    assert torch.equal(nan_y, nan_r), f"NaN pattern differs at x={x64[nan_y != nan_r][:8].tolist()}"
    inf_r = torch.isinf(r64)
    assert torch.equal(y64[inf_r], r64[inf_r]), "infinities differ"
    fin = ~nan_r & ~inf_r
    y64, r64, x64 = y64[fin], r64[fin], x64[fin]
    f32 = torch.finfo(torch.float32)
    # + the smallest fp32 subnormal: results below 2^-126 are rounded to multiples of it
    tol = units * f32.eps * (r64.abs() + x64.abs()) + f32.smallest_normal * f32.eps
    if y.dtype != torch.float32:
        tol = tol + _ulp(torch.maximum(y64.abs(), r64.abs()), y.dtype)
    err = (y64 - r64).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {err.numel()} elements out of tolerance; worst at x={x64[bad][:4].tolist()}: "
        f"got {y64[bad][:4].tolist()}, torch {r64[bad][:4].tolist()}"
    )


def _randn(shape, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


# ---- gelu ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
def test_gelu_matches_torch(device, dtype, approximate, shape):
    x = _randn(shape, dtype, device, seed=sum(shape) + 1)
    x0 = x.clone()
    y = torchext.gelu(x, approximate)
    assert torch.equal(x, x0), "gelu must not modify its input"
    assert y.data_ptr() != x.data_ptr() or x.numel() == 0
    assert_gelu_close(y, F.gelu(x, approximate=approximate), x.float(), _units(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_default_is_erf_form(device, dtype):
    x = _randn((4, 37), dtype, device, seed=3)
    assert torch.equal(torchext.gelu(x), torchext.gelu(x, "none"))
    assert torch.equal(torch.ops.torchext.gelu(x), torchext.gelu(x, "none"))
    # and the two forms really differ (so a mix-up of the flag would be caught above)
    assert not torch.equal(torchext.gelu(x, "tanh"), torchext.gelu(x, "none"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gelu_every_half_precision_value(device, dtype, approximate):
    # All 65536 bit patterns of the 16-bit type: every finite value, +-0, +-inf, NaNs, subnormals.
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
    # Reference: F.gelu in float64, rounded once. F.gelu's own half-precision CPU kernels differ
    # across releases at the extremes (torch 2.11 overflows 0.5 * x * 2 to inf near bf16's max).
    ref = F.gelu(x.double(), approximate=approximate).to(dtype)
    assert_gelu_close(torchext.gelu(x, approximate), ref, x.float(), _units(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_gelu_special_values(device, dtype, approximate):
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 5.0, -5.0, 10.0, -10.0, 1e4, -1e4,
            fi.max, -fi.max, fi.max / 4, -fi.max / 4, fi.tiny, -fi.tiny, fi.tiny * fi.eps, 1e-3, -1e-3]
    if dtype != torch.float16:
        vals += [1e13, -1e13, 1e30, -1e30]  # x^3 overflows fp32 in the tanh form
    x = torch.tensor(vals, dtype=dtype, device=device)
    y = torchext.gelu(x, approximate)
    # F.gelu in float64, rounded once: torch 2.11's float32 CPU kernel overflows to inf at x = max.
    ref = F.gelu(x.double(), approximate=approximate).to(dtype)
    assert_gelu_close(y, ref, x.float(), _units(device))
    # Independently of torch: gelu(0) = 0, gelu(+inf) = +inf, gelu(nan) = nan, and large
    # positive x passes through (Phi(x) == 1 in fp32), large negative x gives (-)0.
    yc = y.cpu()
    assert yc[0] == 0 and yc[1] == 0
    assert yc[2] == float("inf")
    assert torch.isnan(yc[4])
    assert yc[11] == x.cpu()[11] and yc[12] == 0
    assert yc[13] == x.cpu()[13] and yc[14] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("numel", [1, 7, 13, 1029])
def test_gelu_unaligned_storage(device, dtype, approximate, numel):
    # A contiguous view that starts one element into its buffer: its data pointer is 2 or 4 bytes
    # past a 16-byte boundary, so the CUDA kernel must take its scalar path.
    buf = _randn((numel + 2,), dtype, device, seed=numel)
    x = buf[1:-1]
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    assert_gelu_close(torchext.gelu(x, approximate), F.gelu(x, approximate=approximate), x.float(), _units(device))


# ---- gelu_ (in place) -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("shape", [(0,), (7,), (2, 3, 37), (5, 128), LARGE], ids=str)
def test_gelu_inplace(device, dtype, approximate, shape):
    x = _randn(shape, dtype, device, seed=7 + sum(shape))
    x0 = x.clone()
    ptr = x.data_ptr()
    out = torchext.gelu_(x, approximate)
    assert out is x, "gelu_ must return its argument"
    assert x.data_ptr() == ptr and x.shape == x0.shape and x.dtype == dtype
    # The in-place result is the out-of-place one, bit for bit (same kernel, same math).
    assert torch.equal(x, torchext.gelu(x0, approximate))
    assert_gelu_close(x, F.gelu(x0, approximate=approximate), x0.float(), _units(device))
    if x.numel() > 0:
        assert not torch.equal(x, x0), "gelu_ did not mutate its argument"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_inplace_through_dispatcher(device, dtype):
    x = _randn((3, 9), dtype, device, seed=11)
    x0 = x.clone()
    # The raw op mutates x and returns nothing: torch.compile can only functionalize a mutable
    # custom op that returns no alias (torchext.gelu_ returns x).
    out = torch.ops.torchext.gelu_(x, "tanh")
    assert out is None
    assert torch.equal(x, torchext.gelu(x0, "tanh"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 5, 13, 1027])
def test_gelu_inplace_unaligned_view_touches_only_the_view(device, dtype, numel):
    buf = _randn((numel + 2,), dtype, device, seed=numel + 100)
    before = buf.clone()
    x = buf[1:-1]
    assert x.data_ptr() % 16 != 0
    torchext.gelu_(x)
    assert buf[0] == before[0] and buf[-1] == before[-1], "gelu_ wrote outside its view"
    assert_gelu_close(x, F.gelu(before[1:-1]), before[1:-1].float(), _units(device))


# ---- bias_gelu -------------------------------------------------------------------------------

def _bias_gelu_ref(x, bias, approximate):
    s = x.float() + bias.float()
    return F.gelu(s, approximate=approximate).to(x.dtype), s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize(
    "shape", [(5,), (1, 7), (3, 13), (2, 3, 37), (0, 16), (2, 0, 8), (4, 256), (3, 1000), (1, 2880)], ids=str
)
def test_bias_gelu_matches_reference(device, dtype, approximate, shape):
    x = _randn(shape, dtype, device, seed=sum(shape) + 5)
    bias = _randn((shape[-1],), dtype, device, seed=sum(shape) + 6, scale=1.0)
    x0, b0 = x.clone(), bias.clone()
    y = torchext.bias_gelu(x, bias, approximate)
    assert torch.equal(x, x0) and torch.equal(bias, b0), "bias_gelu must not modify its inputs"
    ref, s = _bias_gelu_ref(x, bias, approximate)
    assert_gelu_close(y, ref, s, _units(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATE)
def test_bias_gelu_large(device, dtype, approximate):
    # 2^20 + 3 elements over 4099 channels (a prime): the channel index wraps at every
    # position relative to the 16-byte vectors.
    k = 4099
    x = _randn((256, k), dtype, device, seed=17)
    bias = _randn((k,), dtype, device, seed=18, scale=1.0)
    ref, s = _bias_gelu_ref(x, bias, approximate)
    assert_gelu_close(torchext.bias_gelu(x, bias, approximate), ref, s, _units(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 13])
def test_bias_gelu_unaligned_storage(device, dtype, k):
    rows = 9
    xbuf = _randn((rows * k + 1,), dtype, device, seed=k)
    bbuf = _randn((k + 1,), dtype, device, seed=k + 1, scale=1.0)
    x = xbuf[1:].view(rows, k)
    bias = bbuf[1:]
    assert x.data_ptr() % 16 != 0 and bias.data_ptr() % 16 != 0
    ref, s = _bias_gelu_ref(x, bias, "none")
    assert_gelu_close(torchext.bias_gelu(x, bias), ref, s, _units(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bias_gelu_sum_is_rounded_once(device, dtype):
    # x + bias must be kept in fp32. Take every value x of the dtype in [0.5, 3) and a bias of
    # 0.45 ulp(x): x + bias rounded to the dtype is x again, so a kernel that rounds the sum
    # first computes gelu(x) ("twice" below). The fp32 sum moves GELU's argument by ~0.45 ulp,
    # which changes the rounded output for a good share of the x. Where the reference (fp32
    # sum) and "twice" differ, the op must side with the reference: its fp32 value differs
    # from torch's by a few fp32 ulp, so it can round the other way only within a few fp32 ulp
    # of a tie (a ~1e-3 chance per element); 90% is a wide margin that still fails outright
    # for a kernel that rounds the sum.
    all_values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    xs = all_values[(all_values >= 0.5) & (all_values < 3.0)].sort().values
    ulp = _ulp(xs.double(), dtype).float()
    x = xs.to(dtype).to(device)
    bias = (0.45 * ulp).to(dtype).to(device)
    assert torch.equal((x + bias).cpu(), x.cpu()), "precondition: x + bias rounds back to x"
    y = torchext.bias_gelu(x, bias)
    ref, s = _bias_gelu_ref(x, bias, "none")
    assert_gelu_close(y, ref, s, _units(device))
    twice = F.gelu(x.float()).to(dtype)
    differ = ref != twice
    assert int(differ.sum()) >= 0.1 * x.numel(), "precondition: the fp32 sum changes many outputs"
    agree = (y[differ] == ref[differ]).float().mean().item()
    assert agree >= 0.9, f"bias_gelu matched the fp32-sum reference at only {agree:.0%} of the sensitive inputs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_zero_bias_is_gelu(device, dtype):
    x = _randn((6, 40), dtype, device, seed=21)
    zero = torch.zeros(40, dtype=dtype, device=device)
    for a in APPROXIMATE:
        assert torch.equal(torchext.bias_gelu(x, zero, a), torchext.gelu(x, a))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_special_values(device, dtype):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.0, inf, -inf, nan, 1.0, 5.0], [1.0, 1.0, 1.0, 1.0, -inf, inf]], dtype=dtype, device=device)
    bias = torch.tensor([0.0, 1.0, 1.0, 0.0, inf, -inf], dtype=dtype, device=device)
    ref, s = _bias_gelu_ref(x, bias, "none")
    y = torchext.bias_gelu(x, bias)
    assert_gelu_close(y, ref, s, _units(device))
    assert torch.isnan(y[1, 4]) and torch.isnan(y[1, 5])  # inf - inf
