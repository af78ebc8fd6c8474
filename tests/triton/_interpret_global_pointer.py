"""The GlobalPointer / ZLPR Triton launchers on CPU tensors under the Triton interpreter.

Run by test_global_pointer_interpret.py in a subprocess with TRITON_INTERPRET=1 (see
_interpreter.py); running this file directly without it fails at import. References: the float64
eager math of kxkernels/ops/global_pointer/reference.py on the same (rounded) inputs, and the C++
CPU ops (same contract) for the bias gradients. KX_POISON_OUTPUTS=1 makes the launchers NaN-fill
their outputs first, so an unwritten element fails. Shapes are tiny: the interpreter is slow.
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run these checks with TRITON_INTERPRET=1 set before triton is imported "
                       "(tests/triton/test_global_pointer_interpret.py does)")
os.environ["KX_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kxkernels  # noqa: E402,F401  (loads the CPU ops)
from kxkernels.ops.global_pointer import reference as ref  # noqa: E402
from kxkernels.ops.global_pointer import triton as tk  # noqa: E402

ops = torch.ops.kxkernels
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative RMS error bound against float64 on the same rounded inputs (float32 math, output rounding)
REL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SETTINGS = [  # (rope, interleaved, tril, mask, bias)
    (True, True, True, True, True),
    (True, False, False, False, False),
    (False, True, True, True, False),
]
# every setting in float32, the first (everything on) in the 16-bit dtypes: the interpreter is slow
CASES = [(torch.float32, *s) for s in SETTINGS] + [(d, *SETTINGS[0]) for d in DTYPES[1:]]


def _rel(a, e):
    a, e = a.double(), e.double()
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf)
    a, e = a[~inf], e[~inf]
    assert torch.isfinite(a).all()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def _case(dtype, mask, bias, B=2, H=2, L=20, D=8):
    q = torch.randn(B, H, L, D, dtype=torch.float64).to(dtype)
    k = torch.randn(B, L, H, D, dtype=torch.float64).to(dtype).transpose(1, 2)  # strided
    m = None
    if mask:
        m = torch.ones(B, L, dtype=torch.bool)
        m[1, 14:] = False
        m[0, 3] = False
    sb = eb = None
    if bias:
        sb = torch.randn(B, H, L, dtype=torch.float64).to(dtype)
        eb = torch.randn(B, H, L, dtype=torch.float64).to(dtype)
    spans = torch.randint(0, L, (B, H, 5, 2)).sort(-1).values
    spans[:, :, -1] = -1
    spans[:, :, 1] = spans[:, :, 0]
    return q, k, m, sb, eb, spans


def _leaf64(t):
    return None if t is None else t.double().requires_grad_(True)


@pytest.mark.parametrize("dtype,rope,interleaved,tril,mask,bias", CASES)
def test_scores(dtype, rope, interleaved, tril, mask, bias):
    q, k, m, sb, eb, _ = _case(dtype, mask, bias)
    scale = 0.4
    out = tk.global_pointer_fwd(q, k, m, sb, eb, rope, 10000.0, interleaved, tril, scale)
    q64, k64, sb64, eb64 = _leaf64(q), _leaf64(k), _leaf64(sb), _leaf64(eb)
    r = ref.global_pointer(q64, k64, mask=m, rope=rope, interleaved=interleaved, tril=tril, scale=scale,
                           start_bias=sb64, end_bias=eb64)
    assert out.dtype == dtype
    assert _rel(out, r.detach()) <= REL[dtype]
    g = torch.randn(r.shape, dtype=torch.float64).to(dtype)
    g = g.masked_fill(torch.isinf(r.detach()), float("nan"))  # masked cells must not leak
    dq, dk, dsb, deb = tk.global_pointer_bwd(g, q, k, m, rope, 10000.0, interleaved, tril, scale)
    leaves = [t for t in (q64, k64, sb64, eb64) if t is not None]
    grads = torch.autograd.grad(r, leaves, g.double())
    assert _rel(dq, grads[0]) <= REL[dtype] and _rel(dk, grads[1]) <= REL[dtype]
    if bias:
        assert _rel(dsb, grads[2]) <= REL[dtype] and _rel(deb, grads[3]) <= REL[dtype]
    cq, ck, csb, ceb = ops.global_pointer_bwd(g, q, k, m, rope, 10000.0, interleaved, tril, scale)
    torch.testing.assert_close(dsb, csb, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(deb, ceb, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype,rope,interleaved,tril,mask,bias", CASES)
def test_fused_loss(dtype, rope, interleaved, tril, mask, bias):
    q, k, m, sb, eb, spans = _case(dtype, mask, bias)
    scale = 0.4
    loss, ln, lp = tk.global_pointer_loss_fwd(q, k, spans, m, sb, eb, rope, 10000.0, interleaved, tril, scale)
    q64, k64, sb64, eb64 = _leaf64(q), _leaf64(k), _leaf64(sb), _leaf64(eb)
    r = ref.global_pointer_loss(q64, k64, spans, mask=m, rope=rope, interleaved=interleaved, tril=tril,
                                scale=scale, start_bias=sb64, end_bias=eb64, reduction="none")
    assert loss.shape == (2, 2) and loss.dtype == torch.float32
    assert _rel(loss, r.detach()) <= REL[dtype]
    cl = ops.global_pointer_loss_fwd(q, k, spans, m, sb, eb, rope, 10000.0, interleaved, tril, scale)
    torch.testing.assert_close(ln, cl[1], atol=1e-4, rtol=1e-4)
    g = torch.rand(2, 2) + 0.5
    dq, dk, dsb, deb = tk.global_pointer_loss_bwd(g, q, k, spans, m, sb, eb, ln, lp, rope, 10000.0, interleaved,
                                                  tril, scale)
    leaves = [t for t in (q64, k64, sb64, eb64) if t is not None]
    grads = torch.autograd.grad(r, leaves, g.double())
    assert dq.dtype == dtype
    assert _rel(dq, grads[0]) <= REL[dtype] and _rel(dk, grads[1]) <= REL[dtype]
    if bias:
        assert _rel(dsb, grads[2]) <= REL[dtype] and _rel(deb, grads[3]) <= REL[dtype]


def test_fused_loss_bad_spans():
    q, k, m, sb, eb, spans = _case(torch.float32, False, False)
    with pytest.raises(ValueError, match="start <= end"):
        tk.global_pointer_loss_fwd(q, k, spans.flip(-1), None, None, None, True, 10000.0, True, True, 0.5)
    with pytest.raises(ValueError, match="spans positions"):
        tk.global_pointer_loss_fwd(q, k, spans + 40, None, None, None, True, 10000.0, True, True, 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("n,c", [(5, 150)])
def test_mcce(dtype, soft, n, c):
    x = (3 * torch.randn(n, c, dtype=torch.float64)).to(dtype)
    x[:, ::4] = float("-inf")
    y = torch.rand(n, c, dtype=torch.float64) if soft else (torch.rand(n, c) < 0.3).double()
    y = y.to(dtype)
    loss, ln, lp = tk.multilabel_categorical_crossentropy_fwd(x, y)
    x64 = x.double().requires_grad_(True)
    r = ref.multilabel_categorical_crossentropy(x64, y.double())
    assert _rel(loss, r.detach()) <= REL[dtype]
    g = torch.rand(n) + 0.5
    out = tk.multilabel_categorical_crossentropy_bwd(g, x, y, ln, lp)
    (r_g,) = torch.autograd.grad(r, x64, g.double())
    assert out.dtype == dtype and _rel(out, r_g) <= REL[dtype]
    if not soft:  # bool labels give the same
        lb, _, _ = tk.multilabel_categorical_crossentropy_fwd(x, y > 0.5)
        torch.testing.assert_close(lb, loss)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tk.multilabel_categorical_crossentropy_fwd(x, y + 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_mcce(dtype, mask_zero):
    n, c = 6, 90
    x = (3 * torch.randn(n, c, dtype=torch.float64)).to(dtype)
    x[:, 7] = float("-inf")
    pos = torch.randint(0, c, (n, 4))
    pos[0, 1] = pos[0, 0]
    pos[1, 2:] = -1
    pos[2, :] = -1
    pos[3, 0] = 0
    pos[4, 1] = 7
    loss, ln, lp = tk.sparse_multilabel_categorical_crossentropy_fwd(x, pos, mask_zero)
    x64 = x.double().requires_grad_(True)
    r = ref.sparse_multilabel_categorical_crossentropy(x64, pos, mask_zero=mask_zero)
    assert (loss >= 0).all() and _rel(loss, r.detach()) <= REL[dtype]
    g = torch.rand(n) + 0.5
    out = tk.sparse_multilabel_categorical_crossentropy_bwd(g, x, pos, mask_zero, ln, lp)
    (r_g,) = torch.autograd.grad(r, x64, g.double())
    assert _rel(out, r_g) <= REL[dtype]
    with pytest.raises(ValueError, match="pos_index"):
        tk.sparse_multilabel_categorical_crossentropy_fwd(x, pos + c, mask_zero)


def test_sparse_never_negative_where_bert4keras_is():
    x = torch.full((2, 64), -30.0)
    x[:, 3] = 16.0
    pos = torch.full((2, 1), 3)
    assert float(ref.sparse_multilabel_categorical_crossentropy_bert4keras(x, pos)[0]) < -0.1
    loss, _, _ = tk.sparse_multilabel_categorical_crossentropy_fwd(x, pos, False)
    assert (loss >= 0).all()
    torch.testing.assert_close(loss.double(), ref.sparse_multilabel_categorical_crossentropy(x.double(), pos),
                               atol=1e-6, rtol=1e-5)
