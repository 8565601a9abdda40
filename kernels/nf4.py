"""Triton kernels: NF4 quantize / dequantize in bitsandbytes' layout (see qlora_kernels.reference.nf4), and the
code lookups the fused GEMMs share."""
import struct

import triton
import triton.language as tl

# The 16 NF4 values (fp32, exact), as bitsandbytes' code table; the package's reference checks them.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

# Bytes of packed weight per dequantize program: 2 * 2048 bf16 outputs = 8 KB written per program,
# enough in flight per SM to stream at bandwidth with 4 warps (16 bytes/thread/load).
DEQUANT_BLOCK_BYTES = 2048
DEQUANT_NUM_WARPS = 4
SCALES_BLOCK = 1024   # double-quant scales decoded per program (nf4_block_scales_kernel)
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
def round_through(v, dtype: tl.constexpr, BF16: tl.constexpr):
    """fp32 -> dtype -> fp32, round to nearest even (BF16: by round_to_bf16_bits, for the interpreter)."""
    if BF16:
        bits = round_to_bf16_bits(v).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    return v.to(dtype).to(tl.float32)


@triton.jit
def store_rounded(ptrs, v, mask, BF16_BITS: tl.constexpr):
    """Store fp32 v in the pointers' dtype; BF16_BITS: the pointers are an int16 view of bf16, rounded here."""
    if BF16_BITS:
        tl.store(ptrs, round_to_bf16_bits(v), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


# --- code lookup: 4-bit index -> fp32 NF4 value ---------------------------------------------------------

@triton.jit
def nf4_value(i):
    """NF4 code value (fp32, exact) of 4-bit indices `i` (int32) by a 4-level select tree on their bits.

    No memory gather: a 16-entry table read with tl.load(code + i) per element ran the fused GEMM at
    ~41 TFLOP/s on an H100 (vs ~200-300 with in-register arithmetic); selects stay in registers.
    Cost: 4 bit tests and 15 selects per value. Runs everywhere, the interpreter included.
    """
    b0 = (i & 1) != 0
    b1 = (i & 2) != 0
    b2 = (i & 4) != 0
    a0 = tl.where(b0, -0.6961928009986877, -1.0)
    a1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    a2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    a3 = tl.where(b0, 0.0, -0.09105003625154495)
    a4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    a5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    a6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    a7 = tl.where(b0, 1.0, 0.7229568362236023)
    c0 = tl.where(b1, a1, a0)
    c1 = tl.where(b1, a3, a2)
    c2 = tl.where(b1, a5, a4)
    c3 = tl.where(b1, a7, a6)
    d0 = tl.where(b2, c1, c0)
    d1 = tl.where(b2, c3, c2)
    return tl.where((i & 8) != 0, d1, d0)


def _prmt_lookup_ptx(values=NF4_VALUES):
    """PTX for 4 packed code bytes -> 8 fp32 values: $0-$3 = value of each byte's high nibble, $4-$7 = of its
    low nibble, $8 = the 4 bytes (byte j = element j).

    prmt.b32 d, a, b, c picks byte i of d from the 8 bytes {b, a} by nibble i of c, i.e. 4 lookups in an
    8-entry byte table per instruction. Per group of 4 nibbles and per byte plane p of the fp32 patterns:
    one prmt in entries 0-7 and one in 8-15 (selector: the nibbles' low 3 bits), one prmt choosing between
    them by bit 3; then 8 prmt transpose the 4 planes into 4 words. 49 instructions per 8 values against
    8 x 19 for the select tree. Selector nibbles have bit 3 clear: set, it would switch on sign replication.
    """
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]

    def table(p, first):   # byte p of entries first..first+3, entry first + k in byte k
        return sum(((bits[first + k] >> (8 * p)) & 0xFF) << (8 * k) for k in range(4))

    lines = ["{", ".reg .b32 w, s, m, x, y, p0, p1, p2, p3, t0, t1, t2, t3;", "mov.b32 w, $8;"]
    # nibbles 0-3 (bytes 0, 1) then 4-7 (bytes 2, 3): nibble 2j is byte j's low, 2j + 1 its high nibble
    for shift, (lo0, hi0, lo1, hi1) in ((0, ("$4", "$0", "$5", "$1")), (16, ("$6", "$2", "$7", "$3"))):
        lines += [f"shr.u32 s, w, {shift};" if shift else "mov.b32 s, w;", "and.b32 s, s, 0x7777;",
                  f"shr.u32 m, w, {shift + 1};", "and.b32 m, m, 0x4444;", "or.b32 m, m, 0x3210;"]
        for p in range(4):
            lines += [f"prmt.b32 x, {table(p, 0):#010x}, {table(p, 4):#010x}, s;",
                      f"prmt.b32 y, {table(p, 8):#010x}, {table(p, 12):#010x}, s;",
                      f"prmt.b32 p{p}, x, y, m;"]
        lines += ["prmt.b32 t0, p0, p1, 0x5140;", "prmt.b32 t1, p0, p1, 0x7362;",
                  "prmt.b32 t2, p2, p3, 0x5140;", "prmt.b32 t3, p2, p3, 0x7362;",
                  f"prmt.b32 {lo0}, t0, t2, 0x5410;", f"prmt.b32 {hi0}, t0, t2, 0x7632;",
                  f"prmt.b32 {lo1}, t1, t3, 0x5410;", f"prmt.b32 {hi1}, t1, t3, 0x7632;"]
    return "\n".join(lines + ["}"])


NF4_PRMT_PTX = tl.constexpr(_prmt_lookup_ptx())


@triton.jit
def nf4_byte_values(b, PRMT: tl.constexpr):
    """fp32 NF4 values (of the high nibble, of the low nibble) of packed code bytes `b` (uint8).

    PRMT (CUDA only, not the interpreter): byte-permute table lookups in inline PTX, ~6 instructions per
    value instead of the select tree's ~19.
    """
    if PRMT:
        return tl.inline_asm_elementwise(NF4_PRMT_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        return nf4_value((b >> 4).to(tl.int32)), nf4_value((b & 0xF).to(tl.int32))


# --- quantize / dequantize ------------------------------------------------------------------------------

@triton.jit
def nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of each `block` index: absmax, or code2[q] * absmax2[b // nested] + offset (kernels using
    it launch with _backend.no_fp_fusion(): the product rounds before the add, as bitsandbytes)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return scaled + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_block_scales_kernel(qabsmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, nblocks,
                            NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = code2[q[b]] * absmax2[b // NESTED_BLOCKSIZE] + offset for b < nblocks (fp32): the double-quant
    scales the fused GEMMs read, decoded in one pass (launch without fp fusion: two roundings, as
    bitsandbytes)."""
    block = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = block < nblocks
    scale = nf4_block_scale(qabsmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, True, NESTED_BLOCKSIZE)
    tl.store(out_ptr + block, scale, mask=mask)


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n,
                          BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                          OUT_BF16_BITS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """out[i] = NF4[code_i] * scale[i // BLOCKSIZE] for i < n; each program expands BLOCK_BYTES bytes, viewed
    as (BLOCK_BYTES // (BLOCKSIZE / 2), BLOCKSIZE / 2): one row per scale block, so each scale (and its
    double-quant decode) is loaded once per block instead of once per byte.

    With OUT_BF16_BITS, out_ptr is an int16 view of a bf16 tensor and the rounding is done here. The code
    values are loads from the 64-byte table at code_ptr (L1-resident): in this bandwidth-bound kernel the
    load pipe has room, and it issues fewer instructions (448 per 32 values on sm_90) than the byte-permute
    lookup of the GEMMs (576) or the select tree.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2            # bytes per scale block (BLOCK_BYTES is a multiple)
    ROWS: tl.constexpr = BLOCK_BYTES // HALF
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    in_range = byte < (n + 1) // 2
    b = tl.load(packed_ptr + byte, mask=in_range, other=0)
    scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, block * HALF < (n + 1) // 2,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
    hi = tl.load(code_ptr + (b >> 4).to(tl.int32))
    lo = tl.load(code_ptr + (b & 0xF).to(tl.int32))
    values = tl.interleave(hi * scale, lo * scale)                # (ROWS, BLOCKSIZE), element order
    idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
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
