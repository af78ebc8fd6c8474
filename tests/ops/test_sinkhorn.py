"""sinkhorn / wrd (CPU C++ kernels) against POT (exact ot.emd2, log-domain ot.sinkhorn2) and the
float64 eager reference; padding, per-problem stopping, gradients (gradcheck of the entropic
objective, envelope formula), opcheck, torch.compile, bad input, and real all-MiniLM-L6-v2 pairs.
Outputs are NaN-poisoned before the kernels write them (tests/conftest.py)."""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kxkernels as kx
from kxkernels.ops.sinkhorn import reference as ref
from benchmarks import real_data

ot = pytest.importorskip("ot", reason="POT (pip install pot) is the accuracy yardstick of these tests")

F64 = torch.float64


def _problems(B, M, N, dtype=F64, seed=0, lengths=None, scale=1.0):
    """Random costs in [0, scale) and masses on the simplex; with ``lengths`` [(m, n)], zero mass
    beyond each problem's length (padding) plus one interior zero where there is room."""
    g = torch.Generator().manual_seed(seed)
    C = scale * torch.rand(B, M, N, generator=g, dtype=F64)
    a = torch.rand(B, M, generator=g, dtype=F64) + 0.05
    b = torch.rand(B, N, generator=g, dtype=F64) + 0.05
    if lengths is not None:
        for p, (m, n) in enumerate(lengths):
            a[p, m:] = 0
            b[p, n:] = 0
            if m >= 3:
                a[p, 1] = 0
            if n >= 3:
                b[p, n - 2] = 0
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    b = b / b.sum(-1, keepdim=True).clamp_min(1e-300)
    return C.to(dtype), a.to(dtype), b.to(dtype)


def _pot_problem(C, a, b, p):
    """Problem p without its padding, as float64 numpy for POT, masses renormalized in float64 as
    the kernels do (rounded masses whose sums differ leave POT no exact solution to converge to)."""
    ia, ib = a[p] > 0, b[p] > 0
    ap, bp = a[p][ia].double(), b[p][ib].double()
    return (ap / ap.sum()).numpy(), (bp / bp.sum()).numpy(), C[p][ia][:, ib].double().numpy()


# ---- accuracy against POT ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("eps", [0.1, 0.02])
def test_entropic_value_and_plan_match_pot_sinkhorn(dtype, eps):
    C, a, b = _problems(6, 9, 13, dtype)
    res = kx.sinkhorn(C, a, b, eps=eps, tol=1e-9 if dtype == F64 else 1e-6, return_plan=True)
    assert bool((res.err < (1e-9 if dtype == F64 else 1e-6)).all())
    atol = 1e-9 if dtype == F64 else 2e-6
    for p in range(C.shape[0]):
        ap, bp, Cp = _pot_problem(C, a, b, p)
        plan = ot.sinkhorn(ap, bp, Cp, eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-12)
        assert abs(res.value[p].item() - float((plan * Cp).sum())) < atol
        np.testing.assert_allclose(res.plan[p].double().numpy(), plan, atol=atol, rtol=0)
        v2 = ot.sinkhorn2(ap, bp, Cp, eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-12)
        assert abs(res.value[p].item() - float(v2)) < atol


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_small_eps_brackets_exact_emd(dtype):
    """0 <= <T_eps, C> - OT <= eps * log(min(m, n)) (entropic bias bound), against exact ot.emd2."""
    eps = 1e-3
    C, a, b = _problems(8, 12, 10, dtype, seed=1, lengths=[(12, 10), (5, 9), (12, 3), (7, 7)] * 2)
    res = kx.sinkhorn(C, a, b, eps=eps)
    assert bool((res.err < 1e-6).all()), res.err
    for p in range(C.shape[0]):
        ap, bp, Cp = _pot_problem(C, a, b, p)
        exact = ot.emd2(ap, bp, Cp)
        slack = 1e-6 if dtype == F64 else 2e-5
        assert -slack <= res.value[p].item() - exact <= eps * math.log(min(len(ap), len(bp))) + slack


# ---- against the eager reference ------------------------------------------------------------------
LENGTHS = [(16, 16), (5, 16), (16, 1), (1, 1), (9, 11), (2, 7)]
# (atol, rtol) of value / plan, and atol of the potentials, vs the float64 reference on the same
# (rounded) inputs; float16/bfloat16 are read into float32 math, so only output rounding adds.
TOL = {torch.float32: (2e-6, 1e-5, 2e-5), torch.float16: (1e-3, 2e-3, 1e-3),
       torch.bfloat16: (8e-3, 1e-2, 8e-3), F64: (1e-10, 1e-9, 1e-8)}


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("newton", [True, False])
def test_matches_reference_with_padding(dtype, newton):
    C, a, b = _problems(len(LENGTHS), 16, 16, F64, seed=2, lengths=LENGTHS)
    C, a, b = C.to(dtype), a.to(dtype), b.to(dtype)
    # masses rounded to a low-precision dtype no longer sum to exactly 1: both sides renormalize
    eps = 0.05
    res = kx.sinkhorn(C, a, b, eps=eps, tol=1e-9 if dtype == F64 else 1e-6, return_plan=True, newton=newton)
    value, dual, f, g, n_iter, err, plan = ref.sinkhorn(C.double(), a.double(), b.double(), eps=eps, tol=1e-11,
                                                        max_iter=20000, return_plan=True)
    assert bool((err < 1e-11).all())
    atol, rtol, patol = TOL[dtype]
    assert res.value.dtype == dtype and res.f.dtype == dtype and res.plan.dtype == dtype
    assert res.n_iter.dtype == torch.long and res.err.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(res.value.double(), value, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.plan.double(), plan, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.f.double(), f, atol=patol, rtol=rtol)
    torch.testing.assert_close(res.g.double(), g, atol=patol, rtol=rtol)
    # padding: zero potentials, zero plan rows and columns
    assert bool((res.f[a == 0] == 0).all()) and bool((res.g[b == 0] == 0).all())
    assert bool((res.plan[a == 0] == 0).all()) and bool((res.plan.transpose(1, 2)[b == 0] == 0).all())


def test_padding_equals_unpadded_problem():
    C, a, b = _problems(3, 10, 12, torch.float32, seed=3, lengths=[(6, 9), (10, 4), (3, 12)])
    res = kx.sinkhorn(C, a, b, eps=0.02, return_plan=True)
    for p in range(3):
        ia, ib = a[p] > 0, b[p] > 0
        one = kx.sinkhorn(C[p][ia][:, ib][None].contiguous(), a[p][ia][None], b[p][ib][None], eps=0.02,
                          return_plan=True)
        torch.testing.assert_close(res.value[p], one.value[0], rtol=0, atol=0)
        torch.testing.assert_close(res.plan[p][ia][:, ib], one.plan[0], rtol=0, atol=0)
        torch.testing.assert_close(res.f[p][ia], one.f[0], rtol=0, atol=0)
        assert int(res.n_iter[p]) == int(one.n_iter[0])


def test_each_problem_stops_on_its_own():
    """Stopping is per problem: iteration counts differ, and a problem's result does not depend on
    its neighbours in the batch."""
    C, a, b = _problems(4, 12, 12, torch.float32, seed=4)
    C[1] *= 0.01      # nearly flat cost: converges in a few sweeps
    C[2] *= 30        # eps far below the cost spread: many more
    res = kx.sinkhorn(C, a, b, eps=0.01)
    assert len(set(res.n_iter.tolist())) > 1
    assert int(res.n_iter[1]) < int(res.n_iter[2])
    assert bool((res.err < 1e-6).all())
    for p in range(4):
        alone = kx.sinkhorn(C[p:p + 1], a[p:p + 1], b[p:p + 1], eps=0.01)
        assert alone.value[0].item() == res.value[p].item()
        assert int(alone.n_iter[0]) == int(res.n_iter[p])


def test_all_padding_and_empty_batch():
    C, a, b = _problems(3, 5, 6, torch.float32, seed=5)
    a[1] = 0
    b[1] = 0
    C.requires_grad_()
    res = kx.sinkhorn(C, a, b, return_plan=True)
    assert res.value[1].item() == 0 and res.err[1].item() == 0 and int(res.n_iter[1]) == 0
    assert bool((res.f[1] == 0).all()) and bool((res.g[1] == 0).all()) and bool((res.plan[1] == 0).all())
    for t in (res.value, res.f, res.g, res.err, res.plan):
        assert bool(torch.isfinite(t).all())
    res.value.sum().backward()
    assert bool((C.grad[1] == 0).all()) and bool(torch.isfinite(C.grad).all())
    empty = kx.sinkhorn(torch.zeros(0, 4, 5), torch.zeros(0, 4), torch.zeros(0, 5))
    assert empty.value.shape == (0,) and empty.f.shape == (0, 4)


def test_max_iter_reports_error_and_finite_results():
    C, a, b = _problems(2, 20, 20, torch.float32, seed=6, scale=5.0)
    res = kx.sinkhorn(C, a, b, eps=0.01, max_iter=3, return_plan=True)
    assert bool((res.n_iter == 3).all())
    assert bool((res.err > 1e-6).all())
    for t in (res.value, res.f, res.g, res.err, res.plan):
        assert bool(torch.isfinite(t).all())
    # columns of the returned plan are exact; err is the L1 error of its rows
    torch.testing.assert_close(res.plan.sum(1), b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((res.plan.sum(2) - a).abs().sum(1), res.err, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cost_at_real_entry_raises(bad):
    """Issue 6 item 3: a non-finite cost at a real entry returned NaN silently; now a ValueError
    naming cost, from the wrapper, the op itself (its kernel pass) and the reference. At padding
    entries (zero mass) anything goes."""
    C, a, b = _problems(3, 4, 5, torch.float32, seed=7, lengths=[(4, 5), (3, 5), (4, 4)])
    Cpad = C.clone()
    Cpad[1, 3, 0] = bad   # a[1, 3] == 0: padding row
    Cpad[2, 0, 4] = bad   # b[2, 4] == 0: padding column
    res = kx.sinkhorn(Cpad, a, b)
    torch.testing.assert_close(res.value, kx.sinkhorn(C, a, b).value, rtol=0, atol=0)
    assert bool(torch.isfinite(res.value).all())
    C[1, 2, 4] = bad
    with pytest.raises(ValueError, match=r"cost must be finite at real entries.*cost\[1, 2, 4\]"):
        kx.sinkhorn(C, a, b)
    with pytest.raises(ValueError, match="cost must be finite at real entries.*problem 1"):
        torch.ops.kxkernels.sinkhorn_fwd(C, a, b, 0.05, 100, 1e-6, False, True)
    with pytest.raises(ValueError, match="cost must be finite"):
        ref.sinkhorn(C, a, b)


def test_strided_inputs():
    C, a, b = _problems(4, 7, 9, torch.float32, seed=8)
    Ct = C.transpose(1, 2).contiguous().transpose(1, 2)      # same values, strides (63, 1, 7)
    a2 = torch.stack([a, a], -1)[..., 0]                      # stride (14, 2)
    want = kx.sinkhorn(C, a, b, return_plan=True)
    got = kx.sinkhorn(Ct, a2, b, return_plan=True)
    torch.testing.assert_close(got.value, want.value, rtol=0, atol=0)
    torch.testing.assert_close(got.plan, want.plan, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), eps=st.sampled_from([0.5, 0.05, 0.01]),
       seed=st.integers(0, 10_000))
def test_property_plan_marginals_and_value(m, n, eps, seed):
    C, a, b = _problems(2, m, n, torch.float32, seed=seed)
    res = kx.sinkhorn(C, a, b, eps=eps, return_plan=True)
    assert bool((res.err < 1e-6).all())
    assert bool((res.plan >= 0).all())
    torch.testing.assert_close(res.plan.sum(1), b, atol=1e-6, rtol=1e-5)
    assert bool(((res.plan.sum(2) - a).abs().sum(1) < 2e-6).all())
    torch.testing.assert_close(res.value, (res.plan * C).sum((1, 2)), atol=1e-6, rtol=1e-5)
    # the dual value <f, a> + <g, b> never falls below the transport cost
    dual = kx.sinkhorn(C, a, b, eps=eps, objective="entropic").value
    assert bool((dual >= res.value - 1e-5).all())


# ---- wrd ------------------------------------------------------------------------------------------
def _tokens(B, M, N, D, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, D, generator=g, dtype=F64) + 0.3
    y = torch.randn(B, N, D, generator=g, dtype=F64) + 0.3
    xm = torch.rand(B, M, generator=g) < 0.8
    ym = torch.rand(B, N, generator=g) < 0.8
    xm[:, 0] = True
    ym[:, 0] = True
    return x.to(dtype), y.to(dtype), xm, ym


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_wrd_matches_reference_and_emd(dtype):
    x, y, xm, ym = _tokens(5, 11, 9, 40, dtype, seed=10)
    x[2, 3] = 0  # a zero-norm real token: no mass
    d = kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=0.02, return_result=True, tol=1e-10 if dtype == F64 else 1e-6)
    want = ref.wrd(x.double(), y.double(), x_mask=xm, y_mask=ym, eps=0.02, tol=1e-11, max_iter=20000)
    atol, rtol, _ = TOL[dtype]
    assert d.value.dtype == dtype
    torch.testing.assert_close(d.value.double(), want, atol=atol, rtol=rtol)
    assert d.f[2, 3].item() == 0 and bool((d.f[~xm] == 0).all())
    # and close to the exact WRD: eps = 0.02 on costs in [0, 2] is a small bias
    cost, a, b = ref.cosine_cost_and_masses(x.double(), y.double(), xm, ym)
    for p in range(5):
        ap, bp, Cp = _pot_problem(cost, a, b, p)
        assert abs(d.value[p].item() - ot.emd2(ap, bp, Cp)) < 0.02 * math.log(min(len(ap), len(bp))) + 1e-2


def test_wrd_of_identical_clouds_is_near_zero_and_symmetric():
    x, y, xm, ym = _tokens(4, 8, 8, 32, torch.float32, seed=11)
    same = kx.wrd(x, x, x_mask=xm, y_mask=xm, eps=0.001)
    assert bool((same.abs() < 1e-3).all())
    d_xy = kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=0.01)
    d_yx = kx.wrd(y, x, x_mask=ym, y_mask=xm, eps=0.01)
    torch.testing.assert_close(d_xy, d_yx, atol=1e-5, rtol=1e-5)


def test_wrd_fully_masked_pair_and_masks_none():
    x, y, xm, ym = _tokens(3, 6, 5, 16, torch.float32, seed=12)
    xm[1] = False
    ym[1] = False
    x.requires_grad_()
    d = kx.wrd(x, y, x_mask=xm, y_mask=ym)
    assert d[1].item() == 0 and bool(torch.isfinite(d).all())
    d.sum().backward()
    assert bool((x.grad[1] == 0).all()) and bool((x.grad[0][~xm[0]] == 0).all())
    # no masks = every token real
    full = kx.wrd(x.detach(), y)
    torch.testing.assert_close(full, kx.wrd(x.detach(), y, x_mask=torch.ones(3, 6, dtype=torch.bool),
                                            y_mask=torch.ones(3, 5, dtype=torch.bool)), rtol=0, atol=0)


def test_wrd_strided_tokens():
    x, y, xm, ym = _tokens(3, 7, 6, 24, torch.float32, seed=13)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)  # D not unit-stride: the converted-copy path
    torch.testing.assert_close(kx.wrd(xs, y, x_mask=xm, y_mask=ym), kx.wrd(x, y, x_mask=xm, y_mask=ym),
                               atol=1e-6, rtol=1e-6)


def test_wrd_non_finite_real_token_raises():
    """A NaN/inf real token used to give a NaN distance; now a ValueError naming the side. A
    masked-out token may hold anything."""
    x, y, xm, ym = _tokens(2, 5, 5, 8, torch.float32, seed=14)
    xm[1, 2] = False
    want = kx.wrd(x, y, x_mask=xm, y_mask=ym)
    x[1, 2, 3] = float("nan")  # masked out
    torch.testing.assert_close(kx.wrd(x, y, x_mask=xm, y_mask=ym), want, rtol=0, atol=0)
    x[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x must be finite at real tokens.*x\[1, 0\]"):
        kx.wrd(x, y, x_mask=xm, y_mask=ym)
    with pytest.raises(ValueError, match="x and y must be finite at real tokens: pair 1"):
        torch.ops.kxkernels.wrd_fwd(x, y, xm, ym, 0.05, 100, 1e-6, True)
    x[1, 0, 3] = 0
    y[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"y must be finite at real tokens.*y\[0, 0\]"):
        kx.wrd(x, y, x_mask=xm, y_mask=ym)


# ---- max_iter before the eps schedule ends (issue 6 item 3) ---------------------------------------
def test_stop_before_eps_value_and_gradient_belong_to_eps_reached():
    """eps=1e-3, max_iter=3 on a 12 x 14 float64 problem stops during the eps schedule: the
    result says so (res.eps > eps, err >= tol), and value, plan, potentials and d value / d cost
    all belong to the eps reached. Before the fix the backward rebuilt the plan with eps=1e-3 from
    potentials of a much larger eps: d value / d cost was off from the plan by ~1e165."""
    C, a, b = _problems(1, 12, 14, F64, seed=40)
    C.requires_grad_()
    a.requires_grad_()
    res = kx.sinkhorn(C, a, b, eps=1e-3, max_iter=3, tol=1e-6, return_plan=True)
    assert res.eps.dtype == F64 and float(res.eps[0]) > 1e-3
    assert float(res.err[0]) >= 1e-6 and int(res.n_iter[0]) == 3
    e = float(res.eps[0])
    f, g, T = res.f.detach(), res.g.detach(), res.plan.detach()
    # the plan returned is that of (f, g) at the eps reached, and value = <T, C>
    Ce = C.detach()
    rebuilt = a.detach()[:, :, None] * b[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - Ce) / e)
    torch.testing.assert_close(T, rebuilt, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res.value.detach(), (T * Ce).sum((1, 2)), rtol=1e-12, atol=0)
    gC, ga = torch.autograd.grad(res.value.sum(), (C, a))
    torch.testing.assert_close(gC, T, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ga, f - (f * a.detach()).sum(1, keepdim=True), rtol=1e-12, atol=1e-15)
    # the reference stops at the same eps with the same plan
    out = ref.sinkhorn(Ce, a.detach(), b, eps=1e-3, max_iter=3, tol=1e-6, return_plan=True, return_eps=True)
    torch.testing.assert_close(res.eps, out[7], rtol=1e-12, atol=0)
    torch.testing.assert_close(T, out[6], rtol=1e-9, atol=1e-12)
    assert float(out[5][0]) >= 1e-6
    # converged problems report the requested eps
    full = kx.sinkhorn(Ce, a.detach(), b, eps=0.05)
    assert float(full.eps[0]) == 0.05 and float(full.err[0]) < 1e-6


def test_stop_before_eps_wrd_gradient_belongs_to_eps_reached():
    """The same for wrd: its backward rebuilds the plan at each pair's eps reached."""
    x, y, xm, ym = _tokens(3, 9, 8, 12, F64, seed=41)
    x.requires_grad_()
    y.requires_grad_()
    res = kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=1e-3, max_iter=3, return_result=True)
    assert bool((res.eps > 1e-3).all()) and bool((res.err >= 1e-6).all())
    gx, gy = torch.autograd.grad(res.value.sum(), (x, y))
    x64, y64 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    cost, a, b = ref.cosine_cost_and_masses(x64, y64, xm, ym)
    f, g = res.f.detach(), res.g.detach()
    e = res.eps[:, None, None]
    T = torch.where((a > 0)[:, :, None] & (b > 0)[:, None, :],
                    a.detach()[:, :, None] * b.detach()[:, None, :] *
                    torch.exp((f[:, :, None] + g[:, None, :] - cost.detach()) / e), torch.zeros_like(cost))
    torch.testing.assert_close(res.value.detach(), (T * cost.detach()).sum((1, 2)), rtol=1e-10, atol=1e-12)
    rx, ry = torch.autograd.grad(_surrogate(cost, a, b, f, g, T).sum(), (x64, y64))
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gy, ry, rtol=1e-8, atol=1e-10)


# ---- eps relative to each problem's cost spread; the WRD default (issue 6 item 10) -----------------
def test_relative_eps_is_eps_times_each_problems_spread():
    C, a, b = _problems(4, 7, 9, F64, seed=50, lengths=[(7, 9), (3, 9), (7, 2), (5, 5)])
    C[1] *= 0.1
    C[2] = C[2] * 3 + 1
    C[3].fill_(0.5)  # equal costs: spread 0, eps itself
    real = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    spread = (torch.where(real, C, -torch.inf).flatten(1).amax(1) - torch.where(real, C, torch.inf).flatten(1).amin(1))
    want_eps = torch.where(spread > 0, 0.02 * spread, torch.full_like(spread, 0.02))
    res = kx.sinkhorn(C, a, b, eps=0.02, relative_eps=True, tol=1e-10, return_plan=True)
    torch.testing.assert_close(res.eps, want_eps, rtol=1e-15, atol=0)
    for p in range(4):
        one = kx.sinkhorn(C[p:p + 1], a[p:p + 1], b[p:p + 1], eps=float(want_eps[p]), tol=1e-10, return_plan=True)
        torch.testing.assert_close(res.plan[p], one.plan[0], rtol=1e-12, atol=1e-14)
    out = ref.sinkhorn(C, a, b, eps=0.02, relative_eps=True, tol=1e-11, max_iter=20000, return_plan=True,
                       return_eps=True)
    torch.testing.assert_close(out[7], want_eps, rtol=1e-15, atol=0)
    torch.testing.assert_close(res.plan, out[6], rtol=1e-8, atol=1e-10)


def _wrd_gap_to_exact(x, y, xm, ym, **kw):
    """kx.wrd (default settings plus kw) and its relative gap to exact ot.emd2 per pair."""
    res = kx.wrd(x, y, x_mask=xm, y_mask=ym, return_result=True, **kw)
    cost, a, b = ref.cosine_cost_and_masses(x.double(), y.double(), xm, ym)
    exact = torch.tensor([ot.emd2(*_pot_problem(cost, a, b, p)) for p in range(x.shape[0])], dtype=F64)
    return res, (res.value.double() - exact).abs() / exact


# bench_sinkhorn's synthetic cases: all 256 pairs of the one, the first 1,024 of the 4,096-pair one
@pytest.mark.parametrize("n_pairs, seed, first", [(256, 0, 256), (4096, 1, 1024)])
def test_default_wrd_within_1pct_of_exact_on_synthetic_suite_cases(n_pairs, seed, first):
    """Every pair of the benchmark suite's synthetic cases (lengths 8..64, D 384) within 1% of exact
    with the defaults; the old default (absolute eps = 0.01) was 1.6% off on average."""
    from benchmarks import bench_sinkhorn

    x, y, xm, ym = (t[:first] for t in bench_sinkhorn._synthetic(n_pairs, seed=seed))
    res, rel = _wrd_gap_to_exact(x, y, xm, ym)
    assert bool((res.err < 1e-6).all()), int((res.err >= 1e-6).sum())
    assert float(rel.max()) < 0.01, float(rel.max())   # measured 0.16% (256 pairs)
    assert float(rel.mean()) < 0.002, float(rel.mean())  # measured 0.07%
    if n_pairs == 256:  # the finding: the absolute eps = 0.01 default
        _, rel_abs = _wrd_gap_to_exact(x, y, xm, ym, relative_eps=False)
        assert float(rel_abs.mean()) > 0.01


# ---- gradients --------------------------------------------------------------------------------------
def test_gradcheck_sinkhorn_entropic_objective():
    """The envelope gradients are the exact gradients of the entropic objective at convergence."""
    C, a, b = _problems(3, 4, 5, F64, seed=20)
    C.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()

    def fn(C, a, b):  # masses kept on the simplex by the normalization
        return kx.sinkhorn(C, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True), eps=0.1, tol=1e-13,
                           max_iter=100000, objective="entropic").value

    assert torch.autograd.gradcheck(fn, (C, a, b), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_sinkhorn_raw_masses():
    """The kernels renormalize a and b, and d/da = f - <f, a> is the gradient of that function:
    gradcheck on the raw masses (a step of 1e-8 keeps their sums inside the 1e-6 check)."""
    C, a, b = _problems(2, 4, 3, F64, seed=21)
    C.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    fn = lambda C, a, b: kx.sinkhorn(C, a, b, eps=0.2, tol=1e-14, max_iter=100000, objective="entropic").value
    assert torch.autograd.gradcheck(fn, (C, a, b), eps=1e-8, atol=1e-6, rtol=1e-5)


def test_gradcheck_wrd_entropic_objective():
    x, y, xm, ym = _tokens(3, 5, 4, 6, F64, seed=22)
    x.requires_grad_()
    y.requires_grad_()
    # relative_eps=False: with the default each pair's eps follows its cost spread, which the
    # gradient holds fixed (documented), so it is not the gradient of that composite function
    fn = lambda x, y: kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=0.05, tol=1e-13, max_iter=100000,
                             objective="entropic", relative_eps=False)
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-8, rtol=1e-6)


def _surrogate(cost, a, b, f, g, T):
    """A function of (cost, a, b) whose autograd gradient is the envelope gradient (T, f, g)."""
    return (T * cost).sum((1, 2)) + (f * a).sum(1) + (g * b).sum(1)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_wrd_gradient_is_the_envelope_formula(dtype):
    """The C++ backward against autograd of the envelope surrogate through the reference's cosine
    cost and masses (independent code for the chain rule through norms and 1 - cos)."""
    x, y, xm, ym = _tokens(4, 7, 6, 12, dtype, seed=23)
    x.requires_grad_()
    y.requires_grad_()
    w = torch.randn(4, dtype=dtype)
    d = kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=0.05, tol=1e-12 if dtype == F64 else 1e-6, relative_eps=False)
    (gx, gy) = torch.autograd.grad((d * w).sum(), (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    cost, a, b = ref.cosine_cost_and_masses(x64, y64, xm, ym)
    _, _, f, g, _, err, T = ref.sinkhorn(cost.detach(), a.detach(), b.detach(), eps=0.05, tol=1e-12,
                                         max_iter=20000, return_plan=True)
    (rx, ry) = torch.autograd.grad((_surrogate(cost, a, b, f, g, T) * w.double()).sum(), (x64, y64))
    tol = 1e-9 if dtype == F64 else 5e-5
    torch.testing.assert_close(gx.double(), rx, atol=tol, rtol=tol * 10)
    torch.testing.assert_close(gy.double(), ry, atol=tol, rtol=tol * 10)


def test_sinkhorn_gradient_is_the_envelope_formula():
    C, a, b = _problems(3, 6, 5, torch.float32, seed=24, lengths=[(6, 5), (4, 5), (6, 2)])
    C.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    res = kx.sinkhorn(C, a, b, eps=0.05, return_plan=True)
    w = torch.tensor([1.0, -2.0, 0.5])
    gC, ga, gb = torch.autograd.grad((res.value * w).sum(), (C, a, b))
    T = res.plan.detach()
    torch.testing.assert_close(gC, w[:, None, None] * T, atol=1e-6, rtol=1e-4)
    f = res.f.detach()
    fa = (f * a.detach()).sum(1, keepdim=True)
    want_a = torch.where(a.detach() > 0, w[:, None] * (f - fa), torch.zeros_like(f))
    torch.testing.assert_close(ga, want_a, atol=1e-5, rtol=1e-4)
    assert bool((gb[b.detach() == 0] == 0).all())


def test_transport_value_gradient_gap_shrinks_with_eps():
    """value = <T, C> gets the envelope gradient T, which leaves out dT/dC: the docstring's claim that
    the gap to finite differences of <T, C> shrinks with eps, on fixed random problems."""
    C, a, b = _problems(6, 5, 7, F64, seed=0)
    dC = torch.randn(6, 5, 7, dtype=F64, generator=torch.Generator().manual_seed(1))

    def gap(eps):
        f = lambda C: kx.sinkhorn(C, a, b, eps=eps, tol=1e-13, max_iter=100000).value
        h = 1e-6
        fd = (f(C + h * dC) - f(C - h * dC)) / (2 * h)
        Cg = C.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(Cg).sum(), Cg)
        return float((fd - (g * dC).sum((1, 2))).abs().mean())

    assert gap(0.01) < gap(0.1) / 5


# ---- every ISA level this CPU runs (csrc/cpu/sinkhorn_kernels.h via common/isa_kernels.h) ------------
ISA_LEVELS = ["baseline", "avx2", "avx512"]


@pytest.fixture
def isa_level(request):
    from kxkernels import _C

    order = {name: i for i, name in enumerate(ISA_LEVELS)}
    if order[request.param] > order[_C.build_info()["cpu_isa_supported"]]:
        pytest.skip(f"this CPU runs at most {_C.build_info()['cpu_isa_supported']}")
    before = _C.cpu_isa()
    assert _C.set_cpu_isa(request.param) == request.param
    yield request.param
    _C.set_cpu_isa(before)


@pytest.mark.parametrize("isa_level", ISA_LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_each_isa_level_matches_reference(isa_level, dtype):
    """sinkhorn (with Newton steps, padding, lengths off the vector width) and wrd forward and
    backward at each level against the float64 reference; the levels agree with each other."""
    C, a, b = _problems(len(LENGTHS), 16, 16, F64, seed=60, lengths=LENGTHS)
    C, a, b = C.to(dtype), a.to(dtype), b.to(dtype)
    atol, rtol, patol = TOL[dtype]
    res = kx.sinkhorn(C, a, b, eps=0.02, tol=1e-9 if dtype == F64 else 1e-6, return_plan=True)
    value, _, f, _, _, err, plan = ref.sinkhorn(C.double(), a.double(), b.double(), eps=0.02, tol=1e-11,
                                                max_iter=20000, return_plan=True)
    torch.testing.assert_close(res.value.double(), value, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.plan.double(), plan, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.f.double(), f, atol=patol, rtol=rtol)
    x, y, xm, ym = _tokens(4, 13, 19, 37, dtype, seed=61)  # D = 37: vector tails in the dot products
    x.requires_grad_()
    d = kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=0.02, tol=1e-10 if dtype == F64 else 1e-6, return_result=True)
    want = ref.wrd(x.detach().double(), y.double(), x_mask=xm, y_mask=ym, eps=0.02, tol=1e-11, max_iter=20000)
    torch.testing.assert_close(d.value.double(), want, atol=atol, rtol=rtol)
    (gx,) = torch.autograd.grad(d.value.sum(), (x,))
    assert bool(torch.isfinite(gx).all())
    if dtype == torch.bfloat16:  # f, g come back rounded to bfloat16: no exact plan to rebuild from them
        return
    x64 = x.detach().double().requires_grad_()
    cost, am, bm = ref.cosine_cost_and_masses(x64, y.double(), xm, ym)
    eps_r = d.eps[:, None, None]
    T = torch.where((am > 0)[:, :, None] & (bm > 0)[:, None, :],
                    am.detach()[:, :, None] * bm[:, None, :] *
                    torch.exp((d.f.double()[:, :, None] + d.g.double()[:, None, :] - cost.detach()) / eps_r),
                    torch.zeros_like(cost))
    (rx,) = torch.autograd.grad(_surrogate(cost, am, bm, d.f.double(), d.g.double(), T.detach()).sum(), (x64,))
    gtol = 1e-9 if dtype == F64 else 5e-5
    torch.testing.assert_close(gx.double(), rx, atol=gtol, rtol=gtol * 10)


# ---- opcheck, compile ----------------------------------------------------------------------------------
def test_opcheck_sinkhorn_ops():
    C, a, b = _problems(3, 4, 5, torch.float32, seed=30, lengths=[(4, 5), (2, 5), (4, 3)])
    for rp in (True, False):
        torch.library.opcheck(torch.ops.kxkernels.sinkhorn_fwd.default,
                              (C.clone().requires_grad_(), a.clone().requires_grad_(), b, 0.05, 500, 1e-6, rp, True))
    res = torch.ops.kxkernels.sinkhorn_fwd(C, a, b, 0.05, 500, 1e-6, False, True)
    torch.library.opcheck(torch.ops.kxkernels.sinkhorn_bwd.default, (torch.ones(3), C, a, b, res[2], res[3], res[7]))


def test_opcheck_wrd_ops():
    x, y, xm, ym = _tokens(3, 5, 4, 8, torch.float32, seed=31)
    torch.library.opcheck(torch.ops.kxkernels.wrd_fwd.default,
                          (x.clone().requires_grad_(), y.clone().requires_grad_(), xm, ym, 0.05, 500, 1e-6, True))
    torch.library.opcheck(torch.ops.kxkernels.wrd_fwd.default,
                          (x.clone().requires_grad_(), y, None, None, 0.05, 500, 1e-6, False))
    out = torch.ops.kxkernels.wrd_fwd(x, y, xm, ym, 0.05, 500, 1e-6, True)
    torch.library.opcheck(torch.ops.kxkernels.wrd_bwd.default, (torch.ones(3), x, y, xm, ym, out[2], out[3], out[6]))


def test_torch_compile_fullgraph():
    x, y, xm, ym = _tokens(4, 6, 5, 16, torch.float32, seed=32)

    def loss(x, y):
        return (kx.wrd(x, y, x_mask=xm, y_mask=ym, eps=0.05) ** 2).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le, lc = loss(xe, y), compiled(xc, y)
    torch.testing.assert_close(lc, le)
    le.backward()
    lc.backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_torch_compile_inductor_sinkhorn():
    C, a, b = _problems(2, 4, 6, torch.float32, seed=33)
    fn = torch.compile(lambda C: kx.sinkhorn(C, a, b, eps=0.05).value.sum() * 2, fullgraph=True)
    torch.testing.assert_close(fn(C), kx.sinkhorn(C, a, b, eps=0.05).value.sum() * 2)


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_input_sinkhorn():
    C, a, b = _problems(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="batch sizes differ"):
        kx.sinkhorn(C, a[:1], b)
    with pytest.raises(ValueError, match="a must have shape"):
        kx.sinkhorn(C, a[:, :2], b)
    with pytest.raises(ValueError, match="b must have shape"):
        kx.sinkhorn(C, a, b[:, :3])
    with pytest.raises(ValueError, match=r"cost must be \[B, M, N\]"):
        kx.sinkhorn(C[0], a, b)
    with pytest.raises(TypeError, match="a must have the dtype of cost"):
        kx.sinkhorn(C, a.double(), b)
    with pytest.raises(TypeError, match="cost must be float"):
        kx.sinkhorn(C.long(), a, b)
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        kx.sinkhorn(C.numpy(), a, b)
    neg = a.clone()
    neg[0, 0], neg[0, 1] = -0.1, neg[0, 1] + 0.1
    with pytest.raises(ValueError, match="a must be non-negative"):
        kx.sinkhorn(C, neg, b)
    with pytest.raises(ValueError, match="must sum to 1"):
        kx.sinkhorn(C, a * 1.5, b)
    with pytest.raises(ValueError, match="b must be finite"):
        kx.sinkhorn(C, a, b * float("nan"))
    half = b.clone()
    half[1] = 0
    with pytest.raises(ValueError, match="mass only in a"):
        kx.sinkhorn(C, a, half)
    for eps in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be"):
            kx.sinkhorn(C, a, b, eps=eps)
    with pytest.raises(TypeError, match="eps must be a number"):
        kx.sinkhorn(C, a, b, eps="0.1")
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        kx.sinkhorn(C, a, b, max_iter=0)
    with pytest.raises(TypeError, match="max_iter must be an int"):
        kx.sinkhorn(C, a, b, max_iter=10.0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        kx.sinkhorn(C, a, b, tol=0)
    with pytest.raises(ValueError, match="objective must be one of"):
        kx.sinkhorn(C, a, b, objective="dual")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            kx.sinkhorn(C, a.to("meta"), b)


def test_bad_input_direct_op_calls_raise_not_crash():
    C, a, b = _problems(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="eps must be"):
        torch.ops.kxkernels.sinkhorn_fwd(C, a, b, 0.0, 10, 1e-6, False, True)
    with pytest.raises(ValueError, match="b must have shape"):
        torch.ops.kxkernels.sinkhorn_fwd(C, a, b[:, :2], 0.1, 10, 1e-6, False, True)
    with pytest.raises(ValueError, match="max_iter"):
        torch.ops.kxkernels.wrd_fwd(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, None, 0.1, 0, 1e-6, True)
    with pytest.raises(ValueError, match="same batch size"):
        torch.ops.kxkernels.wrd_fwd(torch.randn(2, 3, 4), torch.randn(3, 3, 4), None, None, 0.1, 5, 1e-6, True)
    res = torch.ops.kxkernels.sinkhorn_fwd(C, a, b, 0.1, 10, 1e-6, False, True)
    for eps, msg in ((torch.ones(3, dtype=F64), r"eps must have shape \(2,\)"),
                     (torch.tensor([0.1, 0.0], dtype=F64), "eps must be finite and > 0"),
                     (torch.tensor([0.1, float("nan")], dtype=F64), "eps must be finite and > 0")):
        with pytest.raises(ValueError, match=msg):
            torch.ops.kxkernels.sinkhorn_bwd(torch.ones(2), C, a, b, res[2], res[3], eps)


def test_bad_input_wrd():
    x, y, xm, ym = _tokens(2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="same batch size"):
        kx.wrd(x, y[:1])
    with pytest.raises(ValueError, match="same embedding dim"):
        kx.wrd(x, y[..., :4])
    with pytest.raises(ValueError, match=r"x must be \[B, M, D\]"):
        kx.wrd(x[0], y)
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        kx.wrd(x, y.double())
    with pytest.raises(TypeError, match="x_mask must be a bool tensor"):
        kx.wrd(x, y, x_mask=xm.float())
    with pytest.raises(ValueError, match="y_mask must have shape"):
        kx.wrd(x, y, y_mask=ym[:, :2])
    xm0 = xm.clone()
    xm0[0] = False
    with pytest.raises(ValueError, match="tokens only in y"):
        kx.wrd(x, y, x_mask=xm0, y_mask=ym)
    with pytest.raises(ValueError, match="eps must be > 0"):
        kx.wrd(x, y, eps=-0.1)
    with pytest.raises(ValueError, match="tol must be > 0"):
        kx.wrd(x, y, tol=-1.0)


# ---- real data: all-MiniLM-L6-v2 token vectors of STS sentence pairs -----------------------------------
REAL_PAIRS = 150


@pytest.fixture(scope="module")
def real_pairs():
    try:
        return real_data.sts_pairs(real_data.STS_PATH, limit=REAL_PAIRS)
    except real_data.RealDataUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def exact_wrd(real_pairs):
    out = []
    for i in range(len(real_pairs)):
        x, y = (t.double().numpy() for t in real_pairs.tokens(i))
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        cost = 1 - (x / nx[:, None]) @ (y / ny[:, None]).T
        out.append(ot.emd2(nx / nx.sum(), ny / ny.sum(), cost))
    return torch.tensor(out, dtype=F64)


def test_real_pairs_wrd_accuracy_against_emd2(real_pairs, exact_wrd):
    """The first 150 STS pairs (the suite's real case is the first 64): every pair within 1% of
    exact with the defaults."""
    P = real_pairs
    default = kx.wrd(P.x, P.y, x_mask=P.x_mask, y_mask=P.y_mask, return_result=True)
    assert bool((default.err < 1e-6).all()), f"not converged: {int((default.err >= 1e-6).sum())} pairs"
    rel = (default.value.double() - exact_wrd).abs() / exact_wrd
    assert rel.max().item() < 0.01, rel.max().item()  # the bound, every pair
    assert rel.mean().item() < 0.003, rel.mean().item()  # measured about 1e-3
    fine = kx.wrd(P.x, P.y, x_mask=P.x_mask, y_mask=P.y_mask, eps=0.003)
    rel_fine = ((fine.double() - exact_wrd).abs() / exact_wrd).mean().item()
    assert rel_fine < 0.001, rel_fine      # measured about 1e-4


def test_real_pairs_spearman_matches_exact(real_pairs, exact_wrd):
    P = real_pairs
    d = kx.wrd(P.x, P.y, x_mask=P.x_mask, y_mask=P.y_mask)
    rho_kx = real_data.spearman(-d.double(), P.scores)
    rho_exact = real_data.spearman(-exact_wrd, P.scores)
    assert abs(rho_kx - rho_exact) <= 0.005, (rho_kx, rho_exact)
    assert rho_exact > 0.3  # WRD tracks the human scores at all (sanity of the data path)


def test_real_pairs_match_reference_float64(real_pairs):
    P = real_pairs
    got = kx.wrd(P.x, P.y, x_mask=P.x_mask, y_mask=P.y_mask, eps=0.05)
    want = ref.wrd(P.x.double(), P.y.double(), x_mask=P.x_mask, y_mask=P.y_mask, eps=0.05, tol=1e-10,
                   max_iter=20000)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
