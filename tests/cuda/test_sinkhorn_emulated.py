"""The CUDA Sinkhorn/WRD kernels (csrc/cuda/sinkhorn_kernel.cuh), run on the host under the CUDA
emulator of tests/cuda/emu (one coroutine per CUDA thread; barriers, warp shuffles/ballots, dynamic
shared memory with a guard page), against the float64 reference (kxkernels/ops/sinkhorn/reference.py)
and the CPU ops. This checks the kernels' logic -- schedule, padding, compaction, reductions,
barriers, outputs -- without a GPU; the numerics of __expf/__logf are host expf/logf here, so the
float tolerances are those of float32 math, and tests/gpu/test_sinkhorn_cuda.py checks the device.
"""
import os

import pytest
import torch

from kxkernels.ops.sinkhorn import reference as R

from . import _emu

pytestmark = pytest.mark.skipif(_emu.compiler() is None, reason="no C++ compiler (g++/c++) on PATH")

HAS_CPU_OPS = hasattr(torch.ops.kxkernels, "sinkhorn_fwd") and hasattr(torch.ops.kxkernels, "wrd_bwd")
EPS, TOL, MAX_ITER = 0.05, 1e-6, 2000


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _emu.SinkhornEmu(_emu.build(str(tmp_path_factory.mktemp("emu"))))


def with_threads(emu, threads, seed=1):
    return _emu.SinkhornEmu(emu.exe, threads=threads, seed=seed)


def ref_fwd(cost, a, b, eps=EPS, max_iter=MAX_ITER, tol=TOL):
    return R.sinkhorn(cost.double(), a.double(), b.double(), eps=eps, max_iter=max_iter, tol=tol,
                      return_plan=True)


def close(actual, expected, atol, rtol, what, equal_nan=False):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def padded_batch(shapes, M, N, scale=1.0, seed=0):
    """Problems of (m, n) real rows/columns inside (M, N), padding by zero mass (trailing, and one
    interior zero each where there is room)."""
    g = torch.Generator().manual_seed(seed)
    B = len(shapes)
    cost = scale * torch.rand(B, M, N, generator=g)
    a = torch.rand(B, M, generator=g) + 0.05
    b = torch.rand(B, N, generator=g) + 0.05
    for p, (m, n) in enumerate(shapes):
        a[p, m:] = 0
        b[p, n:] = 0
        if m > 3:
            a[p, 1] = 0
        if n > 3:
            b[p, 2] = 0
    return cost, a, b


def check_fwd_against_reference(out, ref, n_iter_slack=3, what="", eps=EPS):
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    assert eps_reached.dtype == torch.float64 and bool((eps_reached == eps).all()), f"{what}eps_reached {eps_reached}"
    rv, rd, rf, rg, rn, re, rp = ref
    close(value, rv, 2e-6, 1e-4, what + "value")
    close(dual, rd, 2e-6, 1e-4, what + "dual")
    close(f, rf, 5e-5, 1e-4, what + "f")
    close(g, rg, 5e-5, 1e-4, what + "g")
    if plan.numel():
        close(plan, rp, 1e-6, 1e-3, what + "plan")
        assert bool(((plan != 0) == (rp != 0)).all()), what + "plan support"
    assert int((n_iter - rn).abs().max()) <= n_iter_slack, f"{what}n_iter {n_iter} vs reference {rn}"
    assert bool((err < TOL).all()), f"{what}err {err}"


@pytest.mark.parametrize("threads,seed", [(None, 1), (64, 1), (128, 2), (256, 1), (256, 2)])
def test_sinkhorn_fwd_padded_batch(emu, threads, seed):
    """Variable lengths, interior zero masses, lanes per row G from 2 to 16; both thread schedules
    of the emulator (odd / even seed)."""
    shapes = [(9, 7), (3, 12), (12, 3), (1, 5), (6, 1), (2, 2), (12, 12), (5, 9)]
    cost, a, b = padded_batch(shapes, 12, 12)
    out = with_threads(emu, threads, seed).sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    check_fwd_against_reference(out, ref_fwd(cost, a, b))


def test_sinkhorn_fwd_lane_layouts(emu):
    """Block-wide passes over rows/columns (more rows than groups), G = 1 and G = 32 layouts, a
    strided (transposed) cost, several row tiles."""
    shapes = [(40, 33), (3, 60), (60, 3), (64, 64), (17, 64)]
    base, a, b = padded_batch([(n, m) for m, n in shapes], 64, 64)
    cost = base.transpose(1, 2)  # strides (M N, 1, N)
    a, b = b, a
    out = emu.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    check_fwd_against_reference(out, ref_fwd(cost, a, b))


def test_sinkhorn_fwd_small_eps_large_range(emu):
    """Many eps stages (spread 50, eps 0.01): rebuilds, offset absorption and the exact
    (max-shifted) fallback of the stabilized sums."""
    cost, a, b = padded_batch([(10, 8), (7, 11)], 12, 12, scale=50.0, seed=3)
    out = emu.sinkhorn_fwd(cost, a, b, 0.01, 5000, TOL, True)
    ref = ref_fwd(cost, a, b, eps=0.01, max_iter=5000)
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    close(value, ref[0], 1e-4, 1e-5, "value")
    close(dual, ref[1], 1e-4, 1e-5, "dual")
    close(f, ref[2], 1e-3, 1e-5, "f")
    close(plan, ref[6], 1e-5, 1e-3, "plan")
    assert bool((err < TOL).all()), err
    assert bool((n_iter < 5000).all())


@pytest.mark.parametrize("offset", [200.0, -200.0])
def test_sinkhorn_fwd_cost_offset(emu, offset):
    """A cost far from 0 relative to its spread: the first sums of exp(-C / eps0) underflow
    (overflow for a negative offset), so the exact max-shifted fallback runs; value moves by the
    offset, the plan not at all."""
    cost, a, b = padded_batch([(9, 7), (5, 12)], 12, 12, seed=9)
    out = emu.sinkhorn_fwd(cost + offset, a, b, EPS, MAX_ITER, TOL, True)
    ref = ref_fwd(cost + offset, a, b)
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    close(value, ref[0], 1e-4, 1e-6, "value")
    close(dual, ref[1], 1e-4, 1e-6, "dual")
    close(f, ref[2], 2e-4, 1e-6, "f")
    close(plan, ref[6], 1e-5, 2e-3, "plan")
    assert bool((err < TOL).all()), err
    close(plan, ref_fwd(cost, a, b)[6], 1e-5, 2e-3, "plan of the cost without offset")


def test_sinkhorn_fwd_special_problems(emu):
    """All padding, mass on one side only, a non-finite cost entry (NaN results), a non-finite
    entry in a padding row (ignored): the CPU op's conventions."""
    cost, a, b = padded_batch([(5, 4)] * 5, 6, 5)
    a[0] = 0
    b[0] = 0
    b[1] = 0
    cost[2, 0, 3] = float("inf")
    cost[3, 5, 0] = float("nan")  # row 5 is padding (a[3, 5] = 0)
    assert float(a[3, 5]) == 0
    out = emu.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    for p, e in ((0, 0.0), (1, 1.0)):
        assert float(value[p]) == 0 and float(dual[p]) == 0 and int(n_iter[p]) == 0 and float(err[p]) == e
    assert bool(value[2].isnan()) and bool(dual[2].isnan()) and bool(err[2].isnan()) and int(n_iter[2]) == 0
    for p in (0, 1, 2):
        assert bool((f[p] == 0).all()) and bool((g[p] == 0).all()) and bool((plan[p] == 0).all())
    ref = ref_fwd(cost[3:], a[3:], b[3:])
    check_fwd_against_reference(tuple(t[3:] for t in out), ref)
    if HAS_CPU_OPS:  # the CPU op raises on the non-finite real cost of problem 2: compare the others
        with pytest.raises(ValueError, match="cost must be finite"):
            torch.ops.kxkernels.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False)
        keep = torch.tensor([0, 1, 3, 4])
        cpu = torch.ops.kxkernels.sinkhorn_fwd(cost[keep], a[keep], b[keep], EPS, MAX_ITER, TOL, True, False)
        for name, x, y in zip("value dual f g n_iter err plan eps_reached".split(), out, cpu):
            if name == "n_iter":
                assert int((x[keep] - y).abs().max()) <= 3, (x, y)
            else:
                close(x[keep], y, 5e-5, 1e-4, f"{name} vs CPU op", equal_nan=True)


def test_sinkhorn_fwd_max_iter(emu):
    """max_iter reached (at the final eps, and before it): last plain column update, err of the
    plan returned; matches the CPU op without Newton steps."""
    cost, a, b = padded_batch([(8, 6), (5, 7)], 8, 7, scale=5.0, seed=4)
    for max_iter in (1, 3, 12):
        out = emu.sinkhorn_fwd(cost, a, b, 0.02, max_iter, TOL, True)
        assert bool((out[4] == max_iter).all()), out[4]
        ref = ref_fwd(cost, a, b, eps=0.02, max_iter=max_iter)
        close(out[6], ref[6], 1e-5, 1e-3, f"plan at max_iter={max_iter}")
        close(out[5], ref[5], 1e-5, 1e-3, f"err at max_iter={max_iter}")
        close(out[0], ref[0], 1e-5, 1e-4, f"value at max_iter={max_iter}")
        if HAS_CPU_OPS:
            cpu = torch.ops.kxkernels.sinkhorn_fwd(cost, a, b, 0.02, max_iter, TOL, True, False)
            assert torch.equal(cpu[4], out[4])
            close(out[5], cpu[5], 1e-5, 1e-3, "err vs CPU op")
            close(out[6], cpu[6], 1e-5, 1e-3, "plan vs CPU op")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_fwd_half_inputs(emu, dtype):
    cost, a, b = padded_batch([(7, 5), (4, 8)], 8, 8, seed=5)
    cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
    out = emu.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    assert out[6].dtype == dtype and out[0].dtype == torch.float32
    ref = ref_fwd(cost, a, b)  # float64 math on the rounded inputs
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    close(value, ref[0], 2e-6, 1e-4, "value")
    close(f, ref[2], 5e-5, 1e-4, "f")
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    close(plan, ref[6], 1e-6, tol, "plan (rounded to the input dtype)")


def test_thread_order_and_block_size_do_not_change_results(emu):
    """Reductions run in a fixed order, so any thread schedule gives bitwise the same result; a
    missing barrier would not (the emulator resumes threads in a seeded random order)."""
    cost, a, b = padded_batch([(9, 7), (12, 12), (3, 10)], 12, 12, seed=6)
    outs = [with_threads(emu, 128, seed).sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True) for seed in (1, 2, 3)]
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert torch.equal(x, y)
    x = torch.randn(2, 9, 40)
    y = torch.randn(2, 11, 40)
    w = [with_threads(emu, 64, seed).wrd_fwd(x, y, None, None, EPS, MAX_ITER, TOL) for seed in (1, 7)]
    for p, q in zip(*w):
        assert torch.equal(p, q)


def per_problem_eps(eps, B):
    """eps as a float64 (B, 1, 1) tensor: one float for every problem, or a (B,) tensor."""
    return torch.as_tensor(eps, dtype=torch.float64).expand(B).reshape(B, 1, 1)


def bwd_expected(grad, cost, a, b, f, g, eps):
    """The envelope gradient (csrc/cpu/sinkhorn.cpp) in float64; eps a float or per problem (B,)."""
    C, a, b, f, g, gr = (t.double() for t in (cost, a, b, f, g, grad))
    va, vb = a > 0, b > 0
    sa = torch.where(va, a, 0).sum(1, keepdim=True)
    sb = torch.where(vb, b, 0).sum(1, keepdim=True)
    live = ((sa > 0) & (sb > 0))
    an = torch.where(va & live, a / sa.clamp_min(1e-300), 0)
    bn = torch.where(vb & live, b / sb.clamp_min(1e-300), 0)
    fa = (an * f).sum(1, keepdim=True)
    gb = (bn * g).sum(1, keepdim=True)
    T = an[:, :, None] * bn[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - C) / per_problem_eps(eps, C.shape[0]))
    T = torch.where((an[:, :, None] > 0) & (bn[:, None, :] > 0), T, 0)
    ga = torch.where(an > 0, gr[:, None] * (f - fa) / sa.clamp_min(1e-300), 0)
    gbb = torch.where(bn > 0, gr[:, None] * (g - gb) / sb.clamp_min(1e-300), 0)
    return gr[:, None, None] * T, ga, gbb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_bwd(emu, dtype):
    cost, a, b = padded_batch([(9, 7), (5, 12), (12, 12)], 12, 12, seed=7)
    a[1] = 0  # no mass: zero gradients
    cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
    _, _, f, g, *_ = ref_fwd(cost, a, b)
    f, g = f.float(), g.float()
    grad = torch.tensor([1.5, -0.7, 0.3])
    out = with_threads(emu, 64).sinkhorn_bwd(grad, cost, a, b, f, g, EPS)
    exp = bwd_expected(grad, cost, a, b, f, g, EPS)
    rtol = 1e-4 if dtype == torch.float32 else 1e-2
    for name, x, y in zip(("grad_cost", "grad_a", "grad_b"), out, exp):
        assert x.dtype == dtype
        close(x, y, 1e-6, rtol, name)
    assert bool((out[0][1] == 0).all()) and bool((out[1][1] == 0).all()) and bool((out[2][1] == 0).all())
    if HAS_CPU_OPS:
        cpu = torch.ops.kxkernels.sinkhorn_bwd(grad, cost, a, b, f, g, torch.full((3,), EPS, dtype=torch.float64))
        for name, x, y in zip(("grad_cost", "grad_a", "grad_b"), out, cpu):
            close(x, y, 1e-6, rtol, name + " vs CPU op")


def token_batch(B, M, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, D, generator=g).to(dtype)
    y = torch.randn(B, N, D, generator=g).to(dtype)
    xm = torch.rand(B, M, generator=g) < 0.8
    ym = torch.rand(B, N, generator=g) < 0.8
    xm[:, 0] = True
    ym[:, 0] = True
    return x, y, xm, ym


def ref_wrd(x, y, xm, ym, eps=EPS):
    cost, a, b = R.cosine_cost_and_masses(x.double(), y.double(), xm, ym)
    return R.sinkhorn(cost, a, b, eps=eps, max_iter=MAX_ITER, tol=TOL)


@pytest.mark.parametrize("threads", [None, 64])
def test_wrd_fwd(emu, threads):
    """Masks, a zero-norm token, D not a multiple of the staged chunk, more x tokens than a cosine
    tile has rows, more y tokens than a tile has columns (70 > 64) and than a block has threads
    (compaction in two chunks)."""
    x, y, xm, ym = token_batch(3, 20, 70, 45, seed=1)
    x[0, 3] = 0  # zero norm: no mass
    xm[1, 10:] = False
    out = with_threads(emu, threads).wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL)
    ref = ref_wrd(x, y, xm, ym)
    value, dual, f, g, n_iter, err, eps_reached = out
    close(value, ref[0], 2e-6, 1e-4, "value")
    close(dual, ref[1], 2e-6, 1e-4, "dual")
    close(f, ref[2], 5e-5, 1e-4, "f")
    close(g, ref[3], 5e-5, 1e-4, "g")
    assert int((n_iter - ref[4]).abs().max()) <= 3
    assert bool((err < TOL).all())
    if HAS_CPU_OPS:
        cpu = torch.ops.kxkernels.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL, False)
        close(value, cpu[0], 2e-6, 1e-4, "value vs CPU op")
        close(f, cpu[2], 5e-5, 1e-4, "f vs CPU op")


def test_wrd_fwd_special_problems(emu):
    """No masks given; an all-masked side (err 1), both sides masked (zeros), a NaN in a real token
    (NaN results), a NaN in a masked token (ignored)."""
    x, y, xm, ym = token_batch(5, 6, 7, 33, seed=2)
    xm[0] = False
    xm[1] = False
    ym[1] = False
    x[2, 0, 5] = float("nan")
    xm[3, 4] = False
    x[3, 4, 0] = float("nan")
    value, dual, f, g, n_iter, err, eps_reached = emu.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL)
    assert float(value[0]) == 0 and float(err[0]) == 1 and int(n_iter[0]) == 0
    assert float(value[1]) == 0 and float(err[1]) == 0 and float(dual[1]) == 0
    assert bool(value[2].isnan()) and bool(err[2].isnan()) and int(n_iter[2]) == 0
    assert bool((f[:3] == 0).all()) and bool((g[:3] == 0).all())
    ref = ref_wrd(x[3:], y[3:], xm[3:], ym[3:])
    close(value[3:], ref[0], 2e-6, 1e-4, "value")
    close(f[3:], ref[2], 5e-5, 1e-4, "f")
    out = emu.wrd_fwd(x[4:], y[4:], None, None, EPS, MAX_ITER, TOL)  # x[3] has a NaN token
    ref = ref_wrd(x[4:], y[4:], None, None)
    close(out[0], ref[0], 2e-6, 1e-4, "value without masks")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wrd_fwd_half(emu, dtype):
    x, y, xm, ym = token_batch(2, 9, 6, 40, dtype=dtype, seed=3)
    value, *_ = emu.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL)
    ref = ref_wrd(x, y, xm, ym)
    close(value, ref[0], 1e-5, 1e-4, "value")


def wrd_grad_expected(grad, x, y, xm, ym, f, g, eps):
    """dL/dx, dL/dy of L = sum_p grad_p (<T, C(x, y)> + <f, a(x)> + <g, b(y)>) with T, f, g held
    fixed: the envelope gradient the CPU op computes, by float64 autograd."""
    x = x.double().requires_grad_()
    y = y.double().requires_grad_()
    cost, a, b = R.cosine_cost_and_masses(x, y, xm, ym)
    f, g = f.double(), g.double()
    va, vb = a > 0, b > 0
    T = a[:, :, None] * b[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - cost) / per_problem_eps(eps, cost.shape[0]))
    T = torch.where(va[:, :, None] & vb[:, None, :], T, 0).detach()
    L = (grad.double() * ((T * cost).sum((1, 2)) + (torch.where(va, f, 0) * a).sum(1)
                          + (torch.where(vb, g, 0) * b).sum(1))).sum()
    return torch.autograd.grad(L, (x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrd_bwd(emu, dtype):
    x, y, xm, ym = token_batch(3, 10, 13, 70, dtype=dtype, seed=4)
    x[0, 2] = 0
    xm[2] = False  # no mass: zero gradients
    ref = ref_wrd(x, y, xm, ym)
    f, g = ref[2].float(), ref[3].float()
    grad = torch.tensor([1.0, -2.0, 0.5])
    gx, gy = emu.wrd_bwd(grad, x, y, xm, ym, f, g, EPS)
    ex, ey = wrd_grad_expected(grad, x, y, xm, ym, f, g, EPS)
    assert gx.dtype == dtype and gy.dtype == dtype
    rtol, atol = (1e-3, 1e-5) if dtype == torch.float32 else (2e-2, 2e-3)
    close(gx, ex, atol, rtol, "grad_x")
    close(gy, ey, atol, rtol, "grad_y")
    assert bool((gx[2] == 0).all()) and bool((gy[2] == 0).all()) and bool((gx[0, 2] == 0).all())
    assert bool((gx[~xm] == 0).all()) and bool((gy[~ym] == 0).all())
    if HAS_CPU_OPS:
        cx, cy = torch.ops.kxkernels.wrd_bwd(grad, x, y, xm, ym, f, g, torch.full((x.shape[0],), EPS, dtype=torch.float64))
        close(gx, cx, atol, rtol, "grad_x vs CPU op")
        close(gy, cy, atol, rtol, "grad_y vs CPU op")


SM80, SM90 = 163 * 1024, 227 * 1024  # opt-in shared memory per block


def plan(emu, M, N, tokens, limit):
    """The layout of one M x N problem: (threads, mat, smem, tier, ws_floats)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "meta.txt"), "w") as fh:
            fh.write(f"B 1\nM {M}\nN {N}\ntokens {int(tokens)}\nsmem_limit {limit}\n")
        r = subprocess.run([emu.exe, "plan", "float32", d], capture_output=True, text=True, check=True)
        return tuple(int(v) for v in r.stdout.split())


def test_launch_policy_limits(emu):
    """128 x 128 stays in an sm_80 block's shared memory (163 KB), 165 x 165 in an sm_90 block's
    (227 KB); past that the matrices go to the global workspace (tier 1), and past what the
    vectors leave, everything but the reduction partials and staging tiles (tier 2)."""
    for tokens in (False, True):
        assert plan(emu, 128, 128, tokens, SM80)[2:4] <= (SM80, 0)
        assert plan(emu, 128, 128, tokens, SM80)[3] == 0
        assert plan(emu, 165, 165, tokens, SM90)[3] == 0
        t, mat, smem, tier, ws = plan(emu, 170, 170, tokens, SM90)
        assert tier == 1 and smem <= SM90 and ws >= 2 * 170 * 170
        t, mat, smem, tier, ws = plan(emu, 4000, 4000, tokens, SM80)
        assert tier == 2 and smem <= 20 * 1024 and ws >= 2 * 4000 * 4000
    threads, mat, smem, tier, ws = plan(emu, 64, 64, True, SM90)
    assert threads == 256 and mat >= 64 * 64 and tier == 0 and ws == 0


def test_kernel_runs_at_its_shared_memory_bound(emu):
    """A 40 x 40 problem with a limit that leaves no room for row padding (unpadded ldk), exactly
    sized shared memory (an overrun faults on the guard page)."""
    cost, a, b = padded_batch([(40, 40), (33, 37)], 40, 40, seed=8)
    tight = _emu.SinkhornEmu(emu.exe, smem_limit=40 * 40 * 8 + 40 * 2 * 80)
    out = tight.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    check_fwd_against_reference(out, ref_fwd(cost, a, b))


# ---- problems past shared memory, and batches of mixed lengths ------------------------------------

def test_sinkhorn_fwd_512(emu):
    """A 512 x 512 problem (BERT's longest inputs): past an sm_80 block's shared memory, so its
    matrices live in the global workspace; it matches the float64 reference and the CPU op."""
    cost, a, b = padded_batch([(512, 512)], 512, 512, seed=11)
    sm80 = _emu.SinkhornEmu(emu.exe, smem_limit=SM80)
    out = sm80.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    assert sm80.groups == [(256, 1, 511, 511, 1)], sm80.groups  # an interior zero each: 511 x 511 real
    check_fwd_against_reference(out, ref_fwd(cost, a, b))
    if HAS_CPU_OPS:
        cpu = torch.ops.kxkernels.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False)
        close(out[0], cpu[0], 2e-6, 1e-4, "value vs CPU op")
        close(out[6], cpu[6], 1e-6, 1e-3, "plan vs CPU op")


def test_sinkhorn_fwd_mixed_lengths(emu):
    """A 10 x 10 and a 300 x 300 problem in one batch padded to 300: the short one runs in a
    64-thread block from shared memory, the long one in a 256-thread block with its matrices in
    the workspace; both match the reference."""
    cost, a, b = padded_batch([(10, 10), (300, 300), (7, 290)], 300, 300, seed=12)
    a[1, 1] = 0.3  # (300, 300) exactly: no interior zero there
    b[1, 2] = 0.3
    sm80 = _emu.SinkhornEmu(emu.exe, smem_limit=SM80)
    out = sm80.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    assert sorted(sm80.groups) == [(64, 0, 9, 9, 1), (128, 0, 6, 289, 1), (256, 1, 300, 300, 1)], sm80.groups
    check_fwd_against_reference(out, ref_fwd(cost, a, b))


def test_sinkhorn_fwd_global_vectors_several_launches(emu):
    """A shared memory limit that leaves room for nothing but the partials: the vectors go to the
    workspace too (tier 2); a launch holds 1 block, so the group runs in several launches."""
    shapes = [(60, 50), (3, 4), (64, 64)]
    cost, a, b = padded_batch(shapes, 64, 64, seed=13)
    tiny = _emu.SinkhornEmu(emu.exe, smem_limit=2048, ws_blocks=1)
    out = tiny.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    assert sorted(tiny.groups) == [(64, 0, 3, 3, 1), (256, 2, 63, 63, 2)], tiny.groups  # 3 x 4: 3 x 3 real
    check_fwd_against_reference(out, ref_fwd(cost, a, b))
    shared = emu.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    for x, y in zip(out, shared):  # same sweeps, same reduction order: the same bits
        assert torch.equal(x, y)


def test_sinkhorn_bwd_workspace(emu):
    """sinkhorn_bwd with its masses and potentials in the workspace (M + N past the limit), in
    launches of 2 blocks."""
    cost, a, b = padded_batch([(9, 7), (5, 12), (12, 12)], 12, 12, seed=14)
    _, _, f, g, *_ = ref_fwd(cost, a, b)
    f, g = f.float(), g.float()
    grad = torch.tensor([1.5, -0.7, 0.3])
    out = _emu.SinkhornEmu(emu.exe, smem_limit=256, ws_blocks=2).sinkhorn_bwd(grad, cost, a, b, f, g, EPS)
    exp = bwd_expected(grad, cost, a, b, f, g, EPS)
    for name, x, y in zip(("grad_cost", "grad_a", "grad_b"), out, exp):
        close(x, y, 1e-6, 1e-4, name)


@pytest.mark.parametrize("limit,tier", [(SM80, 1), (24 * 1024, 2)])
def test_wrd_past_shared_memory(emu, limit, tier):
    """WRD forward and backward on 180 x 200 tokens (and a short pair beside them): the cosine
    tiles stage in shared memory while C and K (and T in the backward) live in the workspace."""
    x, y, xm, ym = token_batch(2, 180, 200, 24, seed=15)
    xm[0] = True
    ym[0] = True
    xm[1, 12:] = False
    ym[1, 9:] = False
    lim = _emu.SinkhornEmu(emu.exe, smem_limit=limit)
    value, dual, f, g, n_iter, err, eps_reached = lim.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL)
    groups = sorted(lim.groups)
    assert groups[-1][:2] == (256, tier) and len(groups) == 2, groups
    ref = ref_wrd(x, y, xm, ym)
    close(value, ref[0], 2e-6, 1e-4, "value")
    close(f, ref[2], 5e-5, 1e-4, "f")
    close(g, ref[3], 5e-5, 1e-4, "g")
    assert bool((err < TOL).all())
    grad = torch.tensor([1.0, -0.5])
    gx, gy = lim.wrd_bwd(grad, x, y, xm, ym, f, g, EPS)
    ex, ey = wrd_grad_expected(grad, x, y, xm, ym, f, g, EPS)
    close(gx, ex, 1e-5, 1e-3, "grad_x")
    close(gy, ey, 1e-5, 1e-3, "grad_y")


# ---- eps per problem: relative_eps, a stop before the schedule ends, the backward's eps (B,) -------

def spread_batch(seed=20):
    """Problems of different lengths and cost spreads in one batch padded to 150 x 150: a 150 x 150
    problem (past an sm_80 block's shared memory: the workspace layout), spreads from 0.02 to 20,
    a constant cost (spread 0: the requested eps itself) and an all-padding problem."""
    shapes = [(9, 7), (150, 150), (30, 5), (6, 6), (12, 40), (0, 0)]
    cost, a, b = padded_batch(shapes, 150, 150, seed=seed)
    a[1, 1] = 0.3  # 150 x 150 exactly: no interior zero there
    b[1, 2] = 0.3
    for p, scale in enumerate((1.0, 3.0, 0.02, 1.0, 20.0, 1.0)):
        cost[p] *= scale
    cost[3] = 0.7
    b[5] = 0
    return cost, a, b


def test_relative_eps_matches_cpu_op(emu):
    """relative_eps=True: each block scales eps by its own cost spread (a block reduction over the
    real entries), so value, potentials, plan and eps_reached match the CPU op (no Newton steps,
    the same schedule) and the float64 reference, across spreads 0..20 and lengths up to a problem
    in the global workspace."""
    cost, a, b = spread_batch()
    sm80 = _emu.SinkhornEmu(emu.exe, smem_limit=SM80)
    out = sm80.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False, True)
    assert any(tier == 1 and mc == 150 for _, tier, mc, _, _ in sm80.groups), sm80.groups
    value, dual, f, g, n_iter, err, plan, eps_reached = out
    real = (a > 0)[:, :, None] & (b > 0)[:, None, :]
    hi = torch.where(real, cost, -torch.inf).flatten(1).amax(1).double()
    lo = torch.where(real, cost, torch.inf).flatten(1).amin(1).double()
    want = torch.where(hi > lo, EPS * (hi - lo), torch.full_like(hi, EPS))
    want[5] = EPS  # all padding: the requested eps
    assert torch.equal(eps_reached, want), (eps_reached, want)
    assert float(eps_reached[3]) == EPS and len(set(eps_reached.tolist())) == 5
    assert bool((err[:5] < TOL).all()) and float(err[5]) == 0 and float(value[5]) == 0, err
    cpu = torch.ops.kxkernels.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False, True) if HAS_CPU_OPS else None
    if cpu is not None:
        assert torch.equal(eps_reached, cpu[7]), (eps_reached, cpu[7])
        close(value, cpu[0], 2e-6, 1e-4, "value vs CPU op")
        close(dual, cpu[1], 2e-6, 1e-4, "dual vs CPU op")
        close(f, cpu[2], 5e-5, 1e-4, "f vs CPU op")
        close(g, cpu[3], 5e-5, 1e-4, "g vs CPU op")
        close(plan, cpu[6], 1e-6, 1e-3, "plan vs CPU op")
        assert int((n_iter - cpu[4]).abs().max()) <= 3, (n_iter, cpu[4])
    rv, rd, rf, rg, rn, re, rp, reps = R.sinkhorn(cost.double(), a.double(), b.double(), eps=EPS, max_iter=MAX_ITER,
                                                  tol=TOL, return_plan=True, return_eps=True, relative_eps=True)
    close(eps_reached, reps, 0, 1e-6, "eps_reached vs reference")
    close(value, rv, 2e-6, 1e-4, "value vs reference")
    close(f, rf, 5e-5, 1e-4, "f vs reference")
    close(plan, rp, 1e-6, 1e-3, "plan vs reference")


def test_relative_eps_off_is_absolute(emu):
    """relative_eps=False (the ops' default) keeps eps in cost units for every problem."""
    cost, a, b = spread_batch(seed=21)
    keep = torch.tensor([0, 2, 3, 5])  # the short ones
    cost, a, b = cost[keep, :30, :40], a[keep, :30], b[keep, :40]
    out = emu.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True)
    assert bool((out[7] == EPS).all()), out[7]
    if HAS_CPU_OPS:
        cpu = torch.ops.kxkernels.sinkhorn_fwd(cost, a, b, EPS, MAX_ITER, TOL, True, False, False)
        assert torch.equal(out[7], cpu[7])
        close(out[0], cpu[0], 2e-6, 1e-4, "value vs CPU op")


@pytest.mark.parametrize("relative", [False, True])
def test_stop_before_target_eps(emu, relative):
    """max_iter so small that the eps schedule (spread 5 down to 1e-3, or 1e-3 x spread) has not
    reached the target: eps_reached is the stage eps the results belong to, the same as the CPU
    op's, err is at least tol, and value / plan are those of that eps."""
    cost, a, b = padded_batch([(8, 6), (5, 7), (8, 7), (7, 7)], 8, 7, scale=5.0, seed=22)
    cost[2] *= 0.1  # another spread: another schedule
    # a separable cost r_i + c_j: every plan is a b^T, solved to ~1e-8 at every stage, so only
    # the rule "err >= tol before the target eps" keeps err from claiming convergence
    cost[3] = torch.linspace(0, 2, 8)[:, None] + torch.linspace(0, 3, 7)[None, :]
    eps = 1e-3
    for max_iter in (1, 3, 4):
        out = emu.sinkhorn_fwd(cost, a, b, eps, max_iter, TOL, True, False, relative)
        value, dual, f, g, n_iter, err, plan, eps_reached = out
        assert bool((n_iter == max_iter).all()), n_iter
        assert bool((err >= TOL).all()), err
        assert float(err[3]) == float(torch.tensor(TOL, dtype=torch.float32)), err  # solved, but not at eps
        cpu = torch.ops.kxkernels.sinkhorn_fwd(cost, a, b, eps, max_iter, TOL, True, False, relative) if HAS_CPU_OPS else None
        if cpu is not None:
            assert torch.equal(eps_reached, cpu[7]), (max_iter, eps_reached, cpu[7])
            close(err, cpu[5], 1e-5, 1e-3, f"err at max_iter={max_iter}")
            close(value, cpu[0], 1e-5, 1e-4, f"value at max_iter={max_iter}")
            close(f, cpu[2], 1e-4, 1e-4, f"f at max_iter={max_iter}")
            close(plan, cpu[6], 1e-5, 1e-3, f"plan at max_iter={max_iter}")
        ref = R.sinkhorn(cost.double(), a.double(), b.double(), eps=eps, max_iter=max_iter, tol=TOL,
                         return_plan=True, return_eps=True, relative_eps=relative)
        close(eps_reached, ref[7], 0, 1e-6, f"eps_reached vs reference at max_iter={max_iter}")
        target = eps * (cost.flatten(1).amax(1) - cost.flatten(1).amin(1)).double() if relative else eps
        assert bool((eps_reached > target).all()), (eps_reached, target)


def test_sinkhorn_bwd_per_problem_eps(emu):
    """The backward at each problem's own eps (a stop before the schedule ended, relative eps:
    all different), in shared memory and with the vectors in the workspace: matches the CPU
    backward and the float64 envelope gradient."""
    cost, a, b = padded_batch([(9, 7), (5, 12), (12, 12), (12, 3)], 12, 12, scale=4.0, seed=23)
    cost[1] *= 0.1
    fwd = emu.sinkhorn_fwd(cost, a, b, 1e-3, 5, TOL, False, False, True)
    f, g, eps = fwd[2], fwd[3], fwd[7]
    assert len(set(eps.tolist())) == 4, eps
    grad = torch.tensor([1.5, -0.7, 0.3, 2.0])
    exp = bwd_expected(grad, cost, a, b, f, g, eps)
    cpu = torch.ops.kxkernels.sinkhorn_bwd(grad, cost, a, b, f, g, eps) if HAS_CPU_OPS else None
    for runner in (emu, _emu.SinkhornEmu(emu.exe, smem_limit=256, ws_blocks=2)):
        out = runner.sinkhorn_bwd(grad, cost, a, b, f, g, eps)
        for k, (name, x, y) in enumerate(zip(("grad_cost", "grad_a", "grad_b"), out, exp)):
            close(x, y, 1e-6, 1e-4, name)
            if cpu is not None:
                close(x, cpu[k], 1e-6, 1e-4, name + " vs CPU op")
    one = emu.sinkhorn_bwd(grad, cost, a, b, f, g, float(eps[0]))  # eps[0] everywhere: another gradient
    assert not torch.allclose(one[0][1:], out[0][1:])


def spread_tokens(seed=24):
    """Pairs of different lengths and cost spreads: a 140 x 150 pair (past an sm_80 block's shared
    memory), short pairs, and a pair of one topic (a shared direction plus small noise: cosines
    close together)."""
    x, y, xm, ym = token_batch(3, 140, 150, 24, seed=seed)
    xm[0] = True
    ym[0] = True
    xm[1, 10:] = False
    ym[1, 7:] = False
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.randn(24, generator=g)
    x[2] = c + 0.3 * torch.randn(140, 24, generator=g)
    y[2] = c + 0.3 * torch.randn(150, 24, generator=g)
    xm[2, 20:] = False
    ym[2, 25:] = False
    return x, y, xm, ym


def test_wrd_relative_eps_matches_cpu_op(emu):
    """WRD with relative_eps=True (kxkernels.wrd's default): the spread of the in-kernel cosine
    cost sets each pair's eps; forward (eps_reached, value, potentials) and backward at those eps
    match the CPU op, with the long pair's matrices in the workspace."""
    x, y, xm, ym = spread_tokens()
    sm80 = _emu.SinkhornEmu(emu.exe, smem_limit=SM80)
    value, dual, f, g, n_iter, err, eps_reached = sm80.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL, False, True)
    assert any(tier == 1 for _, tier, _, _, _ in sm80.groups), sm80.groups
    assert bool((err < TOL).all()), err
    cost, a, b = R.cosine_cost_and_masses(x.double(), y.double(), xm, ym)
    ref = R.sinkhorn(cost, a, b, eps=EPS, max_iter=MAX_ITER, tol=TOL, return_eps=True, relative_eps=True)
    close(eps_reached, ref[7], 0, 1e-5, "eps_reached vs reference")
    assert float(eps_reached[2]) < 0.8 * float(eps_reached[0]), eps_reached  # the one-topic pair: a smaller spread
    close(value, ref[0], 2e-6, 1e-4, "value vs reference")
    close(f, ref[2], 5e-5, 1e-4, "f vs reference")
    grad = torch.tensor([1.0, -0.5, 2.0])
    gx, gy = sm80.wrd_bwd(grad, x, y, xm, ym, f, g, eps_reached)
    ex, ey = wrd_grad_expected(grad, x, y, xm, ym, f, g, eps_reached)
    close(gx, ex, 1e-5, 1e-3, "grad_x")
    close(gy, ey, 1e-5, 1e-3, "grad_y")
    if HAS_CPU_OPS:
        cpu = torch.ops.kxkernels.wrd_fwd(x, y, xm, ym, EPS, MAX_ITER, TOL, False, True)
        close(eps_reached, cpu[6], 0, 1e-5, "eps_reached vs CPU op")
        close(value, cpu[0], 2e-6, 1e-4, "value vs CPU op")
        close(f, cpu[2], 5e-5, 1e-4, "f vs CPU op")
        close(g, cpu[3], 5e-5, 1e-4, "g vs CPU op")
        assert int((n_iter - cpu[4]).abs().max()) <= 3, (n_iter, cpu[4])
        cx, cy = torch.ops.kxkernels.wrd_bwd(grad, x, y, xm, ym, f, g, eps_reached)
        close(gx, cx, 1e-5, 1e-3, "grad_x vs CPU op")
        close(gy, cy, 1e-5, 1e-3, "grad_y vs CPU op")


def test_wrd_stop_before_target_eps(emu):
    """WRD stopped by max_iter during the schedule: eps_reached is the CPU op's stage eps."""
    x, y, xm, ym = token_batch(3, 9, 11, 40, seed=25)
    for max_iter in (1, 4):
        out = emu.wrd_fwd(x, y, xm, ym, 1e-3, max_iter, TOL, False, True)
        assert bool((out[4] == max_iter).all()) and bool((out[5] >= TOL).all()), out
        if HAS_CPU_OPS:
            cpu = torch.ops.kxkernels.wrd_fwd(x, y, xm, ym, 1e-3, max_iter, TOL, False, True)
            close(out[6], cpu[6], 0, 1e-5, f"eps_reached at max_iter={max_iter}")
            assert bool((cpu[6] > 1e-3 * 0.2).all())
            close(out[0], cpu[0], 1e-5, 1e-4, f"value at max_iter={max_iter}")
