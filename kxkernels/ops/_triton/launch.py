"""Host-side helpers every Triton launcher uses: output allocation and the device guard."""
from __future__ import annotations

import contextlib
import os

import torch


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device (dtype ``like.dtype`` unless given).

    With ``KX_POISON_OUTPUTS=1`` in the environment (the tests set it) floating outputs are
    NaN-filled, so an element a kernel forgets to write fails the comparison with the reference.
    """
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if os.environ.get("KX_POISON_OUTPUTS") == "1" and t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s GPU current, so a launch on a tensor of a non-current device
    runs there (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
