"""``kvbm bench all``: every benchmark in its stable mode (or ``--quick``), one JSON summary.

Each benchmark runs as its own ``python -m kvbm.cli bench <name> --json`` process (engines and
servers end with it). With ``--invocations N`` the whole set runs N times back to back and the
summary gives, for every ratio (any entry with a median, min, max and pair count), the N median
ratios and their spread (largest distance from their median, in percent): the stability check
of BENCHMARKS.md. ``scripts/bench_tables.py`` rewrites BENCHMARKS.md's figure tables from this
JSON, so the document and the numbers cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from kvbm.bench import _pairs

BENCHES = ("core", "transfer", "vllm", "serve")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("all", help="every benchmark (stable mode), one JSON summary with the machine")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="every benchmark in its --quick smoke mode")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset (default {','.join(BENCHES)})")
    p.add_argument("--invocations", type=int, default=1,
                   help="run the whole set this many times back to back and report each ratio's spread")
    p.add_argument("--out", default=None, help="also write the JSON summary to this file")
    return p


def ratio_entries(obj, path: str = "") -> dict[str, dict]:
    """Every ratio summary in a result, by dotted path (``transfer.block_sizes.2m.g3_to_g2_vs_fio``)."""
    found: dict[str, dict] = {}
    if isinstance(obj, dict):
        # _pairs.summarize's form ("ratios" beside a pair count) or bench core's ("pairs": the ratios)
        if {"median", "min", "max", "pairs"} <= obj.keys() and ("ratios" in obj or isinstance(obj["pairs"], list)):
            found[path] = obj
        # bench core's ratio of the two sides' fastest passes over the pairs
        elif {"ratio", "passes_per_side"} <= obj.keys():
            found[path] = obj
        for k, v in obj.items():
            if k in ("kvbm", "anchor", "ratios"):
                continue
            found.update(ratio_entries(v, f"{path}.{k}" if path else k))
    return found


def spread_of(invocations: list[dict]) -> dict[str, dict]:
    """Each ratio's invocation medians and their spread (see _pairs.spread), by dotted path."""
    per_path: dict[str, list[float]] = {}
    for inv in invocations:
        for path, entry in ratio_entries(inv).items():
            value = entry.get("median", entry.get("ratio"))
            if value is not None:
                per_path.setdefault(path, []).append(value)
    return {p: _pairs.spread(m) for p, m in sorted(per_path.items())}


def run_one(name: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "kvbm.cli", "bench", name, "--json"]
    if quick and name != "core":
        cmd.append("--quick")
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-2000:]}", "wall_s": time.monotonic() - t0}
    out = json.loads(lines[-1])
    out.setdefault("wall_s", time.monotonic() - t0)
    if r.returncode != 0:
        out["exit_code"] = r.returncode
    return out


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHES]
    if bad or args.invocations < 1:
        print(f"kvbm bench all: error: unknown benchmark(s) {bad} (known: {', '.join(BENCHES)})"
              if bad else "kvbm bench all: error: --invocations must be at least 1", file=sys.stderr)
        return 2
    invocations = []
    for _ in range(args.invocations):
        invocations.append({n: run_one(n, args.quick) for n in names})
    summary: dict = {
        "quick": bool(args.quick),
        "invocations": args.invocations,
        "results": invocations[0],
        "machine": _pairs.machine("/tmp"),
        "commands": {n: f"kvbm bench {n} --json" + (" --quick" if args.quick and n != "core" else "") for n in names},
    }
    if args.invocations > 1:
        summary["runs"] = invocations
        summary["spread"] = spread_of(invocations)
    text = json.dumps(summary, sort_keys=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    errors = [f"{n}: {r['error']}" for inv in invocations for n, r in inv.items() if "error" in r]
    if args.json:
        print(text)
    else:
        for path, entry in sorted(ratio_entries(invocations[0]).items()):
            line = f"{path:60s} {_pairs.fmt_ratio(entry)}"
            if "spread" in summary and path in summary["spread"]:
                line += f"   spread over {args.invocations}: +-{summary['spread'][path]['spread_pct']:.1f}%"
            print(line)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0
