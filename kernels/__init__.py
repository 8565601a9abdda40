"""Triton kernels of qlora_kernels (installed as qlora_kernels.kernels). Only @triton.jit functions and
their configs live here; launchers, checks and autograd are in qlora_kernels.ops."""
