"""Run a test module under the Triton interpreter, in a fresh pytest process.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and the parent pytest process
has already imported it (and must keep compiling for the AOT tests), so interpreted checks live
in modules named ``_interpret_<op>.py`` (not collected by the normal run) and a ``test_<op>_interpret.py``
calls ``run_under_interpreter("_interpret_<op>.py")``. The kernels then run on CPU tensors.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def run_under_interpreter(module: str, *pytest_args: str, timeout_s: float = 600.0) -> dict:
    """Run ``pytest tests/triton/<module>`` with TRITON_INTERPRET=1; fail with its output unless
    it exits 0 having passed at least one test and skipped none. Returns the outcome counts."""
    path = HERE / module
    if not path.is_file():
        raise FileNotFoundError(path)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(path),
           *pytest_args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    elapsed = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                               summary)}
    message = (f"`{' '.join(cmd)}` with TRITON_INTERPRET=1 exited {proc.returncode} after "
               f"{elapsed:.0f} s:\n{output[-20000:]}")
    assert proc.returncode == 0, message
    assert counts.get("passed", 0) > 0, "no interpreted test passed\n" + message
    assert not counts.get("skipped"), "interpreted tests were skipped\n" + message
    print(f"{module} under the Triton interpreter: {summary}")
    return counts
