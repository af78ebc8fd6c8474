"""The linear attention Triton launchers on CPU tensors under the Triton interpreter.

Run by test_linear_attention_interpret.py in a subprocess with TRITON_INTERPRET=1 (see
_interpreter.py); running this file directly without it fails at import. References: the float64
recurrent reference on the same (rounded) inputs, and the C++ CPU ops (same contract). Shapes are
tiny (the interpreter runs every program in numpy), but L spans more than one chunk.
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run these checks with TRITON_INTERPRET=1 set before triton is imported "
                       "(tests/triton/test_linear_attention_interpret.py does)")

import pytest  # noqa: E402
import torch  # noqa: E402

import kxkernels  # noqa: E402,F401  (loads the CPU ops)
from kxkernels.ops.linear_attention import reference as ref  # noqa: E402
from kxkernels.ops.linear_attention import triton as tk  # noqa: E402

ops = torch.ops.kxkernels

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")]

# relative RMS error against float64 math on the same inputs (see tests/ops/test_linear_attention.py)
REL_RMS = {torch.float32: 2e-6, torch.bfloat16: 1.2e-2}

CONFIGS = [  # (feature_map, normalize, rope, interleaved, mask, state)
    ("elu+1", True, False, True, False, False),
    ("elu+1", True, True, True, True, True),
    ("relu", True, True, False, True, False),
    ("identity", False, True, True, False, True),
    ("elu+1", False, False, True, True, True),
]


def rel_rms(a, e):
    a, e = a.detach().double(), e.detach().double()
    assert torch.isfinite(a).all()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def _args(cfg, B, H, L, Dk, Dv, dtype, positions=None):
    fm, normalize, rope, inter, with_mask, with_state = cfg
    q, k, v = ((0.5 * torch.randn(B, H, L, d, dtype=torch.float64)).to(dtype) for d in (Dk, Dk, Dv))
    mask = (torch.rand(B, L) > 0.3) if with_mask else None
    S0 = (0.3 * torch.randn(B, H, Dk, Dv)) if with_state else None
    z0 = (torch.rand(B, H, Dk) + 0.5) if with_state else None
    return [q, k, v, fm, normalize, 1e-6, rope, 10000.0, inter, positions, 0, mask, S0, z0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_causal_forward_backward(cfg, dtype):
    B, H, L, Dk, Dv = 1, 2, 70, 8, 6  # two chunks of 64
    args = _args(cfg, B, H, L, Dk, Dv, dtype)
    q, k, v = args[:3]
    out, den, S, z = tk.causal_forward(*args)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    fm, normalize, rope, inter, mask, S0, z0 = args[3], args[4], args[6], args[8], args[11], args[12], args[13]
    st64 = (S0.double().requires_grad_(), z0.double().requires_grad_()) if S0 is not None else None
    out64, (S64, z64) = ref.causal_linear_attention_recurrent(
        q64, k64, v64, feature_map=fm, normalize=normalize, rope=rope, interleaved=inter, key_padding_mask=mask,
        initial_state=st64, return_final_state=True)
    assert rel_rms(out, out64) <= REL_RMS[dtype]
    assert rel_rms(S, S64) <= max(REL_RMS[dtype], 1e-5) and rel_rms(z, z64) <= max(REL_RMS[dtype], 1e-5)
    # same contract as the C++ op: den and state agree too
    c_out, c_den, c_S, c_z = ops.causal_linear_attention_fwd(*args)
    torch.testing.assert_close(den, c_den, atol=1e-4, rtol=1e-4)
    go = torch.randn(B, H, L, Dv).to(dtype)
    gS, gz = torch.randn(B, H, Dk, Dv), torch.randn(B, H, Dk)
    gq, gk, gv, gS0, gz0 = tk.causal_backward(go, gS, gz, q, k, v, out, den, *args[3:])
    leaves = [q64, k64, v64] + (list(st64) if st64 is not None else [])
    g64 = torch.autograd.grad((out64, S64, z64), leaves, (go.double(), gS.double(), gz.double()))
    for a, e in zip((gq, gk, gv, gS0, gz0), g64):
        assert rel_rms(a, e) <= REL_RMS[dtype], "gradient"


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_non_causal_forward_backward(cfg):
    B, H, L, Dk, Dv = 2, 1, 70, 8, 12
    args = _args(cfg, B, H, L, Dk, Dv, torch.float32)[:12]
    q, k, v = args[:3]
    out, den = tk.full_forward(*args)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64 = ref.linear_attention(q64, k64, v64, feature_map=args[3], normalize=args[4], rope=args[6],
                                 interleaved=args[8], key_padding_mask=args[11])
    assert rel_rms(out, out64) <= 2e-6
    go = torch.randn(B, H, L, Dv)
    grads = tk.full_backward(go, q, k, v, out, den, *args[3:])
    for a, e in zip(grads, torch.autograd.grad(out64, (q64, k64, v64), go.double())):
        assert rel_rms(a, e) <= 2e-6


def test_positions_and_odd_sizes():
    """(B, L) positions, a Dk that is not a power of two, Dv = 1, L below one chunk."""
    B, H, L, Dk, Dv = 2, 1, 19, 6, 1
    pos = torch.randint(0, 3000, (B, L))
    args = _args(("elu+1", True, True, False, True, True), B, H, L, Dk, Dv, torch.float32, positions=pos)
    out, den, S, z = tk.causal_forward(*args)
    c_out, c_den, c_S, c_z = ops.causal_linear_attention_fwd(*args)
    torch.testing.assert_close(out, c_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S, c_S, atol=1e-5, rtol=1e-5)
    go = torch.randn(B, H, L, Dv)
    for a, e in zip(tk.causal_backward(go, None, None, *args[:3], out, den, *args[3:]),
                    ops.causal_linear_attention_bwd(go, None, None, *args[:3], c_out, c_den, *args[3:])):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_launcher_rejects_bad_input():
    args = _args(CONFIGS[0], 1, 1, 8, 4, 4, torch.float32)
    bad = list(args)
    bad[3] = "identity"
    with pytest.raises(ValueError, match="identity"):
        tk.causal_forward(*bad)
    bad = list(args)
    bad[5] = -1.0
    with pytest.raises(ValueError, match="eps"):
        tk.causal_forward(*bad)
