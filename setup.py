"""Build of kxkernels: the C++ CPU kernels always, the CUDA sources where they can be built.

Knobs (environment variables):
  KX_SKIP_CUDA=1            build the CPU extension only, even with a CUDA torch and toolkit.
  KX_CUDA_ARCHS="8.0;9.0"   CUDA architectures (falls back to TORCH_CUDA_ARCH_LIST, then 8.0;9.0).
  MAX_JOBS=N                parallel compile jobs (default: cores, at most one per 2 GB of memory).
"""
import glob
import os
import warnings

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_possible():
    """CUDA sources are built when torch has CUDA and a toolkit is usable; a GPU is not needed."""
    if os.environ.get("KX_SKIP_CUDA", "0") == "1":
        return False, "KX_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, ""


def _cuda_archs():
    archs = os.environ.get("KX_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 2))))


def _write_build_record(cuda_ok):
    """kxkernels/_build.py records the torch the extension is built against, so a failed load of
    the extension can say so (the extension itself cannot be asked then)."""
    with open(os.path.join(ROOT, "kxkernels", "_build.py"), "w") as f:
        f.write(f'# written by setup.py\nTORCH_VERSION = "{torch.__version__}"\n'
                f'CUDA = {bool(cuda_ok)}\n')


def extensions():
    _max_jobs()
    sources = [os.path.relpath(p, ROOT) for p in
               ["csrc/kxkernels.cpp"] + sorted(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))]
    cuda_ok, why_not = _cuda_build_possible()
    archs = _cuda_archs() if cuda_ok else []
    _write_build_record(cuda_ok)
    define = [
        ("KX_TORCH_VERSION", f'"{torch.__version__}"'),
        ("KX_WITH_CUDA", "1" if cuda_ok else "0"),
        ("KX_CUDA_ARCHS", '"' + ";".join(archs) + '"'),
        ("KX_CUDA_VERSION", '"' + (torch.version.cuda or "") + '"' if cuda_ok else '""'),
    ]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if not cuda_ok:
        if torch.version.cuda is not None:
            warnings.warn(f"kxkernels: building without CUDA kernels ({why_not})")
        return [cpp_extension.CppExtension(
            "kxkernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")))]
    return [cpp_extension.CUDAExtension(
        "kxkernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"])]


setup(
    packages=find_packages(include=["kxkernels", "kxkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
