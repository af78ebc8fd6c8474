"""GlobalPointer and Efficient GlobalPointer heads over the fused kxkernels span-score ops.

Sources: Su Jianlin, "GlobalPointer: 用统一的方式处理嵌套和非嵌套NER" (2021,
https://kexue.fm/archives/8373) and "Efficient GlobalPointer: 少点参数，多点效果" (2022,
https://kexue.fm/archives/8877). The head scores every span ``(start i, end j)`` of every type
``h`` as ``s[b,h,i,j] = R_i q[b,h,i] . R_j k[b,h,j] / sqrt(head_size)`` (+ the Efficient start / end
biases), RoPE ``R`` interleaved (pairs ``(2c, 2c+1)``, base 10000), padded rows / columns and
``j < i`` (with ``tril``) set to ``-inf``. ``forward`` returns those logits through
``kxkernels.global_pointer``; ``loss`` is the ZLPR loss of them against positive spans through
``kxkernels.global_pointer_loss``, which never builds the ``(B, heads, L, L)`` logits.

Parameter names and shapes are those of bert4torch's ``GlobalPointer`` (``dense``) and
``EfficientGlobalPointer`` (``p_dense``, ``q_dense``), so their state dicts load unchanged.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

import kxkernels
from kxkernels._checks import check_floating

CONVENTIONS = ("bert4keras", "bert4torch")


def _check_size(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")


class _SpanHead(nn.Module):
    """What both heads share: settings, input checks, and forward / loss over :meth:`project`."""

    def __init__(self, hidden_size: int, heads: int, head_size: int, rope: bool, tril: bool,
                 rope_base: float) -> None:
        super().__init__()
        _check_size(hidden_size, "hidden_size")
        _check_size(heads, "heads")
        _check_size(head_size, "head_size")
        if rope and head_size % 2:
            raise ValueError(f"head_size must be even when rope=True (RoPE rotates channel pairs), got {head_size}")
        self.hidden_size, self.heads, self.head_size = int(hidden_size), int(heads), int(head_size)
        self.rope, self.tril, self.rope_base = bool(rope), bool(tril), float(rope_base)

    def _check_hidden(self, hidden) -> None:
        check_floating(hidden, "hidden")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (B, L, hidden_size={self.hidden_size}), "
                             f"got {tuple(hidden.shape)}")

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(q, k, kwargs)``: ``q, k (B, heads, L, head_size)`` and the keyword arguments
        (``rope``, ``rope_base``, ``interleaved``, ``tril``, biases) that
        ``kxkernels.global_pointer`` / ``global_pointer_loss`` (or the eager reference) take."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Span logits.

        Args:
            hidden (torch.Tensor): encoder output of shape ``[B, L, hidden_size]``, float32,
                float16 or bfloat16 (float64 on CPU).
            mask (torch.Tensor, optional): bool ``[B, L]``, True = real token.

        Returns:
            torch.Tensor: ``[B, heads, L, L]`` in the dtype of ``hidden``; cell ``(h, i, j)``
            scores the span ``i..j`` (inclusive) as type ``h``; masked cells are ``-inf``.

        Raises:
            TypeError, ValueError: ``hidden`` not a floating tensor of shape ``[B, L, hidden_size]``;
            a bad ``mask`` (from ``kxkernels.global_pointer``).
        """
        self._check_hidden(hidden)
        q, k, kw = self.project(hidden)
        return kxkernels.global_pointer(q, k, mask=mask, **kw)

    def loss(self, hidden: torch.Tensor, spans: torch.Tensor, mask: torch.Tensor | None = None, *,
             reduction: str = "mean") -> torch.Tensor:
        """ZLPR loss of the span logits against the positive spans, fused (memory O(B * heads * L)).

        Args:
            hidden (torch.Tensor): ``[B, L, hidden_size]`` as in :meth:`forward`.
            spans (torch.Tensor): int ``[B, heads, P, 2]`` positive ``(start, end)`` pairs,
                token indices with ``start <= end < L``; padding rows are ``-1``.
            mask (torch.Tensor, optional): bool ``[B, L]``, True = real token.
            reduction (str): ``"mean"`` over the ``B * heads`` rows (bert4keras's
                ``global_pointer_crossentropy``), ``"sum"``, or ``"none"`` (``[B, heads]``).

        Returns:
            torch.Tensor: the loss, 0-dim (``[B, heads]`` with ``reduction="none"``), in the dtype
            ``kxkernels.global_pointer_loss`` returns.

        Raises:
            TypeError, ValueError: as :meth:`forward`; bad ``spans`` (out of range, start > end,
            float, wrong head count) from ``kxkernels.global_pointer_loss``.
        """
        self._check_hidden(hidden)
        q, k, kw = self.project(hidden)
        return kxkernels.global_pointer_loss(q, k, spans, mask=mask, reduction=reduction, **kw)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, heads={self.heads}, head_size={self.head_size}, "
                f"rope={self.rope}, tril={self.tril}")


class GlobalPointer(_SpanHead):
    """GlobalPointer head: one dense layer gives every type its own ``q`` and ``k``.

    ``dense: Linear(hidden_size, heads * head_size * 2)``; its output splits into ``heads``
    consecutive chunks of ``2 * head_size``, each ``[q | k]`` (the layout of bert4keras and
    bert4torch, whose ``GlobalPointer`` state dicts load unchanged).

    Args:
        hidden_size (int): width of the encoder output.
        heads (int): number of span types (entity types, or relations in GPLinker).
        head_size (int): width of ``q`` and ``k`` per type (even when ``rope``).
        rope (bool): rotate ``q`` and ``k`` by RoPE at their token positions.
        tril (bool): mask spans with ``end < start``.
        bias (bool): bias of ``dense`` (bert4torch's ``use_bias``).
        rope_base (float): RoPE base.

    Examples::
        >>> import torch, kxkernels.nn
        >>> head = kxkernels.nn.GlobalPointer(32, heads=3, head_size=16)
        >>> hidden = torch.randn(2, 7, 32)
        >>> head(hidden).shape
        torch.Size([2, 3, 7, 7])
        >>> spans = torch.tensor([[[0, 1]], [[2, 2]], [[-1, -1]]]).expand(2, 3, 1, 2)
        >>> head.loss(hidden, spans).backward()
    """

    def __init__(self, hidden_size: int, heads: int, head_size: int = 64, rope: bool = True,
                 tril: bool = True, *, bias: bool = True, rope_base: float = 10000.0) -> None:
        super().__init__(hidden_size, heads, head_size, rope, tril, rope_base)
        self.dense = nn.Linear(self.hidden_size, self.heads * self.head_size * 2, bias=bias)

    def project(self, hidden):
        B, L, _ = hidden.shape
        x = self.dense(hidden).view(B, L, self.heads, 2 * self.head_size).transpose(1, 2)
        q, k = x[..., :self.head_size], x[..., self.head_size:]  # strided views, no copy
        return q, k, dict(rope=self.rope, rope_base=self.rope_base, interleaved=True, tril=self.tril)


class EfficientGlobalPointer(_SpanHead):
    """Efficient GlobalPointer head: ``q`` and ``k`` shared by all types, per-type start / end biases.

    ``p_dense: Linear(hidden_size, 2 * head_size)`` gives ``p``; ``q`` and ``k`` are taken from
    ``p`` and ``q_dense: Linear(2 * head_size, 2 * heads)`` of the (unrotated) ``p``, halved, gives
    each type a start bias (added along the span start ``i``) and an end bias (along ``j``).
    The two published versions differ in both splits, so a checkpoint works only under the
    convention it was trained with:

    - ``"bert4keras"`` (bert4keras ``EfficientGlobalPointer``, kexue.fm/archives/8877):
      ``q = p[..., 0::2]``, ``k = p[..., 1::2]``; bias channel ``2h`` is the end bias of type
      ``h`` and ``2h + 1`` its start bias.
    - ``"bert4torch"`` (bert4torch ``EfficientGlobalPointer``): ``q = p[..., :head_size]``,
      ``k = p[..., head_size:]``; channel ``2h`` is the start bias and ``2h + 1`` the end bias.

    Args:
        hidden_size, heads, head_size, rope, tril, bias, rope_base: as :class:`GlobalPointer`.
        convention (str): ``"bert4keras"`` (default) or ``"bert4torch"``.

    Examples::
        >>> import torch, kxkernels.nn
        >>> head = kxkernels.nn.EfficientGlobalPointer(32, heads=4, head_size=16, convention="bert4torch")
        >>> head(torch.randn(2, 5, 32), mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2])).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(self, hidden_size: int, heads: int, head_size: int = 64, rope: bool = True,
                 tril: bool = True, convention: str = "bert4keras", *, bias: bool = True,
                 rope_base: float = 10000.0) -> None:
        super().__init__(hidden_size, heads, head_size, rope, tril, rope_base)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.convention = convention
        self.p_dense = nn.Linear(self.hidden_size, 2 * self.head_size, bias=bias)
        self.q_dense = nn.Linear(2 * self.head_size, 2 * self.heads, bias=bias)

    def project(self, hidden):
        B, L, _ = hidden.shape
        p = self.p_dense(hidden)                                   # (B, L, 2D)
        bias = (self.q_dense(p) / 2).transpose(1, 2)               # (B, 2H, L)
        if self.convention == "bert4keras":
            q, k = p[..., 0::2], p[..., 1::2]
            end_bias, start_bias = bias[:, 0::2], bias[:, 1::2]
        else:
            q, k = p[..., :self.head_size], p[..., self.head_size:]
            start_bias, end_bias = bias[:, 0::2], bias[:, 1::2]
        # one q / k for every type: a stride-0 head dim, no copy (its gradient sums over types)
        shape = (B, self.heads, L, self.head_size)
        q, k = q.unsqueeze(1).expand(shape), k.unsqueeze(1).expand(shape)
        return q, k, dict(rope=self.rope, rope_base=self.rope_base, interleaved=True, tril=self.tril,
                          start_bias=start_bias, end_bias=end_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", convention={self.convention!r}"
