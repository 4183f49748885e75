"""What kvbm's vLLM connector relies on in vLLM's API: fails loudly when an upgrade changes it.

Each check names the method, field or attribute that python/kvbm/vllm_integration/connector.py
uses; a failure here means the adapter must be revisited for the new vLLM version.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from kvbm.testing.vllm_guard import VLLM_ERROR, vllm_marks  # noqa: F401

pytestmark = vllm_marks()

if VLLM_ERROR is None:
    import vllm


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_tested_version():
    assert vllm.__version__.startswith("0.32."), f"kvbm's adapter is tested with vLLM 0.32, found {vllm.__version__}"


def test_connector_base_methods():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    expected = {
        "__init__": ["vllm_config", "role", "kv_cache_config"],
        "get_num_new_matched_tokens": ["request", "num_computed_tokens"],
        "update_state_after_alloc": ["request", "blocks", "num_external_tokens"],
        "build_connector_meta": ["scheduler_output"],
        "update_connector_output": ["connector_output"],
        "request_finished": ["request", "block_ids"],
        "register_kv_caches": ["kv_caches"],
        "bind_connector_metadata": ["connector_metadata"],
        "start_load_kv": ["forward_context", "kwargs"],
        "wait_for_layer_load": ["layer_name"],
        "save_kv_layer": ["layer_name", "kv_layer", "attn_metadata", "kwargs"],
        "wait_for_save": [],
        "get_finished": ["finished_req_ids"],
        "get_block_ids_with_load_errors": [],
        "has_connector_metadata": [],
        "shutdown": [],
    }
    for name, params in expected.items():
        assert _params(getattr(KVConnectorBase_V1, name)) == params, name
    # the abstract set kvbm implements: a new abstract method would make the class unusable
    assert KVConnectorBase_V1.__abstractmethods__ == {
        "build_connector_meta", "get_num_new_matched_tokens", "save_kv_layer", "start_load_kv",
        "update_state_after_alloc", "wait_for_layer_load", "wait_for_save",
    }


def test_connector_is_instantiable_class():
    from kvbm.vllm_integration.connector import DynamoConnector

    assert not getattr(DynamoConnector, "__abstractmethods__", None)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_scheduler_output_fields():
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    assert {"scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "preempted_req_ids",
            "finished_req_ids", "kv_connector_metadata"} <= _fields(SchedulerOutput)
    assert {"req_id", "prompt_token_ids", "block_ids", "num_computed_tokens"} <= _fields(NewRequestData)
    assert {"req_ids", "resumed_req_ids", "new_block_ids", "num_computed_tokens"} <= _fields(CachedRequestData)


def test_connector_output_fields():
    from vllm.v1.outputs import KVConnectorOutput

    assert {"finished_sending", "finished_recving", "invalid_block_ids"} <= _fields(KVConnectorOutput)


def test_worker_metadata_channel_for_synchronous_loads():
    """Synchronous G2 loads are reported through the worker -> scheduler metadata of each step
    (vLLM asserts on a running request in finished_recving): the channel must exist, be
    aggregated over the ranks with ``aggregate``, and reach ``update_connector_output``."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorWorkerMetadata
    from vllm.v1.outputs import KVConnectorOutput

    from kvbm.vllm_integration import connector as kc

    assert "kv_connector_worker_meta" in _fields(KVConnectorOutput)
    assert _params(KVConnectorBase_V1.build_connector_worker_meta) == []
    assert _params(KVConnectorWorkerMetadata.aggregate) == ["other"]
    assert kc.SYNC_LOADS_SUPPORTED
    # Ranks' reports merge into one list (each rank waited for its loads before the step's forward).
    a, b = kc.KvbmWorkerMetadata(loaded=["r1", "r2"]), kc.KvbmWorkerMetadata(loaded=["r2", "r3"])
    assert a.aggregate(b).loaded == ["r1", "r2", "r3"]
    # The scheduler calls update_connector_output with the step's output, worker metadata included.
    import vllm.v1.core.sched.scheduler as sched

    src = inspect.getsource(sched.Scheduler._update_from_kv_xfer_finished)
    assert "update_connector_output(kv_connector_output)" in src
    # A synchronous load: vLLM schedules the request in the same step (no WAITING_FOR_REMOTE_KVS).
    assert "has_sync_kv_loads = True" in inspect.getsource(sched.Scheduler.schedule)


def test_request_attributes():
    from vllm.v1.request import Request

    init = _params(Request.__init__)
    assert {"request_id", "cache_salt", "lora_request"} <= set(init)
    src = inspect.getsource(Request)
    for attr in ("self.all_token_ids", "self.cache_salt", "self.lora_request", "self.request_id"):
        assert attr in src, attr


def test_kv_cache_config_fields():
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig, KVCacheGroupSpec

    assert {"num_blocks", "kv_cache_groups"} <= _fields(KVCacheConfig)
    assert {"kv_cache_spec", "layer_names"} <= _fields(KVCacheGroupSpec)
    assert isinstance(inspect.getattr_static(AttentionSpec, "page_size_bytes"), property)
    assert callable(KVCacheBlocks.get_block_ids)


def test_kv_transfer_config_knobs():
    from vllm.config import KVTransferConfig

    assert {"kv_connector", "kv_role", "kv_connector_module_path", "kv_load_failure_policy",
            "kv_connector_extra_config"} <= _fields(KVTransferConfig)
