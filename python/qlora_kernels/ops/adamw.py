"""FusedAdamW launchers: build the per-launch tensor tables, launch the Triton kernels (CUDA, or CPU under
TRITON_INTERPRET=1), or call the C++ extension / the reference on CPU.

A pointer table, not a flat buffer: the optimizer updates the caller's tensors where they are (no
`p.data` rebinding, no copy of the grads into a buffer, torch's state layout kept); the tables are built
once per set of (param, grad) addresses and cached by the optimizer (benchmarks/NOTES.md).
"""
import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import adamw as kernels
from qlora_kernels.reference import adamw as ref

DTYPE_CODES = {torch.float32: kernels.DT_FP32, torch.bfloat16: kernels.DT_BF16, torch.float16: kernels.DT_FP16}


def block_size(numels=(), norm=False) -> int:
    if _backend.interpreting():  # cost per program and per array element: one chunk per tensor, no bigger
        return min(kernels.INTERPRET_BLOCK, max(256, _backend.next_power_of_2(max(numels, default=1))))
    return kernels.NORM_BLOCK if norm else kernels.UPDATE_BLOCK


def _upload(table, device):
    """A host-built table on `device` without a host sync: from pinned memory by a non-blocking copy. (A
    pageable copy to the GPU waits for the work queued before it: the whole backward, when the param or grad
    addresses changed and the tables are rebuilt.)"""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _chunk_table(numels, block, device):
    """int32 (2 * C): (tensor index, chunk index) of every BLOCK-sized chunk of every tensor."""
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
    starts = torch.cumsum(counts, 0) - counts
    chunk_idx = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)
    table = torch.stack([tensor_idx, chunk_idx], dim=1).to(torch.int32).flatten()
    return _upload(table, device), int(counts.sum())


class UpdateTable:
    """Device tables of one update launch (one param group on one device)."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        device = params[0].device
        self.block, self.num_warps = block_size([p.numel() for p in params]), kernels.UPDATE_WARPS
        vmax = max_exp_avg_sqs if max_exp_avg_sqs is not None else exp_avg_sqs
        rows = [[t.data_ptr() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, vmax, steps)]
        rows.append([p.numel() for p in params])
        rows.append([DTYPE_CODES[p.dtype] for p in params])
        self.meta = _upload(torch.tensor(rows, dtype=torch.int64), device)
        self.n_tensors = len(params)
        self.chunks, self.n_programs = _chunk_table(rows[kernels.NUMEL.value], self.block, device)


class PrologueTable:
    """Device tables of the prologue launch (every grad and step counter on one device)."""

    def __init__(self, grads, steps, device):
        numels = [g.numel() for g in grads]
        self.block = block_size(numels, norm=True)
        rows = [[g.data_ptr() for g in grads], numels, [DTYPE_CODES[g.dtype] for g in grads]]
        self.meta = _upload(torch.tensor(rows, dtype=torch.int64), device)
        self.n_tensors = len(grads)
        self.chunks, self.n_programs = _chunk_table(numels, self.block, device)
        self.step_addrs = _upload(torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64), device)
        self.n_steps = len(steps)
        self.partials = torch.empty(2 * max(1, self.n_programs), dtype=torch.float32, device=device)
        self.ticket = torch.zeros((), dtype=torch.int32, device=device)


def new_stats(device, zero=False):
    """fp32 buffer the prologue fills: sum of squares, non-finite count, norm, clip factor, ok. Fresh each
    step (last_grad_norm is a view of it); uninitialized unless `zero` (no launch for a fill)."""
    alloc = torch.zeros if zero else torch.empty
    return alloc(kernels.STATS_SIZE, dtype=torch.float32, device=device)


@_backend.on_input_device
def launch_prologue(table, stats, skipped, *, norm, finalize, max_grad_norm, skip_nonfinite):
    """norm: reduce every grad into stats (sum of squares, non-finite count); finalize: norm, clip factor and
    skip decision into stats, skipped += not ok, every step counter += ok."""
    norm = norm and table.n_programs > 0
    clip = max_grad_norm is not None
    grid = (table.n_programs,) if norm else (1,)
    kernels.adamw_prologue_kernel[grid](
        table.meta, table.chunks, table.n_tensors, table.partials, table.ticket, stats, table.step_addrs,
        table.n_steps, skipped, float(max_grad_norm) if clip else 0.0,
        NORM=norm, FINALIZE=finalize, CLIP=clip, SKIP=skip_nonfinite, BLOCK=table.block,
        RBLOCK=kernels.REDUCE_BLOCK, num_warps=kernels.NORM_WARPS)


@_backend.on_input_device
def launch_update(table, stats, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, clip, skip_nonfinite,
                  stochastic_rounding=False, seed=0):
    """One AdamW launch over every tensor of `table`; step counters must already be advanced."""
    if table.n_programs == 0:
        return
    kernels.adamw_update_kernel[(table.n_programs,)](
        table.meta, table.chunks, table.n_tensors, stats, float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), int(seed),
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), CLIP=bool(clip), SKIP=bool(skip_nonfinite),
        STOCHASTIC=bool(stochastic_rounding), BLOCK=table.block, num_warps=table.num_warps,
        **_backend.no_fp_fusion())   # torch rounds p * f32(1 - lr wd) before the add


def cpu_grad_stats(grads):
    """fp64 [sum of squares, non-finite count] of CPU grads: the extension, else the reference."""
    native = _backend.native()
    if native is not None:
        return native.adamw_grad_stats_cpu(grads)
    return ref.grad_stats(grads)


def cpu_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
             amsgrad, maximize, grad_scale=None, stochastic_rounding=False, seed=0, use_native=True):
    """One AdamW step over CPU tensors: the OpenMP extension (one call for the whole list), else the reference."""
    native = _backend.native() if use_native else None
    if native is None:
        ref.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                       grad_scale=grad_scale)
        return
    native.adamw_step_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps,
                          float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
                          bool(maximize), 1.0 if grad_scale is None else float(grad_scale),
                          bool(stochastic_rounding), int(seed))
