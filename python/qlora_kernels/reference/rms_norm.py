"""Plain-PyTorch RMSNorm, transformers' LlamaRMSNorm math (also Mistral's, Qwen2's, Qwen3's): the reference
the tests compare against and the CPU path of qlora_kernels.ops.rms_norm."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., H), weight (H,) -> weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype), the mean in fp32; the
    result in torch.promote_types(weight.dtype, x.dtype), as HF's module returns it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
