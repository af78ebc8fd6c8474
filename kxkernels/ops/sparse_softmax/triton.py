"""Triton kernels for sparse softmax top-k (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Same semantics and output layout as the C++ CPU kernels in csrc/cpu/sparse_softmax.cpp (the
contract of ``torch.ops.kxkernels.sparse_softmax_*``); the eager math is in ./reference.py.

One program per row streams the vocabulary in blocks of ``BLOCK_V`` and keeps a running top-k in
registers: ``KP = next_power_of_2(k)`` slots, of which the first ``k`` are used. A block whose
best entry does not beat the current k-th (worst kept) entry is skipped after one max-reduction,
so after the first blocks a row costs one memory pass. Otherwise the block's best entry replaces
the worst kept one, repeatedly, until it no longer beats it. Entries are ordered by
(value desc, index asc), so ties at the k-th value keep the lower index. NaN logits count as
-inf for the selection and make the row's probabilities / lse / loss NaN (as on the CPU).
Empty slots start as -inf with indices above every real column, so a real -inf beats them and a
fully -inf row keeps columns 0..k-1. The kept set is sorted at the end by computing each slot's
rank (a KP x KP comparison), which bounds k by ``MAX_K``.

Math in float32: float16/bfloat16 logits are loaded and converted. Row offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 128  # the final rank sort compares KP x KP slot pairs in registers

# (BLOCK_V, num_warps) the launchers choose from (see _pick_config); tests/triton/_aot.py compiles
# every kernel at each of them.
TUNING_CONFIGS = (
    {"BLOCK_V": 1024, "num_warps": 4},
    {"BLOCK_V": 1024, "num_warps": 8},
    {"BLOCK_V": 2048, "num_warps": 4},
    {"BLOCK_V": 2048, "num_warps": 8},
    {"BLOCK_V": 4096, "num_warps": 4},
    {"BLOCK_V": 4096, "num_warps": 8},
)

_BIG_INDEX = tl.constexpr(2**62)  # index of an out-of-row or already-taken block entry


# ---- shared device helpers ----------------------------------------------------------------------
# Note _as_vector: a per-row flag that meets a [KP] vector is computed on the broadcast vector, never as
# a scalar comparison that is then broadcast: the Triton 3.9 interpreter gives such a splatted
# scalar i1 a float dtype and `vector_mask & flag` fails there (compiled code is the same either way).
@triton.jit
def _row_topk(x_row, out_row, n_cols, k, KP: tl.constexpr, BLOCK_V: tl.constexpr,
              ZERO_OUT: tl.constexpr):
    """Top-k of x_row[0:n_cols] as unsorted slots (kv, ki) plus a has-NaN flag.

    With ZERO_OUT, also writes zeros to out_row[0:n_cols] along the way (the caller must
    tl.debug_barrier() before scattering non-zeros into the same row).

    (bv, bi): the block's best entry, largest value then lowest index. (wv, wi): the worst kept
    entry, smallest value then highest index, the one to evict. Both are written out inline
    rather than as @triton.jit helpers: the interpreter re-patches the language on every helper
    call, which made the per-insert loop 10x slower there.
    """
    slot = tl.arange(0, KP)
    used = slot < k
    kv = tl.full([KP], float("-inf"), tl.float32)
    # placeholder indices sit above every real column: any real entry, even -inf, evicts them
    ki = (n_cols + slot).to(tl.int64)
    wv = tl.min(tl.where(used, kv, float("inf")), axis=0)
    wi = tl.max(tl.where(used & (kv == wv), ki, -1), axis=0)
    offs = tl.arange(0, BLOCK_V)
    nan_seen = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        inb = cols < n_cols
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        if ZERO_OUT:
            tl.store(out_row + cols, tl.zeros([BLOCK_V], tl.float32).to(out_row.dtype.element_ty),
                     mask=inb)
        is_nan = x != x
        nan_seen = tl.maximum(nan_seen, is_nan.to(tl.int32))
        x = tl.where(is_nan, float("-inf"), x)
        bv = tl.max(x, axis=0)
        if bv >= wv:  # else prune: nothing in this block beats the k-th kept value
            bidx = tl.where(inb, cols.to(tl.int64), _BIG_INDEX)
            bi = tl.min(tl.where(x == bv, bidx, _BIG_INDEX), axis=0)
            while (bv > wv) | ((bv == wv) & (bi < wi)):
                evict = used & (ki == wi)
                kv = tl.where(evict, bv, kv)
                ki = tl.where(evict, bi, ki)
                taken = bidx == bi
                x = tl.where(taken, float("-inf"), x)
                bidx = tl.where(taken, _BIG_INDEX, bidx)
                bv = tl.max(x, axis=0)
                bi = tl.min(tl.where(x == bv, bidx, _BIG_INDEX), axis=0)
                wv = tl.min(tl.where(used, kv, float("inf")), axis=0)
                wi = tl.max(tl.where(used & (kv == wv), ki, -1), axis=0)
    has_nan = tl.max(nan_seen, axis=0) > 0
    return kv, ki, has_nan


@triton.jit
def _slot_rank(kv, ki, used):
    """Position of each slot in (value desc, index asc) order among the used slots."""
    ahead = (kv[None, :] > kv[:, None]) | ((kv[None, :] == kv[:, None]) & (ki[None, :] < ki[:, None]))
    ahead = ahead & used[None, :]
    return tl.sum(ahead.to(tl.int32), axis=1)


@triton.jit
def _zero_row(out_row, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(out_row + cols, tl.zeros([BLOCK_V], tl.float32).to(out_row.dtype.element_ty),
                 mask=cols < V)


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def _sparse_softmax_fwd_kernel(x_ptr, x_row_stride, probs_ptr, index_ptr, V, k,
                               KP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    p_row = probs_ptr + row * V
    kv, ki, has_nan = _row_topk(x_row, p_row, V, k, KP, BLOCK_V, True)
    slot = tl.arange(0, KP)
    used = slot < k
    m = tl.max(tl.where(used, kv, float("-inf")), axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(used, tl.exp(kv - m_safe), 0.0), axis=0)
    lse = m_safe + tl.log(s)
    lse = tl.where(has_nan, float("nan"), lse)
    rank = _slot_rank(kv, ki, used)
    tl.store(index_ptr + row * k + rank, ki, mask=used)
    tl.debug_barrier()  # the zeros written during the scan land before the non-zeros
    # a fully -inf row (lse = -inf) stays all zeros
    lse_v = tl.zeros([KP], tl.float32) + lse  # compare as a vector, see _as_vector
    p = tl.exp(kv - lse_v)
    tl.store(p_row + ki, p.to(probs_ptr.dtype.element_ty), mask=used & (lse_v != float("-inf")))


@triton.jit
def _sparse_softmax_bwd_kernel(g_ptr, g_stride0, g_stride1, p_ptr, p_stride0, p_stride1,
                               index_ptr, index_stride0, index_stride1, out_ptr, V, k,
                               KP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * V
    _zero_row(out_row, V, BLOCK_V)
    slot = tl.arange(0, KP)
    used = slot < k
    ki = tl.load(index_ptr + row * index_stride0 + slot * index_stride1, mask=used, other=0)
    p = tl.load(p_ptr + row * p_stride0 + ki * p_stride1, mask=used, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride0 + ki * g_stride1, mask=used, other=0.0).to(tl.float32)
    dot = tl.sum(p * g, axis=0)
    tl.debug_barrier()  # zeros first
    tl.store(out_row + ki, (p * (g - dot)).to(out_ptr.dtype.element_ty), mask=used)


@triton.jit
def _sparse_softmax_ce_fwd_kernel(x_ptr, x_row_stride, target_ptr, target_stride, loss_ptr,
                                  lse_ptr, index_ptr, V, k, ignore_index, include_target,
                                  KP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    t = tl.load(target_ptr + row * target_stride).to(tl.int64)
    ignored = t == ignore_index
    n_cols = tl.where(ignored, 0, V)  # an ignored row scans nothing
    kv, ki, has_nan = _row_topk(x_row, x_row, n_cols, k, KP, BLOCK_V, False)
    slot = tl.arange(0, KP)
    used = slot < k
    x_t = tl.load(x_row + t, mask=~ignored, other=0.0).to(tl.float32)
    in_set = tl.sum((used & (ki == t)).to(tl.int32), axis=0) > 0
    extra = (include_target != 0) & (~in_set)  # the target joins the set
    m = tl.maximum(tl.max(tl.where(used, kv, float("-inf")), axis=0),
                   tl.where(extra, x_t, float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(used, tl.exp(kv - m_safe), 0.0), axis=0)
    s += tl.where(extra, tl.exp(x_t - m_safe), 0.0)
    lse = tl.where(m == float("-inf"), float("-inf"), m_safe + tl.log(s))
    lse = tl.where(has_nan, float("nan"), lse)
    # a row whose set is all -inf is fully masked: loss 0
    loss = tl.where(lse == float("-inf"), 0.0, lse - x_t)
    loss = tl.where(ignored, 0.0, loss)
    lse = tl.where(ignored, float("-inf"), lse)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    rank = _slot_rank(kv, ki, used)
    ignored_v = (tl.zeros([KP], tl.int64) + t) == ignore_index  # see _as_vector
    tl.store(index_ptr + row * k + rank, tl.where(ignored_v, -1, ki), mask=used)


@triton.jit
def _sparse_softmax_ce_bwd_kernel(grad_loss_ptr, grad_loss_stride, x_ptr, x_row_stride,
                                  target_ptr, target_stride, lse_ptr, lse_stride, index_ptr,
                                  index_stride0, index_stride1, out_ptr, V, k, ignore_index,
                                  include_target, KP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * V
    x_row = x_ptr + row * x_row_stride
    _zero_row(out_row, V, BLOCK_V)
    t = tl.load(target_ptr + row * target_stride).to(tl.int64)
    lse = tl.load(lse_ptr + row * lse_stride).to(tl.float32)
    active = (t != ignore_index) & (lse != float("-inf"))
    g = tl.load(grad_loss_ptr + row * grad_loss_stride, mask=active, other=0.0).to(tl.float32)
    slot = tl.arange(0, KP)
    active_v = (((tl.zeros([KP], tl.int64) + t) != ignore_index)  # see _as_vector
                & ((tl.zeros([KP], tl.float32) + lse) != float("-inf")))
    used = (slot < k) & active_v
    ki = tl.load(index_ptr + row * index_stride0 + slot * index_stride1, mask=used, other=-1)
    in_set = tl.sum((used & (ki == t)).to(tl.int32), axis=0) > 0
    others = used & (ki != t)  # the target's entry is written once, below
    x_k = tl.load(x_row + ki, mask=others, other=0.0).to(tl.float32)
    x_t = tl.load(x_row + t, mask=active, other=0.0).to(tl.float32)
    p_t = tl.where(in_set | (include_target != 0), tl.exp(x_t - lse), 0.0)
    tl.debug_barrier()  # zeros first
    tl.store(out_row + ki, (g * tl.exp(x_k - lse)).to(out_ptr.dtype.element_ty), mask=others)
    tl.store(out_row + t, (g * (p_t - 1.0)).to(out_ptr.dtype.element_ty), mask=active)


# ---- launchers (plain Python over tensors) ------------------------------------------------------
def _pick_config(vocab: int, k: int) -> dict:
    """BLOCK_V grows with the row (fewer loop trips); 8 warps for big blocks or a big rank sort."""
    if vocab <= 4096:
        block = 1024
    elif vocab <= 32768:
        block = 2048
    else:
        block = 4096
    warps = 8 if block == 4096 or k > 32 else 4
    return {"BLOCK_V": block, "num_warps": warps}


def _launch_args(vocab: int, k: int, config: dict | None) -> dict:
    """The constexprs and launch options of one call: KP, BLOCK_V, num_warps."""
    if k > MAX_K:
        raise ValueError(f"kxkernels (Triton sparse softmax): k={k} is above the maximum "
                         f"MAX_K={MAX_K} of the Triton kernels")
    if k < 1:
        raise ValueError(f"kxkernels (Triton sparse softmax): k must be >= 1, got {k}")
    cfg = dict(config) if config is not None else _pick_config(vocab, k)
    return {"KP": triton.next_power_of_2(k), **cfg}


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16 for the Triton kernels, "
                        f"got {logits.dtype}")
    # rows are streamed with unit column stride; other layouts are copied once
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _check_out(out: torch.Tensor, shape, dtype, device, name: str) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def sparse_softmax_forward(logits: torch.Tensor, k: int, *, out=None, config: dict | None = None):
    """Top-k sparse softmax of each row.

    Args:
        logits (torch.Tensor): scores of shape `[N, V]`, float32/float16/bfloat16.
        k (int): entries kept per row, ``1 <= k <= min(V, MAX_K)``.
        out (tuple, optional): preallocated ``(probs, topk_index)``, contiguous.
        config (dict, optional): ``{"BLOCK_V", "num_warps"}`` overriding the default choice.

    Returns:
        (probs `[N, V]` dtype of logits, topk_index `[N, k]` int64 sorted by value desc, index asc).
    """
    x = _check_logits(logits)
    n, vocab = x.shape
    meta = _launch_args(vocab, k, config)
    if out is None:
        probs = torch.empty((n, vocab), dtype=x.dtype, device=x.device)
        index = torch.empty((n, k), dtype=torch.int64, device=x.device)
    else:
        probs, index = out
        _check_out(probs, (n, vocab), x.dtype, x.device, "probs")
        _check_out(index, (n, k), torch.int64, x.device, "topk_index")
    if n > 0:
        _sparse_softmax_fwd_kernel[(n,)](x, x.stride(0), probs, index, vocab, k, **meta)
    return probs, index


def sparse_softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor, topk_index: torch.Tensor,
                            *, out=None, config: dict | None = None) -> torch.Tensor:
    """Gradient of sparse_softmax_forward: ``p * (g - <p, g>)`` on the top-k, zero elsewhere.

    Args:
        grad_probs (torch.Tensor): `[N, V]`, any strides (stride 0 included).
        probs (torch.Tensor): `[N, V]` forward output.
        topk_index (torch.Tensor): `[N, k]` int64 forward output.
        out (torch.Tensor, optional): preallocated contiguous `[N, V]` of probs' dtype.

    Returns:
        torch.Tensor: `[N, V]`, dtype of probs.
    """
    if probs.dim() != 2 or topk_index.dim() != 2 or tuple(grad_probs.shape) != tuple(probs.shape):
        raise ValueError(f"expected grad_probs and probs (N, V) and topk_index (N, k), got "
                         f"{tuple(grad_probs.shape)}, {tuple(probs.shape)}, {tuple(topk_index.shape)}")
    if topk_index.shape[0] != probs.shape[0]:
        raise ValueError("topk_index rows must match probs")
    n, vocab = probs.shape
    k = topk_index.shape[1]
    meta = _launch_args(vocab, k, config)
    if out is None:
        out = torch.empty((n, vocab), dtype=probs.dtype, device=probs.device)
    else:
        _check_out(out, (n, vocab), probs.dtype, probs.device, "out")
    if n > 0:
        _sparse_softmax_bwd_kernel[(n,)](
            grad_probs, grad_probs.stride(0), grad_probs.stride(1), probs, probs.stride(0),
            probs.stride(1), topk_index, topk_index.stride(0), topk_index.stride(1), out, vocab, k,
            **meta)
    return out


def _check_target(target: torch.Tensor, n: int, vocab: int, ignore_index: int, check_range=True) -> None:
    """Shape, dtype and range (one reduction and a sync: the kernels index logits by target;
    the backward skips the range, checked by its forward)."""
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    if not check_range:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if n > 0 and bool(bad.any()):
        raise ValueError(f"target values must be in [0, {vocab}) or ignore_index={ignore_index}; "
                         f"found {int(target[bad][0])}")


def sparse_softmax_cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, k: int,
                                         ignore_index: int, include_target: bool, *, out=None,
                                         config: dict | None = None):
    """Per-row ``logsumexp(top_k(x) [∪ {target}]) - x[target]``.

    Args:
        logits (torch.Tensor): `[N, V]`, float32/float16/bfloat16.
        target (torch.Tensor): `[N]` int64/int32 in ``[0, V)`` or ``ignore_index`` (ValueError otherwise).
        k (int): top-k size. ignore_index (int): rows skipped. include_target (bool): add the target.
        out (tuple, optional): preallocated ``(loss, lse, topk_index)``.

    Returns:
        (loss `[N]` float32, lse `[N]` float32, topk_index `[N, k]` int64). Ignored rows: loss 0,
        lse -inf, index -1; a row whose set is all -inf: loss 0, lse -inf.
    """
    x = _check_logits(logits)
    n, vocab = x.shape
    _check_target(target, n, vocab, ignore_index)
    meta = _launch_args(vocab, k, config)
    if out is None:
        loss = torch.empty((n,), dtype=torch.float32, device=x.device)
        lse = torch.empty((n,), dtype=torch.float32, device=x.device)
        index = torch.empty((n, k), dtype=torch.int64, device=x.device)
    else:
        loss, lse, index = out
        _check_out(loss, (n,), torch.float32, x.device, "loss")
        _check_out(lse, (n,), torch.float32, x.device, "lse")
        _check_out(index, (n, k), torch.int64, x.device, "topk_index")
    if n > 0:
        _sparse_softmax_ce_fwd_kernel[(n,)](x, x.stride(0), target, target.stride(0), loss, lse,
                                            index, vocab, k, int(ignore_index),
                                            int(bool(include_target)), **meta)
    return loss, lse, index


def sparse_softmax_cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor,
                                          target: torch.Tensor, lse: torch.Tensor,
                                          topk_index: torch.Tensor, ignore_index: int,
                                          include_target: bool, *, out=None,
                                          config: dict | None = None) -> torch.Tensor:
    """Gradient of the loss: ``g * exp(x - lse)`` on the top-k, ``g * (p_t - 1)`` at the target.

    ``p_t = exp(x_t - lse)`` when the target is in the top-k or ``include_target``, else 0.

    Args:
        grad_loss (torch.Tensor): `[N]` float32, any stride (0 included).
        logits, target, lse, topk_index: as given to / returned by the forward.
        out (torch.Tensor, optional): preallocated contiguous `[N, V]` of logits' dtype.

    Returns:
        torch.Tensor: `[N, V]`, dtype of logits; zero on ignored and fully masked rows.
    """
    x = _check_logits(logits)
    n, vocab = x.shape
    _check_target(target, n, vocab, ignore_index, check_range=False)
    if grad_loss.dim() != 1 or grad_loss.shape[0] != n or lse.dim() != 1 or lse.shape[0] != n:
        raise ValueError(f"grad_loss and lse must have shape ({n},), got "
                         f"{tuple(grad_loss.shape)} and {tuple(lse.shape)}")
    if topk_index.dim() != 2 or topk_index.shape[0] != n:
        raise ValueError(f"topk_index must be ({n}, k), got {tuple(topk_index.shape)}")
    k = topk_index.shape[1]
    meta = _launch_args(vocab, k, config)
    if out is None:
        out = torch.empty((n, vocab), dtype=x.dtype, device=x.device)
    else:
        _check_out(out, (n, vocab), x.dtype, x.device, "out")
    if n > 0:
        _sparse_softmax_ce_bwd_kernel[(n,)](
            grad_loss, grad_loss.stride(0), x, x.stride(0), target, target.stride(0), lse,
            lse.stride(0), topk_index, topk_index.stride(0), topk_index.stride(1), out, vocab, k,
            int(ignore_index), int(bool(include_target)), **meta)
    return out
