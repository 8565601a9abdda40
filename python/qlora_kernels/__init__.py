"""qlora_kernels: fused GPU kernels for QLoRA fine-tuning (NF4 weights, LoRA, losses, optimizer)."""
from qlora_kernels._backend import backend_for
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.ops.nf4 import dequantize_nf4, quantize_nf4

__version__ = "0.1.0"

__all__ = ["NF4Weight", "backend_for", "dequantize_nf4", "quantize_nf4"]
