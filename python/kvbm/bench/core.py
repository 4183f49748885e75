"""``kvbm bench core``: kvbm's control plane beside vLLM's own prefix cache, in one run.

kvbm's figures are timed natively (src/tools/core_bench.cpp, ``kvbm._core.bench_core``): a loop
in Python would measure the interpreter, not kvbm. vLLM's are its own Python code, imported
from the installed vLLM (:mod:`kvbm.bench.vllm_anchor`), on the same work:

* match: a fully hit 8,192-block chain (128k tokens, 16 per block) in a warm cache, including
  giving the blocks back (kvbm: ``MatchPrefix`` + dropping the run; vLLM:
  ``find_longest_cache_hit`` + ``touch`` + ``free_blocks``);
* hash: 131,072 tokens into chained block hashes (kvbm: a ``TokenBlockSequence``, the leader's
  path; vLLM: the request block hasher with its default hash function).

The two sides run as interleaved pairs (kvbm then vLLM, then vLLM then kvbm, ...), so a change in
machine load hits both sides of a pair alike; each pair gives one ratio, and the report gives the
median, min and max of the ratios, with every pair's figures. Each side of a pair runs once on
every CPU and keeps its best figures (see ``_on_each_cpu``: one vCPU of a shared VM can be slow
for Python for minutes while kvbm's native code is not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

MATCH_BLOCKS = 8192  # the figures are named for this chain: 8,192 blocks
BLOCK_SIZE = 16  # ... of 16 tokens, 131,072 tokens in all
REQUEST_TOKENS = MATCH_BLOCKS * BLOCK_SIZE

# Pairs in the stable mode. vLLM's Python match (14-18 ms) moves from pair to pair, so one
# invocation's pair ratios ranged 55x-102x; with 7 pairs the median moved +-11.0% over three
# invocations.
STABLE_PAIRS = 15

# Per-pair kvbm figures reported as the median over the pairs.
_KVBM_FIGURES = (
    "match_8192_blocks_us",
    "hash_128k_us",
    "hash_tokens_per_s",
    "pool_cycles_per_s",
    "leader_request_miss_us",
    "leader_request_hit_us",
)

from kvbm.bench import _pairs
from kvbm.commands._args import decimal


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "core", help="control-plane speed: kvbm's native figures beside vLLM's prefix cache, same run"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer passes and cycles (for CI); same figures")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"interleaved kvbm/vLLM pairs (default {STABLE_PAIRS}; --quick 5)")
    p.add_argument("--passes", type=int, default=None,
                   help="timed passes per figure per pair; medians (default 15; --quick 5)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per hash-throughput pass (default 2^20; --quick 2^17)")
    p.add_argument("--pool-cycles", type=int, default=None,
                   help="pool cycles per pass (default 200000; --quick 20000)")
    p.add_argument("--require-vllm", action="store_true",
                   help="fail when vLLM cannot be imported, instead of reporting kvbm alone")
    return p


def _settings(args: argparse.Namespace) -> dict:
    quick = args.quick
    s = {
        "pairs": args.pairs if args.pairs is not None else (5 if quick else STABLE_PAIRS),
        "passes": args.passes if args.passes is not None else (5 if quick else 15),
        "tokens": args.tokens if args.tokens is not None else (1 << 17 if quick else 1 << 20),
        "pool_cycles": args.pool_cycles if args.pool_cycles is not None else (20_000 if quick else 200_000),
    }
    for name, value in s.items():
        if value <= 0:
            raise ValueError(f"kvbm bench core: --{name.replace('_', '-')} must be positive, got {value}")
    if s["tokens"] < BLOCK_SIZE:
        raise ValueError(f"kvbm bench core: --tokens must be at least one block ({BLOCK_SIZE}), got {s['tokens']}")
    return s


def _kvbm_sample(s: dict) -> dict:
    from kvbm._core import bench_core

    r = bench_core(num_tokens=s["tokens"], block_size=BLOCK_SIZE, passes=s["passes"],
                   pool_cycles=s["pool_cycles"], match_blocks=MATCH_BLOCKS)
    r["hash_128k_us"] = r.pop("hash_request_us")  # a TokenBlockSequence of REQUEST_TOKENS tokens
    r["hash_128k_best_us"] = r.pop("hash_request_best_us")
    r.pop("options", None)
    return r


def _vllm_sample(s: dict) -> dict:
    from kvbm.bench import vllm_anchor

    match, hit, best = vllm_anchor.match_us(num_blocks=MATCH_BLOCKS, block_size=BLOCK_SIZE, passes=s["passes"])
    hashing, hash_best = vllm_anchor.hash_us(num_tokens=REQUEST_TOKENS, block_size=BLOCK_SIZE, passes=s["passes"])
    return {"match_8192_blocks_us": match, "match_8192_blocks_best_us": best, "blocks_matched": hit,
            "hash_128k_us": hashing, "hash_128k_best_us": hash_best}


def _ratio_stats(ratios: list[float]) -> dict:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "pairs": ratios}


def _best_ratio(pairs: list[dict], name: str, s: dict) -> dict:
    """vLLM's fastest pass over the whole invocation divided by kvbm's: the stable ratio.

    The pair medians cannot hold still on this shared VM: vLLM's Python (the match chases 8,192
    objects through dicts and a linked free list; the hash pickles and SHA-256s 8,192 blocks)
    runs in a fast or a slow mode (match 11-14 ms or 18-26 ms, hash 23-28 ms or 36-47 ms) that
    changes within a second or lasts minutes, on either CPU and within one process, while kvbm's
    native loops move far less: the slowdown hits one side of a pair only, so pairing cannot
    cancel it. A pair in the slow mode gives 90x-125x instead of 55x-70x, and the median lands
    in whichever mode holds most pairs. Each side's fastest pass (Python's ``timeit`` advice:
    the minimum is what the machine can deliver; the rest is interference) is taken over the
    same interleaved pairs.
    """
    kvbm = min(p["kvbm"][name] for p in pairs)
    vllm = min(p["vllm"][name] for p in pairs)
    return {"ratio": vllm / kvbm, "kvbm_best_us": kvbm, "vllm_best_us": vllm,
            "passes_per_side": sum(s["passes"] * max(1, len(p["vllm"].get("per_cpu", {}))) for p in pairs)}


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_1m_at_start": load[0] if load else None,
    }


def _on_each_cpu(sample, s: dict) -> dict:
    """``sample(s)`` once on each CPU (``_pairs.on_each_cpu``); each figure's best of them: times
    the lowest, rates the highest. Both sides of every pair get the same treatment."""
    runs = _pairs.on_each_cpu(lambda: sample(s))
    if len(runs) < 2:
        return runs[0][1]
    samples = [x for _cpu, x in runs]
    best = dict(samples[0])
    for name, value in samples[0].items():
        if isinstance(value, float) and name.endswith("_us"):
            best[name] = min(x[name] for x in samples)
        elif isinstance(value, float) and name.endswith("_per_s"):
            best[name] = max(x[name] for x in samples)
    best["per_cpu"] = {str(c): {k: v for k, v in x.items() if isinstance(v, float)} for c, x in runs}
    return best


def measure(s: dict, vllm_error: str | None) -> dict:
    """Runs the pairs; returns the report (see the module docstring)."""
    machine = _machine()
    pairs = []
    for i in range(s["pairs"]):
        order = ("kvbm", "vllm") if i % 2 == 0 else ("vllm", "kvbm")
        pair: dict = {"order": list(order) if vllm_error is None else ["kvbm"]}
        for side in order:
            if side == "kvbm":
                pair["kvbm"] = _on_each_cpu(_kvbm_sample, s)
            elif vllm_error is None:
                pair["vllm"] = _on_each_cpu(_vllm_sample, s)
        pairs.append(pair)

    kvbm = [p["kvbm"] for p in pairs]
    for name in ("blocks_matched", "blocks_stored", "blocks_loaded"):
        values = {k[name] for k in kvbm}
        if len(values) != 1:
            raise RuntimeError(f"kvbm bench core: {name} differed between pairs: {sorted(values)}")
    report: dict = {name: statistics.median(k[name] for k in kvbm) for name in _KVBM_FIGURES}
    report.update({name: kvbm[0][name] for name in ("blocks_matched", "blocks_stored", "blocks_loaded")})
    report["spread"] = {name: {"min": min(k[name] for k in kvbm), "max": max(k[name] for k in kvbm)}
                        for name in _KVBM_FIGURES}
    # Each eviction policy's pool cycle (with eviction), median over the pairs: its cost per operation.
    report["policy_cycles_per_s"] = {name: statistics.median(k["policy_cycles_per_s"][name] for k in kvbm)
                                     for name in kvbm[0]["policy_cycles_per_s"]}

    if vllm_error is None:
        from kvbm.bench import vllm_anchor

        vl = [p["vllm"] for p in pairs]
        for p in pairs:
            p["match_ratio"] = p["vllm"]["match_8192_blocks_us"] / p["kvbm"]["match_8192_blocks_us"]
            p["hash_ratio"] = p["vllm"]["hash_128k_us"] / p["kvbm"]["hash_128k_us"]
        report["vllm_match_8192_blocks_us"] = statistics.median(v["match_8192_blocks_us"] for v in vl)
        report["vllm_hash_128k_us"] = statistics.median(v["hash_128k_us"] for v in vl)
        report["vllm_blocks_matched"] = min(v["blocks_matched"] for v in vl)
        for name in ("match_8192_blocks_us", "hash_128k_us"):
            report["spread"][f"vllm_{name}"] = {"min": min(v[name] for v in vl), "max": max(v[name] for v in vl)}
        report["match_speedup_vs_vllm"] = _ratio_stats([p["match_ratio"] for p in pairs])
        report["match_speedup_vs_vllm_best"] = _best_ratio(pairs, "match_8192_blocks_best_us", s)
        report["hash_speedup_vs_vllm_best"] = _best_ratio(pairs, "hash_128k_best_us", s)
        report["hash_speedup_vs_vllm"] = _ratio_stats([p["hash_ratio"] for p in pairs])
        report["vllm"] = {"version": vllm_anchor.version(), "hash_algo": vllm_anchor.hash_algo()}
        report["vllm_anchor_error"] = None
    else:
        for name in ("vllm_match_8192_blocks_us", "vllm_hash_128k_us", "vllm_blocks_matched",
                     "match_speedup_vs_vllm", "match_speedup_vs_vllm_best", "hash_speedup_vs_vllm",
                     "hash_speedup_vs_vllm_best", "vllm"):
            report[name] = None
        report["vllm_anchor_error"] = vllm_error

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine["load_average_1m_at_end"] = load[0] if load else None
    report["machine"] = machine
    report["pairs"] = pairs
    report["options"] = {"match_blocks": MATCH_BLOCKS, "block_size": BLOCK_SIZE, "request_tokens": REQUEST_TOKENS,
                         "quick": bool(s.get("quick")), **{k: v for k, v in s.items() if k != "quick"}}
    return report


def _vllm_error() -> str | None:
    """None when vLLM's prefix cache imports, else why not (the import happens here, untimed)."""
    from kvbm.bench import vllm_anchor

    try:
        vllm_anchor.version()
    except vllm_anchor.VllmUnavailable as e:
        return str(e)
    return None


def run(args: argparse.Namespace) -> int:
    try:
        s = _settings(args)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    s["quick"] = args.quick
    vllm_error = _vllm_error()
    if vllm_error is not None and args.require_vllm:
        print(f"kvbm bench core: error: --require-vllm: {vllm_error}", file=sys.stderr)
        return 1
    r = measure(s, vllm_error)
    if args.json:
        print(json.dumps(r, sort_keys=True))
        return 0

    m = r["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['processor']}, load average {m['load_average_1m_at_start']:.1f} "
          f"-> {m['load_average_1m_at_end']:.1f}; {s['pairs']} interleaved pairs, {s['passes']} passes each")
    print(f"hash_token_blocks      {r['hash_tokens_per_s'] / 1e6:10.1f} M tokens/s  (block size {BLOCK_SIZE})")
    print(f"pool cycle             {r['pool_cycles_per_s'] / 1e6:10.2f} M cycles/s  "
          "(allocate+complete+register+drop)")
    print("eviction policies      " + ", ".join(f"{name} {rate / 1e6:.2f}" for name, rate in
                                                 sorted(r["policy_cycles_per_s"].items())) + " M cycles/s (with eviction)")
    print(f"leader 128k request    {r['leader_request_miss_us']:10.1f} us miss (add, match, alloc, "
          f"{r['blocks_stored']} stores, finish)")
    print(f"                       {r['leader_request_hit_us']:10.1f} us hit  ({r['blocks_loaded']} blocks loaded)")
    print(f"match 8192-block hit   {r['match_8192_blocks_us']:10.1f} us  kvbm (including dropping the handles)")
    print(f"hash 128k tokens       {r['hash_128k_us']:10.1f} us  kvbm (TokenBlockSequence)")
    if r["vllm_anchor_error"] is not None:
        print(f"vLLM anchor unavailable: {r['vllm_anchor_error']}")
        return 0
    for label, key, ratio in (("match 8192-block hit", "match_8192_blocks_us", "match_speedup_vs_vllm"),
                              ("hash 128k tokens", "hash_128k_us", "hash_speedup_vs_vllm")):
        q = r[ratio]
        print(f"{label:22} {r['vllm_' + key]:10.1f} us  vLLM {r['vllm']['version']}  -> kvbm "
              f"{q['median']:.1f}x faster (pairs: min {q['min']:.1f}x, max {q['max']:.1f}x)")
    for label, ratio in (("match, fastest passes", "match_speedup_vs_vllm_best"),
                         ("hash, fastest passes", "hash_speedup_vs_vllm_best")):
        b = r[ratio]
        print(f"{label:22} {b['vllm_best_us']:10.1f} us  vLLM vs {b['kvbm_best_us']:.1f} us kvbm -> "
              f"{b['ratio']:.1f}x ({b['passes_per_side']} passes a side)")
    return 0
