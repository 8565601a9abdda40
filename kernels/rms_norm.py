"""Triton kernels: the RMSNorm of Llama-family models (transformers' LlamaRMSNorm), forward and backward.

y = weight * round_x(x * rstd), rstd = 1 / sqrt(mean(x**2) + eps) in fp32, round_x the cast back to x's dtype
(HF rounds the normalized row before the weight multiplies it). One read of x and one write of y per element
forward (eager HF makes ~7 passes: upcast, square, mean, rsqrt, scale, cast, weight); the backward reads x, dy
and the saved per-row rstd and writes dx, plus per-program fp32 partial sums of dweight when it is needed.

Persistent programs: each walks rows pid, pid + G, ... with the whole row (BLOCK_H >= H) in registers.
"""
import triton
import triton.language as tl

from .nf4 import round_through, store_rounded

MAX_BLOCK_H = 8192   # a row in registers (70B models: H = 8192); wider rows spill: the plain-PyTorch path


def num_warps_for(block_h: int) -> int:
    """8 fp32 elements per thread and array (16-byte bf16 loads); 16 warps at most."""
    return max(4, min(16, block_h // 256))


def register_bound(block_h: int, backward: bool) -> int:
    """Registers per thread the kernel stays within at this row width (the compile test checks it on sm_80 and
    sm_90 with triton 3.6 and 3.9; measured 32 / 63 forward, 80 / 100 / 127 backward at 2048 / 4096 / 8192)."""
    if backward:
        return 96 if block_h <= 2048 else 128
    return 40 if block_h <= 4096 else 64


def resident_programs(block_h: int, backward: bool) -> int:
    """Programs of this kernel one SM holds at once (65536 registers, 2048 threads; at most 8). The persistent
    grid is this many per SM: a program beyond it would wait for a whole row loop to finish before it starts
    (4 per SM had put 3 of 4 backward programs at H = 4096 in a second wave)."""
    threads = 32 * num_warps_for(block_h)
    return max(1, min(8, 2048 // threads, 65536 // (register_bound(block_h, backward) * threads)))


@triton.jit
def rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, H, stride_x, stride_y, eps,
                            X_BF16: tl.constexpr, Y_BF16_BITS: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    """x (n_rows, H) rows at stride_x, w (H,), y (n_rows, H) rows at stride_y, rstd (n_rows,) fp32.
    With Y_BF16_BITS, y_ptr is an int16 view of bf16 output rounded here (the interpreter truncates)."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):   # int64 row offsets
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        y = w * round_through(x * rstd, x_ptr.dtype.element_ty, X_BF16)
        store_rounded(y_ptr + row * stride_y + cols, y, mask, Y_BF16_BITS)
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def rms_norm_backward_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, H, stride_x, stride_dy,
                             stride_dx, X_BF16: tl.constexpr, DX_BF16_BITS: tl.constexpr,
                             NEED_DW: tl.constexpr, BLOCK_H: tl.constexpr):
    """dn = dy * w; dx = rstd * (dn - xhat * mean(dn * xhat)), xhat = x * rstd (fp32, unrounded, as autograd
    differentiates through the cast); dw_part[pid] = sum over this program's rows of dy * round_x(xhat)."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):   # int64 row offsets
        # w re-read per row (an L1 hit): held across the loop it made BLOCK_H = 8192 spill at 16 warps
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dn = dy * w
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / H))
        store_rounded(dx_ptr + row * stride_dx + cols, dx, mask, DX_BF16_BITS)
        if NEED_DW:
            dw += dy * round_through(xhat, x_ptr.dtype.element_ty, X_BF16)
    if NEED_DW:
        tl.store(dw_part_ptr + tl.program_id(0).to(tl.int64) * H + cols, dw, mask=mask)
