"""swiglu against transformers' LlamaMLP activation math in fp64 (the tolerance rule: at most 2x plain PyTorch's
error at the same dtype, plus a small atol), forward and both gradients; Triton interpreted on CPU tensors in CI."""
import pytest
import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import swiglu as kernels
from qlora_kernels.ops import swiglu as ops
from qlora_kernels.ops.swiglu import swiglu
from qlora_kernels.reference import swiglu as ref
from qlora_kernels.testing import CompileCase, assert_no_spills, check_cuda_graph, compile_for_gpu, max_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = DEVICE == "cuda" or _backend.interpreting()
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _run(fn, g, u, dy, need=(True, True)):
    g, u = g.detach().clone().requires_grad_(need[0]), u.detach().clone().requires_grad_(need[1])
    y = fn(g, u)
    y.backward(dy.to(y.dtype))
    return y, g.grad, u.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 1000), (5,), (0, 8)])
def test_matches_hf_math(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(shape, generator=gen) * 4).to(DEVICE, dtype)
    u = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    ours, torch_, exact = (_run(swiglu, g, u, dy), _run(ref.swiglu, g, u, dy),
                           _run(ref.swiglu, g.double(), u.double(), dy.double()))
    for name, o, t, e in zip(("y", "dgate", "dup"), ours, torch_, exact):
        assert o.dtype == t.dtype == dtype and o.shape == e.shape, name
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        err, bound = max_error(o, e), 2 * max_error(t, e) + ATOL[dtype] * scale
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype}, {shape})"


def test_forward_without_autograd_is_the_same():
    """No backward can follow (no_grad, nothing requiring grad): the forward op alone, the same values."""
    g = torch.randn(6, 64, device=DEVICE)[:, ::2]
    u = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    y = swiglu(g, u)
    with torch.no_grad():
        y0 = swiglu(g, u)
    y1 = swiglu(g, u.detach())
    assert y.grad_fn is not None and y0.grad_fn is None and y1.grad_fn is None
    assert torch.equal(y0, y.detach()) and torch.equal(y1, y.detach())


def test_one_input_needs_grad_and_strided_inputs():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(6, 64, generator=gen).to(DEVICE)[:, ::2]          # strided: made contiguous for the kernel
    u, dy = torch.randn(6, 32, generator=gen).to(DEVICE), torch.randn(6, 32, generator=gen).to(DEVICE)
    for need in ((True, False), (False, True)):
        ours, want = _run(swiglu, g, u, dy, need), _run(ref.swiglu, g, u, dy, need)
        for o, w in zip(ours, want):
            assert (o is None) == (w is None) and (o is None or max_error(o, w) < 1e-5)


def test_large_values_stay_finite():
    g = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4], device=DEVICE)
    u = torch.ones(5, device=DEVICE)
    y, dg, du = _run(swiglu, g, u, torch.ones(5, device=DEVICE))
    assert bool(y.isfinite().all() & dg.isfinite().all() & du.isfinite().all())
    assert max_error(y, ref.swiglu(g, u)) < 1e-3


def test_bad_input_changes_nothing():
    g = torch.randn(4, 8)
    for args, err, msg in [((g, torch.randn(4, 7)), ValueError, r"one shape.*\(4, 8\).*\(4, 7\)"),
                           ((g, g.half()), TypeError, "one dtype"), ((g.long(), g.long()), TypeError, "one dtype"),
                           ((g, "x"), TypeError, "must be tensors")]:
        with pytest.raises(err, match=msg):
            swiglu(*args)
    with pytest.raises(ValueError, match="one device"):
        swiglu(g, g.to("meta"))


def test_compiles_fullgraph():
    g = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    u = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    fn = torch.compile(lambda a, b: swiglu(a, b) * 2, backend="aot_eager", fullgraph=True)
    fn(g, u).sum().backward()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    (ref.swiglu(g2, u2) * 2).sum().backward()
    assert max_error(g.grad, g2.grad) < 1e-5 and max_error(u.grad, u2.grad) < 1e-5


@pytest.mark.skipif(not TRITON, reason="needs the Triton path (CUDA, or TRITON_INTERPRET=1)")
def test_double_backward_is_refused():
    g = torch.randn(8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(swiglu(g, g.detach()).sum(), g, create_graph=True)


@pytest.mark.slow   # compile-only: CI runs it; the GPU run (-m 'not slow') needs no repeat
def test_gpu_compile_swiglu_kernels():
    sig = {"g_ptr": "*bf16", "u_ptr": "*bf16", "y_ptr": "*bf16", "n": "i64", "BF16": "constexpr",
           "BF16_BITS": "constexpr", "BLOCK": "constexpr"}
    bsig = {"g_ptr": "*bf16", "u_ptr": "*bf16", "dy_ptr": "*bf16", "dg_ptr": "*bf16", "du_ptr": "*bf16", "n": "i64",
            "BF16": "constexpr", "BF16_BITS": "constexpr", "NEED_DG": "constexpr", "NEED_DU": "constexpr",
            "BLOCK": "constexpr"}
    cases = [CompileCase("qlora_kernels.kernels.swiglu", "swiglu_forward_kernel", sig,
                         {"BF16": True, "BF16_BITS": False, "BLOCK": kernels.BLOCK}, num_warps=kernels.NUM_WARPS,
                         aligned=("g_ptr", "u_ptr", "y_ptr", "n")),
             CompileCase("qlora_kernels.kernels.swiglu", "swiglu_backward_kernel", bsig,
                         {"BF16": True, "BF16_BITS": False, "NEED_DG": True, "NEED_DU": True, "BLOCK": kernels.BLOCK},
                         num_warps=kernels.NUM_WARPS, aligned=("g_ptr", "u_ptr", "dy_ptr", "dg_ptr", "du_ptr", "n"))]
    for report in compile_for_gpu(cases):
        print(report)
        assert_no_spills(report)
        assert report["instructions"] < 400, report   # elementwise: no slow paths pulled in


@pytest.mark.cuda
def test_cuda_graph_replay_without_host_sync():
    """Forward and backward captured in a CUDA graph (a host sync while capturing raises) and replayed on new
    inputs."""
    g = torch.randn(300, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(300, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        g.grad = u.grad = None
        y = swiglu(g, u)
        y.float().square().sum().backward()
        return y, g.grad, u.grad

    check_cuda_graph(step, [g, u], [torch.randn_like(g), torch.randn_like(u)], atol=1e-6, rtol=1e-5)
