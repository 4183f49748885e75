#!/usr/bin/env python3
"""Rewrites BENCHMARKS.md's figure tables from the JSON of ``kvbm bench all --json``.

    kvbm bench all --json --invocations 3 --out bench.json
    python scripts/bench_tables.py bench.json [more.json ...] [--doc BENCHMARKS.md]

Only the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` is replaced (NAME:
machine, core, transfer, vllm, serve, spread); the prose around the markers stays as written.
A marker pair whose benchmark is missing from the JSON is left untouched. ``--check`` rewrites
nothing and exits 1 when the document differs from what the JSON gives.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _r(entry: dict | None, digits: int = 2) -> str:
    if not entry or entry.get("median") is None:
        return "n/a"
    return f"{entry['median']:.{digits}f} [{entry['min']:.{digits}f}–{entry['max']:.{digits}f}]"


def _v(x, digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:,.{digits}f}"


def machine_table(s: dict) -> str:
    m = s["machine"]
    lines = [f"Measured {m['time_utc']} on {m['cpus']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, kernel "
             f"{m['kernel']}, Python {m['python']}; load average (1 min) at the end {m['load_avg_1m']}; "
             f"{'--quick (smoke figures)' if s.get('quick') else 'stable mode'}, "
             "commands:", ""]
    for _name, cmd in sorted(s.get("commands", {}).items()):
        lines.append(f"- `{cmd}`")
    return "\n".join(lines)


def core_table(r: dict) -> str:
    rows = ["| figure | value |", "| --- | --- |"]
    for k in sorted(r):
        if isinstance(r[k], (int, float)) and not isinstance(r[k], bool):
            rows.append(f"| `{k}` | {r[k]:,.3f} |")
    return "\n".join(rows)


def transfer_table(r: dict) -> str:
    disk_pairs = r.get("disk_pairs", r["pairs"])
    rows = [f"{r['pairs']} interleaved pairs per memory ratio, {disk_pairs} per disk ratio; ratio = kvbm / anchor, "
            "median [min–max].", "",
            "| block | path | kvbm GB/s | anchor | anchor GB/s | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for label, b in r["block_sizes"].items():
        n = b["memcpy_threads"]
        for key, what in (("g1_to_g2", "G1→G2"), ("g2_to_g1", "G2→G1")):
            for suffix, path, anchor in (("", f"{what} ({n} threads)", f"memcpy, {n} threads"),
                                         ("_1t", f"{what} (1 thread)", "memcpy, 1 thread")):
                e = b[f"{key}_vs_memcpy{suffix}"]
                rows.append(f"| {label} | {path} | {_v(e['kvbm']['median'])} | {anchor} | "
                            f"{_v(e['anchor']['median'])} | {_r(e)} |")
        for key, what, rw in (("g2_to_g3", "G2→G3", "write"), ("g3_to_g2", "G3→G2", "read")):
            e = b[f"{key}_vs_fio"]
            rows.append(f"| {label} | {what} | {_v(e['kvbm']['median'])} | fio {rw}, same file, qd {b['io_depth']} | "
                        f"{_v(e['anchor']['median'])} | {_r(e)} |")
    bad = sum(b["mismatched_blocks"] for b in r["block_sizes"].values())
    rows += ["", f"Mismatched blocks after G1→G2→G3→G2→G1: {bad}."]
    return "\n".join(rows)


def vllm_table(r: dict) -> str:
    rows = [f"{r['pairs']} interleaved pairs per ratio, prompt {r['prompt_tokens']} tokens, "
            f"{r['bytes_per_block']:,} bytes per block; median [min–max].", "",
            "| figure | kvbm | anchor | ratio |", "| --- | --- | --- | --- |"]
    for key, unit, scale in (("ttft_g2_vs_recompute", "ms", 1e3), ("ttft_g3_vs_recompute", "ms", 1e3),
                             ("ttft_g2_vs_limit", "ms", 1e3), ("ttft_g3_vs_limit", "ms", 1e3),
                             ("ttft_g2_vs_g1_hit", "ms", 1e3), ("ttft_g3_vs_g1_hit", "ms", 1e3),
                             ("g1_hit_vs_g2_limit", "ms", 1e3),
                             ("no_reuse_throughput_ratio", "tokens/s", 1.0)):
        e = r.get(key)
        if e is None:  # a run from before the figure existed
            continue
        k = e.get("kvbm", {}).get("median")
        a = e.get("anchor", {}).get("median")
        digits = 1 if unit == "ms" else 0
        rows.append(f"| `{key}` | {_v(k, digits, scale)} {unit} | {_v(a, digits, scale)} {unit} | {_r(e, 3)} |")
    for tier in ("g2", "g3"):
        e = r[f"ttft_{tier}_vs_limit"]
        rows.append("")
        rows.append(f"{tier.upper()} limit: {e['bandwidth_source']} {_v(e['bandwidth_gbps']['median'])} GB/s, "
                    f"one-block miss TTFT {_v(e['one_block_miss_ttft_s']['median'], 1, 1e3)} ms, "
                    f"limit {_v(e['limit_s']['median'], 1, 1e3)} ms.")
    rows += ["", f"Blocks onboarded per hit: G2 {r['onboarded_blocks_g2']['median']}, "
                 f"G3 {r['onboarded_blocks_g3']['median']}; outputs identical: {r['outputs_identical']}."]
    return "\n".join(rows)


def serve_table(r: dict) -> str:
    rows = [f"vLLM's client `{r['client']}` against `{r['server']}`; {r['pairs']} interleaved pairs of "
            f"{r['turns']} turns each (longest {r['longest_turn_tokens']} tokens, G1 {r['g1_tokens']} tokens); "
            "median [min–max].", "", "| figure | with kvbm | without | ratio |", "| --- | --- | --- | --- |"]
    for k, e in r["figures"].items():
        rows.append(f"| `{k}` | {_v(e['kvbm']['median'])} | {_v(e['anchor']['median'])} | {_r(e)} |")
    return "\n".join(rows)


def spread_table(s: dict) -> str:
    if "spread" not in s:
        return "One invocation only: no spread measured."
    rows = [f"Median ratio of each of {s['invocations']} back-to-back invocations, and the largest distance "
            "from their median.", "", "| ratio | medians | spread |", "| --- | --- | --- |"]
    for path, e in s["spread"].items():
        meds = ", ".join(f"{m:.3f}" for m in e["medians"])
        pct = "n/a" if e["spread_pct"] is None else f"±{e['spread_pct']:.1f}%"
        rows.append(f"| `{path}` | {meds} | {pct} |")
    return "\n".join(rows)


def tables(summary: dict) -> dict[str, str]:
    out = {"machine": machine_table(summary), "spread": spread_table(summary)}
    makers = {"core": core_table, "transfer": transfer_table, "vllm": vllm_table, "serve": serve_table}
    for name, make in makers.items():
        r = summary["results"].get(name)
        if r is None:
            continue
        out[name] = f"Not measured: {r['error'][:300]}" if "error" in r else make(r)
    return out


def merge(summaries: list[dict]) -> dict:
    """Several `kvbm bench all` runs as one (e.g. three invocations of a fast benchmark and one
    of the slow ones): results, commands and spreads are united, later files win."""
    out = dict(summaries[-1])
    out["results"], out["commands"], out["spread"] = {}, {}, {}
    for s in summaries:
        out["results"].update(s.get("results", {}))
        n = s.get("invocations", 1)
        out["commands"].update({k: f"{v} (x{n} invocations)" if n > 1 else v for k, v in s.get("commands", {}).items()})
        out["spread"].update(s.get("spread", {}))
    out["invocations"] = max(s.get("invocations", 1) for s in summaries)
    if not out["spread"]:
        del out["spread"]
    return out


def rewrite(doc: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
        doc = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json_file", nargs="+", help="one or more `kvbm bench all` JSON files (merged in order)")
    p.add_argument("--doc", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    p.add_argument("--check", action="store_true", help="exit 1 when the document differs; write nothing")
    a = p.parse_args(argv)
    summary = merge([json.loads(Path(f).read_text()) for f in a.json_file])
    doc = Path(a.doc).read_text()
    new = rewrite(doc, tables(summary))
    if a.check:
        return 0 if new == doc else 1
    Path(a.doc).write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
