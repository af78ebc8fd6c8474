"""Causal linear attention benchmark cases for benchmarks/run.py.

Shapes: float32, B=2, H=8, Dk=Dv=64, L=4096 and 16384 (``--quick``: L=1024). Every step is
forward + backward: ``out.backward(grad)`` on leaf q, k, v, then their grads are dropped.

Cases:
- numerator only (``feature_map="identity", normalize=False``, no RoPE): the computation
  fast-transformers' C++ ``causal_dot_product`` does (PyPI ``pytorch-fast-transformers``, a peer
  when importable); reference = the eager cumulative-sum form (reference.py), run one (batch, head)
  at a time so its ``(L, Dk, Dv)`` cumsum fits in memory (at B=2, H=8, L=4096 the whole tensor is
  2.1 GB per copy); the quadratic ``(L, L)`` masked form is a second peer at L <= 1024 (``--quick``),
  per head as well (beyond that one call takes minutes on this machine).
- the full op (``elu+1``, normalized, RoPE) against the numerator-only op of the same run: the
  "speed-up vs best peer" column of that row is numerator-only time / full time, so the cost of the
  fused feature map, normalizer and RoPE is 1 / that figure; reference = the eager chunked form of
  reference.py with the same options (the cumsum form's cost is in the row above).
flops = the kernel's matmul work as executed (chunks of C = 32: forward 4 Dk Dv + 2 C (Dk + Dv) per
position and head, backward 10 Dk Dv + 6 C (Dk + Dv)), so GFLOP/s compares with the sgemm probe.
"""
from __future__ import annotations

import warnings

import torch

import kxkernels
from benchmarks.harness import Case
from kxkernels.ops.linear_attention import reference

B, H, D = 2, 8, 64
CHUNK = 32                       # the CPU kernel's default chunk (csrc/cpu/linear_attention_kernels.h)
QUADRATIC_MAX_L = 1024           # the (L, L) form beyond this: minutes a call here (16 heads x L^2 x D)
REFERENCE_HEADS = {16384: 1}     # the eager cumsum reference on this many (b, h) heads only: times per head
NUMERATOR = dict(feature_map="identity", normalize=False)
FULL = dict(feature_map="elu+1", normalize=True, rope=True)


def _flops(L, backward=True):
    per_pos = 4 * D * D + 2 * CHUNK * 2 * D
    if backward:
        per_pos += 10 * D * D + 6 * CHUNK * 2 * D
    return float(B * H * L * per_pos)


def _step(fn, q, k, v, g):
    def step():
        out = fn(q, k, v)
        out.backward(g if out.shape == g.shape else g[:1, :out.shape[1]])
        q.grad = k.grad = v.grad = None
    return step


def _per_head(form, heads=None, **kw):
    """An eager form applied one (batch, head) at a time: its big temporaries are per head. With
    ``heads``, only the first ``heads`` (b, h) pairs run (the case's times are then per head)."""
    def run(q, k, v):
        pairs = [(b, h) for b in range(q.shape[0]) for h in range(q.shape[1])][:heads]
        outs = [form(q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1], **kw) for b, h in pairs]
        if heads is not None:
            return torch.cat(outs, dim=1)
        return torch.cat(outs, dim=0).view(q.shape[0], q.shape[1], *outs[0].shape[2:])
    return run


def _fast_transformers():
    try:
        from fast_transformers.causal_product import causal_dot_product
    except Exception as e:  # ImportError, or its extension failing to load
        warnings.warn(f"linear_attention: fast-transformers not importable ({type(e).__name__}: {e}); "
                      "install: PATH without nvcc, pip install --no-build-isolation pytorch-fast-transformers")
        return None
    return lambda q, k, v: causal_dot_product(q, k, v)


def _max_error(q, k, v, kw):
    """Max abs difference of out and grads vs float64 (recurrent-equivalent chunked form) on the first head."""
    def max_error():
        qs, ks, vs = (t.detach()[:1, :1].clone().requires_grad_() for t in (q, k, v))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (qs, ks, vs))
        a = kxkernels.causal_linear_attention(qs, ks, vs, **kw)
        b = reference.causal_linear_attention_chunked(q64, k64, v64, **kw)
        g = torch.randn_like(b)
        a.backward(g.float())
        b.backward(g)
        err = (a.double() - b).abs().max().item()
        for x, y in ((qs, q64), (ks, k64), (vs, v64)):
            err = max(err, (x.grad.double() - y.grad).abs().max().item())
        return err
    return max_error


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        lengths = (2048, 8192) if quick else (2048, 4096, 8192, 16384)
    else:
        lengths = (1024,) if quick else (4096, 16384)
    ft = _fast_transformers() if device == "cpu" else None
    out = []
    for L in lengths:
        gen = torch.Generator().manual_seed(L)
        q, k, v = ((0.5 * torch.randn(B, H, L, D, generator=gen)).to(device).requires_grad_() for _ in range(3))
        g = torch.randn(B, H, L, D, generator=gen).to(device)
        shape = f"B={B} H={H} L={L} D={D}"
        num = lambda q, k, v: kxkernels.causal_linear_attention(q, k, v, **NUMERATOR)  # noqa: E731
        full = lambda q, k, v: kxkernels.causal_linear_attention(q, k, v, **FULL)  # noqa: E731
        peers = {}
        if ft is not None:
            peers["fast-transformers causal_dot_product"] = _step(ft, q, k, v, g)
        if L <= QUADRATIC_MAX_L:
            peers["eager quadratic (L x L masked) form, per head"] = _step(
                _per_head(reference.causal_linear_attention_quadratic, **NUMERATOR), q, k, v, g)
        ref_heads = REFERENCE_HEADS.get(L)
        items = None if ref_heads is None else {"kxkernels": B * H, "reference": ref_heads,
                                                **{name: B * H for name in peers}}
        out.append(Case(
            op="causal_linear_attention fwd+bwd numerator-only (identity, normalize=False)", shape=shape,
            dtype="float32", device=device, kx=_step(num, q, k, v, g),
            reference=_step(_per_head(reference.causal_linear_attention_cumsum, heads=ref_heads, **NUMERATOR),
                            q, k, v, g),
            peers=peers, max_error=_max_error(q, k, v, NUMERATOR), flops=_flops(L), items=items,
            note="reference = eager cumsum form, one (b, h) at a time"
                 + ("" if ref_heads is None else
                    f" on the first {ref_heads} of the {B * H} heads: every time in this row is per head (ms), "
                    "speed-ups per head")
                 + ("" if L <= QUADRATIC_MAX_L else f"; no quadratic form beyond L={QUADRATIC_MAX_L}")))
        out.append(Case(
            op="causal_linear_attention fwd+bwd full (elu+1, normalized, RoPE)", shape=shape,
            dtype="float32", device=device, kx=_step(full, q, k, v, g),
            reference=_step(lambda q, k, v: reference.causal_linear_attention_chunked(q, k, v, **FULL), q, k, v, g),
            peers={"kxkernels numerator-only op (same run)": _step(num, q, k, v, g)},
            max_error=_max_error(q, k, v, FULL), flops=_flops(L),
            note="reference = eager chunked form; speed-up vs best peer = numerator-only time / full-op time "
                 "(full-op cost = its inverse)"))
    return out
