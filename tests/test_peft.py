"""peft LoRA around torchext's packed GGUF weights (torchext.hf.register_lora), on a tiny llama
file written as in tests/test_transformers.py.

The oracle for the numbers is transformers' own reading of the same file (every weight dequantized
by gguf's numpy code into nn.Linear) with the same adapter: peft needs no custom layer there. A
batch of two SEQUENCE_TOKENS-token sequences (more rows than any of the file's formats' GEMV takes)
takes torchext's dense path, whose forward multiplies the exactly dequantized weights and whose
backward multiplies the gradient by them (torchext.ops' autograd): the two models differ only in the
fp32 summation order of their linear layers' matmuls. That gives no worst-case bound on the loss or
the embeddings' gradient (the differences would have to be carried through attention, the norms and
the loss, forward and backward), and every op between the linear layers is transformers' own in both
models, so the layers are compared where they differ, one by one, on the inputs and output gradients
the dense model's layer saw: outputs and input gradients within a worst-case bound of fp32 summation
(conftest.fp32_sum_error), the adapters' gradients (the same peft ops on the same operands) bit for
bit.
"""

from __future__ import annotations

import re

import pytest
import torch

import torchext
from conftest import fp32_sum_error, half_ulp

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("torchext.hf")
from test_transformers import ARCHS, PAST_GEMV_ROWS, VOCAB, write_gguf  # noqa: E402  (after the skips)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQUENCE_TOKENS = PAST_GEMV_ROWS // 2 + 1  # two sequences: past every format's GEMV rows (25 tokens, 50 rows)


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
    return torch.randint(3, VOCAB, (2, SEQUENCE_TOKENS), generator=torch.Generator().manual_seed(seed))


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


def test_a_peft_model_pickles(trained):
    """QuantLoraLinear was a class made inside a function: pickle, torch.save(model) and spawned workers
    could not find it ("Can't pickle local object"). It is torchext.hf.QuantLoraLinear now."""
    import io
    import pickle
    peft_model = trained[0]
    assert hf.QuantLoraLinear is hf.quant_lora_linear_class()
    again = pickle.loads(pickle.dumps(peft_model))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, peft_model(ids).logits, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(peft_model, buf)
    assert type(torch.load(io.BytesIO(buf.getvalue()), weights_only=False)) is type(peft_model)


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
    """The trained adapter on transformers' dequantized model, layer by layer (module docstring): each linear layer of
    the packed model on the input and output gradient of its dense twin in a SEQUENCE_TOKENS-token forward and
    backward. Each base layer's output is an fp32 sum of k products of the same values on both sides (k =
    in_features), its input gradient one of n (out_features), each within fp32_sum_error of the exact sum; the
    adapters' terms are the same bits, and adding them rounds once (2u relative of each side's result, u = 2^-24,
    covers it). Embeddings: both models' values are gguf's, the same bits."""
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
            # the dense path: exact weights, unrounded activations
            assert t["x"].shape[:-1].numel() >= PAST_GEMV_ROWS
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
    """The same training on the GPU with bf16 activations: 50 rows per matmul take the dense path
    (weights exact, activations unrounded; the tiled GEMM serves small weights to 16 rows) forward and
    backward. The loss falls as on the CPU, the bytes stay, and the first loss is the CPU's fp32 one to
    bf16's precision: each matmul's inputs round to 8 mantissa bits (relative 2^-9 each), ~5 chained
    matmuls and a log-softmax over 384 logits; bound 2% of the loss (a wrong weight moves it by its
    whole size)."""
    _, cpu_losses, _, _ = trained
    peft_model, losses, grads, before = train_lora(gguf_file, device="cuda", dtype=torch.bfloat16)
    assert losses[-1] < 0.8 * losses[0], losses
    after = packed_bytes(peft_model.get_base_model())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(g.float()).all() for g in grads.values())
    assert abs(losses[0] - cpu_losses[0]) <= 0.02 * cpu_losses[0], (losses[0], cpu_losses[0])


# ---- init_lora_weights ------------------------------------------------------------------------------

FLOAT_WEIGHT_INITS = {"pissa": "PiSSA", "pissa_niter_4": "PiSSA", "olora": "OLoRA", "corda": "CorDA",
                      "lora_ga": "LoRA-GA", "loftq": "LoftQ", "mica": "MiCA"}


@pytest.mark.parametrize("init", FLOAT_WEIGHT_INITS)
def test_inits_that_read_the_base_weight_are_refused_naming_the_option(gguf_file, init):
    """These inits read the base weight as a float matrix (all but MiCA also rewrite it to a residual). They
    once failed with peft's TypeErrors naming no option or layer ("Unsupported data type for the base layer.
    Got torch.uint8"), or bitsandbytes' absence (LoftQ, which would have written its dequantization back into
    the bytes), or passed register_lora so that preprocess_corda read the bytes as floats. Refused by
    register_lora, and at the layer when set after the registration, before any layer is wrapped."""
    name = re.escape(f"init_lora_weights={init!r}: {FLOAT_WEIGHT_INITS[init]} initialization is not supported on "
                     "a torchext QuantLinear")
    if init == "loftq":
        pytest.importorskip("scipy", reason="peft's LoftQ config needs scipy")
    extra = {"loftq_config": peft.LoftQConfig(loftq_bits=4)} if init == "loftq" else {}
    with pytest.raises(ValueError, match=name + r"\..*packed GGUF bytes \(uint8\).*init_lora_weights=True"):
        hf.register_lora(peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init, **extra))
    config = lora_config()
    config.init_lora_weights = init
    model = hf.from_gguf(gguf_file)
    before = packed_bytes(model)
    with pytest.raises(ValueError, match=name + r" \(\w+, 256x256\)\."):
        peft.get_peft_model(model, config)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    after = packed_bytes(model)
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.uint8 for n in before)


def test_pissa_adapter_converted_on_the_dense_model_loads_here(gguf_file, tmp_path):
    """The way the refusal names: PiSSA on transformers' dequantized model of the file, saved converted to plain
    LoRA, loads onto the packed model and gives the dense PiSSA model's logits (residual + adapter there,
    dequantized weight + converted adapter here: fp32 rounding apart, 1e-5 of the logits' scale). The adapter
    saved unconverted (relative to the residual) is refused at the registration."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    torch.manual_seed(0)
    pissa = peft.get_peft_model(dense, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                       init_lora_weights="pissa_niter_2"))
    pissa.peft_config["default"].init_lora_weights = True  # the initial adapter, as peft's PiSSA example saves it
    pissa.save_pretrained(tmp_path / "init")
    pissa.peft_config["default"].init_lora_weights = "pissa_niter_2"
    with torch.no_grad():
        for n, p in pissa.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # in place of training
    pissa.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    pissa.save_pretrained(tmp_path / "residual")
    ids = sequence(seed=4)
    with torch.no_grad():
        want = pissa(ids).logits
        config = hf.register_lora(peft.LoraConfig.from_pretrained(tmp_path / "converted"))
        got = peft.PeftModel.from_pretrained(hf.from_gguf(gguf_file), tmp_path / "converted", config=config)(ids).logits
    assert ((got - want).abs() <= 1e-5 * want.abs().max()).all()
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_2': PiSSA initialization is not supported.*"
                                         r"path_initial_model_for_weight_conversion"):
        hf.register_lora(peft.LoraConfig.from_pretrained(tmp_path / "residual"))


def adapter_weights(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in peft_model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_adapter_only_inits_match_the_dense_model(gguf_file, init):
    """Inits that touch the adapters alone give, from one seed, the adapters peft gives on transformers'
    dequantized model of the file, bit for bit, in float32 ('orthogonal' once raised "Only Tensors of floating
    point ... can require gradients": peft casts its adapters to the base weight's dtype, uint8 here). True and
    'gaussian' zero lora_B, so the model's logits are those without the adapter, bit for bit; False does not
    (peft's "not a no-op"). The bytes stay."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    torch.manual_seed(5)
    want = adapter_weights(peft.get_peft_model(dense, peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                      init_lora_weights=init)))
    model = hf.from_gguf(gguf_file)
    before = packed_bytes(model)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(model, hf.register_lora(peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                               init_lora_weights=init)))
    got = adapter_weights(peft_model)
    assert got.keys() == want.keys() and len(got) == 4 * len(TARGETS)
    assert all(g.dtype == torch.float32 and torch.equal(g, want[n]) for n, g in got.items())
    ids = sequence(seed=5)
    with torch.no_grad():
        logits = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    assert torch.equal(logits, base) == (init in (True, "gaussian"))
    after = packed_bytes(peft_model.get_base_model())
    assert all(torch.equal(before[n], after[n]) for n in before)
    if init == "orthogonal":  # peft's rule, kept by the override
        with pytest.raises(ValueError, match=r"init_lora_weights='orthogonal': needs an even r, got r=3"):
            peft.get_peft_model(hf.from_gguf(gguf_file), hf.register_lora(peft.LoraConfig(
                r=3, target_modules=TARGETS, init_lora_weights="orthogonal")))


def test_eva_initializes_as_on_the_dense_model(gguf_file):
    """EVA sets lora_A from the SVD of the layers' inputs, not from the weight, so it runs on the packed model
    (peft.initialize_lora_eva_weights). Its rows are those it finds on the dense model to fp32 rounding of the
    inputs, up to each singular vector's sign (|cosine| within 1e-4 of 1); lora_B stays zero. rho=1 keeps
    every layer's rank, which a near tie could otherwise move between the two models; one batch, which EVA
    cycles through until its components settle, takes it 4 passes (two batches took 18 in 9 s)."""
    batches = [{"input_ids": sequence(seed=10)}]

    def eva(model, register):
        config = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva",
                                 eva_config=peft.EvaConfig(rho=1.0))
        peft_model = peft.get_peft_model(model, hf.register_lora(config) if register else config)
        peft.initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
        return adapter_weights(peft_model)

    dense = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    want = eva(dense, register=False)
    model = hf.from_gguf(gguf_file)
    before = packed_bytes(model)
    got = eva(model, register=True)
    assert got.keys() == want.keys() and len(got) == 4 * len(TARGETS)
    for n, g in got.items():
        if ".lora_B." in n:
            assert not g.any(), n
        else:
            cos = (g * want[n]).sum(1) / (g.norm(dim=1) * want[n].norm(dim=1))
            assert g.shape == want[n].shape and (cos.abs() - 1).abs().max() <= 1e-4, n
    after = packed_bytes(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_merge_adapter_is_refused_and_unload_gives_the_packed_model_back(gguf_file):
    """merge_adapter refuses as merge_and_unload does (no layer marked merged); unmerge_adapter has nothing
    to undo; unload() returns the from_gguf model, its QuantLinear layers and their logits."""
    model = hf.from_gguf(gguf_file)
    ids = sequence(seed=6)
    with torch.no_grad():
        plain = model(ids).logits
    config = lora_config()
    config.init_lora_weights = False  # an adapter that acts
    peft_model = peft.get_peft_model(model, config)
    with pytest.raises(ValueError, match=r"merging a LoRA adapter into a torchext QuantLinear"):
        peft_model.merge_adapter()
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert lora_layers and not any(m.merged for m in lora_layers)
    peft_model.unmerge_adapter()
    with torch.no_grad():
        assert not torch.equal(peft_model(ids).logits, plain)
    unloaded = peft_model.unload()
    assert unloaded is model and not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, torchext.nn.QuantLinear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_modules_to_save_on_packed_layers_is_refused_naming_the_layer(gguf_file, tmp_path):
    """modules_to_save copies a layer to train it in full: on a packed one the copy trained nothing (its bytes are a
    buffer; lm_head and embed_tokens have no bias), without a word, and the adapter's save_pretrained failed in
    safetensors on the layer's format record ('dict' object has no attribute 'is_contiguous'). Refused naming the
    layer, the heads a classification task adds included; it needs the model to tell packed layers apart. A float
    layer in modules_to_save trains and saves as on any model."""
    model = hf.from_gguf(gguf_file)
    for named in (["lm_head"], ["embed_tokens"], ["layers.1.mlp"]):  # a module around packed layers too
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=named)
        with pytest.raises(ValueError, match=rf"modules_to_save: \S*{re.escape(named[0])} \(\w+\) holds packed GGUF "
                                             r"bytes \((QuantLinear|QuantEmbedding)\), which peft would copy"):
            hf.register_lora(config, model)
        with pytest.raises(ValueError, match=r"modules_to_save=\[.*\]: pass the model, register_lora\(config, model\)"):
            hf.register_lora(config)
    classifier = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
    classifier.add_module("score", torchext.nn.QuantLinear.from_linear(torch.nn.Linear(256, 4), "Q8_0"))
    with pytest.raises(ValueError, match=r"modules_to_save: score \(QuantLinear\)"):
        hf.register_lora(peft.LoraConfig(r=4, target_modules=["0"], task_type="SEQ_CLS"), classifier)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())

    mixed = torchext.nn.quantize_linears(torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(),
                                                             torch.nn.Linear(128, 64)), "Q4_K",
                                         filter=lambda name, m: name != "2")
    peft_model = peft.get_peft_model(mixed, hf.register_lora(
        peft.LoraConfig(r=4, target_modules=["0"], modules_to_save=["2"]), mixed))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {"base_model.model.2.modules_to_save.default.weight", "base_model.model.0.lora_A.default.weight"} <= trained
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
