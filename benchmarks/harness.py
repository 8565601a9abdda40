"""Shared benchmark plumbing: warm median timing, peak memory, environment record, JSON + markdown + PNG output.

Run a suite from the repository root: `python -m benchmarks.bench_<stem> [--quick]`. Results go to
$OUT when set (the GPU machine), else benchmarks/results/local/ (git-ignored); the committed tables
under benchmarks/results/ come from GPU runs.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

import torch

from benchmarks import plot

# Measured ceilings of the cards we report against (../shared/notes/gpu-method.md).
COPY_BANDWIDTH_GBS = {"H100": 3000.0, "H200": 4300.0}
BF16_DENSE_TFLOPS = 790.0


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes only (CPU smoke run)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or benchmarks/results/local)")
    return parser.parse_args()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_ms(fn, reps: int = 7, device: str | None = None) -> float:
    """Median milliseconds of fn(), warm (called once before timing). CUDA: triton's do_bench (L2 flushed
    between calls), except for calls of 50 ms or more (a whole training step), which are timed `reps` times
    end to end (at most 3 for calls of a second or more: the GPU run's time limits): do_bench would run such a
    step dozens of times. device="cpu": host timing even where a GPU exists (CPU work)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        probe_ms = (time.perf_counter() - start) * 1e3
        if probe_ms < 50:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        if probe_ms >= 1000:
            reps = min(reps, 3)
    else:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph: the GPU time of its kernels without the Python
    and launch costs, which dominate a decode-sized call end to end; raises if fn cannot be captured."""
    from qlora_kernels.testing import capture_cuda_graph

    graph, _ = capture_cuda_graph(fn, warmup=3)
    return time_ms(graph.replay)


def peak_memory_mb(fn, reset=None, device: str | None = None) -> float | None:
    """Peak CUDA memory allocated during fn() above what was allocated before, in MB (None on CPU). `reset`
    runs first, before the baseline is read: it must free what fn() itself frees and reallocates (the .grad of
    the previous call), or that memory is counted in the baseline and the new allocation hides in it."""
    if not torch.cuda.is_available() or device == "cpu":
        return None
    if reset is not None:
        reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_bound_providers(device, eager, ours, liger):
    """name -> fn for a memory-bound op: transformers' eager math first (the others' "x eager" divides by it),
    ours, and on CUDA torch.compile of the eager math and Liger's kernel (`liger()` returns it, or raises
    ImportError where liger_kernel is not installed)."""
    table = {"hf eager": eager, "ours": ours}
    if device == "cuda":
        table["torch.compile(hf)"] = torch.compile(eager, dynamic=False)
        try:
            table["liger"] = liger()
        except ImportError:
            pass
    return table


def memory_bound_rows(rows, case: dict, providers: dict, step_for, nbytes: int, device: str, reps: int):
    """Append one row per provider for a memory-bound op: `step_for(fn)` is a callable running provider fn's
    forward + backward, `nbytes` the minimum bytes it must move. Columns: ms, GB/s, % of copy bandwidth,
    x eager (against the provider named "hf eager", listed first), peak MB, and the error of a provider that
    failed (a row, not the end of the suite)."""
    bandwidth, base = copy_bandwidth_gbs(), None
    for name, fn in providers.items():
        step = step_for(fn)
        try:
            ms, error = time_ms(step, reps=reps, device=device), ""
            peak = peak_memory_mb(step, device=device)
        except Exception as err:  # noqa: BLE001
            ms, peak, error = None, None, f"{type(err).__name__}: {err}"[:120]
        base = ms if name == "hf eager" else base
        gbs = nbytes / ms / 1e6 if ms else None
        rows.append({**case, "provider": name, "ms": ms, "GB/s": gbs,
                     "% of copy": 100 * gbs / bandwidth if gbs and bandwidth else None,
                     "x eager": base / ms if base and ms else None, "peak MB": peak, "error": error})


def card() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def copy_bandwidth_gbs() -> float | None:
    name = card()
    return next((bw for key, bw in COPY_BANDWIDTH_GBS.items() if key in name), None)


def environment() -> dict:
    import triton
    # the GPU machine gets a copy of the tree without .git: gpu_check.sh passes QLORA_KERNELS_COMMIT
    commit = os.environ.get("QLORA_KERNELS_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    return {"card": card(), "torch": torch.__version__, "triton": triton.__version__, "commit": commit or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def out_dir(args) -> str:
    path = args.out or os.environ.get("OUT") or os.path.join("benchmarks", "results", "local")
    os.makedirs(path, exist_ok=True)
    return path


def _write_table(stem, rows, path, env, notes=""):
    """<path>/<stem>.json and <path>/<stem>.md (a table of `rows`, header from their keys); returns the table."""
    with open(os.path.join(path, f"{stem}.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = [f"## {stem}", "", f"{env['card']}, torch {env['torch']}, triton {env['triton']}, commit "
             f"{env['commit']}, {env['date']}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(path, f"{stem}.md"), "w") as f:
        f.write(table)
    return table


class Rows(list):
    """A suite's result rows, saved (JSON + markdown, marked partial) at every append: a suite cut by the GPU
    run's time limit keeps the rows it measured. write_results writes the final table over them."""

    def __init__(self, stem, args):
        super().__init__()
        self.stem, self.path, self.env = stem, out_dir(args), None

    def save(self):
        """Write the rows as they are now (append does; call it after changing a row in place)."""
        self.env = self.env or environment()
        _write_table(self.stem, list(self), self.path, self.env,
                     "PARTIAL: the suite was cut before its end; the rows measured so far.")

    def append(self, row):
        super().append(row)
        self.save()

    def extend(self, rows):
        super().extend(rows)
        self.save()

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def write_results(stem: str, rows: list[dict], args, notes: str = "") -> str:
    """Write <out>/<stem>.json, <out>/<stem>.md (a table of `rows`, header from their keys) and <out>/<stem>.png
    (benchmarks/plot.py; skipped without matplotlib)."""
    env = environment()
    path = out_dir(args)
    rows = list(rows)
    table = _write_table(stem, rows, path, env, notes)
    try:
        plot.plot(stem, rows, os.path.join(path, f"{stem}.png"), plot.title_for(stem, env))
    except Exception as err:  # noqa: BLE001 - a failed plot must not cost the measured table
        print(f"{stem}: plot failed: {err}")
    print(table)
    return table
