"""patch_model / unpatch_model on a real transformers + bitsandbytes (NF4, double quant) + PEFT LoRA model.

A tiny random Llama (hidden 64, 2 layers, vocab 512) is saved, loaded in 4 bit on the CPU, wrapped with PEFT
LoRA on all seven projections (lora_B random so the adapters matter); the patched model is compared with the
same model unpatched, then trained with transformers.Trainer, TRL's SFTTrainer and under DDP (gloo, 2 ranks).
Without a GPU the kernels run under the Triton interpreter: the shapes stay tiny.
"""
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import qlora_kernels  # noqa: E402
from qlora_kernels import FusedAdamW, PatchReport, patch_model, unpatch_model  # noqa: E402
from qlora_kernels.ops import cross_entropy as ce_ops  # noqa: E402
from qlora_kernels.ops import nf4_lora_linear as lora_ops  # noqa: E402
from qlora_kernels.ops import rms_norm as norm_ops  # noqa: E402
from qlora_kernels.ops import swiglu as swiglu_ops  # noqa: E402
from qlora_kernels.testing import assert_close  # noqa: E402

VOCAB, SEQ, BATCH = 512, 16, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Price", "is", "$", "."] + [f"{i:02d}" for i in range(100)]
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint (+ a word-level tokenizer) on disk."""
    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def load(checkpoint, quant_type="nf4", dtype=None, seed=0, **lora):
    """The checkpoint in 4 bit (double quant, bf16 compute) with PEFT LoRA on every projection, B random."""
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                              bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)
    kw = {} if dtype is None else {"dtype": dtype}
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=bnb_cfg,
                                                              device_map="cpu", **kw)
    torch.manual_seed(seed)
    opts = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    opts.update(lora)
    model = peft.get_peft_model(model, peft.LoraConfig(**opts))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()      # bitsandbytes repacks NF4 weights in eval + no_grad on AVX512-BF16 CPUs
    return model


def batch(seed=0, n=BATCH):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100        # completion-only style: the first half is prompt
    labels[0, -2] = -100
    return ids, labels


def lora_layer_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_grads_close(actual, expected, rel=3e-2):
    assert actual.keys() == expected.keys() and len(expected) > 0
    for name in expected:
        err = (actual[name].double() - expected[name].double()).norm() / expected[name].double().norm().clamp(min=1e-12)
        assert err < rel, f"{name}: relative gradient error {err:.3g}"


def no_patch_left(model):
    return all("forward" not in m.__dict__ and "_qlora_kernels_patch" not in m.__dict__ for m in model.modules())


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype,rslora", [(None, False), (torch.bfloat16, True)], ids=["fp32-model", "bf16-rslora"])
def test_patched_matches_unpatched(checkpoint, dtype, rslora):
    model = load(checkpoint, dtype=dtype, use_rslora=rslora)
    ids, labels = batch()
    ref_out, ref_grads = loss_and_grads(model, ids, labels)

    report = patch_model(model)
    assert isinstance(report, PatchReport) and report.loss_patched and not report.skipped
    assert sorted(report.patched) == lora_layer_names(model) and len(report.patched) == 2 * len(TARGETS)
    assert "patched: 14" in str(report)
    assert len(report.norms_patched) == 2 * 2 + 1 and "RMSNorm modules patched: 5" in str(report)   # 2 layers + final
    assert len(report.mlps_patched) == 2 and "SwiGLU MLPs patched: 2" in str(report)
    out, grads = loss_and_grads(model, ids, labels)
    assert out.logits is None                    # the full logits are never built
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref_out.loss, atol=1e-3, rtol=1e-2, msg="loss")
    assert_grads_close(grads, ref_grads)
    assert all("lora_" in k for k in grads)

    assert unpatch_model(model) == len(report.patched) + len(report.norms_patched) + len(report.mlps_patched) + 1
    assert no_patch_left(model)
    again, _ = loss_and_grads(model, ids, labels)
    assert torch.equal(again.loss, ref_out.loss)  # bitwise: the original forwards are back
    assert torch.equal(again.logits, ref_out.logits)


def test_calls_the_kernels_and_is_idempotent(checkpoint, monkeypatch):
    calls = {"lora": 0, "ce": 0, "norm": 0, "swiglu": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(lora_ops, "nf4_lora_linear", spy("lora", lora_ops.nf4_lora_linear))
    monkeypatch.setattr(ce_ops, "fused_linear_cross_entropy", spy("ce", ce_ops.fused_linear_cross_entropy))
    monkeypatch.setattr(norm_ops, "rms_norm", spy("norm", norm_ops.rms_norm))
    monkeypatch.setattr(swiglu_ops, "swiglu", spy("swiglu", swiglu_ops.swiglu))
    hinted = []   # the device path's chunk loop: was the early host count (made before the forward) its own?
    real_counted = ce_ops._counted
    monkeypatch.setattr(ce_ops, "_counted", lambda y, ignore_index, count: hinted.append(
        real_counted(y, ignore_index, count)[0] is getattr(ce_ops._HINT, "value", None).counted) or
        real_counted(y, ignore_index, count))
    model = load(checkpoint)
    patch_model(model)
    report = patch_model(model)                  # twice: still one layer of patching
    assert len(report.patched) == 14
    ids, labels = batch()
    model(input_ids=ids, labels=labels)
    # the norms run their kernels where Triton runs (here: under the interpreter), else the modules' own forward
    triton = qlora_kernels._backend.interpreting()
    assert calls == {"lora": 14, "ce": 1, "norm": 5 if triton else 0, "swiglu": 2 if triton else 0}
    assert hinted == ([True] if qlora_kernels._backend.interpreting() else []), hinted
    unpatch_model(model)
    assert no_patch_left(model)


def test_without_labels_returns_logits(checkpoint):
    model = load(checkpoint)
    ids, _ = batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        patch_model(model, lora_linear=False, rms_norm=False, swiglu=False)   # loss only: the original logits path
        assert torch.equal(model(input_ids=ids).logits, ref)
        unpatch_model(model)
        report = patch_model(model)
        out = model(input_ids=ids)
    assert report.loss_patched
    assert out.logits.shape == (BATCH, SEQ, VOCAB)
    assert_close(out.logits, ref, atol=2e-2, rtol=2e-2, msg="logits")
    tup = model(input_ids=ids, labels=batch()[1], return_dict=False)
    assert isinstance(tup, tuple) and tup[0].ndim == 0  # (loss,): logits None are dropped as HF does


def test_evaluation_returns_logits(checkpoint):
    """Under no_grad (Trainer.evaluate / predict) a patched model returns its logits with the loss, so
    compute_metrics sees predictions; with grad enabled the logits are never built."""
    model = load(checkpoint)
    ids, labels = batch()
    patch_model(model)
    train = model(input_ids=ids, labels=labels)
    with torch.no_grad():
        evaluation = model(input_ids=ids, labels=labels)
    assert train.logits is None
    assert evaluation.logits.shape == (BATCH, SEQ, VOCAB)
    assert_close(evaluation.loss, train.loss.detach(), atol=1e-3, rtol=1e-2, msg="loss")


def test_num_items_in_batch(checkpoint):
    """HF's gradient-accumulation normalization: sum over labelled tokens / num_items_in_batch."""
    model = load(checkpoint)
    ids, labels = batch()
    n_items = torch.tensor(37)
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    ref_mean = model(input_ids=ids, labels=labels).loss
    n_valid = int((labels[:, 1:] != -100).sum())
    patch_model(model, lora_linear=False)
    loss = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    assert_close(loss, ref, atol=1e-5, rtol=1e-4, msg="sum / num_items_in_batch")
    assert_close(loss, ref_mean * n_valid / 37, atol=1e-5, rtol=1e-4, msg="vs mean")
    # pre-shifted labels (context parallelism passes them beside labels) are used as they are, as HF does
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    loss2 = model(input_ids=ids, labels=torch.full_like(labels, -100), shift_labels=shifted).loss
    assert_close(loss2, ref_mean, atol=1e-5, rtol=1e-4, msg="shift_labels")
    # shift_labels without labels: HF computes no loss and returns the logits (Trainer's label smoother and
    # compute_loss_func call the model so)
    only = model(input_ids=ids, shift_labels=shifted)
    assert only.loss is None and only.logits.shape == (*ids.shape, VOCAB)


def test_dropout_follows_train_mode(checkpoint):
    model = load(checkpoint, lora_dropout=0.1)
    ids, labels = batch()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(d.p == 0.1 for d in drops)
    for d in drops:                              # dropout off, base layers kept in training mode
        d.eval()
    ref, ref_grads = loss_and_grads(model, ids, labels)
    patch_model(model)
    # gradients, not just the loss: on this random model the loss barely moves when the LoRA branch drops
    out, grads = loss_and_grads(model, ids, labels)
    assert_close(out.loss, ref.loss, atol=1e-3, rtol=1e-2, msg="dropout off")
    assert_grads_close(grads, ref_grads)
    for d in drops:
        d.train()
    a, b = (model(input_ids=ids, labels=labels).loss for _ in range(2))
    assert torch.isfinite(a) and torch.isfinite(b) and not torch.equal(a, b)   # a fresh mask per call
    unpatch_model(model)


def test_fallbacks_to_peft(checkpoint):
    """Disabled adapters and an adapter that is no longer servable run PEFT's own forward."""
    model = load(checkpoint)
    ids, labels = batch()
    with model.disable_adapter():
        base_ref = model(input_ids=ids, labels=labels).loss
    patch_model(model)
    with model.disable_adapter():
        base = model(input_ids=ids, labels=labels).loss
    assert_close(base, base_ref, atol=1e-4, rtol=1e-4, msg="adapters disabled")
    out, lora_grads = loss_and_grads(model, ids, labels)
    lora_loss = out.loss
    assert not torch.allclose(lora_loss, base, atol=1e-4)
    # a forward hook on a base layer or on lm_head (accelerate's offload hooks, user hooks) must still run:
    # those modules are served by their own forwards, with the same loss and gradients (LoRA included)
    seen = []
    q_base = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(type(mod).__name__))
               for m in (q_base, model.get_base_model().lm_head)]
    out, hooked_grads = loss_and_grads(model, ids, labels)
    assert sorted(seen) == ["Linear", "Linear4bit"]
    assert_close(out.loss, lora_loss, atol=1e-3, rtol=1e-2, msg="hooked modules")
    assert_grads_close(hooked_grads, lora_grads)
    for h in handles:
        h.remove()
    unpatch_model(model)


def test_patched_model_pickles_and_keeps_signatures(checkpoint, tmp_path):
    """torch.save / torch.load of a whole patched model (the instance forwards were bound methods, which pickle
    looks up by name on the module: the file saved but did not load); the forwards keep the signatures that
    Trainer and generate inspect; the loaded copy is patched and unpatches."""
    import inspect

    model = load(checkpoint)
    report = patch_model(model)
    lm = model.get_base_model()
    assert list(inspect.signature(lm.forward).parameters) == \
        list(inspect.signature(type(lm).forward).parameters)[1:]        # the class's, without self
    assert "input_ids" in inspect.signature(lm.forward).parameters
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loaded_lm = loaded.get_base_model()
    assert loaded_lm.forward.module is loaded_lm                         # bound to the copy, not the original
    assert_close(loaded(input_ids=ids, labels=labels).loss, want, atol=1e-6, rtol=1e-6, msg="loaded")
    total = len(report.patched) + len(report.norms_patched) + len(report.mlps_patched) + 1
    assert unpatch_model(loaded) == total and no_patch_left(loaded)
    unpatch_model(model)


def _original_norm_math(x, eps):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_rms_norm_patch(checkpoint):
    """The RMSNorm modules run rms_norm (where Triton runs) with the module's result; rms_norm=False and
    unpatch_model leave or bring back the module's own forward, bit for bit; an offload-hooked norm is skipped."""
    model = load(checkpoint, dtype=torch.bfloat16)
    norm = model.get_base_model().model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
    x = torch.randn(2, 5, norm.weight.shape[0], dtype=torch.bfloat16, requires_grad=True)
    want = norm(x)
    assert not patch_model(model, lora_linear=False, cross_entropy=False, rms_norm=False).norms_patched
    report = patch_model(model, lora_linear=False, cross_entropy=False)
    assert "model.model.norm" in "".join(report.norms_patched) and len(report.norms_patched) == 5
    got = norm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got.float(), want.float(), atol=1e-2, rtol=8e-3, msg="patched norm")   # bf16 rounding apart
    got.sum().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())
    weight = norm.weight
    norm.weight = torch.nn.Parameter(weight.detach().double())    # a dtype the kernel does not take: HF's forward
    assert torch.equal(norm(x), norm.weight * _original_norm_math(x, norm.variance_epsilon))
    norm.weight = weight
    unpatch_model(model)
    assert no_patch_left(model) and torch.equal(norm(x), want)
    norm._hf_hook = object()                     # accelerate's offload hook: its weights may live elsewhere
    report = patch_model(model, lora_linear=False, cross_entropy=False)
    assert len(report.norms_patched) == 4 and "hook" in report.skipped["base_model.model.model.norm"]
    unpatch_model(model)
    del norm._hf_hook


def test_swiglu_patch(checkpoint):
    """The MLPs compute silu(gate) * up by swiglu (where Triton runs), calling the LoRA projections as the module
    does; swiglu=False and unpatch_model leave or bring back the module's forward; another activation is skipped."""
    model = load(checkpoint, dtype=torch.bfloat16)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    want = mlp(x)
    assert not patch_model(model, lora_linear=False, cross_entropy=False, rms_norm=False, swiglu=False).mlps_patched
    report = patch_model(model, lora_linear=False, cross_entropy=False, rms_norm=False)
    assert len(report.mlps_patched) == 2
    got = mlp(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2, msg="patched MLP")   # bf16 rounding apart
    unpatch_model(model)
    assert no_patch_left(model) and torch.equal(mlp(x), want)
    act = mlp.act_fn
    mlp.act_fn = torch.nn.GELU()
    report = patch_model(model, lora_linear=False, cross_entropy=False, rms_norm=False)
    assert len(report.mlps_patched) == 1 and "GELU" in report.skipped["base_model.model.model.layers.0.mlp"]
    unpatch_model(model)
    mlp.act_fn = act
    mlp._hf_hook = object()             # accelerate's dispatch hook replaces the MLP's forward: never bypassed
    report = patch_model(model, lora_linear=False, cross_entropy=False, rms_norm=False)
    assert "accelerate hook" in report.skipped["base_model.model.model.layers.0.mlp"]
    unpatch_model(model)
    del mlp._hf_hook


def _head_adapter_and_doubled_loss(model, ids, labels):
    """(loss, |grad of lm_head's LoRA B|) with a LoRA adapter on lm_head, then the loss of HF's loss doubled."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model.add_adapter("head", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.head" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    model.set_adapter("head")
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grad = model.get_base_model().lm_head.lora_B["head"].weight.grad
    model.get_base_model().loss_function = lambda **kw: 2 * ForCausalLMLoss(**kw)
    doubled = model(input_ids=ids, labels=labels).loss
    return loss, grad, doubled


def test_loss_follows_head_and_loss_function_changed_after_patch(checkpoint):
    """The loss plan is checked per call: LoRA put on lm_head, or a loss_function set, after patch_model make
    the patched forward hand over to the model's own (the adapter's output and gradient are not dropped)."""
    ids, labels = batch()
    ref_loss, ref_grad, ref_doubled = _head_adapter_and_doubled_loss(load(checkpoint), ids, labels)
    model = load(checkpoint)
    assert patch_model(model).loss_patched
    loss, grad, doubled = _head_adapter_and_doubled_loss(model, ids, labels)
    assert grad is not None and ref_grad is not None
    assert_close(loss, ref_loss, atol=1e-3, rtol=1e-3, msg="LoRA on lm_head")
    assert_close(grad, ref_grad, atol=1e-3, rtol=2e-2, msg="lm_head lora_B gradient")   # q_proj: bf16 LoRA
    assert_close(doubled, ref_doubled, atol=1e-4, rtol=1e-4, msg="custom loss_function")


def test_qwen2_with_projection_bias(tmp_path):
    """Qwen2 shares Llama's forward and has biases on q, k, v: the bias goes through nf4_lora_linear."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    model = load(str(tmp_path), target_modules=["q_proj", "v_proj", "down_proj"])
    biases = [m.get_base_layer().bias for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))
              and isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(biases) == 2 and all(b is not None for b in biases)
    with torch.no_grad():
        for b in biases:
            b.normal_(0, 0.5)
    ids, labels = batch()
    ref_out, ref_grads = loss_and_grads(model, ids, labels)
    report = patch_model(model)
    assert report.loss_patched and report.model_class == "Qwen2ForCausalLM" and len(report.patched) == 3
    out, grads = loss_and_grads(model, ids, labels)
    assert_close(out.loss, ref_out.loss, atol=1e-3, rtol=1e-2, msg="loss")
    assert_grads_close(grads, ref_grads)
    unpatch_model(model)
    assert no_patch_left(model)


# ------------------------------------------------------------------------------------------------ skips
def test_skips_dora_fp4_lora_bias_and_several_adapters(checkpoint):
    dora = load(checkpoint, use_dora=True)
    report = patch_model(dora)
    assert not report.patched and sorted(report.skipped) == lora_layer_names(dora)
    assert all("DoRA" in r for r in report.skipped.values()), report
    assert "DoRA" in str(report)
    assert all("forward" not in m.__dict__ for n, m in dora.named_modules() if n in report.skipped)
    unpatch_model(dora)

    fp4 = load(checkpoint, quant_type="fp4")
    report = patch_model(fp4, cross_entropy=False)
    assert not report.patched and all("fp4" in r for r in report.skipped.values()), report
    assert not report.loss_patched and report.loss_reason == "cross_entropy=False"
    unpatch_model(fp4)

    biased = load(checkpoint, lora_bias=True)       # PEFT's LoRA bias on lora_B: not in our kernel
    report = patch_model(biased, cross_entropy=False)
    assert not report.patched and sorted(report.skipped) == lora_layer_names(biased)
    assert all("lora_bias=True" in r for r in report.skipped.values()), report
    unpatch_model(biased)

    two = load(checkpoint)
    two.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    two.base_model.set_adapter(["default", "other"])
    report = patch_model(two, cross_entropy=False)
    q = sorted(n for n in report.skipped if n.endswith("q_proj"))
    assert len(q) == 2 and all("2 active adapters" in report.skipped[n] for n in q)
    assert len(report.patched) == 12
    unpatch_model(two)
    assert no_patch_left(two)


@pytest.mark.parametrize("arch", ["Mistral", "Qwen3"])
def test_loss_patch_on_other_llama_family_models(arch):
    """Mistral and Qwen3 share Llama's causal-LM forward: a plain (unquantized) model gets the fused loss."""
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                 max_position_embeddings=64, head_dim=16)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    ids, labels = batch()
    ref_out, ref_grads = loss_and_grads(model, ids, labels)
    report = patch_model(model)
    assert report.loss_patched and not report.patched and report.model_class == f"{arch}ForCausalLM"
    out, grads = loss_and_grads(model, ids, labels)
    assert out.logits is None
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-4, msg="loss")
    assert_grads_close(grads, ref_grads, rel=1e-3)
    unpatch_model(model)
    assert no_patch_left(model)


def test_unsupported_model_class_leaves_the_loss():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    report = patch_model(model)
    assert not report.loss_patched and "GPT2LMHeadModel" in report.loss_reason
    assert not report.patched and no_patch_left(model)


# ------------------------------------------------------------------------------------------------ trainers
def _lm_rows(n=8, seed=0):
    ids, labels = batch(seed, n)
    ids, labels = ids.remainder(16) + 3, labels       # a small effective vocabulary: learnable in a few steps
    labels = torch.where(labels == -100, labels, ids)
    return [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_trains(losses, steps):
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(x)) for x in losses), losses
    assert min(losses[-2:]) < losses[0], losses


@pytest.fixture
def native_cpu(monkeypatch):
    """Training tests check the integration, not the kernels (compared above): on a CPU-only machine they run
    the ops' C++ CPU path instead of the Triton interpreter, which would take minutes per run."""
    if not torch.cuda.is_available() and qlora_kernels._backend.native() is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _checkpointing():
    """activation checkpointing on (`gradient_checkpointing` is its deprecated alias since transformers 5.x)."""
    fields = transformers.TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def _spy_kernels(monkeypatch):
    calls = {"lora": 0, "ce": 0, "norm": 0, "swiglu": 0}
    for mod, attr, key in ((lora_ops, "nf4_lora_linear", "lora"), (ce_ops, "fused_linear_cross_entropy", "ce")):
        real = getattr(mod, attr)

        def spy(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, attr, spy)
    return calls


def _train(trainer_cls, model, tmp_path, steps, dataset, train=True, **kw):
    args_cls = transformers.TrainingArguments if trainer_cls is transformers.Trainer else kw.pop("config_cls")
    extra = kw.pop("args", {})
    args = args_cls(output_dir=str(tmp_path), max_steps=steps, learning_rate=2e-2, lr_scheduler_type="constant",
                    logging_steps=1, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                    max_grad_norm=0.0, **_checkpointing(), **extra)          # FusedAdamW clips (0.3)
    opt = FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, max_grad_norm=0.3)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, optimizers=(opt, None), **kw)
    if train:
        trainer.train()
    return trainer


def test_trainer_with_fused_adamw_and_checkpointing(checkpoint, tmp_path, monkeypatch, native_cpu):
    """Trainer + FusedAdamW + checkpointing + gradient accumulation (num_items_in_batch): the patched run
    follows the unpatched one step for step."""
    steps, accum = 4, 2
    opts = dict(args=dict(per_device_train_batch_size=2, gradient_accumulation_steps=accum))
    ref = _losses(_train(transformers.Trainer, load(checkpoint), tmp_path / "ref", steps, _lm_rows(8), **opts))
    calls = _spy_kernels(monkeypatch)
    model = load(checkpoint)
    patch_model(model)
    trainer = _train(transformers.Trainer, model, tmp_path / "ours", steps, _lm_rows(8), **opts)
    assert trainer.model_accepts_loss_kwargs    # num_items_in_batch reaches the patched forward
    losses = _losses(trainer)
    _assert_trains(losses, steps)
    assert_close(torch.tensor(losses), torch.tensor(ref), atol=1e-3, rtol=2e-2, msg="patched vs unpatched losses")
    assert calls["ce"] == steps * accum
    assert calls["lora"] == steps * accum * 14 * 2       # forward + the checkpointed recompute
    unpatch_model(model)
    assert no_patch_left(model)


@pytest.mark.parametrize("order", ["patch-then-trainer", "trainer-then-patch"])
def test_sft_trainer(checkpoint, tmp_path, monkeypatch, native_cpu, order):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    gen = torch.Generator().manual_seed(0)
    rows = {"prompt": [], "completion": []}
    for _ in range(8):
        words = " ".join(f"w{int(i)}" for i in torch.randint(0, 20, (6,), generator=gen))
        price = int(torch.randint(0, 4, (1,), generator=gen))
        rows["prompt"].append(f"{words} Price is $")
        rows["completion"].append(f"{price * 25:02d}.00")
    calls = _spy_kernels(monkeypatch)
    model = load(checkpoint)
    steps = 4
    opts = dict(config_cls=trl.SFTConfig, processing_class=transformers.AutoTokenizer.from_pretrained(checkpoint),
                args=dict(per_device_train_batch_size=4, bf16=False, max_length=SEQ))
    if order == "patch-then-trainer":
        report = patch_model(model)
        trainer = _train(trl.SFTTrainer, model, tmp_path, steps, datasets.Dataset.from_dict(rows), **opts)
    else:   # the one-line patch after the trainer is built: trainer.model is the PEFT model
        trainer = _train(trl.SFTTrainer, model, tmp_path, steps, datasets.Dataset.from_dict(rows), train=False,
                         **opts)
        report = patch_model(trainer.model)
        trainer.train()
    assert len(report.patched) == 14 and report.loss_patched
    _assert_trains(_losses(trainer), steps)
    assert calls["lora"] == steps * 14 * 2               # forward + the checkpointed recompute
    # TRL 1.x installs its own chunked LM head on the base model and asks for it (`fused_lm_head=True`): the
    # patched loss forward hands such calls to it, so the loss is TRL's, computed without full logits too
    assert calls["ce"] == 0
    unpatch_model(model)
    assert all("forward" not in m.__dict__ for n, m in model.named_modules() if n in report.patched)
    trl_forward = model.get_base_model().__dict__["forward"]   # TRL's head stays, ours is gone
    assert not getattr(trl_forward.__func__, "_qlora_kernels_patch", False)


# ------------------------------------------------------------------------------------------------ DDP
def test_ddp_gloo_matches_one_process(checkpoint, tmp_path, native_cpu):
    """2 gloo ranks on half a batch each (loss: sum / num_items of the whole batch, x world size as Trainer
    does for DDP's averaging) give the LoRA gradients and loss of one process on the whole batch."""
    model = load(checkpoint)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(adapters, tmp_path / "adapters.pt")
    ids, labels = batch(n=4)
    torch.save({"ids": ids, "labels": labels}, tmp_path / "batch.pt")
    patch_model(model)
    n_items = (labels[:, 1:] != -100).sum()
    out, grads = loss_and_grads(model, ids, labels, num_items_in_batch=n_items)

    worker = os.path.join(os.path.dirname(__file__), "_patch_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")      # loopback: no dependence on the host name's address
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, checkpoint,
           str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"DDP run timed out; its output:\n{out[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "ddp_result.pt")
    assert_close(result["loss"], out.loss.detach(), atol=1e-5, rtol=1e-4, msg="summed rank losses")
    assert result["grads"].keys() == grads.keys()
    # without the extension (QLORA_KERNELS_NO_EXT=1) the interpreted Triton path runs: its LoRA gradients come
    # from bf16 GEMMs over each rank's rows, so half batches round differently: two bf16 roundings of the
    # tensor's scale (the style.md rule), not of each element
    bf16 = qlora_kernels._backend.native() is None
    for name, g in grads.items():
        atol = 2**-7 * float(g.abs().max()) if bf16 else 1e-5
        assert_close(result["grads"][name], g, atol=atol, rtol=1e-3, msg=name)
