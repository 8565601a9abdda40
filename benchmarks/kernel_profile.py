"""Where the device time goes: torch.profiler kernel tables for the cases whose timings missed their
predictions (benchmarks/NOTES.md), ours beside the peer:
- the one-token forward (decode, 14336 x 4096, r = 32, dropout 0.1): the first run measured ~120 us around a
  kernel whose own count is ~10 us;
- the NF4 + LoRA forward + backward at 4096^3, r = 32: which of pre-pass, GEMMs and host-side GEMMs costs what;
- one e2e training step (Llama-3.2-1B shape, lite LoRA): the share of the base GEMMs, the loss, the norms,
  attention and the elementwise rest.
Per case and provider: ms per call (CUDA-synchronized wall time, outside the profiler), then the kernels by
total device time per call (calls per call, us, share of that provider's kernel time), the rest as one row.
--quick: tiny shapes on the CPU, where the table lists CPU ops by self time instead.

    python -m benchmarks.kernel_profile [--quick] [--out DIR]
"""
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

import qlora_kernels as qk
from benchmarks import bench_e2e, bench_nf4_lora_linear as bench_lora, harness

TOP = 12            # kernels listed per case and provider
NAME_WIDTH = 100    # Triton / CUTLASS kernel names carry their whole specialization


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def wall_ms(fn, iters, cuda):
    fn()
    _sync(cuda)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(cuda)
    return (time.perf_counter() - start) * 1e3 / iters


def kernel_table(fn, iters, cuda):
    """[(name, calls per call, us per call)] of the device kernels (CPU: the ops' self time) of `iters` calls of
    fn, the largest first."""
    fn()
    _sync(cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        _sync(cuda)
    events = prof.key_averages()
    if cuda:   # the kernels themselves (device events), not the CPU ops that launched them
        kernels = [evt for evt in events if evt.device_type == torch.autograd.DeviceType.CUDA]
        # (should a torch list no device events, the CPU ops with the device time they launched)
        timed = [(evt, evt.self_device_time_total) for evt in kernels or events]
    else:
        timed = [(evt, evt.self_cpu_time_total) for evt in events]
    table = [(evt.key, evt.count / iters, us / iters) for evt, us in timed if us > 0]
    return sorted(table, key=lambda item: -item[2])


def profile_rows(case, provider, fn, iters, cuda):
    ms = wall_ms(fn, iters, cuda)
    table = kernel_table(fn, iters, cuda)
    total = sum(us for _, _, us in table) or float("nan")
    rows = [{"case": case, "provider": provider, "kernel": "(all kernels)" if cuda else "(all ops)",
             "calls": sum(n for _, n, _ in table), "us": total, "% of kernel time": 100.0, "wall ms": ms}]
    for name, calls, us in table[:TOP]:
        rows.append({"case": case, "provider": provider, "kernel": name[:NAME_WIDTH], "calls": calls, "us": us,
                     "% of kernel time": 100 * us / total})
    rest = table[TOP:]
    if rest:
        rows.append({"case": case, "provider": provider, "kernel": f"({len(rest)} others)",
                     "calls": sum(n for _, n, _ in rest), "us": sum(us for _, _, us in rest),
                     "% of kernel time": 100 * sum(us for _, _, us in rest) / total})
    return rows


def lora_cases(cuda):
    """(case, provider, fn, iters) of nf4_lora_linear: decode forward and training forward + backward."""
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [(1, 14336, 4096, 32, "fwd", 20), (4096, 4096, 4096, 32, "fwd+bwd", 5)] if cuda else \
        [(1, 256, 256, 8, "fwd", 2), (64, 256, 256, 8, "fwd+bwd", 2)]
    for M, N, K, r, mode, iters in shapes:
        d = bench_lora.make(M, N, K, r, "cuda" if cuda else "cpu", dtype)
        fns = bench_lora.providers(d)
        peer = "bnb_peft_autocast" if M > 16 else "bnb_peft"
        for name in ("ours", peer):
            if name in fns:
                step, _ = bench_lora.step_for(fns[name], d, mode)
                yield f"nf4_lora_linear {M}x{N}x{K} r={r} {mode}", name, step, iters


def e2e_cases(cuda):
    """(case, provider, fn, iters) of one training step, ours and the autocast peer, as bench_e2e runs them."""
    shape, lora = ("llama-3.2-1B", "lite") if cuda else ("tiny", "lite")
    r, alpha, targets, n_rows, seq = bench_e2e.LORA[lora]
    n_rows, seq = (n_rows, seq) if cuda else (2, 32)
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    base = bench_e2e.build_qlora_model(shape, r, alpha, targets, device)
    ids, labels = bench_e2e.batch(bench_e2e.SHAPES[shape][5], n_rows, seq, device)
    ours = copy.deepcopy(base)
    qk.patch_model(ours)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    case = f"e2e {shape} {lora} ({n_rows}x{seq})"
    yield case, "qlora_kernels", bench_e2e.step_fn(
        ours, qk.FusedAdamW(trainable(ours), lr=1e-4, weight_decay=0.001, max_grad_norm=0.3), ids, labels,
        clip=False), 2
    yield case, "bnb+peft+torch", bench_e2e.step_fn(
        base, torch.optim.AdamW(trainable(base), lr=1e-4, weight_decay=0.001, fused=cuda), ids, labels,
        clip=True), 2


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    cuda = harness.device() == "cuda" and not args.quick
    rows = harness.Rows("kernel_profile", args)
    for cases in (lora_cases, e2e_cases):
        try:
            for case, provider, fn, iters in cases(cuda):
                try:
                    rows += profile_rows(case, provider, fn, iters, cuda)
                except Exception as err:  # noqa: BLE001 - one provider's failure costs its rows only
                    rows.append({"case": case, "provider": provider, "error": f"{type(err).__name__}: {err}"[:120]})
                finally:
                    fn = None
                    if cuda:
                        torch.cuda.empty_cache()
        except ImportError as err:   # a peer (bitsandbytes, peft, transformers) missing
            print(f"{cases.__name__} skipped: {err}")
    harness.write_results("kernel_profile", rows, args,
                          notes="us and calls per call of the case (profiled over several calls after one "
                                "warm-up); wall ms: the same calls timed without the profiler. On the CPU "
                                "(--quick) the rows are CPU ops by self time.")


if __name__ == "__main__":
    main()
