"""The `qlora-kernels` command: `demo` (the main job) and `bench` (benchmark suites from a source checkout)."""
import argparse
import os
import subprocess
import sys
import time

SUITES = {"nf4": "bench_nf4", "lora": "bench_nf4_lora_linear", "ce": "bench_cross_entropy", "adamw": "bench_adamw"}


def demo(args) -> int:
    """Quantize a model-sized weight to NF4 and back on the current device; time, GB/s, error vs bitsandbytes."""
    import torch

    import qlora_kernels as qk

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_f, in_f = args.shape
    torch.manual_seed(0)
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(torch.bfloat16)
    n = w.numel()
    print(f"qlora-kernels demo: NF4 (blocksize 64, double quant) of a {out_f} x {in_f} bf16 weight on {device}, "
          f"backend {qk.backend_for(w)}")

    def timed(fn):
        fn()  # warm: compile / first-touch
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.reps):
            result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, (time.perf_counter() - start) / args.reps

    q, t_q = timed(lambda: qk.quantize_nf4(w, 64, double_quant=True))
    w_hat, t_dq = timed(lambda: qk.dequantize_nf4(q))
    scales = sum(t.numel() * t.element_size() for t in q.scale_tensors() if t is not None)
    print(f"  quantize   {t_q * 1e3:9.2f} ms  {(2 * n + n // 2 + scales) / t_q / 1e9:7.2f} GB/s")
    print(f"  dequantize {t_dq * 1e3:9.2f} ms  {(n // 2 + scales + 2 * n) / t_dq / 1e9:7.2f} GB/s")
    print(f"  storage {(n // 2 + scales) / 2**20:.1f} MiB vs {2 * n / 2**20:.1f} MiB in bf16; "
          f"round-trip error: max {(w_hat.float() - w.float()).abs().max().item():.3g}, "
          f"rms {(w_hat.float() - w.float()).pow(2).mean().sqrt().item():.3g}")
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        print("  bitsandbytes not installed: no comparison")
        return 0
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    differ = int((packed.view(-1) != q.packed).sum())
    bnb_w = bnbf.dequantize_4bit(packed, state)
    ours_of_bnb = qk.dequantize_nf4(qk.NF4Weight.from_bnb(packed, state))
    print(f"  vs bitsandbytes {getattr(sys.modules.get('bitsandbytes'), '__version__', '?')}: "
          f"{differ} of {packed.numel()} packed bytes differ; our dequantization of its storage differs in "
          f"{int((ours_of_bnb != bnb_w).sum())} of {n} values (max |diff| "
          f"{(ours_of_bnb.float() - bnb_w.float()).abs().max().item():.3g})")
    return 0


def bench(args) -> int:
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        print("qlora-kernels bench: needs a source checkout (benchmarks/ is not installed); run it from an "
              "editable install (`pip install --no-build-isolation -e .`)", file=sys.stderr)
        return 2
    names = list(SUITES) if args.suite == "all" else [args.suite]
    status = 0
    for name in names:
        if not os.path.exists(os.path.join(root, "benchmarks", SUITES[name] + ".py")):
            print(f"qlora-kernels bench: suite {name!r} is not in this checkout; skipped", file=sys.stderr)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{SUITES[name]}"] + (["--quick"] if args.quick else [])
        status |= subprocess.run(cmd, cwd=root).returncode
    return status


def shape(text):
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN, e.g. 4096x14336, got {text!r}") from None
    if out_f <= 0 or in_f <= 0:
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return out_f, in_f


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="the main job: NF4 quantize/dequantize of a model-sized weight")
    p_demo.add_argument("--shape", type=shape, default=(4096, 14336), help="OUTxIN (default 4096x14336)")
    p_demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p_demo.add_argument("--reps", type=int, default=3)
    p_bench = sub.add_parser("bench", help="run benchmark suites, writing tables under benchmarks/results/")
    p_bench.add_argument("suite", nargs="?", default="all", choices=list(SUITES) + ["all"])
    p_bench.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                parser.error("--device cuda: no CUDA device is available")
        return demo(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
