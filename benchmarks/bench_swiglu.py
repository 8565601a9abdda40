"""SwiGLU forward + backward (silu(gate) * up, one per layer): ours beside transformers' eager math,
torch.compile of it, and Liger's SiLU-mul where installed, on the workload's token counts and MLP widths.

GB/s counts the minimum bytes: forward reads gate and up and writes y, backward reads gate, up and dy and writes
both gradients (bf16, 2 B each: 16 B per element); % of copy is against the card's copy bandwidth.
"""
import torch

from benchmarks import harness
from qlora_kernels.ops.swiglu import swiglu
from qlora_kernels.reference import swiglu as ref


def _liger():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    return LigerSiLUMulFunction.apply


def main():
    args = harness.parse_args(__doc__)
    device = harness.device()
    # (tokens, intermediate): Llama-3.2-1B (8192) and -3B (8192) at 4096 and 32768 tokens, 8B (14336) at 4096
    shapes = [(256, 2048)] if args.quick or device == "cpu" else [(4096, 8192), (32768, 8192), (4096, 14336)]
    rows = harness.Rows("swiglu", args)
    providers = harness.memory_bound_providers(device, ref.swiglu, swiglu, _liger)
    for tokens, inter in shapes:
        gate = torch.randn(tokens, inter, device=device, dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(tokens, inter, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, inter, device=device, dtype=torch.bfloat16)

        def step_for(fn):
            def step():
                fn(gate, up).backward(dy)
                gate.grad = up.grad = None
            return step
        harness.memory_bound_rows(rows, {"tokens x intermediate": f"{tokens}x{inter}"}, providers, step_for,
                                  16 * gate.numel(), device, reps=20 if device == "cuda" else 3)
    harness.write_results("swiglu", rows, args, notes="forward + backward, bf16 gate and up")


if __name__ == "__main__":
    main()
