"""Test-wide settings: outputs of the C++ kernels are NaN-poisoned before they are written, so an
unwritten element fails its comparison (see csrc/common/output.h)."""
import os

os.environ.setdefault("KX_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
