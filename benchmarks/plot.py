"""PNG plots of the benchmark tables: one panel per metric, a group of bars per case, one bar per provider.

harness.write_results draws them next to each table; to (re)draw committed tables, e.g. after a GPU run:

    python -m benchmarks.plot benchmarks/results/*.json
"""
import json
import math
import os
import sys

# suite stem -> (columns that name a case, [(metric column, axis label)])
SPECS = {
    "nf4_lora_linear": (["M", "N", "K", "r", "mode"], [("ms", "ms (lower is better)")]),
    "nf4": (["op", "shape", "double_quant"], [("ms", "ms (lower is better)")]),
    "cross_entropy": (["op", "tokens", "V", "H", "labelled"],
                      [("ms", "ms (lower is better)"), ("peak_MB", "peak memory, MB")]),
    "adamw": (["set"], [("ms", "ms (lower is better)")]),
    "rms_norm": (["tokens x hidden"], [("ms", "ms (lower is better)"), ("peak MB", "peak memory, MB")]),
    "swiglu": (["tokens x intermediate"], [("ms", "ms (lower is better)"), ("peak MB", "peak memory, MB")]),
    "e2e": (["model", "lora", "batch x seq"], [("tokens/s", "tokens/s (higher is better)"), ("peak MB", "peak memory, MB")]),
}


def spec_for(stem):
    """The spec of a suite, also for a versioned table such as `nf4_lora_linear_v1`."""
    for suite in sorted(SPECS, key=len, reverse=True):
        if stem == suite or stem.startswith(suite + "_"):
            return SPECS[suite]
    return None


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0 else None


def plot(stem, rows, path, title=""):
    """Write `path` (PNG) for the rows of suite `stem`; returns the path, or None when there is nothing to draw
    (unknown suite, no numeric values) or matplotlib is not installed."""
    spec = spec_for(stem)
    if spec is None:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.patches
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{stem}: no plot (matplotlib is not installed)")
        return None
    case_cols, metrics = spec
    metrics = [(m, label) for m, label in metrics if any(_number(row.get(m)) for row in rows)]
    if not metrics:
        return None
    case_of = lambda row: " ".join(f"{c}={row[c]}" for c in case_cols if row.get(c) is not None)  # noqa: E731
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    color = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(providers)}
    # one bar slot per row, grouped by case (providers in table order), a blank slot between cases
    slots, centers, y = [], {}, 0
    for case in dict.fromkeys(case_of(row) for row in rows):
        members = [row for row in rows if case_of(row) == case]
        centers[case] = y + (len(members) - 1) / 2
        slots += [(y + i, row) for i, row in enumerate(members)]
        y += len(members) + 1
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), max(3.0, 0.17 * y)), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        bars = [(pos, _number(row.get(metric)), color[row["provider"]]) for pos, row in slots]
        bars = [b for b in bars if b[1] is not None]
        ax.barh([b[0] for b in bars], [b[1] for b in bars], height=0.85, color=[b[2] for b in bars])
        values = [b[1] for b in bars]
        if max(values) / min(values) > 50:
            ax.set_xscale("log")
        ax.set_yticks(list(centers.values()), list(centers), fontsize=7)
        ax.set_ylim(y - 0.5, -1)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    handles = [matplotlib.patches.Patch(color=color[p], label=p) for p in providers]
    fig.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title or stem, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def title_for(stem, env):
    """The plot's title: which suite, on which card, at which commit and date (harness.environment())."""
    return f"{stem}: {env.get('card', '')}, commit {env.get('commit', '')}, {env.get('date', '')}"


def main(paths):
    for path in paths:
        with open(path) as f:
            table = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        title = title_for(stem, table.get("environment", {}))
        out = plot(stem, table["rows"], os.path.splitext(path)[0] + ".png", title)
        print(out or f"{path}: nothing to plot")


if __name__ == "__main__":
    main(sys.argv[1:])
