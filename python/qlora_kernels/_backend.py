"""Which implementation runs an op for a given tensor.

- CUDA tensors: the Triton kernels.
- CPU tensors with TRITON_INTERPRET=1: the Triton kernels under the interpreter (how CI tests them).
- other CPU tensors: the C++ extension `qlora_kernels._C`, or the plain-PyTorch reference when the
  extension is missing (one warning, never an import error).
"""
import functools
import inspect
import operator
import os
import warnings

import torch

BACKENDS = ("triton", "cpu", "reference")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints, for launch grids. triton.cdiv and triton.next_power_of_2 are constexpr-function
    objects that cost ~3 us per host call; the linear cross-entropy's chunk loop made ~18 per chunk."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def no_fp_fusion() -> dict:
    """Launch options that keep the compiler from contracting a * b + c into one fma, where the format or
    the reference rounds the product first (explicit tl.fma stays); the interpreter takes no options."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def native():
    """The compiled extension module, or None (warns once) when it was not built."""
    if os.environ.get("QLORA_KERNELS_NO_EXT") == "1":
        return None
    try:
        from qlora_kernels import _C
    except ImportError as err:
        warnings.warn(f"qlora_kernels: native extension not available ({err}); CPU ops fall back "
                      "to the plain-PyTorch reference path (slow). Reinstall with "
                      "`pip install --no-build-isolation .` to build it.", RuntimeWarning, stacklevel=3)
        return None
    return _C


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run on `tensor`'s device (CUDA, or CPU under the interpreter)."""
    return tensor.device.type == "cuda" or (interpreting() and tensor.device.type == "cpu")


def interpreter_out(t: torch.Tensor) -> torch.Tensor:
    """The view a kernel stores output `t` through: under the interpreter bf16 goes as int16 bit patterns rounded
    in the kernel (its own fp32 -> bf16 conversion truncates); otherwise `t` itself."""
    return t.view(torch.int16) if interpreting() and t.dtype == torch.bfloat16 else t


def backend_for(tensor: torch.Tensor) -> str:
    """"triton", "cpu" or "reference": the implementation an op on `tensor` dispatches to."""
    if runs_triton(tensor):
        return "triton"
    if tensor.device.type != "cpu":
        raise NotImplementedError(f"qlora_kernels: no backend for device {tensor.device}")
    return "cpu" if native() is not None else "reference"


def resolve_backend(tensor: torch.Tensor, backend: str | None) -> str:
    """`backend` if given (validated), else `backend_for(tensor)`."""
    if backend is None:
        return backend_for(tensor)
    if backend not in BACKENDS + ("cuda_ext",):
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS + ('cuda_ext',)}")
    if backend == "cpu" and native() is None:
        raise RuntimeError("backend 'cpu' needs the native extension, which is not built")
    on_cuda = tensor.device.type == "cuda"
    if (backend == "cuda_ext" and not on_cuda) or (backend == "cpu" and on_cuda) \
            or (backend == "triton" and not (on_cuda or interpreting())):
        raise ValueError(f"backend {backend!r} cannot run on {tensor.device} tensors"
                         + ("" if on_cuda else " (Triton on CPU needs TRITON_INTERPRET=1 set before import)"))
    return backend


@functools.lru_cache(maxsize=None)   # a device query, once per device: launchers ask per call
def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (persistent grids size themselves by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def cuda_stream(device) -> int:
    """The current stream of a CUDA device as the handle the extension's launchers take."""
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=None)   # a host-side query, once per kernel and device
def native_has_image(query, device_index) -> bool:
    """Whether the extension answers its `query` (e.g. "nf4_lora_gemv_cuda_has_image") with True for the
    device: it holds code of that CUDA kernel for the device's architecture (builds are SASS for the archs
    named at install time, so a newer card has none). False where the extension or the query is missing."""
    has_image = getattr(native(), query, None)
    return has_image is not None and bool(has_image(device_index))


_IMPLS = {}            # op name -> (its Python implementation, the schema's scalar conversions per argument)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SCALARS = {int: operator.index, float: float, bool: bool}


def custom_op(name, *, mutates_args):
    """torch.library.custom_op("qlora_kernels::<name>"), keeping a functional op's implementation for
    `call_op` (an op that writes an argument always takes the dispatcher, which bumps its version counter)."""
    def register(fn):
        if not mutates_args:
            params = inspect.signature(fn).parameters.values()
            _IMPLS[name] = fn, tuple(_SCALARS.get(p.annotation) for p in params)
        return torch.library.custom_op(f"qlora_kernels::{name}", mutates_args=mutates_args)(fn)
    return register


def _direct(args):
    """Whether an op call may skip the dispatcher: eager, no dispatch mode or tracer watching (make_fx,
    FlopCounterMode, selective checkpointing), no graph to record (double backward), plain tensors only."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._get_tracing_state()):
        return False
    grad = torch.is_grad_enabled()
    for a in args:   # a loop, not any(<generator>): ~1.5 us less per call over the ops' ~20 arguments
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or (grad and a.requires_grad)):
            return False
    return True


def call_op(name, *args):
    """torch.ops.qlora_kernels.<name>(*args), or, where `_direct` allows, its implementation itself with the
    scalars converted as the op's schema would (a numpy int becomes an int). The dispatcher's path of a Python
    custom op (boxing, the alias checks, a dynamo-disabled frame) costs ~40-190 us of host time per call on
    this 2-core machine, more than many of the kernels it launches, and a QLoRA step makes hundreds of calls."""
    impl = _IMPLS.get(name)
    if impl is None or not _direct(args):
        return getattr(torch.ops.qlora_kernels, name)(*args)
    fn, scalars = impl
    return fn(*(a if convert is None or a is None or type(a) is convert else convert(a)
                for convert, a in zip(scalars, args)))


def needs_autograd(*tensors):
    """Whether a backward can follow an op on these inputs (grad mode on, one of them requiring grad); where not
    (no_grad, generation, frozen inputs) the ops call their forward op without the autograd Function's cost."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_double_backward(op):
    """In an autograd Function's backward: grad mode is on there only under create_graph=True, and the gradients
    are computed by kernels with no derivative of their own, so refuse (a graph-less gradient would be silent)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"qlora_kernels {op}: double backward (create_graph=True) is not supported")


def on_input_device(fn):
    """Decorates a function that launches kernels: it runs with the CUDA device of its first tensor argument
    (or NF4Weight: anything with a torch.device `.device`) made the current one. Triton launches on the current
    device and its current stream, not on its arguments' device, so a layer on cuda:1 called while cuda:0 is
    current would launch on cuda:0 with cuda:1's pointers. CPU tensors: called as is."""
    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        device = next((d for d in (getattr(a, "device", None) for a in (*args, *kwargs.values()))
                       if isinstance(d, torch.device)), None)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)
    return on_device


def launch_native(name, device, *args):
    """The extension's CUDA launcher `name`(*args, stream) on `device`'s current stream, with `device` made the
    current one for the call (the launchers use the runtime's current device, as a kernel launch does)."""
    with torch.cuda.device(device):
        return getattr(native(), name)(*args, cuda_stream(device))


def check_same_device(**tensors):
    """Raise ValueError naming each tensor's device when they are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")
