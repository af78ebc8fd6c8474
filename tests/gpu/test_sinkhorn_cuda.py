"""sinkhorn_fwd / sinkhorn_bwd / wrd_fwd / wrd_bwd on CUDA tensors (the CUDA C++ kernels of
csrc/cuda/sinkhorn_kernel.cuh): against the same ops on the CPU (without Newton steps, so both run
the reference's schedule) and against the float64 eager reference on the same (rounded) inputs.

Tolerances: the kernels' float32 math with __expf/__logf agrees with float64 math to about 1e-6
relative on the plan and value once both have converged to tol = 1e-6 (see the header's precision
note); n_iter may differ by a few sweeps where the error crosses tol at a different rounding.
"""
import pytest
import torch

import kxkernels
from kxkernels.ops.sinkhorn import reference as R

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

ops = torch.ops.kxkernels


def per_problem(grad, eps):
    """The backward ops take one eps per problem (the forward's eps_reached)."""
    return torch.full((grad.shape[0],), eps, dtype=torch.float64)
EPS, TOL, MAX_ITER = 0.05, 1e-6, 2000
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative tolerance of a plan rounded to the input dtype
PLAN_RTOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not kxkernels.build_info()["cuda"]:
        pytest.skip("the extension was built without its CUDA sources")


def same_schedule(n_iter, expected):
    """Sweep counts of the same schedule: a few sweeps apart where float32 and float64 rounding
    put an error on different sides of tol or STAGE_TOL."""
    n_iter, expected = n_iter.cpu(), expected.cpu()
    slack = 3 + expected // 20
    assert bool(((n_iter - expected).abs() <= slack).all()), f"n_iter {n_iter} vs {expected}"


def close(actual, expected, atol, rtol, what, equal_nan=False):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), atol=atol,
                               rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")


def padded_batch(B, M, N, scale=1.0, seed=0):
    """Problems with random lengths (1..M rows, 1..N columns, padding by zero mass at the end) and
    an interior zero mass where there is room; problem 0 is all padding, problem 1 has mass on the
    rows only."""
    g = torch.Generator().manual_seed(seed)
    cost = scale * torch.rand(B, M, N, generator=g)
    a = torch.rand(B, M, generator=g) + 0.05
    b = torch.rand(B, N, generator=g) + 0.05
    ms = torch.randint(1, M + 1, (B,), generator=g)
    ns = torch.randint(1, N + 1, (B,), generator=g)
    for p in range(B):
        a[p, int(ms[p]):] = 0
        b[p, int(ns[p]):] = 0
        if ms[p] > 3:
            a[p, 1] = 0
        if ns[p] > 3:
            b[p, 2] = 0
    a[0] = 0
    b[0] = 0
    b[1] = 0
    return cost, a, b


def ref_fwd(cost, a, b, eps=EPS, max_iter=MAX_ITER, tol=TOL):
    return R.sinkhorn(cost.cpu().double(), a.cpu().double(), b.cpu().double(), eps=eps, max_iter=max_iter,
                      tol=tol, return_plan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_fwd(dtype):
    cost, a, b = padded_batch(24, 48, 40, seed=1)
    cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
    out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False)
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    assert all(t.is_cuda for t in out)
    assert value.dtype == dual.dtype == f.dtype == g.dtype == err.dtype == torch.float32
    assert n_iter.dtype == torch.int64 and plan.dtype == dtype and plan.shape == cost.shape
    # special problems (the CPU op's conventions): all padding, mass on one side only
    assert float(value[0]) == 0 and float(err[0]) == 0 and int(n_iter[0]) == 0
    assert float(value[1]) == 0 and float(err[1]) == 1 and int(n_iter[1]) == 0
    assert bool((f[:2] == 0).all()) and bool((g[:2] == 0).all()) and bool((plan[:2] == 0).all())
    live = slice(2, None)
    rv, rd, rf, rg, rn, re, rp = ref_fwd(cost[live], a[live], b[live])
    close(value[live], rv, 2e-6, 1e-4, "value vs reference")
    close(dual[live], rd, 2e-6, 1e-4, "dual vs reference")
    close(f[live], rf, 5e-5, 1e-4, "f vs reference")
    close(g[live], rg, 5e-5, 1e-4, "g vs reference")
    close(plan[live], rp, 1e-6, PLAN_RTOL[dtype], "plan vs reference")
    same_schedule(n_iter[live], rn)
    assert bool((err[live] < TOL).all()), err
    # padding stays exactly zero
    assert bool((f.cpu()[a <= 0] == 0).all()) and bool((g.cpu()[b <= 0] == 0).all())
    assert bool((plan.cpu()[(a <= 0)[:, :, None].expand_as(plan.cpu())] == 0).all())
    cpu = ops.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False)
    for name, x, y in zip(("value", "dual", "f", "g"), out, cpu):
        close(x, y, 5e-5, 1e-4, f"{name} vs CPU op")
    close(plan, cpu[6], 1e-6, PLAN_RTOL[dtype], "plan vs CPU op")
    same_schedule(n_iter, cpu[4])


def test_sinkhorn_fwd_options_and_layouts():
    cost, a, b = padded_batch(6, 33, 20, seed=2)
    base = cost.transpose(1, 2).contiguous().cuda()
    ct = base.transpose(1, 2)  # strided (B, M, N) view
    a2 = torch.zeros(6, 66).index_copy_(1, torch.arange(0, 66, 2), a).cuda()[:, ::2]  # stride 2
    ref = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False)
    out = ops.sinkhorn_fwd(ct, a2, b.cuda(), EPS, MAX_ITER, TOL, False, False)
    assert out[6].numel() == 0 and out[6].dtype == torch.float32
    for x, y in zip(out[:6], ref[:6]):
        assert torch.equal(x, y), "strided inputs change the result"
    newton = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, True)
    for x, y in zip(newton, ref):
        assert torch.equal(x, y), "the newton flag changes the CUDA result (documented as ignored)"
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        on_stream = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False)
    s.synchronize()
    for x, y in zip(on_stream, ref):
        assert torch.equal(x, y)


def test_sinkhorn_fwd_special_inputs():
    cost, a, b = padded_batch(4, 9, 8, seed=3)
    a[2:, 0] = 1
    b[2:, 0] = 1
    cost[2, 0, 0] = float("inf")   # a real entry: NaN results
    a[3, 8] = 0
    cost[3, 8, 0] = float("nan")   # padding: ignored
    value, dual, f, g, n_iter, err, plan, eps_reached = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL,
                                                           True, False)
    assert bool(value[2].isnan()) and bool(dual[2].isnan()) and bool(err[2].isnan()) and int(n_iter[2]) == 0
    assert bool((f[2] == 0).all()) and bool((plan[2] == 0).all())
    assert bool(value[3].isfinite()) and float(err[3]) < TOL
    # the CPU op raises on a non-finite real cost (the CUDA op marks it NaN): compare the others
    keep = torch.tensor([0, 1, 3])
    cpu = ops.sinkhorn_fwd(cost[keep], a[keep], b[keep], EPS, MAX_ITER, TOL, True, False)
    close(value[keep.cuda()], cpu[0], 5e-5, 1e-4, "value vs CPU op")
    with pytest.raises(ValueError, match="cost"):
        ops.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False)


@pytest.mark.parametrize("offset", [300.0, -300.0])
def test_sinkhorn_fwd_cost_offset(offset):
    """exp(-C / eps0) under/overflows at the start: the exact fallback of the stabilized sums."""
    cost, a, b = padded_batch(8, 20, 20, seed=4)
    out = ops.sinkhorn_fwd((cost + offset).cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False)
    ref = ref_fwd(cost[2:] + offset, a[2:], b[2:])
    close(out[0][2:], ref[0], 1e-4, 1e-6, "value")
    close(out[6][2:], ref[6], 1e-5, 2e-3, "plan")
    assert bool((out[5][2:] < TOL).all())


def test_sinkhorn_fwd_max_iter():
    """max_iter reached (before and at the final eps): the last plain column update and the row
    error of the plan returned, as on the CPU."""
    g = torch.Generator().manual_seed(5)
    cost = 5.0 * torch.rand(8, 16, 12, generator=g)
    a = torch.rand(8, 16, generator=g) + 0.05
    b = torch.rand(8, 12, generator=g) + 0.05
    a[1::2, 10:] = 0  # at least 10 x 12 real: none converges in 20 sweeps at eps = 0.02
    for max_iter in (1, 4, 20):
        out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), 0.02, max_iter, TOL, True, False)
        cpu = ops.sinkhorn_fwd(cost, a, b, 0.02, max_iter, TOL, True, False)
        assert torch.equal(out[4].cpu(), torch.full((8,), max_iter)) and torch.equal(cpu[4], out[4].cpu())
        close(out[5], cpu[5], 1e-5, 1e-3, f"err at max_iter={max_iter}")
        close(out[6], cpu[6], 1e-5, 1e-3, f"plan at max_iter={max_iter}")
        close(out[0], cpu[0], 1e-5, 1e-4, f"value at max_iter={max_iter}")


def test_sinkhorn_fwd_small_eps_large_range():
    cost, a, b = padded_batch(16, 24, 24, scale=50.0, seed=6)
    out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), 0.01, 5000, TOL, True, False)
    ref = ref_fwd(cost[2:], a[2:], b[2:], eps=0.01, max_iter=5000)
    close(out[0][2:], ref[0], 1e-4, 1e-5, "value")
    close(out[6][2:], ref[6], 1e-5, 1e-3, "plan")
    # plain Sinkhorn (no Newton steps on CUDA) need not converge in 5000 sweeps at spread / eps =
    # 5000; where the reference's schedule converges, so must the kernel's
    converged = ref[4] < 5000
    assert bool((out[5][2:].cpu()[converged] < TOL).all()), (out[5], ref[5])
    same_schedule(out[4][2:][converged.cuda()], ref[4][converged])


def test_float64_refused():
    c = torch.rand(2, 3, 4, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ops.sinkhorn_fwd(c, torch.ones(2, 3, device="cuda", dtype=torch.float64),
                         torch.ones(2, 4, device="cuda", dtype=torch.float64), EPS, 10, TOL, False, False)


# ---- past one block's shared memory (128 x 128 on sm_80, 165 x 165 on sm_90) ------------------------

@pytest.mark.parametrize("side", [128, 170, 512])
def test_sinkhorn_large_problems(side):
    """Problems up to BERT's 512 tokens a side: those past shared memory keep their matrices in
    the global workspace; forward and backward match the float64 reference and the CPU op."""
    g = torch.Generator().manual_seed(side)
    cost = torch.rand(2, side, side, generator=g)
    a = torch.rand(2, side, generator=g) + 0.05
    b = torch.rand(2, side, generator=g) + 0.05
    a[1, side // 2:] = 0  # the second problem is half padding
    out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False)
    value, dual, f, g_, n_iter, err, plan, eps_reached = out
    rv, rd, rf, rg, rn, re, rp = ref_fwd(cost, a, b)
    close(value, rv, 2e-6, 1e-4, "value vs reference")
    close(f, rf, 5e-5, 1e-4, "f vs reference")
    close(plan, rp, 1e-7, 1e-3, "plan vs reference")
    assert bool((err < TOL).all()), err
    same_schedule(n_iter, rn)
    grad = torch.tensor([1.0, -0.5])
    gc, ga, gb = ops.sinkhorn_bwd(grad.cuda(), cost.cuda(), a.cuda(), b.cuda(), f, g_, eps_reached)
    ec, ea, eb = bwd_expected(grad, cost, a, b, f, g_, EPS)
    close(gc, ec, 1e-7, 1e-3, "grad_cost")
    close(ga, ea, 1e-6, 1e-4, "grad_a")


def test_sinkhorn_mixed_lengths_batch():
    """A 10 x 10 pair beside a 300 x 300 one in a batch padded to 300 (they run in different
    launch groups), and many short pairs with one long one."""
    B, L = 33, 300
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(B, L, L, generator=g)
    a = torch.rand(B, L, generator=g) + 0.05
    b = torch.rand(B, L, generator=g) + 0.05
    for p in range(1, B):
        a[p, 10 + p:] = 0
        b[p, 10 + (p * 7) % 40:] = 0
    out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False)
    rv, rd, rf, rg, rn, re, rp = ref_fwd(cost, a, b)
    close(out[0], rv, 2e-6, 1e-4, "value vs reference")
    close(out[2], rf, 5e-5, 1e-4, "f vs reference")
    close(out[6], rp, 1e-7, 1e-3, "plan vs reference")
    assert bool((out[5] < TOL).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrd_512_tokens(dtype):
    """WRD on pairs of up to 512 tokens (BERT's limit), D = 384, with short pairs in the same batch:
    forward against the float64 reference, backward against the CPU op."""
    x, y, xm, ym = token_batch(6, 512, 512, 384, dtype=dtype, lengths=(5, 512), seed=21)
    xm[0] = True
    ym[0] = True
    xc, yc, xmc, ymc = cuda_all(x, y, xm, ym)
    value, dual, f, g, n_iter, err, eps_reached = ops.wrd_fwd(xc, yc, xmc, ymc, EPS, MAX_ITER, TOL, False)
    ref = ref_wrd(x, y, xm, ym)
    close(value, ref[0], 1e-5, 1e-4, "value vs reference")
    close(f, ref[2], 1e-4, 1e-4, "f vs reference")
    assert bool((err < TOL).all()), err
    grad = torch.linspace(-1, 1, 6)
    gx, gy = ops.wrd_bwd(grad.cuda(), xc, yc, xmc, ymc, f, g, eps_reached)
    cx, cy = ops.wrd_bwd(grad, x, y, xm, ym, f.cpu(), g.cpu(), eps_reached.cpu())
    rtol, atol = (1e-3, 1e-5) if dtype == torch.float32 else (2e-2, 2e-3)
    close(gx, cx, atol, rtol, "grad_x vs CPU op")
    close(gy, cy, atol, rtol, "grad_y vs CPU op")


def test_sinkhorn_bwd_long_sides():
    """sinkhorn_bwd whose masses and potentials exceed shared memory (M + N past ~10,000 on
    sm_80): they go to a workspace."""
    B, M, N = 2, 9000, 4000
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(B, M, N, generator=g)
    a = torch.rand(B, M, generator=g) + 0.05
    b = torch.rand(B, N, generator=g) + 0.05
    f = torch.randn(B, M, generator=g) * 0.01
    g_ = torch.randn(B, N, generator=g) * 0.01
    grad = torch.tensor([1.0, 2.0])
    out = ops.sinkhorn_bwd(grad.cuda(), cost.cuda(), a.cuda(), b.cuda(), f.cuda(), g_.cuda(), per_problem(grad.cuda(), 1.0))
    exp = bwd_expected(grad, cost, a, b, f, g_, 1.0)
    for name, x, e in zip(("grad_cost", "grad_a", "grad_b"), out, exp):
        close(x, e, 1e-9, 1e-4, name)


def bwd_expected(grad, cost, a, b, f, g, eps):
    """The envelope gradient (csrc/cpu/sinkhorn.cpp) in float64."""
    C, a, b, f, g, gr = (t.cpu().double() for t in (cost, a, b, f, g, grad))
    va, vb = a > 0, b > 0
    sa = torch.where(va, a, 0).sum(1, keepdim=True)
    sb = torch.where(vb, b, 0).sum(1, keepdim=True)
    live = (sa > 0) & (sb > 0)
    an = torch.where(va & live, a / sa.clamp_min(1e-300), 0)
    bn = torch.where(vb & live, b / sb.clamp_min(1e-300), 0)
    fa = (an * f).sum(1, keepdim=True)
    gb = (bn * g).sum(1, keepdim=True)
    T = an[:, :, None] * bn[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - C) / eps)
    T = torch.where((an[:, :, None] > 0) & (bn[:, None, :] > 0), T, 0)
    ga = torch.where(an > 0, gr[:, None] * (f - fa) / sa.clamp_min(1e-300), 0)
    gbb = torch.where(bn > 0, gr[:, None] * (g - gb) / sb.clamp_min(1e-300), 0)
    return gr[:, None, None] * T, ga, gbb


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_bwd(dtype):
    cost, a, b = padded_batch(12, 30, 26, seed=7)
    cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
    fwd = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, False, False)
    f, g = fwd[2], fwd[3]
    grad = torch.linspace(-1.0, 2.0, 12, device="cuda")
    out = ops.sinkhorn_bwd(grad, cost.cuda(), a.cuda(), b.cuda(), f, g, per_problem(grad, EPS))
    exp = bwd_expected(grad, cost, a, b, f, g, EPS)
    cpu = ops.sinkhorn_bwd(grad.cpu(), cost, a, b, f.cpu(), g.cpu(), per_problem(grad.cpu(), EPS))
    rtol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for name, x, e, c in zip(("grad_cost", "grad_a", "grad_b"), out, exp, cpu):
        assert x.dtype == dtype and x.is_cuda
        close(x, e, 1e-6, rtol, name)
        close(x, c, 1e-6, rtol, name + " vs CPU op")


def token_batch(B, M, N, D, dtype=torch.float32, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, D, generator=g).to(dtype)
    y = torch.randn(B, N, D, generator=g).to(dtype)
    lo, hi = lengths or (1, min(M, N))
    lx = torch.randint(lo, hi + 1, (B,), generator=g).clamp_max(M)
    ly = torch.randint(lo, hi + 1, (B,), generator=g).clamp_max(N)
    xm = torch.arange(M)[None, :] < lx[:, None]
    ym = torch.arange(N)[None, :] < ly[:, None]
    return x, y, xm, ym


def ref_wrd(x, y, xm, ym, eps=EPS):
    cost, a, b = R.cosine_cost_and_masses(x.cpu().double(), y.cpu().double(),
                                          None if xm is None else xm.cpu(), None if ym is None else ym.cpu())
    return R.sinkhorn(cost, a, b, eps=eps, max_iter=MAX_ITER, tol=TOL)


def cuda_all(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrd_fwd(dtype):
    x, y, xm, ym = token_batch(16, 40, 70, 100, dtype=dtype, seed=8)
    x[3, 0] = 0       # zero norm: no mass
    xm[4] = False     # mass on y only: err 1
    xm[5] = False
    ym[5] = False     # all padding
    out = ops.wrd_fwd(*cuda_all(x, y, xm, ym), EPS, MAX_ITER, TOL, False)
    value, dual, f, g, n_iter, err, eps_reached = out
    assert value.dtype == f.dtype == torch.float32 and n_iter.dtype == torch.int64
    assert float(err[4]) == 1 and float(value[4]) == 0 and float(err[5]) == 0 and float(value[5]) == 0
    live = [p for p in range(16) if p not in (4, 5)]
    ref = ref_wrd(x[live], y[live], xm[live], ym[live])
    close(value[live], ref[0], 1e-5, 1e-4, "value vs reference")
    close(dual[live], ref[1], 1e-5, 1e-4, "dual vs reference")
    close(f[live], ref[2], 1e-4, 1e-4, "f vs reference")
    assert bool((err[live] < TOL).all())
    cpu = ops.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL, False)
    close(value, cpu[0], 1e-5, 1e-4, "value vs CPU op")
    close(g, cpu[3], 1e-4, 1e-4, "g vs CPU op")
    same_schedule(n_iter, cpu[4])
    no_masks = ops.wrd_fwd(x[6:].cuda(), y[6:].cuda(), None, None, EPS, MAX_ITER, TOL, False)
    close(no_masks[0], ref_wrd(x[6:], y[6:], None, None)[0], 1e-5, 1e-4, "value without masks")


def test_wrd_fwd_non_finite_token():
    x, y, xm, ym = token_batch(3, 8, 9, 32, seed=9)
    xm[:] = True
    x[0, 2, 3] = float("nan")   # real token: NaN result
    xm[1, 5] = False
    x[1, 5, 0] = float("inf")   # masked token: ignored
    value, _, f, _, n_iter, err, _ = ops.wrd_fwd(*cuda_all(x, y, xm, ym), EPS, MAX_ITER, TOL, False)
    assert bool(value[0].isnan()) and bool(err[0].isnan()) and int(n_iter[0]) == 0 and bool((f[0] == 0).all())
    assert bool(value[1:].isfinite().all())


def wrd_grad_expected(grad, x, y, xm, ym, f, g, eps):
    """The envelope gradient (T, f, g held fixed), by float64 autograd."""
    x = x.cpu().double().requires_grad_()
    y = y.cpu().double().requires_grad_()
    cost, a, b = R.cosine_cost_and_masses(x, y, xm.cpu(), ym.cpu())
    f, g = f.cpu().double(), g.cpu().double()
    va, vb = a > 0, b > 0
    T = a[:, :, None] * b[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)
    T = torch.where(va[:, :, None] & vb[:, None, :], T, 0).detach()
    L = (grad.cpu().double() * ((T * cost).sum((1, 2)) + (torch.where(va, f, 0) * a).sum(1)
                                + (torch.where(vb, g, 0) * b).sum(1))).sum()
    return torch.autograd.grad(L, (x, y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrd_bwd(dtype):
    x, y, xm, ym = token_batch(10, 33, 21, 96, dtype=dtype, seed=10)
    x[2, 0] = 0
    xm[3] = False  # no mass: zero gradients
    fwd = ops.wrd_fwd(*cuda_all(x, y, xm, ym), EPS, MAX_ITER, TOL, False)
    f, g = fwd[2], fwd[3]
    grad = torch.linspace(-1.0, 1.5, 10, device="cuda")
    gx, gy = ops.wrd_bwd(grad, *cuda_all(x, y, xm, ym), f, g, per_problem(grad, EPS))
    assert gx.dtype == dtype and gy.dtype == dtype and gx.shape == x.shape and gy.shape == y.shape
    ex, ey = wrd_grad_expected(grad, x, y, xm, ym, f, g, EPS)
    rtol, atol = {torch.float32: (1e-3, 1e-5), torch.float16: (5e-3, 1e-3),
                  torch.bfloat16: (2e-2, 2e-3)}[dtype]
    close(gx, ex, atol, rtol, "grad_x")
    close(gy, ey, atol, rtol, "grad_y")
    assert bool((gx[3] == 0).all()) and bool((gy[3] == 0).all()) and bool((gx[2, 0] == 0).all())
    assert bool((gx.cpu()[~xm] == 0).all()) and bool((gy.cpu()[~ym] == 0).all())
    cx, cy = ops.wrd_bwd(grad.cpu(), x, y, xm, ym, f.cpu(), g.cpu(), per_problem(grad.cpu(), EPS))
    close(gx, cx, atol, rtol, "grad_x vs CPU op")
    close(gy, cy, atol, rtol, "grad_y vs CPU op")


@pytest.mark.slow
def test_wrd_4096_pairs():
    """4096 sentence pairs of 8..64 tokens, dim 384 (MiniLM-sized), forward and backward, against the
    CPU ops (the float64 reference on a sample)."""
    B, L, D = 4096, 64, 384
    x, y, xm, ym = token_batch(B, L, L, D, lengths=(8, 64), seed=11)
    xc, yc, xmc, ymc = cuda_all(x, y, xm, ym)
    value, dual, f, g, n_iter, err, eps_reached = ops.wrd_fwd(xc, yc, xmc, ymc, EPS, MAX_ITER, TOL, False)
    torch.cuda.synchronize()
    assert bool((err < TOL).all()), f"{int((err >= TOL).sum())} problems did not converge"
    cpu = ops.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL, False)
    close(value, cpu[0], 1e-5, 1e-4, "value vs CPU op")
    close(f, cpu[2], 1e-4, 1e-4, "f vs CPU op")
    sample = torch.arange(0, B, 64)
    ref = ref_wrd(x[sample], y[sample], xm[sample], ym[sample])
    close(value[sample.cuda()], ref[0], 1e-5, 1e-4, "value vs reference (sample)")
    grad = torch.ones(B, device="cuda")
    gx, gy = ops.wrd_bwd(grad, xc, yc, xmc, ymc, f, g, per_problem(grad, EPS))
    cx, cy = ops.wrd_bwd(grad.cpu(), x, y, xm, ym, f.cpu(), g.cpu(), per_problem(grad.cpu(), EPS))
    close(gx, cx, 1e-5, 1e-3, "grad_x vs CPU op")
    close(gy, cy, 1e-5, 1e-3, "grad_y vs CPU op")


# ---- eps per problem: relative_eps, a stop before the schedule ends, the backward's eps (B,) --------

def spread_batch(seed=30):
    """Problems of different lengths and cost spreads in one batch padded to 200 x 200: a 200 x 200
    problem (past one block's shared memory on sm_80 and sm_90), spreads from 0.02 to 20, a
    constant cost (spread 0: the requested eps itself); problem 0 is all padding, 1 mass on rows only."""
    cost, a, b = padded_batch(8, 200, 200, seed=seed)
    a[2] = torch.rand(200) + 0.05  # 200 x 200, every row and column real
    b[2] = torch.rand(200) + 0.05
    for p, scale in enumerate((1.0, 1.0, 3.0, 0.02, 20.0, 1.0, 0.5, 7.0)):
        cost[p] *= scale
    cost[5] = 0.7
    return cost, a, b


def test_relative_eps_matches_cpu_op():
    """relative_eps=True on CUDA (it raised a ValueError before): each problem runs at eps times
    its own cost spread, as on the CPU; eps_reached, value, potentials and plan match the CPU op
    (no Newton steps: the same schedule) and the float64 reference."""
    cost, a, b = spread_batch()
    out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, True, False, True)
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    assert eps_reached.dtype == torch.float64 and eps_reached.is_cuda
    cpu = ops.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False, True)
    assert torch.equal(eps_reached.cpu(), cpu[7]), (eps_reached, cpu[7])
    assert float(eps_reached[5]) == EPS and len(set(eps_reached[2:].tolist())) == 6, eps_reached
    for name, k, atol in (("value", 0, 5e-5), ("dual", 1, 5e-5), ("f", 2, 1e-4), ("g", 3, 1e-4)):
        close(out[k], cpu[k], atol, 1e-4, f"{name} vs CPU op")
    close(plan, cpu[6], 1e-6, 1e-3, "plan vs CPU op")
    same_schedule(n_iter, cpu[4])
    assert bool((err[2:] < TOL).all()), err
    live = slice(2, None)
    ref = R.sinkhorn(cost[live].double(), a[live].double(), b[live].double(), eps=EPS, max_iter=MAX_ITER,
                     tol=TOL, return_plan=True, return_eps=True, relative_eps=True)
    close(eps_reached[live], ref[7], 0, 1e-6, "eps_reached vs reference")
    close(value[live], ref[0], 2e-6, 1e-4, "value vs reference")
    close(plan[live], ref[6], 1e-7, 1e-3, "plan vs reference")
    absolute = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), EPS, MAX_ITER, TOL, False, False, False)
    assert bool((absolute[7] == EPS).all())


@pytest.mark.parametrize("relative", [False, True])
def test_stop_before_target_eps(relative):
    """max_iter stops the eps schedule before the target: eps_reached is the stage eps (the CPU
    op's), err >= tol (also for a separable cost, solved at every stage), value and plan of that eps."""
    g = torch.Generator().manual_seed(31)
    cost = 5.0 * torch.rand(6, 16, 12, generator=g)
    a = torch.rand(6, 16, generator=g) + 0.05
    b = torch.rand(6, 12, generator=g) + 0.05
    a[1::2, 10:] = 0
    cost[2] *= 0.1
    cost[3] = torch.linspace(0, 2, 16)[:, None] + torch.linspace(0, 3, 12)[None, :]
    for max_iter in (1, 3, 4):
        out = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), 1e-3, max_iter, TOL, True, False, relative)
        cpu = ops.sinkhorn_fwd(cost, a, b, 1e-3, max_iter, TOL, True, False, relative)
        assert torch.equal(out[7].cpu(), cpu[7]), (max_iter, out[7], cpu[7])
        assert bool((out[5] >= TOL).all()), out[5]
        assert float(out[5][3]) == float(cpu[5][3]), (out[5], cpu[5])
        close(out[5], cpu[5], 1e-5, 1e-3, f"err at max_iter={max_iter}")
        close(out[0], cpu[0], 1e-5, 1e-4, f"value at max_iter={max_iter}")
        close(out[6], cpu[6], 1e-5, 1e-3, f"plan at max_iter={max_iter}")


def test_sinkhorn_bwd_per_problem_eps():
    """The backward at each problem's own eps (early stop, relative eps: all different) matches
    the CPU backward and the float64 envelope gradient; before, CUDA refused eps that differ."""
    cost, a, b = padded_batch(10, 24, 20, scale=4.0, seed=32)
    cost[3] *= 0.1
    fwd = ops.sinkhorn_fwd(cost.cuda(), a.cuda(), b.cuda(), 1e-3, 5, TOL, False, False, True)
    f, g, eps = fwd[2], fwd[3], fwd[7]
    assert len(set(eps[2:].tolist())) == 8, eps
    grad = torch.linspace(-1.0, 2.0, 10)
    out = ops.sinkhorn_bwd(grad.cuda(), cost.cuda(), a.cuda(), b.cuda(), f, g, eps)
    cpu = ops.sinkhorn_bwd(grad, cost, a, b, f.cpu(), g.cpu(), eps.cpu())
    exp = bwd_expected_eps(grad, cost, a, b, f, g, eps)
    for name, x, c, e in zip(("grad_cost", "grad_a", "grad_b"), out, cpu, exp):
        close(x, c, 1e-6, 1e-4, name + " vs CPU op")
        close(x, e, 1e-6, 1e-4, name)
    on_host = ops.sinkhorn_bwd(grad.cuda(), cost.cuda(), a.cuda(), b.cuda(), f, g, eps.cpu())  # eps on the host
    for x, y in zip(out, on_host):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="eps"):
        ops.sinkhorn_bwd(grad.cuda(), cost.cuda(), a.cuda(), b.cuda(), f, g, torch.zeros(10, device="cuda"))


def bwd_expected_eps(grad, cost, a, b, f, g, eps):
    """bwd_expected at a per-problem eps (B,)."""
    outs = [bwd_expected(grad[p:p + 1], cost[p:p + 1], a[p:p + 1], b[p:p + 1], f[p:p + 1], g[p:p + 1],
                         float(eps[p])) for p in range(cost.shape[0])]
    return tuple(torch.cat([o[k] for o in outs]) for k in range(3))


def spread_tokens(seed=33):
    """WRD pairs of different lengths and spreads: a 200 x 180 pair (past shared memory), short
    pairs, a pair of one topic (a shared direction plus small noise: cosines close together)."""
    x, y, xm, ym = token_batch(4, 200, 180, 64, lengths=(5, 40), seed=seed)
    xm[0] = True
    ym[0] = True
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.randn(64, generator=g)
    x[2] = c + 0.3 * torch.randn(200, 64, generator=g)
    y[2] = c + 0.3 * torch.randn(180, 64, generator=g)
    return x, y, xm, ym


def test_wrd_relative_eps_matches_cpu_op():
    """wrd_fwd / wrd_bwd with relative_eps=True (kxkernels.wrd's default) on CUDA: eps_reached from
    the in-kernel cosine cost's spread, value, potentials and gradients match the CPU op."""
    x, y, xm, ym = spread_tokens()
    xc, yc, xmc, ymc = cuda_all(x, y, xm, ym)
    value, dual, f, g, n_iter, err, eps_reached = ops.wrd_fwd(xc, yc, xmc, ymc, EPS, MAX_ITER, TOL, False, True)
    cpu = ops.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL, False, True)
    close(eps_reached, cpu[6], 0, 1e-5, "eps_reached vs CPU op")
    assert float(eps_reached[2]) < 0.8 * float(eps_reached[0]), eps_reached
    close(value, cpu[0], 1e-5, 1e-4, "value vs CPU op")
    close(f, cpu[2], 1e-4, 1e-4, "f vs CPU op")
    close(g, cpu[3], 1e-4, 1e-4, "g vs CPU op")
    same_schedule(n_iter, cpu[4])
    assert bool((err < TOL).all()), err
    grad = torch.tensor([1.0, -0.5, 2.0, 0.3])
    gx, gy = ops.wrd_bwd(grad.cuda(), xc, yc, xmc, ymc, f, g, eps_reached)
    cx, cy = ops.wrd_bwd(grad, x, y, xm, ym, f.cpu(), g.cpu(), eps_reached.cpu())
    close(gx, cx, 1e-5, 1e-3, "grad_x vs CPU op")
    close(gy, cy, 1e-5, 1e-3, "grad_y vs CPU op")


def test_wrd_default_arguments_on_cuda():
    """kxkernels.wrd with its defaults (relative_eps=True) runs on CUDA tensors -- it raised a
    ValueError before -- and gives the CPU's distances and gradients (the CPU adds Newton steps:
    both converged to tol, so they agree to the tolerance)."""
    x, y, xm, ym = token_batch(8, 30, 25, 48, lengths=(3, 25), seed=34)
    xc, yc = x.cuda().requires_grad_(), y.cuda().requires_grad_()
    d = kxkernels.wrd(xc, yc, x_mask=xm.cuda(), y_mask=ym.cuda())
    xh, yh = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    dh = kxkernels.wrd(xh, yh, x_mask=xm, y_mask=ym)
    close(d, dh, 1e-5, 1e-4, "wrd vs CPU")
    w = torch.linspace(0.5, 1.5, 8)
    (d * w.cuda()).sum().backward()
    (dh * w).sum().backward()
    close(xc.grad, xh.grad, 1e-5, 1e-3, "d wrd / dx vs CPU")
    close(yc.grad, yh.grad, 1e-5, 1e-3, "d wrd / dy vs CPU")
    res = kxkernels.wrd(x.cuda(), y.cuda(), x_mask=xm.cuda(), y_mask=ym.cuda(), return_result=True)
    close(res.eps, kxkernels.wrd(x, y, x_mask=xm, y_mask=ym, return_result=True).eps, 0, 1e-5, "eps vs CPU")
