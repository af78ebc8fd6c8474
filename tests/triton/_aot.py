"""Compile-only checks of the package's Triton kernels: a registry and one compile helper.

Every Triton kernel of the package is listed in AOT_KERNELS with the argument types it is
launched with, its fixed constexprs, and the tuning configs its launcher chooses from. Each
entry is compiled for sm_80 and sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget(...))``;
no GPU or driver is needed: Triton's NVIDIA backend lowers to PTX and assembles it with the
``ptxas`` it ships in ``triton/backends/nvidia/bin`` (override with ``TRITON_PTXAS_PATH``).
A new op appends its entries to AOT_KERNELS.

Signature strings: pointers ``"*fp32"``, ``"*bf16"``, ``"*fp16"``, ``"*i64"``, ``"*i32"``; scalars
``"i32"``, ``"i64"``, ``"fp32"``; every ``tl.constexpr`` parameter as ``"constexpr"``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kxkernels.ops.global_pointer import triton as global_pointer_tk
from kxkernels.ops.rope_attention import triton as rope_attention_tk
from kxkernels.ops.linear_attention import triton as linear_attention_tk
from kxkernels.ops.sparse_softmax import triton as sparse_softmax_tk

CUDA_CAPS = (80, 90)
WARP_SIZE = 32
# largest shared memory one CTA may use (opt-in dynamic limit): A100 163 KB, H100 227 KB
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class AOTKernel:
    name: str  # test id
    fn: Any  # the @triton.jit function
    signature: dict  # argument name -> type string ("constexpr" for constexpr parameters)
    constexprs: dict  # fixed constexpr values
    configs: tuple  # each a dict of constexpr values plus "num_warps" (and optionally "num_stages")

    def cases(self):
        for cfg in self.configs:
            for cap in CUDA_CAPS:
                yield cfg, cap


def _config_id(cfg: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in cfg.items())


def compile_kernel(entry: AOTKernel, cfg: dict, cap: int):
    """Compile ``entry`` at config ``cfg`` for ``sm_<cap>``; returns the CompiledKernel."""
    cfg = dict(cfg)
    options = {"num_warps": cfg.pop("num_warps")}
    if "num_stages" in cfg:
        options["num_stages"] = cfg.pop("num_stages")
    constexprs = {**entry.constexprs, **cfg}
    fn = entry.fn
    names = list(fn.arg_names)
    missing = [n for n in names if n not in entry.signature]
    if missing:
        raise ValueError(f"{entry.name}: signature lacks {missing}")
    for n, v in entry.signature.items():
        if (v == "constexpr") != (n in constexprs):
            raise ValueError(f"{entry.name}: {n} is {v!r} in the signature but "
                             f"{'has' if n in constexprs else 'lacks'} a constexpr value")
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        # Triton >= 3.2 (3.6 on the GPU machine, 3.9 here): the signature names every argument,
        # constexprs included; constexpr values keyed by (argument index,) tuples, which every
        # such version accepts (3.9 would also take names).
        src = ASTSource(fn=fn, signature=dict(entry.signature),
                        constexprs={(names.index(n),): v for n, v in constexprs.items()})
    else:  # Triton 3.0/3.1: signature and constants keyed by argument index, constexprs apart
        src = ASTSource(fn=fn, signature={names.index(n): t for n, t in entry.signature.items()
                                          if t != "constexpr"},
                        constants={names.index(n): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, WARP_SIZE), options=options)


# ---- the registry -------------------------------------------------------------------------------
def _sparse_softmax_entries():
    tk = sparse_softmax_tk
    configs = tuple(tk.TUNING_CONFIGS)
    kp_max = triton.next_power_of_2(tk.MAX_K)
    entries = []
    for x_ty in ("fp32", "bf16"):
        # the full config sweep at the largest top-k (most registers); other dtypes at one config
        cfgs = configs if x_ty == "fp32" else configs[-1:]
        fwd = {"x_ptr": f"*{x_ty}", "x_row_stride": "i64", "probs_ptr": f"*{x_ty}", "index_ptr": "*i64",
               "V": "i32", "k": "i32", "KP": "constexpr", "BLOCK_V": "constexpr"}
        bwd = {"g_ptr": f"*{x_ty}", "g_stride0": "i64", "g_stride1": "i64", "p_ptr": f"*{x_ty}",
               "p_stride0": "i64", "p_stride1": "i64", "index_ptr": "*i64", "index_stride0": "i64",
               "index_stride1": "i64", "out_ptr": f"*{x_ty}", "V": "i32", "k": "i32",
               "KP": "constexpr", "BLOCK_V": "constexpr"}
        ce_fwd = {"x_ptr": f"*{x_ty}", "x_row_stride": "i64", "target_ptr": "*i64",
                  "target_stride": "i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "index_ptr": "*i64",
                  "V": "i32", "k": "i32", "ignore_index": "i64", "include_target": "i32",
                  "KP": "constexpr", "BLOCK_V": "constexpr"}
        ce_bwd = {"grad_loss_ptr": "*fp32", "grad_loss_stride": "i64", "x_ptr": f"*{x_ty}",
                  "x_row_stride": "i64", "target_ptr": "*i32", "target_stride": "i64",
                  "lse_ptr": "*fp32", "lse_stride": "i64", "index_ptr": "*i64", "index_stride0": "i64",
                  "index_stride1": "i64", "out_ptr": f"*{x_ty}", "V": "i32", "k": "i32",
                  "ignore_index": "i64", "include_target": "i32", "KP": "constexpr",
                  "BLOCK_V": "constexpr"}
        for name, fn, sig in (("sparse_softmax_fwd", tk._sparse_softmax_fwd_kernel, fwd),
                              ("sparse_softmax_bwd", tk._sparse_softmax_bwd_kernel, bwd),
                              ("sparse_softmax_ce_fwd", tk._sparse_softmax_ce_fwd_kernel, ce_fwd),
                              ("sparse_softmax_ce_bwd", tk._sparse_softmax_ce_bwd_kernel, ce_bwd)):
            entries.append(AOTKernel(f"{name}-{x_ty}-KP{kp_max}", fn, sig, {"KP": kp_max}, cfgs))
            if x_ty == "fp32":  # k = 1: one-slot vectors
                entries.append(AOTKernel(f"{name}-{x_ty}-KP1", fn, sig, {"KP": 1}, configs[:1]))
        # the large-k (threshold-select) kernels: BLOCK_K fixed, every config
        def no_kp(sig):
            return {n: t for n, t in sig.items() if n != "KP"}
        bk = {"BLOCK_K": "constexpr"}
        for name, fn, sig in (("sparse_softmax_fwd_large_k", tk._sparse_softmax_fwd_large_k_kernel, no_kp(fwd)),
                              ("sparse_softmax_bwd_large_k", tk._sparse_softmax_bwd_large_k_kernel,
                               {**no_kp(bwd), **bk}),
                              ("sparse_softmax_ce_fwd_large_k", tk._sparse_softmax_ce_fwd_large_k_kernel,
                               no_kp(ce_fwd)),
                              ("sparse_softmax_ce_bwd_large_k", tk._sparse_softmax_ce_bwd_large_k_kernel,
                               {**no_kp(ce_bwd), **bk})):
            fixed = {"BLOCK_K": tk.BLOCK_K} if "BLOCK_K" in sig else {}
            entries.append(AOTKernel(f"{name}-{x_ty}", fn, sig, fixed, cfgs))
    return entries


def _global_pointer_entries():
    """Every GlobalPointer kernel at every tuning config with fp32 inputs, D = 64 (BLOCK_D 64), all
    the optional parts on (mask, biases, RoPE, tril); with bf16 inputs, at the large config, the
    scores forward and the three fused-loss kernels (what a bf16 training step runs)."""
    tk = global_pointer_tk
    configs = tuple(tk.TUNING_CONFIGS)
    entries = []
    qk = lambda n, t: {f"{n}_ptr": f"*{t}", f"{n}s0": "i64", f"{n}s1": "i64", f"{n}s2": "i64", f"{n}s3": "i64"}  # noqa: E731
    flags = {"HAS_MASK": True, "ROPE": True, "INTERLEAVED": True, "TRIL": True, "BLOCK_D": 64}
    bias_flags = {"HAS_SB": True, "HAS_EB": True}
    ce = lambda names: {n: "constexpr" for n in names}  # noqa: E731
    tile_ce = ["HAS_MASK", "ROPE", "INTERLEAVED", "TRIL", "BLOCK_M", "BLOCK_N", "BLOCK_D"]
    for t in ("fp32", "bf16"):
        cfgs = configs if t == "fp32" else configs[-1:]
        fwd = {**qk("q", t), **qk("k", t), "mask_ptr": "*i8", "sb_ptr": "*fp32", "eb_ptr": "*fp32",
               "theta_ptr": "*fp32", "out_ptr": f"*{t}", "H": "i32", "L": "i32", "D": "i32", "scale": "fp32",
               **ce(["HAS_SB", "HAS_EB"] + tile_ce)}
        entries.append(AOTKernel(f"gp_fwd-{t}", tk._gp_fwd_kernel, fwd, {**flags, **bias_flags}, cfgs))
        g = {"g_ptr": f"*{t}", "gs0": "i64", "gs1": "i64", "gs2": "i64", "gs3": "i64"}
        dq = {**g, **qk("k", t), "mask_ptr": "*i8", "theta_ptr": "*fp32", "dq_ptr": f"*{t}", "dsb_ptr": "*fp32",
              "H": "i32", "L": "i32", "D": "i32", "scale": "fp32", **ce(tile_ce)}
        dk = {**g, **qk("q", t), "mask_ptr": "*i8", "theta_ptr": "*fp32", "dk_ptr": f"*{t}", "deb_ptr": "*fp32",
              "H": "i32", "L": "i32", "D": "i32", "scale": "fp32", **ce(tile_ce)}
        if t == "fp32":
            entries.append(AOTKernel(f"gp_bwd_dq-{t}", tk._gp_bwd_dq_kernel, dq, dict(flags), cfgs))
            entries.append(AOTKernel(f"gp_bwd_dk-{t}", tk._gp_bwd_dk_kernel, dk, dict(flags), cfgs))
        pos = {"cells_ptr": "*i64", "row_start_ptr": "*i64", "P": "i32", "max_per_row": "i32"}
        lf = {**qk("q", t), **qk("k", t), "mask_ptr": "*i8", "sb_ptr": "*fp32", "eb_ptr": "*fp32",
              "theta_ptr": "*fp32", **pos, "part_ptr": "*fp32", "H": "i32", "L": "i32", "D": "i32",
              "scale": "fp32", "NB": "i32", **ce(["HAS_SB", "HAS_EB"] + tile_ce)}
        entries.append(AOTKernel(f"gpl_fwd-{t}", tk._gpl_fwd_kernel, lf, {**flags, **bias_flags}, cfgs))
        lb = {"grad_ptr": "*fp32", "lse_neg_ptr": "*fp32", "lse_pos_ptr": "*fp32", **qk("q", t), **qk("k", t),
              "mask_ptr": "*i8", "sb_ptr": "*fp32", "eb_ptr": "*fp32", "theta_ptr": "*fp32", **pos}
        tail = {"H": "i32", "L": "i32", "D": "i32", "scale": "fp32", **ce(["HAS_SB", "HAS_EB"] + tile_ce)}
        entries.append(AOTKernel(f"gpl_bwd_dq-{t}", tk._gpl_bwd_dq_kernel,
                                 {**lb, "dq_ptr": f"*{t}", "dsb_ptr": "*fp32", **tail}, {**flags, **bias_flags}, cfgs))
        entries.append(AOTKernel(f"gpl_bwd_dk-{t}", tk._gpl_bwd_dk_kernel,
                                 {**lb, "dk_ptr": f"*{t}", "deb_ptr": "*fp32", **tail}, {**flags, **bias_flags}, cfgs))
        if t != "fp32":
            continue
        row = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        for y_t in (t,):  # bool labels reach the kernel as uint8: the same code, another pointer type
            mf = {"x_ptr": f"*{t}", "x_stride": "i64", "y_ptr": f"*{y_t}", "y_stride": "i64", "loss_ptr": "*fp32",
                  "lse_neg_ptr": "*fp32", "lse_pos_ptr": "*fp32", "bad_ptr": "*i32", "N": "i32", "C": "i32", **row}
            mb = {"g_ptr": "*fp32", "x_ptr": f"*{t}", "x_stride": "i64", "y_ptr": f"*{y_t}", "y_stride": "i64",
                  "lse_neg_ptr": "*fp32", "lse_pos_ptr": "*fp32", "out_ptr": f"*{t}", "N": "i32", "C": "i32", **row}
            entries.append(AOTKernel(f"mcce_fwd-{t}-{y_t}", tk._mcce_fwd_kernel, mf, {}, cfgs))
            entries.append(AOTKernel(f"mcce_bwd-{t}-{y_t}", tk._mcce_bwd_kernel, mb, {}, cfgs))
        sf = {"x_ptr": f"*{t}", "x_stride": "i64", "pos_ptr": "*i64", "P": "i32", "loss_ptr": "*fp32",
              "lse_neg_ptr": "*fp32", "lse_pos_ptr": "*fp32", "N": "i32", "C": "i32", "MASK_ZERO": "constexpr", **row}
        sbw = {"g_ptr": "*fp32", "x_ptr": f"*{t}", "x_stride": "i64", "pos_ptr": "*i64", "P": "i32",
               "lse_neg_ptr": "*fp32", "lse_pos_ptr": "*fp32", "out_ptr": f"*{t}", "N": "i32", "C": "i32",
               "MASK_ZERO": "constexpr", **row}
        entries.append(AOTKernel(f"smcce_fwd-{t}", tk._smcce_fwd_kernel, sf, {"MASK_ZERO": True}, cfgs))
        entries.append(AOTKernel(f"smcce_bwd-{t}", tk._smcce_bwd_kernel, sbw, {"MASK_ZERO": True}, cfgs))
    return entries


_ROPE_INT_ARGS = {"H", "L", "D", "R", "Hq", "Hk", "GROUP", "Lq", "Lk", "DV"}


def _rope_signature(fn, x_ty: str, constexprs) -> dict:
    """Launch types of a rope_attention kernel: tensors of the input dtype except lse/delta/theta
    (fp32), the mask (u8 view of bool) and positions (i64); strides i64; sizes i32."""
    special = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "theta_ptr": "*fp32", "kpm_ptr": "*u8",
               "qpos_ptr": "*i64", "kpos_ptr": "*i64", "pos_ptr": "*i64"}
    sig = {}
    for n in fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = special.get(n, f"*{x_ty}")
        elif n in _ROPE_INT_ARGS:
            sig[n] = "i32"
        elif n in ("scale", "scale_log2"):
            sig[n] = "fp32"
        elif n == "offset" or n.startswith("s") or n.endswith(("_sb", "_sl")):
            sig[n] = "i64"  # strides and the position offset
        else:
            raise ValueError(f"{fn.__name__}: no launch type for argument {n}")
    return sig


def _rope_attention_entries():
    tk = rope_attention_tk
    attn_flags = ("BLOCK_M", "BLOCK_N", "HALF", "PASS", "BLOCK_DV", "INTERLEAVED", "CAUSAL",
                  "HAS_MASK", "HAS_QPOS", "HAS_KPOS", "LOWP_DOT")
    attn = (("fwd", tk._rope_attn_fwd_kernel, tk.FWD_CONFIGS),
            ("bwd_dkdv", tk._rope_attn_bwd_dkdv_kernel, tk.BWD_CONFIGS),
            ("bwd_dq", tk._rope_attn_bwd_dq_kernel, tk.BWD_CONFIGS))
    # (name, dtype, fixed constexprs, which configs): the full sweep on the heaviest variant
    # (D = Dv = 128, every option on), then one config for other dtypes and column splits
    # (HALF / PASS: rotated pairs and pass-through tiles; HALF = 0 is rope=False).
    variants = (
        ("bf16-D128-all", "bf16", dict(HALF=64, PASS=0, BLOCK_DV=128, INTERLEAVED=True, CAUSAL=True,
                                       HAS_MASK=True, HAS_QPOS=True, HAS_KPOS=True, LOWP_DOT=True),
         slice(None)),
        ("fp32-D64-half-partial", "fp32", dict(HALF=16, PASS=32, BLOCK_DV=64, INTERLEAVED=False,
                                               CAUSAL=False, HAS_MASK=False, HAS_QPOS=False,
                                               HAS_KPOS=False, LOWP_DOT=False), slice(-1, None)),
        ("fp16-D64-norope", "fp16", dict(HALF=0, PASS=64, BLOCK_DV=32, INTERLEAVED=True,
                                         CAUSAL=True, HAS_MASK=True, HAS_QPOS=False,
                                         HAS_KPOS=False, LOWP_DOT=True), slice(0, 1)),
    )
    entries = []
    for vname, x_ty, cex, pick in variants:
        for kname, fn, configs in attn:
            sig = _rope_signature(fn, x_ty, set(cex) | {"BLOCK_M", "BLOCK_N"})
            assert set(attn_flags) <= set(sig)
            entries.append(AOTKernel(f"rope_attn_{kname}-{vname}", fn, sig, cex, tuple(configs[pick])))
    pre_cex = {"BLOCK_DV": 128}
    for x_ty in ("bf16", "fp32"):
        entries.append(AOTKernel(f"rope_attn_bwd_pre-{x_ty}", tk._rope_attn_bwd_pre_kernel,
                                 _rope_signature(tk._rope_attn_bwd_pre_kernel, x_ty,
                                                 {"BLOCK_M", "BLOCK_DV"}),
                                 pre_cex, tuple(tk.PRE_CONFIGS)))
    rope_variants = (("bf16-interleaved-pos", "bf16", dict(HALF=64, PASS=0, INTERLEAVED=True,
                                                            HAS_POS=True, INVERSE=False),
                      tuple(tk.ROPE_CONFIGS)),
                     ("fp32-half-partial-inverse", "fp32", dict(HALF=16, PASS=32, INTERLEAVED=False,
                                                                HAS_POS=False, INVERSE=True),
                      tuple(tk.ROPE_CONFIGS[:1])))
    for vname, x_ty, cex, configs in rope_variants:
        sig = _rope_signature(tk._rope_kernel, x_ty, set(cex) | {"BLOCK_L"})
        entries.append(AOTKernel(f"apply_rope-{vname}", tk._rope_kernel, sig, cex, configs))
    return entries


def _linear_attention_entries():
    """Every kernel with every feature on (RoPE, mask, state, normalize: the most registers) at the
    largest head the launchers take (MAX_HEAD_DIM = 64: DH = 32 lanes a half, DV = 64), float32 at
    every tuning config, bfloat16 (TF32 products) at one for the causal kernels."""
    tk = linear_attention_tk
    configs = tuple(tk.TUNING_CONFIGS)
    qkv = lambda ty: {f"{n}_ptr": f"*{ty}" for n in "qkv"}  # noqa: E731
    strides = {f"s{n}_{d}": "i64" for n in "qkv" for d in "bhld"}
    g_strides = {f"s{n}_{d}": "i64" for n in "go" for d in "bhld"}
    sizes = {"H": "i32", "L": "i32", "Dk": "i32", "Dv": "i32", "HA": "i32"}
    rope = {"mask_ptr": "*i8", "pos_ptr": "*i64", "pos_sb": "i64", "theta_ptr": "*fp32"}
    flags = {"FM": 0, "NORMALIZE": True, "ROPE": True, "INTERLEAVED": True, "HAS_MASK": True}
    tiles = {"BT": "constexpr", "DH": "constexpr", "DV": "constexpr"}

    def ce(names):
        return {n: "constexpr" for n in names}

    entries = []
    for ty, ieee in (("fp32", True), ("bf16", False)):
        fwd = {**qkv(ty), **strides, "out_ptr": f"*{ty}", "den_ptr": "*fp32", "s0_ptr": "*fp32", "z0_ptr": "*fp32",
               "s_ptr": "*fp32", "z_ptr": "*fp32", **rope, **sizes, "eps": "fp32",
               **ce([*flags, "HAS_STATE", "IEEE"]), **tiles}
        grad_in = {"go_ptr": f"*{ty}", **{k: v for k, v in g_strides.items() if k.startswith("sg")},
                   "o_ptr": f"*{ty}", **{k: v for k, v in g_strides.items() if k.startswith("so")}, "den_ptr": "*fp32"}
        dq = {**qkv(ty), **strides, **grad_in, "s0_ptr": "*fp32", "z0_ptr": "*fp32", "gq_ptr": f"*{ty}", **rope,
              **sizes, **ce([*flags, "HAS_STATE", "IEEE"]), **tiles}
        dkv = {**qkv(ty), **strides, **grad_in, "gs_ptr": "*fp32", "gz_ptr": "*fp32", "gk_ptr": f"*{ty}",
               "gv_ptr": f"*{ty}", "gs0_ptr": "*fp32", "gz0_ptr": "*fp32", **rope, **sizes,
               **ce([*flags, "HAS_GS", "HAS_GZ", "IEEE"]), **tiles}
        ffwd = {**qkv(ty), **strides, "out_ptr": f"*{ty}", "den_ptr": "*fp32", **rope, **sizes, "eps": "fp32",
                **ce([*flags, "IEEE"]), **tiles}
        fbwd = {**qkv(ty), **strides, **grad_in, "gq_ptr": f"*{ty}", "gk_ptr": f"*{ty}", "gv_ptr": f"*{ty}",
                **rope, **sizes, **ce([*flags, "IEEE"]), **tiles}
        for name, fn, sig, extra in (
                ("causal_fwd", tk._causal_fwd_kernel, fwd, {"HAS_STATE": True}),
                ("causal_bwd_dq", tk._causal_bwd_dq_kernel, dq, {"HAS_STATE": True}),
                ("causal_bwd_dkv", tk._causal_bwd_dkv_kernel, dkv, {"HAS_GS": True, "HAS_GZ": True}),
                ("full_fwd", tk._full_fwd_kernel, ffwd, {}),
                ("full_bwd", tk._full_bwd_kernel, fbwd, {})):
            sig = {n: sig[n] for n in fn.arg_names}  # the kernel's argument order
            fixed = {**flags, **extra, "IEEE": ieee}
            if ty == "bf16" and name.startswith("full"):
                continue
            entries.append(AOTKernel(f"linear_attention_{name}-{ty}-D{tk.MAX_HEAD_DIM}", fn, sig,
                                     {**fixed, "DH": tk.MAX_HEAD_DIM // 2, "DV": tk.MAX_HEAD_DIM},
                                     configs if ty == "fp32" else configs[:1]))
    return entries


AOT_KERNELS: list[AOTKernel] = [*_sparse_softmax_entries(), *_global_pointer_entries(), *_rope_attention_entries(),
                                 *_linear_attention_entries()]


def aot_cases():
    """(id, entry, config, cap) for every registry entry, config and target."""
    return [(f"{e.name}-{_config_id(cfg)}-sm{cap}", e, cfg, cap)
            for e in AOT_KERNELS for cfg, cap in e.cases()]
