"""Plain-PyTorch SwiGLU, transformers' LlamaMLP activation (hidden_act "silu"): the reference the tests compare
against and the CPU path of qlora_kernels.ops.swiglu."""
import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each op rounded to the inputs' dtype, as `act_fn(gate_proj(x)) * up_proj(x)`."""
    return F.silu(gate) * up
