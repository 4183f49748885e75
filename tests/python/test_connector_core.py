"""The connector core through Python, without an engine: a leader and a worker in one process
over a synthetic vLLM-like KV cache (numpy arrays), as an engine adapter drives them. Checks
byte-exact onboarding from G2 and G3, bad settings, and the metrics endpoint refusing a port in
use without failing the engine."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from kvbm import _core
from kvbm.errors import ConfigError, InvalidArgumentError

BLOCK = 16
LAYERS = 2
NUM_BLOCKS = 32


def _kv_cache():
    # vLLM CPU layout per layer: [num_blocks, kv_heads, block_size, 2 * head_size], float32
    return [np.zeros((NUM_BLOCKS, 2, BLOCK, 128), dtype=np.float32) for _ in range(LAYERS)]


def _pair(tmp_path, **env):
    env = {"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true", **env}
    layers = _kv_cache()
    worker = _core.Worker(env=env, shared_metrics=False)
    worker.register_kv_caches([a.ctypes.data for a in layers], [list(a.shape) for a in layers],
                              [[s // a.itemsize for s in a.strides] for a in layers], 4, NUM_BLOCKS, BLOCK)
    leader = _core.Leader(BLOCK, worker.bytes_per_block, env=env, shared_metrics=False)
    worker.allocate_tiers(leader.host_blocks, leader.disk_blocks)
    return leader, worker, layers


def _run(leader, worker, layers, rid, tokens, device_blocks):
    """One request the way an engine runs it; returns (loaded tokens, mismatched blocks)."""
    leader.add_request(rid, tokens)
    ext, is_async, _, _ = leader.get_num_new_matched_tokens(rid, 0)
    leader.update_state_after_alloc(rid, device_blocks, ext)
    worker.bind_step(leader.build_step_metadata())
    recving: list[str] = []
    deadline = time.time() + 30
    while ext and rid not in recving:
        assert time.time() < deadline
        _, r = worker.get_finished()
        recving += r
        time.sleep(0.001)
    worker.forward_pass_done()
    errors = worker.take_load_errors()
    leader.on_worker_output(recving, [], errors)
    assert not errors
    n_loaded = ext // BLOCK
    mismatched = 0
    for i, b in enumerate(device_blocks):
        want = np.float32(hash((tuple(tokens[: (i + 1) * BLOCK]),)) % 1000)
        for li, layer in enumerate(layers):
            if i < n_loaded:
                mismatched += int(not np.all(layer[b] == want + li))
            layer[b] = want + li  # the "forward pass" writes every block of the request
    leader.on_scheduled(rid, device_blocks, ext, len(tokens) - ext)
    worker.bind_step(leader.build_step_metadata())
    worker.forward_pass_done()
    assert leader.request_finished(rid) is False
    for layer in layers:
        layer[device_blocks] = -1.0  # the engine reuses its blocks
    return ext, mismatched


def test_onboards_are_byte_exact_from_g2_and_g3(tmp_path):
    leader, worker, layers = _pair(tmp_path, DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="6",
                                   DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="64")
    prompt = list(range(1000, 1000 + 5 * BLOCK))
    ext, bad = _run(leader, worker, layers, "a", prompt, list(range(5)))
    assert ext == 0
    ext, bad = _run(leader, worker, layers, "b", prompt, list(range(10, 15)))
    assert ext == 4 * BLOCK and bad == 0  # from G2; never the whole prompt
    for i in range(3):  # push the prompt out of G2 (6 blocks)
        _run(leader, worker, layers, f"f{i}", list(range(5000 * (i + 1), 5000 * (i + 1) + 5 * BLOCK)), list(range(20, 25)))
    ext, bad = _run(leader, worker, layers, "c", prompt, list(range(5)))
    stats = leader.stats()
    assert ext == 4 * BLOCK and bad == 0
    assert stats["onboard_disk_blocks"] > 0
    worker.wait_idle()
    m = worker.metrics()
    assert m["bytes_h2d"] == m["blocks_h2d"] * worker.bytes_per_block
    assert m["bytes_disk2d"] == m["blocks_disk2d"] * worker.bytes_per_block


def test_bad_settings_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match='DYN_KVBM_CPU_CACHE_GB="lots"'):
        _core.Leader(BLOCK, 4096, env={"DYN_KVBM_CPU_CACHE_GB": "lots"})
    with pytest.raises(ConfigError, match="no cache tier is sized"):
        _core.Leader(BLOCK, 4096, env={})
    with pytest.raises(ConfigError, match="DYN_KVBM_DISK_ALLOCATOR_TYPE"):
        _core.Worker(env={"DYN_KVBM_DISK_ALLOCATOR_TYPE": "fast"})
    worker = _core.Worker(env={"DYN_KVBM_CPU_CACHE_GB": "1"}, shared_metrics=False)
    layers = _kv_cache()
    with pytest.raises(InvalidArgumentError, match="num_blocks"):
        worker.register_kv_caches([a.ctypes.data for a in layers], [list(a.shape) for a in layers],
                                  [[s // 4 for s in a.strides] for a in layers], 4, NUM_BLOCKS + 1, BLOCK)


def test_metrics_port_in_use_keeps_running(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        leader = _core.Leader(BLOCK, 4096, env={"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8",
                                                "DYN_KVBM_METRICS": "true", "DYN_KVBM_METRICS_PORT": str(port)},
                              shared_metrics=False)
        assert leader.metrics_port == 0  # endpoint off, leader works
        leader.add_request("a", list(range(40)))
        assert leader.get_num_new_matched_tokens("a", 0)[0] == 0


def test_kv_events_match_the_pools(tmp_path):
    """A real ZeroMQ subscriber sees one BlockStored per hash entering kvbm's tiers and one
    BlockRemoved per hash leaving them, in vLLM's msgpack event format."""
    import msgpack
    import zmq

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    leader, worker, layers = _pair(tmp_path, DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="4",
                                   DYN_KVBM_EVENTS_ENDPOINT=endpoint)
    assert leader.events_endpoint == endpoint
    # PUB/SUB drops what is published before the subscriber is connected: wait for the
    # ZeroMQ handshake with the publisher (a condition, with a deadline), then start.
    from zmq.utils.monitor import recv_monitor_message

    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sub.connect(endpoint)
    connected = time.monotonic() + 10
    while True:
        assert time.monotonic() < connected, "the subscriber never completed its handshake with kvbm"
        if monitor.poll(200) and recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            break
    sub.disable_monitor()
    monitor.close(0)
    for i in range(4):  # 4 prompts of 3 full blocks into a 4-block G2: evictions
        _run(leader, worker, layers, f"r{i}", list(range(100 * i, 100 * i + 3 * BLOCK + 1)), list(range(4)))
    worker.wait_idle()
    stored, removed = set(), set()
    deadline = time.time() + 10
    registered = leader.pool_stats("host")["registered"]
    entered = leader.stats()["store_host_blocks"]  # distinct prompts: each store is a new hash
    assert entered > registered  # some were evicted
    while time.time() < deadline:
        if sub.poll(200):
            topic, seq, payload = sub.recv_multipart()
            ts, events, _rank = msgpack.unpackb(payload)
            for e in events:
                kind = e[0] if isinstance(e, list) else e["type"]
                hashes = e[1] if isinstance(e, list) else e["block_hashes"]
                for h in hashes:
                    if kind == "BlockStored":
                        assert h not in stored
                        stored.add(h)
                    elif kind == "BlockRemoved":
                        assert h in stored and h not in removed
                        removed.add(h)
        elif len(stored) == entered and len(stored) - len(removed) == registered:
            break
    assert len(stored) == entered
    assert len(stored) - len(removed) == registered
    sub.close()
    ctx.term()


def test_eviction_policy_defaults_to_adaptive_and_follows_the_environment():
    """G2's and G3's order: kvbm's default (adaptive) when nothing is set, the environment's
    DYN_KVBM_{HOST,DISK}_EVICTION_POLICY when set, an engine's explicit choice above both, and a
    clear error naming the variable for an unknown name."""
    def policies(policy=None, **env):
        leader = _core.Leader(BLOCK, 4096, policy=policy, host_blocks=8, disk_blocks=0, env=env)
        return leader.pool_stats("host")["policy"]

    assert policies() == "adaptive"
    assert policies(DYN_KVBM_HOST_EVICTION_POLICY="lru") == "lru"
    assert policies(DYN_KVBM_HOST_EVICTION_POLICY="Leaf-First") == "leaf-first"
    assert policies("reuse", DYN_KVBM_HOST_EVICTION_POLICY="lru") == "reuse"
    with pytest.raises(ConfigError, match="DYN_KVBM_HOST_EVICTION_POLICY=mru: unknown eviction policy"):
        policies(DYN_KVBM_HOST_EVICTION_POLICY="mru")
