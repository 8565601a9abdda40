"""RMSNorm forward + backward (the Llama-family norm, two per layer): ours beside transformers' eager module math,
torch.compile of it, and Liger's RMSNorm where installed, on the workload's token counts and hidden sizes.

GB/s counts the minimum bytes: forward reads x and writes y, backward reads x and dy and writes dx (bf16, 2 B
each: 10 B per element), the weight frozen as in QLoRA; % of copy is against the card's copy bandwidth.
"""
import torch

from benchmarks import harness
from qlora_kernels.ops.rms_norm import rms_norm
from qlora_kernels.reference import rms_norm as ref

EPS = 1e-5


def _liger():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    # casting mode "llama" is HF's rounding; in_place=False: dx allocated, as ours
    return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)


def main():
    args = harness.parse_args(__doc__)
    device = harness.device()
    # (tokens, hidden): Llama-3.2-1B and -3B at 4096 and 32768 tokens (../shared/notes/workload.md), 8B at 4096
    shapes = [(512, 2048)] if args.quick or device == "cpu" else \
        [(4096, 2048), (32768, 2048), (4096, 3072), (32768, 3072), (4096, 4096)]
    rows = harness.Rows("rms_norm", args)
    providers = harness.memory_bound_providers(device, ref.rms_norm, rms_norm, _liger)
    for tokens, hidden in shapes:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.rand(hidden, device=device, dtype=torch.bfloat16) + 0.5
        dy = torch.randn_like(x)

        def step_for(fn):
            def step():
                fn(x, w, EPS).backward(dy)
                x.grad = None
            return step
        harness.memory_bound_rows(rows, {"tokens x hidden": f"{tokens}x{hidden}"}, providers, step_for, 10 * x.numel(),
                                  device, reps=20 if device == "cuda" else 3)
    harness.write_results("rms_norm", rows, args, notes="forward + backward, bf16 x and weight, weight frozen")


if __name__ == "__main__":
    main()
