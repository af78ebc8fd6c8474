"""Loads the compiled extension (kxkernels._C), which registers the torch.ops.kxkernels schemas
and CPU kernels. A failed load says which torch the extension was built for and which is installed."""
import torch

try:
    from kxkernels import _C  # noqa: F401  (registers TORCH_LIBRARY(kxkernels) on import)
except ImportError as exc:  # pragma: no cover - exercised by tests/test_build.py in a subprocess
    try:
        from kxkernels._build import TORCH_VERSION as _built_for
    except ImportError:
        _built_for = "unknown (kxkernels/_build.py is missing: the package was never built)"
    raise ImportError(
        f"kxkernels: cannot load the compiled extension kxkernels._C ({exc}). It was built against "
        f"torch {_built_for}; installed torch is {torch.__version__} (CUDA {torch.version.cuda}). "
        f"Rebuild it against the installed torch: reinstall with `pip install --no-build-isolation -e .`."
    ) from exc


def build_info() -> dict:
    """How the extension was built: torch version built against, CUDA on/off, archs, compiler,
    plus the torch installed now and which backend serves each op (see kxkernels._backend)."""
    from kxkernels import _backend

    info = dict(_C.build_info())
    info["torch_installed"] = torch.__version__
    info["backends"] = _backend.table()
    return info
