"""causal_linear_attention / linear_attention against the float64 recurrent reference, on every device
present (CPU always, at each ISA level that runs here; CUDA runs the Triton kernels), forward and
backward, every dtype, feature map, normalize on/off, RoPE (both pairings), padding, initial state."""
import pytest
import torch

import kxkernels as kx
from kxkernels import _C
from kxkernels.ops.linear_attention import reference as ref
from tests.conftest import devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Bound on the relative RMS error ||x - x64|| / ||x64|| against float64 math on the same (rounded)
# inputs: float32 math with the state in float32, then the output rounded to the dtype (bf16 has 8
# significant bits, fp16 11); gradients go through one more rounding of the upstream gradient.
REL_RMS = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float64: 1e-12}

# (feature_map, normalize, rope, interleaved)
CONFIGS = [
    ("elu+1", True, False, True),
    ("relu", True, False, True),
    ("identity", False, False, True),
    ("elu+1", False, False, True),
    ("elu+1", True, True, True),
    ("elu+1", True, True, False),
    ("relu", False, True, False),
    ("identity", False, True, True),
]
_CFG_IDS = [f"{fm}-{'norm' if n else 'nonorm'}-{('rope-' + ('inter' if i else 'half')) if r else 'norope'}"
            for fm, n, r, i in CONFIGS]


def _isa_levels():
    supported = _C.build_info()["cpu_isa_supported"]
    order = ["baseline", "avx2", "avx512"]
    return order[: order.index(supported) + 1]


@pytest.fixture(params=_isa_levels())
def isa(request):
    before = _C.cpu_isa()
    assert _C.set_cpu_isa(request.param) == request.param
    yield request.param
    _C.set_cpu_isa(before)


def rel_rms(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def _close(actual, expected, dtype, what):
    err = rel_rms(actual, expected)
    assert err <= REL_RMS[dtype], f"{what}: relative RMS error {err:.3g} > {REL_RMS[dtype]:.3g} ({dtype})"


def _inputs(B, H, L, Dk, Dv, dtype, device, scale=0.5):
    """q, k, v rounded to dtype, as leaves on device, plus float64 CPU copies (leaves)."""
    ts = [(scale * torch.randn(B, H, L, d, dtype=torch.float64)).to(dtype) for d in (Dk, Dk, Dv)]
    low = [t.to(device).requires_grad_() for t in ts]
    high = [t.double().requires_grad_() for t in ts]
    return low, high


def _state(B, H, Dk, Dv, device, acc=torch.float32):
    S = (0.3 * torch.randn(B, H, Dk, Dv, dtype=torch.float64)).to(acc)
    z = (torch.rand(B, H, Dk, dtype=torch.float64) + 0.5).to(acc)  # positive: a plausible elu+1 sum
    return ((S.to(device).requires_grad_(), z.to(device).requires_grad_()),
            (S.double().requires_grad_(), z.double().requires_grad_()))


def _mask(B, L, device):
    m = torch.rand(B, L) > 0.3
    m[0, :5] = False  # a run of padded keys at the start: a row whose sums see nothing yet
    return m.to(device), m


def _run_and_compare(device, dtype, cfg, L, with_mask, with_state, positions=None, B=2, H=3, Dk=16, Dv=24):
    fm, normalize, rope, interleaved = cfg
    (q, k, v), (q64, k64, v64) = _inputs(B, H, L, Dk, Dv, dtype, device)
    kw = dict(feature_map=fm, normalize=normalize, rope=rope, interleaved=interleaved, positions=positions)
    mask, mask64 = _mask(B, L, device) if with_mask else (None, None)
    state, state64 = _state(B, H, Dk, Dv, device) if with_state else (None, None)
    out, (S, z) = kx.causal_linear_attention(q, k, v, key_padding_mask=mask, initial_state=state,
                                             return_final_state=True, **kw)
    pos64 = positions.cpu() if isinstance(positions, torch.Tensor) else positions
    kw64 = dict(kw, positions=pos64)
    out64, (S64, z64) = ref.causal_linear_attention_recurrent(q64, k64, v64, key_padding_mask=mask64,
                                                              initial_state=state64, return_final_state=True,
                                                              **kw64)
    assert out.dtype == dtype and out.shape == (B, H, L, Dv)
    assert S.dtype == torch.float32 and z.dtype == torch.float32
    _close(out, out64, dtype, "out")
    _close(S, S64, torch.float32 if dtype == torch.float32 else dtype, "final S")
    _close(z, z64, torch.float32 if dtype == torch.float32 else dtype, "final z")
    go = torch.randn(B, H, L, Dv, dtype=torch.float64).to(dtype)
    gS = torch.randn(B, H, Dk, Dv, dtype=torch.float64)
    gz = torch.randn(B, H, Dk, dtype=torch.float64)
    leaves = [q, k, v] + (list(state) if with_state else [])
    leaves64 = [q64, k64, v64] + (list(state64) if with_state else [])
    grads = torch.autograd.grad((out, S, z), leaves, (go.to(device), gS.float().to(device), gz.float().to(device)))
    grads64 = torch.autograd.grad((out64, S64, z64), leaves64, (go.double(), gS.float().double(), gz.float().double()))
    for name, g, g64 in zip(["q", "k", "v", "S0", "z0"], grads, grads64):
        _close(g, g64, dtype, f"grad {name}")
    if with_mask:
        pad = ~mask64
        assert float(grads[1].detach().cpu().double().permute(0, 2, 1, 3)[pad].abs().max()) == 0.0, \
            "padded keys must get zero gradient"
        assert float(grads[2].detach().cpu().double().permute(0, 2, 1, 3)[pad].abs().max()) == 0.0


# ---- the reference forms agree with each other -------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=_CFG_IDS)
def test_reference_forms_agree(cfg):
    fm, normalize, rope, interleaved = cfg
    (_, _, _), (q, k, v) = _inputs(2, 2, 70, 8, 6, torch.float64, "cpu")
    mask, _ = _mask(2, 70, "cpu")
    kw = dict(feature_map=fm, normalize=normalize, rope=rope, interleaved=interleaved, key_padding_mask=mask)
    rec = ref.causal_linear_attention_recurrent(q, k, v, **kw)
    torch.testing.assert_close(ref.causal_linear_attention_cumsum(q, k, v, **kw), rec, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ref.causal_linear_attention_quadratic(q, k, v, **kw), rec, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ref.causal_linear_attention_chunked(q, k, v, chunk=16, **kw), rec,
                               atol=1e-12, rtol=1e-10)


def test_reference_rope_is_relative():
    """RoPE scores depend on position differences only: shifting every position leaves them unchanged."""
    x, y = torch.randn(1, 1, 10, 8, dtype=torch.float64), torch.randn(1, 1, 10, 8, dtype=torch.float64)
    for inter in (True, False):
        s0 = ref.apply_rope(x, 0, interleaved=inter) @ ref.apply_rope(y, 0, interleaved=inter).transpose(-1, -2)
        s1 = ref.apply_rope(x, 37, interleaved=inter) @ ref.apply_rope(y, 37, interleaved=inter).transpose(-1, -2)
        torch.testing.assert_close(s0, s1, atol=1e-5, rtol=1e-5)  # float32 angles


# ---- kernels vs the float64 recurrent reference --------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_CFG_IDS)
def test_forward_backward(device, dtype, cfg):
    # L = 150 spans three chunks of the CPU kernel (64 + 64 + 22)
    _run_and_compare(device, dtype, cfg, 150, with_mask=False, with_state=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], CONFIGS[6]], ids=[_CFG_IDS[0], _CFG_IDS[4], _CFG_IDS[6]])
def test_padding_and_initial_state(device, dtype, cfg):
    _run_and_compare(device, dtype, cfg, 131, with_mask=True, with_state=True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_CFG_IDS)
def test_cpu_isa_levels(isa, cfg):
    for dtype in (torch.float32, torch.bfloat16):
        _run_and_compare("cpu", dtype, cfg, 97, with_mask=True, with_state=True, Dk=20, Dv=12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("L,Dk,Dv", [(1, 4, 4), (2, 2, 1), (63, 8, 8), (64, 32, 16), (65, 6, 10), (200, 64, 64)])
def test_shapes(device, L, Dk, Dv):
    _run_and_compare(device, torch.float32, CONFIGS[4], L, with_mask=True, with_state=False, B=1, H=2, Dk=Dk, Dv=Dv)


@pytest.mark.parametrize("device", devices())
def test_positions_tensors(device):
    B, L = 2, 40
    p1 = torch.randint(0, 5000, (L,), device=device)
    _run_and_compare(device, torch.float32, CONFIGS[4], L, False, False, positions=p1, B=B)
    p2 = torch.randint(-100, 20000, (B, L), device=device, dtype=torch.int32)
    _run_and_compare(device, torch.float32, CONFIGS[5], L, True, True, positions=p2, B=B)
    _run_and_compare(device, torch.float32, CONFIGS[4], L, False, True, positions=1000, B=B)


@pytest.mark.parametrize("device", devices())
def test_strided_inputs(device):
    """(B, L, H, D) activations viewed as (B, H, L, D): no copy needed, same result."""
    B, L, H, D = 2, 70, 3, 16
    base = [torch.randn(B, L, H, D, device=device) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    out = kx.causal_linear_attention(q, k, v, rope=True)
    expected = kx.causal_linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), rope=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    vs = torch.randn(B, H, L, 2 * D, device=device)[..., ::2]  # stride 2 along the head dim
    torch.testing.assert_close(kx.causal_linear_attention(q, k, vs),
                               kx.causal_linear_attention(q, k, vs.contiguous()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [dict(feature_map="identity", normalize=False),
                                dict(feature_map="identity", normalize=False, rope=True),
                                dict(feature_map="elu+1", normalize=True),
                                dict(feature_map="relu", normalize=True, rope=True)],
                         ids=["identity", "identity-rope", "elu+1", "relu-rope"])
def test_strided_float32_against_float64(kw, causal):
    """float32 inputs are read in place (no tile copy) when their last dim is unit-stride, with any
    row stride: (B, L, H, D) views, a key mask, forward and backward against float64. Tolerance:
    2e-4 abs (float32 sums over 75 positions)."""
    B, L, H, D = 2, 75, 3, 16
    g = torch.Generator().manual_seed(11)
    base = [0.5 * torch.randn(B, L, H, D, generator=g) for _ in range(3)]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 60:] = False
    mask[0, 5] = False
    grad = torch.randn(B, H, L, D, generator=g)
    fn = kx.causal_linear_attention if causal else kx.linear_attention
    rf = ref.causal_linear_attention_recurrent if causal else ref.linear_attention
    leaves32 = [t.clone().requires_grad_() for t in base]
    leaves64 = [t.double().requires_grad_() for t in base]
    out = fn(*(t.transpose(1, 2) for t in leaves32), key_padding_mask=mask, **kw)
    exp = rf(*(t.transpose(1, 2) for t in leaves64), key_padding_mask=mask, **kw)
    out.backward(grad)
    exp.backward(grad.double())
    torch.testing.assert_close(out.double(), exp, atol=2e-4, rtol=1e-4)
    for a, b in zip(leaves32, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-4, rtol=1e-4)


# ---- state: prefill + decode == one call -------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], CONFIGS[5], CONFIGS[2]],
                         ids=[_CFG_IDS[0], _CFG_IDS[4], _CFG_IDS[5], _CFG_IDS[2]])
def test_prefill_then_decode_equals_one_call(device, cfg):
    fm, normalize, rope, interleaved = cfg
    B, H, L, D, prefill = 2, 4, 90, 16, 70
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    mask = torch.rand(B, L, device=device) > 0.2
    kw = dict(feature_map=fm, normalize=normalize, rope=rope, interleaved=interleaved)
    full, (S_full, z_full) = kx.causal_linear_attention(q, k, v, key_padding_mask=mask, return_final_state=True, **kw)
    out, state = kx.causal_linear_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill],
                                            key_padding_mask=mask[:, :prefill], return_final_state=True, **kw)
    pieces = [out]
    t = prefill
    for n in (1, 1, 5, 1, 12):  # decode steps of one token, then short chunks
        sl = slice(t, t + n)
        o, state = kx.causal_linear_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], key_padding_mask=mask[:, sl],
                                              positions=t, initial_state=state, return_final_state=True, **kw)
        pieces.append(o)
        t += n
    assert t == L
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], S_full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(state[1], z_full, atol=2e-5, rtol=1e-5)


def test_gradient_flows_through_carried_state():
    """Training over two segments with the state carried: the same gradients as one long call."""
    B, H, L, D = 1, 2, 50, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = kx.causal_linear_attention(q, k, v, rope=True)
    o1, st = kx.causal_linear_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], rope=True, return_final_state=True)
    o2 = kx.causal_linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], rope=True, positions=20,
                                    initial_state=st)
    g = torch.randn_like(full)
    g_full = torch.autograd.grad(full, (q, k, v), g)
    g_seg = torch.autograd.grad(torch.cat([o1, o2], 2), (q, k, v), g)
    for a, b in zip(g_seg, g_full):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ---- non-causal ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[5], CONFIGS[6]],
                         ids=[_CFG_IDS[0], _CFG_IDS[2], _CFG_IDS[5], _CFG_IDS[6]])
def test_non_causal(device, dtype, cfg):
    fm, normalize, rope, interleaved = cfg
    B, H, L, Dk, Dv = 2, 3, 100, 16, 8
    (q, k, v), (q64, k64, v64) = _inputs(B, H, L, Dk, Dv, dtype, device)
    mask, mask64 = _mask(B, L, device)
    kw = dict(feature_map=fm, normalize=normalize, rope=rope, interleaved=interleaved)
    out = kx.linear_attention(q, k, v, key_padding_mask=mask, **kw)
    out64 = ref.linear_attention(q64, k64, v64, key_padding_mask=mask64, **kw)
    _close(out, out64, dtype, "out")
    go = torch.randn(B, H, L, Dv, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), go.to(device))
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), go.double())
    for name, g, g64 in zip("qkv", grads, grads64):
        _close(g, g64, dtype, f"grad {name}")


# ---- fully masked, zero denominators -----------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_fully_masked_rows_are_zero_with_zero_grad(device):
    B, H, L, D = 2, 2, 80, 8
    q, k, v = (torch.randn(B, H, L, D, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[1] = False  # batch 1: every key padded
    for f in (kx.causal_linear_attention, kx.linear_attention):
        out = f(q, k, v, key_padding_mask=mask)
        assert bool(torch.isfinite(out).all()) and float(out[1].abs().max()) == 0.0
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        for g in (gq, gk, gv):
            assert bool(torch.isfinite(g).all()) and float(g[1].abs().max()) == 0.0
    # eps = 0: a zero denominator counts as 0, not NaN
    out = kx.causal_linear_attention(q, k, v, key_padding_mask=mask, eps=0.0)
    assert bool(torch.isfinite(out).all()) and float(out[1].abs().max()) == 0.0


# ---- custom-op machinery -------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    ops = torch.ops.kxkernels
    B, H, L, Dk, Dv = 2, 2, 70, 8, 6
    q, k, v = (torch.randn(B, H, L, d, device=device, requires_grad=True) for d in (Dk, Dk, Dv))
    mask = torch.rand(B, L, device=device) > 0.3
    pos = torch.arange(L, device=device) * 3
    S0 = torch.randn(B, H, Dk, Dv, device=device, requires_grad=True)
    z0 = (torch.rand(B, H, Dk, device=device) + 0.5).requires_grad_()
    cases = [
        (q, k, v, "elu+1", True, 1e-6, False, 10000.0, True, None, 0, None, None, None),
        (q, k, v, "relu", True, 1e-3, True, 10000.0, False, pos, 0, mask, S0, z0),
        (q, k, v, "identity", False, 1e-6, True, 500.0, True, None, 7, mask, None, None),
    ]
    for args in cases:
        torch.library.opcheck(ops.causal_linear_attention_fwd, args)
        torch.library.opcheck(ops.linear_attention_fwd, args[:12])
        out, den, S, z = ops.causal_linear_attention_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                           for a in args])
        go, gS, gz = torch.randn_like(out), torch.randn_like(S), torch.randn_like(z)
        d = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(ops.causal_linear_attention_bwd, (go, gS, gz, d[0], d[1], d[2], out, den, *d[3:]))
        torch.library.opcheck(ops.causal_linear_attention_bwd, (go, None, None, d[0], d[1], d[2], out, den, *d[3:]))
        out2, den2 = ops.linear_attention_fwd(*d[:12])
        torch.library.opcheck(ops.linear_attention_bwd, (go, d[0], d[1], d[2], out2, den2, *d[3:12]))


def test_gradcheck_float64():
    B, H, L, Dk, Dv = 1, 2, 9, 4, 3
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64, requires_grad=True) for d in (Dk, Dk, Dv))
    S0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(B, H, Dk, dtype=torch.float64) + 0.5).requires_grad_()
    mask = torch.tensor([[True, False, True, True, True, False, True, True, True]])

    def causal(q, k, v, S0, z0, **kw):
        out, (S, z) = kx.causal_linear_attention(q, k, v, initial_state=(S0, z0), return_final_state=True,
                                                 key_padding_mask=mask, **kw)
        return out, S, z

    for kw in (dict(), dict(rope=True), dict(feature_map="relu", rope=True, interleaved=False, eps=0.1),
               dict(feature_map="identity", normalize=False, rope=True)):
        assert torch.autograd.gradcheck(lambda *a: causal(*a, **kw), (q, k, v, S0, z0))
        assert torch.autograd.gradcheck(lambda q, k, v: kx.linear_attention(q, k, v, key_padding_mask=mask, **kw),
                                        (q, k, v))


def _model():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, h, mask):
            q, k, v = self.qkv(h).view(2, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)
            out, (S, z) = kx.causal_linear_attention(q, k, v, rope=True, key_padding_mask=mask,
                                                     return_final_state=True)
            return out.sum() + S.sum() * 0.1 + kx.linear_attention(q, k, v, feature_map="relu").sum()
    return Block()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    model = _model()
    h, mask = torch.randn(2, 30, 16), torch.rand(2, 30) > 0.2
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(h, mask)
    loss.backward()
    g_compiled = model.qkv.weight.grad.clone()
    model.zero_grad()
    eager = model(h, mask)
    eager.backward()
    torch.testing.assert_close(loss, eager, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g_compiled, model.qkv.weight.grad, atol=1e-4, rtol=1e-5)


# ---- bad input: clear errors naming the argument ---------------------------------------------
def test_bad_inputs():
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    f = kx.causal_linear_attention
    with pytest.raises(ValueError, match="identity"):
        f(q, k, v, feature_map="identity")
    with pytest.raises(ValueError, match="feature_map"):
        f(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="k must have the shape"):
        f(q, torch.randn(2, 3, 10, 6), v)
    with pytest.raises(ValueError, match="k must have the shape"):
        f(q, torch.randn(2, 3, 11, 8), v)
    with pytest.raises(ValueError, match="v must have shape"):
        f(q, k, torch.randn(2, 3, 9, 8))
    with pytest.raises(ValueError, match="eps"):
        f(q, k, v, eps=-1e-3)
    with pytest.raises(ValueError, match="eps"):
        f(q, k, v, eps=float("nan"))
    with pytest.raises(ValueError, match="even"):
        f(torch.randn(2, 3, 10, 7), torch.randn(2, 3, 10, 7), v, rope=True)
    with pytest.raises(ValueError, match="4 dims"):
        f(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="same dtype"):
        f(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be"):
        f(q.long(), k, v)
    with pytest.raises(ValueError, match="initial_state S must have shape"):
        f(q, k, v, initial_state=(torch.zeros(2, 3, 8, 7), torch.zeros(2, 3, 8)))
    with pytest.raises(ValueError, match="initial_state z must have shape"):
        f(q, k, v, initial_state=(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8)))
    with pytest.raises(TypeError, match="initial_state S must be torch.float32"):
        f(q, k, v, initial_state=(torch.zeros(2, 3, 8, 8, dtype=torch.float16), torch.zeros(2, 3, 8)))
    with pytest.raises(TypeError, match="pair"):
        f(q, k, v, initial_state=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        f(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        f(q, k, v, key_padding_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="positions must be"):
        f(q, k, v, rope=True, positions=torch.arange(9))
    with pytest.raises(TypeError, match="positions"):
        f(q, k, v, rope=True, positions=torch.arange(10.0))
    with pytest.raises(ValueError, match="positive"):
        f(torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8))
    with pytest.raises(ValueError, match="identity"):
        kx.linear_attention(q, k, v, feature_map="identity")


def test_bad_inputs_direct_op_calls():
    """torch.ops.kxkernels.* validate in C++ too: an exception, never an out-of-bounds access."""
    ops = torch.ops.kxkernels
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    base = [q, k, v, "elu+1", True, 1e-6, False, 10000.0, True, None, 0, None, None, None]

    def call(**over):
        args = list(base)
        names = ["q", "k", "v", "fm", "normalize", "eps", "rope", "base", "inter", "pos", "off", "mask", "S0", "z0"]
        for name, val in over.items():
            args[names.index(name)] = val
        return ops.causal_linear_attention_fwd(*args)

    for over, exc, match in [
        (dict(fm="identity"), ValueError, "identity"),
        (dict(fm="tanh"), ValueError, "feature_map"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(k=torch.randn(2, 3, 11, 8)), ValueError, "k must have"),
        (dict(v=torch.randn(2, 3, 9, 8)), ValueError, "v must have"),
        (dict(q=torch.randn(2, 3, 10, 7), k=torch.randn(2, 3, 10, 7), rope=True), ValueError, "even"),
        (dict(S0=torch.zeros(2, 3, 8, 9), z0=torch.zeros(2, 3, 8)), ValueError, "initial_state S"),
        (dict(S0=torch.zeros(2, 3, 8, 8, dtype=torch.float64), z0=torch.zeros(2, 3, 8)), TypeError, "initial_state"),
        (dict(S0=torch.zeros(2, 3, 8, 8)), ValueError, "both"),
        (dict(mask=torch.ones(2, 11, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(rope=True, pos=torch.arange(3)), ValueError, "positions"),
        (dict(v=v.half()), TypeError, "same dtype"),
    ]:
        with pytest.raises(exc, match=match):
            call(**over)
    out, den, S, z = ops.causal_linear_attention_fwd(*base)
    with pytest.raises(ValueError, match="grad_out"):
        ops.causal_linear_attention_bwd(out[:, :, :3], None, None, q, k, v, out, den, *base[3:])
    with pytest.raises(ValueError, match="den"):
        ops.causal_linear_attention_bwd(out, None, None, q, k, v, out, den[:, :, :2], *base[3:])
    with pytest.raises(ValueError, match="grad_S"):
        ops.causal_linear_attention_bwd(out, S[0], None, q, k, v, out, den, *base[3:])


# ---- kxkernels.nn.CausalLinearAttention -----------------------------------------------------------
@pytest.mark.parametrize("rope", [False, True])
def test_module_matches_reference_and_decodes(rope):
    from kxkernels.nn import CausalLinearAttention

    torch.manual_seed(1)
    layer = CausalLinearAttention(32, 4, rope=rope).double()
    B, L = 2, 40
    h = torch.randn(B, L, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, L) > 0.2
    out = layer(h, key_padding_mask=mask)
    # the same block written with the float64 reference
    q, k, v = layer.qkv(h).view(B, L, 3, 4, 8).permute(2, 0, 3, 1, 4)
    o = ref.causal_linear_attention_recurrent(q, k, v, rope=rope, key_padding_mask=mask)
    expected = layer.out(o.transpose(1, 2).reshape(B, L, 32))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, h, g)[0], torch.autograd.grad(expected, h, g)[0],
                               atol=1e-12, rtol=1e-10)
    # prefill 25 tokens, then decode one at a time: the same outputs as the single call
    with torch.no_grad():
        o1, state = layer(h[:, :25], key_padding_mask=mask[:, :25], state=layer.empty_state(B))
        steps = [o1]
        for t in range(25, L):
            o_t, state = layer(h[:, t:t + 1], key_padding_mask=mask[:, t:t + 1], state=state)
            steps.append(o_t)
    assert state.position == L and state.S.dtype == torch.float64
    torch.testing.assert_close(torch.cat(steps, 1), out.detach(), atol=1e-12, rtol=1e-10)


def test_module_bad_arguments():
    from kxkernels.nn import CausalLinearAttention

    with pytest.raises(ValueError, match="multiple of num_heads"):
        CausalLinearAttention(30, 4)
    with pytest.raises(ValueError, match="feature_map"):
        CausalLinearAttention(32, 4, feature_map="identity")
    with pytest.raises(ValueError, match="hidden must be"):
        CausalLinearAttention(32, 4)(torch.randn(2, 5, 16))
