"""CausalLinearAttention: a causal self-attention block (projections + kxkernels.causal_linear_attention)
that also runs as an RNN, one token (or one chunk) at a time, with a carried state."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from kxkernels.ops.linear_attention import FEATURE_MAPS, causal_linear_attention


class LinearAttentionState(NamedTuple):
    """What a decode step carries: ``S (B, H, Dk, Dv)`` and ``z (B, H, Dk)`` float32, and the number
    of positions already consumed (the RoPE position of the next token)."""
    S: torch.Tensor
    z: torch.Tensor
    position: int


class CausalLinearAttention(nn.Module):
    """Drop-in causal self-attention with linear attention (Katharopoulos et al. 2020; Su Jianlin,
    "线性Attention的探索", 2020), optionally with RoPE on the numerator (Su, "Transformer升级之路：2").

    ``forward(hidden (B, L, hidden_size), key_padding_mask=None, state=None)``: q, k, v projections,
    ``kxkernels.causal_linear_attention`` per head (head dim ``hidden_size // num_heads``), output
    projection. Without ``state`` it returns ``(B, L, hidden_size)``; with a state (start from
    :meth:`empty_state`) it returns ``(out, new_state)``, so a prompt can be prefilled in one call and
    then decoded token by token with the same result as one long call.

    Args:
        hidden_size (int): model width, divisible by ``num_heads``.
        num_heads (int): attention heads.
        feature_map (str): ``"elu+1"`` or ``"relu"`` (normalized attention).
        rope (bool): rotate the numerator's features by position (RoFormer RoPE; even head dim).
        eps (float), rope_base (float), interleaved (bool), bias (bool): passed on / for the projections.

    Raises:
        ValueError: ``hidden_size`` not divisible by ``num_heads``, an unknown or unnormalizable feature map.

    Examples::
        >>> import torch
        >>> from kxkernels.nn import CausalLinearAttention
        >>> layer = CausalLinearAttention(64, 4, rope=True)
        >>> h = torch.randn(2, 10, 64)
        >>> full = layer(h)
        >>> out, state = layer(h[:, :7], state=layer.empty_state(2))
        >>> steps = [out]
        >>> for t in range(7, 10):
        ...     o, state = layer(h[:, t:t + 1], state=state)
        ...     steps.append(o)
        >>> torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        True
    """

    def __init__(self, hidden_size: int, num_heads: int, feature_map: str = "elu+1", rope: bool = False, *,
                 eps: float = 1e-6, rope_base: float = 10000.0, interleaved: bool = True, bias: bool = True):
        super().__init__()
        if hidden_size <= 0 or num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        if feature_map not in FEATURE_MAPS or feature_map == "identity":
            raise ValueError(f"feature_map must be 'elu+1' or 'relu' (normalized attention), got {feature_map!r}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        if rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head dim, got {self.head_dim}")
        self.feature_map, self.rope, self.eps = feature_map, rope, eps
        self.rope_base, self.interleaved = rope_base, interleaved
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)

    def empty_state(self, batch_size: int, device=None) -> LinearAttentionState:
        """Zero state at position 0, float32 (float64 for a float64 module)."""
        w = self.qkv.weight
        device = device if device is not None else w.device
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        H, D = self.num_heads, self.head_dim
        return LinearAttentionState(torch.zeros(batch_size, H, D, D, device=device, dtype=dtype),
                                    torch.zeros(batch_size, H, D, device=device, dtype=dtype), 0)

    def forward(self, hidden: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                state: Optional[LinearAttentionState] = None):
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be (B, L, {self.hidden_size}), got {tuple(hidden.shape)}")
        B, L, _ = hidden.shape
        # (B, L, 3, H, D) -> three (B, H, L, D) views: no copy, the op takes strides
        q, k, v = self.qkv(hidden).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kw = dict(feature_map=self.feature_map, eps=self.eps, rope=self.rope, rope_base=self.rope_base,
                  interleaved=self.interleaved, key_padding_mask=key_padding_mask)
        if state is None:
            o = causal_linear_attention(q, k, v, **kw)
        else:
            o, (S, z) = causal_linear_attention(q, k, v, positions=state.position, initial_state=(state.S, state.z),
                                                return_final_state=True, **kw)
        o = self.out(o.transpose(1, 2).reshape(B, L, self.hidden_size))
        return o if state is None else (o, LinearAttentionState(S, z, state.position + L))
