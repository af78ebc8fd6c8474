"""Argument checks for the public functions: each raises TypeError/ValueError naming the argument."""
from __future__ import annotations

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


def check_dim_arg(dim, ndim: int, name: str = "dim") -> int:
    """``dim`` as a non-negative index into a tensor of ``ndim`` dims (``-ndim <= dim < ndim``)."""
    check_int_arg(dim, name)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim - 1}] for a {ndim}-D tensor, got {dim}")
    return dim % ndim
