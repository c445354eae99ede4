"""torch.library.opcheck for every op, and every fake (register_fake in torchext/ops.py)
against the real kernel.

opcheck runs, per sample: test_schema (the op mutates exactly what its schema says: nothing,
or x for gelu_), test_autograd_registration, test_faketensor (the fake agrees with the real
op under FakeTensorMode) and test_aot_dispatch_dynamic (the op traces through AOTAutograd with
symbolic shapes, as torch.compile does it).

test_fake_matches_real does the FakeTensorMode comparison by hand for every op and dtype,
checking shape, dtype, device and strides (a fake that hard-codes a dtype makes bf16 graphs
trace wrong, as vLLM's GGUF fake once did, and one with wrong strides makes inductor read the
output wrongly).
test_opcheck_with_inputs_that_require_grad runs opcheck with the autograd kernels in play.
tests/test_fakes.py checks that the fakes reject what the kernels reject.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import torchext  # noqa: F401
from conftest import DEVICES, DTYPES, random_weight, sample_inputs
from test_fused import EPS, _norm_weight

ops = torch.ops.torchext
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, TQ1_0, MXFP4, NVFP4 = 2, 3, 6, 7, 8, 12, 13, 14, 34, 39, 40

OPS = ["quantize_q8_1", "rms_norm_quantize_q8_1", "add_rms_norm_quantize_q8_1", "gated_gelu_quantize_q8_1",
       "gated_silu_quantize_q8_1", "q4k_q8_gemv", "q4k_q8_gemv_packed", "q4k_gemv", "q5k_gemv", "q6k_gemv", "qmatmul",
       "qmatmul_q8_1", "gated_gelu_qmatmul", "gated_silu_qmatmul", "qmatmul_id", "dequantize", "gelu", "gelu_",
       "bias_gelu", "quantize", "cached_attention", "cached_attention_quantize_q8_1", "rope_cache_write"]


def _randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def op_samples(name: str, device, dtype):
    """[(args, kwargs)] for op `name`: small, representative inputs of the given dtype
    (for the Q8_1 ops, the dtype of the activations that were quantized)."""
    dev = torch.device(device)
    # one row, K neither a multiple of 32 nor of 256 with two leading dims, a 1-d row of 7, no rows
    row_shapes = [(1, 256), (2, 3, 300), (7,), (0, 64)]
    if name == "quantize_q8_1":
        return [((_randn(s, dtype, dev, i),), {}) for i, s in enumerate(row_shapes)]
    if name in ("rms_norm_quantize_q8_1", "add_rms_norm_quantize_q8_1"):
        # norm weights in float32 and in x's dtype; the residual add with and without the post-norm weight
        out = []
        for i, shape in enumerate(row_shapes):
            k, x = shape[-1], _randn(shape, dtype, dev, i)
            for w_dtype in {torch.float32, dtype}:
                weight = _norm_weight(k, w_dtype, i).to(dev)
                if name == "rms_norm_quantize_q8_1":
                    out.append(((x, weight, EPS), {}))
                else:
                    residual = _randn(shape, dtype, dev, i + 10)
                    out += [((x, residual, weight, EPS), {}),
                            ((x, residual, weight, EPS), {"x_weight": _norm_weight(k, w_dtype, i + 20).to(dev)})]
        return out
    if name in ("gated_gelu_quantize_q8_1", "gated_silu_quantize_q8_1"):
        # GELU: both forms and the default; SiLU takes no activation argument
        forms = [("tanh",), ("none",), ()] if name == "gated_gelu_quantize_q8_1" else [()]
        out = []
        for i, shape in enumerate(row_shapes):
            gate, up = _randn(shape, dtype, dev, i), _randn(shape, dtype, dev, i + 10)
            out += [((gate, up, *a), {}) for a in forms]
        return out
    if name in ("q4k_q8_gemv", "q4k_q8_gemv_packed"):
        out = []
        for i, (n, k, shape) in enumerate([(5, 256, (1, 256)), (3, 300, (2, 3, 300)), (4, 512, (9, 512))]):
            xq = ops.quantize_q8_1(_randn(shape, dtype, dev, i))
            out.append(((random_weight(Q4_K, n, k, dev, seed=i), xq, n, k), {}))
        return out
    if name == "qmatmul_q8_1":
        cases = [(Q8_0, 5, 256, (1, 256), dtype), (Q6_K, 3, 300, (2, 3, 300), None), (Q5_0, 4, 64, (8, 64), dtype)]
        return [((random_weight(q, n, k, dev, seed=i), q, ops.quantize_q8_1(_randn(shape, dtype, dev, i)), n, k),
                 {} if out is None else {"dtype": out}) for i, (q, n, k, shape, out) in enumerate(cases)]
    if name in ("gated_gelu_qmatmul", "gated_silu_qmatmul"):
        # 1 row (on CUDA the GEMV computes the Q8_1 rows itself), 6 rows in 2 x 3, 9 rows (the two ops in
        # turn), no rows; both GELU forms and the default, SiLU
        forms = [("tanh",), ("none",), ()] if name == "gated_gelu_qmatmul" else [()]
        cases = [(Q4_K, (1,), 256), (Q5_0, (2, 3), 96), (Q8_0, (9,), 64), (Q6_K, (0,), 256)]
        out = []
        for i, (q, lead, k) in enumerate(cases):
            w, gate, up = random_weight(q, 24, k, dev, seed=i), _randn((*lead, k), dtype, dev, i), _randn(
                (*lead, k), dtype, dev, i + 10)
            out += [((w, q, gate, up, 24, k, *a), {}) for a in forms]
        return out
    if name in ("q4k_gemv", "q5k_gemv", "q6k_gemv"):
        qtype = {"q4k_gemv": Q4_K, "q5k_gemv": Q5_K, "q6k_gemv": Q6_K}[name]
        cases = [(5, 256, (1, 256)), (3, 300, (2, 3, 300)), (4, 512, (9, 512))]
        return [((random_weight(qtype, n, k, dev, seed=i), _randn(shape, dtype, dev, i), n, k), {})
                for i, (n, k, shape) in enumerate(cases)]
    if name == "qmatmul":
        samples = list(sample_inputs(dev, dtype))
        # and exact=True (never the Q8_1 GEMV) on the first few
        return [((s.w, s.qtype, s.x, s.n, s.k), {}) for s in samples] + [
            ((s.w, s.qtype, s.x, s.n, s.k), {"exact": True}) for s in samples[:4]]
    if name == "qmatmul_id":
        # (format, experts, n, k, tokens, top_k, x per slot, ids dtype, exact): the GEMV path (up to 16
        # tokens), the unrounded one (17), x [T, top_k, k], int32 ids, exact
        cases = [(Q4_K, 4, 5, 256, 1, 2, False, torch.int64, False), (Q8_0, 3, 4, 64, 3, 2, True, torch.int32, False),
                 (Q6_K, 5, 3, 300, 17, 3, False, torch.int64, False), (Q5_0, 2, 6, 64, 2, 1, False, torch.int64, True)]
        out = []
        for i, (q, e, n, k, t, top_k, per_slot, ids_dtype, exact) in enumerate(cases):
            w = torch.stack([random_weight(q, n, k, dev, seed=10 * i + j) for j in range(e)])
            x = _randn((t, top_k, k) if per_slot else (t, k), dtype, dev, i)
            ids = torch.randint(0, e, (t, top_k), generator=torch.Generator().manual_seed(i)).to(ids_dtype).to(dev)
            out.append(((w, q, x, ids, n, k), {"exact": exact}))
        return out
    if name == "dequantize":
        cases = [(Q4_K, 3, 300), (Q5_K, 2, 256), (Q6_K, 2, 512), (Q8_0, 3, 64), (Q4_0, 2, 96), (Q4_1, 2, 32),
                 (Q5_0, 2, 64), (Q5_1, 3, 32), (TQ1_0, 2, 300), (MXFP4, 3, 32), (NVFP4, 2, 128)]
        out = [((random_weight(q, n, k, dev, seed=i), q, n, k), {"dtype": dtype}) for i, (q, n, k) in enumerate(cases)]
        if dtype == torch.float32:  # dtype=None means float32
            out.append(((random_weight(Q6_K, 2, 256, dev, seed=9), Q6_K, 2, 256), {}))
        return out
    if name in ("gelu", "gelu_"):
        return [((_randn(s, dtype, dev, i), a), {}) for i, s in enumerate([(3, 37), (2, 3, 8), (0, 4)])
                for a in ("none", "tanh")] + [((_randn((5,), dtype, dev, 9),), {})]
    if name == "bias_gelu":
        return [((_randn(s, dtype, dev, i), _randn(s[-1:], dtype, dev, i + 10), a), {})
                for i, s in enumerate([(3, 37), (2, 3, 8), (0, 4), (16,)]) for a in ("none", "tanh")]
    if name in ("cached_attention", "cached_attention_quantize_q8_1"):
        # ((batch, heads, kv_heads, keys, dim), positions, window); the Q8_1 output needs dim % 32 == 0, and
        # 6 x 32 values leave padding blocks
        cases = [((1, 4, 1, 37, 256), [20], 0), ((2, 8, 2, 70, 64), [69, 5], 32),
                 ((1, 2, 2, 4, 8) if name == "cached_attention" else (2, 6, 3, 9, 32), [], 0),
                 ((2, 6, 3, 9, 32), [8, 0, 4], 3)]
        return [((_randn((b, h, len(p), d), dtype, dev, i), _randn((b, kv, s, d), dtype, dev, i + 10),
                  _randn((b, kv, s, d), dtype, dev, i + 20), torch.tensor(p, dtype=torch.int64, device=dev),
                  d**-0.5, window), {})
                for i, ((b, h, kv, s, d), p, window) in enumerate(cases)]
    if name == "rope_cache_write":
        # (batch, rows, heads, kv_heads, dim, keys), positions, with the per-head norm
        cases = [((1, 1, 4, 1, 256, 40), [17], True), ((2, 3, 4, 2, 64, 16), [5, 0, 15], False),
                 ((1, 0, 2, 1, 8, 4), [], True)]
        samples = []
        for i, ((b, t, h, kv, d, s), p, norm) in enumerate(cases):
            proj = _randn((b, t, (h + 2 * kv) * d), dtype, dev, i)  # q, k, v as views of one projection
            q, k, v = (x.view(b, t, n, d) for x, n in zip(proj.split([h * d, kv * d, kv * d], dim=-1), (h, kv, kv)))
            angles = _randn((s, d), torch.float32, dev, i + 10)  # the rotary tables, a row a cache position
            weights = (_randn((d,), torch.float32, dev, i + 20), _randn((d,), dtype, dev, i + 30)) if norm else ()
            samples.append(((q, k, v, angles.cos(), angles.sin(), torch.tensor(p, dtype=torch.int64, device=dev),
                             _randn((b, kv, s, d), dtype, dev, i + 40), _randn((b, kv, s, d), dtype, dev, i + 50),
                             *weights), {}))
        return samples
    if name == "quantize":
        if dev.type != "cpu" or dtype != torch.float32:
            pytest.skip("quantize runs on float32 CPU tensors only")
        return [((_randn((n, k), torch.float32, dev, i), q), {})
                for i, (q, n, k) in enumerate([(Q4_K, 2, 256), (Q6_K, 3, 300), (Q8_0, 2, 64), (TQ1_0, 2, 300),
                                               (MXFP4, 3, 96)])]
    raise AssertionError(name)


def _skip_if_unimplemented(name, args, kwargs):
    if name == "quantize":
        try:
            ops.quantize(*args, **kwargs)
        except RuntimeError as e:
            if "not yet implemented" in str(e):
                pytest.skip("torchext::quantize is not implemented yet")
            raise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(device, dtype, name):
    samples = op_samples(name, device, dtype)
    assert samples
    _skip_if_unimplemented(name, *samples[0])
    op = getattr(ops, name)
    for args, kwargs in samples:
        torch.library.opcheck(op, args, kwargs)


def _as_tensors(out):
    """The tensor outputs of an op as a list (an op returns a Tensor, or nothing)."""
    if out is None:
        return []
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_fake_matches_real(device, dtype, name):
    samples = op_samples(name, device, dtype)
    _skip_if_unimplemented(name, *samples[0])
    op = getattr(ops, name)
    for args, kwargs in samples:
        # the real op on a copy (gelu_ mutates its argument)
        real_args = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)
        real = _as_tensors(op(*real_args, **kwargs))
        with FakeTensorMode() as mode:
            fake_args, fake_kwargs = tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a,
                                              (args, kwargs))
            fake = _as_tensors(op(*fake_args, **fake_kwargs))
        if name == "gelu_":  # compare the mutated argument (and the return value, if any)
            real, fake = real + [real_args[0]], fake + [fake_args[0]]
        assert len(fake) == len(real)
        for r, f in zip(real, fake):
            desc = f"{name} on {[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}, {kwargs}"
            assert f.shape == r.shape, desc
            assert f.dtype == r.dtype, desc
            assert f.device == r.device, desc
            if r.numel() > 1:
                assert f.stride() == r.stride(), desc


@pytest.mark.parametrize("device", DEVICES)
def test_fake_output_dtypes_are_not_hardcoded(device):
    # The dtype contract the fakes must encode: matmul outputs follow x, Q8_1 GEMV outputs are
    # float32, quantize_q8_1 gives uint8, dequantize follows its dtype argument.
    w = random_weight(Q4_K, 4, 256, device)
    with FakeTensorMode() as mode:
        fw = mode.from_tensor(w)
        for dtype in DTYPES:
            fx = mode.from_tensor(torch.zeros(2, 256, dtype=dtype, device=device))
            assert ops.qmatmul(fw, Q4_K, fx, 4, 256).dtype == dtype
            assert ops.q6k_gemv(mode.from_tensor(random_weight(Q6_K, 4, 256, device)), fx, 4, 256).dtype == dtype
            xq = ops.quantize_q8_1(fx)
            assert xq.dtype == torch.uint8 and xq.shape == (2, 288)
            assert ops.q4k_q8_gemv(fw, xq, 4, 256).dtype == torch.float32
            assert ops.dequantize(fw, Q4_K, 4, 256, dtype).dtype == dtype
            assert ops.gelu(fx, "none").dtype == dtype
            assert ops.bias_gelu(fx, mode.from_tensor(torch.zeros(256, dtype=dtype, device=device)), "tanh").dtype == dtype
        assert ops.dequantize(fw, Q4_K, 4, 256, None).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qmatmul", "qmatmul_id", "q6k_gemv", "gelu", "gelu_", "bias_gelu",
                                  "gated_gelu_qmatmul", "gated_silu_qmatmul"])
def test_opcheck_with_inputs_that_require_grad(device, name):
    # the autograd kernels (register_autograd, and gelu_'s own) under opcheck: the activations
    # (and the bias) require grad, and are non-leaves so that gelu_ may overwrite them
    def requiring_grad(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().requires_grad_() * 1
        return a

    for args, kwargs in op_samples(name, device, torch.float32):
        torch.library.opcheck(getattr(ops, name), tree_map(requiring_grad, args), kwargs)
