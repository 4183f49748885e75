"""The one method every ``kvbm bench`` ratio uses: kvbm and its anchor in interleaved pairs.

A benchmark hands :func:`run_pairs` two callables, ``kvbm(i)`` and ``anchor(i)``, that each
measure one pass of pair ``i`` on the same data (same prompt, same buffers, same file) and
return a figure in the same unit (GB/s, seconds, tokens/s). The pairs run A B, B A, A B, ...:
the order alternates, so drift on a shared machine (another process starting, a disk flushing)
falls on both sides alike, and each pair gives one ratio ``kvbm / anchor`` taken moments apart.
The summary is the median ratio with its min, max and the pair count; a single pass of each
side, run at different moments, is never compared.

``--quick`` runs few, small pairs (a CI smoke run of the code path: its figures mean little);
the default is the stable mode, whose median ratio holds within +-10% across invocations
(measured with ``kvbm bench all --invocations 3``, BENCHMARKS.md).

This module's name starts with ``_`` so that ``kvbm bench`` does not list it as a benchmark.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, TypeVar

T = TypeVar("T")

STABLE_PAIRS = 9
QUICK_PAIRS = 2
MIN_STABLE_PAIRS = 5


def add_common_arguments(p: argparse.ArgumentParser, *, stable_pairs: int = STABLE_PAIRS) -> None:
    """--json, --quick and --pairs, the same for every benchmark."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: {QUICK_PAIRS} small pairs; the figures are not stable")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"interleaved kvbm/anchor pairs per ratio (default {stable_pairs}, "
                        f"{QUICK_PAIRS} with --quick; at least {MIN_STABLE_PAIRS} outside --quick)")
    p.set_defaults(_stable_pairs=stable_pairs)


def pair_count(args: argparse.Namespace) -> int:
    """The pairs to run: --pairs, else the mode's default. Raises ValueError when too few."""
    if args.pairs is not None:
        if args.pairs < 1:
            raise ValueError(f"--pairs must be at least 1, got {args.pairs}")
        if not args.quick and args.pairs < MIN_STABLE_PAIRS:
            raise ValueError(f"--pairs {args.pairs} is below {MIN_STABLE_PAIRS}; use --quick for a smoke run")
        return args.pairs
    return QUICK_PAIRS if args.quick else getattr(args, "_stable_pairs", STABLE_PAIRS)


def pin_process(cpus: set[int]) -> None:
    """Every thread of this process (kvbm's native threads too) on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that just ended


def on_each_cpu(sample: Callable[[], T]) -> list[tuple[int | None, T]]:
    """``sample()`` once with the whole process pinned to each allowed CPU: ``[(cpu, result)]``.

    On a shared VM one vCPU can run half as fast as another for minutes, and which one changes
    (vLLM's Python match took 11-14 ms on one and 20-24 ms on the other); a single-threaded
    figure then depends on where the scheduler put it. Sampled on each CPU in turn, both sides of
    a pair can keep their best, i.e. measure the same (fastest) CPU. The affinity is restored.
    """
    if not hasattr(os, "sched_getaffinity"):
        return [(None, sample())]
    allowed = os.sched_getaffinity(0)
    out = []
    try:
        for cpu in sorted(allowed):
            pin_process({cpu})
            out.append((cpu, sample()))
    finally:
        pin_process(allowed)
    return out


def best_on_each_cpu(sample: Callable[[], float]) -> float:
    """The highest of ``sample()`` over :func:`on_each_cpu`."""
    return max(v for _cpu, v in on_each_cpu(sample))


def summarize(values: list[float]) -> dict:
    """Median, min, max and count of a series (empty series: None figures, count 0)."""
    if not values:
        return {"median": None, "min": None, "max": None, "pairs": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "pairs": len(values)}


def run_pairs(kvbm: Callable[[int], float], anchor: Callable[[int], float] | None, pairs: int, *,
              warmup: bool = True) -> dict:
    """Runs ``pairs`` interleaved pairs; returns the ratio summary and both sides' figures.

    ``kvbm(i)`` and ``anchor(i)`` measure pair ``i``. Even pairs run kvbm first, odd pairs the
    anchor first. With ``warmup``, one untimed call of each (index -1) comes first, so that
    neither side pays a first-touch cost inside a pair. ``anchor`` None (the anchor's tool is
    missing): only kvbm's figures, and the ratio fields are None.

    Returns ``{"median", "min", "max", "pairs", "ratios", "kvbm": {...}, "anchor": {...}}``
    where the top-level figures are of the per-pair ratio ``kvbm / anchor``.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    if warmup:
        kvbm(-1)
        if anchor is not None:
            anchor(-1)
    k_values: list[float] = []
    a_values: list[float] = []
    ratios: list[float] = []
    for i in range(pairs):
        if anchor is None:
            k_values.append(float(kvbm(i)))
            continue
        if i % 2 == 0:
            k = float(kvbm(i))
            a = float(anchor(i))
        else:
            a = float(anchor(i))
            k = float(kvbm(i))
        k_values.append(k)
        a_values.append(a)
        ratios.append(k / a if a else float("inf"))
    out = summarize(ratios)
    out["pairs"] = pairs
    out["ratios"] = ratios
    out["kvbm"] = summarize(k_values)
    out["anchor"] = summarize(a_values)
    return out


def ratio_series(numerators: list[float], denominators: list[float]) -> dict:
    """A ratio summary from two per-pair series measured together (e.g. a TTFT and its limit)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"series of different lengths: {len(numerators)} and {len(denominators)}")
    ratios = [n / d if d else float("inf") for n, d in zip(numerators, denominators)]
    out = summarize(ratios)
    out["ratios"] = ratios
    out["kvbm"] = summarize(numerators)
    out["anchor"] = summarize(denominators)
    return out


def spread(medians: list[float]) -> dict:
    """How far repeated invocations' median ratios sit from their own median, in percent."""
    if not medians:
        return {"medians": [], "center": None, "spread_pct": None}
    center = statistics.median(medians)
    worst = max(abs(m - center) for m in medians)
    return {"medians": medians, "center": center, "spread_pct": 100.0 * worst / center if center else None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def filesystem(path: str) -> str | None:
    """The file system type of ``path`` (``findmnt``), or None when it cannot be told."""
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine(disk_dir: str | None = None) -> dict:
    """The machine a run measured, with its load at that moment."""
    out = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if disk_dir is not None:
        out["disk_dir"] = disk_dir
        out["disk_fs"] = filesystem(disk_dir)
    return out


def fmt_ratio(r: dict | None, digits: int = 2) -> str:
    """``0.97 [0.91-1.02]`` (median [min-max]) for text output and BENCHMARKS.md."""
    if not r or r.get("median") is None:
        return "n/a"
    return f"{r['median']:.{digits}f} [{r['min']:.{digits}f}-{r['max']:.{digits}f}]"
