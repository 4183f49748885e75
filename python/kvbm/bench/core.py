"""``kvbm bench core``: hashing and block-pool figures, timed natively in C++.

The timing loops are in src/manager/core_bench.cpp (``kvbm._core.bench_core``): a loop in
Python would measure the interpreter, not kvbm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from kvbm.commands._args import decimal


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("core", help="hashing and block-pool throughput (native timings)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokens", type=decimal("--tokens", 1, 1 << 31), default=1 << 20, help="tokens hashed per pass (default 2^20)")
    p.add_argument("--block-size", type=decimal("--block-size", 1, 1 << 31), default=16, help="tokens per block (default 16)")
    p.add_argument("--passes", type=decimal("--passes", 1, 1 << 31), default=15, help="timed passes; the median is reported")
    p.add_argument("--pool-cycles", type=decimal("--pool-cycles", 1, 1 << 31), default=200_000, help="pool cycles per pass")
    return p


def run(args: argparse.Namespace) -> int:
    from kvbm._core import bench_core

    result = bench_core(
        num_tokens=args.tokens,
        block_size=args.block_size,
        passes=args.passes,
        pool_cycles=args.pool_cycles,
    )
    result["machine"] = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"hash_token_blocks     {result['hash_tokens_per_s'] / 1e6:10.1f} M tokens/s  (block size {args.block_size})")
    print(f"raw XXH3, same chunks {result['xxh3_raw_tokens_per_s'] / 1e6:10.1f} M tokens/s")
    print(f"hash / raw            {result['hash_vs_raw']:10.3f}")
    print(f"pool cycle            {result['pool_cycles_per_s'] / 1e6:10.2f} M cycles/s  (allocate+complete+register+drop)")
    print(f"match 8192-block hit  {result['match_8192_blocks_us']:10.1f} us  (including dropping the handles)")
    return 0
