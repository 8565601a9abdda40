"""nf4_lora_linear: forward and every gradient against the fp32 reference (style.md tolerance rule: the error
must be at most 2x plain PyTorch's at the same dtype plus a small atol), on the Triton path (interpreted on
CPU) and the CPU path; dropout mask reproducibility; PEFT on bitsandbytes; torch.compile; GPU compile report.

Interpreted shapes stay <= 256 with 128-wide tiles (cost follows the number of programs).
"""
import math
import warnings

import pytest
import torch

import qlora_kernels
from qlora_kernels import _backend
from qlora_kernels.nn import LoRALinear4bit
from qlora_kernels.ops import nf4_lora_linear as ops
from qlora_kernels.ops.nf4 import quantize_nf4
from qlora_kernels.reference import nf4_lora_linear as ref
from qlora_kernels.testing import (CompileCase, assert_close, assert_no_spills, check_cuda_graph, compile_for_gpu,
                                   max_error)

nf4_lora_linear = qlora_kernels.nf4_lora_linear
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL_FRAC = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


NATIVE = _backend.native() is not None     # without it (QLORA_KERNELS_NO_EXT=1, failed build) no "cpu" backend
CPU_PATH = pytest.param("cpu", marks=pytest.mark.skipif(not NATIVE, reason="the CPU path needs the extension"))


def _backends(device):
    # "default": Triton (interpreted on CPU, compiled on CUDA); "cpu": extension dequantize + torch matmul
    return ["default"] + (["cpu"] if device == "cpu" and NATIVE else [])


def _make(M, N, K, r, blocksize=64, double_quant=True, dtype=torch.float32, device="cpu", bias=True, lead=()):
    w = torch.randn(N, K, device=device) / math.sqrt(K)
    qw = quantize_nf4(w, blocksize, double_quant, backend="reference")
    x = torch.randn(*lead, M, K, device=device).to(dtype)
    A = torch.randn(r, K, device=device) / math.sqrt(K)
    B = torch.randn(N, r, device=device) / math.sqrt(r)
    b = torch.randn(N, device=device) if bias else None
    return qw, x, A, B, b


def _run(fn, x, A, B, b, dy_seed=1):
    """Output and grads (x, A, B, bias) of fn(x, A, B, b) with a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, A, B, b)]
    y = fn(*leaves)
    gen = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(actual, exact, plain, dtype, what):
    if actual is None:
        assert exact is None, what
        return
    err, base = max_error(actual, exact), max_error(plain, exact)
    atol = ATOL_FRAC[dtype] * max(float(exact.abs().max()) if exact.numel() else 0.0, 1e-6)
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x plain {base:.3g} + atol {atol:.3g}"


def _compare(qw, x, A, B, b, scaling, backend, keep=None, p=0.0, seed=0):
    be = None if backend == "default" else backend

    def ours(x_, A_, B_, b_):
        torch.manual_seed(seed)
        return nf4_lora_linear(x_, qw, A_, B_, scaling, b_, dropout_p=p, backend=be)

    y, grads = _run(ours, x, A, B, b)
    y32, grads32 = _run(lambda x_, A_, B_, b_: ref.nf4_lora_linear(x_, qw, A_, B_, scaling, b_, keep, p), x, A, B, b)
    yp, gradsp = _run(lambda x_, A_, B_, b_: ref.nf4_lora_linear(x_, qw, A_, B_, scaling, b_, keep, p, upcast=False),
                      x, A, B, b)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (qw.shape[0],)
    _check(y, y32, yp, x.dtype, "y")
    for name, g, g32, gp, t in zip(("dx", "dA", "dB", "dbias"), grads, grads32, gradsp, (x, A, B, b)):
        if g is not None:
            assert g.dtype == t.dtype and g.shape == t.shape, name
        _check(g, g32, gp, x.dtype, name)
    return y


# (M, N, K, r, blocksize, double_quant): odd sizes, partial tiles, r in {1, 8, 64}, blocksizes that take the
# one-scale-per-row and several-scales-per-row paths, M <= 16 (small-M kernel) and M > 128 (two row tiles)
SHAPES = [(37, 96, 192, 1, 64, True), (1, 80, 256, 8, 128, False), (130, 40, 128, 64, 32, True),
          (5, 48, 64, 8, 64, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-bs{s[4]}-dq{int(s[5])}")
def test_matches_reference(device, dtype, shape):
    M, N, K, r, bs, dq = shape
    qw, x, A, B, b = _make(M, N, K, r, bs, dq, dtype, device, bias=(M % 2 == 1))
    for backend in _backends(device):
        _compare(qw, x, A, B, b, 2.0, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(300, 256, 512, 16, 64, True)],
                         ids=lambda s: "x".join(map(str, s[:4])) + f"-bs{s[4]}")
def test_prmt_lookup_matches_select_tree_cuda(shape, monkeypatch):
    """QLORA_KERNELS_NF4_LOOKUP=prmt (inline PTX) against the reference, and bit for bit against the select
    tree: both feed the same exact bf16(code * scale) weights to the same tiles (autotuning off)."""
    M, N, K, r, bs, dq = shape
    qw, x, A, B, b = _make(M, N, K, r, bs, dq, torch.bfloat16, "cuda", bias=True)
    monkeypatch.setenv("QLORA_KERNELS_AUTOTUNE", "0")
    out = {}
    for lookup in ops.LOOKUPS:
        monkeypatch.setenv("QLORA_KERNELS_NF4_LOOKUP", lookup)
        out[lookup] = _compare(qw, x, A, B, b, 2.0, "default")
        out[lookup + " dx"] = _run(lambda x_, A_, B_, b_: nf4_lora_linear(x_, qw, A_, B_, 2.0, b_), x, A, B, b)[1][0]
    assert torch.equal(out["prmt"], out["select"]) and torch.equal(out["prmt dx"], out["select dx"])


@pytest.mark.cuda
@pytest.mark.parametrize("lookup", ops.LOOKUPS)
def test_every_tile_config_cuda(lookup, monkeypatch):
    """Each config the autotuner may pick, forced alone, against the reference (partial tiles: M, N, K
    not multiples of the tiles)."""
    from qlora_kernels.kernels import nf4_lora_linear as K
    monkeypatch.setenv("QLORA_KERNELS_NF4_LOOKUP", lookup)
    monkeypatch.setenv("QLORA_KERNELS_AUTOTUNE", "0")    # the launcher then takes the list's first config
    for name in ("FWD_CONFIGS", "FWD_SMALL_M_CONFIGS", "DX_CONFIGS"):
        for cfg in getattr(K, name):
            monkeypatch.setattr(K, name, [cfg])
            M = 13 if name == "FWD_SMALL_M_CONFIGS" else 300
            qw, x, A, B, b = _make(M, 320, 576, 16, 64, True, torch.bfloat16, "cuda", bias=True)
            _compare(qw, x, A, B, b, 2.0, "default")


@pytest.mark.cuda
@pytest.mark.parametrize("lookup", ops.LOOKUPS)
def test_cuda_no_host_sync(lookup, monkeypatch):
    """Forward and backward (dropout, bias, double quant, both GEMM kinds) never wait for the device."""
    monkeypatch.setenv("QLORA_KERNELS_NF4_LOOKUP", lookup)
    for M in (300, 8):   # training tiles and the decode kernel
        qw, x, A, B, b = _make(M, 256, 512, 16, 64, True, torch.bfloat16, "cuda", bias=True)
        x.requires_grad_()
        A.requires_grad_()
        B.requires_grad_()
        run = lambda: nf4_lora_linear(x, qw, A, B, 2.0, b, dropout_p=0.1).sum().backward()  # noqa: E731
        run()   # autotuning and compilation synchronize: outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_decode_setting_is_checked(monkeypatch):
    x = torch.randn(1, 64)
    assert not ops.cuda_decode(x, 64, 256)                    # CPU tensors never take the CUDA kernel
    monkeypatch.setenv("QLORA_KERNELS_DECODE", "cuda")
    assert not ops.cuda_decode(x, 64, 256)
    monkeypatch.setenv("QLORA_KERNELS_DECODE", "gemv")
    with pytest.raises(ValueError, match="QLORA_KERNELS_DECODE"):
        ops.cuda_decode(x, 64, 256)


CUDA_EXT = torch.cuda.is_available() and getattr(_backend.native(), "with_cuda", False)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_EXT, reason="the CUDA decode kernel needs the extension built with CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
# (N, K, r, blocksize, double_quant): rows past the last CTA's, K-slices split unevenly over the warps,
# r past one warp's 32 lanes, blocksize 32 (one scale per lane), 128 and 4096 (several K-slices per scale)
@pytest.mark.parametrize("shape", [(37, 96, 1, 32, True), (300, 2080, 40, 32, False), (64, 4096, 256, 4096, True),
                                   (8, 1024, 8, 128, False)])
def test_cuda_decode_kernel(dtype, shape, monkeypatch):
    """QLORA_KERNELS_DECODE=cuda: one token through csrc/nf4_lora_linear_cuda.cu, against the fp32 reference
    (gradients through the Triton backward), bias and no bias, a 3-D x and a view at an offset."""
    monkeypatch.setenv("QLORA_KERNELS_DECODE", "cuda")
    N, K, r, bs, dq = shape
    qw, x, A, B, b = _make(1, N, K, r, bs, dq, dtype, "cuda", bias=True)
    assert ops.cuda_decode(x, bs, qw.nested_blocksize if dq else None)
    assert not ops.cuda_decode(x, 1 << K.bit_length(), None)   # a block past one row: the kernel indexes per row
    _compare(qw, x, A, B, b, 2.0, "default")
    _compare(qw, x, A.to(dtype), B.to(dtype), None, 0.5, "default")
    big = torch.randn(3, 5, K, device="cuda").to(dtype)
    y = nf4_lora_linear(big[1:2, 3], qw, A, B, 2.0, b, training=False)     # (1, K) view, offset 8 rows in
    ref_y = ref.nf4_lora_linear(big[1:2, 3], qw, A, B, 2.0, b)
    assert max_error(y, ref_y) <= max(1e-2 * float(ref_y.abs().max()), 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("lookup,decode", [(lookup, "triton") for lookup in ops.LOOKUPS] + [("select", "cuda")])
def test_cuda_graph_replay(lookup, decode, monkeypatch):
    """Forward and backward (training tiles) and the decode forward, captured once and replayed on new x:
    the decode loop of a generation under CUDA graphs (and the benchmark's [graph] rows) depend on it."""
    if decode == "cuda" and not CUDA_EXT:
        pytest.skip("the CUDA decode kernel needs the extension built with CUDA")
    monkeypatch.setenv("QLORA_KERNELS_NF4_LOOKUP", lookup)
    monkeypatch.setenv("QLORA_KERNELS_DECODE", decode)
    for M in (300, 1):
        qw, x, A, B, b = _make(M, 256, 512, 16, 64, True, torch.bfloat16, "cuda", bias=True)
        x.requires_grad_()
        A.requires_grad_()

        def step():
            x.grad = A.grad = None
            y = nf4_lora_linear(x, qw, A, B, 2.0, b)
            y.float().square().sum().backward()
            return y, x.grad, A.grad

        check_cuda_graph(step, [x], [torch.randn_like(x)], atol=1e-6, rtol=1e-5)


def test_lora_weights_in_compute_dtype(device):
    qw, x, A, B, b = _make(20, 64, 128, 8, dtype=torch.bfloat16, device=device)
    for backend in _backends(device):
        _compare(qw, x, A.bfloat16(), B.bfloat16(), b.bfloat16(), 0.5, backend)


def test_3d_noncontiguous_and_empty(device):
    qw, x, A, B, b = _make(6, 64, 128, 8, device=device, lead=(3,))
    for backend in _backends(device):
        be = None if backend == "default" else backend
        _compare(qw, x, A, B, b, 1.5, backend)                              # 3-D x
        xt = torch.randn(128, 18, device=device).t()                      # non-contiguous 2-D x
        assert not xt.is_contiguous()
        _compare(qw, xt, A, B, b, 1.5, backend)
        x0 = torch.zeros(0, 128, device=device, requires_grad=True)        # M = 0
        A0 = A.clone().requires_grad_()
        y0 = nf4_lora_linear(x0, qw, A0, B, 1.5, b, backend=be)
        assert y0.shape == (0, 64)
        y0.sum().backward()
        assert x0.grad.shape == (0, 128) and float(A0.grad.abs().sum()) == 0.0


def test_forward_without_autograd_is_the_same(device):
    """Under no_grad (or with nothing requiring grad) the forward op runs without the autograd Function: the same
    output, bit for bit, with the same dropout mask for the same seed."""
    qw, x, A, B, b = _make(19, 64, 128, 8, device=device, lead=(2,))
    A.requires_grad_()
    for backend in _backends(device):
        be = None if backend == "default" else backend
        torch.manual_seed(3)
        y = nf4_lora_linear(x, qw, A, B, 1.5, b, dropout_p=0.2, backend=be)
        assert y.grad_fn is not None
        for frozen in (False, True):
            torch.manual_seed(3)
            with torch.set_grad_enabled(frozen):
                y0 = nf4_lora_linear(x, qw, A.detach() if frozen else A, B, 1.5, b, dropout_p=0.2, backend=be)
            assert y0.grad_fn is None and torch.equal(y0, y.detach()), (backend, frozen)


def test_fallback_when_in_features_not_multiple_of_blocksize(device, monkeypatch):
    if device == "cpu" and not _backend.interpreting():
        pytest.skip("CPU tensors take the CPU path (any in_features): only the Triton path falls back")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    qw, x, A, B, b = _make(9, 40, 96, 4, blocksize=64, device=device)     # 96 % 64 != 0
    with pytest.warns(RuntimeWarning, match="not a multiple of blocksize"):
        _compare(qw, x, A, B, b, 2.0, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # only once
        _compare(qw, x, A, B, b, 2.0, "default")


@pytest.mark.parametrize("backend", ["default", CPU_PATH])
def test_dropout_uses_one_mask_forward_and_backward(device, backend):
    if backend == "cpu" and device != "cpu":
        pytest.skip("CPU path needs CPU tensors")
    p, seed = 0.3, 123
    qw, x, A, B, b = _make(21, 64, 128, 8, device=device)
    be = None if backend == "default" else backend
    # the mask the op uses is the one its seed gives: the seed is the first draw after manual_seed
    torch.manual_seed(seed)
    s = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
    triton_path = backend == "default" and (device == "cuda" or _backend.interpreting())
    keep = ops.dropout_keep_mask(x, s, p, "triton" if triton_path else "cpu")
    assert 0.6 < float(keep.float().mean()) < 0.8
    _compare(qw, x, A, B, b, 2.0, backend, keep=keep, p=p, seed=seed)
    # same seed, same output; another seed, another mask
    outs = []
    for sd in (seed, seed, seed + 1):
        torch.manual_seed(sd)
        outs.append(nf4_lora_linear(x, qw, A, B, 2.0, b, dropout_p=p, backend=be))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # y is linear in B: <dy, y(B + D) - y(B)> == <grad_B, D> only if backward used the forward's mask
    Bl = B.clone().requires_grad_()
    torch.manual_seed(seed)
    y = nf4_lora_linear(x, qw, A, Bl, 2.0, b, dropout_p=p, backend=be)
    dy = torch.randn_like(y)
    y.backward(dy)
    D = torch.randn_like(B)
    torch.manual_seed(seed)
    y2 = nf4_lora_linear(x, qw, A, B + D, 2.0, b, dropout_p=p, backend=be)
    fd = float((dy.double() * (y2.double() - y.detach().double())).sum())
    an = float((Bl.grad.double() * D.double()).sum())
    assert abs(fd - an) <= 1e-4 * (abs(an) + 1.0), (fd, an)
    # eval mode: no dropout
    y_eval = nf4_lora_linear(x, qw, A, B, 2.0, b, dropout_p=p, training=False, backend=be)
    assert torch.allclose(y_eval, nf4_lora_linear(x, qw, A, B, 2.0, b, backend=be), atol=1e-5)


@pytest.mark.parametrize("M", [16, 17])     # the last decode-sized M and the first training one
def test_large_r_dropout_over_several_k_tiles(device, M):
    """r = 200 (pre-pass tile BR = 256; the input gradient's LoRA dot in two r-chunks under the interpreter), K =
    384 (several K-tiles: the mask's offsets past the first tile, the pre-pass split over K), dropout 0.3 with
    the op's own mask; then each gradient asked for alone (the others' kernels skipped)."""
    p, seed = 0.3, 5
    qw, x, A, B, b = _make(M, 72, 384, 200, device=device)
    for backend in _backends(device):
        torch.manual_seed(seed)
        s = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
        triton_path = backend == "default" and (device == "cuda" or _backend.interpreting())
        keep = ops.dropout_keep_mask(x, s, p, "triton" if triton_path else "cpu")
        _compare(qw, x, A, B, b, 2.0, backend, keep=keep, p=p, seed=seed)
        be = None if backend == "default" else backend
        for alone in range(4):
            leaves = [t.detach().clone().requires_grad_(i == alone) for i, t in enumerate((x, A, B, b))]
            torch.manual_seed(seed)
            y = nf4_lora_linear(leaves[0], qw, leaves[1], leaves[2], 2.0, leaves[3], dropout_p=p, backend=be)
            refs = [t.detach().clone().requires_grad_(i == alone) for i, t in enumerate((x, A, B, b))]
            y_ref = ref.nf4_lora_linear(refs[0], qw, refs[1], refs[2], 2.0, refs[3], keep, p)
            dy = torch.randn_like(y_ref)
            y.backward(dy.to(y.dtype))
            y_ref.backward(dy)
            assert_close(leaves[alone].grad, refs[alone].grad, atol=1e-4, rtol=1e-4, msg=f"{backend}: grad {alone}")


def test_double_backward_is_refused(device):
    """The input gradient comes from a kernel with no derivative of its own: create_graph=True raises (a
    gradient penalty through it would silently miss terms)."""
    qw, x, A, B, b = _make(8, 64, 64, 4, device=device)
    x.requires_grad_()
    y = nf4_lora_linear(x, qw, A, B.requires_grad_(), 2.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_bad_inputs(device):
    qw, x, A, B, b = _make(4, 64, 128, 8, device=device)
    with pytest.raises(ValueError, match=r"x \(4, 100\)"):
        nf4_lora_linear(torch.randn(4, 100, device=device), qw, A, B)
    with pytest.raises(ValueError, match=r"lora_A \(8, 64\)"):
        nf4_lora_linear(x, qw, torch.randn(8, 64, device=device), B)
    with pytest.raises(ValueError, match=r"lora_B \(64, 4\)"):
        nf4_lora_linear(x, qw, A, torch.randn(64, 4, device=device))
    with pytest.raises(ValueError, match=r"bias \(63,\)"):
        nf4_lora_linear(x, qw, A, B, bias=torch.randn(63, device=device))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        nf4_lora_linear(x.long(), qw, A, B)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_p"):
            nf4_lora_linear(x, qw, A, B, dropout_p=p)
    with pytest.raises(ValueError, match="one device"):
        nf4_lora_linear(x, qw, A.to("meta"), B)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_lora_linear(x, torch.randn(64, 128), A, B)
    # the weight's scales: the kernels read them beside packed, as raw fp32 / uint8
    with pytest.raises(ValueError, match="absmax2 must be torch.float32 with 1 elements on"):
        qlora_kernels.NF4Weight(qw.packed, qw.shape, qw.dtype, 64, qabsmax=qw.qabsmax, absmax2=qw.absmax2.to("meta"),
                                code2=qw.code2, offset=qw.offset)
    with pytest.raises(ValueError, match="absmax must be torch.float32 with 128 elements"):
        qlora_kernels.NF4Weight(qw.packed, qw.shape, qw.dtype, 64, qw.absmax().half())
    with pytest.raises(ValueError, match="qabsmax must be torch.uint8 with 128 elements"):
        qlora_kernels.NF4Weight(qw.packed, qw.shape, qw.dtype, 64, qabsmax=qw.qabsmax[:-1], absmax2=qw.absmax2,
                                code2=qw.code2, offset=qw.offset)


def test_strided_bias(device):
    """A bias that is a strided view (a column of a larger tensor) is read at its strides, and its gradient
    reaches the tensor it views."""
    qw, x, A, B, _ = _make(5, 48, 128, 8, device=device)
    big = torch.randn(48, 2, device=device, requires_grad=True)
    for backend in _backends(device):
        big.grad = None
        y = nf4_lora_linear(x, qw, A, B, 2.0, big[:, 0], backend=None if backend == "default" else backend)
        expected = ref.nf4_lora_linear(x, qw, A, B, 2.0, big[:, 0].detach())
        assert max_error(y, expected) <= 1e-4 * float(expected.abs().max()), backend
        y.sum().backward()
        assert_close(big.grad[:, 0], torch.full((48,), 5.0, device=device), atol=1e-5, rtol=0)
        assert float(big.grad[:, 1].abs().sum()) == 0.0


def test_module_init_merge_and_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    mod = LoRALinear4bit.from_linear(lin, r=8, lora_alpha=16, lora_dropout=0.1, compute_dtype=torch.float32)
    assert mod.scaling == 2.0 and float(mod.lora_B.detach().abs().sum()) == 0.0
    bound = 1 / math.sqrt(128)                       # kaiming_uniform(a=sqrt(5)) on fan_in 128
    assert float(mod.lora_A.detach().abs().max()) <= bound and float(mod.lora_A.detach().std()) > bound / 3
    assert mod.lora_A.dtype == torch.float32 and not mod.bias.requires_grad
    rs = LoRALinear4bit.from_linear(lin, r=16, lora_alpha=16, use_rslora=True, double_quant=False)
    assert rs.scaling == 16 / 4 and rs.qweight.double_quant is False
    with torch.no_grad():
        mod.lora_B.normal_()
    merged = mod.merged_weight()
    assert torch.allclose(merged, ref.merged_weight(mod.qweight, mod.lora_A, mod.lora_B, 2.0), atol=1e-5)
    x = torch.randn(2, 5, 128)
    mod.eval()
    assert torch.allclose(mod(x), x @ merged.t() + lin.bias, atol=1e-4)
    mod.train()
    mod(x).sum().backward()
    assert mod.lora_A.grad is not None and mod.lora_B.grad is not None
    # bad settings and inputs fail where they are made: a dropout outside [0, 1) at construction (not at the
    # first training forward), an integer input instead of a silent cast (the output cast back truncated it)
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="lora_dropout"):
            LoRALinear4bit.from_linear(lin, r=4, lora_alpha=8, lora_dropout=p)
    with pytest.raises(TypeError, match="floating-point input"):
        mod(torch.ones(2, 128, dtype=torch.int64))


def test_module_quantizes_like_bitsandbytes_and_keeps_its_format_under_casts():
    """from_linear on an fp32 Linear with compute_dtype bf16 stores what bnb.nn.Linear4bit(compute_dtype=bf16)
    stores (the weight quantized in its own dtype); a dtype cast of the module (model.to(torch.bfloat16))
    casts the LoRA weights but never the quantization state, so the output does not move."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    base = bnb.nn.Linear4bit(256, 64, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    base.load_state_dict(lin.state_dict())
    theirs = qlora_kernels.NF4Weight.from_bnb(base.to("cpu").weight)
    mod = LoRALinear4bit.from_linear(lin, r=4, lora_alpha=8, compute_dtype=torch.bfloat16)
    ours = mod.qweight
    assert torch.equal(ours.packed, theirs.packed) and torch.equal(ours.absmax(), theirs.absmax())
    assert ours.dtype == theirs.dtype == torch.float32
    for double_quant in (True, False):
        mod = LoRALinear4bit.from_linear(lin, r=4, lora_alpha=8, double_quant=double_quant,
                                         compute_dtype=torch.float32)
        with torch.no_grad():
            mod.lora_B.normal_(std=0.1)
        x = torch.randn(3, 256)
        y0 = mod(x)
        scales = [t.clone() for t in mod.qweight.scale_tensors() if t is not None]
        mod.to(torch.bfloat16)
        assert mod.lora_A.dtype == torch.bfloat16
        assert all(torch.equal(a, b) for a, b in zip(scales, (t for t in mod.qweight.scale_tensors() if t is not None)))
        mod.compute_dtype = torch.float32
        mod.float()
        torch.testing.assert_close(mod(x), y0, atol=2e-2, rtol=2e-2)   # LoRA weights went through bf16


@pytest.mark.parametrize("backend", ["default", CPU_PATH])
def test_matches_peft_on_bitsandbytes(backend):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    torch.manual_seed(0)
    K, N, r = 192, 96, 8
    lin = torch.nn.Linear(K, N, bias=True)
    base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                             quant_type="nf4")
    base.load_state_dict(lin.state_dict())
    base = base.to("cpu")                    # quantizes; stays in training mode (no CPU repacking)
    layer = PeftLinear4bit(base, "default", config=peft.LoraConfig(r=r, lora_alpha=16), r=r, lora_alpha=16,
                           lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
    layer.train()
    qw = qlora_kernels.NF4Weight.from_bnb(base.weight)
    assert qw.double_quant
    x = torch.randn(3, 11, K)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft = layer(xp)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    Ao, Bo = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    y = nf4_lora_linear(xo, qw, Ao, Bo, layer.scaling["default"], base.bias.detach(),
                        backend=None if backend == "default" else backend)
    dy = torch.randn_like(y)
    y_peft.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(y, y_peft, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xo.grad, xp.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(Ao.grad, A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(Bo.grad, B.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not NATIVE, reason="the CPU path needs the extension")
def test_torch_compile_fullgraph_cpu_path():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = LoRALinear4bit.from_linear(torch.nn.Linear(128, 64), r=8, lora_alpha=16, lora_dropout=0.1,
                                                   compute_dtype=torch.float32)
            with torch.no_grad():
                self.lora.lora_B.normal_()

        def forward(self, x):
            q = self.lora.qweight
            return nf4_lora_linear(x, q, self.lora.lora_A, self.lora.lora_B, self.lora.scaling, self.lora.bias,
                                   dropout_p=0.1, backend="cpu").relu()

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 7, 128)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = net.lora.lora_A.grad.clone()
    net.lora.lora_A.grad = None
    torch.manual_seed(5)
    y_e = net(x)
    y_e.sum().backward()
    assert torch.allclose(y_c, y_e, atol=1e-5) and torch.allclose(net.lora.lora_A.grad, g_c, atol=1e-5)


# --- compiled for real GPUs (no GPU needed): no spills, fits shared memory, tensor cores on sm_90 ----------

# as launched on CUDA: bf16 activations and LoRA operands, fp32 block scales (double quant decoded on the host)
_W = {"packed_ptr": "*u8", "absmax_ptr": "*fp32"}
_FLAGS = dict(BLOCKSIZE=64, COMPUTE_F32=False, OUT_BF16_BITS=False, PRMT=False, HAS_LORA=True)
_MOD = "qlora_kernels.kernels.nf4_lora_linear"


_UNIT_STRIDES = ("stride_xk", "stride_br", "stride_dyn", "stride_ak")


def _case(kernel, sig, consts, num_warps, num_stages):
    # as launched: triton turns an int argument equal to 1 into the constant 1 (the unit strides of contiguous
    # x, B, dy, A) and specializes on the divisibility by 16 of pointers, sizes and leading strides of model
    # shapes (the code differs: 1408 vs 2048 SASS instructions for the forward tile without the latter)
    consts = dict(consts, **{k: 1 for k in _UNIT_STRIDES if k in sig})
    sig = dict(sig, **{k: "constexpr" for k in consts})
    aligned = tuple(n for n, t in sig.items() if t.startswith("*") or (t == "i32" and n not in ("M", "R")))
    return CompileCase(_MOD, kernel, sig, consts, num_warps, num_stages, aligned)


def _compile_cases():
    from qlora_kernels.kernels import nf4_lora_linear as K
    split = lambda c: ({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},  # noqa: E731
                       c["num_warps"], c["num_stages"])
    gemm, other = [], []
    fwd_sig = {"x_ptr": "*bf16", **_W, "xa_ptr": "*bf16", "b_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16",
               **{k: "i32" for k in "M N K R stride_xm stride_xk stride_bn stride_br".split()}}
    for cfgs, target in ((K.FWD_CONFIGS, gemm), (K.FWD_SMALL_M_CONFIGS, other)):
        for c in cfgs:
            ce, w, s = split(c)
            target.append(_case("nf4_lora_fwd_kernel", fwd_sig, dict(_FLAGS, HAS_BIAS=True, **ce), w, s))
    dx_sig = {"dy_ptr": "*bf16", **_W, "g_ptr": "*bf16", "a_ptr": "*bf16", "seed_ptr": "*i64", "dx_ptr": "*bf16",
              **{k: "i32" for k in "M N K R stride_dym stride_dyn stride_ar stride_ak".split()}, "p": "fp32"}
    for c in K.DX_CONFIGS:
        ce, w, s = split(c)
        gemm.append(_case("nf4_lora_dx_kernel", dx_sig, dict(_FLAGS, HAS_DROPOUT=True, BR=K.DX_LORA_BR, **ce), w, s))
    down_sig = {"x_ptr": "*bf16", "a_ptr": "*bf16", "seed_ptr": "*i64", "xa_ptr": "*bf16", "part_ptr": "*fp32",
                **{k: "i32" for k in "M K R k_split stride_xm stride_xk stride_ar stride_ak".split()},
                "scale": "fp32", "p": "fp32"}
    for br in (16, 64, 256):    # r = 1..16, 64 (and 32), 256; training M (one split) and decode (K split)
        for M, split in ((4096, False), (1, True)):
            other.append(_case("lora_down_kernel", down_sig, dict(
                HAS_DROPOUT=True, COMPUTE_F32=False, SPLIT=split, BM=K.lora_down_block_m(M),
                BK=K.lora_down_block_k(br), BR=br), K.lora_down_num_warps(br), 3))
    other.append(_case("lora_down_reduce_kernel", {"part_ptr": "*fp32", "xa_ptr": "*bf16", "n": "i32",
                                                   "splits": "i32", "scale": "fp32"},
                       {"BLOCK": K.LORA_DOWN_REDUCE_BLOCK}, 4, 3))
    other.append(_case("dropout_keep_kernel", {"x_ptr": "*bf16", "seed_ptr": "*i64", "out_ptr": "*bf16",
                                               "n": "i32", "K": "i32", "p": "fp32"}, {"BLOCK": K.DROPOUT_BLOCK}, 4, 3))
    return gemm, other


def _with_prmt(case):
    return CompileCase(case.module, case.kernel, case.signature, dict(case.constexprs, PRMT=True), case.num_warps,
                       case.num_stages, case.aligned)


@pytest.mark.slow   # compile-only: CI runs it; the GPU run (-m 'not slow') needs no repeat
def test_gpu_compile_no_spills_tensor_cores():
    pytest.importorskip("triton.backends.nvidia")
    gemm, other = _compile_cases()
    prmt = [_with_prmt(c) for c in gemm + other if "PRMT" in c.constexprs]
    # every config on sm_90 (the target; HGMMA for the large-M GEMMs), with both lookups; two on sm_80 too
    reports = (compile_for_gpu(gemm + other + prmt, archs=(90,))
               + compile_for_gpu(gemm[:1] + gemm[-1:] + prmt[:1], archs=(80,)))
    labels = [c.label() for c in gemm + prmt[:len(gemm)]]
    # the dequantized weight tile is wgmma's register operand (forward and input gradient): it never goes through
    # shared memory
    forward = [c.label() for c in gemm + other + prmt
               if c.kernel == "nf4_lora_dx_kernel" or (c.kernel == "nf4_lora_fwd_kernel" and c.constexprs["BN"] >= 64)]
    by_label = {(r["label"], r["arch"], r["triton"]): r for r in reports}
    for rep in reports:
        print(rep)
        assert_no_spills(rep)
        # ptxas serializing the wgmmas (C7515) costs the overlap of the tensor cores with everything else
        assert not rep["wgmma_serialized"], f"wgmmas serialized (ptxas C7515): {rep}"
        if rep["label"] in labels:
            assert (rep["hgmma"] > 0) if rep["arch"] == 90 else (rep["hmma"] > 0), f"no tensor cores: {rep}"
        if rep["label"] in forward and rep["arch"] == 90:
            assert rep["hgmma_reg_a"] > 0, f"weight not fed from registers: {rep}"
    # the byte-permute lookup must shrink the K-loop (the select tree is ~19 instructions per value)
    for case in prmt:
        select = dict(case.constexprs, PRMT=False)
        twin = CompileCase(case.module, case.kernel, case.signature, select, case.num_warps, case.num_stages)
        for (label, arch, version), rep in by_label.items():
            if label == case.label():
                assert rep["mma_loop"] < by_label[(twin.label(), arch, version)]["mma_loop"], rep
    # static cost of the K-loop (benchmarks/NOTES.md): issue cycles (4 warp-instructions per SM per cycle)
    # against the tile's tensor-core cycles (~3,410 dense bf16 FLOP per SM per cycle on an H100)
    for case in gemm + prmt:
        c = case.constexprs
        flop = 2 * c["BM"] * c["BN"] * c["BK"]
        for (label, arch, version), rep in by_label.items():
            if label == case.label() and arch == 90 and rep["mma_loop"]:
                issue = case.num_warps * rep["mma_loop"] / 4
                print(f"K-loop {case.kernel} {c['BM']}x{c['BN']}x{c['BK']} {'prmt' if c['PRMT'] else 'select'} "
                      f"triton {version}: {rep['mma_loop']} instr, issue/mma cycles {issue / (flop / 3410):.2f}")


def test_lora_down_splits_k_only_when_tiles_are_few():
    """The x @ A.T pre-pass: one-token M spreads K over programs (each split a whole number of BK blocks, none
    empty), training M keeps one split; under the interpreter test_matches_reference runs both forms."""
    assert ops.lora_down_splits(1, 64, 264) == (64, 1)         # M = 1, K = 4096 / 64: one block per program
    assert ops.lora_down_splits(64, 64, 264) == (5, 13)        # M = 4096: 64 tiles x 5 splits of 13 blocks
    assert ops.lora_down_splits(512, 64, 264) == (1, 64)       # M = 32768: the tiles fill the GPU
    assert ops.lora_down_splits(1, 3, 264) == (3, 1) and ops.lora_down_splits(1, 2, 2) == (2, 1)
    for tiles, blocks, programs in ((1, 7, 4), (3, 10, 8), (2, 5, 264)):
        splits, per = ops.lora_down_splits(tiles, blocks, programs)
        assert (splits - 1) * per < blocks <= splits * per


def test_auto_decode_needs_the_kernel_for_the_device(monkeypatch):
    """QLORA_KERNELS_DECODE=auto takes the CUDA decode kernel only where the build holds code for the device
    (a card newer than QLORA_KERNELS_CUDA_ARCHS keeps the Triton tile); "cuda" insists."""
    from types import SimpleNamespace
    x = SimpleNamespace(is_cuda=True, shape=(1, 64), device=SimpleNamespace(index=0))
    native = SimpleNamespace(with_cuda=True, nf4_lora_gemv_cuda_has_image=lambda device: False)
    monkeypatch.setattr(_backend, "native", lambda: native)
    for has_image, decode, expected in ((False, "auto", False), (True, "auto", True), (False, "cuda", True)):
        native.nf4_lora_gemv_cuda_has_image = lambda device, has_image=has_image: has_image
        _backend.native_has_image.cache_clear()
        monkeypatch.setenv("QLORA_KERNELS_DECODE", decode)
        assert ops.cuda_decode(x, 64, 256) is expected, (has_image, decode)
    _backend.native_has_image.cache_clear()
