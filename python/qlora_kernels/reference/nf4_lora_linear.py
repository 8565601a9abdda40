"""Plain-PyTorch NF4 + LoRA linear: the ground truth in tests (no triton).

y = x @ dequant(W).T + scaling * (dropout(x) @ A.T) @ B.T + bias, dropout on the LoRA branch only (PEFT).
`keep` is the boolean dropout keep-mask of x (same shape), or None for no dropout.
"""
import torch

from qlora_kernels.reference.nf4 import dequantize_nf4


def nf4_lora_linear(x, qweight, lora_A, lora_B, scaling=1.0, bias=None, keep=None, dropout_p=0.0, upcast=True):
    """Differentiable in x, lora_A, lora_B, bias. upcast=True: all math in fp32, result fp32; else in x's
    dtype (what plain PyTorch at that dtype computes), result in x's dtype."""
    dtype = torch.float32 if upcast else x.dtype
    w = dequantize_nf4(qweight, upcast=True).to(dtype)
    xc = x.to(dtype)
    xd = xc if keep is None else xc * keep.to(dtype) / (1.0 - dropout_p)
    y = xc @ w.t() + scaling * ((xd @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def merged_weight(qweight, lora_A, lora_B, scaling):
    """dequant(W) + scaling * B @ A in fp32."""
    return dequantize_nf4(qweight, upcast=True) + scaling * (lora_B.float() @ lora_A.float())
