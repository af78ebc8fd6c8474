"""Which implementation runs an op for a given tensor, and why the others could not.

Each op registers its implementations here with `register(op, device_type, name, available)`;
`available()` returns None when usable or a string saying why not. CPU tensors always run the
C++ kernels; CUDA tensors run the CUDA C++ kernel or the Triton kernel, the first usable one in
registration order.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Optional

import torch

_IMPLS: dict[str, list[tuple[str, str, Callable[[], Optional[str]]]]] = {}


def register(op: str, device_type: str, name: str, available: Callable[[], Optional[str]]) -> None:
    _IMPLS.setdefault(op, []).append((device_type, name, available))


@functools.lru_cache(None)
def triton_unavailable() -> Optional[str]:
    """None when Triton kernels can be launched on CUDA tensors, else the reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device"
    return None


@functools.lru_cache(None)
def cuda_extension_unavailable() -> Optional[str]:
    from kxkernels import _C

    if not _C.build_info()["cuda"]:
        return "the extension was built without CUDA (CPU torch or no CUDA toolkit at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def select(op: str, device: torch.device | str) -> str:
    """Name of the implementation that runs `op` on `device`; raises with every reason if none."""
    device_type = torch.device(device).type
    reasons = []
    for dt, name, available in _IMPLS.get(op, []):
        if dt != device_type:
            continue
        why = available()
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise NotImplementedError(
        f"kxkernels.{op}: no implementation for device {device_type!r}"
        + (" (" + "; ".join(reasons) + ")" if reasons else ""))


def explain(op: str) -> dict[str, dict[str, str]]:
    """For each device type, each implementation of `op` and 'available' or why not."""
    out: dict[str, dict[str, str]] = {}
    for dt, name, available in _IMPLS.get(op, []):
        why = available()
        out.setdefault(dt, {})[name] = "available" if why is None else why
    return out


def table() -> dict[str, dict[str, dict[str, str]]]:
    return {op: explain(op) for op in sorted(_IMPLS)}
