"""Triton kernels of FusedAdamW (see qlora_kernels.reference.adamw for the math they must match).

Every tensor of a launch is reached through a table the optimizer owns (qlora_kernels.ops.adamw):
- `meta`: int64 (META_FIELDS, T): row k holds field k of every tensor (addresses, numel, dtype code);
- `chunks`: int32 (2 * C): per program, the tensor index and the BLOCK-sized chunk index in it.
So one launch covers any number of tensors of any sizes and dtypes, with no host sync.

Two launches per step and device:
1. `adamw_prologue_kernel`: sum of squares and non-finite count of every gradient (one partial per
   program, deterministic), and in the last program to finish (ticket counter): the global norm, the
   clip factor, the skip decision, the skipped-step counter and every `step` counter (+1 unless skipped).
2. `adamw_update_kernel`: the AdamW update of one param group, reading `step` (already advanced) and
   the clip factor / skip decision from the stats written by the prologue.
"""
import triton
import triton.language as tl

# fields (rows) of the update table
P_ADDR, G_ADDR, M_ADDR, V_ADDR, VMAX_ADDR, STEP_ADDR, NUMEL, DTYPE = map(tl.constexpr, range(8))
META_FIELDS = 8
# fields of the prologue's gradient table
NORM_G_ADDR, NORM_NUMEL, NORM_DTYPE = map(tl.constexpr, range(3))
NORM_META_FIELDS = 3
# dtype codes of params / grads
DT_FP32, DT_BF16, DT_FP16 = 0, 1, 2
# stats buffer (fp32, per step and device): sum of squares, non-finite count, norm, clip factor, ok (1/0)
ST_SUMSQ, ST_BAD, ST_NORM, ST_COEF, ST_OK = map(tl.constexpr, range(5))
STATS_SIZE = 5

# GPU configs. Update: 4 loads + 3 stores of BLOCK fp32 per program. sm_90 registers per thread:
# 4096/8 warps 254 (1 block per SM), 2048/8 128, 1024/8 64, 512/4 40. 512 with 4 warps: one 16-byte
# vector per thread per stream, many small programs in flight; H100 full set 3.89 ms (93 % of copy
# bandwidth) vs 4.3-6.5 ms for the others (benchmarks/NOTES.md).
UPDATE_BLOCK = 512
UPDATE_WARPS = 4
UPDATE_CONFIGS = [(512, 4), (1024, 8), (256, 2), (1024, 4)]  # (BLOCK, num_warps) timed by the benchmark
NORM_BLOCK = 4096
NORM_WARPS = 8
NORM_CONFIGS = [(4096, 8), (8192, 8), (2048, 4), (8192, 16)]
REDUCE_BLOCK = 1024  # partials / step counters handled per iteration by the finishing program
# Under TRITON_INTERPRET=1 the cost is per program, not per byte: big chunks.
INTERPRET_BLOCK = 16384


@triton.jit
def adamw_prologue_kernel(gmeta, chunks, n_tensors, partials, ticket, stats, step_addrs, n_steps,
                          skipped, max_norm,
                          NORM: tl.constexpr, FINALIZE: tl.constexpr, CLIP: tl.constexpr, SKIP: tl.constexpr,
                          BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """NORM: program i reduces chunk i of the gradients to (sum of squares, non-finite count) in
    partials[2i:2i+2]; the last program to take a ticket sums the partials in order into stats.
    FINALIZE (in that program, or alone with grid (1,) when NORM is off): norm, clip factor, skip decision
    into stats, skipped += not ok, every step counter += ok."""
    if NORM:
        pid = tl.program_id(0)
        ti = tl.load(chunks + 2 * pid)
        ci = tl.load(chunks + 2 * pid + 1)
        addr = tl.load(gmeta + NORM_G_ADDR * n_tensors + ti)
        n = tl.load(gmeta + NORM_NUMEL * n_tensors + ti)
        dt = tl.load(gmeta + NORM_DTYPE * n_tensors + ti)
        offs = ci.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        # dtype branches written out: nested @jit calls cost ~3 ms each under the interpreter
        if dt == 0:
            g = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=offs < n, other=0.0)
        elif dt == 1:  # bf16 as raw bits: the interpreter's bf16 arithmetic is broken
            g = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=offs < n, other=0)
            g = (g.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            g = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=offs < n, other=0.0).to(tl.float32)
        exponent_all_ones = (g.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000  # inf or NaN
        tl.store(partials + 2 * pid, tl.sum(g * g, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(exponent_all_ones.to(tl.float32), axis=0))
        # release our partial, acquire everyone's: the program that draws the last ticket sees them all
        done = tl.atomic_add(ticket, 1, sem="acq_rel")
        last = done == tl.num_programs(0) - 1
    else:
        last = tl.program_id(0) == 0
    if last:
        sumsq = 0.0
        bad = 0.0
        if NORM:
            nprog = tl.num_programs(0)
            acc_sq = tl.zeros((RBLOCK,), tl.float64)
            acc_bad = tl.zeros((RBLOCK,), tl.float32)
            for start in range(0, nprog, RBLOCK):
                idx = start + tl.arange(0, RBLOCK)
                acc_sq += tl.load(partials + 2 * idx, mask=idx < nprog, other=0.0, cache_modifier=".cg").to(tl.float64)
                acc_bad += tl.load(partials + 2 * idx + 1, mask=idx < nprog, other=0.0, cache_modifier=".cg")
            sumsq = tl.sum(acc_sq, axis=0).to(tl.float32)
            bad = tl.sum(acc_bad, axis=0)
            tl.store(ticket, 0)
            tl.store(stats + ST_SUMSQ, sumsq)
            tl.store(stats + ST_BAD, bad)
        elif CLIP or SKIP:
            sumsq = tl.load(stats + ST_SUMSQ)
            bad = tl.load(stats + ST_BAD)
        if FINALIZE:
            ok = 1.0
            if SKIP:
                ok = tl.where(bad == 0.0, 1.0, 0.0)
                tl.store(skipped, tl.load(skipped) + (1 - ok.to(tl.int64)))
            if CLIP or SKIP:
                norm = tl.sqrt_rn(sumsq)
                tl.store(stats + ST_NORM, norm)
                coef = 1.0
                if CLIP:  # torch: clamp(max_norm * reciprocal(norm + 1e-6), max=1)
                    coef = tl.minimum(tl.math.div_rn(1.0, norm + 1e-6) * max_norm, 1.0)
                tl.store(stats + ST_COEF, coef)
                tl.store(stats + ST_OK, ok)
            for start in range(0, n_steps, RBLOCK):
                idx = start + tl.arange(0, RBLOCK)
                in_range = idx < n_steps
                ptrs = tl.load(step_addrs + idx, mask=in_range, other=0).to(tl.pointer_type(tl.float32))
                tl.store(ptrs, tl.load(ptrs, mask=in_range, other=0.0) + ok, mask=in_range)


@triton.jit
def adamw_update_kernel(meta, chunks, n_tensors, stats, lr: tl.float64, beta1: tl.float64, beta2: tl.float64,
                        eps: tl.float32, weight_decay: tl.float64, seed,
                        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, CLIP: tl.constexpr, SKIP: tl.constexpr,
                        STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """torch.optim.AdamW's update of BLOCK elements of one tensor, in fp32, states fp32:
    p *= f32(1 - lr wd); m = lerp(m, g, f32(1 - b1)); v = fma(f32(1 - b2) g, g, v f32(b2));
    p += (f32(-lr / bc1) m) / (sqrt(v) / f32(sqrt(bc2)) + eps), bias corrections from the step counter."""
    pid = tl.program_id(0)
    ti = tl.load(chunks + 2 * pid)
    ci = tl.load(chunks + 2 * pid + 1)
    n = tl.load(meta + NUMEL * n_tensors + ti)
    dt = tl.load(meta + DTYPE * n_tensors + ti)
    p_addr = tl.load(meta + P_ADDR * n_tensors + ti)
    if SKIP:  # a skipped step touches nothing
        n = tl.where(tl.load(stats + ST_OK) != 0.0, n, 0)
    offs = ci.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n

    zero = tl.full((), 0.0, tl.float64)  # annotated float args stay Python floats under the interpreter
    lr, beta1, beta2, weight_decay = zero + lr, zero + beta1, zero + beta2, zero + weight_decay
    t = tl.load(tl.load(meta + STEP_ADDR * n_tensors + ti).to(tl.pointer_type(tl.float32))).to(tl.float64)
    step_size = (-lr / (1.0 - tl.exp2(t * tl.log2(beta1)))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2))).to(tl.float32)  # fp64 sqrt is IEEE
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    one_minus_b1 = (1.0 - beta1).to(tl.float32)
    # torch's lerp: fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g) (w - 1 exact in fp32)
    lerp_small = one_minus_b1 < 0.5
    lerp_coef = tl.where(lerp_small, one_minus_b1, one_minus_b1 - 1.0)
    one_minus_b2 = (1.0 - beta2).to(tl.float32)
    b2 = beta2.to(tl.float32)

    m_ptr = tl.load(meta + M_ADDR * n_tensors + ti).to(tl.pointer_type(tl.float32)) + offs
    v_ptr = tl.load(meta + V_ADDR * n_tensors + ti).to(tl.pointer_type(tl.float32)) + offs
    g_addr = tl.load(meta + G_ADDR * n_tensors + ti)
    if dt == 0:
        p = tl.load(p_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        g = tl.load(g_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif dt == 1:  # bf16 as raw bits: the interpreter's bf16 arithmetic is broken
        p = tl.load(p_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        p = (p.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        g = tl.load(g_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        g = (g.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        p = tl.load(p_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr, mask=mask, other=0.0)
    v = tl.load(v_ptr, mask=mask, other=0.0)
    if CLIP:
        g = g * tl.load(stats + ST_COEF)
    if MAXIMIZE:
        g = -g

    p = p * decay
    m = tl.fma(lerp_coef, g - m, tl.where(lerp_small, m, g))
    v = tl.fma(one_minus_b2 * g, g, v * b2)
    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)
    if AMSGRAD:
        vmax_ptr = tl.load(meta + VMAX_ADDR * n_tensors + ti).to(tl.pointer_type(tl.float32)) + offs
        v = tl.maximum(tl.load(vmax_ptr, mask=mask, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr, v, mask=mask)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.math.div_rn(step_size * m, denom)

    if dt == 0:
        tl.store(p_addr.to(tl.pointer_type(tl.float32)) + offs, p, mask=mask)
    elif dt == 1:  # fp32 -> bf16 by integer ops (the interpreter's conversion truncates)
        # a NaN as the canonical quiet NaN first: the GPU's 0x7FFFFFFF would carry into the sign and store -0.0
        bits = tl.where(p != p, 0x7FC00000, p.to(tl.uint32, bitcast=True))
        if STOCHASTIC:  # add 16 random bits, truncate
            bits = bits + (tl.randint(seed + ti, offs.to(tl.uint32)).to(tl.uint32) & 0xFFFF)
        else:  # round to nearest even
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(p_addr.to(tl.pointer_type(tl.uint16)) + offs, (bits >> 16).to(tl.uint16), mask=mask)
    else:
        tl.store(p_addr.to(tl.pointer_type(tl.float16)) + offs, p.to(tl.float16), mask=mask)
