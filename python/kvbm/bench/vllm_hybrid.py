"""Tokens vLLM holds in G1 at once with kvbm, HMA on against HMA off (the same 24 MiB of KV).

16 requests of 1,000-token prompts, 200 tokens each decoded, on the tiny Gemma-3-shaped model
(five window-64 layers, one global). Prints one JSON line: G1 blocks, the most requests running
at once and the most tokens their KV held. Usage::

    python -m kvbm.bench.vllm_hybrid hma     # kvbm, vLLM's hybrid KV cache manager on
    python -m kvbm.bench.vllm_hybrid off     # kvbm, --disable-hybrid-kv-cache-manager (kvbm before HMA support)
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile


def main(mode: str) -> None:
    """Runs the workload with HMA on (`hma`) or off (`off`) and prints the FIT line."""
    from kvbm.testing.tiny_model import write_tiny_gemma3, prepare_cpu_environment, engine_kwargs
    prepare_cpu_environment()
    from kvbm.testing import vllm_runner as vr
    d = write_tiny_gemma3(os.path.join(tempfile.gettempdir(), "kvbm-tiny-gemma3"))
    extra = {"disable_hybrid_kv_cache_manager": True} if mode == "off" else {}
    from vllm import LLM, SamplingParams
    with vr.kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=64, DYN_KVBM_CPU_CACHE_GB=None, DYN_KVBM_DISK_CACHE_GB=None):
        llm = LLM(**engine_kwargs(d, kv_connector=True, max_model_len=2048, kv_cache_memory_bytes=24 << 20, max_num_seqs=16, **extra))
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    rng = random.Random(3)
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, detokenize=False)
    for i in range(16):
        eng.add_request(str(i), {"prompt_token_ids": [rng.randrange(3, 2000) for _ in range(1000)]}, sp)
    peak_tokens = peak_running = 0
    while eng.has_unfinished_requests():
        eng.step()
        running = sched.running
        peak_running = max(peak_running, len(running))
        peak_tokens = max(peak_tokens, sum(r.num_computed_tokens for r in running))
    print("FIT", json.dumps({"mode": mode, "num_blocks": sched.kv_cache_config.num_blocks, "peak_running": peak_running,
                             "peak_tokens_in_g1": peak_tokens, "preemptions": sched.connector.preemptions}))



if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hma")
