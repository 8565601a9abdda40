"""Plain-PyTorch cross-entropy with the options of qlora_kernels.fused_cross_entropy (no triton import).

`cross_entropy` is the autograd reference the tests compare against; `rows_loss_grad` is the per-chunk
math of the CPU path (fp32 loss, lse and the gradient of each row's loss).
"""
import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def apply_softcap(x, softcap):
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None, upcast=True):
    """F.cross_entropy on `logits` (upcast to fp32 unless upcast=False) after the soft cap, plus
    z_loss * logsumexp**2 per counted token; 'mean' divides by the number of counted tokens (0 when none)."""
    x = logits.float() if upcast else logits
    x = apply_softcap(x.reshape(-1, x.shape[-1]), softcap)
    y = labels.reshape(-1)
    valid = y != ignore_index
    loss = F.cross_entropy(x, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1).pow(2) * valid
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def rows_loss_grad(x, labels, ignore_index, label_smoothing, z_loss, softcap, compute_grad):
    """For a (rows, V) chunk: fp32 per-row loss (0 where ignored), lse, and d loss_row / d x (fp32, zero
    rows where ignored) when compute_grad."""
    x = x.float()
    # the cap in fp64: torch 2.11's CPU fp32 tanh on the H100 machine's CPU failed test_large_softcap_is_accurate
    # (softcap 1e6 multiplies any absolute error of tanh at |u| ~ 1e-6 by 1e6); torch 2.13's here passes
    z = x if softcap is None else apply_softcap(x.double(), softcap).float()
    V = z.shape[-1]
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)
    lse = torch.logsumexp(z, -1)
    zy = z.gather(1, y[:, None]).squeeze(1)
    loss = lse - (1 - label_smoothing) * zy + z_loss * lse * lse
    if label_smoothing:
        loss = loss - label_smoothing / V * z.sum(-1)
    loss = torch.where(valid, loss, 0.0)
    lse = torch.where(valid, lse, 0.0)
    if not compute_grad:
        return loss, lse, None
    grad = torch.exp(z - lse[:, None]).mul_((1 + 2 * z_loss * lse)[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / V)
    grad.scatter_add_(1, y[:, None], torch.full_like(zy[:, None], -(1 - label_smoothing)))
    if softcap is not None:
        grad.mul_(1 - (z / softcap).pow(2))
    grad.mul_(valid[:, None])
    return loss, lse, grad
