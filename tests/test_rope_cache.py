"""torchext.rope_cache_write against a float64 oracle (per-head RMSNorm rounded to the dtype, then the
rotation in rotate_half's order), on the CPU and on CUDA where there is a GPU.

Tolerance, from the kernels' arithmetic: the norm's factor 1/sqrt(mean(x^2) + eps) is computed in
fp32 from a sum of D squares, relatively off by at most (D + 8) * 2^-24; the normed value x * factor *
w is then rounded to the dtype, so near a rounding boundary it can land one ulp (twice the half ulp)
away from the oracle's. The rotation lo * cos - hi * sin is two fp32 products and a sum (3 * 2^-24 of
the terms' magnitudes) and its rounding to the dtype adds half an ulp of the result (below the
normal range, half the subnormals' spacing, for both roundings). v is copied
bit for bit, and the cache rows at other positions are left alone.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torchext
from conftest import half_tiny, half_ulp, raises_on_cpu_and_meta

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U = 2.0**-24

# (batch, rows, heads, kv_heads, dim, keys, positions)
CASES = [
    (1, 1, 4, 1, 256, 40, [17]),         # Gemma 3 270M's decode step
    (2, 3, 8, 2, 64, 16, [5, 0, 15]),    # two sequences, three rows, the first and last cache rows
    (1, 2, 2, 2, 2, 4, [3, 1]),          # the smallest even dim
    (1, 1, 3, 1, 40, 8, [2]),            # a dim that is not a multiple of the warp's 32 pairs
]


def rope_tables(positions, dim, seed):
    """cos, sin [positions, dim]: random angles, halves repeated as a model's rotary tables are."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(positions, dim // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def inputs(case, dtype, device, norm, seed=0, scale=1.0):
    """q, k, v as views of one stacked projection [B, T, (H + 2 KV) * D], as a fused q/k/v GEMV gives them."""
    batch, rows, heads, kv_heads, dim, keys, positions = case
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(batch, rows, (heads + 2 * kv_heads) * dim, generator=g) * scale).to(dtype).to(device)
    q, k, v = proj.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.view(batch, rows, h, dim) for t, h in ((q, heads), (k, kv_heads), (v, kv_heads)))
    cos, sin = (t.to(device) for t in rope_tables(keys + 3, dim, seed))  # longer than the cache is fine
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    k_cache = torch.randn(batch, kv_heads, keys, dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(batch, kv_heads, keys, dim, generator=g).to(dtype).to(device)
    weights = [None, None]
    if norm:
        weights = [(1.0 + 0.5 * torch.randn(dim, generator=g)).to(device) for _ in range(2)]
    return q, k, v, cos, sin, pos, k_cache, v_cache, weights[0], weights[1]


def oracle_heads(x, w, cos, sin, eps):
    """(heads x [B, T, h, D] normed by w and rotated by the table rows cos, sin [T, D], in float64; the
    bound on each element's error)."""
    x64 = x.double().cpu()
    err = torch.zeros_like(x64)
    if w is not None:
        dim = x.shape[-1]
        factor = 1.0 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        exact = x64 * factor * w.double().cpu()
        x64 = exact.to(x.dtype).double()  # the normed head is a tensor of x's dtype
        err = (2 * half_ulp(x.dtype) + (dim + 8) * U) * exact.abs() + 2 * half_tiny(x.dtype)
    half = x.shape[-1] // 2
    c, s = cos.double().cpu()[None, :, None, :], sin.double().cpu()[None, :, None, :]
    rot = torch.cat([-x64[..., half:], x64[..., :half]], dim=-1)
    rot_err = torch.cat([err[..., half:], err[..., :half]], dim=-1)
    out = x64 * c + rot * s
    terms = (x64 * c).abs() + (rot * s).abs()
    bound = err * c.abs() + rot_err * s.abs() + 3 * U * terms + half_ulp(x.dtype) * out.abs() + half_tiny(x.dtype)
    return out, bound


def check(q, k, v, cos, sin, pos, k_cache, v_cache, qw, kw, eps=1e-6):
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torchext.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, qw, kw, eps)
    b, t, h, d = q.shape
    assert out.shape == (b, h, t, d) and out.dtype == q.dtype and out.device == q.device
    p = pos.cpu()
    q_ref, q_bound = oracle_heads(q, qw, cos.cpu()[p], sin.cpu()[p], eps)
    err = (out.double().cpu() - q_ref.permute(0, 2, 1, 3)).abs()
    assert (err <= q_bound.permute(0, 2, 1, 3)).all(), f"q: largest error {err.max().item():.3g}"
    k_ref, k_bound = oracle_heads(k, kw, cos.cpu()[p], sin.cpu()[p], eps)
    got_k = k_cache.cpu()[:, :, p].double()  # [B, KV, T, D]
    err = (got_k - k_ref.permute(0, 2, 1, 3)).abs()
    assert (err <= k_bound.permute(0, 2, 1, 3)).all(), f"k: largest error {err.max().item():.3g}"
    v_bits = v.cpu().permute(0, 2, 1, 3).contiguous().view(torch.uint8)
    assert torch.equal(v_cache.cpu()[:, :, p].contiguous().view(torch.uint8), v_bits)
    others = torch.ones(k_cache.shape[2], dtype=torch.bool)
    others[p] = False
    assert torch.equal(k_cache.cpu()[:, :, others], k_before.cpu()[:, :, others])
    assert torch.equal(v_cache.cpu()[:, :, others], v_before.cpu()[:, :, others])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "norm+rope"])
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, norm, dtype, device):
    check(*inputs(case, dtype, device, norm))


@pytest.mark.parametrize("device", DEVICES)
def test_weights_of_the_activations_dtype(device):
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[0], torch.bfloat16, device, True)
    check(q, k, v, cos, sin, pos, kc, vc, qw.bfloat16(), kw.bfloat16())


@pytest.mark.parametrize("device", DEVICES)
def test_contiguous_inputs(device):
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[1], torch.float16, device, True)
    check(q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, pos, kc, vc, qw, kw)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_against_oracle(data):
    """Random shapes, positions, magnitudes and eps, within the same bound."""
    dtype = data.draw(st.sampled_from(DTYPES))
    device = data.draw(st.sampled_from(DEVICES))
    batch, rows = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    heads, kv_heads, dim = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3)), 2 * data.draw(st.integers(1, 80))
    keys = data.draw(st.integers(rows, rows + 20))
    positions = data.draw(st.lists(st.integers(0, keys - 1), min_size=rows, max_size=rows, unique=True))
    scale = 10.0 ** data.draw(st.integers(-3, 2 if dtype == torch.float16 else 4))
    norm = data.draw(st.booleans())
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.0]))
    case = (batch, rows, heads, kv_heads, dim, keys, positions)
    check(*inputs(case, dtype, device, norm, seed=data.draw(st.integers(0, 2**31)), scale=scale), eps=eps)


def test_position_out_of_range_raises_on_cpu():
    args = list(inputs(CASES[1], torch.float32, "cpu", False))
    args[5] = torch.tensor([5, 16, 0])
    with pytest.raises(RuntimeError, match=r"pos: expected positions in \[0, keys=16\), got 16 at index 1"):
        torchext.rope_cache_write(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_position_out_of_range_on_cuda_gives_a_nan_row_and_leaves_the_caches():
    """Rows 0 and 2 are out of range (16 has a table row, but no cache row); row 1 is done as usual."""
    q, k, v, cos, sin, _, kc, vc, qw, kw = inputs(CASES[1], torch.float32, "cuda", True)
    k_before, v_before = kc.clone(), vc.clone()
    pos = torch.tensor([-1, 7, 16], device="cuda")
    out = torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc, qw, kw)
    assert out[:, :, 0].isnan().all() and out[:, :, 2].isnan().all()
    q_ref, q_bound = oracle_heads(q[:, 1:2], qw, cos.cpu()[7:8], sin.cpu()[7:8], 1e-6)
    assert ((out[:, :, 1:2].double().cpu() - q_ref.permute(0, 2, 1, 3)).abs() <= q_bound.permute(0, 2, 1, 3)).all()
    others = torch.arange(16, device="cuda") != 7
    assert torch.equal(kc[:, :, others], k_before[:, :, others])
    assert torch.equal(vc[:, :, others], v_before[:, :, others])
    assert torch.equal(vc[:, :, 7], v[:, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replays_with_new_positions():
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[0], torch.bfloat16, "cuda", True)
    torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc, qw, kw)  # warm-up off the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc, qw, kw)
    for p in (3, 39, 0):
        pos.fill_(p)
        kc_before = kc.clone()
        graph.replay()
        torch.cuda.synchronize()
        fresh = kc_before.clone()
        expected = torchext.rope_cache_write(q, k, v, cos, sin, pos, fresh, vc.clone(), qw, kw)
        assert torch.equal(out, expected) and torch.equal(kc, fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_no_host_sync_and_current_stream():
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[1], torch.float16, "cuda", True)
    expected = torchext.rope_cache_write(q, k, v, cos, sin, pos, kc.clone(), vc.clone(), qw, kw)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torchext.rope_cache_write(q, k, v, cos, sin, pos, kc.clone(), vc.clone(), qw, kw)  # the allocator's blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(100_000_000)  # keeps the default stream busy
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.default_stream())
            out = torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc, qw, kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_compile_fullgraph_writes_the_caches():
    """Under torch.compile the caches, declared mutated in the schema, are written in place."""
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[1], torch.float32, "cpu", True)
    k_eager, v_eager = kc.clone(), vc.clone()
    expected = torchext.rope_cache_write(q, k, v, cos, sin, pos, k_eager, v_eager, qw, kw)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, cos, sin, pos, kc, vc):
        return torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc, qw, kw) * 1.0

    out = step(q, k, v, cos, sin, pos, kc, vc)
    assert torch.equal(out, expected) and torch.equal(kc, k_eager) and torch.equal(vc, v_eager)


def test_empty_rows():
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs((1, 0, 2, 1, 8, 4, []), torch.float32, "cpu", False)
    kc_before = kc.clone()
    assert torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc).shape == (1, 2, 0, 8)
    assert torch.equal(kc, kc_before)


# (what to change, the message): every check, on the real op and on meta tensors (the fake)
def _bad_inputs():
    def base():
        q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[1], torch.float32, "cpu", True)
        return dict(q=q, k=k, v=v, cos=cos, sin=sin, pos=pos, k_cache=kc, v_cache=vc, q_weight=qw, k_weight=kw)

    cases = []

    def case(message, **change):
        a = base()
        a.update({key: f(a) if callable(f) else f for key, f in change.items()})
        cases.append(pytest.param(a, message, id=message[:40]))

    case("q: expected \\[batch, rows, heads, dim\\]", q=lambda a: a["q"][0])
    case("q: expected a float32, float16 or bfloat16 tensor, got int64", q=lambda a: a["q"].long())
    case("q: expected heads and an even head dim, got \\[2, 3, 8, 63\\]", q=lambda a: a["q"][..., :63])
    case("q: expected each row's heads and each head's values contiguous", q=lambda a: a["q"].transpose(2, 3))
    case("k: expected \\[2, 3, kv_heads, 64\\]", k=lambda a: a["k"][:1])
    case("k: expected the dtype of q \\(float32\\), got float16", k=lambda a: a["k"].half())
    case("v: expected the shape of k \\[2, 3, 2, 64\\], got \\[2, 3, 1, 64\\]", v=lambda a: a["v"][:, :, :1])
    case("k_cache: expected a contiguous tensor", k_cache=lambda a: a["k_cache"].transpose(2, 3))
    case("v_cache: expected the dtype of q \\(float32\\), got float64", v_cache=lambda a: a["v_cache"].double())
    case("k_cache: expected \\[2, 2, keys, 64\\]", k_cache=lambda a: a["k_cache"][:, :1].contiguous())
    case("v_cache: expected the shape of k_cache", v_cache=lambda a: a["v_cache"][:, :, :8].contiguous())
    case("cos: expected a float32 table \\[positions >= 16, 64\\]", cos=lambda a: a["cos"].double())
    case("sin: expected a float32 table \\[positions >= 16, 64\\] \\(a row for each cache position, q's dim\\), "
         "got float32 \\[15, 64\\]", sin=lambda a: a["sin"][:15].contiguous())
    case("cos: expected a float32 table \\[positions >= 16, 64\\]", cos=lambda a: a["cos"][:, :32].contiguous())
    case("pos: expected an int64 tensor of q's 3 rows' positions, got int32", pos=lambda a: a["pos"].int())
    case("q_weight: expected float32 or the dtype of q \\(float32\\), got float64",
         q_weight=lambda a: a["q_weight"].double())
    case("k_weight: expected shape \\[64\\] \\(the head dim\\), got \\[32\\]", k_weight=lambda a: a["k_weight"][:32])
    case("eps: expected a number >= 0 that float32 holds", eps=-1.0)
    return cases


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("args, message", _bad_inputs())
def test_bad_input(args, message, meta):
    raises_on_cpu_and_meta(torch.ops.torchext.rope_cache_write, args, message, meta)


def test_devices_differ():
    args = list(inputs(CASES[1], torch.float32, "cpu", False))
    args[5] = args[5].to("meta")
    with pytest.raises(RuntimeError, match="q and pos: expected tensors on the same device"):
        torch.ops.torchext.rope_cache_write(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_cuda_gives_the_cpus_bits(case, dtype):
    """The norm's sum in the same order and every product and sum rounded on its own: the same bits."""
    cpu = inputs(case, dtype, "cpu", True)
    gpu = inputs(case, dtype, "cuda", True)
    out_cpu, out_gpu = torchext.rope_cache_write(*cpu), torchext.rope_cache_write(*gpu)
    assert torch.equal(out_cpu, out_gpu.cpu()) and torch.equal(cpu[6], gpu[6].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_caches_raise(device):
    """One tensor passed as both caches (or two views that overlap): the kernel wrote v over k without a word.
    The check reads addresses, which the fake does not have: the real op raises, eagerly and when a compiled
    graph runs."""
    q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[1], torch.float32, device, True)
    with pytest.raises(RuntimeError, match="v_cache: overlaps k_cache in memory"):
        torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, kc, qw, kw)
    both = torch.zeros((2 * kc.numel() - 64,), dtype=kc.dtype, device=device)  # v_cache starts inside k_cache
    with pytest.raises(RuntimeError, match="v_cache: overlaps k_cache in memory"):
        torchext.rope_cache_write(q, k, v, cos, sin, pos, both[:kc.numel()].view(kc.shape),
                                  both[kc.numel() - 64:].view(kc.shape), qw, kw)
    both = torch.zeros((2 * kc.numel(),), dtype=kc.dtype, device=device)  # adjacent, not overlapping: fine
    torchext.rope_cache_write(q, k, v, cos, sin, pos, both[:kc.numel()].view(kc.shape),
                              both[kc.numel():].view(kc.shape), qw, kw)


def test_inference_caches_refused_outside_inference_mode():
    """Caches made under inference_mode were written by a later call outside it, where gelu_ and torch's in-place
    ops refuse an inference tensor; now rope_cache_write refuses it too, and takes it inside inference mode."""
    with torch.inference_mode():
        q, k, v, cos, sin, pos, kc, vc, qw, kw = inputs(CASES[1], torch.float32, "cpu", True)
    q, k, v, cos, sin, pos = (t.clone() for t in (q, k, v, cos, sin, pos))
    with pytest.raises(RuntimeError, match="k_cache: an in-place update of an inference tensor outside InferenceMode"):
        torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc)
    with torch.inference_mode():
        torchext.rope_cache_write(q, k, v, cos, sin, pos, kc, vc)
