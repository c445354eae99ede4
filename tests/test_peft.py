"""peft LoRA around torchext's packed GGUF weights (torchext.hf.register_lora), on a tiny llama
file written as in tests/test_transformers.py.

The oracle for the numbers is transformers' own reading of the same file (every weight
dequantized by gguf's numpy code into nn.Linear) with the same adapter: peft needs no custom
layer there. A 24-token batch takes torchext's dense path, whose forward multiplies the exactly
dequantized weights and whose backward multiplies the gradient by them (torchext.ops' autograd):
the two models differ only in the fp32 summation order of their linear layers' matmuls. That gives
no worst-case bound on the loss or the embeddings' gradient (the differences would have to be carried
through attention, the norms and the loss, forward and backward), and every op between the linear
layers is transformers' own in both models, so the layers are compared where they differ, one by
one, on the inputs and output gradients the dense model's layer saw: outputs and input gradients
within a worst-case bound of fp32 summation (conftest.fp32_sum_error), the adapters' gradients (the
same peft ops on the same operands) bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import torchext
from conftest import fp32_sum_error, half_ulp

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


def linear_layers(model) -> dict[str, torch.nn.Module]:
    """The model's linear layers by name: peft's LoRA layers, and the head, which no adapter wraps."""
    lora = peft.tuners.lora.LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, lora) or name.endswith("lm_head")}


def test_layers_match_transformers_dense_model(trained, gguf_file, tmp_path):
    """The trained adapter on transformers' dequantized model, layer by layer (module docstring): each
    linear layer of the packed model on the input and output gradient of its dense twin in a 24-token
    forward and backward. Each base layer's output is an fp32 sum of k products of the same values on
    both sides (k = in_features), its input gradient one of n (out_features), each within fp32_sum_error
    of the exact sum; the adapters' terms are the same bits, and adding them rounds once (2u relative of
    each side's result, u = 2^-24, covers it). Embeddings: both models' values are gguf's, the same bits."""
    peft_model, _, _, _ = trained
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    dense_peft = peft.PeftModel.from_pretrained(dense, tmp_path, is_trainable=True)
    ids = sequence(seed=1)
    assert torch.equal(peft_model.get_input_embeddings()(ids), dense_peft.get_input_embeddings()(ids))

    ours, theirs = linear_layers(peft_model), linear_layers(dense_peft)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * len(TARGETS) + 1
    seen: dict[str, dict] = {name: {} for name in theirs}
    hooks = []
    for name, m in theirs.items():
        hooks.append(m.register_forward_hook(
            lambda _m, args, out, name=name: seen[name].update(x=args[0].detach().clone(), y=out.detach().clone())))
        hooks.append(m.register_full_backward_hook(
            lambda _m, grad_in, grad_out, name=name: seen[name].update(gx=grad_in[0].clone(), gy=grad_out[0].clone())))
    try:
        embeds = dense_peft.get_input_embeddings()(ids).detach().requires_grad_()
        dense_peft(inputs_embeds=embeds, labels=ids).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    want_grads = {n: p.grad for n, p in dense_peft.named_parameters() if p.requires_grad}

    u, lora = half_ulp(torch.float32), peft.tuners.lora.LoraLayer
    peft_model.zero_grad(set_to_none=True)
    try:
        for name, m in ours.items():
            t = seen[name]
            base = theirs[name].get_base_layer() if isinstance(theirs[name], lora) else theirs[name]
            W = base.weight.detach().double()
            n, k = W.shape
            assert t["x"].shape[:-1].numel() > 16  # the dense path: exact weights, unrounded activations
            x = t["x"].clone().requires_grad_()
            y = m(x)
            y.backward(t["gy"])
            y = y.detach()
            tol = 2 * fp32_sum_error(t["x"].double().abs() @ W.abs().T, k) + 2 * u * (y.abs() + t["y"].abs())
            assert ((y - t["y"]).abs() <= tol).all(), name
            tol = 2 * fp32_sum_error(t["gy"].double().abs() @ W.abs(), n) + 2 * u * (x.grad.abs() + t["gx"].abs())
            assert ((x.grad - t["gx"]).abs() <= tol).all(), name
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, want_grads[name]), name
    finally:
        peft_model.zero_grad(set_to_none=True)


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


def test_all_linear_picks_the_layers_peft_picks_on_the_dense_model(gguf_file):
    """target_modules="all-linear": peft expands it to nn.Linear layers alone (none in a from_gguf
    model: it found nothing); register_lora(config, model) expands it to the QuantLinear layers by
    peft's rule, so the adapters sit where peft puts them on transformers' dequantized model of the
    same file: every projection of the decoder layers, not the output head."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    want = set(linear_layers(peft.get_peft_model(dense, peft.LoraConfig(r=4, target_modules="all-linear"))))
    model = hf.from_gguf(gguf_file)
    peft_model = peft.get_peft_model(model, hf.register_lora(peft.LoraConfig(r=4, target_modules="all-linear"), model))
    got = linear_layers(peft_model)
    assert got.keys() == want and len(got) == 2 * len(TARGETS) + 1  # and the unwrapped head
    assert all(isinstance(m, hf.quant_lora_linear_class()) for n, m in got.items() if not n.endswith("lm_head"))
    assert isinstance(peft_model.get_base_model().lm_head, torchext.nn.QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(peft_model(sequence()).logits).all()
    with pytest.raises(ValueError, match=r"target_modules='all-linear': pass the model, register_lora\(config, "
                                         r"model\)"):
        hf.register_lora(peft.LoraConfig(r=4, target_modules="all-linear"))


def test_dora_is_refused_naming_the_option(gguf_file):
    """DoRA rescales by the norm of the dense weight plus the update; a QuantLinear's weight is uint8
    bytes (it once failed with a bare shape mismatch). Refused by register_lora, and at the layer when
    use_dora is set after the registration, before any layer is wrapped."""
    why = r"use_dora=True: DoRA is not supported on a torchext QuantLinear.*packed GGUF bytes"
    with pytest.raises(ValueError, match=why):
        hf.register_lora(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    config = lora_config()
    config.use_dora = True
    model = hf.from_gguf(gguf_file)
    with pytest.raises(ValueError, match=r"use_dora=True: DoRA is not supported on a torchext QuantLinear "
                                         r"\(\w+, 256x256\).*packed GGUF bytes"):
        peft.get_peft_model(model, config)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


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
