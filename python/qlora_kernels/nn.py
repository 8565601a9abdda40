"""nn modules: hold parameters and buffers, call the functional ops (no kernel logic here)."""
import math

import torch
from torch import nn

from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.ops.nf4 import dequantize_nf4, quantize_nf4
from qlora_kernels.ops.nf4_lora_linear import nf4_lora_linear


class LoRALinear4bit(nn.Module):
    """A frozen NF4 linear layer with a trainable LoRA adapter, PEFT's formula and initialization:
    `y = x @ dequant(W).T + scaling * lora_B(lora_A(dropout(x))) + bias`, scaling = alpha / r
    (alpha / sqrt(r) with rslora). lora_A kaiming-uniform(a=sqrt(5)), lora_B zeros, both fp32.

    The NF4 storage lives in buffers (moves with .to(device), saved in state_dict; a dtype cast such as
    `.to(torch.bfloat16)` leaves it alone, as bitsandbytes' quant state); the bias is frozen.
    """

    _QUANT_BUFFERS = ("scales", "absmax2", "code2", "offset")

    def __init__(self, qweight: NF4Weight, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):   # here, not at the first forward
            raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        if not 0.0 <= float(lora_dropout) < 1.0:     # here, not at the first training forward
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.out_features, self.in_features = qweight.shape
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora = bool(use_rslora)   # kept: at r = 1 the scaling cannot tell (PEFT's format records it)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.compute_dtype = compute_dtype
        self._blocksize, self._nested_blocksize, self._weight_dtype = \
            qweight.blocksize, qweight.nested_blocksize, qweight.dtype
        scales, absmax2, code2, offset = qweight.scale_tensors()
        self.register_buffer("packed", qweight.packed)
        self.register_buffer("scales", scales)
        self.register_buffer("absmax2", absmax2)
        self.register_buffer("code2", code2)
        self.register_buffer("offset", offset)
        device = qweight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype).clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "LoRALinear4bit":
        """Quantize `linear.weight` to NF4 in its own dtype, as `bnb.nn.Linear4bit` does (the bytes of
        bitsandbytes on CUDA, see `quantize_nf4`; compute_dtype is the dtype of the matmul, not of the quantization), and attach a fresh LoRA
        adapter."""
        qweight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(qweight, r, lora_alpha, lora_dropout, use_rslora, linear.bias, compute_dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every float buffer; the quantization state keeps its dtype (its bits
        # are the format) and only follows device moves
        before = {name: getattr(self, name) for name in self._QUANT_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, t in before.items():
            after = getattr(self, name)
            if after.dtype != t.dtype:
                setattr(self, name, t.to(after.device))
        return self

    @property
    def qweight(self) -> NF4Weight:
        if self.absmax2 is None:
            return NF4Weight(self.packed, (self.out_features, self.in_features), self._weight_dtype,
                             self._blocksize, self.scales)
        return NF4Weight(self.packed, (self.out_features, self.in_features), self._weight_dtype, self._blocksize,
                         qabsmax=self.scales, absmax2=self.absmax2, code2=self.code2, offset=self.offset,
                         nested_blocksize=self._nested_blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():   # the cast below would hide it (and the output cast truncate to integers)
            raise TypeError(f"LoRALinear4bit expects a floating-point input, got {x.dtype}")
        y = nf4_lora_linear(x.to(self.compute_dtype), self.qweight, self.lora_A, self.lora_B, self.scaling,
                            self.bias, self.lora_dropout, self.training)
        return y.to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """dequant(W) + scaling * B @ A in the compute dtype (computed in fp32), for export."""
        w = dequantize_nf4(self.qweight).float()
        return (w + self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, bias={self.bias is not None}")


from qlora_kernels.ops.cross_entropy import (  # noqa: E402
    DEFAULT_CHUNK_BYTES, fused_cross_entropy, fused_linear_cross_entropy)


class FusedCrossEntropyLoss(nn.Module):
    """`fused_cross_entropy` as a module: `loss(logits, labels)`; options as torch.nn.CrossEntropyLoss plus
    z_loss, softcap and inplace_backward (which overwrites the logits with their gradient)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, inplace_backward: bool = False):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.inplace_backward = z_loss, softcap, inplace_backward

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_cross_entropy(logits, labels, self.ignore_index, self.reduction, self.label_smoothing,
                                   self.z_loss, self.softcap, self.inplace_backward)


class FusedLinearCrossEntropyLoss(nn.Module):
    """`fused_linear_cross_entropy` as a module: `loss(hidden, weight, labels, bias=None)` with the head's
    weight passed in (the lm_head stays where it is). Labels must already be aligned with hidden."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_bytes = z_loss, softcap, chunk_bytes

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, bias, self.ignore_index, self.reduction,
                                          self.label_smoothing, self.z_loss, self.softcap, self.chunk_bytes)
