"""Batched Sinkhorn / WRD (Word Rotator's Distance) benchmark cases for benchmarks/run.py.

Providers: kxkernels ``wrd`` (C++ on CPU, CUDA C++ on GPU); the eager batched log-domain torch
Sinkhorn of kxkernels/ops/sinkhorn/reference.py; POT ``ot.emd2`` per pair (exact, masses and cost
built per pair as a user would: the CPU alternative to beat); POT ``ot.sinkhorn2`` per pair
(``method="sinkhorn_log"``, same eps and tolerance); POT's batched ``ot.solve_batch``
(``method="log_sinkhorn"``, same eps and tolerance).

Every provider runs at the same smoothing: kxkernels' default, eps = ``EPS`` times each pair's
cost spread ``max C - min C`` (``relative_eps=True``); the eager reference likewise; POT's
``ot.sinkhorn2`` gets that absolute eps per pair as ``reg``, and ``ot.solve_batch`` (one ``reg``
for the batch) the costs divided by each pair's spread with ``reg=EPS`` (the same plans).

The eager reference and per-pair ``ot.sinkhorn2`` take tens of seconds on a few hundred pairs
(both run to ``max_iter`` on the slowest problems), so the real-pair case with every provider uses
the first ``REAL_PAIRS`` STS pairs (tests/ops/test_sinkhorn.py checks accuracy on all 515), and the
``LARGE_PAIRS`` (4,096) synthetic case runs kxkernels on every pair but the reference and POT on the
first ``LARGE_SUBSET``: its times are per pair (``Case.items``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

import kxkernels
from benchmarks.harness import Case
from benchmarks import real_data
from kxkernels.ops.sinkhorn import reference

EPS, TOL, MAX_ITER = 0.01, 1e-6, 1000
REAL_PAIRS = 64
SYNTH_PAIRS, SYNTH_DIM, SYNTH_LENGTHS = 256, 384, (8, 64)  # the eager reference takes ~0.1 s a pair
LARGE_PAIRS, LARGE_SUBSET = 4096, 64


def _pair_inputs(x: torch.Tensor, y: torch.Tensor):
    """Masses ||x_i|| / sum ||x|| and cost 1 - cos of one pair, in float64 numpy (a POT user's code)."""
    x, y = x.double().numpy(), y.double().numpy()
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    cost = 1.0 - (x / nx[:, None]) @ (y / ny[:, None]).T
    return nx / nx.sum(), ny / ny.sum(), cost


def _reg(cost) -> float:
    """The absolute eps kxkernels' default runs a pair at: EPS times its cost spread (EPS if 0)."""
    spread = float(cost.max() - cost.min())
    return EPS * spread if spread > 0 else EPS


def _pot_peers(pairs: list[tuple[torch.Tensor, torch.Tensor]], x, y, xm, ym, with_slow_peers: bool):
    import ot

    def emd2_per_pair():
        return [ot.emd2(*_pair_inputs(xi, yi)) for xi, yi in pairs]

    def sinkhorn2_one(xi, yi):
        a, b, cost = _pair_inputs(xi, yi)
        return ot.sinkhorn2(a, b, cost, reg=_reg(cost), method="sinkhorn_log", stopThr=TOL, numItermax=MAX_ITER)

    def sinkhorn2_per_pair():
        return [sinkhorn2_one(xi, yi) for xi, yi in pairs]

    peers = {"ot.emd2 per pair (exact)": emd2_per_pair}
    if with_slow_peers:
        peers["ot.sinkhorn2 per pair (sinkhorn_log)"] = sinkhorn2_per_pair
        if hasattr(ot, "solve_batch"):
            cost, a, b = reference.cosine_cost_and_masses(x, y, xm, ym)
            real = (a > 0)[:, :, None] & (b > 0)[:, None, :]
            hi = torch.where(real, cost, -torch.inf).flatten(1).amax(1)
            lo = torch.where(real, cost, torch.inf).flatten(1).amin(1)
            spread = torch.where(hi > lo, hi - lo, torch.ones_like(hi))[:, None, None]
            peers["ot.solve_batch (log_sinkhorn)"] = lambda: ot.solve_batch(
                cost / spread, reg=EPS, a=a, b=b, max_iter=MAX_ITER, tol=TOL, method="log_sinkhorn", grad="detach")
    return peers, emd2_per_pair


def _wrd_case(label: str, x, y, xm, ym, device: str, with_slow_peers: bool, note: str,
              subset: Optional[int] = None) -> Case:
    """kxkernels on every pair; the reference and the peers on the first ``subset`` pairs when
    given (times then per pair)."""
    B = x.shape[0]
    k = B if subset is None else min(subset, B)
    pairs = [(x[i, xm[i]], y[i, ym[i]]) for i in range(k)]
    peers, emd2 = (_pot_peers(pairs, x[:k], y[:k], xm[:k], ym[:k], with_slow_peers) if device == "cpu"
                   else ({}, None))
    xd, yd, xmd, ymd = (t.to(device) for t in (x, y, xm, ym))
    rel = True  # each pair's eps relative to its cost spread (kxkernels.wrd's default), on CPU and CUDA

    def kx():
        return kxkernels.wrd(xd, yd, x_mask=xmd, y_mask=ymd, eps=EPS, max_iter=MAX_ITER, tol=TOL, relative_eps=rel)

    def ref():
        return reference.wrd(xd[:k], yd[:k], x_mask=xmd[:k], y_mask=ymd[:k], eps=EPS, max_iter=MAX_ITER, tol=TOL,
                             relative_eps=rel)

    def max_error():
        v = kx().double().cpu()[:k]
        if emd2 is not None:
            exact = torch.tensor(emd2(), dtype=torch.float64)
            rel = (v - exact).abs() / exact
            case.note += (f"; relative gap of kxkernels WRD to exact ot.emd2{' (subset)' if k < B else ''}: "
                          f"mean {float(rel.mean()):.2e}, max {float(rel.max()):.2e}")
        r = ref().double().cpu()
        return float(((v - r).abs() / r.abs().clamp_min(1e-12)).max())

    m, n = x.shape[1], y.shape[1]
    items = None
    if k < B:
        items = {"kxkernels": B, "reference": k, **{name: k for name in peers}}
        note += (f"; kxkernels on all {B} pairs, the reference and POT on the first {k}: every time is per "
                 f"pair (ms), speed-ups per pair")
    case = Case(op="wrd fwd", shape=f"{label} B={B} M<={m} N<={n} D={x.shape[2]}", dtype="float32",
                device=device, kx=kx, reference=ref,
                peers=peers, max_error=max_error, items=items,
                note=note + f"; eps={EPS} x each pair's cost spread (relative_eps) tol={TOL} max_iter={MAX_ITER}; "
                            f"max error = max relative |kx - reference|")
    return case


def _real(n_pairs):
    pairs = real_data.sts_pairs()
    x, y, xm, ym = pairs.x, pairs.y, pairs.x_mask, pairs.y_mask
    if n_pairs is not None:
        x, y, xm, ym = x[:n_pairs], y[:n_pairs], xm[:n_pairs], ym[:n_pairs]
        keep_m, keep_n = int(xm.sum(1).max()), int(ym.sum(1).max())
        x, y, xm, ym = x[:, :keep_m], y[:, :keep_n], xm[:, :keep_m], ym[:, :keep_n]
    return x.contiguous(), y.contiguous(), xm.contiguous(), ym.contiguous()


def _synthetic(n_pairs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = SYNTH_LENGTHS
    lm = torch.randint(lo, hi + 1, (n_pairs,), generator=g)
    ln = torch.randint(lo, hi + 1, (n_pairs,), generator=g)
    # token vectors that share a direction per pair, like contextual embeddings of one text
    base = torch.randn(n_pairs, 1, SYNTH_DIM, generator=g)
    x = base + torch.randn(n_pairs, hi, SYNTH_DIM, generator=g)
    y = base + torch.randn(n_pairs, hi, SYNTH_DIM, generator=g)
    xm = torch.arange(hi)[None, :] < lm[:, None]
    ym = torch.arange(hi)[None, :] < ln[:, None]
    return x, y, xm, ym


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    try:
        n_real = 16 if quick else REAL_PAIRS
        x, y, xm, ym = _real(n_real)
        out.append(_wrd_case("real STS pairs (MiniLM)", x, y, xm, ym, device, True,
                             f"real pairs: the first {x.shape[0]} of sts-forums.tsv, all-MiniLM-L6-v2 tokens"))
    except real_data.RealDataUnavailable as e:
        import warnings
        warnings.warn(f"real STS case skipped: {e}")
    n_synth = 32 if quick else SYNTH_PAIRS
    x, y, xm, ym = _synthetic(n_synth)
    out.append(_wrd_case("synthetic, lengths 8..64", x, y, xm, ym, device, False,
                         "synthetic pairs: Gaussian tokens around a shared per-pair direction; peers: ot.emd2 per pair"))
    n_large, n_sub = (512, 16) if quick else (LARGE_PAIRS, LARGE_SUBSET)
    x, y, xm, ym = _synthetic(n_large, seed=1)
    out.append(_wrd_case("synthetic, lengths 8..64", x, y, xm, ym, device, True,
                         "synthetic pairs (seed 1); peers: ot.emd2, ot.sinkhorn2 per pair, ot.solve_batch",
                         subset=n_sub))
    return out
