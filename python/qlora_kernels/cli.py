"""The `qlora-kernels` command: `demo` (the main job) and `bench` (benchmark suites from a source checkout)."""
import argparse
import os
import subprocess
import sys

SUITES = {"nf4": "bench_nf4", "lora": "bench_nf4_lora_linear", "ce": "bench_cross_entropy", "adamw": "bench_adamw",
          "norm": "bench_rms_norm", "swiglu": "bench_swiglu", "e2e": "bench_e2e"}


def demo(args) -> int:
    """The QLoRA fine-tune of qlora_kernels.demo; a bad argument or model is one line on stderr, exit 2."""
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        why = "no such directory" if not os.path.isdir(args.model) else "no config.json in it"
        print(f"qlora-kernels demo: error: cannot read model at {args.model!r}: {why}", file=sys.stderr)
        return 2
    from qlora_kernels.demo import DemoError, run_demo
    try:
        run_demo(steps=args.steps, model_path=args.model, out_dir=args.out, device=args.device, seed=args.seed,
                 lr=args.lr, threads=args.threads)
    except DemoError as err:
        print(f"qlora-kernels demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def bench(args) -> int:
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        print("qlora-kernels bench: needs a source checkout (benchmarks/ is not installed); run it from an "
              "editable install (`pip install --no-build-isolation -e .`)", file=sys.stderr)
        return 2
    out = args.out or os.environ.get("OUT")
    if out:
        try:    # one line now, not a traceback from every suite
            os.makedirs(out, exist_ok=True)
            if not os.access(out, os.W_OK):
                raise PermissionError("not writable")
        except OSError as err:
            print(f"qlora-kernels bench: error: cannot write results to {out!r}: {err.strerror or err}",
                  file=sys.stderr)
            return 2
    names = list(SUITES) if args.suite == "all" else [args.suite]
    status = 0
    for name in names:
        if not os.path.exists(os.path.join(root, "benchmarks", SUITES[name] + ".py")):
            print(f"qlora-kernels bench: suite {name!r} is not in this checkout; skipped", file=sys.stderr)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{SUITES[name]}"] + (["--quick"] if args.quick else []) + \
            (["--out", os.path.abspath(args.out)] if args.out else [])
        status |= subprocess.run(cmd, cwd=root).returncode
    return status


def _seed(text):
    """An argparse type: an integer torch.manual_seed accepts (0 <= seed < 2**64), else a one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be an integer in [0, 2**64), got {text!r}")
    return value


def _positive(cast, what):
    """An argparse type: `cast(text)`, finite and > 0, else a one-line error naming `what`."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value
    return parse


positive_int, positive_float = _positive(int, "integer"), _positive(float, "number")


def _one_line_error(prog):
    def error(message):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__)
    parser.error = _one_line_error("qlora-kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="the main job: a QLoRA fine-tune, ours vs the PyTorch reference")
    p_demo.error = _one_line_error("qlora-kernels demo")
    p_demo.add_argument("--steps", type=positive_int, default=None, help="training steps (CPU 450, CUDA 600)")
    p_demo.add_argument("--model", default=None, metavar="PATH", help="a local transformers checkpoint directory "
                        "instead of the built-in random-init Llama")
    p_demo.add_argument("--out", default=".", metavar="DIR", help="where demo_loss.png goes (default .)")
    p_demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p_demo.add_argument("--seed", type=_seed, default=0)
    p_demo.add_argument("--lr", type=positive_float, default=None,
                        help="peak learning rate (built-in model 1.5e-3 CPU / 1e-3 CUDA; --model 1e-4)")
    p_demo.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default 1 on CPU: the matmuls are tiny)")
    p_bench = sub.add_parser("bench", help="run benchmark suites, writing tables and plots under "
                                           "benchmarks/results/")
    p_bench.error = _one_line_error("qlora-kernels bench")
    p_bench.add_argument("suite", nargs="?", default="all", choices=list(SUITES) + ["all"])
    p_bench.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    p_bench.add_argument("--out", default=None, metavar="DIR",
                         help="where the tables and plots go (default $OUT, else benchmarks/results/local)")
    args, extra = parser.parse_known_args(argv)
    if extra:
        {"demo": p_demo, "bench": p_bench}[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        return demo(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
