"""qlora_kernels: fused GPU kernels for QLoRA fine-tuning (NF4 weights, LoRA, losses, optimizer)."""
from qlora_kernels._backend import backend_for
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.ops.nf4 import dequantize_nf4, quantize_nf4
from qlora_kernels.ops.nf4_lora_linear import nf4_lora_linear
from qlora_kernels.ops.cross_entropy import fused_cross_entropy, fused_linear_cross_entropy
from qlora_kernels.ops.rms_norm import rms_norm
from qlora_kernels.ops.swiglu import swiglu
from qlora_kernels import nn
from qlora_kernels import optim
from qlora_kernels.optim import FusedAdamW
from qlora_kernels.convert import convert_to_qlora, load_adapter, save_adapter
from qlora_kernels.patch import PatchReport, patch_model, unpatch_model

__version__ = "0.1.0"

__all__ = ["NF4Weight", "backend_for", "dequantize_nf4", "quantize_nf4", "nf4_lora_linear", "nn", "optim", "FusedAdamW",
           "fused_cross_entropy", "fused_linear_cross_entropy", "rms_norm",
           "swiglu"]
__all__ += ["patch_model", "unpatch_model", "PatchReport"]
__all__ += ["convert_to_qlora", "save_adapter", "load_adapter"]
