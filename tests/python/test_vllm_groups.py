"""kvbm's view of vLLM's KV cache groups (groups.py), from vLLM's own spec classes."""

from __future__ import annotations

import pytest

from kvbm.testing.vllm_guard import VLLM_ERROR, vllm_marks  # noqa: F401

pytestmark = vllm_marks()


def _config(*specs):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    groups = [KVCacheGroupSpec([f"model.layers.{i}.attn"], s) for i, s in enumerate(specs)]
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=groups)


def _attn(kind, **kw):
    import torch
    from vllm.v1 import kv_cache_interface as k

    return getattr(k, kind)(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32, **kw)


def test_one_full_attention_group_is_not_hybrid_and_keeps_todays_keys():
    from kvbm.vllm_integration.groups import KvCacheGroups

    g = KvCacheGroups.from_config(_config(_attn("FullAttentionSpec")), 32)
    assert not g.hybrid
    assert g.descriptor() == ""  # the model descriptor (G4 keys, G3 file) is what it was
    assert g.groups[0].salt("s") == "s" and g.groups[0].salt(None) is None  # the hashes too
    assert g.request_ids("r") == ["r"]


def test_sliding_window_needs_what_vllm_keeps():
    from kvbm.vllm_integration.groups import KvCacheGroups, split_group_request_id

    g = KvCacheGroups.from_config(_config(_attn("SlidingWindowSpec", sliding_window=64), _attn("FullAttentionSpec")), 32)
    assert g.hybrid
    sw, full = g.groups
    # vLLM's SlidingWindowManager.get_num_skipped_tokens(n * 32) = n * 32 - 63: it keeps the
    # last 2 blocks of a hit (cdiv(63, 32)).
    assert [sw.first_needed(n) for n in (0, 1, 2, 3, 9)] == [0, 0, 0, 1, 7]
    assert [full.first_needed(n) for n in (0, 9)] == [0, 0]
    # (group, hash): group 1 hashes under its own salt, group 0 under the request's.
    assert sw.salt("s") == "s" and full.salt("s") != "s" and full.salt(None) != full.salt("")
    assert g.request_ids("r")[0] == "r" and split_group_request_id(g.request_ids("r")[1]) == ("r", 1)
    assert "sliding_window(64+0):model.layers.0.attn" in g.descriptor()
    assert "full:model.layers.1.attn" in g.descriptor()


def test_chunked_local_needs_the_current_chunk():
    from kvbm.vllm_integration.groups import KvCacheGroups

    g = KvCacheGroups.from_config(_config(_attn("ChunkedLocalAttentionSpec", attention_chunk_size=128),
                                          _attn("FullAttentionSpec")), 32)
    local = g.groups[0]
    assert [local.first_needed(n) for n in (3, 4, 5, 8, 9)] == [0, 4, 4, 8, 8]


def test_mamba_groups_are_refused_with_the_reason():
    import torch
    from vllm.v1.kv_cache_interface import MambaSpec

    from kvbm.vllm_integration.groups import KvCacheGroups, UnsupportedKvCacheGroups

    mamba = MambaSpec(block_size=32, shapes=((4, 64),), dtypes=(torch.float32,))
    with pytest.raises(UnsupportedKvCacheGroups, match=r"group 0 .*Mamba.*recurrent states.*another prefix"):
        KvCacheGroups.from_config(_config(mamba, _attn("FullAttentionSpec")), 32)


def test_specs_kvbm_cannot_serve_are_refused_by_name():
    from kvbm.vllm_integration.groups import KvCacheGroups, UnsupportedKvCacheGroups

    with pytest.raises(UnsupportedKvCacheGroups, match="CrossAttentionSpec"):
        KvCacheGroups.from_config(_config(_attn("CrossAttentionSpec"), _attn("FullAttentionSpec")), 32)
