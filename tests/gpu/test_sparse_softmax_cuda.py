"""sparse_softmax / sparse_softmax_cross_entropy on CUDA tensors (the Triton kernels), through the
public functions, forward and backward, against float64 math on the same (rounded) inputs.

The reference takes the top-k by a stable sort of -x (value desc, index asc), the kernels' tie
rule; torch.topk promises no order among equal values, and bf16/fp16 rows do have ties.
"""
import pytest
import torch

import kxkernels as kx

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) against float64 math on the same inputs: float32 math, outputs rounded to the dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
SHAPES = [(1, 1, 1), (3, 7, 3), (5, 100, 10), (16, 3000, 10), (64, 5000, 64), (8, 3000, 128),
          (32, 50257, 10),
          # k > 128: the threshold-select kernels (up to k = V)
          (4, 5000, 129), (8, 5000, 1000), (2, 30522, 4096), (3, 200, 200)]
IGNORE = -100


def ref_index(x64, k):
    return torch.sort(-x64.detach(), dim=-1, stable=True).indices[..., :k]


def ref_sparse_softmax(x64, k):
    idx = ref_index(x64, k)
    return torch.zeros_like(x64).scatter(-1, idx, torch.softmax(x64.gather(-1, idx), -1))


def ref_cross_entropy(x64, target, k, include_target, reduction):
    x = x64.reshape(-1, x64.shape[-1])
    t = target.reshape(-1)
    valid = t != IGNORE
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    idx = ref_index(x, k)
    vals = x.gather(-1, idx)
    x_t = x.gather(-1, t_safe[:, None])
    if include_target:
        outside = (idx != t_safe[:, None]).all(-1, keepdim=True)
        vals = torch.cat([vals, x_t.masked_fill(~outside, float("-inf"))], -1)
    loss = torch.where(valid, torch.logsumexp(vals, -1) - x_t[:, 0], torch.zeros_like(x_t[:, 0]))
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum().clamp_min(1)


def logits(shape, dtype):
    x = (3 * torch.randn(shape, dtype=torch.float64, device="cuda")).to(dtype)
    return x.requires_grad_(), x.detach().double().requires_grad_()


def close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,k", SHAPES)
def test_sparse_softmax(n, v, k, dtype):
    x, x64 = logits((n, v), dtype)
    p = kx.sparse_softmax(x, k)
    p64 = ref_sparse_softmax(x64, k)
    assert p.dtype == dtype and p.shape == (n, v) and p.is_cuda
    close(p, p64, dtype, "probs")
    if dtype == torch.float32:  # same support (no underflow at this logit scale)
        assert torch.equal(p != 0, p64 != 0)
    assert int((p != 0).sum(-1).max()) <= k
    g = torch.randn(n, v, device="cuda").to(dtype)
    (gx,) = torch.autograd.grad(p, x, g)
    (gx64,) = torch.autograd.grad(p64, x64, g.double())
    close(gx, gx64, dtype, "grad")
    (gs,) = torch.autograd.grad(kx.sparse_softmax(x, k).sum(), x)  # stride-0 grad_probs
    (gs64,) = torch.autograd.grad(ref_sparse_softmax(x64, k).sum(), x64)
    close(gs, gs64, dtype, "grad of sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("include_target", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,v,k", SHAPES[1:])
def test_sparse_softmax_cross_entropy(n, v, k, dtype, include_target, reduction):
    x, x64 = logits((n, v), dtype)
    target = torch.randint(v, (n,), device="cuda")
    target[0] = IGNORE
    if n > 2:
        target[1] = int(x64[1].argmax())
        target[2] = int(x64[2].argmin())
    loss = kx.sparse_softmax_cross_entropy(x, target, k, include_target=include_target,
                                           reduction=reduction)
    loss64 = ref_cross_entropy(x64, target, k, include_target, reduction)
    assert loss.dtype == dtype and loss.shape == loss64.shape
    close(loss, loss64, dtype, "loss")
    g = (torch.rand(loss64.shape, device="cuda", dtype=torch.float64) + 0.5).to(dtype)
    (gx,) = torch.autograd.grad(loss, x, g)
    (gx64,) = torch.autograd.grad(loss64, x64, g.double())
    close(gx, gx64, dtype, "grad")
    assert bool((gx[0] == 0).all()), "ignored row has a gradient"
    assert int((gx != 0).sum(-1).max()) <= k + 1


def test_three_dims_and_other_dim():
    x, x64 = logits((2, 33, 700), torch.float32)
    target = torch.randint(700, (2, 33), device="cuda")
    loss = kx.sparse_softmax_cross_entropy(x, target, 7, reduction="none")
    close(loss, ref_cross_entropy(x64, target, 7, False, "none"), torch.float32, "loss (B, T, V)")
    p = kx.sparse_softmax(x, 5, dim=1)  # softmax over T: a strided view
    close(p, ref_sparse_softmax(x64.movedim(1, -1), 5).movedim(-1, 1), torch.float32, "dim=1")


@pytest.mark.parametrize("include_target", [False, True])
def test_raw_ops_match_cpu(include_target):
    """The CUDA ops return what the CPU ops return (same contract), special rows included:
    ignored, fully -inf, fewer finite logits than k, ties."""
    ops = torch.ops.kxkernels
    n, v, k = 6, 2000, 8
    x = torch.randn(n, v)
    x[1] = float("-inf")
    x[2] = float("-inf")
    x[2, [5, 900]] = torch.tensor([1.0, 2.0])
    x[3] = torch.randint(0, 3, (v,)).float()
    target = torch.tensor([IGNORE, 4, 900, 7, 11, 12])
    for dtype in DTYPES:
        xd = x.to(dtype)
        cpu = ops.sparse_softmax_fwd(xd, k)
        gpu = ops.sparse_softmax_fwd(xd.cuda(), k)
        assert torch.equal(gpu[1].cpu(), cpu[1])
        close(gpu[0].cpu(), cpu[0], dtype, "probs vs CPU")
        cpu = ops.sparse_softmax_cross_entropy_fwd(xd, target, k, IGNORE, include_target)
        gpu = ops.sparse_softmax_cross_entropy_fwd(xd.cuda(), target.cuda(), k, IGNORE, include_target)
        assert torch.equal(gpu[2].cpu(), cpu[2])
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-5, rtol=1e-5)
        gl = torch.rand(n) + 0.5
        gcpu = ops.sparse_softmax_cross_entropy_bwd(gl, xd, target, cpu[1], cpu[2], IGNORE, include_target)
        ggpu = ops.sparse_softmax_cross_entropy_bwd(gl.cuda(), xd.cuda(), target.cuda(), gpu[1], gpu[2],
                                                    IGNORE, include_target)
        close(ggpu.cpu(), gcpu, dtype, "ce grad vs CPU")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab(dtype):
    """N=4096 rows of a GPT-2 sized vocabulary (N*V > 2^27), k=10, forward and backward."""
    n, v, k = 4096, 50257, 10
    x, x64 = logits((n, v), dtype)
    p = kx.sparse_softmax(x, k)
    p64 = ref_sparse_softmax(x64, k)
    close(p, p64, dtype, "probs")
    g = torch.randn(n, v, device="cuda").to(dtype)
    (gx,) = torch.autograd.grad(p, x, g)
    (gx64,) = torch.autograd.grad(p64, x64, g.double())
    close(gx, gx64, dtype, "grad")
    del p, p64, gx, gx64
    target = torch.randint(v, (n,), device="cuda")
    target[::7] = IGNORE
    loss = kx.sparse_softmax_cross_entropy(x, target, k)
    loss64 = ref_cross_entropy(x64, target, k, False, "mean")
    close(loss, loss64, dtype, "loss")
    (gx,) = torch.autograd.grad(loss, x)
    (gx64,) = torch.autograd.grad(loss64, x64)
    close(gx, gx64, dtype, "ce grad")
