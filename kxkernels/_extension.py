"""Loads the compiled extension (kxkernels._C), which registers the torch.ops.kxkernels schemas
and CPU kernels. A failed load says which torch the extension was built for and which is installed."""
import torch

try:
    from kxkernels import _C  # noqa: F401  (registers TORCH_LIBRARY(kxkernels) on import)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    built_for = "unknown"
    try:
        import importlib.metadata as md
        built_for = md.version("kxkernels")
    except Exception:
        pass
    raise ImportError(
        f"kxkernels: cannot load the compiled extension kxkernels._C ({exc}). Installed torch is "
        f"{torch.__version__} (CUDA {torch.version.cuda}); the extension must be built against it: "
        f"reinstall with `pip install --no-build-isolation .` (package version {built_for})."
    ) from exc


def build_info() -> dict:
    """How the extension was built: torch version built against, CUDA on/off, archs, compiler,
    plus the torch installed now and which backend serves each op (see kxkernels._backend)."""
    from kxkernels import _backend

    info = dict(_C.build_info())
    info["torch_installed"] = torch.__version__
    info["backends"] = _backend.table()
    return info
