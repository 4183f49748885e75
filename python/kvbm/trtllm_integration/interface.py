"""Stand-ins for TensorRT-LLM's KV cache connector interface, used ONLY when the real one cannot
be imported (``tensorrt_llm`` needs ``libcuda.so.1`` and is not on the package registries that
kvbm's CI uses).

Same names and method signatures as ``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py``
(TensorRT-LLM commit 00fdcbff5ad82a6438b3e0c9dbc5480b6ee52bdc, read 2026-12-01; see
docs/ENGINES.md): the data classes the engine passes (``RequestData``, ``SchedulerOutput``) and
the two abstract base classes. Written from that interface, not copied. When ``tensorrt_llm``
imports, ``kvbm.trtllm_integration.connector`` subclasses the real classes instead and this
module is unused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple


@dataclass
class RequestData:
    """One scheduled request as the engine describes it to ``build_connector_meta``."""

    request_id: int
    new_tokens: List[int]  # tokens not yet reported for this request (all of them the first time)
    new_block_ids: List[int]  # device blocks not yet reported
    computed_position: int  # tokens whose KV is valid before this step
    num_scheduled_tokens: int  # tokens this step computes


@dataclass
class SchedulerOutput:
    new_requests: List[RequestData] = field(default_factory=list)  # first scheduling, exactly once
    cached_requests: List[RequestData] = field(default_factory=list)


class KvCacheConnectorWorker(ABC):
    def __init__(self, llm_args: Any):
        self._llm_args = llm_args
        self._metadata = None
        super().__init__()

    def bind_connector_meta(self, metadata: object):
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self):
        self._metadata = None

    def register_forward_pass_callable(self) -> Optional[Callable]:
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor): ...

    @abstractmethod
    def start_load_kv(self, stream): ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream): ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream): ...

    @abstractmethod
    def wait_for_save(self, stream): ...

    @abstractmethod
    def get_finished(self, finished_gen_req_ids: List[int],
                     started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]: ...


class KvCacheConnectorScheduler(ABC):
    def __init__(self, llm_args: Any):
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput): ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request, cache_block_ids: List[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request, block_ids: List[int]): ...
