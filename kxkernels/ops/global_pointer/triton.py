"""Triton kernels for GlobalPointer and the ZLPR loss (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Same contract as the C++ CPU kernels in csrc/cpu/global_pointer.cpp (the schemas of
``torch.ops.kxkernels.global_pointer_*`` / ``*multilabel_categorical_crossentropy_*``); the eager
math is in ./reference.py.

- Scores: one program per (batch * head, row block, column block). q and k tiles are loaded with
  their RoPE pair channel (``d ^ 1`` interleaved, ``d +- D/2`` halves) and rotated in registers at
  angles ``m * theta_i`` formed in float32 from the integer position (``theta`` is a float32 table
  from the host, as the CPU kernels use); the tile product is a float32 ``tl.dot`` (IEEE, no TF32).
- Backward (scores and fused loss): a dq pass (one program per row block, looping over the column
  blocks) and a dk pass (one per column block, looping over rows), each recomputing its tiles, no
  atomics. The gradient of the rotation, ``R^T``, needs the gradient at the pair channel: each pass
  keeps a second accumulator against the pair-permuted rotated tile.
- Fused loss: each (batch * head, row block) program keeps two streaming log-sum-exps (negatives,
  positives) per row as running max and sum and writes one (max, sum) pair of each; the host
  combines the ``L / BLOCK_M`` partials per (batch, head) with the ``1 +`` term. Positives are told
  apart exactly: the spans become sorted, deduplicated cell ids ``i * L + j`` per (batch, head) with
  a row index (``row_start``, O(B * H * L)); a tile compares its columns against each row's
  positives. Memory O(B * H * L), never O(B * H * L * L).
- Row-wise ZLPR (dense, sparse): ``BLOCK_M`` rows per program, streamed over the columns in chunks
  of ``BLOCK_N`` with per-row running max / sum.

Math in float32: float16 / bfloat16 inputs are loaded and converted; outputs in the input dtype
(the bias gradients and row losses in float32). Offsets are int64.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kxkernels.ops._triton.launch import new_output

# (BLOCK_M, BLOCK_N, num_warps) the launchers choose from (see _pick_config); every kernel of this
# module takes BLOCK_M and BLOCK_N, and tests/triton/_aot.py compiles each at each config.
TUNING_CONFIGS = (
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
)
MIN_BLOCK_D = 16  # tl.dot needs every tile dimension >= 16


def _pick_config(L: int) -> dict:
    # (128 x 64 tiles at 8 warps with D = 64 need more shared memory than sm_80 gives: not offered)
    return TUNING_CONFIGS[0] if L <= 64 else TUNING_CONFIGS[1]


def _pick_row_config(C: int) -> dict:
    return TUNING_CONFIGS[0] if C <= 64 else TUNING_CONFIGS[1]


def _block_d(D: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(D))


# ---- device helpers -----------------------------------------------------------------------------
@triton.jit
def _rope_factors(idx, theta_ptr, D, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """cos, sin (len(idx) x BLOCK_D) of position idx at each channel, the pair channel of each
    channel, and the sign of its partner term: x' = x cos + sgn * x[pair] sin."""
    d = tl.arange(0, BLOCK_D)
    half = D // 2
    if INTERLEAVED:
        pair = d ^ 1
        p = d // 2
        sgn = tl.where(d % 2 == 0, -1.0, 1.0)
    else:
        pair = tl.where(d < half, d + half, d - half)
        p = tl.where(d < half, d, d - half)
        sgn = tl.where(d < half, -1.0, 1.0)
    theta = tl.load(theta_ptr + p, mask=d < D, other=0.0)
    angle = idx.to(tl.float32)[:, None] * theta[None, :]
    return tl.cos(angle), tl.sin(angle), pair, sgn


@triton.jit
def _load_rotated(ptr, s_l, s_d, idx, L, theta_ptr, D, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """Rows idx of one (batch, head) of x, rotated: (x', x' at the pair channel), float32."""
    d = tl.arange(0, BLOCK_D)
    m2 = (idx < L)[:, None] & (d < D)[None, :]
    rows = idx.to(tl.int64)[:, None] * s_l
    x = tl.load(ptr + rows + d[None, :] * s_d, mask=m2, other=0.0).to(tl.float32)
    if ROPE:
        c, s, pair, sgn = _rope_factors(idx, theta_ptr, D, BLOCK_D, INTERLEAVED)
        xp = tl.load(ptr + rows + pair[None, :] * s_d, mask=m2, other=0.0).to(tl.float32)
        xr = x * c + sgn[None, :] * xp * s
        xr_pair = xp * c - sgn[None, :] * x * s
    else:
        xr = x
        xr_pair = x
    return xr, xr_pair


@triton.jit
def _store_unrotated(ptr, acc, acc_pair, idx, L, theta_ptr, D, scale, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
                     INTERLEAVED: tl.constexpr):
    """ptr[idx] = scale * R^T acc (contiguous rows of D), acc_pair = acc at the pair channels."""
    d = tl.arange(0, BLOCK_D)
    m2 = (idx < L)[:, None] & (d < D)[None, :]
    if ROPE:
        c, s, pair, sgn = _rope_factors(idx, theta_ptr, D, BLOCK_D, INTERLEAVED)
        g = acc * c - sgn[None, :] * acc_pair * s
    else:
        g = acc
    g = g * scale
    tl.store(ptr + idx.to(tl.int64)[:, None] * D + d[None, :], g.to(ptr.dtype.element_ty), mask=m2)


@triton.jit
def _valid(rows, cols, b, L, mask_ptr, HAS_MASK: tl.constexpr, TRIL: tl.constexpr):
    """Cells (rows x cols) that are scored: in range, both tokens real, and j >= i under tril."""
    v = (rows < L)[:, None] & (cols < L)[None, :]
    if HAS_MASK:
        mr = tl.load(mask_ptr + b * L + rows, mask=rows < L, other=0)
        mc = tl.load(mask_ptr + b * L + cols, mask=cols < L, other=0)
        v = v & (mr != 0)[:, None] & (mc != 0)[None, :]
    if TRIL:
        v = v & (cols[None, :] >= rows[:, None])
    return v


@triton.jit
def _biased(s, rows, cols, bh, L, sb_ptr, eb_ptr, HAS_SB: tl.constexpr, HAS_EB: tl.constexpr):
    if HAS_SB:
        s += tl.load(sb_ptr + bh * L + rows, mask=rows < L, other=0.0)[:, None]
    if HAS_EB:
        s += tl.load(eb_ptr + bh * L + cols, mask=cols < L, other=0.0)[None, :]
    return s


@triton.jit
def _positive_cells(cells_ptr, row_start_ptr, bh, P, rows, cols, L, max_per_row, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """int32 (rows x cols): 1 where the cell (i, j) is one of the positives of (batch, head) bh.
    cells (B*H, P): sorted, deduplicated ids i * L + j; row_start (B*H, L + 1) indexes them by row."""
    rmask = rows < L
    start = tl.load(row_start_ptr + bh * (L + 1) + rows, mask=rmask, other=0)
    count = tl.load(row_start_ptr + bh * (L + 1) + rows + 1, mask=rmask, other=0) - start
    is_pos = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for u in range(0, max_per_row):
        has = rmask & (count > u)
        cell = tl.load(cells_ptr + bh * P + start + u, mask=has, other=-1)
        col = tl.where(has, cell - rows.to(tl.int64) * L, -1)
        is_pos = is_pos | (cols[None, :].to(tl.int64) == col[:, None]).to(tl.int32)
    return is_pos


# ---- scores -------------------------------------------------------------------------------------
@triton.jit
def _gp_fwd_kernel(q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, ks3, mask_ptr, sb_ptr, eb_ptr, theta_ptr,
                   out_ptr, H, L, D, scale, HAS_MASK: tl.constexpr, HAS_SB: tl.constexpr, HAS_EB: tl.constexpr,
                   ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, TRIL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    qr, _ = _load_rotated(q_ptr + b * qs0 + h * qs1, qs2, qs3, rows, L, theta_ptr, D, BLOCK_D, ROPE, INTERLEAVED)
    kr, _ = _load_rotated(k_ptr + b * ks0 + h * ks1, ks2, ks3, cols, L, theta_ptr, D, BLOCK_D, ROPE, INTERLEAVED)
    s = tl.dot(qr, tl.trans(kr), input_precision="ieee") * scale
    s = _biased(s, rows, cols, bh, L, sb_ptr, eb_ptr, HAS_SB, HAS_EB)
    v = _valid(rows, cols, b, L, mask_ptr, HAS_MASK, TRIL)
    s = tl.where(v, s, float("-inf"))
    inb = (rows < L)[:, None] & (cols < L)[None, :]
    offs = bh * L * L + rows.to(tl.int64)[:, None] * L + cols[None, :]
    tl.store(out_ptr + offs, s.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _gp_bwd_dq_kernel(g_ptr, gs0, gs1, gs2, gs3, k_ptr, ks0, ks1, ks2, ks3, mask_ptr, theta_ptr, dq_ptr, dsb_ptr,
                      H, L, D, scale, HAS_MASK: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                      TRIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    m0 = tl.program_id(1) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_pair = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    g_base = g_ptr + b * gs0 + h * gs1
    start = 0
    if TRIL:
        start = m0
    for n0 in range(start, L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kr, kp = _load_rotated(k_ptr + b * ks0 + h * ks1, ks2, ks3, cols, L, theta_ptr, D, BLOCK_D, ROPE,
                               INTERLEAVED)
        v = _valid(rows, cols, b, L, mask_ptr, HAS_MASK, TRIL)
        g = tl.load(g_base + rows.to(tl.int64)[:, None] * gs2 + cols[None, :] * gs3, mask=v, other=0.0)
        g = tl.where(v, g.to(tl.float32), 0.0)
        acc += tl.dot(g, kr, input_precision="ieee")
        acc_pair += tl.dot(g, kp, input_precision="ieee")
        row_sum += tl.sum(g, axis=1)
    _store_unrotated(dq_ptr + bh * L * D, acc, acc_pair, rows, L, theta_ptr, D, scale, BLOCK_D, ROPE, INTERLEAVED)
    tl.store(dsb_ptr + bh * L + rows, row_sum, mask=rows < L)


@triton.jit
def _gp_bwd_dk_kernel(g_ptr, gs0, gs1, gs2, gs3, q_ptr, qs0, qs1, qs2, qs3, mask_ptr, theta_ptr, dk_ptr, deb_ptr,
                      H, L, D, scale, HAS_MASK: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                      TRIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_pair = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    col_sum = tl.zeros([BLOCK_N], tl.float32)
    g_base = g_ptr + b * gs0 + h * gs1
    stop = L
    if TRIL:
        stop = tl.minimum(n0 + BLOCK_N, L)
    for m0 in range(0, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        qr, qp = _load_rotated(q_ptr + b * qs0 + h * qs1, qs2, qs3, rows, L, theta_ptr, D, BLOCK_D, ROPE,
                               INTERLEAVED)
        v = _valid(rows, cols, b, L, mask_ptr, HAS_MASK, TRIL)
        g = tl.load(g_base + rows.to(tl.int64)[:, None] * gs2 + cols[None, :] * gs3, mask=v, other=0.0)
        g = tl.where(v, g.to(tl.float32), 0.0)
        gt = tl.trans(g)
        acc += tl.dot(gt, qr, input_precision="ieee")
        acc_pair += tl.dot(gt, qp, input_precision="ieee")
        col_sum += tl.sum(g, axis=0)
    _store_unrotated(dk_ptr + bh * L * D, acc, acc_pair, cols, L, theta_ptr, D, scale, BLOCK_D, ROPE, INTERLEAVED)
    tl.store(deb_ptr + bh * L + cols, col_sum, mask=cols < L)


# ---- fused GlobalPointer + ZLPR -----------------------------------------------------------------
@triton.jit
def _gpl_fwd_kernel(q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, ks3, mask_ptr, sb_ptr, eb_ptr, theta_ptr,
                    cells_ptr, row_start_ptr, P, max_per_row, part_ptr, H, L, D, scale, NB,
                    HAS_MASK: tl.constexpr, HAS_SB: tl.constexpr, HAS_EB: tl.constexpr, ROPE: tl.constexpr,
                    INTERLEAVED: tl.constexpr, TRIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    pid_m = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    qr, _ = _load_rotated(q_ptr + b * qs0 + h * qs1, qs2, qs3, rows, L, theta_ptr, D, BLOCK_D, ROPE, INTERLEAVED)
    # per-row running (max, sum) of the negatives' e^s and the positives' e^-s; the max starts at 0
    m_neg = tl.zeros([BLOCK_M], tl.float32)
    s_neg = tl.zeros([BLOCK_M], tl.float32)
    m_pos = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    start = 0
    if TRIL:
        start = m0
    for n0 in range(start, L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kr, _ = _load_rotated(k_ptr + b * ks0 + h * ks1, ks2, ks3, cols, L, theta_ptr, D, BLOCK_D, ROPE,
                              INTERLEAVED)
        s = tl.dot(qr, tl.trans(kr), input_precision="ieee") * scale
        s = _biased(s, rows, cols, bh, L, sb_ptr, eb_ptr, HAS_SB, HAS_EB)
        v = _valid(rows, cols, b, L, mask_ptr, HAS_MASK, TRIL)
        pos = _positive_cells(cells_ptr, row_start_ptr, bh, P, rows, cols, L, max_per_row, BLOCK_M, BLOCK_N)
        tn = tl.where(v & (pos == 0), s, float("-inf"))
        tp = tl.where(v & (pos != 0), -s, float("-inf"))
        mn = tl.maximum(m_neg, tl.max(tn, axis=1))
        s_neg = s_neg * tl.exp(m_neg - mn) + tl.sum(tl.exp(tn - mn[:, None]), axis=1)
        m_neg = mn
        mp = tl.maximum(m_pos, tl.max(tp, axis=1))
        s_pos = s_pos * tl.exp(m_pos - mp) + tl.sum(tl.exp(tp - mp[:, None]), axis=1)
        m_pos = mp
    # one (max, sum) per program for each term
    Mn = tl.max(m_neg, axis=0)
    Sn = tl.sum(s_neg * tl.exp(m_neg - Mn), axis=0)
    Mp = tl.max(m_pos, axis=0)
    Sp = tl.sum(s_pos * tl.exp(m_pos - Mp), axis=0)
    out = part_ptr + (bh * NB + pid_m) * 4
    tl.store(out, Mn)
    tl.store(out + 1, Sn)
    tl.store(out + 2, Mp)
    tl.store(out + 3, Sp)


@triton.jit
def _gpl_cells_grad(s, v, pos, g, ln, lp):
    """d loss / d s: e^{s - lse_neg} at a negative cell, -e^{-s - lse_pos} at a positive one, times g
    (pos: int32, non-zero at the positives)."""
    neg = tl.where(v & (pos == 0), tl.exp(tl.where(v, s, 0.0) - ln), 0.0)
    pss = tl.where(v & (pos != 0), tl.exp(-tl.where(v, s, 0.0) - lp), 0.0)
    return g * (neg - pss)


@triton.jit
def _gpl_bwd_dq_kernel(grad_ptr, lse_neg_ptr, lse_pos_ptr, q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, ks3,
                       mask_ptr, sb_ptr, eb_ptr, theta_ptr, cells_ptr, row_start_ptr, P, max_per_row, dq_ptr, dsb_ptr,
                       H, L, D, scale, HAS_MASK: tl.constexpr, HAS_SB: tl.constexpr, HAS_EB: tl.constexpr,
                       ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, TRIL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    m0 = tl.program_id(1) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    g = tl.load(grad_ptr + bh)
    ln = tl.load(lse_neg_ptr + bh)
    lp = tl.load(lse_pos_ptr + bh)
    qr, _ = _load_rotated(q_ptr + b * qs0 + h * qs1, qs2, qs3, rows, L, theta_ptr, D, BLOCK_D, ROPE, INTERLEAVED)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_pair = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    start = 0
    if TRIL:
        start = m0
    for n0 in range(start, L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kr, kp = _load_rotated(k_ptr + b * ks0 + h * ks1, ks2, ks3, cols, L, theta_ptr, D, BLOCK_D, ROPE,
                               INTERLEAVED)
        s = tl.dot(qr, tl.trans(kr), input_precision="ieee") * scale
        s = _biased(s, rows, cols, bh, L, sb_ptr, eb_ptr, HAS_SB, HAS_EB)
        v = _valid(rows, cols, b, L, mask_ptr, HAS_MASK, TRIL)
        pos = _positive_cells(cells_ptr, row_start_ptr, bh, P, rows, cols, L, max_per_row, BLOCK_M, BLOCK_N)
        ds = _gpl_cells_grad(s, v, pos, g, ln, lp)
        acc += tl.dot(ds, kr, input_precision="ieee")
        acc_pair += tl.dot(ds, kp, input_precision="ieee")
        row_sum += tl.sum(ds, axis=1)
    _store_unrotated(dq_ptr + bh * L * D, acc, acc_pair, rows, L, theta_ptr, D, scale, BLOCK_D, ROPE, INTERLEAVED)
    tl.store(dsb_ptr + bh * L + rows, row_sum, mask=rows < L)


@triton.jit
def _gpl_bwd_dk_kernel(grad_ptr, lse_neg_ptr, lse_pos_ptr, q_ptr, qs0, qs1, qs2, qs3, k_ptr, ks0, ks1, ks2, ks3,
                       mask_ptr, sb_ptr, eb_ptr, theta_ptr, cells_ptr, row_start_ptr, P, max_per_row, dk_ptr, deb_ptr,
                       H, L, D, scale, HAS_MASK: tl.constexpr, HAS_SB: tl.constexpr, HAS_EB: tl.constexpr,
                       ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, TRIL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    g = tl.load(grad_ptr + bh)
    ln = tl.load(lse_neg_ptr + bh)
    lp = tl.load(lse_pos_ptr + bh)
    kr, _ = _load_rotated(k_ptr + b * ks0 + h * ks1, ks2, ks3, cols, L, theta_ptr, D, BLOCK_D, ROPE, INTERLEAVED)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_pair = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    col_sum = tl.zeros([BLOCK_N], tl.float32)
    stop = L
    if TRIL:
        stop = tl.minimum(n0 + BLOCK_N, L)
    for m0 in range(0, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        qr, qp = _load_rotated(q_ptr + b * qs0 + h * qs1, qs2, qs3, rows, L, theta_ptr, D, BLOCK_D, ROPE,
                               INTERLEAVED)
        s = tl.dot(qr, tl.trans(kr), input_precision="ieee") * scale
        s = _biased(s, rows, cols, bh, L, sb_ptr, eb_ptr, HAS_SB, HAS_EB)
        v = _valid(rows, cols, b, L, mask_ptr, HAS_MASK, TRIL)
        pos = _positive_cells(cells_ptr, row_start_ptr, bh, P, rows, cols, L, max_per_row, BLOCK_M, BLOCK_N)
        ds = _gpl_cells_grad(s, v, pos, g, ln, lp)
        dst = tl.trans(ds)
        acc += tl.dot(dst, qr, input_precision="ieee")
        acc_pair += tl.dot(dst, qp, input_precision="ieee")
        col_sum += tl.sum(ds, axis=0)
    _store_unrotated(dk_ptr + bh * L * D, acc, acc_pair, cols, L, theta_ptr, D, scale, BLOCK_D, ROPE, INTERLEAVED)
    tl.store(deb_ptr + bh * L + cols, col_sum, mask=cols < L)


# ---- row-wise ZLPR ------------------------------------------------------------------------------
@triton.jit
def _mcce_fwd_kernel(x_ptr, x_stride, y_ptr, y_stride, loss_ptr, lse_neg_ptr, lse_pos_ptr, bad_ptr, N, C,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    r64 = rows.to(tl.int64)
    m_neg = tl.zeros([BLOCK_M], tl.float32)
    s_neg = tl.zeros([BLOCK_M], tl.float32)
    m_pos = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    bad = tl.zeros([BLOCK_M], tl.int32)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        m2 = rm[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        y = tl.load(y_ptr + r64[:, None] * y_stride + cols[None, :], mask=m2, other=0).to(tl.float32)
        bad += tl.sum(tl.where(m2 & ((y >= 0.0) & (y <= 1.0)), 0, 1) * m2.to(tl.int32), axis=1)
        fin = x != float("-inf")
        wn = 1.0 - y
        # log(w) + s; where w = 0 the term is -inf (the log of the masked lanes is discarded)
        tn = tl.where(fin & (wn > 0.0), x + tl.log(tl.where(wn > 0.0, wn, 1.0)), float("-inf"))
        tp = tl.where(fin & (y > 0.0), -x + tl.log(tl.where(y > 0.0, y, 1.0)), float("-inf"))
        mn = tl.maximum(m_neg, tl.max(tn, axis=1))
        s_neg = s_neg * tl.exp(m_neg - mn) + tl.sum(tl.exp(tn - mn[:, None]), axis=1)
        m_neg = mn
        mp = tl.maximum(m_pos, tl.max(tp, axis=1))
        s_pos = s_pos * tl.exp(m_pos - mp) + tl.sum(tl.exp(tp - mp[:, None]), axis=1)
        m_pos = mp
    ln = m_neg + tl.log(tl.exp(-m_neg) + s_neg)
    lp = m_pos + tl.log(tl.exp(-m_pos) + s_pos)
    tl.store(lse_neg_ptr + rows, ln, mask=rm)
    tl.store(lse_pos_ptr + rows, lp, mask=rm)
    tl.store(loss_ptr + rows, ln + lp, mask=rm)
    tl.store(bad_ptr + rows, bad, mask=rm)


@triton.jit
def _mcce_bwd_kernel(g_ptr, x_ptr, x_stride, y_ptr, y_stride, lse_neg_ptr, lse_pos_ptr, out_ptr, N, C,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    r64 = rows.to(tl.int64)
    g = tl.load(g_ptr + rows, mask=rm, other=0.0)
    ln = tl.load(lse_neg_ptr + rows, mask=rm, other=0.0)
    lp = tl.load(lse_pos_ptr + rows, mask=rm, other=0.0)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        m2 = rm[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        y = tl.load(y_ptr + r64[:, None] * y_stride + cols[None, :], mask=m2, other=0).to(tl.float32)
        fin = x != float("-inf")
        xs = tl.where(fin, x, 0.0)
        wn = 1.0 - y
        dn = tl.where(fin & (wn > 0.0), wn * tl.exp(xs - ln[:, None]), 0.0)
        dp = tl.where(fin & (y > 0.0), y * tl.exp(-xs - lp[:, None]), 0.0)
        tl.store(out_ptr + r64[:, None] * C + cols[None, :], (g[:, None] * (dn - dp)).to(out_ptr.dtype.element_ty),
                 mask=m2)


@triton.jit
def _smcce_fwd_kernel(x_ptr, x_stride, pos_ptr, P, loss_ptr, lse_neg_ptr, lse_pos_ptr, N, C, MASK_ZERO: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """pos (N, P) int64: sorted, duplicates and padding (and 0 under mask_zero) replaced by -1."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    r64 = rows.to(tl.int64)
    m_neg = tl.zeros([BLOCK_M], tl.float32)
    s_neg = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        m2 = rm[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        is_pos = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for t in range(0, P):
            pt = tl.load(pos_ptr + r64 * P + t, mask=rm, other=-1)
            is_pos = is_pos | (cols[None, :].to(tl.int64) == pt[:, None]).to(tl.int32)
        keep = m2 & (is_pos == 0)
        if MASK_ZERO:
            keep = keep & (cols != 0)[None, :]
        tn = tl.where(keep, x, float("-inf"))
        mn = tl.maximum(m_neg, tl.max(tn, axis=1))
        s_neg = s_neg * tl.exp(m_neg - mn) + tl.sum(tl.exp(tn - mn[:, None]), axis=1)
        m_neg = mn
    m_pos = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    for t in range(0, P):
        pt = tl.load(pos_ptr + r64 * P + t, mask=rm, other=-1)
        ok = rm & (pt >= 0)
        xt = tl.load(x_ptr + r64 * x_stride + tl.where(ok, pt, 0), mask=ok, other=float("-inf")).to(tl.float32)
        tp = tl.where(ok & (xt != float("-inf")), -xt, float("-inf"))
        mp = tl.maximum(m_pos, tp)
        s_pos = s_pos * tl.exp(m_pos - mp) + tl.exp(tp - mp)
        m_pos = mp
    ln = m_neg + tl.log(tl.exp(-m_neg) + s_neg)
    lp = m_pos + tl.log(tl.exp(-m_pos) + s_pos)
    tl.store(lse_neg_ptr + rows, ln, mask=rm)
    tl.store(lse_pos_ptr + rows, lp, mask=rm)
    tl.store(loss_ptr + rows, ln + lp, mask=rm)


@triton.jit
def _smcce_bwd_kernel(g_ptr, x_ptr, x_stride, pos_ptr, P, lse_neg_ptr, lse_pos_ptr, out_ptr, N, C,
                      MASK_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    r64 = rows.to(tl.int64)
    g = tl.load(g_ptr + rows, mask=rm, other=0.0)
    ln = tl.load(lse_neg_ptr + rows, mask=rm, other=0.0)
    lp = tl.load(lse_pos_ptr + rows, mask=rm, other=0.0)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        m2 = rm[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        is_pos = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for t in range(0, P):
            pt = tl.load(pos_ptr + r64 * P + t, mask=rm, other=-1)
            is_pos = is_pos | (cols[None, :].to(tl.int64) == pt[:, None]).to(tl.int32)
        keep = m2 & (is_pos == 0) & (x != float("-inf"))
        if MASK_ZERO:
            keep = keep & (cols != 0)[None, :]
        xs = tl.where(keep, x, 0.0)
        dn = tl.where(keep, tl.exp(xs - ln[:, None]), 0.0)
        tl.store(out_ptr + r64[:, None] * C + cols[None, :], (g[:, None] * dn).to(out_ptr.dtype.element_ty), mask=m2)
    tl.debug_barrier()  # the positives' cells were written 0 above; overwrite them after
    for t in range(0, P):
        pt = tl.load(pos_ptr + r64 * P + t, mask=rm, other=-1)
        ok = rm & (pt >= 0)
        idx = tl.where(ok, pt, 0)
        xt = tl.load(x_ptr + r64 * x_stride + idx, mask=ok, other=float("-inf")).to(tl.float32)
        fin = xt != float("-inf")
        dp = tl.where(fin, -g * tl.exp(-tl.where(fin, xt, 0.0) - lp), 0.0)
        tl.store(out_ptr + r64 * C + idx, dp.to(out_ptr.dtype.element_ty), mask=ok)


# ---- host side ----------------------------------------------------------------------------------
def _theta(D: int, base: float, device) -> torch.Tensor:
    """theta_i = base ** (-2i / D) rounded to float32, as the CPU kernels' tables."""
    i = torch.arange(max(D // 2, 1), dtype=torch.float64)
    return (float(base) ** (-2.0 * i / D)).to(torch.float32).to(device)


def _mask_arg(mask, q):
    if mask is None:
        return torch.empty(1, dtype=torch.int8, device=q.device), False
    return mask.to(torch.int8).contiguous(), True


def _bias_arg(bias, q):
    if bias is None:
        return torch.empty(1, dtype=torch.float32, device=q.device), False
    return bias.to(torch.float32).contiguous(), True


def _checked_qk(q, k, rope, rope_base, scale, mask=None, start_bias=None, end_bias=None):
    from kxkernels.ops import global_pointer as gp  # the public checks (a direct call of the op)

    gp._check_qk(q, k, rope)
    gp._check_settings(rope_base, scale, q.shape[-1])
    gp._check_mask(mask, q)
    gp._check_bias(start_bias, q, "start_bias")
    gp._check_bias(end_bias, q, "end_bias")


def global_pointer_fwd(q, k, mask, start_bias, end_bias, rope, rope_base, interleaved, tril, scale):
    _checked_qk(q, k, rope, rope_base, scale, mask, start_bias, end_bias)
    B, H, L, D = q.shape
    cfg = _pick_config(L)
    out = new_output((B, H, L, L), q)
    m, has_m = _mask_arg(mask, q)
    sb, has_sb = _bias_arg(start_bias, q)
    eb, has_eb = _bias_arg(end_bias, q)
    grid = (B * H, triton.cdiv(L, cfg["BLOCK_M"]), triton.cdiv(L, cfg["BLOCK_N"]))
    _gp_fwd_kernel[grid](q, *q.stride(), k, *k.stride(), m, sb, eb, _theta(D, rope_base, q.device), out, H, L, D,
                         float(scale), HAS_MASK=has_m, HAS_SB=has_sb, HAS_EB=has_eb, ROPE=bool(rope),
                         INTERLEAVED=bool(interleaved), TRIL=bool(tril), BLOCK_D=_block_d(D), **cfg)
    return out


def global_pointer_bwd(grad, q, k, mask, rope, rope_base, interleaved, tril, scale):
    _checked_qk(q, k, rope, rope_base, scale, mask)
    B, H, L, D = q.shape
    if tuple(grad.shape) != (B, H, L, L):
        raise ValueError(f"grad must be (B, H, L, L) = {(B, H, L, L)}, got {tuple(grad.shape)}")
    cfg = _pick_config(L)
    dq, dk = new_output((B, H, L, D), q), new_output((B, H, L, D), q)
    dsb, deb = new_output((B, H, L), q, torch.float32), new_output((B, H, L), q, torch.float32)
    m, has_m = _mask_arg(mask, q)
    theta = _theta(D, rope_base, q.device)
    common = dict(HAS_MASK=has_m, ROPE=bool(rope), INTERLEAVED=bool(interleaved), TRIL=bool(tril),
                  BLOCK_D=_block_d(D), **cfg)
    _gp_bwd_dq_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_M"]))](
        grad, *grad.stride(), k, *k.stride(), m, theta, dq, dsb, H, L, D, float(scale), **common)
    _gp_bwd_dk_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_N"]))](
        grad, *grad.stride(), q, *q.stride(), m, theta, dk, deb, H, L, D, float(scale), **common)
    return dq, dk, dsb, deb


def positives_index(spans: torch.Tensor, L: int):
    """(cells (B*H, P) int64 sorted with duplicates and padding pushed to L*L, row_start (B*H, L+1)
    int64, the most positives of one row). Raises ValueError on a span out of range or start > end."""
    B, H, P, _ = spans.shape
    s = spans.to(torch.int64)
    i, j = s[..., 0], s[..., 1]
    pad = (i == -1) | (j == -1)
    bad_range = ((i < -1) | (j < -1) | (i >= L) | (j >= L)).any()
    bad_order = ((i > j) & ~pad).any()
    if bool(bad_range):
        raise ValueError(f"spans positions must be in [0, L={L}) (or -1 for padding)")
    if bool(bad_order):
        raise ValueError("spans must have start <= end")
    big = L * L
    cells = torch.where(pad, big, i * L + j).reshape(B * H, P)
    cells = cells.sort(dim=-1).values
    if P > 1:
        dup = torch.zeros_like(cells, dtype=torch.bool)
        dup[:, 1:] = cells[:, 1:] == cells[:, :-1]
        cells = cells.masked_fill(dup, big).sort(dim=-1).values
    bounds = (torch.arange(L + 1, device=spans.device, dtype=torch.int64) * L).expand(B * H, L + 1).contiguous()
    row_start = torch.searchsorted(cells.contiguous(), bounds)
    max_per_row = int((row_start[:, 1:] - row_start[:, :-1]).max()) if P else 0
    return cells.contiguous(), row_start.contiguous(), max_per_row


def _combine(part: torch.Tensor):
    """log(1 + sum) of per-block (max, sum) partials (B*H, NB): the 1 is e^0."""
    m, s = part[..., 0], part[..., 1]
    M = torch.clamp_min(m.max(dim=-1).values, 0.0)
    return M + torch.log(torch.exp(-M) + (s * torch.exp(m - M[:, None])).sum(-1))


def global_pointer_loss_fwd(q, k, spans, mask, start_bias, end_bias, rope, rope_base, interleaved, tril, scale):
    _checked_qk(q, k, rope, rope_base, scale, mask, start_bias, end_bias)
    from kxkernels.ops import global_pointer as gp

    gp._check_spans(spans, q)
    B, H, L, D = q.shape
    cells, row_start, max_per_row = positives_index(spans, L)
    cfg = _pick_config(L)
    NB = triton.cdiv(L, cfg["BLOCK_M"])
    part = torch.empty(B * H, NB, 4, dtype=torch.float32, device=q.device)
    m, has_m = _mask_arg(mask, q)
    sb, has_sb = _bias_arg(start_bias, q)
    eb, has_eb = _bias_arg(end_bias, q)
    _gpl_fwd_kernel[(B * H, NB)](
        q, *q.stride(), k, *k.stride(), m, sb, eb, _theta(D, rope_base, q.device), cells, row_start,
        cells.shape[1], max_per_row, part, H, L, D, float(scale), NB, HAS_MASK=has_m, HAS_SB=has_sb,
        HAS_EB=has_eb, ROPE=bool(rope), INTERLEAVED=bool(interleaved), TRIL=bool(tril), BLOCK_D=_block_d(D), **cfg)
    ln = _combine(part[..., 0:2]).reshape(B, H)
    lp = _combine(part[..., 2:4]).reshape(B, H)
    return ln + lp, ln, lp


def global_pointer_loss_bwd(grad_loss, q, k, spans, mask, start_bias, end_bias, lse_neg, lse_pos, rope, rope_base,
                            interleaved, tril, scale):
    _checked_qk(q, k, rope, rope_base, scale, mask, start_bias, end_bias)
    B, H, L, D = q.shape
    for name, t in (("grad_loss", grad_loss), ("lse_neg", lse_neg), ("lse_pos", lse_pos)):
        if tuple(t.shape) != (B, H):
            raise ValueError(f"{name} must be (B, H) = {(B, H)}, got {tuple(t.shape)}")
    cells, row_start, max_per_row = positives_index(spans, L)
    cfg = _pick_config(L)
    dq, dk = new_output((B, H, L, D), q), new_output((B, H, L, D), q)
    dsb, deb = new_output((B, H, L), q, torch.float32), new_output((B, H, L), q, torch.float32)
    m, has_m = _mask_arg(mask, q)
    sb, has_sb = _bias_arg(start_bias, q)
    eb, has_eb = _bias_arg(end_bias, q)
    theta = _theta(D, rope_base, q.device)
    g = grad_loss.to(torch.float32).contiguous()
    ln, lp = lse_neg.to(torch.float32).contiguous(), lse_pos.to(torch.float32).contiguous()
    common = dict(HAS_MASK=has_m, HAS_SB=has_sb, HAS_EB=has_eb, ROPE=bool(rope), INTERLEAVED=bool(interleaved),
                  TRIL=bool(tril), BLOCK_D=_block_d(D), **cfg)
    args = (g, ln, lp, q, *q.stride(), k, *k.stride(), m, sb, eb, theta, cells, row_start, cells.shape[1],
            max_per_row)
    _gpl_bwd_dq_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_M"]))](*args, dq, dsb, H, L, D, float(scale), **common)
    _gpl_bwd_dk_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_N"]))](*args, dk, deb, H, L, D, float(scale), **common)
    return dq, dk, dsb, deb


def _rows_of(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _labels_arg(labels, logits):
    if labels.dtype == torch.bool:
        return _rows_of(labels).view(torch.uint8)
    if labels.dtype != logits.dtype:
        raise TypeError(f"labels must be bool or the dtype of logits ({logits.dtype}), got {labels.dtype}")
    return _rows_of(labels)


def multilabel_categorical_crossentropy_fwd(logits, labels):
    if logits.dim() != 2 or tuple(labels.shape) != tuple(logits.shape):
        raise ValueError(f"logits (N, C) and labels of the same shape expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    x, y = _rows_of(logits), _labels_arg(labels, logits)
    N, C = x.shape
    cfg = _pick_row_config(C)
    loss, ln, lp = (new_output((N,), x, torch.float32) for _ in range(3))
    bad = torch.zeros(N, dtype=torch.int32, device=x.device)
    _mcce_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](x, x.stride(0), y, y.stride(0), loss, ln, lp, bad, N, C,
                                                        **cfg)
    if N and bool(bad.any()):
        raise ValueError("labels must be in [0, 1] (hard or soft), found a value outside (or NaN)")
    return loss, ln, lp


def multilabel_categorical_crossentropy_bwd(grad_loss, logits, labels, lse_neg, lse_pos):
    x, y = _rows_of(logits), _labels_arg(labels, logits)
    N, C = x.shape
    for name, t in (("grad_loss", grad_loss), ("lse_neg", lse_neg), ("lse_pos", lse_pos)):
        if tuple(t.shape) != (N,):
            raise ValueError(f"{name} must be (N,) = ({N},), got {tuple(t.shape)}")
    cfg = _pick_row_config(C)
    out = new_output((N, C), x)
    _mcce_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](
        grad_loss.float().contiguous(), x, x.stride(0), y, y.stride(0), lse_neg.float().contiguous(),
        lse_pos.float().contiguous(), out, N, C, **cfg)
    return out


def _positives_arg(pos_index, logits, mask_zero):
    """(N, P) int64, sorted, padding / duplicates / (mask_zero) zeros as -1; range-checked."""
    C = logits.shape[1]
    if pos_index.dim() != 2 or pos_index.shape[0] != logits.shape[0]:
        raise ValueError(f"pos_index must be (N, P) with N={logits.shape[0]}, got {tuple(pos_index.shape)}")
    p = pos_index.to(torch.int64)
    if p.numel() and bool(((p < -1) | (p >= C)).any()):
        raise ValueError(f"pos_index values must be in [0, C={C}) or -1 (padding)")
    if mask_zero:
        p = p.masked_fill(p == 0, -1)
    p = p.sort(dim=-1).values
    if p.shape[1] > 1:
        dup = torch.zeros_like(p, dtype=torch.bool)
        dup[:, 1:] = p[:, 1:] == p[:, :-1]
        p = p.masked_fill(dup, -1)
    return p.contiguous()


def sparse_multilabel_categorical_crossentropy_fwd(logits, pos_index, mask_zero):
    x = _rows_of(logits)
    N, C = x.shape
    p = _positives_arg(pos_index, x, mask_zero)
    cfg = _pick_row_config(C)
    loss, ln, lp = (new_output((N,), x, torch.float32) for _ in range(3))
    _smcce_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](x, x.stride(0), p, p.shape[1], loss, ln, lp, N, C,
                                                         MASK_ZERO=bool(mask_zero), **cfg)
    return loss, ln, lp


def sparse_multilabel_categorical_crossentropy_bwd(grad_loss, logits, pos_index, mask_zero, lse_neg, lse_pos):
    x = _rows_of(logits)
    N, C = x.shape
    p = _positives_arg(pos_index, x, mask_zero)
    cfg = _pick_row_config(C)
    out = new_output((N, C), x)
    _smcce_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](
        grad_loss.float().contiguous(), x, x.stride(0), p, p.shape[1], lse_neg.float().contiguous(),
        lse_pos.float().contiguous(), out, N, C, MASK_ZERO=bool(mask_zero), **cfg)
    return out
