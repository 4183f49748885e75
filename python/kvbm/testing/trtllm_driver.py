"""A stand-in for TensorRT-LLM's PyTorch executor that drives a KV cache connector with the
engine's exact call sequence, on CPU tensors. TensorRT-LLM itself needs CUDA and is not on the
package registries kvbm's CI uses; this reproduces what its source does (read at commit
00fdcbff5ad82a6438b3e0c9dbc5480b6ee52bdc, docs/ENGINES.md), nothing more:

Per iteration (``PyExecutor._executor_loop``, overlap scheduler off):
  1. new requests enter as DISAGG_GENERATION_INIT (the request queue does this when a connector
     is configured); those that fit get KV blocks through ``KVCacheManager.prepare_resources``
     -> ``add_sequence`` -> ``KvCacheConnectorManager.get_num_new_matched_tokens`` ->
     ``scheduler.get_num_new_matched_tokens(request, num_computed_tokens)`` ((0, True) is an
     error), then ``scheduler.update_state_after_alloc(request, block_ids)``; they move to
     DISAGG_GENERATION_TRANS_IN_PROGRESS;
  2. ``mark_ready_requests``: those not loading asynchronously go back to CONTEXT_INIT and the
     batch is scheduled again;
  3. ``prepare_resources`` for the batch (one more token, maybe one more block, per generation
     request);
  4. ``_kv_connector_start_batch``: the SchedulerOutput (new_requests once, cached_requests after;
     requests whose async load started this iteration left out) -> ``scheduler.
     build_connector_meta`` -> pickled to every rank -> ``worker.bind_connector_meta`` ->
     ``worker.start_load_kv(stream)``;
  5. the forward pass: per decoder layer ``wait_for_layer_load(layer_idx, stream)`` before and
     ``save_kv_layer(layer_idx, stream)`` after; then ``worker.wait_for_save(stream)``;
  6. request states advance, the sampler appends tokens;
  7. ``_send_kv_async``: for each finished scheduled request ``scheduler.request_finished(
     request, cache_block_ids)``; True keeps its blocks (AsyncTransferManager) until saved;
  8. cancelled requests are finished, finished requests terminated (blocks freed unless held);
  9. ``KvCacheConnectorManager.get_finished``: ``worker.get_finished(finished_gen_req_ids,
     started_loading_req_ids)`` with the ids that became async this iteration; loaded ones go
     back to CONTEXT_INIT, saved ones release their blocks. Returning an id the engine did not
     pass in raises KeyError, as in the engine.

The KV cache is one tensor ``[num_blocks, num_layers, kv_factor, heads * tokens * head_dim]``
(``KVCacheManager.get_unique_primary_pool``). The "forward pass" writes, for every computed
token position, values derived from the token prefix, layer, K/V, head and dim, in the element
order of the configured attention backend; so equal prefixes give equal bytes.
"""

from __future__ import annotations

import enum
import hashlib
import pickle
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kvbm.trtllm_integration.interface import RequestData, SchedulerOutput


class State(enum.Enum):
    CONTEXT_INIT = "CONTEXT_INIT"
    DISAGG_GENERATION_INIT = "DISAGG_GENERATION_INIT"
    DISAGG_GENERATION_TRANS_IN_PROGRESS = "DISAGG_GENERATION_TRANS_IN_PROGRESS"
    GENERATION_IN_PROGRESS = "GENERATION_IN_PROGRESS"
    GENERATION_COMPLETE = "GENERATION_COMPLETE"
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = "DISAGG_CONTEXT_TRANS_IN_PROGRESS"


@dataclass
class Request:
    """The parts of LlmRequest a connector and this driver use."""

    request_id: int
    prompt: list[int]
    max_new_tokens: int
    state: State = State.DISAGG_GENERATION_INIT
    tokens: list[int] = field(default_factory=list)
    context_current_position: int = 0
    context_chunk_size: int = 1 << 30
    cancelled: bool = False

    def __post_init__(self):
        self.tokens = list(self.prompt)

    def get_tokens(self, beam: int) -> list[int]:
        assert beam == 0
        return list(self.tokens)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def is_finished(self) -> bool:
        return self.state == State.GENERATION_COMPLETE

    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position


def make_llm_args(tokens_per_block: int, attn_backend: str = "TRTLLM", tp: int = 1, rank: int = 0) -> Any:
    """The attributes of TorchLlmArgs the connector reads."""
    mapping = SimpleNamespace(rank=rank)
    return SimpleNamespace(
        kv_cache_config=SimpleNamespace(tokens_per_block=tokens_per_block, enable_block_reuse=False),
        parallel_config=SimpleNamespace(tp_size=tp, pp_size=1, to_mapping=lambda: mapping),
        attn_backend=attn_backend,
    )


def kv_value(tokens: list[int], position: int, layer: int, kv: int) -> int:
    """A deterministic 16-bit pattern for one token position's KV (all heads/dims derive from it)."""
    h = hashlib.blake2b(repr((tuple(tokens[: position + 1]), layer, kv)).encode(), digest_size=2).digest()
    return int.from_bytes(h, "little") & 0x7BFF  # finite as float16 (no inf/nan exponent)


class Engine:
    """One rank of the executor loop, the connector scheduler (rank 0) and worker."""

    def __init__(self, scheduler, worker, *, num_blocks: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 tokens_per_block: int, attn_backend: str = "TRTLLM", kv_factor: int = 2):
        import torch

        self.scheduler = scheduler
        self.worker = worker
        self.page = tokens_per_block
        self.heads, self.head_dim, self.layers, self.kv_factor = num_kv_heads, head_dim, num_layers, kv_factor
        self.head_major = attn_backend.upper() == "TRTLLM"
        # KVCacheManager's primary pool: [blocks, layers, kv_factor, heads * tokens * head_dim].
        self.pool = torch.zeros((num_blocks, num_layers, kv_factor, num_kv_heads * tokens_per_block * head_dim),
                                dtype=torch.float16)
        self.free_blocks = list(range(num_blocks))
        self.blocks: dict[int, list[int]] = {}
        self.active: list[Request] = []
        self.waiting: list[Request] = []
        self.finished: list[Request] = []
        # KvCacheConnectorManager state.
        self.new_async_loading: dict[int, Request] = {}
        self.new_async_saving: dict[int, Request] = {}
        self.pending_loading: dict[int, Request] = {}
        self.pending_saving: dict[int, Request] = {}
        self.external_loads: dict[int, int] = {}
        self.reported: dict[int, tuple[int, int]] = {}  # per request: (blocks, tokens) in RequestData
        self.in_transfer: set[int] = set()
        self.calls: list[str] = []  # connector calls in order, for tests
        self.loaded_tokens: dict[int, int] = {}  # external tokens each request got
        self.before_forward = None  # test hook: called with (context, generation) requests
        worker.register_kv_caches(self.pool)
        self.calls.append("register_kv_caches")

    # -------------------------------------------------------------- requests

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: int) -> None:
        for r in self.active:
            if r.request_id == request_id:
                r.cancelled = True

    def idle(self) -> bool:
        return not self.waiting and not self.active and not self.pending_saving and not self.in_transfer

    # -------------------------------------------------------------- KV cache manager

    def _allocate(self, req: Request, num_tokens: int) -> bool:
        have = self.blocks.setdefault(req.request_id, [])
        need = -(-num_tokens // self.page) - len(have)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            have.append(self.free_blocks.pop(0))
        return True

    def _free(self, req: Request) -> None:
        self.free_blocks.extend(self.blocks.pop(req.request_id, []))

    def _add_sequence(self, req: Request) -> bool:
        """KVCacheManager.prepare_resources for a request's first context chunk."""
        if not self._allocate(req, req.prompt_len):
            return False
        prepopulated = 0  # no device-side block reuse in this engine
        num, is_async = self.scheduler.get_num_new_matched_tokens(req, prepopulated)
        self.calls.append("get_num_new_matched_tokens")
        if num == 0 and is_async:
            raise RuntimeError("load_kv_async must be False when num_tokens is 0!")
        if prepopulated + num >= req.prompt_len:
            raise RuntimeError("There must be at least one uncomputed token in the prompt!")
        if is_async:
            self.new_async_loading[req.request_id] = req
        self.external_loads[req.request_id] = num
        self.loaded_tokens[req.request_id] = num
        req.context_current_position = prepopulated + num
        self.scheduler.update_state_after_alloc(req, list(self.blocks[req.request_id]))
        self.calls.append("update_state_after_alloc")
        return True

    # -------------------------------------------------------------- one iteration

    def _schedule(self) -> tuple[list[Request], list[Request]]:
        ctx = [r for r in self.active if r.state == State.CONTEXT_INIT]
        gen = [r for r in self.active if r.state == State.GENERATION_IN_PROGRESS]
        return ctx, gen

    def _request_data(self, req: Request) -> RequestData:
        nb, nt = self.reported.get(req.request_id, (0, 0))
        blocks, tokens = self.blocks[req.request_id], req.tokens
        if req.state == State.CONTEXT_INIT:
            computed = req.context_current_position
            scheduled = min(req.context_remaining_length, req.context_chunk_size)
        else:
            computed, scheduled = len(tokens) - 1, 1
        self.reported[req.request_id] = (len(blocks), len(tokens))
        return RequestData(req.request_id, list(tokens[nt:]), list(blocks[nb:]), computed, scheduled)

    def _forward(self, ctx: list[Request], gen: list[Request]) -> None:
        if self.before_forward is not None:
            self.before_forward(ctx, gen)
        work = []  # (request, first position, count)
        for r in ctx:
            n = min(r.context_remaining_length, r.context_chunk_size)
            work.append((r, r.context_current_position, n))
        for r in gen:
            work.append((r, len(r.tokens) - 1, 1))
        for layer in range(self.layers):
            self.worker.wait_for_layer_load(layer, None)
            for r, first, n in work:
                for p in range(first, first + n):
                    self._write_kv(r, p, layer)
            self.worker.save_kv_layer(layer, None)
        self.calls.append("forward")
        self.worker.wait_for_save(None)
        self.calls.append("wait_for_save")

    def _write_kv(self, req: Request, position: int, layer: int) -> None:
        import torch

        block = self.blocks[req.request_id][position // self.page]
        slot = position % self.page
        for kv in range(self.kv_factor):
            base = kv_value(req.tokens, position, layer, kv)
            vals = torch.arange(self.heads * self.head_dim, dtype=torch.int32).add_(base).bitwise_and_(0x7BFF)
            vals = vals.to(torch.int16).view(torch.float16).view(self.heads, self.head_dim)
            chunk = self.pool[block, layer, kv]
            if self.head_major:  # [heads, tokens, dim]
                chunk.view(self.heads, self.page, self.head_dim)[:, slot, :] = vals
            else:  # [tokens, heads, dim]
                chunk.view(self.page, self.heads, self.head_dim)[slot] = vals

    def expected_block(self, tokens: list[int], block_index: int):
        """The bytes this engine's forward pass writes for one full block of `tokens`."""
        import torch

        out = torch.zeros((self.layers, self.kv_factor, self.heads * self.page * self.head_dim), dtype=torch.float16)
        for layer in range(self.layers):
            for kv in range(self.kv_factor):
                for slot in range(self.page):
                    p = block_index * self.page + slot
                    base = kv_value(tokens, p, layer, kv)
                    vals = torch.arange(self.heads * self.head_dim, dtype=torch.int32).add_(base).bitwise_and_(0x7BFF)
                    vals = vals.to(torch.int16).view(torch.float16).view(self.heads, self.head_dim)
                    if self.head_major:
                        out[layer, kv].view(self.heads, self.page, self.head_dim)[:, slot, :] = vals
                    else:
                        out[layer, kv].view(self.page, self.heads, self.head_dim)[slot] = vals
        return out

    def step(self, sampled_token=lambda req: (sum(req.tokens) * 31 + len(req.tokens)) % 50000) -> None:
        # 1. new requests: DISAGG_GENERATION_INIT, allocated through the KV cache manager.
        self.active.extend(self.waiting)
        self.waiting = []
        for r in [r for r in self.active if r.state == State.DISAGG_GENERATION_INIT]:
            if self._add_sequence(r):
                r.state = State.DISAGG_GENERATION_TRANS_IN_PROGRESS
                # 2. mark_ready_requests
                if r.request_id not in self.new_async_loading:
                    r.state = State.CONTEXT_INIT
        ctx, gen = self._schedule()
        # 3. prepare_resources: one more token's KV for each generation request.
        for r in gen:
            if not self._allocate(r, len(r.tokens)):
                raise RuntimeError("out of KV blocks (the test sized the engine too small)")
        if ctx or gen:
            # 4. _kv_connector_start_batch
            so = SchedulerOutput()
            for r in ctx:
                if r.request_id in self.new_async_loading:
                    continue
                is_new = r.request_id not in self.reported
                data = self._request_data(r)
                if r.request_id in self.external_loads:
                    data.computed_position -= self.external_loads[r.request_id]
                (so.new_requests if is_new else so.cached_requests).append(data)
            for r in gen:
                so.cached_requests.append(self._request_data(r))
            self.external_loads = {}
            meta = self.scheduler.build_connector_meta(so)
            self.calls.append("build_connector_meta")
            meta = pickle.loads(pickle.dumps(meta))  # mpi_broadcast to every rank
            self.worker.bind_connector_meta(meta)
            self.worker.start_load_kv(None)
            self.calls.append("start_load_kv")
            # 5. forward pass
            self._forward(ctx, gen)
            # 6. states and sampling
            for r in ctx:
                r.context_current_position += min(r.context_remaining_length, r.context_chunk_size)
                if r.context_remaining_length == 0:
                    r.state = State.GENERATION_IN_PROGRESS
                    r.tokens.append(sampled_token(r))
            for r in gen:
                r.tokens.append(sampled_token(r))
            for r in ctx + gen:
                if r.state == State.GENERATION_IN_PROGRESS and len(r.tokens) - r.prompt_len >= r.max_new_tokens:
                    r.state = State.GENERATION_COMPLETE
            # 7. _send_kv_async
            for r in ctx + gen:
                if r.is_finished:
                    if self.scheduler.request_finished(r, list(self.blocks[r.request_id])):
                        self.new_async_saving[r.request_id] = r
                        self.in_transfer.add(r.request_id)
                    self.calls.append("request_finished")
        # 8. _handle_canceled_requests, _handle_responses
        for r in self.active:
            if r.cancelled and not r.is_finished:
                # finish_by_reason(CANCELLED). _send_kv_async already ran this iteration, so
                # the non-overlap loop never calls request_finished for it (the engine's source).
                r.state = State.GENERATION_COMPLETE
        done = [r for r in self.active if r.is_finished]
        self.active = [r for r in self.active if not r.is_finished]
        for r in done:
            if r.request_id not in self.in_transfer:
                self._free(r)
            self.finished.append(r)
        # 9. KvCacheConnectorManager.get_finished
        started_loading = list(self.new_async_loading)
        finished_gen = list(self.new_async_saving)
        self.pending_loading.update(self.new_async_loading)
        self.pending_saving.update(self.new_async_saving)
        self.new_async_loading, self.new_async_saving = {}, {}
        saved, loaded = self.worker.get_finished(finished_gen, started_loading)
        self.calls.append("get_finished")
        for rid in saved:
            req = self.pending_saving.pop(rid)  # KeyError: an id the engine never passed in
            self.in_transfer.discard(rid)
            self._free(req)
        for rid in loaded:
            req = self.pending_loading.pop(rid)
            req.state = State.CONTEXT_INIT

    def run_until_idle(self, max_steps: int = 10_000, deadline_s: float = 60.0) -> int:
        import time

        end = time.monotonic() + deadline_s
        steps = 0
        while not self.idle():
            if steps >= max_steps or time.monotonic() > end:
                raise TimeoutError(f"engine not idle after {steps} steps: active={[(r.request_id, r.state) for r in self.active]} "
                                   f"pending loads={list(self.pending_loading)} saves={list(self.pending_saving)}")
            self.step()
            steps += 1
            if self.pending_loading and not (self.waiting or any(r.state != State.DISAGG_GENERATION_TRANS_IN_PROGRESS for r in self.active)):
                time.sleep(0.0005)  # only async loads outstanding: let the transfer threads run
        return steps
