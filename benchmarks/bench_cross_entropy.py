"""Cross-entropy (forward + backward) and label-sparse linear cross-entropy against PyTorch eager,
torch.compile, Liger and torch.nn.functional.linear_cross_entropy (where the torch has it).

Shapes (../shared/notes/workload.md): tokens {4096, 32768}, V = 128256, bf16, 100 % and 4 % labelled;
the linear variant at H = 3072 with a frozen head. `--quick` runs a tiny CPU shape.
Bytes counted for cross-entropy: the labelled rows' logits read once + the gradient written once
((labelled + N) * V * 2). FLOPs counted for the linear variant: the two GEMMs over labelled rows
(4 * labelled * H * V); the "cublas-2gemm" row times those two GEMMs over all rows with torch.matmul.
"""
import os
import time

import torch
import torch.nn.functional as F

from benchmarks import harness
from qlora_kernels.ops.cross_entropy import (LabelledCountHint, count_hint, fused_cross_entropy,
                                             fused_linear_cross_entropy)

COMPILE_BUDGET_S = 45.0


def _labels(n, V, frac, device):
    y = torch.randint(0, V, (n,), device=device)
    y[torch.randperm(n, device=device)[round(frac * n):]] = -100
    return y


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
        return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - a missing or broken peer is reported as absent
        return None, None


def _with_env(env, fn):
    """fn run with the environment variables `env` set (our kernels' config switches), then restored."""
    def run():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return run


def _measure(fn, reset=None):
    """(median ms, peak extra MB, error): (None, None, "<why>") when it runs out of memory or fails, so one
    provider's failure is a row with its reason and costs the others nothing. reset: drops the gradient the
    timed calls left, so the peak counts the one the measured call allocates."""
    try:
        ms = harness.time_ms(fn)
        mem = harness.peak_memory_mb(fn, reset)
    except torch.OutOfMemoryError:
        return None, None, "out of memory"
    except Exception as err:  # noqa: BLE001
        print(f"provider failed: {err}")
        return None, None, f"{type(err).__name__}: {err}"[:120]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return ms, mem, ""


def _ce_providers(N, V, frac, dev, dtype, compiled):
    logits = (torch.randn(N, V, device=dev) * 2).to(dtype).requires_grad_()
    labels = _labels(N, V, frac, dev)
    LigerCE, _ = _liger()
    liger = LigerCE() if LigerCE is not None else None

    # every provider drops the previous .grad first, so no one pays for gradient accumulation
    def ours():
        logits.grad = None
        fused_cross_entropy(logits, labels).backward()

    def ours_inplace():   # the gradient written over a scratch copy of the logits (as Liger does)
        scratch.grad = None
        fused_cross_entropy(scratch, labels, inplace_backward=True).backward()

    def eager():
        logits.grad = None
        F.cross_entropy(logits.float(), labels).backward()

    def compiled_fn():
        logits.grad = None
        compiled(logits, labels).backward()

    def liger_fn():
        scratch.grad = None
        liger(scratch, labels).backward()

    scratch = logits.detach().clone().requires_grad_()
    # peers right after ours: a suite cut by its time limit loses our variants first
    out = [("ours", ours), ("ours-inplace", ours_inplace)]
    if LigerCE is not None:
        out.append(("liger", liger_fn))
    if compiled is not None:
        out.append(("torch-compile", compiled_fn))
    out.append(("torch-eager", eager))
    if dev == "cuda":   # the extension's CUDA kernel: one row per thread-block cluster, logits read once
        out.append(("ours[cluster]", _with_env({"QLORA_KERNELS_CE_MODE": "cluster"}, ours)))
    return out, logits, labels, scratch


def bench_ce(rows, args, dev, dtype, shapes, V):
    compiled, compile_s = None, None
    if dev == "cuda":
        fn = torch.compile(lambda x, y: F.cross_entropy(x.float(), y), dynamic=False)
        start = time.perf_counter()
        try:   # compiled at the first benchmark shape: one recompile (the second shape) left, not two
            x = torch.randn(shapes[0], V, device=dev, dtype=dtype, requires_grad=True)
            fn(x, torch.randint(0, V, (shapes[0],), device=dev)).backward()
            del x
            compile_s = time.perf_counter() - start
            compiled = fn if compile_s < COMPILE_BUDGET_S else None
        except Exception as err:  # noqa: BLE001
            print(f"torch.compile skipped: {err}")
    bw = harness.copy_bandwidth_gbs()
    for N in shapes:
        for frac in (1.0, 0.04):
            providers, logits, labels, scratch = _ce_providers(N, V, frac, dev, dtype, compiled)
            n_lab = round(frac * N)
            nbytes = (n_lab + N) * V * logits.element_size()

            def drop_grads():
                logits.grad = scratch.grad = None
            for name, fn in providers:
                ms, mem, error = _measure(fn, drop_grads)
                gbs = None if ms is None else nbytes / ms / 1e6
                rows.append({"op": "cross_entropy", "tokens": N, "V": V, "labelled": frac, "provider": name,
                             "ms": ms, "GB/s": gbs, "of_copy_bw": None if gbs is None or bw is None else gbs / bw,
                             "floor_ms": None if bw is None else nbytes / bw / 1e6, "peak_MB": mem,
                             "error": error})
            if dev == "cuda" and N == shapes[-1] and frac == 1.0:   # configs of our kernel, one run
                # the fused and split sweeps of the first run are in the committed table; the row mode's not yet
                for bv, warps, mode in ((32768, 32, "row"), (16384, 16, "row"), (8192, 8, "row"), (8192, 16, "row")):
                    env = {"QLORA_KERNELS_CE_BLOCK_V": str(bv), "QLORA_KERNELS_CE_WARPS": str(warps),
                           "QLORA_KERNELS_CE_MODE": mode}
                    ms, _, error = _measure(_with_env(env, providers[0][1]))
                    rows.append({"op": "cross_entropy", "tokens": N, "V": V, "labelled": frac,
                                 "provider": f"ours[{mode},bv={bv},w={warps}]", "ms": ms,
                                 "GB/s": None if ms is None else nbytes / ms / 1e6, "error": error})
            del providers, logits, labels, scratch
    return compile_s


def bench_linear(rows, args, dev, dtype, shapes, V, H):
    _, LigerFLCE = _liger()
    for N in shapes:
        for frac in (1.0, 0.04):
            h = (torch.randn(N, H, device=dev) / 4).to(dtype).requires_grad_()
            w = (torch.randn(V, H, device=dev) / H ** 0.5).to(dtype)            # frozen head
            labels = _labels(N, V, frac, dev)
            n_lab = round(frac * N)
            flops = 4.0 * n_lab * H * V
            # as patch_model calls it: the labelled count's copy to the host started before the model's forward,
            # so the chunks know their live rows (cuBLAS GEMMs on exactly those); "[no hint]": counted in the op
            hint = LabelledCountHint(labels, -100)

            def ours(chunk_bytes=128 << 20, hinted=True):
                h.grad = None
                with count_hint(hint if hinted else None):
                    fused_linear_cross_entropy(h, w, labels, chunk_bytes=chunk_bytes).backward()

            def liger_fn():
                h.grad = None
                liger(w, h, labels).backward()

            def eager():
                h.grad = None
                F.cross_entropy(F.linear(h, w).float(), labels).backward()

            providers = [("ours", ours)]
            if dev == "cuda" and LigerFLCE is not None:   # peers first: a cut suite loses our variants first
                liger = LigerFLCE()
                providers.append(("liger", liger_fn))
            if dev == "cuda":
                providers.append(("torch-eager", eager))
                if hasattr(F, "linear_cross_entropy"):
                    def torch_lce():
                        h.grad = None
                        F.linear_cross_entropy(h, w, labels).backward()
                    providers.append(("torch-linear_cross_entropy", torch_lce))
                g = torch.randn(N, V, device=dev, dtype=dtype) if frac == 1.0 and N * V * 2 < 12e9 else None
                if g is not None:
                    providers.append(("cublas-2gemm", lambda: (h @ w.t(), g @ w)))
                # our variants, the ones that decide a target first. Vocabulary slices (frozen head): a (rows,
                # 8192) logits buffer + a (rows, H) fp32 accumulator within the budget; 8 MB (~9 MB with the O(N)
                # index vectors at 32768 tokens) is the "< 5 % of Liger's working memory" configuration (Liger's
                # (1024, V) bf16 logits chunk alone is 263 MB)
                online = {"QLORA_KERNELS_CE_LINEAR": "online"}
                providers.append(("ours[online 8MB]", _with_env(online, lambda: ours(8 << 20))))
                # the GEMMs by the Triton kernel bounded on the device (the default's path until the count lands)
                providers.append(("ours[triton gemm]", _with_env({"QLORA_KERNELS_CE_GEMM": "triton"}, ours)))
                providers.append(("ours[no hint]", lambda: ours(hinted=False)))
                # the same op with torch._grouped_mm (CUTLASS) for its two GEMMs
                providers.append(("ours[grouped gemm]", _with_env({"QLORA_KERNELS_CE_GEMM": "grouped"}, ours)))
                providers.append(("ours[online]", _with_env(online, ours)))
                # one program per row for the chunk's cross-entropy: 1 launch per chunk instead of 3, and a grid
                # of chunk rows rather than rows x column chunks (dead chunks past the labelled count are cheaper)
                providers.append(("ours[row ce]", _with_env({"QLORA_KERNELS_CE_MODE": "row"}, ours)))
                providers.append(("ours[cluster ce]", _with_env({"QLORA_KERNELS_CE_MODE": "cluster"}, ours)))
                providers.append(("ours[grid gemm]", _with_env({"QLORA_KERNELS_MM_PERSISTENT": "0"}, ours)))
                providers.append(("ours[online 8MB slice 4096]", _with_env(
                    {**online, "QLORA_KERNELS_CE_SLICE_V": "4096"}, lambda: ours(8 << 20))))

            def drop_grad():
                h.grad = None
            for name, fn in providers:
                h.grad = None
                ms, mem, error = _measure(fn, drop_grad)
                tf = None if ms is None else flops / ms / 1e9
                # work_MB: the peak less the (N, H) input gradient the op returns, which every provider
                # allocates during the call: the working memory the "extra memory" target is about
                grad_mb = 0 if h.grad is None else h.grad.numel() * h.grad.element_size() / 2**20
                rows.append({"op": "linear_cross_entropy", "tokens": N, "H": H, "V": V, "labelled": frac,
                             "provider": name, "ms": ms, "TFLOP/s": tf,
                             "of_bf16_peak": None if tf is None else tf / harness.BF16_DENSE_TFLOPS, "peak_MB": mem,
                             "work_MB": None if mem is None else mem - grad_mb, "error": error})
            del providers, h, w, labels
            g = None
            if dev == "cuda":
                torch.cuda.empty_cache()


def main():
    args = harness.parse_args(__doc__)
    dev = harness.device()
    rows = harness.Rows("cross_entropy", args)
    if args.quick or dev == "cpu":
        bench_ce(rows, args, "cpu", torch.float32, (64,), 4096)
        bench_linear(rows, args, "cpu", torch.float32, (256,), 4096, 256)
        notes = "quick CPU smoke run (chunked PyTorch path)"
    else:
        compile_s = bench_ce(rows, args, dev, torch.bfloat16, (4096, 32768), 128256)
        bench_linear(rows, args, dev, torch.bfloat16, (4096, 32768), 128256, 3072)
        notes = f"torch.compile first-call time {compile_s and round(compile_s, 1)} s (skipped above " \
                f"{COMPILE_BUDGET_S:.0f} s); peers run in the same process"
    harness.write_results("cross_entropy", rows, args, notes)


if __name__ == "__main__":
    main()
