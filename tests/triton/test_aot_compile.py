"""Compile every Triton kernel of the package at every tuning config for sm_80 and sm_90, no GPU.

The registry is tests/triton/_aot.py. Compilation runs Triton's full NVIDIA pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) with the ptxas bundled in
triton/backends/nvidia/bin, so it needs neither a GPU nor a CUDA driver. A failure here is a real
compile error (or ptxas missing from the Triton install): it is never skipped.
"""
import importlib
import pkgutil

import pytest
import triton
from triton.runtime.jit import JITFunction

import kxkernels.ops
from _aot import AOT_KERNELS, SHARED_LIMIT_BYTES, aot_cases, compile_kernel

_CASES = aot_cases()


@pytest.mark.parametrize("entry,cfg,cap", [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_compiles_within_shared_memory(entry, cfg, cap):
    compiled = compile_kernel(entry, cfg, cap)
    assert compiled.asm.get("cubin"), f"{entry.name}: no cubin produced for sm_{cap}"
    assert compiled.metadata.num_warps == cfg["num_warps"]
    shared = compiled.metadata.shared
    assert 0 <= shared <= SHARED_LIMIT_BYTES[cap], (
        f"{entry.name} at {cfg} asks for {shared} bytes of shared memory, above the sm_{cap} "
        f"limit of {SHARED_LIMIT_BYTES[cap]}")


def _package_kernels():
    """Every @triton.jit kernel (name ending in `_kernel`) in a kxkernels.ops.<op>.triton module."""
    found = {}
    for mod in pkgutil.walk_packages(kxkernels.ops.__path__, "kxkernels.ops."):
        if not mod.name.endswith(".triton"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # autotune/heuristics
                fn = fn.fn
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                found[f"{mod.name}.{name}"] = (fn, module)
    return found


def test_registry_covers_every_kernel():
    kernels = _package_kernels()
    assert kernels, "found no Triton kernels in kxkernels.ops.*.triton"
    registered = {id(e.fn) for e in AOT_KERNELS}
    missing = [name for name, (fn, _) in kernels.items() if id(fn) not in registered]
    assert not missing, f"kernels missing from tests/triton/_aot.py AOT_KERNELS: {missing}"


def test_registry_sweeps_every_tuning_config():
    """A module's TUNING_CONFIGS (what its launchers choose from) are all compiled, per kernel;
    a module whose kernels choose from different lists names them in KERNEL_CONFIGS
    (kernel name -> configs)."""
    checked = 0
    for name, (fn, module) in _package_kernels().items():
        configs = getattr(module, "TUNING_CONFIGS", None)
        per_kernel = getattr(module, "KERNEL_CONFIGS", None)
        if per_kernel is not None:
            kernel = name.rsplit(".", 1)[1]
            assert kernel in per_kernel, f"{name}: missing from its module's KERNEL_CONFIGS"
            configs = per_kernel[kernel]
        if configs is None:
            continue
        swept = [cfg for e in AOT_KERNELS if e.fn is fn for cfg in e.configs]
        for cfg in configs:
            assert cfg in swept, f"{name}: tuning config {cfg} is never compiled"
            checked += 1
    assert checked, "no module exposes TUNING_CONFIGS"


def test_bundled_ptxas_present():
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90)
    except TypeError:  # older Triton: get_ptxas() takes no arch
        ptxas = get_ptxas()
    assert ptxas.path, "Triton's NVIDIA backend has no ptxas (set TRITON_PTXAS_PATH)"
