"""convert_to_qlora / save_adapter / load_adapter: structure, freezing, PEFT's format both ways, bad arguments."""
import json
import os

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.convert import DEFAULT_TARGETS, lora_layers
from qlora_kernels.nn import LoRALinear4bit

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def converted(seed=0, r=8, lora_alpha=16, lora_dropout=0.1, **kw):
    model = qk.convert_to_qlora(tiny_llama(seed), r, lora_alpha, lora_dropout, compute_dtype=torch.float32, **kw)
    with torch.no_grad():
        for layer in lora_layers(model).values():     # a trained adapter: B non-zero
            layer.lora_B.normal_(0.0, 0.05)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_structure_and_frozen():
    model = tiny_llama()
    out = qk.convert_to_qlora(model, 8, 16)
    assert out is model
    layers = lora_layers(model)
    assert len(layers) == 2 * len(DEFAULT_TARGETS)
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(DEFAULT_TARGETS)
    assert not any(type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS
                   for n, m in model.named_modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n in layers for part in ("lora_A", "lora_B")}
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    assert all(m.r == 8 and m.scaling == 2.0 for m in layers.values())


def test_target_subset_and_rslora():
    model = qk.convert_to_qlora(tiny_llama(), 4, 8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    layers = lora_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["q_proj", "v_proj"]
    assert all(m.scaling == pytest.approx(8 / 2) for m in layers.values())
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    qk.convert_to_qlora(model, 4, 8, target_modules=["up_proj"])       # a second call keeps the first's LoRA
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 3 and any("q_proj.lora_A" in n for n in trainable)


@pytest.mark.parametrize("targets", [r".*\.(q_proj|v_proj)", r"model\.layers\.1\..*_proj", ["self_attn.q_proj"],
                                     ["q_proj", "mlp.down_proj"], "q_proj"],
                         ids=["regex", "regex-one-layer", "dotted-suffix", "names", "bare-string"])
def test_target_modules_select_what_peft_selects(targets):
    """A string is a regular expression for the whole module path, a list names modules by a dotted suffix:
    the layers converted are the ones PEFT would wrap (and where PEFT finds none, a ValueError)."""
    peft = pytest.importorskip("peft")
    try:
        wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        theirs = sorted(n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    except ValueError:
        theirs = None
    if theirs is None:
        with pytest.raises(ValueError, match="match no nn.Linear"):
            qk.convert_to_qlora(tiny_llama(), 4, 8, target_modules=targets)
    else:
        assert sorted(lora_layers(qk.convert_to_qlora(tiny_llama(), 4, 8, target_modules=targets))) == theirs


def test_rslora_at_rank_one_saves_and_loads(tmp_path):
    """At r = 1, alpha / r == alpha / sqrt(r): use_rslora is kept per layer, not guessed from the scaling."""
    peft = pytest.importorskip("peft")
    model = qk.convert_to_qlora(tiny_llama(), 1, 8, target_modules=["q_proj"], use_rslora=True)
    qk.convert_to_qlora(model, 4, 8, target_modules=["v_proj"], use_rslora=True)
    qk.save_adapter(model, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["rank_pattern"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=1, lora_alpha=8, use_rslora=True,
                                                               target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    into = qk.convert_to_qlora(tiny_llama(), 1, 8, target_modules=["q_proj"], use_rslora=True,
                               compute_dtype=torch.float32)
    qk.load_adapter(into, str(tmp_path / "theirs"))
    assert all(layer.use_rslora and layer.scaling == 8.0 for layer in lora_layers(into).values())


def test_peft_loads_our_adapter(tmp_path):
    """PeftModel.from_pretrained(plain model with our NF4-dequantized base, our adapter) == our model."""
    peft = pytest.importorskip("peft")
    ours = converted()
    qk.save_adapter(ours, str(tmp_path), base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (8, 16, 0.1, False)
    assert cfg["target_modules"] == sorted(DEFAULT_TARGETS) and cfg["base_model_name_or_path"] == "tiny-llama"

    fresh = tiny_llama()                            # same seed: same base weights
    with torch.no_grad():                           # the same base on both sides: our NF4 round trip
        for name, layer in lora_layers(ours).items():
            fresh.get_submodule(name).weight.copy_(qk.dequantize_nf4(layer.qweight))
    ids = torch.randint(0, 512, (2, 12))
    base_logits = logits(fresh, ids)
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()

    # the file's keys are exactly PEFT's own names for these parameters
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)

    ours_logits, peft_logits = logits(ours, ids), logits(peft_model, ids)
    diff = (ours_logits - peft_logits).abs().max().item()
    effect = (peft_logits - base_logits).abs().max().item()
    print(f"ours vs PEFT max |diff| {diff:.3g}, adapter effect {effect:.3g}, max |logit| {peft_logits.abs().max():.3g}")
    assert effect > 1e-2                            # the adapter changes the output...
    assert diff < 1e-4 * max(1.0, peft_logits.abs().max().item())   # ...and both sides agree to fp32 rounding
    merged = peft_model.merge_and_unload()
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(merged.get_submodule(name).weight, layer.merged_weight(), atol=1e-6, rtol=1e-5)


def test_we_load_peft_adapter(tmp_path):
    """An adapter PEFT saved loads with load_adapter (plain model: converted from the adapter's config)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(1), config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(tmp_path))
    model = qk.load_adapter(tiny_llama(1), str(tmp_path), compute_dtype=torch.float32)
    layers = lora_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "k_proj", "q_proj"]
    theirs = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_A, theirs[f"base_model.model.{name}.lora_A.weight"], atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B, theirs[f"base_model.model.{name}.lora_B.weight"], atol=0, rtol=0)


def _peft_logits(peft, ours, path, ids, seed):
    """Logits of PeftModel.from_pretrained(plain model with our NF4-dequantized base, path)."""
    fresh = tiny_llama(seed)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            fresh.get_submodule(name).weight.copy_(qk.dequantize_nf4(layer.qweight))
    peft_model = peft.PeftModel.from_pretrained(fresh, str(path)).eval()
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    return logits(peft_model, ids), n_lora


def test_layer_subset_and_mixed_ranks_round_trip(tmp_path):
    """An adapter on one layer's q_proj only, and q_proj / v_proj at different ranks and alphas: our file
    loads back (ours) and into PEFT with the same layers and output."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 512, (1, 9))
    one = qk.convert_to_qlora(tiny_llama(3), 8, 16, compute_dtype=torch.float32,
                              target_modules=["model.layers.0.self_attn.q_proj"])
    mixed = qk.convert_to_qlora(tiny_llama(3), 8, 16, compute_dtype=torch.float32, target_modules=["q_proj"])
    qk.convert_to_qlora(mixed, 4, 32, compute_dtype=torch.float32, target_modules=["v_proj"])
    for i, model in enumerate((one, mixed)):
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0.0, 0.05)
        qk.save_adapter(model, str(tmp_path / str(i)))
        again = qk.load_adapter(tiny_llama(3), str(tmp_path / str(i)), compute_dtype=torch.float32)
        assert {n: (m.r, m.scaling) for n, m in lora_layers(again).items()} == \
            {n: (m.r, m.scaling) for n, m in lora_layers(model).items()}
        assert torch.equal(logits(again, ids), logits(model, ids))
        peft_logits, n_lora = _peft_logits(peft, model, tmp_path / str(i), ids, 3)
        assert n_lora == len(lora_layers(model))
        assert (peft_logits - logits(model, ids)).abs().max() < 1e-4 * max(1.0, peft_logits.abs().max().item())
    cfg = json.loads((tmp_path / "0" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == r"model\.layers\.0\.self_attn\.q_proj"    # PEFT: the whole path, not a suffix


@pytest.mark.parametrize("select", [dict(target_modules=r".*\.(q_proj|v_proj)"),
                                    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]),
                                    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])],
                         ids=["regex", "layers_to_transform", "exclude_modules"])
def test_we_load_peft_layer_selections(tmp_path, select):
    """PEFT adapters whose layers were chosen by a regex, layers_to_transform or exclude_modules load into a
    plain model: the file, not the config's target list, says which layers carry LoRA."""
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(tiny_llama(4), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                                    **select))
    peft_model.save_pretrained(str(tmp_path))
    theirs = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    model = qk.load_adapter(tiny_llama(4), str(tmp_path), compute_dtype=torch.float32)
    layers = lora_layers(model)
    assert sorted(f"base_model.model.{n}.{part}.weight" for n in layers for part in ("lora_A", "lora_B")) == \
        sorted(theirs)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A, theirs[f"base_model.model.{name}.lora_A.weight"])


def test_save_load_round_trip(tmp_path):
    ours = converted(seed=2)
    qk.save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    again = qk.convert_to_qlora(tiny_llama(2), 8, 16, 0.1, compute_dtype=torch.float32)   # fresh LoRA init
    assert qk.load_adapter(again, str(tmp_path)) is again
    for (n1, a), (n2, b) in zip(lora_layers(ours).items(), lora_layers(again).items()):
        assert n1 == n2
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B) and torch.equal(a.packed, b.packed)
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(logits(ours, ids), logits(again, ids))
    plain = qk.load_adapter(tiny_llama(2), str(tmp_path), compute_dtype=torch.float32)   # converts, then loads
    assert torch.equal(logits(ours, ids), logits(plain, ids))


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be an integer >= 1"),
    (dict(r=-4), "r must be an integer >= 1"),
    (dict(r=2.5), "r must be an integer >= 1"),
    (dict(lora_alpha=0), "lora_alpha must be"),
    (dict(lora_dropout=1.0), "lora_dropout must be a number in"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be a finite"),
    (dict(use_rslora="no"), "use_rslora must be True or False"),
    (dict(target_modules=None), "got None"),
    (dict(blocksize=48), "blocksize must be an int in"),
    (dict(target_modules=["q_proj", "qkv_proj"]), r"\['qkv_proj'\] match no nn.Linear"),
    (dict(target_modules=[]), "non-empty"),
])
def test_bad_arguments(kwargs, match):
    model = tiny_llama()
    args = dict(r=8, lora_alpha=16) | kwargs
    with pytest.raises(ValueError, match=match):
        qk.convert_to_qlora(model, **args)
    assert not any(isinstance(m, LoRALinear4bit) for m in model.modules())   # nothing half-converted
    assert all(p.requires_grad for p in model.parameters())


def test_module_refuses_bad_arguments_at_construction():
    linear = torch.nn.Linear(64, 64)
    for kwargs, match in ((dict(r=True), "r must be an integer"), (dict(r=2.5), "r must be an integer"),
                          (dict(compute_dtype=torch.int8), "compute_dtype must be")):
        with pytest.raises(ValueError, match=match):
            LoRALinear4bit.from_linear(linear, **(dict(r=4, lora_alpha=8) | kwargs))


def test_refusals_name_the_cause():
    """A tied output head is not converted (that would untie it from the embeddings); a target already
    converted is named as such."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tied = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="shares its weight with the input embeddings"):
        qk.convert_to_qlora(tied, 4, 8, target_modules=["q_proj", "lm_head"])
    assert not lora_layers(tied)
    model = qk.convert_to_qlora(tiny_llama(), 4, 8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"already converted: \['q_proj'\]"):
        qk.convert_to_qlora(model, 4, 8, target_modules=["q_proj", "v_proj"])


def test_wrapped_and_non_causal_models_save_what_peft_loads(tmp_path):
    """torch.compile's wrapper does not prefix the saved keys (PEFT would load none of them, with a warning);
    a model that cannot generate is saved without task_type CAUSAL_LM (PEFT's causal-LM wrapper needs
    prepare_inputs_for_generation)."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 512, (1, 9))
    model = converted()
    qk.save_adapter(torch.compile(model), str(tmp_path / "compiled"))
    keys = json.loads((tmp_path / "compiled" / "adapter_config.json").read_text())
    peft_logits, n_lora = _peft_logits(peft, model, tmp_path / "compiled", ids, 0)
    assert keys["task_type"] == "CAUSAL_LM" and n_lora == len(lora_layers(model))
    assert (peft_logits - logits(model, ids)).abs().max() < 1e-4 * max(1.0, peft_logits.abs().max().item())
    backbone = converted().model                       # a LlamaModel: no generation
    qk.save_adapter(backbone, str(tmp_path / "backbone"))
    assert json.loads((tmp_path / "backbone" / "adapter_config.json").read_text())["task_type"] is None
    fresh = tiny_llama().model
    with torch.no_grad():
        for name, layer in lora_layers(backbone).items():
            fresh.get_submodule(name).weight.copy_(qk.dequantize_nf4(layer.qweight))
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "backbone")).eval()
    with torch.no_grad():
        got, want = loaded(input_ids=ids).last_hidden_state, backbone(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())


def test_load_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        qk.load_adapter(tiny_llama(), str(tmp_path / "missing"))
    qk.save_adapter(converted(), str(tmp_path))
    with pytest.raises(ValueError, match="r=8"):
        qk.load_adapter(qk.convert_to_qlora(tiny_llama(), 4, 8), str(tmp_path))
    with pytest.raises(ValueError, match="missing key"):
        qk.load_adapter(_with_extra_layer(), str(tmp_path))
    with pytest.raises(ValueError, match="no LoRALinear4bit"):
        qk.save_adapter(tiny_llama(), str(tmp_path / "plain"))


def _with_extra_layer():
    model = qk.convert_to_qlora(tiny_llama(), 8, 16, 0.1, compute_dtype=torch.float32)
    model.extra = LoRALinear4bit.from_linear(torch.nn.Linear(64, 64), 8, 16, compute_dtype=torch.float32)
    return model


def test_patch_model_gives_a_converted_model_the_fused_loss(monkeypatch):
    """convert_to_qlora leaves HF's loss; patch_model on the converted model swaps in the label-sparse linear
    cross-entropy (same loss and LoRA gradients) and leaves our LoRA layers as they are."""
    from qlora_kernels.ops import cross_entropy

    monkeypatch.setenv("TRITON_INTERPRET", "0")     # the CPU path (the ops were imported under the interpreter)
    model = converted(lora_dropout=0.0).train()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100                            # completion-only: 4 labelled positions per row

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = loss_and_grads()
    calls = []
    real = cross_entropy.fused_linear_cross_entropy
    monkeypatch.setattr(cross_entropy, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = qk.patch_model(model)
    assert report.loss_patched and not report.patched
    out, grads = loss_and_grads()
    assert calls and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * len(DEFAULT_TARGETS)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    qk.unpatch_model(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_patched_forward_under_accelerate_wrappers():
    """accelerate wraps a prepared model's forward by its __func__ (mixed precision) and unwraps it to a method
    again; regional compilation re-binds it on a copy. A patched converted model keeps working through each, and
    patch -> wrap -> unpatch -> patch falls back without recursing into itself."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)   # a Trainer earlier in the process set its own
    model = converted(lora_dropout=0.0)
    model.train()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids).loss
    qk.patch_model(model)
    prepared = accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    assert torch.isfinite(prepared(input_ids=ids, labels=ids).loss)
    unwrapped = accelerate.Accelerator(cpu=True).unwrap_model(prepared, keep_fp32_wrapper=False)
    assert torch.allclose(unwrapped(input_ids=ids, labels=ids).loss, want, atol=1e-4)   # was: input_ids twice
    qk.unpatch_model(prepared)
    qk.patch_model(prepared)            # the accelerate wrapper around the old patch is what the new one replaces
    assert prepared(input_ids=ids).logits.shape == (2, 8, 512)          # fallback: was a RecursionError
    qk.unpatch_model(prepared)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_patched_model_compiles_fullgraph():
    model = converted(lora_dropout=0.0)
    model.train()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids).loss
    qk.patch_model(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)   # the loss forward built a bound method
    assert torch.allclose(compiled(input_ids=ids, labels=ids).loss, want, atol=1e-4)
    qk.unpatch_model(model)
