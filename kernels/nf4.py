"""Triton kernels: NF4 quantize / dequantize in bitsandbytes' layout (see qlora_kernels.reference.nf4)."""
import triton
import triton.language as tl

# Bytes of packed weight per dequantize program: 2 * 2048 bf16 outputs = 8 KB written per program,
# enough in flight per SM to stream at bandwidth with 4 warps (16 bytes/thread/load).
DEQUANT_BLOCK_BYTES = 2048
DEQUANT_NUM_WARPS = 4
# Elements per quantize program (whole scale blocks; ROWS = QUANT_TILE // blocksize, at least 1).
QUANT_TILE = 4096
QUANT_NUM_WARPS = 16  # 8 elements per thread; 8 warps spill around the div.rn call at BLOCKSIZE=4096 on sm_80


@triton.jit
def round_to_bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even. Used where the interpreter's own fp32 ->
    bf16 conversion truncates; on the GPU the hardware conversion does the same rounding."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of each `block` index: absmax, or code2[q] * absmax2[b // nested] + offset."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return scaled + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n,
                          BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                          OUT_BF16_BITS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """out[i] = NF4[code_i] * scale[i // BLOCKSIZE] for i < n; each program expands BLOCK_BYTES bytes.

    With OUT_BF16_BITS, out_ptr is an int16 view of a bf16 tensor and the rounding is done here.
    """
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    in_range = byte < (n + 1) // 2
    b = tl.load(packed_ptr + byte, mask=in_range, other=0)
    # BLOCKSIZE is even, so both nibbles of a byte share one scale
    scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (byte * 2) // BLOCKSIZE, in_range,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)
    hi = tl.load(code_ptr + (b >> 4).to(tl.int32)) * scale
    lo = tl.load(code_ptr + (b & 0xF).to(tl.int32)) * scale
    values = tl.interleave(hi, lo)
    idx = tl.program_id(0).to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    if OUT_BF16_BITS:
        tl.store(out_ptr + idx, round_to_bf16_bits(values), mask=idx < n)
    else:
        tl.store(out_ptr + idx, values.to(out_ptr.dtype.element_ty), mask=idx < n)


@triton.jit
def nf4_quantize_kernel(x_ptr, midpoints_ptr, packed_ptr, absmax_ptr, n, nblocks,
                        BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    """Quantize ROWS scale blocks of BLOCKSIZE elements per program: absmax (fp32, NaN if the block has one)
    and packed codes.

    code = number of NF4 midpoints strictly below x * (1 / max(absmax, 1e-38)); 7 (0.0) for padding.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pair = tl.arange(0, BLOCKSIZE // 2)
    even = rows[:, None] * BLOCKSIZE + 2 * pair[None, :]
    x_even = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    # a NaN anywhere in the block makes its absmax NaN, so the launcher can reject the input
    has_nan = tl.max(((x_even != x_even) | (x_odd != x_odd)).to(tl.int32), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), absmax)
    tl.store(absmax_ptr + rows, absmax, mask=rows < nblocks)
    # IEEE division (div.rn), as bitsandbytes and the C++ path: "/" would lower to the 2-ulp div.full
    # (1e-38 is subnormal in fp32: triton 3.6 types a bare 1e-38 as fp64, so build the fp32 constant)
    floor = tl.full((ROWS,), 1e-38, tl.float32)
    inv = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.maximum(absmax, floor))
    # an all-zero block scales to 0 (code 7) even where the GPU flushes the subnormal floor to zero
    inv = tl.where(absmax > 0, inv, 0.0)[:, None]
    s_even = x_even * inv
    s_odd = x_odd * inv
    c_even = tl.zeros((ROWS, BLOCKSIZE // 2), tl.int32)
    c_odd = tl.zeros((ROWS, BLOCKSIZE // 2), tl.int32)
    for i in tl.static_range(15):
        mid = tl.load(midpoints_ptr + i)
        c_even += (s_even > mid).to(tl.int32)
        c_odd += (s_odd > mid).to(tl.int32)
    c_odd = tl.where(even + 1 >= n, 7, c_odd)
    byte = ((c_even << 4) | c_odd).to(tl.uint8)
    tl.store(packed_ptr + rows[:, None] * (BLOCKSIZE // 2) + pair[None, :], byte, mask=even < n)
