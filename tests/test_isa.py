"""The CPU ISA dispatch (csrc/common/isa.h): every compiled level the CPU can run gives the
vector helpers of csrc/common/simd.h right (exp accuracy, fp16/bf16 rounding as torch's .to(),
tails shorter than a vector), and the level can be chosen and reported."""
import pytest
import torch

import kxkernels
from kxkernels import _C

LEVELS = ["baseline", "avx2", "avx512"]
_ORDER = {name: i for i, name in enumerate(LEVELS)}


def runnable(level):
    return _ORDER[level] <= _ORDER[_C.build_info()["cpu_isa_supported"]]


@pytest.fixture
def isa_level(request):
    level = request.param
    if not runnable(level):
        pytest.skip(f"this CPU runs at most {_C.build_info()['cpu_isa_supported']}; {level} is compiled but cannot run here")
    before = _C.cpu_isa()
    assert _C.set_cpu_isa(level) == level
    yield level
    _C.set_cpu_isa(before)


def _inputs():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("-inf"), float("inf"), float("nan"), -103.9, -104.0, -87.3, -87.4, 88.3, 88.72,
                            88.73, 0.0, -0.0, 1e-30, 65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 3.0e38, -100.0])
    # Every length from 0 to 40 exercises the vector tails at 4, 8 and 16 lanes.
    return [torch.randn(n, generator=g) * 20 for n in range(41)] + [torch.randn(4099, generator=g) * 30, special]


@pytest.mark.parametrize("isa_level", LEVELS, indirect=True)
def test_simd_helpers_match_torch(isa_level):
    for x in _inputs():
        exp, bf, hf, bf_back, hf_back = torch.ops.kxkernels._isa_selftest(x)
        ref = torch.exp(x.double())
        f32 = torch.finfo(torch.float32)
        finite = (ref >= f32.tiny) & (ref <= f32.max)
        rel = ((exp.double() - ref).abs() / ref)[finite]
        assert rel.numel() == 0 or rel.max().item() < 2.5e-7, f"exp error {rel.max().item():.3g} at {isa_level}"
        # subnormal results: absolute error within one subnormal step of float32's
        sub = ref < f32.tiny
        assert ((exp.double() - ref).abs()[sub] <= 2 * 1.4e-45).all()
        assert torch.equal(torch.isnan(exp), torch.isnan(x))
        over = ref > 1.0001 * f32.max
        assert (exp[over] == float("inf")).all() and (exp[ref == 0] == 0).all()
        for got, dtype in ((bf, torch.bfloat16), (hf, torch.float16)):
            want = x.to(dtype)
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(got), nan)
            assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), f"{dtype} rounding at {isa_level}"
        assert torch.allclose(bf_back, bf.float(), equal_nan=True, rtol=0, atol=0)
        assert torch.allclose(hf_back, hf.float(), equal_nan=True, rtol=0, atol=0)


def test_level_is_reported_and_settable():
    info = kxkernels.build_info()
    assert info["cpu_isa_levels"] == ("baseline", "avx2", "avx512")
    assert info["cpu_isa"] in LEVELS and runnable(info["cpu_isa"])
    before = _C.cpu_isa()
    try:
        assert _C.set_cpu_isa("baseline") == "baseline"
        assert _C.build_info()["cpu_isa"] == "baseline"
        # a cap above what the CPU supports runs the supported level
        assert _C.set_cpu_isa("avx512") == info["cpu_isa_supported"]
        with pytest.raises(ValueError, match="isa must be"):
            _C.set_cpu_isa("avx9000")
    finally:
        _C.set_cpu_isa(before)


def test_env_variable_caps_level():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import kxkernels; print(kxkernels.build_info()['cpu_isa'])"],
                         env={**__import__("os").environ, "KX_CPU_ISA": "baseline"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "baseline"
