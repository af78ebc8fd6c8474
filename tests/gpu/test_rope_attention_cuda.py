"""rope_attention / apply_rope on CUDA tensors (the Triton kernels), through the public functions,
forward and backward, at L = 2048..8192 and D = 64, 128.

Truth: the float64 eager reference (kxkernels/ops/rope_attention/reference.py) on the same
(rounded) inputs. float32 must match it to a relative RMS bound; bfloat16 must follow the
low-precision rule of the issue: its relative RMS error is at most 2x that of eager RoPE +
attention run in bfloat16 (the reference in bfloat16), and at most 2x that of eager RoPE +
torch's scaled_dot_product_attention in bfloat16 (flash / efficient kernels), plus a small floor.
The device name is printed (run pytest with -s to record it).
"""
import pytest
import torch
import torch.nn.functional as F

import kxkernels as kx
from kxkernels.ops.rope_attention import reference as ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

# relative RMS error bounds against float64 for float32 inputs (float32 math, IEEE dots)
F32_BOUND = {"out": 2e-5, "grad": 1e-4}
LOWP_FACTOR, LOWP_FLOOR = 2.0, 1e-3  # the low-precision rule: err <= 2 x eager err + floor
SHAPES = [(2048, 64), (4096, 128), (8192, 64), (8192, 128)]


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(b, hq, hk, length, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, length, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hk, length, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hk, length, d, device="cuda", generator=g).to(dtype)
    go = torch.randn(b, hq, length, d, device="cuda", generator=g).to(dtype)
    return q, k, v, go


def run(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    return out.detach(), grads


def eager_sdpa(q, k, v, causal, mask):
    qr = ref.apply_rope(q)
    kr = ref.apply_rope(k)
    g = q.shape[1] // k.shape[1]
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(qr, kr.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=attn_mask, is_causal=causal and mask is None)


def test_device_name():
    name = torch.cuda.get_device_name()
    print(f"\nrope_attention GPU tests on: {name} (torch {torch.__version__}, "
          f"triton {__import__('triton').__version__})")
    assert name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length,d", SHAPES, ids=[f"L{n}-D{d}" for n, d in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_forward_backward(dtype, length, d, causal):
    b, hq, hk = 1, 4, 2  # GQA 2:1
    q, k, v, go = inputs(b, hq, hk, length, d, dtype)
    out, grads = run(lambda q, k, v: kx.rope_attention(q, k, v, causal=causal), q, k, v, go)
    out64, grads64 = run(lambda q, k, v: ref.rope_attention(q, k, v, causal=causal),
                         q.double(), k.double(), v.double(), go)
    assert out.dtype == dtype and out.shape == (b, hq, length, d)
    errs = {"out": rel_rms(out, out64)}
    errs.update({n: rel_rms(g, g64) for n, g, g64 in zip(("dq", "dk", "dv"), grads, grads64)})
    if dtype == torch.float32:
        for n, e in errs.items():
            bound = F32_BOUND["out" if n == "out" else "grad"]
            assert e <= bound, f"{n}: relative RMS error {e:.3g} > {bound} (fp32 vs float64)"
        return
    eager_out, eager_grads = run(lambda q, k, v: ref.rope_attention(q, k, v, causal=causal), q, k, v, go)
    sdpa_out, sdpa_grads = run(lambda q, k, v: eager_sdpa(q, k, v, causal, None), q, k, v, go)
    for name, base_out, base_grads in (("eager bf16", eager_out, eager_grads),
                                       ("eager RoPE + SDPA bf16", sdpa_out, sdpa_grads)):
        base = {"out": rel_rms(base_out, out64)}
        base.update({n: rel_rms(g, g64) for n, g, g64 in zip(("dq", "dk", "dv"), base_grads, grads64)})
        for n in errs:
            limit = LOWP_FACTOR * base[n] + LOWP_FLOOR
            assert errs[n] <= limit, (f"{n}: kernel error {errs[n]:.3g} > {LOWP_FACTOR} x {name} error "
                                      f"{base[n]:.3g} + {LOWP_FLOOR}")


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_padding_positions_partial_rotary(interleaved):
    """bf16, L = 2048, padding with a fully padded batch row, custom positions, partial rotary."""
    b, hq, hk, length, d = 2, 4, 1, 2048, 128
    q, k, v, go = inputs(b, hq, hk, length, d, torch.bfloat16, seed=1)
    mask = torch.rand(b, length, device="cuda") > 0.2
    mask[1] = False
    qpos = torch.randint(0, 10000, (b, length), device="cuda")
    kw = dict(key_padding_mask=mask, q_positions=qpos, k_positions=qpos, rotary_dim=64,
              interleaved=interleaved, causal=True)
    out, grads = run(lambda q, k, v: kx.rope_attention(q, k, v, **kw), q, k, v, go)
    out64, grads64 = run(lambda q, k, v: ref.rope_attention(q, k, v, **kw), q.double(), k.double(),
                         v.double(), go)
    eager_out, eager_grads = run(lambda q, k, v: ref.rope_attention(q, k, v, **kw), q, k, v, go)
    assert (out[1] == 0).all() and all((g[1] == 0).all() for g in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    for n, a, a64, e in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *grads64),
                            (eager_out, *eager_grads)):
        err, base = rel_rms(a[0], a64[0]), rel_rms(e[0], a64[0])
        assert err <= LOWP_FACTOR * base + LOWP_FLOOR, f"{n}: {err:.3g} vs eager bf16 {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_cuda(dtype):
    x = torch.randn(2, 8, 4096, 128, device="cuda").to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    pos = torch.randint(0, 8192, (4096,), device="cuda")
    x_ = x.detach().clone().requires_grad_()
    y = kx.apply_rope(x_, positions=pos, rotary_dim=96)
    y64 = ref.apply_rope(x.double(), positions=pos, rotary_dim=96)
    bound = 1e-6 if dtype == torch.float32 else 4e-3
    assert rel_rms(y, y64) <= bound
    (gx,) = torch.autograd.grad(y, x_, torch.ones_like(y))
    g64 = ref.apply_rope(torch.ones_like(y64), positions=pos, rotary_dim=96, inverse=True)
    assert rel_rms(gx, g64) <= bound


def test_opcheck_and_compile_cuda():
    """The CUDA registrations (Triton) pass opcheck and run under torch.compile(fullgraph=True)."""
    q, k, v, go = inputs(2, 4, 2, 160, 64, torch.bfloat16, seed=2)
    mask = torch.ones(2, 160, dtype=torch.bool, device="cuda")
    mask[1, 100:] = False
    pos = torch.arange(160, device="cuda").expand(2, 160)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, pos, pos, True, 0.125,
            True, 10000.0, True, 64)
    torch.library.opcheck(torch.ops.kxkernels.rope_attention_fwd, args)
    torch.library.opcheck(torch.ops.kxkernels.apply_rope_fwd, (q, pos, 0, 10000.0, False, 32, False))

    def f(q, k, v):
        return kx.rope_attention(q, k, v, causal=True, key_padding_mask=mask)

    out, grads = run(torch.compile(f, fullgraph=True), q, k, v, go)
    out_e, grads_e = run(f, q, k, v, go)
    torch.testing.assert_close(out, out_e, atol=0, rtol=0)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge, atol=0, rtol=0)
