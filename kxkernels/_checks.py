"""Argument checks for the public functions: each raises TypeError/ValueError naming the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_floating(x, name: str) -> None:
    check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 on CPU), got {x.dtype}")
    if x.dtype == torch.float64 and x.device.type != "cpu":
        raise TypeError(f"{name}: float64 is supported on CPU only (for gradcheck), got {x.device}")


def check_integer_tensor(x, name: str) -> None:
    check_tensor(x, name)
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {x.dtype}")


def check_bool_tensor(x, name: str) -> None:
    check_tensor(x, name)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {x.dtype}")


def check_int_arg(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")


def check_positive(v, name: str) -> None:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")


def check_same_device(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{na} and {nb} must be on the same device, got {a.device} and {b.device}")


def check_finite_number(v, name: str) -> None:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")


def check_rank(x: torch.Tensor, dim: int, name: str, layout: str) -> None:
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims {layout}, got shape {tuple(x.shape)}")


def resolve_rotary_dim(rotary_dim, head_dim: int, name: str = "rotary_dim") -> int:
    """The rotated channel count: ``head_dim`` when None; RoPE rotates pairs, so it must be even
    and in ``[2, head_dim]``."""
    if rotary_dim is None:
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE (it rotates channel pairs), got {head_dim}; "
                             f"pass an even {name} < head_dim to rotate part of the channels")
        return head_dim
    check_int_arg(rotary_dim, name)
    if rotary_dim % 2 != 0 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"{name} must be even and in [2, head_dim={head_dim}], got {rotary_dim}")
    return int(rotary_dim)


def resolve_positions(positions, batch: int, length: int, device, name: str):
    """RoPE positions as the kernels take them: None stays None, an int offset ``o`` becomes
    ``(None, o)``, an int tensor ``(L,)`` or ``(B, L)`` becomes an int64 ``(B, L)`` tensor (a
    stride-0 expanded view of ``(L,)``). Returns ``(tensor or None, offset)``."""
    if positions is None:
        return None, 0
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        return None, int(positions)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be None, an int offset or an int tensor, got {type(positions).__name__}")
    check_integer_tensor(positions, name)
    if positions.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} like the inputs, got {positions.device}")
    p = positions.to(torch.int64)
    if p.dim() == 1:
        if p.shape[0] != length:
            raise ValueError(f"{name} must have length {length} (the sequence length), got shape {tuple(p.shape)}")
        return p.unsqueeze(0).expand(batch, length), 0
    if p.dim() == 2:
        if tuple(p.shape) != (batch, length):
            raise ValueError(f"{name} must have shape ({batch}, {length}) (batch, seq_len) or ({length},), "
                             f"got {tuple(p.shape)}")
        return p, 0
    raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {tuple(p.shape)}")
def check_dim_arg(dim, ndim: int, name: str = "dim") -> int:
    """``dim`` as a non-negative index into a tensor of ``ndim`` dims (``-ndim <= dim < ndim``)."""
    check_int_arg(dim, name)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim - 1}] for a {ndim}-D tensor, got {dim}")
    return dim % ndim
