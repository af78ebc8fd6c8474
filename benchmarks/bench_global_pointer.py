"""GlobalPointer + ZLPR loss benchmark cases for benchmarks/run.py.

Every provider starts from the same leaf: the head's projection output ``x (B, L, H * 2D)``, laid
out as bert4torch's GlobalPointer expects after its Linear (per head ``[q | k]``), and ends with
``loss.backward()`` into it (then ``x.grad = None``), so every provider allocates its own
gradient inside the timed step, as a training loop does.

- kxkernels: strided (B, H, L, D) views of x as q, k, then :func:`kxkernels.global_pointer_loss`
  (fused: C++ on CPU, Triton on CUDA) against the spans.
- reference: the same views through ./reference.py: global_pointer scores (B, H, L, L) and the
  dense ZLPR on (B * H, L * L) rows (mean over rows, bert4keras's global_pointer_crossentropy).
- bert4torch: its ``GlobalPointer`` with ``dense`` replaced by an identity (so it starts from the
  same x: its own split, RoPE, einsum, masks and scale) and its ``MultilabelCategoricalCrossentropy``
  on (B * H, L * L) dense labels built once outside the timed step (as its examples' collate
  function does). Imported through benchmarks/peers.py (see ../shared/BENCHMARKING.md).

``flops`` is the score GEMM work of the dense formulation, forward (Q K^T) plus backward (dQ, dK):
``3 * 2 * B * H * L^2 * D``, so "kx GFLOP/s" reads against the sgemm probe printed under the table.
The fused kernel skips the tiles below the diagonal and recomputes the scores in its backward.
"""
from __future__ import annotations

import warnings

import torch

import kxkernels
from benchmarks.harness import Case
from kxkernels.ops.global_pointer import reference

P_SPANS = 4          # positive spans per (batch, head)
MAX_SPAN = 10        # tokens
ERROR_BATCHES = 2    # batches of the float64 reference in max_error


def _views(x, H, D):
    """q, k (B, H, L, D): strided views of x (B, L, H * 2D), per head [q | k] (bert4torch's layout)."""
    B, L, _ = x.shape
    y = x.view(B, L, H, 2 * D).transpose(1, 2)
    return y[..., :D], y[..., D:]


def _spans(B, H, L, gen):
    start = torch.randint(0, L - MAX_SPAN, (B, H, P_SPANS), generator=gen)
    end = start + torch.randint(0, MAX_SPAN, (B, H, P_SPANS), generator=gen)
    return torch.stack((start, end), dim=-1)


def _step(loss_fn, x):
    def step():
        loss_fn(x).backward()
        x.grad = None
    return step


def _bert4torch_step(x, H, D, labels):
    """bert4torch's GlobalPointer (dense = identity) + MultilabelCategoricalCrossentropy, or why not."""
    from benchmarks.peers import PeerUnavailable, import_bert4torch_layers
    try:
        layers = import_bert4torch_layers()
        from bert4torch.losses import MultilabelCategoricalCrossentropy
    except PeerUnavailable as e:
        warnings.warn(f"global_pointer: bert4torch peer skipped: {e}")
        return None
    B, L, _ = x.shape
    head = layers.GlobalPointer(H * 2 * D, H, D, RoPE=True, use_bias=False, tril_mask=True).to(x.device)
    head.dense = torch.nn.Identity()
    loss_fn = MultilabelCategoricalCrossentropy()
    flat = labels.reshape(B * H, L * L)

    def loss(x):
        return loss_fn(head(x).reshape(B * H, L * L), flat)
    return _step(loss, x)


def _max_error(x, H, D, spans):
    """Max abs difference of the loss and of its gradient w.r.t. x between kxkernels (float32)
    and the reference in float64, on the first ERROR_BATCHES batches."""
    def max_error():
        xs, ss = x.detach()[:ERROR_BATCHES], spans[:ERROR_BATCHES]
        a, b = xs.clone().requires_grad_(), xs.double().requires_grad_()
        la = kxkernels.global_pointer_loss(*_views(a, H, D), ss)
        lb = reference.global_pointer_loss(*_views(b, H, D), ss.cpu())
        la.backward()
        lb.backward()
        return max(abs(la.item() - lb.item()), (a.grad.double().cpu() - b.grad).abs().max().item())
    return max_error


def _case(B, L, H, D, device, gen, note="", with_peer=True):
    x = torch.randn(B, L, H * 2 * D, generator=gen).to(device).requires_grad_()
    spans = _spans(B, H, L, gen).to(device)
    peers = {}
    b4t = _bert4torch_step(x, H, D, reference.spans_to_labels(spans, L).float()) if with_peer else None
    if b4t is not None:
        peers["bert4torch GlobalPointer + MultilabelCategoricalCrossentropy"] = b4t
    return Case(
        op="global_pointer_loss fwd+bwd", shape=f"B={B} L={L} H={H} D={D}", dtype="float32", device=device,
        kx=_step(lambda x: kxkernels.global_pointer_loss(*_views(x, H, D), spans), x),
        reference=_step(lambda x: reference.global_pointer_loss(*_views(x, H, D), spans), x),
        peers=peers,
        max_error=_max_error(x, H, D, spans),
        flops=3 * 2 * B * H * L * L * D,
        note="; ".join(filter(None, [note, f"{P_SPANS} spans per (batch, head); flops = score GEMMs of the "
                                             "dense formulation, fwd + bwd (3 * 2 * B * H * L^2 * D)"])),
    )


def cases(device: str, quick: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    if quick:
        return [_case(4, 128, 9, 64, device, gen), _case(2, 256, 24, 64, device, gen, with_peer=False)]
    return [_case(16, 256, 9, 64, device, gen, "NER head (9 entity types)"),
            # the peer materializes the same (B, H, L, L) tensors as the reference: left out here to
            # keep the run short (it is compared at the first shape)
            _case(4, 512, 48, 64, device, gen, "GPLinker-sized head (48 relation heads): peak memory",
                  with_peer=False)]
