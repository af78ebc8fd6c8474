"""patch_roformer: a Hugging Face RoFormer (built from a config, no download) patched onto the fused
RoPE attention matches the unpatched model, outputs and gradients, on CPU (and CUDA when present).

Both models hold the same weights (a deep copy), run in eval mode with dropout off, float32, with a
right-padded batch row (every query still sees real keys, where HF's eager softmax and the fused
kernel agree exactly; a row with no real key at all is documented as differing).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import RoFormerConfig, RoFormerForMaskedLM, RoFormerModel  # noqa: E402

from kxkernels.integrations.transformers import patch_roformer  # noqa: E402
from tests.conftest import devices  # noqa: E402

# float32 kernel vs HF eager float32 after a few layers (LayerNorm renormalizes each layer)
ATOL, RTOL = 2e-5, 1e-4
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-3


def config(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                hidden_dropout_prob=0.0)
    base.update(kw)
    return RoFormerConfig(**base)


def pair(cfg, cls=RoFormerModel, device="cpu"):
    torch.manual_seed(0)
    ref = cls(cfg).to(device).eval()
    return patch_roformer(copy.deepcopy(ref)), ref


def batch(device, b=3, length=29, vocab=97):
    ids = torch.randint(0, vocab, (b, length), device=device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    return ids, mask


def forward_backward(model, ids, mask, grad, **kw):
    out = model(ids, attention_mask=mask, **kw)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params, grad, allow_unused=True)
    return out.detach(), dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("variant", ["encoder", "rotary_value", "decoder", "no_mask", "odd_length"])
def test_patched_matches_unpatched(device, variant):
    kw = {"rotary_value": {"rotary_value": True}, "decoder": {"is_decoder": True}}.get(variant, {})
    kx, ref = pair(config(**kw), device=device)
    ids, mask = batch(device, length=31 if variant == "odd_length" else 29)
    if variant == "no_mask":
        mask = None
    grad = torch.randn(ids.shape[0], ids.shape[1], 64, device=device)
    call = {"use_cache": False} if variant == "decoder" else {}
    out_kx, g_kx = forward_backward(kx, ids, mask, grad, **call)
    out_ref, g_ref = forward_backward(ref, ids, mask, grad, **call)
    torch.testing.assert_close(out_kx, out_ref, atol=ATOL, rtol=RTOL)
    assert g_kx.keys() == g_ref.keys()
    for name in g_ref:
        if g_ref[name] is None:
            assert g_kx[name] is None, name
            continue
        torch.testing.assert_close(g_kx[name], g_ref[name], atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_input_gradient_and_masked_lm():
    """A model containing a RoFormerModel; gradient with respect to the input embeddings."""
    kx, ref = pair(config(), cls=RoFormerForMaskedLM)
    ids, mask = batch("cpu")
    embeds = ref.roformer.embeddings.word_embeddings(ids).detach()
    res = []
    for model in (kx, ref):
        e = embeds.clone().requires_grad_()
        logits = model(inputs_embeds=e, attention_mask=mask).logits
        (g,) = torch.autograd.grad(logits.logsumexp(-1).sum(), e)
        res.append((logits.detach(), g))
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res[0][1], res[1][1], atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_weights_untouched_and_idempotent():
    torch.manual_seed(0)
    model = RoFormerModel(config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    assert patch_roformer(model) is model
    assert patch_roformer(model) is model  # twice: a no-op
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())
    kinds = {type(m.attention.self).__name__ for m in model.encoder.layer}
    assert kinds == {"KXRoFormerSelfAttention"}


def test_unsupported_configs_raise():
    kx, _ = pair(config(attention_probs_dropout_prob=0.1))
    ids, mask = batch("cpu")
    kx.train()
    with pytest.raises(RuntimeError, match="dropout"):
        kx(ids, attention_mask=mask)
    kx.eval()
    with pytest.raises(ValueError, match="output_attentions"):
        kx(ids, attention_mask=mask, output_attentions=True)
    dec, _ = pair(config(is_decoder=True))
    with pytest.raises(ValueError, match="use_cache=False"):
        dec(ids, attention_mask=mask, use_cache=True)
    with pytest.raises(ValueError, match="no RoFormerSelfAttention"):
        patch_roformer(torch.nn.Linear(2, 2))
    custom = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    custom[:, :, 3, 4] = torch.finfo(torch.float32).min  # one masked (query, key) pair
    with pytest.raises(ValueError, match="neither a key padding mask"):
        kx(ids, attention_mask=custom)



def test_bfloat16_error_within_eager():
    """bf16 patched model: error against the float32 model at most 2x that of HF eager in bf16."""
    kx, ref = pair(config())
    ids, mask = batch("cpu")
    with torch.no_grad():
        exact = ref(ids, attention_mask=mask)[0]
        eager = ref.to(torch.bfloat16)(ids, attention_mask=mask)[0].float()
        fused = kx.to(torch.bfloat16)(ids, attention_mask=mask)[0]
    assert fused.dtype == torch.bfloat16
    err, base = (fused.float() - exact).abs().max(), (eager - exact).abs().max()
    assert err <= 2 * base + 1e-3, f"patched bf16 error {err:.3g} vs eager bf16 {base:.3g}"
