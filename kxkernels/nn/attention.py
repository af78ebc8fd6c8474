"""Multi-head self-attention with RoPE over the fused ``kxkernels.rope_attention`` op.

Source: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021,
arXiv:2104.09864): queries and keys of head size ``d`` are rotated by position (pairs
``(2i, 2i+1)`` when ``interleaved``, else ``(i, i + d/2)``; ``theta_i = rope_base ** (-2i / d)``)
so that ``softmax(R(q) R(k)^T / sqrt(d)) v`` depends on relative positions only. The rotation,
the masks and the softmax run inside one kernel (flash-attention style, memory O(L)), forward
and backward, on CPU (C++) and CUDA (Triton).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

import kxkernels
from kxkernels._checks import check_bool_tensor, check_floating


def _check_size(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return int(v)


class RoPEAttention(nn.Module):
    """Self-attention block with rotary positions: ``o_proj(rope_attention(q_proj x, k_proj x, v_proj x))``.

    A drop-in for the attention of a Transformer block; grouped-query attention when
    ``num_kv_heads < num_heads`` (each k/v head serves ``num_heads // num_kv_heads`` query heads).

    Args:
        hidden_size (int): model width; ``head_dim = hidden_size // num_heads`` must be even.
        num_heads (int): query heads, dividing ``hidden_size``.
        num_kv_heads (int, optional): key/value heads, dividing ``num_heads`` (default ``num_heads``).
        causal (bool): each position attends to itself and earlier positions only.
        rope_base (float): RoPE base (> 0).
        interleaved (bool): RoFormer pairing ``(2i, 2i+1)`` if True, GPT-NeoX/LLaMA ``(i, i + d/2)`` if False.
        bias (bool): biases in the four projections.

    Shapes:
        ``forward(hidden (B, L, hidden_size), key_padding_mask=None (B, L) bool, True = real token)
        -> (B, L, hidden_size)`` in hidden's dtype. A row whose keys are all padding gives 0 before
        ``o_proj`` (the output is then ``o_proj``'s bias).

    Raises:
        TypeError / ValueError: non-int or non-dividing sizes, odd head_dim, a bad hidden or mask.

    Examples::
        >>> import torch, kxkernels.nn
        >>> attn = kxkernels.nn.RoPEAttention(64, num_heads=4, num_kv_heads=2, causal=True)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 causal: bool = False, rope_base: float = 10000.0, interleaved: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        hidden_size = _check_size(hidden_size, "hidden_size")
        num_heads = _check_size(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else _check_size(num_kv_heads, "num_kv_heads")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim = hidden_size // num_heads = {head_dim} must be even for RoPE")
        if not isinstance(rope_base, numbers.Real) or isinstance(rope_base, bool) or not rope_base > 0:
            raise ValueError(f"rope_base must be a number > 0, got {rope_base!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.causal, self.rope_base, self.interleaved = bool(causal), float(rope_base), bool(interleaved)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, causal={self.causal}, rope_base={self.rope_base}, "
                f"interleaved={self.interleaved}")

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, heads, self.head_dim).transpose(1, 2)  # a strided view, no copy

    def forward(self, hidden: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_floating(hidden, "hidden")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (B, L, hidden_size={self.hidden_size}), "
                             f"got {tuple(hidden.shape)}")
        b, length, _ = hidden.shape
        if key_padding_mask is not None:
            check_bool_tensor(key_padding_mask, "key_padding_mask")
            if tuple(key_padding_mask.shape) != (b, length):
                raise ValueError(f"key_padding_mask must have shape ({b}, {length}), got "
                                 f"{tuple(key_padding_mask.shape)}")
        q = self._heads(self.q_proj(hidden), self.num_heads)
        k = self._heads(self.k_proj(hidden), self.num_kv_heads)
        v = self._heads(self.v_proj(hidden), self.num_kv_heads)
        out = kxkernels.rope_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                       rope_base=self.rope_base, interleaved=self.interleaved)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))
