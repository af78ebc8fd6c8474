"""The examples users copy: docstring Examples:: blocks and the README's Python block run."""
import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ["kxkernels.ops.sparse_softmax", "kxkernels.ops.global_pointer", "kxkernels.ops.rope_attention", "kxkernels.nn.attention", "kxkernels.integrations.transformers",
           "kxkernels.ops.linear_attention", "kxkernels.nn.linear_attention", "kxkernels.ops.sinkhorn"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
