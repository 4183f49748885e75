"""`kvbm replay --load-steps N`: loads that span engine steps, so that eviction policies which
treat blocks held by a load differently can differ. On a small multi-turn trace, lru and
leaf-first hit the same blocks when every load finishes within its step, and different ones
when loads take steps (the loaded blocks stay pinned while other requests are admitted and
stored). The figures themselves are not asserted, only that relation."""

from __future__ import annotations

import json

import pytest

from kvbm import _core

# 12 requests of a conversation trace (Mooncake format, 512-token blocks): three conversations
# over a shared first block, growing by turns.
TRACE = [
    (46, 3, [1]),
    (388, 10, [1, 2, 3]),
    (714, 13, [1, 4, 5]),
    (941, 17, [1, 4, 5, 6, 7]),
    (1104, 13, [1, 2, 8, 9]),
    (1390, 6, [1, 2, 8, 9]),
    (1651, 17, [1, 10]),
    (1863, 17, [1, 4, 5, 6, 7, 11]),
    (2044, 12, [1, 2, 8, 9, 12, 13]),
    (2430, 13, [1, 10]),
    (2701, 8, [1, 10, 14, 15]),
    (2964, 12, [1, 10, 14, 15, 16, 17]),
]
G2_BLOCKS = 6


def _lines() -> str:
    return "\n".join(json.dumps({"timestamp": t, "input_length": 512 * len(ids), "output_length": out, "hash_ids": ids})
                     for t, out, ids in TRACE) + "\n"


def _hits(load_steps: int) -> dict[str, tuple[int, int]]:
    trace = _core.parse_mooncake_trace(_lines().encode())
    out = {}
    for policy in ("lru", "leaf-first"):
        r = _core.run_replay(trace, g1_blocks=0, g2_blocks=G2_BLOCKS, g3_blocks=0, policy=policy, load_steps=load_steps)
        assert r["requests"] == len(TRACE)
        out[policy] = (r["g2_hit_blocks"], r["hit_tokens"])
    return out


def test_policies_agree_when_loads_finish_within_their_step():
    hits = _hits(0)
    assert hits["lru"] == hits["leaf-first"]
    assert hits["lru"][0] > 0  # the trace does reuse G2


@pytest.mark.parametrize("load_steps", [1, 4])
def test_policies_differ_when_loads_span_steps(load_steps):
    hits = _hits(load_steps)
    assert hits["lru"] != hits["leaf-first"], hits


def test_cli_load_steps(tmp_path, run_kvbm):
    path = tmp_path / "trace.jsonl"
    path.write_text(_lines())
    common = [str(path), "--g1-blocks", "0", "--g2-blocks", str(G2_BLOCKS), "--json", "--no-progress"]
    got = {}
    for steps in ("0", "2"):
        for policy in ("lru", "leaf-first"):
            p = run_kvbm("replay", *common, "--policy", policy, "--load-steps", steps)
            assert p.returncode == 0, p.stderr
            r = json.loads(p.stdout)
            assert r["load_steps"] == int(steps)
            got[steps, policy] = r["g2_hit_blocks"]
    assert got["0", "lru"] == got["0", "leaf-first"]
    assert got["2", "lru"] != got["2", "leaf-first"]


@pytest.mark.parametrize("value, needle", [("-1", "--load-steps"), ("0x10", "decimal"), ("2.5", "--load-steps"),
                                           ("1000001", "--load-steps")])
def test_cli_rejects_bad_load_steps(tmp_path, run_kvbm, value, needle):
    path = tmp_path / "trace.jsonl"
    path.write_text(_lines())
    p = run_kvbm("replay", str(path), "--load-steps", value)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr, p.stderr


def test_load_steps_with_bytes_is_refused(tmp_path, run_kvbm):
    path = tmp_path / "trace.jsonl"
    path.write_text(_lines())
    p = run_kvbm("replay", str(path), "--g1-blocks", "10", "--bytes", "--load-steps", "2")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--load-steps 2 cannot be combined with --bytes" in p.stderr
    with pytest.raises(Exception, match="load_steps=2 applies without move_bytes"):
        _core.run_replay(_core.parse_mooncake_trace(_lines().encode()), g1_blocks=10, move_bytes=True, load_steps=2)


def test_load_steps_with_instances_is_refused(tmp_path, run_kvbm):
    path = tmp_path / "trace.jsonl"
    path.write_text(_lines())
    p = run_kvbm("replay", str(path), "--g2-blocks", "4", "--instances", "2", "--load-steps", "2")
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "--load-steps models one instance's loads" in p.stderr, p.stderr
