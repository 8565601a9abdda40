"""FusedAdamW: a drop-in `torch.optim.AdamW` whose step is one Triton launch per param group (plus one for
the gradient norm, clip and non-finite guard), with no host sync.

Math: torch's AdamW in fp32 (qlora_kernels.reference.adamw), whatever the param dtype; states fp32.
State layout: torch's (`step` 0-d fp32 tensor on the param's device, `exp_avg`, `exp_avg_sq`,
`max_exp_avg_sq`), so state dicts load both ways.
"""
import collections
import itertools
import operator

import torch

from qlora_kernels import _backend
from qlora_kernels.kernels import adamw as kernels
from qlora_kernels.ops import adamw as ops
from qlora_kernels.reference import adamw as ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# C-level accessors of the per-step plan key (FusedAdamW._step_key)
_PARAMS, _AMSGRAD, _GRAD = operator.itemgetter("params"), operator.itemgetter("amsgrad"), operator.attrgetter("grad")
_DATA_PTR, _STRIDE, _IS_CONTIGUOUS = torch.Tensor.data_ptr, torch.Tensor.stride, torch.Tensor.is_contiguous
_IS, _chain, _repeat = operator.is_, itertools.chain.from_iterable, itertools.repeat


def _check_hyper(lr, betas, eps, weight_decay):
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _DevicePlan:
    """Everything one step needs on one device, built once per set of (param, grad) addresses. It holds no
    grad: a reference would keep last step's grads alive through the next backward (a second set of
    gradients in memory), and their addresses could then never repeat, so the plan would never be reused."""

    def __init__(self, device, backend):
        self.device, self.backend = device, backend
        self.units = []       # (group, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, UpdateTable)
        self.params, self.steps = [], []
        self.prologue = None  # PrologueTable (triton)

    def grads(self):
        return [p.grad for p in self.params]


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW with a fused step.

    Extra arguments:
      max_grad_norm: clip the global L2 norm of all gradients to this value inside the step (same result as
        `torch.nn.utils.clip_grad_norm_(params, max_grad_norm)` then the step); the norm (before clipping) is
        kept on the device in `last_grad_norm`.
      skip_nonfinite: if any gradient has a NaN/inf, skip the whole step on the device (params, states and
        step counters unchanged) and count it in `skipped_steps` (device tensor).
      bf16_stochastic_rounding: round bf16 params stochastically instead of to nearest even.
      backend: force "triton", "cpu" (the C++ extension) or "reference" for every param (tests, benchmarks);
        default: Triton on CUDA (and on CPU under TRITON_INTERPRET=1), else the extension.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, max_grad_norm=None, skip_nonfinite=True, bf16_stochastic_rounding=False, *,
                 backend=None, foreach=None, fused=None, capturable=False, differentiable=False):
        # foreach / fused / capturable: torch AdamW's choice of implementation, accepted so code written for it
        # runs unchanged (this step is always fused and never syncs); a differentiable step is not offered
        if differentiable:
            raise ValueError("FusedAdamW does not support differentiable=True")
        _check_hyper(lr, betas, eps, weight_decay)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0 or None)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        self._drop_plan()
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.bf16_stochastic_rounding = bf16_stochastic_rounding
        if backend is not None and backend not in _backend.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {_backend.BACKENDS}")
        self._backend = backend
        self.last_grad_norm = None
        self._skipped = {}
        self._seed = int(torch.randint(0, 2**30, ()))
        self._host_steps = 0
        # the device that holds last_grad_norm and skipped_steps: the first param's with a gradient, found
        # again whenever the plans are rebuilt (a model moved to the GPU after its optimizer was made)
        first = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else torch.device("cpu")
        self._primary = first

    # -- torch.optim.Optimizer interface -------------------------------------------------------------------
    def add_param_group(self, param_group):
        group = {**self.defaults, **param_group}   # checked before it is added: a refused group is not kept
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        super().add_param_group(param_group)
        self._drop_plan()

    # what torch's Optimizer pickles (defaults, state, param_groups) plus this optimizer's own settings and
    # counters, so a deepcopy or an unpickled FusedAdamW steps like the original
    _EXTRA_STATE = ("max_grad_norm", "skip_nonfinite", "bf16_stochastic_rounding", "_backend", "last_grad_norm",
                    "_skipped", "_seed", "_host_steps", "_primary")

    def __getstate__(self):
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._EXTRA_STATE})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
        self._drop_plan()

    def state_dict(self):
        """torch AdamW's state dict, plus this optimizer's step counters under "fused_adamw" (torch ignores
        the key): skipped steps and the stochastic-rounding seed, so a resumed run rounds as the original."""
        out = super().state_dict()
        out["fused_adamw"] = {"skipped_steps": self.skipped_steps.clone(), "seed": self._seed,
                              "host_steps": self._host_steps}
        return out

    def load_state_dict(self, state_dict):
        """Loads torch AdamW's (or this optimizer's) state dict; moments are kept in fp32 at the precision
        they were saved with (torch's own loader casts them to the param's dtype: bf16 params would lose
        the fp32 moments' low bits). Load hooks run as torch runs them: pre-hooks on the dict first (their
        result is what loads), post-hooks once the fp32 moments are in place."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        moments = {p: {key: value for key, value in state_dict["state"].get(i, {}).items() if key in _MOMENTS}
                   for i, p in zip(saved_ids, params)}
        for i, p in zip(saved_ids, params):   # before anything loads: a refused dict changes nothing
            step = state_dict["state"].get(i, {}).get("step")
            if step is not None and torch.as_tensor(step).numel() != 1:
                raise ValueError(f"FusedAdamW.load_state_dict: 'step' must be one number, got shape "
                                 f"{tuple(torch.as_tensor(step).shape)} for a param of shape {tuple(p.shape)}")
        for p, saved in moments.items():
            for key, value in saved.items():
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"FusedAdamW.load_state_dict: {key!r} of shape {tuple(value.shape)} for a "
                                     f"param of shape {tuple(p.shape)}")
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()    # ran above
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()   # run below
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        for p, saved in moments.items():
            state = self.state.get(p)
            if not state:
                continue
            # copies: the caller's state dict (often another optimizer's live state) is never updated in place
            state["step"] = torch.as_tensor(state["step"]).to(p.device, torch.float32, copy=True).reshape(())
            for key, value in saved.items():
                state[key] = torch.empty_like(p, dtype=torch.float32).copy_(value)   # laid out like p
        extra = state_dict.get("fused_adamw")
        if extra is not None:
            self.skipped_steps.copy_(extra["skipped_steps"])
            self._seed, self._host_steps = int(extra["seed"]), int(extra["host_steps"])
        self._drop_plan()   # its refs hold the replaced state dicts and moments
        for hook in post.values():
            hook(self)

    @property
    def skipped_steps(self):
        """Number of steps skipped for a non-finite gradient (int64 tensor on the first param's device)."""
        if self._primary not in self._skipped:
            self._skipped[self._primary] = torch.zeros((), dtype=torch.int64, device=self._primary)
        return self._skipped[self._primary]

    def _skipped_on(self, device):
        if device not in self._skipped:
            self._skipped[device] = torch.zeros((), dtype=torch.int64, device=device)
        return self._skipped[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = self._plans()
        if not plans:
            return loss
        self._host_steps += 1
        guard = self.max_grad_norm is not None or self.skip_nonfinite
        if len(plans) == 1:
            plan = plans[0]
            if plan.backend == "triton":
                # no grad element at all: the prologue reads a zero sum instead of reducing
                empty = plan.prologue.n_programs == 0
                self._triton_step(plan, norm=guard, finalize=True, stats=ops.new_stats(plan.device, zero=empty))
            else:
                stats = ops.cpu_grad_stats(plan.grads()) if guard else None
                self._host_step(plan, stats)
            return loss
        # params on several devices: per-device sums, combined on the first device, then per-device steps
        per_device = []
        for plan in plans:
            if plan.backend == "triton":
                stats = ops.new_stats(plan.device, zero=True)
                if guard:
                    ops.launch_prologue(plan.prologue, stats, self._skipped_on(plan.device), norm=True,
                                        finalize=False, max_grad_norm=None, skip_nonfinite=False)
                per_device.append(stats)
            else:
                per_device.append(ops.cpu_grad_stats(plan.grads()) if guard else None)
        total = None
        if guard:
            total = sum(s[:2].to(device=plans[0].device, dtype=torch.float64) for s in per_device)
        for plan, stats in zip(plans, per_device):
            if plan.backend == "triton":
                if guard:
                    stats[:2].copy_(total)
                self._triton_step(plan, norm=False, finalize=True, stats=stats)
            else:
                self._host_step(plan, total.cpu() if guard else None)
        return loss

    # -- internals -----------------------------------------------------------------------------------------
    def _triton_step(self, plan, *, norm, finalize, stats):
        clip = self.max_grad_norm is not None
        ops.launch_prologue(plan.prologue, stats, self._skipped_on(plan.device), norm=norm, finalize=finalize,
                            max_grad_norm=self.max_grad_norm, skip_nonfinite=self.skip_nonfinite)
        for unit, (group, *_, table) in enumerate(plan.units):
            beta1, beta2 = group["betas"]
            ops.launch_update(table, stats, lr=_scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                              maximize=group["maximize"], clip=clip, skip_nonfinite=self.skip_nonfinite,
                              stochastic_rounding=self.bf16_stochastic_rounding, seed=self._step_seed(unit))
        if self.max_grad_norm is not None or self.skip_nonfinite:
            norm_t = stats[kernels.ST_NORM.value]
            self.last_grad_norm = norm_t if plan.device == self._primary else norm_t.to(self._primary)

    def _host_step(self, plan, stats):
        """CPU without the interpreter: the extension (or the reference); values are on the host anyway."""
        coef = None
        if stats is not None:
            norm, coef = ref.finalize(stats[0], self.max_grad_norm)
            if plan.device == self._primary or self.last_grad_norm is None:
                self.last_grad_norm = norm
            if self.skip_nonfinite and float(stats[1]) > 0:
                self._skipped_on(plan.device).add_(1)
                return
        for unit, (group, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, _) in enumerate(plan.units):
            beta1, beta2 = group["betas"]
            ops.cpu_step(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                         lr=_scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                         grad_scale=coef,
                         stochastic_rounding=self.bf16_stochastic_rounding, seed=self._step_seed(unit),
                         use_native=plan.backend == "cpu")

    def _step_seed(self, unit):
        """The stochastic-rounding seed of one update launch: a new stream per step and per group (unit), since
        the kernels tell tensors apart only by their index within the launch."""
        return (self._seed + self._host_steps * 7919 + unit * 104729) % (2**31 - 1)

    def _drop_plan(self):
        self._plan_key = self._plan = self._plan_refs = None

    def _plans(self):
        """Per-device plans, rebuilt when a param or grad address changes, a grad appears, vanishes or is laid out
        otherwise (a new layout over the same storage included), or when a group dict, a param's state dict or a
        state tensor is replaced (opt.state cleared, a moment reassigned, a group swapped).

        Checked every step, so built without a Python loop over the params (the lite set's 224 tensors took
        ~1 ms of host time per step with a per-param generator and tensor hashing, longer than the GPU's
        update): each component is one C-level map over a flat list. The ids are safe to compare: the plan
        keeps the objects they name alive (`_plan_refs`), so no id can be reused while the plan is cached.
        Grads are compared by address and layout only (a plan holding them would keep last step's grads alive
        through the next backward)."""
        key = self._step_key()
        if key is None or key != self._plan_key:
            plans = self._build_plans()
            # after the build, which makes the state of new params: the next step's key then matches
            self._plan, self._plan_key = plans, self._step_key(keep_refs=True)
        return self._plan

    def _step_key(self, keep_refs=False):
        """What the cached plan depends on, as a tuple of ints (None when it cannot be made: the build's checks
        then say why, e.g. a sparse grad has no data pointer)."""
        groups = self.param_groups
        params = list(_chain(map(_PARAMS, groups)))
        grads = list(map(_GRAD, params))
        state = self.state
        try:
            try:
                grad_ptrs = tuple(map(_DATA_PTR, grads))
                missing = ()
            except TypeError:   # some params without a grad: which ones, then the others' addresses
                missing = tuple(map(_IS, grads, _repeat(None)))
                grads = [g for g in grads if g is not None]
                grad_ptrs = tuple(map(_DATA_PTR, grads))
            # contiguous fixes the layout (size-1 dims' strides aside, which the kernels never use); anything
            # else is compared stride by stride
            layout = tuple(map(_STRIDE, grads)) if not all(map(_IS_CONTIGUOUS, grads)) else len(grads)
            values = list(state.values())
            objects = [*groups, *params, state, *state, *values, *_chain(map(dict.values, values))]
            # per-group param counts: with the flat order they fix which group each param is in (a param moved
            # from one group's list to the next keeps the flat order and every id)
            key = (tuple(map(_AMSGRAD, groups)), tuple(map(len, map(_PARAMS, groups))), tuple(map(len, values)),
                   tuple(map(id, objects)),
                   tuple(map(_DATA_PTR, params)), grad_ptrs, missing, layout)
        except (TypeError, RuntimeError, KeyError, AttributeError):
            return None
        if keep_refs:
            self._plan_refs = objects
        return key

    def _build_plans(self):
        for group in self.param_groups:   # every check before any state is made: a refused step changes nothing
            for p in group["params"]:
                if p.grad is not None:
                    _check_param(p, p.grad, self.state.get(p, {}))
        plans = {}
        for group in self.param_groups:
            per_device = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state[p]
                if len(state) == 0:   # zeros_like keeps a dense param's strides, as torch's AdamW does
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                per_device.setdefault(p.device, []).append((p, g, state))
            for device, items in per_device.items():
                if device not in plans:
                    plans[device] = _DevicePlan(device, _backend.resolve_backend(items[0][0], self._backend))
                plan = plans[device]
                params = [p for p, _, _ in items]
                grads = [g for _, g, _ in items]
                exp_avgs = [s["exp_avg"] for _, _, s in items]
                exp_avg_sqs = [s["exp_avg_sq"] for _, _, s in items]
                max_sqs = [s["max_exp_avg_sq"] for _, _, s in items] if group["amsgrad"] else None
                steps = [s["step"] for _, _, s in items]
                for s in steps:
                    if s.device != device or s.dtype != torch.float32:
                        raise ValueError("FusedAdamW: state 'step' must be a float32 tensor on the param's device")
                table = None
                if plan.backend == "triton":
                    table = ops.UpdateTable(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps)
                plan.units.append((group, params, exp_avgs, exp_avg_sqs, max_sqs, steps, table))
                plan.params += params
                plan.steps += steps
        out = list(plans.values())   # the first param with a gradient comes first: the norm is combined there
        if out and out[0].device != self._primary:
            old, self._primary = self._primary, out[0].device
            if old in self._skipped and self._primary not in self._skipped:   # the count moves with it
                self._skipped[self._primary] = self._skipped[old].to(self._primary)
        for plan in out:
            if plan.backend == "triton":
                plan.prologue = ops.PrologueTable(plan.grads(), plan.steps, plan.device)
        return out


def _check_param(p, g, state):
    if g.is_sparse:
        raise RuntimeError("FusedAdamW does not support sparse gradients, please consider SparseAdam instead")
    if p.dtype not in _DTYPES:
        raise TypeError(f"FusedAdamW supports float32, bfloat16 and float16 params, got {p.dtype}")
    if g.dtype != p.dtype:   # torch allows it (Tensor.grad_dtype); the kernels read g as p's dtype
        raise TypeError(f"FusedAdamW needs each grad in its param's dtype, got a {g.dtype} grad for a "
                        f"{p.dtype} param of shape {tuple(p.shape)}")
    # the kernels walk each tensor's storage flat: any dense layout (contiguous, channels_last, transposed)
    # works when the grad and the moments share the param's strides
    if not _dense(p):
        raise ValueError("FusedAdamW needs each param to cover its storage densely (no gaps or overlaps), got "
                         f"shape {tuple(p.shape)} with strides {p.stride()}")
    if not _same_layout(g, p):
        raise ValueError(f"FusedAdamW needs each grad laid out like its param (strides {p.stride()}), got strides "
                         f"{g.stride()} for shape {tuple(p.shape)}")
    for key in _MOMENTS:   # the kernels read them as raw fp32
        t = state.get(key)
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device == p.device
                                  and t.shape == p.shape and _same_layout(t, p)):
            raise ValueError(f"FusedAdamW: state {key!r} must be a float32 tensor shaped, laid out and placed like "
                             f"its param, got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))} "
                             f"strides {t.stride() if isinstance(t, torch.Tensor) else None} on "
                             f"{getattr(t, 'device', None)}")


def _dense(t):
    """Whether t's elements fill its storage span exactly once (torch's non-overlapping-and-dense)."""
    if t.numel() == 0:
        return True
    expected = 1
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t, like):
    """Whether t (shaped like `like`) orders its elements in memory as `like` does; size-1 dims don't count."""
    return t.numel() == 0 or all(a == b for size, a, b in zip(like.shape, t.stride(), like.stride()) if size != 1)


def _scalar(x):
    return float(x) if isinstance(x, torch.Tensor) else x
