"""NF4 quantize / dequantize throughput: our paths beside bitsandbytes, on the current device.

GB/s counts bytes read + written: dequantize reads 0.5 B/weight + scales and writes the output dtype;
quantize reads the input and writes 0.5 B/weight + scales.
"""
import torch

import qlora_kernels as qk
from benchmarks import harness
from qlora_kernels import _backend


def scale_bytes(q):
    return sum(t.numel() * t.element_size() for t in q.scale_tensors() if t is not None)


def providers(device):
    """name -> (quantize(w, double_quant), dequantize(q)) for every implementation available here."""
    ours = {"cuda": ["triton"] + (["cuda_ext"] if getattr(_backend.native(), "with_cuda", False) else []),
            "cpu": ["cpu"] if _backend.native() is not None else []}[device] + ["reference"]
    table = {f"qlora_kernels[{b}]": (lambda w, dq, b=b: qk.quantize_nf4(w, 64, dq, backend=b),
                                     lambda q, b=b: qk.dequantize_nf4(q, backend=b)) for b in ours}
    try:
        import bitsandbytes.functional as bnbf
        table["bitsandbytes"] = (
            lambda w, dq: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq),
            lambda q: bnbf.dequantize_4bit(*q))
    except ImportError:
        pass
    return table


def _measure_provider(rows, name, quantize, dequantize, w, double_quant, reps, bandwidth, first):
    """Rows for one provider's quantize and dequantize of w; returns the packed bytes to compare with."""
    out_f, in_f = w.shape
    n = w.numel()
    q = quantize(w, double_quant)
    qw = q if isinstance(q, qk.NF4Weight) else qk.NF4Weight.from_bnb(*q)
    first = qw.packed.clone() if first is None else first
    mismatched = int((qw.packed != first).sum())
    moved_q = n * 2 + n // 2 + scale_bytes(qw)
    moved_dq = n // 2 + scale_bytes(qw) + n * 2
    t_q = harness.time_ms(lambda: quantize(w, double_quant), reps=reps)
    t_dq = harness.time_ms(lambda: dequantize(q), reps=reps)
    peak = harness.peak_memory_mb(lambda: dequantize(q))
    for op, t, moved in (("quantize", t_q, moved_q), ("dequantize", t_dq, moved_dq)):
        gbs = moved / t / 1e6
        rows.append({"op": op, "shape": f"{out_f}x{in_f}", "double_quant": double_quant,
                     "provider": name, "ms": t, "GB/s": gbs,
                     "% copy bw": 100 * gbs / bandwidth if bandwidth else None,
                     "peak MB": peak if op == "dequantize" else None,
                     "bytes != first provider": mismatched})
    return first


def main():
    args = harness.parse_args(__doc__)
    device = harness.device()
    shapes = [(1024, 4096)] if args.quick else [(4096, 14336), (3072, 8192)]
    bandwidth = harness.copy_bandwidth_gbs()
    rows = harness.Rows("nf4", args)
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)
        n = w.numel()
        first = None   # the first provider's packed bytes: the others' are compared with them
        for double_quant in (True, False):
            for name, (quantize, dequantize) in providers(device).items():
                reps = 3 if (name.endswith("[reference]") or device == "cpu") and not args.quick else 10
                try:
                    first = _measure_provider(rows, name, quantize, dequantize, w, double_quant, reps, bandwidth, first)
                except Exception as err:  # noqa: BLE001 - one provider's failure is a row, not the suite's end
                    rows.append({"op": "quantize + dequantize", "shape": f"{out_f}x{in_f}",
                                 "double_quant": double_quant, "provider": name,
                                 "error": f"{type(err).__name__}: {err}"[:120]})
    by_key = {(r["op"], r["shape"], r["double_quant"], r["provider"]): r["ms"] for r in rows}
    for r in rows:  # ratio to bitsandbytes in the same run
        peer = by_key.get((r["op"], r["shape"], r["double_quant"], "bitsandbytes"))
        r["bnb ms / ours ms"] = peer / r["ms"] if peer and r.get("ms") else None
    harness.write_results("nf4", rows, args, notes="bf16 weights, blocksize 64; dequantize to bf16.")


if __name__ == "__main__":
    main()
