"""Fused cross-entropy and label-sparse fused linear cross-entropy: checks, launchers, torch.library
custom ops, autograd Functions and the functional entry points.

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) and a chunked plain-PyTorch
path for other CPU tensors ("cpu" / "reference"). The CUDA path never synchronizes with the host: the
number of counted tokens stays a device tensor that the kernels read.
"""
import contextlib
import functools
import math
import os
import threading

import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import cross_entropy as kernels
from qlora_kernels.reference import cross_entropy as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_CHUNK_BYTES = 128 << 20   # logits per chunk of the linear variant
CPU_CHUNK_BYTES = 64 << 20        # fp32 temporaries per chunk of the CPU cross-entropy
INTERPRET_BLOCK_V = 32768


# ----------------------------------------------------------------------------------------------- checks
def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap):
    if reduction not in ref.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ref.REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not hasattr(ignore_index, "__index__"):   # as F.cross_entropy: numpy ints
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= float(z_loss) < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not 0.0 < float(softcap) < math.inf:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


def _check_labels(labels, lead_shape, name="logits"):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape of {name} "
                         f"{tuple(lead_shape)}")
    # the range of the values is checked by the ops when they run (_check_label_range), eager or compiled


def _check_label_range(labels, V, ignore_index):
    """Called by the ops themselves, so a torch.compile'd graph checks too. Free on CPU, so checked there; on
    CUDA a bad label gives a NaN loss, never a bad read."""
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            first = int(bad.flatten().nonzero()[0])
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}; "
                             f"got {int(labels.flatten()[first])} at flat index {first}")


def _check_logits(logits, labels):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (N, V) or (B, T, V) with V > 0, got shape {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[:-1])
    _backend.check_same_device(logits=logits, labels=labels)


def _softcap_value(softcap):
    return 0.0 if softcap is None else float(softcap)


def _cpu_backend(backend):
    return backend in ("cpu", "reference")


MODES = ("split", "fused", "row", "cluster")
CLUSTER_MAX_VECTORS = 8 * 256 * 16   # csrc/cuda_launchers.h kCrossEntropyMaxVectors: 8 CTAs x 256 threads x 16


def _ce_mode():
    """"split" (stats, combine, grad kernels), "fused" (one kernel, per-row barrier; GPU only), "row" (one
    program per row, two passes) or "cluster" (the extension's CUDA kernel, one row per thread-block
    cluster, logits read once; sm_90+); QLORA_KERNELS_CE_MODE overrides (benchmark sweeps). The interpreter
    runs "split" for the GPU-only modes."""
    mode = os.environ.get("QLORA_KERNELS_CE_MODE", kernels.CE_MODE)
    if mode not in MODES:
        raise ValueError(f"QLORA_KERNELS_CE_MODE={mode!r}: expected one of {MODES}")
    return "split" if mode in ("fused", "cluster") and _backend.interpreting() else mode


def cluster_ce(x, grad):
    """Whether the "cluster" mode's CUDA kernel (csrc/cross_entropy_cuda.cu) takes rows x (N, V), with the
    gradient into grad (or none): CUDA tensors on sm_90+, V a multiple of one 16-byte vector (8 bf16 / fp16,
    4 fp32) and at most CLUSTER_MAX_VECTORS of them, rows 16-byte aligned, and a build holding the kernel's
    code for the device (not an sm_80-only build, not a card newer than the build); otherwise the split path
    runs. An error names a missing CUDA build of the extension."""
    if _ce_mode() != "cluster" or not x.is_cuda:
        return False
    if not hasattr(_backend.native(), "cross_entropy_cluster_cuda"):
        raise RuntimeError("QLORA_KERNELS_CE_MODE=cluster needs qlora_kernels._C built with CUDA (nvcc at install "
                           "time)")
    pack = 16 // x.element_size()
    aligned = lambda t: (t.data_ptr() % 16 == 0 and t.stride(1) == 1  # noqa: E731
                         and (t.shape[0] < 2 or t.stride(0) % pack == 0))
    return (_capability_major(x.device) >= 9 and x.shape[1] % pack == 0
            and x.shape[1] // pack <= CLUSTER_MAX_VECTORS and aligned(x) and (grad is None or aligned(grad))
            and _backend.native_has_image("cross_entropy_cluster_cuda_has_image", x.device.index))


def _block_v(V, block_v):
    if block_v:
        return block_v
    cap = INTERPRET_BLOCK_V if _backend.interpreting() else \
        int(os.environ.get("QLORA_KERNELS_CE_BLOCK_V", kernels.CE_BLOCK_V))   # env: benchmark sweeps
    return min(cap, _backend.next_power_of_2(V))


# ------------------------------------------------------------------------------------ Triton launchers
def _ce_launch(x, labels, loss, lse, grad, count, gscale, *, ignore_index, smoothing, z_loss, softcap, mean,
               write_ignored, block_v=0):
    """Per-row loss and lse of x (rows, V) into loss / lse; the gradient into `grad` (may be x itself)
    when given, scaled by gscale[row] (when given) and by 1 / max(count, 1) when `mean`."""
    N, V = x.shape
    if N == 0:
        return
    BLOCK_V = _block_v(V, block_v)
    NCHUNK = _backend.cdiv(V, BLOCK_V)
    warps = int(os.environ.get("QLORA_KERNELS_CE_WARPS", kernels.CE_NUM_WARPS))
    sc = _softcap_value(softcap)
    common = dict(HAS_SOFTCAP=softcap is not None)
    mode = _ce_mode()
    if gscale is None and cluster_ce(x, grad):
        _backend.launch_native("cross_entropy_cluster_cuda", x.device, x, grad, labels, loss, lse, count, ignore_index,
                               smoothing, z_loss, sc, mean, write_ignored)
        return
    if mode == "row" and gscale is None:
        rb = block_v or min(int(os.environ.get("QLORA_KERNELS_CE_BLOCK_V", kernels.CE_ROW_BLOCK_V)),
                            _backend.next_power_of_2(V))
        kernels.ce_row_kernel[(N,)](
            x, labels, grad if grad is not None else x, loss, lse, count, V, x.stride(0),
            grad.stride(0) if grad is not None else 0, ignore_index, smoothing, z_loss, sc, BLOCK_V=rb,
            MEAN=mean, COMPUTE_GRAD=grad is not None, WRITE_IGNORED=write_ignored,
            num_warps=int(os.environ.get("QLORA_KERNELS_CE_WARPS", kernels.CE_ROW_NUM_WARPS)), **common)
        return
    part = torch.empty((4, N * NCHUNK), dtype=torch.float32, device=x.device)
    if grad is not None and gscale is None and mode == "fused" and x.is_cuda and NCHUNK <= kernels.CE_FUSED_MAX_CHUNKS:
        counter = torch.zeros(N, dtype=torch.int32, device=x.device)
        kernels.ce_fused_kernel[(N * NCHUNK,)](
            x, labels, grad, part, counter, loss, lse, count, N, V, x.stride(0), grad.stride(0), ignore_index,
            smoothing, z_loss, sc, NCHUNK=NCHUNK, NCHUNK_P2=_backend.next_power_of_2(NCHUNK), BLOCK_V=BLOCK_V,
            MEAN=mean, WRITE_IGNORED=write_ignored, num_warps=warps, **common)
        return
    kernels.ce_stats_kernel[(N * NCHUNK,)](x, labels, part, N, V, x.stride(0), ignore_index, sc, NCHUNK=NCHUNK,
                                           BLOCK_V=BLOCK_V, num_warps=warps, **common)
    rows = kernels.CE_COMBINE_ROWS
    kernels.ce_combine_kernel[(_backend.cdiv(N, rows),)](labels, part, loss, lse, N, V, ignore_index, smoothing,
                                                         z_loss, NCHUNK=NCHUNK,
                                                         NCHUNK_P2=_backend.next_power_of_2(NCHUNK), BLOCK_R=rows)
    if grad is not None:
        _grad_launch(x, labels, lse, grad, count, gscale, ignore_index=ignore_index, smoothing=smoothing,
                     z_loss=z_loss, softcap=softcap, mean=mean, write_ignored=write_ignored, block_v=BLOCK_V)


def _grad_launch(x, labels, lse, grad, count, gscale, *, ignore_index, smoothing, z_loss, softcap, mean,
                 write_ignored, block_v=0):
    N, V = x.shape
    if N == 0:
        return
    BLOCK_V = _block_v(V, block_v)
    NCHUNK = _backend.cdiv(V, BLOCK_V)
    kernels.ce_grad_kernel[(N * NCHUNK,)](
        x, labels, lse, grad, gscale if gscale is not None else lse, 1, count if count is not None else lse, V,
        x.stride(0), grad.stride(0), ignore_index, smoothing, z_loss, _softcap_value(softcap), NCHUNK=NCHUNK,
        BLOCK_V=BLOCK_V, HAS_SOFTCAP=softcap is not None, HAS_GSCALE=gscale is not None, MEAN=mean,
        WRITE_IGNORED=write_ignored, num_warps=kernels.CE_NUM_WARPS)


def _scale_(x, g, backend):
    """x *= g in place (g a device scalar); a no-op launch when g == 1."""
    if x.numel() == 0:
        return
    if _cpu_backend(backend):
        x.mul_(g)   # g stays fp32: a loss scale of 65536 cast to fp16 first would be inf
        return
    kernels.scale_kernel[(_backend.cdiv(x.numel(), kernels.SCALE_BLOCK),)](x, g, x.numel(),
                                                                         BLOCK=kernels.SCALE_BLOCK, num_warps=8)


MM_PROGRAMS_PER_SM = {"fwd": 1, "acc": 1, "dgrad": 2}   # resident programs per SM at each config's shared memory


@functools.lru_cache(maxsize=None)
def _capability_major(device):
    return torch.cuda.get_device_capability(device)[0]


def _mm_arch(device):
    """The key of the GEMM config tables: 9 (Hopper and later) or 8."""
    return 9 if _capability_major(device) >= 9 else 8


def _mm_config(device, kind):
    if _backend.interpreting():
        return kernels.MM_INTERPRET_CONFIG
    table = {"acc": kernels.MM_ACC_CONFIGS, "dgrad": kernels.MM_DGRAD_CONFIGS}.get(kind, kernels.MM_CONFIGS)
    return table[_mm_arch(device)]


def _bounded_mm(a, b, c, limit, limit_offset, *, limit_m=False, limit_k=False, bias=None, accumulate=False,
                kind="fwd", gather_a=None, gather_b=None, scatter_c=None):
    """c (+)= a @ b (+ bias), rows or reduction bounded by limit - limit_offset (device scalar).
    gather_a / gather_b / scatter_c: an int64 row index (one entry per GEMM row, or per reduction row for
    gather_b) through which a's rows are read, b's rows are read, or c's rows are written; a, b or c is then
    the whole tensor the index points into."""
    rows = next((t for t in (gather_a, gather_b, scatter_c) if t is not None), None)
    M, K = (len(gather_a) if gather_a is not None else a.shape[0]), a.shape[1]
    N = b.shape[1]
    kind = "acc" if accumulate else kind
    cfg = dict(_mm_config(a.device, kind))
    tiles = _backend.cdiv(M, cfg["BM"]) * _backend.cdiv(N, cfg["BN"])
    persistent = not _backend.interpreting() and os.environ.get("QLORA_KERNELS_MM_PERSISTENT", "1") == "1"
    grid = (min(tiles, _backend.num_sms(a.device) * MM_PROGRAMS_PER_SM[kind]) if persistent else tiles,)
    kernels.bounded_matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, limit, limit_offset, rows if rows is not None else limit, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), LIMIT_M=limit_m,
        LIMIT_K=limit_k, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, GATHER_A=gather_a is not None,
        GATHER_B=gather_b is not None, SCATTER_C=scatter_c is not None, UPCAST=_backend.interpreting(),
        IEEE=a.dtype == torch.float32, **cfg)


# ------------------------------------------------------------------------- cross-entropy, both backends
def _ce_forward_impl(logits, labels, ignore_index, label_smoothing, z_loss, softcap, mean, compute_grad, backend,
                     block_v, grad):
    N, V = logits.shape
    softcap = softcap or None
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    count = (labels != ignore_index).sum(dtype=torch.int32).reshape(1)
    if _cpu_backend(backend):
        rows = max(1, CPU_CHUNK_BYTES // (12 * V))
        for s in range(0, N, rows):
            l, m, g = ref.rows_loss_grad(logits[s:s + rows], labels[s:s + rows], ignore_index, label_smoothing,
                                         z_loss, softcap, compute_grad)
            loss[s:s + rows], lse[s:s + rows] = l, m
            if compute_grad:
                grad[s:s + rows] = g / count.clamp(min=1) if mean else g
        return loss, lse
    _ce_launch(logits, labels, loss, lse, grad if compute_grad else None, count, None, ignore_index=ignore_index,
               smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, mean=mean, write_ignored=True,
               block_v=block_v)
    return loss, lse


@_backend.custom_op("cross_entropy_forward", mutates_args=())
@_backend.on_input_device
def cross_entropy_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float, softcap: float, mean: bool, compute_grad: bool, backend: str,
                          block_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row fp32 loss, lse, gradient of the summed (or, if mean, averaged) loss or an empty tensor)."""
    _check_label_range(labels, logits.shape[-1], ignore_index)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    loss, lse = _ce_forward_impl(logits, labels, ignore_index, label_smoothing, z_loss, softcap, mean, compute_grad,
                                 backend, block_v, grad)
    return loss, lse, grad


@cross_entropy_forward.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap, mean, compute_grad, backend, block_v):
    n = logits.shape[0]
    rows = logits.new_empty(n, dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(logits) if compute_grad else logits.new_empty(0)


@_backend.custom_op("cross_entropy_forward_inplace", mutates_args=("logits",))
@_backend.on_input_device
def cross_entropy_forward_inplace(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                                  label_smoothing: float, z_loss: float, softcap: float, mean: bool, backend: str,
                                  block_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As cross_entropy_forward with the gradient written over `logits`."""
    _check_label_range(labels, logits.shape[-1], ignore_index)    # before anything is overwritten
    return _ce_forward_impl(logits, labels, ignore_index, label_smoothing, z_loss, softcap, mean, True, backend,
                            block_v, logits)


@cross_entropy_forward_inplace.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap, mean, backend, block_v):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows)


@_backend.custom_op("cross_entropy_backward", mutates_args=())
@_backend.on_input_device
def cross_entropy_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                           ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, backend: str,
                           block_v: int) -> torch.Tensor:
    """d(sum_i grad_rows[i] * loss_i) / d logits, recomputed from the logits and the saved lse."""
    softcap = softcap or None
    grad = torch.empty_like(logits)
    if _cpu_backend(backend):
        rows = max(1, CPU_CHUNK_BYTES // (12 * logits.shape[1]))
        for s in range(0, logits.shape[0], rows):
            g = ref.rows_loss_grad(logits[s:s + rows], labels[s:s + rows], ignore_index, label_smoothing, z_loss,
                                   softcap, True)[2]
            grad[s:s + rows] = g * grad_rows[s:s + rows, None]
        return grad
    _grad_launch(logits, labels, lse, grad, None, grad_rows, ignore_index=ignore_index, smoothing=label_smoothing,
                 z_loss=z_loss, softcap=softcap, mean=False, write_ignored=True, block_v=block_v)
    return grad


@cross_entropy_backward.register_fake
def _(logits, labels, lse, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend, block_v):
    return torch.empty_like(logits)


@_backend.custom_op("scale_", mutates_args=("x",))
@_backend.on_input_device
def scale_(x: torch.Tensor, g: torch.Tensor, backend: str) -> None:
    """x *= g (g a one-element device tensor), skipped on the device when g == 1."""
    _scale_(x, g.reshape(1).float(), backend)


@scale_.register_fake
def _(x, g, backend):
    return None


def _count_in_kernel(mean, dtype):
    """Whether the gradient computed in the forward pass is divided by the token count there (mean). Not in
    fp16: softmax / count drops below fp16's smallest subnormal for most of a large vocabulary at a few
    thousand tokens, before a loss scale could lift it. Its gradient is stored as the sum's and divided by
    the count with grad_out in backward, in fp32 (F.cross_entropy's fp16 gradient is scaled before rounding)."""
    return mean and dtype != torch.float16


def _backward_scale(ctx, grad_out):
    """The factor backward applies to the gradient held since the forward pass (grad_out, / count when the
    kernel did not divide), once: the held gradient is scaled in place."""
    if ctx.backward_done:
        raise RuntimeError("this loss's backward ran already: its gradient is computed in the forward pass and "
                           "scaled in place once; recompute the loss to differentiate it again")
    ctx.backward_done = True
    return grad_out if ctx.count is None else grad_out / ctx.count


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace_backward,
                backend, block_v):
        opts = (ignore_index, float(label_smoothing), float(z_loss), _softcap_value(softcap))
        mean = reduction == "mean"
        count = (labels != ignore_index).sum().clamp(min=1) if mean else None
        kernel_mean = _count_in_kernel(mean, logits.dtype)
        ctx.count = count if mean and not kernel_mean else None
        ctx.backward_done = False
        ctx.fused = ctx.needs_input_grad[0] and reduction != "none"
        if ctx.fused and inplace_backward:
            loss_rows, lse = _backend.call_op("cross_entropy_forward_inplace", logits, labels, *opts,
                                              kernel_mean, backend, block_v)
            ctx.save_for_backward(logits)
        elif ctx.fused:
            loss_rows, lse, grad = _backend.call_op("cross_entropy_forward", logits, labels, *opts, kernel_mean,
                                                    True, backend, block_v)
            ctx.save_for_backward(grad)
        else:
            loss_rows, lse, _ = _backend.call_op("cross_entropy_forward", logits, labels, *opts, mean, False,
                                                 backend, block_v)
            ctx.save_for_backward(logits, labels, lse)
        ctx.opts, ctx.backend, ctx.block_v = opts, backend, block_v
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total / count if mean else total

    @staticmethod
    def backward(ctx, grad_out):
        _backend.refuse_double_backward("cross-entropy")
        if ctx.fused:
            scale = _backward_scale(ctx, grad_out)
            (grad,) = ctx.saved_tensors
            _backend.call_op("scale_", grad, scale, ctx.backend)
        else:
            logits, labels, lse = ctx.saved_tensors
            grad = _backend.call_op("cross_entropy_backward", logits, labels, lse, grad_out.float().contiguous(),
                                    *ctx.opts, ctx.backend, ctx.block_v)
        return grad, None, None, None, None, None, None, None, None, None


def fused_cross_entropy(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                        softcap=None, inplace_backward=False, backend=None, block_v=0):
    """Cross-entropy of `logits` (N, V) or (B, T, V) (bf16/fp16/fp32) against int64 `labels` of the leading
    shape, with the semantics of F.cross_entropy (label smoothing included), plus
    `z_loss * logsumexp(logits)**2` per counted token and an optional `softcap * tanh(logits / softcap)`
    applied first. Math in fp32; the loss is fp32. 'mean' divides by the number of labels that are not
    `ignore_index`, and gives 0 (gradient 0) when there is none.

    For 'mean'/'sum' with grad, the gradient is computed in the forward pass (logits read once) and held
    until backward, which scales it by the incoming gradient on the device (no-op when it is 1); that
    backward can run once per forward (a second raises). fp16 logits hold it undivided by the token count
    until then, so that a loss scale applies before the fp16 rounding. `inplace_backward=True` writes it
    over `logits` (contiguous ones: saves their size in memory; the caller's logits are then destroyed).
    'none' recomputes in backward.
    `backend` forces "triton" / "cpu" / "reference"; `block_v` overrides the columns per program (tests).
    """
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_logits(logits, labels)
    backend = _backend.resolve_backend(logits, backend)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if inplace_backward and not x.is_contiguous():   # e.g. a slice of a padded vocabulary
        raise ValueError(f"inplace_backward=True needs contiguous logits, got shape {tuple(logits.shape)} with "
                         f"strides {tuple(logits.stride())}")
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < V):
        x = x.contiguous()
    if not torch.is_grad_enabled():   # no backward can follow: no gradient work, never an in-place write
        x = x.detach()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    out = _CrossEntropy.apply(x, y, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace_backward,
                              backend, block_v)
    return out.reshape(labels.shape) if reduction == "none" else out


# ------------------------------------------------------------------------------ linear cross-entropy
def _rows_within(row_bytes, chunk_bytes, n_rows):
    """Rows of `row_bytes` each that fit in `chunk_bytes`: a multiple of 128 when that many fit, at least 1,
    at most n_rows."""
    rows = max(1, int(chunk_bytes) // row_bytes)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(rows, n_rows))


def linear_ce_chunk_rows(V, dtype, chunk_bytes, n_rows, cpu=False):
    """Rows of compacted tokens per chunk: the chunk's logits (plus, on the CPU path, its fp32
    temporaries) fit in `chunk_bytes`."""
    return _rows_within(V * (12 if cpu else dtype.itemsize), chunk_bytes, n_rows)


def online_ce_sizes(V, H, dtype, chunk_bytes, n_rows, slice_v, tile_v=128):
    """(rows, columns) of the online mode's chunk: its (rows, columns) logits slice in `dtype`, its (rows, H)
    fp32 gradient accumulator and its per-row statistics (4 fp32 per tile_v-column tile, 2 x 4 running) fit
    in `chunk_bytes` together."""
    cols = min(slice_v, V)
    row_bytes = cols * dtype.itemsize + 4 * H + 16 * _backend.cdiv(cols, tile_v) + 32
    return _rows_within(row_bytes, chunk_bytes, n_rows), cols


GEMMS = ("auto", "cublas", "triton", "grouped")
LINEAR_MODES = ("chunk", "online")


def _online_mode(need_w, need_b, smoothing, softcap):
    """QLORA_KERNELS_CE_LINEAR=online: the linear variant over vocabulary slices (_linear_ce_online) instead
    of (rows, V) logits chunks. Opt-in until a GPU run has measured it. It serves a frozen head (no weight
    or bias gradient: those need each row's final softmax) and not label smoothing together with softcap
    (that smoothing term would need a second accumulator); otherwise the chunked path runs."""
    mode = os.environ.get("QLORA_KERNELS_CE_LINEAR", "chunk")
    if mode not in LINEAR_MODES:
        raise ValueError(f"QLORA_KERNELS_CE_LINEAR={mode!r}: expected one of {LINEAR_MODES}")
    return mode == "online" and not need_w and not need_b and not (softcap and smoothing > 0)


def _ce_gemm():
    gemm = os.environ.get("QLORA_KERNELS_CE_GEMM", "auto")
    if gemm not in GEMMS:
        raise ValueError(f"QLORA_KERNELS_CE_GEMM={gemm!r}: expected one of {GEMMS}")
    return gemm


def _cublas_gemms(h):
    """Whether a chunk whose live rows are known on the host (the count's copy has landed: _CountOnHost.live)
    runs its logits and input-gradient GEMMs through cuBLAS on exactly those rows: the H100 run measured the
    two GEMMs at 72 ms by cuBLAS against ~108 ms by the Triton bounded GEMM (32768 x 3072 -> 128256). While the
    count is in flight (or under CUDA graph capture) the Triton GEMMs, bounded on the device, run as before.
    The default ("auto") on CUDA; "cublas" also on CPU tensors (the interpreter tests), where "auto" keeps
    the Triton kernels the interpreter exists to test; "triton" never."""
    gemm = _ce_gemm()
    return gemm == "cublas" or (gemm == "auto" and h.is_cuda)


def _grouped_gemms(h, w, b):
    """QLORA_KERNELS_CE_GEMM=grouped: the logits and input-gradient GEMMs of the linear variant through
    torch._grouped_mm with the chunk's live-row count as its (device-side) group offset: CUTLASS GEMMs that
    skip the dead rows with no host sync. Measured slower than the Triton GEMMs (124.5 against 118 ms at
    100 % labelled on the H100). On CUDA only torch's CUTLASS path qualifies: sm_90 / sm_100, bf16
    (its per-group fallback, e.g. for fp16, copies the offsets to the host), plus H and V multiples of 8 and
    no bias; otherwise the Triton GEMMs run."""
    if _ce_gemm() != "grouped" or b is not None or not hasattr(torch, "_grouped_mm"):
        return False
    if h.is_cuda:
        return (_capability_major(h.device) in (9, 10) and h.dtype == torch.bfloat16
                and h.shape[1] % 8 == 0 and w.shape[0] % 8 == 0)
    return True   # CPU tensors (interpreter tests): torch's reference implementation of the op


class _CountOnHost:
    """The labelled-row count on the host once it is there, never waited for. A CUDA count is copied to
    pinned memory behind an event; `past(s)` is True only when that copy has landed (the query does not
    block) and count <= s. The chunk loop then stops launching chunks past the count, which would only
    exit at once but still cost ~5 launches of host time each (the host-bound case: the GPU keeps up).
    While the GPU is behind, every chunk is launched as before. Off while a CUDA graph is captured (a
    replay has another count); CPU tensors (the interpreter) know it at once."""

    def __init__(self, count):
        self.value, self.event = None, None
        if not count.is_cuda:
            self.value = int(count)
            return
        with torch.cuda.device(count.device):   # the copy, the event and the capture check on one stream
            if not torch.cuda.is_current_stream_capturing():
                self.host = torch.empty(count.shape, dtype=count.dtype, pin_memory=True)
                self.host.copy_(count, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()

    def past(self, s):
        return self.live(s, 1) == 0

    def live(self, s, r):
        """Labelled rows among compacted rows [s, s + r) if the count is on the host, else None."""
        if self.value is None and self.event is not None and self.event.query():
            self.value = int(self.host)
        return None if self.value is None else max(0, min(r, self.value - s))


class LabelledCountHint:
    """The labelled-row count of `labels` (1-D, contiguous, as the linear variant will receive them), its
    copy to the host started NOW: patch_model makes one before the model's forward, so that by the time the
    loss runs the GPU has long passed the copy, and the chunk loop launches no chunk past the count (a
    count made inside the op waits behind the whole forward's GPU work). Used only for labels with the same
    storage, size, version and ignore_index; the kernels still read the op's own device count."""

    def __init__(self, labels, ignore_index):
        self.key = self._key(labels, ignore_index)
        self.count = (labels != ignore_index).sum(dtype=torch.int32).reshape(1)
        self.counted = _CountOnHost(self.count)

    @staticmethod
    def _key(labels, ignore_index):
        return labels.device, labels.data_ptr(), labels.numel(), labels._version, ignore_index


_HINT = threading.local()


@contextlib.contextmanager
def count_hint(hint):
    """Within the block, a linear cross-entropy over the hint's labels uses its early host count."""
    old, _HINT.value = getattr(_HINT, "value", None), hint
    try:
        yield
    finally:
        _HINT.value = old


def _counted(labels, ignore_index, count):
    """(the host count the chunk loop prunes by, the hint's device count where a hint supplied it, else None)."""
    hint = getattr(_HINT, "value", None)
    if hint is not None and hint.key == LabelledCountHint._key(labels, ignore_index):
        return hint.counted, hint.count
    return _CountOnHost(count), None


def _poison_if_understated(count, hinted, loss_c, grad_h):
    """A hint's count below the op's own (its labels gained labelled rows through .data, which keeps the version
    the hint is keyed on) stopped the chunk loop early: rows were never computed. Made loud on the device, with
    no sync: every loss NaN and one gradient element NaN (FusedAdamW then skips the step)."""
    if hinted is None:
        return
    short = count > hinted
    loss_c.masked_fill_(short, float("nan"))
    if grad_h is not None:
        grad_h[:1, :1].masked_fill_(short, float("nan"))


def _alloc_chunk(rows, V, dtype, device):
    """The linear variant's one logits buffer, (rows, V) or (rows, slice) in the online mode (a function so
    tests can watch its size)."""
    return torch.empty((rows, V), dtype=dtype, device=device)


def _compact(labels, ignore_index):
    """The labelled rows, compacted on the device with no host sync: (count (1,) int32, idx (N,) int64 the
    original row of each compacted position, back (N,) the same with N (drop) past the count, and the
    compacted labels, ignore_index past the count). Positions >= count hold row 0 and are never used. The
    GEMMs read hidden's labelled rows and write their gradient rows through idx: no compacted copies. A
    function so its (N,) temporaries are freed before the chunk buffers exist."""
    N = labels.shape[0]
    valid = labels != ignore_index
    count = valid.sum(dtype=torch.int32).reshape(1)
    target = torch.where(valid, valid.cumsum(0) - 1, N)
    ar = torch.arange(N, device=labels.device)
    idx = torch.zeros(N + 1, dtype=torch.int64, device=labels.device).scatter_(0, target, ar)[:N]
    live = ar < count
    return count, idx, torch.where(live, idx, N), torch.where(live, labels[idx], ignore_index)


def _uncompact(loss_c, back):
    """Per-row losses in the original row order from the compacted ones (0 for unlabelled rows)."""
    N = loss_c.shape[0]
    return loss_c.new_zeros(N + 1).index_copy_(0, back, loss_c)[:N]


def _linear_ce_triton(h, w, b, labels, gscale, opts, mean, need_h, need_w, need_b, chunk_bytes):
    ignore_index, smoothing, z_loss, softcap = opts
    softcap = softcap or None
    N, H = h.shape
    V = w.shape[0]
    dev = h.device
    count, idx, back, lab_c = _compact(labels, ignore_index)
    gs_c = None if gscale is None else gscale[idx].float().contiguous()
    loss_c = torch.empty(N, dtype=torch.float32, device=dev)
    counted, hinted = _counted(labels, ignore_index, count)
    if _online_mode(need_w, need_b, smoothing, softcap):
        grad_h = torch.zeros((N, H), dtype=h.dtype, device=dev) if need_h else None
        _linear_ce_online(h, w, b, count, counted, idx, lab_c, gs_c, loss_c, grad_h, opts, mean, chunk_bytes)
        _poison_if_understated(count, hinted, loss_c, grad_h)
        return _uncompact(loss_c, back), grad_h, None, None
    R = linear_ce_chunk_rows(V, h.dtype, chunk_bytes, max(N, 1))
    grouped = _grouped_gemms(h, w, b)
    cublas = not grouped and _cublas_gemms(h)
    buf = None if grouped else _alloc_chunk(R, V, h.dtype, dev)   # grouped: each chunk's GEMM output
    lse_c = torch.empty(N, dtype=torch.float32, device=dev)
    # unlabelled rows stay 0; the grouped and cuBLAS paths scatter whole chunks, their dead rows into the extra row N
    # (cuBLAS: rows past the device count when a count hint's host value overstates it, e.g. labels changed
    # through .data or a DLPack view, which keeps their version: never let them overwrite row idx = 0)
    grad_h = torch.zeros((N + (grouped or cublas), H), dtype=h.dtype, device=dev) if need_h else None
    grad_w = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    compute_grad = need_h or need_w or need_b
    wt = w.t()
    for s in range(0, N, R):
        if counted.past(s):
            break
        r = min(R, N - s)
        live = counted.live(s, r) if cublas else None
        if live is not None:   # the live rows known: cuBLAS on exactly those (the kernels' device bounds agree)
            r = live
        rows = idx[s:s + r]
        if live is not None:
            lg = buf[:r]
            hs = h.index_select(0, rows)
            torch.mm(hs, wt, out=lg) if b is None else torch.addmm(b.to(lg.dtype), hs, wt, out=lg)
        elif grouped:   # rows past the count are neither computed nor read
            n_live = (count - s).clamp(0, r)
            lg = torch._grouped_mm(h.index_select(0, rows), wt[None], offs=n_live)
        else:
            lg = buf[:r]
            _bounded_mm(h, wt, lg, count, s, limit_m=True, bias=b, gather_a=rows)
        _ce_launch(lg, lab_c[s:s + r], loss_c[s:s + r], lse_c[s:s + r], lg if compute_grad else None, count,
                   None if gs_c is None else gs_c[s:s + r], ignore_index=ignore_index, smoothing=smoothing,
                   z_loss=z_loss, softcap=softcap, mean=mean, write_ignored=False)
        if need_h and live is not None:   # through back: compacted positions past the device count -> row N
            grad_h.index_copy_(0, back[s:s + r], torch.mm(lg, w))
        elif need_h and grouped:
            grad_h.index_copy_(0, back[s:s + r], torch._grouped_mm(lg, w[None], offs=n_live))
        elif need_h:
            _bounded_mm(lg, w, grad_h, count, s, limit_m=True, kind="dgrad", scatter_c=rows)
        if need_w:
            _bounded_mm(lg.t(), h, grad_w, count, s, limit_k=True, accumulate=True, gather_b=rows)
        if need_b:
            kernels.colsum_kernel[(_backend.cdiv(V, 256),)](lg, grad_b, count, s, r, V, lg.stride(0), BLOCK_R=32,
                                                          BLOCK_C=256)
    grad_h = grad_h[:N] if need_h else None
    _poison_if_understated(count, hinted, loss_c, grad_h)
    return _uncompact(loss_c, back), grad_h, grad_w, grad_b


def _linear_ce_online(h, w, b, count, counted, idx, lab_c, gs_c, loss_c, grad_h, opts, mean, chunk_bytes):
    """The frozen-head linear cross-entropy over vocabulary slices (kernels: online_*): per chunk of
    compacted rows and per slice, a logits GEMM with a statistics epilogue and a gradient GEMM that folds
    the slice into the running softmax and its fp32 (rows, H) accumulator; then one finishing pass per
    chunk. Same two GEMMs over the labelled rows as the chunked path, but the working memory is a (rows,
    slice) logits buffer plus the accumulator, both within chunk_bytes, and no separate cross-entropy
    pass over the logits. Fills loss_c (per compacted row) and grad_h's labelled rows."""
    ignore_index, smoothing, z_loss, softcap = opts
    softcap = softcap or None
    N, H = h.shape
    V = w.shape[0]
    dev = h.device
    slice_v = int(os.environ.get("QLORA_KERNELS_CE_SLICE_V", kernels.ONLINE_SLICE_V))   # env: benchmark sweeps
    if slice_v <= 0:
        raise ValueError(f"QLORA_KERNELS_CE_SLICE_V={slice_v}: expected a positive number of vocabulary columns")
    interp = _backend.interpreting()
    cfg1 = dict(kernels.MM_INTERPRET_CONFIG if interp else kernels.ONLINE_LOGITS_CONFIGS[_mm_arch(dev)])
    R, NS = online_ce_sizes(V, H, h.dtype, chunk_bytes, max(N, 1), slice_v, cfg1["BN"])
    cfg2 = kernels.MM_INTERPRET_CONFIG
    if not interp:   # 64-row tiles with softcap (128 spill) and where 128-row tiles leave SMs idle (few rows)
        cfg2 = kernels.ONLINE_GRAD_CONFIGS[_mm_arch(dev)]
        if softcap or _backend.cdiv(R, cfg2["BM"]) * _backend.cdiv(H, cfg2["BN"]) < _backend.num_sms(dev):
            cfg2 = kernels.ONLINE_GRAD_NARROW_CONFIGS[_mm_arch(dev)]
    cfg2 = dict(cfg2)
    n_tiles_max = _backend.cdiv(NS, cfg1["BN"])
    nt_step = min(8, _backend.next_power_of_2(n_tiles_max))   # partials read per step by the gradient GEMM
    grad = grad_h is not None
    x = _alloc_chunk(R, NS, h.dtype, dev)
    o = torch.empty((R, H), dtype=torch.float32, device=dev) if grad else x
    part = torch.empty((4, R, n_tiles_max), dtype=torch.float32, device=dev)
    stats = torch.empty((2, 4, R), dtype=torch.float32, device=dev)
    colsum = torch.sum(w, 0, dtype=torch.float32) if grad and smoothing > 0 else None
    lowp = h.dtype != torch.float32
    flags = dict(HAS_SOFTCAP=softcap is not None, UPCAST=interp, IEEE=not lowp)
    sc = _softcap_value(softcap)
    programs = (lambda tiles: tiles) if interp else (lambda tiles: min(tiles, _backend.num_sms(dev)))
    slices = range(0, V, NS)
    for s in range(0, N, R):
        if counted.past(s):
            break
        r = min(R, N - s)
        rows, labels = idx[s:s + r], lab_c[s:s + r]
        for j, v0 in enumerate(slices):
            ns = min(NS, V - v0)
            n_tiles = _backend.cdiv(ns, cfg1["BN"])
            kernels.online_logits_kernel[(programs(_backend.cdiv(r, cfg1["BM"]) * n_tiles),)](
                h, w, b if b is not None else w, x, part, rows, labels, count, s, r, H, V, v0, ns, n_tiles,
                h.stride(0), w.stride(0), x.stride(0), sc, HAS_BIAS=b is not None, ROUND=lowp,
                **flags, **cfg1)
            n_h = _backend.cdiv(H, cfg2["BN"]) if grad else 1
            kernels.online_grad_kernel[(programs(_backend.cdiv(r, cfg2["BM"]) * n_h),)](
                x, w, o, part, stats, count, s, r, H, v0, ns, n_tiles, j % 2, x.stride(0), w.stride(0),
                o.stride(0), sc, FIRST=j == 0, COMPUTE_GRAD=grad, EVEN_K=ns % cfg2["BK"] == 0, NT_STEP=nt_step,
                **flags, **cfg2)
        kernels.online_finish_kernel[(r,)](
            o, stats, w, colsum if colsum is not None else o, labels, rows, grad_h if grad else o, loss_c[s:s + r],
            gs_c[s:s + r] if gs_c is not None else o, count, count, s, r, V, H, len(slices) % 2,
            o.stride(0), w.stride(0), grad_h.stride(0) if grad else 0, smoothing, z_loss, sc, COMPUTE_GRAD=grad,
            HAS_SOFTCAP=softcap is not None, HAS_COLSUM=colsum is not None, HAS_GSCALE=gs_c is not None, MEAN=mean,
            BLOCK_H=min(kernels.ONLINE_FINISH_BLOCK_H, _backend.next_power_of_2(H)))


def _linear_ce_cpu(h, w, b, labels, gscale, opts, mean, need_h, need_w, need_b, chunk_bytes):
    ignore_index, smoothing, z_loss, softcap = opts
    softcap = softcap or None
    N, H = h.shape
    V = w.shape[0]
    rows_idx = (labels != ignore_index).nonzero().squeeze(1)   # CPU tensors: no device to sync with
    count = max(1, rows_idx.numel())
    loss = h.new_zeros(N, dtype=torch.float32)
    grad_h = h.new_zeros((N, H)) if need_h else None
    grad_w = h.new_zeros((V, H), dtype=torch.float32) if need_w else None
    grad_b = h.new_zeros(V, dtype=torch.float32) if need_b else None
    w32 = w.float()
    R = linear_ce_chunk_rows(V, torch.float32, chunk_bytes, max(rows_idx.numel(), 1), cpu=True)
    compute_grad = need_h or need_w or need_b
    for s in range(0, rows_idx.numel(), R):
        sel = rows_idx[s:s + R]
        hc = h.index_select(0, sel).float()
        logits = _alloc_chunk(sel.numel(), V, torch.float32, h.device)
        torch.matmul(hc, w32.t(), out=logits)
        if b is not None:
            logits += b.float()
        l, _, g = ref.rows_loss_grad(logits, labels[sel], ignore_index, smoothing, z_loss, softcap, compute_grad)
        loss[sel] = l
        if not compute_grad:
            continue
        if gscale is not None:
            g *= gscale[sel].float()[:, None]
        if mean:
            g /= count
        if need_h:
            grad_h[sel] = (g @ w32).to(h.dtype)
        if need_w:
            grad_w.addmm_(g.t(), hc)
        if need_b:
            grad_b += g.sum(0)
    return loss, grad_h, grad_w, grad_b


def _linear_impl(hidden, weight, bias, labels, gscale, ignore_index, label_smoothing, z_loss, softcap, mean,
                 need_h, need_w, need_b, chunk_bytes, backend):
    opts = (ignore_index, label_smoothing, z_loss, softcap)
    fn = _linear_ce_cpu if _cpu_backend(backend) else _linear_ce_triton
    loss, gh, gw, gb = fn(hidden, weight, bias, labels, gscale, opts, mean, need_h, need_w, need_b, chunk_bytes)
    f32 = dict(dtype=torch.float32)
    return (loss, gh if gh is not None else hidden.new_empty(0), gw if gw is not None else hidden.new_empty(0, **f32),
            gb if gb is not None else hidden.new_empty(0, **f32))


@_backend.custom_op("linear_cross_entropy", mutates_args=())
@_backend.on_input_device
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         gscale: torch.Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                         softcap: float, mean: bool, need_h: bool, need_w: bool, need_b: bool, chunk_bytes: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row fp32 loss, grad hidden, fp32 grad weight, fp32 grad bias) of sum_i gscale_i * loss_i
    (gscale 1 when None; / count when mean); a gradient not asked for is an empty tensor."""
    _check_label_range(labels, weight.shape[0], ignore_index)
    return _linear_impl(hidden, weight, bias, labels, gscale, ignore_index, label_smoothing, z_loss, softcap, mean,
                        need_h, need_w, need_b, chunk_bytes, backend)


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, gscale, ignore_index, label_smoothing, z_loss, softcap, mean, need_h, need_w,
      need_b, chunk_bytes, backend):
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(N, **f32), hidden.new_empty((N, H) if need_h else (0,)),
            hidden.new_empty((V, H) if need_w else (0,), **f32), hidden.new_empty((V,) if need_b else (0,), **f32))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, z_loss, softcap,
                chunk_bytes, backend):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        mean = reduction == "mean"
        count = (labels != ignore_index).sum().clamp(min=1) if mean else None
        kernel_mean = _count_in_kernel(mean, hidden.dtype)
        ctx.count = count if mean and not kernel_mean else None
        ctx.backward_done = False
        opts = (ignore_index, float(label_smoothing), float(z_loss), _softcap_value(softcap))
        ctx.none = reduction == "none"
        ctx.flags = (need_h, need_w, need_b)
        ctx.args = (opts, chunk_bytes, backend)
        grads = need_h or need_w or need_b
        loss, gh, gw, gb = _backend.call_op(
            "linear_cross_entropy", hidden, weight, bias, labels, None, *opts, kernel_mean, need_h and not ctx.none,
            need_w and not ctx.none, need_b and not ctx.none, chunk_bytes, backend)
        if ctx.none:   # per-row gradient scales are known only in backward: recompute there
            ctx.save_for_backward(hidden, weight, bias, labels)
            return loss
        if grads:
            ctx.save_for_backward(gh, gw, gb)
        total = loss.sum()
        return total / count if mean else total

    @staticmethod
    def backward(ctx, grad_out):
        _backend.refuse_double_backward("cross-entropy")
        need_h, need_w, need_b = ctx.flags
        if ctx.none:
            hidden, weight, bias, labels = ctx.saved_tensors
            opts, chunk_bytes, backend = ctx.args
            _, gh, gw, gb = _backend.call_op(
                "linear_cross_entropy", hidden, weight, bias, labels, grad_out.contiguous(), *opts, False, need_h,
                need_w, need_b, chunk_bytes, backend)
        else:
            scale = _backward_scale(ctx, grad_out)
            gh, gw, gb = ctx.saved_tensors
            for t, need in ((gh, need_h), (gw, need_w), (gb, need_b)):
                if need:
                    _backend.call_op("scale_", t, scale, ctx.args[2])
        return (gh if need_h else None, gw if need_w else None, gb if need_b else None,
                None, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_bytes=DEFAULT_CHUNK_BYTES,
                               backend=None):
    """fused_cross_entropy(hidden @ weight.T (+ bias), labels, ...) without materializing the (N, V) logits.

    hidden (N, H) or (B, T, H); weight (V, H); bias (V,) or None; labels int64 of hidden's leading shape,
    ALREADY ALIGNED with hidden (shift them yourself for next-token prediction: labels[:, t] is the target
    of hidden[:, t]). Only rows whose label is not `ignore_index` are computed: they are compacted on the
    device (no host sync) and processed in chunks of at most `chunk_bytes` of logits (default 128 MB), so
    the extra memory does not grow with N x V. The gradients (computed in the forward pass) are for hidden,
    and for weight / bias only when they require grad (a frozen head costs no weight-gradient GEMM);
    weight and bias gradients accumulate in fp32. For 'none', backward recomputes the chunks.
    With QLORA_KERNELS_CE_LINEAR=online a frozen head runs over vocabulary slices instead (an online softmax
    with an fp32 (rows, H) gradient accumulator): `chunk_bytes` then bounds the (rows, slice) logits plus
    that accumulator, and a few MB cost no extra GEMM work.
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be torch.Tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if torch.is_autocast_enabled(hidden.device.type):   # as F.linear under autocast: the GEMMs in its dtype
        cd = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(cd), weight.to(cd)
        bias = None if bias is None else bias.to(cd)
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"expected hidden (N, H) or (B, T, H) and weight (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) of dtype {hidden.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if int(chunk_bytes) <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    chunk_bytes = min(int(chunk_bytes), 1 << 62)    # the op's schema takes an int64
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_labels(labels, hidden.shape[:-1], name="hidden")
    _backend.check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    backend = _backend.resolve_backend(hidden, backend)
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    if not torch.is_grad_enabled():   # no backward can follow: no gradient GEMMs
        h, weight, bias = h.detach(), weight.detach(), None if bias is None else bias.detach()
    out = _LinearCrossEntropy.apply(h, weight.contiguous(), None if bias is None else bias.contiguous(), y,
                                    ignore_index, reduction, label_smoothing, z_loss, softcap, int(chunk_bytes),
                                    backend)
    return out.reshape(labels.shape) if reduction == "none" else out
