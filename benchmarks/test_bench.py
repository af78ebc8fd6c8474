"""The benchmark cases under pytest-benchmark: one test per case of every benchmarks/bench_<op>.py.

    pytest benchmarks/test_bench.py --benchmark-only [-k sparse]
    KX_BENCH_QUICK=1 KX_BENCH_DEVICE=cpu KX_BENCH_ROUNDS=5 KX_BENCH_MAX_CASE_SECONDS=20 \
        pytest benchmarks/test_bench.py --benchmark-only

Each test times all the providers of its case in ONE test, round-robin: one pedantic round is
benchmarks.run.CaseTimer.run_round (the sgemm probe, then every provider once), so pytest-benchmark's
own statistics are of whole rounds (as many as fit in the per-case time cap of run.py by the
warm-up times, at least 3); the per-provider medians, speed-ups, peak memory, max error and
probe rates go to ``benchmark.extra_info`` (see ``--benchmark-json``). The plain ``pytest`` run
collects tests/ only (pyproject testpaths), never this file. Performance is reported, not asserted.
"""
from __future__ import annotations

import functools
import os

import pytest

from benchmarks import run

DEVICE = run.resolve_device(os.environ.get("KX_BENCH_DEVICE", "auto"))
QUICK = os.environ.get("KX_BENCH_QUICK", "0") not in ("", "0")
ROUNDS = int(os.environ.get("KX_BENCH_ROUNDS", run.ROUNDS_QUICK if QUICK else run.ROUNDS_DEFAULT))
MAX_CASE_SECONDS = float(os.environ.get("KX_BENCH_MAX_CASE_SECONDS", run.MAX_CASE_SECONDS))


@functools.cache
def _loaded(name: str) -> run.LoadedModule:
    return run.load_cases(name, DEVICE, QUICK)


@functools.cache
def _probe() -> run.SgemmProbe:
    return run.SgemmProbe(DEVICE)


@functools.cache
def _stream() -> run.StreamProbe:
    return run.StreamProbe(DEVICE)


def _test_id(*parts: str) -> str:
    return "-".join(parts).replace(" ", "_").replace("(", "").replace(")", "")


def _params():
    params = []
    for name in run.discover():
        loaded = _loaded(name)
        if loaded.error:
            params.append(pytest.param(name, None, id=_test_id(name, "cases")))
        for note in loaded.notes:
            params.append(pytest.param(name, None, id=_test_id(name, "skipped"),
                                       marks=pytest.mark.skip(reason=note)))
        params += [pytest.param(name, i, id=_test_id(name, c.op, c.shape)) for i, c in enumerate(loaded.cases)]
    return params


@pytest.mark.parametrize("name, index", _params())
def test_bench(benchmark, name, index):
    loaded = _loaded(name)
    if index is None:
        pytest.fail(f"benchmarks/bench_{name}.py: {loaded.error}")
    case = loaded.cases[index]
    timer = run.CaseTimer(case, _probe(), _stream())
    timer.warmup()
    if run.KX in timer.errors:
        pytest.fail(f"kxkernels failed on {case.op} [{case.shape}]: {timer.errors[run.KX]}")
    timer.measure_memory()
    benchmark.group = f"{case.op} [{case.shape}]"
    rounds = timer.planned_rounds(ROUNDS, MAX_CASE_SECONDS)
    benchmark.pedantic(timer.run_round, rounds=rounds, iterations=1, warmup_rounds=0)

    result = timer.summary()
    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    benchmark.extra_info.update({
        "providers_in_round": list(timer.fns),
        "median_ms": {n: ms(s) for n, s in result["median_s"].items()},
        "best_peer": result["best_peer"],
        "speedup_vs_reference": result["speedup_vs_reference"],
        "speedup_vs_best_peer": result["speedup_vs_best_peer"],
        "peak_memory_mib": {n: None if b is None else b / 2 ** 20 for n, b in result["peak_memory_bytes"].items()},
        "max_error": result["max_error"],
        "kx_gbps": result["kx_gbps"],
        "kx_gflops": result["kx_gflops"],
        "probe_gflops": result["probe_gflops"],
        "stream_gbps": result["stream_gbps"],
        "kx_over_floor": result["kx_over_floor"],
        "provider_errors": result["provider_errors"],
        "note": case.note,
    })
