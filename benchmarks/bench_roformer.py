"""Hugging Face RoFormer with kxkernels' fused RoPE attention, benchmark cases for benchmarks/run.py.

Providers: kxkernels = a ``RoFormerModel`` patched by
``kxkernels.integrations.transformers.patch_roformer`` (self-attention on ``rope_attention``);
reference = the same model (same weights, a deep copy) unpatched, i.e. HF's eager attention,
which materializes the ``(B, H, L, L)`` scores and probabilities and rotates q and k in a separate
pass. Both run in eval mode (no dropout), float32, at sequence length 512 with a right-padded
batch row. One step is ``model(ids, attention_mask)`` then, for fwd+bwd, the backward of
``<last_hidden_state, g>`` into every parameter (gradients freed after each step, as
``zero_grad()`` does). Whole-model timings: the projections, feed-forward and layer norms are the
same code in both, so the ratio is what a user of the patched model gains.
"""
from __future__ import annotations

import copy

import torch

from benchmarks.harness import Case

L = 512
# (name, hidden, heads, intermediate, layers, batch): RoFormer-base widths (a slice of its 12
# layers: every layer costs the same, so the ratio does not depend on the depth) and a small model
CONFIGS = (("base-width", 768, 12, 3072, 2, 2), ("small", 384, 6, 1536, 4, 4))


def _models(hidden, heads, inter, layers, device):
    from transformers import RoFormerConfig, RoFormerModel

    from kxkernels.integrations.transformers import patch_roformer

    torch.manual_seed(0)
    cfg = RoFormerConfig(vocab_size=1000, hidden_size=hidden, embedding_size=hidden,
                         num_attention_heads=heads, intermediate_size=inter,
                         num_hidden_layers=layers, max_position_embeddings=L,
                         attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    ref = RoFormerModel(cfg).to(device).eval()
    return patch_roformer(copy.deepcopy(ref)), ref


def _step(model, ids, mask, grad, backward):
    params = [p for p in model.parameters() if p.requires_grad]

    if not backward:
        def fwd():
            with torch.no_grad():
                return model(ids, attention_mask=mask).last_hidden_state
        return fwd

    def fwd_bwd():
        out = model(ids, attention_mask=mask).last_hidden_state
        return torch.autograd.grad(out, params, grad)
    return fwd_bwd


def _max_error(kx_model, ref_model, ids, mask):
    def err():
        with torch.no_grad():
            a = kx_model(ids, attention_mask=mask).last_hidden_state
            b = ref_model(ids, attention_mask=mask).last_hidden_state
        return float((a - b).abs().max())
    return err


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for name, hidden, heads, inter, layers, batch in (CONFIGS[:1] if quick else CONFIGS):
        kx_model, ref_model = _models(hidden, heads, inter, layers, device)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1000, (batch, L), generator=gen).to(device)
        mask = torch.ones(batch, L, dtype=torch.long)
        mask[-1, L * 3 // 4:] = 0  # one right-padded row
        mask = mask.to(device)
        grad = torch.randn(batch, L, hidden, generator=gen).to(device)
        shape = f"{name} B={batch} L={L} hidden={hidden} heads={heads} layers={layers}"
        for backward in (False, True):
            out.append(Case(
                op="RoFormer patched " + ("fwd+bwd" if backward else "fwd"), shape=shape,
                dtype="float32", device=device,
                kx=_step(kx_model, ids, mask, grad, backward),
                reference=_step(ref_model, ids, mask, grad, backward),
                max_error=_max_error(kx_model, ref_model, ids, mask),
                note="whole model; reference = HF eager attention (unpatched)"))
    return out
