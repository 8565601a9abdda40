"""AdamW step over the LoRA parameters of Llama-3.2-3B (../shared/notes/workload.md), with the global
gradient-norm clip (0.3) that the QLoRA recipe runs before every step.

Sets: lite = r 32 on q,k,v,o (224 tensors, 18.4 M params); full = r 256 on all 7 projections (392 tensors,
389 M params). fp32 params, grads and states. Providers (each: clip + step, in the same process):
ours (FusedAdamW(max_grad_norm=0.3), non-finite guard on), ours without clip/guard, torch AdamW foreach and
fused=True with clip_grad_norm_, bitsandbytes PagedAdamW32bit and AdamW8bit with clip_grad_norm_.
Bytes: read p, g, m, v and write p, m, v = 28 bytes/param (the norm's extra read of g is not counted).
CPU: ours (C++ extension) against torch's fused CPU AdamW, with and without the clip.

    python -m benchmarks.bench_adamw [--quick]
"""
import gc

import torch

from benchmarks import harness
from qlora_kernels import FusedAdamW
from qlora_kernels.kernels import adamw as kernels

HIDDEN, INTER, LAYERS = 3072, 8192, 28
PROJ = {"q": (3072, 3072), "k": (1024, 3072), "v": (1024, 3072), "o": (3072, 3072),
        "gate": (8192, 3072), "up": (8192, 3072), "down": (3072, 8192)}
SETS = {"lite": (32, ("q", "k", "v", "o")), "full": (256, tuple(PROJ))}
MAX_NORM, LR, WD = 0.3, 1e-4, 1e-3
BYTES_PER_PARAM = 28


def lora_shapes(name, layers=LAYERS):
    r, targets = SETS[name]
    shapes = []
    for _ in range(layers):
        for t in targets:
            out_f, in_f = PROJ[t]
            shapes += [(r, in_f), (out_f, r)]  # lora_A (r, in), lora_B (out, r)
    return shapes


def make_params(shapes, device):
    params = []
    for s in shapes:
        p = torch.randn(s, device=device).mul_(0.02).requires_grad_()
        p.grad = torch.randn(s, device=device).mul_(1e-3)
        params.append(p)
    return params


def providers(device):
    def ours(params):
        return FusedAdamW(params, lr=LR, weight_decay=WD, max_grad_norm=MAX_NORM), False

    def ours_noguard(params):
        return FusedAdamW(params, lr=LR, weight_decay=WD, skip_nonfinite=False), False

    def torch_foreach(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=True), True

    def torch_fused(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True), True

    out = {"ours (clip+step)": ours, "ours (step, no clip/guard)": ours_noguard,
           "torch fused + clip": torch_fused,
           "torch fused (no clip)": lambda ps: (torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True), False)}
    if device == "cuda":
        out["torch foreach + clip"] = torch_foreach
        try:
            import bitsandbytes as bnb

            out["bnb PagedAdamW32bit + clip"] = lambda ps: (bnb.optim.PagedAdamW32bit(ps, lr=LR, weight_decay=WD), True)
            out["bnb AdamW8bit + clip"] = lambda ps: (bnb.optim.AdamW8bit(ps, lr=LR, weight_decay=WD), True)
        except Exception as err:  # noqa: BLE001 - bitsandbytes missing or without a CUDA library
            print(f"bitsandbytes unavailable: {err}")
    return out


def bytes_per_param(label):
    """Bytes a step moves per parameter: fp32 p, g read and p written, plus the states read and written (fp32,
    or 8-bit for AdamW8bit, whose per-block scales are ~1/256 of that and left out)."""
    return 12 + (4 if "8bit" in label else 16)


def run_set(name, shapes, device, reps):
    """One row per provider; speedups against torch's fused AdamW doing the same work (with or without the
    clip). A provider that fails gets a row with its error, and the others still run."""
    rows = []
    n_params = sum(a * b for a, b in shapes)
    bw = harness.copy_bandwidth_gbs() if device == "cuda" else None
    for label, make in providers(device).items():
        row = {"set": name, "tensors": len(shapes), "params (M)": n_params / 1e6, "provider": label}
        try:
            params = make_params(shapes, device)
            opt, clip = make(params)

            def step():
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()

            step()  # states allocated, kernels compiled
            ms = harness.time_ms(step, reps=reps, device=device)
            gbs = bytes_per_param(label) * n_params / ms / 1e6
            row.update({"ms": ms, "GB/s": gbs, "of copy BW": gbs / bw if bw else None,
                        "peak MB": harness.peak_memory_mb(step, device=device)})
        except Exception as err:  # noqa: BLE001 - one provider's failure must not cost the others' rows
            print(f"{label} ({name}) failed: {err}")
            row.update({"ms": None, "error": f"{type(err).__name__}: {err}"[:120]})
        rows.append(row)
        opt = params = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    base = {clipped: next((r["ms"] for r in rows if r["provider"] == label), None)
            for clipped, label in ((True, "torch fused + clip"), (False, "torch fused (no clip)"))}
    for row in rows:
        ref = base["clip" in row["provider"] and "no clip" not in row["provider"]]
        row["speedup vs torch fused, same work"] = ref / row["ms"] if ref and row["ms"] else None
    return rows


def config_sweep(shapes, device):
    """Our clip + step on one set under each update (BLOCK, num_warps) of kernels.UPDATE_CONFIGS with the
    default norm config, then each norm config of kernels.NORM_CONFIGS with the default update config."""
    rows = []
    n_params = sum(a * b for a, b in shapes)
    default = (kernels.UPDATE_BLOCK, kernels.UPDATE_WARPS, kernels.NORM_BLOCK, kernels.NORM_WARPS)
    params = make_params(shapes, device)
    combos = [(u, default[2:]) for u in kernels.UPDATE_CONFIGS] + \
             [(default[:2], n) for n in kernels.NORM_CONFIGS if n != default[2:]]
    bw = harness.copy_bandwidth_gbs()
    try:
        for (block, warps), (nblock, nwarps) in combos:
            kernels.UPDATE_BLOCK, kernels.UPDATE_WARPS = block, warps
            kernels.NORM_BLOCK, kernels.NORM_WARPS = nblock, nwarps
            row = {"set": "full", "provider": f"ours update {block}/w{warps}, norm {nblock}/w{nwarps}"}
            try:   # one config's failure is a row with its reason, not the end of the suite
                opt = FusedAdamW(params, lr=LR, weight_decay=WD, max_grad_norm=MAX_NORM)
                opt.step()
                ms = harness.time_ms(opt.step)
                gbs = BYTES_PER_PARAM * n_params / ms / 1e6
                row.update({"ms": ms, "GB/s": gbs, "of copy BW": gbs / bw if bw else None})
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"[:120]
            opt = None
            rows.append(row)
    finally:   # the later suites' rows run on the defaults whatever happened here
        kernels.UPDATE_BLOCK, kernels.UPDATE_WARPS, kernels.NORM_BLOCK, kernels.NORM_WARPS = default
    return rows


def main():
    args = harness.parse_args(__doc__)
    device = harness.device()
    rows = harness.Rows("adamw", args)
    if device == "cuda":
        for name in ("lite", "full"):
            rows += run_set(name, lora_shapes(name), device, reps=20)
        rows += config_sweep(lora_shapes("full"), device)
        from qlora_kernels import _backend
        if _backend.native() is not None:  # the C++ path against torch's fused CPU AdamW, same machine
            rows += run_set("lite (CPU)", lora_shapes("lite"), "cpu", reps=5)
    else:
        if args.quick:
            rows += run_set("lite/14 (CPU)", lora_shapes("lite", 2), "cpu", reps=3)
        else:   # the CPU target is stated on the same sets as the GPU ones
            for name in ("lite", "full"):
                rows += run_set(f"{name} (CPU)", lora_shapes(name), "cpu", reps=5 if name == "lite" else 3)
    harness.write_results("adamw", rows, args, notes="clip = global L2 norm clip to 0.3 before the step; "
                          "GB/s from 28 bytes/param (read p,g,m,v; write p,m,v; fp32), 16 for AdamW8bit's 8-bit "
                          "states; speedups against torch's fused AdamW with the clip for clip rows, without it "
                          "for the others")


if __name__ == "__main__":
    main()
