"""torchext.nn's mixture-of-experts block (QuantSparseMoeBlock, TopKRouter, QuantExperts): built from a
GGUF file's *_exps tensors against a float64 oracle, against transformers' own Qwen3-MoE and
Qwen2-MoE blocks on the same (dequantized) weights, and under torch.compile and CUDA graphs.

Tolerances:
- exact=True (activations never rounded): each projection is float32 accumulation of the exact
  weights (1e-5 of |x| @ |W|.T, as test_matmul); carried through SiLU gating and the down projection
  the block's error stays within 1e-5 of the magnitudes of its terms (assert_block_close with no
  Q8_1 term).
- the default (up to the formats' GEMV tokens, torchext.ops.gemv_max_tokens, 16 for Q5_0 and Q6_K
  on the CPU: Q8_1 activations in all three projections): the gate and up outputs
  are within the Q8_1 bound of x (test_matmul.q8_1_bound); that error, through silu(g) * u (SiLU is
  1.1-Lipschitz), bounds the gated activations' error dh; the down projection adds |W_down| @ dh and
  the Q8_1 bound of the activations it actually rounded (whose block maxima are within dh of the
  oracle's). The combine weights each slot's bound by its routing score.
- against transformers' blocks and CUDA against the CPU (exact=True, routed_oracle): each side at the
  routing its own router gave (transformers' router is the same ops: the same bits), within a worst-case
  fp32 bound of the float64 oracle at that routing: each projection an fp32 sum of k exact products
  (conftest.fp32_sum_error), SiLU's and the gating product's roundings, the down projection, the
  scores' weighted sum (exact_mlp, routed_oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

import torchext
from conftest import DEVICES, capture_graph, fp32_sum_error, gaussian_activations, half_ulp, requires_cuda
from test_matmul import q8_1_bound
from torchext import WeightCache
from torchext.nn import QuantExperts, QuantSparseMoeBlock, TopKRouter

E, TOP_K, H, I = 8, 2, 256, 256  # experts, experts per token, hidden size, expert intermediate size
SILU_LIPSCHITZ = 1.1  # max |silu'| = 1.0998
U32 = half_ulp(torch.float32)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def float_experts(seed=0, experts=E, hidden=H, inter=I):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(experts, inter, hidden, generator=g) * 0.05
    up = torch.randn(experts, inter, hidden, generator=g) * 0.05
    down = torch.randn(experts, hidden, inter, generator=g) * 0.05
    router = torch.randn(experts, hidden, generator=g) * 0.1
    return router, gate, up, down


def quantized(t: torch.Tensor, qtype: str) -> np.ndarray:
    """uint8 [..., rows, row bytes] of float [..., rows, k]."""
    return torch.stack([torchext.quantize(m.contiguous(), qtype) for m in t.reshape(-1, *t.shape[-2:])]) \
        .reshape(*t.shape[:-1], -1).numpy()


# ---- the float64 oracle ------------------------------------------------------------------------------

def silu(v):
    return v / (1 + np.exp(-v))


def oracle_block(x, router, gate, up, down, top_k=TOP_K, norm=True, shared=None):
    """(y, bound_exact, bound_rounded) in float64 for x [T, H]; weights float64 as the file decodes.
    shared: (gate [Is, H], up [Is, H], down [H, Is], gate_inp [H]) of Qwen2-MoE's shared expert."""
    x = x.double().numpy()
    logits = x @ router.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1)
    ids = order[:, :top_k]
    margin = np.take_along_axis(probs, order[:, top_k - 1:top_k + 1], 1)
    assert (margin[:, 0] - margin[:, 1] > 1e-4).all(), "routing too close to a tie for this test's data"
    scores = np.take_along_axis(probs, ids, 1)
    if norm:
        scores /= scores.sum(1, keepdims=True)
    y = np.zeros_like(x)
    bound_exact, bound_rounded = np.zeros_like(x), np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = ids[t, j]
            out, b_exact, b_rounded = mlp_with_bounds(x[t:t + 1], gate[e], up[e], down[e])
            y[t] += scores[t, j] * out[0]
            bound_exact[t] += scores[t, j] * b_exact[0] + 1e-5 * np.abs(scores[t, j] * out[0])
            bound_rounded[t] += scores[t, j] * b_rounded[0] + 1e-5 * np.abs(scores[t, j] * out[0])
    if shared is not None:
        s_gate, s_up, s_down, s_inp = shared
        s_out, s_exact, s_rounded = mlp_with_bounds(x, s_gate, s_up, s_down)
        scale = 1 / (1 + np.exp(-(x @ s_inp)))[:, None]
        y += scale * s_out
        bound_exact += scale * s_exact + 1e-5 * np.abs(scale * s_out)
        bound_rounded += scale * s_rounded + 1e-5 * np.abs(scale * s_out)
    return y, ids, bound_exact, bound_rounded


def mlp_with_bounds(x, gate, up, down):
    """down(silu(gate x) * up x) and its error bounds: fp32 accumulation only, and with the Q8_1
    rounding of x and of the gated activations (module docstring)."""
    g, u = x @ gate.T, x @ up.T
    h = silu(g) * u
    out = h @ down.T
    bounds = []
    for rounded in (False, True):
        dg = 1e-5 * (np.abs(x) @ np.abs(gate).T) + (q8_1_bound(torch.from_numpy(x), gate) if rounded else 0)
        du = 1e-5 * (np.abs(x) @ np.abs(up).T) + (q8_1_bound(torch.from_numpy(x), up) if rounded else 0)
        dh = SILU_LIPSCHITZ * dg * (np.abs(u) + du) + np.abs(silu(g)) * du + 1e-6 * np.abs(h)
        b = np.abs(down) @ dh.T
        b = b.T + 1e-5 * ((np.abs(h) + dh) @ np.abs(down).T)
        if rounded:  # the Q8_1 bound of the rounded h: its blocks' maxima grow by at most max(dh)
            h_hi = np.abs(h) + dh.max(1, keepdims=True)
            b = b + q8_1_bound(torch.from_numpy(h_hi), down) * (1 + 2.0**-9)
        bounds.append(b)
    return out, bounds[0], bounds[1]


def exact_mlp(x, gate, up, down):
    """down(silu(gate x) * up x) in float64 for x [T, H] (fp32 values) and its bound for an fp32 evaluation on these
    exact weights (exact=True, or transformers' dense modules): the gate and up projections fp32 sums of H
    products (fp32_sum_error); SiLU in fp32 within 7u of its value at the projections' outputs (expf within 2
    ulp, i.e. 4u, then the add, the division and, where it is x times its sigmoid, that product; u = 2^-24),
    the product by up another u, so h within 9u of silu(g~) u~ (second-order terms too), which parts from
    silu(g) u by SILU_LIPSCHITZ dg (|u| + du) + |silu(g)| du; the down projection carries h's error through
    |W_down| and adds its own sum's."""
    g, u = x @ gate.T, x @ up.T
    h = silu(g) * u
    dg = fp32_sum_error(np.abs(x) @ np.abs(gate).T, gate.shape[1])
    du = fp32_sum_error(np.abs(x) @ np.abs(up).T, up.shape[1])
    dh = SILU_LIPSCHITZ * dg * (np.abs(u) + du) + np.abs(silu(g)) * du
    dh = dh + 9 * U32 * (np.abs(h) + dh)
    bound = dh @ np.abs(down).T + fp32_sum_error((np.abs(h) + dh) @ np.abs(down).T, down.shape[1])
    return h @ down.T, bound


def routed_oracle(x, ids, scores, gate, up, down, shared=None):
    """(y, bound) float64 [T, H]: the block's output at the routing its router gave, ids [T, top_k] and their fp32
    scores, for x [T, H], and the bound of an fp32 evaluation on exact weights. Each slot's exact_mlp bound
    times its score; the weighted sum an fp32 sum of top_k products score * output (fp32_sum_error of their
    magnitudes, the outputs' errors included). shared: Qwen2-MoE's shared expert (gate [Is, H], up [Is, H],
    down [H, Is], gate_inp [H]): its exact_mlp; its scale sigmoid(x . gate_inp) an fp32 sum of H products
    through the 1/4-Lipschitz sigmoid, which in fp32 is within 6u (expf, the add, the division; 7u with the
    second-order terms); the product by the scale and the add to the experts' sum u each."""
    x, ids, scores, gate, up, down = (np.asarray(t, dtype=np.float64) for t in (x, ids, scores, gate, up, down))
    ids = ids.astype(np.int64)
    y, err, mag = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, s in zip(ids[t], scores[t]):
            out, b = exact_mlp(x[t:t + 1], gate[e], up[e], down[e])
            y[t] += s * out[0]
            err[t] += s * b[0]
            mag[t] += s * (np.abs(out[0]) + b[0])
    err = err + fp32_sum_error(mag, ids.shape[1])
    if shared is not None:
        s_gate, s_up, s_down, s_inp = (np.asarray(t, dtype=np.float64) for t in shared)
        out, b = exact_mlp(x, s_gate, s_up, s_down)
        scale = (1 / (1 + np.exp(-(x @ s_inp))))[:, None]
        ds = fp32_sum_error(np.abs(x) @ np.abs(s_inp), x.shape[1])[:, None] / 4
        ds = ds + 7 * U32 * (scale + ds)
        s_err = ds * (np.abs(out) + b) + scale * b
        s_err = s_err + U32 * (scale * np.abs(out) + s_err)
        err = (err + s_err) * (1 + U32) + U32 * (np.abs(y) + scale * np.abs(out))
        y = y + scale * out
    return y, err


def assert_block_close(y, ref, bound, what=""):
    y64 = y.detach().double().cpu().numpy().reshape(ref.shape)
    err = np.abs(y64 - ref)
    assert np.isfinite(y64).all(), what
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"{what}: err {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst}"


# ---- a GGUF file ------------------------------------------------------------------------------------

FORMATS = ("Q4_K", "Q5_0", "Q6_K")  # gate, up, down: a Q4_K_M-like mix


def write_moe_gguf(path, shared: bool = False, seed: int = 0):
    """A one-block MoE GGUF (qwen3moe, or qwen2moe with a shared expert), written with gguf's writer;
    returns the float64 weights as gguf decodes them from the file."""
    router, gate, up, down = float_experts(seed)
    arch = "qwen2moe" if shared else "qwen3moe"
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.expert_count", E)
    writer.add_uint32(f"{arch}.expert_used_count", TOP_K)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", router.numpy())
    for name, t, q in (("gate", gate, FORMATS[0]), ("up", up, FORMATS[1]), ("down", down, FORMATS[2])):
        data = quantized(t, q)
        writer.add_tensor(f"blk.0.ffn_{name}_exps.weight", data, raw_shape=data.shape, raw_dtype=G[q])
    if shared:
        g = torch.Generator().manual_seed(seed + 1)
        for name, shape in (("gate", (128, H)), ("up", (128, H)), ("down", (H, 128))):
            data = quantized(torch.randn(*shape, generator=g) * 0.05, "Q8_0")
            writer.add_tensor(f"blk.0.ffn_{name}_shexp.weight", data, raw_shape=data.shape, raw_dtype=G.Q8_0)
        writer.add_tensor("blk.0.ffn_gate_inp_shexp.weight", (torch.randn(H, generator=g) * 0.1).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # the oracle's weights: gguf's own reading and dequantization of the file
    weights = {}
    for t in GGUFReader(str(path)).tensors:
        values = gguf_dequantize(t.data, t.tensor_type)
        k = int(t.shape[0])
        weights[t.name.split(".")[2]] = values[..., :k].astype(np.float64)
    return weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True], ids=["qwen3moe", "qwen2moe_shared_expert"])
def test_gguf_block_matches_float64_oracle(tmp_path, shared, device):
    """The block of a written GGUF loads through WeightCache (the expert tensors stay raw bytes,
    viewed, not copied, by the block) and matches the float64 oracle of gguf's own dequantization,
    exactly (exact=True) and with Q8_1 activations (the default, 5 tokens)."""
    path = tmp_path / "moe.gguf"
    wts = write_moe_gguf(path, shared)
    cache = WeightCache.from_gguf(path, device=device)
    for p, q in zip(("gate", "up", "down"), FORMATS):
        entry = cache[f"blk.0.ffn_{p}_exps.weight"]
        assert entry.qtype == torchext.QType[q] and entry.tensor.dtype == torch.uint8
    assert cache["blk.0.ffn_gate_inp.weight"].qtype is None  # the F32 router stays dense
    shared_w = None
    if shared:
        shared_w = (wts["ffn_gate_shexp"], wts["ffn_up_shexp"], wts["ffn_down_shexp"], wts["ffn_gate_inp_shexp"])
    x = gaussian_activations((5, H), seed=2)
    ref, ids, bound_exact, bound_rounded = oracle_block(x, wts["ffn_gate_inp"], wts["ffn_gate_exps"],
                                                        wts["ffn_up_exps"], wts["ffn_down_exps"],
                                                        norm=not shared, shared=shared_w)
    for exact, bound in ((True, bound_exact), (False, bound_rounded)):
        block = QuantSparseMoeBlock.from_cache(cache, "blk.0", top_k=TOP_K, norm_topk_prob=not shared, exact=exact)
        assert block.experts.gate_proj.data_ptr() == cache["blk.0.ffn_gate_exps.weight"].tensor.data_ptr()
        _, _, got_ids = block.gate(x.to(device))
        assert torch.equal(got_ids.sort(1).values.cpu(), torch.from_numpy(np.sort(ids, 1)))
        assert_block_close(block(x.to(device)), ref, bound, f"exact={exact}")
    # from_gguf: the same block, top_k from the file's metadata
    block = QuantSparseMoeBlock.from_gguf(path, 0, norm_topk_prob=not shared, device=device, exact=True)
    assert block.gate.top_k == TOP_K
    assert_block_close(block(x.to(device)), ref, bound_exact, "from_gguf")


# ---- transformers' blocks ----------------------------------------------------------------------------

def dequantized(experts: QuantExperts):
    """The experts' weights as float32 [E, n, k], as torchext.dequantize gives them (gguf's values)."""
    out = []
    for w, q, (n, k) in zip((experts.gate_proj, experts.up_proj, experts.down_proj), experts.qtypes,
                            ((experts.intermediate_size, experts.hidden_size),) * 2
                            + ((experts.hidden_size, experts.intermediate_size),)):
        out.append(torch.stack([torchext.dequantize(w[e].cpu(), q, n, k) for e in range(experts.num_experts)]))
    return out


@pytest.mark.parametrize("tokens", [3, 40])
def test_equals_transformers_qwen3_moe_block(tokens):
    """transformers' Qwen3MoeSparseMoeBlock with the dequantized weights: the same routing (bit for bit),
    and both outputs within the fp32 bound of the float64 oracle at that routing (exact=True; transformers
    adds the experts' outputs in float32 too here)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    router, gate, up, down = float_experts(1)
    block = QuantSparseMoeBlock(TopKRouter(router, TOP_K, True), QuantExperts.from_float(gate, up, down, "Q4_K",
                                                                                         exact=True))
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                         num_experts_per_tok=TOP_K, norm_topk_prob=True)
    theirs = Qwen3MoeSparseMoeBlock(config).eval()
    g, u, d = dequantized(block.experts)
    with torch.no_grad():
        theirs.gate.weight.copy_(router)
        theirs.experts.gate_up_proj.copy_(torch.cat([g, u], dim=1))
        theirs.experts.down_proj.copy_(d)
        x = gaussian_activations((2, tokens, H), seed=tokens)
        expected = theirs(x)
        got = block(x)
        routing, their_routing = block.gate(x), theirs.gate(x)
    assert got.shape == expected.shape
    assert all(torch.equal(a, b) for a, b in zip(routing, their_routing))
    ref, bound = routed_oracle(x.reshape(-1, H), routing[2], routing[1], g.double(), u.double(), d.double())
    assert_block_close(got, ref, bound, "torchext")
    assert_block_close(expected, ref, bound, "transformers")


def test_equals_transformers_qwen2_moe_block_with_shared_expert(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, shared=True)
    block = QuantSparseMoeBlock.from_gguf(path, 0, norm_topk_prob=False, exact=True)
    shared = block.shared_expert
    assert shared.gate_proj.exact and shared.down_proj.exact
    config = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=128,
                                         num_experts=E, num_experts_per_tok=TOP_K, norm_topk_prob=False)
    theirs = Qwen2MoeSparseMoeBlock(config).eval()
    g, u, d = dequantized(block.experts)
    with torch.no_grad():
        theirs.gate.weight.copy_(block.gate.proj.weight)
        theirs.experts.gate_up_proj.copy_(torch.cat([g, u], dim=1))
        theirs.experts.down_proj.copy_(d)
        for name in ("gate_proj", "up_proj", "down_proj"):
            m = getattr(shared, name)
            getattr(theirs.shared_expert, name).weight.copy_(
                torchext.dequantize(m.weight, m.qtype, m.out_features, m.in_features))
        theirs.shared_expert_gate.weight.copy_(shared.gate_weight.unsqueeze(0))
        x = gaussian_activations((1, 7, H), seed=5)
        got, expected = block(x), theirs(x)
        routing, their_routing = block.gate(x), theirs.gate(x)
        shared_w = [getattr(theirs.shared_expert, p).weight.double() for p in ("gate_proj", "up_proj", "down_proj")]
    # the same routing (bit for bit), then both within the fp32 bound of the float64 oracle there
    assert all(torch.equal(a, b) for a, b in zip(routing, their_routing))
    ref, bound = routed_oracle(x.reshape(-1, H), routing[2], routing[1], g.double(), u.double(), d.double(),
                               shared=(*shared_w, shared.gate_weight.double()))
    assert_block_close(got, ref, bound, "torchext")
    assert_block_close(expected, ref, bound, "transformers")


# ---- compile, CUDA graphs ----------------------------------------------------------------------------

def small_block(device, exact=False):
    router, gate, up, down = float_experts(3)
    experts = QuantExperts.from_float(gate, up, down, ("Q4_K", "Q8_0", "Q6_K"), exact)
    return QuantSparseMoeBlock(TopKRouter(router, TOP_K), experts).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 6, 20])
def test_block_compiles_fullgraph(tokens, device):
    """Routing (softmax, top-k: data-dependent ids) and the three qmatmul_id calls in one graph with
    no break (aot_eager: the op's fake, functionalization, AOTAutograd): the same bits as eager."""
    block = small_block(device)
    x = gaussian_activations((tokens, H), seed=tokens).to(torch.bfloat16).to(device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), block(x))
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def assert_cuda_and_cpu_blocks_close(block, block_cpu, x):
    """block (on CUDA) and block_cpu (exact=True, the same weights) on x [T, H]: each device's output within the
    fp32 bound of the float64 oracle at the routing its own router gave (routed_oracle); the two routers pick
    the same experts, as the data keeps every token's top_k-th and next logits apart by more than both
    devices' fp32 logit errors (fp32_sum_error) and the softmax's roundings (shift and expf: 8u (1 + |l|))."""
    g, u, d = (w.double() for w in dequantized(block_cpu.experts))
    x64 = x.double().numpy()
    router = block_cpu.gate.proj.weight.detach().double().numpy()
    logits = np.sort(x64 @ router.T, axis=1)[:, ::-1]
    k = block_cpu.gate.top_k
    logit_err = fp32_sum_error(np.abs(x64) @ np.abs(router).T, x.shape[1]).max(1)
    apart = 2 * logit_err + 8 * U32 * (1 + np.abs(logits).max(1))
    assert (logits[:, k - 1] - logits[:, k] > apart).all(), "routing too close to a tie for this test's data"
    ids = []
    with torch.no_grad():
        for b in (block, block_cpu):
            dev = b.gate.proj.weight.device
            _, scores, idx = b.gate(x.to(dev))
            ref, bound = routed_oracle(x, idx.cpu(), scores.cpu(), g, u, d)
            assert_block_close(b(x.to(dev)).cpu(), ref, bound, str(dev))
            ids.append(idx.sort(1).values.cpu())
    assert torch.equal(*ids)


@requires_cuda
@pytest.mark.parametrize("tokens", [1, 8, 33])
def test_block_cuda_matches_cpu_and_captures(tokens):
    block_cpu = small_block("cpu", exact=True)
    block = small_block("cuda", exact=True)
    x = gaussian_activations((tokens, H), seed=tokens)
    assert_cuda_and_cpu_blocks_close(block, block_cpu, x)
    static_x = torch.zeros(tokens, H, device="cuda")
    with torch.no_grad():
        graph, out = capture_graph(lambda: block(static_x))
    for seed in (1, 2):  # new inputs route to other experts: the graph follows
        x = gaussian_activations((tokens, H), seed=100 + seed).cuda()
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            assert torch.equal(out, block(x))


# ---- construction ----------------------------------------------------------------------------------

def test_from_cache_errors():
    cache = WeightCache()
    router, gate, up, down = float_experts()
    cache.put("blk.0.ffn_gate_inp.weight", router)
    with pytest.raises(KeyError, match="blk.0.ffn_gate_exps.weight"):
        QuantSparseMoeBlock.from_cache(cache, "blk.0", top_k=2)
    cache.put("blk.0.ffn_gate_exps.weight", torch.from_numpy(quantized(gate, "Q4_K")), "Q4_K", E * I, H)
    cache.put("blk.0.ffn_up_exps.weight", torch.from_numpy(quantized(up, "Q4_K")), "Q4_K", E * I, H)
    cache.put("blk.0.ffn_down_exps.weight", down.reshape(E * H, I))
    with pytest.raises(ValueError, match="expert weights must be quantized"):
        QuantSparseMoeBlock.from_cache(cache, "blk.0", top_k=2)
    cache.put("blk.0.ffn_down_exps.weight", torch.from_numpy(quantized(down[:, :128], "Q8_0")), "Q8_0", E * 128, I)
    with pytest.raises(ValueError, match=r"need \[\(2048, 256\), \(2048, 256\), \(2048, 256\)\]"):
        QuantSparseMoeBlock.from_cache(cache, "blk.0", top_k=2)
    for top_k in (9, 0, 2.9, None, True):  # a fraction or None is no count of experts (2.9 once became 2)
        with pytest.raises(ValueError, match=f"top_k: expected a whole number from 1 to num_experts=8, got {top_k}"):
            TopKRouter(router, top_k)


def test_router_is_transformers_router():
    """softmax in float32, top-k, renormalised: Qwen3MoeTopKRouter's outputs."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    router = float_experts()[0]
    config = transformers.Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=TOP_K, norm_topk_prob=True)
    theirs = Qwen3MoeTopKRouter(config).to(torch.bfloat16)  # a bf16 model: its weight in bf16
    with torch.no_grad():
        theirs.weight.copy_(router)
    x = gaussian_activations((9, H)).to(torch.bfloat16)
    ours = TopKRouter(router, TOP_K, True)  # a GGUF's F32 router, cast to the input's dtype
    for a, b in zip(ours(x), theirs(x)):
        assert torch.equal(a, b)


def test_state_dict_of_another_format_or_float_bytes_is_refused():
    """QuantExperts kept no format beside its bytes: Q4_0 and Q4_K rows of 256 values are both 144 bytes,
    so another quantization's state_dict loaded silently (NaN or garbage outputs), and a float tensor was
    cast to uint8. Now its state_dict carries the formats and sizes (PackedWeightState)."""
    _, gate, up, down = float_experts()
    a, b = QuantExperts.from_float(gate, up, down, "Q4_K"), QuantExperts.from_float(gate, up, down, "Q4_0")
    assert all(getattr(a, p).shape == getattr(b, p).shape for p in ("gate_proj", "up_proj", "down_proj"))
    before = a.gate_proj.clone()
    with pytest.raises(RuntimeError, match=r"weights: the state_dict holds Q4_0/Q4_0/Q4_0 bytes \(num_experts="
                                           r".*this layer is Q4_K/Q4_K/Q4_K \(num_experts="):
        a.load_state_dict(b.state_dict())
    floats = {**a.state_dict(), "up_proj": a.up_proj.float()}
    with pytest.raises(RuntimeError, match=r"up_proj: expected raw Q4_K/Q4_K/Q4_K bytes as a uint8 tensor, got "
                                           r"torch.float32; quantize float weights first \(QuantExperts.from_float\)"):
        a.load_state_dict(floats)
    assert torch.equal(a.gate_proj, before)
    c = QuantExperts.from_float(gate, up, down, "Q4_K")
    c.load_state_dict(a.state_dict())  # the same layout loads
    assert torch.equal(c.down_proj, a.down_proj)


def test_experts_over_a_pool_pickle_their_own_bytes():
    _, gate, up, down = float_experts()
    e = QuantExperts.from_float(gate, up, down, "Q8_0")
    pool = torch.zeros(1 << 22, dtype=torch.uint8)
    views, at = [], 0
    for t in (e.gate_proj, e.up_proj, e.down_proj):
        pool[at:at + t.numel()] = t.reshape(-1)
        views.append(pool[at:at + t.numel()])
        at += t.numel() + (-t.numel() % 16)
    over = QuantExperts(*views, "Q8_0", e.num_experts, e.hidden_size, e.intermediate_size)
    import pickle
    assert len(pickle.dumps(over)) < 2 * at < pool.numel()  # the experts' bytes, not the 4 MiB pool
    x, ids, w = torch.randn(3, e.hidden_size), torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.full((3, 2), 0.5)
    torch.testing.assert_close(pickle.loads(pickle.dumps(over))(x, ids, w), e(x, ids, w), rtol=0, atol=0)


def test_block_over_a_pool_saves(tmp_path):
    """The shared expert's gate weight was a float32 view of a pooled cache's uint8 bytes, beside the
    experts' uint8 views: torch.save refused the block and its state_dict."""
    import io
    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, shared=True)
    cache = WeightCache.from_gguf(path, pool=True)
    block = QuantSparseMoeBlock.from_cache(cache, "blk.0", top_k=TOP_K, norm_topk_prob=False)
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    assert buf.tell() < 1.1 * cache.pool_bytes
    again = QuantSparseMoeBlock.from_cache(WeightCache.from_gguf(path), "blk.0", top_k=TOP_K, norm_topk_prob=False)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = gaussian_activations((3, H), seed=4)
    torch.testing.assert_close(again(x), block(x), rtol=0, atol=0)
    torch.save(block, io.BytesIO())


def test_block_names_a_wrong_hidden_size():
    """Activations of another width were reshape's "shape '[-1, 256]' is invalid for input of size 384"."""
    router, gate, up, down = float_experts(1)
    block = QuantSparseMoeBlock(TopKRouter(router, TOP_K, True), QuantExperts.from_float(gate, up, down, "Q4_K"))
    for bad in (torch.randn(2, H + 8), torch.randn(2, 1, H * 2), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=rf"hidden_states: expected \[\.\.\., {H}\] \(the experts' hidden size\)"):
            block(bad)
