"""torchext.cached_attention against a float64 oracle (masked softmax attention over the whole cache,
the cache heads repeated for their query heads), on the CPU and on CUDA where there is a GPU.

Tolerance, from the kernels' arithmetic (fp32 throughout, inputs already in their dtype): a score
is a dot product of D fp32 products, off by at most D * 2^-24 * scale * sum_d |q_d| * max|k| (the
running sum's rounding); a weight exp(score - max) adds its argument's rounding and expf's 2 ulps, and
the rescaling of a running sum by another such exp the same again (10 * 2^-24 in all); a normalized
weight moves relatively by at most twice its exponent's error, so the output by that times max|v|;
the weighted sum of at most S values and the sum of their S weights add 2 * S * 2^-24 * max|v|. The
output is then rounded to its dtype: half an ulp (2^-24, 2^-11, 2^-8 relative for float32, float16,
bfloat16), and below the dtype's normal range half its subnormal spacing (float16's 2^-25 absolute:
small outputs, as from values near 1e-2, land there).

torchext.cached_attention_quantize_q8_1 is checked byte for byte against the two ops it replaces,
quantize_q8_1 of cached_attention's output as [B, T, H * D], on each device.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torchext
from conftest import half_tiny, half_ulp, raises_on_cpu_and_meta

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPS = [torchext.cached_attention, torchext.cached_attention_quantize_q8_1]
OP_IDS = ["cached_attention", "quantize_q8_1"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, heads, kv_heads, keys, dim, positions, window)
CASES = [
    (1, 4, 1, 37, 256, [20], 0),            # Gemma 3 270M's heads, one decode row
    (1, 4, 1, 37, 256, [20], 8),            # a sliding window inside the filled part
    (1, 4, 1, 200, 256, [150], 100),        # a window across several of the CUDA kernels' 16-key spans
    (1, 4, 1, 200, 256, [199, 0, 15, 16], 0),  # rows at the first key, span edges, the last key
    (2, 8, 2, 129, 64, [128, 3], 0),        # two sequences, groups of 4 heads
    (1, 16, 1, 70, 128, [69], 0),           # a group of 16 heads (4 CTAs of 4 heads a span on CUDA)
    (1, 2, 2, 1, 8, [0], 0),                # one key, no grouping, the smallest dim
    (1, 6, 2, 300, 32, [299, 150], 40),     # groups of 3 heads (a CTA's tile of 4, one head unused)
    (4, 8, 1, 2000, 64, [1999, 1000, 64, 5], 0),  # enough CTAs that CUDA's spans grow to 512 keys
]


def oracle(q, k, v, pos, scale, window):
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k64, v64 = k64.repeat_interleave(group, dim=1), v64.repeat_interleave(group, dim=1)
    j = torch.arange(k.shape[2])[None, :]
    p = pos.cpu()[:, None]
    visible = (j <= p) & ((p - j < window) if window > 0 else torch.ones_like(j, dtype=torch.bool))
    scores = (scale * q64 @ k64.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64


def inputs(case, dtype, device, seed=0):
    batch, heads, kv_heads, keys, dim, positions, window = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, len(positions), dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, keys, dim, generator=g).to(dtype)
    pos = torch.tensor(positions, dtype=torch.int64)
    return [t.to(device) for t in (q, k, v, pos)] + [1.0 / math.sqrt(dim), window]


def bound(q, k, v, scale, ref, dtype):
    u = 2.0**-24
    dim, keys = q.shape[-1], k.shape[2]
    score_err = dim * u * scale * q.double().abs().sum(-1).max().item() * k.double().abs().max().item()
    vmax = v.double().abs().max().item()
    return 2 * (score_err + 10 * u) * vmax + 2 * keys * u * vmax + half_ulp(dtype) * ref.abs() + half_tiny(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, dtype, device):
    q, k, v, pos, scale, window = inputs(case, dtype, device)
    out = torchext.cached_attention(q, k, v, pos, scale, window)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref = oracle(q, k, v, pos, scale, window)
    err = (out.double().cpu() - ref).abs()
    assert (err <= bound(q, k, v, scale, ref, dtype)).all(), f"largest error {err.max().item():.3g}"


def composition(q, k, v, pos, scale, window):
    """What cached_attention_quantize_q8_1 replaces: the attention's output as [B, T, H * D], quantized."""
    b, h, t, d = q.shape
    o = torchext.cached_attention(q, k, v, pos, scale, window)
    return torchext.quantize_q8_1(o.transpose(1, 2).reshape(b, t, h * d))


# CASES with D % 32 == 0, and H * D that leave padding blocks (192, 288 and 480 values of 256-value
# super-blocks), windows, GQA groups, several rows and sequences
Q8_1_CASES = [c for c in CASES if c[4] % 32 == 0] + [
    (2, 6, 2, 50, 32, [49, 20, 0], 0),
    (1, 3, 1, 40, 96, [39, 17], 8),
    (3, 5, 5, 300, 96, [299, 100], 64),
    (2, 15, 3, 90, 32, [89, 45, 31, 16], 20),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", Q8_1_CASES)
def test_quantize_q8_1_equals_the_two_ops(case, dtype, device):
    q, k, v, pos, scale, window = inputs(case, dtype, device)
    out = torchext.cached_attention_quantize_q8_1(q, k, v, pos, scale, window)
    expected = composition(q, k, v, pos, scale, window)
    assert out.dtype == torch.uint8 and out.device == q.device and out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_q8_1_out_of_range_position_gives_nan_blocks_on_cuda(dtype):
    """A row at a position outside the cache: quantize_q8_1's bytes for a row of NaNs (padding blocks zero)."""
    q, k, v, _, scale, window = inputs((2, 6, 2, 10, 32, [3, 4], 0), dtype, "cuda")
    pos = torch.tensor([3, 10], device="cuda")
    out = torchext.cached_attention_quantize_q8_1(q, k, v, pos, scale, window)
    assert torch.equal(out, composition(q, k, v, pos, scale, window))
    nan_row = torchext.quantize_q8_1(torch.full((6 * 32,), float("nan"), dtype=dtype, device="cuda"))
    assert torch.equal(out[:, 1], nan_row.expand(2, -1))
    assert not torch.equal(out[:, 0], nan_row.expand(2, -1))


# the largest power of ten a Gaussian may be scaled by in each dtype with its scores (products of
# D such values) and outputs still finite
MAX_EXPONENT = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 8}


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_fuzz_against_oracle(data):
    """Random shapes, groupings, positions, windows and magnitudes, within the same bound."""
    dtype = data.draw(st.sampled_from(DTYPES))
    device = data.draw(st.sampled_from(DEVICES))
    kv_heads, group, batch = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 2))
    keys, dim = data.draw(st.integers(1, 130)), 8 * data.draw(st.integers(1, 32))
    positions = data.draw(st.lists(st.integers(0, keys - 1), min_size=1, max_size=4))
    window = data.draw(st.one_of(st.just(0), st.integers(1, keys + 3)))
    top = MAX_EXPONENT[dtype]
    e_q, e_k, e_v = (data.draw(st.integers(-top, top)) for _ in range(3))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    shape = (batch, kv_heads, keys, dim)
    q = (torch.randn(batch, kv_heads * group, len(positions), dim, generator=g) * 10.0**e_q).to(dtype)
    k = (torch.randn(shape, generator=g) * 10.0**e_k).to(dtype)
    v = (torch.randn(shape, generator=g) * 10.0**e_v).to(dtype)
    pos = torch.tensor(positions, dtype=torch.int64)
    scale = 1.0 / math.sqrt(dim)
    q, k, v, pos = (t.to(device) for t in (q, k, v, pos))
    ref = oracle(q, k, v, pos, scale, window)
    if not torch.isfinite(ref).all():  # scores past float32's range: not this test's subject
        return
    out = torchext.cached_attention(q, k, v, pos, scale, window)
    err = (out.double().cpu() - ref).abs()
    assert (err <= bound(q, k, v, scale, ref, dtype)).all(), f"largest error {err.max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_keys_past_the_position_are_never_read(device):
    """Keys after a row's position (and before its window) may hold anything, NaN included."""
    q, k, v, pos, scale, _ = inputs((1, 4, 1, 100, 64, [40], 0), torch.float32, device)
    ref = torchext.cached_attention(q, k, v, pos, scale, 16)
    for t in (k, v):
        t[:, :, 41:] = float("nan")
        t[:, :, :25] = float("inf")
    torch.testing.assert_close(torchext.cached_attention(q, k, v, pos, scale, 16), ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_query_gives_nan_row_only(device):
    q, k, v, pos, scale, window = inputs((1, 4, 1, 50, 64, [30, 49], 0), torch.float32, device)
    q[0, 1, 0, 5] = float("nan")
    out = torchext.cached_attention(q, k, v, pos, scale, window)
    assert out[0, 1, 0].isnan().all()
    out[0, 1, 0] = 0
    assert out.isfinite().all()


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_position_out_of_range_raises_on_cpu(op):
    q, k, v, pos, scale, window = inputs((1, 4, 1, 10, 64, [3], 0), torch.float32, "cpu")
    for bad in (10, -1):
        with pytest.raises(RuntimeError, match=rf"pos: expected positions in \[0, keys=10\), got {bad} at index 0"):
            op(q, k, v, torch.tensor([bad]), scale, window)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_position_out_of_range_gives_nan_row_on_cuda():
    q, k, v, _, scale, window = inputs((1, 4, 1, 10, 64, [3, 4], 0), torch.float32, "cuda")
    out = torchext.cached_attention(q, k, v, torch.tensor([3, 10], device="cuda"), scale, window)
    assert out[:, :, 1].isnan().all() and out[:, :, 0].isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_cuda_graph_replays_with_new_positions(op):
    """One capture serves every position: the positions are read on the device."""
    q, k, v, pos, scale, window = inputs((1, 4, 1, 300, 256, [10], 0), torch.bfloat16, "cuda")
    op(q, k, v, pos, scale, window)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(q, k, v, pos, scale, window)
    for p in (10, 64, 299, 0):
        pos.fill_(p)
        graph.replay()
        torch.testing.assert_close(out, op(q, k, v, pos, scale, window), rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_compile_fullgraph(op):
    q, k, v, pos, scale, window = inputs((1, 4, 1, 37, 256, [20], 0), torch.float32, "cpu")
    fn = torch.compile(lambda *a: op(*a).flip(-1), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v, pos, scale, window), op(q, k, v, pos, scale, window).flip(-1), rtol=0,
                               atol=0)


def test_cpu_threads_give_the_same_bits():
    """The CPU kernel spreads its rows over torch's threads; each row's arithmetic is the same on any."""
    args = inputs((2, 8, 2, 129, 64, [128, 3], 0), torch.bfloat16, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torchext.cached_attention(*args)
        torch.set_num_threads(max(2, threads))
        torch.testing.assert_close(torchext.cached_attention(*args), one, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_empty_rows():
    q, k, v, _, scale, window = inputs((1, 4, 1, 10, 64, [], 0), torch.float32, "cpu")
    pos = torch.zeros(0, dtype=torch.int64)
    assert torchext.cached_attention(q, k, v, pos, scale, window).shape == (1, 4, 0, 64)
    assert torchext.cached_attention_quantize_q8_1(q, k, v, pos, scale, window).shape == (1, 0, 288)


# (what to change, the message): every check, on the real op and on meta tensors (the fake)
def _bad_inputs():
    def base():
        q, k, v, pos, scale, window = inputs((1, 4, 2, 16, 64, [3], 0), torch.float32, "cpu")
        return dict(q=q, k_cache=k, v_cache=v, pos=pos, scale=scale, window=window)

    cases = []

    def case(message, **change):
        a = base()
        a.update({key: f(a) if callable(f) else f for key, f in change.items()})
        cases.append(pytest.param(a, message, id=message[:40]))

    case("q: expected a contiguous tensor", q=lambda a: a["q"][..., ::2])
    case("q: expected a float32, float16 or bfloat16 tensor, got int64", q=lambda a: a["q"].long())
    case("q: expected \\[batch, heads, rows, dim\\], got 3 dimensions", q=lambda a: a["q"][0])
    case("k_cache: expected \\[batch, kv_heads, keys, dim\\], got 3 dimensions", k_cache=lambda a: a["k_cache"][0])
    case("v_cache: expected the shape of k_cache", v_cache=lambda a: a["v_cache"][:, :, :8].contiguous())
    case("k_cache: expected the dtype of q \\(float32\\), got float16", k_cache=lambda a: a["k_cache"].half(),
         v_cache=lambda a: a["v_cache"].half())
    case("k_cache: expected \\[1, kv_heads, keys, 64\\]", k_cache=lambda a: a["k_cache"][..., :32].contiguous(),
         v_cache=lambda a: a["v_cache"][..., :32].contiguous())
    case("k_cache: expected kv_heads dividing q's 4 heads, got 3", k_cache=lambda a: torch.zeros(1, 3, 16, 64),
         v_cache=lambda a: torch.zeros(1, 3, 16, 64))
    case("k_cache: expected at least one key position", k_cache=lambda a: torch.zeros(1, 2, 0, 64),
         v_cache=lambda a: torch.zeros(1, 2, 0, 64))
    case("q: expected a head dim that is a multiple of 8 up to 256, got 12", q=lambda a: torch.zeros(1, 4, 1, 12),
         k_cache=lambda a: torch.zeros(1, 2, 16, 12), v_cache=lambda a: torch.zeros(1, 2, 16, 12))
    case("q: expected a head dim that is a multiple of 8 up to 256, got 264", q=lambda a: torch.zeros(1, 4, 1, 264),
         k_cache=lambda a: torch.zeros(1, 2, 16, 264), v_cache=lambda a: torch.zeros(1, 2, 16, 264))
    case("pos: expected an int64 tensor of q's 1 rows' positions, got int32 \\[1\\]", pos=lambda a: a["pos"].int())
    case("pos: expected an int64 tensor of q's 1 rows' positions, got int64 \\[2\\]", pos=torch.tensor([1, 2]))
    case("window: expected 0 \\(every earlier key\\) or a positive number of positions, got -1", window=-1)
    case("scale: expected a finite number within float32's range, got inf", scale=float("inf"))
    case("scale: expected a finite number within float32's range, got -1e\\+39", scale=-1e39)  # inf as a float
    return cases


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("args, message", _bad_inputs())
@pytest.mark.parametrize("name", ["cached_attention", "cached_attention_quantize_q8_1"])
def test_bad_input(name, args, message, meta):
    raises_on_cpu_and_meta(getattr(torch.ops.torchext, name), args, message, meta)


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("dim", [8, 40, 200])
def test_quantize_q8_1_needs_head_dim_multiple_of_32(dim, meta):
    q, k, v, pos, scale, window = inputs((1, 4, 2, 16, dim, [3], 0), torch.float32, "cpu")
    raises_on_cpu_and_meta(torch.ops.torchext.cached_attention_quantize_q8_1,
                           dict(q=q, k_cache=k, v_cache=v, pos=pos, scale=scale, window=window),
                           "q: expected a head dim that is a multiple of 32 for cached_attention_quantize_q8_1 "
                           rf"\(each Q8_1 block of 32 values inside one head\), got {dim}", meta)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache"])
def test_misaligned_storage_raises(name, op):
    """The CUDA kernels read rows 16 bytes at a time; a view 4 bytes into an allocation is refused
    (on every device, so that code moving to the GPU fails the same way)."""
    q, k, v, pos, scale, window = inputs((1, 4, 2, 16, 64, [3], 0), torch.float32, "cpu")
    args = dict(q=q, k_cache=k, v_cache=v)
    t = args[name]
    args[name] = torch.empty(t.numel() + 1)[1:].view(t.shape).copy_(t)
    with pytest.raises(RuntimeError, match=f"{name}: storage must be 16-byte aligned"):
        op(args["q"], args["k_cache"], args["v_cache"], pos, scale, window)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_devices_differ(op):
    q, k, v, pos, scale, window = inputs((1, 4, 2, 16, 64, [3], 0), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="q and pos: expected tensors on the same device"):
        op(q, k, v, pos.to("meta"), scale, window)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_cuda_no_host_sync_and_current_stream(op):
    """No synchronising call (the positions stay on the device), and the kernels run on the current
    stream: a side stream's result is right while the default stream is still busy."""
    q, k, v, pos, scale, window = inputs((2, 8, 2, 300, 128, [299, 17], 64), torch.float16, "cuda")
    expected = op(q, k, v, pos, scale, window)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        op(q, k, v, pos, scale, window)  # the allocator's blocks for s
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(100_000_000)  # keeps the default stream busy
        with torch.cuda.stream(s):
            out = op(q, k, v, pos, scale, window)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with torch.cuda.stream(s):
        host = out.to("cpu")
    assert not torch.cuda.default_stream().query(), "the default stream finished early"
    torch.cuda.synchronize()
    torch.testing.assert_close(host, expected.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", [torchext.cached_attention, torchext.cached_attention_quantize_q8_1],
                         ids=["attention", "quantize_q8_1"])
def test_wrappers_take_scale_as_a_number_and_window_as_a_whole_number(wrapper):
    """scale=True ran as 1.0 and window=True as a window of one key (the dispatcher takes a bool as a number),
    a tensor scale as its value: each is a TypeError naming the argument, as eps's is."""
    q, k, v, pos, scale, window = inputs((1, 4, 2, 16, 64, [3], 0), torch.float32, "cpu")
    for bad, name in ((True, "bool"), (torch.tensor(0.125), "Tensor"), ("0.125", "str")):
        with pytest.raises(TypeError, match=f"^scale: expected a number, got {name}$"):
            wrapper(q, k, v, pos, bad, window)
    for bad, name in ((True, "bool"), (2.0, "float")):
        with pytest.raises(TypeError, match=f"^window: expected a whole number, got {name}$"):
            wrapper(q, k, v, pos, scale, bad)
    wrapper(q, k, v, pos, 1, 8)  # an int scale is a number
