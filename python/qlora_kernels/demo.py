"""`qlora-kernels demo`: a course-style QLoRA fine-tune (product description -> "Price is $123.00"), trained
twice from the same initial state: with qlora_kernels (NF4+LoRA linear op, label-sparse fused linear
cross-entropy, FusedAdamW with the clip inside) and with the plain-PyTorch reference path (PEFT's LoRA formula
over the reference NF4 dequantization, full logits + F.cross_entropy as transformers computes the loss,
torch.optim.AdamW + clip_grad_norm_). Same data order, same seeds, same dropout masks, so the two loss
curves should lie on top of each other.

The built-in model is a small Llama (random init, built in code, no download) with a word-level tokenizer
built from the data set's words; `--model PATH` fine-tunes a local transformers checkpoint instead.
"""
import copy
import functools
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------ data set
CATEGORIES = {"headphones": 60, "keyboard": 45, "monitor": 220, "laptop": 700, "blender": 55, "vacuum": 180,
              "camera": 420, "drill": 95, "tent": 140, "watch": 250, "chair": 160, "speaker": 85}
QUALITY = {"budget": 0.6, "standard": 1.0, "premium": 1.5, "professional": 2.0}
SIZE = {"compact": 0.8, "regular": 1.0, "large": 1.3}
BRANDS = ["acme", "zenith", "nova", "apex", "orbit", "vertex", "lumen", "kestrel", "polar", "summit"]
FEATURES = ["wireless", "black", "white", "silver", "rechargeable", "waterproof", "lightweight", "durable",
            "foldable", "quiet", "smart", "classic", "modern", "portable"]
PROMPT_TAIL = "Price is $"
PRICE_RANGE = (5, 999)


@dataclass
class Example:
    prompt: str       # "... Price is $"
    completion: str   # "123.00"
    price: float


def make_dataset(n: int, seed: int) -> list:
    """n products whose price is category x quality x size times a seeded +-15 % that nothing in the prompt
    tells (brand and features are noise too): as in real listings, the best model is off by ~7 % on average,
    and the loss has a floor above zero (an exact function was learnt to a loss of ~0.003 on a GPU, where
    the two runs' final losses differed by noise around zero)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cat, qual, size = rng.choice(list(CATEGORIES)), rng.choice(list(QUALITY)), rng.choice(list(SIZE))
        base = CATEGORIES[cat] * QUALITY[qual] * SIZE[size] * rng.uniform(0.85, 1.15)
        price = float(min(PRICE_RANGE[1], max(PRICE_RANGE[0], round(base))))
        feats = rng.sample(FEATURES, 2)
        prompt = (f"How much does this cost ? {rng.choice(BRANDS)} {qual} {size} {cat} , {feats[0]} , {feats[1]} . "
                  f"{PROMPT_TAIL}")
        out.append(Example(prompt, f"{price:.2f}", price))
    return out


class WordTokenizer:
    """Words, digits, '.', '$' and punctuation as tokens; ids 0..3 are <pad> <bos> <eos> <unk>."""

    SPLIT = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")

    def __init__(self):
        text = " ".join([*CATEGORIES, *QUALITY, *SIZE, *BRANDS, *FEATURES, "How much does this cost", PROMPT_TAIL])
        special = ["<pad>", "<bos>", "<eos>", "<unk>"] + list("0123456789") + [".", "$", ",", "?"]
        words = special + sorted({w.lower() for w in self.SPLIT.findall(text)} - set(special))
        self.vocab = {w: i for i, w in enumerate(words)}
        self.itos = words
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk = 0, 1, 2, 3

    def __len__(self):
        return len(self.itos)

    def encode(self, text: str, bos: bool = False) -> list:
        ids = [self.vocab.get(w.lower(), self.unk) for w in self.SPLIT.findall(text)]
        return [self.bos_token_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i > 3)   # completions are digits and '.'


class HFTokenizer:
    """A transformers tokenizer behind WordTokenizer's interface (for --model PATH)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = tok.bos_token_id

    def __len__(self):
        return len(self.tok)

    def encode(self, text: str, bos: bool = False) -> list:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_token_id] if bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def encode(examples, tok):
    """[(input ids, labels)]: labels = -100 on the prompt (completion-only loss), the completion + eos labelled."""
    rows = []
    for ex in examples:
        prompt = tok.encode(ex.prompt, bos=True)
        completion = tok.encode(ex.completion) + [tok.eos_token_id]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    return rows


def collate(rows, pad_id, device):
    """Right-padded (input_ids, attention_mask, labels) tensors."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), mask.to(device), labels.to(device)


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    steps: int
    batch_size: int
    lr: float
    r: int
    lora_alpha: float
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    lora_dropout: float = 0.1
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    warmup: float = 0.03
    n_train: int = 4000
    n_eval: int = 100
    compute_dtype: torch.dtype = torch.float32
    model_dtype: torch.dtype = torch.float32
    threads: int = 1


def default_settings(device: str) -> Settings:
    if device == "cuda":
        # bf16 compute in the NF4+LoRA layers (the recipe's); the rest of the built-in model stays fp32. lr 1e-3
        # (not yet run on a GPU): the two runs start bf16 rounding apart, not fp32's, and on the CPU a gentler
        # rate kept them closer (benchmarks/NOTES.md "demo")
        return Settings(steps=600, batch_size=64, lr=1e-3, r=32, lora_alpha=64, hidden=512, layers=8, heads=8,
                        kv_heads=4, intermediate=1408, n_train=20000, n_eval=200, compute_dtype=torch.bfloat16,
                        threads=0)
    # CPU: fp32 compute (bf16 adds nothing to a model this size) and one thread: the matmuls are tiny, and a
    # second OpenMP thread on a shared 2-core machine made steps 10-30x slower (spin-waits). lr 1.5e-3 for 450
    # steps: over seeds 0-9 it learns more than 3e-3 for 300 (held-out MAE mostly $10-22 against $27-100) and
    # the two runs drift apart less (benchmarks/NOTES.md "demo": rounding alone moves the final loss by
    # percents at 3e-3, the reference against itself included)
    return Settings(steps=450, batch_size=16, lr=1.5e-3, r=16, lora_alpha=32)


# ------------------------------------------------------------------------------------------------ model
def build_model(tok, s: Settings, device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=s.model_dtype)
    model.config.name_or_path = "qlora-kernels-demo-llama"
    return model


def load_model(path: str, s: Settings, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=s.model_dtype).to(device)
    return model, tok


# ------------------------------------------------------------------------------------------------ reference path
def _reference_lora_forward(layer, x):
    """PEFT's LoRA over bitsandbytes' Linear4bit in plain PyTorch: base(x) with the reference dequantized weight,
    + lora_B(lora_A(dropout(x))) * scaling in fp32. The dropout seed is drawn like qlora_kernels' op draws it and
    the keep-mask made by the same rule, so both paths drop the same elements."""
    from qlora_kernels._backend import backend_for
    from qlora_kernels.ops.nf4_lora_linear import dropout_keep_mask
    from qlora_kernels.reference.nf4 import dequantize_nf4

    cd = layer.compute_dtype
    xc = x.to(cd)
    base = F.linear(xc, dequantize_nf4(layer.qweight, upcast=True).to(cd), layer.bias)
    xd = xc.float()
    p = layer.lora_dropout if layer.training else 0.0
    if p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
        x2d = xc.reshape(-1, xc.shape[-1])
        keep = dropout_keep_mask(x2d, seed, p, "triton" if backend_for(x) == "triton" else "reference")
        xd = xd * keep.view(xc.shape) / (1.0 - p)
    lora = F.linear(F.linear(xd, layer.lora_A), layer.lora_B) * layer.scaling
    return (base.float() + lora).to(x.dtype)


def use_reference_layers(model):
    """Route every LoRALinear4bit of `model` (a copy used only for the reference run) through the reference."""
    from qlora_kernels.convert import lora_layers

    for layer in lora_layers(model).values():
        layer.forward = (lambda layer: lambda x: _reference_lora_forward(layer, x))(layer)


def loss_ours(model, ids, mask, labels):
    """Causal-LM loss without the logits: final hidden states -> fused_linear_cross_entropy on labelled rows."""
    from qlora_kernels import fused_linear_cross_entropy

    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    head = model.get_output_embeddings().weight
    return fused_linear_cross_entropy(hidden[:, :-1], head.to(hidden.dtype), labels[:, 1:])


def loss_reference(model, ids, mask, labels):
    """transformers' own loss: full logits, upcast, shift, cross-entropy (mean over labelled tokens)."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


# ------------------------------------------------------------------------------------------------ training
@dataclass
class RunStats:
    name: str
    losses: list = field(default_factory=list)
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_mib: float | None = None     # None: too few steps to measure
    mem_kind: str = ""


@functools.lru_cache(maxsize=None)
def _spend_profiler_warning():
    """torch's profiler warns once per process, from C++ on fd 2, when a tensor made before it started is freed
    inside it: that line would cut the progress bar, so spend it here, on a throwaway tensor, with fd 2 muted."""
    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            t = torch.ones(1)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
                del t
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_step_peak(step):
    """Run step() under torch's profiler; the peak of tensor memory it allocated above its start, in bytes.

    CPU tensors have no allocator counters, and the process's RSS growth mostly records which run went first
    (the second reuses the heap the first grew). The profiler sees every allocation and free instead."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")   # kineto's start/stop lines would cut the progress bar
    _spend_profiler_warning()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cosine_with_warmup(optimizer, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model, batches, s: Settings, ours: bool, seed: int, progress: bool, device) -> RunStats:
    from qlora_kernels import FusedAdamW

    stats = RunStats("qlora_kernels" if ours else "reference (PyTorch)")
    params = [p for p in model.parameters() if p.requires_grad]
    if ours:
        opt = FusedAdamW(params, lr=s.lr, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm)
    else:
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, foreach=False)
    sched = cosine_with_warmup(opt, max(1, round(s.warmup * len(batches))), len(batches))
    loss_fn = loss_ours if ours else loss_reference
    model.train()
    torch.manual_seed(seed)          # same dropout masks in both runs
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), desc=f"train {stats.name}", unit="step", leave=True, file=sys.stderr,
                   dynamic_ncols=True)
    cuda = device.type == "cuda"
    counts = [int(mask.sum()) for _, mask, _ in batches]     # before timing: no sync inside the loop
    times, loss_values = [], []
    # memory: the peak of one step above what stays between steps (weights, optimizer state), measured from the
    # second step on, since the first allocates the optimizer state and runs Triton's autotuning (256 MiB buffer)
    mem_step = 1 if len(batches) > 2 else None

    def step(ids, mask, labels):
        loss = loss_fn(model, ids, mask, labels)
        loss.backward()
        if not ours:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_values.append(loss.detach())

    for i, (ids, mask, labels) in enumerate(batches):
        if i == mem_step and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if i == mem_step and not cuda:      # profiled: left out of the step time below
            stats.peak_mib = _cpu_step_peak(lambda: step(ids, mask, labels)) / 2**20
        else:
            step(ids, mask, labels)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or i == len(batches) - 1:
                bar.set_postfix(loss=f"{float(loss_values[-1]):.4f}")
    if bar is not None:
        bar.close()
    stats.losses = [float(v) for v in loss_values]
    # step time: without the first step (one-time set-up: compile, autotune) and the CPU's profiled step
    timed = [i for i in range(len(times)) if (i > 0 or len(times) == 1) and not (i == mem_step and not cuda)]
    stats.step_s = sum(times[i] for i in timed) / len(timed)
    stats.tokens_per_s = sum(counts[i] for i in timed) / sum(times[i] for i in timed)
    stats.mem_kind = "CUDA allocated" if cuda else "CPU tensors, profiler"
    if cuda and mem_step is not None:
        stats.peak_mib = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return stats


# ------------------------------------------------------------------------------------------------ evaluation
PRICE = re.compile(r"\s*\$?\s*(\d+(?:\.\d*)?)")


@torch.no_grad()
def predict_prices(model, tok, examples, device, max_new_tokens=8, batch_size=64):
    """Greedy decoding after each prompt (left-padded batches); the parsed price or None per example."""
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(examples), batch_size):
        chunk = [tok.encode(ex.prompt, bos=True) for ex in examples[start:start + batch_size]]
        T = max(map(len, chunk))
        ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, T - len(row):], mask[i, T - len(row):] = torch.tensor(row), 1
        ids, mask = ids.to(device), mask.to(device)
        out = []
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        gen = torch.stack(out, 1).tolist()
        for row in gen:
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            m = PRICE.match(tok.decode(row))
            preds.append(float(m.group(1)) if m else None)
    model.train(was_training)
    return preds


def price_error(preds, examples):
    """(mean absolute error with an unparseable answer scored as $0 and any other clipped to the data's price
    range (an untrained model's 8-digit answers made the mean millions), fraction parsed)."""
    errs = [abs((min(max(p, PRICE_RANGE[0]), PRICE_RANGE[1]) if p is not None else 0.0) - ex.price)
            for p, ex in zip(preds, examples)]
    return sum(errs) / len(errs), sum(p is not None for p in preds) / len(preds)


# ------------------------------------------------------------------------------------------------ report
def final_loss(losses, frac=0.1):
    """Mean training loss over the last 10 % of steps (at least 1)."""
    k = max(1, int(len(losses) * frac))
    return sum(losses[-k:]) / k


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, style in zip(runs, ("-", "--")):
        ax.plot(range(1, len(run.losses) + 1), run.losses, style, lw=1.2, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_yscale("log")
    ax.set_title("QLoRA fine-tune: qlora_kernels vs plain PyTorch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class DemoError(Exception):
    """A bad argument or an unreadable model: the CLI prints it as one line and exits 2."""


def run_demo(steps=None, model_path=None, out_dir=".", device=None, seed=0, batch_size=None, lr=None,
             threads=None, progress=True, out=sys.stdout) -> dict:
    """Fine-tune twice (ours, reference), print the table, write the plot; returns the numbers."""
    prev_threads = torch.get_num_threads()
    try:
        return _run_demo(steps, model_path, out_dir, device, seed, batch_size, lr, threads, progress, out)
    finally:
        torch.set_num_threads(prev_threads)


def _run_demo(steps, model_path, out_dir, device, seed, batch_size, lr, threads, progress, out):
    import qlora_kernels as qk
    from qlora_kernels.convert import convert_to_qlora

    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DemoError("the demo needs transformers (pip install transformers==5.24.0)") from None
    try:
        import matplotlib  # noqa: F401
        can_plot = True
    except ImportError:
        can_plot = False
    s = default_settings(device.type)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr), ("threads", threads)):
        if value is not None:
            if not value > 0:
                raise DemoError(f"{name} must be > 0, got {value}")
            setattr(s, name, value)
    if model_path:   # a pretrained model: the recipe's LoRA ("lite" r / alpha) and learning rate
        s.model_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        s.r, s.lora_alpha, s.lr = 32, 64, lr if lr is not None else 1e-4
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise DemoError(f"cannot create output directory {out_dir!r}: {err.strerror or err}") from None
    if not os.access(out_dir, os.W_OK):
        raise DemoError(f"output directory {out_dir!r} is not writable")
    if os.path.isdir(os.path.join(out_dir, "demo_loss.png")):
        raise DemoError(f"cannot write the plot: {os.path.join(out_dir, 'demo_loss.png')!r} is a directory")
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731

    data = make_dataset(s.n_train + s.n_eval, seed)
    train_set, eval_set = data[:s.n_train], data[s.n_train:]
    if model_path:
        try:
            model, tok = load_model(model_path, s, device)
        except Exception as err:  # noqa: BLE001  (any loader failure is one line for the user)
            msg = " ".join(str(err).split()) or type(err).__name__      # the whole message, on one line
            raise DemoError(f"cannot load a causal LM from {model_path!r}: {msg[:400]}") from None
        from qlora_kernels.patch import LOSS_MODEL_CLASSES, _loss_plan
        reason = _loss_plan(model)   # our loss reads the LM head's output as the logits: no scaling or softcap
        if reason is not None:
            raise DemoError(f"cannot train {model_path!r} with the fused loss: {reason}; the demo takes "
                            f"{', '.join(LOSS_MODEL_CLASSES)} checkpoints")
        n_rows = model.get_input_embeddings().num_embeddings   # ids past it fail deep inside the first forward
        top = max(max(tok.encode(ex.prompt, bos=True) + tok.encode(ex.completion) + [tok.eos_token_id, tok.pad_token_id])
                  for ex in data)
        if top >= n_rows:
            raise DemoError(f"the tokenizer at {model_path!r} gives token id {top}, past the model's {n_rows} "
                            "embedding rows (a tokenizer of another model?)")
        what = f"{model_path} ({model.config.model_type})"
    else:
        tok = WordTokenizer()
        model = build_model(tok, s, device, seed)
        what = (f"built-in Llama, random init: hidden {s.hidden}, {s.layers} layers, {s.heads} heads "
                f"({s.kv_heads} kv), MLP {s.intermediate}, vocab {len(tok)} (word-level tokenizer)")
    n_base = sum(p.numel() for p in model.parameters())
    try:
        convert_to_qlora(model, r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                         compute_dtype=s.compute_dtype)
    except ValueError as err:
        raise DemoError(f"cannot convert {what}: {err}") from None
    if model_path:
        frozen = "everything else frozen"
    else:
        # a random-init base knows nothing of this vocabulary: train its embeddings and output head as well
        # (PEFT's modules_to_save); LoRA alone on a random model barely moves the loss in a few hundred steps
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.weight.requires_grad_(True)
        frozen = "embeddings and lm_head trained too, as the base is random and the vocabulary new; norms frozen"
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backend = qk.backend_for(torch.empty(0, device=device))
    n_threads = torch.get_num_threads()
    say(f"qlora-kernels demo on {device.type} ({n_threads} CPU thread{'s' if n_threads > 1 else ''}), kernels "
        f"backend '{backend}'")
    say(f"  model: {what}, {n_base / 1e6:.2f} M params")
    say(f"  QLoRA: NF4 blocksize 64 + double quant, compute {str(s.compute_dtype).replace('torch.', '')}; LoRA r={s.r} "
        f"alpha={s.lora_alpha:g} dropout {s.lora_dropout} on q,k,v,o,gate,up,down; {n_lora / 1e6:.3f} M trainable "
        f"params ({frozen})")
    say(f"  data: {len(train_set)} generated products -> 'Price is $123.00', completion-only loss; "
        f"{len(eval_set)} held out")
    say(f"  training: {s.steps} steps x batch {s.batch_size}, AdamW lr {s.lr:g} (cosine, warmup "
        f"{s.warmup:.0%}), wd {s.weight_decay}, clip {s.max_grad_norm}; ours: NF4+LoRA op, fused linear "
        f"cross-entropy, FusedAdamW; reference: PEFT formula in PyTorch, logits + F.cross_entropy, torch AdamW")

    rows = encode(train_set, tok)
    if s.batch_size > len(rows):
        raise DemoError(f"batch_size {s.batch_size} is larger than the training set ({len(rows)} rows)")
    order = random.Random(seed + 1)
    batches = []
    while len(batches) < s.steps:
        idx = list(range(len(rows)))
        order.shuffle(idx)
        for i in range(0, len(idx) - s.batch_size + 1, s.batch_size):
            if len(batches) < s.steps:
                batches.append(collate([rows[j] for j in idx[i:i + s.batch_size]], tok.pad_token_id, device))

    preds0 = predict_prices(model, tok, eval_set, device)
    mae0, ok0 = price_error(preds0, eval_set)
    reference_model = copy.deepcopy(model)       # the same initial state (NF4 base and LoRA init)
    use_reference_layers(reference_model)

    runs = [train(model, batches, s, True, seed, progress, device),
            train(reference_model, batches, s, False, seed, progress, device)]
    mae1, ok1 = price_error(predict_prices(model, tok, eval_set, device), eval_set)
    mae_ref, ok_ref = price_error(predict_prices(reference_model, tok, eval_set, device), eval_set)
    mean_price = sum(ex.price for ex in train_set) / len(train_set)
    mae_const = sum(abs(mean_price - ex.price) for ex in eval_set) / len(eval_set)

    finals = [final_loss(r.losses) for r in runs]
    rel = abs(finals[0] - finals[1]) / max(abs(finals[1]), 1e-12)
    say("")
    say(f"| run | final loss | step time (ms) | tokens/s | step peak memory (MiB, {runs[0].mem_kind}) |")
    say("|---|---|---|---|---|")
    for run, fl in zip(runs, finals):
        say(f"| {run.name} | {fl:.4f} | {run.step_s * 1e3:.1f} | {run.tokens_per_s:,.0f} | "
            f"{'n/a' if run.peak_mib is None else f'{run.peak_mib:.1f}'} |")
    say("")
    verdict = "within 1 %" if rel <= 0.01 else ("NOT within 1 %; for scale: the reference against itself, with "
                                                 "only the rounding changed, ended up to 4.2 % apart at some seeds, "
                                                 "benchmarks/NOTES.md 'demo'")
    say(f"final loss = mean of the last 10 % of steps; first-step loss {runs[0].losses[0]:.4f}. Relative difference "
        f"{rel:.2%} ({verdict}). Step time excludes the first step; tokens/s "
        f"counts every non-pad input token; speed-up (reference step time / ours) "
        f"{runs[1].step_s / runs[0].step_s:.2f}x")
    say(f"held-out prices ({len(eval_set)} items, greedy): MAE ${mae0:.2f} before fine-tuning ({ok0:.0%} parseable), "
        f"${mae1:.2f} after with qlora_kernels ({ok1:.0%}), ${mae_ref:.2f} after with the reference ({ok_ref:.0%}); "
        f"predicting the training mean gives ${mae_const:.2f}")
    png = os.path.join(out_dir, "demo_loss.png") if can_plot else None
    if png:
        plot(runs, png)
    say(f"loss curves: {png or 'not plotted (matplotlib is not installed)'}; "
        f"total {time.perf_counter() - t_start:.1f} s")
    return dict(final_losses=finals, relative_difference=rel, runs=runs, mae_before=mae0, mae_after=mae1,
                mae_after_reference=mae_ref, mae_mean_baseline=mae_const, png=png)
