"""DYN_KVBM_ENABLE_RECORD: the vLLM adapter records the engine's requests as a Mooncake trace,
and `kvbm replay` reads it back.

The chat workload (four conversations from the Mooncake trace, scaled to 32 tokens per trace
block) runs through the real vLLM engine with recording on. The recorded ids must name prefixes
exactly: two requests share the id of block i if and only if their prompts agree on every token
up to the end of block i (checked here against the prompts themselves, not against kvbm's hash).
"""

from __future__ import annotations

import json
import math

import pytest

from kvbm.testing.vllm_guard import vllm_marks

pytestmark = vllm_marks()

TRACE_BLOCK = 512


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.chat_workload import chat_prompts
    from kvbm.testing.tiny_model import write_tiny_llama

    tmp = tmp_path_factory.mktemp("record")
    model = str(write_tiny_llama(tmp / "model"))
    path = tmp / "trace.jsonl"
    prompts = chat_prompts()
    with vr.kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=64, DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=None,
                     DYN_KVBM_CPU_CACHE_GB=None, DYN_KVBM_DISK_CACHE_GB=None,
                     DYN_KVBM_ENABLE_RECORD="true", DYN_KVBM_RECORD_PATH=str(path)):
        llm = vr.make_llm(model, with_kvbm=True, gpu_blocks=48, max_model_len=47 * 32)
        try:
            run = vr.run_sequential(llm, prompts, max_tokens=5)
        finally:
            vr.close_llm(llm)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {"prompts": prompts, "lines": lines, "path": path, "run": run}


def test_one_line_per_request_in_mooncake_format(recorded):
    lines, prompts = recorded["lines"], recorded["prompts"]
    assert len(lines) == len(prompts)
    for line, prompt in zip(lines, prompts):
        assert set(line) == {"timestamp", "input_length", "output_length", "hash_ids"}
        assert line["input_length"] == len(prompt)
        assert line["output_length"] == 5
        assert len(line["hash_ids"]) == math.ceil(len(prompt) / TRACE_BLOCK)
    stamps = [line["timestamp"] for line in lines]
    assert stamps == sorted(stamps)  # one request after the other: arrival order is finish order


def test_hash_ids_name_prefixes(recorded):
    lines, prompts = recorded["lines"], recorded["prompts"]
    pairs = 0
    for a in range(len(prompts)):
        for b in range(a + 1, len(prompts)):
            for i, (ha, hb) in enumerate(zip(lines[a]["hash_ids"], lines[b]["hash_ids"])):
                end = (i + 1) * TRACE_BLOCK
                pa, pb = prompts[a][:end], prompts[b][:end]
                assert (ha == hb) == (pa == pb), (a, b, i)
                pairs += ha == hb
    assert pairs > 0, "no two requests shared a recorded prefix: the workload should have"


def test_kvbm_replay_reads_the_recording(recorded, run_kvbm):
    r = run_kvbm("replay", str(recorded["path"]), "--limit", "100", "--json", "--g1-blocks", "4", "--g2-blocks", "64")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["requests"] == len(recorded["prompts"]), out
    assert out["input_tokens"] == sum(map(len, recorded["prompts"])), out
    assert out["token_hit_rate"] > 0, out  # the conversations' shared prefixes hit on replay
