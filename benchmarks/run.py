"""One command runs every op's benchmarks.

    python -m benchmarks.run [--quick] [--device cpu|cuda|auto] [--ops sparse_softmax,sinkhorn]
                             [--rounds N] [--max-case-seconds S] [--out bench-results]

Every ``benchmarks/bench_<op>.py`` defines ``cases(device, quick) -> list[Case]``
(benchmarks/harness.py). For each case the runner warms every provider up (kxkernels, the eager
reference, each installed peer), then times them round-robin in this one process -- every round
runs each provider once, the start rotated by one each round so no provider always follows the
same neighbour -- and reports medians. Each round first runs a fixed sgemm probe whose rate shows
how contended the machine was (../shared/BENCHMARKING.md: throughput here swings for tens of
seconds at a time), and a stream probe (a large tensor copy) whose GB/s gives each case's
bandwidth floor: ``Case.bytes`` over that rate, printed as "kx / bandwidth floor". Results go to stdout (a markdown table) and to ``<out>/results.json``,
``results.md`` and ``speedups.png``. Performance is measured and reported, never asserted.

benchmarks/test_bench.py drives the same :class:`CaseTimer` from pytest-benchmark.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.harness import Case

BENCH_DIR = Path(__file__).resolve().parent
KX, REF = "kxkernels", "reference"
ROUNDS_DEFAULT, ROUNDS_QUICK = 7, 3
MIN_ROUNDS = 3
MAX_CASE_SECONDS = 20.0           # stop adding rounds to a case past this (after MIN_ROUNDS)
MIN_SAMPLE_SECONDS = 0.005        # shorter calls are repeated inside one sample (timer/launch overhead)
MAX_INNER_CALLS = 1000
PROBE_SIZE = {"cpu": 512, "cuda": 4096}   # square float32 sgemm, PROBE_REPS products per round
PROBE_REPS = 4
STREAM_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}   # the stream probe's tensor, well past the caches
STREAM_REPS = 2
RSS_SAMPLE_SECONDS = 0.001


# ---- timing ---------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, inner: int = 1) -> float:
    """Seconds per call of ``fn()``, over ``inner`` back-to-back calls; on CUDA the device is
    synchronized before the clock starts and before it stops."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


class SgemmProbe:
    """A fixed float32 matmul whose GFLOP/s, taken once per round, shows the machine's contention."""

    def __init__(self, device: str):
        self.device, self.size = device, PROBE_SIZE[device]
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.size, self.size, generator=gen).to(device)
        self.b = torch.randn(self.size, self.size, generator=gen).to(device)
        self.gflop = 2 * self.size ** 3 * PROBE_REPS / 1e9
        self.rate()                                   # warm-up: thread pool, kernels, allocator

    def _products(self):
        for _ in range(PROBE_REPS):
            torch.mm(self.a, self.b)

    def rate(self) -> float:
        self.last_seconds = time_call(self._products, self.device)
        return self.gflop / self.last_seconds

    def describe(self) -> str:
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        return f"{self.size}x{self.size}x{self.size} float32 torch.mm x{PROBE_REPS} on {self.device}{threads}"


class StreamProbe:
    """A fixed large tensor copy (``dst.copy_(src)``, both already resident) whose rate, taken once
    per round beside the sgemm probe, is the memory bandwidth of the same run: the floor of a
    memory-bound case is its ``Case.bytes`` over this rate. Counted as read + write (2 x the
    tensor's bytes), as ../shared/BENCHMARKING.md counts streaming bandwidth."""

    def __init__(self, device: str):
        self.device, self.nbytes = device, STREAM_BYTES[device]
        self.src = torch.ones(self.nbytes // 4, device=device)
        self.dst = torch.zeros_like(self.src)
        self.gb = 2 * self.nbytes * STREAM_REPS / 1e9
        self.rate()                                   # warm-up: pages touched, threads up

    def _copies(self):
        for _ in range(STREAM_REPS):
            self.dst.copy_(self.src)

    def rate(self) -> float:
        """GB/s of the copies (bytes read + bytes written over the time)."""
        self.last_seconds = time_call(self._copies, self.device)
        return self.gb / self.last_seconds

    def describe(self) -> str:
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        return (f"{self.nbytes >> 20} MiB float32 tensor copy_ x{STREAM_REPS} on {self.device}{threads}, "
                "read + write counted")


# ---- peak memory ----------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024   # reported in kB
    raise KeyError(key)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap pages back, so that RSS-before excludes memory held only by malloc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: str) -> str:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated() minus memory_allocated() before one call"
    if not os.path.exists("/proc/self/status"):
        return "not measured: no /proc (not Linux)"
    if _reset_hwm():
        return ("peak RSS increase of one call: kxkernels.memory.empty_cache() and malloc_trim(0) first, "
                "VmHWM reset via /proc/self/clear_refs, VmHWM after minus VmRSS before; never-touched "
                "zero pages are not counted")
    return (f"peak RSS increase of one call sampled every {RSS_SAMPLE_SECONDS * 1e3:.0f} ms by a thread "
            "(/proc/self/clear_refs not writable here): a lower bound, short peaks can be missed")


def _sampled_rss_peak(fn: Callable[[], object]) -> int:
    peak, done = [_rss_bytes()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(RSS_SAMPLE_SECONDS)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes())


def peak_memory(fn: Callable[[], object], device: str) -> Optional[int]:
    """Bytes one call of ``fn()`` needs above what was allocated before it (see memory_method)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not os.path.exists("/proc/self/status"):
        return None
    import kxkernels.memory  # outputs kxkernels keeps for reuse would hide its real peak

    kxkernels.memory.empty_cache()
    _malloc_trim()
    if _reset_hwm():
        before = _proc_status_bytes("VmRSS")
        fn()
        return max(0, _proc_status_bytes("VmHWM") - before)
    before = _rss_bytes()
    return max(0, _sampled_rss_peak(fn) - before)


# ---- one case -------------------------------------------------------------------------------------
def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


class CaseTimer:
    """Warm-up, round-robin timing rounds, peak memory and accuracy of one case.

    run.py and test_bench.py both drive this: ``warmup()``, ``measure_memory()``, ``run_round()``
    as many times as wanted, then ``summary()``. A provider that raises is dropped and its error
    kept; the others go on.
    """

    def __init__(self, case: Case, probe: SgemmProbe, stream: Optional["StreamProbe"] = None):
        self.case, self.probe, self.stream, self.device = case, probe, stream, case.device
        self.stream_gbps: list[float] = []
        self.fns: dict[str, Callable[[], object]] = {KX: case.kx, REF: case.reference, **case.peers}
        self.peer_names = list(case.peers)
        self.errors: dict[str, str] = {}
        self.inner: dict[str, int] = {}
        self.warmup_s: dict[str, float] = {}          # one timed warm-up call per provider
        self.times: dict[str, list[float]] = {name: [] for name in self.fns}
        self.memory: dict[str, Optional[int]] = {}
        self.probe_gflops: list[float] = []
        self.rounds = 0

    def _call_guarded(self, name: str, action: Callable[[], object]):
        try:
            return action()
        except Exception as e:
            self.errors[name] = _error_text(e)
            del self.fns[name]
            return None

    def warmup(self) -> None:
        """Each provider once (lazy init, compilation, allocator growth), then once timed to pick
        how many calls one sample needs."""
        for name, fn in list(self.fns.items()):
            seconds = self._call_guarded(name, lambda: (fn(), time_call(fn, self.device))[1])
            if seconds is not None:
                self.warmup_s[name] = seconds
                self.inner[name] = min(MAX_INNER_CALLS, max(1, math.ceil(MIN_SAMPLE_SECONDS / max(seconds, 1e-9))))

    def planned_rounds(self, rounds: int, max_seconds: float) -> int:
        """Rounds that fit in ``max_seconds`` by the warm-up times, at least MIN_ROUNDS (or
        ``rounds`` when fewer are asked); for drivers that fix the count up front (pytest)."""
        per_round = sum(self.warmup_s[n] * self.inner[n] for n in self.fns) + self.probe.last_seconds
        per_round += self.stream.last_seconds if self.stream is not None else 0.0
        return max(min(MIN_ROUNDS, rounds), min(rounds, int(max_seconds / max(per_round, 1e-9))))

    def measure_memory(self) -> None:
        for name, fn in list(self.fns.items()):
            self.memory[name] = self._call_guarded(name, lambda: peak_memory(fn, self.device))

    def run_round(self) -> None:
        """The sgemm probe, then every provider once; the start rotates by one each round."""
        gc.collect()
        self.probe_gflops.append(self.probe.rate())
        if self.stream is not None:
            self.stream_gbps.append(self.stream.rate())
        names = list(self.fns)
        if names:
            start = self.rounds % len(names)
            for name in names[start:] + names[:start]:
                seconds = self._call_guarded(name, lambda: time_call(self.fns[name], self.device,
                                                                     self.inner[name]))
                if seconds is not None:
                    self.times[name].append(seconds)
        self.rounds += 1

    def summary(self) -> dict:
        case = self.case
        per = lambda n: (case.items or {}).get(n, 1)  # noqa: E731  (times per item, see Case.items)
        median = {n: statistics.median(ts) / per(n) for n, ts in self.times.items() if ts and n not in self.errors}
        kx, ref = median.get(KX), median.get(REF)
        peers = {n: median[n] for n in self.peer_names if n in median}
        best_peer = min(peers, key=peers.get) if peers else None
        ratio = lambda other: other / kx if kx and other else None  # noqa: E731
        max_error, max_error_failure = None, None
        if case.max_error is not None and KX not in self.errors:
            try:
                max_error = float(case.max_error())
            except Exception as e:
                max_error_failure = _error_text(e)
        stream = statistics.median(self.stream_gbps) if self.stream_gbps else None
        floor_s = case.bytes / (stream * 1e9) if case.bytes and stream else None
        return {
            "op": case.op, "shape": case.shape, "dtype": case.dtype, "device": case.device, "note": case.note,
            "rounds": self.rounds,
            "calls_per_sample": self.inner,
            "times_s": self.times,                     # per round, seconds per call
            "median_s": median,
            "min_s": {n: min(ts) / per(n) for n, ts in self.times.items() if ts},
            "max_s": {n: max(ts) / per(n) for n, ts in self.times.items() if ts},
            "items_per_call": case.items,              # median/min/max are per item when set
            "best_peer": best_peer,
            "best_peer_s": peers.get(best_peer),
            "speedup_vs_reference": ratio(ref),
            "speedup_vs_best_peer": ratio(peers.get(best_peer)),
            "peak_memory_bytes": self.memory,
            "max_error": max_error,
            "max_error_failure": max_error_failure,
            "flops": case.flops, "bytes": case.bytes,
            # flops / bytes are per call: kx's rate uses its time per call (per-item median x its items)
            "kx_gflops": case.flops / (kx * per(KX)) / 1e9 if case.flops and kx else None,
            "kx_gbps": case.bytes / (kx * per(KX)) / 1e9 if case.bytes and kx else None,
            "provider_errors": self.errors,
            "probe_gflops": self.probe_gflops,
            "stream_gbps": self.stream_gbps,
            # kxkernels time over the bandwidth floor (Case.bytes / this case's median stream rate)
            "floor_s": floor_s,
            "kx_over_floor": kx * per(KX) / floor_s if kx and floor_s else None,
        }


def run_case(case: Case, probe: SgemmProbe, rounds: int, max_seconds: float,
             on_round: Callable[[int], None] = lambda r: None, stream: Optional[StreamProbe] = None) -> dict:
    """Warm up, measure memory, then rounds until ``rounds`` or ``max_seconds`` (at least
    MIN_ROUNDS, or ``rounds`` when fewer are asked)."""
    timer = CaseTimer(case, probe, stream)
    timer.warmup()
    timer.measure_memory()
    start, min_rounds = time.perf_counter(), min(MIN_ROUNDS, rounds)
    while timer.rounds < rounds and timer.fns:
        timer.run_round()
        on_round(timer.rounds)
        if timer.rounds >= min_rounds and time.perf_counter() - start > max_seconds:
            break
    return timer.summary()


# ---- discovery ------------------------------------------------------------------------------------
@dataclass
class LoadedModule:
    name: str                                  # "sparse_softmax" for benchmarks/bench_sparse_softmax.py
    cases: list[Case] = field(default_factory=list)
    error: Optional[str] = None                # why the module gave no cases
    notes: list[str] = field(default_factory=list)   # warnings it raised (skipped cases, ...)


def discover(only: Optional[list[str]] = None) -> list[str]:
    """Op names of benchmarks/bench_*.py, sorted; ``only`` keeps those (in its order, unknown
    names included so that loading them reports the missing file)."""
    found = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    return found if not only else list(dict.fromkeys(only))


def load_cases(name: str, device: str, quick: bool) -> LoadedModule:
    """Import benchmarks/bench_<name>.py and call its cases(); failures become ``error``, warnings
    raised from benchmarks/ (a case skipped and why) become ``notes``."""
    loaded = LoadedModule(name)
    if not (BENCH_DIR / f"bench_{name}.py").is_file():
        loaded.error = f"no benchmarks/bench_{name}.py"
        return loaded
    stage = "import"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            stage = "cases()"
            loaded.cases = list(module.cases(device, quick))
        except KeyboardInterrupt:
            raise
        except BaseException as e:            # also pytest.skip / SystemExit from a module
            loaded.error = f"{stage} failed: {_error_text(e)}"
    for w in caught:
        if Path(w.filename).resolve().parent == BENCH_DIR:
            loaded.notes.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return loaded


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return device


# ---- machine and regime ---------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return None


def _git_commit() -> Optional[str]:
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=BENCH_DIR, capture_output=True,  # noqa: E731
                                        text=True, timeout=10).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "") if commit else None
    except Exception:
        return None


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "kxkernels": _version("kxkernels"),
        "git_commit": _git_commit(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
    }
    try:
        import kxkernels
        info["kxkernels_build"] = kxkernels.build_info()
    except Exception as e:
        info["kxkernels_build"] = f"unavailable: {_error_text(e)}"
    return info


def malloc_regime() -> dict:
    env = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                      "GLIBC_TUNABLES", "LD_PRELOAD") if k in os.environ}
    if "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in env.get("GLIBC_TUNABLES", ""):
        summary = ("heap-kept malloc (mmap threshold set): large buffers are reused, page faults mostly "
                   "paid once; NOT what a default user setup sees")
    else:
        summary = ("default glibc malloc (MALLOC_MMAP_THRESHOLD_ unset): large tensors are fresh mmaps "
                   "and pay page faults on every call, as a user's process does")
    return {"summary": summary, "env": env}


# ---- report ---------------------------------------------------------------------------------------
COLUMNS = ["op", "shape", "dtype", "device", "kxkernels (ms)", "eager reference (ms)", "best peer (ms)",
           "speed-up vs reference", "speed-up vs best peer", "peak MiB kx / ref", "max error",
           "kx GFLOP/s / GB/s", "kx / bandwidth floor"]


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _x(ratio: Optional[float]) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def _num(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _provider_cell(r: dict, name: str) -> str:
    if name in r["provider_errors"]:
        return f"error: {r['provider_errors'][name]}"
    return _ms(r["median_s"].get(name))


def _row(r: dict) -> list[str]:
    mem = r["peak_memory_bytes"]
    mib = lambda n: _num(None if mem.get(n) is None else mem[n] / 2 ** 20, ".0f")  # noqa: E731
    peer = f"{r['best_peer']}: {_ms(r['best_peer_s'])}" if r["best_peer"] else "—"
    peer_errors = [f"{n}: error" for n in r["provider_errors"] if n not in (KX, REF)]
    error = _num(r["max_error"], ".2e") if r["max_error_failure"] is None else f"error: {r['max_error_failure']}"
    return [r["op"], r["shape"], r["dtype"], r["device"], _provider_cell(r, KX), _provider_cell(r, REF),
            "; ".join([peer] + peer_errors) if peer_errors else peer,
            _x(r["speedup_vs_reference"]), _x(r["speedup_vs_best_peer"]), f"{mib(KX)} / {mib(REF)}",
            error, f"{_num(r['kx_gflops'], '.1f')} / {_num(r['kx_gbps'], '.1f')}",
            _x(r.get("kx_over_floor"))]


def _module_rows(modules: list[LoadedModule]) -> list[list[str]]:
    return [[f"bench_{m.name}", "not run", "—", "—", m.error] + ["—"] * (len(COLUMNS) - 5)
            for m in modules if m.error]


def _probe_line(rates: list[float], probe_desc: str) -> str:
    if not rates:
        return f"sgemm probe ({probe_desc}): no rounds ran"
    return (f"sgemm probe ({probe_desc}), one per round: median {statistics.median(rates):.0f} GFLOP/s, "
            f"min {min(rates):.0f}, max {max(rates):.0f} over {len(rates)} rounds "
            "(a low min or a wide spread means the timings ran under contention)")


def _stream_line(rates: list[float], desc: str) -> str:
    if not rates:
        return f"stream probe ({desc}): no rounds ran"
    return (f"stream probe ({desc}), one per round: median {statistics.median(rates):.1f} GB/s, "
            f"min {min(rates):.1f}, max {max(rates):.1f} over {len(rates)} rounds; kx / bandwidth floor = "
            "kxkernels time / (bytes the case must move / the median stream rate of its own rounds)")


def markdown_report(results: list[dict], modules: list[LoadedModule], report: dict) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    rows = [_row(r) for r in results] + _module_rows(modules)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    m = report["machine"]
    lines += [
        "",
        _probe_line(report["probe"]["gflops"], report["probe"]["description"]),
        _stream_line(report["stream"]["gbps"], report["stream"]["description"]),
        f"malloc regime: {report['malloc_regime']['summary']}"
        + (f" {report['malloc_regime']['env']}" if report["malloc_regime"]["env"] else ""),
        f"timing: median over round-robin rounds ({report['settings']['rounds']} asked, capped at "
        f"{report['settings']['max_case_seconds']:.0f} s of rounds per case, at least {MIN_ROUNDS}), "
        f"{'torch.cuda.synchronize() around each sample' if m['device'] == 'cuda' else 'time.perf_counter'}; "
        "speed-up = other time / kxkernels time (> 1: kxkernels is faster)",
        f"peak memory: {report['memory_method']}",
        f"machine: {m['device_name']} ({m['cpus_usable']} usable CPUs, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, loadavg at start {m['loadavg_at_start']}, {m['date']}, commit {m['git_commit']}",
    ]
    notes = [f"{r['op']} [{r['shape']}]: {r['note']}" for r in results if r["note"]]
    notes += [f"bench_{m.name}: {n}" for m in modules for n in m.notes]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_speedups(results: list[dict], path: Path, title: str) -> Optional[str]:
    """Horizontal bars of both speed-ups per case on a log axis; returns why not, if not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        return f"no plot: {e} (pip install matplotlib)"
    rows = [r for r in results if r["speedup_vs_reference"] or r["speedup_vs_best_peer"]]
    if not rows:
        return "no plot: no case has a speed-up"
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.55 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    height = 0.38
    for offset, key, label, color in ((height / 2, "speedup_vs_reference", "vs eager reference", "tab:blue"),
                                      (-height / 2, "speedup_vs_best_peer", "vs best peer", "tab:orange")):
        vals = [(y + offset, r[key]) for y, r in zip(ys, rows) if r[key]]
        # bars grow from 1x: right for a speed-up, left for a slow-down
        bars = ax.barh([y for y, _ in vals], [v - 1 for _, v in vals], left=1, height=height,
                       color=color, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}x" for _, v in vals], padding=3, fontsize=8)
    ax.set_yticks(ys, [f"{r['op']}\n{r['shape']}" + (f"\npeer: {r['best_peer']}" if r["best_peer"] else "")
                       for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("speed-up of kxkernels (other time / kxkernels time, log scale; > 1 = faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ratios = [r[k] for r in rows for k in ("speedup_vs_reference", "speedup_vs_best_peer") if r[k]]
    ax.set_xlim(min(min(ratios), 1) / 1.6, max(max(ratios), 1) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


# ---- progress -------------------------------------------------------------------------------------
class _Progress:
    """rich progress bar on stderr when rich is installed, else one line per step."""

    def __init__(self):
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=False)
        except ImportError:
            self._bar = None
        self._task, self._total = None, 0

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=None)
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)

    def add(self, steps: int):
        self._total += steps
        if self._bar:
            self._bar.update(self._task, total=self._total)

    def step(self, description: str, advance: int = 0):
        if self._bar:
            self._bar.update(self._task, description=description, advance=advance)
        else:
            print(f"[bench] {description}", file=sys.stderr, flush=True)


# ---- main -----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer rounds")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--ops", default="", help="comma-separated op names (bench_<op>.py); default all")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timing rounds per case (default {ROUNDS_DEFAULT}, quick {ROUNDS_QUICK})")
    parser.add_argument("--max-case-seconds", type=float, default=MAX_CASE_SECONDS,
                        help="stop adding rounds to a case past this many seconds (keeps at least 3)")
    parser.add_argument("--out", default="bench-results", help="folder for results.json/.md, speedups.png")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")

    device = resolve_device(args.device)
    rounds = args.rounds or (ROUNDS_QUICK if args.quick else ROUNDS_DEFAULT)
    names = discover([s.strip() for s in args.ops.split(",") if s.strip()])
    report = {
        "machine": machine_info(device),
        "malloc_regime": malloc_regime(),
        "memory_method": memory_method(device),
        "settings": {"quick": args.quick, "device": device, "rounds": rounds,
                     "max_case_seconds": args.max_case_seconds, "ops": names, "argv": sys.argv},
    }
    probe, stream = SgemmProbe(device), StreamProbe(device)
    results, modules = [], []
    with _Progress() as progress:
        for name in names:
            progress.step(f"{name}: building cases")
            loaded = load_cases(name, device, args.quick)
            modules.append(loaded)
            progress.add(len(loaded.cases) * rounds)
            while loaded.cases:                   # drop each case once run: its tensors can go
                case = loaded.cases.pop(0)
                label = f"{case.op} [{case.shape}]"
                progress.step(f"{label}: warm-up")
                on_round = lambda r: progress.step(f"{label}: round {r}/{rounds}", advance=1)  # noqa: E731
                result = run_case(case, probe, rounds, args.max_case_seconds, on_round, stream)
                progress.step(f"{label}: done", advance=rounds - result["rounds"])
                results.append(result)
                del case
                gc.collect()
    all_rates = [g for r in results for g in r["probe_gflops"]]
    report["machine"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["probe"] = {
        "description": probe.describe(), "gflops": all_rates,
        "median": statistics.median(all_rates) if all_rates else None,
        "min": min(all_rates, default=None), "max": max(all_rates, default=None),
    }
    all_gbps = [g for r in results for g in r["stream_gbps"]]
    report["stream"] = {
        "description": stream.describe(), "gbps": all_gbps,
        "median": statistics.median(all_gbps) if all_gbps else None,
    }
    report["modules"] = {m.name: {"error": m.error, "notes": m.notes} for m in modules}
    report["results"] = results

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = markdown_report(results, modules, report)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    why_not = plot_speedups(results, out / "speedups.png",
                            f"kxkernels on {report['machine']['device_name']} ({device}), "
                            f"{report['machine']['date']}; sgemm probe median "
                            f"{_num(report['probe']['median'], '.0f')} GFLOP/s")
    print(markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {out / 'speedups.png'}" if why_not is None else f" ({why_not})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
