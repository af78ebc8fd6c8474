"""Causal and non-causal linear attention (cumulative-sum form): public functions, op registration,
fake kernels, autograd.

CPU tensors run the C++ kernels in csrc/cpu/linear_attention.cpp; CUDA tensors run the Triton
kernels in ./triton.py. The eager references (recurrent, cumsum, quadratic, chunked) are ./reference.py.
"""
from __future__ import annotations

import math
import numbers

import torch

from kxkernels import _backend, _extension  # noqa: F401  (loads the schemas)
from kxkernels._checks import check_bool_tensor, check_floating, check_integer_tensor, check_tensor

_ops = torch.ops.kxkernels
FEATURE_MAPS = ("elu+1", "relu", "identity")

for _op in ("causal_linear_attention", "linear_attention"):
    _backend.register(_op, "cpu", "cpp", lambda: None)
    _backend.register(_op, "cuda", "triton", _backend.triton_unavailable)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels (shapes and dtypes only, laid out like the real outputs) -------------------
@torch.library.register_fake("kxkernels::causal_linear_attention_fwd")
def _(q, k, v, feature_map, normalize, eps, rope, rope_base, interleaved, positions, pos_offset,
      key_padding_mask, initial_S, initial_z):
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((B, H, L, Dv)), q.new_empty((B, H, L if normalize else 0), dtype=acc),
            q.new_empty((B, H, Dk, Dv), dtype=acc), q.new_empty((B, H, Dk), dtype=acc))


@torch.library.register_fake("kxkernels::causal_linear_attention_bwd")
def _(grad_out, grad_S, grad_z, q, k, v, out, den, feature_map, normalize, eps, rope, rope_base,
      interleaved, positions, pos_offset, key_padding_mask, initial_S, initial_z):
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((B, H, L, Dk)), q.new_empty((B, H, L, Dk)), q.new_empty((B, H, L, Dv)),
            q.new_empty((B, H, Dk, Dv), dtype=acc), q.new_empty((B, H, Dk), dtype=acc))


@torch.library.register_fake("kxkernels::linear_attention_fwd")
def _(q, k, v, feature_map, normalize, eps, rope, rope_base, interleaved, positions, pos_offset,
      key_padding_mask):
    B, H, L, _ = q.shape
    return (q.new_empty((B, H, L, v.shape[-1])),
            q.new_empty((B, H, L if normalize else 0), dtype=_acc_dtype(q.dtype)))


@torch.library.register_fake("kxkernels::linear_attention_bwd")
def _(grad_out, q, k, v, out, den, feature_map, normalize, eps, rope, rope_base, interleaved, positions,
      pos_offset, key_padding_mask):
    B, H, L, Dk = q.shape
    return q.new_empty((B, H, L, Dk)), q.new_empty((B, H, L, Dk)), q.new_empty((B, H, L, v.shape[-1]))


# ---- autograd: the backward of each forward op is its own registered op -----------------------
_SCALARS = ("feature_map", "normalize", "eps", "rope", "rope_base", "interleaved")


def _causal_setup(ctx, inputs, output):
    (q, k, v, feature_map, normalize, eps, rope, rope_base, interleaved, positions, pos_offset, mask,
     S0, z0) = inputs
    out, den, _, _ = output
    ctx.save_for_backward(q, k, v, out, den, positions, mask, S0, z0)
    ctx.args = (feature_map, normalize, eps, rope, rope_base, interleaved)
    ctx.pos_offset = pos_offset
    ctx.mark_non_differentiable(den)


def _causal_backward(ctx, grad_out, grad_den, grad_S, grad_z):
    q, k, v, out, den, positions, mask, S0, z0 = ctx.saved_tensors
    gq, gk, gv, gS0, gz0 = _ops.causal_linear_attention_bwd(
        grad_out, grad_S, grad_z, q, k, v, out, den, *ctx.args, positions, ctx.pos_offset, mask, S0, z0)
    has_state = S0 is not None
    return (gq, gk, gv, None, None, None, None, None, None, None, None, None,
            gS0 if has_state else None, gz0 if has_state else None)


torch.library.register_autograd("kxkernels::causal_linear_attention_fwd", _causal_backward,
                                setup_context=_causal_setup)


def _full_setup(ctx, inputs, output):
    (q, k, v, feature_map, normalize, eps, rope, rope_base, interleaved, positions, pos_offset, mask) = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, out, den, positions, mask)
    ctx.args = (feature_map, normalize, eps, rope, rope_base, interleaved)
    ctx.pos_offset = pos_offset
    ctx.mark_non_differentiable(den)


def _full_backward(ctx, grad_out, grad_den):
    q, k, v, out, den, positions, mask = ctx.saved_tensors
    gq, gk, gv = _ops.linear_attention_bwd(grad_out, q, k, v, out, den, *ctx.args, positions, ctx.pos_offset,
                                           mask)
    return (gq, gk, gv) + (None,) * 9


torch.library.register_autograd("kxkernels::linear_attention_fwd", _full_backward, setup_context=_full_setup)


# ---- CUDA tensors: Triton kernels -------------------------------------------------------------
def _register_triton():
    from kxkernels.ops.linear_attention import triton as tk

    torch.library.register_kernel("kxkernels::causal_linear_attention_fwd", "cuda", tk.causal_forward)
    torch.library.register_kernel("kxkernels::causal_linear_attention_bwd", "cuda", tk.causal_backward)
    torch.library.register_kernel("kxkernels::linear_attention_fwd", "cuda", tk.full_forward)
    torch.library.register_kernel("kxkernels::linear_attention_bwd", "cuda", tk.full_backward)


if _backend.triton_unavailable() in (None, "no CUDA device"):
    try:
        _register_triton()
    except ImportError:  # pragma: no cover - ./triton.py not importable with this Triton
        pass


# ---- argument checks -----------------------------------------------------------------------------
def _check_qkv(q, k, v):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_floating(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, D) (4 dims), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} (same B, H, L and Dk), got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"v must have shape {tuple(q.shape[:3])} + (Dv,) (same B, H, L as q), got {tuple(v.shape)}")
    if min(q.shape) <= 0 or v.shape[-1] <= 0:
        raise ValueError(f"every size must be positive, got q {tuple(q.shape)}, v {tuple(v.shape)}")


def _check_options(q, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask):
    """Returns (positions tensor or None, position offset)."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if feature_map == "identity" and normalize:
        raise ValueError("feature_map='identity' requires normalize=False: phi(q) . z can be zero or negative")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    B, _, L, Dk = q.shape
    if rope:
        if Dk % 2:
            raise ValueError(f"rope=True needs an even head dim Dk (channel pairs), got Dk={Dk}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real) or not rope_base > 0:
            raise ValueError(f"rope_base must be a number > 0, got {rope_base!r}")
    if key_padding_mask is not None:
        check_bool_tensor(key_padding_mask, "key_padding_mask")
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(f"key_padding_mask must have shape (B, L) = {(B, L)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device} like q, got {key_padding_mask.device}")
    if positions is None or isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        return None, int(positions or 0)
    check_tensor(positions, "positions")
    check_integer_tensor(positions, "positions")
    if tuple(positions.shape) not in ((L,), (B, L)):
        raise ValueError(f"positions must be None, an int offset, or an int tensor of shape (L,) = ({L},) or "
                         f"(B, L) = {(B, L)}, got shape {tuple(positions.shape)}")
    if positions.device != q.device:
        raise ValueError(f"positions must be on {q.device} like q, got {positions.device}")
    return positions, 0


def _check_state(q, v, initial_state):
    if initial_state is None:
        return None, None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError("initial_state must be a pair (S, z) as returned with return_final_state=True, got "
                        f"{type(initial_state).__name__}")
    S, z = initial_state
    check_tensor(S, "initial_state S")
    check_tensor(z, "initial_state z")
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    for t, name, shape in ((S, "S", (B, H, Dk, Dv)), (z, "z", (B, H, Dk))):
        if t.dtype != acc:
            raise TypeError(f"initial_state {name} must be {acc} for {q.dtype} inputs, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"initial_state {name} must be on {q.device} like q, got {t.device}")
    return S, z


# ---- public functions ---------------------------------------------------------------------------
def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu+1",
                            normalize: bool = True, eps: float = 1e-6, rope: bool = False,
                            rope_base: float = 10000.0, interleaved: bool = True, positions=None,
                            key_padding_mask: torch.Tensor | None = None, initial_state=None,
                            return_final_state: bool = False):
    """Causal linear attention as a cumulative sum, feature map, normalizer and RoPE fused.

    ``out_i = phi~(q_i)^T S_i / (phi(q_i)^T z_i + eps)``, ``S_i = S_0 + sum_{j<=i} phi~(k_j) v_j^T``,
    ``z_i = z_0 + sum_{j<=i} phi(k_j)``, with ``phi~ = RoPE(phi(.))`` when ``rope`` (else ``phi``) and a
    denominator of 1 without ``normalize``. Sources: Katharopoulos et al. 2020, "Transformers are
    RNNs" (the cumulative-sum form); Su Jianlin 2020, "线性Attention的探索" (feature maps); Su 2021,
    "Transformer升级之路：2" (RoPE on the numerator only, so the denominator stays positive).
    Runs in chunks with the state carried in float32: O(L Dk Dv) time, O(L (Dk + Dv)) memory; the
    ``(L, Dk, Dv)`` cumulative sum is never formed. A zero denominator (only with ``eps=0``) gives 0.

    Args:
        q (torch.Tensor): queries ``[B, H, L, Dk]``, float32/float16/bfloat16 (float64 on CPU).
        k (torch.Tensor): keys ``[B, H, L, Dk]``, same dtype.
        v (torch.Tensor): values ``[B, H, L, Dv]``, same dtype.
        feature_map (str): ``"elu+1"``, ``"relu"`` or ``"identity"`` (the last needs ``normalize=False``).
        normalize (bool): divide by ``phi(q_i) . z_i + eps``.
        eps (float): added to the denominator, ``>= 0``.
        rope (bool): rotate ``phi(q)``, ``phi(k)`` of the numerator (RoFormer RoPE, ``Dk`` even).
        rope_base (float): RoPE base, ``theta_i = rope_base ** (-2i / Dk)``; angles in float32.
        interleaved (bool): RoPE pairs ``(2i, 2i+1)`` if True, ``(i, i + Dk/2)`` (GPT-NeoX) if False.
        positions: None (``arange(L)``), an int offset (``offset + arange(L)``: decode after a
            prefill of ``offset`` tokens), or an int tensor ``[L]`` or ``[B, L]``. Used with ``rope``.
        key_padding_mask (torch.Tensor): bool ``[B, L]``, True = real token; padded keys enter
            neither sum (their outputs are still computed from the earlier keys).
        initial_state: ``(S [B, H, Dk, Dv], z [B, H, Dk])`` float32 (float64 for float64 inputs).
        return_final_state (bool): also return the state after the last position.

    Returns:
        torch.Tensor ``[B, H, L, Dv]`` in the dtype of q, or ``(out, (S, z))`` with
        ``return_final_state``. Differentiable in q, k, v and the initial state.

    Raises:
        TypeError: non-floating or mixed dtypes, a state of the wrong dtype, non-integer positions.
        ValueError: wrong ranks, mismatched B/H/L/Dk, unknown feature map, identity with normalize,
            eps < 0, odd Dk with rope, masks/positions/states of the wrong shape.

    Examples::
        >>> import torch, kxkernels
        >>> q, k, v = (torch.randn(2, 4, 128, 32) for _ in range(3))
        >>> out, state = kxkernels.causal_linear_attention(q, k, v, rope=True, return_final_state=True)
        >>> out.shape, state[0].shape
        (torch.Size([2, 4, 128, 32]), torch.Size([2, 4, 32, 32]))
        >>> q1, k1, v1 = (torch.randn(2, 4, 1, 32) for _ in range(3))   # one decode step
        >>> step = kxkernels.causal_linear_attention(q1, k1, v1, rope=True, positions=128, initial_state=state)
    """
    _check_qkv(q, k, v)
    pos, offset = _check_options(q, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask)
    S0, z0 = _check_state(q, v, initial_state)
    out, _, S, z = _ops.causal_linear_attention_fwd(q, k, v, feature_map, bool(normalize), float(eps), bool(rope),
                                                    float(rope_base), bool(interleaved), pos, offset,
                                                    key_padding_mask, S0, z0)
    return (out, (S, z)) if return_final_state else out


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu+1",
                     normalize: bool = True, eps: float = 1e-6, rope: bool = False, rope_base: float = 10000.0,
                     interleaved: bool = True, positions=None,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal linear attention: ``out_i = phi~(q_i)^T S / (phi(q_i) . z + eps)`` with
    ``S = sum_j phi~(k_j) v_j^T`` and ``z = sum_j phi(k_j)`` over every unpadded key.

    Same arguments, shapes, dtypes and errors as :func:`causal_linear_attention` (no state).
    Source: Katharopoulos et al. 2020; Su Jianlin 2020, "线性Attention的探索".

    Examples::
        >>> import torch, kxkernels
        >>> q, k, v = (torch.randn(2, 4, 100, 16) for _ in range(3))
        >>> kxkernels.linear_attention(q, k, v, feature_map="relu").shape
        torch.Size([2, 4, 100, 16])
    """
    _check_qkv(q, k, v)
    pos, offset = _check_options(q, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask)
    out, _ = _ops.linear_attention_fwd(q, k, v, feature_map, bool(normalize), float(eps), bool(rope),
                                       float(rope_base), bool(interleaved), pos, offset, key_padding_mask)
    return out
