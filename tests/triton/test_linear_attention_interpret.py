"""The linear attention Triton kernels on CPU tensors, under the Triton interpreter.

The checks are in _interpret_linear_attention.py; they run in a fresh pytest process with
TRITON_INTERPRET=1 (it must be set before triton is imported). This test fails, with the
subprocess's output, unless that run passes and skips nothing.
"""
from _interpreter import run_under_interpreter


def test_linear_attention_triton_interpreted():
    counts = run_under_interpreter("_interpret_linear_attention.py", timeout_s=900)
    assert counts["passed"] >= 12  # the interpreted module holds 12+ cases; none may vanish
