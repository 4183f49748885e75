"""One run of the real vLLM engine with kvbm and a persistent G3, for test_vllm_warm_restart.py.

    python _vllm_restart_child.py MODEL_DIR fill     # prompts 0, 1, 2, ... forever
    python _vllm_restart_child.py MODEL_DIR restart N  # prompts 0..N-1 once, then kvbm's counters

Each finished prompt prints one JSON line {"i": ..., "tokens": [...]}; `restart` ends with
{"counters": ...}. The DYN_KVBM_* settings come from the environment.
"""

from __future__ import annotations

import json
import sys

from kvbm.testing import vllm_runner as vr
from kvbm.testing.chat_workload import block_tokens

PROMPT_TOKENS = 10 * 32 + 7  # ten full blocks of 32 tokens and a partial one
GPU_BLOCKS = 64


def prompt(i: int) -> list[int]:
    return block_tokens(700_000 + i, PROMPT_TOKENS, 2000)


def main() -> None:
    model_dir, mode = sys.argv[1], sys.argv[2]
    llm = vr.make_llm(model_dir, with_kvbm=True, gpu_blocks=GPU_BLOCKS, max_model_len=1024)
    print(json.dumps({"ready": True}), flush=True)
    count = int(sys.argv[3]) if mode == "restart" else 1 << 30
    for i in range(count):
        run = vr.run_sequential(llm, [prompt(i)], max_tokens=8)
        print(json.dumps({"i": i, "tokens": run.tokens[0]}), flush=True)
    counters = vr.kvbm_counters()
    print(json.dumps({"counters": counters}, default=str), flush=True)
    vr.close_llm(llm)


if __name__ == "__main__":
    main()
