"""Hugging Face ``transformers`` integration: RoFormer self-attention on the fused RoPE attention op.

``patch_roformer(model)`` swaps every ``RoFormerSelfAttention`` of a ``RoFormerModel`` (or of any
model containing one, e.g. ``RoFormerForMaskedLM``) for one that calls
``kxkernels.rope_attention``: same parameters (the module's class is swapped in place, so its
``query``/``key``/``value`` weights, state dict and hooks are untouched), same math, without the
``(B, H, L, L)`` score tensor HF's eager attention materializes.

HF RoFormer's convention, which the patched forward reproduces exactly (transformers
``models/roformer/modeling_roformer.py``): the rotary table has ``theta_i = 10000 ** (-2i / d)``
for head size ``d``, positions ``0..L-1``, pairs ``(2i, 2i+1)`` rotated as
``(x0 cos - x1 sin, x1 cos + x0 sin)`` (kxkernels' ``interleaved=True``), applied to q and k (and
to v when ``config.rotary_value``), scores scaled by ``1 / sqrt(d)``. The 4-D additive mask HF
builds (``0`` keep, a large negative value drop; bidirectional or causal with padding) is turned
back into ``key_padding_mask`` (+ ``causal``) and checked to be exactly that pattern.

Handled differently or refused, with a clear error:
- ``rotary_value=True``: supported; v is rotated by ``kxkernels.apply_rope`` (fused, with its
  backward) before the attention, as HF does.
- attention dropout while training (``attention_probs_dropout_prob > 0`` and ``module.training``):
  ``RuntimeError`` (the fused kernel has no dropout); use ``model.eval()`` or set it to 0.
- ``output_attentions=True``: ``ValueError`` (the probabilities are never formed).
- a key/value cache (decoder generation with ``use_cache``): ``ValueError``; pass ``use_cache=False``.
- masks that are not padding (+ causal) patterns (custom 4-D masks, additive biases): ``ValueError``.
- cross-attention (``add_cross_attention``): runs through the fused op without RoPE, as HF does.
- a batch row with no real token at all: the fused op gives 0 there where HF's softmax averages
  over the padding (both are meaningless; every row with a real key matches).
"""
from __future__ import annotations

import math

import torch

import kxkernels

_ROPE_BASE = 10000.0  # hard-coded in RoFormerSinusoidalPositionalEmbedding


def _mask_to_padding(mask: torch.Tensor | None, batch: int, lq: int, lk: int):
    """(key_padding_mask (B, Lk) bool or None, causal) from HF's 4-D attention mask.

    Raises ValueError unless the mask is exactly ``keep[b, j]`` for every query (bidirectional)
    or ``keep[b, j] & (j <= i + lk - lq)`` (causal).
    """
    if mask is None:
        return None, False
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (lq, lk) or mask.shape[0] not in (1, batch):
        raise ValueError(f"patched RoFormer attention: expected a (B, 1, {lq}, {lk}) attention mask, "
                         f"got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        drop = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | drop).all()):
            raise ValueError("patched RoFormer attention: the additive attention mask holds values other "
                             "than 0 and the dtype's minimum (a bias the fused kernel does not take)")
        keep = ~drop
    keep = keep[:, 0].expand(batch, lq, lk)
    kpm = keep[:, -1, :]  # the last query sees every real key, causal or not
    if bool(keep.all()):
        return None, False
    if torch.equal(keep, kpm[:, None, :].expand(batch, lq, lk)):
        return kpm.contiguous(), False
    i = torch.arange(lq, device=mask.device)[:, None]
    j = torch.arange(lk, device=mask.device)[None, :]
    tril = j <= i + (lk - lq)
    if torch.equal(keep, kpm[:, None, :] & tril):
        return (None if bool(kpm.all()) else kpm.contiguous()), True
    raise ValueError("patched RoFormer attention: the attention mask is neither a key padding mask "
                     "nor causal + key padding; the fused kernel supports only those")


def _fused_forward(self, hidden_states, attention_mask=None, sinusoidal_pos=None,
                   encoder_hidden_states=None, cache=None, output_attentions=False, **kwargs):
    """RoFormerSelfAttention.forward on ``kxkernels.rope_attention``; returns ``(context, None)``."""
    if kwargs.get("past_key_values") is not None or cache is not None:
        raise ValueError("patched RoFormer attention does not support a key/value cache; "
                         "call the model with use_cache=False")
    if output_attentions:
        raise ValueError("patched RoFormer attention never forms the attention probabilities; "
                         "output_attentions=True is not supported")
    if self.training and self.dropout.p > 0:
        raise RuntimeError(f"patched RoFormer attention has no attention dropout (p={self.dropout.p}); "
                           "use model.eval() or set attention_probs_dropout_prob=0")
    b, lq, _ = hidden_states.shape
    d = self.attention_head_size
    cross = encoder_hidden_states is not None
    source = encoder_hidden_states if cross else hidden_states
    lk = source.shape[1]
    q = self.query(hidden_states).view(b, lq, -1, d).transpose(1, 2)
    k = self.key(source).view(b, lk, -1, d).transpose(1, 2)
    v = self.value(source).view(b, lk, -1, d).transpose(1, 2)
    rope = sinusoidal_pos is not None and not cross
    if rope and sinusoidal_pos.shape[-2:] != (lq, d):
        raise ValueError(f"patched RoFormer attention: sinusoidal positions of shape "
                         f"{tuple(sinusoidal_pos.shape)} do not match (L={lq}, head_dim={d})")
    if rope and self.rotary_value:
        v = kxkernels.apply_rope(v, base=_ROPE_BASE, interleaved=True)
    kpm, causal = _mask_to_padding(attention_mask, b, lq, lk)
    out = kxkernels.rope_attention(q, k, v, causal=causal, key_padding_mask=kpm, scale=1.0 / math.sqrt(d),
                                   rope=rope, rope_base=_ROPE_BASE, interleaved=True)
    return out.transpose(1, 2).reshape(b, lq, self.all_head_size), None


_PATCHED: dict = {}


def _patched_class(cls):
    """A subclass of ``cls`` whose forward is the fused one (cached per class)."""
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"KX{cls.__name__}", (cls,), {"forward": _fused_forward,
                                                           "_kx_patched": True})
    return _PATCHED[cls]


def patch_roformer(model):
    """Swap the self-attention of a Hugging Face RoFormer model for ``kxkernels.rope_attention``, in place.

    Args:
        model (torch.nn.Module): a ``RoFormerModel`` or any module containing
            ``RoFormerSelfAttention`` modules (``RoFormerForMaskedLM``, ...).

    Returns:
        The same ``model``; its weights, state dict and config are untouched. Calling it twice is a
        no-op.

    Raises:
        ImportError: transformers (with RoFormer) is not installed.
        ValueError: ``model`` contains no RoFormer self-attention, or its head size is odd
            (RoPE rotates channel pairs).

    Examples::
        >>> import torch
        >>> from transformers import RoFormerConfig, RoFormerModel
        >>> from kxkernels.integrations.transformers import patch_roformer
        >>> cfg = RoFormerConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1,
        ...                      num_attention_heads=4, intermediate_size=128)
        >>> model = patch_roformer(RoFormerModel(cfg).eval())
        >>> model(torch.randint(0, 100, (2, 12))).last_hidden_state.shape
        torch.Size([2, 12, 64])
    """
    from transformers.models.roformer.modeling_roformer import RoFormerSelfAttention

    found = 0
    for module in model.modules():
        if not isinstance(module, RoFormerSelfAttention):
            continue
        found += 1
        if getattr(module, "_kx_patched", False):
            continue
        if module.attention_head_size % 2:
            raise ValueError(f"RoFormer head size {module.attention_head_size} is odd; RoPE rotates "
                             "channel pairs")
        module.__class__ = _patched_class(type(module))
    if not found:
        raise ValueError(f"patch_roformer: {type(model).__name__} contains no RoFormerSelfAttention")
    return model
