"""vLLM's OpenAI server with or without kvbm, as a child process (tests of `vllm serve`).

The command is the one README.md documents under "Using kvbm with vLLM" (``readme_serve_command``
reads it from there, so the documentation and the test cannot drift apart), with the tiny local
model and small G1 appended. The server listens on 127.0.0.1 only. In this setting vLLM runs
the engine core (scheduler, kvbm's leader and its metrics endpoint) and the worker (kvbm's
worker, the bytes) in processes of their own, separate from the HTTP server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvbm.testing.tiny_model import BLOCK_SIZE

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_serve_command(readme: Path) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of the serving command in README.md's first code block
    under "## Using kvbm with vLLM"; ``MODEL`` stands for the model."""
    text = readme.read_text()
    section = text[text.index("## Using kvbm with vLLM"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    if block is None:
        raise AssertionError("README.md: no ```bash block under '## Using kvbm with vLLM'")
    words = shlex.split(block.group(1).replace("\\\n", " "))
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words


def tiny_model_args(model_dir: str, gpu_blocks: int) -> list[str]:
    """Engine arguments of the tiny local model (the flags of tiny_model.engine_kwargs)."""
    return [
        "--load-format", "safetensors", "--skip-tokenizer-init", "--enforce-eager", "--dtype", "float32",
        "--block-size", str(BLOCK_SIZE), "--max-model-len", str((gpu_blocks - 1) * BLOCK_SIZE),
        "--kv-cache-memory-bytes", str(64 << 20), "--num-gpu-blocks-override", str(gpu_blocks), "--seed", "0",
        "--served-model-name", "tiny",
    ]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_server(argv: list[str], env: dict[str, str], log_path: Path, port: int, timeout_s: float = 900) -> Server:
    """Starts ``argv`` (its own process group) and waits until GET /health answers 200."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed with the process
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    server = Server(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode} before serving:\n{server.log()[-6000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"vLLM server not healthy after {timeout_s:.0f} s:\n{server.log()[-6000:]}")
        time.sleep(0.25)  # polling interval of the readiness wait, not synchronisation


def stop_server(server: Server, timeout_s: float = 120) -> tuple[int, bool]:
    """SIGTERM to the HTTP server process only, as a service manager stops it: vLLM then shuts
    its engine core and workers down itself. Waits until every process of the group has exited.
    Returns (exit status, forced): forced is True when something had to be SIGKILLed after
    ``timeout_s`` (an unclean shutdown)."""
    forced = False
    deadline = time.monotonic() + timeout_s
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            forced = True
    while group_alive(server) and time.monotonic() < deadline and not forced:
        time.sleep(0.1)  # polling interval of the exit wait (children are not ours to wait on)
    if group_alive(server) or server.proc.poll() is None:
        forced = True
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.proc.wait(timeout=30)
    return server.proc.returncode, forced


def shm_names(pids: list[int]) -> set[str]:
    """Names under /dev/shm that ``pids`` have mapped (vLLM's message queues between processes)."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.split(maxsplit=5)[-1].strip() if len(line.split()) >= 6 else ""
                    if path.startswith("/dev/shm/"):
                        names.add(path[len("/dev/shm/"):].removesuffix(" (deleted)"))
        except OSError:
            continue
    return names


def group_alive(server: Server) -> list[int]:
    """Pids still in the server's process group (its engine core and workers included)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == server.proc.pid:
                alive.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return alive


def complete(server: Server, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """POST /v1/completions with a token-id prompt, greedy; returns (generated token ids,
    seconds until the first streamed token arrived)."""
    body = json.dumps({
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "return_token_ids": True,
    }).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.perf_counter() - t0
                tokens.extend(ids)
    return tokens, (ttft if ttft is not None else time.perf_counter() - t0)


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text endpoint as {series (name plus labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            continue
    return out


def python_argv(argv: list[str]) -> list[str]:
    """README's ``python`` is this interpreter (the one the tests and kvbm are installed in)."""
    return [sys.executable, *argv[1:]] if argv and argv[0] in ("python", "python3") else argv
