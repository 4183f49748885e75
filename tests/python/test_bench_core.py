"""``kvbm bench core``: kvbm's native control-plane figures beside vLLM's own prefix cache.

The vLLM test runs the real command against the installed vLLM and checks what the figures
claim to be: both sides matched the whole 8,192-block chain, and every ratio is computed from
the pairs that were measured. No timing threshold: the machine may be loaded.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.testing.vllm_guard import vllm_marks

# Importing vLLM takes about a minute on a loaded 2-core machine; the quick run is seconds after.
_TIMEOUT_S = 900

_FIELDS = (
    "match_8192_blocks_us", "vllm_match_8192_blocks_us", "match_speedup_vs_vllm", "match_speedup_vs_vllm_best",
    "hash_128k_us", "vllm_hash_128k_us", "hash_speedup_vs_vllm", "hash_speedup_vs_vllm_best",
    "leader_request_miss_us", "leader_request_hit_us", "pool_cycles_per_s", "hash_tokens_per_s",
    "blocks_matched", "blocks_stored", "blocks_loaded", "vllm_blocks_matched",
    "machine", "pairs", "spread", "vllm", "vllm_anchor_error", "options",
)


def _kvbm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "kvbm"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "kvbm"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, env=env)


def _check_ratio(stats: dict, ratios: list[float]) -> None:
    assert stats["pairs"] == pytest.approx(ratios)
    assert stats["median"] == pytest.approx(statistics.median(ratios))
    assert stats["min"] == pytest.approx(min(ratios)) and stats["max"] == pytest.approx(max(ratios))
    assert stats["min"] <= stats["median"] <= stats["max"]


def _needs_vllm(test):
    """The `vllm` mark, and a skip naming the import error when vLLM is missing."""
    for mark in vllm_marks():
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def quick_report() -> dict:
    proc = _kvbm("bench", "core", "--quick", "--json", "--require-vllm")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@_needs_vllm
def test_quick_report_has_every_field_and_both_sides_hit_the_whole_chain(quick_report):
    r = quick_report
    missing = [f for f in _FIELDS if f not in r]
    assert not missing, f"missing fields: {missing}"
    assert "hash_vs_raw" not in r and "xxh3_raw_tokens_per_s" not in r
    assert r["vllm_anchor_error"] is None
    assert r["blocks_matched"] == 8192
    assert r["vllm_blocks_matched"] == 8192
    assert r["blocks_stored"] == 8192 and r["blocks_loaded"] == 8191
    assert r["options"]["quick"] is True and r["options"]["request_tokens"] == 131072
    for name in ("match_8192_blocks_us", "vllm_match_8192_blocks_us", "hash_128k_us", "vllm_hash_128k_us",
                 "leader_request_miss_us", "leader_request_hit_us"):
        assert r[name] > 0, name
    assert r["vllm"]["version"] and r["vllm"]["hash_algo"]
    # Every eviction policy's cost per operation, the median of the pairs' own figures.
    assert set(r["policy_cycles_per_s"]) == {"lru", "leaf-first", "reuse", "adaptive"}
    for name, rate in r["policy_cycles_per_s"].items():
        assert rate == statistics.median(p["kvbm"]["policy_cycles_per_s"][name] for p in r["pairs"]) > 0


@_needs_vllm
def test_quick_report_ratios_come_from_alternating_pairs(quick_report):
    r = quick_report
    pairs = r["pairs"]
    assert len(pairs) >= 5
    # The order alternates, so a drift in machine load does not favour one side.
    assert [p["order"] for p in pairs[:2]] == [["kvbm", "vllm"], ["vllm", "kvbm"]]
    for p in pairs:
        assert p["kvbm"]["blocks_matched"] == 8192 and p["vllm"]["blocks_matched"] == 8192
    match = [p["vllm"]["match_8192_blocks_us"] / p["kvbm"]["match_8192_blocks_us"] for p in pairs]
    hashing = [p["vllm"]["hash_128k_us"] / p["kvbm"]["hash_128k_us"] for p in pairs]
    _check_ratio(r["match_speedup_vs_vllm"], match)
    _check_ratio(r["hash_speedup_vs_vllm"], hashing)
    # The headline figures are the medians of the pairs' figures.
    assert r["match_8192_blocks_us"] == pytest.approx(statistics.median(p["kvbm"]["match_8192_blocks_us"] for p in pairs))
    assert r["vllm_match_8192_blocks_us"] == pytest.approx(
        statistics.median(p["vllm"]["match_8192_blocks_us"] for p in pairs))
    assert r["hash_128k_us"] == pytest.approx(statistics.median(p["kvbm"]["hash_128k_us"] for p in pairs))
    assert r["vllm_hash_128k_us"] == pytest.approx(statistics.median(p["vllm"]["hash_128k_us"] for p in pairs))


@_needs_vllm
def test_quick_report_best_ratios_are_the_two_sides_fastest_passes(quick_report):
    r = quick_report
    pairs = r["pairs"]
    for figure, ratio in (("match_8192_blocks", "match_speedup_vs_vllm_best"),
                          ("hash_128k", "hash_speedup_vs_vllm_best")):
        best = f"{figure}_best_us"
        for p in pairs:
            for side in ("kvbm", "vllm"):
                # A side's fastest pass is one of its passes: no slower than its median, on every CPU.
                x = p[side]
                assert 0 < x[best] <= x[f"{figure}_us"], (figure, side)
                for per_cpu in x.get("per_cpu", {}).values():
                    assert x[best] <= per_cpu[best], (figure, side)
        b = r[ratio]
        kvbm = min(p["kvbm"][best] for p in pairs)
        vllm = min(p["vllm"][best] for p in pairs)
        assert b["kvbm_best_us"] == pytest.approx(kvbm) and b["vllm_best_us"] == pytest.approx(vllm)
        assert b["ratio"] == pytest.approx(vllm / kvbm)
        cpus = max(1, len(pairs[0]["vllm"].get("per_cpu", {})))
        assert b["passes_per_side"] == len(pairs) * r["options"]["passes"] * cpus


def _without_vllm_env(tmp_path: Path) -> dict:
    """An environment in which ``import vllm`` fails: a ``vllm`` package on PYTHONPATH that
    raises, standing in for a machine where vLLM is not installed."""

    pkg = tmp_path / "vllm"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text('raise ImportError("vllm hidden by test_bench_core")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    return env


_SMALL = ("--pairs", "1", "--passes", "1", "--tokens", "4096", "--pool-cycles", "100")


def test_without_vllm_reports_kvbm_alone_and_says_why(tmp_path):
    proc = _kvbm("bench", "core", "--json", *_SMALL, env=_without_vllm_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    assert "vllm hidden by test_bench_core" in r["vllm_anchor_error"]
    assert r["blocks_matched"] == 8192 and r["match_8192_blocks_us"] > 0
    assert r["vllm_match_8192_blocks_us"] is None and r["match_speedup_vs_vllm"] is None
    assert r["match_speedup_vs_vllm_best"] is None and r["hash_speedup_vs_vllm_best"] is None
    assert set(r["pairs"][0]) == {"order", "kvbm"}  # no vLLM side, no ratio

    text = _kvbm("bench", "core", *_SMALL, env=_without_vllm_env(tmp_path))
    assert text.returncode == 0, text.stderr[-4000:]
    assert "match 8192-block hit" in text.stdout and "vLLM anchor unavailable" in text.stdout


def test_without_vllm_require_vllm_is_an_error(tmp_path):
    proc = _kvbm("bench", "core", "--json", "--require-vllm", *_SMALL, env=_without_vllm_env(tmp_path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "--require-vllm" in proc.stderr and "vllm hidden by test_bench_core" in proc.stderr
