"""``kvbm bench distributed``: leader/worker round-trip overhead of one transfer request.

For 1, 2 and 4 local worker *processes*, the leader sends an op with no blocks to every worker
and waits for every acknowledgement; the figure is the median round trip in microseconds over
``--iterations`` requests after a warm-up. The timing loop is native
(``kvbm._core.DistributedBenchLeader.measure``); each worker is a child Python process running
``kvbm._core.run_noop_worker`` (no bytes moved). Where the extension lacks those bindings, the
``kvbm_worker_proc`` executable (``$KVBM_WORKER_PROC`` or on ``PATH``) is used instead through its
``--bench-leader`` mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

_WORKER_CODE = (
    "import sys\n"
    "from kvbm._core import run_noop_worker\n"
    "sys.exit(run_noop_worker(int(sys.argv[1]), int(sys.argv[2]), '127.0.0.1', int(sys.argv[3]), int(sys.argv[4])))\n"
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distributed", help="leader -> workers -> ack round trip (1, 2, 4 worker processes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--iterations", type=int, default=2000, help="timed requests per world size (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed requests first (default 200)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    return p


def _measure_with_bindings(core, world: int, warmup: int, iterations: int) -> float:
    leader = core.DistributedBenchLeader(world, 60.0)
    env = dict(os.environ)
    # The children must import the same kvbm as this process.
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(rank), str(world), str(leader.pub_port), str(leader.ack_port)],
            env=env,
        )
        for rank in range(world)
    ]
    try:
        leader.wait_ready()
        return leader.measure(warmup, iterations)
    finally:
        leader.close()  # says goodbye: the workers exit
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _measure_with_executable(binary: str, world: int, warmup: int, iterations: int) -> float:
    out = subprocess.run(
        [binary, "--bench-leader", str(world), "--iterations", str(iterations), "--warmup", str(warmup)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["median_us"])


def run(args: argparse.Namespace) -> int:
    try:
        from kvbm import _core as core
    except ImportError:
        core = None
    use_bindings = core is not None and hasattr(core, "DistributedBenchLeader")
    binary = None
    if not use_bindings:
        binary = os.environ.get("KVBM_WORKER_PROC") or shutil.which("kvbm_worker_proc")
        if binary is None:
            print(
                "kvbm bench distributed: error: kvbm._core has no DistributedBenchLeader and "
                "kvbm_worker_proc was not found (set KVBM_WORKER_PROC)",
                file=sys.stderr,
            )
            return 1
    result: dict = {}
    for world in args.tp:
        if use_bindings:
            us = _measure_with_bindings(core, world, args.warmup, args.iterations)
        else:
            us = _measure_with_executable(binary, world, args.warmup, args.iterations)
        result[f"overhead_us_tp{world}"] = round(us, 3)
    if args.json:
        result["iterations"] = args.iterations
        result["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
        print(json.dumps(result, sort_keys=True))
        return 0
    for world in args.tp:
        print(f"tp{world}: {result[f'overhead_us_tp{world}']:8.1f} us median round trip (leader -> {world} workers -> ack)")
    return 0
