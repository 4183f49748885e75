"""Hostile and mistaken input to the ``kvbm`` command line (issue 17).

Every case must end in one clear line ``kvbm: error: ...`` naming the input, exit status 2, and
no Python traceback; and nothing may grow without bound on the way.
"""

from __future__ import annotations

import gzip
import json
import re
import socket

import pytest

from kvbm import _core

GOOD = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}


def _lines(n: int) -> bytes:
    return b"".join(json.dumps({**GOOD, "timestamp": i, "hash_ids": [i, i + 1]}).encode() + b"\n" for i in range(n))


def assert_clean_error(p, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert "kvbm: error:" in p.stderr or "error:" in p.stderr, p.stderr
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr)


# --- traces -----------------------------------------------------------------------------------


def test_dev_zero_is_refused_not_read_forever(run_kvbm):
    p = run_kvbm("replay", "/dev/zero", "--limit", "5")
    assert_clean_error(p, "kvbm: error:", "/dev/zero", "line 1", "longer than")


def test_truncated_gzip_trace(run_kvbm, tmp_path):
    whole = gzip.compress(_lines(200))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) - 40])
    p = run_kvbm("replay", str(path))
    assert_clean_error(p, "kvbm: error:", str(path), "truncated")


def test_not_a_gzip_file(run_kvbm, tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(_lines(3))
    p = run_kvbm("replay", str(path))
    assert_clean_error(p, "kvbm: error:", str(path), "gzip")


def test_overlong_line_in_gzip_is_refused(run_kvbm, tmp_path):
    path = tmp_path / "zeros.jsonl.gz"
    path.write_bytes(gzip.compress(_lines(2) + b"0" * (_core.MAX_TRACE_LINE_BYTES + 10)))
    p = run_kvbm("replay", str(path))
    assert_clean_error(p, str(path), "line 3", "longer than")


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("empty.jsonl", b"", "no requests"),
        ("blank.jsonl", b"\n \n\t\n", "no requests"),
        ("empty.jsonl.gz", gzip.compress(b""), "no requests"),
        ("zero-bytes.jsonl.gz", b"", "no requests"),
    ],
)
def test_empty_traces_fail(run_kvbm, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    p = run_kvbm("replay", str(path))
    assert_clean_error(p, "kvbm: error:", name, needle)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_directory_as_trace_fails(run_kvbm, tmp_path, suffix):
    d = tmp_path / f"dir.jsonl{suffix}"
    d.mkdir()
    p = run_kvbm("replay", str(d))
    assert_clean_error(p, "kvbm: error:", str(d), "directory")


def test_missing_trace_fails(run_kvbm, tmp_path):
    for name in ("missing.jsonl", "missing.jsonl.gz"):
        p = run_kvbm("replay", str(tmp_path / name))
        assert_clean_error(p, "kvbm: error:", name)


def test_gzip_trace_limit_reads_only_what_it_needs(run_kvbm, tmp_path):
    # A valid start then an overlong line: --limit stops before reaching it.
    path = tmp_path / "head.jsonl.gz"
    path.write_bytes(gzip.compress(_lines(10) + b"7" * (_core.MAX_TRACE_LINE_BYTES + 10)))
    p = run_kvbm("replay", str(path), "--limit", "10", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["requests"] == 10


# --- numbers: decimal only, in range, checked before the core -----------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--block-size", "4294967297", "1", "2"], "--block-size"),
        (["--block-size", "0x10", "1"], "--block-size"),
        (["--block-size", "4", "0x10"], "TOKEN"),
        (["--block-size", "4", "1_0"], "TOKEN"),
        (["--block-size", "4", "--salt-hash", "0x539", "1"], "--salt-hash"),
        (["--block-size", "4", "--salt-hash", str(1 << 64), "1"], "--salt-hash"),
        (["--block-size", "-4", "1"], "--block-size"),
    ],
)
def test_hash_rejects_bad_numbers(run_kvbm, args, needle):
    p = run_kvbm("hash", *args)
    assert_clean_error(p, needle)
    assert p.stdout == ""


def test_hash_accepts_the_largest_block_size(run_kvbm):
    p = run_kvbm("hash", "--block-size", str((1 << 32) - 1), "1", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""  # no full block


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--limit", "0x10"], "--limit"),
        (["--block-size", "0x200"], "--block-size"),
        (["--block-size", "4294967297"], "--block-size"),
        (["--g2-blocks", "0x10"], "--g2-blocks"),
        (["--g2-blocks", str(1 << 41)], "--g2-blocks"),
        (["--g2-gb", "0x10", "--bytes-per-token", "8"], "--g2-gb"),
        (["--g2-gb", "nan", "--bytes-per-token", "8"], "--g2-gb"),
        (["--g2-gb", "inf", "--bytes-per-token", "8"], "--g2-gb"),
        (["--g2-gb", "1e30", "--bytes-per-token", "8"], "--g2-gb"),
        (["--bytes-per-token", "0x8"], "--bytes-per-token"),
        (["--bytes-per-token", str(1 << 33)], "--bytes-per-token"),
        (["--prefill-tokens-per-s", "0x10"], "--prefill-tokens-per-s"),
        (["--linger", "nan"], "--linger"),
    ],
)
def test_replay_rejects_bad_numbers(run_kvbm, args, needle):
    p = run_kvbm("replay", "--limit", "5", *args)
    assert_clean_error(p, needle)


def test_replay_gb_size_too_large_for_the_tier(run_kvbm):
    # Within the GB bound but more blocks than a tier may have at 1 byte per token.
    p = run_kvbm("replay", "--limit", "5", "--g2-gb", "1e8", "--bytes-per-token", "1", "--block-size", "1")
    assert_clean_error(p, "kvbm: error:", "--g2-gb", "too large")


@pytest.mark.parametrize("var", ["DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB"])
def test_huge_cache_setting_is_too_large(run_kvbm, monkeypatch, var):
    monkeypatch.setenv(var, "1e30")
    p = run_kvbm("replay", "--limit", "5")
    assert_clean_error(p, "kvbm: error:", f'{var}="1e30"', "too large")
    monkeypatch.setenv(var, "0x10")
    p = run_kvbm("replay", "--limit", "5")
    assert_clean_error(p, "kvbm: error:", f'{var}="0x10"', "decimal")


# --- the metrics port the replay reports --------------------------------------------------------


def test_replay_prints_the_port_really_bound(run_kvbm, monkeypatch):
    monkeypatch.setenv("DYN_KVBM_METRICS", "true")
    monkeypatch.setenv("DYN_KVBM_METRICS_PORT", "0")
    p = run_kvbm("replay", "--limit", "20", "--linger", "0.1", "--json")
    assert p.returncode == 0, p.stderr
    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", p.stderr)
    assert m, p.stderr
    assert int(m.group(1)) != 0
    assert json.loads(p.stdout)["metrics_port"] == int(m.group(1))


def test_replay_says_when_the_metrics_bind_failed(run_kvbm, monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        monkeypatch.setenv("DYN_KVBM_METRICS", "true")
        monkeypatch.setenv("DYN_KVBM_METRICS_PORT", str(port))
        p = run_kvbm("replay", "--limit", "20", "--linger", "0.1", "--json")
    assert p.returncode == 0, p.stderr  # the replay runs on without metrics
    assert f'DYN_KVBM_METRICS_PORT="{port}"' in p.stderr and "address already in use" in p.stderr
    assert "metrics endpoint is not running" in p.stderr
    assert "metrics on http" not in p.stderr
    assert json.loads(p.stdout)["metrics_port"] == 0
