"""RoPE and fused RoPE attention: public functions, op registration, fake kernels, autograd.

CPU tensors run the C++ kernels in csrc/cpu/rope_attention.cpp (+ rope_attention_kernels.h);
CUDA tensors run the Triton kernels in ./triton.py. The eager reference is ./reference.py.
"""
from __future__ import annotations

import torch

from kxkernels import _backend, _extension  # noqa: F401  (loads the schemas)
from kxkernels._checks import (check_bool_tensor, check_finite_number, check_floating, check_positive,
                               check_rank, check_same_device, resolve_positions, resolve_rotary_dim)

_ops = torch.ops.kxkernels

for _op in ("apply_rope", "rope_attention"):
    _backend.register(_op, "cpu", "cpp", lambda: None)
    _backend.register(_op, "cuda", "triton", _backend.triton_unavailable)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels (shapes and dtypes only, laid out like the real outputs) -------------------
@torch.library.register_fake("kxkernels::apply_rope_fwd")
def _(x, positions, offset, base, interleaved, rotary_dim, inverse):
    return x.new_empty(x.shape)


@torch.library.register_fake("kxkernels::rope_attention_fwd")
def _(q, k, v, key_padding_mask, q_positions, k_positions, causal, scale, rope, rope_base, interleaved,
      rotary_dim):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[-1])), q.new_empty((B, Hq, Lq), dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("kxkernels::rope_attention_bwd")
def _(grad_out, q, k, v, out, lse, key_padding_mask, q_positions, k_positions, causal, scale, rope, rope_base,
      interleaved, rotary_dim):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---- autograd: the backward of each forward op is itself a registered op ----------------------
def _rope_setup(ctx, inputs, output):
    x, positions, offset, base, interleaved, rotary_dim, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.args = (offset, base, interleaved, rotary_dim, inverse)


def _rope_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    offset, base, interleaved, rotary_dim, inverse = ctx.args
    # R is orthogonal: the gradient is the rotation by the negative angle.
    gx = _ops.apply_rope_fwd(grad, positions, offset, base, interleaved, rotary_dim, not inverse)
    return gx, None, None, None, None, None, None


torch.library.register_autograd("kxkernels::apply_rope_fwd", _rope_backward, setup_context=_rope_setup)


def _attn_setup(ctx, inputs, output):
    q, k, v, mask, q_positions, k_positions, causal, scale, rope, rope_base, interleaved, rotary_dim = inputs
    out, lse = output
    # q and k are saved as given: the backward recomputes their rotation tile by tile.
    ctx.save_for_backward(q, k, v, out, lse, mask, q_positions, k_positions)
    ctx.args = (causal, scale, rope, rope_base, interleaved, rotary_dim)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, q_positions, k_positions = ctx.saved_tensors
    dq, dk, dv = _ops.rope_attention_bwd(grad_out, q, k, v, out, lse, mask, q_positions, k_positions, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("kxkernels::rope_attention_fwd", _attn_backward, setup_context=_attn_setup)


# ---- CUDA tensors: Triton kernels (imported on first use) -------------------------------------
def _triton_apply_rope(*args):
    from kxkernels.ops.rope_attention import triton as tk

    return tk.apply_rope_forward(*args)


def _triton_attention_fwd(*args):
    from kxkernels.ops.rope_attention import triton as tk

    return tk.rope_attention_forward(*args)


def _triton_attention_bwd(*args):
    from kxkernels.ops.rope_attention import triton as tk

    return tk.rope_attention_backward(*args)


if _backend.triton_unavailable() in (None, "no CUDA device"):
    torch.library.register_kernel("kxkernels::apply_rope_fwd", "cuda", _triton_apply_rope)
    torch.library.register_kernel("kxkernels::rope_attention_fwd", "cuda", _triton_attention_fwd)
    torch.library.register_kernel("kxkernels::rope_attention_bwd", "cuda", _triton_attention_bwd)


# ---- public functions ---------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, *, positions=None, base: float = 10000.0, interleaved: bool = True,
               rotary_dim: int | None = None) -> torch.Tensor:
    """Rotary position embedding (RoPE) of ``x``, fused in one pass.

    Source: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021);
    Su Jianlin, "Transformer升级之路:2、博采众长的旋转式位置编码" (kexue.fm, 2021).
    ``theta_i = base ** (-2i / rotary_dim)``; each channel pair ``(a, b)`` at position ``m`` becomes
    ``(a cos(m theta_i) - b sin(m theta_i), b cos(m theta_i) + a sin(m theta_i))``. Angles are
    float32 products of the integer positions, computed in the kernel. The gradient is the rotation
    by the negative angle.

    Args:
        x (torch.Tensor): ``[B, H, L, D]``, float32/float16/bfloat16 (float64 on CPU), any strides.
        positions: None (``arange(L)``), an int offset (``offset + arange(L)``), or an int tensor
            ``[L]`` or ``[B, L]``.
        base (float): the RoPE base, > 0.
        interleaved (bool): pair channels ``(2i, 2i+1)`` (RoFormer, bert4keras, GlobalPointer) when
            True, ``(i, i + rotary_dim/2)`` (GPT-NeoX / LLaMA) when False.
        rotary_dim (int): rotated channels (even, ``<= D``; default ``D``); the rest pass through.

    Returns:
        torch.Tensor: ``[B, H, L, D]``, dtype of ``x``, contiguous.

    Raises:
        TypeError: non-floating ``x``, non-integer positions, wrong argument types.
        ValueError: wrong rank, odd ``D`` (or odd / too large ``rotary_dim``), positions of the
            wrong length or shape or device, ``base <= 0``.

    Examples::
        >>> import torch, kxkernels
        >>> x = torch.randn(2, 4, 16, 64)
        >>> y = kxkernels.apply_rope(x)
        >>> torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps norms
        True
    """
    check_floating(x, "x")
    check_rank(x, 4, "x", "(batch, heads, seq_len, head_dim)")
    B, _, L, D = x.shape
    rd = resolve_rotary_dim(rotary_dim, D)
    check_positive(base, "base")
    check_finite_number(base, "base")
    pos, offset = resolve_positions(positions, B, L, x.device, "positions")
    return _ops.apply_rope_fwd(x, pos, offset, float(base), bool(interleaved), rd, False)


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   key_padding_mask: torch.Tensor | None = None, scale: float | None = None, rope: bool = True,
                   rope_base: float = 10000.0, interleaved: bool = True, rotary_dim: int | None = None,
                   q_positions=None, k_positions=None) -> torch.Tensor:
    """Fused RoPE attention: ``softmax(scale * R(q) R(k)^T + masks) v`` without the ``Lq x Lk`` matrix.

    Sources: RoPE from Su et al., "RoFormer" (2021); the blockwise online softmax and the backward
    that recomputes the scores from the saved log-sum-exp from Dao et al., "FlashAttention" (2022)
    and "FlashAttention-2" (2023). q and k are rotated inside the kernels as their tiles are
    loaded; the backward recomputes the rotated tiles (no rotated copy of q or k is saved) and
    rotates dq, dk back. Memory O(L).

    Args:
        q (torch.Tensor): queries ``[B, Hq, Lq, D]``, float32/float16/bfloat16 (float64 on CPU).
        k (torch.Tensor): keys ``[B, Hk, Lk, D]``, ``Hq % Hk == 0`` (GQA / MQA), q's dtype.
        v (torch.Tensor): values ``[B, Hk, Lk, Dv]``, q's dtype.
        causal (bool): bottom-right aligned: query ``i`` sees keys ``j <= i + Lk - Lq``.
        key_padding_mask (torch.Tensor): bool ``[B, Lk]``, True = a real token.
        scale (float): score scale, default ``D ** -0.5``.
        rope (bool): rotate q and k (False: plain attention).
        rope_base (float): the RoPE base, > 0.
        interleaved (bool): pairs ``(2i, 2i+1)`` (RoFormer) or ``(i, i + rotary_dim/2)`` (NeoX / LLaMA).
        rotary_dim (int): rotated channels, even, ``<= D`` (default ``D``).
        q_positions, k_positions: int tensors ``[L]`` or ``[B, L]``, or an int offset; defaults
            ``k: arange(Lk)``, ``q: Lk - Lq + arange(Lq)``.

    Returns:
        torch.Tensor: ``[B, Hq, Lq, Dv]`` in q's dtype; rows with no visible key are 0 (and get
        zero gradients).

    Raises:
        TypeError: non-floating or mixed dtypes, a non-bool mask, non-integer positions.
        ValueError: wrong ranks, mismatched batch / head_dim / lengths, ``Hq % Hk != 0``, mask or
            positions of the wrong shape, odd head_dim or rotary_dim with RoPE, non-finite scale.

    Examples::
        >>> import torch, kxkernels
        >>> q, k, v = (torch.randn(2, 4, 32, 64, requires_grad=True) for _ in range(3))
        >>> out = kxkernels.rope_attention(q, k, v, causal=True)
        >>> out.shape
        torch.Size([2, 4, 32, 64])
        >>> out.sum().backward()
    """
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        check_floating(t, n)
        check_rank(t, 4, n, "(batch, heads, seq_len, head_dim)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q, k, "q", "k")
    check_same_device(q, v, "q", "v")
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must have one batch size, got {B}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k head_dim must equal q head_dim {D}, got {k.shape[3]}")
    if v.shape[1] != Hk or v.shape[2] != Lk:
        raise ValueError(f"v must have k's heads and length ({Hk}, {Lk}) on dims 1, 2, got shape {tuple(v.shape)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({Hk}) (GQA / MQA)")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be > 0, got q/k {D} and v {v.shape[3]}")
    if key_padding_mask is not None:
        check_bool_tensor(key_padding_mask, "key_padding_mask")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape ({B}, {Lk}) (batch, key_len), "
                             f"got {tuple(key_padding_mask.shape)}")
        check_same_device(q, key_padding_mask, "q", "key_padding_mask")
    scale = D ** -0.5 if scale is None else scale
    check_finite_number(scale, "scale")
    rd = 0
    qp = kp = None
    if rope:
        rd = resolve_rotary_dim(rotary_dim, D)
        check_positive(rope_base, "rope_base")
        check_finite_number(rope_base, "rope_base")
        qp, qoff = resolve_positions(q_positions, B, Lq, q.device, "q_positions")
        kp, koff = resolve_positions(k_positions, B, Lk, q.device, "k_positions")
        # An int offset becomes an explicit position tensor (the op's None means the default).
        if qp is None and q_positions is not None:
            qp = (qoff + torch.arange(Lq, device=q.device)).expand(B, Lq)
        if kp is None and k_positions is not None:
            kp = (koff + torch.arange(Lk, device=q.device)).expand(B, Lk)
    out, _ = _ops.rope_attention_fwd(q, k, v, key_padding_mask, qp, kp, bool(causal), float(scale), bool(rope),
                                     float(rope_base), bool(interleaved), rd)
    return out
