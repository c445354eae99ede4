"""torchext.hf.from_gguf against transformers' own GGUF loader, on tiny models written here.

Each architecture's file is made as llama.cpp's converter makes one: a randomly initialised
transformers model (norms and biases perturbed too, so that none is a no-op), its tensors renamed to
GGUF's names, llama's attn_q/attn_k rows permuted and Gemma's norms stored as 1 + w, every matrix
quantized by torchext.quantize (llama.cpp's reference quantizers) in a mix of the eight formats,
norms and biases in F32, with the metadata transformers reads.

The oracle is transformers reading the same file: AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...) dequantizes every tensor with gguf's numpy code and runs float32 dense layers.
torchext's model holds the file's bytes and runs them through torchext.qmatmul:

- more rows than the format's GEMV takes (torchext.ops.gemv_max_rows: on the CPU 16 to 48 for these
  formats; a prompt of PAST_GEMV_ROWS tokens): the dense path, which multiplies the exactly
  dequantized weights with unrounded activations; only fp32 summation order differs from the oracle;
- up to that (a 6-token prompt, and every decode step): the Q8_1 GEMV, which rounds each
  32-value block of a layer's input to 8 bits (d = amax/127, README "Q8_1 activations") and is then
  exact up to fp32 accumulation. Its oracle is the same transformers model with every nn.Linear's
  input rounded that way first (q8_1_round below, a transcription of the rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import torchext
from conftest import gemv_rows, write_one_tensor_gguf
from torchext.formats import QType

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
hf = pytest.importorskip("torchext.hf")

HIDDEN, FFN, LAYERS, VOCAB = 256, 512, 2, 384
# the formats the files mix, written out (not read from torchext.formats): those torchext.quantize makes
FORMATS = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]
# a prompt past every format's GEMV rows on the CPU: every layer takes the dense path
PAST_GEMV_ROWS = max(gemv_rows(q) for q in FORMATS) + 1


@dataclass(frozen=True)
class Arch:
    """A tiny model of one architecture and how llama.cpp's converter writes it."""

    name: str  # the test id
    config: type  # transformers config class
    sizes: dict  # its tiny sizes beyond HIDDEN, FFN, LAYERS, VOCAB
    gguf_arch: str  # general.architecture
    tied: bool  # no output.weight: transformers ties lm_head to the embedding
    general_name: str = "tiny"
    permute_qk: bool = False  # llama.cpp's permutation of attn_q / attn_k rows (llama, mistral)
    norm_offset: float = 0.0  # llama.cpp stores Gemma's norms as 1 + w
    extra: dict = field(default_factory=dict)  # metadata beyond the common keys


ARCHS = [
    Arch("llama", transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2), "llama",
         tied=False, permute_qk=True),
    # llama.cpp writes Mistral as llama; transformers tells it apart by general.name
    Arch("mistral", transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64),
         "llama", tied=False, general_name="mistral", permute_qk=True),
    Arch("qwen2", transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2), "qwen2", tied=False),
    # Qwen3's head_dim is not in GGUF metadata: transformers takes the config default, 128
    Arch("qwen3", transformers.Qwen3Config, dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128),
         "qwen3", tied=True),
    Arch("phi3", transformers.Phi3Config, dict(num_attention_heads=4, num_key_value_heads=4), "phi3", tied=False),
    Arch("gemma2", transformers.Gemma2Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                                     sliding_window=16), "gemma2", tied=True, norm_offset=1.0),
    Arch("gemma3", transformers.Gemma3TextConfig, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                                        sliding_window=16), "gemma3", tied=True, norm_offset=1.0),
    # Mixture of experts: the *_exps tensors run packed on QuantExperts (qmatmul_id). GGUF holds no
    # expert FFN width that transformers reads, so these keep its config defaults (768; 1408 and
    # 5632 for Qwen2-MoE's experts and shared expert).
    Arch("qwen2_moe", transformers.Qwen2MoeConfig, dict(num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                                         num_experts_per_tok=2), "qwen2moe", tied=False,
         extra={"expert_count": 4, "expert_used_count": 2}),
    Arch("qwen3_moe", transformers.Qwen3MoeConfig, dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                                         num_experts=4, num_experts_per_tok=2), "qwen3moe",
         tied=False, extra={"expert_count": 4, "expert_used_count": 2, "attention.key_length": 128}),
]

# transformers' parameter names -> GGUF's (llama.cpp's tensor names), for these architectures
GGUF_NAMES = [
    (r"mlp\.shared_expert_gate\.", "ffn_gate_inp_shexp."), (r"mlp\.gate\.", "ffn_gate_inp."),
    (r"mlp\.shared_expert\.(gate|up|down)_proj", r"ffn_\1_shexp"), (r"mlp\.experts\.down_proj", "ffn_down_exps.weight"),
    (r"^model\.embed_tokens\.", "token_embd."), (r"^model\.norm\.", "output_norm."), (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.", r"blk.\1."),
    (r"self_attn\.q_proj", "attn_q"), (r"self_attn\.k_proj", "attn_k"), (r"self_attn\.v_proj", "attn_v"),
    (r"self_attn\.qkv_proj", "attn_qkv"), (r"self_attn\.o_proj", "attn_output"),
    (r"self_attn\.q_norm", "attn_q_norm"), (r"self_attn\.k_norm", "attn_k_norm"),
    (r"mlp\.gate_proj", "ffn_gate"), (r"mlp\.up_proj", "ffn_up"), (r"mlp\.gate_up_proj", "ffn_up"),
    (r"mlp\.down_proj", "ffn_down"), (r"input_layernorm", "attn_norm"),
    (r"pre_feedforward_layernorm", "ffn_norm"), (r"post_feedforward_layernorm", "post_ffw_norm"),
]


def gguf_name(arch: Arch, hf_name: str) -> str:
    # post_attention_layernorm is the FFN's input norm in llama-style models, a norm of the
    # attention's output in Gemma's sandwich
    post_attn = "post_attention_norm" if arch.gguf_arch.startswith("gemma") else "ffn_norm"
    name = hf_name.replace("post_attention_layernorm", post_attn)
    for pattern, repl in GGUF_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_experts(t: torch.Tensor, q: QType) -> np.ndarray:
    """[E, rows, k] float -> the GGUF bytes [E, rows, row bytes], each expert quantized on its own."""
    return torch.stack([torchext.quantize(e.contiguous(), q) for e in t]).numpy()


def write_gguf(arch: Arch, path: Path, seed: int, general_name: str | None = None) -> dict[str, QType]:
    """A tiny random `arch` model as a GGUF file (general.name: the arch's, or `general_name`);
    returns each packed tensor's format."""
    torch.manual_seed(seed)
    config = arch.config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                         tie_word_embeddings=arch.tied, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **arch.sizes)
    model = transformers.AutoModelForCausalLM.from_config(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or HIDDEN // heads
    w = gguf.GGUFWriter(str(path), arch.gguf_arch)
    a = arch.gguf_arch
    w.add_name(general_name or arch.general_name)
    for key, value in {"context_length": 128, "embedding_length": HIDDEN, "feed_forward_length": FFN,
                       "block_count": LAYERS, "attention.head_count": heads, "attention.head_count_kv": kv_heads,
                       "vocab_size": VOCAB}.items():
        w.add_uint32(f"{a}.{key}", value)
    w.add_float32(f"{a}.rope.freq_base", 10_000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
    if a == "llama":
        w.add_uint32(f"{a}.rope.dimension_count", head_dim)
    if a.startswith("gemma"):
        w.add_uint32(f"{a}.attention.key_length", head_dim)
        w.add_uint32(f"{a}.attention.sliding_window", config.sliding_window)
    for key, value in arch.extra.items():
        w.add_uint32(f"{a}.{key}", value)
    for key, token in (("bos", 1), ("eos", 2), ("padding", 0)):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", token)

    formats: dict[str, QType] = {}
    gen = torch.Generator().manual_seed(seed)
    for i, (name, t) in enumerate(model.state_dict().items()):
        if name == "lm_head.weight" and arch.tied:
            continue
        t = t.detach().float()
        g_name = gguf_name(arch, name)
        if t.dim() == 1:  # norms and biases: perturbed, so that a wrong offset or a lost bias shows
            t = (t + 0.1 * torch.randn(t.shape, generator=gen)) + arch.norm_offset * ("norm" in g_name)
            w.add_tensor(g_name, t.numpy())
            continue
        if "ffn_gate_inp" in g_name:  # routers stay F32, as llama.cpp writes them; the shared gate as [H]
            w.add_tensor(g_name, t.reshape(-1).numpy() if "shexp" in g_name else t.numpy())
            continue
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: GGUF's ffn_gate_exps and ffn_up_exps [E, I, H]
            prefix = g_name.rpartition(".mlp.")[0].replace("model.layers.", "blk.")
            for part, half in zip(("gate", "up"), t.chunk(2, dim=1)):
                q = FORMATS[(i + seed + len(formats)) % len(FORMATS)]
                formats[f"{prefix}.ffn_{part}_exps.weight"] = q
                w.add_tensor(f"{prefix}.ffn_{part}_exps.weight", quantize_experts(half, q),
                             raw_dtype=gguf.GGMLQuantizationType(q))
            continue
        if arch.permute_qk and ".attn_q." in g_name:
            t = llama_cpp_permute(t, heads)
        elif arch.permute_qk and ".attn_k." in g_name:
            t = llama_cpp_permute(t, kv_heads)
        q = FORMATS[(i + seed) % len(FORMATS)]
        formats[g_name] = q
        w.add_tensor(g_name, quantize_experts(t, q) if t.dim() == 3 else torchext.quantize(t.contiguous(), q).numpy(),
                     raw_dtype=gguf.GGMLQuantizationType(q))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return formats


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: a.name)
def models(request, tmp_path_factory):
    """(arch, formats, transformers' model, torchext's model) of one architecture's file."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch.name)
    path = folder / f"{arch.name}.gguf"
    formats = write_gguf(arch, path, seed=ARCHS.index(arch))
    oracle_path = path
    if arch.name == "mistral":
        # transformers 5.24 cannot map a Mistral file's tensors (it asks gguf for a "mistral"
        # architecture, which gguf's tables do not have: NotImplementedError). The oracle reads the
        # same tensors as llama (general.name not "mistral"): Mistral's computation is llama's
        # (its sliding window, when set, spans more than these prompts).
        oracle_path = folder / "as_llama.gguf"
        write_gguf(arch, oracle_path, seed=ARCHS.index(arch), general_name="tiny")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=oracle_path.name,
                                                            dtype=torch.float32).eval()
    ours = hf.from_gguf(folder, gguf_file=path.name)
    return arch, formats, ref, ours


def q8_1_round(x: torch.Tensor) -> torch.Tensor:
    """x with each 32-value block rounded as torchext's Q8_1 quantization rounds it: d = amax/127 in
    fp32, its bits rounded up to 10 mantissa bits; d * round-half-away(x / d)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    bits = (amax / 127).view(torch.int32)
    d = ((bits + 0x1FFF) & ~0x1FFF).view(torch.float32)
    v = (blocks / d).double()
    q = torch.where(amax > 0, v.sign() * (v.abs() + 0.5).floor(), 0.0)
    return (q * d.double()).float().reshape(x.shape).to(x.dtype)


def with_q8_1_inputs(model: torch.nn.Module, ours: torch.nn.Module):
    """Hooks rounding the input of every nn.Linear with q8_1_round when it has at most
    torchext.ops.gemv_max_rows rows for the format of ours' layer of that name, as torchext.qmatmul's
    GEMV does (more rows take an unrounded path), and every experts module's matmul inputs
    (q8_1_experts, by the formats of ours' experts of that name); the returned function removes them."""
    formats = {name: m.qtype for name, m in ours.named_modules() if isinstance(m, torchext.nn.QuantLinear)}
    expert_formats = {name: m.qtypes for name, m in ours.named_modules() if isinstance(m, torchext.nn.QuantExperts)}

    def round_gemv_rows(qtype):
        def hook(module, args):
            x = args[0]
            gemv = x.numel() // x.shape[-1] <= torchext.ops.gemv_max_rows(x, module.out_features, qtype)
            return (q8_1_round(x),) if gemv else None
        return hook

    # Qwen2-MoE's shared_expert_gate is an F32 tensor in the file: a dense nn.Linear in torchext's model too
    hooks = [m.register_forward_pre_hook(round_gemv_rows(formats[name])) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not name.endswith("shared_expert_gate")]
    experts = {name: m for name, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    for name, m in experts.items():
        m.forward = q8_1_experts(m, expert_formats[name])
    return lambda: [h.remove() for h in hooks] + [delattr(m, "forward") for m in experts.values()]


def q8_1_experts(experts: torch.nn.Module, qtypes):
    """The forward of transformers' experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I]) with
    each expert matmul's input rounded by q8_1_round when the block has at most
    torchext.ops.gemv_max_tokens tokens for that matmul's format (qtypes: gate, up, down), as
    qmatmul_id's GEMV rounds them (its path depends on the token count alone), token by token."""
    def forward(hidden_states, top_k_index, top_k_weights):
        gemv = [hidden_states.shape[0] <= torchext.ops.gemv_max_tokens(hidden_states, q) for q in qtypes]
        round_gate, round_up, round_down = (q8_1_round if g else (lambda v: v) for g in gemv)
        x, out = hidden_states, torch.zeros_like(hidden_states)
        for t in range(x.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                w_gate, w_up = experts.gate_up_proj[e].chunk(2, dim=0)
                gate = torch.nn.functional.linear(round_gate(x[t]), w_gate)
                up = torch.nn.functional.linear(round_up(x[t]), w_up)
                h = round_down(experts.act_fn(gate) * up)
                out[t] += top_k_weights[t, j] * torch.nn.functional.linear(h, experts.down_proj[e])
        return out
    return forward


def prompt(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, rows), generator=torch.Generator().manual_seed(seed))


def test_config_is_the_one_transformers_reads(models):
    """from_gguf has transformers read the config from a copy of the file's metadata without the
    tokenizer's arrays and the tensor data (hf._metadata_file): the same config as transformers'
    own reading of the whole file, but the mistral file that transformers cannot map (fixture)."""
    arch, _, ref, ours = models
    if arch.name == "mistral":
        pytest.skip("the oracle reads a llama file (models fixture)")
    # quantization_config: transformers records its own GGUF loading there
    ignore = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "quantization_config"}
    want, got = ({k: v for k, v in m.config.to_dict().items() if k not in ignore} for m in (ref, ours))
    assert got == want


def test_every_packed_tensor_is_on_a_torchext_layer(models):
    """Every matrix of the file is a QuantLinear (or the QuantEmbedding) holding the file's
    format, every MoE layer's experts a QuantExperts holding its three *_exps formats; no
    nn.Linear is left but those of dense tensors (Qwen2-MoE's shared-expert gate); a tied head
    reads the embedding's bytes."""
    arch, formats, _, ours = models
    packed_types = (torchext.nn.QuantLinear, hf.QuantEmbedding)
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, packed_types)}
    assert not [n for n, m in ours.named_modules()
                if type(m) is torch.nn.Linear and gguf_name(arch, n + ".weight") in formats]
    experts = {name: m for name, m in ours.named_modules() if isinstance(m, torchext.nn.QuantExperts)}
    assert len(experts) == (LAYERS if arch.name.endswith("moe") else 0)
    for name, m in experts.items():
        blk = gguf_name(arch, name).rpartition(".mlp.")[0]
        assert m.qtypes == tuple(formats[f"{blk}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")), name
    assert isinstance(ours.get_input_embeddings(), hf.QuantEmbedding)
    assert ours.get_input_embeddings().qtype == formats["token_embd.weight"]
    for name, m in layers.items():
        if name == "lm_head" and arch.tied:
            assert m.weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()
            continue
        assert m.qtype == formats[gguf_name(arch, name + ".weight")], name
    assert len(set(formats.values())) >= 5  # a mix of formats in each file
    assert all(p.dtype == torch.float32 for p in ours.parameters())


# the activation of each architecture's gated MLPs (Qwen2-MoE: its shared expert; Phi-3: gate and up stacked
# in one gate_up_proj); Qwen3-MoE has no dense MLP
GATED_MLPS = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu", "gemma2": "gelu_tanh",
              "gemma3": "gelu_tanh", "qwen2_moe": "silu", "phi3": "silu"}


def test_gated_mlps_become_quant_gated_mlps(models):
    """Every MLP whose forward is transformers' down_proj(act_fn(gate_proj(x)) * up_proj(x)) is a
    torchext.nn.QuantGatedMLP over the same layers (state_dict keys unchanged), with its activation;
    Phi-3's (gate_up_proj, chunked) a QuantStackedGatedMLP."""
    arch, _, ref, ours = models
    cls, projections = ((torchext.nn.QuantStackedGatedMLP, ("gate_up_proj", "down_proj")) if arch.name == "phi3"
                        else (torchext.nn.QuantGatedMLP, ("gate_proj", "up_proj", "down_proj")))
    fused = {name: m for name, m in ours.named_modules() if isinstance(m, cls)}
    assert len(fused) == (LAYERS if arch.name in GATED_MLPS else 0)
    assert {m.activation for m in fused.values()} <= {GATED_MLPS.get(arch.name)}
    keys = set(ref.state_dict())
    assert all(f"{name}.{p}.weight" in keys for name in fused for p in projections)


def test_only_the_gated_formula_with_a_known_activation_fuses():
    """hf._fuse_gated_mlps replaces an MLP only when its forward's bytecode is the formula's (a subclass that
    changes it keeps its own) and its act_fn is F.silu's or F.gelu's."""
    def layer(n, k, seed):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
        return torchext.nn.QuantLinear(torchext.quantize(w, QType.Q8_0), QType.Q8_0, k, n)

    class MLP(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = layer(64, 32, 0), layer(64, 32, 1), \
                layer(32, 64, 2), act

        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj

    class Scaled(MLP):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    acts = transformers.activations.ACT2FN
    model = torch.nn.ModuleDict({"silu": MLP(acts["silu"]), "tanh": MLP(acts["gelu_pytorch_tanh"]),
                                 "erf": MLP(torch.nn.GELU()), "relu": MLP(torch.nn.ReLU()),
                                 "new_gelu": MLP(acts["gelu_new"]), "scaled": Scaled(acts["silu"])})
    x = torch.randn(2, 32)
    want = {name: m(x) for name, m in model.items()}
    hf._fuse_gated_mlps(model)
    assert {name: getattr(m, "activation", None) for name, m in model.items()} == {
        "silu": "silu", "tanh": "gelu_tanh", "erf": "gelu", "relu": None, "new_gelu": None, "scaled": None}
    for name, m in model.items():  # the same layers and formula: the CPU runs F.silu / F.gelu in both
        assert torch.equal(m(x), want[name]), name


def test_dense_path_logits_match_transformers(models):
    """PAST_GEMV_ROWS rows: every QuantLinear takes the dense path (the weights dequantized exactly, as gguf's
    numpy dequantization gives them; activations unrounded), so the two models compute the same
    function and differ by fp32 summation order only. Each matmul's rounding is at most
    ~k * 2^-24 * |x| @ |W| (k <= 512: 3e-5 of |x| @ |W|), in practice ~sqrt(k) * 2^-24 (1e-6);
    through two layers, softcaps and norms that stays below 1e-4 of the largest logit
    (measured: bit-identical for six of the seven, 9e-7 for qwen2)."""
    _, _, ref, ours = models
    ids = prompt(PAST_GEMV_ROWS)
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale, float((got - want).abs().max() / scale)


# Against plain transformers (unrounded inputs) the GEMV's rounding itself shows. Per value it is
# uniform in +-d/2, d = amax/127, and amax of 32 Gaussian-like values is ~2.1 sigma: an rms error of
# 2.1/127/sqrt(12) = 0.5% of the values' scale, so ~0.5% of each matmul's output. A logit's path holds
# ~5 chained matmuls (attention and MLP of two layers, the head), ~1.1% norm-relative; the largest of
# 6 x 384 logit errors is ~3x the rms. Bound: 8% of the largest logit (measured: 0.4-2.9%).
GEMV_VS_PLAIN = 8e-2


def test_gemv_path_logits_match_transformers_with_q8_1_inputs(models):
    """6 rows: every QuantLinear takes the Q8_1 GEMV. Against transformers with each nn.Linear's
    input rounded to Q8_1 (q8_1_round), the computation is the same up to fp32 accumulation,
    except where an upstream fp32 difference (~1e-6 relative) moves an activation across a
    rounding boundary: that changes one value by d = amax/127 and an output by d * |w|, about
    1/127/sqrt(256) = 5e-4 of the output's scale; the bound is 2e-3 of the largest logit
    (measured: <= 4e-7, no flip). Against plain transformers: GEMV_VS_PLAIN.

    The MoE files round at more points (every expert's inputs, ~10,000 values a layer here), so an
    upstream fp32 difference flips one there, and the next layer's rounded inputs then differ by
    that flip's effect (1e-5 relative), far above fp32's, flipping many more (measured: 2.6e-7 of the
    largest logit for qwen2_moe, no flip; 0.8% for qwen3_moe). For them the model-level bound is GEMV_VS_PLAIN; the
    tight check is layer by layer on the same inputs
    (test_moe_layers_match_transformers_with_q8_1_inputs_layer_by_layer), and the experts' own
    exactness against the rounded oracle is test_experts_match_transformers_with_q8_1_inputs'."""
    arch, _, ref, ours = models
    ids = prompt(6)
    with torch.no_grad():
        got = ours(ids).logits
        plain = ref(ids).logits
        remove = with_q8_1_inputs(ref, ours)
        try:
            rounded = ref(ids).logits
        finally:
            remove()
    bound = GEMV_VS_PLAIN if arch.name.endswith("moe") else 2e-3
    assert (got - rounded).abs().max() <= bound * rounded.abs().max(), float((got - rounded).abs().max())
    assert (got - plain).abs().max() <= GEMV_VS_PLAIN * plain.abs().max(), float((got - plain).abs().max())
    assert (got - plain).abs().max() > 0  # the GEMV path was taken: the rounding shows


def test_moe_layers_match_transformers_with_q8_1_inputs_layer_by_layer(models):
    """The MoE files' tight check, which the model-level test cannot make (a flip upstream reaches the
    next layer's rounded inputs): each decoder layer of torchext's model and of transformers' (every
    matmul input rounded to Q8_1, with_q8_1_inputs) run on the same inputs, the ones torchext's layer
    got in a 6-row forward (the GEMV path). They then differ as the model-level test's dense
    architectures do: fp32 summation order, or one rounding flip of ~5e-4 of an output's scale.
    Bound 2e-3 of the layer output's largest value, as there (measured: 5.5e-7 to 7.8e-5)."""
    arch, _, ref, ours = models
    if not arch.name.endswith("moe"):
        pytest.skip("no experts in this architecture")
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, args, kwargs, out: seen.append((args, kwargs, out)),
                                         with_kwargs=True) for layer in ours.model.layers]
    try:
        with torch.no_grad():
            ours(prompt(6), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(ref.model.layers)
    remove = with_q8_1_inputs(ref, ours)
    try:
        for i, (layer_ref, (args, kwargs, out)) in enumerate(zip(ref.model.layers, seen)):
            with torch.no_grad():
                want = layer_ref(*args, **kwargs)
            got, want = (o[0] if isinstance(o, tuple) else o for o in (out, want))
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= 2e-3, f"layer {i}: {err}"
    finally:
        remove()


@pytest.mark.parametrize("tokens", [6, PAST_GEMV_ROWS])
def test_experts_match_transformers_with_q8_1_inputs(models, tokens):
    """Each MoE layer's QuantExperts against transformers' experts module on the same hidden states,
    expert ids and routing weights: 6 tokens take qmatmul_id's GEMV, whose oracle rounds each expert
    matmul's input to Q8_1 (q8_1_experts); PAST_GEMV_ROWS take its exact path, whose oracle is the
    plain module.
    Either way the two compute the same products and differ by fp32 summation order (~sqrt(k) *
    2^-24 relative, k <= 1408), except where that moves a down projection's input (computed from the
    gate and up outputs) across a Q8_1 rounding boundary: one step d = amax/127 of one value, about
    5e-4 of the output's scale (as in the model-level test). Bound 2e-3 of the largest output
    (measured: 6e-7 without a flip, 1.7e-4 with one)."""
    arch, _, ref, ours = models
    if not arch.name.endswith("moe"):
        pytest.skip("no experts in this architecture")
    gen = torch.Generator().manual_seed(tokens)
    for layer_ref, layer_ours in zip(ref.model.layers, ours.model.layers):
        num_experts, hidden = layer_ours.mlp.experts.num_experts, layer_ours.mlp.experts.hidden_size
        x = torch.randn(tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=gen)
        with torch.no_grad():
            want = q8_1_experts(layer_ref.mlp.experts, layer_ours.mlp.experts.qtypes)(x, ids, weights)
            got = layer_ours.mlp.experts(x, ids, weights)
        assert (got - want).abs().max() <= 2e-3 * want.abs().max(), float((got - want).abs().max() / want.abs().max())


def test_greedy_generation_matches_transformers(models):
    """A 20-token prompt (the dense path, but for the Q4_K and Q5_K layers, whose CPU GEMV takes up to 48
    and 32 rows: the oracle rounds their inputs too), then 6 greedy decode steps (one row each: the GEMV
    path), with transformers' dynamic cache and with its static cache. The tokens are those of the oracle
    that rounds its GEMV-sized inputs to Q8_1 (the GEMV's only rounding). Plain transformers may
    part from them only on a near tie: each of our tokens is, by plain transformers' logits of the
    same sequence, within 2 * GEMV_VS_PLAIN * (largest logit) of its best."""
    _, _, ref, ours = models
    ids = prompt(20, seed=1)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        remove = with_q8_1_inputs(ref, ours)
        try:
            want = ref.generate(ids, **settings)
        finally:
            remove()
        got = ours.generate(ids, **settings)
        got_static = ours.generate(ids, cache_implementation="static", **settings)
        plain = ref(got).logits[0, ids.shape[1] - 1:-1]
    assert got.tolist() == want.tolist()
    assert got_static.tolist() == got.tolist()
    chosen = plain.gather(-1, got[0, ids.shape[1]:, None])[:, 0]
    assert (plain.max(-1).values - chosen <= 2 * GEMV_VS_PLAIN * plain.abs().max()).all()


def test_cpu_generation_compiled_with_static_cache(tmp_path):
    """On the CPU transformers compiles generate()'s forward pass only when asked (a CompileConfig
    with _compile_all_devices): fullgraph, so every torchext op traces through its fake kernel
    without a graph break; the aot_eager backend runs the traced graph without inductor's code
    generation (minutes on two cores; test_compile.py covers inductor). Tokens as uncompiled."""
    from transformers import CompileConfig

    path = tmp_path / "llama.gguf"
    write_gguf(ARCHS[0], path, seed=0)
    model = hf.from_gguf(path)
    ids = prompt(20, seed=1)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        want = model.generate(ids, disable_compile=True, **settings)
        got = model.generate(ids, compile_config=config, **settings)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled
    assert got.tolist() == want.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "gemma3")], ids=lambda a: a.name)
def test_cuda_generation_compiled_with_static_cache(arch, tmp_path):
    """The same file on the GPU: generate() with transformers' static cache, which on CUDA compiles
    the forward pass (torch.compile, mode "reduce-overhead": CUDA graphs) on its own. The prompt
    (past every format's GEMV rows on either device) takes the dense path, each decode step the Q8_1
    GEMV: the same rounding rule as on the CPU, so
    the tokens are the CPU model's (fp32 accumulation order differs; a flip would need a near-tie,
    which these seeds do not have). Two architectures keep the compile time down (llama: plain
    linears and a separate head; gemma3: tied head, norms with offsets, sliding windows)."""
    path = tmp_path / f"{arch.name}.gguf"
    write_gguf(arch, path, seed=ARCHS.index(arch))
    ids = prompt(PAST_GEMV_ROWS, seed=1)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = hf.from_gguf(path).generate(ids, **settings)
        gpu = hf.from_gguf(path, device="cuda")
        assert all(b.device.type == "cuda" for b in gpu.buffers()) and all(p.is_cuda for p in gpu.parameters())
        got = gpu.generate(ids.cuda(), cache_implementation="static", **settings)
    assert got.cpu().tolist() == want.tolist()


# ---- bad inputs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama") / "llama.gguf"
    write_gguf(ARCHS[0], path, seed=0)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf: no such file"):
        hf.from_gguf(tmp_path, gguf_file="nope.gguf")
    with pytest.raises(FileNotFoundError, match="gguf_file="):
        hf.from_gguf(tmp_path)


def test_cut_file_is_refused(llama_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(llama_file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="cut.gguf: tensor 'output.weight'.*past the end"):
        hf.from_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = write_one_tensor_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ValueError, match="architecture 'rwkv6' is not one transformers .* reads from GGUF; it reads "
                                         ".*llama"):
        hf.from_gguf(path)


def test_model_class_may_be_a_model_class(llama_file):
    """model_class= takes a model class as the docstring says (it has _from_config, not from_config: it was an
    AttributeError), giving the Auto class's model; one of another architecture is a ValueError naming both."""
    ids = prompt(6)
    auto = hf.from_gguf(llama_file)
    for cls in (transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM):
        model = hf.from_gguf(llama_file, model_class=cls)
        assert type(model) is transformers.LlamaForCausalLM
        with torch.no_grad():
            assert torch.equal(model(ids).logits, auto(ids).logits)
    base = hf.from_gguf(llama_file, model_class=transformers.LlamaModel)
    assert type(base) is transformers.LlamaModel
    with pytest.raises(ValueError, match=r"llama.gguf: Qwen2ForCausalLM takes a Qwen2Config; this file's architecture "
                                         r"'llama' gives a LlamaConfig"):
        hf.from_gguf(llama_file, model_class=transformers.Qwen2ForCausalLM)


def rewrite_llama_file(src, dst, tensor) -> None:
    """A copy of the llama GGUF file src at dst, its name and llama.* metadata kept, each tensor t
    as tensor(t) gives it: (array, raw gguf type), or None to leave it out."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for name, f in reader.fields.items():
        if name == "general.name":
            w.add_name(f.contents())
        elif name.startswith("llama."):
            (w.add_float32 if isinstance(f.contents(), float) else w.add_uint32)(name, f.contents())
    for t in reader.tensors:
        kept = tensor(t)
        if kept is not None:
            w.add_tensor(t.name, kept[0], raw_dtype=kept[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_packed_tensor_that_is_no_linear_weight(llama_file, tmp_path):
    """A norm written in a packed format (its values would have to become a dense vector) is
    refused with the tensor's name and what it maps to."""
    path = tmp_path / "packed_norm.gguf"

    def pack_the_norm(t):
        if t.name != "output_norm.weight":
            return np.array(t.data), t.tensor_type
        packed = torchext.quantize(torch.from_numpy(np.array(t.data)).reshape(1, HIDDEN), QType.Q8_0)
        return packed.numpy(), gguf.GGMLQuantizationType.Q8_0

    rewrite_llama_file(llama_file, path, pack_the_norm)
    with pytest.raises(ValueError, match=r"tensor 'output_norm.weight' \(Q8_0, 1x256\): maps to model.norm.weight, "
                                         r"of a LlamaRMSNorm"):
        hf.from_gguf(path)


def test_file_without_a_tensor_the_model_needs(llama_file, tmp_path):
    path = tmp_path / "no_down.gguf"
    rewrite_llama_file(llama_file, path,
                       lambda t: None if t.name == "blk.1.ffn_down.weight" else (np.array(t.data), t.tensor_type))
    with pytest.raises(ValueError, match=r"no tensor for 1 parameters of LlamaForCausalLM: "
                                         r"model.layers.1.mlp.down_proj.weight"):
        hf.from_gguf(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, "float64", "auto", "cuda"])
def test_dtype_other_than_the_three_is_refused(llama_file, dtype):
    """Refused before the file is read: int32 was reported as an architecture without a model (from_gguf
    wraps from_config's ValueError), float64 loaded and failed only in the first forward's op."""
    with pytest.raises(ValueError, match=r"dtype: expected one of torch.float32, torch.float16, torch.bfloat16 "
                                         r"or its name \(.*\), got "):
        hf.from_gguf(llama_file, dtype=dtype)


def test_from_pretrained_names_for_dtype_and_device_are_taken(llama_file):
    """torch_dtype and device_map, which from_pretrained takes, went to AutoConfig unused: the model stayed float32 on
    the CPU without a word. They are taken for dtype and device (a dtype's name too); a device_map spreading the
    model over devices, both names of one argument, or a keyword nothing uses are ValueErrors naming it."""
    ids = prompt(6)
    want = hf.from_gguf(llama_file, dtype=torch.bfloat16)
    for kwargs in (dict(torch_dtype=torch.bfloat16), dict(dtype="bfloat16"), dict(torch_dtype="bfloat16"),
                   dict(torch_dtype=torch.bfloat16, device_map="cpu"),
                   dict(torch_dtype=torch.bfloat16, device_map=torch.device("cpu"))):
        model = hf.from_gguf(llama_file, **kwargs)
        assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want(ids).logits)
    for kwargs, message in [(dict(device_map="auto"), r"device_map='auto': from_gguf puts the whole model on one "
                                                      r"device; pass device="),
                            (dict(device_map={"": 0, "lm_head": "cpu"}), r"device_map=\{.*\}: from_gguf puts"),
                            (dict(device="cpu", device_map="cpu"), r"device and device_map both given"),
                            (dict(dtype=torch.float16, torch_dtype=torch.float16), r"dtype and torch_dtype .*both"),
                            (dict(frobnicate=3, low_cpu_mem_usage=True),
                             r"from_gguf: 'frobnicate', 'low_cpu_mem_usage': neither from_gguf \(device, dtype, "
                             r"model_class\) nor transformers' AutoConfig.from_pretrained.*uses it")]:
        with pytest.raises(ValueError, match=message):
            hf.from_gguf(llama_file, **kwargs)
    assert hf.from_gguf(llama_file, attn_implementation="eager").config._attn_implementation == "eager"


def with_value(src: bytes, key: bytes, value: int) -> bytes:
    """src, a GGUF file's bytes, with the value of UINT32 metadata `key` replaced by `value`."""
    at = src.index(key) + len(key) + 4  # past the key and its value type
    return src[:at] + value.to_bytes(4, "little") + src[at + 4:]


@pytest.mark.parametrize("key, value, message", [
    # transformers built a billion layers on the meta device (and gguf's tensor name map as many), never returning
    (b"llama.block_count", 10**9, r"llama.block_count is 1000000000, but the file's tensors are of 2 layers "
                                  r"\(blk.0 to blk.1\)"),
    (b"llama.embedding_length", 10**9, r"llama.embedding_length is 1000000000, but token_embd.weight has rows of "
                                       r"256 values"),
    # transformers 5.2x's config validation raises a StrictDataclassClassValidationError (no ValueError), which
    # names the heads; its earlier versions build the config, and the attention's shapes do not fit the tensors
    (b"llama.attention.head_count", 7, r""),
    # an AssertionError from nn.Embedding, under the model's construction
    (b"tokenizer.ggml.padding_token_id", 10**5, r"transformers cannot build AutoModelForCausalLM for this file's "
                                                r"architecture 'llama' \(model_type 'llama'\) and metadata: "
                                                r"AssertionError: Padding_idx"),
])
def test_metadata_that_contradicts_the_file_is_a_value_error(llama_file, tmp_path, key, value, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(with_value(llama_file.read_bytes(), key, value))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message) as error:
        hf.from_gguf(path)
    if key == b"llama.attention.head_count" and "StrictDataclass" in str(error.value):
        assert "transformers cannot build a config from this 'llama' file's metadata" in str(error.value)
        assert "attention heads (7)" in str(error.value)


def test_a_string_that_is_not_utf8_is_named(llama_file, tmp_path):
    """transformers' reader failed on it with an OSError naming from_gguf's metadata copy, a temporary file:
    'It looks like the config file at ... is not a valid JSON file'."""
    path = tmp_path / "bad.gguf"
    src = llama_file.read_bytes()
    assert src.count(b"tiny") == 1  # general.name's value
    path.write_bytes(src.replace(b"tiny", b"\x80iny"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": key 'general.name': its string value is not "
                                         r"UTF-8 \(invalid start byte at its byte 0\)"):
        hf.from_gguf(path)


def test_save_pretrained_is_refused_saying_what_works(llama_file, tmp_path):
    """save_pretrained failed inside huggingface_hub ('dict' object has no attribute 'device': the
    QuantLinear layers' format records in the state_dict); it says what to do instead, and the
    state_dict round trip it points to works."""
    model = hf.from_gguf(llama_file)
    with pytest.raises(NotImplementedError, match=r"save_pretrained of a torchext.hf.from_gguf LlamaForCausalLM: .*"
                                                  r"load it again with from_gguf.*torch.save\(model.state_dict\(\)\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotImplementedError, match="push_to_hub of a torchext.hf.from_gguf"):  # before any Hub call
        model.push_to_hub("someone/model")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    again = hf.from_gguf(llama_file)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    ids = prompt(6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_quant_embedding_state_dict_is_checked_as_quant_linears():
    """The table's bytes mean nothing without their format: Q4_0 and Q4_K rows of 256 values are both 144
    bytes, and a Q4_0 table loaded into a Q4_K embedding gave values near 2e6 without an error; a float
    table was cast to bytes. Both are refused, naming the layer's format and shape, and nothing of the
    module is overwritten; assign=True makes a non-contiguous table contiguous rows."""
    table = torch.randn(8, 256)
    q4_k = hf.QuantEmbedding(torchext.quantize(table, QType.Q4_K), QType.Q4_K, 8, 256)
    q4_0 = hf.QuantEmbedding(torchext.quantize(table, QType.Q4_0), QType.Q4_0, 8, 256)
    assert q4_k.weight.shape == q4_0.weight.shape
    before = q4_k.weight.clone()
    with pytest.raises(RuntimeError, match=r"weight: the state_dict holds Q4_0 bytes \(num_embeddings=8, "
                                           r"embedding_dim=256\), this layer is Q4_K .* load it into a "
                                           r"QuantEmbedding of that format and shape"):
        q4_k.load_state_dict(q4_0.state_dict())
    sd = q4_k.state_dict()
    sd["weight"] = sd["weight"].float()
    with pytest.raises(RuntimeError, match=r"weight: expected raw Q4_K bytes as a uint8 tensor, got torch.float32; "
                                           r"quantize float weights first \(torchext.quantize\)"):
        q4_k.load_state_dict(sd)
    assert torch.equal(q4_k.weight, before)
    sd = q4_k.state_dict()
    sd["weight"] = sd["weight"].t().contiguous().t()
    fresh = hf.QuantEmbedding(torch.zeros_like(before), QType.Q4_K, 8, 256)
    fresh.load_state_dict(sd, assign=True)
    ids = torch.tensor([[0, 5, 7]])
    assert fresh.weight.is_contiguous() and torch.equal(fresh(ids), q4_k(ids))


def test_quant_embedding_follows_dtype_conversions(llama_file):
    """Like nn.Embedding, the output dtype follows .to(dtype), .half(), .float(): it was a plain
    attribute, so from_gguf(...).to(torch.bfloat16) ran its residual stream in float32. The state_dict
    keeps the table's bytes and their format and shape, not the dtype."""
    emb = hf.QuantEmbedding(torchext.quantize(torch.randn(16, 64), QType.Q8_0), QType.Q8_0, 16, 64)
    ids = torch.tensor([[1, 2, 3]])
    want = emb(ids)
    for convert, dtype in [(lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                           (lambda m: m.float(), torch.float32)]:
        assert convert(emb) is emb and emb.dtype == dtype
        assert torch.equal(emb(ids), want.to(dtype))  # the float32 rows, rounded once to dtype
    assert list(emb.state_dict()) == ["weight", "_extra_state"]
    # a module pickled when the dtype was a plain attribute (its __dict__ then) loads as one of today's
    old = hf.QuantEmbedding.__new__(hf.QuantEmbedding)
    state = {k: v for k, v in emb.__dict__.items()}
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != "_out_dtype"}
    state["dtype"] = torch.bfloat16
    old.__setstate__(state)
    assert old.dtype == torch.bfloat16 and torch.equal(old(ids), want.to(torch.bfloat16))
    model = hf.from_gguf(llama_file).to(torch.bfloat16)
    with torch.no_grad():
        assert model.get_input_embeddings()(ids).dtype == torch.bfloat16
        assert model(prompt(6)).logits.dtype == torch.bfloat16


def test_quant_embedding_checks_dtype_and_padding_idx():
    """As nn.Embedding: a padding_idx within the table, a negative one counted from its end; the output
    dtype one of the three the kernels compute in (float64 once failed only at the first forward)."""
    data = torchext.quantize(torch.randn(16, 64), QType.Q8_0)
    assert hf.QuantEmbedding(data, QType.Q8_0, 16, 64, padding_idx=-1).padding_idx == 15
    for bad in (16, -17, 1.5, True):
        with pytest.raises(ValueError, match=f"padding_idx: expected a row of the 16-row table, got {bad!r}"):
            hf.QuantEmbedding(data, QType.Q8_0, 16, 64, padding_idx=bad)
    with pytest.raises(ValueError, match="dtype: expected one of torch.float32, torch.float16, torch.bfloat16, got "
                                         "torch.float64"):
        hf.QuantEmbedding(data, QType.Q8_0, 16, 64, dtype=torch.float64)


# ---- the real file ----------------------------------------------------------------------------------

def test_gemma3_270m_loads_within_the_file_size_plus_20_percent():
    """Peak resident memory of from_gguf on Gemma 3 270M Q4_K_M, in a fresh process, above a
    baseline that has imported transformers' Gemma 3 code (torchext.hf --memory): the packed bytes
    (235 MiB of the 241 MiB file) and little else (measured: 242 MiB)."""
    from conftest import skip_without_gemma_gguf
    skip_without_gemma_gguf()
    import os
    import subprocess
    import sys
    from torchext.models.gemma3 import gguf_path

    path = gguf_path()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "torchext.hf", "--memory", str(path)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    increase = float(re.search(r"peak resident-memory increase of (\d+) MiB", out.stdout).group(1))
    assert increase <= 1.2 * os.path.getsize(path) / 2**20, out.stdout


def test_gemma3_270m_logits_match_torchext_gemma3():
    """Gemma 3 270M Q4_K_M (skipped without the gemma extra) through from_gguf (transformers'
    Gemma3ForCausalLM on the file's bytes) against torchext.models.gemma3 (hand-written, over the
    same bytes in a WeightCache pool; its config from transformers' reading of the metadata, checked
    against the file's known sizes, which saves re-parsing the 262,144-token vocabulary).

    A prompt of PAST_GEMV_ROWS tokens takes the dense path in both: the same function up to fp32 summation order
    (and transformers' norms subtracting then re-adding the stored 1): bound 1e-3 on logits up to
    ~30 (measured ~1e-4), as tests/test_gemma3.py bounds its prompt pass. Prompts of 1 to 5 tokens
    take the Q8_1 GEMV in both, the same rounding rule; but an ulp-level upstream difference that
    moves an activation across a rounding boundary changes it by d = amax/127, and 18 layers pass
    such changes on: measured 0.5-1.6% norm-relative at each position, the same top token. Bound:
    5% norm-relative, same top token."""
    from conftest import skip_without_gemma_gguf
    skip_without_gemma_gguf()
    from torchext.models.gemma3 import Gemma3, Gemma3Config, gguf_path

    path = gguf_path()
    ours = hf.from_gguf(path)
    c = ours.config
    cfg = Gemma3Config(vocab_size=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                       heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                       ffn=c.intermediate_size, eps=c.rms_norm_eps,
                       rope_base_global=c.rope_parameters["full_attention"]["rope_theta"],
                       sliding_window=c.sliding_window, context_length=c.max_position_embeddings)
    assert (cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn,
            cfg.rope_base_global) == (262144, 640, 18, 4, 1, 256, 2048, 1e6)
    ref = Gemma3(torchext.WeightCache.from_gguf(path, pool=True), cfg, max_seq_len=64)
    # "<bos>The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    # as Gemma's tokenizer encodes it
    ids = [2, 818, 5279, 529, 7001, 563, 9079, 236761, 669, 5279, 529, 9405, 563, 15687, 236761, 669, 5279, 529,
           11702, 563]
    prompt_ids = (ids * 3)[:PAST_GEMV_ROWS]  # the file's formats are among FORMATS
    with torch.no_grad():
        ref.reset()
        want = ref(torch.tensor([prompt_ids]), torch.arange(len(prompt_ids)), all_logits=True)[0]
        got = ours(torch.tensor([prompt_ids])).logits[0]
        assert (got - want).abs().max() < 1e-3
        ref.reset()
        for i, token in enumerate(ids[:5]):
            step_want = ref(torch.tensor([[token]]), torch.tensor([i]))[0]
            step_got = ours(torch.tensor([ids[:i + 1]])).logits[0, -1]
            assert (step_got - step_want).norm() < 5e-2 * step_want.norm(), i
            assert step_got.argmax() == step_want.argmax(), i
