"""Warm restart of G3 (DYN_KVBM_DISK_PERSISTENT) at the engine level, through the connector core
as an engine adapter drives it (``kvbm._core`` Worker then Leader, the order vLLM builds them).

A child process runs requests back to back: every block goes G1 -> G2 -> G3, G3 wraps around so
slots are reused, and offloads are always in flight. The test SIGKILLs it right after a request's
offloads were submitted, then starts the engine again in this process with the same settings and
shows: the killed engine's blocks are hits again, every loaded byte is the byte that was
computed (0 wrong bytes), and the writes the kill cut off are counted as torn and never served.
Real files (O_DIRECT where the file system allows it), a real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

from kvbm import _core
from kvbm.errors import ConfigError, FailedPreconditionError

BLOCK = 16
LAYERS = 4
DEVICE_BLOCKS = 16
HEAD = 2048  # float32 elements per token and K/V: 256 KiB per layer per block, 1 MiB per block
REQUEST_BLOCKS = 8
G2_BLOCKS = 16
G3_BLOCKS = 96  # the child wraps around G3 several times before it is killed
DESCRIPTOR = "model=warm-restart-test|kv_dtype=float32|block=16"


def settings(disk_dir: str, o_direct: bool = True) -> dict[str, str]:
    env = {
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(G2_BLOCKS),
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(G3_BLOCKS),
        "DYN_KVBM_DISK_CACHE_DIR": disk_dir,
        "DYN_KVBM_DISK_PERSISTENT": "true",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
        # One 1 MiB block per transfer, one transfer at a time: a request's offloads stay in
        # flight for a few milliseconds after they were submitted, so the kill lands on them.
        "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "1",
        "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "1",
    }
    if not o_direct:
        env["DYN_KVBM_DISK_DISABLE_O_DIRECT"] = "true"
    return env


def prompt(i: int) -> list[int]:
    return [i * 100_000 + t for t in range(REQUEST_BLOCKS * BLOCK + 1)]


def block_value(i: int, b: int, layer: int) -> np.ndarray:
    """What the "forward pass" writes into block b of request i, layer `layer`."""
    rng = np.random.default_rng([i, b, layer])
    return rng.standard_normal((2, BLOCK, HEAD), dtype=np.float32)


class Engine:
    """A worker and a leader over a numpy KV cache, built in vLLM's order (workers allocate
    their tiers before the scheduler side exists)."""

    def __init__(self, env: dict[str, str]):
        self.layers = [np.zeros((DEVICE_BLOCKS, 2, BLOCK, HEAD), dtype=np.float32) for _ in range(LAYERS)]
        self.worker = _core.Worker(env=env, shared_metrics=False)
        self.worker.register_kv_caches([a.ctypes.data for a in self.layers], [list(a.shape) for a in self.layers],
                                       [[s // a.itemsize for s in a.strides] for a in self.layers], 4,
                                       DEVICE_BLOCKS, BLOCK)
        host, disk = _core.size_tiers(self.worker.bytes_per_block, env)
        self.worker.allocate_tiers(host, disk, DESCRIPTOR)
        self.leader = _core.Leader(BLOCK, self.worker.bytes_per_block, env=env, shared_metrics=False,
                                   remote_descriptor=DESCRIPTOR)

    def run(self, i: int, rid: str) -> tuple[int, int, int]:
        """Request i to completion; returns (blocks loaded, wrong bytes among them, load errors)."""
        tokens = prompt(i)
        leader, worker = self.leader, self.worker
        leader.add_request(rid, tokens)
        ext, _, _, _ = leader.get_num_new_matched_tokens(rid, 0)
        device = list(range(REQUEST_BLOCKS))
        leader.update_state_after_alloc(rid, device, ext)
        worker.bind_step(leader.build_step_metadata())
        recving: list[str] = []
        deadline = time.monotonic() + 30
        while ext and rid not in recving:
            assert time.monotonic() < deadline, "a load never finished"
            recving += worker.get_finished()[1]
            time.sleep(0.001)
        worker.forward_pass_done()
        errors = worker.take_load_errors()
        leader.on_worker_output(recving, [], errors)
        loaded = ext // BLOCK
        wrong = 0
        for b in range(REQUEST_BLOCKS):
            for li, layer in enumerate(self.layers):
                want = block_value(i, b, li)
                if b < loaded and b not in errors:
                    wrong += int(np.count_nonzero(layer[b].view(np.uint8) != want.view(np.uint8)))
                layer[b] = want
        leader.on_scheduled(rid, device, ext, len(tokens) - ext)
        worker.bind_step(leader.build_step_metadata())
        worker.forward_pass_done()
        leader.request_finished(rid)
        for layer in self.layers:
            layer[:] = np.nan  # the engine reuses its blocks
        return loaded, wrong, len(errors)

    def close(self) -> None:
        self.worker.wait_idle()
        del self.leader
        del self.worker


CHILD = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, {tests!r})
    from test_warm_restart import Engine
    env = json.loads(sys.argv[1])
    engine = Engine(env)
    print("ready", flush=True)
    i = int(sys.argv[2])
    while True:
        engine.run(i, f"child-{{i}}")
        # forward_pass_done returned: this request's offloads to G3 are in flight now.
        print(f"stored {{i}}", flush=True)
        i += 1
    """
).format(tests=os.path.dirname(os.path.abspath(__file__)))


def o_direct_works(disk_dir: str) -> bool:
    try:
        e = Engine(settings(disk_dir))
    except Exception as err:  # noqa: BLE001
        if "O_DIRECT" in str(err):
            return False
        raise
    e.close()
    for name in os.listdir(disk_dir):
        os.unlink(os.path.join(disk_dir, name))
    return True


def run_child_until_killed(env: dict[str, str], first: int, requests: int) -> int:
    """Starts the child at request `first`, SIGKILLs it as soon as it reports request
    first + requests - 1 stored (its offloads in flight); returns the last request it stored."""
    import json

    with tempfile.TemporaryFile(mode="w+") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(env), str(first)], stdout=subprocess.PIPE,
                                 stderr=log, text=True)
        last = -1
        try:
            for line in child.stdout:
                if line.startswith("stored "):
                    last = int(line.split()[1])
                    if last >= first + requests - 1:
                        child.send_signal(signal.SIGKILL)
                        break
        finally:
            if child.poll() is None and last < first + requests - 1:
                child.kill()
            child.wait(timeout=60)
            child.stdout.close()
        log.seek(0)
        assert child.returncode == -signal.SIGKILL and last >= first + requests - 1, (
            f"the child ended on its own ({child.returncode}): {log.read()[-2000:]}")
    return last


def test_sigkill_mid_offload_then_restart_serves_hits_with_no_wrong_byte(tmp_path):
    disk_dir = str(tmp_path / "g3")
    os.makedirs(disk_dir)
    env = settings(disk_dir, o_direct=o_direct_works(disk_dir))
    torn_total = 0
    first = 0
    # The kill lands while offloads are in flight; up to three kills to see a write cut off
    # (each cycle restarts from the files the previous one left).
    for cycle in range(3):
        last = run_child_until_killed(env, first, requests=40)
        engine = Engine(env)
        m = engine.worker.metrics()
        verified, torn = m["disk_recovery_verified"], m["disk_recovery_torn"]
        assert m["disk_recovery_corrupt"] == 0 and m["disk_recovery_other_layout"] == 0
        restored = engine.leader.stats()["restored_disk_blocks"]
        assert restored == verified > 0, (restored, verified)
        assert engine.leader.metrics()["disk_restored_blocks"] == restored
        # Every slot the child filled is either restored or dropped as torn: none vanished.
        assert verified + torn + m["disk_recovery_duplicate"] == G3_BLOCKS, (verified, torn)
        torn_total += torn

        # Hits return, newest first (G3 holds the last ~G3_BLOCKS / REQUEST_BLOCKS requests).
        hit_blocks = wrong = errors = 0
        for i in range(last, max(first, last - 2 * G3_BLOCKS // REQUEST_BLOCKS), -1):
            loaded, bad, errs = engine.run(i, f"check-{cycle}-{i}")
            hit_blocks += loaded
            wrong += bad
            errors += errs
        assert wrong == 0, f"{wrong} wrong bytes served after the restart"
        assert errors == 0, f"{errors} loads failed verification: the leader restored a block the worker dropped"
        # The torn slots are the only restored-pool holes among the newest requests' blocks.
        assert hit_blocks >= verified // 2, (hit_blocks, verified)
        print(f"cycle {cycle}: killed after request {last}; recovered {verified}, torn {torn}, restored {restored}; "
              f"{hit_blocks} blocks hit, {wrong} wrong bytes")
        engine.close()
        first = last + 1
        if torn_total > 0:
            break
    assert torn_total > 0, "no kill landed on a write in flight in three tries"


def test_persistent_g3_without_a_model_descriptor_is_refused(tmp_path):
    env = settings(str(tmp_path))
    with pytest.raises(ConfigError, match="DYN_KVBM_DISK_PERSISTENT"):
        _core.Leader(BLOCK, 4096, env=env, shared_metrics=False)
    layers = [np.zeros((DEVICE_BLOCKS, 2, BLOCK, 8), dtype=np.float32)]
    worker = _core.Worker(env=env, shared_metrics=False)
    worker.register_kv_caches([a.ctypes.data for a in layers], [list(a.shape) for a in layers],
                              [[s // 4 for s in a.strides] for a in layers], 4, DEVICE_BLOCKS, BLOCK)
    with pytest.raises(ValueError, match="DYN_KVBM_DISK_PERSISTENT"):
        worker.allocate_tiers(G2_BLOCKS, G3_BLOCKS)
    assert os.listdir(tmp_path) == []


def test_a_second_engine_on_the_same_files_is_refused_while_the_first_runs(tmp_path):
    env = settings(str(tmp_path), o_direct=o_direct_works(str(tmp_path)))
    first = Engine(env)
    try:
        start = time.monotonic()
        with pytest.raises(FailedPreconditionError, match="locked by another process"):
            Engine(env)
        assert time.monotonic() - start >= 5, "the lock is waited for (a killed process's files close late)"
    finally:
        first.close()
