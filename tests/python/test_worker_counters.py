"""Worker transfer counters carried to the leader's metrics (Worker.transfer_counters ->
Leader.add_worker_counters), the path the vLLM adapter uses when the engine core and the
workers are separate processes. Here the two sides have separate metrics objects
(shared_metrics=False), exactly as in two processes, and move real bytes between numpy "G1"
tensors, host memory and a disk file."""

from __future__ import annotations

import re

import pytest

from kvbm import _core
from kvbm.errors import InvalidArgumentError

from test_connector_core import BLOCK, _pair, _run


def _prom(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"{series} not in the endpoint's text"
    return float(m.group(1))


def test_leader_endpoint_counts_the_workers_transfers(tmp_path):
    leader, worker, layers = _pair(tmp_path, DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="6",
                                   DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="64")
    prompt = list(range(1000, 1000 + 5 * BLOCK))
    _run(leader, worker, layers, "a", prompt, list(range(5)))
    _run(leader, worker, layers, "b", prompt, list(range(10, 15)))  # G2 hit
    for i in range(3):  # push the prompt out of G2
        _run(leader, worker, layers, f"f{i}", list(range(5000 * (i + 1), 5000 * (i + 1) + 5 * BLOCK)), list(range(20, 25)))
    _run(leader, worker, layers, "c", prompt, list(range(5)))  # G3 hit
    worker.wait_idle()

    text = leader.prometheus_text()
    assert _prom(text, "kvbm_offload_blocks_d2h") == 0  # the leader moved nothing itself
    reported: dict = {}
    now = dict(worker.transfer_counters())
    leader.add_worker_counters({k: v - reported.get(k, 0) for k, v in now.items()})
    w, stats = worker.metrics(), leader.stats()
    text = leader.prometheus_text()
    assert _prom(text, "kvbm_offload_blocks_d2h") == w["blocks_d2h"] > 0
    assert _prom(text, "kvbm_offload_blocks_h2d") == w["blocks_h2disk"] > 0
    assert _prom(text, "kvbm_onboard_blocks_h2d") == w["blocks_h2d"] == stats["onboard_host_blocks"] > 0
    assert _prom(text, "kvbm_onboard_blocks_d2d") == w["blocks_disk2d"] == stats["onboard_disk_blocks"] > 0
    assert _prom(text, 'kvbm_transfer_bytes{path="d2h"}') == w["bytes_d2h"]
    assert _prom(text, 'kvbm_transfer_seconds_count{path="d2h"}') > 0

    # a second report carries only what happened since: nothing, so nothing changes
    later = dict(worker.transfer_counters())
    leader.add_worker_counters({k: v - now.get(k, 0) for k, v in later.items() if v != now.get(k, 0)})
    assert _prom(leader.prometheus_text(), "kvbm_offload_blocks_d2h") == w["blocks_d2h"]


def test_a_bad_report_is_rejected_whole(tmp_path):
    leader = _core.Leader(BLOCK, 4096, env={"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8"}, shared_metrics=False)
    with pytest.raises(InvalidArgumentError, match='unknown counter "blocks_sideways"'):
        leader.add_worker_counters({"blocks_d2h": 5, "blocks_sideways": 1})
    with pytest.raises(InvalidArgumentError, match='"blocks_h2d" is -2'):
        leader.add_worker_counters({"blocks_d2h": 5, "blocks_h2d": -2})
    assert leader.metrics()["blocks_d2h"] == 0  # neither report was applied in part
