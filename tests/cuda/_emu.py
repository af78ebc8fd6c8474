"""Run csrc/cuda/sinkhorn_kernel.cuh on the host: build tests/cuda/emu/sinkhorn_harness.cpp with g++
against the CUDA emulator (tests/cuda/emu/cuda_emu.h) and call it with the ops' arguments.

``SinkhornEmu(binary)`` mirrors the four ``torch.ops.kxkernels`` Sinkhorn/WRD ops: same arguments,
same outputs (CPU tensors; the forwards end with ``eps_reached`` (B,) float64), launched with the
glue's policy (csrc/cuda/sinkhorn.cu); float64 is not accepted, as on CUDA. Inputs keep their
strides (the harness gets the storage and the strides). The backwards take eps per problem (a
(B,) tensor, as the ops) or, for brevity, one float for every problem.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU_DIR = os.path.join(ROOT, "tests", "cuda", "emu")
KERNEL_DIR = os.path.join(ROOT, "csrc", "cuda")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def compiler():
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def build(out_dir: str) -> str:
    """Compile the harness into out_dir; returns the executable's path."""
    exe = os.path.join(out_dir, "sinkhorn_harness")
    cmd = [compiler(), "-std=c++17", "-O2", "-g", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
           "-I", EMU_DIR, "-I", os.path.join(EMU_DIR, "shim"), "-I", KERNEL_DIR,
           os.path.join(EMU_DIR, "sinkhorn_harness.cpp"), "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"harness build failed:\n{' '.join(cmd)}\n{r.stderr}")
    return exe


def _write(d, name, t):
    """The storage of t as raw bytes, t's strides kept (they go to meta)."""
    if t.storage_offset() != 0:
        t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)
    buf = bytes(t.untyped_storage())
    with open(os.path.join(d, name + ".bin"), "wb") as f:
        f.write(buf)


def _read(d, name, dtype, shape):
    with open(os.path.join(d, "out_" + name + ".bin"), "rb") as f:
        buf = bytearray(f.read())
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=n).reshape(shape).clone()


class SinkhornEmu:
    def __init__(self, exe: str, threads: int | None = None, seed: int = 1, smem_limit: int | None = None,
                 ws_blocks: int | None = None):
        self.exe, self.threads, self.seed, self.smem_limit = exe, threads, seed, smem_limit
        self.ws_blocks = ws_blocks  # cap on blocks per launch of a workspace group (several launches)
        self.groups = []  # the last call's launch groups: (threads, tier, mc, nc, count) each

    def _run(self, op, dtype, tensors, meta):
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"emulated CUDA kernels take float32/float16/bfloat16, got {dtype}")
        meta = dict(meta)
        if self.threads is not None:
            meta["threads"] = self.threads
        if self.smem_limit is not None:
            meta["smem_limit"] = self.smem_limit
        if self.ws_blocks is not None:
            meta["ws_blocks"] = self.ws_blocks
        meta["seed"] = self.seed
        d = tempfile.mkdtemp(prefix="kx_emu_")
        try:
            for name, t in tensors.items():
                _write(d, name, t)
            with open(os.path.join(d, "meta.txt"), "w") as f:
                for k, v in meta.items():
                    f.write(f"{k} {float(v)!r}\n")
            r = subprocess.run([self.exe, op, DTYPE_NAMES[dtype], d], capture_output=True, text=True)
            self.groups = [tuple(int(v) for v in line.split()) for line in r.stdout.splitlines() if line.strip()]
            if r.returncode != 0:
                raise RuntimeError(f"{op} ({DTYPE_NAMES[dtype]}) under the emulator failed "
                                   f"(rc {r.returncode}): {r.stderr.strip()}")
            return d
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise

    @staticmethod
    def _strides(prefix, t):
        return {f"{prefix}{i}": s for i, s in enumerate(t.stride())}

    @staticmethod
    def _problem_eps(eps, B):
        """The backward's per-problem eps as float64 (B,): a tensor as given, a float for all."""
        if isinstance(eps, torch.Tensor):
            return eps.to(torch.float64).contiguous()
        return torch.full((B,), float(eps), dtype=torch.float64)

    def sinkhorn_fwd(self, cost, a, b, eps, max_iter, tol, return_plan, newton=False, relative_eps=False):
        B, M, N = cost.shape
        meta = dict(B=B, M=M, N=N, eps=eps, tol=tol, max_iter=max_iter, return_plan=int(return_plan),
                    relative=int(relative_eps),
                    **self._strides("cs", cost), **self._strides("as", a), **self._strides("bs", b))
        d = self._run("sinkhorn_fwd", cost.dtype, dict(cost=cost, a=a, b=b), meta)
        try:
            out = (_read(d, "value", torch.float32, (B,)), _read(d, "dual", torch.float32, (B,)),
                   _read(d, "f", torch.float32, (B, M)), _read(d, "g", torch.float32, (B, N)),
                   _read(d, "n_iter", torch.int64, (B,)), _read(d, "err", torch.float32, (B,)),
                   _read(d, "plan", cost.dtype, (B, M, N)) if return_plan else torch.empty(0, dtype=cost.dtype),
                   _read(d, "eps_reached", torch.float64, (B,)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return out

    def sinkhorn_bwd(self, grad, cost, a, b, f, g, eps):
        B, M, N = cost.shape
        meta = dict(B=B, M=M, N=N, **self._strides("cs", cost), **self._strides("as", a),
                    **self._strides("bs", b))
        tensors = dict(cost=cost, a=a, b=b, grad=grad.float().contiguous(), f=f.float().contiguous(),
                       g=g.float().contiguous(), eps=self._problem_eps(eps, B))
        d = self._run("sinkhorn_bwd", cost.dtype, tensors, meta)
        try:
            return (_read(d, "grad_cost", cost.dtype, (B, M, N)), _read(d, "grad_a", cost.dtype, (B, M)),
                    _read(d, "grad_b", cost.dtype, (B, N)))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _token_args(self, x, y, x_mask, y_mask):
        B, M, D = x.shape
        N = y.shape[1]
        meta = dict(B=B, M=M, N=N, D=D, **self._strides("xs", x), **self._strides("ys", y))
        tensors = dict(x=x, y=y)
        for name, mk in (("x", x_mask), ("y", y_mask)):
            if mk is not None:
                meta[f"{name}_mask"] = 1
                meta.update(self._strides(f"{name}ms", mk))
                tensors[f"{name}_mask"] = mk
        return B, M, N, D, meta, tensors

    def wrd_fwd(self, x, y, x_mask, y_mask, eps, max_iter, tol, newton=False, relative_eps=False):
        B, M, N, D, meta, tensors = self._token_args(x, y, x_mask, y_mask)
        meta.update(eps=eps, tol=tol, max_iter=max_iter, relative=int(relative_eps))
        d = self._run("wrd_fwd", x.dtype, tensors, meta)
        try:
            return (_read(d, "value", torch.float32, (B,)), _read(d, "dual", torch.float32, (B,)),
                    _read(d, "f", torch.float32, (B, M)), _read(d, "g", torch.float32, (B, N)),
                    _read(d, "n_iter", torch.int64, (B,)), _read(d, "err", torch.float32, (B,)),
                    _read(d, "eps_reached", torch.float64, (B,)))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def wrd_bwd(self, grad, x, y, x_mask, y_mask, f, g, eps):
        B, M, N, D, meta, tensors = self._token_args(x, y, x_mask, y_mask)
        tensors.update(grad=grad.float().contiguous(), f=f.float().contiguous(), g=g.float().contiguous(),
                       eps=self._problem_eps(eps, B))
        d = self._run("wrd_bwd", x.dtype, tensors, meta)
        try:
            return _read(d, "grad_x", x.dtype, (B, M, D)), _read(d, "grad_y", x.dtype, (B, N, D))
        finally:
            shutil.rmtree(d, ignore_errors=True)
