"""QLoRA for a plain transformers model, without bitsandbytes or PEFT: `convert_to_qlora` swaps the target
`nn.Linear` layers for `qlora_kernels.nn.LoRALinear4bit` (NF4 base, LoRA adapter); `save_adapter` /
`load_adapter` write and read PEFT's adapter format, so `peft.PeftModel.from_pretrained(base, path)` loads
what was trained here (and the reverse).

PEFT's format (peft 0.21, task CAUSAL_LM): `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), fp32, and
`adapter_config.json` (peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, use_rslora, ...).
"""
import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

from qlora_kernels.nn import LoRALinear4bit
from qlora_kernels.reference.nf4 import check_blocksize

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _check_args(r, lora_alpha, lora_dropout, blocksize, use_rslora=False):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not 0 < lora_alpha < math.inf:
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or isinstance(lora_dropout, bool) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
    check_blocksize(blocksize)


def _unwrapped(model):
    """The model inside torch.compile's and DDP-style wrappers (`_orig_mod`, `.module`): their names would
    prefix every saved key, and PEFT would then load none of them (with only a warning)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _tied_head(model, chosen):
    """The chosen path of an output head that shares its weight with the input embeddings, else None."""
    try:
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", 0):
        return None
    return next((path for path, m in chosen.items() if m is head), None)


def _targets(model, target_modules):
    """{module path: nn.Linear} of the layers to convert, chosen by PEFT's rules: a string is a regular
    expression the whole module path must match; a list names modules by their path or a dotted suffix of it
    (`q_proj`, `self_attn.q_proj`). ValueError naming the targets that match no nn.Linear."""
    if target_modules is None:
        raise ValueError("target_modules must be a regular expression, a sequence of module names or "
                         "'all-linear', got None")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if target_modules == "all-linear":     # PEFT's shorthand: every linear layer but the output head
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in linears.items() if m is not head and n.rsplit(".", 1)[-1] != "lm_head"}
    if isinstance(target_modules, str) and target_modules:
        chosen = {n: m for n, m in linears.items() if re.fullmatch(target_modules, n)}
        missing = [] if chosen else [target_modules]
    else:
        names = tuple(target_modules) if not isinstance(target_modules, str) else ()
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"target_modules must be a regular expression or a non-empty sequence of module "
                             f"names, got {target_modules!r}")
        hits = {t: [n for n in linears if n == t or n.endswith("." + t)] for t in names}
        chosen = {n: linears[n] for n in linears if any(n in found for found in hits.values())}
        missing = [t for t, found in hits.items() if not found]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        converted = sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)})
        raise ValueError(f"target_modules {missing} match no nn.Linear in the model; its linear layers are "
                         f"named {available}" + (f"; already converted: {converted}" if converted else ""))
    tied = _tied_head(model, chosen)
    if tied is not None:
        raise ValueError(f"{tied!r} shares its weight with the input embeddings (tie_word_embeddings): converting "
                         "it would untie them; leave it out of target_modules")
    return chosen


def _set_module(model, path, module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_layers(model) -> dict:
    """{module path: LoRALinear4bit} of a converted model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


def convert_to_qlora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     target_modules=DEFAULT_TARGETS, use_rslora: bool = False, blocksize: int = 64,
                     double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace each `nn.Linear` that `target_modules` selects by a `LoRALinear4bit` (NF4 base quantized
    exactly as bitsandbytes does, fresh PEFT-initialized LoRA), in place, and freeze every other parameter.
    Returns `model`. `target_modules` as PEFT reads it: a list of names (`q_proj`, or a longer dotted suffix
    of the module path), a regular expression for the whole path, or "all-linear" (every linear layer but the
    output head).
    """
    _check_args(r, lora_alpha, lora_dropout, blocksize, use_rslora)
    chosen = _targets(model, target_modules)
    return _convert(model, {path: (linear, r, lora_alpha) for path, linear in chosen.items()}, lora_dropout,
                    use_rslora, blocksize, double_quant, compute_dtype)


def _convert(model, layers, lora_dropout, use_rslora, blocksize=64, double_quant=True,
             compute_dtype=torch.bfloat16):
    """Convert exactly `layers` ({path: (nn.Linear, r, lora_alpha)}) and freeze all but the LoRA weights.
    (compute_dtype is checked by LoRALinear4bit, at the first layer, before any is swapped in.)"""
    for _, r, lora_alpha in layers.values():   # every layer checked before any is converted
        _check_args(r, lora_alpha, lora_dropout, blocksize, use_rslora)
    for path, (linear, r, lora_alpha) in layers.items():
        layer = LoRALinear4bit.from_linear(linear, r, lora_alpha, lora_dropout, use_rslora, blocksize,
                                           double_quant, compute_dtype)
        layer.train(linear.training)
        _set_module(model, path, layer)
    lora = {id(p) for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():    # LoRA of earlier conversions stays trainable
        p.requires_grad_(id(p) in lora)
    return model


def adapter_config(model, base_model_name_or_path=None) -> dict:
    """The `adapter_config.json` PEFT writes for the LoRA layers of a converted model."""
    model = _unwrapped(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear4bit layers: convert it with convert_to_qlora first")
    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(m.lora_alpha for m in layers.values())
    rslora = {m.use_rslora for m in layers.values()}
    dropouts = {m.lora_dropout for m in layers.values()}
    if len(rslora) > 1 or len(dropouts) > 1:
        raise ValueError("PEFT's format needs one use_rslora and one lora_dropout for all LoRA layers")
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    # short names (q_proj, ...) when they select exactly these layers in PEFT's matching; else full paths
    short = sorted({n.rsplit(".", 1)[-1] for n in layers})
    linear_like = [n for n, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, LoRALinear4bit)]
    exact = {n for n in linear_like if n.rsplit(".", 1)[-1] in short} == set(layers)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    # else the full paths as one regular expression PEFT matches against whole paths (a list of paths would
    # also select any layer whose path ends with one of them)
    targets = short if exact else "|".join(re.escape(n) for n in sorted(layers))
    # CAUSAL_LM makes PEFT wrap the model for generation, which a model that cannot generate breaks
    task_type = "CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": dropouts.pop(),
        "target_modules": targets, "use_rslora": rslora.pop(),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "use_dora": False, "lora_bias": False,
    }


def save_adapter(model: nn.Module, path: str, base_model_name_or_path: str | None = None) -> None:
    """Write the LoRA weights of a converted model in PEFT's format: `path/adapter_model.safetensors`
    (fp32, keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`) and `path/adapter_config.json`.
    `base_model_name_or_path` defaults to `model.config.name_or_path`."""
    from safetensors.torch import save_file

    model = _unwrapped(model)
    config = adapter_config(model, base_model_name_or_path)
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous().clone()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that matches the end of the
    module path (as a regex), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, path: str, **convert_kwargs) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model` and return it. The adapter file names its
    layers, so whatever chose them in PEFT (target names or a regex, layers_to_transform, exclude_modules)
    needs no re-interpretation; each layer's r is its tensors' and its lora_alpha comes from alpha_pattern or
    the config. A plain model first gets exactly those layers converted (`convert_kwargs`: blocksize,
    double_quant, compute_dtype). Every LoRA layer must get its A and B, and every tensor in the file must
    have a layer of the right shape, r and alpha: otherwise ValueError, and nothing is loaded or converted."""
    from safetensors.torch import load_file

    model = _unwrapped(model)
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise FileNotFoundError(f"{path!r} is not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("bias", "none") != "none" \
            or cfg.get("modules_to_save"):
        raise ValueError(f"unsupported adapter in {path!r}: only plain LoRA (no DoRA, bias or modules_to_save) "
                         "loads into LoRALinear4bit")
    tensors = load_file(w_path)
    suffixes = (".lora_A.weight", ".lora_B.weight")
    paths = sorted({k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors
                    if k.startswith(PEFT_PREFIX) and k.endswith(suffixes)})
    rslora = bool(cfg.get("use_rslora", False))

    def expected_r_alpha(name):   # (r, lora_alpha) the adapter gives layer `name`
        return (_pattern_value(cfg.get("rank_pattern"), name, cfg["r"]),
                _pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))

    convert = not lora_layers(model)
    if convert:   # the layers to convert: the file's, each an nn.Linear of the model with matching shapes
        linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
        absent = [n for n in paths if n not in linears]
        if absent or not paths:
            raise ValueError(f"adapter {path!r} does not fit the model: {len(absent)} of its {len(paths)} LoRA "
                             f"layer(s) are not nn.Linear layers of it {absent[:3]}")
        layers = {n: (linears[n].in_features, linears[n].out_features, *expected_r_alpha(n)) for n in paths}
    else:
        layers = {n: (m.in_features, m.out_features, m.r, m.lora_alpha)
                  for n, m in lora_layers(model).items()}
    expected = {f"{PEFT_PREFIX}{n}.{part}.weight": (n, part) for n in layers for part in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {path!r} does not fit the model: {len(missing)} missing key(s) "
                         f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}")
    for name, (in_f, out_f, r, alpha) in layers.items():
        want_r, want_alpha = expected_r_alpha(name)
        layer_rslora = rslora if convert else lora_layers(model)[name].use_rslora
        if (r, alpha, layer_rslora) != (want_r, want_alpha, rslora):
            raise ValueError(f"adapter {path!r} has r={want_r}, lora_alpha={want_alpha}, use_rslora={rslora} for "
                             f"{name}; the layer has r={r}, lora_alpha={alpha}, use_rslora={layer_rslora}")
        for part, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)}, the layer needs "
                                 f"{shape}")
    if convert:   # exactly the file's layers (by path: a name would also match longer paths ending in it)
        _convert(model, {n: (linears[n], r, alpha) for n, (_, _, r, alpha) in layers.items()},
                 cfg.get("lora_dropout", 0.0), rslora, **convert_kwargs)
    converted = lora_layers(model)
    with torch.no_grad():
        for key, (name, part) in expected.items():
            param = getattr(converted[name], part)
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
    return model
