"""Eager references for (causal) linear attention, readable first; any float dtype (float64 for tests).

Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention"; Su Jianlin, "线性Attention的探索：Attention必须有个Softmax吗？",
2020) replaces ``softmax(q k^T) v`` by a feature map ``phi``::

    out_i = phi~(q_i)^T S_i / (phi(q_i)^T z_i + eps)
    S_i = S_0 + sum_{j <= i} phi~(k_j) v_j^T          (Dk x Dv)
    z_i = z_0 + sum_{j <= i} phi(k_j)                  (Dk)

with ``phi~ = RoPE(phi(.))`` when ``rope`` (Su, "Transformer升级之路：2、博采众长的旋转式位置编码",
2021: rotate the numerator's features, keep the denominator unrotated so it stays positive), and a
denominator of 1 without ``normalize``. Padded keys (mask False) enter neither sum.

Three forms of the same math:
- :func:`causal_linear_attention_recurrent`: the RNN, one position at a time (the ground truth).
- :func:`causal_linear_attention_cumsum`: materializes the ``(B, H, L, Dk, Dv)`` cumulative sum.
- :func:`causal_linear_attention_quadratic`: the ``(L, L)`` masked product ``tril(q~ k~^T) v``.

RoPE angles are ``m * theta_i`` computed in float32 (``theta_i = base ** (-2i / Dk)`` rounded to
float32, ``m`` the integer position), as in the kernels; the rotation itself runs in the input dtype.
"""
from __future__ import annotations

import torch

FEATURE_MAPS = ("elu+1", "relu", "identity")


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "elu+1":
        return torch.nn.functional.elu(x) + 1
    if name == "relu":
        return torch.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def positions_tensor(positions, batch: int, length: int) -> torch.Tensor:
    """Integer positions as a (P, L) int64 tensor, P = 1 or batch."""
    if positions is None:
        positions = 0
    if isinstance(positions, int):
        return (positions + torch.arange(length, dtype=torch.int64))[None]
    p = positions.to(torch.int64).cpu()
    return p[None] if p.dim() == 1 else p


def rope_cos_sin(positions, batch: int, length: int, dim: int, base: float = 10000.0):
    """cos, sin of the angles ``m * theta_i`` (float32 angles), each (P, 1, L, dim // 2), float64."""
    theta = (base ** (-2.0 * torch.arange(dim // 2, dtype=torch.float64) / dim)).to(torch.float32)
    m = positions_tensor(positions, batch, length).to(torch.float32)
    angle = (m[..., None] * theta).double()  # float32 product, then exact cos / sin
    return torch.cos(angle)[:, None], torch.sin(angle)[:, None]


def apply_rope(x: torch.Tensor, positions=None, base: float = 10000.0, interleaved: bool = True) -> torch.Tensor:
    """RoFormer rotation of ``x`` (B, H, L, D): pairs (2i, 2i+1) if interleaved else (i, i + D/2)."""
    B, _, L, D = x.shape
    cos, sin = rope_cos_sin(positions, B, L, D, base)
    cos, sin = cos.to(x.dtype).to(x.device), sin.to(x.dtype).to(x.device)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    h = D // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _features(q, k, feature_map_name, rope, rope_base, interleaved, positions, key_padding_mask):
    """(phi(q), phi~(q), phi(k), phi~(k)) with padded keys zeroed."""
    fq, fk = feature_map(q, feature_map_name), feature_map(k, feature_map_name)
    if key_padding_mask is not None:
        fk = fk * key_padding_mask[:, None, :, None].to(fk.dtype)
    if rope:
        return fq, apply_rope(fq, positions, rope_base, interleaved), fk, apply_rope(fk, positions, rope_base,
                                                                                     interleaved)
    return fq, fq, fk, fk


def _check(feature_map_name, normalize):
    if feature_map_name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map_name!r}")
    if feature_map_name == "identity" and normalize:
        raise ValueError("feature_map='identity' requires normalize=False")


def causal_linear_attention_recurrent(
        q, k, v, *, feature_map: str = "elu+1", normalize: bool = True, eps: float = 1e-6, rope: bool = False,
        rope_base: float = 10000.0, interleaved: bool = True, positions=None, key_padding_mask=None,
        initial_state=None, return_final_state: bool = False):
    """The RNN form: S and z updated one position at a time, in the dtype of q (float64 in tests)."""
    _check(feature_map, normalize)
    fq, rq, fk, rk = _features(q, k, feature_map, rope, rope_base, interleaved, positions, key_padding_mask)
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    if initial_state is None:
        S = q.new_zeros(B, H, Dk, Dv)
        z = q.new_zeros(B, H, Dk)
    else:
        S, z = initial_state[0].to(q.dtype), initial_state[1].to(q.dtype)
    outs = []
    for i in range(L):
        S = S + rk[:, :, i, :, None] * v[:, :, i, None, :]
        z = z + fk[:, :, i]
        num = torch.einsum("bhd,bhde->bhe", rq[:, :, i], S)
        if normalize:
            num = num / ((fq[:, :, i] * z).sum(-1, keepdim=True) + eps)
        outs.append(num)
    out = torch.stack(outs, dim=2)
    return (out, (S, z)) if return_final_state else out


def causal_linear_attention_cumsum(
        q, k, v, *, feature_map: str = "elu+1", normalize: bool = True, eps: float = 1e-6, rope: bool = False,
        rope_base: float = 10000.0, interleaved: bool = True, positions=None, key_padding_mask=None,
        initial_state=None, return_final_state: bool = False):
    """The naive vectorized form: ``torch.cumsum`` over the (B, H, L, Dk, Dv) outer products."""
    _check(feature_map, normalize)
    fq, rq, fk, rk = _features(q, k, feature_map, rope, rope_base, interleaved, positions, key_padding_mask)
    S = torch.cumsum(rk[..., :, None] * v[..., None, :], dim=2)  # (B, H, L, Dk, Dv)
    z = torch.cumsum(fk, dim=2)
    if initial_state is not None:
        S = S + initial_state[0].to(q.dtype)[:, :, None]
        z = z + initial_state[1].to(q.dtype)[:, :, None]
    out = torch.einsum("bhld,bhlde->bhle", rq, S)
    if normalize:
        out = out / ((fq * z).sum(-1, keepdim=True) + eps)
    return (out, (S[:, :, -1], z[:, :, -1])) if return_final_state else out


def causal_linear_attention_quadratic(
        q, k, v, *, feature_map: str = "elu+1", normalize: bool = True, eps: float = 1e-6, rope: bool = False,
        rope_base: float = 10000.0, interleaved: bool = True, positions=None, key_padding_mask=None):
    """The attention-matrix form: ``tril(phi~(q) phi~(k)^T) v / (tril(phi(q) phi(k)^T) 1 + eps)``."""
    _check(feature_map, normalize)
    fq, rq, fk, rk = _features(q, k, feature_map, rope, rope_base, interleaved, positions, key_padding_mask)
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    a = (rq @ rk.transpose(-1, -2)).masked_fill(~causal, 0)
    out = a @ v
    if normalize:
        out = out / ((fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0).sum(-1, keepdim=True) + eps)
    return out


def linear_attention(q, k, v, *, feature_map: str = "elu+1", normalize: bool = True, eps: float = 1e-6,
                     rope: bool = False, rope_base: float = 10000.0, interleaved: bool = True, positions=None,
                     key_padding_mask=None):
    """Non-causal: ``phi~(q) (phi~(k)^T v) / (phi(q) . sum_j phi(k_j) + eps)``."""
    _check(feature_map, normalize)
    fq, rq, fk, rk = _features(q, k, feature_map, rope, rope_base, interleaved, positions, key_padding_mask)
    out = rq @ (rk.transpose(-1, -2) @ v)
    if normalize:
        out = out / ((fq * fk.sum(2, keepdim=True)).sum(-1, keepdim=True) + eps)
    return out


def causal_linear_attention_chunked(q, k, v, *, chunk: int = 64, **kwargs):
    """The chunked algorithm of the kernels in eager torch (masked chunk products + carried state);
    same keywords as :func:`causal_linear_attention_recurrent`. A GPU baseline where no peer runs."""
    return_final_state = kwargs.pop("return_final_state", False)
    initial_state = kwargs.pop("initial_state", None)
    feature_map_name = kwargs.get("feature_map", "elu+1")
    normalize, eps = kwargs.get("normalize", True), kwargs.get("eps", 1e-6)
    _check(feature_map_name, normalize)
    fq, rq, fk, rk = _features(q, k, feature_map_name, kwargs.get("rope", False), kwargs.get("rope_base", 10000.0),
                               kwargs.get("interleaved", True), kwargs.get("positions"),
                               kwargs.get("key_padding_mask"))
    B, H, L, Dk = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is None:
        S = torch.zeros(B, H, Dk, v.shape[-1], dtype=acc, device=q.device)
        z = torch.zeros(B, H, Dk, dtype=acc, device=q.device)
    else:
        S, z = initial_state[0].to(acc), initial_state[1].to(acc)
    outs = []
    for t0 in range(0, L, chunk):
        sl = slice(t0, min(L, t0 + chunk))
        cq, ck, cv = rq[:, :, sl].to(acc), rk[:, :, sl].to(acc), v[:, :, sl].to(acc)
        n = cq.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        num = cq @ S + (cq @ ck.transpose(-1, -2)).masked_fill(~causal, 0) @ cv
        zc = z[:, :, None] + torch.cumsum(fk[:, :, sl].to(acc), dim=2)
        if normalize:
            num = num / ((fq[:, :, sl].to(acc) * zc).sum(-1, keepdim=True) + eps)
        outs.append(num.to(q.dtype))
        S = S + ck.transpose(-1, -2) @ cv
        z = zc[:, :, -1]
    out = torch.cat(outs, dim=2)
    return (out, (S, z)) if return_final_state else out

