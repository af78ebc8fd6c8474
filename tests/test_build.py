"""The installed extension: build info, backend selection and its reasons."""
import subprocess
import sys

import pytest
import torch

import kxkernels
from kxkernels import _backend


def test_build_info():
    info = kxkernels.build_info()
    assert info["torch_version"] == torch.__version__ == info["torch_installed"]
    assert isinstance(info["cuda"], bool) and info["cuda"] == (torch.version.cuda is not None and info["cuda"])
    assert info["compiler"]
    for op in ("sparse_softmax", "sparse_softmax_cross_entropy"):
        assert info["backends"][op]["cpu"] == {"cpp": "available"}


def test_backend_select_and_reasons():
    assert _backend.select("sparse_softmax", "cpu") == "cpp"
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="no CUDA device"):
            _backend.select("sparse_softmax", "cuda")
    with pytest.raises(NotImplementedError, match="no implementation"):
        _backend.select("no_such_op", "cpu")


def test_public_api_is_exactly_the_contract():
    assert set(kxkernels.__all__) <= {n for n in dir(kxkernels) if not n.startswith("_")}
    for name in ("sparse_softmax", "sparse_softmax_cross_entropy", "build_info"):
        assert callable(getattr(kxkernels, name))


def test_import_error_names_torch_versions(tmp_path):
    """A broken extension: the ImportError says which torch is installed and how to rebuild."""
    fake = tmp_path / "kxkernels"
    fake.mkdir()
    src = (kxkernels.__file__.rsplit("/", 1)[0])
    for name in ("__init__.py", "_extension.py", "_build.py"):
        (fake / name).write_text(open(f"{src}/{name}").read())
    (fake / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    code = "import sys; sys.path.insert(0, %r); import kxkernels" % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "built against torch" in out.stderr and torch.__version__ in out.stderr
    assert "installed torch is" in out.stderr and "reinstall" in out.stderr
