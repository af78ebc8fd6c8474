"""Eager reference for batched Sinkhorn and WRD, readable first.

Entropic optimal transport between ``a (B, M)`` and ``b (B, N)`` with cost ``C (B, M, N)``:

    T = argmin_{T 1 = a, T^T 1 = b, T >= 0}  <T, C> + eps * KL(T || a b^T)

solved in the log domain (Cuturi 2013; Peyré & Cuturi, "Computational Optimal Transport", 2019,
Remark 4.23). With potentials ``f (B, M)``, ``g (B, N)`` the plan is
``T_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` and one sweep is

    f_i <- -eps * logsumexp_j(log b_j + (g_j - C_ij) / eps)   (rows of T sum to a)
    g_j <- -eps * logsumexp_i(log a_i + (f_i - C_ij) / eps)   (columns of T sum to b)

Epsilon scaling: each problem starts at ``eps_0 = max(max C - min C, eps)`` and divides by
``1 / EPS_RATIO`` every ``STAGE_SWEEPS`` sweeps (or earlier once its marginal error is below
``STAGE_TOL``) until it reaches ``eps``. At the final ``eps`` the sweeps are over-relaxed
(``f <- f + omega (f_sinkhorn - f)``, Thibault et al. 2017; Lehmann et al. 2021) and a problem
stops on its own when the L1 error of its row marginals is below ``tol`` at a state whose columns
are exact (the sweep before the check is then a plain one). Zero mass marks padding: those rows
and columns take no part, their potentials are 0 and their plan entries 0.

``value = <T, C>``, ``dual = <f, a> + <g, b>`` (= ``<T, C> + eps KL(T || a b^T)`` at convergence).
Word Rotator's Distance (Yokoi et al. 2020) is ``value`` with masses ``||x_i|| / sum ||x||`` and
cost ``1 - cos(x_i, y_j)``.

The kernels (csrc/cpu/sinkhorn.cpp, csrc/cuda/sinkhorn_kernel.cuh) follow the same schedule; the
CPU kernel adds Newton steps for problems that Sinkhorn alone converges slowly on. This file is
what they are tested against, and the eager baseline of benchmarks/bench_sinkhorn.py.
"""
from __future__ import annotations

import torch

from kxkernels._extension import _C

# The schedule is defined once, in csrc/common/sinkhorn_schedule.h, and read here from the extension.
_SCHEDULE = _C.sinkhorn_schedule()
EPS_RATIO = float(_SCHEDULE["eps_ratio"])      # eps-scaling: eps_{k+1} = max(EPS_RATIO * eps_k, eps)
STAGE_SWEEPS = int(_SCHEDULE["stage_sweeps"])  # sweeps per intermediate eps at most
STAGE_TOL = float(_SCHEDULE["stage_tol"])      # ... or fewer once the marginal error is below this
OMEGA = float(_SCHEDULE["omega"])              # over-relaxation at the final eps


def _lse(z: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that returns -inf (not NaN) for an all -inf slice."""
    m = z.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(z - m).sum(dim, keepdim=True))).squeeze(dim)


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, eps: float = 0.01,
             max_iter: int = 1000, tol: float = 1e-6, return_plan: bool = False,
             compute_dtype: torch.dtype | None = None, omega: float = OMEGA, return_eps: bool = False,
             relative_eps: bool = False):
    """Batched log-domain Sinkhorn. Returns ``(value, dual, f, g, n_iter, err, plan or None)``,
    plus ``eps_reached (B,)`` float64 last when ``return_eps``.

    ``compute_dtype`` defaults to float64 for float64 input and float32 otherwise. Masses are
    normalized to sum 1 per problem; a problem with no mass on both sides gives zeros. A problem
    that ``max_iter`` stops before its eps schedule reaches ``eps`` returns the value, potentials
    and plan of the eps it reached (``eps_reached``), and an ``err`` of at least ``tol``. A
    non-finite cost at a real entry (both masses > 0) raises ValueError. With ``relative_eps``
    problem ``p`` runs at ``eps * (max C_p - min C_p)`` over its real entries (``eps`` where that is 0).
    """
    dt = compute_dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    C, a, b = cost.to(dt), a.to(dt), b.to(dt)
    real = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    if bool((real & ~torch.isfinite(C)).any()):
        p, i, j = (real & ~torch.isfinite(C)).nonzero()[0].tolist()
        raise ValueError(f"cost must be finite at real entries (a_i > 0 and b_j > 0), got cost[{p}, {i}, {j}] = "
                         f"{C[p, i, j].item()}")
    B = C.shape[0]
    va, vb = a > 0, b > 0
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    b = b / b.sum(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    la = torch.where(va, a.clamp_min(torch.finfo(dt).tiny).log(), torch.full_like(a, -torch.inf))
    lb = torch.where(vb, b.clamp_min(torch.finfo(dt).tiny).log(), torch.full_like(b, -torch.inf))
    valid = va[:, :, None] & vb[:, None, :]
    empty = ~valid.flatten(1).any(1)
    cmax = torch.where(valid, C, torch.full_like(C, -torch.inf)).flatten(1).amax(1)
    cmin = torch.where(valid, C, torch.full_like(C, torch.inf)).flatten(1).amin(1)
    spread = torch.where(empty, torch.zeros_like(cmax), cmax - cmin)
    target = torch.full_like(spread, eps)          # per-problem target eps
    if relative_eps:
        target = torch.where(spread > 0, eps * spread, target)
    eps = target
    e = torch.maximum(spread, eps)                 # per-problem current eps
    Cz = torch.where(valid, C, torch.zeros_like(C))  # padding entries never reach a sum

    f, g = torch.zeros_like(a), torch.zeros_like(b)
    stage_sweeps = torch.zeros(B, dtype=torch.long, device=C.device)
    done = empty.clone()
    confirm = torch.zeros(B, dtype=torch.bool, device=C.device)  # last sweep was plain
    n_iter = torch.zeros(B, dtype=torch.long, device=C.device)
    err = torch.zeros(B, dtype=dt, device=C.device)

    def f_update(g, e):
        return -e[:, None] * _lse(lb[:, None, :] + (g[:, None, :] - Cz) / e[:, None, None], 2)

    def g_update(f, e):
        return -e[:, None] * _lse(la[:, :, None] + (f[:, :, None] - Cz) / e[:, None, None], 1)

    for _ in range(max_iter):
        if bool(done.all()):
            break
        active = ~done
        fn = torch.where(va, f_update(g, e), torch.zeros_like(f))
        # row-marginal error of the current (f, g): sum_i a_i |exp((f_i - fn_i) / eps) - 1|
        e_now = torch.where(va, (a * torch.expm1((f - fn) / e[:, None]).abs()), torch.zeros_like(a)).sum(1)
        final = e <= eps
        converged = active & final & confirm & (e_now < tol)
        err = torch.where(active, e_now, err)
        done = done | converged
        active = ~done
        n_iter = n_iter + active.long()
        # stage bookkeeping: leave an intermediate eps after STAGE_SWEEPS or once err < STAGE_TOL
        stage_sweeps = stage_sweeps + 1
        relax = final & ~(e_now < tol)  # a plain sweep when close: the next check is exact
        w = torch.where(relax, torch.full_like(e, omega), torch.ones_like(e))[:, None]
        f_new = torch.where(active[:, None], f + w * (fn - f), f)
        gn = torch.where(vb, g_update(f_new, e), torch.zeros_like(g))
        g_new = torch.where(active[:, None], g + w * (gn - g), g)
        f, g = f_new, g_new
        confirm = ~relax
        leave = active & ~final & ((stage_sweeps >= STAGE_SWEEPS) | (e_now < STAGE_TOL))
        e = torch.where(leave, torch.maximum(e * EPS_RATIO, eps), e)
        stage_sweeps = torch.where(leave, torch.zeros_like(stage_sweeps), stage_sweeps)
        confirm = confirm & ~leave
    else:
        # max_iter reached: a last plain column update makes the columns exact, and err is the
        # row error of the plan returned
        gn = torch.where(vb, g_update(f, e), torch.zeros_like(g))
        g = torch.where(done[:, None], g, gn)
        fn = torch.where(va, f_update(g, e), torch.zeros_like(f))
        e_now = torch.where(va, (a * torch.expm1((f - fn) / e[:, None]).abs()), torch.zeros_like(a)).sum(1)
        e_now = torch.where(e > eps, e_now.clamp_min(tol), e_now)  # stopped before eps: err >= tol
        err = torch.where(done, err, e_now)

    # the potentials are defined up to f + c, g - c: pick <f, a> = <g, b>
    fa = torch.where(va, f * a, torch.zeros_like(f)).sum(1)
    gb = torch.where(vb, g * b, torch.zeros_like(g)).sum(1)
    shift = 0.5 * (fa - gb)
    f = torch.where(va, f - shift[:, None], torch.zeros_like(f))
    g = torch.where(vb, g + shift[:, None], torch.zeros_like(g))
    logT = la[:, :, None] + lb[:, None, :] + (f[:, :, None] + g[:, None, :] - Cz) / e[:, None, None]
    T = torch.where(valid, torch.exp(logT), torch.zeros_like(Cz))
    value = (T * Cz).sum((1, 2))
    dual = fa + gb
    out = (value, dual, f, g, n_iter, err, (T if return_plan else None))
    if return_eps:  # the eps each problem's results belong to (empty problems: eps)
        out += (e.double(),)
    return out


def cosine_cost_and_masses(x: torch.Tensor, y: torch.Tensor, x_mask=None, y_mask=None):
    """WRD inputs: ``cost = 1 - cos(x_i, y_j)`` ``(B, M, N)``, masses ``||x_i|| / sum ||x||``.
    Masked-out and zero-norm tokens get zero mass."""
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    if x_mask is not None:
        nx = torch.where(x_mask, nx, torch.zeros_like(nx))
    if y_mask is not None:
        ny = torch.where(y_mask, ny, torch.zeros_like(ny))
    xh = x / torch.where(nx > 0, nx, torch.ones_like(nx))[..., None]
    yh = y / torch.where(ny > 0, ny, torch.ones_like(ny))[..., None]
    cost = 1 - xh @ yh.transpose(-1, -2)
    a = nx / nx.sum(-1, keepdim=True).clamp_min(torch.finfo(nx.dtype).tiny)
    b = ny / ny.sum(-1, keepdim=True).clamp_min(torch.finfo(ny.dtype).tiny)
    return cost, a, b


def wrd(x: torch.Tensor, y: torch.Tensor, *, x_mask=None, y_mask=None, eps: float = 0.01,
        max_iter: int = 1000, tol: float = 1e-6, compute_dtype: torch.dtype | None = None,
        omega: float = OMEGA, relative_eps: bool = True) -> torch.Tensor:
    """Word Rotator's Distance ``(B,)``: the transport cost of :func:`sinkhorn` on the cosine cost
    (eps relative to each pair's cost spread by default, as ``kxkernels.wrd``)."""
    dt = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    cost, a, b = cosine_cost_and_masses(x.to(dt), y.to(dt), x_mask, y_mask)
    return sinkhorn(cost, a, b, eps=eps, max_iter=max_iter, tol=tol, compute_dtype=dt, omega=omega,
                    relative_eps=relative_eps)[0]
