"""kvbm as a TensorRT-LLM KV cache connector (PyTorch backend).

Configure it like the reference::

    kv_connector_config:
      connector_module: kvbm.trtllm_integration.connector
      connector_scheduler_class: DynamoKVBMConnectorLeader
      connector_worker_class: DynamoKVBMConnectorWorker

TensorRT-LLM builds the scheduler class on MPI rank 0 only and the worker class on every rank
(rank 0 included, in the same process). Both are thin translations onto the engine-agnostic core
that the vLLM adapter uses: ``kvbm._core.Leader`` (pools, per-request slots, policy) and
``kvbm._core.Worker`` (G2/G3 memory, transfers). Nothing here decides what to store or load.

What differs from vLLM, and how it is bridged (docs/ENGINES.md has the engine's call order):

- Request ids are ints; the core's are strings (``str(request_id)``).
- TensorRT-LLM has no ``update_connector_output``: the scheduler never hears from the workers.
  Rank 0's worker, which lives in the scheduler's process, hands its finished loads and load
  errors to the leader of that process (``on_worker_output``). Other ranks' workers guard their
  own host slots (the core never overwrites a host slot that a load still reads).
- Loads are synchronous (``(n, False)``): the worker waits for the step's loads in
  ``start_load_kv``, before the forward pass. The engine only builds connector metadata when it
  schedules a batch, and a request that loads asynchronously is not scheduled: alone in the
  engine, its load would never be issued (docs/ENGINES.md).
- ``get_finished`` may only return ids the engine already passed in; finished ids the core
  reports earlier are held until then.
- The KV cache is ONE tensor ``[num_blocks, num_layers, kv_factor, heads * tokens * head_dim]``
  (the engine's primary pool), registered as a fully contiguous G1 layout; its layout
  fingerprint includes the element order inside a chunk, which depends on the attention backend.

Thread safety: the engine calls each side from its executor thread.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from kvbm import _core

try:  # the real interface when TensorRT-LLM imports (it needs libcuda.so.1)
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (  # type: ignore[import-not-found]
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        SchedulerOutput,
    )

    INTERFACE = "tensorrt_llm"
except Exception as _e:  # noqa: BLE001 - any failure: fall back to the stand-ins, and say why
    from kvbm.trtllm_integration.interface import (
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        SchedulerOutput,
    )

    INTERFACE = f"kvbm stand-ins (tensorrt_llm not importable: {type(_e).__name__}: {_e})"

logger = logging.getLogger("kvbm.trtllm")

# Element order inside one (block, layer, K|V) chunk of the primary pool, by attention backend.
# The TRTLLM backend's kernels address a block as [heads, tokens_per_block, head_dim]; the
# FLASHINFER and VANILLA backends view the same pool as [tokens_per_block, heads, head_dim]
# (KVCacheManager.get_buffers). Part of the layout fingerprint: kvbm refuses to hand blocks
# written in one order to an engine that reads the other.
ELEMENT_ORDER_BY_BACKEND = {
    "TRTLLM": "head,token,dim",
    "FLASHINFER": "token,head,dim",
    "VANILLA": "token,head,dim",
}

# The leader and rank-0 worker of this process (TensorRT-LLM puts both on rank 0).
_lock = threading.Lock()
_leader_ref: weakref.ref | None = None
_rank0_worker_ref: weakref.ref | None = None


def _parallel(llm_args: Any) -> tuple[int, int]:
    """(rank, world_size) of this process from the engine's arguments."""
    pc = getattr(llm_args, "parallel_config", None)
    pp = int(getattr(pc, "pp_size", getattr(llm_args, "pipeline_parallel_size", 1)) or 1)
    if pp != 1:
        raise ValueError("kvbm: pipeline parallelism is not supported (TensorRT-LLM's connector refuses it too)")
    tp = int(getattr(pc, "tp_size", getattr(llm_args, "tensor_parallel_size", 1)) or 1)
    rank = 0
    if pc is not None and hasattr(pc, "to_mapping"):
        rank = int(pc.to_mapping().rank)
    elif tp > 1:
        try:
            from tensorrt_llm._utils import mpi_rank  # type: ignore[import-not-found]

            rank = int(mpi_rank())
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"kvbm: tensor_parallel_size is {tp} but this rank is unknown ({e})") from e
    return rank, tp


def _tokens_per_block(llm_args: Any) -> int:
    kv = getattr(llm_args, "kv_cache_config", None)
    n = getattr(kv, "tokens_per_block", None)
    if not n:
        raise ValueError("kvbm: llm_args.kv_cache_config.tokens_per_block is not set")
    return int(n)


def _refuse_attention_windows(llm_args: Any) -> None:
    """kvbm stores a block as every layer's KV of its tokens. With TensorRT-LLM's (variable)
    sliding-window attention, ``kv_cache_config.max_attention_window`` shorter than the sequence
    for some layers, the engine keeps those layers' blocks in per-window pools whose blocks it
    reuses in place once they fall out of the window: one block id is not every layer's KV of the
    same tokens, and a stored or loaded block would be wrong. Refused at start."""
    kv = getattr(llm_args, "kv_cache_config", None)
    windows = getattr(kv, "max_attention_window", None)
    if not windows:
        return
    windows = [int(w) for w in (windows if isinstance(windows, (list, tuple)) else [windows])]
    max_seq = getattr(llm_args, "max_seq_len", None)
    if len(set(windows)) > 1 or (max_seq and min(windows) < int(max_seq)):
        raise ValueError(
            f"kvbm: kv_cache_config.max_attention_window={windows} (sliding-window / variable sliding-window "
            "attention) is not supported by kvbm's TensorRT-LLM connector: the engine reuses window layers' blocks "
            "in place, so a block would not hold every layer's KV of its tokens. Unset max_attention_window, or "
            "run this model without the kvbm connector (vLLM with kvbm serves sliding-window models per KV cache "
            "group, docs/VLLM.md).")


def _rid(request_id: int) -> str:
    return str(int(request_id))


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """Scheduler side (rank 0): translates the engine's calls onto ``kvbm._core.Leader``.

    The leader is built on first use, once rank 0's worker has registered the KV pool: its block
    size (bytes over all ranks) sizes G2/G3 exactly as the workers size them.
    """

    def __init__(self, llm_args: Any, *, leader: "_core.Leader | None" = None):
        super().__init__(llm_args)
        self.page_size = _tokens_per_block(llm_args)
        _refuse_attention_windows(llm_args)
        _, self.world_size = _parallel(llm_args)
        extra = getattr(llm_args, "kvbm_config", None) or {}
        # None: DYN_KVBM_{HOST,DISK}_EVICTION_POLICY, else kvbm's default (as in vLLM)
        self._policy = extra.get("policy") if isinstance(extra, dict) else None
        self._leader = leader  # tests may pass a core to share
        self._blocks: dict[str, list[int]] = {}  # device blocks reported so far, per request
        self._tokens: dict[str, list[int]] = {}  # tokens reported through RequestData
        self._matched: dict[str, int] = {}  # external tokens promised by get_num_new_matched_tokens
        # Matched counts the engine subtracts from computed_position in its next SchedulerOutput
        # (KvCacheConnectorSchedulerOutputManager.external_loads, reset at every build).
        self._external_loads: dict[str, int] = {}
        global _leader_ref
        with _lock:
            _leader_ref = weakref.ref(self)

    @property
    def leader(self) -> "_core.Leader":
        if self._leader is None:
            worker = _rank0_worker_ref() if _rank0_worker_ref is not None else None
            if worker is None or not worker.bytes_per_block:
                raise RuntimeError("kvbm: the scheduler was used before rank 0's worker registered the KV cache "
                                   "(TensorRT-LLM registers it when the executor starts)")
            self._leader = _core.Leader(self.page_size, worker.bytes_per_block * self.world_size, policy=self._policy)
            logger.info("kvbm leader: G2 %d blocks, G3 %d blocks of %d bytes, page %d tokens",
                        self._leader.host_blocks, self._leader.disk_blocks,
                        worker.bytes_per_block * self.world_size, self.page_size)
        return self._leader

    def _sync(self, rid: str, tokens: list[int], request: Any = None) -> None:
        leader = self.leader
        if not leader.has_request(rid):
            salt = getattr(request, "cache_salt_id", None) if request is not None else None
            lora = getattr(request, "lora_task_id", None) if request is not None else None
            leader.add_request(rid, list(tokens), salt=None if salt is None else str(salt),
                               lora_name=None if lora is None else str(lora))
            return
        known = leader.num_tokens(rid)
        if len(tokens) > known:
            leader.extend_tokens(rid, list(tokens[known:]))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        rid = _rid(request.request_id)
        self._sync(rid, request.get_tokens(0), request)
        external, is_async, _host, _disk = self.leader.get_num_new_matched_tokens(rid, int(num_computed_tokens))
        external = int(external)
        self._matched[rid] = external
        self._external_loads[rid] = external
        # Synchronous for the engine: scheduled in this iteration, loaded before its forward pass.
        return external, False

    def update_state_after_alloc(self, request: Any, block_ids: list[int]):
        rid = _rid(request.request_id)
        if not self.leader.has_request(rid):
            self._sync(rid, request.get_tokens(0), request)
        self._blocks[rid] = list(block_ids)
        self.leader.update_state_after_alloc(rid, list(block_ids), self._matched.get(rid, 0))

    def _scheduled(self, data: Any, first: bool) -> None:
        rid = _rid(data.request_id)
        tokens = self._tokens.setdefault(rid, [])
        tokens.extend(data.new_tokens)
        blocks = self._blocks.setdefault(rid, [])
        # The engine leaves the tokens matched since its last SchedulerOutput out of
        # computed_position; they are loaded before this step's forward pass.
        computed = int(data.computed_position) + self._external_loads.get(rid, 0)
        if first:
            blocks[:] = list(data.new_block_ids)  # the first RequestData lists every block so far
        else:
            blocks.extend(data.new_block_ids)
        self._sync(rid, tokens)
        self.leader.on_scheduled(rid, blocks, computed, int(data.num_scheduled_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> bytes:
        for data in scheduler_output.new_requests:
            self._scheduled(data, first=True)
        for data in scheduler_output.cached_requests:
            self._scheduled(data, first=False)
        self._external_loads = {}
        # Plain bytes: TensorRT-LLM pickles the metadata to broadcast it to every rank.
        return self.leader.build_step_metadata()

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        rid = _rid(request.request_id)
        for d in (self._blocks, self._tokens, self._matched, self._external_loads):
            d.pop(rid, None)
        if not self.leader.has_request(rid):
            return False
        # True: a load still writes the request's blocks; the engine keeps them until every
        # worker returned the request from get_finished as saved.
        return bool(self.leader.request_finished(rid))

    def on_worker_output(self, loaded: list[str], saved: list[str], invalid_blocks: list[int]) -> None:
        """From rank 0's worker in this process (TensorRT-LLM has no scheduler-side callback)."""
        if self._leader is not None:
            self._leader.on_worker_output(list(loaded), list(saved), list(invalid_blocks))


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """Worker side (every rank): translates the engine's calls onto ``kvbm._core.Worker``."""

    def __init__(self, llm_args: Any, *, worker: "_core.Worker | None" = None):
        super().__init__(llm_args)
        self.rank, self.world_size = _parallel(llm_args)
        self.page_size = _tokens_per_block(llm_args)
        _refuse_attention_windows(llm_args)
        backend = str(getattr(llm_args, "attn_backend", "TRTLLM") or "TRTLLM").upper()
        if backend not in ELEMENT_ORDER_BY_BACKEND:
            raise ValueError(f"kvbm: attention backend {backend!r} has no known KV element order "
                             f"(known: {sorted(ELEMENT_ORDER_BY_BACKEND)})")
        self.element_order = ELEMENT_ORDER_BY_BACKEND[backend]
        self.worker = worker if worker is not None else _core.Worker(rank=self.rank, world_size=self.world_size)
        self._tiers_ready = worker is not None and worker.host_blocks + worker.disk_blocks > 0
        self.bytes_per_block = 0
        self._on_cuda = False
        # get_finished bookkeeping: what the core reported, what the engine has passed in.
        self._saved: set[int] = set()
        self._saving_asked: set[int] = set()
        self._loading_asked: set[int] = set()  # stays empty: kvbm never answers (n, True)

    def register_kv_caches(self, kv_cache_tensor: Any):
        t = kv_cache_tensor
        if t.dim() < 4:
            raise ValueError(f"kvbm: expected the KV pool [num_blocks, num_layers, kv_factor, ...], got shape "
                             f"{list(t.shape)}")
        self.worker.register_kv_caches(
            [t.data_ptr()], [list(t.shape)], [list(t.stride())], t.element_size(), int(t.shape[0]), self.page_size,
            on_device=t.device.type == "cuda",
            device_index=t.device.index if t.device.index is not None else -1,
            pool=True, element_order=self.element_order,
        )
        self._on_cuda = t.device.type == "cuda"
        self.bytes_per_block = int(self.worker.bytes_per_block)
        if not self._tiers_ready:
            host, disk = _core.size_tiers(self.bytes_per_block * self.world_size)
            self.worker.allocate_tiers(host, disk)
            self._tiers_ready = True
        if self.rank == 0:
            global _rank0_worker_ref
            with _lock:
                _rank0_worker_ref = weakref.ref(self)
        logger.info("kvbm worker rank %d/%d: %s, %d bytes per block; G2 %d blocks, G3 %d blocks", self.rank,
                    self.world_size, self.worker.layout, self.bytes_per_block, self.worker.host_blocks,
                    self.worker.disk_blocks)

    def bind_connector_meta(self, metadata: object):
        super().bind_connector_meta(metadata)
        if metadata is not None:
            self.worker.bind_step(metadata)  # loads start now

    def start_load_kv(self, stream: Any):
        # Loads started when the step was bound; the forward pass may read them once they are
        # done (kvbm's copies complete on its own streams before a load is reported).
        self.worker.wait_for_loads()
        # Tell the leader now: request_finished comes before get_finished in the engine's loop,
        # and a request may finish in the very step its load ran.
        self._drain()

    def wait_for_layer_load(self, layer_idx: int, stream: Any):
        pass  # every layer was loaded in start_load_kv

    def save_kv_layer(self, layer_idx: int, stream: Any):
        pass  # stores run once per step, after the forward pass, in wait_for_save

    def wait_for_save(self, stream: Any):
        if self.get_connector_meta() is None:
            return
        if self._on_cuda and self.worker.has_pending_stores() and stream is not None:
            stream.synchronize()  # the forward pass was only launched; kvbm copies on its own streams
        self.worker.forward_pass_done()

    def _drain(self) -> None:
        """Collects the core's finished transfers and load errors; rank 0 hands them to the
        leader of its process (TensorRT-LLM has no scheduler-side callback for them)."""
        sending, recving = self.worker.get_finished()
        errors = self.worker.take_load_errors()
        if errors:
            # TensorRT-LLM's connector interface has no way to make the engine recompute a block;
            # the leader at least invalidates the source so it is never served again.
            logger.error("kvbm rank %d: %d loaded blocks failed verification (%s); TensorRT-LLM cannot "
                         "recompute them", self.rank, len(errors), errors[:8])
        if self.rank == 0:
            leader = _leader_ref() if _leader_ref is not None else None
            if leader is not None and (sending or recving or errors):
                leader.on_worker_output(recving, sending, errors)
        self._saved.update(int(r) for r in sending)

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        self._drain()
        # Loads are synchronous: the engine never waits for one here (started_loading_req_ids
        # stays empty); requests whose blocks a load still wrote when they finished come back
        # as saved once the engine has passed them in.
        self._saving_asked.update(int(r) for r in finished_gen_req_ids)
        self._loading_asked.update(int(r) for r in started_loading_req_ids)
        saved = sorted(self._saved & self._saving_asked)
        self._saved.difference_update(saved)
        self._saving_asked.difference_update(saved)
        return saved, []

    def shutdown(self):
        self.worker.wait_idle()
