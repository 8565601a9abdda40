"""NF4 linear with a LoRA adapter: `y = x @ dequant(W).T + scaling * (dropout(x) @ A.T) @ B.T + bias`.

Paths:
- "triton" (CUDA, or CPU under TRITON_INTERPRET=1): the fused kernels of qlora_kernels.kernels.nf4_lora_linear;
  the NF4 weight is dequantized tile by tile in registers, forward and backward, never into memory.
- "torch" (CPU with the extension or the reference, and the fallback when in_features % blocksize != 0):
  dequantize (extension / reference / Triton), then torch matmuls; the dense weight is transient, recomputed
  in backward, never saved.

Both are wrapped in torch.library custom ops (`qlora_kernels::nf4_lora_linear_fwd` / `_bwd`) with fake
implementations and a registered autograd formula, so torch.compile(fullgraph=True) traces them.
Saved for backward: x (only when lora_A needs a gradient) and xa = scaling * dropout(x) @ A.T (M x r; the
compute dtype on CUDA, fp32 elsewhere). The kernels get fp32 block scales (double quant decoded per call).
Dropout: a seed is drawn from torch's generator of x's device (no host sync); the keep-mask is regenerated
from it (Philox in the kernels, a seeded torch.Generator on the CPU path), never stored.
"""
import functools
import os
import warnings
from typing import Optional

import torch
import triton

from qlora_kernels import _backend
from qlora_kernels.kernels import nf4_lora_linear as kernels
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.ops.nf4 import LOOKUPS, dequantize_nf4, prmt_lookup  # noqa: F401 - LOOKUPS: tests, bench
from qlora_kernels.ops.nf4 import _code_table, block_scales

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_M = 16
DECODES = ("auto", "triton", "cuda")
_warned_fallback = False


def nf4_lora_linear(x: torch.Tensor, qweight: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float = 1.0, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    training: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """`x @ dequant(qweight).T + scaling * (dropout(x) @ lora_A.T) @ lora_B.T (+ bias)`, PEFT's LoRA formula.

    x (..., in) float32/float16/bfloat16; qweight an NF4Weight (out, in); lora_A (r, in), lora_B (out, r),
    bias (out,) in fp32 or the compute dtype. Output in x's dtype. Dropout (p = dropout_p, only when
    `training`) applies to the LoRA branch's input; its seed comes from torch's generator of x's device.
    Gradients flow to x, lora_A, lora_B and bias. `backend` overrides the device's default (tests).
    """
    _check(x, qweight, lora_A, lora_B, bias, dropout_p)
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64) if p > 0 else None
    scales, absmax2, code2, offset = qweight.scale_tensors()
    x2d = x.reshape(-1, qweight.shape[1])
    bias = None if bias is None else bias.contiguous()   # the kernels' epilogue reads it at unit stride
    args = (x2d, qweight.packed, scales, absmax2, code2, offset, lora_A, lora_B, bias, seed, qweight.shape[0],
            qweight.blocksize, qweight.nested_blocksize, float(scaling), p, backend or "")
    if _backend.needs_autograd(x2d, lora_A, lora_B, bias):
        y = _NF4LoRALinear.apply(*args)
    else:
        y = _backend.call_op("nf4_lora_linear_fwd", *args)[0]
    return y.view(*x.shape[:-1], qweight.shape[0])


def _check(x, qweight, lora_A, lora_B, bias, dropout_p):
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight, got {type(qweight).__name__}")
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    out_features, in_features = qweight.shape
    r = lora_A.shape[0] if lora_A.dim() == 2 else -1
    shapes = (f"x {tuple(x.shape)}, weight {tuple(qweight.shape)}, lora_A {tuple(lora_A.shape)}, "
              f"lora_B {tuple(lora_B.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if (x.dim() < 1 or x.shape[-1] != in_features or lora_A.dim() != 2 or r < 1 or lora_A.shape[1] != in_features
            or tuple(lora_B.shape) != (out_features, r) or (bias is not None and tuple(bias.shape) != (out_features,))):
        raise ValueError(f"nf4_lora_linear shape mismatch: expected x (..., in), weight (out, in), lora_A (r, in), "
                         f"lora_B (out, r), bias (out,) or None; got {shapes}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    _backend.check_same_device(x=x, qweight=qweight.packed, lora_A=lora_A, lora_B=lora_B, bias=bias)


def _plan(x2d, backend, blocksize, warn=False):
    """(path, backend): "triton" = the fused kernels, "torch" = dequantize + matmul with `backend`'s dequant.
    Runs inside the custom ops (eagerly, also under torch.compile)."""
    global _warned_fallback
    backend = _backend.resolve_backend(x2d, backend or None)
    if backend == "cuda_ext":
        backend = "triton"
    if backend != "triton":
        return "torch", backend
    in_features = x2d.shape[1]
    if in_features % blocksize == 0:
        return "triton", backend
    if warn and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"nf4_lora_linear: in_features {in_features} is not a multiple of blocksize {blocksize}; "
                      "falling back to dequantize + matmul (a transient dense weight per call)", RuntimeWarning,
                      stacklevel=2)
    return "torch", backend


def _weight(packed, scales, absmax2, code2, offset, shape, blocksize, nested_blocksize, dtype):
    if absmax2 is None:
        return NF4Weight(packed, shape, dtype, blocksize, scales)
    return NF4Weight(packed, shape, dtype, blocksize, qabsmax=scales, absmax2=absmax2, code2=code2, offset=offset,
                     nested_blocksize=nested_blocksize)


def dropout_keep_mask(x2d: torch.Tensor, seed: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    """The boolean keep-mask (M, K) the given path uses for seed `seed` (tests and the torch path)."""
    if backend == "triton":
        ones = torch.ones(x2d.shape, dtype=torch.float32, device=x2d.device)
        return _dropped_triton(ones, seed, p) != 0
    gen = torch.Generator(device="cpu").manual_seed(int(seed.item()))
    return (torch.rand(x2d.shape, generator=gen) >= p).to(x2d.device)


@_backend.on_input_device
def _dropped_triton(x2d, seed, p):
    """where(keep, x, 0), same dtype as x (a copy of x's values: exact under the interpreter too)."""
    x = x2d.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        block = kernels.INTERPRET_DROPOUT_BLOCK if _backend.interpreting() else kernels.DROPOUT_BLOCK
        kernels.dropout_keep_kernel[(_backend.cdiv(n, block),)](x, seed, out, n, x.shape[1], p, BLOCK=block)
    return out


# --- Triton path ---------------------------------------------------------------------------------------

_KERNELS = {"fwd": ("nf4_lora_fwd_kernel", "FWD_CONFIGS"), "fwd_small": ("nf4_lora_fwd_kernel", "FWD_SMALL_M_CONFIGS"),
            "dx": ("nf4_lora_dx_kernel", "DX_CONFIGS")}


@functools.lru_cache(maxsize=None)
def _autotuned(name):
    kernel, configs = _KERNELS[name]
    cfgs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in getattr(kernels, configs)]
    # keyed on the weight shape, r and the lookup: training calls repeat them; M varies little within a run
    return triton.autotune(cfgs, key=["N", "K", "R", "PRMT"])(getattr(kernels, kernel))


def _launch(name, interpret_config, grid_fn, args, constexprs):
    """Interpreter: its one config. GPU: autotuned over the config list (QLORA_KERNELS_AUTOTUNE=0: the first
    config, no tuning; quick GPU test runs)."""
    kernel, configs = _KERNELS[name]
    if _backend.interpreting() or os.environ.get("QLORA_KERNELS_AUTOTUNE") == "0":
        cfg = dict(interpret_config if _backend.interpreting() else getattr(kernels, configs)[0])
        return getattr(kernels, kernel)[grid_fn(cfg)](*args, **constexprs, **cfg)
    return _autotuned(name)[grid_fn](*args, **constexprs)


def _flags(x, blocksize):
    interp = _backend.interpreting()
    # the kernels get fp32 block scales (double quant decoded once per call by nf4_block_scales_kernel: nblocks *
    # 4 bytes, 1/32 of a bf16 weight copy); per-row gathers of the nested code in the K-loop cost more than they save
    return dict(BLOCKSIZE=blocksize, COMPUTE_F32=interp or x.dtype == torch.float32,
                OUT_BF16_BITS=interp and x.dtype == torch.bfloat16, PRMT=prmt_lookup(x))


def _xa_dtype(x2d):
    """xa (and g) are stored in the compute dtype where tensor cores read them (CUDA half), else fp32."""
    return x2d.dtype if x2d.device.type == "cuda" and x2d.dtype != torch.float32 else torch.float32


def _r_block(r):
    return max(16, _backend.next_power_of_2(r))


def cuda_decode(x2d, blocksize, nested):
    """Whether a one-token forward runs the extension's CUDA kernel (csrc/nf4_lora_linear_cuda.cu: ~5
    instructions per weight against ~13 / ~21 for the Triton decode tile with the PRMT / select lookup).
    QLORA_KERNELS_DECODE=auto (the default) takes it where the extension was built with CUDA, on a device the
    build has code for (its QLORA_KERNELS_CUDA_ARCHS): the H100 run of 2026-11-27 measured it 1.1-1.5x faster
    than the select-tree Triton tile (1.5-1.8x replayed from a CUDA graph; 1.2-1.6x than the PRMT tile).
    "cuda" insists (an error names a missing CUDA build), "triton" never takes it. It needs in_features % 32 ==
    0, a multiple of the power-of-two block size (the kernel indexes one row's scales), and a power-of-two
    nested block size; other shapes keep the Triton kernel."""
    decode = os.environ.get("QLORA_KERNELS_DECODE", "auto")
    if decode not in DECODES:
        raise ValueError(f"QLORA_KERNELS_DECODE={decode!r}: expected one of {DECODES}")
    if decode == "triton" or not x2d.is_cuda or x2d.shape[0] != 1:
        return False
    if not getattr(_backend.native(), "with_cuda", False):
        if decode == "auto":
            return False
        raise RuntimeError("QLORA_KERNELS_DECODE=cuda needs qlora_kernels._C built with CUDA (nvcc at install time)")
    if decode == "auto" and not _backend.native_has_image("nf4_lora_gemv_cuda_has_image", x2d.device.index):
        # e.g. a card newer than the build's archs
        return False
    power_of_two = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    return (x2d.shape[1] % 32 == 0 and blocksize >= 32 and power_of_two(blocksize)
            and x2d.shape[1] % blocksize == 0 and (nested is None or power_of_two(nested)))


def _fwd_cuda_decode(x2d, packed, scales, absmax2, code2, offset, B, bias, xa, y, blocksize, nested):
    x1 = x2d.contiguous()
    if x1.data_ptr() % 16:   # a view at an odd offset: the kernel reads x in 16-byte vectors
        x1 = x1.clone()
    _backend.launch_native("nf4_lora_gemv_cuda", x1.device, x1, packed, scales, absmax2, code2, offset,
                           _code_table(x1.device), xa, B, None if bias is None else bias.float().contiguous(), y,
                           blocksize, nested)


def lora_down_splits(tiles, k_blocks, programs):
    """(splits, BK-blocks per split) of the pre-pass's K loop so that tiles x splits reaches `programs`: the
    one-token pre-pass was one program walking all of K (64 dependent steps at K = 4096, ~0.1 ms, 10x the decode
    kernel it feeds); at training M the tiles alone fill the GPU and it stays one split."""
    per_split = _backend.cdiv(k_blocks, min(k_blocks, max(1, _backend.cdiv(programs, tiles))))
    return _backend.cdiv(k_blocks, per_split), per_split


def _lora_down(x2d, A, seed, xa, scale, p, compute_f32):
    """xa (M, r) = scale * dropout(x) @ A.T: (M / BM) x (r / BR) tiles, K split across programs when the tiles
    alone are too few for the GPU (decode), the partials then added by a second kernel."""
    (M, K), r = x2d.shape, A.shape[0]
    interp = _backend.interpreting()
    br = min(_r_block(r), 256)
    bm, bk = ((kernels.INTERPRET_LORA_DOWN_BM, kernels.INTERPRET_LORA_DOWN_BK) if interp
              else (kernels.lora_down_block_m(M), kernels.lora_down_block_k(br)))
    tiles = (_backend.cdiv(M, bm), _backend.cdiv(r, br))
    programs = kernels.INTERPRET_LORA_DOWN_PROGRAMS if interp else 2 * _backend.num_sms(x2d.device)
    splits, per_split = lora_down_splits(tiles[0] * tiles[1], _backend.cdiv(K, bk), programs)
    part = torch.empty((splits, M, r) if splits > 1 else (0,), dtype=torch.float32, device=x2d.device)
    kernels.lora_down_kernel[(*tiles, splits)](
        x2d, A, seed, xa, part, M, K, r, per_split * bk, x2d.stride(0), x2d.stride(1), A.stride(0), A.stride(1),
        scale, p, HAS_DROPOUT=p > 0, COMPUTE_F32=compute_f32, SPLIT=splits > 1, BM=bm, BK=bk, BR=br,
        num_warps=kernels.lora_down_num_warps(br))
    if splits > 1:
        block = kernels.LORA_DOWN_REDUCE_BLOCK
        kernels.lora_down_reduce_kernel[(_backend.cdiv(M * r, block),)](part, xa, M * r, splits, scale, BLOCK=block)


def _fwd_triton(x2d, packed, scales, absmax2, code2, offset, A, B, bias, seed, N, blocksize, nested, scaling, p):
    if x2d.stride(1) != 1:   # the kernels' column offsets (col * stride) are int32: a transposed x could overflow
        x2d = x2d.contiguous()
    M, K = x2d.shape
    r = A.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    xa = torch.empty((M, r), dtype=_xa_dtype(x2d), device=x2d.device)
    if M == 0:
        return y, xa
    flags = _flags(x2d, blocksize)
    lora_dt = torch.float32 if flags["COMPUTE_F32"] else x2d.dtype
    A, B = A.to(lora_dt), B.to(lora_dt)       # tiny; the kernels then read tensor-core operands directly
    # the kernel reads the weight in 16-byte vectors: storage at an odd offset keeps the Triton tile
    decode = cuda_decode(x2d, blocksize, nested if absmax2 is not None else None) and packed.data_ptr() % 16 == 0
    absmax = None if decode else block_scales(scales, absmax2, code2, offset, nested)
    dummy = scales
    _lora_down(x2d, A, seed if seed is not None else dummy, xa, scaling / (1.0 - p), p, flags["COMPUTE_F32"])
    if decode:
        _fwd_cuda_decode(x2d, packed, scales, absmax2, code2, offset, B, bias, xa, y, blocksize, nested)
        return y, xa
    small = M <= SMALL_M
    args = (x2d, packed, absmax, xa, B, bias if bias is not None else dummy,
            _backend.interpreter_out(y), M, N, K, r, x2d.stride(0), x2d.stride(1), B.stride(0), B.stride(1))
    grid = lambda c: (_backend.cdiv(M, c["BM"]) * _backend.cdiv(N, c["BN"]),)  # noqa: E731
    _launch("fwd_small" if small else "fwd", kernels.INTERPRET_FWD_SMALL_M if small else kernels.INTERPRET_FWD,
            grid, args, dict(flags, HAS_LORA=True, HAS_BIAS=bias is not None))
    return y, xa


def _bwd_triton(dy, x2d, packed, scales, absmax2, code2, offset, A, B, xa, seed, blocksize, nested, scaling, p,
                need_dx, need_dA):
    if dy.stride(1) != 1:    # as x in the forward: int32 column offsets
        dy = dy.contiguous()
    M, N = dy.shape
    K = A.shape[1]
    r = A.shape[0]
    cd = dy.dtype
    s = scaling / (1.0 - p)
    g = ((dy @ B.to(cd)).float() * s).to(_xa_dtype(dy)) if (need_dx or need_dA) else None
    dx = dA = None
    if need_dx:
        dx = torch.empty((M, K), dtype=cd, device=dy.device)
        if M:
            flags = _flags(dy, blocksize)
            br = kernels.INTERPRET_DX_LORA_BR if _backend.interpreting() else kernels.DX_LORA_BR
            Al = A.to(torch.float32 if flags["COMPUTE_F32"] else cd)
            absmax = block_scales(scales, absmax2, code2, offset, nested)
            args = (dy, packed, absmax, g, Al, seed if seed is not None else absmax, _backend.interpreter_out(dx),
                    M, N, K, r, dy.stride(0), dy.stride(1), Al.stride(0), Al.stride(1), p)
            grid = lambda c: (_backend.cdiv(M, c["BM"]) * _backend.cdiv(K, c["BK"]),)  # noqa: E731
            _launch("dx", kernels.INTERPRET_DX, grid, args,
                    dict(flags, HAS_LORA=True, HAS_DROPOUT=p > 0, BR=min(_r_block(r), br)))
    if need_dA:
        xm = _dropped_triton(x2d, seed, p) if p > 0 else x2d
        dA = (g.t().to(cd) @ xm).to(A.dtype)
    return dx, dA


# --- torch path (CPU, and the fallback) -------------------------------------------------------------------

def _dense(packed, scales, absmax2, code2, offset, N, K, blocksize, nested, dtype, backend):
    qw = _weight(packed, scales, absmax2, code2, offset, (N, K), blocksize, nested, dtype)
    return dequantize_nf4(qw, backend=backend)


def _fwd_torch(x2d, packed, scales, absmax2, code2, offset, A, B, bias, seed, N, blocksize, nested, scaling, p,
               backend):
    K = x2d.shape[1]
    w = _dense(packed, scales, absmax2, code2, offset, N, K, blocksize, nested, x2d.dtype, backend)
    y = (x2d @ w.t()).float()
    xm = x2d if p == 0 else x2d * dropout_keep_mask(x2d, seed, p, backend)
    xa = (xm.float() @ A.float().t()) * (scaling / (1.0 - p))
    y = y + xa @ B.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2d.dtype), xa.to(_xa_dtype(x2d))


def _bwd_torch(dy, x2d, packed, scales, absmax2, code2, offset, A, B, xa, seed, blocksize, nested, scaling, p,
               backend, need_dx, need_dA):
    N, (r, K) = dy.shape[1], A.shape
    s = scaling / (1.0 - p)
    keep = dropout_keep_mask(dy.new_empty((dy.shape[0], K)), seed, p, backend) if p > 0 and (need_dx or need_dA) \
        else None
    g = (dy.float() @ B.float()) * s if (need_dx or need_dA) else None
    dx = dA = None
    if need_dx:
        w = _dense(packed, scales, absmax2, code2, offset, N, K, blocksize, nested, dy.dtype, backend)
        lora = g @ A.float()
        if keep is not None:
            lora = lora * keep
        dx = ((dy @ w).float() + lora).to(dy.dtype)
    if need_dA:
        xm = x2d.float() if keep is None else x2d.float() * keep
        dA = (g.t() @ xm).to(A.dtype)
    return dx, dA


# --- custom ops ------------------------------------------------------------------------------------------

@_backend.custom_op("nf4_lora_linear_fwd", mutates_args=())
@_backend.on_input_device
def _fwd_op(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, absmax2: Optional[torch.Tensor],
            code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], lora_A: torch.Tensor,
            lora_B: torch.Tensor, bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], out_features: int,
            blocksize: int, nested_blocksize: int, scaling: float, dropout_p: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    path, backend = _plan(x2d, backend, blocksize, warn=True)
    args = (x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, bias, seed, out_features, blocksize,
            nested_blocksize, scaling, dropout_p)
    if path == "triton":
        return _fwd_triton(*args)
    return _fwd_torch(*args, backend)


@_fwd_op.register_fake
def _(x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, bias, seed, out_features, blocksize,
      nested_blocksize, scaling, dropout_p, backend):
    return (x2d.new_empty((x2d.shape[0], out_features)),
            x2d.new_empty((x2d.shape[0], lora_A.shape[0]), dtype=_xa_dtype(x2d)))


@_backend.custom_op("nf4_lora_linear_bwd", mutates_args=())
@_backend.on_input_device
def _bwd_op(dy: torch.Tensor, x2d: Optional[torch.Tensor], packed: torch.Tensor, scales: torch.Tensor,
            absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
            lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, seed: Optional[torch.Tensor],
            blocksize: int, nested_blocksize: int, scaling: float, dropout_p: float, backend: str,
            need_dx: bool, need_dA: bool, need_dB: bool, need_dbias: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    path, backend = _plan(dy.new_empty((0, lora_A.shape[1])), backend, blocksize)
    args = (dy, x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, xa, seed, blocksize, nested_blocksize,
            scaling, dropout_p)
    if path == "triton":
        dx, dA = _bwd_triton(*args, need_dx, need_dA)
    else:
        dx, dA = _bwd_torch(*args, backend, need_dx, need_dA)
    empty = lambda: dy.new_empty((0,))  # noqa: E731  (distinct tensors: outputs may not alias)
    dB = empty()
    if need_dB:
        cd = dy.dtype
        dB = (dy.t() @ xa.to(cd) if path == "triton" else dy.float().t() @ xa.float()).to(lora_B.dtype)
    dbias = dy.sum(0, dtype=torch.float32) if need_dbias else empty()
    return (dx if dx is not None else empty(), dA if dA is not None else empty(), dB, dbias)


@_bwd_op.register_fake
def _(dy, x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, xa, seed, blocksize, nested_blocksize,
      scaling, dropout_p, backend, need_dx, need_dA, need_dB, need_dbias):
    M, N = dy.shape
    K = lora_A.shape[1]
    return (dy.new_empty((M, K)) if need_dx else dy.new_empty((0,)),
            lora_A.new_empty(lora_A.shape) if need_dA else dy.new_empty((0,)),
            lora_B.new_empty(lora_B.shape) if need_dB else dy.new_empty((0,)),
            dy.new_empty((N,), dtype=torch.float32) if need_dbias else dy.new_empty((0,)))


class _NF4LoRALinear(torch.autograd.Function):
    """Autograd around the two custom ops, as for the cross-entropy ops, called through _backend.call_op.
    (torch.library.register_autograd would run torch's fill_defaults on every forward, which rebuilds the op's
    16-entry argument list 32 times: ~100 us of host time per call, measured; a QLoRA step makes hundreds of
    calls.)"""

    @staticmethod
    def forward(ctx, x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, bias, seed, out_features,
                blocksize, nested_blocksize, scaling, dropout_p, backend):
        y, xa = _backend.call_op(
            "nf4_lora_linear_fwd", x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, bias, seed,
            out_features, blocksize, nested_blocksize, scaling, dropout_p, backend)
        need = ctx.needs_input_grad
        ctx.need = (need[0], need[6], need[7], bias is not None and need[8])
        ctx.consts = (blocksize, nested_blocksize, scaling, dropout_p, backend)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2d if ctx.need[1] else None, packed, scales, absmax2, code2, offset, lora_A,
                              lora_B, xa, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        _backend.refuse_double_backward("nf4_lora_linear")
        x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, xa, seed = ctx.saved_tensors
        blocksize, nested, scaling, p, backend = ctx.consts
        need_dx, need_dA, need_dB, need_dbias = ctx.need
        dx, dA, dB, dbias = _backend.call_op(
            "nf4_lora_linear_bwd", dy, x2d, packed, scales, absmax2, code2, offset, lora_A, lora_B, xa, seed, blocksize,
            nested, scaling, p, backend, need_dx, need_dA, need_dB, need_dbias)
        return (dx if need_dx else None, None, None, None, None, None, dA if need_dA else None,
                dB if need_dB else None, dbias.to(ctx.bias_dtype) if need_dbias else None,
                None, None, None, None, None, None, None)
