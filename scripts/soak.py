"""kvbm soak: the connector core under a long run of traffic with faults, checked as it runs.

One process holds what an engine would: a leader (kvbm._core.Leader) and a worker
(kvbm._core.Worker) over a synthetic vLLM-like KV cache (numpy arrays as G1), with real tiers:
G2 in host memory, G3 in an O_DIRECT file, and G4 on a real 6-node Redis Cluster
(scripts/redis_cluster.sh) when redis-server is installed. A scheduler loop drives many
requests at once through the engine protocol (match, allocate, load, forward pass, store,
finish), from a bounded multi-turn workload, while faults are injected, several at a time:

  - aborts: requests finished while their load is in flight (before and after the step that
    starts it), with the load completion held back by the worker's test seam;
  - G2 pressure: bursts of unique prompts; the tiers are small, so eviction churns throughout;
  - disk read/write errors: EIO on ranges of the G3 file (the I/O queue's failpoints);
  - corrupted disk blocks: random 4 KiB pages of the G3 file overwritten through the file itself;
  - refused disk writes: RLIMIT_FSIZE below the G3 file's size, so the kernel refuses every
    write to its upper part with EFBIG, as a full disk refuses them (the file is preallocated,
    so a filling filesystem never reaches it);
  - G4 node loss: a Redis master killed (SIGKILL) and restarted later.

Checked continuously (any failure makes the exit status 1; the JSON summary says which):
  - wrong bytes: every loaded block is compared byte for byte with what was stored for its
    prefix, when its load completes and again when its request finishes (a late write into a
    reused block shows there); must be 0;
  - no hang: each step finishes within --step-deadline (else the process dumps every thread's
    stack and exits 1), and every load completes within --load-deadline;
  - unexplained errors: a phase with load errors must have had a fault injected in it or the
    phase before, or a fault counter of kvbm (I/O errors, corrupt blocks, G4 errors) moving;
  - RSS and open descriptors: after warm-up they may not grow beyond a stated margin;
  - no leaked pins: when the load stops, no request slot is left and every pool's active
    count returns to 0; every G1 block is back in the free list.

  python scripts/soak.py --duration 1800 --json soak.json --plot soak.png
  python scripts/soak.py --quick            # ~75 s
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvbm import _core

BLOCK = 16  # tokens per block
LAYERS = 2
HEADS = 2
HEAD_DIM = 128  # float32: 16 KiB per layer and block, 32 KiB per block
POISON = np.uint64(0xDEADBEEFDEADBEEF)
MASK64 = (1 << 64) - 1
REPO = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def no_fsize_limit() -> None:  # for children: the soak's RLIMIT_FSIZE window is not theirs
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# ---------------------------------------------------------------------------------------------
# G4: a real Redis Cluster whose nodes the soak kills and restarts


class RedisCluster:
    """Starts scripts/redis_cluster.sh on free ports, caps every node's memory (LRU eviction, as
    a cache is run), and kills/restarts masters."""

    NODES = 6

    def __init__(self, workdir: Path, rng: random.Random, maxmemory_mb: int):
        self.script = REPO / "scripts" / "redis_cluster.sh"
        self.dir = workdir / "redis"
        self.maxmemory = f"{maxmemory_mb}mb"
        self.node_timeout_ms = 1000
        self.base = None
        self.down: int | None = None  # port of the killed node
        errors = []
        for _ in range(3):  # other processes may take ports between the check and the start
            base = next((b for b in (rng.randrange(20000, 29000) for _ in range(20))
                         if all(self._free(p) and self._free(p + 10000) for p in range(b, b + self.NODES))), None)
            if base is None:
                continue
            out = subprocess.run(["bash", str(self.script), "start", "--base-port", str(base), "--dir", str(self.dir),
                                  "--node-timeout", str(self.node_timeout_ms)], capture_output=True, text=True,
                                 timeout=180, preexec_fn=no_fsize_limit)
            if out.returncode == 0:
                self.base = base
                break
            errors.append(out.stderr.strip()[-500:])
        if self.base is None:
            raise RuntimeError("redis_cluster.sh start failed: " + " | ".join(errors or ["no free ports"]))
        for p in self.ports:
            self._cli(p, "config", "set", "maxmemory", self.maxmemory)
            self._cli(p, "config", "set", "maxmemory-policy", "allkeys-lru")

    @staticmethod
    def _free(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    @property
    def ports(self) -> list[int]:
        return list(range(self.base, self.base + self.NODES))

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _cli(self, port: int, *args: str) -> str:
        try:
            out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                                 text=True, timeout=5, preexec_fn=no_fsize_limit)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout if out.returncode == 0 else ""

    def _pid(self, port: int) -> int | None:
        try:
            pid = int((self.dir / str(port) / "redis.pid").read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def healthy(self) -> bool:
        if any(self._pid(p) is None for p in self.ports):
            return False
        info = self._cli(self.ports[0], "cluster", "info")
        return "cluster_state:ok" in info and "cluster_known_nodes:6" in info

    def kill_master(self, rng: random.Random) -> int | None:
        masters = [p for p in self.ports if self._cli(p, "role").startswith("master")]
        if not masters:
            return None
        port = rng.choice(masters)
        pid = self._pid(port)
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        self.down = port
        return port

    def restart(self) -> bool:
        """Restarts the killed node with its old cluster config: it rejoins (as a replica once its
        replica took over)."""
        port, self.down = self.down, None
        d = self.dir / str(port)
        deadline = time.monotonic() + 10
        while not self._free(port) and time.monotonic() < deadline:  # the killed process's socket
            time.sleep(0.05)
        out = subprocess.run(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-replica-validity-factor", "0",
             "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--dir", str(d),
             "--daemonize", "yes", "--pidfile", str(d / "redis.pid"), "--logfile", str(d / "redis.log"),
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
            capture_output=True, text=True, timeout=30, preexec_fn=no_fsize_limit)
        return out.returncode == 0

    def stop(self) -> None:
        subprocess.run(["bash", str(self.script), "stop", "--base-port", str(self.base), "--dir", str(self.dir)],
                       capture_output=True, text=True, timeout=60, preexec_fn=no_fsize_limit)


# ---------------------------------------------------------------------------------------------
# The workload: bounded multi-turn conversations over shared system prompts, plus unique bursts


class Workload:
    def __init__(self, rng: random.Random, max_blocks: int):
        self.rng = rng
        self.max_blocks = max_blocks
        self.prefixes = [self._tokens(rng.randint(1, 3) * BLOCK) for _ in range(12)]
        self.convs: list[list[int]] = []
        self.max_convs = 64

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(1, 50000) for _ in range(n)]

    def _turn(self) -> list[int]:
        return self._tokens(self.rng.randint(1, 2) * BLOCK + self.rng.randrange(BLOCK))

    def next_prompt(self, unique: bool) -> list[int]:
        rng = self.rng
        if unique:  # G2 pressure: nothing of it was seen before
            return self._tokens(rng.randint(3, self.max_blocks) * BLOCK + rng.randrange(BLOCK))
        r = rng.random()
        if r < 0.2 or not self.convs:
            conv = rng.choice(self.prefixes) + self._turn()
            if len(self.convs) >= self.max_convs:
                self.convs.pop(rng.randrange(len(self.convs)))
            self.convs.append(conv)
            return list(conv)
        i = rng.randrange(len(self.convs))
        if r < 0.45:  # the same conversation again (a retry, another sampler)
            return list(self.convs[i])
        conv = self.convs[i] + self._turn()  # the next turn
        if len(conv) > self.max_blocks * BLOCK:
            conv = rng.choice(self.prefixes) + self._turn()
        self.convs[i] = conv
        return list(conv)


# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    rid: str
    tokens: list[int]
    blocks: list[int]
    ext: int
    state: str  # loading | ready | compute | aborting
    started: float
    computed: int = 0
    seeds: list[int] = field(default_factory=list)
    match: tuple = ()


@dataclass
class Phase:
    index: int
    started: float
    faults: list[str]
    abort_p: float
    load_delay_ms: int
    failed_blocks: int = 0
    counters_at_start: int = 0


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="kvbm-soak-", dir=args.dir))
        self.disk_dir = self.workdir / "g3"
        self.disk_dir.mkdir()
        self.violations: list[str] = []
        self.faults = {k: 0 for k in ("eio_windows", "eio_ranges", "corrupt_pages", "efbig_windows", "g4_kills",
                                      "g4_restarts", "g2_pressure_phases", "aborts_before_load", "aborts_mid_load",
                                      "load_delay_phases")}
        self.redis: RedisCluster | None = None
        g4 = args.g4
        if g4 == "auto":
            g4 = "on" if shutil.which("redis-server") and shutil.which("redis-cli") else "off"
        self.g4_skip_reason = "" if g4 == "on" else ("--g4 off" if args.g4 == "off" else "redis-server not installed")
        env = {
            "DYN_KVBM_DISK_CACHE_DIR": str(self.disk_dir),
            "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(args.host_blocks),
            "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(args.disk_blocks),
        }
        descriptor = "model=kvbm-soak|kv_dtype=float32|block=16"
        if g4 == "on":
            self.redis = RedisCluster(self.workdir, self.rng, args.redis_maxmemory_mb)
            (self.workdir / "redis" / "base_port").write_text(str(self.redis.base))
            env.update({"DYN_KVBM_REMOTE_URL": self.redis.url, "DYN_KVBM_REMOTE_NAMESPACE": f"soak{os.getpid()}",
                        "DYN_KVBM_REMOTE_REQUIRED": "true"})
        self.layers = [np.zeros((args.device_blocks, HEADS, BLOCK, HEAD_DIM), dtype=np.float32) for _ in range(LAYERS)]
        self.words = [a.view(np.uint64) for a in self.layers]  # [blocks, HEADS, BLOCK, HEAD_DIM / 2]
        base_rng = np.random.default_rng(args.seed)
        self.base = [base_rng.integers(0, MASK64, size=self.words[0].shape[1:], dtype=np.uint64, endpoint=True)
                     for _ in range(LAYERS)]
        self.worker = _core.Worker(env=env, shared_metrics=False)
        self.worker.register_kv_caches([a.ctypes.data for a in self.layers], [list(a.shape) for a in self.layers],
                                       [[s // a.itemsize for s in a.strides] for a in self.layers], 4,
                                       args.device_blocks, BLOCK)
        self.leader = _core.Leader(BLOCK, self.worker.bytes_per_block, env=env, shared_metrics=False,
                                   remote_descriptor=descriptor if self.redis else "")
        self.worker.allocate_tiers(self.leader.host_blocks, self.leader.disk_blocks)
        if self.redis and not self.worker.connect_remote(descriptor):
            raise RuntimeError("the worker did not connect to G4")
        self.g3_fd, self.g3_bytes = self._find_g3_file()
        self.workload = Workload(self.rng, args.max_blocks)
        self.free = list(range(args.device_blocks))
        for w in self.words:
            w[:] = POISON
        self.active: dict[str, Request] = {}
        self.next_id = 0
        self.steps = 0
        self.completed = 0
        self.loaded_blocks = 0
        self.verified_blocks = 0
        self.wrong_bytes = 0
        self.wrong_blocks = 0
        self.wrong_examples: list[dict] = []
        # Diagnostics, bounded (they count in the RSS check): the latest requests' block seeds
        # (which prefix a wrong block holds) and events.
        self.recent: collections.deque = collections.deque(maxlen=1000)
        self.history: dict[str, list] = {}
        self.failed_blocks = 0
        self.failed_pending: set[int] = set()
        self.unexplained = 0
        self.max_step_s = 0.0
        self.max_load_s = 0.0
        self.samples: list[dict] = []
        self.efbig_active = False
        self.eio_active = False
        self.g4_down_since: float | None = None
        self.pressure = False
        self.abort_p = 0.0
        self.phases: list[Phase] = []

    # -- G3 file, seen from outside kvbm ---------------------------------------------------------

    def _find_g3_file(self) -> tuple[int, int]:
        """The worker's (unlinked) G3 file, reopened through /proc without O_DIRECT: the soak
        corrupts its pages as a failing disk would."""
        prefix = str(self.disk_dir / "dynamo-kvbm-disk-cache-")
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if target.startswith(prefix):
                fd = os.open(f"/proc/self/fd/{name}", os.O_RDWR)
                return fd, os.fstat(fd).st_size
        raise RuntimeError(f"the worker's G3 file ({prefix}*) is not open in this process")

    def corrupt_pages(self, n: int) -> None:
        pages = self.g3_bytes // 4096
        for _ in range(n):
            page = self.rng.randrange(pages)
            os.pwrite(self.g3_fd, os.urandom(4096), page * 4096)
            self.faults["corrupt_pages"] += 1
        os.fsync(self.g3_fd)

    # -- kvbm's own fault counters ---------------------------------------------------------------

    def fault_counters(self) -> dict:
        m = self.worker.metrics()
        io = self.worker.disk_io_stats()
        return {"io_errors": io["errors"], "corrupt_blocks": m["corrupt_blocks"], "remote_errors": m["remote_errors"],
                "remote_verify_failures": m["remote_verify_failures"],
                "leader_remote_errors": self.leader.metrics()["remote_errors"],
                "onboard_missing_blocks": self.leader.stats()["onboard_missing_blocks"]}

    def fault_counter_sum(self) -> int:
        return sum(self.fault_counters().values())

    # -- block contents --------------------------------------------------------------------------

    @staticmethod
    def seeds_of(tokens: list[int]) -> list[int]:
        """One 64-bit value per device block of the prompt, a function of the block's whole prefix."""
        n = math.ceil(len(tokens) / BLOCK)
        return [hash(tuple(tokens[: min((i + 1) * BLOCK, len(tokens))])) & MASK64 for i in range(n)]

    def write_block(self, block: int, seed: int) -> None:
        for li in range(LAYERS):
            np.bitwise_xor(self.base[li], np.uint64(seed), out=self.words[li][block])

    def verify_block(self, block: int, seed: int, where: str = "", req: Request | None = None, index: int = 0) -> int:
        """Wrong bytes of one G1 block against what was stored for its prefix."""
        wrong = 0
        bad_layers = []
        for li in range(LAYERS):
            want = self.base[li] ^ np.uint64(seed)
            got = self.words[li][block]
            if not np.array_equal(got, want):
                wrong += int(np.count_nonzero(got.view(np.uint8) != want.view(np.uint8)))
                bad_layers.append(li)
        self.verified_blocks += 1
        if wrong:
            self.wrong_blocks += 1
            self.wrong_bytes += wrong
            if len(self.wrong_examples) < 20:
                li = bad_layers[0]
                got = self.words[li][block]
                found = int(got.flat[0] ^ self.base[li].flat[0])
                uniform = bool(np.array_equal(got, self.base[li] ^ np.uint64(found)))
                other = next((f"{rid}[{i}]" for rid, seeds in reversed(self.recent) for i, sd in enumerate(seeds)
                              if sd == found), None) if uniform else None
                self.wrong_examples.append({
                    "where": where, "rid": req.rid if req else None, "index": index, "block": block,
                    "ext_blocks": req.ext // BLOCK if req else None, "computed_blocks": req.computed // BLOCK if req else None,
                    "num_blocks": len(req.blocks) if req else None, "match": req.match if req else None,
                    "bad_layers": bad_layers, "wrong_bytes": wrong, "poison": bool(np.all(got == POISON)),
                    "holds_other_prefix": uniform, "other_prefix": other,
                    "phase": self.phases[-1].faults if self.phases else None, "step": self.steps,
                    "other_history": self.history.get(other.split("[")[0]) if other else None,
                    "history": self.history.get(req.rid) if req else None})
        return wrong

    # -- the engine loop -------------------------------------------------------------------------

    def admit(self) -> None:
        args = self.args
        while len(self.active) < args.concurrency:
            tokens = self.workload.next_prompt(unique=self.pressure and self.rng.random() < 0.7)
            need = math.ceil(len(tokens) / BLOCK)
            if len(self.free) < need:
                return
            rid = f"r{self.next_id}"
            self.next_id += 1
            self.leader.add_request(rid, tokens)
            ext, _is_async, h, d = self.leader.get_num_new_matched_tokens(rid, 0)
            blocks = [self.free.pop() for _ in range(need)]
            self.leader.update_state_after_alloc(rid, blocks, ext)
            req = Request(rid, tokens, blocks, ext, "loading" if ext else "ready", time.monotonic(),
                          seeds=self.seeds_of(tokens), match=(h, d))
            self.recent.append((rid, req.seeds))
            self.active[rid] = req
            self.note(rid, f"admit ext={ext // BLOCK} match={h},{d} blocks={blocks}")
            if ext and self.rng.random() < self.abort_p / 4:
                self.abort(req, "aborts_before_load")

    def note(self, rid: str, event: str) -> None:
        if len(self.history) > 1000:
            self.history.pop(next(iter(self.history)))
        self.history.setdefault(rid, []).append((self.steps, event))

    def abort(self, req: Request, kind: str) -> None:
        self.faults[kind] += 1
        self.note(req.rid, kind)
        if self.leader.request_finished(req.rid):
            req.state = "aborting"  # a load still writes its blocks: wait for the worker's word
        else:
            self.release(req)

    def release(self, req: Request) -> None:
        self.note(req.rid, f"release {req.state} {req.blocks}")
        self.failed_pending.difference_update(req.blocks)
        for b in req.blocks:
            for w in self.words:
                w[b] = POISON
        self.free.extend(req.blocks)
        del self.active[req.rid]

    def step(self) -> None:
        t0 = time.monotonic()
        faulthandler.dump_traceback_later(self.args.step_deadline, exit=True)
        self.admit()
        computing = []
        for req in self.active.values():
            if req.state == "ready":
                self.leader.on_scheduled(req.rid, req.blocks, req.computed, len(req.tokens) - req.computed)
                req.state = "compute"
                computing.append(req)
        self.worker.bind_step(self.leader.build_step_metadata())
        for req in [r for r in self.active.values() if r.state == "loading"]:  # load now in flight
            if self.rng.random() < self.abort_p:
                self.abort(req, "aborts_mid_load")
        for req in computing:  # the forward pass writes every block it computes
            for i in range(req.computed // BLOCK, len(req.blocks)):
                self.write_block(req.blocks[i], req.seeds[i])
        self.worker.forward_pass_done()
        sending, recving = self.worker.get_finished()
        errors = self.worker.take_load_errors()
        self.leader.on_worker_output(recving, sending, errors)
        self.failed_blocks += len(errors)
        if self.phases:
            self.phases[-1].failed_blocks += len(errors)
        self.failed_pending.update(errors)  # until the owning request's load is reported done
        failed = self.failed_pending
        now = time.monotonic()
        for rid in recving:
            self.note(rid, "recving")
            req = self.active.get(rid)
            if req is None or req.state != "loading":
                continue  # aborted: its blocks are released when the worker reports it sent
            self.max_load_s = max(self.max_load_s, now - req.started)
            n = req.ext // BLOCK
            good = next((i for i in range(n) if req.blocks[i] in failed), n)  # recompute from the first failure
            for i in range(good):
                self.verify_block(req.blocks[i], req.seeds[i], "load", req, i)
            self.loaded_blocks += good
            failed.difference_update(req.blocks)
            req.computed = good * BLOCK
            req.state = "ready"
        for rid in sending:
            self.note(rid, "sending")
            req = self.active.get(rid)
            if req is not None and req.state == "aborting":
                self.release(req)
        for req in computing:
            for i in range(len(req.blocks)):  # nothing wrote into the request's blocks since
                self.verify_block(req.blocks[i], req.seeds[i], "finish", req, i)
            if self.leader.request_finished(req.rid):
                req.state = "aborting"
                self.violations.append(f"{req.rid}: request_finished asked to wait though no load was in flight")
            else:
                self.release(req)
                self.completed += 1
        for req in self.active.values():
            if req.state in ("loading", "aborting") and now - req.started > self.args.load_deadline:
                raise SystemExit(f"HANG: {req.rid} has been {req.state} for {now - req.started:.1f}s "
                                 f"(--load-deadline {self.args.load_deadline}s)")
        if not computing and any(r.state == "loading" for r in self.active.values()):
            self.worker.wait_for_loads()  # nothing to compute this step: the engine waits for its loads
        self.steps += 1
        self.max_step_s = max(self.max_step_s, time.monotonic() - t0)

    # -- faults ----------------------------------------------------------------------------------

    def start_phase(self, index: int, clean: bool) -> None:
        self.end_faults()
        rng = self.rng
        faults: list[str] = []
        if not clean:
            kinds = ["eio", "corrupt", "efbig", "pressure", "delay"] + (["g4_kill"] if self.redis else [])
            # Each kind in turn (so that a short run sees all of them), with others at random.
            faults = sorted({kinds[(index - 1) % len(kinds)]} | {k for k in kinds if rng.random() < 0.3})
        self.abort_p = 0.0 if clean else rng.choice([0.02, 0.1, 0.3])
        delay = rng.choice([2, 10, 30]) if "delay" in faults else 0
        self.worker.set_load_delay_for_testing(delay)
        if delay:
            self.faults["load_delay_phases"] += 1
        self.pressure = "pressure" in faults
        if self.pressure:
            self.faults["g2_pressure_phases"] += 1
        if "eio" in faults:
            for _ in range(rng.randint(1, 3)):
                length = max(4096, (self.g3_bytes // 8) // 4096 * 4096)
                offset = rng.randrange(0, max(1, self.g3_bytes - length + 1), 4096)
                self.worker.inject_disk_failure_for_testing(offset, length)
                self.faults["eio_ranges"] += 1
            self.faults["eio_windows"] += 1
            self.eio_active = True
        if "corrupt" in faults:
            self.corrupt_pages(rng.randint(1, 4))
        if "efbig" in faults:
            limit = (self.g3_bytes // 2) // 4096 * 4096
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            self.faults["efbig_windows"] += 1
            self.efbig_active = True
        if "g4_kill" in faults and self.redis and self.redis.down is None and self.redis.healthy():
            if self.redis.kill_master(rng) is not None:
                self.faults["g4_kills"] += 1
                self.g4_down_since = time.monotonic()
        self.phases.append(Phase(index, time.monotonic(), faults, self.abort_p, delay,
                                 counters_at_start=self.fault_counter_sum()))

    def end_faults(self) -> None:
        if self.eio_active:
            self.worker.clear_disk_failures_for_testing()
            self.eio_active = False
        if self.efbig_active:
            no_fsize_limit()
            self.efbig_active = False
        self.pressure = False
        self.abort_p = 0.0
        self.worker.set_load_delay_for_testing(0)

    def maybe_restart_g4(self, force: bool = False) -> None:
        if self.redis and self.redis.down is not None and (
                force or time.monotonic() - self.g4_down_since > self.args.g4_outage):
            if self.redis.restart():
                self.faults["g4_restarts"] += 1
            else:
                self.violations.append("a killed Redis node did not restart")
            self.g4_down_since = None

    def close_phase(self) -> None:
        """A phase's load errors must have a cause: a fault injected in it or the phase before,
        or one of kvbm's fault counters moving during it."""
        if not self.phases:
            return
        ph = self.phases[-1]
        prev = self.phases[-2].faults if len(self.phases) > 1 else []
        moved = self.fault_counter_sum() > ph.counters_at_start
        if ph.failed_blocks and not (ph.faults or prev or moved):
            self.unexplained += ph.failed_blocks
            self.violations.append(f"phase {ph.index}: {ph.failed_blocks} failed blocks without any fault")

    # -- the run ---------------------------------------------------------------------------------

    def sample(self, t0: float) -> None:
        s = self.leader.stats()
        self.samples.append({"t": round(time.monotonic() - t0, 2), "rss": rss_bytes(), "fds": open_fds(),
                             "steps": self.steps, "matched_tokens": s["matched_tokens"],
                             "requested_tokens": s["requested_tokens"], "failed_blocks": self.failed_blocks,
                             "wrong_bytes": self.wrong_bytes})

    def run(self) -> dict:
        args = self.args
        t0 = time.monotonic()
        end = t0 + args.duration
        warm_end = t0 + args.warmup
        cool_start = end - args.cooldown
        phase_index = 0
        self.start_phase(phase_index, clean=True)
        next_phase = t0 + args.warmup
        every = max(1.0, args.duration / 600)
        next_sample = t0
        warm_rss = warm_fds = None
        while time.monotonic() < end:
            self.step()
            now = time.monotonic()
            self.maybe_restart_g4()
            if now >= next_sample:
                self.sample(t0)
                next_sample = now + every
            if warm_rss is None and now >= warm_end:
                warm_rss, warm_fds = rss_bytes(), open_fds()
            if now >= next_phase:
                self.close_phase()
                phase_index += 1
                clean = now >= cool_start
                self.start_phase(phase_index, clean=clean)
                next_phase = end if clean else min(now + args.phase, cool_start)
        self.close_phase()
        self.end_faults()
        self.maybe_restart_g4(force=True)
        # Drain: no new requests; the engine keeps stepping until every request is done.
        drained_by = time.monotonic() + args.load_deadline
        concurrency, args.concurrency = args.concurrency, 0
        while self.active and time.monotonic() < drained_by:
            self.step()
        idle_by = time.monotonic() + args.load_deadline
        while time.monotonic() < idle_by:  # offloads still queued hold pins until they are issued
            self.worker.wait_idle()
            host, disk = self.leader.pool_stats("host"), self.leader.pool_stats("disk")
            if host["active"] == 0 and disk["active"] == 0:
                break
            self.step()
        faulthandler.cancel_dump_traceback_later()
        args.concurrency = concurrency
        self.sample(t0)
        end_rss, end_fds = rss_bytes(), open_fds()
        if warm_rss is None:
            warm_rss, warm_fds = end_rss, end_fds
        host, disk = self.leader.pool_stats("host"), self.leader.pool_stats("disk")
        rss_after_warm = [s["rss"] for s in self.samples if s["t"] >= args.warmup] or [end_rss]
        rss_margin = max(args.rss_margin_mib * 2**20, int(warm_rss * 0.10))
        fds_after_warm = [s["fds"] for s in self.samples if s["t"] >= args.warmup] or [end_fds]
        checks = {
            "wrong_bytes_zero": self.wrong_bytes == 0,
            "no_unexplained_errors": self.unexplained == 0,
            "requests_drained": not self.active and self.leader.num_slots() == 0,
            "device_blocks_free": sorted(self.free) == list(range(args.device_blocks)),
            "no_leaked_pins": host["active"] == 0 and disk["active"] == 0,
            "rss_bounded": max(rss_after_warm) - warm_rss <= rss_margin,
            "fds_bounded": max(fds_after_warm) - warm_fds <= args.fd_margin,
            "loads_verified": self.loaded_blocks > 0,
            "no_other_violation": not self.violations,
        }
        lstats = self.leader.stats()
        summary = {
            "duration_s": round(time.monotonic() - t0, 1),
            "seed": args.seed,
            "g4": self.redis is not None,
            "g4_skipped": self.g4_skip_reason,
            "tiers_blocks": {"g1": args.device_blocks, "g2": self.leader.host_blocks, "g3": self.leader.disk_blocks},
            "bytes_per_block": self.worker.bytes_per_block,
            "steps": self.steps,
            "requests": {"admitted": self.next_id, "completed": self.completed,
                         "aborted": self.faults["aborts_before_load"] + self.faults["aborts_mid_load"]},
            "phases": len(self.phases),
            "faults_injected": self.faults,
            "blocks": {"loaded": self.loaded_blocks, "verified": self.verified_blocks, "wrong": self.wrong_blocks,
                       "failed_loads": self.failed_blocks, "unexplained_failed": self.unexplained},
            "wrong_bytes": self.wrong_bytes,
            "kvbm_counters": {**self.fault_counters(),
                              "dropped_io_error": self.worker.metrics().get("dropped_io_error", 0),
                              "disk_io": self.worker.disk_io_stats()},
            "leader": {k: lstats[k] for k in ("matched_tokens", "requested_tokens", "onboard_host_blocks",
                                              "onboard_disk_blocks", "onboard_remote_blocks", "store_host_blocks",
                                              "offload_disk_blocks", "offload_remote_blocks", "load_errors")},
            "pools_at_end": {"host": host, "disk": disk},
            "max_step_s": round(self.max_step_s, 3),
            "max_load_s": round(self.max_load_s, 3),
            "rss_mib": {"start": round(self.samples[0]["rss"] / 2**20, 1), "after_warmup": round(warm_rss / 2**20, 1),
                        "max_after_warmup": round(max(rss_after_warm) / 2**20, 1), "end": round(end_rss / 2**20, 1),
                        "margin": round(rss_margin / 2**20, 1)},
            "fds": {"after_warmup": warm_fds, "max_after_warmup": max(fds_after_warm), "end": end_fds,
                    "margin": args.fd_margin},
            "violations": self.violations[:20],
            "wrong_examples": self.wrong_examples,
            "checks": checks,
            "ok": all(checks.values()),
            "timeline": self.samples,
        }
        return summary

    def close(self) -> None:
        """Everything the soak started goes, also after a failure half-way through __init__."""
        no_fsize_limit()
        if getattr(self, "g3_fd", None) is not None:
            os.close(self.g3_fd)
        for name in ("leader", "worker"):  # the leader's pins before the worker's memory
            if hasattr(self, name):
                delattr(self, name)
        if getattr(self, "redis", None):
            self.redis.stop()
        if getattr(self, "workdir", None):
            shutil.rmtree(self.workdir, ignore_errors=True)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = summary["timeline"]
    t = [s["t"] / 60 for s in tl]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [s["rss"] / 2**20 for s in tl])
    axes[0].set_ylabel("RSS (MiB)")
    rates, prev = [], None
    for s in tl:
        if prev is None or s["requested_tokens"] == prev["requested_tokens"]:
            rates.append(0.0 if prev is None else rates[-1])
        else:
            rates.append((s["matched_tokens"] - prev["matched_tokens"]) / (s["requested_tokens"] - prev["requested_tokens"]))
        prev = s
    axes[1].plot(t, rates)
    axes[1].set_ylabel("hit rate (tokens)")
    axes[2].plot(t, [s["failed_blocks"] for s in tl], label="failed loads (recomputed)")
    axes[2].plot(t, [s["wrong_bytes"] for s in tl], label="wrong bytes")
    axes[2].set_ylabel("cumulative")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    fig.suptitle(f"kvbm soak: {summary['steps']} steps, {summary['requests']['completed']} requests, "
                 f"{summary['wrong_bytes']} wrong bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1800, help="seconds of traffic (default 1800)")
    p.add_argument("--quick", action="store_true", help="a ~75 s run (CI): 60 s of traffic, short phases")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the summary (with its timeline) here")
    p.add_argument("--plot", help="write a PNG of RSS, hit rate and errors over time here")
    p.add_argument("--dir", default=None, help="where the G3 file and the Redis nodes live (default: $TMPDIR)")
    p.add_argument("--g4", choices=["auto", "on", "off"], default="auto",
                   help="G4 on a Redis Cluster (auto: when redis-server is installed)")
    p.add_argument("--device-blocks", type=int, default=96)
    p.add_argument("--host-blocks", type=int, default=24, help="G2 size in blocks (small: eviction churns)")
    p.add_argument("--disk-blocks", type=int, default=128, help="G3 size in blocks")
    p.add_argument("--max-blocks", type=int, default=12, help="longest prompt, in blocks")
    p.add_argument("--concurrency", type=int, default=6, help="requests in flight")
    p.add_argument("--phase", type=float, default=None, help="seconds per fault phase (default 30; --quick 5)")
    p.add_argument("--warmup", type=float, default=None, help="clean seconds first (default 60; --quick 10)")
    p.add_argument("--cooldown", type=float, default=None, help="clean seconds last (default 60; --quick 10)")
    p.add_argument("--g4-outage", type=float, default=None, help="seconds a killed Redis node stays down")
    p.add_argument("--redis-maxmemory-mb", type=int, default=32, help="per Redis node (allkeys-lru)")
    p.add_argument("--step-deadline", type=float, default=30.0, help="a step taking longer is a hang")
    p.add_argument("--load-deadline", type=float, default=30.0, help="a load taking longer is a hang")
    p.add_argument("--rss-margin-mib", type=float, default=32.0,
                   help="allowed RSS growth after warm-up (or 10%% of the warm RSS, whichever is larger)")
    p.add_argument("--fd-margin", type=int, default=8, help="allowed growth of open descriptors after warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 60.0
    for name, long_value, quick_value in (("phase", 30.0, 5.0), ("warmup", 60.0, 10.0), ("cooldown", 60.0, 10.0),
                                          ("g4_outage", 10.0, 3.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else long_value)
    if args.duration <= 0:
        p.error(f"--duration {args.duration}: must be > 0 seconds")
    if args.warmup + args.cooldown >= args.duration:
        p.error(f"--warmup {args.warmup} + --cooldown {args.cooldown} leave no time for faults in --duration {args.duration}")
    for name in ("device_blocks", "host_blocks", "disk_blocks", "max_blocks", "concurrency"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_blocks + 1 > args.device_blocks:
        p.error("--device-blocks must exceed --max-blocks")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.enable()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG for refused writes, not a dead process
    soak = Soak.__new__(Soak)
    try:
        soak.__init__(args)
        summary = soak.run()
    finally:
        soak.close()
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(summary, args.plot)
    brief = {k: v for k, v in summary.items() if k != "timeline"}
    print(json.dumps(brief, indent=1))
    bad = [k for k, ok in summary["checks"].items() if not ok]
    print(f"soak: {'PASS' if not bad else 'FAIL ' + ', '.join(bad)} ({summary['steps']} steps, "
          f"{summary['requests']['completed']} requests, {summary['wrong_bytes']} wrong bytes)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
