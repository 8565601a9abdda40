"""Patch a Hugging Face QLoRA model (transformers + bitsandbytes NF4 + PEFT LoRA) to run on qlora_kernels.

`patch_model(model)` changes forwards per instance, never classes, and nothing happens at import time:

- every PEFT `lora.bnb.Linear4bit` over a `bnb.nn.Linear4bit` holding NF4 codes gets an instance `forward`
  that calls `nf4_lora_linear` on bitsandbytes' own storage (`NF4Weight.from_bnb`: a view, no copy);
- the causal LM (Llama, Mistral, Qwen2, Qwen3) gets an instance `forward` that, when `labels` are passed
  (with `shift_labels` too, those are used unshifted, as in HF's loss), computes the loss with
  `fused_linear_cross_entropy` on the final hidden states, so the (tokens x vocab) logits are never built. Such calls return `logits=None`. Under `torch.no_grad()`
  (evaluation, `Trainer.predict`, metrics) the model runs its own forward and returns its logits with the loss.

Each patched forward checks, per call, that the fast path still applies (adapters enabled, not merged, one
active plain-LoRA adapter, NF4 storage not repacked, no extra arguments; for the loss, a plain nn.Linear head
and HF's own loss_function) and otherwise calls the forward it replaced, so `disable_adapter()`, `merge_adapter()`, `set_adapter()` and generation keep PEFT's and
transformers' behaviour. `unpatch_model(model)` deletes the instance attributes and restores what was there.
"""
import dataclasses
import functools
import inspect
import types

import torch

_STATE = "_qlora_kernels_patch"          # per-instance state: {"prev": the instance forward replaced, or None}
LOSS_MODEL_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")   # one math: reference.rms_norm
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")   # down(act(gate(x)) * up(x))
SILU_CLASSES = ("SiLUActivation", "SiLU")


@dataclasses.dataclass
class PatchReport:
    """What `patch_model` changed: LoRA layers patched, layers left as they were (with the reason), the loss."""
    patched: list = dataclasses.field(default_factory=list)     # module names
    skipped: dict = dataclasses.field(default_factory=dict)     # module name -> reason
    norms_patched: list = dataclasses.field(default_factory=list)   # RMSNorm module names
    mlps_patched: list = dataclasses.field(default_factory=list)    # SwiGLU MLP module names
    loss_patched: bool = False
    loss_reason: str = ""                                       # why the loss was not patched ("" if it was)
    model_class: str = ""

    def __str__(self):
        lines = [f"qlora_kernels.patch_model: {self.model_class or 'model'}",
                 f"  LoRA NF4 layers patched: {len(self.patched)}",
                 f"  layers left as they are: {len(self.skipped)}"]
        lines += [f"    {name}: {reason}" for name, reason in self.skipped.items()]
        lines.append(f"  RMSNorm modules patched: {len(self.norms_patched)}")
        lines.append(f"  SwiGLU MLPs patched: {len(self.mlps_patched)}")
        lines.append("  loss: fused linear cross-entropy (logits=None when labels are passed)" if self.loss_patched
                     else f"  loss: not patched ({self.loss_reason})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- helpers
def _unwrap(model):
    """The module under DDP / DataParallel wrappers."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _prev_forward(module):
    """The forward a patch replaces: the instance attribute if one is set (e.g. an accelerate hook), else None."""
    return module.__dict__.get("forward")


def _original(module):
    """The forward to fall back to: the replaced instance forward, or the class's."""
    state = module.__dict__.get(_STATE)
    prev = state["prev"] if state else None
    return prev if prev is not None else types.MethodType(type(module).forward, module)


class _PatchedForward:
    """A patched module's instance `forward`: fn(module, ...). Not a bound method, which pickle saves as
    getattr(module, fn's name): a torch.save'd patched model failed to load; this pickles fn by its module-level
    name. It still answers as a bound method does (`__func__`, `__self__`: accelerate re-binds and unwraps
    instance forwards by them) with the signature Trainer and generate inspect (the class forward's for the LM).
    Once unpatched (its state gone or replaced) it behaves as the forward it replaced: a wrapper kept around it
    and patched again must not call back into the new patch (that recursed)."""

    def __init__(self, fn, module, state, class_signature=False):
        self.fn, self.module, self.state, self.class_signature = fn, module, state, class_signature

    def __call__(self, *args, **kwargs):
        return _run_patched(self.fn, self.state, self.module, args, kwargs)

    @property
    def __func__(self):
        """A function of (module, ...) tied to this patch's state, which accelerate re-binds as a method: it too
        turns into the replaced forward once unpatched."""
        fn, state = self.fn, self.state

        @functools.wraps(type(self.module).forward if self.class_signature else fn)
        def forward(module, *args, **kwargs):
            return _run_patched(fn, state, module, args, kwargs)
        forward._qlora_kernels_patch = True
        return forward

    @property
    def __self__(self):
        return self.module

    @property
    def __signature__(self):
        return inspect.signature(types.MethodType(self.__func__, self.module))


def _run_patched(fn, state, module, args, kwargs):
    if module.__dict__.get(_STATE) is not state:      # unpatched (or patched anew) since
        prev = state["prev"]
        return (prev or types.MethodType(type(module).forward, module))(*args, **kwargs)
    return fn(module, *args, **kwargs)


def _is_ours(fn):
    """Our forward, also after accelerate re-bound its __func__ as a method."""
    return getattr(getattr(fn, "__func__", None), "_qlora_kernels_patch", False)


def _install(module, fn, class_signature=False):
    if _STATE in module.__dict__:          # already patched: keep the first original
        return
    state = module.__dict__[_STATE] = {"prev": _prev_forward(module)}
    module.forward = _PatchedForward(fn, module, state, class_signature)


def _dispatch_hook(module):
    """accelerate's hook on the module itself (device_map dispatch, offload) replaces its forward to move
    tensors; a patch would bypass it: the reason to leave the module, else ''."""
    return "an accelerate hook on it (device_map dispatch or offload)" \
        if getattr(module, "_hf_hook", None) is not None else ""


# ----------------------------------------------------------------------------------------- LoRA layers
def _lora_classes():
    """(PEFT's lora.bnb.Linear4bit, bnb.nn.Linear4bit, peft's LoraLayer), None where not importable."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None, None, None
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except (ImportError, AttributeError):
        return None, None, LoraLayer
    return LoraLinear4bit, bnb.nn.Linear4bit, LoraLayer


def _lora_plan(layer, bnb_linear4bit):
    """(adapter name, None) when nf4_lora_linear can serve `layer` as it is now, else (None, reason)."""
    base = layer.get_base_layer()
    if not isinstance(base, bnb_linear4bit):
        return None, f"base layer is {type(base).__name__}, not bitsandbytes Linear4bit"
    qs = getattr(base.weight, "quant_state", None)
    if qs is None:
        return None, "weight not quantized (quant_state is None)"
    if qs.quant_type != "nf4":
        return None, f"quant_type {qs.quant_type!r} (only 'nf4' is served)"
    if getattr(qs, "packing_format_for_cpu", False):
        return None, "weight repacked by bitsandbytes for CPU inference"
    if _dispatch_hook(layer):
        return None, _dispatch_hook(layer)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters (exactly one is served)"
    name = active[0]
    if layer.use_dora.get(name, False) or name in getattr(layer, "lora_magnitude_vector", {}):
        return None, f"DoRA (adapter {name!r})"
    if name in getattr(layer, "lora_variant", {}):
        return None, f"LoRA variant {type(layer.lora_variant[name]).__name__} (adapter {name!r})"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return None, f"lora_bias=True (adapter {name!r})"
    A, B = layer.lora_A[name], layer.lora_B[name]
    if type(A) is not torch.nn.Linear or type(B) is not torch.nn.Linear:
        return None, f"LoRA modules are {type(A).__name__}/{type(B).__name__}, not Linear"
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (torch.nn.Dropout, torch.nn.Identity)):
        return None, f"dropout module {type(drop).__name__}"
    hooked = _hooked(base, A, B, drop)
    if hooked:
        return None, f"forward hooks on the {hooked} module (the fused path would bypass them)"
    return name, None


def _hooked(*modules):
    """The type name of the first module with forward hooks (or accelerate's offload hook), else ''. The
    fused paths read these modules' weights without calling them."""
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_hf_hook", None) is not None:
            return type(m).__name__
    return ""


def _lora_forward(self, x, *args, **kwargs):
    """PEFT's Linear4bit forward for one active NF4 LoRA adapter, via nf4_lora_linear (else the original)."""
    from bitsandbytes.nn import Linear4bit
    from qlora_kernels.nf4_weight import NF4Weight
    from qlora_kernels.ops.nf4_lora_linear import nf4_lora_linear

    orig = _original(self)
    if (_STATE not in self.__dict__ or args or any(v is not None for v in kwargs.values())
            or self.disable_adapters or self.merged or not isinstance(x, torch.Tensor)
            or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
        return orig(x, *args, **kwargs)
    name, _ = _lora_plan(self, Linear4bit)
    if name is None:
        return orig(x, *args, **kwargs)
    base = self.get_base_layer()
    weight = base.weight
    qs = weight.quant_state
    packed = weight.data if weight.dtype == torch.uint8 else weight.data.view(torch.uint8)
    qweight = NF4Weight.from_bnb(packed, quant_state=qs)
    compute = base.compute_dtype or x.dtype
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    bias = base.bias.to(compute) if base.bias is not None else None
    y = nf4_lora_linear(x.to(compute), qweight, self.lora_A[name].weight, self.lora_B[name].weight,
                        scaling=float(self.scaling[name]), bias=bias, dropout_p=p, training=drop.training)
    return y.to(x.dtype)


_lora_forward._qlora_kernels_patch = True



# ----------------------------------------------------------------------------------------- RMSNorm
def _norm_plan(module):
    """None when an HF RMSNorm module can run `rms_norm`, else the reason."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return "no (H,) weight and float variance_epsilon"
    if _hooked(module):
        return "forward hooks on it"
    return None


def _norm_forward(self, hidden_states, *args, **kwargs):
    """HF's RMSNorm forward by `rms_norm` where its Triton path runs (CUDA; CPU under the interpreter); the
    module's own forward elsewhere (the same math in torch ops) and for anything unexpected."""
    from qlora_kernels.ops.rms_norm import rms_norm, runs_triton

    if (_STATE not in self.__dict__ or args or kwargs or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or hidden_states.dim() == 0 or not runs_triton(hidden_states) or _norm_plan(self) is not None
            or self.weight.device != hidden_states.device or self.weight.shape[0] != hidden_states.shape[-1]
            or self.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
        return _original(self)(hidden_states, *args, **kwargs)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


_norm_forward._qlora_kernels_patch = True



# ----------------------------------------------------------------------------------------- SwiGLU MLP
def _mlp_plan(module):
    """None when an HF MLP computes down(silu(gate(x)) * up(x)) and `swiglu` can serve it, else the reason."""
    act = getattr(module, "act_fn", None)
    if type(act).__name__ not in SILU_CLASSES or getattr(act, "inplace", False):
        return f"activation {act!r}, not an out-of-place SiLU"
    if _dispatch_hook(module):
        return _dispatch_hook(module)
    if not all(isinstance(getattr(module, p, None), torch.nn.Module) for p in ("gate_proj", "up_proj", "down_proj")):
        return "no gate_proj / up_proj / down_proj"
    if _hooked(module.act_fn):
        return "forward hooks on act_fn"
    return None


def _mlp_forward(self, x, *args, **kwargs):
    """The MLP's forward with silu(gate) * up by `swiglu` where its Triton path runs (the projections are called
    as the module calls them, gate first); the module's own forward elsewhere."""
    from qlora_kernels._backend import runs_triton
    from qlora_kernels.ops.swiglu import swiglu

    if (_STATE not in self.__dict__ or args or kwargs or not isinstance(x, torch.Tensor) or not runs_triton(x)
            or _mlp_plan(self) is not None):
        return _original(self)(x, *args, **kwargs)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if (gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device
            or gate.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not runs_triton(gate)):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(swiglu(gate, up))


_mlp_forward._qlora_kernels_patch = True



# ----------------------------------------------------------------------------------------- causal-LM loss
def _find_causal_lm(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _unwrap(base)


def _loss_plan(lm):
    """None when the causal LM's loss can be fused, else the reason."""
    cls = type(lm).__name__
    if cls not in LOSS_MODEL_CLASSES:
        return f"{cls} is not a supported causal LM ({', '.join(LOSS_MODEL_CLASSES)})"
    if _dispatch_hook(lm):
        return _dispatch_hook(lm)
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"lm_head is {type(head).__name__}, not a plain nn.Linear"
    if _hooked(head):
        return "forward hooks on lm_head (the fused loss would bypass them)"
    if getattr(lm.config, "final_logit_softcapping", None) is not None:
        return "final_logit_softcapping is set"
    fn = getattr(lm, "loss_function", None)
    if getattr(fn, "__name__", "") != "ForCausalLMLoss":
        return f"custom loss_function {getattr(fn, '__name__', fn)!r}"
    return None


def _lm_loss_forward(self, *args, **kwargs):
    """The causal LM's forward; with labels and grad enabled, the loss comes from fused_linear_cross_entropy
    and logits=None (without grad, evaluation loops want the logits: the original forward runs)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from qlora_kernels.ops.cross_entropy import LabelledCountHint, count_hint, fused_linear_cross_entropy

    def orig(*a, **k):   # looked up only when needed: the fast path builds no bound method (torch.compile)
        return _original(self)(*a, **k)

    state = self.__dict__.get(_STATE)
    if state is None or "fused_lm_head" in kwargs or not torch.is_grad_enabled() or _loss_plan(self) is not None:
        # unpatched, TRL's own fused head asked for, evaluation (Trainer.predict / compute_metrics read the
        # logits), or the head or loss_function changed since patch_model (e.g. LoRA put on lm_head)
        return orig(*args, **kwargs)
    sig = state.get("sig")
    if sig is None:
        sig = state["sig"] = inspect.signature(_original(self))
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return orig(*args, **kwargs)
    params = dict(bound.arguments)
    extra = {}
    for pname, p in sig.parameters.items():
        if p.kind == inspect.Parameter.VAR_KEYWORD:
            extra = dict(params.pop(pname, {}))
    labels = params.pop("labels", None)
    shift_labels = extra.get("shift_labels")   # used instead of shifting `labels`, as HF's loss does
    logits_to_keep = params.get("logits_to_keep", 0)
    if labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return orig(*args, **kwargs)   # HF computes a loss only with labels (shift_labels alone: logits only)
    params.pop("logits_to_keep", None)
    extra.pop("shift_labels", None)
    num_items = extra.pop("num_items_in_batch", None)
    ignore_index = extra.pop("ignore_index", -100)
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = self.get_output_embeddings()
    weight, bias = head.weight, head.bias
    # non_blocking: labels or a count left on the CPU must not make the host wait for the forward. The
    # labelled count starts its way to the host before the forward (see LabelledCountHint).
    y = shift_labels.to(weight.device, torch.int64, non_blocking=True).contiguous().reshape(-1)
    hint = None if torch.compiler.is_compiling() else LabelledCountHint(y, ignore_index)   # no storage traced
    outputs = self.model(**params, **extra)
    hidden = outputs.last_hidden_state.to(device=weight.device, dtype=weight.dtype)
    with count_hint(hint):
        loss = fused_linear_cross_entropy(hidden, weight, y.view(shift_labels.shape), bias=bias,
                                          ignore_index=ignore_index, reduction="mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device, non_blocking=True) if torch.is_tensor(num_items) else num_items)
    # the cache field is `past_key_values` before transformers 5.2x and `cache` after: pass what this one has
    passed = [name for name in ("past_key_values", "cache", "hidden_states", "attentions")
              if name in CausalLMOutputWithPast.__dataclass_fields__]
    out = CausalLMOutputWithPast(loss=loss, logits=None, **{name: getattr(outputs, name, None) for name in passed})
    return out if return_dict else out.to_tuple()


_lm_loss_forward._qlora_kernels_patch = True


# ----------------------------------------------------------------------------------------- API
def patch_model(model: torch.nn.Module, lora_linear: bool = True, cross_entropy: bool = True,
                rms_norm: bool = True, swiglu: bool = True) -> PatchReport:
    """Route a QLoRA causal LM through qlora_kernels, per instance; returns what was (not) patched.

    `model`: a PEFT model (or the transformers model inside it, or either under DDP) whose projections are
    PEFT LoRA layers over bitsandbytes `Linear4bit` NF4 weights.
    `lora_linear`: each such layer with one active plain-LoRA adapter runs `nf4_lora_linear` on bitsandbytes'
    storage (scaling incl. rslora, dropout, bias, compute dtype honoured; output in the input's dtype).
    DoRA, fp4, several active adapters, lora_bias, ... are left as they are and listed with the reason.
    `cross_entropy`: with `labels`, the causal LM's loss is `fused_linear_cross_entropy` on the final hidden
    states (labels shifted by one, ignore_index -100, `num_items_in_batch` -> sum / num_items_in_batch) and
    the returned `logits` is None (a batch with no labelled token gives loss 0, where HF gives NaN); without
    labels, or with `logits_to_keep` != 0, the model's own forward runs and returns its logits. TRL's SFTTrainer computes
    its loss with its own fused LM head (`fused_lm_head=True`), which this patch passes through untouched.
    `rms_norm`: the Llama / Mistral / Qwen2 / Qwen3 RMSNorm modules run `rms_norm` (one kernel each way instead
    of eager's ~7 elementwise passes and fp32 copies) on CUDA; on CPU tensors their own forward runs.
    `swiglu`: the same models' MLPs compute silu(gate) * up by `swiglu` (one kernel each way) on CUDA.
    Patching twice is a no-op; `unpatch_model` reverts.
    """
    LoraLinear4bit, BnbLinear4bit, LoraLayer = _lora_classes()
    root = _unwrap(model)
    report = PatchReport()
    lm = _find_causal_lm(root)
    report.model_class = type(lm).__name__
    if lora_linear:
        for name, module in root.named_modules():
            if LoraLayer is None or not isinstance(module, LoraLayer):
                continue
            if LoraLinear4bit is None or not isinstance(module, LoraLinear4bit):
                report.skipped[name] = f"{type(module).__module__}.{type(module).__name__} is not PEFT's " \
                                       "lora.bnb.Linear4bit"
                continue
            adapter, reason = _lora_plan(module, BnbLinear4bit)
            if reason is not None:
                report.skipped[name] = reason
                continue
            _install(module, _lora_forward)
            report.patched.append(name)
    kinds = ((rms_norm, NORM_CLASSES, _norm_plan, _norm_forward, report.norms_patched),
             (swiglu, MLP_CLASSES, _mlp_plan, _mlp_forward, report.mlps_patched))
    for wanted, classes, plan, forward, patched in kinds:
        for name, module in root.named_modules() if wanted else ():
            if type(module).__name__ in classes:
                reason = plan(module)
                if reason is None:
                    _install(module, forward)
                    patched.append(name)
                else:
                    report.skipped[name] = reason
    if cross_entropy:
        reason = _loss_plan(lm)
        if reason is None:
            _install(lm, _lm_loss_forward, class_signature=True)
            lm.__dict__[_STATE].setdefault("sig", inspect.signature(_original(lm)))   # read per call
            report.loss_patched = True
        else:
            report.loss_reason = reason
    else:
        report.loss_reason = "cross_entropy=False"
    return report


def unpatch_model(model: torch.nn.Module) -> int:
    """Undo `patch_model`: delete the instance forwards it set (restoring any it replaced). Returns the number
    of modules restored. A patched forward that something else wrapped afterwards stays in that wrapper's
    chain but behaves as the original from now on."""
    count = 0
    for module in _unwrap(model).modules():
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if _is_ours(module.__dict__.get("forward")):
            if state["prev"] is None:
                del module.forward
            else:
                module.forward = state["prev"]
        count += 1
    return count
