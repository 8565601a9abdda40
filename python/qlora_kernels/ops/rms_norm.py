"""RMSNorm of the Llama family (transformers' LlamaRMSNorm): checks, launchers, torch.library custom ops, the
autograd Function and the functional entry point `rms_norm`.

Backends: Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); other tensors, and rows wider than
kernels.MAX_BLOCK_H, run the plain-PyTorch reference, which is HF's own math (nothing to gain on the CPU).
"""
import math
import numbers

import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import rms_norm as kernels
from qlora_kernels.reference import rms_norm as ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET_PROGRAMS = 2     # the interpreter's cost is per program: few, each looping over rows


def _check(x, weight, eps):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"rms_norm: x and weight must be tensors, got {type(x).__name__} and "
                        f"{type(weight).__name__}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"rms_norm: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be (H,) with H = x.shape[-1], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    _backend.check_same_device(x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")


def runs_triton(x):
    """Whether rms_norm runs its kernels on x (else the plain-PyTorch math)."""
    return _backend.runs_triton(x) and 0 < _backend.next_power_of_2(x.shape[-1]) <= kernels.MAX_BLOCK_H


def _programs(x2d, backward):
    """The persistent grid: as many programs as are resident at once (kernels.resident_programs per SM)."""
    if _backend.interpreting():
        cap = INTERPRET_PROGRAMS
    else:
        block_h = _launch_config(x2d.shape[1])["BLOCK_H"]
        cap = kernels.resident_programs(block_h, backward) * _backend.num_sms(x2d.device)
    return max(1, min(x2d.shape[0], cap))


def _launch_config(H):
    block_h = max(16, _backend.next_power_of_2(H))
    return dict(BLOCK_H=block_h, num_warps=kernels.num_warps_for(block_h))


@_backend.custom_op("rms_norm_forward", mutates_args=())
@_backend.on_input_device
def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d (rows, H) with unit column stride, weight (H,) -> (y (rows, H) in promote(weight, x), rstd (rows,) fp32)."""
    n, H = x2d.shape
    y = torch.empty((n, H), dtype=torch.promote_types(weight.dtype, x2d.dtype), device=x2d.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2d.device)
    if n:
        out = _backend.interpreter_out(y)
        kernels.rms_norm_forward_kernel[(_programs(x2d, backward=False),)](
            x2d, weight.contiguous(), out, rstd, n, H, x2d.stride(0), y.stride(0), eps,
            X_BF16=x2d.dtype == torch.bfloat16, Y_BF16_BITS=out is not y, **_launch_config(H))
    return y, rstd


@rms_norm_forward.register_fake
def _(x2d, weight, eps):
    n, H = x2d.shape
    return (x2d.new_empty((n, H), dtype=torch.promote_types(weight.dtype, x2d.dtype)),
            x2d.new_empty(n, dtype=torch.float32))


@_backend.custom_op("rms_norm_backward", mutates_args=())
@_backend.on_input_device
def rms_norm_backward(x2d: torch.Tensor, weight: torch.Tensor, dy2d: torch.Tensor, rstd: torch.Tensor,
                      need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (rows, H) in x's dtype, dweight (H,) in weight's dtype, or an empty tensor unless need_dw)."""
    n, H = x2d.shape
    dx = torch.empty((n, H), dtype=x2d.dtype, device=x2d.device)
    programs = _programs(x2d, backward=True)
    dw_part = torch.empty((programs, H) if need_dw else (0,), dtype=torch.float32, device=x2d.device)
    if n:
        out = _backend.interpreter_out(dx)
        kernels.rms_norm_backward_kernel[(programs,)](
            x2d, weight.contiguous(), dy2d, rstd, out, dw_part, n, H, x2d.stride(0), dy2d.stride(0),
            dx.stride(0), X_BF16=x2d.dtype == torch.bfloat16, DX_BF16_BITS=out is not dx, NEED_DW=need_dw,
            **_launch_config(H))
    if not need_dw:
        return dx, weight.new_empty(0)
    dw = dw_part.sum(0) if n else torch.zeros(H, dtype=torch.float32, device=x2d.device)
    return dx, dw.to(weight.dtype)


@rms_norm_backward.register_fake
def _(x2d, weight, dy2d, rstd, need_dw):
    return torch.empty_like(x2d), weight.new_empty(weight.shape if need_dw else (0,))


def _rows(t, H):
    """(rows, H) view of t with unit column stride (a copy only where the layout needs one)."""
    t2d = t.reshape(-1, H)
    return t2d if t2d.stride(-1) == 1 or H == 1 else t2d.contiguous()


class _RMSNorm(torch.autograd.Function):
    """On (rows, H) tensors: the caller reshapes outside, so the output is no view made inside a Function (those
    refuse in-place updates such as `h += residual`)."""

    @staticmethod
    def forward(ctx, x2d, weight, eps):
        y, rstd = _backend.call_op("rms_norm_forward", x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        _backend.refuse_double_backward("rms_norm")
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = _backend.call_op("rms_norm_backward", x2d, weight, _rows(dy, x2d.shape[1]), rstd,
                                  ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' LlamaRMSNorm (Llama, Mistral, Qwen2, Qwen3) in one kernel each way:
    `weight * (x * rsqrt(mean(x**2, -1) + eps)).to(x.dtype)`, the statistics in fp32.

    x (..., H) in fp32/bf16/fp16, weight (H,) -> (..., H) in torch.promote_types(weight.dtype, x.dtype), as the
    module returns it. Gradients for x and weight (each only when required; weight's summed in fp32). Saves x
    and one fp32 per row for backward (eager autograd keeps fp32 copies of the row).
    """
    _check(x, weight, eps)
    if not runs_triton(x):
        return ref.rms_norm(x, weight, eps)
    x2d = _rows(x, x.shape[-1])
    if _backend.needs_autograd(x, weight):
        return _RMSNorm.apply(x2d, weight, float(eps)).view(x.shape)
    return _backend.call_op("rms_norm_forward", x2d, weight, float(eps))[0].view(x.shape)
