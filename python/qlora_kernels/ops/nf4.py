"""NF4 quantize / dequantize: checks, then dispatch to Triton (CUDA, or CPU under TRITON_INTERPRET=1),
the C++ extension (CPU), the extension's CUDA kernels (backend="cuda_ext"), or the reference."""
import functools
import os

import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import nf4 as kernels
from qlora_kernels.nf4_weight import NF4Weight
from qlora_kernels.reference import nf4 as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOOKUPS = ("select", "prmt")


def prmt_lookup(t: torch.Tensor) -> bool:
    """Whether the fused NF4 GEMMs on `t`'s device look codes up by inline-PTX byte permutes (4 lookups per
    prmt; CUDA only; the default), or by the select tree (QLORA_KERNELS_NF4_LOOKUP=select; the interpreter
    always). The H100 run of 2026-11-27 measured PRMT 22-28 % faster at M = 4096 forward, 7-28 % forward +
    backward but one case (3 % slower), and equal bit for bit (benchmarks/NOTES.md "Second GPU run").
    (Dequantize keeps its table loads: fewer instructions in a bandwidth-bound kernel.)"""
    lookup = os.environ.get("QLORA_KERNELS_NF4_LOOKUP", "prmt")
    if lookup not in LOOKUPS:
        raise ValueError(f"QLORA_KERNELS_NF4_LOOKUP={lookup!r}: expected one of {LOOKUPS}")
    # inline PTX: NVIDIA only (a ROCm torch also answers is_cuda)
    return lookup == "prmt" and t.is_cuda and torch.version.hip is None and not _backend.interpreting()


@functools.lru_cache(maxsize=None)
def _code_table(device: torch.device) -> torch.Tensor:
    """The NF4 values on `device`, made once (a fresh host-to-device copy per call would wait for the stream)."""
    return ref.nf4_code(device)


@functools.lru_cache(maxsize=None)
def _midpoints(device: torch.device) -> torch.Tensor:
    return ref.midpoints(_code_table(device))


def _check_weight(weight, blocksize):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    ref.check_blocksize(blocksize)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 backend: str | None = None) -> NF4Weight:
    """Quantize a 2-D float weight `(out, in)` to NF4, byte-identical to bitsandbytes'
    `quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)` on CUDA
    (its CPU path snaps the nested scales to a 65536-point grid first: ~0.2 % of their 8-bit codes differ).

    Dequantization returns `weight.dtype`. `backend` overrides the device's default (tests, benchmarks).
    """
    _check_weight(weight, blocksize)
    backend = _backend.resolve_backend(weight, backend)
    x = weight.detach().contiguous()   # no autograd graph kept in the scales
    if backend == "triton":
        packed, absmax = _quantize_triton(x, blocksize)
    elif backend == "cpu":
        packed, absmax = _backend.native().nf4_quantize(x, blocksize)
    elif backend == "cuda_ext":
        packed, absmax = _quantize_cuda_ext(x, blocksize)
    else:
        packed, absmax = ref.quantize_blocks(x, blocksize)
    # every backend's absmax is NaN / inf where the block is: checking the small absmax costs one sync
    # (quantization is not on the training hot path) and not another pass over the weight
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("weight has non-finite values (NaN or inf); NF4 cannot represent them")
    if not double_quant:
        return NF4Weight(packed, weight.shape, weight.dtype, blocksize, absmax)
    qabsmax, absmax2, code2, offset = ref.quantize_absmax(absmax)
    if not bool(torch.isfinite(absmax2).all() & torch.isfinite(offset)):   # the fp32 mean of huge absmax
        raise ValueError("double quantization overflows fp32 (the mean of the block scales is inf: weights "
                         "near fp32's limit); quantize with double_quant=False")
    return NF4Weight(packed, weight.shape, weight.dtype, blocksize, qabsmax=qabsmax, absmax2=absmax2,
                     code2=code2, offset=offset)


def dequantize_nf4(qweight: NF4Weight, backend: str | None = None) -> torch.Tensor:
    """NF4Weight -> dense `qweight.shape` tensor in `qweight.dtype`, equal to bitsandbytes'
    `dequantize_4bit` (one fp32 multiply per element, one rounding)."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"dequantize_nf4 expects an NF4Weight, got {type(qweight).__name__}")
    backend = _backend.resolve_backend(qweight.packed, backend)
    if backend == "triton":
        return _dequantize_triton(qweight)
    if backend == "cpu":
        out = torch.empty(qweight.shape, dtype=qweight.dtype, device=qweight.packed.device)  # not the default device
        _backend.native().nf4_dequantize(qweight.packed, qweight.absmax(), qweight.blocksize, out)
        return out
    if backend == "cuda_ext":
        return _dequantize_cuda_ext(qweight)
    return ref.dequantize_nf4(qweight)


@_backend.on_input_device
def _quantize_triton(x, blocksize):
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = max(1, kernels.QUANT_TILE // blocksize)
    mids = _midpoints(x.device)
    kernels.nf4_quantize_kernel[(_backend.cdiv(nblocks, rows),)](x, mids, packed, absmax, n, nblocks,
                                                                BLOCKSIZE=blocksize, ROWS=rows,
                                                                num_warps=kernels.QUANT_NUM_WARPS)
    return packed, absmax


@_backend.on_input_device
def block_scales(scales, absmax2, code2, offset, nested_blocksize):
    """fp32 block scales from a weight's scale storage (NF4Weight.scale_tensors()): `scales` itself, or the
    double quant decoded by one Triton kernel (CUDA tensors or the interpreter; the reference otherwise)."""
    if absmax2 is None:
        return scales
    if not (scales.is_cuda or _backend.interpreting()):
        return ref.dequantize_absmax(scales, absmax2, code2, offset, nested_blocksize)
    n = scales.numel()
    out = torch.empty(n, dtype=torch.float32, device=scales.device)
    kernels.nf4_block_scales_kernel[(_backend.cdiv(n, kernels.SCALES_BLOCK),)](
        scales, absmax2, code2, offset, out, n, NESTED_BLOCKSIZE=nested_blocksize, BLOCK=kernels.SCALES_BLOCK,
        **_backend.no_fp_fusion())
    return out


@_backend.on_input_device
def _dequantize_triton(qweight):
    out = torch.empty(qweight.shape, dtype=qweight.dtype, device=qweight.device)
    n = qweight.numel()
    scales, absmax2, code2, offset = qweight.scale_tensors()
    # the interpreter's fp32 -> bf16 conversion truncates: round in the kernel, store the bits
    bf16_bits = _backend.interpreting() and out.dtype == torch.bfloat16
    grid = (_backend.cdiv((n + 1) // 2, kernels.DEQUANT_BLOCK_BYTES),)
    kernels.nf4_dequantize_kernel[grid](
        qweight.packed, scales, absmax2 if absmax2 is not None else scales, code2 if code2 is not None else scales,
        offset if offset is not None else scales, _code_table(qweight.device),
        out.view(torch.int16) if bf16_bits else out, n,
        BLOCKSIZE=qweight.blocksize, DOUBLE_QUANT=qweight.double_quant, NESTED_BLOCKSIZE=qweight.nested_blocksize,
        OUT_BF16_BITS=bf16_bits, BLOCK_BYTES=kernels.DEQUANT_BLOCK_BYTES, num_warps=kernels.DEQUANT_NUM_WARPS,
        **_backend.no_fp_fusion())   # the nested scale: code2[q] * absmax2 rounds before + offset
    return out


def _quantize_cuda_ext(x, blocksize):
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    _backend.launch_native("nf4_quantize_cuda", x.device, x, packed, absmax, blocksize)
    return packed, absmax


def _dequantize_cuda_ext(qweight):
    out = torch.empty(qweight.shape, dtype=qweight.dtype, device=qweight.device)
    scales, absmax2, code2, offset = qweight.scale_tensors()
    packed = qweight.packed
    if packed.data_ptr() % 4:   # storage viewed at an odd offset (from_bnb): the kernel reads 4-byte words
        packed = packed.clone()
    _backend.launch_native("nf4_dequantize_cuda", out.device, packed, scales, absmax2, code2, offset, out,
                           qweight.blocksize, qweight.nested_blocksize)
    return out
