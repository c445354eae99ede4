"""qmatmul_id, the expert-indexed matmul of a mixture of experts, against the float64 oracle: each
slot (t, j) is its activation row @ dequant_oracle(w[ids[t, j]]).T.

Tolerances are test_matmul's, applied to each expert's slots: up to conftest.gemv_rows tokens (the
GEMV path: 16 on CUDA, the format's on the CPU) the Q8_1 bound q8_1_bound of the rows' activations
plus fp32 accumulation; beyond, and with exact=True, activations are unrounded: fp32 accumulation
(1e-5 * absref), and on CUDA in fp16/bf16 the weights computed in that dtype by the grouped tiled
GEMM (conftest.half_weight_rounding, as test_matmul's term for the same path). Each output in a
dtype adds one rounding of the fp32 result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchext
from conftest import (DEVICES, Q, capture_graph, dequant_oracle, fp32_sum_error, gaussian_activations, gemv_rows,
                      half_ulp, half_weight_rounding, offset_oracle, qtype_name, random_weight, requires_cuda, tiny)
from test_matmul import PAST_GEMV, offsets_term, oracle, q8_1_bound, report, rows_of_case

ops = torch.ops.torchext

# a k-quant, the 32-value formats of 18 and 34 bytes, an IQ format, gpt-oss's MXFP4 (17-byte blocks; with an
# odd row count every other expert, and every other row, starts at an odd address) and NVFP4 (64-value blocks)
FORMATS = [Q.Q4_K, Q.Q8_0, Q.Q4_0, Q.IQ4_XS, Q.MXFP4, Q.NVFP4]
SHAPES = {q: (40, 96) for q in FORMATS} | {Q.Q4_K: (40, 512), Q.IQ4_XS: (40, 512), Q.MXFP4: (41, 96),
                                           Q.NVFP4: (40, 128)}  # (n, k)


def expert_weights(qtype, experts: int, n: int, k: int, device="cpu", seed: int = 0):
    """(w [E, n, row bytes] on device, [E] float64 oracles [n, k], [E] their offsets)."""
    ws = [random_weight(qtype, n, k, "cpu", seed=seed + e) for e in range(experts)]
    return (torch.stack(ws).to(device), [dequant_oracle(w, qtype, n, k) for w in ws],
            [offset_oracle(w, qtype, n, k) for w in ws])


def routed_ids(tokens: int, top_k: int, experts: int, seed: int = 0, dtype=torch.int64) -> torch.Tensor:
    """[T, top_k] distinct expert ids per token, as a router's top-k gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k].to(dtype).contiguous()


def slot_rows(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The activation row of every slot, [T * top_k, k]."""
    if x.dim() == 3:
        return x.reshape(-1, x.shape[-1])
    return x.repeat_interleave(top_k, dim=0)


def assert_rows_close(y, x, W, M, rounded: bool, what: str = ""):
    """Rows y [m, n] of one expert W (float64 [n, k], offsets M) on activation rows x [m, k]: within
    the Q8_1 bound when the activations were rounded (the GEMV path), else within unrounded-activation
    error."""
    ref, absref, xabs = oracle(x, W)
    u = half_ulp(y.dtype) if y.dtype != torch.float32 else 0.0
    tol = 1e-5 * absref * (1 + u) + u * np.abs(ref) + (tiny(y.dtype) if u else 0.0)
    if rounded:
        tol = tol + q8_1_bound(x, W) * (1 + 1e-5) * (1 + u)
    elif y.device.type == "cuda" and u:
        tol = tol + half_weight_rounding(y.dtype, absref, offsets_term(x, M), xabs)
    y64 = y.detach().double().cpu().numpy()
    err = np.abs(y64 - ref)
    assert np.isfinite(y64).all(), f"{what}: non-finite outputs"
    assert (err <= tol).all(), f"{what}: " + report(err, tol, absref)


def assert_slots_close(y, x, ids, Ws, Ms, rounded: bool):
    """y [T, top_k, n] against the oracle, expert by expert (assert_rows_close)."""
    T, top_k, n = y.shape
    assert ids.shape == (T, top_k) and y.dtype == x.dtype
    xs, flat_ids, ys = slot_rows(x, top_k), ids.reshape(-1).cpu(), y.reshape(-1, n)
    for e in flat_ids.unique().tolist():
        sel = flat_ids == e
        assert_rows_close(ys[sel.to(ys.device)], xs[sel.to(xs.device)], Ws[e], Ms[e], rounded, f"expert {e}")


# ---- parity with the oracle -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (1, 8), (3, 2), (16, 8), (17, 2), (64, 8)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", FORMATS, ids=qtype_name)
def test_matches_oracle(qtype, tokens, top_k, per_slot, dtype, device):
    """x [T, k] (gate/up: every slot of a token reads its row) or [T, top_k, k] (down: a row per
    slot); 1 to 16 tokens take the GEMV path on CUDA (one token: DP4A; more: tensor cores for Q4_K),
    17 and 64 the grouped GEMM (64 x 8 slots over 10 experts: several tiles per expert); on the CPU
    the GEMV to the format's limit (4 to 48 tokens), then the dense path."""
    experts, (n, k) = 10, SHAPES[qtype]
    w, Ws, Ms = expert_weights(qtype, experts, n, k, device, seed=tokens)
    ids = routed_ids(tokens, top_k, experts, seed=tokens + top_k)
    shape = (tokens, top_k, k) if per_slot else (tokens, k)
    x = gaussian_activations(shape, seed=tokens * 3 + top_k).to(dtype)
    y = torchext.qmatmul_id(w, qtype, x.to(device), ids.to(device), n, k)
    assert y.shape == (tokens, top_k, n) and y.device.type == device
    assert_slots_close(y, x, ids, Ws, Ms, rounded=tokens <= gemv_rows(qtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_exact_never_rounds_activations(tokens, dtype, device):
    experts, n, k, qtype = 6, 24, 512, Q.Q6_K
    w, Ws, Ms = expert_weights(qtype, experts, n, k, device)
    ids = routed_ids(tokens, 2, experts, seed=tokens)
    x = gaussian_activations((tokens, k), seed=tokens).to(dtype)
    y = torchext.qmatmul_id(w, qtype, x.to(device), ids.to(device), n, k, exact=True)
    assert_slots_close(y, x, ids, Ws, Ms, rounded=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("tokens", [2, 16, 24, PAST_GEMV], ids=str)
def test_repeated_ids(tokens, ids_dtype, device):
    """Ids may repeat within a token (each slot is its own product): every slot of every token on
    one expert gives an expert 8 x T rows, which the GEMV takes in several groups."""
    experts, n, k, qtype = 4, 32, 256, Q.Q4_K
    tokens = rows_of_case(tokens, qtype, device)
    w, Ws, Ms = expert_weights(qtype, experts, n, k, device)
    ids = torch.full((tokens, 8), 2, dtype=ids_dtype)
    ids[0, :3] = torch.tensor([0, 0, 3], dtype=ids_dtype)
    x = gaussian_activations((tokens, k), seed=7).to(torch.bfloat16)
    y = torchext.qmatmul_id(w, qtype, x.to(device), ids.to(device), n, k)
    assert_slots_close(y, x, ids, Ws, Ms, rounded=tokens <= gemv_rows(qtype, device))
    assert torch.equal(y[:, 3], y[:, 7]) and torch.equal(y[0, 0], y[0, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0], ids=qtype_name)
def test_gemv_path_up_to_the_policys_tokens(qtype, device):
    """At gemv_max_tokens tokens (16 on CUDA, the format's on the CPU) the outputs carry Q8_1
    rounding, one more and they are unrounded (the policy of kernels/batch_policy.h,
    choose_matmul_id_path: the tokens decide, as rows decide for qmatmul)."""
    experts, n, k = 4, 64, 1024
    last = gemv_rows(qtype, device)
    w, Ws, _ = expert_weights(qtype, experts, n, k, device)
    x = gaussian_activations((last + 1, k), seed=3)
    ids = routed_ids(last + 1, 2, experts)
    for tokens in (last, last + 1):
        y = torchext.qmatmul_id(w, qtype, x[:tokens].to(device), ids[:tokens].to(device), n, k)
        xs, flat = slot_rows(x[:tokens], 2), ids[:tokens].reshape(-1)
        rel = []
        for e in flat.unique().tolist():
            ref, absref, _ = oracle(xs[flat == e], Ws[e])
            rel.append(np.abs(y.reshape(-1, n)[(flat == e).to(device)].double().cpu().numpy() - ref) / absref)
        rel = np.concatenate(rel)
        if tokens <= last:
            assert np.median(rel) > 1e-4, f"{tokens} tokens: no Q8_1 rounding"
        else:
            assert rel.max() <= 1e-5, f"{tokens} tokens: {rel.max():.2e} is not fp32 error"


def test_equals_qmatmul_per_expert_on_cpu():
    """On the CPU each expert's rows, in slot order, go through qmatmul's own kernels: the result is
    qmatmul of the expert's weight on those rows, bit for bit (the Q8_1 GEMV up to the format's
    tokens, the dense path after)."""
    experts, n, k, qtype = 5, 24, 300, Q.Q5_K
    w, *_ = expert_weights(qtype, experts, n, k)
    last = gemv_rows(qtype)
    for tokens in (3, last, last + 1):
        ids = routed_ids(tokens, 3, experts, seed=tokens)
        x = gaussian_activations((tokens, k), seed=tokens)
        y = torchext.qmatmul_id(w, qtype, x, ids, n, k).reshape(-1, n)
        flat = ids.reshape(-1)
        for e in flat.unique().tolist():
            rows = slot_rows(x, 3)[flat == e]
            expected = torchext.qmatmul(w[e], qtype, rows, n, k, exact=tokens > last)
            assert torch.equal(y[flat == e], expected), (tokens, e)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    experts, n, k, qtype = 3, 8, 256, Q.Q4_K
    w, *_ = expert_weights(qtype, experts, n, k, device)
    for tokens, top_k in [(0, 2), (3, 0), (0, 0)]:
        x = torch.zeros(tokens, k, dtype=torch.bfloat16, device=device)
        ids = torch.zeros(tokens, top_k, dtype=torch.int64, device=device)
        y = torchext.qmatmul_id(w, qtype, x, ids, n, k)
        assert y.shape == (tokens, top_k, n) and y.dtype == torch.bfloat16


# ---- ids -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [2, 20])
def test_id_out_of_range_raises_on_cpu(tokens):
    experts, n, k, qtype = 3, 8, 64, Q.Q8_0
    w, *_ = expert_weights(qtype, experts, n, k)
    x = gaussian_activations((tokens, k))
    for bad in (3, -1):
        ids = torch.zeros(tokens, 2, dtype=torch.int64)
        ids[1, 1] = bad
        with pytest.raises(RuntimeError, match=rf"^ids: expected ids in \[0, E=3\), got {bad} at flat position 3$"):
            torchext.qmatmul_id(w, qtype, x, ids, n, k)


@requires_cuda
@pytest.mark.parametrize("case", ["gemv", "gemv_mma", "grouped", "dense_fp32"])
def test_id_out_of_range_gives_a_nan_row_on_cuda(case):
    """Checking ids on the host would synchronise: a slot with an id outside [0, E) gets a NaN row
    on every path, the other slots are what they are without it."""
    experts, n, k, qtype = 3, 40, 256, Q.Q4_K
    tokens, dtype = {"gemv": (1, torch.bfloat16), "gemv_mma": (4, torch.bfloat16), "grouped": (20, torch.bfloat16),
                     "dense_fp32": (20, torch.float32)}[case]
    w, Ws, _ = expert_weights(qtype, experts, n, k, "cuda")
    x = gaussian_activations((tokens, k)).to(dtype)
    ids = routed_ids(tokens, 2, experts)
    clean = torchext.qmatmul_id(w, qtype, x.cuda(), ids.cuda(), n, k).cpu()
    bad = ids.clone()
    bad[0, 1], bad[-1, 0] = experts, -5
    y = torchext.qmatmul_id(w, qtype, x.cuda(), bad.cuda(), n, k).cpu()
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[-1, 0]).all()
    keep = torch.ones(tokens, 2, dtype=torch.bool)
    keep[0, 1] = keep[-1, 0] = False
    assert torch.equal(y[keep], clean[keep])


# ---- CUDA ----------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 8, 16, 17, 100])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_1, Q.IQ3_S, Q.MXFP4], ids=qtype_name)
def test_cuda_matches_cpu(qtype, tokens, dtype):
    """The same slots on both devices: where both take the GEMV path (up to 16 tokens on CUDA, the
    format's limit on the CPU) its integer dot products agree up to fp32 summation order, the
    unrounded paths within the oracle's tolerance (assert_slots_close)."""
    experts, n, k = 16, 72, 768
    w, Ws, Ms = expert_weights(qtype, experts, n, k)
    ids = routed_ids(tokens, 4, experts, seed=tokens, dtype=torch.int32)
    x = gaussian_activations((tokens, k), seed=tokens).to(dtype)
    y_cpu = torchext.qmatmul_id(w, qtype, x, ids, n, k)
    y_cuda = torchext.qmatmul_id(w.cuda(), qtype, x.cuda(), ids.cuda(), n, k)
    assert_slots_close(y_cuda, x, ids, Ws, Ms, rounded=tokens <= gemv_rows(qtype, "cuda"))
    assert_slots_close(y_cpu, x, ids, Ws, Ms, rounded=tokens <= gemv_rows(qtype))
    if tokens <= min(gemv_rows(qtype, "cuda"), gemv_rows(qtype)):
        absref = np.abs(slot_rows(x, 4).double().numpy()) @ np.abs(np.stack(Ws)).max(0).T  # [slots, n]
        u = half_ulp(dtype) if dtype != torch.float32 else 0.0
        a, b = y_cpu.reshape(-1, n).double().numpy(), y_cuda.reshape(-1, n).cpu().double().numpy()
        assert (np.abs(a - b) <= 1e-6 * absref + 2 * u * np.abs(a) + 2 * tiny(dtype)).all()


@requires_cuda
@pytest.mark.parametrize("shape", ["qwen3_30b_a3b", "gpt_oss_20b"])
@pytest.mark.parametrize("tokens", [1, 8, 64, 512])
def test_real_shapes(shape, tokens):
    """The benchmark's shapes (bench/moe.py), bf16, against the CPU's dense-per-expert result on a
    sample of slots: 128 experts top-8 2048 -> 768, 32 experts top-4 2880 -> 2880."""
    experts, top_k, n, k, qtype = {"qwen3_30b_a3b": (128, 8, 768, 2048, Q.Q4_K),
                                   "gpt_oss_20b": (32, 4, 2880, 2880, Q.Q8_0)}[shape]
    g = torch.Generator(device="cuda").manual_seed(tokens)
    w = torch.randint(0, 256, (experts, n, torchext.row_bytes(qtype, k)), dtype=torch.uint8, device="cuda",
                      generator=g)
    blocks = w.view(experts, n, -1, torchext.block_bytes(qtype))
    for off in torchext.formats.SCALE_FIELDS[torchext.QType(int(qtype))]:  # finite scales, realistic outputs
        d = (torch.randn(blocks.shape[:-1], device="cuda", generator=g) * 1e-2).half()
        blocks[..., off:off + 2] = d.view(torch.uint8).view(*blocks.shape[:-1], 2)
    ids = routed_ids(tokens, top_k, experts, seed=tokens).cuda()
    x = torch.randn(tokens, k, device="cuda", generator=g).bfloat16()
    y = torchext.qmatmul_id(w, qtype, x, ids, n, k)  # on CUDA: the tolerance of CUDA's unrounded paths
    for s in torch.randperm(tokens * top_k, generator=torch.Generator().manual_seed(0))[:12].tolist():
        t, j = divmod(s, top_k)
        we = w[int(ids[t, j])].cpu()
        W, M = dequant_oracle(we, qtype, n, k), offset_oracle(we, qtype, n, k)
        assert_rows_close(y[t, j:j + 1], x[t:t + 1].cpu(), W, M, tokens <= gemv_rows(qtype, "cuda"), f"slot {s}")


@requires_cuda
@pytest.mark.parametrize("tokens", [1, 4, 40])
def test_cuda_graph_with_new_ids(tokens):
    """One captured graph, replayed with new activations and new ids (other experts selected):
    each replay equals the eager call on the same inputs."""
    experts, n, k, qtype = 12, 64, 512, Q.Q4_K
    w, *_ = expert_weights(qtype, experts, n, k, "cuda")
    static_x = torch.zeros(tokens, k, dtype=torch.bfloat16, device="cuda")
    static_ids = torch.zeros(tokens, 4, dtype=torch.int64, device="cuda")
    graph, out = capture_graph(lambda: torchext.qmatmul_id(w, qtype, static_x, static_ids, n, k))
    for seed in (1, 2, 3):
        x = gaussian_activations((tokens, k), seed=seed).bfloat16().cuda()
        ids = routed_ids(tokens, 4, experts, seed=seed).cuda()
        static_x.copy_(x)
        static_ids.copy_(ids)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, torchext.qmatmul_id(w, qtype, x, ids, n, k))


@requires_cuda
def test_no_host_sync():
    experts, n, k, qtype = 8, 64, 512, Q.Q4_K
    w, *_ = expert_weights(qtype, experts, n, k, "cuda")
    xs = [gaussian_activations((t, k), seed=t).to(dt).cuda() for t, dt in
          [(1, torch.bfloat16), (8, torch.bfloat16), (30, torch.bfloat16), (30, torch.float32)]]
    idss = [routed_ids(x.shape[0], 2, experts).cuda() for x in xs]

    def run():
        return [torchext.qmatmul_id(w, qtype, x, ids, n, k) for x, ids in zip(xs, idss)]

    expected = run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@requires_cuda
def test_misaligned_activations_take_the_dense_path():
    """bf16 activations 2 bytes off a 16-byte boundary: the grouped GEMM does not run them, the
    masked dense path does (same oracle tolerance)."""
    experts, n, k, qtype, tokens = 5, 40, 256, Q.Q8_0, 20
    w, Ws, Ms = expert_weights(qtype, experts, n, k, "cuda")
    x = gaussian_activations((tokens, k)).bfloat16()
    buf = torch.zeros(tokens * k + 1, dtype=torch.bfloat16, device="cuda")
    buf[1:] = x.reshape(-1).cuda()
    ids = routed_ids(tokens, 3, experts)
    y = torchext.qmatmul_id(w, qtype, buf[1:].view(tokens, k), ids.cuda(), n, k)
    assert_slots_close(y, x, ids, Ws, Ms, rounded=False)


# ---- autograd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_slot", [False, True], ids=["x_per_token", "x_per_slot"])
def test_gradient_of_x(per_slot):
    """The gradient reaches x through each slot's dequantized expert weight: each slot's g @ W_e an fp32 sum
    of n products, the slots of a token then added (x per token): within fp32_sum_error of the float64 sum."""
    experts, n, k, qtype, tokens, top_k = 4, 16, 64, Q.Q8_0, 5, 2
    w, Ws, _ = expert_weights(qtype, experts, n, k)
    ids = routed_ids(tokens, top_k, experts)
    shape = (tokens, top_k, k) if per_slot else (tokens, k)
    x = gaussian_activations(shape).requires_grad_()
    g = gaussian_activations((tokens, top_k, n), seed=1)
    torchext.qmatmul_id(w, qtype, x, ids, n, k, exact=True).backward(g)
    W = np.stack(Ws)[ids.numpy()]  # [T, top_k, n, k]
    expected = np.einsum("tjn,tjnk->tjk", g.double().numpy(), W)
    absterms = np.einsum("tjn,tjnk->tjk", g.double().abs().numpy(), np.abs(W))
    if not per_slot:
        expected, absterms = expected.sum(1), absterms.sum(1)
    tol = fp32_sum_error(absterms, n if per_slot else n + top_k - 1)
    assert (np.abs(x.grad.double().numpy() - expected) <= tol).all()
