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
rank (a KP x KP comparison), which bounds that path to ``k <= MAX_K``.

Large k (``k > MAX_K``, up to V: the same k as the CPU ops accept): the row's k-th entry is found
by bisection on an order-preserving int32 key of the float bits (32 counting passes over the row,
then, when only some of the entries tied at the k-th value fit, ~log2 V more over the index,
so ties keep the lower index as on the CPU); the kept set ``key > t or (key == t and index <= cut)`` then gives the
softmax / logsumexp in two more passes, the probabilities and the kept indices (compacted in
index order with a prefix sum) in the last. The launcher orders topk_index by a stable sort of
the kept values (value desc, index asc). The backward kernels loop over topk_index in chunks of
``BLOCK_K``. This is the radix/threshold select of GPU top-k (e.g. Alabi et al., "Fast k-selection
algorithms for graphics processing units", 2012), done by bisection for simplicity.

Math in float32: float16/bfloat16 logits are loaded and converted. Row offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 128  # the register path's final rank sort compares KP x KP slot pairs; above: threshold select
BLOCK_K = 1024  # topk_index entries per step of the large-k backward kernels
_KEY_LO = tl.constexpr(-(2**31))  # the int32 key range the threshold bisection starts from
_KEY_HI = tl.constexpr(2**31 - 1)

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


# ---- large k: threshold select --------------------------------------------------------------------
@triton.jit
def _sort_key(x):
    """An int32 whose signed order is the float order of x, NaN as -inf and -0 as +0 (so equal
    values tie, as on the CPU)."""
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _row_threshold(x_row, n_cols, k, BLOCK_V: tl.constexpr):
    """(t, cut, row max, has-NaN) of x_row[0:n_cols]: the top-k set is {key > t} plus the entries
    with key == t and index <= cut (the lowest-index ties); t is the k-th largest key."""
    offs = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), tl.float32)
    nan_seen = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        nan_seen = tl.maximum(nan_seen, (x != x).to(tl.int32))
        mx = tl.maximum(mx, tl.max(tl.where(x != x, float("-inf"), x), axis=0))
    lo = tl.full([], _KEY_LO, tl.int64)  # count(key >= lo) >= k
    hi = tl.full([], _KEY_HI, tl.int64)  # count(key > hi) < k
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.zeros([], tl.int32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            inb = cols < n_cols
            key = _sort_key(tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)).to(tl.int64)
            cnt += tl.sum((inb & (key >= mid)).to(tl.int32), axis=0)
        big = cnt >= k
        lo = tl.where(big, mid, lo)
        hi = tl.where(big, hi, mid - 1)
    t = lo
    above = tl.zeros([], tl.int32)
    tied = tl.zeros([], tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        inb = cols < n_cols
        key = _sort_key(tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)).to(tl.int64)
        above += tl.sum((inb & (key > t)).to(tl.int32), axis=0)
        tied += tl.sum((inb & (key == t)).to(tl.int32), axis=0)
    need = k - above  # ties at t to keep, lowest index first
    # the smallest cut with count(key == t, index <= cut) >= need; every tie kept: no search
    chi = tl.full([], 0, tl.int64) + n_cols - 1
    clo = tl.where(tied == need, chi, tl.full([], 0, tl.int64))
    while clo < chi:
        cmid = (clo + chi) // 2
        cnt = tl.zeros([], tl.int32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            inb = (cols < n_cols) & (cols <= cmid)
            key = _sort_key(tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)).to(tl.int64)
            cnt += tl.sum((inb & (key == t)).to(tl.int32), axis=0)
        ok = cnt >= need
        chi = tl.where(ok, cmid, chi)
        clo = tl.where(ok, clo, cmid + 1)
    has_nan = tl.max(nan_seen, axis=0) > 0
    return t, clo, mx, has_nan


@triton.jit
def _kept(x, cols, inb, t, cut):
    key = _sort_key(x).to(tl.int64)
    return inb & ((key > t) | ((key == t) & (cols <= cut)))


@triton.jit
def _sparse_softmax_fwd_large_k_kernel(x_ptr, x_row_stride, probs_ptr, index_ptr, V, k,
                                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    p_row = probs_ptr + row * V
    t, cut, m, has_nan = _row_threshold(x_row, V, k, BLOCK_V)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    offs = tl.arange(0, BLOCK_V)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        keep = _kept(x, cols, inb, t, cut)
        s += tl.sum(tl.where(keep, tl.exp(x - m_safe), 0.0), axis=0)
    lse = m_safe + tl.log(s)
    lse = tl.where(has_nan, float("nan"), lse)
    lse_v = tl.zeros([BLOCK_V], tl.float32) + lse  # compare as a vector, see _as_vector
    base = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        keep = _kept(x, cols, inb, t, cut)
        # a fully -inf row (lse = -inf) stays all zeros
        p = tl.where(keep & (lse_v != float("-inf")), tl.exp(x - lse_v), 0.0)
        tl.store(p_row + cols, p.to(probs_ptr.dtype.element_ty), mask=inb)
        kept_i = keep.to(tl.int32)
        pos = base + tl.cumsum(kept_i, axis=0) - 1
        tl.store(index_ptr + row * k + pos, cols.to(tl.int64), mask=keep)
        base += tl.sum(kept_i, axis=0)


@triton.jit
def _sparse_softmax_ce_fwd_large_k_kernel(x_ptr, x_row_stride, target_ptr, target_stride, loss_ptr,
                                          lse_ptr, index_ptr, V, k, ignore_index, include_target,
                                          BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    t_idx = tl.load(target_ptr + row * target_stride).to(tl.int64)
    ignored = t_idx == ignore_index
    n_cols = tl.where(ignored, 0, V)  # an ignored row scans nothing
    t, cut, m, has_nan = _row_threshold(x_row, n_cols, k, BLOCK_V)
    x_t = tl.load(x_row + t_idx, mask=~ignored, other=0.0).to(tl.float32)
    key_t = _sort_key(x_t).to(tl.int64)
    in_set = (key_t > t) | ((key_t == t) & (t_idx <= cut))
    extra = (include_target != 0) & (~in_set) & (~ignored)  # the target joins the set
    m = tl.maximum(m, tl.where(extra, x_t, float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    offs = tl.arange(0, BLOCK_V)
    s = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        inb = cols < n_cols
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        s += tl.sum(tl.where(_kept(x, cols, inb, t, cut), tl.exp(x - m_safe), 0.0), axis=0)
    s += tl.where(extra, tl.exp(x_t - m_safe), 0.0)
    lse = tl.where(m == float("-inf"), float("-inf"), m_safe + tl.log(s))
    lse = tl.where(has_nan, float("nan"), lse)
    loss = tl.where(lse == float("-inf"), 0.0, lse - x_t)  # a set all -inf is fully masked: loss 0
    loss = tl.where(ignored, 0.0, loss)
    lse = tl.where(ignored, float("-inf"), lse)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    base = tl.zeros([], tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        inb = cols < n_cols
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        keep = _kept(x, cols, inb, t, cut)
        kept_i = keep.to(tl.int32)
        pos = base + tl.cumsum(kept_i, axis=0) - 1
        tl.store(index_ptr + row * k + pos, cols.to(tl.int64), mask=keep)
        base += tl.sum(kept_i, axis=0)
    # an ignored row: index -1 throughout
    ignored_v = (tl.zeros([BLOCK_V], tl.int64) + t_idx) == ignore_index  # see _as_vector
    for start in range(0, k, BLOCK_V):
        cols = start + offs
        tl.store(index_ptr + row * k + cols, tl.full([BLOCK_V], -1, tl.int64), mask=(cols < k) & ignored_v)


@triton.jit
def _sparse_softmax_bwd_large_k_kernel(g_ptr, g_stride0, g_stride1, p_ptr, p_stride0, p_stride1,
                                       index_ptr, index_stride0, index_stride1, out_ptr, V, k,
                                       BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * V
    _zero_row(out_row, V, BLOCK_V)
    offs = tl.arange(0, BLOCK_K)
    dot = tl.zeros([], tl.float32)
    for start in range(0, k, BLOCK_K):
        slot = start + offs
        used = slot < k
        ki = tl.load(index_ptr + row * index_stride0 + slot * index_stride1, mask=used, other=0)
        p = tl.load(p_ptr + row * p_stride0 + ki * p_stride1, mask=used, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_stride0 + ki * g_stride1, mask=used, other=0.0).to(tl.float32)
        dot += tl.sum(p * g, axis=0)
    tl.debug_barrier()  # zeros first
    for start in range(0, k, BLOCK_K):
        slot = start + offs
        used = slot < k
        ki = tl.load(index_ptr + row * index_stride0 + slot * index_stride1, mask=used, other=0)
        p = tl.load(p_ptr + row * p_stride0 + ki * p_stride1, mask=used, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_stride0 + ki * g_stride1, mask=used, other=0.0).to(tl.float32)
        tl.store(out_row + ki, (p * (g - dot)).to(out_ptr.dtype.element_ty), mask=used)


@triton.jit
def _sparse_softmax_ce_bwd_large_k_kernel(grad_loss_ptr, grad_loss_stride, x_ptr, x_row_stride,
                                          target_ptr, target_stride, lse_ptr, lse_stride, index_ptr,
                                          index_stride0, index_stride1, out_ptr, V, k, ignore_index,
                                          include_target, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * V
    x_row = x_ptr + row * x_row_stride
    _zero_row(out_row, V, BLOCK_V)
    t = tl.load(target_ptr + row * target_stride).to(tl.int64)
    lse = tl.load(lse_ptr + row * lse_stride).to(tl.float32)
    active = (t != ignore_index) & (lse != float("-inf"))
    g = tl.load(grad_loss_ptr + row * grad_loss_stride, mask=active, other=0.0).to(tl.float32)
    offs = tl.arange(0, BLOCK_K)
    active_v = (((tl.zeros([BLOCK_K], tl.int64) + t) != ignore_index)  # see _as_vector
                & ((tl.zeros([BLOCK_K], tl.float32) + lse) != float("-inf")))
    hits = tl.zeros([], tl.int32)
    for start in range(0, k, BLOCK_K):
        slot = start + offs
        used = (slot < k) & active_v
        ki = tl.load(index_ptr + row * index_stride0 + slot * index_stride1, mask=used, other=-1)
        hits += tl.sum((used & (ki == t)).to(tl.int32), axis=0)
    in_set = hits > 0
    x_t = tl.load(x_row + t, mask=active, other=0.0).to(tl.float32)
    p_t = tl.where(in_set | (include_target != 0), tl.exp(x_t - lse), 0.0)
    tl.debug_barrier()  # zeros first
    for start in range(0, k, BLOCK_K):
        slot = start + offs
        used = (slot < k) & active_v
        ki = tl.load(index_ptr + row * index_stride0 + slot * index_stride1, mask=used, other=-1)
        others = used & (ki != t)  # the target's entry is written once, below
        x_k = tl.load(x_row + ki, mask=others, other=0.0).to(tl.float32)
        tl.store(out_row + ki, (g * tl.exp(x_k - lse)).to(out_ptr.dtype.element_ty), mask=others)
    tl.store(out_row + t, (g * (p_t - 1.0)).to(out_ptr.dtype.element_ty), mask=active)


def _order_topk(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """topk_index of the large-k kernels (kept entries in index order) ordered by value desc, index
    asc: a stable sort of the kept values (NaN as -inf, as in the selection); rows of -1 stay."""
    vals = x.gather(1, index.clamp_min(0)).float()
    vals = torch.where(vals != vals, float("-inf"), vals)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return index.gather(1, order)


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
    """The constexprs and launch options of one call: KP (register path, k <= MAX_K) or BLOCK_K
    (large-k path), BLOCK_V, num_warps."""
    if not 1 <= k <= max(vocab, 1):
        raise ValueError(f"kxkernels (Triton sparse softmax): k must be in [1, V={vocab}], got k={k}")
    cfg = dict(config) if config is not None else _pick_config(vocab, min(k, MAX_K))
    if k > MAX_K:
        return {"BLOCK_K": BLOCK_K, **cfg}
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
        k (int): entries kept per row, ``1 <= k <= V`` (above ``MAX_K``: the threshold-select path).
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
    if n > 0 and k > MAX_K:
        meta.pop("BLOCK_K")
        _sparse_softmax_fwd_large_k_kernel[(n,)](x, x.stride(0), probs, index, vocab, k, **meta)
        index.copy_(_order_topk(x, index))
    elif n > 0:
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
    kernel = _sparse_softmax_bwd_large_k_kernel if k > MAX_K else _sparse_softmax_bwd_kernel
    if n > 0:
        kernel[(n,)](
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
    if n > 0 and k > MAX_K:
        meta.pop("BLOCK_K")
        _sparse_softmax_ce_fwd_large_k_kernel[(n,)](x, x.stride(0), target, target.stride(0), loss, lse,
                                                    index, vocab, k, int(ignore_index),
                                                    int(bool(include_target)), **meta)
        index.copy_(_order_topk(x, index))
    elif n > 0:
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
    kernel = _sparse_softmax_ce_bwd_large_k_kernel if k > MAX_K else _sparse_softmax_ce_bwd_kernel
    if n > 0:
        kernel[(n,)](
            grad_loss, grad_loss.stride(0), x, x.stride(0), target, target.stride(0), lse,
            lse.stride(0), topk_index, topk_index.stride(0), topk_index.stride(1), out, vocab, k,
            int(ignore_index), int(bool(include_target)), **meta)
    return out
