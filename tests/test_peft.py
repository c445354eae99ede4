"""peft LoRA around torchext's packed GGUF weights (torchext.hf.register_lora), on a tiny llama
file written as in tests/test_transformers.py.

The oracle for the numbers is transformers' own reading of the same file (every weight
dequantized by gguf's numpy code into nn.Linear) with the same adapter: peft needs no custom
layer there. A 24-token sequence takes torchext's dense path, whose forward multiplies the exactly
dequantized weights and whose backward multiplies the gradient by them (torchext.ops' autograd),
so losses and gradients agree with the oracle up to fp32 summation order: 1e-4 relative, as
test_transformers.py's dense-path bound (measured ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

import torchext

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("torchext.hf")
from test_transformers import ARCHS, VOCAB, write_gguf  # noqa: E402  (after the skips)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "llama.gguf"
    write_gguf(ARCHS[0], path, seed=3)
    return path


def lora_config() -> "peft.LoraConfig":
    return hf.register_lora(peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))


def packed_bytes(model) -> dict[str, torch.Tensor]:
    """Each QuantLinear's bytes, by its name in the model before peft wrapped it."""
    return {name.replace(".base_layer", ""): m.weight.clone() for name, m in model.named_modules()
            if isinstance(m, torchext.nn.QuantLinear)}


def sequence(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def train_lora(path, device="cpu", dtype=torch.float32):
    """(peft model, losses, gradients of the first step, packed bytes before training) after 8
    AdamW steps on one batch, LoRA on every QuantLinear of the decoder layers."""
    model = hf.from_gguf(path, device=device, dtype=dtype)
    before = packed_bytes(model)
    peft_model = peft.get_peft_model(model, lora_config())
    ids = sequence().to(device)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses, first_grads = [], None
    for _ in range(8):
        # the embeddings as a leaf, to see the gradient reach the activations below every layer
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = peft_model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if first_grads is None:
            first_grads = {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.requires_grad}
            first_grads["inputs_embeds"] = embeds.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return peft_model, losses, first_grads, before


@pytest.fixture(scope="module")
def trained(gguf_file):
    return train_lora(gguf_file)


def test_lora_layers_wrap_the_packed_layers(trained):
    peft_model, _, _, _ = trained
    lora_class = hf.quant_lora_linear_class()
    wrapped = {name: m for name, m in peft_model.named_modules() if isinstance(m, lora_class)}
    assert len(wrapped) == 2 * len(TARGETS)  # two layers
    assert all(isinstance(m.get_base_layer(), torchext.nn.QuantLinear) for m in wrapped.values())
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_training_reduces_the_loss_and_leaves_the_bytes(trained):
    peft_model, losses, grads, before = trained
    assert losses[-1] < 0.8 * losses[0], losses
    after = packed_bytes(peft_model.get_base_model())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_gradients_reach_adapters_and_activations(trained):
    """At the first step lora_B starts at zero, so lora_A's gradient is zero and lora_B's is not;
    the gradient reaches the embeddings through every QuantLinear (QuantLinear's backward), at
    every position but the last (whose prediction has no label)."""
    _, _, grads, _ = trained
    b_grads = [g for n, g in grads.items() if ".lora_B." in n]
    assert len(b_grads) == 2 * len(TARGETS) and all(g.abs().sum() > 0 for g in b_grads)
    embeds_grad = grads["inputs_embeds"]
    assert torch.isfinite(embeds_grad).all() and embeds_grad[:, :-1].abs().sum(-1).gt(0).all()


def test_gradients_match_transformers_dense_model(trained, gguf_file, tmp_path):
    """The trained adapter on transformers' dequantized model: the same loss and the same gradients
    (adapters and embeddings) as on the packed model, within 1e-4 relative (module docstring)."""
    peft_model, _, _, _ = trained
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    dense_peft = peft.PeftModel.from_pretrained(dense, tmp_path, is_trainable=True)
    ids = sequence(seed=1)
    results = []
    for model in (peft_model, dense_peft):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        results.append((loss.detach(), embeds.grad, grads))
    (loss, embeds_grad, grads), (want_loss, want_embeds_grad, want_grads) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=0)
    assert (embeds_grad - want_embeds_grad).abs().max() <= 1e-4 * want_embeds_grad.abs().max()
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert (g - want_grads[name]).abs().max() <= 1e-4 * want_grads[name].abs().max(), name


def test_adapter_round_trip(trained, gguf_file, tmp_path):
    """save_pretrained, then PeftModel.from_pretrained onto a fresh from_gguf model (the
    registration given again: peft does not save it): the same adapter weights and logits."""
    peft_model, _, _, _ = trained
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    config = hf.register_lora(peft.LoraConfig.from_pretrained(tmp_path))
    loaded = peft.PeftModel.from_pretrained(hf.from_gguf(gguf_file), tmp_path, config=config)
    saved = peft.get_peft_model_state_dict(peft_model)
    assert saved.keys() == peft.get_peft_model_state_dict(loaded).keys()
    assert all(torch.equal(t, peft.get_peft_model_state_dict(loaded)[n]) for n, t in saved.items())
    ids = sequence(seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, peft_model(ids).logits)
        with loaded.disable_adapter():
            assert not torch.equal(loaded(ids).logits, peft_model(ids).logits)  # the adapter acts


def test_loading_without_the_registration_names_the_layer(trained, gguf_file, tmp_path):
    peft_model, _, _, _ = trained
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    with pytest.raises(ValueError, match="QuantLinear"):
        peft.PeftModel.from_pretrained(hf.from_gguf(gguf_file), tmp_path)


def test_merging_is_refused(gguf_file):
    peft_model = peft.get_peft_model(hf.from_gguf(gguf_file), lora_config())
    before = packed_bytes(peft_model.get_base_model())
    with pytest.raises(ValueError, match=r"merging a LoRA adapter into a torchext QuantLinear \(\w+, \d+x\d+\) is "
                                         r"not supported: its weight is packed GGUF bytes"):
        peft_model.merge_and_unload()
    after = packed_bytes(peft_model.get_base_model())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_in_bfloat16(trained, gguf_file):
    """The same training on the GPU with bf16 activations: 48 rows per matmul take the tiled GEMM
    (weights exact, activations unrounded) forward and the dense path backward. The loss falls as
    on the CPU, the bytes stay, and the first loss is the CPU's fp32 one to bf16's precision: each
    matmul's inputs round to 8 mantissa bits (relative 2^-9 each), ~5 chained matmuls and a
    log-softmax over 384 logits; bound 2% of the loss (a wrong weight moves it by its whole size)."""
    _, cpu_losses, _, _ = trained
    peft_model, losses, grads, before = train_lora(gguf_file, device="cuda", dtype=torch.bfloat16)
    assert losses[-1] < 0.8 * losses[0], losses
    after = packed_bytes(peft_model.get_base_model())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(g.float()).all() for g in grads.values())
    assert abs(losses[0] - cpu_losses[0]) <= 0.02 * cpu_losses[0], (losses[0], cpu_losses[0])
