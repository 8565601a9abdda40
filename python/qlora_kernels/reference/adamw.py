"""torch.optim.AdamW's update in plain PyTorch, fp32 math and fp32 states whatever the param dtype.

The contract (torch's single-tensor AdamW, ../shared/notes/nf4-format.md), per step, `t += 1` first,
`g = -g` when maximize, `g = g * clip_coef` when clipping:
    p = p * f32(1 - lr * wd)
    m = lerp(m, g, f32(1 - b1))                     (torch's m.lerp_(g, 1 - b1): fma(w, g - m, m) for w < 0.5,
                                                     else fma(w - 1, g - m, g))
    v = fma(f32(1 - b2) * g, g, v * f32(b2))        (torch: v.mul_(b2).addcmul_(g, g, value=1 - b2))
    vmax = max(vmax, v) and v := vmax               (amsgrad)
    denom = sqrt(v) / f32(sqrt(1 - b2**t)) + f32(eps)
    p = p + (f32(-lr / (1 - b1**t)) * m) / denom
The bias corrections are computed in double from the step count, then rounded to fp32.
Global gradient-norm clip as `torch.nn.utils.clip_grad_norm_`: coef = min(max_norm / (norm + 1e-6), 1).
No triton import here: this is also the CPU fallback when the native extension is missing.
"""
import torch


def grad_stats(grads):
    """fp64 tensor [sum of squares, number of non-finite values] over all `grads` (on their device)."""
    device = grads[0].device
    sumsq = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        g = g.to(device)
        sumsq += g.double().square().sum()
        bad += (~torch.isfinite(g)).sum()
    return torch.stack([sumsq, bad])


def finalize(sumsq, max_grad_norm):
    """(norm as an fp32 0-d tensor, clip factor as an fp32 0-d tensor or None) from a sum of squares,
    with clip_grad_norm_'s fp32 ops: clamp(max_norm / (norm + 1e-6), max=1)."""
    norm = sumsq.to(torch.float32).sqrt()
    if max_grad_norm is None:
        return norm, None
    return norm, (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad=False, maximize=False, grad_scale=None):
    """One AdamW step, in place, over lists of tensors. States are fp32; params of any float dtype are
    updated in fp32 and rounded once (to nearest even). `steps`: 0-d fp32 tensors, advanced here.
    `grad_scale`: clip factor (float or 0-d tensor) multiplied into every gradient first."""
    for i, p in enumerate(params):
        g = grads[i].to(torch.float32)
        if grad_scale is not None:
            g = g * grad_scale
        if maximize:
            g = -g
        m, v = exp_avgs[i], exp_avg_sqs[i]
        steps[i] += 1
        t = float(steps[i])
        p32 = p.float() if p.dtype != torch.float32 else p
        p32.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        bias_correction1 = 1 - beta1 ** t
        bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-(lr / bias_correction1))
        if p32 is not p:
            p.copy_(p32)

