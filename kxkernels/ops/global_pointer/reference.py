"""Eager references of GlobalPointer and the ZLPR loss: readable float math, float64-capable.

Sources:
- Su Jianlin, "GlobalPointer: 用统一的方式处理嵌套和非嵌套NER" (2021, kexue.fm/archives/8373) and
  "Efficient GlobalPointer" (2022, kexue.fm/archives/8877): span score
  ``s[b,h,i,j] = scale * R_i q[b,h,i] . R_j k[b,h,j] + start_bias[b,h,i] + end_bias[b,h,j]``.
- Su Jianlin, "将Softmax+交叉熵推广到多标签分类问题" (2020, kexue.fm/archives/7359) and its soft-label
  version (2022, kexue.fm/archives/9064): the multilabel categorical cross-entropy (ZLPR)
  ``log(1 + sum_i (1 - y_i) e^{s_i}) + log(1 + sum_i y_i e^{-s_i})``.

Everything here computes in the dtype it is given (float64 in the tests), materializes the
``(B, H, L, L)`` logits, and is what the kernels are checked against.
"""
from __future__ import annotations

import torch


def rope_cos_sin(L: int, D: int, base: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``(L, D // 2)``: angle ``m * theta_i``, ``theta_i = base ** (-2i / D)``.

    The angle is formed in float32 from the integer position (as the kernels do, API.md RoPE),
    cos / sin are then taken in ``dtype`` (float64 in the tests)."""
    i = torch.arange(D // 2, dtype=torch.float64, device=device)
    theta = (float(base) ** (-2.0 * i / D)).to(torch.float32)
    angle = torch.arange(L, dtype=torch.float32, device=device)[:, None] * theta[None, :]
    angle = angle.to(dtype)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, base: float = 10000.0, interleaved: bool = True) -> torch.Tensor:
    """RoFormer rotation of ``x (B, H, L, D)`` at positions ``arange(L)``: ``a' = a cos - b sin``,
    ``b' = b cos + a sin`` over pairs ``(2i, 2i+1)`` (interleaved) or ``(i, i + D/2)``."""
    L, D = x.shape[-2], x.shape[-1]
    cos, sin = rope_cos_sin(L, D, base, x.dtype, x.device)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def score_mask(B: int, L: int, mask: torch.Tensor | None, tril: bool, device) -> torch.Tensor:
    """bool ``(B, 1, L, L)``: True where the cell (i, j) is scored (both tokens real, and j >= i
    when ``tril``: the lower triangle j < i is masked)."""
    keep = torch.ones(B, 1, L, L, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & mask[:, None, :, None] & mask[:, None, None, :]
    if tril:
        keep = keep & torch.ones(L, L, dtype=torch.bool, device=device).triu()
    return keep


def global_pointer(q: torch.Tensor, k: torch.Tensor, *, mask: torch.Tensor | None = None, rope: bool = True,
                   rope_base: float = 10000.0, interleaved: bool = True, tril: bool = True,
                   scale: float | None = None, start_bias: torch.Tensor | None = None,
                   end_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Span logits ``(B, H, L, L)`` in the dtype of ``q``; masked cells are ``-inf``."""
    B, H, L, D = q.shape
    if scale is None:
        scale = D ** -0.5
    if rope:
        q, k = apply_rope(q, rope_base, interleaved), apply_rope(k, rope_base, interleaved)
    s = scale * torch.matmul(q, k.transpose(-1, -2))
    if start_bias is not None:
        s = s + start_bias[..., :, None].to(s.dtype)
    if end_bias is not None:
        s = s + end_bias[..., None, :].to(s.dtype)
    keep = score_mask(B, L, mask, tril, q.device)
    return s.masked_fill(~keep, float("-inf"))


def _log1p_sum_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_i e^{x_i})`` over the kept entries of the last dim, stable (the 1 is e^0)."""
    x = x.masked_fill(~keep, float("-inf"))
    x = torch.cat((x, torch.zeros_like(x[..., :1])), dim=-1)
    return torch.logsumexp(x, dim=-1)


def multilabel_categorical_crossentropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ZLPR per row (shape ``logits.shape[:-1]``), hard or soft labels in [0, 1].

    ``log(1 + sum_i (1 - y_i) e^{s_i}) + log(1 + sum_i y_i e^{-s_i})``; ``-inf`` logits take part
    in neither sum (whatever their label). The weights enter as ``log y`` added to the exponent,
    so a weight of 0 drops its term exactly."""
    labels = labels.to(logits.dtype)
    finite = logits != float("-inf")
    s = logits.masked_fill(~finite, 0.0)
    neg_w, pos_w = 1 - labels, labels
    neg = _log1p_sum_exp(s + neg_w.log(), finite & (neg_w > 0))
    pos = _log1p_sum_exp(-s + pos_w.log(), finite & (pos_w > 0))
    return neg + pos


def positive_mask(shape, pos_index: torch.Tensor, mask_zero: bool = False) -> torch.Tensor:
    """bool ``shape``: True at the positive classes of ``pos_index (..., P)`` (padding -1, and 0
    when ``mask_zero``); duplicate indices count once."""
    C = shape[-1]
    pad = pos_index < 0
    if mask_zero:
        pad = pad | (pos_index == 0)
    idx = pos_index.masked_fill(pad, C).long()  # padding goes to a spill column, dropped below
    out = torch.zeros(*shape[:-1], C + 1, dtype=torch.bool, device=pos_index.device)
    out.scatter_(-1, idx, True)
    return out[..., :C]


def sparse_multilabel_categorical_crossentropy(logits: torch.Tensor, pos_index: torch.Tensor, *,
                                               mask_zero: bool = False) -> torch.Tensor:
    """ZLPR with positives as indices ``(..., P)``, per row.

    The negative term is ``log(1 + sum over the negatives themselves)``, not bert4keras's
    ``log(1 + sum over all) + log(1 - e^{lse(pos) - lse(all)})``, so it never cancels and the
    loss is never negative. With ``mask_zero`` index 0 is padding and class 0 is in neither set
    (as bert4keras's ``mask_zero=True``, where class 0 is a dummy)."""
    pos = positive_mask(logits.shape, pos_index, mask_zero)
    finite = logits != float("-inf")
    keep = finite.clone()
    if mask_zero:
        keep[..., 0] = False
    s = logits.masked_fill(~finite, 0.0)
    return _log1p_sum_exp(s, keep & ~pos) + _log1p_sum_exp(-s, keep & pos)


def sparse_multilabel_categorical_crossentropy_bert4keras(logits: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
    """bert4keras's formula (``mask_zero=False``, no padding), with its ``log(1 - e^{b-a})``
    cancellation and the clip at ``1e-7``: kept only so a test can show it going negative."""
    zeros = torch.zeros_like(logits[..., :1])
    y = torch.cat((logits, zeros), dim=-1)
    pos2 = torch.gather(y, -1, pos_index.long())
    pos1 = torch.cat((pos2, zeros), dim=-1)
    pos_loss = torch.logsumexp(-pos1, dim=-1)
    all_loss = torch.logsumexp(y, dim=-1)
    aux = torch.logsumexp(pos2, dim=-1) - all_loss
    aux = torch.clamp(1 - torch.exp(aux), 1e-7, 1)
    return pos_loss + all_loss + torch.log(aux)


def spans_to_labels(spans: torch.Tensor, L: int) -> torch.Tensor:
    """Dense hard labels ``(B, H, L, L)`` (dtype bool) from ``spans (B, H, P, 2)``, padding -1."""
    B, H, P, _ = spans.shape
    valid = (spans[..., 0] >= 0) & (spans[..., 1] >= 0)
    cell = (spans[..., 0] * L + spans[..., 1]).masked_fill(~valid, L * L).long()
    out = torch.zeros(B, H, L * L + 1, dtype=torch.bool, device=spans.device)
    out.scatter_(-1, cell, True)
    return out[..., : L * L].reshape(B, H, L, L)


def reduce_rows(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def global_pointer_loss(q: torch.Tensor, k: torch.Tensor, spans: torch.Tensor, *, mask=None, rope=True,
                        rope_base=10000.0, interleaved=True, tril=True, scale=None, start_bias=None,
                        end_bias=None, reduction: str = "mean") -> torch.Tensor:
    """bert4keras's ``global_pointer_crossentropy``: one ZLPR row per (batch, head) over the
    ``L * L`` cells, then the mean over the ``B * H`` rows (``reduction="none"``: ``(B, H)``)."""
    logits = global_pointer(q, k, mask=mask, rope=rope, rope_base=rope_base, interleaved=interleaved,
                            tril=tril, scale=scale, start_bias=start_bias, end_bias=end_bias)
    B, H, L, _ = logits.shape
    labels = spans_to_labels(spans, L)
    loss = multilabel_categorical_crossentropy(logits.reshape(B, H, L * L), labels.reshape(B, H, L * L))
    return reduce_rows(loss, reduction)


def decode_spans(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """int64 ``(N, 4)`` rows ``(batch, head, start, end)`` of the cells with score > threshold,
    in row-major order."""
    return torch.nonzero(logits > threshold)
