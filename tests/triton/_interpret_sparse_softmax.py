"""The sparse softmax Triton launchers on CPU tensors under the Triton interpreter.

Run by test_sparse_softmax_interpret.py in a subprocess with TRITON_INTERPRET=1 (see
_interpreter.py); running this file directly without it fails at import. References: float64
eager math on the same (rounded) inputs, with the top-k taken by a stable sort of -x (value desc,
index asc: ties keep the lower index), and the C++ CPU ops (same contract) for exact indices.
Outputs are preallocated and filled with NaN (indices with -7) so an unwritten element fails.
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run these checks with TRITON_INTERPRET=1 set before triton is imported "
                       "(tests/triton/test_sparse_softmax_interpret.py does)")

import pytest  # noqa: E402
import torch  # noqa: E402

import kxkernels  # noqa: E402,F401  (loads the CPU ops)
from kxkernels.ops.sparse_softmax import triton as tk  # noqa: E402

ops = torch.ops.kxkernels

# The interpreter evaluates masked-off lanes too (log(0) of an ignored row, -inf - -inf); those
# values are discarded by the masks, numpy still warns.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) of a kernel output in its dtype against float64 math on the same inputs: float32
# math, then the output rounded to the dtype (bf16: 8 significant bits, fp16: 11).
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
TOL_F32_OUT = (1e-5, 1e-5)  # loss / lse: float32 outputs whatever the logits dtype
IGNORE = -100
SENTINEL_INDEX = -7


# ---- float64 references --------------------------------------------------------------------------
def ref_topk_index(x, k):
    return torch.sort(-x.double(), dim=-1, stable=True).indices[:, :k]


def ref_probs(x, index):
    x64 = x.double()
    vals = x64.gather(1, index)
    m = vals.max(-1, keepdim=True).values
    p = torch.exp(vals - torch.where(m == float("-inf"), 0.0, m))
    p = p / p.sum(-1, keepdim=True)
    p = torch.where(m == float("-inf"), 0.0, p)  # fully -inf row: zeros
    return torch.zeros_like(x64).scatter(1, index, p)


def ref_softmax_backward(g, probs, index):
    p = probs.double().gather(1, index)
    gk = g.double().gather(1, index)
    dot = (p * gk).sum(-1, keepdim=True)
    return torch.zeros(probs.shape, dtype=torch.float64).scatter(1, index, p * (gk - dot))


def ref_ce_forward(x, target, k, ignore_index, include_target):
    x64 = x.double()
    n = x64.shape[0]
    index = ref_topk_index(x64, k)
    loss = torch.zeros(n, dtype=torch.float64)
    lse = torch.full((n,), float("-inf"), dtype=torch.float64)
    for r in range(n):
        t = int(target[r])
        if t == ignore_index:
            index[r] = -1
            continue
        terms = x64[r, index[r]]
        if include_target and t not in index[r].tolist():
            terms = torch.cat([terms, x64[r, t:t + 1]])
        if terms.max() == float("-inf"):
            continue  # fully masked: loss 0, lse -inf
        lse[r] = torch.logsumexp(terms, 0)
        loss[r] = lse[r] - x64[r, t]
    return loss, lse, index


def ref_ce_backward(grad_loss, x, target, lse, index, ignore_index, include_target):
    x64 = x.double()
    grad = torch.zeros_like(x64)
    for r in range(x64.shape[0]):
        t, s, g = int(target[r]), float(lse[r]), float(grad_loss[r])
        if t == ignore_index or s == float("-inf"):
            continue
        idx = index[r]
        grad[r, idx] = g * torch.exp(x64[r, idx] - s)
        p_t = torch.exp(x64[r, t] - s) if (t in idx.tolist() or include_target) else 0.0
        grad[r, t] = g * (p_t - 1.0)
    return grad


# ---- helpers --------------------------------------------------------------------------------------
def logits(n, v, dtype, scale=3.0):
    return (scale * torch.randn(n, v, dtype=torch.float64)).to(dtype)


def close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               equal_nan=False, msg=lambda m: f"{what}: {m}")


def run_forward(x, k, config=None):
    n, v = x.shape
    probs = torch.full((n, v), float("nan"), dtype=x.dtype)
    index = torch.full((n, k), SENTINEL_INDEX, dtype=torch.int64)
    out = tk.sparse_softmax_forward(x, k, out=(probs, index), config=config)
    assert out[0] is probs and out[1] is index
    return probs, index


def run_backward(g, probs, index):
    out = torch.full(probs.shape, float("nan"), dtype=probs.dtype)
    assert tk.sparse_softmax_backward(g, probs, index, out=out) is out
    return out


def run_ce_forward(x, target, k, ignore_index, include_target):
    n = x.shape[0]
    loss = torch.full((n,), float("nan"))
    lse = torch.full((n,), float("nan"))
    index = torch.full((n, k), SENTINEL_INDEX, dtype=torch.int64)
    tk.sparse_softmax_cross_entropy_forward(x, target, k, ignore_index, include_target,
                                            out=(loss, lse, index))
    return loss, lse, index


def run_ce_backward(grad_loss, x, target, lse, index, ignore_index, include_target):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    tk.sparse_softmax_cross_entropy_backward(grad_loss, x, target, lse, index, ignore_index,
                                             include_target, out=out)
    return out


def check_forward(x, k, config=None):
    probs, index = run_forward(x, k, config)
    assert torch.equal(index, ref_topk_index(x, k)), f"top-k index\n{index}\n{ref_topk_index(x, k)}"
    assert torch.equal(index, ops.sparse_softmax_fwd(x, k)[1]), "top-k index differs from the CPU op"
    close(probs, ref_probs(x, index), TOL[x.dtype], "probs")
    off = torch.ones_like(probs, dtype=torch.bool).scatter(1, index, False)
    assert bool((probs[off] == 0).all()), "non-zero probability outside the top-k"
    return probs, index


# ---- sparse_softmax forward -----------------------------------------------------------------------
# The interpreter pays ~1 ms of Python per tl op and a row's scan inserts >= k entries one by one
# (~15 ops each), so k >= 64 runs on one row; the 3-row cases exercise the row offsets.
VK_SMALL = [(7, 1), (7, 3), (7, 7), (100, 1), (100, 10), (3000, 1), (3000, 10)]
VK_LARGE = [(100, 100), (200, 64), (3000, tk.MAX_K)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,k", [(n, v, k) for n in (1, 3) for v, k in VK_SMALL]
                         + [(1, v, k) for v, k in VK_LARGE])
def test_forward(n, v, k, dtype):
    check_forward(logits(n, v, dtype), k)


@pytest.mark.parametrize("block_v", sorted({c["BLOCK_V"] for c in tk.TUNING_CONFIGS}))
@pytest.mark.parametrize("order", ["random", "ascending", "descending", "constant", "few_values"])
def test_forward_block_sizes_and_orders(block_v, order):
    """Every BLOCK_V over a row of 3000 (full blocks and a tail, or one masked block), with rows
    that make every block insert (ascending), none (descending), or tie everywhere."""
    v, k = 3000, 10
    x = logits(4, v, torch.float32)
    if order == "ascending":
        x = torch.sort(x, dim=-1).values
    elif order == "descending":
        x = torch.sort(x, dim=-1, descending=True).values
    elif order == "constant":
        x = torch.zeros(4, v)
    elif order == "few_values":  # ties at the k-th value across blocks
        x = torch.randint(0, 3, (4, v)).float()
    check_forward(x, k, {"BLOCK_V": block_v, "num_warps": 4})


def test_forward_ties_keep_lower_index():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 1.0, 1.0, 1.0, 1.0, 5.0]])
    probs, index = check_forward(x, 3)
    assert index.tolist() == [[1, 2, 4], [0, 1, 2], [0, 5, 1]]
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(check_forward(x.to(dtype), 3)[1], index)


def test_forward_strided_logits():
    base = logits(5, 300, torch.float32)
    x = base[:, 50:250]  # row stride 300 != V: read in place
    expected = run_forward(x.contiguous(), 7)
    for view in (x, x.t().contiguous().t()):  # and column stride != 1: copied
        got = run_forward(view, 7)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    row = logits(1, 200, torch.float32)
    got = check_forward(row.expand(4, 200), 5)  # stride(0) == 0
    assert torch.equal(got[1], got[1][:1].expand(4, 5))


def test_forward_masked_rows():
    """A fully -inf row: zeros, indices 0..k-1; fewer finite entries than k: the -inf ones fill
    up in index order with zero probability."""
    ninf = float("-inf")
    x = torch.full((3, 9), ninf)
    x[1, 6], x[1, 2] = 1.0, 0.5
    x[2] = torch.arange(9.0)
    for dtype in DTYPES:
        probs, index = check_forward(x.to(dtype), 4)
        assert index.tolist()[:2] == [[0, 1, 2, 3], [6, 2, 0, 1]]
        assert bool((probs[0] == 0).all())
        assert probs[1, 0] == 0 and probs[1, 1] == 0


def test_forward_nan_row():
    x = logits(3, 500, torch.float32)
    x[1, 123] = float("nan")
    probs, index = run_forward(x, 5)
    cpu_probs, _ = ops.sparse_softmax_fwd(x, 5)
    nan_mask = probs[1].isnan()
    assert int(nan_mask.sum()) == 5 == int(cpu_probs[1].isnan().sum()), "NaN row: NaN on the k entries"
    assert bool(nan_mask[index[1]].all()) and bool((probs[1][~nan_mask] == 0).all())
    rows = [0, 2]
    assert torch.equal(index[rows], ref_topk_index(x[rows], 5))
    close(probs[rows], ref_probs(x[rows], index[rows]), TOL[torch.float32], "probs of the other rows")


# ---- large k (k > MAX_K): the threshold-select kernels ------------------------------------------
# Each row costs ~50 passes of the interpreter over the vocabulary: V of a few thousand, 1-3 rows.
LARGE_K = [(1, 3000, tk.MAX_K + 1), (3, 300, 200), (1, 1000, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,k", LARGE_K)
def test_large_k_forward_backward(n, v, k, dtype):
    """k above MAX_K, up to k = V: the same indices as the CPU op and the stable-sort reference,
    probabilities and the backward against float64 math."""
    x = logits(n, v, dtype)
    probs, index = check_forward(x, k)
    g = torch.randn(n, v).to(dtype)
    close(run_backward(g, probs, index), ref_softmax_backward(g, probs, index), TOL[dtype], "grad")
    g0 = torch.tensor(0.5, dtype=dtype).expand(n, v)  # stride 0
    close(run_backward(g0, probs, index), ref_softmax_backward(g0, probs, index), TOL[dtype], "grad (stride 0)")


@pytest.mark.parametrize("pattern", ["few_values", "constant", "masked", "fewer_finite_than_k"])
def test_large_k_ties_and_masks(pattern):
    """Ties at the k-th value keep the lower index (across blocks: BLOCK_V 1024 on V = 2500);
    -0.0 ties with +0.0; a fully -inf row gives zeros and indices 0..k-1; -inf entries fill up a
    set in index order."""
    v, k = 2500, 700
    if pattern == "few_values":
        x = torch.randint(-1, 2, (2, v)).float()
        x[0, 5] = -0.0
    elif pattern == "constant":
        x = torch.zeros(2, v)
        x[1, ::3] = -0.0
    elif pattern == "masked":
        x = torch.full((2, v), float("-inf"))
        x[1, 2000:] = torch.randn(500)
    else:
        x = torch.full((2, v), float("-inf"))
        x[:, 1500:1600] = torch.randn(2, 100)
    probs, index = check_forward(x, k, {"BLOCK_V": 1024, "num_warps": 4})
    if pattern == "masked":
        assert index[0].tolist() == list(range(k)) and bool((probs[0] == 0).all())


def test_large_k_nan_row():
    x = logits(2, 600, torch.float32)
    x[1, 77] = float("nan")
    probs, index = run_forward(x, 300)
    cpu_probs, cpu_index = ops.sparse_softmax_fwd(x, 300)
    assert torch.equal(index[:1], cpu_index[:1])
    # the NaN row: NaN on k distinct entries (which ones is not specified for a NaN row), zero elsewhere
    assert int(probs[1].isnan().sum()) == 300 == int(cpu_probs[1].isnan().sum())
    assert bool(probs[1][index[1]].isnan().all()) and index[1].unique().numel() == 300
    close(probs[:1], ref_probs(x[:1], index[:1]), TOL[torch.float32], "probs of the finite row")


@pytest.mark.parametrize("include_target", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_k_cross_entropy(include_target, dtype):
    """Targets inside and outside the top-k, an ignored row, ties at the k-th value; forward and
    backward against float64 math and the CPU op."""
    n, v, k = 4, 1500, 400
    x = logits(n, v, dtype)
    x[2, :] = torch.randint(0, 3, (v,)).to(dtype)  # ties everywhere
    index_sorted = ref_topk_index(x, k)
    outside = [c for c in range(v) if c not in index_sorted[1].tolist()]
    # row 0: target in the set; row 1: outside it; row 2: ties; row 3: ignored
    target = torch.tensor([int(index_sorted[0, 5]), outside[0], 1, IGNORE])
    loss, lse, index = run_ce_forward(x, target, k, IGNORE, include_target)
    rl, rlse, rindex = ref_ce_forward(x, target, k, IGNORE, include_target)
    assert torch.equal(index, rindex)
    cl, clse, cindex = ops.sparse_softmax_cross_entropy_fwd(x, target, k, IGNORE, include_target)
    assert torch.equal(index, cindex)
    close(loss, rl, TOL_F32_OUT, "loss")
    live = rlse != float("-inf")
    close(lse[live], rlse[live], TOL_F32_OUT, "lse")
    assert bool((lse[~live] == float("-inf")).all())
    gl = torch.randn(n)
    grad = run_ce_backward(gl, x, target, lse, index, IGNORE, include_target)
    close(grad, ref_ce_backward(gl, x, target, lse, index, IGNORE, include_target), TOL[dtype], "grad")
    assert bool((grad[3] == 0).all())


def test_k_above_v_raises():
    x = torch.randn(2, 300)
    t = torch.zeros(2, dtype=torch.long)
    for k in (0, 301):
        with pytest.raises(ValueError, match=f"k={k}"):
            tk.sparse_softmax_forward(x, k)
        with pytest.raises(ValueError, match=f"k={k}"):
            tk.sparse_softmax_cross_entropy_forward(x, t, k, IGNORE, False)


# ---- sparse_softmax backward ----------------------------------------------------------------------
GRAD_LAYOUTS = ["contiguous", "scalar_stride0", "row_stride0", "transposed"]


def make_grad(layout, n, v, dtype):
    if layout == "contiguous":
        return torch.randn(n, v).to(dtype)
    if layout == "scalar_stride0":  # e.g. the grad of probs.sum()
        return torch.tensor(0.75, dtype=dtype).expand(n, v)
    if layout == "row_stride0":
        return torch.randn(1, v).to(dtype).expand(n, v)
    return torch.randn(v, n).to(dtype).t()


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,k", [(7, 3), (100, 100), (3000, 10)])
def test_backward(v, k, dtype, layout):
    n = 5
    x = logits(n, v, dtype)
    # the forward outputs come from the CPU op (same contract, checked above) to keep this fast
    probs, index = ops.sparse_softmax_fwd(x, k)
    g = make_grad(layout, n, v, dtype)
    grad = run_backward(g, probs, index)
    expected = ref_softmax_backward(g, probs, index)
    atol, rtol = TOL[dtype]
    close(grad, expected, (atol * 2, rtol), "grad")
    off = torch.ones_like(grad, dtype=torch.bool).scatter(1, index, False)
    assert bool((grad[off] == 0).all()), "non-zero gradient outside the top-k"
    cpu = ops.sparse_softmax_bwd(g, probs, index)
    close(grad, cpu, (atol * 2, rtol), "grad vs the CPU op")


# ---- cross-entropy --------------------------------------------------------------------------------
def make_target(x, k, ignore_index, dtype):
    n, v = x.shape
    t = torch.randint(v, (n,))
    t[0] = ignore_index
    t[1] = int(x[1].double().argmax())  # in the top-k
    t[2] = int(x[2].double().argmin())  # outside it unless k = V
    return t.to(dtype)


@pytest.mark.parametrize("include_target", [False, True])
@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, torch.int64), (torch.float32, torch.int32),
                                                (torch.bfloat16, torch.int64), (torch.float16, torch.int32)])
@pytest.mark.parametrize("n,v,k", [(4, 7, 3), (4, 100, 10), (4, 3000, 10)])
def test_cross_entropy(n, v, k, dtype, target_dtype, include_target):
    check_cross_entropy(n, v, k, dtype, target_dtype, include_target)


@pytest.mark.parametrize("include_target", [False, True])
@pytest.mark.parametrize("n,v,k", [(4, 100, 100), (3, 200, 64)])
def test_cross_entropy_large_k(n, v, k, include_target):
    check_cross_entropy(n, v, k, torch.float32, torch.int64, include_target)


def check_cross_entropy(n, v, k, dtype, target_dtype, include_target):
    x = logits(n, v, dtype)
    target = make_target(x, k, IGNORE, target_dtype)
    loss, lse, index = run_ce_forward(x, target, k, IGNORE, include_target)
    loss64, lse64, index64 = ref_ce_forward(x, target, k, IGNORE, include_target)
    assert torch.equal(index, index64), f"top-k index\n{index}\n{index64}"
    cpu = ops.sparse_softmax_cross_entropy_fwd(x, target, k, IGNORE, include_target)
    assert torch.equal(index, cpu[2]), "top-k index differs from the CPU op"
    assert loss.dtype == lse.dtype == torch.float32
    close(loss, loss64, TOL_F32_OUT, "loss")
    close(lse, lse64, TOL_F32_OUT, "lse")
    assert loss[0] == 0 and lse[0] == float("-inf") and bool((index[0] == -1).all()), "ignored row"
    if include_target:
        assert bool((loss[1:] >= 0).all()), "with include_target the loss is never negative"

    for grad_loss in (torch.rand(n) + 0.5, torch.tensor(1.25).expand(n)):  # incl. stride 0
        grad = run_ce_backward(grad_loss, x, target, lse, index, IGNORE, include_target)
        expected = ref_ce_backward(grad_loss, x, target, lse, index, IGNORE, include_target)
        atol, rtol = TOL[dtype]
        close(grad, expected, (atol * 2, rtol), "grad")
        assert bool((grad[0] == 0).all()), "ignored row has a gradient"
        assert int((grad != 0).sum(-1).max()) <= k + 1
        cpu_grad = ops.sparse_softmax_cross_entropy_bwd(grad_loss, x, target, lse, index, IGNORE,
                                                        include_target)
        close(grad, cpu_grad, (atol * 2, rtol), "grad vs the CPU op")


def test_cross_entropy_ignore_index_is_a_column():
    """ignore_index may equal a valid class (here 3): such rows are ignored all the same."""
    x = logits(4, 50, torch.float32)
    target = torch.tensor([3, 7, 3, 0])
    loss, lse, index = run_ce_forward(x, target, 5, 3, True)
    loss64, lse64, index64 = ref_ce_forward(x, target, 5, 3, True)
    assert torch.equal(index, index64)
    close(loss, loss64, TOL_F32_OUT, "loss")
    grad = run_ce_backward(torch.ones(4), x, target, lse, index, 3, True)
    close(grad, ref_ce_backward(torch.ones(4), x, target, lse, index, 3, True), (4e-6, 1e-5), "grad")
    assert bool((grad[[0, 2]] == 0).all())


@pytest.mark.parametrize("include_target", [False, True])
def test_cross_entropy_masked_rows(include_target):
    """All -inf row: loss 0, lse -inf, zero gradient. Fewer finite logits than k: the finite ones
    carry the mass; a -inf target inside the top-k gives an infinite loss (as on the CPU)."""
    ninf = float("-inf")
    x = torch.full((4, 9), ninf)
    x[1, 6], x[1, 2] = 1.0, 0.5
    x[2, 4] = 2.0
    x[3] = torch.arange(9.0)
    target = torch.tensor([5, 2, 4, 1])
    loss, lse, index = run_ce_forward(x, target, 4, IGNORE, include_target)
    loss64, lse64, index64 = ref_ce_forward(x, target, 4, IGNORE, include_target)
    assert torch.equal(index, index64)
    assert index[0].tolist() == [0, 1, 2, 3] and loss[0] == 0 and lse[0] == ninf
    close(loss, loss64, TOL_F32_OUT, "loss")
    close(lse, lse64, TOL_F32_OUT, "lse")
    cpu = ops.sparse_softmax_cross_entropy_fwd(x, target, 4, IGNORE, include_target)
    close(loss, cpu[0], TOL_F32_OUT, "loss vs the CPU op")
    grad = run_ce_backward(torch.ones(4), x, target, lse, index, IGNORE, include_target)
    close(grad, ref_ce_backward(torch.ones(4), x, target, lse, index, IGNORE, include_target),
          (4e-6, 1e-5), "grad")
    assert bool((grad[0] == 0).all())


def test_cross_entropy_nan_row():
    x = logits(3, 400, torch.float32)
    x[2, 17] = float("nan")
    target = torch.tensor([1, 2, 3])
    loss, lse, index = run_ce_forward(x, target, 4, IGNORE, False)
    cpu = ops.sparse_softmax_cross_entropy_fwd(x, target, 4, IGNORE, False)
    assert loss[2].isnan() and lse[2].isnan() and cpu[0][2].isnan()
    close(loss[:2], cpu[0][:2], TOL_F32_OUT, "loss of the other rows")
    assert torch.equal(index[:2], cpu[2][:2])


def test_cross_entropy_target_out_of_range_raises():
    x = torch.randn(3, 50)
    for bad in (50, -1):
        with pytest.raises(ValueError, match="target values"):
            tk.sparse_softmax_cross_entropy_forward(x, torch.tensor([0, bad, 1]), 3, -100, False)
