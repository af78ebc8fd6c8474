"""The RoPE / RoPE attention Triton launchers on CPU tensors under the Triton interpreter.

Run by test_rope_attention_interpret.py in a subprocess with TRITON_INTERPRET=1 (see
_interpreter.py); running this file directly without it fails at import. Reference: the float64
eager math of kxkernels/ops/rope_attention/reference.py on the same (rounded) inputs, gradients by
autograd through it. Every tensor the launchers allocate is NaN-filled first (torch.empty is
wrapped), so an unwritten element fails. Shapes are tiny and the tiles 16 wide, so that every
case still crosses several query and key blocks, the causal diagonal and the ragged edges.
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run these checks with TRITON_INTERPRET=1 set before triton is imported "
                       "(tests/triton/test_rope_attention_interpret.py does)")

import pytest  # noqa: E402
import torch  # noqa: E402

from kxkernels.ops.rope_attention import reference as ref  # noqa: E402
from kxkernels.ops.rope_attention import triton as tk  # noqa: E402

# The interpreter evaluates masked-off lanes too (exp2(-inf - -inf) of an empty row); those values
# are discarded by the masks, numpy still warns.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
# (atol, rtol) against float64 math on the same inputs. float32: float32 math and dots over
# D <= 32 terms and L <= 40 keys. bfloat16: dot operands (rotated q/k, probabilities, dS) and
# outputs rounded to 8 significant bits, as the GPU kernels do.
TOL = {torch.float32: (3e-5, 3e-5), torch.bfloat16: (4e-2, 4e-2)}
TOL_GRAD = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (8e-2, 8e-2)}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(tk.torch, "empty", nan_empty)


def close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def ref_forward(q, k, v, mask, qpos, kpos, causal, scale, rope, base, interleaved, rd):
    """float64 (out, lse) with autograd; lse +inf on a fully masked row, its out 0."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = ref.rope_attention(q64, k64, v64, causal=causal, key_padding_mask=mask, scale=scale,
                             rope=rope, rope_base=base, interleaved=interleaved, rotary_dim=rd,
                             q_positions=qpos, k_positions=kpos)
    bsz, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    with torch.no_grad():
        qr, kr = q64, k64
        if rope:
            qp = qpos if qpos is not None else lk - lq
            qr = ref.apply_rope(q64, positions=qp, base=base, interleaved=interleaved, rotary_dim=rd)
            kr = ref.apply_rope(k64, positions=kpos, base=base, interleaved=interleaved,
                                rotary_dim=rd)
        s = scale * qr @ kr.repeat_interleave(hq // hk, 1).transpose(-1, -2)
        keep = torch.ones(bsz, 1, lq, lk, dtype=torch.bool)
        if mask is not None:
            keep = keep & mask[:, None, None, :]
        if causal:
            keep = keep & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq)
        lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1)
        lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    return out, lse, (q64, k64, v64)


def run_case(dtype, *, bsz=2, hq=2, hk=1, lq=19, lk=33, d=24, dv=20, rd=16, interleaved=True,
             causal=False, padded=True, positions=True, rope=True, config=SMALL,
             q_layout="contiguous", grad_layout="contiguous", kill_rows=False):
    q = torch.randn(bsz, hq, lq, d).to(dtype)
    k = torch.randn(bsz, hk, lk, d).to(dtype)
    v = torch.randn(bsz, hk, lk, dv).to(dtype)
    if q_layout == "transposed":  # (B, L, H, D) memory seen as (B, H, L, D): non-unit strides
        q = torch.randn(bsz, lq, hq, d).to(dtype).transpose(1, 2)
        k = torch.randn(bsz, lk, hk, d).to(dtype).transpose(1, 2)
    mask = None
    if padded:
        mask = torch.rand(bsz, lk) > 0.3
        mask[0, :3] = True
        if kill_rows:
            mask[-1] = False  # a fully padded batch row
    qpos = kpos = None
    if positions:
        qpos = torch.randint(0, 200, (bsz, lq))
        kpos = torch.arange(7, 7 + lk).expand(bsz, lk)  # a stride-0 expanded view
    scale = 0.3
    out, lse = tk.rope_attention_forward(q, k, v, mask, qpos, kpos, causal, scale, rope, 10000.0,
                                         interleaved, rd, config=config)
    out64, lse64, leaves = ref_forward(q, k, v, mask, qpos, kpos, causal, scale, rope, 10000.0,
                                       interleaved, rd)
    assert out.dtype == dtype and out.shape == (bsz, hq, lq, dv)
    assert lse.dtype == torch.float32 and lse.shape == (bsz, hq, lq)
    close(out, out64, TOL[dtype], "out")
    assert torch.equal(torch.isposinf(lse), torch.isposinf(lse64)), "fully masked rows differ"
    finite = torch.isfinite(lse64)
    close(lse[finite], lse64[finite], TOL[torch.float32] if dtype == torch.float32 else (2e-2, 2e-2),
          "lse")
    go = torch.randn(bsz, hq, lq, dv).to(dtype)
    if grad_layout == "stride0":
        go = torch.randn(1, 1, 1, dv).to(dtype).expand(bsz, hq, lq, dv)
    dq, dk, dv_ = tk.rope_attention_backward(go, q, k, v, out, lse, mask, qpos, kpos, causal, scale,
                                             rope, 10000.0, interleaved, rd, config=config)
    g64 = torch.autograd.grad(out64, leaves, go.double())
    for name, got, want in (("dq", dq, g64[0]), ("dk", dk, g64[1]), ("dv", dv_, g64[2])):
        assert got.dtype == dtype and got.shape == want.shape, name
        close(got, want, TOL_GRAD[dtype], name)
    return out, lse, (dq, dk, dv_), lse64


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_fp32(interleaved, causal):
    """GQA 2:1, Lq != Lk, padding, custom positions (q random, k an expanded view), partial
    rotary (16 of 24 channels), Dv != D."""
    run_case(torch.float32, interleaved=interleaved, causal=causal)


def test_attention_defaults_full_rotary_mha():
    """Default positions, full rotary, Hq == Hk, Lq == Lk, no mask."""
    run_case(torch.float32, hq=2, hk=2, lq=21, lk=21, d=16, dv=16, rd=16, padded=False,
             positions=False, causal=True)


def test_fully_masked_rows_zero():
    """Lq > Lk causal (the first Lq - Lk queries see no key) plus a fully padded batch row:
    out 0, lse +inf, and zero gradients for those rows and keys."""
    bsz, lq, lk = 2, 30, 18
    out, lse, (dq, dk, dv), lse64 = run_case(torch.float32, bsz=bsz, lq=lq, lk=lk, causal=True,
                                             kill_rows=True, positions=False)
    dead = torch.isposinf(lse64)
    assert dead[:, :, : lq - lk].all() and dead[-1].all()
    assert torch.isposinf(lse[dead]).all()
    assert (out[dead] == 0).all()
    assert (dq[dead] == 0).all()
    assert (dk[-1] == 0).all() and (dv[-1] == 0).all()


def test_attention_bf16_loads():
    """bfloat16 in memory, float32 math; the interpreter rounds dot operands to bfloat16."""
    run_case(torch.bfloat16, causal=True, interleaved=False)


def test_attention_no_rope_odd_dims_strided():
    """rope=False (plain attention), odd head dims, (B, L, H, D)-strided q/k, stride-0 grad_out."""
    run_case(torch.float32, d=13, dv=7, rd=0, rope=False, positions=False, causal=True,
             q_layout="transposed", grad_layout="stride0")


def test_attention_default_config():
    """The launcher's own tile choice (64-wide query tiles, padded head dims)."""
    run_case(torch.float32, bsz=1, hq=2, hk=1, lq=9, lk=70, d=8, dv=8, rd=8, config=None,
             causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("positions", ["offset", "tensor"])
def test_apply_rope(dtype, interleaved, positions):
    bsz, h, length, d, rd = 2, 3, 37, 20, 12
    x = torch.randn(bsz, length, h, d).to(dtype).transpose(1, 2)  # strided input
    if positions == "offset":
        pos, offset, ref_pos = None, 5, 5
    else:
        pos, offset = torch.randint(-50, 3000, (bsz, length)), 0
        ref_pos = pos
    y = tk.apply_rope_forward(x, pos, offset, 500.0, interleaved, rd, False,
                              config={"BLOCK_L": 16, "num_warps": 4})
    want = ref.apply_rope(x.double(), positions=ref_pos, base=500.0, interleaved=interleaved,
                          rotary_dim=rd)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    tol = (2e-6, 2e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    close(y, want, tol, "rope")
    assert torch.equal(y[..., rd:], x[..., rd:]), "pass-through channels changed"
    back = tk.apply_rope_forward(y, pos, offset, 500.0, interleaved, rd, True)
    close(back, ref.apply_rope(y.double(), positions=ref_pos, base=500.0, interleaved=interleaved,
                               rotary_dim=rd, inverse=True), tol, "inverse rope")
    if dtype == torch.float32:
        close(back, x, (1e-5, 1e-5), "inverse(rope(x))")


def test_launcher_errors():
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 1, 8, 16)
    v = torch.randn(1, 1, 8, 16)
    args = (None, None, None, False, 0.25, True, 10000.0, True)
    with pytest.raises(ValueError, match="rotary_dim"):
        tk.rope_attention_forward(q, k, v, *args, 15)
    with pytest.raises(ValueError, match="rotary_dim"):
        tk.rope_attention_forward(q, k, v, *args, 18)
    with pytest.raises(ValueError, match="multiple"):
        tk.rope_attention_forward(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16),
                                  torch.randn(1, 2, 8, 16), *args, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        tk.rope_attention_forward(q, k, v, torch.ones(1, 7, dtype=torch.bool), *args[1:], 16)
    with pytest.raises(ValueError, match="q_positions"):
        tk.rope_attention_forward(q, k, v, None, torch.zeros(1, 9, dtype=torch.long), *args[2:], 16)
    with pytest.raises(TypeError, match="dtype"):
        tk.rope_attention_forward(q, k.half(), v, *args, 16)
    with pytest.raises(ValueError, match="v must"):
        tk.rope_attention_forward(q, k, v[:, :, :5], *args, 16)
    with pytest.raises(ValueError, match="rotary_dim"):
        tk.apply_rope_forward(q, None, 0, 10000.0, True, 3, False)
    with pytest.raises(ValueError, match="positions"):
        tk.apply_rope_forward(q, torch.zeros(8, dtype=torch.long), 0, 10000.0, True, 16, False)
