"""kvbm as a vLLM (V1) KV connector.

Load it like the reference::

    --kv-transfer-config '{"kv_connector":"DynamoConnector","kv_role":"kv_both",
                           "kv_connector_module_path":"kvbm.vllm_integration.connector"}'

vLLM builds the class twice: once in the scheduler process (role SCHEDULER, backed by
``kvbm._core.Leader``: pools, per-request slots, policy) and once per worker (role WORKER,
backed by ``kvbm._core.Worker``: G2/G3 memory and the transfers). The two talk only through the
per-step metadata that vLLM carries from scheduler to workers (msgpack bytes built by the
leader) and through ``KVConnectorOutput`` back. Everything with state or policy is in C++; this
adapter only translates vLLM's calls.

Timing inside a worker step: ``bind_connector_metadata`` binds the step (loads start at once,
before the forward pass); ``wait_for_save`` runs after the forward pass and copies the blocks
that the pass completed G1 -> G2 (or G3), returning once G1 has been read.

Synchronous loads: a hit served wholly from G2, of at most ``DYN_KVBM_SYNC_LOAD_MAX_MB`` per
rank (default 256), is answered ``load_async=False``: vLLM schedules the request in the step
that loads it, and the worker waits for those copies (only those) before the forward pass,
instead of the request waiting a step in WAITING_FOR_REMOTE_KVS for the load to be reported.
A G2 hit then costs one engine step, as vLLM's own prefix-cache hit does. vLLM does not expect
a synchronous load in ``finished_recving``, so the worker reports it done through the step's
worker metadata (``build_connector_worker_meta``), and the leader releases its pins there. G3
and G4 loads stay asynchronous. With a vLLM that has no worker-metadata channel, every load is
asynchronous.

Counters across processes: behind vLLM's OpenAI server the engine core (scheduler, kvbm's
leader and its Prometheus endpoint) and the workers are separate processes. Each worker reports
the transfer counters it updated since its last report through vLLM's connector-stats channel
(``get_kv_connector_stats`` -> ``KVConnectorOutput.kv_connector_stats``), and the leader folds
them into its metrics in ``update_connector_output``, so the endpoint counts every tier's
offloads and onboards wherever the bytes moved. In a single-process engine both sides already
share one metrics object and nothing is folded twice (the report carries the worker's pid).

Recording (DYN_KVBM_ENABLE_RECORD): the scheduler side writes each finished request as one
Mooncake-format JSON line (see ``TraceRecorder``) that ``kvbm replay FILE`` reads back.

Thread safety: vLLM calls each role from one thread (scheduler thread, worker thread).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

try:  # vLLM >= 0.32: the worker -> scheduler channel a synchronous load reports through
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - older vLLM: every load asynchronous
    KVConnectorWorkerMetadata = None
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvbm import _core
from kvbm.vllm_integration.groups import KvCacheGroups
from kvbm.vllm_integration.hybrid import GroupedFinished, GroupedScheduler
from kvbm.vllm_integration.layout import element_order
from kvbm.vllm_integration.request_keys import log_bypass_once, request_keys

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so kvbm's lines come out with vLLM's format and level.
logger = logging.getLogger("vllm.kvbm")

_live_lock = threading.Lock()
_live: list[weakref.ref] = []


def live_connectors(role: str | None = None) -> list["DynamoConnector"]:
    """The connectors alive in this process (tests and tools read kvbm's counters from them).

    ``role``: "scheduler" or "worker" to keep only one side.
    """
    with _live_lock:
        alive = [c for c in (r() for r in _live) if c is not None]
        _live[:] = [weakref.ref(c) for c in alive]
    if role is None:
        return alive
    want = KVConnectorRole.SCHEDULER if role == "scheduler" else KVConnectorRole.WORKER
    return [c for c in alive if c.role == want]


@dataclass
class DynamoConnectorMetadata(KVConnectorMetadata):
    """One step's transfer operations for the workers: the leader's msgpack bytes, opaque here,
    and the requests whose loads in it are synchronous (the forward pass reads them)."""

    payload: bytes
    sync_loads: list[str] = field(default_factory=list)


if KVConnectorWorkerMetadata is not None:

    @dataclass
    class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
        """A worker's report for one step: the requests whose synchronous loads finished.

        Every rank waits for its synchronous loads before the step's forward pass, so by the
        time vLLM hands the step's aggregated output to the scheduler every rank has finished
        them: the union is what the leader may release."""

        loaded: list[str] = field(default_factory=list)

        def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KVConnectorWorkerMetadata":
            if isinstance(other, KvbmWorkerMetadata):
                self.loaded = sorted(set(self.loaded) | set(other.loaded))
            return self

    SYNC_LOADS_SUPPORTED = True
else:  # pragma: no cover
    KvbmWorkerMetadata = None
    SYNC_LOADS_SUPPORTED = False


@dataclass
class KvbmConnectorStats(KVConnectorStats):
    """Transfer counters of kvbm's workers since their last report, on their way to the leader.

    ``data`` maps ``"counters"`` to a dict of counter name -> increment (kvbm._core's
    ``Worker.transfer_counters`` names) and ``"pids"`` to the worker processes it came from.
    Reports of several workers or steps aggregate by summing, key by key.
    """

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self):
        self.data = {}

    def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
        if other is None or other.is_empty():
            return self
        mine = self.data.setdefault("counters", {})
        for k, v in (other.data.get("counters") or {}).items():
            mine[k] = mine.get(k, 0) + v
        self.data["pids"] = sorted(set(self.data.get("pids", [])) | set(other.data.get("pids", [])))
        return self

    def reduce(self) -> dict[str, int | float]:
        """What vLLM's stats logger prints: blocks moved per path."""
        return {k: v for k, v in (self.data.get("counters") or {}).items() if k.startswith("blocks_") and v}

    def is_empty(self) -> bool:
        return not any((self.data.get("counters") or {}).values())


def _counter_delta(now: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


class TraceRecorder:
    """Writes the engine's requests as a Mooncake-format trace (DYN_KVBM_ENABLE_RECORD).

    One JSON line per finished request: ``timestamp`` (ms since the recorder started, at
    arrival), ``input_length`` (prompt tokens), ``output_length`` (tokens generated) and
    ``hash_ids``, one id per 512-token block of the prompt, the last one possibly partial.
    Ids name prefixes, as in the Mooncake traces: a block's id is derived from kvbm's sequence
    hash of the 512-token blocks up to and including it (salt and LoRA included), so two
    requests share an id exactly when they share the whole prefix up to that block. Ids are
    small integers in order of first appearance. Lines are flushed as they are written, so the
    file is readable while the engine runs.
    """

    BLOCK_TOKENS = 512

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._start = time.monotonic()
        self._ids: dict[int, int] = {}
        self._arrival_ms: dict[str, int] = {}

    def on_arrival(self, request_id: str) -> None:
        self._arrival_ms.setdefault(request_id, int((time.monotonic() - self._start) * 1000))

    def _id(self, sequence_hash: int) -> int:
        return self._ids.setdefault(sequence_hash, len(self._ids))

    def hash_ids(self, prompt: list[int], salt: str | None, lora_name: str | None, extra_keys=None) -> list[int]:
        """`extra_keys`: the prompt's multimodal and embedding keys for 512-token blocks
        (request_keys), so two prompts that differ only in an image get different ids."""
        salt_hash = _core.compute_salt_hash(salt, lora_name)
        full = _core.hash_token_blocks(prompt, self.BLOCK_TOKENS, salt_hash, extra_keys)
        ids = [self._id(int(b.sequence_hash)) for b in full]
        tail = prompt[len(full) * self.BLOCK_TOKENS:]
        if tail:
            parent = int(full[-1].sequence_hash) if full else None
            block = _core.compute_block_hash(tail, salt_hash)
            ids.append(self._id(_core.chain_sequence_hash(parent, block, salt_hash)))
        return ids

    def on_finished(self, request: "Request") -> None:
        rid = request.request_id
        arrival = self._arrival_ms.pop(rid, None)
        if arrival is None:
            arrival = int((time.monotonic() - self._start) * 1000)
        prompt = list(request.prompt_token_ids or [0] * int(getattr(request, "num_prompt_tokens", 0) or 0))
        lora = getattr(request, "lora_request", None)
        keys = request_keys(request, self.BLOCK_TOKENS)
        line = {
            "timestamp": arrival,
            "input_length": len(prompt),
            "output_length": int(getattr(request, "num_output_tokens", 0) or len(request.output_token_ids)),
            "hash_ids": self.hash_ids(prompt, getattr(request, "cache_salt", None),
                                      lora.lora_name if lora is not None else None, keys.extra),
        }
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def bytes_per_block_from_config(kv_cache_config: "KVCacheConfig") -> int:
    """Bytes of one block over all of this rank's layers, from vLLM's KV cache plan."""
    total = 0
    for group in kv_cache_config.kv_cache_groups:
        total += int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)
    return total


def group_block_bytes(kv_cache_config: "KVCacheConfig") -> int:
    """Bytes of one group's block on this rank (a hybrid model's kvbm block, groups.py): every
    group has as many layers and the same page size under vLLM's HMA."""
    group = kv_cache_config.kv_cache_groups[0]
    return int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)


def remote_descriptor(vllm_config: "VllmConfig", groups: KvCacheGroups | None = None) -> str:
    """What makes two engines' KV blocks interchangeable in G4 (the remote tier): the model, the
    KV dtype and the block size. Engines that agree on it share prefixes through G4; the tensor-
    parallel layout and rank are added by kvbm, and every value is verified on read. Set
    ``kv_connector_extra_config.remote_model_id`` when instances name the same model differently
    (e.g. by local path). A hybrid model's descriptor also names every KV cache group's kind,
    window and layers (``KvCacheGroups.descriptor``)."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    model = extra.get("remote_model_id") or vllm_config.model_config.model
    dtype = vllm_config.cache_config.cache_dtype
    if dtype in (None, "auto"):
        dtype = str(vllm_config.model_config.dtype).replace("torch.", "")
    groups_part = groups.descriptor() if groups is not None else ""
    return f"model={model}|kv_dtype={dtype}|block={int(vllm_config.cache_config.block_size)}{groups_part}"


def _world_size(vllm_config: "VllmConfig") -> int:
    parallel = vllm_config.parallel_config
    if getattr(parallel, "pipeline_parallel_size", 1) != 1:
        raise ValueError("kvbm: pipeline parallelism is not supported (pipeline_parallel_size must be 1)")
    return int(parallel.tensor_parallel_size)


class DynamoConnector(KVConnectorBase_V1, SupportsHMA):
    """kvbm's vLLM connector: both roles in one class, as vLLM requires.

    ``SupportsHMA``: vLLM keeps its hybrid KV cache manager on with kvbm. A model with one
    full-attention group is served as before; a hybrid one (sliding-window, chunked-local and
    full-attention groups) per group (groups.py, hybrid.py); a Mamba hybrid is refused at start.
    """

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._world_size = _world_size(vllm_config)
        # The scheduler side has no rank; each worker side is one tensor-parallel rank with its
        # own shard of the KV cache (its own KV tensors, G2 memory and G3 file).
        self.world_size = self._world_size
        self.rank = self._tp_rank(self._world_size) if role != KVConnectorRole.SCHEDULER else 0
        self._kv_cache_config = kv_cache_config
        self._vllm_config = vllm_config
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.leader: _core.Leader | None = None
        self.worker: _core.Worker | None = None
        # vLLM's KV cache groups; a hybrid model is stored per group (None: not hybrid).
        self.kv_groups = KvCacheGroups.from_config(kv_cache_config, self._block_size) if kv_cache_config else None
        hybrid = self.kv_groups is not None and self.kv_groups.hybrid
        self._grouped: GroupedScheduler | None = None
        self._grouped_finished: GroupedFinished | None = GroupedFinished(self.kv_groups) if hybrid else None
        if role == KVConnectorRole.SCHEDULER:
            if kv_cache_config is None:
                raise ValueError("kvbm: vLLM gave the scheduler-side connector no kv_cache_config")
            per_rank = group_block_bytes(kv_cache_config) if hybrid else bytes_per_block_from_config(kv_cache_config)
            self.bytes_per_block = per_rank * self._world_size
            self.leader = _core.Leader(self._block_size, self.bytes_per_block, policy=extra.get("policy"),
                                       remote_descriptor=remote_descriptor(vllm_config, self.kv_groups),
                                       world_size=self._world_size, sync_loads=SYNC_LOADS_SUPPORTED)
            # Requests with an input kvbm cannot key: never matched, never stored (request_keys).
            self._bypassed: set[str] = set()
            self._read_skipped: set[str] = set()  # counted once each (kvbm_read_skipped_requests)
            if hybrid:
                self._init_grouped()
            self._sync_match: dict[str, bool] = {}  # request -> its last match is a synchronous load
            self._sync_step: list[str] = []  # synchronous loads allocated for the step being built
            # Synchronous loads sent to the workers, and reported back by them (tests check that
            # the worker-metadata channel carries every one, across processes too).
            self.sync_loads_started = 0
            self.sync_loads_reported = 0
            # Request objects by id: their token lists grow in place as the engine decodes.
            self._requests: dict[str, Request] = {}
            self._block_ids: dict[str, list[int]] = {}
            self.preemptions = 0  # requests vLLM preempted (tests check that paths were exercised)
            self.recorder: TraceRecorder | None = None
            record, record_path = _core.record_settings()
            if record:
                self.recorder = TraceRecorder(record_path or os.path.abspath(f"kvbm-record-{os.getpid()}.jsonl"))
                logger.info("kvbm: recording the engine's requests to %s (DYN_KVBM_ENABLE_RECORD)", self.recorder.path)
            logger.info(
                "kvbm leader: G2 %d blocks, G3 %d blocks of %d bytes (%d per rank x %d ranks), page %d tokens",
                self.leader.host_blocks, self.leader.disk_blocks, self.bytes_per_block, per_rank,
                self._world_size, self._block_size,
            )
        else:
            self.worker = _core.Worker(rank=self.rank, world_size=self._world_size)
            self.bytes_per_block = 0
            self._on_cuda = False
            self._reported: dict = {}  # transfer counters as of the last get_kv_connector_stats
            self._sync_pending: set[str] = set()  # synchronous loads bound, not yet seen finished
            self._sync_done: list[str] = []  # synchronous loads finished, for the step's worker metadata
        with _live_lock:
            _live.append(weakref.ref(self))

    @staticmethod
    def _tp_rank(world_size: int) -> int:
        """This worker's tensor-parallel rank, from vLLM's parallel state (initialised before
        vLLM builds the worker-side connector)."""
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return int(get_tensor_model_parallel_rank())
        except Exception as e:  # noqa: BLE001
            if world_size == 1:
                return 0  # no parallel state: a single-rank engine
            # Guessing 0 would make two ranks claim the same shard and log wrong per-rank sizes.
            raise RuntimeError(f"kvbm: tensor_parallel_size is {world_size} but vLLM's tensor-parallel rank "
                               f"is not known in this worker ({type(e).__name__}: {e})") from e

    # ------------------------------------------------------------------ scheduler side

    def _init_grouped(self) -> None:
        """A hybrid model: one leader slot per (request, group), each block one group's layers."""
        groups = self.kv_groups.groups
        self._grouped = GroupedScheduler(self.leader, self.kv_groups, self._block_size)
        self._grouped.bypassed = self._bypassed
        # DYN_KVBM_SYNC_LOAD_MAX_MB bounds a request's load, which is every group's.
        self.leader.sync_load_max_blocks = self.leader.sync_load_max_blocks // len(groups)
        logger.info(
            "kvbm: hybrid model, %d KV cache groups (%s) of %d layers each; kvbm keys and stores each group's blocks "
            "(window groups only the blocks a later hit needs)", len(groups),
            ", ".join(g.kind if g.kind == "full" else f"{g.kind} {g.window}" for g in groups),
            self.kv_groups.layers_per_group)

    def _grouped_match(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        rid = request.request_id
        self._requests[rid] = request
        if self.recorder is not None:
            self.recorder.on_arrival(rid)
        if not self._grouped_keyable(request):
            return 0, False
        self._grouped.sync_tokens(request, rid)
        if getattr(request, "skip_reading_prefix_cache", False):
            if rid not in self._read_skipped:
                self._read_skipped.add(rid)
                self.leader.count_read_skipped()
            self._sync_match[rid] = False
            return 0, False
        external, is_async = self._grouped.match(rid, num_computed_tokens, len(request.all_token_ids))
        self._sync_match[rid] = external > 0 and not is_async
        return external, is_async and external > 0

    def _grouped_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        rid = request.request_id
        self._requests.setdefault(rid, request)
        if not self._grouped_keyable(request):
            return
        self._grouped.sync_tokens(request, rid)
        self._grouped.after_alloc(rid, blocks.get_block_ids(), num_external_tokens)
        if self._sync_match.pop(rid, False) and num_external_tokens > 0:
            self._sync_step.append(rid)

    def _grouped_connector_meta(self, so: "SchedulerOutput") -> KVConnectorMetadata:
        self.preemptions += self._grouped.schedule(so, self._requests)
        sync, self._sync_step = self._sync_step, []
        self.sync_loads_started += len(sync)
        return DynamoConnectorMetadata(self.leader.build_step_metadata(), sync)

    def _slot_ids(self, request_ids) -> list[str]:
        """The leader's slots of these requests (one per group for a hybrid model)."""
        return self._grouped.expand(request_ids) if self._grouped is not None else list(request_ids)

    def _grouped_keyable(self, request: "Request") -> bool:
        """Hybrid models key tokens, salt and LoRA per group; a request with any other input
        (images, prompt embeddings, what vLLM adds next) is bypassed there, never keyed on its
        tokens alone."""
        rid = request.request_id
        if rid in self._bypassed:
            return False
        keys = request_keys(request, self._block_size)
        if keys.bypass is not None or keys.extra is not None:
            reason = keys.bypass or ("prompt_embeds" if getattr(request, "prompt_embeds", None) is not None
                                     else "multimodal")
            self._bypass(rid, reason, keys.detail or "multimodal and embedding keys are not yet grouped for hybrid models")
            return False
        return True

    def _bypass(self, rid: str, reason: str, detail: str) -> None:
        self._bypassed.add(rid)
        self.leader.count_bypass(reason)
        log_bypass_once(reason, detail)

    def _sync_tokens(self, request: "Request") -> bool:
        """Adds the request to the leader, or passes it the tokens it has not seen yet. False:
        the request is bypassed (an input kvbm cannot key), and the leader never sees it."""
        rid = request.request_id
        if rid in self._bypassed:
            return False
        tokens = request.all_token_ids
        if not self.leader.has_request(rid):
            keys = request_keys(request, self._block_size)
            if keys.bypass is not None:
                self._bypass(rid, keys.bypass, keys.detail)
                return False
            lora = getattr(request, "lora_request", None)
            self.leader.add_request(
                rid,
                list(tokens),
                salt=getattr(request, "cache_salt", None),
                lora_name=lora.lora_name if lora is not None else None,
                extra_keys=keys.extra,
            )
            return True
        known = self.leader.num_tokens(rid)
        if len(tokens) > known:
            self.leader.extend_tokens(rid, list(tokens[known:]))
        return True

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._grouped is not None:
            return self._grouped_match(request, num_computed_tokens)
        self._requests[request.request_id] = request
        if self.recorder is not None:
            self.recorder.on_arrival(request.request_id)
        if not self._sync_tokens(request):
            return 0, False
        if getattr(request, "skip_reading_prefix_cache", False):
            # Prompt logprobs and some pooling tasks must be computed, not loaded: vLLM zeroes
            # what a connector offers for them after asking, so kvbm offers nothing and pins
            # nothing (its blocks are still stored).
            if request.request_id not in self._read_skipped:
                self._read_skipped.add(request.request_id)
                self.leader.count_read_skipped()
            self._sync_match[request.request_id] = False
            return 0, False
        external, is_async, _host, _disk = self.leader.get_num_new_matched_tokens(request.request_id, num_computed_tokens)
        self._sync_match[request.request_id] = external > 0 and not is_async
        return int(external), bool(is_async) and external > 0

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if self._grouped is not None:
            return self._grouped_after_alloc(request, blocks, num_external_tokens)
        rid = request.request_id
        if not self.leader.has_request(rid):
            self._requests[rid] = request
            if not self._sync_tokens(request):
                return
        groups = blocks.get_block_ids()
        block_ids = list(groups[0]) if groups else []
        self.leader.update_state_after_alloc(rid, block_ids, num_external_tokens)
        if self._sync_match.pop(rid, False) and num_external_tokens > 0:
            self._sync_step.append(rid)  # vLLM schedules it in this very step

    def _scheduled(self, rid: str, num_computed: int, num_scheduled: int, new=None) -> None:
        if rid in self._bypassed:
            return
        request = self._requests.get(rid)
        if request is not None:
            if not self._sync_tokens(request):
                return
        elif not self.leader.has_request(rid):
            prompt_token_ids = getattr(new, "prompt_token_ids", None)
            if prompt_token_ids is None:
                return  # never seen and no tokens: nothing kvbm could store for it
            if getattr(new, "mm_features", None) or getattr(new, "prompt_embeds", None) is not None:
                # Only the scheduler's Request carries what keys these inputs; never store them
                # under their token ids alone.
                self._bypass(rid, "multimodal" if getattr(new, "mm_features", None) else "prompt_embeds",
                             "scheduled without being seen by get_num_new_matched_tokens")
                return
            lora = getattr(new, "lora_request", None)
            self.leader.add_request(rid, list(prompt_token_ids),
                                    lora_name=lora.lora_name if lora is not None else None)
        self.leader.on_scheduled(rid, self._block_ids.get(rid, []), num_computed, num_scheduled)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        so = scheduler_output
        if self._grouped is not None:
            return self._grouped_connector_meta(so)
        for rid in so.preempted_req_ids or ():
            self.leader.on_preempted(rid)
            self.preemptions += 1
            self._block_ids[rid] = []
        for new in so.scheduled_new_reqs:
            self._block_ids[new.req_id] = list(new.block_ids[0]) if new.block_ids else []
            self._scheduled(new.req_id, new.num_computed_tokens, so.num_scheduled_tokens.get(new.req_id, 0), new)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self._block_ids[rid] = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                self._block_ids.setdefault(rid, []).extend(new_ids[0])
            self._scheduled(rid, cached.num_computed_tokens[i], so.num_scheduled_tokens.get(rid, 0))
        sync, self._sync_step = self._sync_step, []
        self.sync_loads_started += len(sync)
        return DynamoConnectorMetadata(self.leader.build_step_metadata(), sync)

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        stats = getattr(connector_output, "kv_connector_stats", None)
        if isinstance(stats, KVConnectorStats) and not stats.is_empty():
            self._fold_worker_counters(stats.data)
        loaded = list(connector_output.finished_recving or ())
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if KvbmWorkerMetadata is not None and isinstance(worker_meta, KvbmWorkerMetadata):
            loaded += worker_meta.loaded  # synchronous loads: their pins are released here
            self.sync_loads_reported += len(worker_meta.loaded)
        self.leader.on_worker_output(
            self._slot_ids(loaded),
            self._slot_ids(connector_output.finished_sending or ()),
            list(connector_output.invalid_block_ids or ()),
        )

    def _fold_worker_counters(self, data: dict) -> None:
        """Adds the workers' transfer counters to the leader's metrics, unless they were counted
        in this very process (a single-process engine shares one metrics object)."""
        if os.getpid() in (data.get("pids") or ()):
            return
        counters = data.get("counters") or {}
        if counters:
            self.leader.add_worker_counters(counters)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvbmConnectorStats(data=data) if data is not None else KvbmConnectorStats()

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        if self.recorder is not None:
            self.recorder.on_finished(request)
        self._requests.pop(rid, None)
        self._block_ids.pop(rid, None)
        self._sync_match.pop(rid, None)
        self._read_skipped.discard(rid)
        if rid in self._bypassed:
            self._bypassed.discard(rid)
            return False, None
        # True: a load still writes the request's blocks; vLLM keeps them until the worker
        # reports the request in finished_sending.
        return bool(self.leader.request_finished(rid)), None

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """SupportsHMA's request_finished: every group's blocks (vLLM calls it instead of
        ``request_finished`` when the connector supports HMA)."""
        if self._grouped is None:
            return self.request_finished(request, list(block_ids[0]) if block_ids else [])
        rid = request.request_id
        if self.recorder is not None:
            self.recorder.on_finished(request)
        self._requests.pop(rid, None)
        self._sync_match.pop(rid, None)
        self._read_skipped.discard(rid)
        if rid in self._bypassed:
            self._bypassed.discard(rid)
            return False, None
        return self._grouped.finished(rid), None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]):
        tensors = list(kv_caches.values())  # dict order is layer order
        if not tensors:
            raise ValueError("kvbm: register_kv_caches got no KV tensors")
        if self._grouped_finished is not None:
            tensors = self._group_block_tensors(kv_caches)
        first = tensors[0]
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else first.shape[0]
        self.worker.register_kv_caches(
            [t.data_ptr() for t in tensors],
            [list(t.shape) for t in tensors],
            [list(t.stride()) for t in tensors],
            first.element_size(),
            int(num_blocks),
            self._block_size,
            on_device=first.device.type == "cuda",
            device_index=first.device.index if first.device.index is not None else -1,
            element_order=element_order(list(first.shape), self._block_size),
        )
        self._on_cuda = first.device.type == "cuda"
        self.bytes_per_block = int(self.worker.bytes_per_block)
        host, disk = _core.size_tiers(self.bytes_per_block * self._world_size)
        self.worker.allocate_tiers(host, disk, remote_descriptor(self._vllm_config, self.kv_groups))
        self.worker.connect_remote(remote_descriptor(self._vllm_config, self.kv_groups))
        logger.info(
            "kvbm worker rank %d/%d: %d layers, %s, %d bytes per block on this rank; G2 %d blocks, G3 %d blocks",
            self.rank, self._world_size, len(tensors), self.worker.layout, self.bytes_per_block, host, disk,
        )

    def _group_block_tensors(self, kv_caches: dict[str, "torch.Tensor"]) -> list["torch.Tensor"]:
        """A hybrid model's G1 as kvbm addresses it: the tensors one group's block spans.

        Under HMA the groups' tensors overlay one memory (a block id belongs to one group at a
        time), the j-th layer of every group in the same tensor; so block b of those tensors is
        group g's block b, whichever group g holds it. Anything else is refused: kvbm's blocks
        would not be one group's layers."""
        groups = self.kv_groups.groups
        out = []
        for j in range(self.kv_groups.layers_per_group):
            names = [g.layer_names[j] for g in groups]
            missing = [n for n in names if n not in kv_caches]
            if missing:
                raise ValueError(f"kvbm: register_kv_caches has no KV tensor for layer {missing[0]}")
            ts = [kv_caches[n] for n in names]
            first = ts[0]
            for n, t in zip(names, ts):
                if (t.data_ptr(), list(t.shape), list(t.stride())) != (first.data_ptr(), list(first.shape),
                                                                        list(first.stride())):
                    raise ValueError(
                        f"kvbm: layers {names[0]} and {n} (position {j} of their KV cache groups) do not share one KV "
                        "tensor; kvbm stores a hybrid model's blocks per group and needs vLLM's overlaid group layout")
            out.append(first)
        return out

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, DynamoConnectorMetadata), type(connector_metadata)
        self.worker.bind_step(connector_metadata.payload)
        if connector_metadata.sync_loads:
            # This step's forward pass reads these blocks: wait for their copies (only theirs;
            # another request's G3 load may go on). Here rather than in start_load_kv, which
            # vLLM calls after launching the forward pass on steps it thinks have no
            # synchronous load: the bytes are in place before any forward pass, whatever vLLM
            # believes.
            self._sync_pending.update(connector_metadata.sync_loads)
            if self._grouped_finished is not None:
                self.worker.wait_for_request_loads(self._grouped_finished.expand(connector_metadata.sync_loads))
            else:
                self.worker.wait_for_request_loads(list(connector_metadata.sync_loads))

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        pass  # loads started when the step was bound; synchronous ones are already in place

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass  # every layer of a synchronous load was in place before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        pass  # stores run once per step, after the forward pass, in wait_for_save

    def wait_for_save(self):
        if self.worker is not None and self.has_connector_metadata():
            if self._on_cuda and self.worker.has_pending_stores():
                # The forward pass was only launched on the engine's stream; kvbm's copies run
                # on its own streams, so the blocks this step wrote must be complete before
                # they are read. Only in steps that store (one wait per step, not per layer).
                import torch

                torch.cuda.current_stream().synchronize()
            self.worker.forward_pass_done()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self.worker.get_finished()
        if self._grouped_finished is not None:
            sending, recving = self._grouped_finished.collapse(sending, recving)  # each group's slot -> the request
        if self._sync_pending:
            self._sync_pending.difference_update(sending)  # finished while loading: reported as sent
            # vLLM expects only asynchronous loads here (a running request in finished_recving
            # is an error there): synchronous ones go back through build_connector_worker_meta.
            sync = [r for r in recving if r in self._sync_pending]
            if sync:
                self._sync_pending.difference_update(sync)
                self._sync_done.extend(sync)
                recving = [r for r in recving if r not in sync]
        return (set(sending) or None), (set(recving) or None)

    def build_connector_worker_meta(self):
        """The synchronous loads that finished this step, for the leader (None: none)."""
        if self.worker is None or not self._sync_done or KvbmWorkerMetadata is None:
            return None
        done, self._sync_done = self._sync_done, []
        return KvbmWorkerMetadata(loaded=done)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self.worker.take_load_errors())

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The transfer counters this worker updated since its last report (None: nothing new)."""
        if self.worker is None:
            return None
        now = dict(self.worker.transfer_counters())
        delta = _counter_delta(now, self._reported)
        if not delta:
            return None
        self._reported = now
        return KvbmConnectorStats(data={"counters": delta, "pids": [os.getpid()]})

    def shutdown(self):
        if self.worker is not None:
            self.worker.wait_idle()
        if getattr(self, "recorder", None) is not None:
            self.recorder.close()
