"""Imports of peer libraries that do not import plainly on these machines (see ../shared/BENCHMARKING.md).

Nothing in ``kxkernels`` imports this module; benchmarks and tests use it to compare against peers.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path


class PeerUnavailable(ImportError):
    """The peer (or something its import needs) is not installed; the message says what."""


def _bare_package(name: str, path: Path) -> None:
    """Registers ``name`` as a package object whose submodules load from ``path``, without
    running the package's own ``__init__.py``."""
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]
    module.__path__ = [str(path)]
    module.__package__ = name
    sys.modules[name] = module


def import_bert4torch_layers():
    """bert4torch's ``layers`` package, importable without ``torchvision``.

    ``import bert4torch`` pulls in ``torchvision`` (no CPU build here) through its package
    ``__init__``; its layers import on their own once bare ``bert4torch`` and ``bert4torch.layers``
    package objects sit in ``sys.modules`` (they still need ``requests`` and ``pillow``).

    Returns:
        module: ``bert4torch.layers`` (``GlobalPointer``, ``EfficientGlobalPointer``, ...), with
        ``bert4torch.losses`` importable next to it.

    Raises:
        PeerUnavailable: bert4torch, requests or pillow is not installed, or the import failed.
    """
    done = sys.modules.get("bert4torch.layers")
    if done is not None and hasattr(done, "GlobalPointer"):
        return done  # imported before (by this function, or for real)
    spec = importlib.util.find_spec("bert4torch")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("bert4torch is not installed (pip install bert4torch requests pillow)")
    root = Path(list(spec.submodule_search_locations)[0])
    _bare_package("bert4torch", root)
    _bare_package("bert4torch.layers", root / "layers")
    layers = sys.modules["bert4torch.layers"]
    try:
        for sub in ("global_point", "position_encoding"):
            module = importlib.import_module(f"bert4torch.layers.{sub}")
            for name in dir(module):
                if not name.startswith("_"):
                    setattr(layers, name, getattr(module, name))
        importlib.import_module("bert4torch.losses")
    except Exception as e:  # a missing dependency of bert4torch, or an incompatible version
        raise PeerUnavailable(f"bert4torch's layers did not import: {type(e).__name__}: {e}") from e
    return layers
