"""End-to-end QLoRA training step: forward, loss, backward, clip + optimizer, on a Llama-shaped model with
random weights (no download), NF4 double quant (bitsandbytes storage) + PEFT LoRA, gradient checkpointing.

Providers, same model and batch, measured in one process, each step under torch.autocast(bf16) as Trainer /
SFTTrainer with bf16=True run it (accelerate wraps the forward): PEFT's LoRA branch then runs in bf16.
- "bnb+peft+torch": bitsandbytes NF4 + PEFT LoRA, HF loss on full logits, clip_grad_norm_ + torch AdamW(fused)
- "bnb+peft+torch (no autocast)": the same without autocast, as a plain training loop runs it: PEFT casts x to
  its fp32 LoRA weights, so the LoRA GEMMs, dropout, scaling run in fp32
- "bnb+peft+torch+liger": the same with Liger's fused linear cross-entropy on the backbone's hidden states
  (when liger_kernel is installed)
- "qlora_kernels": the same model after qlora_kernels.patch_model (fused NF4+LoRA GEMMs, RMSNorm kernels,
  linear cross-entropy on the labelled rows only) + FusedAdamW(max_grad_norm=0.3)
Completion-only labels: the last 5 positions of every row (~4 % at seq 128), as in the price recipe.
Reports tokens/s (all positions) and peak memory of a step. --quick runs a tiny model on the CPU.
"""
import contextlib
import copy
import gc
import os

import torch

import qlora_kernels as qk
from benchmarks import harness

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab (../shared/notes/workload.md)
    "llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256),
    "llama-3.2-3B": (3072, 8192, 28, 24, 8, 128256),
    "tiny": (64, 128, 2, 4, 2, 512),
}
LORA = {  # r, alpha, targets, batch, seq
    "lite": (32, 64, ["q_proj", "k_proj", "v_proj", "o_proj"], 32, 128),
    "full": (256, 512, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 256, 128),
}


def build_qlora_model(shape, r, alpha, targets, device):
    """Random-init Llama with every decoder Linear as a bitsandbytes NF4 Linear4bit, wrapped by PEFT LoRA."""
    import bitsandbytes as bnb
    import peft
    import transformers

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      tie_word_embeddings=shape != "llama-3.1-8B")
    dtype = torch.bfloat16
    with torch.device(device):  # random init straight on the device, in bf16 (a 3B model in fp32 on CPU is slow)
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                setattr(parent, name, q)
    model = model.to(device)        # quantizes the Params4bit
    model.is_loaded_in_4bit = True  # PEFT picks its bnb LoRA layer on this flag (as transformers sets it)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.1, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():  # PEFT's B starts at zero: make the LoRA branch matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model


def batch(vocab, rows, seq, device):
    ids = torch.randint(0, vocab, (rows, seq), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]
    return ids, labels


def amp(device, on=True):
    """bf16 autocast around the forward and loss, as Trainer(bf16=True) runs them (backward outside it)."""
    return torch.autocast(device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def step_fn(model, optimizer, ids, labels, clip, autocast=True):
    def step():
        with amp(ids.device.type, autocast):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def liger_step_fn(model, optimizer, ids, labels):
    """bnb+peft+torch with Liger's fused linear cross-entropy as the loss: the backbone's hidden states and
    the LM head's weight go to Liger (shifted as HF does), so the full logits are never built."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()
    causal_lm = model.get_base_model()     # the LlamaForCausalLM that holds PEFT's LoRA layers

    def step():
        with amp(ids.device.type):
            hidden = causal_lm.model(input_ids=ids).last_hidden_state
            loss = loss_fn(causal_lm.lm_head.weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                           labels[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    args = harness.parse_args(__doc__)
    device = harness.device()
    cases = [("tiny", "lite", 4, 32)] if args.quick else [
        (shape, lora, None, None) for shape in ("llama-3.2-1B", "llama-3.2-3B") for lora in ("lite", "full")]
    rows = harness.Rows("e2e", args)
    for shape, lora_name, rows_override, seq_override in cases:
        r, alpha, targets, n_rows, seq = LORA[lora_name]
        n_rows, seq = rows_override or n_rows, seq_override or seq
        torch.manual_seed(0)
        try:
            base = build_qlora_model(shape, r, alpha, targets, device)
        except ImportError as err:
            print(f"skipped: {err}")
            return
        ids, labels = batch(SHAPES[shape][5], n_rows, seq, device)
        ours = copy.deepcopy(base)
        report = qk.patch_model(ours)
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
        torch_adamw = lambda m: torch.optim.AdamW(trainable(m), lr=1e-4, weight_decay=0.001,  # noqa: E731
                                                  fused=device == "cuda")
        # ours first, the no-autocast peer last: a suite cut by its limit loses the least telling row
        providers = {
            "qlora_kernels": step_fn(ours, qk.FusedAdamW(trainable(ours), lr=1e-4, weight_decay=0.001,
                                                         max_grad_norm=0.3), ids, labels, clip=False),
            "bnb+peft+torch": step_fn(base, torch_adamw(base), ids, labels, clip=True),
        }
        try:   # same model as bnb+peft+torch (its own optimizer state): only the loss differs
            providers["bnb+peft+torch+liger"] = liger_step_fn(base, torch_adamw(base), ids, labels)
        except ImportError as err:
            print(f"bnb+peft+torch+liger skipped: {err}")
        providers["bnb+peft+torch (no autocast)"] = step_fn(base, torch_adamw(base), ids, labels, clip=True,
                                                            autocast=False)
        results = {}
        only = os.environ.get("E2E_PROVIDERS")   # e.g. "qlora_kernels,bnb+peft+torch": a rerun of some rows
        for name in [n for n in providers if not only or n in only.split(",")]:
            # popped: once measured, its optimizer states go (a peer must not run out of memory because an
            # earlier provider's states are still on the device)
            step = providers.pop(name)
            try:
                ms = harness.time_ms(step, reps=3 if device == "cpu" else 5)
                peak = harness.peak_memory_mb(step)
            except Exception as err:  # noqa: BLE001 - OOM or a peer's failure costs that provider's row only
                oom = isinstance(err, torch.OutOfMemoryError)
                if not oom:
                    print(f"{name} {shape} {lora_name} failed: {err}")
                rows.append({"model": shape, "lora": lora_name, "batch x seq": f"{n_rows}x{seq}", "provider": name,
                             "ms/step": None, "peak MB": "OOM" if oom else "failed"})
                results[name] = float("nan")
                continue
            finally:
                step = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            results[name] = ms
            rows.append({"model": shape, "lora": lora_name, "batch x seq": f"{n_rows}x{seq}", "provider": name,
                         "ms/step": ms, "tokens/s": n_rows * seq / ms * 1e3, "peak MB": peak,
                         "patched layers": len(report.patched) if name == "qlora_kernels" else None})
        if "qlora_kernels" in results:   # E2E_PROVIDERS may leave ours out
            ours_row = next(row for row in rows[::-1] if row["provider"] == "qlora_kernels")
            for peer in ("bnb+peft+torch", "bnb+peft+torch (no autocast)", "bnb+peft+torch+liger"):
                if peer in results:
                    ours_row[f"speedup vs {peer}"] = results[peer] / results["qlora_kernels"]
            rows.save()   # a suite cut in the next case keeps these
        del base, ours, providers
        if device == "cuda":
            torch.cuda.empty_cache()
    harness.write_results("e2e", rows, args,
                          notes="one training step: forward, loss, backward, clip 0.3 + AdamW; gradient "
                                "checkpointing; labels on the last 5 positions of each row")


if __name__ == "__main__":
    main()
