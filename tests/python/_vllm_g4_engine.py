"""One vLLM engine in its own process, for test_vllm_remote.py: runs the prompts given in a JSON
file with greedy sampling and writes {"tokens": [...], "counters": {...}} to another JSON file.

    python _vllm_g4_engine.py MODEL_DIR PROMPTS_JSON OUT_JSON --kvbm|--no-kvbm

kvbm's settings (G2 size, DYN_KVBM_REMOTE_*) come from the environment the test gives it. With
kvbm, the counters are read after the worker is idle, so every G4 write this engine started has
finished (or failed, counted) before it reports and exits.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    model_dir, prompts_path, out_path, mode = sys.argv[1:5]
    with_kvbm = mode == "--kvbm"
    from kvbm.testing import vllm_guard  # noqa: F401 - the CPU environment, before vLLM
    from kvbm.testing import vllm_runner as vr

    with open(prompts_path, encoding="utf-8") as f:
        prompts = json.load(f)
    llm = vr.make_llm(model_dir, with_kvbm=with_kvbm, gpu_blocks=64, max_model_len=1024)
    try:
        result = vr.run_sequential(llm, prompts, max_tokens=8)
        counters = vr.kvbm_counters() if with_kvbm else {}
    finally:
        vr.close_llm(llm)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"tokens": result.tokens, "engine_cached_tokens": result.engine_cached_tokens,
                   "counters": counters}, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
