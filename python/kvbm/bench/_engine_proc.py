"""One vLLM engine in a child process, driven line by line, so that ``kvbm bench vllm`` can keep
an engine with kvbm and one without alive at once and interleave them pair by pair.

    python -m kvbm.bench._engine_proc '<config JSON>'

Config: ``{"kvbm": bool, "env": {...}, "gpu_blocks": int, "max_model_len": int, "warmup": [...]}``.
``env`` is applied before vLLM is imported (DYN_KVBM_* sizes). ``warmup`` is a list of commands
run untimed at start, the same list for every engine of a run, so that kvbm and its anchor pay
the same one-time kernel set-up. Then one JSON command per stdin line; each answer is one line
on stdout starting with ``RESULT_PREFIX`` (vLLM may print to stdout too; other lines are
ignored by the parent). Prompts are named by ``{"seed": s, "length": n}`` and built here with
:func:`kvbm.testing.chat_workload.block_tokens`, so the parent and every engine agree.

Commands (``op``):

* ``ttft``: one prompt, prefix cache reset first -> ``ttft_s``, ``tokens``; with ``then_hit``
  the same prompt again, from vLLM's own prefix cache (G1) -> also ``g1_hit_ttft_s``,
  ``g1_hit_tokens``, ``g1_cached_tokens``;
* ``reload_ttft``: one prompt (kvbm stores it), prefix cache reset, the same prompt again
  (kvbm loads it) -> the second ``ttft_s``, ``tokens``, onboarded block counts;
* ``batch``: prompts at once, no reuse -> ``tokens_per_s``;
* ``profile_reload``: ``reload_ttft``'s second run under cProfile -> the top functions;
* ``info``: kvbm's bytes per block;
* ``quit``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

RESULT_PREFIX = "KVBM-ENGINE-RESULT "


def _prompt(spec: dict) -> list[int]:
    from kvbm.testing.chat_workload import block_tokens

    return block_tokens(int(spec["seed"]), int(spec["length"]), 2000)


class _Engine:
    def __init__(self, config: dict):
        from kvbm.testing import vllm_runner as vr

        self.vr = vr
        self.with_kvbm = bool(config.get("kvbm"))
        self.llm = vr.make_llm(vr.tiny_model_dir(), with_kvbm=self.with_kvbm, gpu_blocks=config["gpu_blocks"],
                               max_model_len=config["max_model_len"])

    def _counters(self) -> dict:
        if not self.with_kvbm:
            return {}
        return self.vr.kvbm_counters().get("leader", {})

    def handle(self, cmd: dict) -> dict:
        vr = self.vr
        op = cmd.get("op")
        if op == "ttft":
            self.llm.reset_prefix_cache()
            p = _prompt(cmd["prompt"])
            mt = int(cmd.get("max_tokens", 4))
            r = vr.run_sequential(self.llm, [p], max_tokens=mt)
            out = {"ttft_s": r.ttft_s[0], "tokens": r.tokens[0]}
            if cmd.get("then_hit"):
                hit = vr.run_sequential(self.llm, [p], max_tokens=mt)
                out.update(g1_hit_ttft_s=hit.ttft_s[0], g1_hit_tokens=hit.tokens[0],
                           g1_cached_tokens=hit.engine_cached_tokens[0])
            return out
        if op == "reload_ttft":
            p = _prompt(cmd["prompt"])
            mt = int(cmd.get("max_tokens", 4))
            vr.run_sequential(self.llm, [p], max_tokens=mt)
            if self.with_kvbm:
                # The stores of the first run complete before the timed load (as in a chat, where
                # the next turn comes seconds later); their wait is not the load's cost.
                from kvbm.vllm_integration.connector import live_connectors

                for w in live_connectors("worker"):
                    w.worker.wait_idle()
            self.llm.reset_prefix_cache()
            before = self._counters()
            r = vr.run_sequential(self.llm, [p], max_tokens=mt)
            after = self._counters()
            return {"ttft_s": r.ttft_s[0], "tokens": r.tokens[0],
                    "onboard_host_blocks": after.get("onboard_host_blocks", 0) - before.get("onboard_host_blocks", 0),
                    "onboard_disk_blocks": after.get("onboard_disk_blocks", 0) - before.get("onboard_disk_blocks", 0),
                    "engine_cached_tokens": r.engine_cached_tokens[0]}
        if op == "profile_reload":
            # reload_ttft's timed run under cProfile: where a hit's TTFT goes (BENCHMARKS.md).
            import cProfile
            import io
            import pstats

            p = _prompt(cmd["prompt"])
            vr.run_sequential(self.llm, [p], max_tokens=1)
            if self.with_kvbm:
                from kvbm.vllm_integration.connector import live_connectors

                for w in live_connectors("worker"):
                    w.worker.wait_idle()
            self.llm.reset_prefix_cache()
            prof = cProfile.Profile()
            prof.enable()
            r = vr.run_sequential(self.llm, [p], max_tokens=1)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats(cmd.get("sort", "tottime")).print_stats(int(cmd.get("top", 25)))
            return {"ttft_s": r.ttft_s[0], "profile": text.getvalue()}
        if op == "batch":
            prompts = [_prompt(s) for s in cmd["prompts"]]
            mt = int(cmd.get("max_tokens", 16))
            _, wall = vr.run_batch(self.llm, prompts, mt)
            return {"tokens_per_s": sum(len(p) + mt for p in prompts) / wall, "wall_s": wall}
        if op == "info":
            counters = vr.kvbm_counters() if self.with_kvbm else {}
            return {"bytes_per_block": counters.get("bytes_per_block"), "pid": os.getpid()}
        raise ValueError(f"unknown engine command {op!r}")


class EngineProc:
    """The parent's handle on one child speaking this protocol (this module's engine, or
    ``kvbm.bench._vllm_client``): ``call(cmd)`` sends a command, waits for its
    answer (with a deadline) and raises RuntimeError with the child's log tail on any failure."""

    def __init__(self, name: str, config: dict, *, log_dir: str, module: str = "kvbm.bench._engine_proc"):
        import subprocess

        self.name = name
        self.log_path = os.path.join(log_dir, f"{module.rsplit('.', 1)[-1]}-{name}.log")
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     bufsize=1)
        import queue
        import threading

        self._answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, name=f"{name}-stdout", daemon=True).start()

    def _log_tail(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def _read_lines(self) -> None:
        """Reader thread: the child's answer lines into the queue (None at end of file)."""
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                self._answers.put(line[len(RESULT_PREFIX):])
        self._answers.put(None)

    def read_answer(self, timeout_s: float) -> dict:
        import queue

        try:
            line = self._answers.get(timeout=max(0.001, timeout_s))
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer within {timeout_s:.0f} s; log:\n{self._log_tail()}") from None
        if line is None:
            self.proc.wait()
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log:\n{self._log_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer

    def call(self, cmd: dict, timeout_s: float = 600.0) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read_answer(timeout_s)

    def close(self) -> None:
        import subprocess

        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    for k, v in config.get("env", {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    from kvbm.testing.vllm_runner import vllm_available

    out = sys.stdout
    why = vllm_available()
    if why is not None:
        out.write(RESULT_PREFIX + json.dumps({"error": f"vLLM unavailable: {why}"}) + "\n")
        out.flush()
        return 1
    t0 = time.perf_counter()
    engine = _Engine(config)
    for cmd in config.get("warmup", []):
        engine.handle(cmd)
    out.write(RESULT_PREFIX + json.dumps({"ready": True, "startup_s": time.perf_counter() - t0}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            answer = engine.handle(cmd)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            answer = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out.write(RESULT_PREFIX + json.dumps(answer) + "\n")
        out.flush()
    engine.vr.close_llm(engine.llm)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
