"""Bad input to the Python-only parts (the GGUF tokenizer, Gemma 3's generate and loader, the op wrappers'
own argument checks) raises an error that names what was wrong, instead of a silent answer.

None of this needs the Gemma 3 GGUF file: the tokenizer gets a vocabulary of a few pieces, and
generate runs a one-layer Gemma 3 of random Q8_0 weights (the real model's code, tiny shapes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchext
from conftest import DEVICES, write_one_tensor_gguf
from torchext.models.gemma3 import STOP_CHECK_TOKENS, Gemma3, Gemma3Config, decode_step, generate, load_gemma3
from torchext.models.tokenizer import BYTE, CONTROL, NORMAL, GGUFTokenizer

# ---- tokenizer -------------------------------------------------------------------------------------

PIECES = ["<pad>", "<eos>", "<bos>", "\u2581a", "b", "<0x41>"]
TYPES = [CONTROL, CONTROL, CONTROL, NORMAL, NORMAL, BYTE]


@pytest.fixture
def tokenizer():
    return GGUFTokenizer(PIECES, [0.0] * len(PIECES), TYPES, bos_id=2, eos_id=1)


def test_tiny_vocabulary_round_trip(tokenizer):
    assert tokenizer.encode(" ab") == [2, 3, 4]
    assert tokenizer.decode([2, 3, 4, 5, 1]) == " abA"
    assert tokenizer.decode(torch.tensor([3, 4])) == " ab"  # tensor elements are ids too


@pytest.mark.parametrize("bad", [-1, -6, 6, 10**9])
def test_decode_of_an_id_outside_the_vocabulary_raises(tokenizer, bad):
    # -1 used to decode as the last piece (Python indexing), 6 to raise an IndexError
    with pytest.raises(ValueError, match=rf"ids: token id {bad} at position 1 is outside the vocabulary \[0, 6\)"):
        tokenizer.decode([3, bad, 4])


@pytest.mark.parametrize("bad", [1.5, 3.0, True, None, "3"], ids=repr)
def test_decode_of_something_that_is_not_an_id_raises(tokenizer, bad):
    with pytest.raises(ValueError, match=rf"ids: expected integer token ids, got {bad!r} at position 0"):
        tokenizer.decode([bad])


# ---- Gemma 3: dtype ----------------------------------------------------------------------------------

CFG = Gemma3Config(vocab_size=16, hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, ffn=96, eps=1e-6,
                   rope_base_global=1e6, sliding_window=4, context_length=64)


def test_float16_is_refused_before_reading_the_file(tmp_path):
    # the check comes first: a path that does not exist proves no load was attempted
    with pytest.raises(ValueError, match=r"dtype: float16 cannot hold Gemma 3's residual stream.* use "
                                         r"torch.bfloat16 or torch.float32"):
        load_gemma3(tmp_path / "absent.gguf", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"dtype: float16 cannot hold"):
        Gemma3(torchext.WeightCache(), CFG, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, "float32"], ids=str)
def test_other_unsupported_dtypes_are_refused(tmp_path, dtype):
    with pytest.raises(ValueError, match=r"dtype: expected torch.float32 or torch.bfloat16, got "):
        load_gemma3(tmp_path / "absent.gguf", dtype=dtype)


# ---- Gemma 3: generate -------------------------------------------------------------------------------

def tiny_gemma3(device, max_seq_len=32, dtype=torch.float32) -> Gemma3:
    """A one-layer Gemma 3 of random Q8_0 weights, under the GGUF tensor names load_gemma3 uses."""
    g = torch.Generator().manual_seed(0)
    cache = torchext.WeightCache()

    def matrix(name, n, k):
        dense = torch.randn(n, k, generator=g) * k ** -0.5
        cache.put(name, torchext.quantize(dense, "Q8_0").to(device), "Q8_0", n, k)

    def norm(name, size):
        cache.put(name, (1 + 0.1 * torch.randn(size, generator=g)).to(device))

    c = CFG
    matrix("token_embd.weight", c.vocab_size, c.hidden)
    norm("output_norm.weight", c.hidden)
    p = "blk.0."
    matrix(p + "attn_q.weight", c.heads * c.head_dim, c.hidden)
    matrix(p + "attn_k.weight", c.kv_heads * c.head_dim, c.hidden)
    matrix(p + "attn_v.weight", c.kv_heads * c.head_dim, c.hidden)
    matrix(p + "attn_output.weight", c.hidden, c.heads * c.head_dim)
    matrix(p + "ffn_gate.weight", c.ffn, c.hidden)
    matrix(p + "ffn_up.weight", c.ffn, c.hidden)
    matrix(p + "ffn_down.weight", c.hidden, c.ffn)
    for name in ("attn_q_norm", "attn_k_norm"):
        norm(p + name + ".weight", c.head_dim)
    for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
        norm(p + name + ".weight", c.hidden)
    return Gemma3(cache, c, max_seq_len=max_seq_len, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_returns_max_new_tokens_tokens(device):
    model = tiny_gemma3(device)
    prompt = [2, 5, 7]
    longest = generate(model, prompt, 6, stop=set())
    assert len(longest) == 6 and all(0 <= t < CFG.vocab_size for t in longest)
    for count in range(6):  # greedy: each shorter run is a prefix of the longer one
        assert generate(model, prompt, count, stop=set()) == longest[:count]
    assert generate(model, prompt, 0) == []


def test_generate_stops_after_a_stop_token():
    """The result ends at the first stop token, and decoding stops within STOP_CHECK_TOKENS steps of it (it ran
    all max_new_tokens, then cut)."""
    model = tiny_gemma3("cpu", max_seq_len=64)
    tokens = generate(model, [2, 5, 7], 6, stop=set())
    first = tokens[1]
    assert generate(model, [2, 5, 7], 6, stop={first}) == tokens[: tokens.index(first) + 1]
    steps = []
    decode = decode_step(model)

    def counted(token, pos):
        steps.append(int(pos))
        return decode(token, pos)

    assert generate(model, [2, 5, 7], 60, step=counted, stop={first}) == tokens[: tokens.index(first) + 1]
    assert len(steps) == STOP_CHECK_TOKENS - 1  # the first look, after the prompt's token and 15 steps


@pytest.mark.parametrize(
    "prompt, max_new_tokens, match",
    [
        ([], 3, r"prompt: expected at least one token id, got none"),
        ([2, 16], 3, r"prompt: token id 16 at position 1 is outside the vocabulary \[0, 16\)"),
        ([-1, 2], 3, r"prompt: token id -1 at position 0 is outside the vocabulary \[0, 16\)"),
        ([2, 3], -1, r"max_new_tokens: expected a whole number >= 0, got -1"),
        ([2, 3], 2.5, r"max_new_tokens: expected a whole number >= 0, got 2.5"),
        ([2, 3], True, r"max_new_tokens: expected a whole number >= 0, got True"),
        ([2] * 30, 3, r"prompt: 30 tokens plus max_new_tokens=3 exceed max_seq_len=32"),
    ],
    ids=["empty", "id-too-large", "id-negative", "negative", "float", "bool", "too-long"],
)
def test_generate_rejects_bad_arguments(prompt, max_new_tokens, match):
    model = tiny_gemma3("cpu")
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, max_new_tokens)


def test_load_gemma3_checks_the_file_first(tmp_path):
    """A corrupted file meets torchext's GGUF checks (a ValueError naming it) before gguf's reader,
    whose own errors (IndexError, reshape errors) name neither file nor tensor."""
    path = write_one_tensor_gguf(tmp_path / "cut.gguf", "gemma3")
    path.write_bytes(path.read_bytes()[:-64])  # the data cut short
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gemma3(path)


# ---- the op wrappers: arguments the dispatcher would convert -----------------------------------------

def _one_row_calls(n, k):
    """Each wrapper that takes a weight's n and k, on a one-row Q8_0 weight of k=32 values."""
    w = torchext.quantize(torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), "Q8_0")
    x = torch.randn(2, 32)
    xq, ids = torchext.quantize_q8_1(x), torch.zeros(2, 1, dtype=torch.long)
    return [
        lambda: torchext.qmatmul(w, "Q8_0", x, n, k),
        lambda: torchext.qmatmul_q8_1(w, "Q8_0", xq, n, k),
        lambda: torchext.gated_gelu_qmatmul(w, "Q8_0", x, x, n, k),
        lambda: torchext.gated_silu_qmatmul(w, "Q8_0", x, x, n, k),
        lambda: torchext.qmatmul_id(w.unsqueeze(0), "Q8_0", x, ids, n, k),
        lambda: torchext.dequantize(w, "Q8_0", n, k),
        lambda: torchext.embedding(w, "Q8_0", torch.tensor([0]), n, k),
    ]


@pytest.mark.parametrize("bad", [True, np.bool_(True), 1.0, "1"], ids=repr)
def test_wrappers_take_n_and_k_as_whole_numbers(bad):
    """The dispatcher takes a bool as an int: n=True ran a one-row weight as if n were 1 (a float or a str
    was its message, which names the argument too but not the wrapper's). Each is a TypeError naming n or k."""
    for call in _one_row_calls(bad, 32):
        with pytest.raises(TypeError, match=f"^n: expected a whole number, got {type(bad).__name__}$"):
            call()
    for call in _one_row_calls(1, bad):
        with pytest.raises(TypeError, match=f"^k: expected a whole number, got {type(bad).__name__}$"):
            call()
    for call in _one_row_calls(np.int64(1), np.int32(32)):  # numpy's integers are whole numbers
        call()
    w4 = torchext.quantize(torch.randn(1, 256), "Q4_K")
    for wrapper in (torchext.q4k_gemv, torchext.q4k_q8_gemv, torchext.q4k_q8_gemv_packed):
        x = torch.randn(1, 256)
        with pytest.raises(TypeError, match="^n: expected a whole number, got bool$"):
            wrapper(w4, x if wrapper is torchext.q4k_gemv else torchext.quantize_q8_1(x), True, 256)


@pytest.mark.parametrize("bad, name", [(True, "bool"), ("1e-6", "str"), (torch.tensor(1e-6), "Tensor")], ids=repr)
def test_rope_cache_write_takes_eps_as_a_number(bad, name):
    """eps=True ran as 1.0 (the dispatcher takes a bool as a float), where rms_norm_quantize_q8_1's eps was
    already checked: a TypeError naming eps."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8)
    cos, sin, pos = torch.ones(4, 8), torch.zeros(4, 8), torch.tensor([1])
    k_cache, v_cache = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    with pytest.raises(TypeError, match=f"^eps: expected a number, got {name}$"):
        torchext.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, torch.ones(8), None, bad)
    assert not k_cache.any() and not v_cache.any()  # refused before the kernel wrote the caches
    torchext.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, torch.ones(8), None, 0)  # an int is one
