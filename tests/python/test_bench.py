"""The benchmark method (interleaved pairs) and a --quick smoke run of every ``kvbm bench``
subcommand: the code paths run end to end on real buffers, a real O_DIRECT file, fio, the real
vLLM engine and server; timings are never asserted, only that every figure is there and sane."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.bench import _pairs
from kvbm.testing.vllm_guard import vllm_marks

REPO = Path(__file__).resolve().parents[2]


def _with_vllm(fn):
    """The vllm mark, and a skip naming the import error when vLLM is missing."""
    for mark in vllm_marks():
        fn = mark(fn)
    return fn


def _kvbm_json(*args: str, timeout: float) -> dict:
    script = Path(sys.executable).parent / "kvbm"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "kvbm.cli"]
    r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       check=False)
    assert r.returncode == 0, f"kvbm {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_ratio(entry: dict, pairs: int) -> None:
    assert entry["pairs"] == pairs
    assert len(entry["ratios"]) == pairs
    assert entry["min"] <= entry["median"] <= entry["max"]
    assert all(r > 0 for r in entry["ratios"])
    assert entry["kvbm"]["pairs"] == pairs and entry["anchor"]["pairs"] == pairs


# --- the pairing method -------------------------------------------------------------------------


def test_pairs_alternate_order_and_give_one_ratio_each():
    calls: list[tuple[str, int]] = []

    def kvbm(i):
        calls.append(("k", i))
        return 2.0 * (i + 2)

    def anchor(i):
        calls.append(("a", i))
        return float(i + 2)

    out = _pairs.run_pairs(kvbm, anchor, 5)
    assert calls[:2] == [("k", -1), ("a", -1)]  # warm-up, untimed
    order = [c for c, _ in calls[2:]]
    assert order == ["k", "a", "a", "k", "k", "a", "a", "k", "k", "a"]
    # Both sides of a pair measured the same pair index (same data).
    assert [i for _, i in calls[2:]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert out["ratios"] == [2.0] * 5
    assert (out["median"], out["min"], out["max"], out["pairs"]) == (2.0, 2.0, 2.0, 5)
    assert out["kvbm"]["median"] == 8.0 and out["anchor"]["median"] == 4.0


def test_pairs_median_min_max_of_the_per_pair_ratios():
    ks = [1.0, 3.0, 2.0, 10.0, 4.0]
    out = _pairs.run_pairs(lambda i: ks[i] if i >= 0 else 1.0, lambda i: 2.0, 5)
    assert out["ratios"] == [k / 2.0 for k in ks]
    assert (out["median"], out["min"], out["max"]) == (1.5, 0.5, 5.0)


def test_pairs_without_anchor_report_kvbm_only():
    out = _pairs.run_pairs(lambda i: 3.0, None, 3, warmup=False)
    assert out["median"] is None and out["kvbm"]["median"] == 3.0 and out["kvbm"]["pairs"] == 3


def test_pair_count_refuses_too_few_outside_quick():
    import argparse

    p = argparse.ArgumentParser()
    _pairs.add_common_arguments(p, stable_pairs=7)
    assert _pairs.pair_count(p.parse_args([])) == 7
    assert _pairs.pair_count(p.parse_args(["--quick"])) == _pairs.QUICK_PAIRS
    assert _pairs.pair_count(p.parse_args(["--quick", "--pairs", "1"])) == 1
    with pytest.raises(ValueError, match="--pairs 3 is below 5"):
        _pairs.pair_count(p.parse_args(["--pairs", "3"]))
    with pytest.raises(ValueError, match="at least 1"):
        _pairs.pair_count(p.parse_args(["--quick", "--pairs", "0"]))


def test_spread_is_the_largest_distance_from_the_median():
    s = _pairs.spread([1.0, 1.1, 0.95])
    assert s["center"] == 1.0
    assert abs(s["spread_pct"] - 10.0) < 1e-9


# --- kvbm bench transfer ------------------------------------------------------------------------


def test_best_on_each_cpu_pins_every_thread_and_restores_the_affinity():
    """Each sample runs with the whole process on one CPU (a native thread too), every allowed
    CPU once; the result is the best sample and the affinity is what it was before."""
    import threading

    allowed = os.sched_getaffinity(0)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    seen = []

    def sample():
        mine = os.sched_getaffinity(0)
        theirs = os.sched_getaffinity(worker.native_id)
        seen.append((mine, theirs))
        return float(len(seen))

    try:
        best = _pairs.best_on_each_cpu(sample)
        assert best == float(len(allowed))
        assert [m for m, _ in seen] == [{c} for c in sorted(allowed)]
        assert all(m == t for m, t in seen)
        assert os.sched_getaffinity(0) == allowed and os.sched_getaffinity(worker.native_id) == allowed
    finally:
        stop.set()
        worker.join()


def test_fio_runs_with_huge_page_buffers_and_keeps_other_tunables(monkeypatch):
    from kvbm.bench.transfer import fio_env

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2")
    env = fio_env()
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=2", "glibc.malloc.hugetlb=1"]
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert fio_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_transfer_bench_rejects_unknown_pass(tmp_path):
    from kvbm._core import TransferBench

    tb = TransferBench.create(block_bytes=256 << 10, num_blocks=8, disk_dir=str(tmp_path))
    with pytest.raises(Exception, match="unknown transfer bench pass 'g9_to_g1'"):
        tb.pass_seconds("g9_to_g1")
    with pytest.raises(Exception, match="not a positive multiple"):
        TransferBench.create(block_bytes=1000, num_blocks=8, disk_dir=str(tmp_path))


def test_transfer_bench_passes_keep_the_data_intact(tmp_path):
    """Anchor passes and kvbm passes share buffers; the verification round trip must still hold."""
    from kvbm._core import TransferBench

    tb = TransferBench.create(block_bytes=256 << 10, num_blocks=16, disk_dir=str(tmp_path))
    for name in ("g1_to_g2", "memcpy_g1_to_g2", "g2_to_g3", "g3_to_g2", "memcpy_g2_to_g1", "g2_to_g1"):
        assert tb.pass_seconds(name) > 0
    assert tb.memcpy_threads >= 1 and tb.io_depth >= 1
    assert tb.bytes == 16 * (256 << 10)
    assert tb.verify() == 0


def test_transfer_disk_pairs_run_fio_pinned_to_each_cpu(tmp_path, monkeypatch):
    """fio inherits the pinning of the thread that starts it: each disk sample of the anchor runs
    on one CPU, every allowed CPU in turn, as kvbm's side does."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (apt-get install fio)")
    from kvbm.bench import transfer

    allowed = os.sched_getaffinity(0)
    seen = []
    real = transfer.fio_gbps

    def recording(*args, **kwargs):
        seen.append(os.sched_getaffinity(0))
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer, "fio_gbps", recording)
    r = transfer.measure_block_size(256 << 10, 8 << 20, str(tmp_path), pairs=1, disk_pairs=1)
    assert r["mismatched_blocks"] == 0
    # Two disk ratios, each a warm-up and one pair, each sampled on every CPU.
    assert seen == [{c} for c in sorted(allowed)] * 4
    assert os.sched_getaffinity(0) == allowed


def test_transfer_quick(tmp_path):
    out = _kvbm_json("bench", "transfer", "--quick", "--json", "--dir", str(tmp_path), timeout=600)
    assert out["quick"] is True and out["pairs"] == _pairs.QUICK_PAIRS
    (b,) = out["block_sizes"].values()
    assert b["mismatched_blocks"] == 0
    for key in ("g1_to_g2_vs_memcpy", "g1_to_g2_vs_memcpy_1t", "g2_to_g1_vs_memcpy", "g2_to_g1_vs_memcpy_1t"):
        _check_ratio(b[key], out["pairs"])
    for key in ("g2_to_g3_vs_fio", "g3_to_g2_vs_fio"):
        if shutil.which("fio"):
            _check_ratio(b[key], out["pairs"])
        else:
            assert b[key]["median"] is None and b[key]["kvbm"]["pairs"] == out["pairs"]
    assert out["machine"]["cpus"] >= 1


def test_transfer_bad_arguments_are_named(run_kvbm):
    r = run_kvbm("bench", "transfer", "--block-sizes", "12Q")
    assert r.returncode == 2 and "12Q" in r.stderr
    r = run_kvbm("bench", "transfer", "--pairs", "2")
    assert r.returncode == 2 and "--pairs 2" in r.stderr


# --- kvbm bench remote (a real 6-node Redis Cluster on 127.0.0.1, redis-benchmark) -------------


def _redis_tools_or_skip():
    for tool in ("redis-server", "redis-cli", "redis-benchmark"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install_deps.sh installs redis-server)")


def test_remote_quick(monkeypatch):
    _redis_tools_or_skip()
    monkeypatch.chdir(REPO)  # the bench finds scripts/redis_cluster.sh from the source tree
    out = _kvbm_json("bench", "remote", "--quick", "--json", timeout=600)
    assert out["quick"] is True and out["pairs"] == _pairs.QUICK_PAIRS and out["redis_benchmark"] is True
    (b,) = out["block_sizes"].values()
    assert b["block_bytes"] == 256 << 10 and b["value_bytes"] == b["block_bytes"] + 40
    assert b["masters"] == 3 and b["kvbm_batch_blocks"] == 3 * b["pipeline"]
    assert b["mismatched_blocks"] == 0  # every block came back through G4 byte-exact
    for key in ("put_vs_redis_benchmark", "get_vs_redis_benchmark"):
        _check_ratio(b[key], out["pairs"])


def test_remote_bench_round_trip_and_errors(monkeypatch):
    _redis_tools_or_skip()
    from kvbm._core import RemoteBench
    from kvbm.bench.remote import LocalCluster

    monkeypatch.chdir(REPO)
    with LocalCluster() as cluster:
        b = RemoteBench.create(cluster.url, block_bytes=64 << 10, num_blocks=20, batch_blocks=6)
        assert b.bytes == 20 * (64 << 10) and b.masters == 3
        assert b.put_seconds() > 0 and b.get_seconds() > 0
        assert b.verify() == 0
        b.clear()
        with pytest.raises(Exception, match="gone from G4"):
            b.get_seconds()  # deleted blocks are a named error, never stale bytes
        with pytest.raises(Exception, match="must be > 0"):
            RemoteBench.create(cluster.url, block_bytes=0, num_blocks=4)
    with pytest.raises(Exception):
        RemoteBench.create(cluster.url, block_bytes=4096, num_blocks=4, timeout_ms=500)  # stopped: unreachable


def test_remote_bad_arguments_are_named(run_kvbm):
    r = run_kvbm("bench", "remote", "--block-sizes", "12Q")
    assert r.returncode == 2 and "12Q" in r.stderr
    r = run_kvbm("bench", "remote", "--pipeline", "0", "--quick")
    assert r.returncode == 2 and "--pipeline" in r.stderr


# --- kvbm bench all and the BENCHMARKS.md tables ------------------------------------------------


def test_all_quick_and_tables_regenerate(tmp_path):
    out_file = tmp_path / "bench.json"
    summary = _kvbm_json("bench", "all", "--quick", "--json", "--only", "transfer", "--invocations", "2",
                         "--out", str(out_file), timeout=900)
    assert json.loads(out_file.read_text()) == summary
    assert summary["invocations"] == 2 and len(summary["runs"]) == 2
    assert "error" not in summary["results"]["transfer"]
    spread_keys = set(summary["spread"])
    assert any(k.endswith("g1_to_g2_vs_memcpy") for k in spread_keys)
    for entry in summary["spread"].values():
        assert len(entry["medians"]) == 2 and entry["spread_pct"] >= 0

    doc = tmp_path / "DOC.md"
    prose = "# Title\n\nProse that stays.\n\n"
    doc.write_text(prose + "<!-- bench:transfer -->\nold figures\n<!-- /bench:transfer -->\n\nMore prose.\n"
                   "<!-- bench:spread -->\nold\n<!-- /bench:spread -->\n<!-- bench:vllm -->\nkept\n<!-- /bench:vllm -->\n")
    script = REPO / "scripts" / "bench_tables.py"
    r = subprocess.run([sys.executable, str(script), str(out_file), "--doc", str(doc), "--check"], capture_output=True, check=False)
    assert r.returncode == 1  # differs before the rewrite
    subprocess.run([sys.executable, str(script), str(out_file), "--doc", str(doc)], check=True)
    text = doc.read_text()
    assert text.startswith(prose) and "More prose." in text
    assert "old figures" not in text and "G1→G2" in text and "memcpy, 1 thread" in text
    b = next(iter(summary["results"]["transfer"]["block_sizes"].values()))
    assert f"{b['g1_to_g2_vs_memcpy']['median']:.2f}" in text
    assert "kept" in text  # no vllm result in the JSON: its table is left alone
    r = subprocess.run([sys.executable, str(script), str(out_file), "--doc", str(doc), "--check"], capture_output=True, check=False)
    assert r.returncode == 0


def test_all_spread_counts_pair_medians_and_ratios_of_bests():
    from kvbm.bench import all as bench_all

    def core(median: float, best: float) -> dict:
        return {"core": {"match_speedup_vs_vllm": {"median": median, "min": 1.0, "max": 200.0, "pairs": [median]},
                         "match_speedup_vs_vllm_best": {"ratio": best, "kvbm_best_us": 1.0, "vllm_best_us": best,
                                                        "passes_per_side": 30}}}

    spread = bench_all.spread_of([core(60.0, 58.0), core(90.0, 62.0), core(80.0, 60.0)])
    assert spread["core.match_speedup_vs_vllm"]["medians"] == [60.0, 90.0, 80.0]
    assert spread["core.match_speedup_vs_vllm_best"]["medians"] == [58.0, 62.0, 60.0]
    # 62 is the farthest from the median 60: +3.3%.
    assert spread["core.match_speedup_vs_vllm_best"]["spread_pct"] == pytest.approx(100 * 2 / 60)


def test_bench_lists_no_distributed(run_kvbm):
    r = run_kvbm("bench", "--help")
    assert "distributed" not in r.stdout + r.stderr
    for name in ("transfer", "vllm", "serve", "all"):
        assert name in r.stdout + r.stderr


# --- vLLM: kvbm bench vllm and kvbm bench serve (real engine, real server, vLLM's client) -------


def test_vllm_cpu_must_be_an_allowed_cpu(run_kvbm):
    for bad in ("9999", "-1", "one"):
        r = run_kvbm("bench", "vllm", "--quick", "--cpu", bad)
        assert r.returncode == 2, r.stderr
        assert f"--cpu {bad!r} is not a CPU this process may use" in r.stderr


@_with_vllm
@pytest.mark.slow
def test_vllm_quick(tmp_path):
    out = _kvbm_json("bench", "vllm", "--quick", "--json", "--dir", str(tmp_path), timeout=1500)
    n = out["pairs"]
    assert out["pinned_cpu"] == max(os.sched_getaffinity(0))  # the default: the last allowed CPU
    for key in ("ttft_g2_vs_recompute", "ttft_g3_vs_recompute", "no_reuse_throughput_ratio", "ttft_g2_vs_limit",
                "ttft_g2_vs_g1_hit", "ttft_g3_vs_g1_hit"):
        _check_ratio(out[key], n)
    for tier in ("g2", "g3"):
        # The same pairs' hits over vLLM's own G1 hits of the same prompts.
        g1 = out[f"ttft_{tier}_vs_g1_hit"]
        assert g1["kvbm"]["median"] == pytest.approx(out[f"ttft_{tier}_vs_recompute"]["kvbm"]["median"])
        assert 0 < g1["anchor"]["max"] < out[f"ttft_{tier}_vs_recompute"]["anchor"]["min"]
    # vLLM's own G1 hits (the G2 pairs') over the G2 limits of the same pairs.
    _check_ratio(out["g1_hit_vs_g2_limit"], n)
    assert out["g1_hit_vs_g2_limit"]["kvbm"] == out["ttft_g2_vs_g1_hit"]["anchor"]
    assert out["g1_hit_vs_g2_limit"]["anchor"] == out["ttft_g2_vs_limit"]["limit_s"]
    assert out["outputs_identical"] is True
    assert out["onboarded_blocks_g2"]["min"] > 0 and out["onboarded_blocks_g3"]["min"] > 0
    lim = out["ttft_g2_vs_limit"]
    assert lim["bandwidth_gbps"]["min"] > 0 and lim["one_block_miss_ttft_s"]["min"] > 0
    if shutil.which("fio"):
        _check_ratio(out["ttft_g3_vs_limit"], n)
    assert os.listdir(tmp_path) == []  # the engines' disk tiers are removed


@_with_vllm
@pytest.mark.slow
def test_serve_quick():
    out = _kvbm_json("bench", "serve", "--quick", "--json", "--pairs", "1", timeout=1500)
    assert out["pairs"] == 1 and out["turns"] == 20
    assert out["longest_turn_tokens"] > out["g1_tokens"] / 2
    for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput"):
        _check_ratio(out["figures"][k], 1)
