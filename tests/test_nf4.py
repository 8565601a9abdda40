"""NF4 format: every implementation against the reference and against bitsandbytes, byte for byte."""
import numpy as np
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _backend
from qlora_kernels.reference import nf4 as ref
from qlora_kernels.testing import CompileCase, assert_no_spills, compile_for_gpu

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, blocksize): odd element counts, partial last blocks, one block larger than the tensor
SHAPES = [((37, 91), 64), ((64, 96), 32), ((40, 96), 64), ((3, 5), 64), ((130, 258), 128), ((11, 700), 512),
          ((2, 2600), 2048), ((17, 300), 4096), ((1, 1), 256)]


def backends_for(device):
    """The implementations that serve `device` here: Triton (interpreted on CPU) and, on CPU, the extension."""
    names = ["triton"] if device == "cuda" or _backend.interpreting() else []
    if device == "cpu" and _backend.native() is not None:
        names.append("cpu")
    if device == "cuda" and getattr(_backend.native(), "with_cuda", False):
        names.append("cuda_ext")
    return names


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit, except where its CPU AVX512 kernel is wrong: when the row length is even
    but not a multiple of the blocksize it mis-scales elements (errors of several absmax, seen with 0.50.2);
    there its portable path, which follows the documented format, is the ground truth."""
    rows, cols = state.shape
    if cols % 2 == 0 and cols % state.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        absmax = ref.dequantize_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset) \
            if state.nested else state.absmax
        return _dequantize_4bit_compute(packed.view(-1), absmax, ref.nf4_code(), state.blocksize, state.shape,
                                        state.dtype)
    return bnb_functional.dequantize_4bit(packed, state)


def random_weight(shape, dtype, device, zero_block=None):
    w = torch.randn(shape, device=device).mul_(torch.rand(()).item() * 3 + 0.01).to(dtype)
    if zero_block is not None:
        w.view(-1)[:zero_block] = 0  # an all-zero first block
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_matches_bitsandbytes(device, dtype, shape, blocksize, double_quant):
    w = random_weight(shape, dtype, device, zero_block=min(blocksize, w_numel(shape)))
    packed, state = bnb_functional.quantize_4bit(w.cpu(), blocksize=blocksize, quant_type="nf4",
                                                 compress_statistics=double_quant)
    expected = bnb_dequantize(packed, state)
    for backend in ["reference"] * (device == "cpu") + backends_for(device):
        q = qk.quantize_nf4(w, blocksize, double_quant, backend=backend)
        assert torch.equal(q.packed.cpu(), packed.view(-1)), f"{backend}: packed bytes differ from bitsandbytes"
        if double_quant:
            # bitsandbytes' CPU path snaps the 8-bit absmax step to a 65536-point grid; ours is exact nearest
            # (as on CUDA): a few codes may differ by a step or so, the scales agree to their resolution.
            # (A nested block whose absmax are all equal dequantizes to the offset whatever its code.)
            live = (state.state2.absmax != 0).repeat_interleave(256)[: state.absmax.numel()]
            assert (q.qabsmax.cpu().int() - state.absmax.int())[live].abs().le(3).all()
            assert torch.allclose(q.absmax().cpu(), ref.dequantize_absmax(
                state.absmax, state.state2.absmax, state.state2.code, state.offset), rtol=0.02, atol=1e-6)
        else:
            expected_absmax = state.absmax.clone()
            if w.numel() % blocksize and expected_absmax[-1] == 1e-38:
                # bitsandbytes' CPU path stores max(absmax, 1e-38) for an all-zero PARTIAL last block only
                # (full blocks and its CUDA path store 0); we store the true max. Both dequantize to 0.
                expected_absmax[-1] = 0
            assert torch.equal(q.absmax().cpu(), expected_absmax), f"{backend}: absmax differs"
        # our dequantization of bitsandbytes' storage equals bitsandbytes' own
        ours = qk.dequantize_nf4(qk.NF4Weight.from_bnb(packed, state).to(device), backend=backend)
        assert ours.dtype == dtype and ours.shape == w.shape
        assert torch.equal(ours.cpu(), expected), f"{backend}: dequantized values differ from bitsandbytes"


def w_numel(shape):
    return shape[0] * shape[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_matches_reference(device, dtype, double_quant):
    w = random_weight((129, 200), dtype, device)
    expected = ref.dequantize_nf4(qk.quantize_nf4(w.cpu(), 64, double_quant, backend="reference"))
    for backend in backends_for(device):
        q = qk.quantize_nf4(w, 64, double_quant, backend=backend)
        out = qk.dequantize_nf4(q, backend=backend)
        assert torch.equal(out.cpu(), expected), backend
        # NF4's worst-case rounding error is half the widest code gap (0.1489) times the block's absmax
        scale = q.absmax().repeat_interleave(64)[: w.numel()].view(w.shape)
        assert bool(((out.float() - w.float()).abs() <= 0.15 * scale + 1e-2 * scale).all())


def test_dequantize_storage_at_an_odd_offset(device):
    """from_bnb views bitsandbytes' storage in place, so packed may start at any byte: every backend reads it
    (the CUDA extension's 4-byte loads would fault with a misaligned address)."""
    q = qk.quantize_nf4(random_weight((64, 96), torch.float32, device), 64, True, backend="reference")
    buf = torch.zeros(q.packed.numel() + 1, dtype=torch.uint8, device=device)
    buf[1:].copy_(q.packed)
    shifted = qk.NF4Weight(buf[1:], q.shape, q.dtype, q.blocksize, qabsmax=q.qabsmax, absmax2=q.absmax2,
                           code2=q.code2, offset=q.offset, nested_blocksize=q.nested_blocksize)
    assert shifted.packed.data_ptr() % 4 == 1
    expected = ref.dequantize_nf4(q)
    for backend in backends_for(device):
        assert torch.equal(qk.dequantize_nf4(shifted, backend=backend), expected), backend


def test_launchers_run_on_their_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device, not its arguments': every op that launches kernels makes
    its first input's device current (a layer on cuda:1 called while cuda:0 is current)."""
    import contextlib
    import pathlib
    import re
    from types import SimpleNamespace

    made_current = []

    @contextlib.contextmanager
    def device(d):
        made_current.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    launcher = _backend.on_input_device(lambda *args, **kwargs: "launched")
    assert launcher(3, SimpleNamespace(device=torch.device("cuda", 1)), x=torch.zeros(1)) == "launched"
    assert made_current == [torch.device("cuda", 1)]
    assert launcher(torch.zeros(1), qweight=SimpleNamespace(device=torch.device("cuda", 0))) == "launched"
    assert made_current == [torch.device("cuda", 1)]     # the first one is a CPU tensor: as is
    # every custom op (the ops' entry points, eager and compiled) carries it
    decorated = [re.findall(r"@_backend\.custom_op\([^\n]*\)\n(.*)\n", path.read_text())
                 for path in (pathlib.Path(qk.__file__).parent / "ops").glob("*.py")]
    assert sum(map(len, decorated)) >= 11 and {line for lines in decorated for line in lines} == {
        "@_backend.on_input_device"}


def test_ops_skip_the_dispatcher_in_eager_mode(monkeypatch):
    """Eager calls on plain tensors run the custom ops' implementations directly (the dispatcher's path costs
    ~40-190 us of host time a call), with the schema's scalar conversions; dispatch modes, tensor subclasses
    (a FakeTensor, as tracing uses) and ops that write their arguments still go through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.name())
            return func(*args, **(kwargs or {}))

    fn, scalars = _backend._IMPLS["cross_entropy_forward"]
    direct = []

    def spy(*args):
        direct.append(args)
        return fn(*args)

    monkeypatch.setitem(_backend._IMPLS, "cross_entropy_forward", (spy, scalars))
    logits = torch.randn(4, 32, requires_grad=True)
    labels = torch.randint(0, 32, (4,))
    qk.fused_cross_entropy(logits, labels, ignore_index=np.int64(-100), backend="reference").backward()
    assert len(direct) == 1 and type(direct[0][2]) is int      # the schema's int, not numpy's
    # a dispatch mode (make_fx, FlopCounterMode, selective checkpointing) sees the op, as before
    with Names() as names:
        qk.fused_cross_entropy(logits, labels, backend="reference").backward()
    assert len(direct) == 1 and "qlora_kernels::cross_entropy_forward" in names.seen, names.seen
    # so does a tensor subclass (a FakeTensor, as tracing uses)
    monkeypatch.setitem(_backend._IMPLS, "swiglu_forward", None)
    with FakeTensorMode() as mode:
        gate, up = mode.from_tensor(torch.randn(3, 8)), mode.from_tensor(torch.randn(3, 8))
        out = _backend.call_op("swiglu_forward", gate, up)
    assert type(out).__name__ == "FakeTensor" and out.shape == (3, 8)
    # ops that write an argument keep the dispatcher: it bumps the version autograd checks saved tensors by
    assert "scale_" not in _backend._IMPLS and "cross_entropy_forward_inplace" not in _backend._IMPLS


def test_nested_map_is_bitsandbytes_dynamic_map():
    assert torch.equal(ref.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


def test_packing_order_and_padding():
    w = torch.tensor([[1.0, -1.0, 0.5]])
    q = qk.quantize_nf4(w, 64, double_quant=False, backend="reference")
    assert q.packed.tolist() == [0xF0, 0xC7]  # [+1, -1] -> 0xF0; 0.5 -> code 12 (0.4407); pad code 7


def test_backend_selection(device):
    t = torch.zeros(2, device=device)
    native = "cpu" if _backend.native() is not None else "reference"   # QLORA_KERNELS_NO_EXT=1: no extension
    expected = "triton" if device == "cuda" or _backend.interpreting() else native
    assert qk.backend_for(t) == expected


def test_from_bnb_shares_storage_and_round_trips():
    import bitsandbytes as bnb
    linear = torch.nn.Linear(128, 40, bias=False)
    layer = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # quantizes
    layer.train()  # eval + no_grad forward may repack the weight for the CPU (see nf4-format.md)
    param = layer.weight
    q = qk.NF4Weight.from_bnb(param)
    assert q.packed.data_ptr() == param.data.data_ptr() and q.double_quant and q.shape == (40, 128)
    assert q.qabsmax.data_ptr() == param.quant_state.absmax.data_ptr()
    assert torch.equal(qk.dequantize_nf4(q, backend="reference"),
                       bnb_functional.dequantize_4bit(param.data, param.quant_state))
    packed, state = q.to_bnb()
    assert packed.data_ptr() == param.data.data_ptr() and packed.shape == param.data.shape
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state),
                       bnb_functional.dequantize_4bit(param.data, param.quant_state))
    with pytest.raises(ValueError, match="nf4"):
        fp4 = bnb.nn.Linear4bit(128, 40, bias=False, quant_type="fp4").to("cpu")
        qk.NF4Weight.from_bnb(fp4.weight)


def test_to_device_keeps_values(device):
    q = qk.quantize_nf4(torch.randn(8, 64), 32, True, backend="reference")
    moved = q.to(device)
    assert moved.device.type == device and torch.equal(moved.absmax().cpu(), q.absmax())


@pytest.mark.parametrize("bad,error,match", [
    (torch.ones(4, 4, dtype=torch.int32), TypeError, "float32, float16 or bfloat16"),
    (torch.ones(16), ValueError, "2-D"),
    (torch.ones(0, 4), ValueError, "non-empty"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "non-finite"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "non-finite"),
])
def test_bad_input(bad, error, match):
    before = bad.clone()
    with pytest.raises(error, match=match):
        qk.quantize_nf4(bad)
    assert torch.equal(bad.nan_to_num(), before.nan_to_num())  # unchanged


def test_bad_blocksize_names_allowed_ones():
    with pytest.raises(ValueError, match="4096"):
        qk.quantize_nf4(torch.ones(4, 4), blocksize=48)
    with pytest.raises(TypeError, match="NF4Weight"):
        qk.dequantize_nf4(torch.ones(4, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        qk.quantize_nf4(torch.ones(4, 4), backend="fast")


@pytest.mark.skipif(_backend.native() is None, reason="needs the extension")
def test_native_dequantize_checks_its_blocksize():
    """The binding's own checks (NF4Weight validates first, but the binding must not divide by zero or read the
    wrong nibbles for an odd blocksize)."""
    packed, absmax = torch.zeros(4, dtype=torch.uint8), torch.ones(3)
    for blocksize in (0, 3, -2):
        with pytest.raises(RuntimeError, match="blocksize must be even and positive"):
            _backend.native().nf4_dequantize(packed, absmax, blocksize, torch.empty(8))


def test_bad_nf4weight_storage_is_refused():
    """Found by an audit: strided storage (the kernels index raw pointers, Triton returned wrong values),
    blocksizes outside the format (wrong values or unrelated errors), non-float dtypes."""
    q = qk.quantize_nf4(torch.randn(4, 64), 64, False, backend="reference")
    make = lambda **kw: qk.NF4Weight(**{**dict(packed=q.packed, shape=(4, 64), dtype=torch.float32,  # noqa: E731
                                             blocksize=64, absmax=q.absmax()), **kw})
    make()
    with pytest.raises(ValueError, match="packed must be contiguous"):
        make(packed=torch.zeros(2 * q.packed.numel(), dtype=torch.uint8)[::2])
    with pytest.raises(ValueError, match="absmax must be contiguous"):
        make(absmax=torch.ones(8)[::2])
    for bad in (33, 0, -64, 64.0, "64", True):
        with pytest.raises(ValueError, match="blocksize must be an int in"):
            make(blocksize=bad)
    with pytest.raises(ValueError, match="dtype"):
        make(dtype=torch.int32)
    with pytest.raises(ValueError, match="blocksize must be an int in"):
        qk.quantize_nf4(torch.ones(4, 64), blocksize=64.0)


def test_double_quant_overflow_is_an_error():
    """Finite weights near fp32's limit: the fp32 mean of the block scales is inf, and double quant stored
    an inf offset (all-inf dequantization, as bitsandbytes). Now a clear error; plain scales still work."""
    w = torch.full((4, 64), 1e38)
    with pytest.raises(ValueError, match="double_quant=False"):
        qk.quantize_nf4(w, 64, True, backend="reference")
    assert torch.equal(qk.dequantize_nf4(qk.quantize_nf4(w, 64, False, backend="reference")), w)


def test_quantize_keeps_no_autograd_graph():
    w = torch.nn.Parameter(torch.randn(4, 64))
    q = qk.quantize_nf4(w, 64, True, backend="reference")
    assert all(t is None or t.grad_fn is None and not t.requires_grad for t in q.scale_tensors())


def test_from_bnb_other_quant_storage_and_cpu_repacking():
    """FSDP-QLoRA stores the packed bytes as bf16 (quant_storage): read as uint8. A weight that bitsandbytes
    repacked for its CPU kernels is refused by name, not as a dtype mismatch."""
    import bitsandbytes as bnb
    w = torch.randn(40, 128)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    assert p.data.dtype == torch.bfloat16
    q = qk.NF4Weight.from_bnb(p)
    assert q.packed.data_ptr() == p.data.data_ptr()
    assert torch.equal(qk.dequantize_nf4(q, backend="reference"), bnb_functional.dequantize_4bit(p.data, p.quant_state))
    p.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked"):
        qk.NF4Weight.from_bnb(p)


@pytest.mark.skipif(not (torch.cuda.is_available() or _backend.interpreting()),
                    reason="Triton needs CUDA or the interpreter")
def test_block_scales_kernel_is_the_reference_bit_for_bit(device):
    """The double-quant scales the fused GEMMs read (one Triton kernel, no fma) equal the reference's two
    roundings bit for bit, over several nested blocks and a partial last one; plain scales pass through."""
    from qlora_kernels.ops.nf4 import block_scales

    qw = qk.quantize_nf4(torch.randn(300, 1000, device=device) * 3, 64, True, backend="reference")
    scales, absmax2, code2, offset = qw.scale_tensors()
    got = block_scales(scales, absmax2, code2, offset, qw.nested_blocksize)
    want = ref.dequantize_absmax(scales, absmax2, code2, offset, qw.nested_blocksize)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert block_scales(want, None, None, None, qw.nested_blocksize) is want


@pytest.mark.slow   # compile-only: CI runs it; the GPU run (-m 'not slow') needs no repeat
def test_gpu_compile_nf4_kernels():
    """The NF4 kernels compile for sm_80 and sm_90 at their real configs with no spills."""
    from qlora_kernels.kernels import nf4 as kernels
    dq_sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
              "offset_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*bf16", "n": "i64",
              "BLOCKSIZE": "constexpr", "DOUBLE_QUANT": "constexpr", "NESTED_BLOCKSIZE": "constexpr",
              "OUT_BF16_BITS": "constexpr", "BLOCK_BYTES": "constexpr"}
    aligned = tuple(n for n in dq_sig if n.endswith("ptr") or n == "n")
    cases = [CompileCase("qlora_kernels.kernels.nf4", "nf4_dequantize_kernel", dq_sig,
                         {"BLOCKSIZE": blocksize, "DOUBLE_QUANT": True, "NESTED_BLOCKSIZE": 256, "OUT_BF16_BITS": False,
                          "BLOCK_BYTES": kernels.DEQUANT_BLOCK_BYTES}, num_warps=kernels.DEQUANT_NUM_WARPS,
                         aligned=aligned) for blocksize in (32, 64, 4096)]   # 128, 64, 1 scale rows per program
    q_sig = {"x_ptr": "*bf16", "midpoints_ptr": "*fp32", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64",
             "nblocks": "i64", "BLOCKSIZE": "constexpr", "ROWS": "constexpr"}
    for blocksize in (64, 4096):
        cases.append(CompileCase("qlora_kernels.kernels.nf4", "nf4_quantize_kernel", q_sig,
                                 {"BLOCKSIZE": blocksize, "ROWS": max(1, kernels.QUANT_TILE // blocksize)},
                                 num_warps=kernels.QUANT_NUM_WARPS))
    sc_sig = {"qabsmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32",
              "out_ptr": "*fp32", "nblocks": "i64", "NESTED_BLOCKSIZE": "constexpr", "BLOCK": "constexpr"}
    cases.append(CompileCase("qlora_kernels.kernels.nf4", "nf4_block_scales_kernel", sc_sig,
                             {"NESTED_BLOCKSIZE": 256, "BLOCK": kernels.SCALES_BLOCK}))
    for report in compile_for_gpu(cases):
        print(report)
        assert_no_spills(report)


@pytest.mark.slow   # one C++ compile (~20 s on 2 cores): CI runs it
def test_cuda_bindings_compile_without_a_gpu():
    """csrc/bindings.cpp as a CUDA build compiles it (WITH_CUDA), against this torch's headers: a binding error
    must not first show up in the GPU machine's build. (The .cu files: .ci/run compiles them with nvcc.)"""
    import os
    import shutil
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}", "-Icsrc",
           "csrc/bindings.cpp"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow   # nvcc, two targets per source (~30 s on 2 cores): CI runs it
def test_cuda_sources_compile_without_spills():
    """Every csrc/*.cu as the CUDA build compiles it (sm_80 and sm_90, no GPU needed): no error, and no
    kernel instantiation spills registers to local memory (ptxas -v)."""
    import glob
    import os
    import re
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "*.cu")))
    assert sources
    with tempfile.TemporaryDirectory() as out:
        for source in sources:
            for arch in (80, 90):
                proc = subprocess.run([nvcc, "-c", "-O3", "-std=c++17", f"-I{root}/csrc", "-Xptxas", "-v",
                                       "-gencode", f"arch=compute_{arch},code=sm_{arch}", source, "-o",
                                       os.path.join(out, "k.o")], capture_output=True, text=True)
                name = f"{os.path.basename(source)} sm_{arch}"
                assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
                spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
                assert spills and all(a == b == "0" for a, b in spills), f"{name} spills: {proc.stderr[-4000:]}"


# --- the code lookups the fused GEMMs use (kernels/nf4.py) ---------------------------------------------------

def test_kernel_code_table_is_the_format():
    from qlora_kernels.kernels.nf4 import NF4_VALUES
    assert torch.equal(torch.tensor(NF4_VALUES, dtype=torch.float32), ref.nf4_code())


def _prmt(a, b, c):
    """PTX prmt.b32 (default mode): byte i of the result is byte (nibble i of c) & 7 of the 8 bytes {b, a},
    replicated sign bit when that nibble's bit 3 is set."""
    src = (b.astype("uint64") << 32) | a.astype("uint64")
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7)).astype("uint64")) & 0xFF
        byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out = out | (byte.astype("uint32") << (8 * i))
    return out.astype("uint32")


def _run_ptx(asm, operands):
    """Execute the straight-line PTX subset of the lookup (mov/and/or/shr/prmt on .b32) on numpy uint32 arrays;
    `operands` maps $k to an array; returns that map updated with the outputs."""
    regs = dict(operands)
    value = lambda tok: regs[tok] if tok in regs else np.uint32(int(tok, 0))  # noqa: E731
    ops = {"mov.b32": lambda a: a, "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
           "shr.u32": lambda a, b: a >> b, "prmt.b32": _prmt}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *srcs = [t.strip() for t in args.split(",")]
        regs[dst] = np.asarray(ops[op](*map(value, srcs)), dtype=np.uint32)
    return regs


def test_prmt_lookup_ptx_on_every_code_pattern():
    """The inline PTX of the CUDA lookup (nf4_byte_values with PRMT), run by a PTX-semantics model on every
    16-bit pattern in both halves of the packed word, gives the fp32 bits of the format's table."""
    from qlora_kernels.kernels.nf4 import NF4_PRMT_PTX
    low = np.arange(1 << 16, dtype=np.uint32)
    word = low | (((low * 40503) & 0xFFFF) << 16)            # a permutation of the patterns in the high half
    regs = _run_ptx(NF4_PRMT_PTX.value, {"$8": word})
    table = ref.nf4_code().numpy().view(np.uint32)
    for j in range(4):
        byte = (word >> (8 * j)) & 0xFF
        assert np.array_equal(regs[f"${j}"], table[byte >> 4]), f"high nibble of byte {j}"
        assert np.array_equal(regs[f"${j + 4}"], table[byte & 0xF]), f"low nibble of byte {j}"


def test_lookup_setting_is_checked(monkeypatch):
    from qlora_kernels.ops.nf4 import prmt_lookup
    monkeypatch.setenv("QLORA_KERNELS_NF4_LOOKUP", "table")
    with pytest.raises(ValueError, match="QLORA_KERNELS_NF4_LOOKUP"):
        prmt_lookup(torch.empty(1))
    monkeypatch.setenv("QLORA_KERNELS_NF4_LOOKUP", "prmt")
    assert not prmt_lookup(torch.empty(1))    # CPU tensors: never the inline PTX
