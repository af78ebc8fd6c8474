"""kxkernels.nn.RoPEAttention against its own projections + the eager reference formula
(kxkernels/ops/rope_attention/reference.py, float64), forward and backward."""
import pytest
import torch

from kxkernels.nn import RoPEAttention
from kxkernels.ops.rope_attention import reference as ref
from tests.conftest import devices

# (atol, rtol) of the module in float32 against float64 attention on the same projections
TOL = (2e-5, 2e-5)
GRAD_TOL = (1e-4, 1e-4)


def eager(attn, x, mask):
    b, length, _ = x.shape
    d = attn.head_dim

    def heads(t, h):
        return t.view(b, length, h, d).transpose(1, 2).double()

    q, k, v = heads(attn.q_proj(x), attn.num_heads), heads(attn.k_proj(x), attn.num_kv_heads), \
        heads(attn.v_proj(x), attn.num_kv_heads)
    o = ref.rope_attention(q, k, v, causal=attn.causal, key_padding_mask=mask,
                           rope_base=attn.rope_base, interleaved=attn.interleaved)
    return attn.o_proj(o.float().transpose(1, 2).reshape(b, length, -1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal,interleaved,kv,bias", [(False, True, None, True), (True, False, 2, False),
                                                        (True, True, 1, True)],
                         ids=["mha-interleaved", "gqa-half-causal", "mqa-causal"])
def test_matches_eager(device, causal, interleaved, kv, bias):
    torch.manual_seed(0)
    attn = RoPEAttention(64, num_heads=4, num_kv_heads=kv, causal=causal, interleaved=interleaved,
                         bias=bias, rope_base=500.0).to(device)
    x = torch.randn(2, 21, 64, device=device, requires_grad=True)
    mask = torch.ones(2, 21, dtype=torch.bool, device=device)
    mask[1, 15:] = False
    out = attn(x, key_padding_mask=mask)
    want = eager(attn, x, mask)
    assert out.shape == (2, 21, 64) and out.dtype == x.dtype
    torch.testing.assert_close(out, want, atol=TOL[0], rtol=TOL[1])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *attn.parameters()], g)
    exp = torch.autograd.grad(want, [x, *attn.parameters()], g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=GRAD_TOL[0], rtol=GRAD_TOL[1])


def test_bfloat16_and_no_mask():
    torch.manual_seed(0)
    attn = RoPEAttention(32, num_heads=2)
    x = torch.randn(1, 9, 32)
    ref32 = attn(x)
    out = attn.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref32, atol=5e-2, rtol=5e-2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        RoPEAttention(64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="even"):
        RoPEAttention(60, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        RoPEAttention(66, num_heads=4)
    with pytest.raises(TypeError, match="num_heads"):
        RoPEAttention(64, num_heads=4.0)
    attn = RoPEAttention(64, num_heads=4)
    with pytest.raises(ValueError, match="hidden"):
        attn(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(torch.randn(2, 5, 64), key_padding_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        attn(torch.randn(2, 5, 64), key_padding_mask=torch.ones(2, 5))
