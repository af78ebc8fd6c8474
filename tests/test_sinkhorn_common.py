"""The Sinkhorn schedule and argument checks live in one place each (csrc/common/sinkhorn_schedule.h,
csrc/common/sinkhorn_checks.h): the reference reads the schedule from the extension, and neither
backend keeps its own copy of either."""
import os
import re

import pytest
import torch

from kxkernels import _C
from kxkernels.ops.sinkhorn import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def test_reference_schedule_is_the_extensions():
    s = _C.sinkhorn_schedule()
    assert set(s) == {"eps_ratio", "stage_sweeps", "stage_tol", "omega"}
    assert (R.EPS_RATIO, R.STAGE_SWEEPS, R.STAGE_TOL, R.OMEGA) == (
        s["eps_ratio"], s["stage_sweeps"], s["stage_tol"], s["omega"])
    assert 0 < s["eps_ratio"] < 1 and s["stage_sweeps"] >= 1 and 1 <= s["omega"] < 2
    header = _read("csrc/common/sinkhorn_schedule.h")
    for name, key in (("kEpsRatio", "eps_ratio"), ("kStageSweeps", "stage_sweeps"), ("kStageTol", "stage_tol"),
                      ("kOmega", "omega")):
        m = re.search(rf"constexpr \w+ {name} = ([0-9.e+-]+);", header)
        assert m and float(m.group(1)) == s[key], name


@pytest.mark.parametrize("rel", ["csrc/cpu/sinkhorn.cpp", "csrc/cpu/sinkhorn_kernels.h", "csrc/cuda/sinkhorn.cu", "csrc/cuda/sinkhorn_kernel.cuh",
                                 "kxkernels/ops/sinkhorn/reference.py"])
def test_no_second_copy(rel):
    src = _read(rel)
    for name in ("kEpsRatio", "kStageSweeps", "kStageTol"):
        assert not re.search(rf"constexpr \w+ {name} =", src), f"{rel} defines its own {name}"
    assert not re.search(r"^(EPS_RATIO|STAGE_SWEEPS|STAGE_TOL|OMEGA) = [0-9]", src, re.M), rel
    for fn in ("check_problem_tensors", "check_settings", "check_tokens", "check_potentials", "problem_eps"):
        assert not re.search(rf"^(inline )?(void|at::Tensor) {fn}\(", src, re.M), f"{rel} defines its own {fn}"


def test_cpu_op_uses_the_shared_checks():
    """The messages the shared header writes, from the CPU ops (the CUDA glue calls the same code)."""
    ops = torch.ops.kxkernels
    cost, a, b = torch.rand(2, 3, 4), torch.rand(2, 3), torch.rand(2, 4)
    eps2 = torch.full((2,), 0.1, dtype=torch.float64)  # the backward's per-problem eps (the forward's eps_reached)
    with pytest.raises(ValueError, match="b must have shape \\(2, 4\\)"):
        ops.sinkhorn_fwd(cost, a, torch.rand(2, 5), 0.1, 10, 1e-6, False, False)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ops.sinkhorn_fwd(cost, a, b, float("inf"), 10, 1e-6, False, False)
    with pytest.raises(ValueError, match="f must have shape \\(2, 3\\), got"):
        ops.sinkhorn_bwd(torch.ones(2), cost, a, b, torch.zeros(2, 4), torch.zeros(2, 4), eps2)
    with pytest.raises(ValueError, match="eps must be finite and > 0 for every problem"):
        ops.sinkhorn_bwd(torch.ones(2), cost, a, b, torch.zeros(2, 3), torch.zeros(2, 4),
                         torch.tensor([0.1, float("nan")], dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must have shape \\(2,\\)"):
        ops.sinkhorn_bwd(torch.ones(2), cost, a, b, torch.zeros(2, 3), torch.zeros(2, 4), eps2[:1])
    x, y = torch.rand(2, 3, 5), torch.rand(2, 4, 5)
    with pytest.raises(TypeError, match="y_mask must be bool"):
        ops.wrd_fwd(x, y, None, torch.ones(2, 4), 0.1, 10, 1e-6, False)
    with pytest.raises(ValueError, match="g must have shape \\(2, 4\\), got"):
        ops.wrd_bwd(torch.ones(2), x, y, None, None, torch.zeros(2, 3), torch.zeros(2, 5), eps2)
