"""FusedAdamW against torch.optim.AdamW: Triton (interpreted on CPU, compiled on CUDA) and the C++ path."""
import copy

import pytest
import torch

from qlora_kernels import FusedAdamW
from qlora_kernels import _backend
from qlora_kernels.kernels import adamw as kernels
from qlora_kernels.reference import adamw as ref
from qlora_kernels.testing import CompileCase, assert_close, assert_no_spills, compile_for_gpu

SHAPES = [(1,), (7,), (1000,), (64, 33)]
# (device, backend): the Triton kernels (interpreted on CPU tensors in CI) and the C++ extension
PATHS = ([("cpu", None)] if _backend.interpreting() else []) + \
        ([("cpu", "cpu")] if _backend.native() is not None else []) + \
        ([("cuda", None)] if torch.cuda.is_available() else [])
PATH_IDS = [f"{d}-{b or 'triton'}" for d, b in PATHS]
# fp32 params: ours rounds sqrt correctly where torch's vectorized CPU sqrt is off by 1 ulp now and then
TOL = dict(atol=2e-6, rtol=2e-5)


def _params(device, dtype=torch.float32, shapes=SHAPES, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _groups(params, **extra):
    half = len(params) // 2
    return [dict(params=params[:half], **extra),
            dict(params=params[half:], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)]


def _set_grads(step, *param_lists, none_every=3, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p0 in enumerate(param_lists[0]):
        g = torch.randn(p0.shape, generator=gen) * scale
        for params in param_lists:
            missing = none_every and (step + i) % none_every == 0  # grads None on some steps
            params[i].grad = None if missing else g.to(device=params[i].device, dtype=params[i].dtype)


def _assert_same_state(ours, theirs, params_ours, params_theirs, tol=TOL):
    for p, q in zip(params_ours, params_theirs):
        assert_close(p.detach(), q.detach(), **tol, msg="param")
        s, t = ours.state[p], theirs.state[q]
        assert set(t) <= set(s), (set(s), set(t))
        assert float(s["step"]) == float(t["step"])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in t:
                assert_close(s[key].float(), t[key].float(), **tol, msg=key)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("amsgrad,maximize,weight_decay", [(False, False, 1e-2), (True, False, 0.0),
                                                           (False, True, 0.0), (True, True, 0.1)])
def test_matches_torch_adamw(device, backend, amsgrad, maximize, weight_decay):
    ours_p, torch_p = _params(device), _params(device)
    kw = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours = FusedAdamW(_groups(ours_p), **kw, backend=backend)
    theirs = torch.optim.AdamW(_groups(torch_p), **kw)
    for step in range(55):
        _set_grads(step, ours_p, torch_p)
        ours.step()
        theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)
    assert ours.state[ours_p[0]]["step"].dtype == torch.float32 and ours.state[ours_p[0]]["step"].dim() == 0


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_fp32_states(device, backend, dtype):
    params = _params(device, dtype)
    refs = [p.detach().clone() for p in params]
    states = [(torch.zeros(p.shape, device=device), torch.zeros(p.shape, device=device),
               torch.zeros((), device=device)) for p in params]
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    for step in range(12):
        _set_grads(step, params, none_every=0)
        opt.step()
        ref.adamw_step(refs, [p.grad for p in params], [s[0] for s in states], [s[1] for s in states], None,
                       [s[2] for s in states], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for p, r, (m, v, _) in zip(params, refs, states):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert_close(opt.state[p]["exp_avg"], m, **TOL, msg="exp_avg")
        # one rounding of the fp32 result: at most 1 ulp apart where the fp32 values straddle a tie
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        assert_close(p.detach(), r, atol=1e-6, rtol=ulp, msg=str(dtype))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_bf16_stochastic_rounding(device, backend):
    n = 1 << 15
    p = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    # first Adam step moves every element by -lr: 1 - 1e-3 is below half a bf16 ulp away from 1.0
    opt = FusedAdamW([p], lr=1e-3, weight_decay=0.0, backend=backend, bf16_stochastic_rounding=True)
    opt.step()
    below = torch.tensor(1.0 - 2.0 ** -8, dtype=torch.bfloat16)
    values = p.detach().cpu()
    assert bool(((values == 1.0) | (values == below)).all())
    assert abs(values.float().mean().item() - (1.0 - 1e-3)) < 3e-4
    q = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
    q.grad = torch.ones_like(q)
    FusedAdamW([q], lr=1e-3, weight_decay=0.0, backend=backend).step()
    assert bool((q.detach() == 1.0).all())  # nearest even: every element stays
    # each group draws its own random bits (the kernels number tensors within one launch only)
    a, b = (torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(2))
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    FusedAdamW([dict(params=[a]), dict(params=[b])], lr=1e-3, weight_decay=0.0, backend=backend,
               bf16_stochastic_rounding=True).step()
    assert not torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_state_dict_both_ways_and_resume(device, backend):
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=True)
    torch_p, ours_p = _params(device), _params(device)
    theirs = torch.optim.AdamW(_groups(torch_p), **kw)
    ours = FusedAdamW(_groups(ours_p), **kw, backend=backend)
    for step in range(6):
        _set_grads(step, torch_p, ours_p)
        theirs.step()
    with torch.no_grad():
        for p, q in zip(ours_p, torch_p):
            p.copy_(q)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # torch -> ours (deepcopy: torch aliases)
    for step in range(6, 12):
        _set_grads(step, torch_p, ours_p)
        theirs.step()
        ours.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)

    back_p = [p.detach().clone().requires_grad_() for p in ours_p]
    back = torch.optim.AdamW(_groups(back_p), **kw)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # ours -> torch
    assert set(ours.state_dict()["state"][0]) == set(theirs.state_dict()["state"][0])
    # checkpoint / resume: a fresh FusedAdamW from our state dict follows the same trajectory bit for bit
    resumed_p = [p.detach().clone().requires_grad_() for p in ours_p]
    resumed = FusedAdamW(_groups(resumed_p), **kw, backend=backend)
    resumed.load_state_dict(copy.deepcopy(ours.state_dict()))
    for step in range(12, 18):
        _set_grads(step, ours_p, back_p, resumed_p)
        ours.step()
        back.step()
        resumed.step()
    _assert_same_state(ours, back, ours_p, back_p)
    for p, q in zip(ours_p, resumed_p):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_loading_a_live_state_dict_shares_nothing(device, backend):
    """state_dict() hands out the live state tensors; loading them must copy, or both optimizers would
    advance the same step counter (it did: each step then counted twice)."""
    ours_p, torch_p = _params(device), _params(device)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2)
    for step in range(2):
        _set_grads(step, torch_p, none_every=0)
        theirs.step()
    ours = FusedAdamW(ours_p, lr=1e-2, backend=backend)
    with torch.no_grad():
        for p, q in zip(ours_p, torch_p):
            p.copy_(q)
    ours.load_state_dict(theirs.state_dict())
    for step in range(2, 4):
        _set_grads(step, ours_p, torch_p, none_every=0)
        ours.step()
        theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)
    assert float(theirs.state[torch_p[0]]["step"]) == 4.0


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("betas", [(0.5, 0.999), (0.0, 0.99)])
def test_small_beta1_matches_torch_lerp(device, backend, betas):
    """1 - beta1 >= 0.5: torch's lerp switches to fma(w - 1, g - m, g); the other form differs by up to 4 %
    in exp_avg where it cancels (measured with beta1 = 0)."""
    ours_p, torch_p = _params(device, shapes=[(4096,)]), _params(device, shapes=[(4096,)])
    ours = FusedAdamW(ours_p, lr=1e-2, betas=betas, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, betas=betas)
    for step in range(30):
        _set_grads(step, ours_p, torch_p, none_every=0, scale=10.0 ** -(step % 6))
        ours.step()
        theirs.step()
    assert torch.equal(ours.state[ours_p[0]]["exp_avg"], theirs.state[torch_p[0]]["exp_avg"])
    _assert_same_state(ours, theirs, ours_p, torch_p)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_bf16_resume_and_copies(device, backend):
    """A bf16 run resumed from a state dict (fp32 moments kept at full precision, the stochastic-rounding
    counters restored), a deepcopy and a pickle round trip all continue bit for bit like the original."""
    import pickle

    params = _params(device, torch.bfloat16)
    kw = dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5, bf16_stochastic_rounding=True, backend=backend)
    opt = FusedAdamW(params, **kw)
    for step in range(5):
        _set_grads(step, params, none_every=0)
        opt.step()
    resumed_p = [p.detach().clone().requires_grad_() for p in params]
    resumed = FusedAdamW(resumed_p, **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin = copy.deepcopy(opt)
    twin_p = twin.param_groups[0]["params"]
    pickled = pickle.loads(pickle.dumps(opt))
    pickled_p = pickled.param_groups[0]["params"]
    for step in range(5, 15):
        _set_grads(step, params, resumed_p, twin_p, pickled_p, none_every=0)
        for o in (opt, resumed, twin, pickled):
            o.step()
    for other_p, other in ((resumed_p, resumed), (twin_p, twin), (pickled_p, pickled)):
        for p, q in zip(params, other_p):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["exp_avg"], other.state[q]["exp_avg"])
        assert other.max_grad_norm == 0.5


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_step_holds_no_gradient(device, backend):
    """After zero_grad() the optimizer keeps no reference to the last step's gradients (else they stay
    alive through the next backward, and their addresses could never repeat for the cached tables)."""
    import weakref

    params = _params(device)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0, backend=backend)
    for step in range(3):
        _set_grads(step, params, none_every=0)
        opt.step()
        alive = [weakref.ref(p.grad) for p in params]
        opt.zero_grad()
        assert all(r() is None for r in alive)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("max_norm", [0.3, 1e3])
def test_max_grad_norm_equals_clip_then_step(device, backend, max_norm):
    ours_p, torch_p = _params(device), _params(device)
    ours = FusedAdamW(_groups(ours_p), lr=1e-2, max_grad_norm=max_norm, backend=backend)
    theirs = torch.optim.AdamW(_groups(torch_p), lr=1e-2)
    for step in range(20):
        _set_grads(step, ours_p, torch_p, scale=float(step % 4))  # a zero-gradient step too
        ours.step()
        total = torch.nn.utils.clip_grad_norm_(torch_p, max_norm)
        theirs.step()
        assert ours.last_grad_norm.device.type == device
        assert_close(ours.last_grad_norm, total, atol=1e-6, rtol=1e-6, msg="norm")
    _assert_same_state(ours, theirs, ours_p, torch_p)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(device, backend, bad):
    ours_p, torch_p = _params(device), _params(device)
    ours = FusedAdamW(_groups(ours_p), lr=1e-2, max_grad_norm=1.0, backend=backend)
    theirs = torch.optim.AdamW(_groups(torch_p), lr=1e-2)
    for step in range(3):
        _set_grads(step, ours_p, torch_p, none_every=0)
        ours.step()
        torch.nn.utils.clip_grad_norm_(torch_p, 1.0)
        theirs.step()
    before = copy.deepcopy(ours.state_dict())
    params_before = [p.detach().clone() for p in ours_p]
    _set_grads(3, ours_p, none_every=0)
    ours_p[-1].grad[5, 7] = bad
    ours.step()
    assert int(ours.skipped_steps) == 1 and ours.skipped_steps.device.type == device
    assert not torch.isfinite(ours.last_grad_norm)
    for p, q in zip(ours_p, params_before):
        assert torch.equal(p.detach(), q)
    after = ours.state_dict()["state"]
    for i, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after[i][key], value), key
    for step in range(4, 7):  # training goes on as if the bad step never happened
        _set_grads(step, ours_p, torch_p, none_every=0)
        ours.step()
        torch.nn.utils.clip_grad_norm_(torch_p, 1.0)
        theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)
    assert int(ours.skipped_steps) == 1


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_scheduler_closure_zero_grad(device, backend):
    model_a = torch.nn.Linear(13, 5).to(device)
    model_b = copy.deepcopy(model_a)
    ours = FusedAdamW(model_a.parameters(), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    sched_a = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5)
    x = torch.randn(16, 13, device=device)
    for _ in range(8):
        for model, opt, sched in ((model_a, ours, sched_a), (model_b, theirs, sched_b)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert loss is not None
            sched.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert_close(p.detach(), q.detach(), **TOL)
    ours.zero_grad()
    assert all(p.grad is None for p in model_a.parameters())
    ours.step()  # no grads: nothing happens


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("change", ["state cleared", "moment replaced", "group replaced"])
def test_state_and_group_changes_take_effect(device, backend, change):
    """The step's cached plan (tables of addresses) is rebuilt when the state or a group dict is replaced, not
    only when a param or grad moves: grads written in place keep their addresses (zero_grad(set_to_none=False),
    and on CUDA the caching allocator hands the same blocks back)."""
    ours_p, torch_p = _params(device), _params(device)
    ours, theirs = FusedAdamW(_groups(ours_p), lr=1e-2, backend=backend), torch.optim.AdamW(_groups(torch_p), lr=1e-2)
    for step in range(6):
        for params in (ours_p, torch_p):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)).to(device)
                p.grad = g if p.grad is None else p.grad.copy_(g)            # same address from step 1 on
        if step == 3:
            for opt in (ours, theirs):
                if change == "state cleared":
                    opt.state.clear()
                elif change == "moment replaced":
                    for p in opt.param_groups[0]["params"]:
                        opt.state[p]["exp_avg"] = torch.zeros_like(opt.state[p]["exp_avg"])
                else:
                    opt.param_groups[1] = {**opt.param_groups[1], "lr": 0.2}
        ours.step()
        theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)


def test_primary_device_follows_the_params():
    """last_grad_norm and skipped_steps live on the device of the first param with a gradient, found when the
    plans are built (a model moved after its optimizer was made); here the first listed param never has one."""
    never = torch.zeros(3, device="meta", requires_grad=True)
    p = torch.zeros(5, requires_grad=True)
    opt = FusedAdamW([never, p], max_grad_norm=1.0, backend=None if _backend.interpreting() else "cpu")
    for scale in (1.0, 10.0, float("nan")):
        p.grad = torch.full((5,), scale)
        opt.step()
        if scale == scale:
            assert float(opt.last_grad_norm) == pytest.approx(scale * 5 ** 0.5)
    assert opt.skipped_steps.device == p.device and int(opt.skipped_steps) == 1


def test_load_hooks_run_as_torch_runs_them():
    """A load pre-hook's dict is what loads (the fp32 moments included); a post-hook's changes stay."""
    def pre(opt, sd):
        sd = copy.deepcopy(sd)
        for st in sd["state"].values():
            st["exp_avg"].zero_()
        return sd

    def post(opt):
        for st in opt.state.values():
            st["exp_avg_sq"].fill_(7.0)

    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    src = FusedAdamW([p], backend=None if _backend.interpreting() else "cpu")
    src.step()
    for cls in (FusedAdamW, torch.optim.AdamW):
        q = torch.zeros(4, requires_grad=True)
        opt = cls([q])
        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(src.state_dict())
        assert bool((opt.state[q]["exp_avg"] == 0).all()) and bool((opt.state[q]["exp_avg_sq"] == 7).all()), cls
    assert bool((src.state[p]["exp_avg"] != 0).all())                   # the caller's dict is not touched


def test_torch_adamw_keywords_are_accepted():
    p = torch.zeros(3, requires_grad=True)
    FusedAdamW([p], foreach=True, fused=None, capturable=False)
    torch.optim.AdamW([p], foreach=True, fused=None, capturable=False)
    with pytest.raises(ValueError, match="differentiable"):
        FusedAdamW([p], differentiable=True)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_empty_tensors(device, backend):
    only_empty = torch.zeros(0, device=device, requires_grad=True)
    only_empty.grad = torch.zeros(0, device=device)
    opt = FusedAdamW([only_empty], max_grad_norm=1.0, backend=backend)
    opt.step()
    assert float(opt.last_grad_norm) == 0.0 and int(opt.skipped_steps) == 0
    ours_p, torch_p = _params(device, shapes=[(0,), (5,)]), _params(device, shapes=[(0,), (5,)])
    ours, theirs = FusedAdamW(ours_p, lr=0.1, backend=backend), torch.optim.AdamW(torch_p, lr=0.1)
    for step in range(3):
        _set_grads(step, ours_p, torch_p, none_every=0)
        ours.step()
        theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)


def test_bad_input():
    p = torch.zeros(3, requires_grad=True)
    for kwargs, msg in [(dict(lr=-1.0), "learning rate"), (dict(eps=-1e-8), "epsilon"),
                        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
                        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
                        (dict(weight_decay=-0.1), "weight_decay"), (dict(max_grad_norm=0.0), "max_grad_norm")]:
        with pytest.raises(ValueError, match=msg):
            FusedAdamW([p], **kwargs)
        if "max_grad_norm" not in kwargs:
            with pytest.raises(ValueError, match=msg):
                torch.optim.AdamW([p], **kwargs)
    opt = FusedAdamW([p])
    with pytest.raises(ValueError, match="beta"):
        opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)], betas=(0.9, 1.5)))
    assert len(opt.param_groups) == 1                          # the refused group is not kept
    p.grad = torch.ones(3)
    opt.state[p].update(step=torch.zeros(()), exp_avg=torch.zeros(3, dtype=torch.bfloat16), exp_avg_sq=torch.zeros(3))
    with pytest.raises(ValueError, match="exp_avg"):           # the kernels would read bf16 bits as fp32
        opt.step()
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        FusedAdamW(emb.parameters()).step()


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_param_keeps_a_nan(device, backend, stochastic):
    """A NaN reaching a bf16 param stays NaN whatever its bit pattern (the GPU makes 0x7FFFFFFF, which the
    integer rounding carried into the sign bit: the param became -0.0 while its moments stayed NaN)."""
    p = torch.ones(8, dtype=torch.bfloat16, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = FusedAdamW([p], lr=1e-3, backend=backend, skip_nonfinite=False, bf16_stochastic_rounding=stochastic)
    opt.step()
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    opt.state[p]["exp_avg"][:4] = nans.to(device)            # quiet and signalling NaNs, either sign
    opt.step()
    assert bool(p.detach()[:4].isnan().all()) and bool(p.detach()[4:].isfinite().all())


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_strided_params_match_torch_adamw(device, backend):
    """Dense non-contiguous params (transposed, channels_last) work as in torch: the kernels walk storage flat,
    the grads (autograd's layout contract) and moments share the param's strides; state_dict both ways."""
    def make():
        gen = torch.Generator().manual_seed(5)
        t = torch.randn(33, 7, generator=gen).to(device).t()
        c = torch.randn(2, 3, 4, 5, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        return [torch.nn.Parameter(t), torch.nn.Parameter(c), torch.nn.Parameter(torch.randn(5, 1, generator=gen))]

    ours_p, torch_p = make(), make()
    assert not ours_p[0].is_contiguous() and not ours_p[1].is_contiguous()
    ours = FusedAdamW(ours_p, lr=1e-2, amsgrad=True, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, amsgrad=True)
    for step in range(12):
        for params in (ours_p, torch_p):
            loss = sum(((p * torch.arange(p.numel(), device=device).reshape(p.shape)) ** 2).sum() * (step + 1)
                       for p in params)
            for p in params:
                p.grad = None
            loss.backward()
        assert ours_p[1].grad.stride() == ours_p[1].stride()
        ours.step()
        theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)
    assert ours.state[ours_p[1]]["exp_avg"].stride() == ours_p[1].stride()
    # torch's state into ours keeps the param's layout; then both step on
    ours.load_state_dict(theirs.state_dict())
    assert ours.state[ours_p[0]]["exp_avg_sq"].stride() == ours_p[0].stride()
    for params in (ours_p, torch_p):
        for p in params:
            p.grad = torch.ones_like(p)
    ours.step()
    theirs.step()
    _assert_same_state(ours, theirs, ours_p, torch_p)


def test_gapped_or_mislaid_tensors_are_refused():
    backend = None if _backend.interpreting() else "cpu"
    base = torch.zeros(4, 6)
    gapped = torch.nn.Parameter(base[:, ::2])                      # every other column of a larger storage
    gapped.grad = torch.ones(4, 3)
    with pytest.raises(ValueError, match="storage densely"):
        FusedAdamW([gapped], backend=backend).step()
    p = torch.nn.Parameter(torch.zeros(6, 4).t())
    p.grad = torch.ones(4, 6)                                      # contiguous grad for a transposed param
    opt = FusedAdamW([p], backend=backend)
    with pytest.raises(ValueError, match="laid out like its param"):
        opt.step()
    assert bool((p == 0).all())
    opt = FusedAdamW([p], backend=backend)
    p.grad = torch.ones(6, 4).t()
    saved = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(6, 4),
                           "exp_avg_sq": torch.zeros(4, 6)}},
             "param_groups": opt.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match=r"'exp_avg' of shape \(6, 4\)"):
        opt.load_state_dict(saved)
    assert not opt.state[p]                                        # nothing loaded


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_grad_relaid_after_the_plan_is_cached(device, backend):
    """The cached step plan was keyed on addresses only: a grad re-strided over the same storage passed unchecked
    (Triton: a wrong update; C++: one group updated before the refusal). Now it raises and changes nothing."""
    a = torch.nn.Parameter(torch.randn(3, 3, device=device))
    b = torch.nn.Parameter(torch.randn(3, 3, device=device))
    opt = FusedAdamW([dict(params=[a]), dict(params=[b])], lr=1e-2, backend=backend)
    for _ in range(3):                                          # the plan is built, then reused
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()
    before = [t.clone() for t in (a.detach(), b.detach(), opt.state[a]["step"], opt.state[a]["exp_avg"])]
    b.grad = b.grad.t()                                         # same storage, other layout
    with pytest.raises(ValueError, match="laid out like its param"):
        opt.step()
    after = (a.detach(), b.detach(), opt.state[a]["step"], opt.state[a]["exp_avg"])
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_refusals_create_and_load_nothing():
    backend = None if _backend.interpreting() else "cpu"
    good, bad = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4, 3).t())
    good.grad, bad.grad = torch.ones(3, 4), torch.ones(3, 4)    # bad: a contiguous grad for a transposed param
    opt = FusedAdamW([good, bad], lr=1e-2, backend=backend)
    with pytest.raises(ValueError, match="laid out like its param"):
        opt.step()
    assert not opt.state                                        # no state made for the param checked first
    saved = {"state": {0: {"step": torch.tensor([5.0, 6.0]), "exp_avg": torch.zeros(3, 4),
                           "exp_avg_sq": torch.zeros(3, 4)}},
             "param_groups": [dict(opt.state_dict()["param_groups"][0], lr=123.0)]}
    with pytest.raises(ValueError, match="'step' must be one number"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-2 and not opt.state


def test_grad_of_another_dtype_is_refused():
    """torch lets a grad have its own dtype (Tensor.grad_dtype); the kernels read it as the param's."""
    p = torch.zeros(3, requires_grad=True)
    if not hasattr(p, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype")
    p.grad_dtype = torch.float64
    p.grad = torch.ones(3, dtype=torch.float64)
    opt = FusedAdamW([p], backend=None if _backend.interpreting() else "cpu")
    with pytest.raises(TypeError, match="grad in its param's dtype"):
        opt.step()
    assert not opt.state[p] and bool((p == 0).all())


@pytest.mark.skipif(_backend.native() is None, reason="needs the extension")
def test_native_step_refuses_bad_input_and_changes_nothing():
    """Checks raise before any work: a refused call advances no step counter, and a bad dtype raises instead of
    ending the process (an exception thrown inside an OpenMP region calls std::terminate)."""
    import subprocess
    import sys

    code = ("import torch\nfrom qlora_kernels import _backend\n"
            "try:\n    _backend.native().adamw_grad_stats_cpu([torch.ones(3, dtype=torch.float64)])\n"
            "except RuntimeError as err:\n    print('raised', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "grads must be float32, bfloat16 or float16" in proc.stdout, proc.stderr[-2000:]

    params = [torch.zeros(4), torch.zeros(4)]
    states = [[torch.zeros(4) for _ in params] for _ in range(2)]
    steps = [torch.zeros(()), torch.zeros((), dtype=torch.float64)]        # the second is refused
    with pytest.raises(RuntimeError, match=r"steps\[1\] must be a 0-d float32 CPU tensor"):
        _backend.native().adamw_step_cpu(params, [torch.ones(4)] * 2, *states, [], steps, 1e-3, 0.9, 0.999, 1e-8,
                                          0.0, False, False, 1.0, False, 0)
    assert float(steps[0]) == 0.0 and bool((params[0] == 0).all())


@pytest.mark.skipif(not (_backend.interpreting() and _backend.native() is not None),
                    reason="needs the interpreter and the extension")
def test_cpp_path_equals_triton_path():
    """Both compute the recipe with IEEE sqrt/div and its explicit fmas only (the extension is built with
    -ffp-contract=off: GCC fused p * decay + update into one fma, 1 ulp off on ~30 % of elements): the same bits."""
    a, b = _params("cpu"), _params("cpu")
    opt_a = FusedAdamW(_groups(a), lr=1e-2, amsgrad=True, max_grad_norm=0.5)
    opt_b = FusedAdamW(_groups(b), lr=1e-2, amsgrad=True, max_grad_norm=0.5, backend="cpu")
    for step in range(10):
        _set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach())
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.cuda
def test_cuda_step_never_waits_for_the_device():
    """Clip + guard + step without a host sync: in the steady state and when new grad tensors make the
    optimizer rebuild its pointer tables (uploaded from pinned memory, not by a syncing pageable copy)."""
    params = _params("cuda")
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=0.5)
    _set_grads(0, params, none_every=0)
    opt.step()                                       # compile and first tables outside the check
    torch.cuda.synchronize()
    kept = [p.grad for p in params]                  # held, so the new grads get new addresses
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kept and opt.last_grad_norm.is_cuda and int(opt.skipped_steps) == 0


@pytest.mark.cuda
def test_cuda_tables_reused_across_steps(monkeypatch):
    """The usual loop (zero_grad, backward, step): new grads land at the freed grads' addresses, so the
    pointer tables are built once, not per step."""
    params = _params("cuda")
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=0.5)
    builds = []
    build = opt._build_plans
    monkeypatch.setattr(opt, "_build_plans", lambda: builds.append(1) or build())
    for step in range(5):
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(builds) == 1


@pytest.mark.cuda
def test_mixed_devices_per_device():
    cpu_p, cuda_p = _params("cpu", shapes=SHAPES[:2]), _params("cuda", shapes=SHAPES[2:])
    mixed = cpu_p + cuda_p
    ref_p = [p.detach().cpu().clone().requires_grad_() for p in mixed]
    ours = FusedAdamW(mixed, lr=1e-2, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(ref_p, lr=1e-2)
    for step in range(5):
        _set_grads(step, mixed, ref_p, none_every=0)
        ours.step()
        torch.nn.utils.clip_grad_norm_(ref_p, 0.5)
        theirs.step()
    for p, q in zip(mixed, ref_p):
        assert_close(p.detach().cpu(), q.detach(), **TOL)


def _compile_cases():
    upd_sig = {"meta": "*i64", "chunks": "*i32", "n_tensors": "i32", "stats": "*fp32", "lr": "fp64",
               "beta1": "fp64", "beta2": "fp64", "eps": "fp32", "weight_decay": "fp64", "seed": "i32"}
    pro_sig = {"gmeta": "*i64", "chunks": "*i32", "n_tensors": "i32", "partials": "*fp32", "ticket": "*i32",
               "stats": "*fp32", "step_addrs": "*i64", "n_steps": "i32", "skipped": "*i64", "max_norm": "fp32"}
    cases = []
    for flag in (False, True):  # the lightest and the heaviest variant
        ce = dict(AMSGRAD=flag, MAXIMIZE=flag, CLIP=flag, SKIP=flag, STOCHASTIC=flag, BLOCK=kernels.UPDATE_BLOCK)
        cases.append(CompileCase("qlora_kernels.kernels.adamw", "adamw_update_kernel",
                                 {**upd_sig, **dict.fromkeys(ce, "constexpr")}, ce, num_warps=kernels.UPDATE_WARPS))
    for norm in (True, False):
        ce = dict(NORM=norm, FINALIZE=True, CLIP=True, SKIP=True, BLOCK=kernels.NORM_BLOCK,
                  RBLOCK=kernels.REDUCE_BLOCK)
        cases.append(CompileCase("qlora_kernels.kernels.adamw", "adamw_prologue_kernel",
                                 {**pro_sig, **dict.fromkeys(ce, "constexpr")}, ce, num_warps=kernels.NORM_WARPS))
    return cases


@pytest.mark.slow   # compile-only: CI runs it; the GPU run (-m 'not slow') needs no repeat
def test_compiles_for_gpu_without_spills():
    reports = compile_for_gpu(_compile_cases(), archs=(80, 90))
    for r in reports:
        assert_no_spills(r)
        assert 0 < r["registers"] <= 128, r  # keeps >= 2 blocks of 8 warps per SM for bandwidth


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_plan_built_once_for_an_unchanged_param_set(device, backend, monkeypatch):
    """The per-step check of the cached plan: one build over steps with the same params, grads and state (the
    key taken before the first build, with no state yet, made the second step build again), and a rebuild
    once a grad is replaced at another address."""
    params = _params(device)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=0.5, backend=backend)
    builds, build = [], opt._build_plans
    monkeypatch.setattr(opt, "_build_plans", lambda: builds.append(1) or build())
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(4):
        opt.step()
    assert len(builds) == 1
    kept = params[0].grad                                       # held: the new grad gets another address
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    opt.step()
    assert len(builds) == 2 and kept is not None


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_load_state_dict_releases_the_replaced_state(device, backend):
    """load_state_dict drops the cached plan; the objects the plan key keeps alive (`_plan_refs`: the old state
    dicts and moments) must go with it, not linger until the next step (a second set of fp32 moments)."""
    import gc
    import weakref
    params = _params(device)
    opt = FusedAdamW(params, lr=1e-2, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    old = [weakref.ref(t) for s in opt.state.values() for t in s.values()]
    opt.load_state_dict(opt.state_dict())
    gc.collect()
    assert not any(r() is not None for r in old)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_param_moved_between_groups_rebuilds_the_plan(device, backend):
    """A param moved from one group's list to another's (the flat param order unchanged) takes its new group's
    hyperparameters at the next step: here lr 0, so it must not move."""
    params = _params(device)
    opt = FusedAdamW([dict(params=params[:2]), dict(params=params[2:], lr=0.0, weight_decay=0.0)], lr=1e-2,
                     backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    opt.param_groups[1]["params"].insert(0, opt.param_groups[0]["params"].pop())
    moved = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), moved)
