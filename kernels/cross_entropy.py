"""Triton kernels: cross-entropy over a large vocabulary (online softmax split across programs), and the
row-bounded GEMM the label-sparse linear cross-entropy runs on compacted rows.

Per row, with z = softcap * tanh(x / softcap) (or z = x), lse = logsumexp(z), eps = label smoothing:
    loss = lse - (1 - eps) * z[y] - eps / V * sum(z) + z_loss * lse**2
    dloss/dz_j = p_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == y] - eps / V,   p = softmax(z)
    dz/dx = 1 - (z / softcap)**2
A row is split into NCHUNK chunks of BLOCK_V columns, one program each (program id = row * NCHUNK +
chunk). Each chunk writes its partial max, sum of exp, sum of z and z[y]; the row's lse is their
combination. The label is never used as an index, so an out-of-range label reads nothing out of bounds.
"""
import triton
import triton.language as tl

# GPU configs (H100 sweep in benchmarks/NOTES.md). Split path: 4096 columns per program, 4 warps.
# Fused path (ce_fused_kernel): the chunk stays in registers across a per-row barrier.
# Row path (ce_row_kernel): one program per row looping over ROW_BLOCK_V columns.
CE_MODE = "split"
CE_BLOCK_V = 4096
CE_NUM_WARPS = 4
CE_ROW_BLOCK_V = 8192
CE_ROW_NUM_WARPS = 16
CE_COMBINE_ROWS = 64
# the fused kernel's per-row barrier waits for all NCHUNK programs of a row: they must all be resident at
# once, so more chunks per row than this fall back to the split path (a small BLOCK_V could deadlock)
CE_FUSED_MAX_CHUNKS = 64
SCALE_BLOCK = 8192
# Row-bounded GEMM by compute-capability major: Hopper 128 x 256 x 64 bf16 tiles (wgmma, accumulator
# 128 fp32 registers per thread over 8 warps), 3 stages (144 KB shared); Ampere 128 x 128 x 64 (the
# 256-wide tile spills with mma.sync), 4 stages (128 KB).
MM_CONFIGS = {9: dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
              8: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4)}
# The input-gradient GEMM (chunk rows x H, reduction over V) has few output tiles (512 x 3072 is 48
# tiles of 128 x 256 for 132 SMs): 64 x 128 tiles make 192.
MM_DGRAD_CONFIGS = {9: dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
                    8: dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4)}
# The accumulating weight-gradient GEMM also holds the loaded fp32 C tile: 128 x 128 on both.
MM_ACC_CONFIGS = {9: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                  8: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4)}
# Under the interpreter cost follows the number of programs: big tiles.
MM_INTERPRET_CONFIG = dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=1)
# Online linear cross-entropy (QLORA_KERNELS_CE_LINEAR=online): vocabulary slices of ONLINE_SLICE_V
# columns. The logits GEMM keeps its statistics epilogue on a 128 x 128 tile (221-244 registers on sm_90,
# no spills). The gradient GEMM forms its A operand (softmax numerators) from the stored logits in
# registers, ~5 instructions per value: 128 x 128 tiles over 8 warps (310 SASS instructions per K-step
# against 512 cycles of wgmma; 64 x 128 issues 207 against 256). The narrow 64 x 128 tile serves softcap
# (2 more exps per value: 128 x 128 spills) and chunks too short for 128-row tiles to fill the SMs.
ONLINE_SLICE_V = 8192
ONLINE_LOGITS_CONFIGS = {9: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
                         8: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4)}
ONLINE_GRAD_CONFIGS = {9: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                       8: dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)}
ONLINE_GRAD_NARROW_CONFIGS = {9: dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
                              8: dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)}
ONLINE_FINISH_BLOCK_H = 1024


@triton.jit
def _softcap(x, softcap):
    # softcap * tanh(x / softcap) (libdevice tanh is unavailable in the interpreter). 2 * sigmoid(2u) - 1 cancels
    # for small |u| (absolute error ~ softcap * 2**-23, 0.05 at softcap 1e6): there the odd Taylor series to
    # u**9 instead, whose next term is < 2e-10 relative at |u| < 0.2
    u = x / softcap
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
    return softcap * tl.where(tl.abs(u) < 0.2, series, 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0)


@triton.jit
def _load_z(logits_ptr, row_off, cols, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    # row_off is an int64 scalar, cols int32 (V < 2**31): 64-bit index vectors would double the registers
    x = tl.load(logits_ptr + row_off + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = _softcap(x, softcap)
    return x


@triton.jit
def _finite_or_zero(m):
    # a max that is -inf (a chunk of masked logits) as 0, so exp(z - m) gives 0 there instead of NaN
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _chunk_stats(z, cols, mask, y):
    zm = tl.where(mask, z, float("-inf"))
    m = tl.max(zm, 0)
    s = tl.sum(tl.exp(zm - _finite_or_zero(m)), 0)
    sz = tl.sum(tl.where(mask, z, 0.0), 0)
    zy = tl.sum(tl.where(cols == y, z, 0.0), 0)
    return m, s, sz, zy


@triton.jit
def _store_partials(part_ptr, idx, n_part, m, s, sz, zy):
    # part is (4, n_rows * NCHUNK) fp32: max, sum of exp, sum of z, z[label]
    p = part_ptr + idx
    tl.store(p, m)
    tl.store(p + n_part, s)
    tl.store(p + n_part + n_part, sz)
    tl.store(p + n_part + n_part + n_part, zy)


@triton.jit
def _chunk_grad(z, cols, y, lse, scale, smoothing, z_loss, V, softcap, HAS_SOFTCAP: tl.constexpr):
    p = tl.exp(z - lse)
    g = p * (1.0 + 2.0 * z_loss * lse) - smoothing / V - tl.where(cols == y, 1.0 - smoothing, 0.0)
    g = g * scale
    if HAS_SOFTCAP:
        t = z / softcap
        g = g * (1.0 - t * t)
    return g


@triton.jit
def _row_scale(gscale_ptr, gscale_stride, count_ptr, row, HAS_GSCALE: tl.constexpr, MEAN: tl.constexpr):
    scale = 1.0
    if HAS_GSCALE:
        scale = tl.load(gscale_ptr + row * gscale_stride).to(tl.float32)
    if MEAN:
        scale = scale / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
    return scale


@triton.jit
def _row_loss(lse, sz, zy, y, V, smoothing, z_loss):
    # the smoothing term only when smoothing > 0: sum(z) is -inf with a masked logit, and 0 * -inf is NaN
    loss = lse - (1.0 - smoothing) * zy - tl.where(smoothing > 0, sz, 0.0) * (smoothing / V) + z_loss * lse * lse
    bad = (y < 0) | (y >= V)  # a label outside [0, V) that is not ignore_index: NaN, never a read
    return tl.where(bad, float("nan"), loss)


@triton.jit
def _class_column(y, V):
    """A label as the int32 column it is compared with: -1 (no column) outside [0, V), so ignore_index and,
    on CUDA, a bad label never index the row."""
    return tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)


@triton.jit
def _row_chunk(labels_ptr, V, NCHUNK: tl.constexpr, BLOCK_V: tl.constexpr):
    """The (row, chunk) of a program of an N * NCHUNK grid, its row's label (raw and as _class_column) and
    its chunk's columns."""
    pid = tl.program_id(0)
    row = pid // NCHUNK
    chunk = pid % NCHUNK
    y = tl.load(labels_ptr + row)
    return row, chunk, y, _class_column(y, V), chunk * BLOCK_V + tl.arange(0, BLOCK_V)


@triton.jit
def ce_stats_kernel(logits_ptr, labels_ptr, part_ptr, n_rows, V, stride_row, ignore_index, softcap,
                    NCHUNK: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Partial statistics of one chunk of one row (nothing for ignored rows)."""
    row, chunk, y, y32, cols = _row_chunk(labels_ptr, V, NCHUNK, BLOCK_V)
    if y != ignore_index:
        mask = cols < V
        z = _load_z(logits_ptr, row.to(tl.int64) * stride_row, cols, mask, softcap, HAS_SOFTCAP)
        m, s, sz, zy = _chunk_stats(z, cols, mask, y32)
        _store_partials(part_ptr, row.to(tl.int64) * NCHUNK + chunk, n_rows * NCHUNK, m, s, sz, zy)


@triton.jit
def ce_combine_kernel(labels_ptr, part_ptr, loss_ptr, lse_ptr, n_rows, V, ignore_index, smoothing, z_loss,
                      NCHUNK: tl.constexpr, NCHUNK_P2: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per row: lse and loss from the chunk partials; 0 and 0 for ignored rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (y != ignore_index)
    c = tl.arange(0, NCHUNK_P2)
    idx = rows[:, None] * NCHUNK + c[None, :]
    pmask = valid[:, None] & (c[None, :] < NCHUNK)
    n_part = n_rows * NCHUNK
    m = tl.load(part_ptr + idx, mask=pmask, other=float("-inf"))
    s = tl.load(part_ptr + n_part + idx, mask=pmask, other=0.0)
    sz = tl.sum(tl.load(part_ptr + 2 * n_part + idx, mask=pmask, other=0.0), 1)
    zy = tl.sum(tl.load(part_ptr + 3 * n_part + idx, mask=pmask, other=0.0), 1)
    mx = _finite_or_zero(tl.where(valid, tl.max(m, 1), 0.0))
    lse = mx + tl.log(tl.where(valid, tl.sum(s * tl.exp(m - mx[:, None]), 1), 1.0))
    loss = _row_loss(lse, sz, zy, y, V, smoothing, z_loss)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=rmask)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=rmask)


@triton.jit
def ce_grad_kernel(logits_ptr, labels_ptr, lse_ptr, grad_ptr, gscale_ptr, gscale_stride, count_ptr, V,
                   stride_row, grad_stride_row, ignore_index, smoothing, z_loss, softcap,
                   NCHUNK: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_GSCALE: tl.constexpr, MEAN: tl.constexpr, WRITE_IGNORED: tl.constexpr):
    """Gradient of one chunk of one row from the row's lse (zeros for ignored rows if WRITE_IGNORED).
    grad_ptr may equal logits_ptr (in place)."""
    row, chunk, y, y32, cols = _row_chunk(labels_ptr, V, NCHUNK, BLOCK_V)
    mask = cols < V
    if y != ignore_index:
        z = _load_z(logits_ptr, row.to(tl.int64) * stride_row, cols, mask, softcap, HAS_SOFTCAP)
        scale = _row_scale(gscale_ptr, gscale_stride, count_ptr, row, HAS_GSCALE, MEAN)
        g = _chunk_grad(z, cols, y32, tl.load(lse_ptr + row), scale, smoothing, z_loss, V, softcap, HAS_SOFTCAP)
        tl.store(grad_ptr + row.to(tl.int64) * grad_stride_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    elif WRITE_IGNORED:
        tl.store(grad_ptr + row.to(tl.int64) * grad_stride_row + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def ce_fused_kernel(logits_ptr, labels_ptr, grad_ptr, part_ptr, counter_ptr, loss_ptr, lse_ptr, count_ptr,
                    n_rows, V, stride_row, grad_stride_row, ignore_index, smoothing, z_loss, softcap,
                    NCHUNK: tl.constexpr, NCHUNK_P2: tl.constexpr, BLOCK_V: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr, WRITE_IGNORED: tl.constexpr):
    """GPU only: loss, lse and gradient reading the logits once. The chunk stays in registers while the
    NCHUNK programs of a row meet at a per-row arrival counter (zeroed by the caller); they have
    consecutive program ids, so they are resident together (blocks are dispatched in order). Under the
    interpreter programs run one after another and this would wait forever: use the three-kernel path.
    grad_ptr may equal logits_ptr (in place)."""
    row, chunk, y, y32, cols = _row_chunk(labels_ptr, V, NCHUNK, BLOCK_V)
    mask = cols < V
    n_part = n_rows * NCHUNK
    if y != ignore_index:
        z = _load_z(logits_ptr, row.to(tl.int64) * stride_row, cols, mask, softcap, HAS_SOFTCAP)
        m, s, sz, zy = _chunk_stats(z, cols, mask, y32)
        _store_partials(part_ptr, row.to(tl.int64) * NCHUNK + chunk, n_part, m, s, sz, zy)
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu") + 1
        while arrived < NCHUNK:
            arrived = tl.atomic_add(counter_ptr + row, 0, sem="acquire", scope="gpu")
        c = tl.arange(0, NCHUNK_P2)
        cm = c < NCHUNK
        pidx = row.to(tl.int64) * NCHUNK + c
        ms = tl.load(part_ptr + pidx, mask=cm, other=float("-inf"), cache_modifier=".cg")
        ss = tl.load(part_ptr + n_part + pidx, mask=cm, other=0.0, cache_modifier=".cg")
        mx = tl.max(ms, 0)
        lse = mx + tl.log(tl.sum(ss * tl.exp(ms - mx), 0))
        if chunk == 0:
            szs = tl.sum(tl.load(part_ptr + 2 * n_part + pidx, mask=cm, other=0.0, cache_modifier=".cg"), 0)
            zys = tl.sum(tl.load(part_ptr + 3 * n_part + pidx, mask=cm, other=0.0, cache_modifier=".cg"), 0)
            tl.store(loss_ptr + row, _row_loss(lse, szs, zys, y, V, smoothing, z_loss))
            tl.store(lse_ptr + row, lse)
        scale = _row_scale(count_ptr, 0, count_ptr, row, False, MEAN)
        g = _chunk_grad(z, cols, y32, lse, scale, smoothing, z_loss, V, softcap, HAS_SOFTCAP)
        tl.store(grad_ptr + row.to(tl.int64) * grad_stride_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        if chunk == 0:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
        if WRITE_IGNORED:
            tl.store(grad_ptr + row.to(tl.int64) * grad_stride_row + cols,
                     tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ce_row_kernel(logits_ptr, labels_ptr, grad_ptr, loss_ptr, lse_ptr, count_ptr, V, stride_row, grad_stride_row,
                  ignore_index, smoothing, z_loss, softcap, BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr, WRITE_IGNORED: tl.constexpr):
    """One program per row, two passes over it: online statistics, then (COMPUTE_GRAD) the gradient.
    The second pass re-reads the row while it is still in L2 (one row per program in flight), so HBM
    sees about one read and one write. grad_ptr may equal logits_ptr (in place)."""
    row = tl.program_id(0)
    y = tl.load(labels_ptr + row)
    y32 = _class_column(y, V)
    row_off = row.to(tl.int64) * stride_row
    grad_off = row.to(tl.int64) * grad_stride_row
    base = tl.arange(0, BLOCK_V)
    if y != ignore_index:
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), 0)
        sz = s
        zy = s
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + base
            mask = cols < V
            z = _load_z(logits_ptr, row_off, cols, mask, softcap, HAS_SOFTCAP)
            cm, cs, csz, czy = _chunk_stats(z, cols, mask, y32)
            new_m = tl.maximum(m, cm)
            s = s * tl.exp(m - _finite_or_zero(new_m)) + cs * tl.exp(cm - _finite_or_zero(new_m))
            m = new_m
            sz += csz
            zy += czy
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, _row_loss(lse, sz, zy, y, V, smoothing, z_loss))
        tl.store(lse_ptr + row, lse)
        if COMPUTE_GRAD:
            scale = _row_scale(count_ptr, 0, count_ptr, row, False, MEAN)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + base
                mask = cols < V
                z = _load_z(logits_ptr, row_off, cols, mask, softcap, HAS_SOFTCAP)
                g = _chunk_grad(z, cols, y32, lse, scale, smoothing, z_loss, V, softcap, HAS_SOFTCAP)
                tl.store(grad_ptr + grad_off + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD and WRITE_IGNORED:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + base
                tl.store(grad_ptr + grad_off + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g (a device scalar) in place; every program returns at once when g == 1 (a plain
    loss.backward()), so the common case costs one launch and no traffic."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def colsum_kernel(x_ptr, out_ptr, limit_ptr, limit_offset, n_rows, n_cols, stride_row,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] += sum of x[r, c] over r < min(n_rows, *limit_ptr - limit_offset) (fp32 out)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    rows_end = tl.minimum(n_rows, tl.load(limit_ptr).to(tl.int64) - limit_offset)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, rows_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(x_ptr + r[:, None] * stride_row + cols[None, :], mask=(r[:, None] < rows_end) & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x, 0)
    tl.store(out_ptr + cols, tl.load(out_ptr + cols, mask=cmask, other=0.0) + acc, mask=cmask)


@triton.jit
def _bound(limit_ptr, limit_offset, n):
    """min(n, *limit_ptr - limit_offset) clamped at 0, as int32: the rows of a chunk that exist."""
    return tl.maximum(tl.minimum(n, tl.load(limit_ptr).to(tl.int64) - limit_offset), 0).to(tl.int32)


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a persistent loop's tile index, GROUP_M row tiles at a time (L2 reuse of B)."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b. UPCAST: fp32 operands (the interpreter's bf16 dot is broken); IEEE: fp32 inputs without
    TF32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def bounded_matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, limit_ptr, limit_offset, rows_ptr, M, N, K,
                          stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                          LIMIT_M: tl.constexpr, LIMIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACCUMULATE: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                          SCATTER_C: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C (+)= A @ B (+ bias[n]) with fp32 accumulation, where the rows (LIMIT_M) or the reduction
    (LIMIT_K) stop at *limit_ptr - limit_offset, read on the device. Persistent: each program loops over
    the output tiles that exist below that bound (none for a chunk past the last labelled row), so a GEMM
    over a buffer of N compacted rows costs only the rows that exist, with no host sync. Strides give the
    transposes. UPCAST: fp32 operands for tl.dot (the interpreter's bf16 dot is broken).

    Row indirection through rows_ptr (int64, one entry per row of the GEMM): GATHER_A reads row m of A
    at rows[m], GATHER_B reads reduction row k of B at rows[k], SCATTER_C writes row m of C at rows[m].
    The linear cross-entropy reads and writes the labelled rows of hidden / its gradient in place this
    way instead of through compacted (N, H) copies."""
    m_end = M
    k_end = K
    if LIMIT_M:
        m_end = _bound(limit_ptr, limit_offset, M)
    if LIMIT_K:
        k_end = _bound(limit_ptr, limit_offset, K)   # an empty reduction leaves C untouched
    num_m = tl.cdiv(m_end, BM)
    num_n = tl.cdiv(N, BN)
    tiles = num_m * num_n
    if LIMIT_K:
        tiles = tl.where(k_end > 0, tiles, 0)
    rk = tl.arange(0, BK)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
        # rows and columns wrap (% M, % N) instead of masking the loads: what they read is never stored
        rm = (pid_m.to(tl.int64) * BM + tl.arange(0, BM)) % M
        rn = (pid_n.to(tl.int64) * BN + tl.arange(0, BN)) % N
        if GATHER_A:
            rm = tl.load(rows_ptr + rm)
        a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, k_end, BK):
            kmask = k0 + rk < k_end
            if GATHER_B:
                b_ptrs = b_ptr + tl.load(rows_ptr + k0 + rk, mask=kmask, other=0)[:, None] * stride_bk \
                    + rn[None, :] * stride_bn
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            acc = _mma(a, b, acc, UPCAST, IEEE)
            a_ptrs += BK * stride_ak
            b_ptrs += BK * stride_bk
        rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
        rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        cmask = (rm[:, None] < m_end) & (rn[None, :] < N)
        if SCATTER_C:
            rm = tl.load(rows_ptr + rm, mask=rm < m_end, other=0)
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------- online linear cross-entropy (frozen head, vocabulary slices)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2(x, APPROX: tl.constexpr):
    """2**x. APPROX (compiled): one ex2.approx.ftz, without tl.exp2's subnormal fix-ups (3 more instructions
    per value in the gradient GEMM's K-loop; a softmax numerator below 2**-126 is 0 in bf16 either way)."""
    if APPROX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.exp2(x)


# Per compacted row m, over the vocabulary in slices, with running max mx, l = sum exp(z - mx) and
#     O[m] = sum_v c_v exp(z_v - mx) w_v      (c_v = dz_v/dx_v: 1, or 1 - (z_v / softcap)**2)
# the input gradient is dh = scale * ((1 + 2 z_loss lse) / l * O - (1 - eps) c_y w_y - eps / V sum_v w_v):
# two GEMMs over the labelled rows, like the chunked path, but only a (rows, slice) logits buffer and the
# (rows, H) fp32 accumulator live at a time (flash-attention's rescaling, with w as both keys and values).
@triton.jit
def online_logits_kernel(h_ptr, w_ptr, bias_ptr, x_ptr, part_ptr, rows_ptr, labels_ptr, limit_ptr, limit_offset,
                         M, H, V, v0, ns, n_tiles, stride_hm, stride_wv, stride_xm, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ROUND: tl.constexpr,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Logits x[m, n] = h[rows[m]] . w[v0 + n] (+ bias) of the slice's ns columns, for the chunk's rows
    m < *limit_ptr - limit_offset, stored in x's dtype (ROUND, fp16/bf16: the statistics see the stored
    value, as F.linear's logits, and the same value the gradient GEMM reads back); and per (row, BN-column
    tile t) the partials of z = softcap(x): part[:, m, t] = (max z, sum exp(z - max), sum z, z[label]), part
    (4, M, n_tiles) fp32. h, w unit stride along H."""
    m_end = _bound(limit_ptr, limit_offset, M)
    num_m = tl.cdiv(m_end, BM)
    n_part = M * n_tiles
    rk = tl.arange(0, BK)
    for tile in range(tl.program_id(0), num_m * n_tiles, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, num_m, n_tiles, GROUP_M)
        rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
        cn = pid_n * BN + tl.arange(0, BN)
        # rows and columns wrap instead of masking the loads: what they read is never stored
        a_ptrs = h_ptr + tl.load(rows_ptr + rm % M)[:, None] * stride_hm + rk[None, :]
        b_ptrs = w_ptr + (v0 + cn % ns).to(tl.int64)[None, :] * stride_wv + rk[:, None]
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, H, BK):
            kmask = k0 + rk < H
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            acc = _mma(a, b, acc, UPCAST, IEEE)
            a_ptrs += BK
            b_ptrs += BK
        if HAS_BIAS:
            acc += tl.load(bias_ptr + v0 + cn % ns).to(tl.float32)[None, :]
        col_ok = (cn < ns)[None, :]
        row_ok = rm < m_end
        x = acc.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + rm[:, None] * stride_xm + cn[None, :], x, mask=row_ok[:, None] & col_ok)
        if ROUND:
            acc = x.to(tl.float32)
        z = acc
        if HAS_SOFTCAP:
            z = _softcap(acc, softcap)
        zm = tl.where(col_ok, z, float("-inf"))
        mx = tl.max(zm, 1)
        s = tl.sum(tl.exp(zm - _finite_or_zero(mx)[:, None]), 1)
        sz = tl.sum(tl.where(col_ok, z, 0.0), 1)
        y = _class_column(tl.load(labels_ptr + rm % M), V)
        zy = tl.sum(tl.where(col_ok & ((v0 + cn)[None, :] == y[:, None]), z, 0.0), 1)
        p = part_ptr + rm * n_tiles + pid_n
        tl.store(p, mx, mask=row_ok)
        tl.store(p + n_part, s, mask=row_ok)
        tl.store(p + n_part + n_part, sz, mask=row_ok)
        tl.store(p + n_part + n_part + n_part, zy, mask=row_ok)


@triton.jit
def online_grad_kernel(x_ptr, w_ptr, o_ptr, part_ptr, stats_ptr, limit_ptr, limit_offset, M, H, v0, ns, n_tiles,
                       src, stride_xm, stride_wv, stride_om, softcap,
                       FIRST: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, NT_STEP: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """One slice's step of the online softmax of the chunk's rows. The running (max, sum exp, sum z,
    z[label]) per row are read from stats[src] (stats (2, 4, M) fp32; none when FIRST) and, merged with
    the slice's partials, written to stats[1 - src] by the programs of the first H tile (every program of
    a row block computes the same values). COMPUTE_GRAD:
        O = alpha * O + P @ w[v0:v0 + ns],  P = c * exp(z - new max),  alpha = exp(old max - new max)
    with O (M, H) fp32 (not read when FIRST) and P formed in registers from the stored logits x."""
    m_end = _bound(limit_ptr, limit_offset, M)
    num_m = tl.cdiv(m_end, BM)
    num_n = 1
    if COMPUTE_GRAD:
        num_n = tl.cdiv(H, BN)
    n_part = M * n_tiles
    t = tl.arange(0, NT_STEP)
    rk = tl.arange(0, BK)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
        rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
        row_ok = rm < m_end
        part_row = part_ptr + (rm % M)[:, None] * n_tiles
        old = stats_ptr + src * 4 * M + rm % M
        if FIRST:
            m_old = tl.full((BM,), float("-inf"), tl.float32)
        else:
            m_old = tl.load(old)
        # the slice's max: NT_STEP tiles at a time (few registers before the K-loop), an elementwise running max
        # reduced once after the loop (the same value: a max is exact in any order). A row max carried by the
        # loop instead, i.e. m = max(m, tl.max(load)) from a constant -inf (FIRST) and used more than once after
        # it, crashes triton 3.6's OptimizeThreadLocality pass (assertion `loopResult.hasOneUse()`) wherever the
        # partials' loads vectorize, i.e. n_tiles % 16 == 0 at launch (a full 8192-column slice: 64 tiles)
        m_tiles = tl.full((BM, NT_STEP), float("-inf"), tl.float32)
        for t0 in range(0, n_tiles, NT_STEP):
            tmask = row_ok[:, None] & (t0 + t[None, :] < n_tiles)
            m_tiles = tl.maximum(m_tiles, tl.load(part_row + t0 + t[None, :], mask=tmask, other=float("-inf")))
        m_new = tl.maximum(m_old, tl.max(m_tiles, 1))
        ref = _finite_or_zero(m_new)
        # a row whose max so far is -inf has l = 0 and O = 0 (every term was exp(-inf))
        alpha = tl.where(m_old == float("-inf"), 0.0, tl.exp(m_old - ref))
        if pid_n == 0:
            l_new = tl.zeros((BM,), tl.float32)
            sz = tl.zeros((BM,), tl.float32)
            zy = tl.zeros((BM,), tl.float32)
            for t0 in range(0, n_tiles, NT_STEP):
                tmask = row_ok[:, None] & (t0 + t[None, :] < n_tiles)
                pt = part_row + t0 + t[None, :]
                mt = tl.load(pt, mask=tmask, other=float("-inf"))
                l_new += tl.sum(tl.load(pt + n_part, mask=tmask, other=0.0) * tl.exp(mt - ref[:, None]), 1)
                sz += tl.sum(tl.load(pt + 2 * n_part, mask=tmask, other=0.0), 1)
                zy += tl.sum(tl.load(pt + 3 * n_part, mask=tmask, other=0.0), 1)
            if not FIRST:
                l_new += alpha * tl.load(old + M)
                sz += tl.load(old + 2 * M)
                zy += tl.load(old + 3 * M)
            new = stats_ptr + (1 - src) * 4 * M + rm
            tl.store(new, m_new, mask=row_ok)
            tl.store(new + M, l_new, mask=row_ok)
            tl.store(new + 2 * M, sz, mask=row_ok)
            tl.store(new + 3 * M, zy, mask=row_ok)
        if COMPUTE_GRAD:
            rn = pid_n * BN + tl.arange(0, BN)
            x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + rk[None, :]
            w_ptrs = w_ptr + (v0 + rk).to(tl.int64)[:, None] * stride_wv + (rn % H)[None, :]
            # the rescaled O is the accumulator's initial value: nothing else is live beside it after the K-loop
            o_ptrs = o_ptr + rm[:, None] * stride_om + rn[None, :]
            omask = row_ok[:, None] & (rn < H)[None, :]
            if FIRST:
                acc = tl.zeros((BM, BN), tl.float32)
            else:
                acc = alpha[:, None] * tl.load(o_ptrs, mask=omask, other=0.0)
            ref2 = ref * LOG2E
            for k0 in range(0, ns, BK):
                kmask = k0 + rk < ns
                if EVEN_K:   # every slice of a real vocabulary (a multiple of 64): no masks in the K-loop
                    z = tl.load(x_ptrs).to(tl.float32)
                    b = tl.load(w_ptrs)
                else:
                    z = tl.load(x_ptrs, mask=kmask[None, :], other=0.0).to(tl.float32)
                    b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
                if HAS_SOFTCAP:
                    z = _softcap(z, softcap)
                p = _exp2(z * LOG2E - ref2[:, None], not UPCAST)
                if HAS_SOFTCAP:
                    u = z / softcap
                    p = p * (1.0 - u * u)
                if not EVEN_K:
                    p = tl.where(kmask[None, :], p, 0.0)
                if not UPCAST:
                    p = p.to(b.dtype)
                acc = _mma(p, b, acc, UPCAST, IEEE)
                x_ptrs += BK
                w_ptrs += BK * stride_wv
            tl.store(o_ptrs, acc, mask=omask)


@triton.jit
def online_finish_kernel(o_ptr, stats_ptr, w_ptr, colsum_ptr, labels_ptr, rows_ptr, grad_ptr, loss_ptr, gscale_ptr,
                         count_ptr, limit_ptr, limit_offset, M, V, H, src, stride_om, stride_wv, stride_gm, smoothing,
                         z_loss, softcap,
                         COMPUTE_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_COLSUM: tl.constexpr,
                         HAS_GSCALE: tl.constexpr, MEAN: tl.constexpr, BLOCK_H: tl.constexpr):
    """One compacted row m < *limit_ptr - limit_offset: its loss from stats[src], and (COMPUTE_GRAD)
    the input-gradient row written to grad[rows[m]] (see the section comment; colsum = sum_v w_v in fp32,
    used when label smoothing is on, which the caller allows only without softcap)."""
    m = tl.program_id(0)
    if m < _bound(limit_ptr, limit_offset, M):
        st = stats_ptr + src * 4 * M + m
        l = tl.load(st + M)
        zy = tl.load(st + 3 * M)
        lse = _finite_or_zero(tl.load(st)) + tl.log(l)
        y = tl.load(labels_ptr + m)
        tl.store(loss_ptr + m, _row_loss(lse, tl.load(st + 2 * M), zy, y, V, smoothing, z_loss))
        if COMPUTE_GRAD:
            scale = _row_scale(gscale_ptr, 1, count_ptr, m, HAS_GSCALE, MEAN)
            yc = _class_column(y, V)
            c_y = 1.0 - smoothing
            if HAS_SOFTCAP:
                u = zy / softcap
                c_y = c_y * (1.0 - u * u)
            c_o = scale * (1.0 + 2.0 * z_loss * lse) / l
            c_y = tl.where(yc >= 0, scale * c_y, 0.0)   # a label outside [0, V) reads row 0, weighted 0
            w_y = w_ptr + tl.maximum(yc, 0).to(tl.int64) * stride_wv
            grad_row = grad_ptr + tl.load(rows_ptr + m) * stride_gm
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                cm = cols < H
                g = c_o * tl.load(o_ptr + m.to(tl.int64) * stride_om + cols, mask=cm, other=0.0)
                g -= c_y * tl.load(w_y + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_COLSUM:
                    g -= (scale * smoothing / V) * tl.load(colsum_ptr + cols, mask=cm, other=0.0)
                tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cm)
