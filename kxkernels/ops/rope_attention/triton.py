"""Triton kernels for RoPE and fused RoPE attention (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Same semantics as the C++ CPU kernels (the contract of ``torch.ops.kxkernels.apply_rope_*`` and
``torch.ops.kxkernels.rope_attention_*``); the eager math is in ./reference.py.

RoPE (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021,
arXiv:2104.09864): channel pair ``(a, b)`` of frequency ``theta_i = base ** (-2i / rotary_dim)`` at
integer position ``m`` becomes ``a' = a cos(m theta_i) - b sin(m theta_i)``,
``b' = b cos(m theta_i) + a sin(m theta_i)``. Interleaved pairs are ``(2i, 2i+1)``, half pairs
``(i, i + rotary_dim/2)``; channels from ``rotary_dim`` on pass through. Angles are computed in
float32 from the integer positions inside the kernels (``tl.sin``/``tl.cos`` lower to libdevice's
``sinf``/``cosf``, which reduce large angles exactly).

Every head tile is handled in three column groups, each loaded (and stored) with its own pointer
block: ``A`` (the first channel of each rotated pair), ``B`` (its partner) and ``P`` (the
pass-through channels). Rotating a tile is then elementwise on ``(A, B)``, the scores are
``q_A k_A^T + q_B k_B^T + q_P k_P^T`` (three dots), and gradients accumulated in the rotated frame
are rotated back elementwise (by the negative angle) before they are stored: no register
permutation and no rotated copy of q or k is ever written.

Attention is flash-attention 2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", 2023, arXiv:2307.08691): the forward streams key blocks with an online
softmax in the base-2 domain and stores ``out`` and the natural-log ``lse`` per query row; key
blocks wholly above the (bottom-right aligned) causal diagonal are not visited. The backward
recomputes the rotated tiles: one kernel per key block accumulates ``dk, dv`` over every query
head of its GQA group (no atomics), another per query block accumulates ``dq``. A fully masked
row has ``out = 0``, ``lse = +inf``, and its probabilities are exactly 0 in the backward, so its
gradients are 0.

Dots take operands rounded to the input dtype with float32 accumulation (``LOWP_DOT``: on tensor
cores in that dtype). The Triton interpreter cannot multiply bfloat16 tiles, so under
TRITON_INTERPRET=1 the same rounded operands are converted back to float32 before the dot: the
math is the same, only the dot engine differs. float32 inputs use IEEE float32 dots (no TF32).
Batch and head offsets are int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kxkernels._checks import (check_bool_tensor, check_finite_number, check_floating, check_positive,
                               check_rank, check_same_device, resolve_rotary_dim)

_MIN_DOT = 16  # smallest tile dimension tl.dot accepts on NVIDIA GPUs
LOG2E = 1.4426950408889634
_LOG2E_K = tl.constexpr(LOG2E)  # the same constant as seen inside kernels

# Tuning configs each kernel's launcher chooses from (see _fwd_config, _bwd_config, _rope_config);
# tests/triton/_aot.py compiles every kernel at every config of its list.
FWD_CONFIGS = (
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},  # float16/bfloat16 rows
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},  # short query sequences
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},  # float32 (IEEE dots)
)
BWD_CONFIGS = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},  # float16/bfloat16
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},  # float32, short sequences
)
PRE_CONFIGS = ({"BLOCK_M": 64, "num_warps": 4},)
ROPE_CONFIGS = (
    {"BLOCK_L": 32, "num_warps": 4},
    {"BLOCK_L": 64, "num_warps": 8},
)
KERNEL_CONFIGS = {
    "_rope_kernel": ROPE_CONFIGS,
    "_rope_attn_fwd_kernel": FWD_CONFIGS,
    "_rope_attn_bwd_pre_kernel": PRE_CONFIGS,
    "_rope_attn_bwd_dkdv_kernel": BWD_CONFIGS,
    "_rope_attn_bwd_dq_kernel": BWD_CONFIGS,
}


# ---- shared device helpers ----------------------------------------------------------------------
@triton.jit
def _pair_cols(R, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Channel of each pair's first (A) and second (B) element, pair index, pair-valid mask."""
    i = tl.arange(0, HALF)
    if INTERLEAVED:
        ca = 2 * i
        cb = ca + 1
    else:
        ca = i
        cb = i + R // 2
    return ca, cb, i, i < R // 2


@triton.jit
def _cos_sin(pos, theta_ptr, i, pair_ok):
    """cos, sin of the float32 angles ``pos * theta_i`` as [len(pos), len(i)] tiles."""
    theta = tl.load(theta_ptr + i, mask=pair_ok, other=0.0)
    ang = pos.to(tl.float32)[:, None] * theta[None, :]
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _positions(pos_ptr, pos_sb, pos_sl, b, rows, rows_ok, default_start, HAS_POS: tl.constexpr):
    """Integer positions of ``rows`` of batch ``b``: from the (B, L) tensor, or default_start + row."""
    if HAS_POS:
        return tl.load(pos_ptr + b * pos_sb + rows.to(tl.int64) * pos_sl, mask=rows_ok, other=0)
    else:
        return (rows + default_start).to(tl.int64)


@triton.jit
def _load_tile(base, rows, row_stride, col_stride, rows_ok, cols, cols_ok):
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :] * col_stride
    return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(base, rows, row_stride, col_stride, rows_ok, cols, cols_ok, val):
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :] * col_stride
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def _operand(x, ELEM: tl.constexpr, LOWP_DOT: tl.constexpr):
    """A dot operand rounded to the input dtype (kept there for tensor cores when LOWP_DOT)."""
    y = x.to(ELEM)
    if not LOWP_DOT:
        y = y.to(tl.float32)
    return y


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_rotated(base, rows, row_stride, col_stride, rows_ok, pos, R, D, theta_ptr,
                  ELEM: tl.constexpr, LOWP_DOT: tl.constexpr, HALF: tl.constexpr,
                  PASS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows of a (L, D) head as rotated dot operands: (A', B', P); unused parts are 1-column zeros."""
    if HALF > 0:
        ca, cb, i, pair_ok = _pair_cols(R, HALF, INTERLEAVED)
        c, s = _cos_sin(pos, theta_ptr, i, pair_ok)
        xa = _load_tile(base, rows, row_stride, col_stride, rows_ok, ca, pair_ok)
        xb = _load_tile(base, rows, row_stride, col_stride, rows_ok, cb, pair_ok)
        ra = _operand(xa * c - xb * s, ELEM, LOWP_DOT)
        rb = _operand(xb * c + xa * s, ELEM, LOWP_DOT)
    else:
        ra = tl.zeros([1, 1], tl.float32)
        rb = ra
    if PASS > 0:
        cp = R + tl.arange(0, PASS)
        xp = _operand(_load_tile(base, rows, row_stride, col_stride, rows_ok, cp, cp < D),
                      ELEM, LOWP_DOT)
    else:
        xp = tl.zeros([1, 1], tl.float32)
    return ra, rb, xp


@triton.jit
def _scores(qa, qb, qp, ka, kb, kp, HALF: tl.constexpr, PASS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """R(q) R(k)^T of a query block and a key block, float32 [BLOCK_M, BLOCK_N]."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HALF > 0:
        s += _dot(qa, tl.trans(ka))
        s += _dot(qb, tl.trans(kb))
    if PASS > 0:
        s += _dot(qp, tl.trans(kp))
    return s


@triton.jit
def _keep(offs_m, offs_n, Lq, Lk, kpm_ptr, kpm_sb, kpm_sl, b, HAS_MASK: tl.constexpr,
          CAUSAL: tl.constexpr):
    """[len(offs_m), len(offs_n)] mask of the (query, key) pairs that attend."""
    n_ok = offs_n < Lk
    keep = (offs_m[:, None] < Lq) & n_ok[None, :]
    if HAS_MASK:
        km = tl.load(kpm_ptr + b * kpm_sb + offs_n.to(tl.int64) * kpm_sl, mask=n_ok, other=0)
        keep = keep & (km != 0)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return keep


@triton.jit
def _store_unrotated(base, rows, row_stride, col_stride, rows_ok, pos, R, D, theta_ptr, ga, gb, gp,
                     HALF: tl.constexpr, PASS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store a gradient accumulated in the rotated frame, rotated back by the negative angle."""
    if HALF > 0:
        ca, cb, i, pair_ok = _pair_cols(R, HALF, INTERLEAVED)
        c, s = _cos_sin(pos, theta_ptr, i, pair_ok)
        _store_tile(base, rows, row_stride, col_stride, rows_ok, ca, pair_ok, ga * c + gb * s)
        _store_tile(base, rows, row_stride, col_stride, rows_ok, cb, pair_ok, gb * c - ga * s)
    if PASS > 0:
        cp = R + tl.arange(0, PASS)
        _store_tile(base, rows, row_stride, col_stride, rows_ok, cp, cp < D, gp)


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(x_ptr, out_ptr, pos_ptr, sxb, sxh, sxl, sxd, sob, soh, sol, sod, pos_sb, pos_sl,
                 H, L, D, R, offset, theta_ptr, BLOCK_L: tl.constexpr, HALF: tl.constexpr,
                 PASS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_POS: tl.constexpr,
                 INVERSE: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    rows_ok = rows < L
    x_base = x_ptr + b * sxb + h * sxh
    o_base = out_ptr + b * sob + h * soh
    if HALF > 0:
        pos = _positions(pos_ptr, pos_sb, pos_sl, b, rows, rows_ok, offset, HAS_POS)
        ca, cb, i, pair_ok = _pair_cols(R, HALF, INTERLEAVED)
        c, s = _cos_sin(pos, theta_ptr, i, pair_ok)
        if INVERSE:
            s = -s
        xa = _load_tile(x_base, rows, sxl, sxd, rows_ok, ca, pair_ok)
        xb = _load_tile(x_base, rows, sxl, sxd, rows_ok, cb, pair_ok)
        _store_tile(o_base, rows, sol, sod, rows_ok, ca, pair_ok, xa * c - xb * s)
        _store_tile(o_base, rows, sol, sod, rows_ok, cb, pair_ok, xb * c + xa * s)
    if PASS > 0:
        cp = R + tl.arange(0, PASS)
        xp = _load_tile(x_base, rows, sxl, sxd, rows_ok, cp, cp < D)
        _store_tile(o_base, rows, sol, sod, rows_ok, cp, cp < D, xp)


@triton.jit
def _rope_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr, qpos_ptr, kpos_ptr,
        sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
        kpm_sb, kpm_sl, qpos_sb, qpos_sl, kpos_sb, kpos_sl,
        Hq, GROUP, Lq, Lk, D, DV, R, scale_log2, theta_ptr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
        BLOCK_DV: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
        LOWP_DOT: tl.constexpr):
    ELEM: tl.constexpr = q_ptr.dtype.element_ty
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    hq = (bh % Hq).to(tl.int64)
    hk = hq // GROUP
    pid_m = tl.program_id(1)
    if CAUSAL:  # the longest rows first
        pid_m = tl.num_programs(1) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    qpos = _positions(qpos_ptr, qpos_sb, qpos_sl, b, offs_m, m_ok, Lk - Lq, HAS_QPOS)
    qa, qb, qp = _load_rotated(q_ptr + b * sqb + hq * sqh, offs_m, sql, sqd, m_ok, qpos, R, D,
                               theta_ptr, ELEM, LOWP_DOT, HALF, PASS, INTERLEAVED)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = Lk
    if CAUSAL:  # key j is seen by query i iff j <= i + Lk - Lq
        hi = tl.minimum(Lk, start_m + BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kpos = _positions(kpos_ptr, kpos_sb, kpos_sl, b, offs_n, n_ok, 0, HAS_KPOS)
        ka, kb, kp = _load_rotated(k_base, offs_n, skl, skd, n_ok, kpos, R, D, theta_ptr, ELEM,
                                   LOWP_DOT, HALF, PASS, INTERLEAVED)
        s = _scores(qa, qb, qp, ka, kb, kp, HALF, PASS, BLOCK_M, BLOCK_N) * scale_log2
        keep = _keep(offs_m, offs_n, Lq, Lk, kpm_ptr, kpm_sb, kpm_sl, b, HAS_MASK, CAUSAL)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.where(keep, tl.exp2(s - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _operand(_load_tile(v_base, offs_n, svl, svd, n_ok, offs_dv, dv_ok), ELEM, LOWP_DOT)
        acc = acc * alpha[:, None] + _dot(_operand(p, ELEM, LOWP_DOT), v)
        m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / _LOG2E_K, float("inf"))
    _store_tile(o_ptr + b * sob + hq * soh, offs_m, sol, sod, m_ok, offs_dv, dv_ok, out)
    tl.store(lse_ptr + (b * Hq + hq) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _rope_attn_bwd_pre_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, sol, sod, sdob, sdoh, sdol,
                              sdod, Hq, Lq, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O), float32 (B, Hq, Lq)."""
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < Lq
    cols = tl.arange(0, BLOCK_DV)
    cols_ok = cols < DV
    o = _load_tile(o_ptr + b * sob + h * soh, rows, sol, sod, rows_ok, cols, cols_ok)
    do = _load_tile(do_ptr + b * sdob + h * sdoh, rows, sdol, sdod, rows_ok, cols, cols_ok)
    tl.store(delta_ptr + (b * Hq + h) * Lq + rows, tl.sum(o * do, axis=1), mask=rows_ok)


@triton.jit
def _rope_attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, qpos_ptr,
        kpos_ptr, sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
        sdob, sdoh, sdol, sdod, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
        kpm_sb, kpm_sl, qpos_sb, qpos_sl, kpos_sb, kpos_sl,
        Hq, Hk, GROUP, Lq, Lk, D, DV, R, scale, scale_log2, theta_ptr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
        BLOCK_DV: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
        LOWP_DOT: tl.constexpr):
    ELEM: tl.constexpr = q_ptr.dtype.element_ty
    bh = tl.program_id(0)
    b = (bh // Hk).to(tl.int64)
    hk = (bh % Hk).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    kpos = _positions(kpos_ptr, kpos_sb, kpos_sl, b, offs_n, n_ok, 0, HAS_KPOS)
    ka, kb, kp = _load_rotated(k_ptr + b * skb + hk * skh, offs_n, skl, skd, n_ok, kpos, R, D,
                               theta_ptr, ELEM, LOWP_DOT, HALF, PASS, INTERLEAVED)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    v = _operand(_load_tile(v_ptr + b * svb + hk * svh, offs_n, svl, svd, n_ok, offs_dv, dv_ok),
                 ELEM, LOWP_DOT)
    dka = tl.zeros(ka.shape, tl.float32)
    dkb = tl.zeros(kb.shape, tl.float32)
    dkp = tl.zeros(kp.shape, tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:  # the first query that sees key start_n, rounded down to its block
        lo = tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        q_base = q_ptr + b * sqb + hq * sqh
        do_base = do_ptr + b * sdob + hq * sdoh
        row_base = (b * Hq + hq) * Lq
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            qpos = _positions(qpos_ptr, qpos_sb, qpos_sl, b, offs_m, m_ok, Lk - Lq, HAS_QPOS)
            qa, qb, qp = _load_rotated(q_base, offs_m, sql, sqd, m_ok, qpos, R, D, theta_ptr, ELEM,
                                       LOWP_DOT, HALF, PASS, INTERLEAVED)
            lse = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_ptr + row_base + offs_m, mask=m_ok, other=0.0)
            do = _operand(_load_tile(do_base, offs_m, sdol, sdod, m_ok, offs_dv, dv_ok), ELEM,
                          LOWP_DOT)
            # transposed tiles [BLOCK_N, BLOCK_M]: key rows, query columns
            sT = _scores(ka, kb, kp, qa, qb, qp, HALF, PASS, BLOCK_N, BLOCK_M) * scale_log2
            keepT = tl.trans(_keep(offs_m, offs_n, Lq, Lk, kpm_ptr, kpm_sb, kpm_sl, b, HAS_MASK,
                                   CAUSAL))
            # lse = +inf on a fully masked row: its probabilities are exactly 0
            pT = tl.where(keepT, tl.exp2(sT - (lse * _LOG2E_K)[None, :]), 0.0)
            dv += _dot(_operand(pT, ELEM, LOWP_DOT), do)
            dpT = _dot(v, tl.trans(do))
            dsT = _operand(pT * (dpT - delta[None, :]), ELEM, LOWP_DOT)
            if HALF > 0:
                dka += _dot(dsT, qa)
                dkb += _dot(dsT, qb)
            if PASS > 0:
                dkp += _dot(dsT, qp)
    _store_unrotated(dk_ptr + b * sdkb + hk * sdkh, offs_n, sdkl, sdkd, n_ok, kpos, R, D,
                     theta_ptr, dka * scale, dkb * scale, dkp * scale, HALF, PASS, INTERLEAVED)
    _store_tile(dv_ptr + b * sdvb + hk * sdvh, offs_n, sdvl, sdvd, n_ok, offs_dv, dv_ok, dv)


@triton.jit
def _rope_attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, qpos_ptr, kpos_ptr,
        sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod,
        sdqb, sdqh, sdql, sdqd, kpm_sb, kpm_sl, qpos_sb, qpos_sl, kpos_sb, kpos_sl,
        Hq, GROUP, Lq, Lk, D, DV, R, scale, scale_log2, theta_ptr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
        BLOCK_DV: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
        LOWP_DOT: tl.constexpr):
    ELEM: tl.constexpr = q_ptr.dtype.element_ty
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    hq = (bh % Hq).to(tl.int64)
    hk = hq // GROUP
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    qpos = _positions(qpos_ptr, qpos_sb, qpos_sl, b, offs_m, m_ok, Lk - Lq, HAS_QPOS)
    qa, qb, qp = _load_rotated(q_ptr + b * sqb + hq * sqh, offs_m, sql, sqd, m_ok, qpos, R, D,
                               theta_ptr, ELEM, LOWP_DOT, HALF, PASS, INTERLEAVED)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    do = _operand(_load_tile(do_ptr + b * sdob + hq * sdoh, offs_m, sdol, sdod, m_ok, offs_dv,
                             dv_ok), ELEM, LOWP_DOT)
    row_base = (b * Hq + hq) * Lq
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    dqa = tl.zeros(qa.shape, tl.float32)
    dqb = tl.zeros(qb.shape, tl.float32)
    dqp = tl.zeros(qp.shape, tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kpos = _positions(kpos_ptr, kpos_sb, kpos_sl, b, offs_n, n_ok, 0, HAS_KPOS)
        ka, kb, kp = _load_rotated(k_base, offs_n, skl, skd, n_ok, kpos, R, D, theta_ptr, ELEM,
                                   LOWP_DOT, HALF, PASS, INTERLEAVED)
        v = _operand(_load_tile(v_base, offs_n, svl, svd, n_ok, offs_dv, dv_ok), ELEM, LOWP_DOT)
        s = _scores(qa, qb, qp, ka, kb, kp, HALF, PASS, BLOCK_M, BLOCK_N) * scale_log2
        keep = _keep(offs_m, offs_n, Lq, Lk, kpm_ptr, kpm_sb, kpm_sl, b, HAS_MASK, CAUSAL)
        p = tl.where(keep, tl.exp2(s - (lse * _LOG2E_K)[:, None]), 0.0)
        dp = _dot(do, tl.trans(v))
        ds = _operand(p * (dp - delta[:, None]), ELEM, LOWP_DOT)
        if HALF > 0:
            dqa += _dot(ds, ka)
            dqb += _dot(ds, kb)
        if PASS > 0:
            dqp += _dot(ds, kp)
    _store_unrotated(dq_ptr + b * sdqb + hq * sdqh, offs_m, sdql, sdqd, m_ok, qpos, R, D,
                     theta_ptr, dqa * scale, dqb * scale, dqp * scale, HALF, PASS, INTERLEAVED)


# ---- launchers (plain Python over tensors) ------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _split(d: int, rotary_dim: int) -> tuple[int, int]:
    """(HALF, PASS) tile widths: rotated pairs and pass-through channels, 0 when absent."""
    half = max(_MIN_DOT, triton.next_power_of_2(rotary_dim // 2)) if rotary_dim > 0 else 0
    rest = d - rotary_dim
    return half, (max(_MIN_DOT, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _check_rotary(d: int, rotary_dim) -> int:
    if rotary_dim is None:  # the ops always pass an int; None would silently mean D
        raise TypeError("rotary_dim must be an int, got NoneType")
    return resolve_rotary_dim(rotary_dim, d)


def _check_base(base) -> float:
    check_positive(base, "rope_base")
    check_finite_number(base, "rope_base")
    return float(base)


_THETA_CACHE: dict = {}


def _theta(base: float, rotary_dim: int, device) -> torch.Tensor:
    """float32 ``theta_i = base ** (-2i / rotary_dim)`` (power in float64, then rounded, as the
    reference and the CPU kernels do), ``max(1, rotary_dim // 2)`` entries, cached per device."""
    key = (base, rotary_dim, str(device))
    t = _THETA_CACHE.get(key)
    if t is None:
        i = torch.arange(max(1, rotary_dim // 2), dtype=torch.float64)
        t = (base ** (-2.0 * i / max(rotary_dim, 1))).to(torch.float32).to(device)
        if len(_THETA_CACHE) > 64:
            _THETA_CACHE.clear()
        _THETA_CACHE[key] = t
    return t


def _check_positions(pos, batch: int, length: int, device, name: str):
    """None, or an int64 (B, L) tensor (any strides, stride 0 included): (tensor, sb, sl)."""
    if pos is None:
        return None, 0, 0
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor or None, got "
                        f"{getattr(pos, 'dtype', type(pos).__name__)}")
    if tuple(pos.shape) != (batch, length):
        raise ValueError(f"{name} must have shape ({batch}, {length}), got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} must be on {device}, got {pos.device}")
    return pos, pos.stride(0), pos.stride(1)


def _check_4d(x, name: str) -> None:
    check_floating(x, name)
    check_rank(x, 4, name, "(batch, heads, seq_len, head_dim)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, "
                        f"got {x.dtype}")


def _rope_config(length: int) -> dict:
    return dict(ROPE_CONFIGS[0] if length <= 1024 else ROPE_CONFIGS[1])


def apply_rope_forward(x: torch.Tensor, positions, offset: int, base: float, interleaved: bool,
                       rotary_dim: int, inverse: bool, *, config: dict | None = None) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of every (batch, head, row) of ``x``.

    Args:
        x (torch.Tensor): `[B, H, L, D]` float32/float16/bfloat16, any strides.
        positions (torch.Tensor | None): int64 `[B, L]` (stride 0 allowed), or None for
            ``offset + arange(L)``.
        offset (int): first position when ``positions`` is None (ignored otherwise).
        base (float): RoPE base (> 0).
        interleaved (bool): pairs ``(2i, 2i+1)`` if True, else ``(i, i + rotary_dim/2)``.
        rotary_dim (int): even, ``<= D``; channels from it on are copied.
        inverse (bool): rotate by the negative angle (the backward of the forward rotation).
        config (dict, optional): ``{"BLOCK_L", "num_warps"}`` overriding the default choice.

    Returns:
        torch.Tensor: contiguous `[B, H, L, D]`, dtype of ``x``.

    Raises:
        TypeError, ValueError: bad dtype, rank, rotary_dim, base or positions.
    """
    _check_4d(x, "x")
    bsz, heads, length, d = x.shape
    r = _check_rotary(d, rotary_dim)
    base = _check_base(base)
    pos, psb, psl = _check_positions(positions, bsz, length, x.device, "positions")
    out = torch.empty((bsz, heads, length, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half, pas = _split(d, r)
    cfg = dict(config) if config is not None else _rope_config(length)
    grid = (bsz * heads, triton.cdiv(length, cfg["BLOCK_L"]))
    _rope_kernel[grid](x, out, pos if pos is not None else x, *x.stride(), *out.stride(), psb, psl,
                       heads, length, d, r, int(offset), _theta(base, r, x.device), HALF=half, PASS=pas,
                       INTERLEAVED=bool(interleaved), HAS_POS=pos is not None,
                       INVERSE=bool(inverse), **cfg)
    return out


def _fwd_config(dtype: torch.dtype, lq: int) -> dict:
    """Big query tiles for long low-precision rows; smaller for float32 (IEEE dots, 2x registers)."""
    if dtype == torch.float32:
        return dict(FWD_CONFIGS[2])
    return dict(FWD_CONFIGS[1] if lq <= 64 else FWD_CONFIGS[0])


def _bwd_config(dtype: torch.dtype, lq: int, lk: int) -> dict:
    if dtype == torch.float32 or max(lq, lk) <= 32:
        return dict(BWD_CONFIGS[1])
    return dict(BWD_CONFIGS[0])


def _check_attention(q, k, v, key_padding_mask, q_positions, k_positions, rope, rotary_dim):
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        _check_4d(t, n)
    bsz, hq, lq, d = q.shape
    if k.shape[0] != bsz or v.shape[0] != bsz:
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    hk, lk = k.shape[1], k.shape[2]
    if k.shape[3] != d:
        raise ValueError(f"k must have head_dim {d} like q, got {k.shape[3]}")
    if v.shape[1] != hk or v.shape[2] != lk:
        raise ValueError(f"v must be (B, {hk}, {lk}, Dv) like k, got {tuple(v.shape)}")
    if hk == 0 or hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q, k, "q", "k")
    check_same_device(q, v, "q", "v")
    r = _check_rotary(d, rotary_dim) if rope else 0
    if key_padding_mask is not None:
        check_bool_tensor(key_padding_mask, "key_padding_mask")
        if tuple(key_padding_mask.shape) != (bsz, lk):
            raise ValueError(f"key_padding_mask must have shape ({bsz}, {lk}), got "
                             f"{tuple(key_padding_mask.shape)}")
        check_same_device(q, key_padding_mask, "q", "key_padding_mask")
    qpos = _check_positions(q_positions if rope else None, bsz, lq, q.device, "q_positions")
    kpos = _check_positions(k_positions if rope else None, bsz, lk, q.device, "k_positions")
    return bsz, hq, hk, lq, lk, d, v.shape[3], r, qpos, kpos


def _common_meta(q, d, dv, r, interleaved, causal, key_padding_mask, qpos, kpos):
    half, pas = _split(d, r)
    return dict(HALF=half, PASS=pas, BLOCK_DV=max(_MIN_DOT, triton.next_power_of_2(dv)),
                INTERLEAVED=bool(interleaved), CAUSAL=bool(causal),
                HAS_MASK=key_padding_mask is not None, HAS_QPOS=qpos[0] is not None,
                HAS_KPOS=kpos[0] is not None,
                LOWP_DOT=q.dtype != torch.float32 and not _interpreting())


def _mask_args(q, key_padding_mask, qpos, kpos):
    """Pointer + stride arguments of the optional tensors (q stands in for an absent one)."""
    if key_padding_mask is not None:
        kpm = (key_padding_mask.view(torch.uint8), key_padding_mask.stride(0),
               key_padding_mask.stride(1))
    else:
        kpm = (q, 0, 0)
    ptrs = (kpm[0], qpos[0] if qpos[0] is not None else q, kpos[0] if kpos[0] is not None else q)
    return ptrs, (kpm[1], kpm[2], qpos[1], qpos[2], kpos[1], kpos[2])


def rope_attention_forward(q, k, v, key_padding_mask, q_positions, k_positions, causal: bool,
                           scale: float, rope: bool, rope_base: float, interleaved: bool,
                           rotary_dim: int, *, config: dict | None = None):
    """``softmax(scale * R(q) R(k)^T + masks) v`` and its per-row log-sum-exp.

    Args:
        q (torch.Tensor): `[B, Hq, Lq, D]` float32/float16/bfloat16, any strides.
        k (torch.Tensor): `[B, Hk, Lk, D]`, ``Hq % Hk == 0`` (GQA / MQA).
        v (torch.Tensor): `[B, Hk, Lk, Dv]`.
        key_padding_mask (torch.Tensor | None): bool `[B, Lk]`, True = keep.
        q_positions, k_positions (torch.Tensor | None): int64 `[B, Lq]` / `[B, Lk]` (stride 0
            allowed); None for ``Lk - Lq + arange(Lq)`` / ``arange(Lk)``.
        causal (bool): bottom-right aligned: query i sees keys ``j <= i + Lk - Lq``.
        scale (float): score scale (already resolved, e.g. ``D ** -0.5``).
        rope (bool): rotate q and k; False gives plain attention.
        rope_base (float), interleaved (bool), rotary_dim (int): RoPE settings (see module doc).
        config (dict, optional): ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``.

    Returns:
        (out `[B, Hq, Lq, Dv]` contiguous in q's dtype, lse `[B, Hq, Lq]` float32 natural-log
        log-sum-exp of the scaled scores; ``+inf`` and ``out = 0`` on a fully masked row).
    """
    bsz, hq, hk, lq, lk, d, dv, r, qpos, kpos = _check_attention(
        q, k, v, key_padding_mask, q_positions, k_positions, rope, rotary_dim)
    base = _check_base(rope_base) if rope else 10000.0
    check_finite_number(scale, "scale")
    out = torch.empty((bsz, hq, lq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, hq, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    if lk == 0 or d == 0:
        return out.zero_(), lse.fill_(float("inf"))
    meta = _common_meta(q, d, dv, r, interleaved, causal, key_padding_mask, qpos, kpos)
    cfg = dict(config) if config is not None else _fwd_config(q.dtype, lq)
    ptrs, strides = _mask_args(q, key_padding_mask, qpos, kpos)
    grid = (bsz * hq, triton.cdiv(lq, cfg["BLOCK_M"]))
    _rope_attn_fwd_kernel[grid](
        q, k, v, out, lse, *ptrs, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *strides,
        hq, hq // hk, lq, lk, d, dv, r, float(scale) * LOG2E, _theta(base, r, q.device), **meta, **cfg)
    return out, lse


def rope_attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, q_positions,
                            k_positions, causal: bool, scale: float, rope: bool, rope_base: float,
                            interleaved: bool, rotary_dim: int, *, config: dict | None = None):
    """Gradients of :func:`rope_attention_forward` with respect to q, k and v.

    Recomputes the rotated q and k tiles; ``dq`` and ``dk`` are accumulated in the rotated frame
    and rotated back by the negative angle. Fully masked rows (``lse = +inf``) contribute nothing.

    Args:
        grad_out (torch.Tensor): `[B, Hq, Lq, Dv]`, any strides (stride 0 included).
        q, k, v, key_padding_mask, q_positions, k_positions, causal, scale, rope, rope_base,
            interleaved, rotary_dim: as given to the forward.
        out (torch.Tensor): `[B, Hq, Lq, Dv]` forward output; lse (torch.Tensor): `[B, Hq, Lq]`
            float32 forward log-sum-exp.
        config (dict, optional): ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``.

    Returns:
        (dq, dk, dv): contiguous, shaped and typed like q, k, v.
    """
    bsz, hq, hk, lq, lk, d, dv_dim, r, qpos, kpos = _check_attention(
        q, k, v, key_padding_mask, q_positions, k_positions, rope, rotary_dim)
    base = _check_base(rope_base) if rope else 10000.0
    for t, n, shape in ((grad_out, "grad_out", (bsz, hq, lq, dv_dim)), (out, "out", (bsz, hq, lq, dv_dim))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{n} must have shape {shape}, got {tuple(getattr(t, 'shape', ()))}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (bsz, hq, lq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape ({bsz}, {hq}, {lq})")
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if lq == 0 or lk == 0 or bsz == 0 or d == 0 or dv_dim == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _common_meta(q, d, dv_dim, r, interleaved, causal, key_padding_mask, qpos, kpos)
    delta = torch.empty((bsz, hq, lq), dtype=torch.float32, device=q.device)
    pre = dict(PRE_CONFIGS[0])
    _rope_attn_bwd_pre_kernel[(bsz * hq, triton.cdiv(lq, pre["BLOCK_M"]))](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), hq, lq, dv_dim,
        BLOCK_DV=meta["BLOCK_DV"], **pre)
    cfg = dict(config) if config is not None else _bwd_config(q.dtype, lq, lk)
    ptrs, strides = _mask_args(q, key_padding_mask, qpos, kpos)
    check_finite_number(scale, "scale")
    scalars = (float(scale), float(scale) * LOG2E, _theta(base, r, q.device))
    _rope_attn_bwd_dkdv_kernel[(bsz * hk, triton.cdiv(lk, cfg["BLOCK_N"]))](
        q, k, v, grad_out, lse, delta, dk, dv, *ptrs, *q.stride(), *k.stride(), *v.stride(),
        *grad_out.stride(), *dk.stride(), *dv.stride(), *strides, hq, hk, hq // hk, lq, lk, d,
        dv_dim, r, *scalars, **meta, **cfg)
    _rope_attn_bwd_dq_kernel[(bsz * hq, triton.cdiv(lq, cfg["BLOCK_M"]))](
        q, k, v, grad_out, lse, delta, dq, *ptrs, *q.stride(), *k.stride(), *v.stride(),
        *grad_out.stride(), *dq.stride(), *strides, hq, hq // hk, lq, lk, d, dv_dim, r, *scalars,
        **meta, **cfg)
    return dq, dk, dv
