"""kvbm as an SGLang HiCache storage backend (kvbm.sglang_integration.KvbmHiCacheStorage).

SGLang's server needs CUDA; what runs here is its storage interface: the backend subclasses
SGLang's real ``HiCacheStorage`` when ``sglang.srt.mem_cache.hicache_storage`` imports (the
PyPI wheel, see docs/ENGINES.md) and kvbm's stand-ins of the same names otherwise
(``kvbm.sglang_integration.INTERFACE`` says which). Host pools are CPU tensors in SGLang's MHA
host pool layouts (kvbm.testing.sglang_pool); the store is kvbm's real G2/G3 (PageStore)."""

from __future__ import annotations

import importlib
import itertools

import pytest

torch = pytest.importorskip("torch")

from kvbm.testing.sglang_pool import HostPool  # noqa: E402


def _sgl():
    """Imported inside the tests (which run last), so collecting this file does not import SGLang."""
    import kvbm.sglang_integration as mod

    return mod

pytestmark = pytest.mark.sglang

PAGE, LAYERS, HEADS, HD, SIZE = 4, 3, 2, 8, 64
_names = itertools.count()


def _config(tmp_path, **extra):
    env = {"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8",
           "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "32", "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true"}
    cfg = {"backend_name": "kvbm", "module_path": "kvbm.sglang_integration", "class_name": "KvbmHiCacheStorage",
           "store": f"test-{next(_names)}", "env": env, **extra}
    return _sgl().HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                    is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                                    model_name="tiny", extra_config=cfg)


def _pool(layout, heads=HEADS, seed=0):
    p = HostPool(layout, size=SIZE, layers=LAYERS, heads=heads, head_dim=HD, page_size=PAGE)
    g = torch.Generator().manual_seed(seed)
    p.kv_buffer.copy_(torch.randn(p.kv_buffer.shape, generator=g).to(p.kv_buffer.dtype))
    return p


def _backend(config, pool):
    """Built the way SGLang's dynamic backend factory builds it, then given the host pool."""
    extra = config.extra_config
    cls = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    assert issubclass(cls, _sgl().HiCacheStorage)
    backend = cls(config, {})
    backend.register_mem_pool_host(pool)
    return backend


def _same_tokens(a: HostPool, ta: list[int], b: HostPool, tb: list[int]) -> bool:
    return all(torch.equal(a.token_kv(x, l, kv).view(torch.int16), b.token_kv(y, l, kv).view(torch.int16))
               for x, y in zip(ta, tb) for l in range(LAYERS) for kv in range(2))


def test_interface_is_reported():
    try:
        importlib.import_module("sglang.srt.mem_cache.hicache_storage")
        assert _sgl().INTERFACE == "sglang"
    except Exception:  # noqa: BLE001
        assert _sgl().INTERFACE.startswith("kvbm stand-ins")


def test_sglang_factory_loads_it_when_sglang_is_installed(tmp_path):
    factory = pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory")
    config = _config(tmp_path)
    backend = factory.StorageBackendFactory.create_backend("dynamic", config, _pool("layer_first"))
    assert isinstance(backend, _sgl().KvbmHiCacheStorage)


@pytest.mark.parametrize("src_layout,dst_layout", [("layer_first", "page_first"), ("page_first", "layer_first"),
                                                   ("page_first_direct", "layer_first"),
                                                   ("layer_first", "page_first_direct")])
def test_zero_copy_round_trip_across_host_layouts(tmp_path, src_layout, dst_layout):
    config = _config(tmp_path)
    src, dst = _pool(src_layout, seed=1), _pool(dst_layout, seed=2)
    writer, reader = _backend(config, src), _backend(config, dst)  # one store: the same kvbm tiers
    keys = [f"k{i}" for i in range(6)]
    src_idx = torch.arange(8, 8 + 6 * PAGE)
    assert writer.batch_set_v1(keys, src_idx) == [True] * 6
    assert reader.batch_exists(keys + ["nope", keys[0]]) == 6
    dst_idx = torch.arange(32, 32 + 6 * PAGE)
    assert reader.batch_get_v1(keys, dst_idx) == [True] * 6
    assert _same_tokens(src, src_idx.tolist(), dst, dst_idx.tolist())
    assert reader.batch_get_v1(["missing"], torch.arange(0, PAGE)) == [False]


def test_pages_spill_to_disk_and_come_back_exact(tmp_path):
    config = _config(tmp_path)
    pool = _pool("layer_first", seed=3)
    b = _backend(config, pool)
    keys = [f"p{i}" for i in range(14)]  # 8 host slots: 6 pages go down to G3
    idx = torch.arange(0, 14 * PAGE)
    assert all(b.batch_set_v1(keys, idx))
    assert b.kvbm_stats()["host_to_disk"] == 6
    out = _pool("layer_first", seed=4)
    r = _backend(config, out)
    assert all(r.batch_get_v1(keys, idx))
    assert r.kvbm_stats()["disk_hits"] == 6
    assert _same_tokens(pool, idx.tolist(), out, idx.tolist())


def test_flat_page_path(tmp_path):
    for layout in ("layer_first", "page_first"):
        pool = _pool(layout, seed=5)
        b = _backend(_config(tmp_path), pool)
        assert b.batch_set(["a", "b"], [pool.get_data_page(0), pool.get_data_page(PAGE)])
        assert b.exists("a") and not b.exists("zz")
        pages = b.batch_get(["b", "zz"], [pool.get_dummy_flat_data_page(), pool.get_dummy_flat_data_page()])
        assert pages[1] is None
        # SGLang puts a page read back with set_from_flat_data_page: it must equal what was stored.
        other = _pool(layout, seed=6)
        other.set_from_flat_data_page(2 * PAGE, pages[0])
        assert _same_tokens(pool, list(range(PAGE, 2 * PAGE)), other, list(range(2 * PAGE, 3 * PAGE)))


def test_other_layout_is_refused_by_fingerprint(tmp_path):
    config = _config(tmp_path)
    _backend(config, _pool("layer_first"))
    with pytest.raises(ValueError, match="layout fingerprint differs"):
        _backend(config, _pool("layer_first", heads=4))


def test_bad_calls_name_the_problem(tmp_path):
    b = _sgl().KvbmHiCacheStorage(_config(tmp_path), {})
    with pytest.raises(RuntimeError, match="register_mem_pool_host"):
        b.batch_exists(["a"])
    b.register_mem_pool_host(_pool("layer_first"))
    with pytest.raises(ValueError, match="host indices"):
        b.batch_set_v1(["a", "b"], torch.arange(0, PAGE))
    with pytest.raises(ValueError, match="not supported"):
        _sgl().pool_geometry(type("P", (), {"layout": "page_head", "kv_buffer": torch.zeros(1), "page_size": 4})())


def test_kvbm_keys_are_the_core_sequence_hashes():
    tokens = list(range(3 * PAGE + 1))
    keys = _sgl().kvbm_keys(tokens, PAGE)
    assert len(keys) == 3
    from kvbm import _core

    seq = _core.TokenBlockSequence(PAGE)
    seq.extend(tokens)
    assert keys == [b.sequence_hash for b in seq.blocks]


def test_layer_first_pages_share_the_vllm_block_format(tmp_path):
    """SGLang's layer_first pages and vLLM's FlashAttention/FlashInfer blocks have one format."""
    from kvbm import _core

    layers = [torch.zeros((16, 2, PAGE, HEADS, HD), dtype=torch.float16) for _ in range(LAYERS)]
    w = _core.Worker(env={"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "4"}, shared_metrics=False)
    w.register_kv_caches([t.data_ptr() for t in layers], [list(t.shape) for t in layers],
                         [list(t.stride()) for t in layers], 2, 16, PAGE,
                         element_order=_vllm_order([16, 2, PAGE, HEADS, HD], PAGE))
    g = _sgl().pool_geometry(_pool("layer_first"))
    assert g.block_format == w.block_format
    assert g.block_bytes == w.bytes_per_block


def _vllm_order(shape, page):
    from kvbm.vllm_integration.layout import element_order

    return element_order(shape, page)
