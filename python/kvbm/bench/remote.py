"""``kvbm bench remote``: kvbm's G2 <-> G4 path against redis-benchmark, in interleaved pairs.

For each block size (256 KiB and 2 MiB by default), on one Redis Cluster (started here with
scripts/redis_cluster.sh on free 127.0.0.1 ports, or ``--url``):

- G2 -> G4 (``put_vs_redis_benchmark``): kvbm frames every block of a G2-like buffer
  (RemoteBlockKey, EncodeRemoteBlock: header + XXH3) and SETs them through its Redis Cluster
  client, ``--pipeline`` x masters blocks per pipelined call (one connection per master, so
  each master gets about ``--pipeline`` commands per call); the anchor is ``redis-benchmark
  --cluster --threads 1 -t set`` with one client per master, ``-P --pipeline``, values of the same size
  (header + block) and the same number of requests.
- G4 -> G2 (``get_vs_redis_benchmark``): kvbm GETs the blocks, verifies each
  (DecodeRemoteBlock) and copies it into G2; the anchor is ``redis-benchmark -t get`` likewise
  (it reads the value its SET runs stored, so every GET hits).

These are the calls KvbmWorker makes for G4 (src/connector/worker.cpp), run on the calling
thread (kvbm._core.RemoteBench, src/tools/remote_bench.cpp). Both sides' figure is GB/s of
values (header + block). Every ratio is the median of interleaved pairs (kvbm/_pairs.py), with
min, max and the count; after the pairs every block is read back and compared
(``mismatched_blocks``). redis-benchmark comes from Debian's redis-tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from kvbm.bench import _pairs
from kvbm.bench.transfer import parse_size

QUICK_TOTAL_MIB = 16
QUICK_BLOCK_SIZES = "256K"
DEFAULT_PIPELINE = 8


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("remote", help="G2<->G4 (Redis Cluster) throughput against redis-benchmark, interleaved pairs")
    _pairs.add_common_arguments(p)
    p.add_argument("--url", default=None,
                   help="an existing Redis Cluster (redis://host:port,...); default: start a 6-node one on 127.0.0.1 "
                   "with scripts/redis_cluster.sh and stop it after")
    p.add_argument("--total-mib", type=int, default=None,
                   help=f"block bytes moved per pass, in MiB (default 256; {QUICK_TOTAL_MIB} with --quick)")
    p.add_argument("--block-sizes", default=None,
                   help=f"comma-separated block sizes, K/M suffix (default 256K,2M; {QUICK_BLOCK_SIZES} with --quick)")
    p.add_argument("--pipeline", type=int, default=DEFAULT_PIPELINE,
                   help=f"commands in flight per connection: redis-benchmark's -P; kvbm pipelines this many x masters "
                   f"blocks per call (default {DEFAULT_PIPELINE})")
    return p


def find_cluster_script() -> Path:
    """scripts/redis_cluster.sh: $KVBM_REDIS_CLUSTER_SCRIPT, ./scripts, or the source tree."""
    env = os.environ.get("KVBM_REDIS_CLUSTER_SCRIPT")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "scripts" / "redis_cluster.sh",
                   Path(__file__).resolve().parents[3] / "scripts" / "redis_cluster.sh"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError("scripts/redis_cluster.sh not found (run from kvbm's source tree, set "
                            "KVBM_REDIS_CLUSTER_SCRIPT, or give --url of a running cluster)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(nodes: int = 6) -> int:
    """A base port P with P..P+nodes-1 and their cluster bus ports (+10000) free on 127.0.0.1."""
    start = 20000 + (os.getpid() * 7) % 20000
    for k in range(200):
        base = 20000 + (start - 20000 + 37 * k) % 25000
        if all(_port_free(base + i) and _port_free(base + 10000 + i) for i in range(nodes)):
            return base
    raise RuntimeError("no free loopback ports for a Redis Cluster")


class LocalCluster:
    """A 6-node cluster on 127.0.0.1 for the duration of a ``with`` block."""

    def __init__(self):
        self.script = find_cluster_script()
        self.base = free_base_port()
        self.parent = tempfile.mkdtemp(prefix="kvbm-bench-redis-")
        self.dir = os.path.join(self.parent, "cluster")  # the script makes (and removes) it
        self.url = ",".join(f"redis://127.0.0.1:{self.base + i}" for i in range(3))

    def _run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.script), command, "--base-port", str(self.base), "--dir", self.dir],
                              capture_output=True, text=True, timeout=120, check=False)

    def __enter__(self) -> "LocalCluster":
        r = self._run("start")
        if r.returncode != 0:
            self._run("stop")
            raise RuntimeError(f"redis_cluster.sh start failed: {(r.stderr or r.stdout).strip()}")
        return self

    def __exit__(self, *exc) -> None:
        self._run("stop")
        shutil.rmtree(self.parent, ignore_errors=True)


def _first_node(url: str) -> tuple[str, int]:
    entry = url.split(",")[0].strip()
    entry = entry.removeprefix("redis://")
    host, _, port = entry.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def redis_benchmark_gbps(url: str, test: str, value_bytes: int, requests: int, pipeline: int, clients: int) -> float:
    """One redis-benchmark run of ``test`` (set or get) on the cluster; GB/s of values."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        raise FileNotFoundError("redis-benchmark is not installed (apt-get install redis-tools)")
    host, port = _first_node(url)
    # One event-loop thread, as kvbm's client (cluster mode would otherwise start one per master).
    cmd = [tool, "-h", host, "-p", str(port), "--cluster", "--threads", "1", "-c", str(clients), "-P", str(pipeline),
           "-n", str(requests), "-d", str(value_bytes), "-t", test, "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
    for line in out.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper() == test.upper() and len(cells) > 1:
            return float(cells[1]) * value_bytes / 1e9
    raise RuntimeError(f"redis-benchmark printed no {test.upper()} figure: {out.stdout.strip()[-500:]}")


def measure_block_size(url: str, bs: int, total: int, pipeline: int, pairs: int) -> dict:
    from kvbm._core import RemoteBench

    num_blocks = max(8, total // bs)
    probe = RemoteBench.create(url, block_bytes=4096, num_blocks=1, batch_blocks=1)
    masters = max(1, probe.masters)
    del probe
    batch = pipeline * masters
    b = RemoteBench.create(url, block_bytes=bs, num_blocks=num_blocks, batch_blocks=batch)
    value = b.value_bytes
    moved = value * num_blocks

    def kvbm_put(_i):
        return moved / b.put_seconds() / 1e9

    def kvbm_get(_i):
        return moved / b.get_seconds() / 1e9

    have_tool = shutil.which("redis-benchmark") is not None

    def anchor(test: str):
        if not have_tool:
            return None
        return lambda _i: redis_benchmark_gbps(url, test, value, num_blocks, pipeline, masters)

    r: dict = {"block_bytes": bs, "value_bytes": value, "num_blocks": num_blocks, "bytes": moved, "masters": masters,
               "pipeline": pipeline, "kvbm_batch_blocks": batch}
    try:
        r["put_vs_redis_benchmark"] = _pairs.run_pairs(kvbm_put, anchor("set"), pairs)
        b.put_seconds()  # the blocks are there for the reads
        r["get_vs_redis_benchmark"] = _pairs.run_pairs(kvbm_get, anchor("get"), pairs)
        r["mismatched_blocks"] = b.verify()
    finally:
        b.clear()
    return r


def run(args: argparse.Namespace) -> int:
    try:
        pairs = _pairs.pair_count(args)
        total = (args.total_mib if args.total_mib is not None else (QUICK_TOTAL_MIB if args.quick else 256)) << 20
        sizes_text = args.block_sizes or (QUICK_BLOCK_SIZES if args.quick else "256K,2M")
        sizes = [(t.strip().lower(), parse_size(t)) for t in sizes_text.split(",")]
        if total <= 0:
            raise ValueError(f"--total-mib must be positive, got {args.total_mib}")
        if args.pipeline < 1:
            raise ValueError(f"--pipeline must be at least 1, got {args.pipeline}")
    except ValueError as e:
        print(f"kvbm bench remote: error: {e}", file=sys.stderr)
        return 2
    result: dict = {"bench": "remote", "quick": bool(args.quick), "pairs": pairs,
                    "redis_benchmark": shutil.which("redis-benchmark") is not None, "block_sizes": {}}
    try:
        cluster = None if args.url else LocalCluster()
    except (FileNotFoundError, RuntimeError) as e:
        print(f"kvbm bench remote: error: {e}", file=sys.stderr)
        return 2
    try:
        if cluster is not None:
            cluster.__enter__()
        url = args.url or cluster.url
        result["cluster"] = "given" if args.url else f"6 nodes on 127.0.0.1:{cluster.base}..{cluster.base + 5}"
        for label, bs in sizes:
            result["block_sizes"][label] = measure_block_size(url, bs, total, args.pipeline, pairs)
    except RuntimeError as e:
        print(f"kvbm bench remote: error: {e}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)
    result["machine"] = _pairs.machine()
    ok = all(r["mismatched_blocks"] == 0 for r in result["block_sizes"].values())
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0 if ok else 1
    f = _pairs.fmt_ratio
    print(f"{pairs} interleaved pairs per ratio; median [min-max] of kvbm / redis-benchmark (same cluster, "
          f"-P {args.pipeline}, one connection per master)")
    for label, r in result["block_sizes"].items():
        print(f"block {label} ({r['num_blocks']} blocks, {r['bytes'] / 1e6:.0f} MB of values per pass, "
              f"{r['masters']} masters):")
        for key, what in (("put", "G2->G4 (SET)"), ("get", "G4->G2 (GET)")):
            k = r[f"{key}_vs_redis_benchmark"]
            print(f"  {what} {k['kvbm']['median']:6.2f} GB/s   x redis-benchmark {f(k)}")
        print(f"  mismatched blocks after G2->G4->G2: {r['mismatched_blocks']}")
    return 0 if ok else 1
