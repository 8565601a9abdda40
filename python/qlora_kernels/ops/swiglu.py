"""SwiGLU of the Llama-family MLP, silu(gate) * up: checks, launchers, torch.library custom ops, the autograd
Function and the functional entry point `swiglu`.

Backends: Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); other tensors run the plain-PyTorch
reference, which is HF's own math.
"""
import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import swiglu as kernels
from qlora_kernels.reference import swiglu as ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(gate, up):
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError(f"swiglu: gate and up must be tensors, got {type(gate).__name__} and {type(up).__name__}")
    if gate.dtype not in _DTYPES or up.dtype != gate.dtype:
        raise TypeError(f"swiglu: gate and up must share one dtype of float32, bfloat16, float16, got {gate.dtype} "
                        f"and {up.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    _backend.check_same_device(gate=gate, up=up)


def _grid_block(n):
    block = kernels.INTERPRET_BLOCK if _backend.interpreting() else kernels.BLOCK
    return (_backend.cdiv(n, block),), block


@_backend.custom_op("swiglu_forward", mutates_args=())
@_backend.on_input_device
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up contiguous, one shape and dtype -> silu(gate) * up."""
    y = torch.empty_like(gate)
    if y.numel():
        grid, block = _grid_block(y.numel())
        out = _backend.interpreter_out(y)
        kernels.swiglu_forward_kernel[grid](gate, up, out, y.numel(), BF16=y.dtype == torch.bfloat16,
                                            BF16_BITS=out is not y, BLOCK=block, num_warps=kernels.NUM_WARPS)
    return y


@swiglu_forward.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@_backend.custom_op("swiglu_backward", mutates_args=())
@_backend.on_input_device
def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, need_gate: bool,
                    need_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up), each an empty tensor where not needed; all contiguous, one shape."""
    n = gate.numel()
    dg = torch.empty_like(gate) if need_gate else gate.new_empty(0)
    du = torch.empty_like(up) if need_up else up.new_empty(0)
    if n and (need_gate or need_up):
        grid, block = _grid_block(n)
        kernels.swiglu_backward_kernel[grid](gate, up, dy, _backend.interpreter_out(dg),
                                             _backend.interpreter_out(du), n, BF16=gate.dtype == torch.bfloat16,
                                             BF16_BITS=_backend.interpreter_out(gate) is not gate, NEED_DG=need_gate,
                                             NEED_DU=need_up, BLOCK=block, num_warps=kernels.NUM_WARPS)
    return dg, du


@swiglu_backward.register_fake
def _(gate, up, dy, need_gate, need_up):
    return (torch.empty_like(gate) if need_gate else gate.new_empty(0),
            torch.empty_like(up) if need_up else up.new_empty(0))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _backend.call_op("swiglu_forward", gate, up)

    @staticmethod
    def backward(ctx, dy):
        _backend.refuse_double_backward("swiglu")
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        dg, du = _backend.call_op("swiglu_backward", gate, up, dy.contiguous(), need_gate, need_up)
        return (dg if need_gate else None), (du if need_up else None)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one kernel each way, as transformers' LlamaMLP computes it (silu in fp32 rounded to
    the dtype, then the product): gate, up (..., I) of one shape and dtype (fp32/bf16/fp16) -> (..., I).
    Gradients for each input that requires one; saves gate and up (eager also keeps silu(gate))."""
    _check(gate, up)
    if not _backend.runs_triton(gate):
        return ref.swiglu(gate, up)
    if _backend.needs_autograd(gate, up):
        return _SwiGLU.apply(gate, up)
    return _backend.call_op("swiglu_forward", gate.contiguous(), up.contiguous())
