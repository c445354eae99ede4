"""torch.compile(fullgraph=True) over the ops: no graph break, same result as eager.

fullgraph=True makes any graph break an error, so a passing compile is itself the check; one
test also asks torch._dynamo.explain for the count. Most tests use the "aot_eager" backend: it
runs the ops' fakes, functionalization (gelu_ becomes a functional op on a copy) and
AOTAutograd, everything inductor relies on except code generation, in a fraction of the time.
Those results must equal eager bit for bit (the same kernels run on the same inputs; the
only other ops here, * 0.5 and + , are exact or rounded identically). One "inductor" test
compiles the MLP for real: its graph is three custom ops and no other op, which inductor calls as
they are (it generates code only for aten ops), so it equals eager bit for bit too.

Kept few and small: compiling costs seconds per graph on a 2-core CPU.
"""

import pytest
import torch

import torchext
from conftest import DEVICES, gemv_rows, random_weight
from torchext import QType

ops = torch.ops.torchext


def _randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- a block: quantized matmul, bias + GELU, in-place GELU ---------------------------------------------

N, K = 64, 512


def block(w, x, bias):
    y = torchext.qmatmul(w, QType.Q4_K, x, N, K)  # the typed wrapper, QType and all
    y = torchext.bias_gelu(y, bias, "tanh")
    z = y * 0.5
    torchext.gelu_(z)
    return z + y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_compiles_fullgraph(device, dtype):
    w = random_weight(QType.Q4_K, N, K, device, seed=1)
    bias = _randn((N,), dtype, device, 2)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    # rows 1 (Q8_1 GEMV path) and one past the GEMV's (dense path): one graph, the policy runs inside the op
    for rows, seed in [(1, 3), (gemv_rows(QType.Q4_K, device) + 1, 4)]:
        x = _randn((rows, K), dtype, device, seed)
        expected = block(w, x, bias)
        got = compiled(w, x, bias)
        assert got.shape == (rows, N) and got.dtype == dtype
        assert torch.equal(got, expected)


def test_block_has_no_graph_break():
    w = random_weight(QType.Q4_K, N, K, "cpu", seed=1)
    x, bias = _randn((2, K), torch.float32, "cpu", 5), _randn((N,), torch.float32, "cpu", 6)
    explanation = torch._dynamo.explain(block)(w, x, bias)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---- every op in one graph ----------------------------------------------------------------------------

K2 = 256


def every_op(w4, w5, w6, w8, x, bias):
    xq = ops.quantize_q8_1(x)
    a = ops.q4k_q8_gemv(w4, xq, 16, K2)
    b = ops.q4k_q8_gemv_packed(w4, xq, 16, K2)
    c = ops.q4k_gemv(w4, x, 16, K2) + ops.q5k_gemv(w5, x, 16, K2) + ops.q6k_gemv(w6, x, 16, K2)
    d = ops.qmatmul(w8, int(QType.Q8_0), x, 16, K2)
    e = x @ ops.dequantize(w6, int(QType.Q6_K), 16, K2, x.dtype).t()
    f = ops.bias_gelu(c + d, bias, "none") + ops.gelu(e, "tanh")
    g = f.clone()
    torchext.gelu_(g, "none")
    return a.to(x.dtype) + b.to(x.dtype) + g


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_in_one_graph(device):
    dtype = torch.bfloat16
    ws = [random_weight(q, 16, K2, device, seed=i) for i, q in enumerate([QType.Q4_K, QType.Q5_K, QType.Q6_K,
                                                                          QType.Q8_0])]
    x, bias = _randn((3, K2), dtype, device, 7), _randn((16,), dtype, device, 8)
    compiled = torch.compile(every_op, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*ws, x, bias), every_op(*ws, x, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_batch(device):
    # One graph with a symbolic number of rows (exercises the fakes with SymInts); the row count
    # crosses the GEMV / dense policy threshold at run time, inside the op.
    def f(w, x):
        return ops.gelu(ops.q6k_gemv(w, x, 32, K2), "none")

    w = random_weight(QType.Q6_K, 32, K2, device, seed=11)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (2, 5, 9, 16):
        x = _randn((rows, K2), torch.float16, device, rows)
        assert torch.equal(compiled(w, x), f(w, x)), rows


# ---- every format of the catalog in one graph -----------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_every_format_in_one_graph(device):
    """qmatmul (3 rows: the Q8_1 GEMV), dequantize and embedding of every catalog format traced into one
    graph (their fakes compute each format's shapes: 32-, 64- and 256-value blocks), the same bits as
    eager."""
    cases = [(q, 3, 768, random_weight(q, 3, 768, device, seed=int(q))) for q in torchext.formats.WEIGHT_TYPES]

    def f(x, ids):
        return [(ops.qmatmul(w, int(q), x, n, k), ops.dequantize(w, int(q), n, k, torch.bfloat16),
                 ops.embedding(w, int(q), ids, n, k, None)) for q, n, k, w in cases]

    x, ids = _randn((3, 768), torch.float32, device, 5), torch.tensor([2, 0], device=device)
    compiled, eager = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids), f(x, ids)
    for (q, *_), got, want in zip(cases, compiled, eager):
        assert all(torch.equal(g, w) for g, w in zip(got, want)), q.name


# ---- a tiny MLP with two quantized layers ------------------------------------------------------------

class QuantLinearSketch(torch.nn.Module):
    """A quantized linear layer kept as raw bytes in a buffer (the shape QuantLinear takes)."""

    def __init__(self, qtype, n, k, device, seed):
        super().__init__()
        self.qtype, self.n, self.k = int(qtype), n, k
        self.register_buffer("weight", random_weight(qtype, n, k, device, seed=seed))

    def forward(self, x):
        return ops.qmatmul(self.weight, self.qtype, x, self.n, self.k)


class TinyMLP(torch.nn.Module):
    def __init__(self, device, dtype):
        super().__init__()
        self.up = QuantLinearSketch(QType.Q6_K, 320, 256, device, seed=21)  # k-quant, 2 rows of 16 sub-blocks
        self.down = QuantLinearSketch(QType.Q8_0, 96, 320, device, seed=22)  # 32-value format, k = 10 blocks
        self.bias = torch.nn.Parameter(_randn((320,), dtype, device, 23), requires_grad=False)

    def forward(self, x):
        return self.down(ops.bias_gelu(self.up(x), self.bias, "tanh"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tiny_mlp_aot_eager(device, dtype):
    model = TinyMLP(device, dtype)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for rows in (1, 12):
        x = _randn((2, rows, 256), dtype, device, rows)
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_mlp_inductor(device):
    dtype = torch.float32
    model = TinyMLP(device, dtype)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = _randn((4, 256), dtype, device, 31)
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
    assert got.shape == (4, 96) and got.dtype == dtype
    assert torch.equal(got, expected)


# ---- expert routing: data-dependent ids inside the graph ---------------------------------------------

def routed_experts(w, router, x):
    """Top-2 routing of each token, then the expert-indexed matmul on the ids just computed."""
    ids = torch.topk(x.float() @ router.t(), 2, dim=-1).indices
    return ops.qmatmul_id(w, int(QType.Q4_K), x, ids, 32, K2, False)


@pytest.mark.parametrize("device", DEVICES)
def test_qmatmul_id_with_routing_compiles(device):
    """The ids come from top-k inside the compiled function (data-dependent): one graph, symbolic
    token counts across the GEMV / grouped-GEMM boundary, the eager result bit for bit."""
    w = torch.stack([random_weight(QType.Q4_K, 32, K2, device, seed=e) for e in range(6)])
    router = _randn((6, K2), torch.float32, device, 40)
    compiled = torch.compile(routed_experts, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (1, 7, 20):
        x = _randn((rows, K2), torch.bfloat16, device, rows)
        assert torch.equal(compiled(w, router, x), routed_experts(w, router, x)), rows
