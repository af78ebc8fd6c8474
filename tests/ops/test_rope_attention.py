"""apply_rope / rope_attention against the float64 eager reference (RoPE then softmax attention),
forward and backward, on every device present (CPU always, at both ISA levels that run here;
CUDA runs the Triton kernels), plus opcheck, torch.compile, gradcheck and bad input."""
import math

import pytest
import torch

import kxkernels as kx
from kxkernels import _C
from kxkernels.ops.rope_attention import reference as ref
from tests.conftest import devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32: max abs error against float64 on unit-scale outputs and gradients.
ATOL_F32 = 2e-5
# bf16 / fp16: the kernel's RMS error against float64 must be at most this multiple of eager
# attention's RMS error run in the same precision (the house rule: "about 2x"), plus a floor
# for outputs that eager gets exactly right by luck.
LOWP_FACTOR = 2.0
ISAS = [lvl for lvl in ("baseline", "avx2", "avx512") if lvl in ("baseline", _C.build_info()["cpu_isa_supported"])
        or (lvl == "avx2" and _C.build_info()["cpu_isa_supported"] == "avx512")]


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)


def _rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def _inputs(B, Hq, Hk, Lq, Lk, D, Dv, dtype, device, scale_qk=1.0):
    g = torch.Generator().manual_seed(1234)
    q = (scale_qk * torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)).to(dtype)
    k = (scale_qk * torch.randn(B, Hk, Lk, D, generator=g, dtype=torch.float64)).to(dtype)
    v = torch.randn(B, Hk, Lk, Dv, generator=g, dtype=torch.float64).to(dtype)
    return [t.to(device).requires_grad_() for t in (q, k, v)]


def _grads(fn, inputs, gout):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, gout.to(out.dtype))
    return out, grads


def _check_against_reference(fn_kx, fn_ref, inputs, dtype, what):
    """Kernel vs float64 reference; for bf16/fp16 also vs eager in that dtype (error budget)."""
    x64 = [t.detach().double().cpu().requires_grad_() for t in inputs]
    q, v = inputs[0], inputs[2]
    gout = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out64, g64 = _grads(fn_ref, x64, gout)
    out, g = _grads(fn_kx, inputs, gout.to(inputs[0].device))
    assert out.dtype == dtype and out.shape == out64.shape
    assert torch.isfinite(out).all(), what
    pairs = [("out", out, out64)] + [(f"grad_{n}", a, b) for n, a, b in zip("qkv", g, g64)]
    if dtype == torch.float32:
        for name, a, b in pairs:
            torch.testing.assert_close(a.double().cpu(), b, atol=ATOL_F32, rtol=1e-4, msg=f"{what} {name}")
        return
    xl = [t.detach().cpu().requires_grad_() for t in inputs]  # eager in the low precision
    outl, gl = _grads(fn_ref, xl, gout)
    eager = [outl] + list(gl)
    for (name, a, b), e in zip(pairs, eager):
        err, err_eager = _rms(a.cpu(), b), _rms(e, b)
        scale = b.double().pow(2).mean().sqrt().item() + 1e-12
        floor = 2e-3 * scale if dtype == torch.bfloat16 else 3e-4 * scale
        assert err <= LOWP_FACTOR * err_eager + floor, f"{what} {name}: rms err {err:.3g} vs eager {err_eager:.3g}"


# (B, Hq, Hk, Lq, Lk, D, Dv): MHA, GQA, MQA, Lq != Lk both ways, blocks with tails
SHAPES = [
    (2, 2, 2, 37, 37, 16, 16),
    (1, 4, 2, 50, 70, 32, 24),
    (2, 3, 1, 70, 45, 8, 8),
    (1, 2, 2, 200, 600, 64, 64),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("interleaved", [True, False])
def test_attention_matches_reference(device, dtype, shape, causal, interleaved, isa):
    B, Hq, Hk, Lq, Lk, D, Dv = shape
    if device == "cpu" and isa != ISAS[-1] and (dtype != torch.float32 or Lk > 100):
        pytest.skip("the lower ISA level runs the float32 small shapes only (time budget)")
    inputs = _inputs(B, Hq, Hk, Lq, Lk, D, Dv, dtype, device)
    kw = dict(causal=causal, interleaved=interleaved)
    _check_against_reference(lambda q, k, v: kx.rope_attention(q, k, v, **kw),
                             lambda q, k, v: ref.rope_attention(q, k, v, **kw), inputs, dtype, str(kw))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_padding_positions_partial_rotary(device, dtype, isa):
    B, Hq, Hk, Lq, Lk, D = 3, 4, 2, 40, 56, 32
    inputs = _inputs(B, Hq, Hk, Lq, Lk, D, D, dtype, device)
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    mask[2, :] = False  # a fully padded sequence: zeros and zero gradients
    qpos = torch.randint(0, 5000, (B, Lq))
    kpos = torch.randint(-100, 5000, (Lk,))
    for kw in (dict(key_padding_mask=mask), dict(key_padding_mask=mask, causal=True),
               dict(q_positions=qpos, k_positions=kpos, interleaved=False),
               dict(q_positions=qpos[0], k_positions=kpos, rotary_dim=16),
               dict(rotary_dim=8, interleaved=False, scale=0.3, causal=True),
               dict(rope=False, key_padding_mask=mask), dict(q_positions=7, k_positions=3)):
        kwd = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        _check_against_reference(lambda q, k, v: kx.rope_attention(q, k, v, **kwd),
                                 lambda q, k, v: ref.rope_attention(q, k, v, **kw), inputs, dtype, str(list(kw)))


@pytest.mark.parametrize("device", devices())
def test_fully_masked_rows_zero_and_zero_grad(device):
    q, k, v = _inputs(1, 2, 2, 8, 4, 16, 16, torch.float32, device)
    # causal with Lq > Lk: the first Lq - Lk rows see no key
    out = kx.rope_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all() and out[:, :, :4].abs().max() == 0
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(gq).all() and gq[:, :, :4].abs().max() == 0
    _, lse = torch.ops.kxkernels.rope_attention_fwd(q, k, v, None, None, None, True, 0.25, True, 1e4, True, 16)
    assert torch.isinf(lse[:, :, :4]).all() and (lse[:, :, :4] > 0).all() and torch.isfinite(lse[:, :, 4:]).all()
    mask = torch.zeros(1, 4, dtype=torch.bool, device=device)
    out = kx.rope_attention(q, k, v, key_padding_mask=mask)
    assert out.abs().max() == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.abs().max() == 0 for g in grads)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("jump", [6.0, 40.0])
def test_attention_running_max_jumps(device, jump):
    """Later key blocks whose scores jump far above the earlier ones: the CPU forward exponentiates
    against the running max and rescales only on a rise of more than 2^8 (jump 6: rises of 17-30
    in log2 units) and recomputes the row past its 2^64 cap (jump 40: rises of 113-132)."""
    q, k, v = _inputs(1, 2, 2, 8, 1300, 16, 16, torch.float32, device)
    with torch.no_grad():
        k[:, :, 600:] *= 1 + jump / 4
        k[:, :, 1100:] *= 2
        q.mul_(2)
    for kw in (dict(rope=False), dict(), dict(key_padding_mask=torch.arange(1300, device=device)[None] % 7 != 3)):
        _check_against_reference(lambda q, k, v: kx.rope_attention(q, k, v, **kw),
                                 lambda q, k, v: ref.rope_attention(q, k, v, **{n: (t.cpu() if isinstance(t, torch.Tensor)
                                                                                    else t) for n, t in kw.items()}),
                                 [q, k, v], torch.float32, f"jump {jump} {list(kw)}")


@pytest.mark.parametrize("device", devices())
def test_attention_strided_inputs(device):
    # (B, L, H, D) projections viewed as (B, H, L, D): stride(-1) == 1 but not contiguous
    B, L, H, D = 2, 33, 3, 16
    qkv = torch.randn(B, L, 3, H, D, device=device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    vt = torch.randn(B, H, D, L, device=device).transpose(-1, -2)  # stride(-1) != 1
    torch.testing.assert_close(kx.rope_attention(q, k, v), ref.rope_attention(q, k, v), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(kx.rope_attention(q, k, vt, causal=True), ref.rope_attention(q, k, vt, causal=True),
                               atol=2e-5, rtol=1e-4)


# ---- apply_rope ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rotary_dim,positions", [(None, None), (16, 5), (24, "L"), (32, "BL")])
def test_apply_rope_matches_reference(device, dtype, interleaved, rotary_dim, positions, isa):
    B, H, L, D = 2, 3, 19, 32
    x = torch.randn(B, H, L, D, dtype=torch.float64)
    pos = {"L": torch.randint(0, 10000, (L,)), "BL": torch.randint(-50, 10000, (B, L))}.get(positions, positions)
    kw = dict(positions=pos, interleaved=interleaved, rotary_dim=rotary_dim)
    xd = x.to(dtype).to(device).requires_grad_()
    x64 = xd.detach().double().cpu().requires_grad_()
    kwd = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y = kx.apply_rope(xd, **kwd)
    y64 = ref.apply_rope(x64, **kw)
    g = torch.randn(B, H, L, D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, xd, g.to(dtype).to(device))
    (gx64,) = torch.autograd.grad(y64, x64, g.to(dtype).double())
    # float32 math then one rounding to the output dtype
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1.5e-3}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), y64, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(gx.double().cpu(), gx64, atol=tol * 4, rtol=tol)
    if rotary_dim is not None:
        assert torch.equal(y[..., rotary_dim:].cpu(), xd[..., rotary_dim:].detach().cpu())


def test_apply_rope_known_values():
    # position 1, D = 2: a plain 2-D rotation by 1 radian
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    y = kx.apply_rope(x, positions=1)
    torch.testing.assert_close(y.flatten(), torch.tensor([math.cos(1.0), math.sin(1.0)]))
    # the two pairings agree after permuting channels
    x = torch.randn(1, 1, 5, 8)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half layout -> interleaved layout
    a = kx.apply_rope(x[..., perm], interleaved=True)
    b = kx.apply_rope(x, interleaved=False)[..., perm]
    torch.testing.assert_close(a, b)


# ---- op contract ------------------------------------------------------------------------------
def test_opcheck():
    q, k, v = _inputs(2, 4, 2, 9, 12, 8, 8, torch.float32, "cpu")
    mask = torch.rand(2, 12) > 0.2
    pos = torch.randint(0, 100, (2, 12))
    ops = torch.ops.kxkernels
    torch.library.opcheck(ops.rope_attention_fwd, (q, k, v, mask, None, pos, True, 0.3, True, 1e4, False, 8))
    torch.library.opcheck(ops.rope_attention_fwd, (q, k, v, None, None, None, False, 0.3, False, 1e4, True, 0))
    q, k, v = (t.detach() for t in (q, k, v))  # the backward op is not itself differentiable
    out, lse = ops.rope_attention_fwd(q, k, v, mask, None, pos, True, 0.3, True, 1e4, False, 8)
    g = torch.randn_like(out)
    torch.library.opcheck(ops.rope_attention_bwd, (g, q, k, v, out, lse, mask, None, pos, True, 0.3, True, 1e4,
                                                   False, 8))
    x = torch.randn(2, 3, 12, 8, requires_grad=True)
    torch.library.opcheck(ops.apply_rope_fwd, (x, pos, 0, 1e4, True, 6, False))
    torch.library.opcheck(ops.apply_rope_fwd, (x, None, 3, 500.0, False, 8, True))


def test_compile_fullgraph_forward_backward():
    q, k, v = _inputs(2, 4, 2, 20, 24, 16, 16, torch.float32, "cpu")
    mask = torch.rand(2, 24) > 0.2

    def f(q, k, v, mask):
        return kx.rope_attention(q, k, v, causal=True, key_padding_mask=mask) + kx.apply_rope(q, positions=2)

    cf = torch.compile(f, fullgraph=True)
    out = cf(q, k, v, mask)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    out_e = f(q, k, v, mask)
    g_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    torch.testing.assert_close(out, out_e)
    for a, b in zip(g, g_e):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    q, k, v = _inputs(1, 2, 1, 5, 7, 4, 3, torch.float64, "cpu")
    mask = torch.tensor([[True, True, False, True, True, False, True]])
    pos = torch.tensor([3, 9, 1, 0, 4])
    torch.autograd.gradcheck(lambda q, k, v: kx.rope_attention(q, k, v, causal=True, key_padding_mask=mask,
                                                               q_positions=pos), (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: kx.rope_attention(q, k, v, interleaved=False, rotary_dim=2,
                                                               scale=0.7), (q, k, v))
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: kx.apply_rope(x, positions=torch.arange(5) * 3, rotary_dim=4), (x,))


# ---- bad input ----------------------------------------------------------------------------------
def _bad_cases():
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 2, 10, 16)
    v = torch.randn(2, 2, 10, 16)
    return q, k, v


@pytest.mark.parametrize("case,exc,match", [
    (lambda q, k, v: kx.rope_attention(q[..., :15], k[..., :15], v), ValueError, "head_dim must be even"),
    (lambda q, k, v: kx.rope_attention(q, k, v, rotary_dim=18), ValueError, "rotary_dim"),
    (lambda q, k, v: kx.rope_attention(q, k, v, rotary_dim=7), ValueError, "rotary_dim"),
    (lambda q, k, v: kx.rope_attention(q[:, :3], k, v), ValueError, "multiple of k heads"),
    (lambda q, k, v: kx.rope_attention(q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape"),
    (lambda q, k, v: kx.rope_attention(q, k, v, key_padding_mask=torch.ones(2, 10)), TypeError, "bool"),
    (lambda q, k, v: kx.rope_attention(q, k, v[:, :, :9]), ValueError, "length"),
    (lambda q, k, v: kx.rope_attention(q, k.double(), v), TypeError, "one dtype"),
    (lambda q, k, v: kx.rope_attention(q, k, v, q_positions=torch.arange(9)), ValueError, "q_positions"),
    (lambda q, k, v: kx.rope_attention(q, k, v, k_positions=torch.zeros(3, 10, dtype=torch.long)), ValueError,
     "k_positions"),
    (lambda q, k, v: kx.rope_attention(q, k, v, k_positions=torch.zeros(10)), TypeError, "k_positions"),
    (lambda q, k, v: kx.rope_attention(q[0], k, v), ValueError, "4 dims"),
    (lambda q, k, v: kx.rope_attention(q, k[..., :8], v), ValueError, "head_dim"),
    (lambda q, k, v: kx.rope_attention(q, k, v, scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v: kx.rope_attention(q.int(), k, v), TypeError, "q must be"),
    (lambda q, k, v: kx.apply_rope(q[..., :15]), ValueError, "head_dim must be even"),
    (lambda q, k, v: kx.apply_rope(q, positions=torch.arange(7)), ValueError, "positions"),
    (lambda q, k, v: kx.apply_rope(q, base=0.0), ValueError, "base"),
])
def test_bad_input_python(case, exc, match):
    with pytest.raises(exc, match=match):
        case(*_bad_cases())


def test_bad_input_cpp_ops():
    """The registered ops check their arguments too (anyone can call torch.ops.kxkernels.*)."""
    q, k, v = _bad_cases()
    ops = torch.ops.kxkernels
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rope_attention_fwd(q[..., :15], k[..., :15], v, None, None, None, False, 0.3, True, 1e4, True, 15)
    with pytest.raises(ValueError, match="multiple of k heads"):
        ops.rope_attention_fwd(q[:, :3], k, v, None, None, None, False, 0.3, True, 1e4, True, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops.rope_attention_fwd(q, k, v, torch.ones(2, 9, dtype=torch.bool), None, None, False, 0.3, True, 1e4,
                               True, 16)
    with pytest.raises(ValueError, match="v must have"):
        ops.rope_attention_fwd(q, k, v[:, :, :9], None, None, None, False, 0.3, True, 1e4, True, 16)
    with pytest.raises(TypeError, match="one dtype"):
        ops.rope_attention_fwd(q, k.half(), v, None, None, None, False, 0.3, True, 1e4, True, 16)
    with pytest.raises(ValueError, match="q_positions"):
        ops.rope_attention_fwd(q, k, v, None, torch.zeros(2, 9, dtype=torch.long), None, False, 0.3, True, 1e4,
                               True, 16)
    with pytest.raises(TypeError, match="int64"):
        ops.rope_attention_fwd(q, k, v, None, torch.zeros(2, 8, dtype=torch.int32), None, False, 0.3, True, 1e4,
                               True, 16)
    out, lse = ops.rope_attention_fwd(q, k, v, None, None, None, False, 0.3, True, 1e4, True, 16)
    with pytest.raises(ValueError, match="grad_out"):
        ops.rope_attention_bwd(out[:, :, :3], q, k, v, out, lse, None, None, None, False, 0.3, True, 1e4, True, 16)
    with pytest.raises(ValueError, match="lse"):
        ops.rope_attention_bwd(out, q, k, v, out, lse[:, :1], None, None, None, False, 0.3, True, 1e4, True, 16)
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.apply_rope_fwd(q, None, 0, 1e4, True, 18, False)
    with pytest.raises(ValueError, match="positions"):
        ops.apply_rope_fwd(q, torch.zeros(2, 7, dtype=torch.long), 0, 1e4, True, 16, False)
