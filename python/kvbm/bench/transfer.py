"""``kvbm bench transfer``: kvbm's data path against physical anchors measured in the same run.

For each block size (256 KiB and 2 MiB by default):

- G1 -> G2 and G2 -> G1 (a vLLM-like per-layer G1 in host memory, as on a CPU engine, gathered
  into and scattered from a FullyContiguous G2) over single-thread memcpy of the same bytes;
- G2 -> G3 and G3 -> G2 (O_DIRECT through kvbm's I/O queue, every block verified on read) over
  fio with io_uring and O_DIRECT, same block size and queue depth, same directory.

kvbm's timings are native (src/manager/transfer_bench.cpp). fio comes from Debian
(``apt-get install fio``); this command installs nothing. Without fio the disk ratios are null.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile

from kvbm.commands._args import decimal


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("transfer", help="G1<->G2<->G3 throughput against memcpy and fio")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dir", default=os.environ.get("DYN_KVBM_DISK_CACHE_DIR", "/tmp/"),
                   help="directory for the disk tier and fio's file (default: DYN_KVBM_DISK_CACHE_DIR or /tmp/)")
    p.add_argument("--total-mib", type=decimal("--total-mib", 1, 1 << 31), default=512, help="bytes moved per measurement, in MiB")
    p.add_argument("--passes", type=decimal("--passes", 1, 1 << 31), default=3, help="passes per measurement; the best is kept")
    p.add_argument("--block-sizes", default="256K,2M", help="comma-separated block sizes (K/M suffix)")
    p.add_argument("--iodepth", type=decimal("--iodepth", 1, 1 << 31), default=64,
                   help="fio queue depth; kvbm keeps up to DYN_KVBM_MAX_CONCURRENT_TRANSFERS x "
                        "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE = 64 blocks in flight by default")
    return p


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if text[-1:] in "KMG" else text) * mult


def _fio(directory: str, rw: str, bs: int, total: int, iodepth: int, passes: int) -> float | None:
    """fio bandwidth in GB/s (best of `passes`, like kvbm's figures), or None without fio.

    The file is laid out by a first write pass, so that both fio and kvbm (whose disk file is
    fallocated and already written by earlier passes) measure steady-state I/O.
    """
    fio = shutil.which("fio")
    if fio is None:
        return None
    with tempfile.TemporaryDirectory(dir=directory, prefix="kvbm-fio-") as tmp:
        path = os.path.join(tmp, "fio.dat")
        base = [fio, "--name=kvbm", f"--filename={path}", f"--bs={bs}", f"--size={total}", "--direct=1",
                "--ioengine=io_uring", f"--iodepth={iodepth}", "--output-format=json", "--group_reporting"]
        subprocess.run(base + ["--rw=write"], check=True, capture_output=True)
        best = 0.0
        for _ in range(max(1, passes)):
            out = subprocess.run(base + [f"--rw={rw}"], check=True, capture_output=True, text=True)
            best = max(best, json.loads(out.stdout)["jobs"][0][rw]["bw_bytes"] / 1e9)
        return best


def run(args: argparse.Namespace) -> int:
    from kvbm._core import bench_transfer

    result: dict = {"dir": args.dir, "fio": shutil.which("fio") is not None}
    total = args.total_mib << 20
    for text in args.block_sizes.split(","):
        bs = _size(text)
        label = text.strip().lower()
        num_blocks = max(8, total // bs)
        k = bench_transfer(block_bytes=bs, num_blocks=num_blocks, passes=args.passes, disk_dir=args.dir)
        fio_w = _fio(args.dir, "write", bs, num_blocks * bs, args.iodepth, args.passes)
        fio_r = _fio(args.dir, "read", bs, num_blocks * bs, args.iodepth, args.passes)
        r = {
            "memcpy_gbps": k["memcpy_gbps"],
            "g1_to_g2_gbps": k["g1_to_g2_gbps"],
            "g2_to_g1_gbps": k["g2_to_g1_gbps"],
            "g2_to_g3_gbps": k["g2_to_g3_gbps"],
            "g3_to_g2_gbps": k["g3_to_g2_gbps"],
            "fio_write_gbps": fio_w,
            "fio_read_gbps": fio_r,
            "g1_to_g2_vs_memcpy": k["g1_to_g2_gbps"] / k["memcpy_gbps"],
            "g2_to_g1_vs_memcpy": k["g2_to_g1_gbps"] / k["memcpy_gbps"],
            "g2_to_g3_vs_fio": (k["g2_to_g3_gbps"] / fio_w) if fio_w else None,
            "g3_to_g2_vs_fio": (k["g3_to_g2_gbps"] / fio_r) if fio_r else None,
            "io_queue": k["io_queue"],
            "mismatched_blocks": k["mismatched_blocks"],
            "bytes": k["bytes"],
        }
        result[label] = r
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for label, r in result.items():
            if not isinstance(r, dict):
                continue
            print(f"block {label}: memcpy {r['memcpy_gbps']:.2f} GB/s")
            print(f"  G1->G2 {r['g1_to_g2_gbps']:.2f} GB/s ({r['g1_to_g2_vs_memcpy']:.2f}x memcpy)   "
                  f"G2->G1 {r['g2_to_g1_gbps']:.2f} GB/s ({r['g2_to_g1_vs_memcpy']:.2f}x)")
            fw = f"{r['g2_to_g3_vs_fio']:.2f}x fio" if r["g2_to_g3_vs_fio"] else "no fio"
            fr = f"{r['g3_to_g2_vs_fio']:.2f}x fio" if r["g3_to_g2_vs_fio"] else "no fio"
            print(f"  G2->G3 {r['g2_to_g3_gbps']:.2f} GB/s ({fw})   G3->G2 {r['g3_to_g2_gbps']:.2f} GB/s ({fr})")
            print(f"  mismatched blocks after the round trip: {r['mismatched_blocks']}")
    return 0 if all(r.get("mismatched_blocks", 0) == 0 for r in result.values() if isinstance(r, dict)) else 1
