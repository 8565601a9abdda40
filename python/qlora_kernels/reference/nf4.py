"""Plain-PyTorch NF4 quantization, bit-compatible with bitsandbytes: the ground truth in tests.

Format (../shared/notes/nf4-format.md): the weight is flattened row-major and cut into blocks of
`blocksize` elements; absmax[b] = max |x| over block b (fp32); each element becomes the index of the
nearest NF4 code of x / absmax (ties to the lower code); two codes per byte, even element in the high
nibble. Double quant stores absmax as 8-bit codes of the signed dynamic map, blockwise (256), around
their mean.
"""
import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
ZERO_CODE = 7                       # index of 0.0: the pad nibble
# The reciprocal scale uses max(absmax, MIN_ABSMAX), as bitsandbytes: an all-zero block scales to 0 (code 7)
# instead of NaN, and a subnormal block does not overflow to inf. The stored absmax is the true max.
MIN_ABSMAX = 1e-38
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, fp32."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between consecutive sorted codes, computed in fp32: (c[i] + c[i+1]) / 2."""
    return (code[:-1] + code[1:]) / 2


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted fp32 values), used for nested absmax.

    Decade i (0..6) holds 2**i evenly spaced means in [0.1, 1] scaled by 10**(i-6), with both signs,
    plus 0 and 1.0.
    """
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()  # fp32 products
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _codes_of(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (count of midpoints strictly below), ties to the lower one."""
    return torch.bucketize(scaled, midpoints(code), right=False)


def check_blocksize(blocksize):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be an int in {BLOCKSIZES}, got {blocksize!r} ({type(blocksize).__name__})")


def quantize_blocks(weight: torch.Tensor, blocksize: int):
    """4-bit part. weight (any shape, float) -> (packed uint8 (ceil(n/2),), absmax fp32 (nblocks,))."""
    x = weight.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # x * (1 / absmax) in every block, as bitsandbytes' CUDA kernels. Its CPU backend divides (x / absmax) in
    # a partial last block, so a value exactly on a code midpoint there can take the neighbouring code.
    scaled = blocks * (1.0 / absmax.clamp(min=MIN_ABSMAX))[:, None]
    codes = _codes_of(scaled, nf4_code(x.device)).view(-1)[:n]
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.to(torch.uint8), absmax


def quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """Double quant. absmax fp32 (nblocks,) -> (codes uint8 (nblocks,), absmax2 fp32, map fp32 (256,),
    offset fp32 0-d). Exact nearest code, as bitsandbytes on CUDA."""
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    nblocks2 = -(-n // nested_blocksize)
    blocks = torch.nn.functional.pad(centered, (0, nblocks2 * nested_blocksize - n)).view(nblocks2, -1)
    absmax2 = blocks.abs().amax(dim=1)
    code2 = dynamic_map(absmax.device)
    codes = _codes_of(blocks * (1.0 / absmax2.clamp(min=MIN_ABSMAX))[:, None], code2)
    return codes.view(-1)[:n].to(torch.uint8), absmax2, code2, offset


def dequantize_absmax(qabsmax, absmax2, code2, offset, nested_blocksize=NESTED_BLOCKSIZE):
    """fp32 block scales from double-quant storage: code2[q] * absmax2[b // 256] + offset (two roundings,
    as bitsandbytes: dequantize_blockwise, then add the offset)."""
    block2 = torch.arange(qabsmax.numel(), device=qabsmax.device) // nested_blocksize
    return code2[qabsmax.long()] * absmax2[block2] + offset


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed uint8 (ceil(n/2),) -> int64 codes (n,), high nibble first."""
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 0xF], dim=1).view(-1)[:n]


def dequantize_blocks(packed, absmax, shape, blocksize, dtype):
    """NF4 codes times their fp32 block scale, rounded once to `dtype`; returns `shape`."""
    n = shape[0] * shape[1]
    codes = unpack_codes(packed, n)
    scale = absmax.float()[torch.arange(n, device=packed.device) // blocksize]
    return (nf4_code(packed.device)[codes] * scale).to(dtype).view(shape)


def dequantize_nf4(qweight, upcast: bool = False) -> torch.Tensor:
    """NF4Weight -> dense weight of qweight.shape in qweight.dtype (fp32 with upcast=True)."""
    dtype = torch.float32 if upcast else qweight.dtype
    return dequantize_blocks(qweight.packed, qweight.absmax(), qweight.shape, qweight.blocksize, dtype)
