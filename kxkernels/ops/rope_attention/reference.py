"""Eager references for RoPE and RoPE attention: rotate q and k, then plain softmax attention.

Math runs in the input dtype (float64 inputs give the float64 reference; bfloat16 inputs give
what eager PyTorch does in bfloat16, the baseline of the low-precision accuracy rule). Angles are
float32 products ``position * theta_i`` as in the kernels; cos/sin are then taken in float64 and
cast to the input dtype. Source: Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding" (2021), eq. 34.
"""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float = 10000.0):
    """cos and sin of ``positions * theta_i``, ``theta_i = base ** (-2i / rotary_dim)``.

    Args:
        positions (torch.Tensor): int tensor of any shape ``[...]``.
    Returns:
        (cos, sin): float64 tensors ``[..., rotary_dim // 2]``; the angle is rounded to float32 first.
    """
    i = torch.arange(rotary_dim // 2, dtype=torch.float64, device=positions.device)
    theta = (float(base) ** (-2.0 * i / rotary_dim)).to(torch.float32)
    ang = (positions.to(torch.float32)[..., None] * theta).to(torch.float64)
    return ang.cos(), ang.sin()


def _positions(positions, batch: int, length: int, default_offset: int, device) -> torch.Tensor:
    if positions is None:
        positions = default_offset
    if isinstance(positions, int):
        return (positions + torch.arange(length, device=device)).expand(batch, length)
    p = positions.to(device=device, dtype=torch.int64)
    return p.expand(batch, length) if p.dim() == 1 else p


def apply_rope(x: torch.Tensor, *, positions=None, base: float = 10000.0, interleaved: bool = True,
               rotary_dim: int | None = None, inverse: bool = False) -> torch.Tensor:
    """RoPE of ``x [B, H, L, D]``: pair ``(a, b)`` -> ``(a cos - b sin, b cos + a sin)``.

    ``interleaved`` pairs channels ``(2i, 2i+1)`` (RoFormer), else ``(i, i + rotary_dim/2)``
    (GPT-NeoX / LLaMA). Channels past ``rotary_dim`` pass through; ``inverse`` rotates by the
    negative angle. ``positions``: None (``arange(L)``), an int offset, int ``(L,)`` or ``(B, L)``.
    """
    B, _, L, D = x.shape
    rd = D if rotary_dim is None else rotary_dim
    pos = _positions(positions, B, L, 0, x.device)
    cos, sin = rope_cos_sin(pos, rd, base)  # (B, L, rd/2)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    if inverse:
        sin = -sin
    xr, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = xr[..., : rd // 2], xr[..., rd // 2:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   key_padding_mask: torch.Tensor | None = None, scale: float | None = None, rope: bool = True,
                   rope_base: float = 10000.0, interleaved: bool = True, rotary_dim: int | None = None,
                   q_positions=None, k_positions=None) -> torch.Tensor:
    """``softmax(scale * R(q) R(k)^T + masks) v`` materializing the ``Lq x Lk`` scores.

    ``q [B, Hq, Lq, D]``, ``k [B, Hk, Lk, D]``, ``v [B, Hk, Lk, Dv]``, ``Hq % Hk == 0`` (GQA);
    ``key_padding_mask`` bool ``[B, Lk]`` (True = keep); causal is bottom-right aligned (query i
    sees keys ``j <= i + Lk - Lq``); default positions ``k: arange(Lk)``, ``q: Lk - Lq + arange(Lq)``.
    Fully masked rows give 0.
    """
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = D ** -0.5
    if rope:
        qp = _positions(q_positions, B, Lq, Lk - Lq, q.device)
        kp = _positions(k_positions, B, Lk, 0, q.device)
        q = apply_rope(q, positions=qp, base=rope_base, interleaved=interleaved, rotary_dim=rotary_dim)
        k = apply_rope(k, positions=kp, base=rope_base, interleaved=interleaved, rotary_dim=rotary_dim)
    g = Hq // Hk
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    keep = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        keep = keep & (j <= i + Lk - Lq)
    any_key = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf"))
    s = torch.where(any_key, s, torch.zeros((), dtype=s.dtype, device=s.device))  # no NaN rows
    p = torch.softmax(s, dim=-1) * any_key
    return p @ v
