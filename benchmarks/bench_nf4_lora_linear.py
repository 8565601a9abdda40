"""NF4 + LoRA linear: ours vs plain torch (reference), bitsandbytes + PEFT-style LoRA, and a bare bf16 cuBLAS
F.linear of the same base shape (the ceiling). Forward and forward+backward; time, TFLOP/s, fraction of the
card's ceiling (bf16 dense FLOP/s, or copy bandwidth on the 4-bit weight bytes for decode), peak memory.

    python -m benchmarks.bench_nf4_lora_linear [--quick]
"""
import math
import os

import torch
import torch.nn.functional as F

from benchmarks import harness
from qlora_kernels import nf4_lora_linear
from qlora_kernels.ops.nf4 import quantize_nf4
from qlora_kernels.reference import nf4_lora_linear as ref

# (M, N, K, r): decode, small batch and training tokens on Llama-3.1-8B q/o (4096, 4096) and gate/up
# (14336, 4096) at the lite recipe's r = 32, plus the full recipe's r = 256 (workload.md)
GPU_SHAPES = [(1, 4096, 4096, 32), (1, 14336, 4096, 32), (16, 4096, 4096, 32), (16, 14336, 4096, 32),
              (4096, 4096, 4096, 32), (4096, 14336, 4096, 32), (4096, 4096, 4096, 256)]
QUICK_SHAPES = [(64, 256, 256, 8)]
TRAIN_M = 512          # forward+backward only from here (decode has no backward)
# our providers and the switches each runs with (set for the whole step): the NF4 code lookup of the Triton
# GEMMs, and the one-token CUDA kernel of the extension (csrc/nf4_lora_linear_cuda.cu)
OURS = {"ours": {}, "ours_select": {"QLORA_KERNELS_NF4_LOOKUP": "select", "QLORA_KERNELS_DECODE": "triton"},
        "ours_triton_decode": {"QLORA_KERNELS_DECODE": "triton"}}   # ours: the defaults (PRMT, CUDA decode)


def weight_bytes(N, K, blocksize=64):
    return N * K / 2 + N * K / blocksize + 4 * math.ceil(N * K / blocksize / 256)


def flops(M, N, K, r, mode):
    fwd = 2 * M * N * K + 2 * M * r * (K + N)
    # backward: dx = dy @ W (2MNK) + LoRA (g = dy @ B, g @ A: 2Mr(N + K)), dA (2MrK), dB (2MrN)
    return fwd if mode == "fwd" else fwd + 2 * M * N * K + 4 * M * r * (N + K)


def make(M, N, K, r, device, dtype):
    w = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
    qw = quantize_nf4(w, 64, True, backend="reference")  # the format, independent of the quantize kernels
    return {"qw": qw, "w": w, "x": torch.randn(M, K, device=device, dtype=dtype),
            "A": torch.randn(r, K, device=device) / math.sqrt(K), "B": torch.randn(N, r, device=device) * 0.01,
            "scaling": 2.0, "p": 0.1}


def providers(d):
    """name -> fn(x, A, B) -> y; each forward as its stack runs it (dropout 0.1 on the LoRA branch)."""
    qw, w, scaling, p = d["qw"], d["w"], d["scaling"], d["p"]
    out = {
        **{name: lambda x, A, B: nf4_lora_linear(x, qw, A, B, scaling, dropout_p=p) for name in OURS},  # env: OURS
        "torch_ref": lambda x, A, B: ref.nf4_lora_linear(
            x, qw, A, B, scaling, keep=torch.rand_like(x, dtype=torch.float32) >= p, dropout_p=p,
            upcast=False).to(x.dtype),
        # the ceiling: the base GEMM alone on an already-dense bf16 weight (no dequant, no LoRA)
        "cublas_bf16": lambda x, A, B: F.linear(x, w),
    }
    try:
        import bitsandbytes as bnb

        packed, qs = qw.to_bnb()

        def bnb_peft(x, A, B):
            # PEFT's lora.bnb.Linear4bit: the base Linear4bit's bnb.matmul_4bit (its fused 4-bit kernel for
            # small M without grad, else dequantize + cuBLAS), PEFT's defensive clone, then
            # lora_B(lora_A(dropout(x))) * scaling in the LoRA weights' dtype (fp32 by default), cast back, added
            result = bnb.matmul_4bit(x, packed, quant_state=qs).clone()
            xl = F.dropout(x.to(A.dtype), p, training=True)
            return result + (F.linear(F.linear(xl, A), B) * scaling).to(x.dtype)

        def bnb_peft_autocast(x, A, B):
            # the same under bf16 autocast, as Trainer(bf16=True) runs it: PEFT then skips the cast to fp32, and
            # autocast runs dropout, the LoRA GEMMs and the scaling in bf16
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                result = bnb.matmul_4bit(x, packed, quant_state=qs).clone()
                return result + F.linear(F.linear(F.dropout(x, p, training=True), A), B) * scaling

        out["bnb_peft"] = bnb_peft
        out["bnb_peft_autocast"] = bnb_peft_autocast
    except Exception as err:  # bitsandbytes missing or not built for this machine
        print(f"bitsandbytes + PEFT skipped: {err}")
    return out


def step_for(fn, d, mode):
    """(step, drop_grads): one call of provider fn on case d, "fwd" (no grad) or "fwd+bwd" (a fixed dy)."""
    x = d["x"].detach().requires_grad_(mode == "fwd+bwd")
    A = d["A"].detach().requires_grad_(mode == "fwd+bwd")
    B = d["B"].detach().requires_grad_(mode == "fwd+bwd")

    def drop_grads():
        x.grad = A.grad = B.grad = None
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, A, B)
    else:
        dy = torch.randn(x.shape[0], d["qw"].shape[0], device=x.device, dtype=x.dtype)

        def step():
            drop_grads()
            fn(x, A, B).backward(dy)
    return step, drop_grads


def run_one(fn, d, mode, graph=False):
    """(ms, peak MB) of one provider; graph: the forward replayed from a CUDA graph (kernel time only)."""
    step, drop_grads = step_for(fn, d, mode)
    if graph:
        return harness.graph_ms(step), None
    return harness.time_ms(step), harness.peak_memory_mb(step, drop_grads)


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK_SHAPES if args.quick or device != "cuda" else GPU_SHAPES
    bw = harness.copy_bandwidth_gbs()
    rows = harness.Rows("nf4_lora_linear", args)
    for M, N, K, r in shapes:
        d = make(M, N, K, r, device, dtype)
        fns = providers(d)
        # decode sizes are host-bound end to end (Python, launches): "[graph]" rows replay the same forward
        # from a CUDA graph, which times the kernels against the weight bytes (the decode target)
        # (not torch_ref: it copies a host tensor to the device, which a graph capture refuses)
        graphed = [(f"{name}[graph]", fn, True) for name, fn in fns.items() if name != "torch_ref"] \
            if M <= 16 and device == "cuda" else []
        for mode in ("fwd", "fwd+bwd") if M >= TRAIN_M or device != "cuda" else ("fwd",):
            base = {}   # ours' ms, end to end and replayed from a graph: each row is compared with its kind
            for label, fn, graph in [(name, fn, False) for name, fn in fns.items()] + graphed:
                name = label.removesuffix("[graph]")
                if name in OURS and name != "ours" and (device != "cuda" or (name == "ours_triton_decode" and M != 1)):
                    continue   # the variants differ on CUDA only; the decode kernel's at M = 1 only
                if name == "bnb_peft_autocast" and device == "cuda" and M < TRAIN_M:
                    continue   # autocast changes the LoRA GEMMs' dtype only: it matters at training sizes
                os.environ.update(OURS.get(name, {}))
                try:
                    ms, mem = run_one(fn, d, mode, graph)
                except Exception as err:  # noqa: BLE001 - one provider's failure must not cost the others' rows
                    print(f"{label} {M}x{N}x{K} {mode} failed: {err}")
                    rows.append({"M": M, "N": N, "K": K, "r": r, "mode": mode, "provider": label, "ms": None,
                                 "error": f"{type(err).__name__}: {err}"[:120]})
                    continue
                finally:
                    for key in OURS.get(name, {}):
                        os.environ.pop(key)
                fl = flops(M, N, K, r, mode) if name != "cublas_bf16" else \
                    (2 if mode == "fwd" else 4) * M * N * K
                row = {"M": M, "N": N, "K": K, "r": r, "mode": mode, "provider": label, "ms": ms,
                       "TFLOP/s": fl / ms / 1e9, "peak_MB": mem}
                if M <= 16:
                    gbs = weight_bytes(N, K) / ms / 1e6
                    row["weight_GB/s"] = gbs
                    row["frac_ceiling"] = gbs / bw if (bw and name in OURS) else None
                else:
                    row["frac_ceiling"] = fl / ms / 1e9 / harness.BF16_DENSE_TFLOPS
                if name == "ours":
                    base[graph] = ms
                rows.append(row)
            for row in rows:
                if row["M"] == M and row["N"] == N and row["K"] == K and row["r"] == r and row["mode"] == mode:
                    ours_ms = base.get(row["provider"].endswith("[graph]"))
                    row["ours_speedup"] = row["ms"] / ours_ms if ours_ms and row["ms"] else None
        del d, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    harness.write_results("nf4_lora_linear", rows, args,
                          notes="ours_speedup = provider ms / ours ms (>1: ours faster). cublas_bf16 is the "
                                "bare base GEMM on a dense bf16 weight (fwd+bwd: y and dx only): the ceiling. "
                                "Dropout 0.1 on the LoRA branch for every provider but cublas_bf16. frac_ceiling: "
                                f"of {harness.BF16_DENSE_TFLOPS} TFLOP/s, or (M <= 16, ours) of copy bandwidth "
                                "on the 4-bit weight bytes. [graph]: the same forward replayed from a CUDA graph "
                                "(kernel time, no Python or launch cost; its ours_speedup is against ours[graph]). "
                                "A provider that failed has a row with its error. ours: the defaults (the GEMMs' "
                                "NF4 lookup by inline-PTX byte permutes; M = 1 by the extension's CUDA kernel where "
                                "it was built with CUDA); ours_select: the select-tree lookup and the Triton decode "
                                "tile (QLORA_KERNELS_NF4_LOOKUP=select QLORA_KERNELS_DECODE=triton); "
                                "ours_triton_decode (M = 1): the Triton decode tile with PRMT. bnb_peft: bnb.matmul_4bit as bnb's Linear4bit calls it, and PEFT's "
                                "LoRA branch in its fp32 weights' dtype "
                                "(no autocast); bnb_peft_autocast under bf16 autocast, as Trainer(bf16=True).")


if __name__ == "__main__":
    main()
