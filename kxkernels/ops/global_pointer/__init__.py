"""GlobalPointer span scores and the ZLPR (multilabel categorical cross-entropy) loss: public
functions, op registration, fake kernels, autograd.

CPU tensors run the C++ kernels in csrc/cpu/global_pointer.cpp; CUDA tensors run the Triton kernels
in ./triton.py. The eager reference is ./reference.py.

Sources: Su Jianlin, GlobalPointer (2021, kexue.fm/archives/8373), Efficient GlobalPointer (2022,
kexue.fm/archives/8877); the ZLPR loss "将Softmax+交叉熵推广到多标签分类问题" (2020,
kexue.fm/archives/7359) and its soft-label form (2022, kexue.fm/archives/9064).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from kxkernels import _backend, _extension  # noqa: F401  (loads the schemas)
from kxkernels._checks import (check_bool_tensor, check_floating, check_integer_tensor, check_positive,
                               check_tensor)

_ops = torch.ops.kxkernels
_REDUCTIONS = ("mean", "sum", "none")

for _op in ("global_pointer", "multilabel_categorical_crossentropy", "sparse_multilabel_categorical_crossentropy",
            "global_pointer_loss"):
    _backend.register(_op, "cpu", "cpp", lambda: None)
    _backend.register(_op, "cuda", "triton", _backend.triton_unavailable)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels (shapes and dtypes only, laid out like the real outputs) -------------------
@torch.library.register_fake("kxkernels::global_pointer_fwd")
def _(q, k, mask, start_bias, end_bias, rope, rope_base, interleaved, tril, scale):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, L))


@torch.library.register_fake("kxkernels::global_pointer_bwd")
def _(grad, q, k, mask, rope, rope_base, interleaved, tril, scale):
    B, H, L, _ = q.shape
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty((B, H, L), dtype=_acc(q.dtype)),
            q.new_empty((B, H, L), dtype=_acc(q.dtype)))


@torch.library.register_fake("kxkernels::multilabel_categorical_crossentropy_fwd")
def _(logits, labels):
    n = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@torch.library.register_fake("kxkernels::multilabel_categorical_crossentropy_bwd")
def _(grad_loss, logits, labels, lse_neg, lse_pos):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("kxkernels::sparse_multilabel_categorical_crossentropy_fwd")
def _(logits, pos_index, mask_zero):
    n = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc)


@torch.library.register_fake("kxkernels::sparse_multilabel_categorical_crossentropy_bwd")
def _(grad_loss, logits, pos_index, mask_zero, lse_neg, lse_pos):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("kxkernels::global_pointer_loss_fwd")
def _(q, k, spans, mask, start_bias, end_bias, rope, rope_base, interleaved, tril, scale):
    B, H = q.shape[:2]
    acc = _acc(q.dtype)
    return q.new_empty((B, H), dtype=acc), q.new_empty((B, H), dtype=acc), q.new_empty((B, H), dtype=acc)


@torch.library.register_fake("kxkernels::global_pointer_loss_bwd")
def _(grad_loss, q, k, spans, mask, start_bias, end_bias, lse_neg, lse_pos, rope, rope_base, interleaved, tril,
      scale):
    B, H, L, _ = q.shape
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty((B, H, L), dtype=_acc(q.dtype)),
            q.new_empty((B, H, L), dtype=_acc(q.dtype)))


# ---- autograd: the backward of each forward op is its own registered op -----------------------
def _bias_grads(ctx, d_start, d_end):
    return (d_start.to(ctx.bias_dtype[0]) if ctx.bias_dtype[0] is not None else None,
            d_end.to(ctx.bias_dtype[1]) if ctx.bias_dtype[1] is not None else None)


def _gp_setup(ctx, inputs, output):
    q, k, mask, start_bias, end_bias, rope, rope_base, interleaved, tril, scale = inputs
    ctx.save_for_backward(q, k, mask)
    ctx.args = (rope, rope_base, interleaved, tril, scale)
    ctx.bias_dtype = (None if start_bias is None else start_bias.dtype, None if end_bias is None else end_bias.dtype)


def _gp_backward(ctx, grad):
    q, k, mask = ctx.saved_tensors
    dq, dk, d_start, d_end = _ops.global_pointer_bwd(grad, q, k, mask, *ctx.args)
    ds, de = _bias_grads(ctx, d_start, d_end)
    return dq, dk, None, ds, de, None, None, None, None, None


torch.library.register_autograd("kxkernels::global_pointer_fwd", _gp_backward, setup_context=_gp_setup)


def _mcce_setup(ctx, inputs, output):
    logits, labels = inputs
    _, lse_neg, lse_pos = output
    ctx.save_for_backward(logits, labels, lse_neg, lse_pos)
    ctx.mark_non_differentiable(lse_neg, lse_pos)


def _mcce_backward(ctx, grad_loss, g1, g2):
    logits, labels, lse_neg, lse_pos = ctx.saved_tensors
    return _ops.multilabel_categorical_crossentropy_bwd(grad_loss, logits, labels, lse_neg, lse_pos), None


torch.library.register_autograd("kxkernels::multilabel_categorical_crossentropy_fwd", _mcce_backward,
                                setup_context=_mcce_setup)


def _smcce_setup(ctx, inputs, output):
    logits, pos_index, mask_zero = inputs
    _, lse_neg, lse_pos = output
    ctx.save_for_backward(logits, pos_index, lse_neg, lse_pos)
    ctx.mask_zero = mask_zero
    ctx.mark_non_differentiable(lse_neg, lse_pos)


def _smcce_backward(ctx, grad_loss, g1, g2):
    logits, pos_index, lse_neg, lse_pos = ctx.saved_tensors
    grad = _ops.sparse_multilabel_categorical_crossentropy_bwd(grad_loss, logits, pos_index, ctx.mask_zero,
                                                               lse_neg, lse_pos)
    return grad, None, None


torch.library.register_autograd("kxkernels::sparse_multilabel_categorical_crossentropy_fwd", _smcce_backward,
                                setup_context=_smcce_setup)


def _gpl_setup(ctx, inputs, output):
    q, k, spans, mask, start_bias, end_bias, rope, rope_base, interleaved, tril, scale = inputs
    _, lse_neg, lse_pos = output
    ctx.save_for_backward(q, k, spans, mask, start_bias, end_bias, lse_neg, lse_pos)
    ctx.args = (rope, rope_base, interleaved, tril, scale)
    ctx.bias_dtype = (None if start_bias is None else start_bias.dtype, None if end_bias is None else end_bias.dtype)
    ctx.mark_non_differentiable(lse_neg, lse_pos)


def _gpl_backward(ctx, grad_loss, g1, g2):
    q, k, spans, mask, start_bias, end_bias, lse_neg, lse_pos = ctx.saved_tensors
    dq, dk, d_start, d_end = _ops.global_pointer_loss_bwd(grad_loss, q, k, spans, mask, start_bias, end_bias,
                                                          lse_neg, lse_pos, *ctx.args)
    ds, de = _bias_grads(ctx, d_start, d_end)
    return dq, dk, None, None, ds, de, None, None, None, None, None


torch.library.register_autograd("kxkernels::global_pointer_loss_fwd", _gpl_backward, setup_context=_gpl_setup)


# ---- CUDA tensors: Triton kernels -------------------------------------------------------------
def _register_triton():
    from kxkernels.ops.global_pointer import triton as tk

    for name in ("global_pointer_fwd", "global_pointer_bwd", "multilabel_categorical_crossentropy_fwd",
                 "multilabel_categorical_crossentropy_bwd", "sparse_multilabel_categorical_crossentropy_fwd",
                 "sparse_multilabel_categorical_crossentropy_bwd", "global_pointer_loss_fwd",
                 "global_pointer_loss_bwd"):
        torch.library.register_kernel(f"kxkernels::{name}", "cuda", getattr(tk, name))


if _backend.triton_unavailable() in (None, "no CUDA device"):
    try:
        _register_triton()
    except (ImportError, AttributeError):  # pragma: no cover - triton.py not there yet
        pass


# ---- argument checks --------------------------------------------------------------------------
def _check_qk(q, k, rope):
    check_floating(q, "q")
    check_floating(k, "k")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} (B, H, L, D), got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on {q.device} like q, got {k.device}")
    B, H, L, D = q.shape
    if min(B, H, L, D) <= 0:
        raise ValueError(f"q must have non-empty dims (B, H, L, D), got {tuple(q.shape)}")
    if rope and D % 2:
        raise ValueError(f"head_dim D must be even with rope=True (channels rotate in pairs), got D={D}")


def _check_settings(rope_base, scale, D):
    check_positive(rope_base, "rope_base")
    if scale is None:
        return D ** -0.5
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_mask(mask, q):
    if mask is None:
        return None
    check_bool_tensor(mask, "mask")
    B, _, L, _ = q.shape
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must be bool (B, L) = {(B, L)}, got shape {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on {q.device} like q, got {mask.device}")
    return mask


def _check_bias(bias, q, name):
    if bias is None:
        return None
    check_floating(bias, name)
    B, H, L, _ = q.shape
    if tuple(bias.shape) != (B, H, L):
        raise ValueError(f"{name} must be (B, H, L) = {(B, H, L)}, got shape {tuple(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"{name} must be on {q.device} like q, got {bias.device}")
    return bias


def _check_spans(spans, q):
    check_tensor(spans, "spans")
    if spans.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"spans must be an int64 or int32 tensor of (start, end) pairs, got {spans.dtype}")
    B, H = q.shape[:2]
    if spans.dim() != 4 or spans.shape[0] != B or spans.shape[1] != H or spans.shape[3] != 2:
        raise ValueError(f"spans must be int (B, H, P, 2) = ({B}, {H}, P, 2) (one list of (start, end) per "
                         f"batch and head), got shape {tuple(spans.shape)}")
    if spans.device != q.device:
        raise ValueError(f"spans must be on {q.device} like q, got {spans.device}")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss, reduction, dtype):
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / max(loss.numel(), 1)
    return total.to(dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C) view of the last dim (a copy only when the rows cannot be viewed)."""
    return x.reshape(-1, x.shape[-1])


# ---- public functions ---------------------------------------------------------------------------
def global_pointer(q: torch.Tensor, k: torch.Tensor, *, mask: Optional[torch.Tensor] = None, rope: bool = True,
                   rope_base: float = 10000.0, interleaved: bool = True, tril: bool = True,
                   scale: Optional[float] = None, start_bias: Optional[torch.Tensor] = None,
                   end_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GlobalPointer span logits: ``s[b,h,i,j] = scale * R_i q[b,h,i] . R_j k[b,h,j]
    + start_bias[b,h,i] + end_bias[b,h,j]``, masked cells ``-inf``.

    Source: Su Jianlin, GlobalPointer (2021, kexue.fm/archives/8373); the biases are Efficient
    GlobalPointer's (2022, kexue.fm/archives/8877). ``R_m`` is RoFormer's rotation at position
    ``m`` (angles in float32 from ``arange(L)`` inside the kernel, ``theta_i = rope_base ** (-2i/D)``;
    ``interleaved`` pairs channels ``(2i, 2i+1)`` as bert4keras, else ``(i, i + D/2)``).

    Args:
        q, k (torch.Tensor): ``[B, H, L, D]`` (H = entity / relation types), float32/float16/bfloat16
            (float64 on CPU), same shape and dtype; any strides. Math in float32.
        mask (torch.Tensor, optional): bool ``[B, L]``, True = real token; a cell whose row or column
            is padding is ``-inf``.
        rope (bool): rotate q and k (needs even D).
        rope_base (float): RoPE base, > 0.
        interleaved (bool): RoPE pairing (see above).
        tril (bool): mask the lower triangle ``j < i`` (end before start) to ``-inf``.
        scale (float, optional): default ``D ** -0.5``.
        start_bias, end_bias (torch.Tensor, optional): ``[B, H, L]``, added along rows (start i) /
            columns (end j); differentiable.

    Returns:
        torch.Tensor: ``[B, H, L, L]`` logits in the dtype of ``q``. Gradients are zero at masked cells.

    Raises:
        TypeError: non-floating q/k/biases, mismatched dtypes, non-bool mask.
        ValueError: q/k not 4-D or of different shapes, odd D with rope, mask or bias of the wrong
            shape, empty dims, rope_base <= 0, non-finite scale.

    Examples::
        >>> import torch, kxkernels
        >>> q, k = torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)
        >>> kxkernels.global_pointer(q, k).shape
        torch.Size([2, 3, 8, 8])
    """
    _check_qk(q, k, rope)
    scale = _check_settings(rope_base, scale, q.shape[-1])
    mask = _check_mask(mask, q)
    start_bias = _check_bias(start_bias, q, "start_bias")
    end_bias = _check_bias(end_bias, q, "end_bias")
    return _ops.global_pointer_fwd(q, k, mask, start_bias, end_bias, bool(rope), float(rope_base),
                                   bool(interleaved), bool(tril), scale)


def multilabel_categorical_crossentropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multilabel categorical cross-entropy (ZLPR) over the last dim, one loss per row.

    Source: Su Jianlin, "将Softmax+交叉熵推广到多标签分类问题" (2020, kexue.fm/archives/7359), soft-label
    form (2022, kexue.fm/archives/9064):
    ``loss = log(1 + sum_i (1 - y_i) e^{s_i}) + log(1 + sum_i y_i e^{-s_i})``.
    ``-inf`` logits (masked cells) take part in neither sum, whatever their label, and get zero
    gradient. Both sums are log-sum-exps with a running max in float32 (never a ``1e12`` offset).
    The labels are not differentiated.

    Args:
        logits (torch.Tensor): ``[..., C]`` float32/float16/bfloat16 (float64 on CPU); ``-inf`` allowed.
        labels (torch.Tensor): same shape; bool, or floating with values in ``[0, 1]`` (hard or soft).

    Returns:
        torch.Tensor: ``logits.shape[:-1]`` losses in the dtype of ``logits``.

    Raises:
        TypeError: non-floating logits, labels neither bool nor floating.
        ValueError: shapes differ, empty last dim, labels outside ``[0, 1]`` (or NaN).

    Examples::
        >>> import torch, kxkernels
        >>> s = torch.randn(4, 10, requires_grad=True)
        >>> y = (torch.rand(4, 10) < 0.2).float()
        >>> kxkernels.multilabel_categorical_crossentropy(s, y).shape
        torch.Size([4])
    """
    check_floating(logits, "logits")
    check_tensor(labels, "labels")
    if labels.dtype != torch.bool and not labels.dtype.is_floating_point:
        raise TypeError(f"labels must be bool or floating (values in [0, 1]), got {labels.dtype}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last dim, got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape):
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on {logits.device} like logits, got {labels.device}")
    if labels.dtype != torch.bool and labels.dtype != logits.dtype:
        labels = labels.to(logits.dtype)
    # The [0, 1] range is checked inside the kernels (no graph break under torch.compile).
    loss, _, _ = _ops.multilabel_categorical_crossentropy_fwd(_rows(logits), _rows(labels))
    return loss.reshape(logits.shape[:-1]).to(logits.dtype)


def sparse_multilabel_categorical_crossentropy(logits: torch.Tensor, pos_index: torch.Tensor, *,
                                               mask_zero: bool = False) -> torch.Tensor:
    """ZLPR with the positive classes given as indices, one loss per row, never negative.

    Source: Su Jianlin, "多标签“Softmax+交叉熵”的稀疏版本" (2022, kexue.fm/archives/8888). bert4keras
    forms the negative term as ``log(sum_all) + log(1 - e^{lse(pos) - lse(all)})``, which cancels
    (and goes negative after its clip) when the positives dominate; here the negative term is
    ``log(1 + sum_{i not positive} e^{s_i})``, summed over the negatives themselves, and the
    positive term ``log(1 + sum_{i positive} e^{-s_i})``. Duplicate indices count once; ``-inf``
    logits are excluded.

    Args:
        logits (torch.Tensor): ``[..., C]`` float32/float16/bfloat16 (float64 on CPU).
        pos_index (torch.Tensor): int64/int32 ``[..., P]`` (leading dims as logits), values in
            ``[0, C)``; ``-1`` is padding, and with ``mask_zero`` so is ``0`` (class 0 is then a
            dummy in neither set, as bert4keras's ``mask_zero=True``).
        mask_zero (bool): see above.

    Returns:
        torch.Tensor: ``logits.shape[:-1]`` losses (>= 0) in the dtype of ``logits``.

    Raises:
        TypeError: non-floating logits, non-integer pos_index.
        ValueError: leading shapes differ, empty last dim, an index outside ``[-1, C)``.

    Examples::
        >>> import torch, kxkernels
        >>> s = torch.randn(4, 100)
        >>> kxkernels.sparse_multilabel_categorical_crossentropy(s, torch.tensor([[1, 5], [2, -1], [7, 7], [-1, -1]])).shape
        torch.Size([4])
    """
    check_floating(logits, "logits")
    check_integer_tensor(pos_index, "pos_index")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last dim, got shape {tuple(logits.shape)}")
    if pos_index.dim() != logits.dim() or tuple(pos_index.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"pos_index must be (..., P) with leading dims {tuple(logits.shape[:-1])} of logits, "
                         f"got shape {tuple(pos_index.shape)}")
    if pos_index.device != logits.device:
        raise ValueError(f"pos_index must be on {logits.device} like logits, got {pos_index.device}")
    loss, _, _ = _ops.sparse_multilabel_categorical_crossentropy_fwd(_rows(logits), _rows(pos_index),
                                                                      bool(mask_zero))
    return loss.reshape(logits.shape[:-1]).to(logits.dtype)


def global_pointer_loss(q: torch.Tensor, k: torch.Tensor, spans: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                        rope: bool = True, rope_base: float = 10000.0, interleaved: bool = True, tril: bool = True,
                        scale: Optional[float] = None, start_bias: Optional[torch.Tensor] = None,
                        end_bias: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """ZLPR loss of :func:`global_pointer` against positive spans, fused: the ``[B, H, L, L]``
    logits are never materialized (memory O(B * H * L) plus the inputs).

    Equals ``multilabel_categorical_crossentropy(global_pointer(q, k, ...).reshape(B, H, L * L),
    labels)`` with ``labels`` 1 at the given spans, reduced as bert4keras's
    ``global_pointer_crossentropy`` (and bert4torch's ``MultilabelCategoricalCrossentropy`` on
    ``(B * H, L * L)`` rows): one row per (batch, head) over the ``L * L`` cells, then the mean over
    the ``B * H`` rows. Tiles of (start, end) cells are scored on RoPE'd q/k tiles; each (batch,
    head) keeps two streaming log-sum-exps (negatives, positives); the backward recomputes the tiles.
    A span on a masked cell (padding, or end < start under ``tril``) is excluded, like its ``-inf`` logit.

    Args:
        q, k, mask, rope, rope_base, interleaved, tril, scale, start_bias, end_bias: as :func:`global_pointer`.
        spans (torch.Tensor): int64/int32 ``[B, H, P, 2]`` of ``(start, end)`` token positions,
            ``0 <= start <= end < L``; a pair with a ``-1`` is padding. Duplicates count once.
        reduction (str): ``"mean"`` (over the B * H rows), ``"sum"``, or ``"none"`` (``[B, H]``).

    Returns:
        torch.Tensor: the loss in the dtype of ``q``.

    Raises:
        TypeError / ValueError: as :func:`global_pointer`; spans not an int ``[B, H, P, 2]`` tensor,
            a position outside ``[0, L)``, ``start > end``; unknown reduction.

    Examples::
        >>> import torch, kxkernels
        >>> q = torch.randn(2, 3, 8, 16, requires_grad=True); k = torch.randn(2, 3, 8, 16)
        >>> spans = torch.tensor([[0, 2], [3, 3]]).expand(2, 3, 2, 2)
        >>> kxkernels.global_pointer_loss(q, k, spans).backward()
    """
    _check_qk(q, k, rope)
    scale = _check_settings(rope_base, scale, q.shape[-1])
    mask = _check_mask(mask, q)
    start_bias = _check_bias(start_bias, q, "start_bias")
    end_bias = _check_bias(end_bias, q, "end_bias")
    _check_spans(spans, q)
    _check_reduction(reduction)
    # Span values (range, start <= end) are checked inside the kernels.
    loss, _, _ = _ops.global_pointer_loss_fwd(q, k, spans, mask, start_bias, end_bias, bool(rope),
                                              float(rope_base), bool(interleaved), bool(tril), scale)
    return _reduce(loss, reduction, q.dtype)


def decode_spans(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Spans whose score exceeds ``threshold``.

    Args:
        logits (torch.Tensor): ``[B, H, L, L]`` GlobalPointer logits (``-inf`` cells never pass).
        threshold (float): the decision threshold (0 is ZLPR's natural one).

    Returns:
        torch.Tensor: int64 ``[N, 4]`` rows ``(batch, head, start, end)``, in row-major order.

    Raises:
        TypeError: non-floating logits or threshold not a number.
        ValueError: logits not 4-D with square last two dims, NaN threshold.

    Examples::
        >>> import torch, kxkernels
        >>> s = torch.full((1, 1, 3, 3), -5.0); s[0, 0, 0, 2] = 1.0
        >>> kxkernels.decode_spans(s).tolist()
        [[0, 0, 0, 2]]
    """
    check_floating(logits, "logits")
    if logits.dim() != 4 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be (B, H, L, L), got shape {tuple(logits.shape)}")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if threshold != threshold:
        raise ValueError("threshold must not be NaN")
    return torch.nonzero(logits > threshold)
