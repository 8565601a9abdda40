"""rms_norm against transformers' LlamaRMSNorm math in fp64 (the tolerance rule: at most 2x plain PyTorch's error
at the same dtype, plus a small atol), forward and both gradients; Triton interpreted on CPU tensors in CI."""
import pytest
import torch

from qlora_kernels import _backend
from qlora_kernels.ops import rms_norm as ops
from qlora_kernels.ops.rms_norm import rms_norm
from qlora_kernels.reference import rms_norm as ref
from qlora_kernels.testing import CompileCase, assert_no_spills, check_cuda_graph, compile_for_gpu, max_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = DEVICE == "cuda" or _backend.interpreting()
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _run(fn, x, w, dy, eps):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


def _check(shape, x_dtype, w_dtype, eps=1e-6, seed=0, x_view=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, x_dtype)
    if x_view is not None:
        x = x_view(x)
    w = (1 + 0.2 * torch.randn(x.shape[-1], generator=gen)).to(DEVICE, w_dtype)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE)
    ours = _run(rms_norm, x, w, dy, eps)
    torch_ = _run(ref.rms_norm, x, w, dy, eps)                     # HF's math at the same dtypes
    exact = _run(ref.rms_norm, x.double(), w.double(), dy.double(), eps)
    assert ours[0].dtype == torch_[0].dtype == torch.promote_types(w_dtype, x_dtype)
    atols = (ATOL[torch.promote_types(x_dtype, w_dtype)], ATOL[x_dtype], ATOL[w_dtype])
    for name, o, t, e, atol in zip(("y", "dx", "dw"), ours, torch_, exact, atols):
        assert o.shape == e.shape and o.dtype == t.dtype, (name, o.shape, o.dtype, t.dtype)
        err, bound = max_error(o, e), 2 * max_error(t, e) + atol
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({x_dtype}, {w_dtype}, {shape})"


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_matches_hf_math(x_dtype, w_dtype):
    _check((2, 7, 1000), x_dtype, w_dtype)     # H not a power of two


@pytest.mark.parametrize("shape,x_view", [((5, 64), None), ((1, 3), None), ((0, 96), None), ((3, 4, 96), None),
                                          ((6, 128), lambda x: x[:, ::2]),             # strided columns
                                          ((4, 6, 48), lambda x: x.transpose(0, 1))])  # rows out of order
def test_shapes_and_layouts(shape, x_view):
    _check(shape, torch.float32, torch.float32, eps=1e-5, x_view=x_view)


def test_rows_wider_than_the_kernel_take_the_torch_math(monkeypatch):
    monkeypatch.setattr(ops.kernels, "MAX_BLOCK_H", 64)
    x, w = torch.randn(3, 100, device=DEVICE), torch.rand(100, device=DEVICE)
    assert not ops.runs_triton(x) and torch.equal(rms_norm(x, w), ref.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_output_takes_in_place_updates(needs):
    """`h = norm(x); h += residual` as with HF's module (a view made inside the Function refused it)."""
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=needs[0])
    w = torch.rand(16, device=DEVICE, requires_grad=needs[1])
    h = rms_norm(x, w)
    h += 1.0
    h.sum().backward()
    want_x, want_w = x.detach().clone().requires_grad_(needs[0]), w.detach().clone().requires_grad_(needs[1])
    (ref.rms_norm(want_x, want_w, 1e-6) + 1.0).sum().backward()
    for got, want in ((x, want_x), (w, want_w)):
        assert (got.grad is None) == (want.grad is None)
        assert got.grad is None or max_error(got.grad, want.grad) < 1e-5


def test_forward_without_autograd_is_the_same():
    """No backward can follow (no_grad, nothing requiring grad): the forward op alone, the same values, and an
    output that takes in-place updates."""
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    w = torch.rand(16, device=DEVICE)
    y = rms_norm(x, w)
    with torch.no_grad():
        y0 = rms_norm(x, w)
    y1 = rms_norm(x.detach(), w)
    assert y.grad_fn is not None and y0.grad_fn is None and y1.grad_fn is None
    assert torch.equal(y0, y.detach()) and torch.equal(y1, y.detach())
    y1 += 1.0


def test_empty_rows_and_numpy_eps():
    import numpy as np
    x, w = torch.randn(4, 0, device=DEVICE), torch.ones(0, device=DEVICE)
    assert rms_norm(x, w).shape == (4, 0)                                   # H = 0: the torch math, as HF
    x, w = torch.randn(4, 8, device=DEVICE), torch.rand(8, device=DEVICE)
    assert max_error(rms_norm(x, w, np.float32(1e-5)), ref.rms_norm(x, w, 1e-5)) < 1e-6


def test_frozen_weight_and_large_values():
    """A frozen weight (QLoRA's norms) gets no gradient and costs no partial sums; |x| ~ 1e4 stays finite."""
    x = (torch.randn(4, 256) * 1e4).to(DEVICE).requires_grad_()
    w = torch.ones(256, device=DEVICE)
    y = rms_norm(x, w)
    y.backward(torch.ones_like(y))
    assert w.grad is None and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert max_error(y, ref.rms_norm(x.double(), w.double(), 1e-6)) < 1e-5


def test_matches_transformers_module():
    """The reference is transformers' own LlamaRMSNorm (and Qwen2's), so the kernel matches the module."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    for cls in (LlamaRMSNorm, Qwen2RMSNorm):
        m = cls(64, eps=1e-5)
        with torch.no_grad():
            m.weight.copy_(torch.rand(64) + 0.5)
        assert torch.equal(m(x), ref.rms_norm(x, m.weight, m.variance_epsilon))
        if TRITON:
            assert max_error(rms_norm(x.to(DEVICE), m.weight.to(DEVICE), 1e-5), m(x)) <= 2 ** -7 * 8


def test_bad_input_changes_nothing():
    x, w = torch.randn(2, 8), torch.ones(8)
    for args, err, msg in [((x, torch.ones(7)), ValueError, r"weight must be \(H,\).*\(2, 8\).*\(7,\)"),
                           ((x, torch.ones(2, 8)), ValueError, "weight must be"),
                           ((x.long(), w), TypeError, "x must be float32"),
                           ((x, w.double()), TypeError, "weight must be float32"),
                           ((x, w, -1e-6), ValueError, "eps must be"), ((x, w, float("nan")), ValueError, "eps")]:
        with pytest.raises(err, match=msg):
            rms_norm(*args)
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, w.to("meta"))


@pytest.mark.skipif(not TRITON, reason="needs the Triton path (CUDA, or TRITON_INTERPRET=1)")
def test_double_backward_is_refused():
    x = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    y = rms_norm(x, torch.ones(8, device=DEVICE))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_compiles_fullgraph():
    x, w = torch.randn(3, 32, device=DEVICE, requires_grad=True), torch.rand(32, device=DEVICE, requires_grad=True)
    fn = torch.compile(lambda a, b: rms_norm(a, b, 1e-6) * 2, backend="aot_eager", fullgraph=True)
    fn(x, w).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (ref.rms_norm(x2, w2, 1e-6) * 2).sum().backward()
    assert max_error(x.grad, x2.grad) < 1e-5 and max_error(w.grad, w2.grad) < 1e-5


@pytest.mark.slow   # compile-only: CI runs it; the GPU run (-m 'not slow') needs no repeat
def test_gpu_compile_rms_norm_kernels():
    """Both kernels compile for sm_80 / sm_90 with no spills at the hidden sizes of the workload (1B: 2048,
    3B: 3072, 8B: 4096, 70B: 8192) and at the row limit."""
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32", "n_rows": "i32", "H": "i32",
           "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "X_BF16": "constexpr", "Y_BF16_BITS": "constexpr",
           "BLOCK_H": "constexpr"}
    bsig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "dy_ptr": "*bf16", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
            "dw_part_ptr": "*fp32", "n_rows": "i32", "H": "i32", "stride_x": "i32", "stride_dy": "i32",
            "stride_dx": "i32", "X_BF16": "constexpr", "DX_BF16_BITS": "constexpr", "NEED_DW": "constexpr",
            "BLOCK_H": "constexpr"}
    cases = []
    for block_h in (2048, 4096, ops.kernels.MAX_BLOCK_H):
        warps = ops.kernels.num_warps_for(block_h)
        aligned = ("x_ptr", "w_ptr", "y_ptr", "rstd_ptr", "H", "stride_x", "stride_y")
        cases.append(CompileCase("qlora_kernels.kernels.rms_norm", "rms_norm_forward_kernel", sig,
                                 {"X_BF16": True, "Y_BF16_BITS": False, "BLOCK_H": block_h}, num_warps=warps,
                                 aligned=aligned))
        cases.append(CompileCase("qlora_kernels.kernels.rms_norm", "rms_norm_backward_kernel", bsig,
                                 {"X_BF16": True, "DX_BF16_BITS": False, "NEED_DW": True, "BLOCK_H": block_h},
                                 num_warps=warps, aligned=("x_ptr", "dy_ptr", "dx_ptr", "H", "stride_x")))
    for report in compile_for_gpu(cases):
        print(report)
        assert_no_spills(report)
        # the persistent grid counts on it (kernels.resident_programs)
        block_h = int(report["label"].split("BLOCK_H=")[1].split(",")[0])
        bound = ops.kernels.register_bound(block_h, backward="backward" in report["label"])
        assert report["registers"] <= bound, (report["registers"], bound, report["label"])


@pytest.mark.cuda
def test_cuda_graph_replay_without_host_sync():
    """Forward and backward captured in a CUDA graph (a host sync while capturing raises) and replayed on new x."""
    x = torch.randn(300, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(3072, device="cuda") + 0.5).requires_grad_()

    def step():
        x.grad = w.grad = None
        y = rms_norm(x, w, 1e-5)
        y.float().square().sum().backward()
        return y, x.grad, w.grad

    check_cuda_graph(step, [x], [torch.randn_like(x)], atol=1e-6, rtol=1e-5)
