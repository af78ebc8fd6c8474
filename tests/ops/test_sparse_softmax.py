"""sparse_softmax / sparse_softmax_cross_entropy against the float64 eager reference, on every
device present (CPU always; CUDA runs the Triton kernels), forward and backward."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kxkernels as kx
from kxkernels.ops.sparse_softmax import reference as ref
from tests.conftest import devices
from tests.test_isa import LEVELS, isa_level  # noqa: F401  (isa_level: a fixture forcing the CPU ISA level)

# (atol, rtol) against the float64 reference run on the same (rounded) inputs.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),  # output rounding: bf16 has 8 mantissa bits
    torch.float16: (2e-3, 2e-3),
    torch.float64: (1e-12, 1e-12),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (3, 7, 3), (5, 100, 10), (16, 3000, 10), (4, 5000, 64), (8, 200, 200)]


def _logits(n, v, dtype, device, requires_grad=True):
    return (3 * torch.randn(n, v, dtype=torch.float64)).to(dtype).to(device).requires_grad_(requires_grad)


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, msg=what)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,k", SHAPES)
def test_sparse_softmax_forward_backward(device, dtype, n, v, k):
    x = _logits(n, v, dtype, device)
    x64 = x.detach().double().cpu().requires_grad_()
    p = kx.sparse_softmax(x, k)
    p64 = ref.sparse_softmax(x64, k)
    assert p.dtype == dtype and p.shape == x.shape
    _close(p, p64, dtype, "probs")
    assert int((p != 0).sum(-1).max()) <= k
    g = torch.randn(n, v, dtype=torch.float64)
    (gx,) = torch.autograd.grad(p, x, g.to(dtype).to(device))
    (gx64,) = torch.autograd.grad(p64, x64, g.to(dtype).double())
    _close(gx, gx64, dtype, "grad")


@pytest.mark.parametrize("device", devices())
def test_sparse_softmax_other_dim_and_strides(device):
    x = torch.randn(3, 50, 4, device=device)  # softmax over dim 1, a strided view
    p = kx.sparse_softmax(x, 5, dim=1)
    torch.testing.assert_close(p, ref.sparse_softmax(x, 5, dim=1))
    xt = torch.randn(64, 30, device=device).t()  # (30, 64), stride(-1) != 1
    torch.testing.assert_close(kx.sparse_softmax(xt, 4), ref.sparse_softmax(xt, 4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,k", SHAPES)
@pytest.mark.parametrize("include_target", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_forward_backward(device, dtype, n, v, k, include_target, reduction):
    x = _logits(n, v, dtype, device)
    target = torch.randint(v, (n,))
    if n > 2:
        target[1] = -100  # an ignored row
    x64 = x.detach().double().cpu().requires_grad_()
    loss = kx.sparse_softmax_cross_entropy(x, target.to(device), k, include_target=include_target,
                                           reduction=reduction)
    loss64 = ref.sparse_softmax_cross_entropy(x64, target, k, include_target=include_target,
                                              reduction=reduction)
    assert loss.dtype == dtype and loss.shape == loss64.shape
    _close(loss, loss64, dtype, "loss")
    g = torch.rand(loss64.shape, dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad(loss, x, g.to(dtype).to(device))
    (gx64,) = torch.autograd.grad(loss64, x64, g.to(dtype).double())
    _close(gx, gx64, dtype, "grad")
    # k (+1 for the target) non-zeros a row, none in ignored rows
    nnz = (gx != 0).sum(-1).cpu()
    assert int(nnz.max()) <= k + 1
    if n > 2:
        assert int(nnz[1]) == 0


@pytest.mark.parametrize("device", devices())
def test_cross_entropy_3d(device):
    x = torch.randn(2, 5, 300, device=device, requires_grad=True)
    t = torch.randint(300, (2, 5), device=device)
    loss = kx.sparse_softmax_cross_entropy(x, t, 7, reduction="none")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss, ref.sparse_softmax_cross_entropy(x, t, 7, reduction="none"))


@pytest.mark.parametrize("device", devices())
def test_ties_keep_lower_index(device):
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]], device=device)
    p = kx.sparse_softmax(x, 2)
    expected = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0, 0.0]], device=device)
    torch.testing.assert_close(p, expected)
    # target 3 ties with the kept values but is outside the top-2
    loss = kx.sparse_softmax_cross_entropy(x, torch.tensor([3], device=device), 2, reduction="none")
    torch.testing.assert_close(loss.cpu(), torch.tensor([torch.log(torch.tensor(2.0)).item()]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), v=st.integers(1, 300), data=st.data())
def test_property_integer_logits_with_ties(n, v, data):
    """Many ties (small integer logits): the kept set is the stable-sort top-k, probs sum to 1."""
    k = data.draw(st.integers(1, v))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, v), generator=g).double()
    p = kx.sparse_softmax(x, k)
    torch.testing.assert_close(p, ref.sparse_softmax(x, k, stable_ties=True), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(p.sum(-1), torch.ones(n, dtype=torch.float64))
    t = torch.randint(v, (n,), generator=g)
    loss = kx.sparse_softmax_cross_entropy(x, t, k, reduction="none", include_target=True)
    assert bool((loss >= -1e-12).all()), "with include_target the loss is never negative"


@pytest.mark.parametrize("device", devices())
def test_ignore_index_all_rows(device):
    x = torch.randn(4, 50, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    loss = kx.sparse_softmax_cross_entropy(x, t, 5)
    assert float(loss) == 0.0
    loss.backward()
    assert bool((x.grad == 0).all())
    t = torch.full((4,), 7, device=device)
    t[0] = 3
    loss = kx.sparse_softmax_cross_entropy(x, t, 5, ignore_index=7, reduction="none")
    assert loss[1:].abs().sum() == 0 and loss[0] != 0


@pytest.mark.parametrize("device", devices())
def test_fully_masked_rows_are_finite_with_zero_grad(device):
    x = torch.randn(3, 40, device=device)
    x[1] = float("-inf")
    x[2, 5:] = float("-inf")  # fewer finite logits than k: the -inf ones get probability 0
    x.requires_grad_()
    p = kx.sparse_softmax(x, 8)
    assert bool(torch.isfinite(p).all())
    assert float(p[1].abs().sum()) == 0.0
    torch.testing.assert_close(p[2].sum(), torch.tensor(1.0, device=device))
    loss = kx.sparse_softmax_cross_entropy(x, torch.tensor([0, 0, 0], device=device), 8, reduction="none")
    assert bool(torch.isfinite(loss).all()) and float(loss[1]) == 0.0
    loss.sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad[1].abs().sum()) == 0.0


def test_gradcheck_float64():
    x = torch.randn(4, 60, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, 10, -100, 59])
    assert torch.autograd.gradcheck(lambda x: kx.sparse_softmax(x, 5), (x,))
    for include_target in (False, True):
        assert torch.autograd.gradcheck(
            lambda x: kx.sparse_softmax_cross_entropy(x, t, 5, reduction="none", include_target=include_target),
            (x,))
    assert torch.autograd.gradcheck(lambda x: kx.sparse_softmax_cross_entropy(x, t, 5), (x,))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    ops = torch.ops.kxkernels
    x = torch.randn(6, 130, device=device, requires_grad=True)
    t = torch.tensor([0, 5, -100, 129, 64, 1], device=device)
    torch.library.opcheck(ops.sparse_softmax_fwd, (x, 7))
    torch.library.opcheck(ops.sparse_softmax_cross_entropy_fwd, (x, t, 7, -100, False))
    torch.library.opcheck(ops.sparse_softmax_cross_entropy_fwd, (x, t, 7, -100, True))
    probs, index = ops.sparse_softmax_fwd(x.detach(), 7)
    torch.library.opcheck(ops.sparse_softmax_bwd, (torch.randn_like(probs), probs, index))
    loss, lse, index = ops.sparse_softmax_cross_entropy_fwd(x.detach(), t, 7, -100, True)
    torch.library.opcheck(ops.sparse_softmax_cross_entropy_bwd,
                          (torch.rand_like(loss), x.detach(), t, lse, index, -100, True))


def test_torch_compile_fullgraph():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 500)

        def forward(self, h, target):
            logits = self.proj(h)
            return kx.sparse_softmax_cross_entropy(logits, target, 10) + kx.sparse_softmax(logits, 3).sum() * 0

    model = Head()
    h, target = torch.randn(2, 8, 16), torch.randint(500, (2, 8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(h, target)
    loss.backward()
    g_compiled = model.proj.weight.grad.clone()
    model.zero_grad()
    eager = model(h, target)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(g_compiled, model.proj.weight.grad)


def test_torch_compile_inductor():
    f = torch.compile(lambda x, t: kx.sparse_softmax_cross_entropy(x * 2, t, 4), fullgraph=True)
    x, t = torch.randn(5, 40), torch.randint(40, (5,))
    torch.testing.assert_close(f(x, t), ref.sparse_softmax_cross_entropy(x * 2, t, 4))


# ---- bad input: clear errors naming the argument ---------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 101])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        kx.sparse_softmax(torch.randn(2, 100), k)
    with pytest.raises(ValueError, match="k must be"):
        kx.sparse_softmax_cross_entropy(torch.randn(2, 100), torch.zeros(2, dtype=torch.long), k)


def test_bad_inputs():
    x = torch.randn(4, 10)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="k must be an int"):
        kx.sparse_softmax(x, 2.5)
    with pytest.raises(TypeError, match="logits"):
        kx.sparse_softmax(torch.ones(4, 10, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="target"):
        kx.sparse_softmax_cross_entropy(x, t.float(), 2)
    with pytest.raises(ValueError, match="target values"):
        kx.sparse_softmax_cross_entropy(x, torch.tensor([0, 1, 10, 2]), 2)
    with pytest.raises(ValueError, match="target values"):
        kx.sparse_softmax_cross_entropy(x, torch.tensor([0, -5, 1, 2]), 2)
    with pytest.raises(ValueError, match="target must have shape"):
        kx.sparse_softmax_cross_entropy(x, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="empty"):
        kx.sparse_softmax_cross_entropy(torch.randn(4, 0), t, 1)
    with pytest.raises(ValueError, match="empty"):
        kx.sparse_softmax(torch.randn(4, 0), 1)
    with pytest.raises(ValueError, match="reduction"):
        kx.sparse_softmax_cross_entropy(x, t, 2, reduction="avg")
    with pytest.raises(ValueError, match="logits must be"):
        kx.sparse_softmax_cross_entropy(torch.randn(10), torch.tensor(1), 2)
    # direct op calls are guarded in C++ too: an exception, never an out-of-bounds access
    with pytest.raises(ValueError):
        torch.ops.kxkernels.sparse_softmax_cross_entropy_fwd(x, torch.tensor([0, 1, 99, 2]), 2, -100, False)
    with pytest.raises(ValueError):
        torch.ops.kxkernels.sparse_softmax_fwd(x, 11)


@pytest.mark.parametrize("dim", [2, 5, -3, 100])
def test_dim_out_of_range(dim):
    """Issue 6, item 1: an out-of-range dim is an error naming `dim`, not a silent wrap-around."""
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\]"):
        kx.sparse_softmax(torch.randn(4, 10), 3, dim=dim)
    with pytest.raises(TypeError, match="dim must be an int"):
        kx.sparse_softmax(torch.randn(4, 10), 3, dim=1.0)


# Direct calls of the backward ops with forged indices (issue 6, item 2: these segfaulted). They
# run in a child process, so a regression fails this test instead of killing pytest.
_FORGED_INDEX_SCRIPT = r"""
import torch, kxkernels
ops = torch.ops.kxkernels
x = torch.randn(4, 50)
probs, index = ops.sparse_softmax_fwd(x, 3)
loss, lse, ce_index = ops.sparse_softmax_cross_entropy_fwd(x, torch.tensor([1, 2, 3, 4]), 3, -100, True)
target = torch.tensor([1, 2, 3, 4])

def expect(name, fn, words):
    try:
        fn()
    except ValueError as e:
        assert all(w in str(e) for w in words), (name, str(e))
        print("raised", name, flush=True)
    else:
        raise AssertionError(name + ": no error")

for bad in (10**7, -1, 50):
    forged = index.clone(); forged[2, 1] = bad
    expect(f"sparse_softmax_bwd index {bad}", lambda: ops.sparse_softmax_bwd(torch.randn_like(probs), probs, forged),
           ["topk_index", "[0, 50)", str(bad)])
    forged = ce_index.clone(); forged[3, 0] = bad
    expect(f"ce_bwd index {bad}", lambda: ops.sparse_softmax_cross_entropy_bwd(
        torch.ones(4), x, target, lse, forged, -100, True), ["topk_index", str(bad)])
    t = target.clone(); t[1] = bad
    expect(f"ce_bwd target {bad}", lambda: ops.sparse_softmax_cross_entropy_bwd(
        torch.ones(4), x, t, lse, ce_index, -100, True), ["target", "ignore_index=-100", str(bad)])
    expect(f"ce_fwd target {bad}", lambda: ops.sparse_softmax_cross_entropy_fwd(x, t, 3, -100, False),
           ["target", str(bad)])
# big enough for the pooled output path (>= 4 MiB) and several parallel tasks
xb = torch.randn(2048, 1000)
pb, ib = ops.sparse_softmax_fwd(xb, 5)
ib[2047, 4] = 10**7
expect("sparse_softmax_bwd large", lambda: ops.sparse_softmax_bwd(pb, pb, ib), ["topk_index"])
# a valid call after the failed ones still works
out = ops.sparse_softmax_bwd(torch.randn_like(probs), probs, index)
assert torch.isfinite(out).all()
print("done", flush=True)
"""


def test_backward_ops_reject_forged_indices_in_subprocess():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FORGED_INDEX_SCRIPT], capture_output=True, text=True,
                          timeout=120, cwd=__import__("pathlib").Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, f"child exited {proc.returncode} (a negative code is a signal):\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("raised") == 13 and proc.stdout.strip().endswith("done"), proc.stdout


def test_backward_ops_reject_bad_types():
    ops = torch.ops.kxkernels
    x = torch.randn(4, 50)
    probs, index = ops.sparse_softmax_fwd(x, 3)
    with pytest.raises(TypeError, match="topk_index must be int64"):
        ops.sparse_softmax_bwd(probs, probs, index.int())
    with pytest.raises(ValueError, match="topk_index must have 4 rows"):
        ops.sparse_softmax_bwd(probs, probs, index[:3])
    loss, lse, ci = ops.sparse_softmax_cross_entropy_fwd(x, torch.zeros(4, dtype=torch.long), 3, -100, False)
    with pytest.raises(TypeError, match="lse must be"):
        ops.sparse_softmax_cross_entropy_bwd(torch.ones(4), x, torch.zeros(4, dtype=torch.long), lse.double(), ci,
                                             -100, False)
    with pytest.raises(TypeError, match="target must be"):
        ops.sparse_softmax_cross_entropy_bwd(torch.ones(4), x, torch.zeros(4), lse, ci, -100, False)


def test_nan_logits_propagate():
    """A NaN in a row is the caller's NaN: that row's loss is NaN, other rows are unaffected."""
    x = torch.randn(3, 100)
    x[1, 50] = float("nan")
    loss = kx.sparse_softmax_cross_entropy(x, torch.tensor([0, 0, 0]), 5, reduction="none")
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2]]).all())


def test_pooled_outputs_come_back_zeroed():
    """Big outputs come from a pool of resident mappings (csrc/common/output.h): a gradient the
    user dirtied in place and freed must be handed out again as zeros."""
    x = torch.randn(2048, 1000, requires_grad=True)  # 8 MB: above the pool's 4 MiB floor
    t = torch.randint(1000, (2048,))
    kx.sparse_softmax_cross_entropy(x, t, 5).backward()
    first = x.grad.clone()
    x.grad.fill_(7.0)
    x.grad = None
    kx.sparse_softmax_cross_entropy(x, t, 5).backward()
    assert torch.equal(first, x.grad)
    p = kx.sparse_softmax(x.detach(), 5)
    p.fill_(3.0)
    del p
    assert int((kx.sparse_softmax(x.detach(), 5) != 0).sum()) == 2048 * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("include_target", [False, True])
def test_real_minilm_logits(dtype, include_target):
    """Real logits: all-MiniLM-L6-v2 hidden states of STS sentences times its 30,522-word
    embedding matrix (peaked, heavy-tailed rows), next-token targets."""
    real_data = pytest.importorskip("benchmarks.real_data")
    # KX_STS_TSV: the STS file when ../shared/data is not beside the checkout (a git worktree)
    path = {"path": os.environ["KX_STS_TSV"]} if os.environ.get("KX_STS_TSV") else {}
    try:
        logits, target = real_data.minilm_logits(1024, target="next", **path)
    except real_data.RealDataUnavailable as e:
        pytest.skip(f"real data unavailable: {e}")
    x = logits.to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    loss = kx.sparse_softmax_cross_entropy(x, target, 10, include_target=include_target, reduction="none")
    # rounded to bf16, real rows tie at the k-th value: compare with the lower-index tie rule
    loss64 = ref.sparse_softmax_cross_entropy(x64, target, 10, include_target=include_target, reduction="none",
                                              stable_ties=True)
    _close(loss, loss64, dtype, "loss")
    (gx,) = torch.autograd.grad(loss.sum(), x)
    (gx64,) = torch.autograd.grad(loss64.sum(), x64)
    _close(gx, gx64, dtype, "grad")
    _close(kx.sparse_softmax(x.detach(), 10), ref.sparse_softmax(x64.detach(), 10, stable_ties=True), dtype, "probs")


def test_pool_is_visible_and_can_be_emptied():
    import kxkernels.memory as memory

    memory.empty_cache()
    x = torch.randn(2048, 1000, requires_grad=True)
    kx.sparse_softmax_cross_entropy(x, torch.zeros(2048, dtype=torch.long), 3).backward()
    assert memory.cached_bytes() == 0  # the gradient is alive in x.grad
    x.grad = None
    # one mapping of the gradient's size class (4 classes per power of two: 8 MiB here)
    assert memory.stats()["cached_mappings"] == 1
    assert memory.cached_bytes() == 8 << 20
    memory.empty_cache()
    assert memory.cached_bytes() == 0


# ---- every CPU ISA level (csrc/cpu/sparse_softmax_kernels.h at baseline / AVX2 / AVX-512) ------
ISA_SHAPES = [(3, 1, 1), (5, 63, 7), (4, 64, 64), (6, 130, 10), (7, 1000, 33), (9, 4099, 10), (2, 30522, 10)]


def _isa_logits(n, v, dtype, g):
    """Gaussian rows, integer-valued rows (ties at the k-th value), a row of -inf but for one
    column, and a NaN row: the scan's masks, tails and tie rule at every vector width."""
    x = 3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    x[1::3] = torch.randint(-3, 4, x[1::3].shape, generator=g).double()
    if n > 2:
        x[2] = float("-inf")
        x[2, v // 2] = 0.5
    return x.to(dtype)


def _all_outputs(x, k, t):
    """Forward and backward of both ops at the running level."""
    xs = x.clone().requires_grad_()
    p = kx.sparse_softmax(xs, k)
    g = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape).to(x.dtype)
    (gp,) = torch.autograd.grad(p, xs, g)
    out = [p, gp]
    for include_target in (False, True):
        loss = kx.sparse_softmax_cross_entropy(xs, t, k, reduction="none", include_target=include_target)
        (gl,) = torch.autograd.grad(loss.sum(), xs)
        out += [loss, gl]
    return out


@pytest.mark.parametrize("isa_level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_isa_level(isa_level, dtype):
    """At each level the kernels agree with the float64 reference (stable ties; TOL per dtype) and
    with the baseline (SSE2) build: the same entries kept, values within TOL (the vector scan only
    selects; the k-term math is shared, but AVX2/AVX-512 contract a*b+c into FMAs)."""
    g = torch.Generator().manual_seed(1)
    for n, v, k in ISA_SHAPES:
        x = _isa_logits(n, v, dtype, g)
        t = torch.randint(v, (n,), generator=g)
        got = _all_outputs(x, k, t)
        x64 = x.double().requires_grad_()
        p64 = ref.sparse_softmax(x64, k, stable_ties=True)
        _close(got[0], p64.detach(), dtype, f"probs {isa_level} {(n, v, k)}")
        gw = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape).to(dtype).double()
        _close(got[1], torch.autograd.grad(p64, x64, gw)[0], dtype, f"grad {isa_level} {(n, v, k)}")
        for i, include_target in enumerate((False, True)):
            l64 = ref.sparse_softmax_cross_entropy(x64, t, k, reduction="none", include_target=include_target,
                                                   stable_ties=True)
            _close(got[2 + 2 * i], l64.detach(), dtype, f"loss {isa_level} {(n, v, k)}")
            _close(got[3 + 2 * i], torch.autograd.grad(l64.sum(), x64)[0], dtype, f"ce grad {isa_level} {(n, v, k)}")
        before = kx._C.cpu_isa()
        kx._C.set_cpu_isa("baseline")
        try:
            base = _all_outputs(x, k, t)
        finally:
            kx._C.set_cpu_isa(before)
        for a, b in zip(got, base):
            # the same entries selected; values equal up to FMA contraction (AVX2/AVX-512 fuse a*b+c)
            assert torch.equal(a != 0, b != 0), f"{isa_level} selects other entries than baseline at {(n, v, k)}"
            _close(a, b, dtype, f"{isa_level} vs baseline at {(n, v, k)}")


@pytest.mark.parametrize("isa_level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_isa_level_nan_rows(isa_level, dtype):
    """A NaN of either sign anywhere in a row makes that row's loss NaN. fp16/bf16 blocks compare
    raw bits, where a negative NaN sorts below every number: it is caught apart."""
    x = torch.randn(5, 700).to(dtype)
    x[1, 345] = float("nan")
    x[3, 699] = float("nan")   # in the scalar tail (700 = 10 * 64 + 60)
    neg_nan = {torch.float32: (torch.int32, -0x400000), torch.bfloat16: (torch.int16, -0x40),
               torch.float16: (torch.int16, -0x200)}[dtype]  # 0xffc00000, 0xffc0, 0xfe00
    x.view(neg_nan[0])[4, 600] = neg_nan[1]  # late in the row: the k-th value is > 0 by then
    assert torch.isnan(x[4, 600]) and torch.signbit(x[4, 600])
    loss = kx.sparse_softmax_cross_entropy(x, torch.zeros(5, dtype=torch.long), 5, reduction="none")
    assert torch.isnan(loss[[1, 3, 4]]).all() and torch.isfinite(loss[[0, 2]]).all(), loss
