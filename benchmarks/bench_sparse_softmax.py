"""Sparse softmax top-k (SPACES) benchmark cases for benchmarks/run.py.

Providers: kxkernels (C++ on CPU, Triton on CUDA), the eager reference in
kxkernels/ops/sparse_softmax/reference.py, and the dense cross-entropy the sparse loss has to beat
(``F.cross_entropy``; Liger-Kernel's on CUDA when installed). A fwd+bwd step is
``loss.backward()`` on a leaf ``x`` followed by ``x.grad = None``, so every provider allocates and
frees its own gradient inside the timed step, as a training loop with ``zero_grad()`` (set_to_none)
does. Each case's ``bytes`` is what it must move at least; benchmarks/run.py divides it by the stream
probe of the same run to give the bandwidth floor.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

import kxkernels
from benchmarks.harness import Case
from kxkernels.ops.sparse_softmax import reference

K = 10
VOCABS = (32000, 50257)
SOFTMAX_VOCAB = 32000
ERROR_ROWS = 256                   # rows of the float64 reference in max_error


# ---- one measured step per provider ---------------------------------------------------------------
def _ce_step(loss_fn, x, t, backward):
    if not backward:
        x = x.detach()                 # no autograd graph: the inference cost alone
        return lambda: loss_fn(x, t, K)

    def step():
        loss_fn(x, t, K).backward()
        x.grad = None
    return step


def _dense_ce(x, t, k):
    return F.cross_entropy(x, t)


def _softmax_step(softmax_fn, x, grad_out):
    def step():
        softmax_fn(x, K).backward(grad_out)
        x.grad = None
    return step


def _dense_softmax(x, k):
    return torch.softmax(x, dim=-1)


def _liger_ce(device):
    """Liger's cross entropy when it can run here, else None. It writes the gradient into its
    input during the forward, so it gets a private copy of the logits (see _ce_peers)."""
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerCrossEntropyLoss()
    return lambda x, t, k: loss(x, t)


# ---- accuracy against float64 ---------------------------------------------------------------------
def _ce_error(x, t, backward):
    """Max abs difference of per-row losses (and of the gradient of their sum) between kxkernels
    on the float32 logits and the reference on the same values in float64, first ERROR_ROWS rows."""
    def max_error():
        xs, ts = x.detach()[:ERROR_ROWS], t[:ERROR_ROWS]
        a = xs.clone().requires_grad_(backward)
        b = xs.double().requires_grad_(backward)
        la = kxkernels.sparse_softmax_cross_entropy(a, ts, K, reduction="none")
        lb = reference.sparse_softmax_cross_entropy(b, ts, K, reduction="none")
        err = (la.double() - lb).abs().max().item()
        if backward:
            la.sum().backward()
            lb.sum().backward()
            err = max(err, (a.grad.double() - b.grad).abs().max().item())
        return err
    return max_error


def _softmax_error(x, grad_out):
    def max_error():
        xs, gs = x.detach()[:ERROR_ROWS], grad_out[:ERROR_ROWS]
        a, b = xs.clone().requires_grad_(), xs.double().requires_grad_()
        pa, pb = kxkernels.sparse_softmax(a, K), reference.sparse_softmax(b, K)
        pa.backward(gs)
        pb.backward(gs.double())
        return max((pa.double() - pb).abs().max().item(), (a.grad.double() - b.grad).abs().max().item())
    return max_error


# ---- cases ----------------------------------------------------------------------------------------
def _bandwidth_note(nbytes, device, what):
    return (f"bytes = {what} = {nbytes / 1e6:.0f} MB; the floor is bytes / the stream probe's rate in this "
            "run (column kx / bandwidth floor)")


def _ce_peers(x, t, device, backward):
    peers = {"torch.nn.functional.cross_entropy": _ce_step(_dense_ce, x, t, backward)}
    liger = _liger_ce(device)
    if liger is not None:
        # private copy: Liger overwrites its input with the gradient (dense work, values don't matter)
        peers["liger_kernel LigerCrossEntropyLoss"] = _ce_step(
            liger, x.detach().clone().requires_grad_(backward), t, backward)
    return peers


def _ce_cases(x, t, device, shape, extra_note="", directions=(True, False)):
    n, v = x.shape
    item = x.element_size()
    out = []
    for backward in directions:
        nbytes = item * n * v * (2 if backward else 1)
        what = (f"logits read once + gradient written once ({item}*N*V*2)" if backward
                else f"logits read once ({item}*N*V)")
        out.append(Case(
            op="sparse_softmax_cross_entropy " + ("fwd+bwd" if backward else "fwd"),
            shape=shape, dtype=str(x.dtype).removeprefix("torch."), device=device,
            kx=_ce_step(kxkernels.sparse_softmax_cross_entropy, x, t, backward),
            reference=_ce_step(reference.sparse_softmax_cross_entropy, x, t, backward),
            peers=_ce_peers(x, t, device, backward),
            max_error=_ce_error(x, t, backward),
            bytes=nbytes,
            note="; ".join(filter(None, [extra_note, _bandwidth_note(nbytes, device, what)])),
        ))
    return out


def _real_cases(n, device, dtypes):
    from benchmarks.real_data import RealDataUnavailable, minilm_logits
    # KX_STS_TSV: the STS file when ../shared/data is not beside the checkout (a git worktree)
    path = {"path": os.environ["KX_STS_TSV"]} if os.environ.get("KX_STS_TSV") else {}
    try:
        x32, t = minilm_logits(n, target="next", device=device, **path)
    except RealDataUnavailable as e:
        warnings.warn(f"sparse_softmax: skipping the real-logits case: {e}")
        return []
    out = []
    for dtype in dtypes:
        x = x32.detach().to(dtype).requires_grad_()  # a leaf of its own per dtype (not a view of x32's graph)
        note = ("real logits: all-MiniLM-L6-v2 hidden states of sts-forums.tsv sentences @ its word "
                f"embeddings (V=30522), target = the NEXT token id ([SEP] after the last word), {x.shape[0]} tokens")
        out += _ce_cases(x, t, device, f"N={x.shape[0]} V={x.shape[1]} k={K} (MiniLM)", note, directions=(True,))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    """CE fwd+bwd and fwd at N=4096 (1024 quick) for V=32000 and 50257 in float32; CE fwd+bwd in
    bfloat16 at V=32000; sparse_softmax fwd+bwd at V=32000; CE fwd+bwd on the real MiniLM logits
    (V=30522) in float32 and bfloat16."""
    n = 1024 if quick else 4096
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in VOCABS:
        x = torch.randn(n, v, generator=gen).to(device).requires_grad_()
        t = torch.randint(v, (n,), generator=gen).to(device)
        out += _ce_cases(x, t, device, f"N={n} V={v} k={K}")
        if v == SOFTMAX_VOCAB:
            xb = x.detach().to(torch.bfloat16).requires_grad_()
            out += _ce_cases(xb, t, device, f"N={n} V={v} k={K}", directions=(True,))
            grad_out = torch.randn(n, v, generator=gen).to(device)
            nbytes = 4 * n * v * 4
            out.append(Case(
                op="sparse_softmax fwd+bwd", shape=f"N={n} V={v} k={K}", dtype="float32", device=device,
                kx=_softmax_step(kxkernels.sparse_softmax, x, grad_out),
                reference=_softmax_step(reference.sparse_softmax, x, grad_out),
                peers={"torch.softmax (dense)": _softmax_step(_dense_softmax, x, grad_out)},
                max_error=_softmax_error(x, grad_out),
                bytes=nbytes,
                note=_bandwidth_note(nbytes, device, "x read, probs written, grad_out read, grad written "
                                                     "(4*N*V*4)"),
            ))
    return out + _real_cases(n, device, (torch.float32, torch.bfloat16))
