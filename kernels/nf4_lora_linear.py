"""Triton kernels: NF4 dequant-GEMM with the LoRA branch fused in (forward and input gradient).

y  = x @ dequant(W).T + xa @ B.T (+ bias),        xa = (scaling / (1 - p)) * (keep * x) @ A.T   (pre-pass)
dx = dy @ dequant(W) + keep * (g @ A),            g  = (scaling / (1 - p)) * dy @ B             (host GEMM)

W is NF4 in bitsandbytes' layout (see qlora_kernels.reference.nf4): tiles are dequantized in registers and
never written to global memory (the forward feeds them to the MMA from registers, the input gradient stages
them in shared memory). The dropout keep-mask of element (m, k) of the 2-D x is stream
(m * K + k) % 4 of `tl.rand4x(seed, (m * K + k) // 4)` (Philox) compared with p (`keep_mask`), regenerated
wherever it is needed (forward pre-pass, dx epilogue, dA) and never stored.

COMPUTE_F32 (host: interpreter, or fp32 x) makes every tl.dot operand fp32 with IEEE precision: the
interpreter's bf16 arithmetic is broken, and fp32 inputs must not silently drop to TF32. Otherwise the
operands are cast to x's dtype (bf16 / fp16 tensor cores) and accumulated in fp32.
"""
import triton
import triton.language as tl

from .nf4 import nf4_byte_values, round_to_bf16_bits

# --- configs ---------------------------------------------------------------------------------------
# Compiled for sm_80 / sm_90 in tests/test_nf4_lora_linear.py (registers, spills, shared, tensor cores).
# The forward computes y.T tiles = W tile @ x tile.T (see nf4_lora_fwd_kernel): BM rows of x (tokens) by BN
# weight rows. The dequantization is ALU work per weight element, amortized over the BM tokens a weight
# tile feeds, so BM = 256 halves it per FLOP against BM = 128. Static counts of the K-loop on sm_90 (SASS,
# 8 warps, 4 issue slots per cycle; benchmarks/NOTES.md): 256 x 128 x 32 issues 582 cycles (PRMT lookup) /
# 806 (select tree) per 615 cycles of wgmma. BK = 64 at 256 x 128 spills with the select tree.
# Forward, M > 16 (training): 8 warps = two warpgroups, each wgmma m64 over 64 weight rows.
FWD_CONFIGS = [
    dict(BM=256, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BM=128, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=4),   # more programs for M ~ 512
]
# Forward, M <= 16 (decode): 16 tokens, ALU-bound on the dequantization. BN = 64: one wgmma m64 per
# warpgroup (~0.42 issued warp-instructions per weight); BN = 32: mma.sync (~0.8 per weight) but twice the
# programs, which matters when N / 64 leaves SMs idle (N = 4096: 64 programs on 132 SMs).
FWD_SMALL_M_CONFIGS = [
    dict(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
    dict(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
]
# Input gradient: output tile (BM, BK) over in_features, reduction over out_features in steps of BN, computed
# transposed with the dequantized weight as wgmma's register operand (see nf4_lora_dx_kernel). sm_90, triton
# 3.9, PRMT: 256 x 64 x 64 at 8 warps: 255 registers, 349 instructions per K-step for 1 M MACs, the wgmmas
# pipelined; 128 x 64 x 64: 193 registers, 325 per half the MACs (more programs when M is small). 128 x 128 x
# 32 made ptxas serialize the wgmmas (the LoRA dot), 256 x 128 x 32 spilled 1.8 KB, 128 x 64 x 64 at 4 warps 76 B.
DX_CONFIGS = [
    dict(BM=256, BK=64, BN=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BM=128, BK=64, BN=64, GROUP_M=8, num_warps=8, num_stages=3),
]
# Interpreter: one big tile (cost follows the number of programs; multi-config autotune cannot run there).
INTERPRET_FWD = dict(BM=128, BN=128, BK=128, GROUP_M=1, num_warps=4, num_stages=1)
INTERPRET_FWD_SMALL_M = dict(BM=16, BN=128, BK=128, GROUP_M=1, num_warps=4, num_stages=1)
INTERPRET_DX = dict(BM=128, BK=128, BN=128, GROUP_M=1, num_warps=4, num_stages=1)
# LoRA down-projection pre-pass (M x r output, r padded to BR <= 256 so x is read once).
LORA_DOWN_BM, LORA_DOWN_BK = 64, 64
INTERPRET_LORA_DOWN_BM, INTERPRET_LORA_DOWN_BK = 128, 128
INTERPRET_LORA_DOWN_PROGRAMS = 2   # the interpreter splits K for one-tile M (tests cover both launch forms)
LORA_DOWN_REDUCE_BLOCK = 1024
DX_LORA_BR, INTERPRET_DX_LORA_BR = 32, 128    # r chunk of the dx LoRA dot (r padded to >= 16)
DROPOUT_BLOCK = 4096
INTERPRET_DROPOUT_BLOCK = 65536


def lora_down_num_warps(br):
    return 4 if br <= 32 else 8   # BR = 64 at 4 warps spills (philox + x + A tiles)


def lora_down_block_k(br):
    """BR = 256 with BK = 64 spills under triton 3.6 (any warps); at BK = 32 (two wgmmas a step) ptxas serialized
    every wgmma of the kernel (C7515, the dropped x tile feeding both); one k16 wgmma a step is pipelined."""
    return LORA_DOWN_BK if br <= 64 else 16


def lora_down_block_m(M):
    """16 rows for decode-sized M (the dropout's Philox runs on every row of the tile, valid or not)."""
    return 16 if M <= 16 else LORA_DOWN_BM


@triton.jit
def _swizzle(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Grouped program order (GROUP_M row-tiles share each column of weight tiles in L2)."""
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, rows, col0, n_rows, K,
             ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, PRMT: tl.constexpr):
    """fp32 W[rows, col0 : col0 + COLS] of an (n_rows, K) NF4 weight with K % BLOCKSIZE == 0; absmax holds the
    fp32 block scales (the launcher decodes double quant once per call: nblocks * 4 bytes).

    COLS <= BLOCKSIZE: one scale per row; otherwise COLS // BLOCKSIZE scales per row. Rows >= n_rows and
    columns >= K come back finite (callers mask the other operand or the store). PRMT: the code lookup of
    nf4_byte_values (inline PTX byte permutes, CUDA only) instead of its select tree.
    """
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    if COLS <= BLOCKSIZE:
        half = tl.arange(0, COLS // 2)
        b = tl.load(packed_ptr + rows64[:, None] * (K // 2) + (col0 // 2 + half)[None, :],
                    mask=rmask[:, None], other=0)
        scale = tl.load(absmax_ptr + (rows64 * K + col0) // BLOCKSIZE, mask=rmask, other=0.0)[:, None]
        hi, lo = nf4_byte_values(b, PRMT)
        hi *= scale
        lo *= scale
        return tl.interleave(hi, lo)
    else:
        G: tl.constexpr = COLS // BLOCKSIZE
        g = tl.arange(0, G)
        j = tl.arange(0, BLOCKSIZE // 2)
        gmask = rmask[:, None] & ((col0 + g * BLOCKSIZE) < K)[None, :]
        byte = rows64[:, None, None] * (K // 2) + (col0 // 2 + g * (BLOCKSIZE // 2))[None, :, None] + j[None, None, :]
        b = tl.load(packed_ptr + byte, mask=gmask[:, :, None], other=0)
        block = (rows64 * K + col0)[:, None] // BLOCKSIZE + g[None, :]
        scale = tl.load(absmax_ptr + block, mask=gmask, other=0.0)[:, :, None]
        hi, lo = nf4_byte_values(b, PRMT)
        hi *= scale
        lo *= scale
        return tl.reshape(tl.interleave(hi, lo), (ROWS, COLS))


@triton.jit
def keep_mask(seed, quad, p):
    """Dropout keep-mask of 4 * quad.shape consecutive elements (last axis): element 4 * q + i uses stream i
    of Philox at offset q (one Philox call per 4 elements). Offsets: q = (m * K + k) // 4 (K % 4 == 0)."""
    r0, r1, r2, r3 = tl.rand4x(seed, quad)
    return tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3)) >= p


@triton.jit
def _store_out(out_ptr, offs, mask, acc, OUT_BF16_BITS: tl.constexpr):
    if OUT_BF16_BITS:   # interpreter: out_ptr is an int16 view of bf16, round to nearest even here
        tl.store(out_ptr + offs, round_to_bf16_bits(acc), mask=mask)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nf4_lora_fwd_kernel(x_ptr, packed_ptr, absmax_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
                        M, N, K, R, stride_xm, stride_xk, stride_bn, stride_br,
                        BLOCKSIZE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                        COMPUTE_F32: tl.constexpr, OUT_BF16_BITS: tl.constexpr, PRMT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, N) = x @ dequant(W).T + xa @ B.T + bias; xa (M, R) contiguous, y contiguous.

    Computed transposed, y.T tile (BN, BM) = W tile (BN, BK) @ x tile.T: the dequantized weight is the
    left operand, which wgmma (sm_90) and mma.sync read from registers, so it never goes through shared
    memory; x tiles stream through shared memory. The LoRA term runs last, as K-steps of width BK over r,
    into the same accumulator.
    """
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BN, BM), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=mmask[:, None] & (rk < K)[None, :], other=0.0)
        w = nf4_tile(packed_ptr, absmax_ptr, rn, k0, N, K,
                     BN, BK, BLOCKSIZE, PRMT)
        if COMPUTE_F32:
            acc = tl.dot(w, tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.trans(x), acc)
    # the LoRA term after the main loop, not before: a main loop entered with an accumulator that the LoRA loop
    # left made ptxas serialize every wgmma (C7515: a wait for completion after each one, no overlap of the
    # dequantization with the tensor cores); started from zeros, one wgmma stays in flight
    if HAS_LORA:
        for r0 in range(0, R, BK):
            rr = r0 + tl.arange(0, BK)
            rmask = rr < R
            xa = tl.load(xa_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=mmask[:, None] & rmask[None, :],
                         other=0.0)
            bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                         mask=(rn < N)[:, None] & rmask[None, :], other=0.0)
            if COMPUTE_F32:
                acc = tl.dot(bt.to(tl.float32), tl.trans(xa.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(bt.to(x_ptr.dtype.element_ty), tl.trans(xa.to(x_ptr.dtype.element_ty)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    # back to (BM, BN) before the store, so that a thread writes contiguous runs of a row of y
    _store_out(y_ptr, rm.to(tl.int64)[:, None] * N + rn[None, :], mmask[:, None] & (rn < N)[None, :],
               tl.trans(acc), OUT_BF16_BITS)


@triton.jit
def nf4_lora_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, g_ptr, a_ptr, seed_ptr, dx_ptr,
                       M, N, K, R, stride_dym, stride_dyn, stride_ar, stride_ak, p,
                       BLOCKSIZE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       COMPUTE_F32: tl.constexpr, OUT_BF16_BITS: tl.constexpr, PRMT: tl.constexpr,
                       BR: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """dx (M, K) = dy @ dequant(W) + keep * (g @ A); g (M, R) contiguous, dx contiguous.

    The weight is read as (BN, BK) tiles along out_features: the same dequantization, other orientation.
    Computed transposed, dx.T tile (BK, BM) = W.T tile (BK, BN) @ dy tile.T, so that the dequantized weight is
    wgmma's register operand as in the forward: through shared memory (one buffer, rewritten every step) each
    wgmma had to finish before the next tile was stored, and none overlapped the dequantization. The LoRA term
    last, in its own accumulator (the dropout mask applies to it alone): before the main loop, the
    accumulator it left made ptxas serialize every wgmma (C7515).
    """
    pid_m, pid_k = _swizzle(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    mmask = rm < M
    kmask = rk < K
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BK, BM), tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(dy_rows + rn[None, :] * stride_dyn, mask=mmask[:, None] & (rn < N)[None, :], other=0.0)
        w = nf4_tile(packed_ptr, absmax_ptr, rn, pid_k * BK, N, K,
                     BN, BK, BLOCKSIZE, PRMT)
        if COMPUTE_F32:
            acc = tl.dot(tl.trans(w), tl.trans(dy.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(w.to(dy_ptr.dtype.element_ty)), tl.trans(dy), acc)
    if HAS_LORA:
        lora = tl.zeros((BK, BM), tl.float32)
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            rmask = rr < R
            gt = tl.load(g_ptr + rm.to(tl.int64)[None, :] * R + rr[:, None], mask=rmask[:, None] & mmask[None, :],
                         other=0.0)
            at = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                         mask=kmask[:, None] & rmask[None, :], other=0.0)
            if COMPUTE_F32:
                lora = tl.dot(at.to(tl.float32), gt.to(tl.float32), lora, input_precision="ieee")
            else:
                lora = tl.dot(at.to(dy_ptr.dtype.element_ty), gt.to(dy_ptr.dtype.element_ty), lora)
        if HAS_DROPOUT:
            quad = rm[:, None] * (K // 4) + (pid_k * (BK // 4) + tl.arange(0, BK // 4))[None, :]
            lora = tl.where(tl.trans(keep_mask(tl.load(seed_ptr), quad, p)), lora, 0.0)
        acc += lora
    # back to (BM, BK) before the store, so that a thread writes contiguous runs of a row of dx
    _store_out(dx_ptr, rm.to(tl.int64)[:, None] * K + rk[None, :], mmask[:, None] & kmask[None, :], tl.trans(acc),
               OUT_BF16_BITS)


@triton.jit
def lora_down_kernel(x_ptr, a_ptr, seed_ptr, xa_ptr, part_ptr, M, K, R, k_split, stride_xm, stride_xk, stride_ar,
                     stride_ak, scale, p, HAS_DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr,
                     SPLIT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """xa (M, R) = scale * (keep * x) @ A.T (fp32 accumulate, stored in xa's dtype), scale = scaling / (1 - p).
    SPLIT: program (i, j, s) sums columns [s * k_split, (s + 1) * k_split) only, unscaled, into the fp32
    partials part (splits, M, R); lora_down_reduce_kernel adds them in order (deterministic, no atomics)."""
    k_lo = tl.program_id(2) * k_split if SPLIT else 0
    k_hi = tl.minimum(K, k_lo + k_split) if SPLIT else K
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    mmask = rm < M
    rmask = rr < R
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, BR), tl.float32)
    for k0 in range(k_lo, k_hi, BK):   # k_split is a multiple of BK: only the last split has a partial block
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=mmask[:, None] & (rk < K)[None, :], other=0.0)
        if HAS_DROPOUT:
            quad = rm[:, None] * (K // 4) + (k0 // 4 + tl.arange(0, BK // 4))[None, :]
            x = tl.where(keep_mask(seed, quad, p), x.to(tl.float32), 0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                    mask=rmask[None, :] & (rk < K)[:, None], other=0.0)
        if COMPUTE_F32:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(x_ptr.dtype.element_ty), a.to(x_ptr.dtype.element_ty), acc)
    out = rm.to(tl.int64)[:, None] * R + rr[None, :]
    if SPLIT:
        tl.store(part_ptr + tl.program_id(2).to(tl.int64) * M * R + out, acc, mask=mmask[:, None] & rmask[None, :])
    else:
        tl.store(xa_ptr + out, (acc * scale).to(xa_ptr.dtype.element_ty), mask=mmask[:, None] & rmask[None, :])


@triton.jit
def lora_down_reduce_kernel(part_ptr, xa_ptr, n, splits, scale, BLOCK: tl.constexpr):
    """xa (n = M * R values) = scale * the sum of the splits' fp32 partials (splits, n), in split order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * n + offs, mask=mask, other=0.0)
    tl.store(xa_ptr + offs, (acc * scale).to(xa_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dropout_keep_kernel(x_ptr, seed_ptr, out_ptr, n, K, p, BLOCK: tl.constexpr):
    """out = where(keep, x, 0) for a contiguous (n // K, K) x: the unscaled dropped input, same mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # quad = flat index // 4 == m * (K // 4) + k // 4 as in the GEMM kernels (int32 there too)
    quad = (tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
    keep = keep_mask(tl.load(seed_ptr), quad, p)
    tl.store(out_ptr + offs, tl.where(keep, x, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
