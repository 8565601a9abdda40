"""fused_cross_entropy and fused_linear_cross_entropy against F.cross_entropy / F.linear in fp32.

Backends: "triton" (interpreted on CPU tensors without a GPU, compiled on CUDA) and the chunked
plain-PyTorch CPU path ("reference"). Interpreted shapes stay small (cost follows the program count).
"""
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_kernels import _backend
from qlora_kernels.kernels.cross_entropy import (MM_ACC_CONFIGS, MM_CONFIGS, MM_DGRAD_CONFIGS, ONLINE_GRAD_CONFIGS,
                                                 ONLINE_GRAD_NARROW_CONFIGS, ONLINE_LOGITS_CONFIGS)
from qlora_kernels.ops import cross_entropy as ops
from qlora_kernels.ops.cross_entropy import fused_cross_entropy, fused_linear_cross_entropy
from qlora_kernels.reference import cross_entropy as ref
from qlora_kernels.testing import CompileCase, assert_close, assert_no_spills, check_cuda_graph, compile_for_gpu

TRITON_OK = torch.cuda.is_available() or _backend.interpreting()
BACKENDS = ["reference"] + (["triton"] if TRITON_OK else [])
OPTIONS = [  # each option alone, then combinations (not the full product)
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(reduction="sum", label_smoothing=0.05, softcap=30.0),
    dict(reduction="none", z_loss=1e-2, label_smoothing=0.2),
    dict(reduction="mean", label_smoothing=0.1, z_loss=1e-4, softcap=10.0, ignore_index=7),
]
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}


def _labels(n, V, frac, ignore_index=-100, device="cpu"):
    y = torch.randint(0, V, (n,), device=device)
    keep = round(frac * n)
    y[torch.randperm(n, device=device)[keep:]] = ignore_index
    return y


def _weights(loss):
    """A grad_output that is not all ones (per row for 'none', 3.0 for a scalar)."""
    return torch.rand_like(loss) + 0.5 if loss.dim() else torch.tensor(3.0, device=loss.device)


def _default_backend(device):
    return "triton" if device == "cuda" or _backend.interpreting() else "reference"


def _skip_unsupported(backend, device):
    if backend == "triton" and device == "cpu" and not _backend.interpreting():
        pytest.skip("Triton on CPU tensors needs the interpreter")
    if backend == "reference" and device == "cuda":
        pytest.skip("the CPU path is checked on CPU")


def _check_ce(logits, labels, backend, block_v=0, **opts):
    _skip_unsupported(backend, logits.device.type)
    x = logits.detach().clone().requires_grad_()
    xr = logits.detach().float().requires_grad_()   # the fp32 reference sees the same (rounded) values
    out = fused_cross_entropy(x, labels, backend=backend, block_v=block_v, **opts)
    expected = ref.cross_entropy(xr, labels, **opts)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    g = _weights(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    atol, rtol = TOL[logits.dtype]
    assert_close(out, expected, atol=1e-4 if logits.dtype == torch.float32 else 1e-3, rtol=1e-4, msg="loss")
    scale = float(xr.grad.abs().max()) or 1.0
    assert_close(x.grad.float(), xr.grad, atol=atol * scale, rtol=rtol, msg="grad")
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_softcap_is_accurate(backend, device):
    """softcap >> |logits| is nearly the identity: tanh must not lose the small ratios (2 * sigmoid(2u) - 1 left an
    absolute error ~ softcap * 2**-23 in every logit: 0.05 in the loss at softcap 1e6)."""
    V = 300
    logits = torch.randn(8, V, device=device, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (8,), device=device)
    for softcap in (30.0, 1e4, 1e6):
        out = fused_cross_entropy(logits.float(), labels, backend=backend, softcap=softcap, reduction="none")
        capped = softcap * torch.tanh(logits / softcap)
        expected = F.cross_entropy(capped, labels, reduction="none")
        assert_close(out.double(), expected, atol=2e-6, rtol=2e-6, msg=f"softcap {softcap}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_options_v32003(backend, opts, device):
    V = 32003
    labels = _labels(6, V, 0.5, opts.get("ignore_index", -100), device)
    _check_ce(torch.randn(6, V, device=device) * 4, labels, backend, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_multichunk(dtype, backend, device):
    V = 4099                                      # 5 chunks of 1024 columns, a partial last one
    logits = (torch.randn(16, V, device=device) * 3).to(dtype)
    _check_ce(logits, _labels(16, V, 0.75, device=device), backend, block_v=1024, label_smoothing=0.1, z_loss=1e-3,
              softcap=8.0)


@pytest.mark.parametrize("mode", ["split", "row"] + (["fused"] if torch.cuda.is_available() else []))
def test_kernel_modes(mode, monkeypatch, device):
    """Each launch strategy of the Triton cross-entropy (split / one program per row / fused barrier)."""
    if device == "cpu" and not _backend.interpreting():
        pytest.skip("Triton on CPU tensors needs the interpreter")
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", mode)
    V = 4099
    for dtype, opts in ((torch.float32, dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)),
                        (torch.bfloat16, dict(reduction="sum"))):
        logits = (torch.randn(12, V, device=device) * 3).to(dtype)
        _check_ce(logits, _labels(12, V, 0.5, device=device), "triton", block_v=1024, **opts)
    _check_ce(torch.randn(6, V, device=device), _labels(6, V, 0.0, device=device), "triton", block_v=1024)


@pytest.mark.parametrize("frac", [1.0, 0.5, 0.03, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labelled_fractions(frac, reduction, device):
    backend = _default_backend(device)
    n, V = 64, 2053
    labels = _labels(n, V, frac, device=device)
    out, grad = _check_ce(torch.randn(n, V, device=device), labels, backend, reduction=reduction)
    if frac == 0.0:
        assert not out.isnan().any() and float(out.abs().sum()) == 0.0
        assert float(grad.abs().sum()) == 0.0
    ignored = labels == -100
    assert float(grad[ignored].abs().sum()) == 0.0


def test_three_d_and_grad_output(device):
    backend = _default_backend(device)
    V = 1031
    logits = torch.randn(2, 5, V, device=device)
    labels = torch.randint(0, V, (2, 5), device=device)
    labels[0, :2] = -100
    _check_ce(logits, labels, backend, reduction="mean")
    _check_ce(logits, labels, backend, reduction="none", softcap=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_and_no_overwrite(backend, device):
    _skip_unsupported(backend, device)
    V = 999
    logits = torch.randn(8, V, device=device)
    labels = _labels(8, V, 0.5, device=device)
    keep = logits.clone()
    x = logits.clone().requires_grad_()
    fused_cross_entropy(x, labels, backend=backend).backward()
    assert torch.equal(x.detach(), keep)                      # caller's logits untouched
    leaf = logits.clone().requires_grad_()
    buf = leaf.detach()                                       # shares storage with the leaf
    loss = fused_cross_entropy(leaf, labels, backend=backend, inplace_backward=True)
    loss.backward()
    xr = keep.clone().requires_grad_()
    ref.cross_entropy(xr, labels).backward()
    assert_close(leaf.grad, xr.grad, atol=1e-6, rtol=1e-4)
    assert_close(buf, xr.grad, atol=1e-6, rtol=1e-4, msg="gradient written over the logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_finite(backend, device):
    _skip_unsupported(backend, device)
    V = 3001
    logits = torch.randn(4, V, device=device) * 1e4
    labels = torch.randint(0, V, (4,), device=device)
    for opts in (dict(), dict(label_smoothing=0.1, z_loss=1e-4), dict(softcap=30.0)):
        x = logits.clone().requires_grad_()
        loss = fused_cross_entropy(x, labels, backend=backend, **opts)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert_close(loss, ref.cross_entropy(logits, labels, **opts), atol=1e-2, rtol=1e-5)


def test_no_grad_forward(device):
    backend = _default_backend(device)
    V = 2000
    logits = torch.randn(8, V, device=device, dtype=torch.bfloat16)
    labels = _labels(8, V, 0.5, device=device)
    with torch.no_grad():
        out = fused_cross_entropy(logits, labels, backend=backend)
    assert_close(out, ref.cross_entropy(logits, labels), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["split", "row"])
def test_masked_logits(mode, device, monkeypatch):
    """-inf logits (a masked vocabulary): one column, and a whole chunk of block_v columns, give
    F.cross_entropy's finite loss and a zero gradient there; with label smoothing the loss is inf, as torch's."""
    backend = _default_backend(device)
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", mode)
    V = 300
    logits = torch.randn(4, V, device=device)
    logits[:, 299] = float("-inf")
    logits[:2, 128:192] = float("-inf")
    labels = torch.randint(0, 100, (4,), device=device)
    for opts in (dict(), dict(z_loss=1e-3), dict(reduction="sum")):
        x = logits.clone().requires_grad_()
        xr = logits.clone().requires_grad_()
        out = fused_cross_entropy(x, labels, backend=backend, block_v=64, **opts)
        expected = F.cross_entropy(xr, labels, **{k: v for k, v in opts.items() if k != "z_loss"}) + \
            opts.get("z_loss", 0.0) * (torch.logsumexp(xr, 1) ** 2).mean()
        out.backward()
        expected.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all(), opts
        assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-4)
    assert fused_cross_entropy(logits, labels, backend=backend, label_smoothing=0.1) == float("inf")


@pytest.mark.parametrize("linear", [False, True])
def test_fp16_gradient_under_a_loss_scale(linear, device):
    """fp16 'mean' with a GradScaler-like loss scale (1024, and 65536 > fp16's max): the gradient keeps
    fp16 rounding relative to the fp32 reference, instead of underflowing (softmax / count falls below fp16's
    subnormals when divided before the scale: relative L1 error 9e-3 for logits, 4e-4 for hidden, measured)
    or overflowing (the scale cast to fp16 first)."""
    backend = _default_backend(device)
    n, V, H = (128, 32768, 16) if linear else (512, 4096, 0)
    labels = _labels(n, V, 1.0, device=device)
    for loss_scale in (65536.0,) if linear else (1024.0, 65536.0):
        if linear:
            h = (torch.randn(n, H, device=device) / 4).half()
            w = (torch.randn(V, H, device=device) / H ** 0.5).half()
            x, xr = h.clone().requires_grad_(), h.float().requires_grad_()
            out = fused_linear_cross_entropy(x, w, labels, backend=backend)
            expected = F.cross_entropy(F.linear(xr, w.float()), labels)
        else:
            logits = (torch.randn(n, V, device=device) * 3).half()
            x, xr = logits.clone().requires_grad_(), logits.float().requires_grad_()
            out = fused_cross_entropy(x, labels, backend=backend)
            expected = F.cross_entropy(xr, labels)
        (out * loss_scale).backward()
        (expected * loss_scale).backward()
        assert torch.isfinite(x.grad).all(), loss_scale
        rel_l1 = float((x.grad.float() - xr.grad).abs().sum() / xr.grad.abs().sum())
        print(f"linear={linear} scale={loss_scale} rel_l1={rel_l1:.2e}")
        # measured here: 1.8e-4 / 1.2e-4 (dividing before the scale: 4.6e-4 / 8.6e-3)
        assert rel_l1 < (3.5e-4 if linear else 1e-3), (loss_scale, rel_l1)


def test_strided_logits_and_inplace(device):
    """Row-strided logits (a slice of a padded vocabulary) give the right gradient; inplace_backward on them
    is refused (it would scale the padding too) and leaves them untouched."""
    backend = _default_backend(device)
    full = torch.randn(2, 3, 128, device=device)
    labels = torch.randint(0, 100, (2, 3), device=device)
    x = full[..., :100].detach().requires_grad_()
    _check_ce(x.detach(), labels, backend)
    keep = full.clone()
    with pytest.raises(ValueError, match="contiguous"):
        fused_cross_entropy(x, labels, backend=backend, inplace_backward=True)
    assert torch.equal(full, keep)


def test_grad_mode_off_and_second_backward(device, monkeypatch):
    """Under torch.no_grad no gradient is computed (logits never overwritten, no weight-gradient GEMM); a
    second backward through one loss raises a clear error instead of a version-counter one."""
    backend = _default_backend(device)
    V = 500
    logits = torch.randn(8, V, device=device).requires_grad_()
    labels = _labels(8, V, 0.5, device=device)
    keep = logits.detach().clone()
    with torch.no_grad():
        fused_cross_entropy(logits, labels, backend=backend, inplace_backward=True)
    assert torch.equal(logits.detach(), keep)
    needs = []
    impl = ops._linear_impl
    monkeypatch.setattr(ops, "_linear_impl", lambda *a: needs.append(a[10:13]) or impl(*a))
    w = torch.nn.Parameter(torch.randn(V, 16, device=device))
    with torch.no_grad():
        fused_linear_cross_entropy(torch.randn(8, 16, device=device), w, labels, backend=backend)
    assert needs == [(False, False, False)]
    for loss in (fused_cross_entropy(logits, labels, backend=backend),
                 fused_linear_cross_entropy(torch.randn(8, 16, device=device, requires_grad=True), w, labels,
                                            backend=backend)):
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward ran already"):
            loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_types_as_torch(backend, device):
    x, y = torch.randn(4, 10, device=device), torch.tensor([1, 3, 0, 2], device=device)
    np = pytest.importorskip("numpy")
    expected = F.cross_entropy(x, y, ignore_index=3)
    for index in (np.int64(3), np.int32(3)):   # the kernels get a Python int (Triton refuses numpy's)
        assert_close(fused_cross_entropy(x, y, ignore_index=index, backend=backend), expected, atol=1e-6, rtol=1e-6)
        assert_close(fused_linear_cross_entropy(x, torch.eye(10, device=device), y, ignore_index=index,
                                                backend=backend), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="ignore_index must be an int"):   # F.cross_entropy refuses a bool too
        fused_cross_entropy(x, y, ignore_index=True)


@pytest.mark.skipif(not TRITON_OK, reason="inplace_backward is the device path's")
def test_inplace_backward_over_saved_logits_is_refused(device):
    """inplace_backward writes the gradient over the logits: when another op saved them for its backward (exp
    here), autograd must see the write (the version counter) and refuse, not compute a wrong gradient."""
    z = torch.randn(4, 16, device=device, requires_grad=True)
    logits = z.exp()
    loss = fused_cross_entropy(logits, torch.tensor([1, 2, 3, 4], device=device), inplace_backward=True,
                               backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("linear", [False, True])
def test_double_backward_is_refused(linear, device):
    """The gradients come from kernels with no derivative of their own: create_graph=True raises instead of
    returning a gradient silently cut from the graph."""
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(10, 8, device=device)
    y = torch.tensor([1, -100, 3, 2], device=device)
    loss = fused_linear_cross_entropy(x, w, y) if linear else fused_cross_entropy(x @ w.t(), y)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_linear_under_autocast_with_an_fp32_head():
    """As F.linear under autocast: a bf16 hidden and an fp32 (trainable) head meet in bf16; grads keep dtypes."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(40, 16, generator=gen).requires_grad_()
    y = torch.tensor([1, 5, -100, 39, 0, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().bfloat16().float().requires_grad_()
    expected = F.cross_entropy(F.linear(hr, wr), y)
    expected.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # the reference sees the bf16-rounded operands in fp32; the CPU path rounds the logits to bf16 as well
    assert_close(loss, expected, atol=0.05, rtol=1e-2, msg="loss")
    assert_close(w.grad, wr.grad, atol=1e-2, rtol=2e-2, msg="weight grad")


def test_bad_inputs():
    x = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="labels shape"):
        fused_cross_entropy(x, y[:3])
    with pytest.raises(TypeError, match="integer"):
        fused_cross_entropy(x, y.float())
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        fused_cross_entropy(x, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        fused_cross_entropy(x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="reduction"):
        fused_cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_cross_entropy(x, y, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="softcap"):
        fused_cross_entropy(x, y, softcap=0.0)
    with pytest.raises(ValueError, match="z_loss"):
        fused_cross_entropy(x, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="z_loss"):
        fused_cross_entropy(x, y, z_loss=float("nan"))
    with pytest.raises(ValueError, match="softcap"):
        fused_cross_entropy(x, y, softcap=float("inf"))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        fused_cross_entropy(x, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="float32"):
        fused_cross_entropy(x.double(), y)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        fused_cross_entropy(torch.randn(10), torch.tensor(1))
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), y)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).half(), y)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), y, chunk_bytes=0)


# ------------------------------------------------------------------------------------------ linear
def _check_linear(n, H, V, frac, dtype, backend, device, bias=False, frozen=False, reduction="mean",
                  chunk_bytes=ops.DEFAULT_CHUNK_BYTES, **opts):
    _skip_unsupported(backend, device)
    h = (torch.randn(n, H, device=device)).to(dtype)
    w = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype)
    b = (torch.randn(V, device=device) * 0.1).to(dtype) if bias else None
    labels = _labels(n, V, frac, device=device)
    ins = [t.detach().clone().requires_grad_(not (frozen and i > 0)) if t is not None else None
           for i, t in enumerate((h, w, b))]
    refs = [t.detach().float().requires_grad_(not (frozen and i > 0)) if t is not None else None
            for i, t in enumerate((h, w, b))]
    out = fused_linear_cross_entropy(ins[0], ins[1], labels, bias=ins[2], reduction=reduction, backend=backend,
                                     chunk_bytes=chunk_bytes, **opts)
    expected = ref.cross_entropy(F.linear(refs[0], refs[1], refs[2]), labels, reduction=reduction, **opts)
    g = _weights(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    low = dtype != torch.float32
    assert_close(out, expected, atol=5e-2 if low else 1e-4, rtol=2e-2 if low else 1e-4, msg="loss")
    for name, a, e in zip("hwb", ins, refs):
        if a is None or not e.requires_grad:
            assert a is None or a.grad is None
            continue
        scale = float(e.grad.abs().max()) or 1.0
        assert_close(a.grad.float(), e.grad, atol=(3e-2 if low else 1e-5) * scale, rtol=5e-2 if low else 1e-4,
                     msg=f"grad {name}")
    return ins


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frac", [1.0, 0.5, 0.03, 0.0])
def test_linear_fractions(backend, frac, device):
    _check_linear(64, 32, 1000, frac, torch.float32, backend, device, bias=frac == 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(reduction="none", label_smoothing=0.1, bias=True),
    dict(reduction="sum", frozen=True, z_loss=1e-3, softcap=5.0),
    dict(dtype=torch.bfloat16, frozen=True, label_smoothing=0.1),
    dict(dtype=torch.float16, bias=True, reduction="none"),
], ids=["none-bias", "sum-frozen-zloss-softcap", "bf16-frozen", "fp16-none-bias"])
def test_linear_options(backend, case, device):
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    # a budget of 3 rows of logits: several chunks, one of them partly labelled
    _check_linear(16, 32, 517, 0.5, dtype, backend, device, chunk_bytes=3 * 517 * 4 * 3, **case)


def test_linear_extra_memory_bounded(monkeypatch, device):
    """The only (rows, V) buffer the linear variant allocates is capped by chunk_bytes, whatever N."""
    backend = _default_backend(device)
    sizes = []
    real = ops._alloc_chunk
    monkeypatch.setattr(ops, "_alloc_chunk", lambda r, V, dt, dev: sizes.append(r * V * dt.itemsize) or
                        real(r, V, dt, dev))
    V, budget = 1000, 16 * 1000 * 4
    for n in (32, 128):
        sizes.clear()
        _check_linear(n, 16, V, 1.0, torch.float32, backend, device, chunk_bytes=budget)
        assert sizes and max(sizes) <= budget, (n, sizes)
    assert ops.linear_ce_chunk_rows(128256, torch.bfloat16, 128 << 20, 32768) == 512
    assert ops.linear_ce_chunk_rows(128256, torch.float32, 1, 32768) == 1          # never zero rows
    assert ops.linear_ce_chunk_rows(128256, torch.bfloat16, 1 << 40, 100) == 100


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("frac", [1.0, 0.03])
def test_linear_grouped_gemms(frac, frozen, device, monkeypatch):
    """QLORA_KERNELS_CE_GEMM=grouped: logits and input gradient by torch._grouped_mm bounded on the device
    (on CPU tensors torch's own implementation of the op), over several chunks, one partly labelled."""
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", "grouped")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, w = torch.empty(1, 64, dtype=dtype, device=device), torch.empty(1024, 64, dtype=dtype, device=device)
    assert ops._grouped_gemms(h, w, None) and not ops._grouped_gemms(h, w, w[:, 0])
    _check_linear(72, 64, 1024, frac, dtype, "triton", device, frozen=frozen, chunk_bytes=16 * 1024 * 4)


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("frozen,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("frac", [1.0, 0.03])
def test_linear_cublas_gemms(frac, frozen, bias, device, monkeypatch):
    """QLORA_KERNELS_CE_GEMM=cublas (CUDA's default, "auto"): chunks whose live rows are known on the host run
    the logits and input-gradient GEMMs through torch.mm on exactly those rows; several chunks, one partly
    labelled; the weight and bias gradients stay on the bounded Triton kernels. The GEMMs must have run by
    torch (the count of a CPU tensor is known at once), not the Triton kernel."""
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", "cublas")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch_gemms, triton_gemms = [], []
    real_mm, real_addmm, real_bounded = torch.mm, torch.addmm, ops._bounded_mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: torch_gemms.append(a[0].shape) or real_mm(*a, **k))
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: torch_gemms.append(a[1].shape) or real_addmm(*a, **k))
    monkeypatch.setattr(ops, "_bounded_mm", lambda *a, **k: triton_gemms.append(
        "acc" if k.get("accumulate") else k.get("kind", "fwd")) or real_bounded(*a, **k))
    _check_linear(72, 64, 1024, frac, dtype, "triton", device, frozen=frozen, bias=bias, chunk_bytes=16 * 1024 * 4)
    if device == "cpu":
        # logits and input gradient by torch on the live rows of each live chunk (16 rows at most); the Triton
        # GEMM only for the weight gradient
        assert torch_gemms and max(shape[0] for shape in torch_gemms) <= 16
        assert len(torch_gemms) % 2 == 0 and set(triton_gemms) <= {"acc"}
        assert len(triton_gemms) == (0 if frozen else len(torch_gemms) // 2)


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("frac", [1.0, 0.03])
def test_linear_row_mode(frac, device, monkeypatch):
    """QLORA_KERNELS_CE_MODE=row in the linear variant (a benchmark candidate there): several chunks, one
    partly labelled, the trailing ones past the labelled count."""
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", "row")
    _check_linear(72, 32, 1000, frac, torch.float32, "triton", device, label_smoothing=0.1, bias=True,
                  chunk_bytes=16 * 1000 * 4)


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
def test_linear_launches_no_chunk_past_a_known_count(device, monkeypatch):
    """Chunks past the labelled count are not launched once the count is on the host (CPU tensors at once;
    CUDA when its non-blocking copy has landed): 9 of 72 rows labelled in chunks of 16 rows -> 1 chunk,
    whose two GEMMs run; and the result stays right."""
    calls = []
    real = ops._bounded_mm
    monkeypatch.setattr(ops, "_bounded_mm", lambda *a, **k: calls.append(
        "acc" if k.get("accumulate") else k.get("kind", "fwd")) or real(*a, **k))
    _check_linear(72, 32, 1000, 0.125, torch.float32, "triton", device, chunk_bytes=16 * 1000 * 4)
    if device == "cpu":
        assert calls == ["fwd", "dgrad", "acc"], calls      # one chunk: logits, input and weight gradients


ONLINE_CASES = {
    "all": dict(frac=1.0),
    "3pct": dict(frac=0.03),
    "none-labelled": dict(frac=0.0),
    "none-smoothing-bias": dict(reduction="none", label_smoothing=0.1, bias=True),
    "sum-zloss-softcap-H200": dict(reduction="sum", z_loss=1e-3, softcap=5.0, H=200),
    "bf16-smoothing": dict(dtype=torch.bfloat16, label_smoothing=0.1),
    "fp16-none-bias": dict(dtype=torch.float16, bias=True, reduction="none"),
}


def _spy(monkeypatch, name):
    calls = []
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    return calls


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("case", ONLINE_CASES.values(), ids=ONLINE_CASES.keys())
def test_linear_online_mode(case, device, monkeypatch):
    """QLORA_KERNELS_CE_LINEAR=online, a frozen head over vocabulary slices: 72 rows in chunks of 16 (one
    partly labelled, the trailing ones past the count), V = 1000 in slices of 384 (the last partial), every
    option; loss and input gradient against the fp32 reference."""
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", "online")
    monkeypatch.setenv("QLORA_KERNELS_CE_SLICE_V", "384")
    calls = _spy(monkeypatch, "_linear_ce_online")
    case = dict(case)
    dtype, frac, H = case.pop("dtype", torch.float32), case.pop("frac", 0.5), case.pop("H", 32)
    budget = 16 * (384 * dtype.itemsize + 4 * H)
    _check_linear(72, H, 1000, frac, dtype, "triton", device, frozen=True, chunk_bytes=budget, **case)
    assert calls, "the online path did not run"


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 300.0), (torch.bfloat16, 30.0)])
def test_linear_online_low_precision_large_logits(dtype, scale, device, monkeypatch):
    """fp16 / bf16 logits in the hundreds (an fp16 ulp of 0.25 at 1000): the statistics and the softmax
    numerators must both come from the logits as stored in that dtype, or l and O disagree by e^(ulp/2) per
    term. The error against an fp64 reference stays within 2x that of plain PyTorch at the same dtype."""
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", "online")
    monkeypatch.setenv("QLORA_KERNELS_CE_SLICE_V", "256")
    n, H, V = 8, 64, 600
    y = _labels(n, V, 1.0, device=device)
    h = (torch.randn(n, H, device=device) * scale).to(dtype)
    w = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype)
    grads = {}
    for name in ("ours", "torch", "fp64"):
        x = (h.double() if name == "fp64" else h).clone().requires_grad_()
        if name == "ours":
            loss = fused_linear_cross_entropy(x, w, y, reduction="sum", backend="triton")
        else:
            loss = F.cross_entropy(F.linear(x, w.to(x.dtype)).float(), y, reduction="sum")
        loss.backward()
        grads[name] = x.grad.double()
    err = {k: float((grads[k] - grads["fp64"]).abs().max()) for k in ("ours", "torch")}
    assert err["ours"] <= 2 * err["torch"] + 1e-3 * float(grads["fp64"].abs().max()), err


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
def test_linear_online_mode_falls_back(device, monkeypatch):
    """What the online mode cannot serve runs the chunked path, correctly: a trainable head (its gradient
    needs each row's final softmax) and label smoothing together with softcap."""
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", "online")
    calls = _spy(monkeypatch, "_linear_ce_online")
    _check_linear(40, 32, 300, 0.5, torch.float32, "triton", device, bias=True, chunk_bytes=16 * 300 * 4)
    _check_linear(40, 32, 300, 0.5, torch.float32, "triton", device, frozen=True, label_smoothing=0.1, softcap=5.0)
    assert not calls
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", "sliced")
    with pytest.raises(ValueError, match="QLORA_KERNELS_CE_LINEAR"):
        ops._online_mode(False, False, 0.0, None)
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", "online")
    monkeypatch.setenv("QLORA_KERNELS_CE_SLICE_V", "0")
    with pytest.raises(ValueError, match="QLORA_KERNELS_CE_SLICE_V"):
        fused_linear_cross_entropy(torch.randn(4, 8, device=device), torch.randn(10, 8, device=device),
                                   torch.tensor([0, 1, 2, 3], device=device), backend="triton")


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
def test_linear_online_memory_within_budget(device, monkeypatch):
    """The online mode's working buffers, the (rows, slice) logits and the (rows, H) fp32 accumulator, fit
    in chunk_bytes together, and nothing (rows, V) exists: beside the (N, H) gradient it returns, every 2-D
    allocation is smaller than the budget."""
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", "online")
    monkeypatch.setenv("QLORA_KERNELS_CE_SLICE_V", "256")
    n, H, V = 256, 64, 1000
    budget = 8 * (256 * 4 + 64 * 4 + 16 * 2 + 32)   # 8 rows: logits, accumulator, partials of 2 tiles, stats
    rec, h, w, labels, loss, grad_h = _record_linear_call(device, n, H, V, budget)
    two_d = [s for s in rec.shapes if len(s) == 2 and s != (n, H)]
    assert (8, 256) in two_d and (8, H) in two_d, two_d
    assert sum(r * c * 4 for r, c in {(8, 256), (8, H)}) + 4 * 8 * 2 * 4 + 2 * 4 * 8 * 4 <= budget
    assert all(r * c * 4 <= budget for r, c in two_d) and not any(V in s for s in rec.shapes), rec.shapes
    assert ops.online_ce_sizes(128256, 3072, torch.bfloat16, 12 << 20, 32768, 8192) == (384, 8192)
    assert ops.online_ce_sizes(1000, 64, torch.float32, 1, 5, 8192) == (1, 1000)
    ref_h = h.clone().requires_grad_()
    expected = F.cross_entropy(ref_h @ w.t(), labels, reduction="none")
    expected.sum().div((labels != -100).sum()).backward()
    assert_close(loss, expected.detach(), atol=1e-4, rtol=1e-4, msg="loss")
    assert_close(grad_h, ref_h.grad, atol=1e-6, rtol=1e-4, msg="grad hidden")


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
def test_linear_count_hint_prunes_only_its_own_labels(device, monkeypatch):
    """A LabelledCountHint made before the op (patch_model makes one before the model's forward) stops the
    chunk loop at the count even while the op's own host copy has not landed (simulated: it never does);
    a hint for other labels, or for labels changed in place since, is ignored. Results stay right."""
    # the Triton GEMMs (counted below): with CUDA's default ("auto") a landed hint sends the chunk to cuBLAS
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", "triton")
    n, H, V, budget = 72, 32, 1000, 16 * 1000 * 4     # 9 labelled rows: 1 live chunk of 5
    h, w = torch.randn(n, H, device=device), torch.randn(V, H, device=device) / 8
    y = _labels(n, V, 0.125, device=device)
    hint = ops.LabelledCountHint(y, -100)

    class NeverLanded(ops._CountOnHost):
        def __init__(self, count):
            self.value, self.event = None, None

    monkeypatch.setattr(ops, "_CountOnHost", NeverLanded)
    calls = _spy(monkeypatch, "_bounded_mm")
    expected = F.cross_entropy(h @ w.t(), y)

    def chunks(labels):
        calls.clear()
        with ops.count_hint(hint):
            loss = fused_linear_cross_entropy(h, w, labels, chunk_bytes=budget, backend="triton")
        assert_close(loss, expected, atol=1e-5, rtol=1e-5, msg="loss")
        return len(calls)

    assert chunks(y) == 1
    assert chunks(y.clone()) == 5
    y.add_(0)   # same values, a new version: the hint no longer vouches for them
    assert chunks(y) == 5


def _stale_hint(device, frac, gain):
    """(hidden, weight, labels, a count hint, chunk budget): the hint made, then `gain` unlabelled rows labelled
    (or -gain labelled rows unlabelled) through .data, which keeps the version the hint is keyed on."""
    n, H, V = 48, 16, 200
    h, w = torch.randn(n, H, device=device), torch.randn(V, H, device=device) / 4
    y = _labels(n, V, frac, device=device)
    hint = ops.LabelledCountHint(y, -100)
    version = y._version
    if gain > 0:
        y.data[torch.nonzero(y == -100)[:gain, 0]] = 3
    else:
        y.data[torch.nonzero(y != -100)[:-gain, 0]] = -100
    assert y._version == version
    return h, w, y, hint, 8 * V * 4


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_linear_hint_understating_the_count_is_loud(gemm, device, monkeypatch):
    """A hint whose host count understates the op's (its labels gained labelled rows through .data, keeping the
    version): the chunk loop stops before rows it should compute. The loss comes out NaN, and a gradient
    element, instead of garbage from rows never written."""
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", gemm)
    h, w, y, hint, budget = _stale_hint(device, 0.25, gain=20)
    hl = h.clone().requires_grad_()
    with ops.count_hint(hint):
        loss = fused_linear_cross_entropy(hl, w, y, chunk_bytes=budget, backend="triton")
    loss.backward()
    assert loss.isnan() and hl.grad.isnan().any()
    with ops.count_hint(ops.LabelledCountHint(y, -100)):    # a hint that agrees: no NaN
        assert not fused_linear_cross_entropy(h, w, y, chunk_bytes=budget, backend="triton").isnan()


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_linear_hint_overstating_the_count_leaves_gradients_right(gemm, device, monkeypatch):
    """A hint whose host count overstates the op's device count (its labels lost labelled rows through .data,
    which keeps the version the hint is keyed on): the cuBLAS chunk then covers compacted positions past the
    device count (they hold row 0); the kernels ignore them and their input-gradient rows must go nowhere,
    not into row 0 of the gradient."""
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", gemm)
    h, w, y, hint, budget = _stale_hint(device, 0.625, gain=-10)
    hl, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
    with ops.count_hint(hint):
        loss = fused_linear_cross_entropy(hl, w, y, chunk_bytes=budget, backend="triton")
    loss.backward()
    expected = F.cross_entropy(hr @ w.t(), y)
    expected.backward()
    assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5, msg="loss")
    assert_close(hl.grad, hr.grad, atol=1e-6, rtol=1e-4, msg="grad hidden")


def test_linear_gemm_setting_is_checked(monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="QLORA_KERNELS_CE_GEMM"):
        ops._grouped_gemms(torch.empty(1, 8), torch.empty(8, 8), None)


class _RecordAllocations(TorchDispatchMode):
    """Shapes of the fresh tensors (not views, not in-place results) that torch ops return."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func.__name__.split(".")[0].endswith("_"):
            self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                            if isinstance(t, torch.Tensor)]
        return out


def _record_linear_call(device, n, H, V, budget):
    """The device path's loss and input gradient ('mean', half the rows labelled) with the shapes of every
    tensor it allocated: (recorder, h, w, labels, loss, grad_h)."""
    h = torch.randn(n, H, device=device)
    w = torch.randn(V, H, device=device) / 8
    labels = _labels(n, V, 0.5, device=device)
    with _RecordAllocations() as rec:
        loss, grad_h, _, _ = ops._linear_ce_triton(h, w, None, labels, None, (-100, 0.0, 0.0, None), True,
                                                   True, False, False, budget)
    return rec, h, w, labels, loss, grad_h


@pytest.mark.skipif(not TRITON_OK, reason="the device path needs Triton (CUDA or the interpreter)")
def test_linear_allocates_no_hidden_sized_copies(device, monkeypatch):
    """The device path reads the labelled rows of hidden and writes their gradient rows through an index:
    beyond the (N, H) gradient it returns, its only large buffer is the (rows, V) logits chunk (the Triton
    GEMMs: on CUDA "auto" would take cuBLAS, whose out= results the recorder lists, once the count lands)."""
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", "triton")
    n, H, V, budget = 256, 64, 1000, 8 * 1000 * 4
    rec, h, w, labels, loss, grad_h = _record_linear_call(device, n, H, V, budget)
    large = [s for s in rec.shapes if len(s) == 2 and s[0] * s[1] >= n * H // 4]
    assert sorted(large) == sorted([(8, V), (n, H)]), large
    expected = F.cross_entropy(h @ w.t(), labels, reduction="none")
    assert_close(loss, expected, atol=1e-4, rtol=1e-4, msg="loss")


def test_linear_time_falls_with_labelled_fraction():
    """CPU path: only labelled rows are computed, so 3 % labelled is far cheaper than 100 %."""
    n, H, V = 1024, 64, 8192
    h = torch.randn(n, H, requires_grad=True)
    w = torch.randn(V, H) / 8

    def once(labels):   # this process's CPU time: other processes on a shared machine do not count
        start = time.process_time()
        fused_linear_cross_entropy(h, w, labels, backend="reference").backward()
        return time.process_time() - start

    # interleaved, best of 5: robust to load changes
    all_labels, few_labels = _labels(n, V, 1.0), _labels(n, V, 0.03)
    full, sparse = float("inf"), float("inf")
    for _ in range(5):
        full, sparse = min(full, once(all_labels)), min(sparse, once(few_labels))
    assert sparse < 0.4 * full, (sparse, full)


def test_torch_library_ops():
    x = torch.randn(4, 50)
    y = torch.tensor([1, -100, 3, 49])
    torch.library.opcheck(torch.ops.qlora_kernels.cross_entropy_forward.default,
                          (x, y, -100, 0.1, 1e-3, 0.0, True, True, "reference", 0))
    torch.library.opcheck(torch.ops.qlora_kernels.cross_entropy_backward.default,
                          (x, y, torch.randn(4), torch.rand(4), -100, 0.0, 0.0, 0.0, "reference", 0))
    torch.library.opcheck(torch.ops.qlora_kernels.linear_cross_entropy.default,
                          (torch.randn(4, 8), torch.randn(50, 8), None, y, None, -100, 0.0, 0.0, 0.0, True, True,
                           True, False, 1 << 20, "reference"))


def test_nn_modules_and_compile():
    from qlora_kernels.nn import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
    x = torch.randn(6, 40, requires_grad=True)
    y = torch.tensor([1, -100, 3, 39, 0, -100])
    assert_close(FusedCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)(x, y),
                 ref.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3), atol=1e-5, rtol=1e-5)
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8)
    assert_close(FusedLinearCrossEntropyLoss(reduction="sum")(h, w, y),
                 ref.cross_entropy(F.linear(h, w), y, reduction="sum"), atol=1e-4, rtol=1e-5)
    fn = torch.compile(lambda a, b: fused_cross_entropy(a, b, backend="reference"), backend="eager", fullgraph=True)
    out = fn(x, y)
    out.backward()
    xr = x.detach().clone().requires_grad_()
    ref.cross_entropy(xr, y).backward()
    assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("linear", [False, True])
def test_compiled_ops_check_labels(linear):
    """A torch.compile'd graph skips the eager checks: the ops check CPU labels themselves when they run (an
    out-of-range label gave NaN, or an index error from deep inside)."""
    x, w, y = torch.randn(4, 8), torch.randn(64, 8), torch.tensor([1, 99, 3, -100])
    if linear:
        fn = torch.compile(lambda a, b, c: fused_linear_cross_entropy(a, b, c), backend="aot_eager", fullgraph=True)
        args = (x, w, y)
    else:
        fn = torch.compile(lambda a, b: fused_cross_entropy(a, b), backend="aot_eager", fullgraph=True)
        args = (x @ w.t(), y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 64\)"):
        fn(*args)


# ------------------------------------------------------------------------------------------ GPU
LINEAR_PATHS = [(gemm, "chunk") for gemm in ops.GEMMS] + [("triton", "online")]


@pytest.mark.cuda
@pytest.mark.parametrize("gemm,linear", LINEAR_PATHS)
def test_cuda_no_host_sync_and_large_vocab(gemm, linear, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", gemm)
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", linear)
    V = 128256
    logits = torch.randn(64, V, device="cuda", dtype=torch.bfloat16) * 3
    labels = _labels(64, V, 0.5, device="cuda")
    h = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(V, 256, device="cuda", dtype=torch.bfloat16) / 16
    hl = _labels(256, V, 0.04, device="cuda")
    fused_cross_entropy(logits.requires_grad_(), labels).backward()    # compile outside the sync check
    fused_linear_cross_entropy(h.requires_grad_(), w, hl).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_cross_entropy(logits, labels, label_smoothing=0.1).backward()
        fused_linear_cross_entropy(h, w, hl).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_ce(logits.detach(), labels, "triton", label_smoothing=0.1, z_loss=1e-4)
    _check_linear(300, 128, V, 0.04, torch.bfloat16, "triton", "cuda", frozen=True)
    # chunks of 64 rows, 16 vocabulary slices each in the online mode
    _check_linear(300, 128, V, 0.5, torch.bfloat16, "triton", "cuda", frozen=True, label_smoothing=0.1,
                  chunk_bytes=64 * (8192 * 2 + 128 * 4))


@pytest.mark.cuda
@pytest.mark.parametrize("gemm,linear", LINEAR_PATHS)
def test_cuda_graph_replay(gemm, linear, monkeypatch):
    """Both ops, forward and backward, captured once and replayed on new logits, hidden states and labels
    (another labelled count: it must be read on the device at replay, not baked in at capture)."""
    monkeypatch.setenv("QLORA_KERNELS_CE_GEMM", gemm)
    monkeypatch.setenv("QLORA_KERNELS_CE_LINEAR", linear)
    V = 32003
    logits = (torch.randn(64, V, device="cuda") * 3).bfloat16().requires_grad_()
    labels = _labels(64, V, 0.5, device="cuda")
    h = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(V, 128, device="cuda", dtype=torch.bfloat16) / 16
    hl = _labels(300, V, 0.04, device="cuda")

    def step():
        logits.grad = h.grad = None
        a = fused_cross_entropy(logits, labels, label_smoothing=0.1)
        b = fused_linear_cross_entropy(h, w, hl, z_loss=1e-4)
        (a + b).backward()
        return a, b, logits.grad, h.grad

    fresh = [torch.randn_like(logits) * 3, _labels(64, V, 0.3, device="cuda"), torch.randn_like(h),
             _labels(300, V, 0.5, device="cuda")]
    check_cuda_graph(step, [logits, labels, h, hl], fresh, atol=1e-6, rtol=1e-5)


CLUSTER_OK = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
              and hasattr(_backend.native(), "cross_entropy_cluster_cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not CLUSTER_OK, reason="the cluster kernel needs sm_90+ and the extension built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cluster_kernel_cuda(dtype, monkeypatch):
    """QLORA_KERNELS_CE_MODE=cluster (csrc/cross_entropy_cuda.cu) against the fp32 reference: 1 to 8 CTAs
    per row at 4 / 8 / 16 vectors per thread (V up to 262144), every option, in place, the linear variant's
    chunks, no host sync, and a CUDA graph replayed with another labelled count."""
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", "cluster")
    for V in (4096, 32000, 128256, 262144 if dtype != torch.float32 else 131072):
        logits = (torch.randn(8, V, device="cuda") * 3).to(dtype)
        assert ops.cluster_ce(logits, logits)
        for opts in OPTIONS:
            _check_ce(logits, _labels(8, V, 0.5, opts.get("ignore_index", -100), device="cuda"), "triton", **opts)
    if dtype == torch.float32:   # softcap >> |logits|: the Triton kernels' series for small ratios, in CUDA too
        x64 = torch.randn(8, 4096, device="cuda", dtype=torch.float64) * 3
        target = torch.randint(0, 4096, (8,), device="cuda")
        assert ops.cluster_ce(x64.float(), None)
        for softcap in (1e4, 1e6):
            out = fused_cross_entropy(x64.float(), target, softcap=softcap, reduction="none")
            expected = F.cross_entropy(softcap * torch.tanh(x64 / softcap), target, reduction="none")
            assert_close(out.double(), expected, atol=1e-5, rtol=1e-5, msg=f"cluster, softcap {softcap}")
    logits = (torch.randn(8, 1000, device="cuda") * 3).to(dtype)
    _check_ce(logits, _labels(8, 1000, 0.0, device="cuda"), "triton")        # every row ignored
    assert not ops.cluster_ce(logits[:, :999], None)                          # V not a multiple of a vector
    x = logits.clone().requires_grad_()
    fused_cross_entropy(x, _labels(8, 1000, 0.5, device="cuda"), inplace_backward=True).backward()
    _check_linear(300, 128, 32000, 0.5, torch.bfloat16, "triton", "cuda", frozen=True, chunk_bytes=64 * 32000 * 2)
    labels = _labels(64, 32000, 0.5, device="cuda")
    x = (torch.randn(64, 32000, device="cuda") * 3).to(dtype).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_cross_entropy(x, labels, label_smoothing=0.1).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def step():
        x.grad = None
        loss = fused_cross_entropy(x, labels, z_loss=1e-4)
        loss.backward()
        return loss, x.grad

    check_cuda_graph(step, [x, labels], [torch.randn_like(x) * 3, _labels(64, 32000, 0.2, device="cuda")],
                     atol=1e-6, rtol=1e-5)


def test_cluster_mode_needs_the_kernel_for_the_device(monkeypatch):
    """QLORA_KERNELS_CE_MODE=cluster takes the CUDA kernel only where the build holds its code for the device
    (an sm_80-only build on an H100, or a card newer than the build, keeps the split path: no "no kernel image")."""
    from types import SimpleNamespace
    x = SimpleNamespace(is_cuda=True, shape=(4, 4096), device=SimpleNamespace(index=0), element_size=lambda: 2,
                        data_ptr=lambda: 0, stride=lambda dim: (4096, 1)[dim])
    native = SimpleNamespace(with_cuda=True, cross_entropy_cluster_cuda=None)
    monkeypatch.setattr(_backend, "native", lambda: native)
    monkeypatch.setattr(ops, "_capability_major", lambda device: 9)
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", "cluster")
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    for has_image in (False, True):
        native.cross_entropy_cluster_cuda_has_image = lambda device, has_image=has_image: has_image
        _backend.native_has_image.cache_clear()
        assert ops.cluster_ce(x, x) is has_image
    _backend.native_has_image.cache_clear()


def test_ce_mode_setting_is_checked(monkeypatch, device):
    x = torch.randn(4, 64, device=device)
    assert not ops.cluster_ce(x, x)                          # default mode: split
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", "cluster")
    if device == "cpu":
        assert not ops.cluster_ce(x, x)                      # CPU tensors never take the CUDA kernel
    monkeypatch.setenv("QLORA_KERNELS_CE_MODE", "fast")
    with pytest.raises(ValueError, match="QLORA_KERNELS_CE_MODE"):
        ops.cluster_ce(x, x)


# ------------------------------------------------------------------------------------------ compile
def _ce_cases():
    # as launched at real sizes: a row stride of 128256 fits int32, so Triton types it i32 (row offsets are
    # widened inside the kernels)
    sig_common = {"n_rows": "i32", "V": "i32", "stride_row": "i32", "ignore_index": "i64", "softcap": "fp32"}
    cases = []
    for dt in ("bf16", "fp32"):
        cases.append(CompileCase(
            "qlora_kernels.kernels.cross_entropy", "ce_fused_kernel",
            {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "grad_ptr": f"*{dt}", "part_ptr": "*fp32",
             "counter_ptr": "*i32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "count_ptr": "*i32", **sig_common,
             "grad_stride_row": "i64", "smoothing": "fp32", "z_loss": "fp32", "NCHUNK": "constexpr",
             "NCHUNK_P2": "constexpr", "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr", "MEAN": "constexpr",
             "WRITE_IGNORED": "constexpr"},
            {"NCHUNK": 16, "NCHUNK_P2": 16, "BLOCK_V": 8192, "HAS_SOFTCAP": True, "MEAN": True, "WRITE_IGNORED": True},
            num_warps=8, num_stages=1))
    cases.append(CompileCase(
        "qlora_kernels.kernels.cross_entropy", "ce_stats_kernel",
        {"logits_ptr": "*bf16", "labels_ptr": "*i64", "part_ptr": "*fp32", **sig_common, "NCHUNK": "constexpr",
         "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr"},
        {"NCHUNK": 32, "BLOCK_V": 4096, "HAS_SOFTCAP": True}, num_warps=4, num_stages=1))
    cases.append(CompileCase(
        "qlora_kernels.kernels.cross_entropy", "ce_combine_kernel",
        {"labels_ptr": "*i64", "part_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "n_rows": "i32",
         "V": "i32", "ignore_index": "i64", "smoothing": "fp32", "z_loss": "fp32", "NCHUNK": "constexpr",
         "NCHUNK_P2": "constexpr", "BLOCK_R": "constexpr"},
        {"NCHUNK": 32, "NCHUNK_P2": 32, "BLOCK_R": 64}, num_warps=4, num_stages=1))
    cases.append(CompileCase(
        "qlora_kernels.kernels.cross_entropy", "ce_grad_kernel",
        {"logits_ptr": "*bf16", "labels_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*bf16", "gscale_ptr": "*fp32",
         "gscale_stride": "i32", "count_ptr": "*i32", "V": "i32", "stride_row": "i64", "grad_stride_row": "i64",
         "ignore_index": "i64", "smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32", "NCHUNK": "constexpr",
         "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr", "HAS_GSCALE": "constexpr", "MEAN": "constexpr",
         "WRITE_IGNORED": "constexpr"},
        {"NCHUNK": 32, "BLOCK_V": 4096, "HAS_SOFTCAP": True, "HAS_GSCALE": True, "MEAN": False,
         "WRITE_IGNORED": True}, num_warps=4, num_stages=1))
    cases.append(CompileCase(
        "qlora_kernels.kernels.cross_entropy", "ce_row_kernel",
        {"logits_ptr": "*bf16", "labels_ptr": "*i64", "grad_ptr": "*bf16", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
         "count_ptr": "*i32", "V": "i32", "stride_row": "i64", "grad_stride_row": "i64", "ignore_index": "i64",
         "smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32", "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr",
         "MEAN": "constexpr", "COMPUTE_GRAD": "constexpr", "WRITE_IGNORED": "constexpr"},
        {"BLOCK_V": 8192, "HAS_SOFTCAP": True, "MEAN": True, "COMPUTE_GRAD": True, "WRITE_IGNORED": True},
        num_warps=16, num_stages=1))
    cases.append(CompileCase("qlora_kernels.kernels.cross_entropy", "scale_kernel",
                             {"x_ptr": "*bf16", "g_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"},
                             {"BLOCK": 8192}, num_warps=8, num_stages=1))
    cases.append(CompileCase(
        "qlora_kernels.kernels.cross_entropy", "colsum_kernel",
        {"x_ptr": "*bf16", "out_ptr": "*fp32", "limit_ptr": "*i32", "limit_offset": "i64", "n_rows": "i32",
         "n_cols": "i32", "stride_row": "i64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
        {"BLOCK_R": 32, "BLOCK_C": 256}, num_warps=4, num_stages=1))
    return cases


def _mm_cases():
    """The three GEMMs of the linear variant as launched: unit strides specialized, the other integers
    divisible by 16 (as Triton specializes H, V and the chunk rows at launch)."""
    cases = []
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")
    gemms = (  # arch, output, unit strides, flags: logits, input gradient, weight gradient
        (90, "bf16", ("stride_ak", "stride_bk", "stride_cn"), dict(LIMIT_M=True, HAS_BIAS=True, GATHER_A=True)),
        (90, "bf16", ("stride_ak", "stride_bn", "stride_cn"), dict(LIMIT_M=True, SCATTER_C=True)),
        (90, "fp32", ("stride_am", "stride_bn", "stride_cn"), dict(LIMIT_K=True, GATHER_B=True)),
        (80, "bf16", ("stride_ak", "stride_bk", "stride_cn"), dict(LIMIT_M=True, HAS_BIAS=True, GATHER_A=True)))
    off = dict.fromkeys(("LIMIT_M", "LIMIT_K", "HAS_BIAS", "GATHER_A", "GATHER_B", "SCATTER_C"), False)
    for arch, out, unit, flags in gemms:
        acc = out == "fp32"
        dgrad = "stride_bn" in unit and not acc
        mm = dict((MM_ACC_CONFIGS if acc else MM_DGRAD_CONFIGS if dgrad else MM_CONFIGS)[arch // 10])
        warps, stages = mm.pop("num_warps"), mm.pop("num_stages")
        sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": f"*{out}", "bias_ptr": "*bf16", "limit_ptr": "*i32",
               "limit_offset": "i64", "rows_ptr": "*i64", "M": "i32", "N": "i32", "K": "i32"}
        sig.update({s: "constexpr" if s in unit else "i64" for s in strides})
        sig.update({k: "constexpr" for k in ("LIMIT_M", "LIMIT_K", "HAS_BIAS", "ACCUMULATE", "GATHER_A", "GATHER_B",
                                              "SCATTER_C", "UPCAST", "IEEE", "BM", "BN", "BK", "GROUP_M")})
        consts = {**{s: 1 for s in unit}, **off, **flags, "ACCUMULATE": acc, "UPCAST": False, "IEEE": False, **mm}
        # launch-time divisibility by 16 of pointers, sizes and strides (without it every GEMM spills)
        aligned = tuple(n for n, t in sig.items() if t.startswith("*") or (t in ("i32", "i64") and n != "limit_offset"))
        cases.append((arch, CompileCase("qlora_kernels.kernels.cross_entropy", "bounded_matmul_kernel", sig, consts,
                                        num_warps=warps, num_stages=stages, aligned=aligned)))
    return cases


def _online_cases(arch):
    """The online linear cross-entropy's three kernels as launched for bf16: the gradient GEMM on its 128-row
    tile and on its 64-row one (softcap, or few rows: the benchmark's 8 MB chunk), each for the first slice
    (FIRST, src = 0) and a later one (src = 1, which triton turns into a constant at launch). The integers are
    specialized as at launch on a real vocabulary: a full 8192-column slice has n_tiles = 64 (a multiple of
    16, so the partials' loads vectorize), the first chunk starts at limit_offset = 0 (divisible by 16 too).
    With n_tiles typed as a plain i32 triton 3.6 compiled the FIRST gradient GEMM, and crashed on it at launch."""
    mod = "qlora_kernels.kernels.cross_entropy"
    cases = []
    grad_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "o_ptr": "*fp32", "part_ptr": "*fp32", "stats_ptr": "*fp32",
                "limit_ptr": "*i32", "limit_offset": "i64", "M": "i32", "H": "i32", "v0": "i32", "ns": "i32",
                "n_tiles": "i32", "src": "i32", "stride_xm": "i64", "stride_wv": "i64", "stride_om": "i64",
                "softcap": "fp32"}
    grad_consts = {"COMPUTE_GRAD": True, "EVEN_K": True, "NT_STEP": 8}
    first, later = dict(FIRST=True), dict(FIRST=False, src=1)
    for kernel, table, sig, consts, softcap in (
        ("online_logits_kernel", ONLINE_LOGITS_CONFIGS,
         {"h_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "x_ptr": "*bf16", "part_ptr": "*fp32",
          "rows_ptr": "*i64", "labels_ptr": "*i64", "limit_ptr": "*i32", "limit_offset": "i64", "M": "i32",
          "H": "i32", "V": "i32", "v0": "i32", "ns": "i32", "n_tiles": "i32", "stride_hm": "i64", "stride_wv": "i64",
          "stride_xm": "i64", "softcap": "fp32"}, {"HAS_BIAS": True, "ROUND": True}, True),
        *(("online_grad_kernel", table, dict(grad_sig), {**step, **grad_consts}, softcap)
          for table, softcap in ((ONLINE_GRAD_CONFIGS, False), (ONLINE_GRAD_NARROW_CONFIGS, True),
                                 (ONLINE_GRAD_NARROW_CONFIGS, False))
          for step in (first, later))):
        cfg = dict(table[arch // 10])
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        consts = {**consts, "HAS_SOFTCAP": softcap, "UPCAST": False, "IEEE": False, **cfg}
        sig.update(dict.fromkeys(consts, "constexpr"))
        aligned = tuple(n for n, t in sig.items() if t != "constexpr" and (t.startswith("*") or n.startswith("stride")
                        or n in ("limit_offset", "M", "H", "v0", "ns", "n_tiles", "src")))
        cases.append(CompileCase(mod, kernel, sig, consts, num_warps=warps, num_stages=stages, aligned=aligned))
    sig = {"o_ptr": "*fp32", "stats_ptr": "*fp32", "w_ptr": "*bf16", "colsum_ptr": "*fp32", "labels_ptr": "*i64",
           "rows_ptr": "*i64", "grad_ptr": "*bf16", "loss_ptr": "*fp32", "gscale_ptr": "*fp32",
           "count_ptr": "*i32", "limit_ptr": "*i32", "limit_offset": "i64", "M": "i32", "V": "i32", "H": "i32",
           "src": "i32", "stride_om": "i64", "stride_wv": "i64", "stride_gm": "i64", "smoothing": "fp32",
           "z_loss": "fp32", "softcap": "fp32"}
    consts = {"COMPUTE_GRAD": True, "HAS_SOFTCAP": True, "HAS_COLSUM": True, "HAS_GSCALE": True, "MEAN": True,
              "BLOCK_H": 1024}
    sig.update(dict.fromkeys(consts, "constexpr"))
    cases.append(CompileCase(mod, "online_finish_kernel", sig, consts, num_warps=4, num_stages=1))
    return cases


@pytest.mark.slow   # compile-only: CI runs it; the GPU run (-m 'not slow') needs no repeat
def test_compiles_for_gpu_without_spills():
    reports = compile_for_gpu(_ce_cases(), archs=(90,)) + compile_for_gpu(_ce_cases()[:1], archs=(80,))
    for arch in (80, 90):
        reports += compile_for_gpu([c for a, c in _mm_cases() if a == arch], archs=(arch,))
        reports += compile_for_gpu(_online_cases(arch), archs=(arch,))
    print("\n".join(str(r) for r in reports))
    for r in reports:
        assert_no_spills(r)
        assert not r["wgmma_serialized"], f"wgmmas serialized (ptxas C7515): {r}"
    gemms = [r for r in reports if r["label"].startswith(("bounded_matmul", "online_logits", "online_grad"))]
    assert all(r["hgmma"] > 0 for r in gemms if r["arch"] == 90), gemms
    assert all(r["hmma"] > 0 for r in gemms if r["arch"] == 80), gemms
