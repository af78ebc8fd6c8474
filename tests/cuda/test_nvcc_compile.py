"""Compile the CUDA C++ sources with nvcc for sm_80 and sm_90, no GPU needed.

Every kernel header in KERNEL_HEADERS is compiled standalone (they use only CUDA built-ins): a
generated .cu includes it and explicitly instantiates each kernel template for each element type,
with the flags the extension build uses (setup.py: -O3 --use_fast_math; torch's cpp_extension
defines __CUDA_NO_HALF_CONVERSIONS__ and friends), warnings as errors. ptxas -v then bounds each
kernel's registers, local-memory spills and static shared memory (the kernels take all their
shared memory dynamically; the glue checks that against the device's limit at launch).

The torch glue (csrc/cuda/*.cu) needs torch's CUDA headers: the CPU wheel ships them but for one
header a CUDA build generates (a stub is written for it); test_glue_compiles builds it the way a
CUDA build of the extension would, when those headers are there.

A new kernel header appends a KernelHeader entry.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

ARCHS = (80, 90)
ELEMENT_TYPES = ("float", "__half", "__nv_bfloat16")
# what torch's cpp_extension passes nvcc (COMMON_NVCC_FLAGS), and setup.py's nvcc flags
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]
SETUP_NVCC_FLAGS = ["-O3", "--use_fast_math"]


@dataclasses.dataclass(frozen=True)
class KernelHeader:
    path: str            # relative to the repository root
    namespace: str
    kernels: dict        # kernel template name -> its argument struct template (one parameter)
    max_registers: int   # per thread, at the kernel's __launch_bounds__
    max_spill_bytes: int  # local-memory spill stores per kernel


KERNEL_HEADERS = [
    # sinkhorn_fwd at <= 80 registers (3 blocks of 256 threads an SM), wrd_fwd and wrd_bwd at <= 128
    # (2 blocks); ptxas of CUDA 13 spills 36 bytes of sinkhorn_fwd on sm_90, nothing else
    KernelHeader("csrc/cuda/sinkhorn_kernel.cuh", "kx::sinkhorn_cuda",
                 {"sinkhorn_fwd_kernel": "SinkhornFwdArgs", "sinkhorn_bwd_kernel": "SinkhornBwdArgs",
                  "wrd_fwd_kernel": "WrdFwdArgs", "wrd_bwd_kernel": "WrdBwdArgs"},
                 max_registers=128, max_spill_bytes=40),
]


def gencode():
    return [f for cap in ARCHS for f in ("-gencode", f"arch=compute_{cap},code=sm_{cap}")]


def instantiation_source(h: KernelHeader) -> str:
    lines = [f'#include "{os.path.join(ROOT, h.path)}"']
    for kernel, args in h.kernels.items():
        for t in ELEMENT_TYPES:
            lines.append(f"template __global__ void {h.namespace}::{kernel}<{t}>(const {h.namespace}::{args}<{t}>);")
    return "\n".join(lines) + "\n"


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stderr}\n{r.stdout}"
    return r


def parse_ptxas(stderr: str):
    """{(function, arch): {"registers", "spill_stores", "smem"}} from ptxas -v output."""
    out, cur = {}, None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            cur = (m.group(1), int(m.group(2)))
            out[cur] = {"registers": None, "spill_stores": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            out[cur]["spill_stores"] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            out[cur]["smem"] = int(m.group(1)) if m else 0
    return out


@pytest.mark.parametrize("header", KERNEL_HEADERS, ids=lambda h: os.path.basename(h.path))
def test_kernel_header_compiles(header, tmp_path):
    src = tmp_path / "instantiate.cu"
    src.write_text(instantiation_source(header))
    obj = tmp_path / "instantiate.o"
    r = run([NVCC, "-c", "-std=c++17", *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS, *gencode(), "-Werror", "all-warnings",
             "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v", str(src), "-o", str(obj)])
    assert obj.stat().st_size > 0
    usage = parse_ptxas(r.stderr)
    expected = len(header.kernels) * len(ELEMENT_TYPES) * len(ARCHS)
    # a kernel whose code does not depend on the element type may be folded; every arch must
    # still compile every kernel
    assert len(usage) >= len(header.kernels) * len(ARCHS), f"ptxas reported {sorted(usage)}"
    assert len(usage) <= expected
    for (fn, arch), u in usage.items():
        what = f"{fn} on sm_{arch}"
        assert u["registers"] is not None and u["registers"] <= header.max_registers, f"{what}: {u}"
        assert u["spill_stores"] <= header.max_spill_bytes, f"{what} spills: {u}"
        assert u["smem"] == 0, f"{what} uses static shared memory: {u}"
    print("\n".join(f"{fn} sm_{arch}: {u}" for (fn, arch), u in sorted(usage.items())))


@pytest.mark.parametrize("header", KERNEL_HEADERS, ids=lambda h: os.path.basename(h.path))
def test_kernel_resource_usage_cuobjdump(header, tmp_path):
    """The same bounds read back from the cubins, where the toolkit has cuobjdump."""
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not on PATH (the ptxas -v check above covers the same bounds)")
    src = tmp_path / "instantiate.cu"
    src.write_text(instantiation_source(header))
    obj = tmp_path / "instantiate.o"
    run([NVCC, "-c", "-std=c++17", *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS, *gencode(), str(src), "-o", str(obj)])
    r = run([cuobjdump, "--dump-resource-usage", str(obj)])
    rows = re.findall(r"Function (\w+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", r.stdout)
    assert rows, r.stdout
    for fn, reg, stack, shared, local in rows:
        assert int(reg) <= header.max_registers, (fn, reg)
        assert int(shared) == 0, (fn, shared)
        assert int(local) <= header.max_spill_bytes, (fn, local)


GLUE_SOURCES = ["csrc/cuda/sinkhorn.cu"]


@pytest.mark.slow
@pytest.mark.parametrize("source", GLUE_SOURCES, ids=os.path.basename)
def test_glue_compiles(source, tmp_path):
    """The torch glue, as a CUDA build of the extension compiles it (C++20, torch's nvcc flags),
    for one arch; no warning may come from the repository's files."""
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.exists(os.path.join(inc, "c10", "cuda", "CUDAStream.h")):
        pytest.skip("this torch install has no c10/cuda headers")
    generated = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    stub = tmp_path / "stub"
    if not os.path.exists(os.path.join(inc, generated)):  # CPU wheel: a CUDA build generates it
        (stub / os.path.dirname(generated)).mkdir(parents=True)
        (stub / generated).write_text("#pragma once\n")
    obj = tmp_path / "glue.o"
    r = run([NVCC, "-c", "-std=c++20", *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS,
             "-gencode", f"arch=compute_{ARCHS[-1]},code=sm_{ARCHS[-1]}", "-Xcompiler", "-fPIC,-Wall,-Wextra",
             "-I", str(stub), "-I", inc, "-I", os.path.join(inc, "torch", "csrc", "api", "include"),
             "-I", os.path.join(ROOT, "csrc"), "-DTORCH_EXTENSION_NAME=_C",
             os.path.join(ROOT, source), "-o", str(obj)])
    ours = [line for line in r.stderr.splitlines() if "warning" in line and ROOT in line]
    assert not ours, "\n".join(ours)
