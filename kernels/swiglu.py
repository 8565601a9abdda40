"""Triton kernels: the SwiGLU of Llama-family MLPs, y = silu(gate) * up (transformers' LlamaMLP with
hidden_act "silu"), forward and backward, elementwise over the flat (tokens x intermediate) tensors.

As eager HF: silu in fp32, rounded to the input dtype, then the product rounded once. Forward reads gate and up
and writes y (6 B per element in bf16; eager's two ops move 10); backward reads gate, up and dy and writes the
two gradients (10 B; eager's three ops move ~16 and save silu(gate) for the product's backward).
"""
import triton
import triton.language as tl

from .nf4 import round_through, store_rounded

BLOCK = 2048             # elements per program: 8 per thread at 8 warps (16-byte bf16 accesses)
NUM_WARPS = 8
INTERPRET_BLOCK = 65536  # the interpreter's cost is per program


@triton.jit
def swiglu_forward_kernel(g_ptr, u_ptr, y_ptr, n, BF16: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """g, u, y: n elements each, one dtype (BF16: bfloat16; BF16_BITS: y_ptr is an int16 view)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = round_through(g / (1.0 + tl.exp(-g)), g_ptr.dtype.element_ty, BF16)   # F.silu's result, in g's dtype
    store_rounded(y_ptr + offs, a * u, mask, BF16_BITS)


@triton.jit
def swiglu_backward_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BF16: tl.constexpr, BF16_BITS: tl.constexpr,
                           NEED_DG: tl.constexpr, NEED_DU: tl.constexpr, BLOCK: tl.constexpr):
    """du = dy * silu(g) (rounded as the forward used it); dg = dy * u * s * (1 + g * (1 - s)), s = sigmoid(g),
    in fp32 throughout (eager rounds dy * u to the dtype first)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    if NEED_DU:
        store_rounded(du_ptr + offs, dy * round_through(g * s, g_ptr.dtype.element_ty, BF16), mask, BF16_BITS)
    if NEED_DG:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        store_rounded(dg_ptr + offs, dy * u * s * (1.0 + g * (1.0 - s)), mask, BF16_BITS)
