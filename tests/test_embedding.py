"""torchext.embedding: rows of a quantized table gathered by token id.

Oracle: gguf.quants.dequantize of the same bytes, indexed by the ids. The op dequantizes with
the same fp32 arithmetic, so float32 rows are bit-identical; float16/bfloat16 rows are the
float32 values rounded once (round to nearest even), so those are exact too.
"""

import numpy as np
import pytest
import torch

import torchext
from conftest import DEVICES, DTYPES, HAS_CUDA, WEIGHT_QTYPES, Q, cached_weight, qtype_name, requires_cuda


def _k_for(qtype) -> int:
    # k-quants: a padded super-block (k not a multiple of 256); 32-value formats: Gemma's 640
    return 300 if qtype_name(qtype).endswith("_K") else 640


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_rows_match_gguf(qtype, dtype, device):
    n, k = 13, _k_for(qtype)
    w, W = cached_weight(qtype, n, k)
    ids = torch.tensor([[12, 0, 5], [5, 7, 1]], dtype=torch.int64)
    y = torchext.embedding(w.to(device), qtype, ids.to(device), n, k, dtype)
    assert y.shape == (2, 3, k) and y.dtype == dtype and y.device.type == device
    ref = torch.from_numpy(W[ids.numpy()].astype(np.float32)).to(dtype)
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids", [torch.tensor([3, 3, 0], dtype=torch.int32), torch.tensor([], dtype=torch.int64),
                                 torch.tensor(4)], ids=["int32", "empty", "scalar"])
def test_id_shapes_and_types(ids, device):
    n, k = 6, 64
    w, W = cached_weight(torchext.QType.Q8_0, n, k)
    y = torchext.embedding(w.to(device), torchext.QType.Q8_0, ids.to(device), n, k)
    assert y.shape == (*ids.shape, k)
    ref = torch.from_numpy(W.astype(np.float32))[ids.long()]
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_dequantize_for_every_row(device):
    n, k = 9, 512
    w, _ = cached_weight(torchext.QType.Q6_K, n, k)
    w = w.to(device)
    ids = torch.arange(n, device=device)
    assert torch.equal(torchext.embedding(w, torchext.QType.Q6_K, ids, n, k),
                       torchext.dequantize(w, torchext.QType.Q6_K, n, k))


def test_out_of_range_id_raises_on_cpu():
    n, k = 4, 32
    w, _ = cached_weight(torchext.QType.Q8_0, n, k)
    for bad in (4, -1):
        with pytest.raises(RuntimeError, match=rf"ids: expected ids in \[0, n=4\), got {bad} at flat position 1"):
            torchext.embedding(w, torchext.QType.Q8_0, torch.tensor([0, bad]), n, k)


@requires_cuda
def test_out_of_range_id_gives_a_nan_row_on_cuda():
    n, k = 4, 32
    w, W = cached_weight(torchext.QType.Q8_0, n, k)
    y = torchext.embedding(w.cuda(), torchext.QType.Q8_0, torch.tensor([1, 7, -2], device="cuda"), n, k).cpu()
    assert torch.equal(y[0], torch.from_numpy(W[1].astype(np.float32)))
    assert torch.isnan(y[1:]).all()


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0.0]), r"ids: expected int64 or int32 token ids, got float32"),
    (torch.tensor([[0, 1], [2, 3]]).t(), r"ids: expected a contiguous tensor"),
])
def test_bad_ids(bad, match):
    w, _ = cached_weight(torchext.QType.Q8_0, 4, 32)
    with pytest.raises(RuntimeError, match=match):
        torchext.embedding(w, torchext.QType.Q8_0, bad, 4, 32)


def test_bad_weight_and_dtype():
    w, _ = cached_weight(torchext.QType.Q8_0, 4, 32)
    ids = torch.tensor([0])
    with pytest.raises(RuntimeError, match=r"w: expected 272 bytes for Q8_0 with n=4, k=64 \(4 rows of 68 bytes\), got 136"):
        torchext.embedding(w, torchext.QType.Q8_0, ids, 4, 64)
    with pytest.raises(RuntimeError, match=r"dtype: expected float32, float16 or bfloat16, got int32"):
        torchext.embedding(w, torchext.QType.Q8_0, ids, 4, 32, torch.int32)


@requires_cuda
def test_ids_on_another_device():
    w, _ = cached_weight(torchext.QType.Q8_0, 4, 32)
    with pytest.raises(RuntimeError, match=r"w and ids: expected tensors on the same device"):
        torchext.embedding(w.cuda(), torchext.QType.Q8_0, torch.tensor([0]), 4, 32)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w, _ = cached_weight(torchext.QType.Q4_K, 5, 256)
    ids = torch.tensor([[4, 0], [2, 2]], device=device)
    torch.library.opcheck(torch.ops.torchext.embedding.default,
                          (w.to(device), int(torchext.QType.Q4_K), ids, 5, 256, torch.bfloat16))


@pytest.mark.parametrize("qtype", [torchext.QType.Q5_0, Q.Q5_0, int(Q.Q5_0), "Q5_0"], ids=["QType", "gguf", "int", "name"])
def test_compiles_fullgraph(qtype):
    """Every spelling of the format traces (dynamo 2.12-2.13 recursed in operator.index on an IntEnum)."""
    w, _ = cached_weight(torchext.QType.Q5_0, 8, 64)

    def embed_and_scale(ids):
        return torchext.embedding(w, qtype, ids, 8, 64) * 8.0 ** 0.5

    ids = torch.tensor([[1, 7, 3]])
    compiled = torch.compile(embed_and_scale, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(ids), embed_and_scale(ids))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", WEIGHT_QTYPES, ids=qtype_name)
def test_cuda_matches_cpu(qtype):
    n, k = 11, _k_for(qtype)
    w, _ = cached_weight(qtype, n, k)
    ids = torch.randint(0, n, (3, 5), generator=torch.Generator().manual_seed(0))
    for dtype in DTYPES:
        cpu = torchext.embedding(w, qtype, ids, n, k, dtype)
        assert torch.equal(torchext.embedding(w.cuda(), qtype, ids.cuda(), n, k, dtype).cpu(), cpu)
