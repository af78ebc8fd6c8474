"""GlobalPointer scores, the dense / sparse ZLPR losses and the fused global_pointer_loss against the
float64 eager reference (kxkernels/ops/global_pointer/reference.py), forward and backward, on every
device present (CPU at both ISA levels that run here; CUDA runs the Triton kernels)."""
import pytest
import torch

import kxkernels as kx
from kxkernels import _C
from kxkernels.ops.global_pointer import reference as ref
from tests.conftest import devices

ops = torch.ops.kxkernels
NINF = float("-inf")

# Bound on the relative RMS error ||a - e|| / ||e|| against float64 on the same (rounded) inputs:
# float32 math throughout, then the output rounded to the dtype (bf16 8 bits, fp16 11 bits).
REL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _isas():
    levels = ["baseline"]
    if _C.build_info()["cpu_isa_supported"] in ("avx2", "avx512"):
        levels.append("avx2")
    return levels


@pytest.fixture(params=_isas())
def isa(request):
    old = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(old)


def _rel_err(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape
    inf_a, inf_e = torch.isinf(a) & (a < 0), torch.isinf(e) & (e < 0)
    assert torch.equal(inf_a, inf_e), "the -inf cells differ"
    a, e = a[~inf_e], e[~inf_e]
    assert torch.isfinite(a).all(), "non-finite values"
    den = e.norm().clamp_min(1e-30)
    return float((a - e).norm() / den) if e.numel() else 0.0


def _close(actual, expected, dtype, what):
    err = _rel_err(actual, expected)
    assert err <= REL[dtype], f"{what}: relative RMS error {err:.3g} > {REL[dtype]:.3g} ({dtype})"


def _inputs(B, H, L, D, dtype, device, *, strided=False, bias=False, mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # (B, L, H, D) storage viewed as (B, H, L, D), as a Linear's output reshaped
        q64 = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        k64 = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q64 = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
        k64 = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    q = q64.to(dtype).to(device)
    k = k64.to(dtype).to(device)
    extra = {}
    if bias:
        extra["start_bias"] = torch.randn(B, H, L, generator=g, dtype=torch.float64).to(dtype).to(device)
        extra["end_bias"] = torch.randn(B, H, L, generator=g, dtype=torch.float64).to(dtype).to(device)
    if mask:
        m = torch.ones(B, L, dtype=torch.bool)
        for b in range(B):
            m[b, L - b * max(1, L // 4):] = False if b else True
        if L > 3:
            m[0, 1] = False  # a hole inside the sentence
        extra["mask"] = m.to(device)
    return q, k, extra


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _to64(extra):
    return {n: (v if v.dtype == torch.bool else _leaf(v.double().cpu())) for n, v in extra.items()}


def _spans(B, H, L, P, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, L, (B, H, P), generator=g)
    j = torch.randint(0, L, (B, H, P), generator=g)
    i, j = torch.minimum(i, j), torch.maximum(i, j)  # start <= end, always (else a ValueError)
    s = torch.stack((i, j), dim=-1)
    s[:, :, -1] = -1  # padding
    if P > 2:
        s[:, :, 1] = s[:, :, 0]  # a duplicate
    return s


CASES = [  # (B, H, L, D, settings)
    (2, 3, 7, 8, dict()),
    (2, 2, 70, 16, dict(mask=True, bias=True)),
    (1, 2, 33, 6, dict(rope=False, tril=False, mask=True)),
    (2, 2, 40, 12, dict(interleaved=False, strided=True, bias=True)),
    (1, 1, 130, 8, dict(tril=False, scale=0.3)),
]


def _split(settings):
    s = dict(settings)
    data = {n: s.pop(n) for n in ("mask", "bias", "strided") if n in s}
    return data, s


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + "-" + "-".join(c[4]))
def test_scores_forward_backward(device, dtype, case, isa):
    B, H, L, D, settings = case
    data, kw = _split(settings)
    q, k, extra = _inputs(B, H, L, D, dtype, device, **data)
    q, k = _leaf(q), _leaf(k)
    extra = {n: (v if v.dtype == torch.bool else _leaf(v)) for n, v in extra.items()}
    q64, k64 = _leaf(q.double().cpu()), _leaf(k.double().cpu())
    extra64 = _to64(extra)
    s = kx.global_pointer(q, k, **extra, **kw)
    s64 = ref.global_pointer(q64, k64, **extra64, **kw)
    assert s.dtype == dtype and s.shape == (B, H, L, L)
    _close(s, s64, dtype, "logits")
    gr = torch.randn(B, H, L, L, dtype=torch.float64).to(dtype)
    gr = gr.masked_fill(torch.isinf(s64.detach()), float("nan"))  # masked cells must not leak
    gr64 = gr.double()  # the reference's masked_fill drops them too
    leaves = [q, k] + [v for v in extra.values() if v.dtype != torch.bool]
    leaves64 = [q64, k64] + [v for v in extra64.values() if v.dtype != torch.bool]
    grads = torch.autograd.grad(s, leaves, gr.to(device))
    grads64 = torch.autograd.grad(s64, leaves64, gr64)
    for name, g, g64 in zip(["q", "k", "start_bias", "end_bias"], grads, grads64):
        assert g.dtype == dtype
        _close(g, g64, dtype, f"grad {name}")


@pytest.mark.parametrize("device", devices())
def test_scores_masked_cells_are_minus_inf_with_zero_grad(device):
    q, k, extra = _inputs(2, 2, 9, 8, torch.float32, device, mask=True)
    q = _leaf(q)
    s = kx.global_pointer(q, k, **extra)
    keep = ref.score_mask(2, 9, extra["mask"], True, device).expand_as(s)
    assert (s[~keep] == NINF).all() and torch.isfinite(s[keep]).all()
    # A loss that is finite on the kept cells only: the masked cells' gradient is zero, not NaN.
    (g,) = torch.autograd.grad(torch.where(keep, s, 0.0).sum(), q)
    assert torch.isfinite(g).all()
    pad = ~extra["mask"]
    assert (g.permute(0, 2, 1, 3)[pad] == 0).all()


@pytest.mark.parametrize("device", devices())
def test_fully_masked_batch(device):
    q, k, _ = _inputs(2, 2, 6, 4, torch.float32, device)
    q, k = _leaf(q), _leaf(k)
    mask = torch.tensor([[False] * 6, [True] * 6], device=device)
    spans = torch.tensor([[0, 2], [1, 1]], device=device).expand(2, 2, 2, 2)
    loss = kx.global_pointer_loss(q, k, spans, mask=mask, reduction="none")
    assert torch.isfinite(loss).all() and (loss[0] == 0).all()
    gq, gk = torch.autograd.grad(loss.sum(), (q, k))
    assert (gq[0] == 0).all() and (gk[0] == 0).all() and torch.isfinite(gq).all()
    s = kx.global_pointer(q, k, mask=mask)
    assert (s[0] == NINF).all()
    logits = torch.full((3, 5), NINF, device=device, requires_grad=True)
    y = torch.zeros(3, 5, device=device)
    y[0, 1] = 1
    lm = kx.multilabel_categorical_crossentropy(logits, y)
    assert (lm == 0).all()
    (gl,) = torch.autograd.grad(lm.sum(), logits)
    assert (gl == 0).all()


# ---- dense and sparse ZLPR --------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("n,c", [(1, 1), (5, 13), (7, 300), (3, 4097)])
def test_mcce_forward_backward(device, dtype, soft, n, c, isa):
    x = (4 * torch.randn(n, c, dtype=torch.float64)).to(dtype)
    if c > 3:
        x[:, ::3] = NINF  # masked cells, some of them labelled positive
    y = torch.rand(n, c, dtype=torch.float64) if soft else (torch.rand(n, c) < 0.3).double()
    if soft:
        y[:, 1::5] = 0.0
        y[:, 2::7] = 1.0
    x, x64 = _leaf(x.to(device)), _leaf(x.double())
    loss = kx.multilabel_categorical_crossentropy(x, y.to(dtype).to(device))
    loss64 = ref.multilabel_categorical_crossentropy(x64, y.to(dtype).double())
    assert loss.dtype == dtype and loss.shape == (n,)
    _close(loss, loss64, dtype, "loss")
    g = torch.rand(n, dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad(loss, x, g.to(dtype).to(device))
    (gx64,) = torch.autograd.grad(loss64, x64, g.to(dtype).double())
    _close(gx, gx64, dtype, "grad")
    assert (gx.cpu()[torch.isinf(x64.detach())] == 0).all()


@pytest.mark.parametrize("device", devices())
def test_mcce_bool_labels_and_batch_dims(device):
    x = torch.randn(2, 3, 50, device=device)
    y = torch.rand(2, 3, 50, device=device) < 0.2
    out = kx.multilabel_categorical_crossentropy(x, y)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, ref.multilabel_categorical_crossentropy(x, y.float()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_mcce_forward_backward(device, dtype, mask_zero, isa):
    n, c, P = 6, 257, 5
    x = (3 * torch.randn(n, c, dtype=torch.float64)).to(dtype)
    x[:, 7] = NINF
    pos = torch.randint(0, c, (n, P))
    pos[0, 1] = pos[0, 0]  # duplicate
    pos[1, 2:] = -1  # padding
    pos[2, :] = -1  # no positive
    pos[3, 0] = 0
    pos[4, 1] = 7  # a positive on a -inf logit: excluded
    x, x64 = _leaf(x.to(device)), _leaf(x.double())
    loss = kx.sparse_multilabel_categorical_crossentropy(x, pos.to(device), mask_zero=mask_zero)
    loss64 = ref.sparse_multilabel_categorical_crossentropy(x64, pos, mask_zero=mask_zero)
    _close(loss, loss64, dtype, "loss")
    assert (loss >= 0).all()
    g = torch.rand(n, dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad(loss, x, g.to(dtype).to(device))
    (gx64,) = torch.autograd.grad(loss64, x64, g.to(dtype).double())
    _close(gx, gx64, dtype, "grad")
    # without mask_zero it is the dense loss on the scattered labels
    if not mask_zero:
        dense = ref.multilabel_categorical_crossentropy(x64.detach(), ref.positive_mask(x64.shape, pos).double())
        torch.testing.assert_close(loss64.detach(), dense)


@pytest.mark.parametrize("device", devices())
def test_sparse_mcce_never_negative_where_the_reference_formula_is(device):
    # One positive at 16 and negatives far below: in float32, lse(all) rounds to lse(pos), the
    # bert4keras form log(1 - e^{lse(pos) - lse(all)}) hits its 1e-7 clip and the loss is ~ -0.118.
    x = torch.full((4, 64), -30.0)
    x[:, 3] = 16.0
    x[1, 3] = 12.0
    x[2, :] = 40.0
    pos = torch.full((4, 2), 3)
    pos[2, 1] = 5
    b4k = ref.sparse_multilabel_categorical_crossentropy_bert4keras(x, pos)
    assert float(b4k[0]) < -0.1  # the reference formula has gone negative
    ours = kx.sparse_multilabel_categorical_crossentropy(x.to(device), pos.to(device))
    exact = ref.sparse_multilabel_categorical_crossentropy(x.double(), pos)
    assert (ours >= 0).all()
    torch.testing.assert_close(ours.double().cpu(), exact, atol=1e-6, rtol=1e-5)
    fused_dense = kx.multilabel_categorical_crossentropy(x.to(device), ref.positive_mask(x.shape, pos).float().to(device))
    assert (fused_dense >= 0).all()


# ---- fused loss --------------------------------------------------------------------------------
LOSS_CASES = [  # (B, H, L, D, P, settings)
    (2, 3, 9, 8, 4, dict()),
    (2, 2, 70, 16, 6, dict(mask=True, bias=True)),
    (1, 2, 33, 6, 5, dict(rope=False, tril=False, mask=True)),
    (2, 2, 40, 12, 3, dict(interleaved=False, strided=True, bias=True)),
    (1, 1, 150, 8, 40, dict(scale=0.4)),
]


def _loss_args(case, dtype, device, seed=0):
    B, H, L, D, P, settings = case
    data, kw = _split(settings)
    q, k, extra = _inputs(B, H, L, D, dtype, device, seed=seed, **data)
    spans = _spans(B, H, L, P, seed=seed)
    if "mask" in extra and P > 2:
        spans[0, 0, 2] = torch.tensor([0, 1])  # a span ending on a padded token: excluded
    return q, k, spans.to(device), extra, kw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "-" + "-".join(c[5]))
def test_fused_loss_forward_backward(device, dtype, case, isa):
    q, k, spans, extra, kw = _loss_args(case, dtype, device)
    q, k = _leaf(q), _leaf(k)
    extra = {n: (v if v.dtype == torch.bool else _leaf(v)) for n, v in extra.items()}
    q64, k64 = _leaf(q.double().cpu()), _leaf(k.double().cpu())
    extra64 = _to64(extra)
    loss = kx.global_pointer_loss(q, k, spans, **extra, **kw, reduction="none")
    loss64 = ref.global_pointer_loss(q64, k64, spans.cpu(), **extra64, **kw, reduction="none")
    assert loss.dtype == dtype and loss.shape == q.shape[:2]
    _close(loss, loss64, dtype, "loss")
    g = torch.rand(loss64.shape, dtype=torch.float64) + 0.5
    leaves = [q, k] + [v for v in extra.values() if v.dtype != torch.bool]
    leaves64 = [q64, k64] + [v for v in extra64.values() if v.dtype != torch.bool]
    grads = torch.autograd.grad(loss, leaves, g.to(dtype).to(device))
    grads64 = torch.autograd.grad(loss64, leaves64, g.to(dtype).double())
    for name, gr, gr64 in zip(["q", "k", "start_bias", "end_bias"], grads, grads64):
        assert gr.dtype == dtype
        _close(gr, gr64, dtype, f"grad {name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "-" + "-".join(c[5]))
def test_fused_equals_unfused(device, dtype, case):
    """global_pointer_loss == multilabel_categorical_crossentropy(global_pointer(...)), forward and
    backward, both through the package's kernels, with the mean over the B * H rows."""
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 runs on CPU only")
    q, k, spans, extra, kw = _loss_args(case, dtype, device, seed=1)
    B, H, L, _ = q.shape
    q, k = _leaf(q), _leaf(k)
    extra = {n: (v if v.dtype == torch.bool else _leaf(v)) for n, v in extra.items()}
    leaves = [q, k] + [v for v in extra.values() if v.dtype != torch.bool]
    fused = kx.global_pointer_loss(q, k, spans, **extra, **kw)
    labels = ref.spans_to_labels(spans, L).reshape(B * H, L * L).to(dtype)
    logits = kx.global_pointer(q, k, **extra, **kw).reshape(B * H, L * L)
    unfused = kx.multilabel_categorical_crossentropy(logits, labels).mean()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused, unfused, **tol)
    gf = torch.autograd.grad(fused, leaves)
    gu = torch.autograd.grad(unfused, leaves)
    for a, b in zip(gf, gu):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", devices())
def test_reductions(device):
    q, k, spans, extra, kw = _loss_args(LOSS_CASES[0], torch.float32, device)
    none = kx.global_pointer_loss(q, k, spans, reduction="none")
    torch.testing.assert_close(kx.global_pointer_loss(q, k, spans, reduction="sum"), none.sum())
    torch.testing.assert_close(kx.global_pointer_loss(q, k, spans), none.mean())
    assert (none > 0).all()


def test_decode_spans():
    s = torch.full((2, 2, 4, 4), NINF)
    s[0, 1, 0, 2] = 0.5
    s[1, 0, 3, 3] = 2.0
    s[1, 1, 1, 2] = -0.1
    assert kx.decode_spans(s).tolist() == [[0, 1, 0, 2], [1, 0, 3, 3]]
    assert kx.decode_spans(s, threshold=-0.5).tolist() == [[0, 1, 0, 2], [1, 0, 3, 3], [1, 1, 1, 2]]
    assert kx.decode_spans(s).dtype == torch.int64
    logits = kx.global_pointer(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    torch.testing.assert_close(kx.decode_spans(logits), ref.decode_spans(logits))


# ---- op machinery --------------------------------------------------------------------------------
def test_gradcheck_float64():
    B, H, L, D = 2, 2, 6, 4
    q, k, extra = _inputs(B, H, L, D, torch.float64, "cpu", bias=True, mask=True)
    q, k, sb, eb = _leaf(q), _leaf(k), _leaf(extra["start_bias"]), _leaf(extra["end_bias"])
    mask = extra["mask"]
    keep = ref.score_mask(B, L, mask, True, "cpu").expand(B, H, L, L)

    def scores(q, k, sb, eb):  # the -inf cells are not differentiable inputs of gradcheck
        return kx.global_pointer(q, k, mask=mask, start_bias=sb, end_bias=eb)[keep]

    assert torch.autograd.gradcheck(scores, (q, k, sb, eb))
    spans = _spans(B, H, L, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, sb, eb: kx.global_pointer_loss(q, k, spans, mask=mask, start_bias=sb, end_bias=eb,
                                                    reduction="none"), (q, k, sb, eb))
    assert torch.autograd.gradcheck(
        lambda q, k: kx.global_pointer_loss(q, k, spans, interleaved=False, tril=False), (q, k))
    x = _leaf(torch.randn(4, 9, dtype=torch.float64))
    y = torch.rand(4, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kx.multilabel_categorical_crossentropy(x, y), (x,))
    pos = torch.tensor([[0, 3], [2, -1], [-1, -1], [8, 8]])
    assert torch.autograd.gradcheck(lambda x: kx.sparse_multilabel_categorical_crossentropy(x, pos), (x,))
    assert torch.autograd.gradcheck(
        lambda x: kx.sparse_multilabel_categorical_crossentropy(x, pos, mask_zero=True), (x,))


# The backward ops are not differentiated themselves: no autograd-registration check for them.
BWD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    B, H, L, D = 2, 2, 7, 4
    q, k, extra = _inputs(B, H, L, D, torch.float32, device, bias=True, mask=True)
    q, k = _leaf(q), _leaf(k)
    sb, eb = _leaf(extra["start_bias"]), _leaf(extra["end_bias"])
    mask = extra["mask"]
    spans = _spans(B, H, L, 3).to(device)
    s = 0.5
    torch.library.opcheck(ops.global_pointer_fwd, (q, k, mask, sb, eb, True, 10000.0, True, True, s))
    torch.library.opcheck(ops.global_pointer_fwd, (q, k, None, None, None, False, 10000.0, False, False, s))
    grad = torch.randn(B, H, L, L, device=device)
    torch.library.opcheck(ops.global_pointer_bwd, (grad, q, k, mask, True, 10000.0, True, True, s), test_utils=BWD)
    out = ops.global_pointer_loss_fwd(q, k, spans, mask, sb, eb, True, 10000.0, True, True, s)
    torch.library.opcheck(ops.global_pointer_loss_fwd, (q, k, spans, mask, sb, eb, True, 10000.0, True, True, s))
    torch.library.opcheck(ops.global_pointer_loss_bwd, (torch.rand(B, H, device=device), q, k, spans, mask, sb, eb,
                                                        out[1], out[2], True, 10000.0, True, True, s),
                          test_utils=BWD)
    x = _leaf(torch.randn(5, 11, device=device))
    y = torch.rand(5, 11, device=device)
    o = ops.multilabel_categorical_crossentropy_fwd(x, y)
    torch.library.opcheck(ops.multilabel_categorical_crossentropy_fwd, (x, y))
    torch.library.opcheck(ops.multilabel_categorical_crossentropy_fwd, (x, y > 0.5))
    torch.library.opcheck(ops.multilabel_categorical_crossentropy_bwd, (torch.rand(5, device=device), x, y, o[1], o[2]),
                          test_utils=BWD)
    pos = torch.tensor([[0, 3], [2, -1], [-1, -1], [8, 8], [10, 1]], device=device)
    o = ops.sparse_multilabel_categorical_crossentropy_fwd(x, pos, True)
    torch.library.opcheck(ops.sparse_multilabel_categorical_crossentropy_fwd, (x, pos, False))
    torch.library.opcheck(ops.sparse_multilabel_categorical_crossentropy_bwd,
                          (torch.rand(5, device=device), x, pos, True, o[1], o[2]), test_utils=BWD)


def test_torch_compile_fullgraph():
    q, k, extra = _inputs(2, 2, 12, 8, torch.float32, "cpu", bias=True, mask=True)
    q, k = _leaf(q), _leaf(k)
    spans = _spans(2, 2, 12, 3)

    def f(q, k, sb, eb):
        fused = kx.global_pointer_loss(q * 1.5, k, spans, mask=extra["mask"], start_bias=sb, end_bias=eb)
        logits = kx.global_pointer(q, k, mask=extra["mask"], start_bias=sb, end_bias=eb)
        dense = kx.multilabel_categorical_crossentropy(logits.flatten(2), logits.flatten(2) > 0).mean()
        sparse = kx.sparse_multilabel_categorical_crossentropy(logits.flatten(2), spans[..., 0]).mean()
        return fused + dense + sparse

    sb, eb = _leaf(extra["start_bias"]), _leaf(extra["end_bias"])
    eager = f(q, k, sb, eb)
    ge = torch.autograd.grad(eager, (q, k, sb, eb))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, sb, eb)
    gc = torch.autograd.grad(out, (q, k, sb, eb))
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---- bad input ---------------------------------------------------------------------------------
def _bad_cases():
    q = torch.randn(2, 3, 5, 4)
    k = torch.randn(2, 3, 5, 4)
    good = torch.tensor([[0, 1], [2, 4]]).expand(2, 3, 2, 2)
    return q, k, good


@pytest.mark.parametrize("what,call,exc,match", [
    ("span out of range", lambda q, k, s: kx.global_pointer_loss(q, k, s.clone().index_put_((torch.tensor(0),), torch.tensor(5))), ValueError, "spans"),
    ("span below -1", lambda q, k, s: kx.global_pointer_loss(q, k, s - 2), ValueError, "spans"),
    ("start > end", lambda q, k, s: kx.global_pointer_loss(q, k, s.flip(-1)), ValueError, "start <= end"),
    ("float spans", lambda q, k, s: kx.global_pointer_loss(q, k, s.float()), TypeError, "spans"),
    ("spans wrong head count", lambda q, k, s: kx.global_pointer_loss(q, k, s[:, :2]), ValueError, "spans"),
    ("spans not pairs", lambda q, k, s: kx.global_pointer_loss(q, k, s[..., :1]), ValueError, "spans"),
    ("q/k shapes", lambda q, k, s: kx.global_pointer(q, k[:, :, :4]), ValueError, "k must have the shape"),
    ("q/k dtypes", lambda q, k, s: kx.global_pointer(q, k.double()), TypeError, "dtype"),
    ("q rank", lambda q, k, s: kx.global_pointer(q[0], k[0]), ValueError, "q must be"),
    ("odd head_dim with rope", lambda q, k, s: kx.global_pointer(q[..., :3], k[..., :3]), ValueError, "even"),
    ("mask shape", lambda q, k, s: kx.global_pointer(q, k, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    ("mask dtype", lambda q, k, s: kx.global_pointer(q, k, mask=torch.ones(2, 5)), TypeError, "mask"),
    ("bias shape", lambda q, k, s: kx.global_pointer(q, k, start_bias=torch.zeros(2, 3, 4)), ValueError, "start_bias"),
    ("int q", lambda q, k, s: kx.global_pointer(q.long(), k.long()), TypeError, "q"),
    ("rope_base", lambda q, k, s: kx.global_pointer(q, k, rope_base=0.0), ValueError, "rope_base"),
    ("scale nan", lambda q, k, s: kx.global_pointer(q, k, scale=float("nan")), ValueError, "scale"),
    ("reduction", lambda q, k, s: kx.global_pointer_loss(q, k, s, reduction="avg"), ValueError, "reduction"),
    ("labels above 1", lambda q, k, s: kx.multilabel_categorical_crossentropy(q, q.abs() + 1.5), ValueError, r"\[0, 1\]"),
    ("labels below 0", lambda q, k, s: kx.multilabel_categorical_crossentropy(q, -q.abs() - 0.1), ValueError, r"\[0, 1\]"),
    ("labels nan", lambda q, k, s: kx.multilabel_categorical_crossentropy(q, torch.full_like(q, float("nan"))), ValueError, r"\[0, 1\]"),
    ("labels shape", lambda q, k, s: kx.multilabel_categorical_crossentropy(q, q[..., :2]), ValueError, "labels"),
    ("labels int", lambda q, k, s: kx.multilabel_categorical_crossentropy(q, q.long()), TypeError, "labels"),
    ("pos_index out of range", lambda q, k, s: kx.sparse_multilabel_categorical_crossentropy(q, torch.full((2, 3, 5, 1), 4)), ValueError, "pos_index"),
    ("pos_index float", lambda q, k, s: kx.sparse_multilabel_categorical_crossentropy(q, torch.zeros(2, 3, 5, 1)), TypeError, "pos_index"),
    ("pos_index shape", lambda q, k, s: kx.sparse_multilabel_categorical_crossentropy(q, torch.zeros(2, 3, 1, dtype=torch.long)), ValueError, "pos_index"),
    ("decode 3-d", lambda q, k, s: kx.decode_spans(q[0]), ValueError, "logits"),
])
def test_bad_input(what, call, exc, match):
    q, k, spans = _bad_cases()
    with pytest.raises(exc, match=match):
        call(q, k, spans)


def test_bad_input_direct_ops():
    """The C++ ops validate what the Python wrappers would have caught."""
    q, k, spans = _bad_cases()
    a = (True, 10000.0, True, True, 0.5)
    with pytest.raises(ValueError, match="start <= end"):
        ops.global_pointer_loss_fwd(q, k, spans.flip(-1).contiguous(), None, None, None, *a)
    with pytest.raises(ValueError, match="spans positions"):
        ops.global_pointer_loss_fwd(q, k, spans + 3, None, None, None, *a)
    with pytest.raises(ValueError, match="spans must be"):
        ops.global_pointer_loss_fwd(q, k, spans[:, :1], None, None, None, *a)
    with pytest.raises(TypeError, match="spans"):
        ops.global_pointer_loss_fwd(q, k, spans.float(), None, None, None, *a)
    with pytest.raises(ValueError, match="k must have the shape"):
        ops.global_pointer_fwd(q, k[:, :1], None, None, None, *a)
    with pytest.raises(ValueError, match="even"):
        ops.global_pointer_fwd(q[..., :3], k[..., :3], None, None, None, *a)
    with pytest.raises(ValueError, match="mask"):
        ops.global_pointer_fwd(q, k, torch.ones(2, 6, dtype=torch.bool), None, None, *a)
    with pytest.raises(ValueError, match="grad must be"):
        ops.global_pointer_bwd(torch.zeros(2, 3, 5, 4), q, k, None, *a)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ops.multilabel_categorical_crossentropy_fwd(x, x + 3)
    with pytest.raises(ValueError, match="pos_index"):
        ops.sparse_multilabel_categorical_crossentropy_fwd(x, torch.tensor([[4], [0], [0]]), False)
    with pytest.raises(ValueError, match="lse_neg"):
        ops.multilabel_categorical_crossentropy_bwd(torch.ones(3), x, x.sigmoid(), torch.ones(2), torch.ones(3))
