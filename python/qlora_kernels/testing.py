"""Test helpers: an assert_close that names the worst element, and a compile check of Triton kernels
for real GPU targets (sm_80 / sm_90) that needs no GPU.

The interpreter cannot show register spills, shared-memory overflow or missed tensor-core paths;
compiling the kernel for the target and reading the cubin's resource usage and SASS does. The GPU machine
runs an older triton (3.6) than CI: QLORA_KERNELS_COMPILE_PYTHONS names other Python interpreters (with
only triton installed) that compile the same kernels too.
"""
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

KERNELS_PACKAGE = "qlora_kernels.kernels"


def assert_close(actual, expected, *, atol, rtol, msg=""):
    """torch.testing-style closeness check whose message gives the worst element and its index."""
    import torch

    if actual.shape != expected.shape:
        raise AssertionError(f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return
    both_nan = a.isnan() & e.isnan()
    err = (a - e).abs().masked_fill(both_nan, 0).nan_to_num(nan=float("inf"))
    excess = err - (atol + rtol * e.abs().nan_to_num(nan=0.0))
    worst = int(excess.flatten().argmax())
    if excess.flatten()[worst] > 0:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{msg} {bad}/{a.numel()} elements differ; worst at {index}: got {a[index].item()!r}, "
            f"expected {e[index].item()!r} (|diff| {err[index].item():.3g}, atol {atol}, rtol {rtol})")


def capture_cuda_graph(fn, warmup=2):
    """(graph, what fn returned while captured): fn runs `warmup` times on a side stream first (autotune,
    compilation, allocations), as torch.cuda.graph requires; a host sync while capturing raises."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, captured


def check_cuda_graph(step, inputs, fresh, *, atol, rtol):
    """Capture step() (it returns the tensors to check, e.g. outputs and .grad) in a CUDA graph, copy each
    of `fresh` into the captured tensor of `inputs`, replay, and compare with a plain call of step() on those
    inputs. A host sync, a pageable copy or a value read on the host while capturing raises; a device-side
    value baked in at capture time (a label count, a seed) shows up as a mismatch after the copy."""
    graph, captured = capture_cuda_graph(step)
    for dst, src in zip(inputs, fresh):
        dst.detach().copy_(src)
    graph.replay()
    replayed = [t.clone() for t in captured]
    for i, (got, want) in enumerate(zip(replayed, step())):
        assert_close(got, want, atol=atol, rtol=rtol, msg=f"CUDA graph replay, result {i}:")


def max_error(actual, expected):
    """Largest absolute difference, in fp64, as a float."""
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One Triton kernel at one real launch config, to be compiled for a GPU target."""
    module: str          # e.g. "qlora_kernels.kernels.nf4"
    kernel: str          # name of the @triton.jit function in that module
    signature: dict      # arg name -> "*bf16" / "i32" / "fp32" / "constexpr"
    constexprs: dict     # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple = ()  # args triton would see as multiples of 16 at launch (pointers, sizes, strides)

    def label(self):
        return f"{self.kernel}[{','.join(f'{k}={v}' for k, v in self.constexprs.items())}," \
               f"w{self.num_warps}s{self.num_stages}]"


def mma_loop_instructions(sass: str) -> int:
    """SASS instructions in the body of the longest loop (backward branch) that issues MMAs: the K-loop of
    a GEMM, whose issue slots against its tensor-core time decide an ALU-heavy kernel (0 if none)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    best = 0
    for addr, text in code:
        jump = re.search(r"BRA (?:\.U )?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < addr:
            body = [t for a, t in code if int(jump.group(1), 16) <= a <= addr]
            if any("MMA" in t for t in body):
                best = max(best, len(body))
    return best


def _compile_here(case: CompileCase, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_kernel_module(case.module), case.kernel)
    names = list(case.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in case.aligned}
    src = ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    tool_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cubin_path = f"/tmp/qlora_kernels_{os.getpid()}_{case.kernel}_{arch}.cubin"
    with open(cubin_path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "--dump-resource-usage", cubin_path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "--dump-sass", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(cubin_path)
    fields = dict(tok.split(":", 1) for tok in usage.split() if ":" in tok and tok.split(":", 1)[1].isdigit())
    # STACK alone may be a call frame (e.g. the slow path of an IEEE division); ptxas -v tells spills apart
    ptx_path = cubin_path[:-len(".cubin")] + ".ptx"
    with open(ptx_path, "w") as f:
        f.write(compiled.asm["ptx"])
    try:
        # triton 3.9 ships an older `ptxas` beside `ptxas-blackwell`; only the newer reads its PTX version
        ptxas = next(p for p in (os.path.join(tool_dir, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
        verbose = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                                  ptx_path, "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    finally:
        os.remove(ptx_path)
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", verbose))
    return {"label": case.label(), "arch": arch, "triton": triton.__version__, "registers": int(fields.get("REG", -1)),
            "spill_bytes": spills, "stack": int(fields.get("STACK", 0)), "local": int(fields.get("LOCAL", 0)),
            "shared": int(compiled.metadata.shared),
            "hgmma": sass.count("HGMMA"), "hgmma_reg_a": len(re.findall(r"HGMMA\.\S+ R\d+, R\d+, gdesc", sass)),
            "hmma": sass.count("HMMA"), "prmt": len(re.findall(r"\bPRMT\b", sass)),
            "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
            "mma_loop": mma_loop_instructions(sass),
            # ptxas's C7515 note: every wgmma waits for its own completion (no tensor-core overlap)
            "wgmma_serialized": "wgmma.mma_async instructions are serialized" in verbose}


def _kernel_module(name):
    """Import a kernels module; in a child process without the package (another triton, no torch), load
    kernels/ from its folder as a stand-alone package (its modules import only triton and each other)."""
    if not name.startswith(KERNELS_PACKAGE + ".") or os.environ.get("QLORA_KERNELS_DIR") is None:
        return importlib.import_module(name)
    alias = "_qlora_kernels_kernels"
    if alias not in sys.modules:
        folder = os.environ["QLORA_KERNELS_DIR"]
        spec = importlib.util.spec_from_file_location(alias, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        sys.modules[alias] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[alias])
    return importlib.import_module(alias + name[len(KERNELS_PACKAGE):])


def _compile_in_child(python, cases, archs, standalone):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if standalone:
        env["QLORA_KERNELS_DIR"] = os.path.dirname(importlib.util.find_spec(KERNELS_PACKAGE).origin)
    payload = json.dumps({"cases": [dataclasses.asdict(c) for c in cases], "archs": list(archs)})
    proc = subprocess.run([python, os.path.abspath(__file__)], input=payload, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compile failed with {python}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_for_gpu(cases, archs=(80, 90)) -> list:
    """Compile every case for every arch; a list of resource reports (dicts): registers, spill_bytes (ptxas
    spill stores + loads), stack, local, shared (bytes), hgmma / hmma (tensor-core instructions in the SASS;
    hgmma_reg_a: wgmma reading its A operand from registers), prmt (byte permutes), instructions (static
    SASS count), mma_loop (instructions in the MMA K-loop, see mma_loop_instructions) and wgmma_serialized
    (ptxas serialized the wgmmas: each waits for its own completion).

    Under TRITON_INTERPRET=1 the kernels in this process are interpreted objects, so the compile runs
    in a child process without it.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        reports = [_compile_here(c, a) for c in cases for a in archs]
    else:
        reports = _compile_in_child(sys.executable, cases, archs, standalone=False)
    for python in filter(None, os.environ.get("QLORA_KERNELS_COMPILE_PYTHONS", "").split(os.pathsep)):
        reports += _compile_in_child(python, cases, archs, standalone=True)
    return reports


def assert_no_spills(report, max_shared=227 * 1024):
    """No register spills (ptxas spill bytes, local memory) and shared memory within an H100 block's.
    A stack frame alone is allowed: it can be the call frame of a slow-path subroutine (IEEE division)."""
    assert report["spill_bytes"] == 0 and report["local"] == 0, f"register spills: {report}"
    assert report["shared"] <= max_shared, f"too much shared memory: {report}"


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    reports = [_compile_here(CompileCase(**c), a) for c in job["cases"] for a in job["archs"]]
    print(json.dumps(reports))
