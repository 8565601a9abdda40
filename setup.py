"""Build of qlora-kernels: pure-Python package + one native extension, `qlora_kernels._C`.

The C++ (OpenMP) CPU kernels are always built. The CUDA kernels in csrc/*.cu are added only where
torch was built with CUDA and nvcc is found. QLORA_KERNELS_NO_EXT=1 skips the extension entirely
(the package then falls back to its plain-PyTorch reference path on CPU).
"""
import glob
import os

from setuptools import setup


def native_extensions():
    if os.environ.get("QLORA_KERNELS_NO_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    # -ffp-contract=off: GCC's default for C++ fuses `a * b + c` (even written as _mm256_mul_ps/_mm256_add_ps)
    # into one FMA; torch rounds the product first (AdamW's p * (1 - lr * wd) + update), so must we
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    # QLORA_KERNELS_CUDA_ARCHS="90" builds for one card only (faster build on the GPU machine)
    cuda_archs = os.environ.get("QLORA_KERNELS_CUDA_ARCHS", "80;90").split(";")
    with_cuda = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "qlora_kernels._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"] + [
                f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension("qlora_kernels._C", sources, extra_compile_args=cxx,
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="qlora-kernels",
    version="0.1.0",
    description="Fused Triton/C++ kernels for QLoRA fine-tuning: NF4 dequant-matmul with LoRA, "
                "fused cross-entropy, fused AdamW.",
    packages=["qlora_kernels", "qlora_kernels.ops", "qlora_kernels.reference", "qlora_kernels.kernels"],
    package_dir={"": "python", "qlora_kernels.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "bitsandbytes>=0.45", "peft", "transformers", "accelerate"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["qlora-kernels=qlora_kernels.cli:main"]},
)
