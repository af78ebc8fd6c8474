"""Sparse softmax top-k (SPACES): public functions, op registration, fake kernels, autograd.

CPU tensors run the C++ kernels in csrc/cpu/sparse_softmax.cpp; CUDA tensors run the Triton
kernels in ./triton.py. The eager reference is ./reference.py.
"""
from __future__ import annotations

import torch

from kxkernels import _backend, _extension  # noqa: F401  (loads the schemas)
from kxkernels._checks import check_dim_arg, check_floating, check_int_arg, check_integer_tensor

_ops = torch.ops.kxkernels
_REDUCTIONS = ("mean", "sum", "none")

for _op in ("sparse_softmax", "sparse_softmax_cross_entropy"):
    _backend.register(_op, "cpu", "cpp", lambda: None)
    _backend.register(_op, "cuda", "triton", _backend.triton_unavailable)


# ---- fake kernels (shapes and dtypes only, laid out like the real outputs) -------------------
@torch.library.register_fake("kxkernels::sparse_softmax_fwd")
def _(logits, k):
    n, v = logits.shape
    return logits.new_empty((n, v)), logits.new_empty((n, k), dtype=torch.long)


@torch.library.register_fake("kxkernels::sparse_softmax_bwd")
def _(grad_probs, probs, topk_index):
    return probs.new_empty(probs.shape)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("kxkernels::sparse_softmax_cross_entropy_fwd")
def _(logits, target, k, ignore_index, include_target):
    n = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    return (logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc),
            logits.new_empty((n, k), dtype=torch.long))


@torch.library.register_fake("kxkernels::sparse_softmax_cross_entropy_bwd")
def _(grad_loss, logits, target, lse, topk_index, ignore_index, include_target):
    return logits.new_empty(logits.shape)


# ---- autograd: the backward of each forward op is its own registered op -----------------------
def _ss_setup(ctx, inputs, output):
    probs, index = output
    ctx.save_for_backward(probs, index)
    ctx.mark_non_differentiable(index)


def _ss_backward(ctx, grad_probs, grad_index):
    probs, index = ctx.saved_tensors
    return _ops.sparse_softmax_bwd(grad_probs, probs, index), None


torch.library.register_autograd("kxkernels::sparse_softmax_fwd", _ss_backward, setup_context=_ss_setup)


def _ce_setup(ctx, inputs, output):
    logits, target, k, ignore_index, include_target = inputs
    _, lse, index = output
    ctx.save_for_backward(logits, target, lse, index)
    ctx.ignore_index, ctx.include_target = ignore_index, include_target
    ctx.mark_non_differentiable(lse, index)


def _ce_backward(ctx, grad_loss, grad_lse, grad_index):
    logits, target, lse, index = ctx.saved_tensors
    grad = _ops.sparse_softmax_cross_entropy_bwd(grad_loss, logits, target, lse, index,
                                                 ctx.ignore_index, ctx.include_target)
    return grad, None, None, None, None


torch.library.register_autograd("kxkernels::sparse_softmax_cross_entropy_fwd", _ce_backward,
                                setup_context=_ce_setup)


# ---- CUDA tensors: Triton kernels -------------------------------------------------------------
def _register_triton():
    from kxkernels.ops.sparse_softmax import triton as tk

    torch.library.register_kernel("kxkernels::sparse_softmax_fwd", "cuda", tk.sparse_softmax_forward)
    torch.library.register_kernel("kxkernels::sparse_softmax_bwd", "cuda", tk.sparse_softmax_backward)
    torch.library.register_kernel("kxkernels::sparse_softmax_cross_entropy_fwd", "cuda",
                                  tk.sparse_softmax_cross_entropy_forward)
    torch.library.register_kernel("kxkernels::sparse_softmax_cross_entropy_bwd", "cuda",
                                  tk.sparse_softmax_cross_entropy_backward)


if _backend.triton_unavailable() in (None, "no CUDA device"):
    _register_triton()


# ---- public functions ---------------------------------------------------------------------------
def _check_k(k, vocab: int):
    check_int_arg(k, "k")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the size of the softmax dim), got {k}")


def sparse_softmax(logits: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Softmax over the ``k`` largest entries along ``dim``; exactly 0 elsewhere.

    Source: Su Jianlin, "SPACES" / Sparse Softmax (bert4keras), 2021.
    ``p_i = exp(x_i) / sum_{j in top_k(x)} exp(x_j)`` for ``i`` in the top-k, else 0. Ties at the
    k-th value keep the lower index. The gradient is ``p * (g - <p, g>)`` on the top-k only.

    Args:
        logits (torch.Tensor): scores of any shape ``[..., V, ...]``, float32/float16/bfloat16
            (float64 on CPU); math in float32.
        k (int): how many entries keep mass, ``1 <= k <= logits.shape[dim]``, on CPU and CUDA
            alike (on CUDA, k above 128 runs the Triton threshold-select kernels).
        dim (int): the softmax dim.

    Returns:
        torch.Tensor: probabilities, same shape and dtype as ``logits``.

    Raises:
        TypeError: ``logits`` not a floating tensor, ``k`` or ``dim`` not an int.
        ValueError: ``k`` out of range, ``dim`` outside ``[-logits.dim(), logits.dim() - 1]``,
            an empty softmax dim.

    Examples::
        >>> import torch, kxkernels
        >>> p = kxkernels.sparse_softmax(torch.randn(4, 100), k=5)
        >>> (p > 0).sum(-1).tolist()
        [5, 5, 5, 5]
    """
    check_floating(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dim")
    dim = check_dim_arg(dim, logits.dim(), "dim")
    vocab = logits.shape[dim]
    if vocab == 0:
        raise ValueError(f"logits has an empty softmax dim (shape {tuple(logits.shape)}, dim={dim})")
    _check_k(k, vocab)
    x = logits.movedim(dim, -1)
    shape = x.shape
    probs, _ = _ops.sparse_softmax_fwd(x.reshape(-1, vocab), k)
    return probs.reshape(shape).movedim(-1, dim)


def sparse_softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, k: int, *,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 include_target: bool = False) -> torch.Tensor:
    """Cross-entropy of the top-k sparse softmax: ``logsumexp(top_k(x)) - x[target]`` per row.

    Source: Su Jianlin, "SPACES" / Sparse Softmax (bert4keras), 2021. With ``include_target`` the
    set is ``top_k(x) ∪ {target}`` (the loss is then never negative). The gradient
    ``p * 1[set] - onehot(target)`` is written out of place with k (+1) non-zeros per row; the
    ``(N, V)`` softmax is never materialized.

    Args:
        logits (torch.Tensor): ``[N, V]`` or ``[B, T, V]``, float32/float16/bfloat16 (float64 on CPU).
        target (torch.Tensor): int64/int32 ``[N]`` or ``[B, T]``, values in ``[0, V)`` or ``ignore_index``.
        k (int): top-k size, ``1 <= k <= V`` on CPU and CUDA alike (on CUDA, k above 128 runs the
            Triton threshold-select kernels).
        ignore_index (int): rows with this target have loss 0 and zero gradient.
        reduction (str): ``"mean"`` (over non-ignored rows; 0 when all are ignored), ``"sum"``, ``"none"``.
        include_target (bool): add the target to the set when it is not in the top-k.

    Returns:
        torch.Tensor: scalar, or per-row losses shaped like ``target`` for ``"none"``; dtype of ``logits``.

    Raises:
        TypeError: non-floating logits, non-integer target.
        ValueError: k out of range, mismatched shapes, target out of range, unknown reduction,
            empty rows.

    Examples::
        >>> import torch, kxkernels
        >>> x = torch.randn(8, 1000, requires_grad=True)
        >>> loss = kxkernels.sparse_softmax_cross_entropy(x, torch.randint(1000, (8,)), k=10)
        >>> loss.backward()
    """
    check_floating(logits, "logits")
    check_integer_tensor(target, "target")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target must be on {logits.device} like logits, got {target.device}")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits has empty rows (V = 0, shape {tuple(logits.shape)})")
    _check_k(k, vocab)
    check_int_arg(ignore_index, "ignore_index")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # The target range is checked inside the kernels (one pass, no graph break under torch.compile).
    t = target.reshape(-1)
    valid = t != ignore_index
    loss, _, _ = _ops.sparse_softmax_cross_entropy_fwd(logits.reshape(-1, vocab), t, k,
                                                        ignore_index, include_target)
    if reduction == "none":
        return loss.reshape(target.shape).to(logits.dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / valid.sum().clamp_min(1)
    return total.to(logits.dtype)
