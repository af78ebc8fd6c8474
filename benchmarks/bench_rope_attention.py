"""Fused RoPE attention benchmark cases for benchmarks/run.py.

Providers: kxkernels ``rope_attention`` (RoPE inside the attention kernel); the reference column is
what people run today: eager interleaved RoPE on q and k (RoFormer / HF style, cos/sin tables
precomputed outside the step, ``x * cos + rotate_every_two(x) * sin``) followed by
``torch.nn.functional.scaled_dot_product_attention`` (ATen's CPU flash attention); peers: SDPA
alone without RoPE (the attention core the fused kernel must match), and at L <= 1024 the
materializing eager reference of kxkernels/ops/rope_attention/reference.py.

GFLOP/s count the useful matmul work: forward ``4 B H Lq Lk D`` (halved for causal), backward
2.5x the forward (the FlashAttention papers' convention, recomputation of S included), so
fwd+bwd is 3.5x the forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kxkernels
from benchmarks.harness import Case
from kxkernels.ops.rope_attention import reference

B, H, D = 4, 8, 64
LENGTHS = (1024, 4096)
QUICK_LENGTHS = (1024,)  # an L = 4096 fwd+bwd step takes seconds per provider
BASE = 10000.0
MATERIALIZED_MAX_L = 1024  # the L x L eager reference costs B*H*L*L*4 bytes a tensor


def _tables(L: int, device: str):
    cos, sin = reference.rope_cos_sin(torch.arange(L, device=device), D, BASE)  # (L, D/2) float64
    # interleaved layout: each angle twice, as RoFormer's sinusoidal table is repeat_interleave'd
    return (cos.float().repeat_interleave(2, -1).contiguous(), sin.float().repeat_interleave(2, -1).contiguous())


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _eager_rope(x, cos, sin):
    return x * cos + _rotate_every_two(x) * sin


def _step(attn, q, k, v, grad_out, backward: bool):
    if not backward:
        def fwd():
            with torch.no_grad():
                return attn(q, k, v)
        return fwd

    def fwd_bwd():
        out = attn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)
    return fwd_bwd


def _max_error(q, k, v, causal: bool):
    """max |kx - float64 reference| on batch 0, head 0 (the full L x L in float64 is cheap there)."""
    def err():
        with torch.no_grad():
            s = (slice(0, 1), slice(0, 1))
            out = kxkernels.rope_attention(q[s], k[s], v[s], causal=causal)
            exact = reference.rope_attention(q[s].double(), k[s].double(), v[s].double(), causal=causal)
            return float((out.double() - exact).abs().max())
    return err


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for L in QUICK_LENGTHS if quick else LENGTHS:
        q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device).requires_grad_() for _ in range(3))
        grad_out = torch.randn(B, H, L, D, generator=gen).to(device)
        cos, sin = _tables(L, device)
        for causal in (False, True):
            def kx_attn(q, k, v, causal=causal):
                return kxkernels.rope_attention(q, k, v, causal=causal)

            def rope_sdpa(q, k, v, causal=causal, cos=cos, sin=sin):
                return F.scaled_dot_product_attention(_eager_rope(q, cos, sin), _eager_rope(k, cos, sin), v,
                                                      is_causal=causal)

            def sdpa_only(q, k, v, causal=causal):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def materialized(q, k, v, causal=causal):
                return reference.rope_attention(q, k, v, causal=causal)

            fwd_flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            for backward in (False, True):
                peers = {"SDPA alone (no RoPE)": _step(sdpa_only, q, k, v, grad_out, backward)}
                if L <= MATERIALIZED_MAX_L:
                    peers["eager reference (L x L materialized)"] = _step(materialized, q, k, v, grad_out, backward)
                out.append(Case(
                    op="rope_attention " + ("fwd+bwd" if backward else "fwd") + (" causal" if causal else ""),
                    shape=f"B={B} H={H} L={L} D={D}", dtype="float32", device=device,
                    kx=_step(kx_attn, q, k, v, grad_out, backward),
                    reference=_step(rope_sdpa, q, k, v, grad_out, backward),
                    peers=peers,
                    max_error=_max_error(q, k, v, causal),
                    flops=fwd_flops * (3.5 if backward else 1.0),
                    note=("reference = eager interleaved RoPE (precomputed tables) + F.scaled_dot_product_attention; "
                          "max error = max |kx - float64 reference| on batch 0, head 0; GFLOP/s: fwd 4BHL^2D "
                          "(x0.5 causal), fwd+bwd 3.5x fwd"),
                ))
    return out
