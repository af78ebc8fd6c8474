"""Triton kernels for causal / non-causal linear attention (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1).

Same contract and output layout as the C++ CPU kernels in csrc/cpu/linear_attention.cpp
(``torch.ops.kxkernels.causal_linear_attention_*`` / ``linear_attention_*``); the math is in
./reference.py.

One program per (batch, head) walks the sequence in chunks of ``BT`` positions with the whole
state S (Dk x Dv) and z (Dk) in float32 registers. Dk is handled as two halves ``a`` / ``b`` of
``DH`` lanes: the RoPE pairs (channels (2i, 2i+1) when interleaved, (i, i + Dk/2) otherwise;
without RoPE any split works), so the rotation is elementwise on the two tiles and every product
over Dk is the sum of two ``tl.dot``. Per chunk: ``num = rq S + tril(rq rk^T) v``, the denominator
``fq . z_prev + rowsum(tril(fq fk^T)) + eps``, then ``S += rk^T v``, ``z += sum fk``.

Backward: two kernels per (batch, head), independent of each other -- dq forward in time
(recomputing S, z chunk by chunk) and dk, dv backward in time (reverse cumulative sums
R = sum_{i later} rq_i gn_i^T and Zr = sum gd_i fq_i) -- recomputing the feature maps and RoPE
instead of storing per-position states. float32 inputs multiply in IEEE float32; float16/bfloat16
inputs are converted to float32 on load and their products may use TF32 (error below the output
rounding of those dtypes). RoPE angles: position * theta (float32, theta precomputed as on the CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FM = {"elu+1": 0, "relu": 1, "identity": 2}

# (BT, num_warps) the launchers choose from (see _config); tests/triton/_aot.py compiles every
# kernel at each of them.
TUNING_CONFIGS = (
    {"BT": 32, "num_warps": 4},
    {"BT": 32, "num_warps": 8},
)  # BT = 64 with float32 tiles at D = 64 asks 174 KB of shared memory in the dq kernel: above sm_80's 163 KB
# The state lives in registers (and the dot operands in shared memory): Dk, Dv up to this. At 128
# the float32 state tiles ask for more shared memory than an A100 CTA has (tests/triton/_aot.py).
MAX_HEAD_DIM = 64


# ---- device helpers -------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _phi(x, FM: tl.constexpr):
    if FM == 0:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FM == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FM: tl.constexpr):
    if FM == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FM == 1:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _load_chunk(q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_base, pos_base, theta_ptr,
                t0, L, Dv, col_a, col_b, m_a, m_b, FM: tl.constexpr, ROPE: tl.constexpr, HAS_MASK: tl.constexpr,
                BT: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr):
    """Chunk rows [t0, t0 + BT): raw q halves, phi(q), rotated phi(q), same for k (padded keys zeroed), v."""
    rows = t0 + tl.arange(0, BT)
    m_t = rows < L
    e = tl.arange(0, DV)
    rows64 = rows.to(tl.int64)
    mqa = m_t[:, None] & m_a[None, :]
    mqb = m_t[:, None] & m_b[None, :]
    qa = tl.load(q_base + rows64[:, None] * sq_l + col_a[None, :] * sq_d, mask=mqa, other=0.0).to(tl.float32)
    qb = tl.load(q_base + rows64[:, None] * sq_l + col_b[None, :] * sq_d, mask=mqb, other=0.0).to(tl.float32)
    ka = tl.load(k_base + rows64[:, None] * sk_l + col_a[None, :] * sk_d, mask=mqa, other=0.0).to(tl.float32)
    kb = tl.load(k_base + rows64[:, None] * sk_l + col_b[None, :] * sk_d, mask=mqb, other=0.0).to(tl.float32)
    v = tl.load(v_base + rows64[:, None] * sv_l + e[None, :] * sv_d, mask=m_t[:, None] & (e < Dv)[None, :],
                other=0.0).to(tl.float32)
    fqa = tl.where(mqa, _phi(qa, FM), 0.0)
    fqb = tl.where(mqb, _phi(qb, FM), 0.0)
    keep_a = mqa
    keep_b = mqb
    if HAS_MASK:
        km = tl.load(mask_base + rows, mask=m_t, other=0) != 0
        keep_a = keep_a & km[:, None]
        keep_b = keep_b & km[:, None]
    fka = tl.where(keep_a, _phi(ka, FM), 0.0)
    fkb = tl.where(keep_b, _phi(kb, FM), 0.0)
    if ROPE:
        pos = tl.load(pos_base + rows, mask=m_t, other=0).to(tl.float32)
        theta = tl.load(theta_ptr + tl.arange(0, DH), mask=m_a, other=0.0)
        ang = pos[:, None] * theta[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang)
        rqa = fqa * c - fqb * s
        rqb = fqb * c + fqa * s
        rka = fka * c - fkb * s
        rkb = fkb * c + fka * s
    else:
        c = tl.zeros([BT, DH], tl.float32)
        s = c
        rqa, rqb, rka, rkb = fqa, fqb, fka, fkb
    return qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s


@triton.jit
def _columns(Dk, HA, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, DH: tl.constexpr):
    i = tl.arange(0, DH)
    if ROPE and INTERLEAVED:
        col_a = 2 * i
        col_b = 2 * i + 1
    else:
        col_a = i
        col_b = i + HA
    m_a = (i < HA) & (col_a < Dk)
    m_b = (i < HA) & (col_b < Dk)
    return col_a, col_b, m_a, m_b


@triton.jit
def _grad_chunk(go_base, sg_l, sg_d, o_base, so_l, so_d, den_base, t0, L, Dv, NORMALIZE: tl.constexpr,
                BT: tl.constexpr, DV: tl.constexpr):
    """gn = go / den, gd = -(go . out) / den (a zero den counts as 1/den = 0); gn = go without normalize."""
    rows = t0 + tl.arange(0, BT)
    m_t = rows < L
    e = tl.arange(0, DV)
    rows64 = rows.to(tl.int64)
    m2 = m_t[:, None] & (e < Dv)[None, :]
    go = tl.load(go_base + rows64[:, None] * sg_l + e[None, :] * sg_d, mask=m2, other=0.0).to(tl.float32)
    if NORMALIZE:
        o = tl.load(o_base + rows64[:, None] * so_l + e[None, :] * so_d, mask=m2, other=0.0).to(tl.float32)
        den = tl.load(den_base + rows, mask=m_t, other=1.0)
        inv = tl.where(den != 0.0, 1.0 / den, 0.0)
        gn = go * inv[:, None]
        gd = -tl.sum(gn * o, axis=1)
    else:
        gn = go
        gd = tl.zeros([BT], tl.float32)
    return gn, gd


# ---- kernels --------------------------------------------------------------------------------------
@triton.jit
def _causal_fwd_kernel(q_ptr, k_ptr, v_ptr, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                       out_ptr, den_ptr, s0_ptr, z0_ptr, s_ptr, z_ptr, mask_ptr, pos_ptr, pos_sb, theta_ptr,
                       H, L, Dk, Dv, HA, eps,
                       FM: tl.constexpr, NORMALIZE: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, IEEE: tl.constexpr,
                       BT: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    col_a, col_b, m_a, m_b = _columns(Dk, HA, ROPE, INTERLEAVED, DH)
    e = tl.arange(0, DV)
    m_e = e < Dv
    t = tl.arange(0, BT)
    causal = t[:, None] >= t[None, :]
    sa_off = bh * Dk * Dv + col_a[:, None] * Dv + e[None, :]
    sb_off = bh * Dk * Dv + col_b[:, None] * Dv + e[None, :]
    ms_a = m_a[:, None] & m_e[None, :]
    ms_b = m_b[:, None] & m_e[None, :]
    if HAS_STATE:
        Sa = tl.load(s0_ptr + sa_off, mask=ms_a, other=0.0)
        Sb = tl.load(s0_ptr + sb_off, mask=ms_b, other=0.0)
        za = tl.load(z0_ptr + bh * Dk + col_a, mask=m_a, other=0.0)
        zb = tl.load(z0_ptr + bh * Dk + col_b, mask=m_b, other=0.0)
    else:
        Sa = tl.zeros([DH, DV], tl.float32)
        Sb = tl.zeros([DH, DV], tl.float32)
        za = tl.zeros([DH], tl.float32)
        zb = tl.zeros([DH], tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for t0 in range(0, L, BT):
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        num = _dot(rqa, Sa, IEEE) + _dot(rqb, Sb, IEEE)
        a = _dot(rqa, tl.trans(rka), IEEE) + _dot(rqb, tl.trans(rkb), IEEE)
        a = tl.where(causal, a, 0.0)
        num += _dot(a, v, IEEE)
        rows = t0 + t
        m_t = rows < L
        if NORMALIZE:
            af = _dot(fqa, tl.trans(fka), IEEE) + _dot(fqb, tl.trans(fkb), IEEE)
            af = tl.where(causal, af, 0.0)
            den = tl.sum(fqa * za[None, :], axis=1) + tl.sum(fqb * zb[None, :], axis=1) + tl.sum(af, axis=1) + eps
            tl.store(den_ptr + bh * L + rows, den, mask=m_t)
            num = num * tl.where(den != 0.0, 1.0 / den, 0.0)[:, None]
        tl.store(out_ptr + (bh * L + rows[:, None]) * Dv + e[None, :], num.to(out_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_e[None, :])
        Sa += _dot(tl.trans(rka), v, IEEE)
        Sb += _dot(tl.trans(rkb), v, IEEE)
        za += tl.sum(fka, axis=0)
        zb += tl.sum(fkb, axis=0)
    tl.store(s_ptr + sa_off, Sa, mask=ms_a)
    tl.store(s_ptr + sb_off, Sb, mask=ms_b)
    tl.store(z_ptr + bh * Dk + col_a, za, mask=m_a)
    tl.store(z_ptr + bh * Dk + col_b, zb, mask=m_b)


@triton.jit
def _causal_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l,
                          sv_d, go_ptr, sg_b, sg_h, sg_l, sg_d, o_ptr, so_b, so_h, so_l, so_d, den_ptr,
                          s0_ptr, z0_ptr, gq_ptr, mask_ptr, pos_ptr, pos_sb, theta_ptr, H, L, Dk, Dv, HA,
                          FM: tl.constexpr, NORMALIZE: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                          HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, IEEE: tl.constexpr,
                          BT: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    col_a, col_b, m_a, m_b = _columns(Dk, HA, ROPE, INTERLEAVED, DH)
    e = tl.arange(0, DV)
    m_e = e < Dv
    t = tl.arange(0, BT)
    causal = t[:, None] >= t[None, :]
    ones_tril = tl.where(causal, 1.0, 0.0)
    if HAS_STATE:
        Sa = tl.load(s0_ptr + bh * Dk * Dv + col_a[:, None] * Dv + e[None, :], mask=m_a[:, None] & m_e[None, :],
                     other=0.0)
        Sb = tl.load(s0_ptr + bh * Dk * Dv + col_b[:, None] * Dv + e[None, :], mask=m_b[:, None] & m_e[None, :],
                     other=0.0)
        za = tl.load(z0_ptr + bh * Dk + col_a, mask=m_a, other=0.0)
        zb = tl.load(z0_ptr + bh * Dk + col_b, mask=m_b, other=0.0)
    else:
        Sa = tl.zeros([DH, DV], tl.float32)
        Sb = tl.zeros([DH, DV], tl.float32)
        za = tl.zeros([DH], tl.float32)
        zb = tl.zeros([DH], tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for t0 in range(0, L, BT):
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        gn, gd = _grad_chunk(go_ptr + b * sg_b + h * sg_h, sg_l, sg_d, o_ptr + b * so_b + h * so_h, so_l, so_d,
                             den_ptr + bh * L, t0, L, Dv, NORMALIZE, BT, DV)
        bm = tl.where(causal, _dot(gn, tl.trans(v), IEEE), 0.0)
        ga = _dot(gn, tl.trans(Sa), IEEE) + _dot(bm, rka, IEEE)
        gb = _dot(gn, tl.trans(Sb), IEEE) + _dot(bm, rkb, IEEE)
        if ROPE:  # the transpose of the rotation
            ga, gb = ga * c + gb * s, gb * c - ga * s
        if NORMALIZE:
            zca = za[None, :] + _dot(ones_tril, fka, IEEE)  # z_i, inclusive
            zcb = zb[None, :] + _dot(ones_tril, fkb, IEEE)
            ga += gd[:, None] * zca
            gb += gd[:, None] * zcb
        ga = ga * _dphi(qa, FM)
        gb = gb * _dphi(qb, FM)
        rows = t0 + t
        m_t = rows < L
        gq_rows = gq_ptr + (bh * L + rows[:, None]) * Dk
        tl.store(gq_rows + col_a[None, :], ga.to(gq_ptr.dtype.element_ty), mask=m_t[:, None] & m_a[None, :])
        tl.store(gq_rows + col_b[None, :], gb.to(gq_ptr.dtype.element_ty), mask=m_t[:, None] & m_b[None, :])
        Sa += _dot(tl.trans(rka), v, IEEE)
        Sb += _dot(tl.trans(rkb), v, IEEE)
        za += tl.sum(fka, axis=0)
        zb += tl.sum(fkb, axis=0)


@triton.jit
def _causal_bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l,
                           sv_d, go_ptr, sg_b, sg_h, sg_l, sg_d, o_ptr, so_b, so_h, so_l, so_d, den_ptr,
                           gs_ptr, gz_ptr, gk_ptr, gv_ptr, gs0_ptr, gz0_ptr, mask_ptr, pos_ptr, pos_sb, theta_ptr,
                           H, L, Dk, Dv, HA,
                           FM: tl.constexpr, NORMALIZE: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                           HAS_MASK: tl.constexpr, HAS_GS: tl.constexpr, HAS_GZ: tl.constexpr, IEEE: tl.constexpr,
                           BT: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    col_a, col_b, m_a, m_b = _columns(Dk, HA, ROPE, INTERLEAVED, DH)
    e = tl.arange(0, DV)
    m_e = e < Dv
    t = tl.arange(0, BT)
    anti = t[None, :] >= t[:, None]  # [j, i]: i >= j
    ones_triu = tl.where(anti, 1.0, 0.0)
    sa_off = bh * Dk * Dv + col_a[:, None] * Dv + e[None, :]
    sb_off = bh * Dk * Dv + col_b[:, None] * Dv + e[None, :]
    ms_a = m_a[:, None] & m_e[None, :]
    ms_b = m_b[:, None] & m_e[None, :]
    if HAS_GS:
        Ra = tl.load(gs_ptr + sa_off, mask=ms_a, other=0.0)
        Rb = tl.load(gs_ptr + sb_off, mask=ms_b, other=0.0)
    else:
        Ra = tl.zeros([DH, DV], tl.float32)
        Rb = tl.zeros([DH, DV], tl.float32)
    if HAS_GZ:
        Za = tl.load(gz_ptr + bh * Dk + col_a, mask=m_a, other=0.0)
        Zb = tl.load(gz_ptr + bh * Dk + col_b, mask=m_b, other=0.0)
    else:
        Za = tl.zeros([DH], tl.float32)
        Zb = tl.zeros([DH], tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    n_chunks = tl.cdiv(L, BT)
    for ci in range(0, n_chunks):
        t0 = (n_chunks - 1 - ci) * BT
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        gn, gd = _grad_chunk(go_ptr + b * sg_b + h * sg_h, sg_l, sg_d, o_ptr + b * so_b + h * so_h, so_l, so_d,
                             den_ptr + bh * L, t0, L, Dv, NORMALIZE, BT, DV)
        bt = tl.where(anti, _dot(v, tl.trans(gn), IEEE), 0.0)  # [j, i] = v_j . gn_i, i >= j
        ga = _dot(v, tl.trans(Ra), IEEE) + _dot(bt, rqa, IEEE)
        gb = _dot(v, tl.trans(Rb), IEEE) + _dot(bt, rqb, IEEE)
        at = _dot(rka, tl.trans(rqa), IEEE) + _dot(rkb, tl.trans(rqb), IEEE)
        at = tl.where(anti, at, 0.0)
        gv = _dot(rka, Ra, IEEE) + _dot(rkb, Rb, IEEE) + _dot(at, gn, IEEE)
        Ra += _dot(tl.trans(rqa), gn, IEEE)
        Rb += _dot(tl.trans(rqb), gn, IEEE)
        if ROPE:
            ga, gb = ga * c + gb * s, gb * c - ga * s
        gdq_a = gd[:, None] * fqa
        gdq_b = gd[:, None] * fqb
        ga += Za[None, :] + _dot(ones_triu, gdq_a, IEEE)  # sum over i >= j of gd_i fq_i, plus later chunks
        gb += Zb[None, :] + _dot(ones_triu, gdq_b, IEEE)
        Za += tl.sum(gdq_a, axis=0)
        Zb += tl.sum(gdq_b, axis=0)
        rows = t0 + t
        m_t = rows < L
        keep = m_t
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * L + rows, mask=m_t, other=0) != 0)
        ga = tl.where(keep[:, None], ga * _dphi(ka, FM), 0.0)
        gb = tl.where(keep[:, None], gb * _dphi(kb, FM), 0.0)
        gk_rows = gk_ptr + (bh * L + rows[:, None]) * Dk
        tl.store(gk_rows + col_a[None, :], ga.to(gk_ptr.dtype.element_ty), mask=m_t[:, None] & m_a[None, :])
        tl.store(gk_rows + col_b[None, :], gb.to(gk_ptr.dtype.element_ty), mask=m_t[:, None] & m_b[None, :])
        tl.store(gv_ptr + (bh * L + rows[:, None]) * Dv + e[None, :], gv.to(gv_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_e[None, :])
    tl.store(gs0_ptr + sa_off, Ra, mask=ms_a)
    tl.store(gs0_ptr + sb_off, Rb, mask=ms_b)
    tl.store(gz0_ptr + bh * Dk + col_a, Za, mask=m_a)
    tl.store(gz0_ptr + bh * Dk + col_b, Zb, mask=m_b)


@triton.jit
def _full_fwd_kernel(q_ptr, k_ptr, v_ptr, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                     out_ptr, den_ptr, mask_ptr, pos_ptr, pos_sb, theta_ptr, H, L, Dk, Dv, HA, eps,
                     FM: tl.constexpr, NORMALIZE: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                     HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
                     BT: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    col_a, col_b, m_a, m_b = _columns(Dk, HA, ROPE, INTERLEAVED, DH)
    e = tl.arange(0, DV)
    m_e = e < Dv
    t = tl.arange(0, BT)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    Sa = tl.zeros([DH, DV], tl.float32)
    Sb = tl.zeros([DH, DV], tl.float32)
    za = tl.zeros([DH], tl.float32)
    zb = tl.zeros([DH], tl.float32)
    for t0 in range(0, L, BT):
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        Sa += _dot(tl.trans(rka), v, IEEE)
        Sb += _dot(tl.trans(rkb), v, IEEE)
        za += tl.sum(fka, axis=0)
        zb += tl.sum(fkb, axis=0)
    for t0 in range(0, L, BT):
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        num = _dot(rqa, Sa, IEEE) + _dot(rqb, Sb, IEEE)
        rows = t0 + t
        m_t = rows < L
        if NORMALIZE:
            den = tl.sum(fqa * za[None, :], axis=1) + tl.sum(fqb * zb[None, :], axis=1) + eps
            tl.store(den_ptr + bh * L + rows, den, mask=m_t)
            num = num * tl.where(den != 0.0, 1.0 / den, 0.0)[:, None]
        tl.store(out_ptr + (bh * L + rows[:, None]) * Dv + e[None, :], num.to(out_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_e[None, :])


@triton.jit
def _full_bwd_kernel(q_ptr, k_ptr, v_ptr, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                     go_ptr, sg_b, sg_h, sg_l, sg_d, o_ptr, so_b, so_h, so_l, so_d, den_ptr,
                     gq_ptr, gk_ptr, gv_ptr, mask_ptr, pos_ptr, pos_sb, theta_ptr, H, L, Dk, Dv, HA,
                     FM: tl.constexpr, NORMALIZE: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                     HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
                     BT: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    col_a, col_b, m_a, m_b = _columns(Dk, HA, ROPE, INTERLEAVED, DH)
    e = tl.arange(0, DV)
    m_e = e < Dv
    t = tl.arange(0, BT)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    go_base = go_ptr + b * sg_b + h * sg_h
    o_base = o_ptr + b * so_b + h * so_h
    Sa = tl.zeros([DH, DV], tl.float32)
    Sb = tl.zeros([DH, DV], tl.float32)
    Ra = tl.zeros([DH, DV], tl.float32)
    Rb = tl.zeros([DH, DV], tl.float32)
    za = tl.zeros([DH], tl.float32)
    zb = tl.zeros([DH], tl.float32)
    Za = tl.zeros([DH], tl.float32)
    Zb = tl.zeros([DH], tl.float32)
    for t0 in range(0, L, BT):
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        gn, gd = _grad_chunk(go_base, sg_l, sg_d, o_base, so_l, so_d, den_ptr + bh * L, t0, L, Dv, NORMALIZE, BT, DV)
        Sa += _dot(tl.trans(rka), v, IEEE)
        Sb += _dot(tl.trans(rkb), v, IEEE)
        Ra += _dot(tl.trans(rqa), gn, IEEE)
        Rb += _dot(tl.trans(rqb), gn, IEEE)
        za += tl.sum(fka, axis=0)
        zb += tl.sum(fkb, axis=0)
        Za += tl.sum(gd[:, None] * fqa, axis=0)
        Zb += tl.sum(gd[:, None] * fqb, axis=0)
    for t0 in range(0, L, BT):
        (qa, qb, fqa, fqb, rqa, rqb, ka, kb, fka, fkb, rka, rkb, v, c, s) = _load_chunk(
            q_base, k_base, v_base, sq_l, sq_d, sk_l, sk_d, sv_l, sv_d, mask_ptr + b * L, pos_ptr + b * pos_sb,
            theta_ptr, t0, L, Dv, col_a, col_b, m_a, m_b, FM, ROPE, HAS_MASK, BT, DH, DV)
        gn, gd = _grad_chunk(go_base, sg_l, sg_d, o_base, so_l, so_d, den_ptr + bh * L, t0, L, Dv, NORMALIZE, BT, DV)
        rows = t0 + t
        m_t = rows < L
        qa_g = _dot(gn, tl.trans(Sa), IEEE)
        qb_g = _dot(gn, tl.trans(Sb), IEEE)
        ka_g = _dot(v, tl.trans(Ra), IEEE)
        kb_g = _dot(v, tl.trans(Rb), IEEE)
        gv = _dot(rka, Ra, IEEE) + _dot(rkb, Rb, IEEE)
        if ROPE:
            qa_g, qb_g = qa_g * c + qb_g * s, qb_g * c - qa_g * s
            ka_g, kb_g = ka_g * c + kb_g * s, kb_g * c - ka_g * s
        if NORMALIZE:
            qa_g += gd[:, None] * za[None, :]
            qb_g += gd[:, None] * zb[None, :]
            ka_g += Za[None, :]
            kb_g += Zb[None, :]
        keep = m_t
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * L + rows, mask=m_t, other=0) != 0)
        qa_g = qa_g * _dphi(qa, FM)
        qb_g = qb_g * _dphi(qb, FM)
        ka_g = tl.where(keep[:, None], ka_g * _dphi(ka, FM), 0.0)
        kb_g = tl.where(keep[:, None], kb_g * _dphi(kb, FM), 0.0)
        rk_rows = (bh * L + rows[:, None]) * Dk
        ma2 = m_t[:, None] & m_a[None, :]
        mb2 = m_t[:, None] & m_b[None, :]
        tl.store(gq_ptr + rk_rows + col_a[None, :], qa_g.to(gq_ptr.dtype.element_ty), mask=ma2)
        tl.store(gq_ptr + rk_rows + col_b[None, :], qb_g.to(gq_ptr.dtype.element_ty), mask=mb2)
        tl.store(gk_ptr + rk_rows + col_a[None, :], ka_g.to(gk_ptr.dtype.element_ty), mask=ma2)
        tl.store(gk_ptr + rk_rows + col_b[None, :], kb_g.to(gk_ptr.dtype.element_ty), mask=mb2)
        tl.store(gv_ptr + (bh * L + rows[:, None]) * Dv + e[None, :], gv.to(gv_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_e[None, :])


# ---- launchers (the CUDA kernels of the custom ops; same signatures as the schemas) ---------------
def _check(q, k, v, feature_map, normalize, eps, rope, rope_base, positions, mask, S0=None, z0=None):
    """The C++ op's checks, for direct calls of the CUDA ops (the Python wrappers check first)."""
    if feature_map not in _FM:
        raise ValueError(f"kxkernels: feature_map must be 'elu+1', 'relu' or 'identity', got '{feature_map}'")
    if feature_map == "identity" and normalize:
        raise ValueError("kxkernels: feature_map='identity' requires normalize=False")
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"kxkernels: eps must be a finite number >= 0, got {eps}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"kxkernels: q, k must be (B, H, L, Dk) and v (B, H, L, Dv), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("kxkernels: q, k, v must have the same dtype")
    B, H, L, Dk = q.shape
    if min(B, H, L, Dk, v.shape[-1]) <= 0:
        raise ValueError("kxkernels: every size must be positive")
    if max(Dk, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"kxkernels: the Triton kernels take head dims up to {MAX_HEAD_DIM}, got Dk={Dk}, "
                         f"Dv={v.shape[-1]}")
    if rope and Dk % 2:
        raise ValueError(f"kxkernels: rope=True needs an even Dk, got Dk={Dk}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B, L)):
        raise ValueError(f"kxkernels: key_padding_mask must be bool (B, L) = {(B, L)}")
    if positions is not None and tuple(positions.shape) not in ((L,), (B, L)):
        raise ValueError(f"kxkernels: positions must have shape ({L},) or {(B, L)}")
    if (S0 is None) != (z0 is None):
        raise ValueError("kxkernels: initial_state needs both S and z")
    if S0 is not None:
        if S0.dtype != torch.float32 or z0.dtype != torch.float32:
            raise TypeError("kxkernels: initial_state must be float32")
        if tuple(S0.shape) != (B, H, Dk, v.shape[-1]) or tuple(z0.shape) != (B, H, Dk):
            raise ValueError("kxkernels: initial_state S must be (B, H, Dk, Dv) and z (B, H, Dk)")


def _common(q, v, feature_map, normalize, rope, rope_base, interleaved, positions, pos_offset, mask):
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    dev = q.device
    rope_pairs = rope and interleaved
    ha = Dk // 2 if rope else (Dk + 1) // 2
    if rope:
        theta = (rope_base ** (-2.0 * torch.arange(Dk // 2, dtype=torch.float64) / Dk)).to(torch.float32).to(dev)
        if positions is None:
            pos = pos_offset + torch.arange(L, device=dev, dtype=torch.int64)
        else:
            pos = positions.to(torch.int64).contiguous()
        pos_sb = L if pos.dim() == 2 else 0
    else:
        theta = torch.zeros(1, dtype=torch.float32, device=dev)
        pos, pos_sb = torch.zeros(1, dtype=torch.int64, device=dev), 0
    mask_i8 = mask.contiguous().view(torch.int8) if mask is not None else torch.zeros(1, dtype=torch.int8, device=dev)
    meta = dict(FM=_FM[feature_map], NORMALIZE=bool(normalize), ROPE=bool(rope), INTERLEAVED=bool(rope_pairs),
                HAS_MASK=mask is not None, IEEE=q.dtype == torch.float32,
                DH=max(16, triton.next_power_of_2(max(ha, 1))), DV=max(16, triton.next_power_of_2(Dv)))
    return B, H, L, Dk, Dv, ha, theta, pos, pos_sb, mask_i8, meta


def _config(meta):
    """BT and num_warps for the register tiles: bigger heads get more warps and shorter chunks."""
    return TUNING_CONFIGS[1] if meta["DH"] * meta["DV"] >= 32 * 64 else TUNING_CONFIGS[0]  # not tuned on a GPU


def _st(t):
    return tuple(t.stride())


def causal_forward(q, k, v, feature_map, normalize, eps, rope, rope_base, interleaved, positions, pos_offset,
                   key_padding_mask, initial_S, initial_z):
    _check(q, k, v, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask, initial_S, initial_z)
    B, H, L, Dk, Dv, ha, theta, pos, pos_sb, mask_i8, meta = _common(
        q, v, feature_map, normalize, rope, rope_base, interleaved, positions, pos_offset, key_padding_mask)
    out = torch.empty(B, H, L, Dv, dtype=q.dtype, device=q.device)
    den = torch.empty(B, H, L if normalize else 0, dtype=torch.float32, device=q.device)
    S = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    z = torch.empty(B, H, Dk, dtype=torch.float32, device=q.device)
    has_state = initial_S is not None
    s0 = initial_S.contiguous() if has_state else S
    z0 = initial_z.contiguous() if has_state else z
    cfg = _config(meta)
    _causal_fwd_kernel[(B * H,)](
        q, k, v, *_st(q), *_st(k), *_st(v), out, den if normalize else out, s0, z0, S, z, mask_i8, pos, pos_sb, theta,
        H, L, Dk, Dv, ha, float(eps), HAS_STATE=has_state, BT=cfg["BT"], num_warps=cfg["num_warps"], **meta)
    return out, den, S, z


def causal_backward(grad_out, grad_S, grad_z, q, k, v, out, den, feature_map, normalize, eps, rope, rope_base,
                    interleaved, positions, pos_offset, key_padding_mask, initial_S, initial_z):
    _check(q, k, v, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask, initial_S, initial_z)
    B, H, L, Dk, Dv, ha, theta, pos, pos_sb, mask_i8, meta = _common(
        q, v, feature_map, normalize, rope, rope_base, interleaved, positions, pos_offset, key_padding_mask)
    if tuple(grad_out.shape) != (B, H, L, Dv):
        raise ValueError(f"kxkernels: grad_out must have shape {(B, H, L, Dv)}, got {tuple(grad_out.shape)}")
    if normalize and tuple(den.shape) != (B, H, L):
        raise ValueError(f"kxkernels: den must be the forward denominator (B, H, L) = {(B, H, L)}")
    go = grad_out.to(q.dtype)
    gq = torch.empty(B, H, L, Dk, dtype=q.dtype, device=q.device)
    gk = torch.empty_like(gq)
    gv = torch.empty(B, H, L, Dv, dtype=q.dtype, device=q.device)
    gS0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    gz0 = torch.empty(B, H, Dk, dtype=torch.float32, device=q.device)
    has_state = initial_S is not None
    s0 = initial_S.contiguous() if has_state else gS0
    z0 = initial_z.contiguous() if has_state else gz0
    gs = grad_S.float().contiguous() if grad_S is not None else gS0
    gz = grad_z.float().contiguous() if grad_z is not None else gz0
    den_arg = den if normalize else gz0
    cfg = _config(meta)
    common = (q, k, v, *_st(q), *_st(k), *_st(v), go, *_st(go), out, *_st(out), den_arg)
    _causal_bwd_dq_kernel[(B * H,)](
        *common, s0, z0, gq, mask_i8, pos, pos_sb, theta, H, L, Dk, Dv, ha,
        HAS_STATE=has_state, BT=cfg["BT"], num_warps=cfg["num_warps"], **meta)
    _causal_bwd_dkv_kernel[(B * H,)](
        *common, gs, gz, gk, gv, gS0, gz0, mask_i8, pos, pos_sb, theta, H, L, Dk, Dv, ha,
        HAS_GS=grad_S is not None, HAS_GZ=grad_z is not None, BT=cfg["BT"], num_warps=cfg["num_warps"], **meta)
    return gq, gk, gv, gS0, gz0


def full_forward(q, k, v, feature_map, normalize, eps, rope, rope_base, interleaved, positions, pos_offset,
                 key_padding_mask):
    _check(q, k, v, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask)
    B, H, L, Dk, Dv, ha, theta, pos, pos_sb, mask_i8, meta = _common(
        q, v, feature_map, normalize, rope, rope_base, interleaved, positions, pos_offset, key_padding_mask)
    out = torch.empty(B, H, L, Dv, dtype=q.dtype, device=q.device)
    den = torch.empty(B, H, L if normalize else 0, dtype=torch.float32, device=q.device)
    cfg = _config(meta)
    _full_fwd_kernel[(B * H,)](
        q, k, v, *_st(q), *_st(k), *_st(v), out, den if normalize else out, mask_i8, pos, pos_sb, theta,
        H, L, Dk, Dv, ha, float(eps), BT=cfg["BT"], num_warps=cfg["num_warps"], **meta)
    return out, den


def full_backward(grad_out, q, k, v, out, den, feature_map, normalize, eps, rope, rope_base, interleaved,
                  positions, pos_offset, key_padding_mask):
    _check(q, k, v, feature_map, normalize, eps, rope, rope_base, positions, key_padding_mask)
    B, H, L, Dk, Dv, ha, theta, pos, pos_sb, mask_i8, meta = _common(
        q, v, feature_map, normalize, rope, rope_base, interleaved, positions, pos_offset, key_padding_mask)
    if tuple(grad_out.shape) != (B, H, L, Dv):
        raise ValueError(f"kxkernels: grad_out must have shape {(B, H, L, Dv)}, got {tuple(grad_out.shape)}")
    go = grad_out.to(q.dtype)
    gq = torch.empty(B, H, L, Dk, dtype=q.dtype, device=q.device)
    gk = torch.empty_like(gq)
    gv = torch.empty(B, H, L, Dv, dtype=q.dtype, device=q.device)
    cfg = _config(meta)
    _full_bwd_kernel[(B * H,)](
        q, k, v, *_st(q), *_st(k), *_st(v), go, *_st(go), out, *_st(out), den if normalize else gq,
        gq, gk, gv, mask_i8, pos, pos_sb, theta, H, L, Dk, Dv, ha,
        BT=cfg["BT"], num_warps=cfg["num_warps"], **meta)
    return gq, gk, gv
