"""Builds q2ext._C: a CUDAExtension when a CUDA toolkit and a CUDA build of torch are
present, else a CppExtension.

Environment:
  Q2EXT_USE_CUDA=0|1      force the CPU-only or the CUDA build (default: auto-detect)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: "8.0;9.0")
  CUDA_HOME               toolkit location (set it explicitly where nvcc is a wrapper)
No -march=native: the AVX-512/AVX2 code paths are separate translation units chosen at
run time (csrc/include/q2ext/cpu_isa.h), so the build runs on any x86-64.
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def use_cuda() -> bool:
    forced = os.environ.get("Q2EXT_USE_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def sources(with_cuda: bool):
    found = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        found += sorted(glob.glob("csrc/cuda/*.cu"))
    return found


def extension():
    with_cuda = use_cuda()
    # -ffp-contract=off: the fake-quant math must round every product separately to be
    # bit-identical to ATen and to the reference (an FMA would change ties).
    # -fopenmp: ATen's at::parallel_for is an inline template that only runs in parallel
    # when the including translation unit is compiled with OpenMP (ParallelOpenMP.h checks
    # _OPENMP). The resulting DT_NEEDED libgomp.so.1 resolves to the copy torch has
    # already loaded (same soname), so one OpenMP runtime serves torch and q2ext.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    macros = []
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include")])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros.append(("Q2EXT_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "q2ext._C", sources(True), define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"], **kwargs)
    return cpp_extension.CppExtension(
        "q2ext._C", sources(False), define_macros=macros, extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"], **kwargs)


# Metadata, packages and the console script live in pyproject.toml.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
