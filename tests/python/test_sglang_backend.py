"""kvbm as an SGLang HiCache storage backend (kvbm.sglang_integration.KvbmHiCacheStorage).

SGLang's server needs CUDA; what runs here is its storage interface: the backend subclasses
SGLang's real ``HiCacheStorage`` when ``sglang.srt.mem_cache.hicache_storage`` imports (the
PyPI wheel, see docs/ENGINES.md) and kvbm's stand-ins of the same names otherwise
(``kvbm.sglang_integration.INTERFACE`` says which). Host pools are CPU tensors in SGLang's MHA
host pool layouts (kvbm.testing.sglang_pool); the store is kvbm's real tier chain (the
PageConnector: the same pools, policies, worker and metrics as the vLLM path, a real G3 file)."""

from __future__ import annotations

import importlib
import itertools
import os

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


def _config(tmp_path, env_extra=None, **extra):
    env = {"DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8",
           "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "32", "DYN_KVBM_DISK_DISABLE_O_DIRECT": "true"}
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
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
    # Write-through with the admission filter off: every page goes G2 and G3; G2 keeps the
    # last 8 (its policy evicts the rest) and the first 6 come back from the G3 file.
    config = _config(tmp_path, {"DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true"})
    pool = _pool("layer_first", seed=3)
    b = _backend(config, pool)
    keys = [f"p{i}" for i in range(14)]
    idx = torch.arange(0, 14 * PAGE)
    assert all(b.batch_set_v1(keys, idx))
    st = b.kvbm_stats()
    assert (st["store_host_blocks"], st["offload_disk_blocks"]) == (14, 14)
    assert b.store.pool_stats("host")["registered"] == 8
    out = _pool("layer_first", seed=4)
    r = _backend(config, out)
    assert all(r.batch_get_v1(keys, idx))
    st = r.kvbm_stats()
    assert (st["onboard_host_blocks"], st["onboard_disk_blocks"]) == (8, 6)
    assert _same_tokens(pool, idx.tolist(), out, idx.tolist())


def test_an_sglang_put_shows_in_the_chain_stats_and_metrics(tmp_path):
    """The SGLang path is the tier chain's: its stores, loads and hit rates are counted where
    the vLLM path's are (chain stats, transfer metrics, the Prometheus text)."""
    b = _backend(_config(tmp_path), _pool("page_first", seed=7))
    keys = ["m0", "m1", "m2"]
    idx = torch.arange(0, 3 * PAGE)
    before = b.kvbm_metrics()
    assert b.batch_set_v1(keys, idx) == [True] * 3
    st, m = b.kvbm_stats(), b.kvbm_metrics()
    assert st["store_host_blocks"] == 3 and st["dropped_filter"] == 3  # first sight: G2 only
    assert m["blocks_d2h"] - before["blocks_d2h"] == 3
    assert m["bytes_d2h"] - before["bytes_d2h"] == 3 * b.geometry.block_bytes
    assert m["pool_used_host"] == 3
    assert b.batch_exists(keys + ["absent"]) == 3
    assert b.batch_get_v1(keys, torch.arange(16, 16 + 3 * PAGE)) == [True] * 3
    m = b.kvbm_metrics()
    assert m["blocks_h2d"] - before["blocks_h2d"] == 3  # G2 -> G1 (here: SGLang's host pool)
    assert m["matched_tokens"] - before["matched_tokens"] == 3 * PAGE
    assert m["host_hit_rate"] > 0
    assert b.kvbm_stats()["onboard_host_blocks"] == 3
    text = b.store.prometheus_text()
    assert f"kvbm_offload_blocks_d2h {m['blocks_d2h']}" in text
    assert f"kvbm_onboard_blocks_h2d {m['blocks_h2d']}" in text
    # A repeat sight (the G2 hits above) admitted them to G3: the chain's filter, not a second policy.
    assert b.kvbm_stats()["offload_disk_blocks"] == 3


@pytest.mark.parametrize("policy,held", [("lru", ["c", "d", "e"]), ("leaf-first", ["c", "d", "e"]),
                                         ("reuse", ["a", "d", "e"])])
def test_eviction_follows_the_configured_policy(tmp_path, policy, held):
    """G2 of 3 pages, no G3; a is read back twice. lru (and leaf-first: every page is a leaf)
    evict the least recently used: b for d, then a for e. reuse predicts a's next use from its
    regular reuse and evicts the pages never reused (b, c) first. (The C++ test
    PageConnector.EvictionFollowsTheConfiguredPolicy checks each policy against a bare pool.)"""
    config = _config(tmp_path, {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "3",
                                "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": None,
                                "DYN_KVBM_HOST_EVICTION_POLICY": policy})
    b = _backend(config, _pool("layer_first", seed=8))
    assert b.store.host_blocks == 3 and b.store.disk_blocks == 0
    page = torch.arange(0, PAGE)
    for put, key in [(True, "a"), (False, "a"), (True, "b"), (False, "a"), (True, "c"), (True, "d"), (True, "e")]:
        assert (b.batch_set_v1 if put else b.batch_get_v1)([key], page) == [True]
    assert [k for k in "abcde" if b.exists(k)] == held


def _open_kvbm_disk_file(disk_dir: str) -> int:
    """An fd of kvbm's (unlinked, still open) G3 file under `disk_dir`, found through /proc."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.join(disk_dir, "dynamo-kvbm-disk-cache-")):
            return os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    raise AssertionError(f"no open kvbm disk file under {disk_dir}")


def test_a_corrupted_disk_page_is_a_miss(tmp_path):
    """G3 only: pages go straight to the file. Overwritten behind kvbm's back, each fails its
    checksum on the way up: batch_get says False, the host pool is not written, and the page is
    invalidated in the chain (a miss from then on), as on the vLLM path."""
    disk_dir = tmp_path / "g3"
    disk_dir.mkdir()
    config = _config(tmp_path, {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": None,
                                "DYN_KVBM_DISK_CACHE_DIR": str(disk_dir)})
    src = _pool("layer_first", seed=9)
    b = _backend(config, src)
    keys = ["c0", "c1"]
    assert b.batch_set_v1(keys, torch.arange(0, 2 * PAGE)) == [True, True]
    assert b.kvbm_stats()["store_disk_blocks"] == 2
    fd = _open_kvbm_disk_file(str(disk_dir))
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.pwrite(fd, b"\x5a" * size, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = src.kv_buffer.clone()
    assert b.batch_get_v1(keys, torch.arange(32, 32 + 2 * PAGE)) == [False, False]
    assert torch.equal(src.kv_buffer, before)  # nothing scattered into the host pool
    st, m = b.kvbm_stats(), b.kvbm_metrics()
    assert st["load_errors"] == 2 and st["get_failed"] == 2
    assert m["corrupt_blocks"] == 2
    assert b.batch_exists(keys) == 0 and not b.exists("c0")


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
