"""What a benchmark module hands the runner (benchmarks/run.py).

Each benchmarks/bench_<op>.py defines ``cases(device: str, quick: bool) -> list[Case]``. Every
provider callable runs one measured step (forward, or forward + backward) and returns nothing
the runner needs; inputs are built once, outside the callables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Case:
    op: str                                   # e.g. "sparse_softmax_cross_entropy fwd+bwd"
    shape: str                                # e.g. "N=4096 V=32000 k=10"
    dtype: str                                # "float32", ...
    device: str                               # "cpu" or "cuda"
    kx: Callable[[], object]                  # kxkernels
    reference: Callable[[], object]           # the eager reference (kxkernels/ops/<op>/reference.py)
    peers: dict[str, Callable[[], object]] = field(default_factory=dict)  # installed peers
    max_error: Optional[Callable[[], float]] = None  # kxkernels vs reference (float64 where cheap)
    flops: Optional[float] = None             # useful floating-point work of one step
    bytes: Optional[float] = None             # minimum bytes one step must move
    # items (e.g. problems) one call of a provider handles, where providers run different amounts
    # (a slow reference on a subset): the runner then reports every time per item
    items: Optional[dict[str, int]] = None
    note: str = ""
