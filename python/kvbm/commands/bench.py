"""``kvbm bench <name>``: benchmarks, one module per benchmark in :mod:`kvbm.bench`.

A benchmark module ``kvbm/bench/<name>.py`` provides ``add_parser(subparsers)`` (returns its
parser) and ``run(args)``, exactly like a subcommand; dropping a file there adds
``kvbm bench <name>``. A module without ``add_parser`` is a helper the benchmarks share. Each prints its figures, as one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import kvbm.bench


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run a benchmark (core, transfer, vllm, serve, all)")
    benches = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    for info in sorted(pkgutil.iter_modules(kvbm.bench.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"kvbm.bench.{info.name}")
        except Exception as e:  # noqa: BLE001 - reported when the benchmark is used
            sub = benches.add_parser(info.name, help=f"(unavailable: {e})")
            sub.set_defaults(_bench_run=_unavailable(info.name, e))
            continue
        if not hasattr(module, "add_parser"):
            continue  # a helper of the benchmarks (e.g. vllm_anchor), not a benchmark
        sub = module.add_parser(benches)
        sub.set_defaults(_bench_run=module.run)
    p.set_defaults(_bench_parser=p)
    return p


def _unavailable(name: str, error: BaseException):
    def run(_args: argparse.Namespace) -> int:
        print(f"kvbm bench: error: the '{name}' benchmark could not be loaded: {error!r}", file=sys.stderr)
        return 1

    return run


def run(args: argparse.Namespace) -> int | None:
    bench_run = getattr(args, "_bench_run", None)
    if bench_run is None:
        args._bench_parser.print_help(sys.stderr)
        return 2
    return bench_run(args)
