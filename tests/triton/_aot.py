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


AOT_KERNELS: list[AOTKernel] = [*_sparse_softmax_entries(), *_linear_attention_entries()]


def aot_cases():
    """(id, entry, config, cap) for every registry entry, config and target."""
    return [(f"{e.name}-{_config_id(cfg)}-sm{cap}", e, cfg, cap)
            for e in AOT_KERNELS for cfg, cap in e.cases()]
