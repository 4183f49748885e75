"""Block pools, the registry, layouts, configuration and error mapping through Python."""

from __future__ import annotations

import builtins
import gc
import subprocess
import sys
import threading

import pytest

import kvbm
from kvbm import _core, errors
from kvbm.errors import (
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    InvariantError,
    KvbmError,
    ResourceExhaustedError,
)

SALT = kvbm.DEFAULT_SALT_HASH


def chain(n: int, start: int = 0, block_size: int = 4):
    return kvbm.hash_token_blocks(list(range(start, start + n * block_size)), block_size, SALT)


def store(pool, blocks, priority: int = 0):
    handles = []
    for m, tb in zip(pool.allocate(len(blocks)), blocks):
        m.complete(tb.sequence_hash, tb.block_hash, tb.parent, priority=priority)
        handles.append(pool.register(m))
    return handles


# --- allocation -------------------------------------------------------------------------------


def test_allocate_is_all_or_nothing():
    pool = kvbm.BlockPool.create(kvbm.Tier.HOST, 4)
    held = pool.allocate(3)
    with pytest.raises(ResourceExhaustedError) as e:
        pool.allocate(2)
    assert e.value.code == "ResourceExhausted"
    assert "2 blocks requested" in str(e.value)
    assert pool.stats()["free"] == 1 and pool.stats()["active"] == 3  # nothing taken by the failure
    assert len(pool.allocate(1)) == 1
    del held
    assert pool.stats()["free"] == 4


def test_free_blocks_are_used_before_any_eviction():
    pool = kvbm.BlockPool.create("host", 4)
    del store(pool, chain(2))[:]
    assert pool.stats() == {"num_blocks": 4, "free": 2, "inactive": 2, "evictable": 1, "active": 0, "registered": 2, "evictions": 0}
    blocks = pool.allocate(2)
    assert pool.stats()["evictions"] == 0 and pool.count_prefix(chain(2)) == 2
    del blocks
    blocks = pool.allocate(3)
    assert pool.stats()["evictions"] == 1


def test_mutable_block_lifecycle_and_release():
    pool = kvbm.BlockPool.create(2, 2)
    (m,) = pool.allocate(1)
    assert m.valid and m.state == "reset" and m.tier == kvbm.Tier.HOST
    m.mark_partial()
    assert m.state == "partial"
    tb = chain(1)[0]
    m.complete(tb, tokens=[0, 1, 2, 3])
    assert m.state == "complete"
    imm = pool.register(m)
    assert not m.valid  # consumed by register
    assert (imm.sequence_hash, imm.block_hash, imm.parent) == tb.key
    assert imm.key == tb.key and imm.valid
    with imm:
        assert pool.stats()["active"] == 1
    assert not imm.valid and pool.stats()["inactive"] == 1
    (m2,) = pool.allocate(1)
    m2.release()
    assert not m2.valid and pool.stats()["free"] == 2 - 1


def test_register_requires_complete_and_rejects_collisions():
    pool = kvbm.BlockPool.create("G2", 4)
    (m,) = pool.allocate(1)
    with pytest.raises(FailedPreconditionError):
        pool.register(m)
    assert m.valid  # a failed register leaves the handle with the caller
    m.complete(100, 1, None)
    first = pool.register(m)
    (dup,) = pool.allocate(1)
    dup.complete(100, 1, None)
    again = pool.register(dup)
    assert again.id == first.id  # the existing block wins, no duplicate
    (other,) = pool.allocate(1)
    other.complete(100, 2, None)  # same sequence hash, other content: a collision
    with pytest.raises(FailedPreconditionError, match="collision"):
        pool.register(other)
    assert pool.stats()["registered"] == 1


def test_match_prefix_pins_and_stops_at_a_break():
    pool = kvbm.BlockPool.create("host", 8)
    blocks = chain(4)
    del store(pool, blocks)[:]
    assert pool.count_prefix(blocks) == 4
    hit = pool.match_prefix(blocks)
    assert [h.sequence_hash for h in hit] == [b.sequence_hash for b in blocks]
    assert pool.stats()["active"] == 4 and pool.stats()["inactive"] == 0
    del hit
    assert pool.stats()["inactive"] == 4
    # Keys as tuples; a changed block breaks the chain there.
    keys = [b.key for b in blocks]
    keys[2] = (keys[2][0], keys[2][1] ^ 1, keys[2][2])
    assert len(pool.match_prefix(keys)) == 2
    assert pool.match_prefix([]) == []
    assert pool.contains(blocks[3]) and not pool.contains(keys[2])
    with pytest.raises(TypeError):
        pool.match_prefix([("not", "a", "key")])


def test_handles_outliving_their_pool_are_harmless():
    pool = kvbm.BlockPool.create("host", 2)
    held = store(pool, chain(1))
    (m,) = pool.allocate(1)
    del pool
    gc.collect()
    assert not held[0].valid and not m.valid
    del held, m  # releasing must not crash


def test_reset_refuses_while_held():
    pool = kvbm.BlockPool.create("host", 4)
    held = store(pool, chain(2))
    with pytest.raises(FailedPreconditionError):
        pool.reset()
    del held
    pool.reset()
    assert pool.stats()["registered"] == 0 and pool.stats()["free"] == 4


# --- eviction order -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["leaf-first", "lru"])
def test_leaf_first_keeps_prefixes_that_lru_breaks(policy):
    # A chain a0 <- a1 <- a2, returned leaf first; then a2 is touched (most recent). LRU now
    # evicts a1, which orphans a2 (never matchable again without a1); leaf-first evicts a2.
    pool = kvbm.BlockPool.create("host", 3, policy)
    assert pool.policy == policy
    a = chain(3)
    del store(pool, a)[:]
    pool.touch([a[2].sequence_hash])
    order = pool.eviction_order()
    if policy == "leaf-first":
        assert order[0] == a[2].sequence_hash
    else:
        assert order == [a[1].sequence_hash, a[0].sequence_hash, a[2].sequence_hash]
    assert pool.child_count(a[0].sequence_hash) == 1
    del pool.allocate(1)[:]
    assert pool.stats()["evictions"] == 1
    expected_prefix = 2 if policy == "leaf-first" else 1
    assert pool.count_prefix(a) == expected_prefix


def test_lowest_priority_is_evicted_first():
    pool = kvbm.BlockPool.create("host", 2, "lru")
    (low,) = store(pool, chain(1, start=0), priority=10)
    (high,) = store(pool, chain(1, start=100), priority=90)
    del high  # returned first: LRU alone would evict it first
    del low
    assert pool.eviction_order()[0] == chain(1, start=0)[0].sequence_hash


def test_unknown_policy_and_tier_are_invalid_arguments():
    with pytest.raises(InvalidArgumentError) as e:
        kvbm.BlockPool.create("host", 4, "mru")
    assert isinstance(e.value, ValueError) and "mru" in str(e.value)
    with pytest.raises(InvalidArgumentError):
        kvbm.BlockPool.create("G7", 4)
    with pytest.raises(InvalidArgumentError):
        kvbm.BlockPool.create(9, 4)


def test_bad_pool_size_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        kvbm.BlockPool.create("host", 0)
    assert isinstance(e.value, ValueError) and "num_blocks" in str(e.value)


# --- registry and events -----------------------------------------------------------------------


def test_registry_emits_once_across_tiers():
    events = []
    registry = kvbm.BlockRegistry()
    registry.add_sink(events.append)
    host = kvbm.BlockPool.create("host", 2, registry=registry)
    disk = kvbm.BlockPool.create("disk", 2, registry=registry)
    tb = chain(1)[0]
    with host.allocate(1)[0] as m:
        m.complete(tb, tokens=[0, 1, 2, 3])
        h1 = host.register(m)
    d1 = store(disk, [tb])
    assert [(e.kind, e.tier, e.sequence_hash, e.tokens) for e in events] == [
        ("stored", kvbm.Tier.HOST, tb.sequence_hash, [0, 1, 2, 3])
    ]
    assert registry.tiers_holding(tb.sequence_hash) == (1 << 2) | (1 << 3)
    assert len(registry) == 1
    del h1, d1
    host.reset()
    assert len(events) == 1  # still on disk
    disk.reset()
    assert [e.kind for e in events] == ["stored", "removed"]
    assert events[1].tier == kvbm.Tier.DISK and events[1].event_id == events[0].event_id + 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_sink_does_not_fail_the_pool():
    registry = kvbm.BlockRegistry()
    seen = []

    def bad(event):
        seen.append(event.kind)
        raise RuntimeError("sink broke")

    registry.add_sink(bad)
    pool = kvbm.BlockPool.create("host", 2, registry=registry)
    held = store(pool, chain(1))
    assert seen == ["stored"] and held[0].valid


_GIL_PROBE = """
import threading, kvbm
registry = kvbm.BlockRegistry()
count = [0]
registry.add_sink(lambda e: count.__setitem__(0, count[0] + 1))
pool = kvbm.BlockPool.create("host", 10000, registry=registry)
shared = kvbm.hash_token_blocks(list(range(4 * 2000)), 4, 1)
for m, tb in zip(pool.allocate(len(shared)), shared):
    m.complete(tb)
    pool.register(m)
stop = [False]
def writer():  # registers (fires the sink, which takes the GIL) with the pool's mutex held
    i = 0
    while not stop[0]:
        for m, tb in zip(pool.allocate(2), kvbm.hash_token_blocks(list(range(10**6 + i * 8, 10**6 + i * 8 + 8)), 4, 1)):
            m.complete(tb)
            pool.register(m)
        i += 1
t = threading.Thread(target=writer)
t.start()
for _ in range(30):
    held = pool.match_prefix(shared)
    del held  # 2000 handle drops from the thread that holds the GIL
stop[0] = True
t.join()
print("finished", count[0])
"""


def test_sink_on_another_thread_does_not_deadlock_handle_drops():
    # A thread that registers holds the pool's mutex while its sink waits for the GIL; the main
    # thread drops handles while holding the GIL. Dropping a handle must release the GIL before
    # it takes the mutex, or the two wait on each other forever. Run in a subprocess so that a
    # deadlock fails this test instead of hanging the suite.
    try:
        r = subprocess.run([sys.executable, "-c", _GIL_PROBE], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: dropping handles while a sink waits for the GIL")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("finished") and int(r.stdout.split()[1]) > 2000


def test_pool_calls_from_many_python_threads():
    registry = kvbm.BlockRegistry()
    count = [0]
    lock = threading.Lock()

    def sink(_event):
        with lock:
            count[0] += 1

    registry.add_sink(sink)
    pools = [kvbm.BlockPool.create("host", 64, registry=registry) for _ in range(2)]
    errors_seen = []

    def worker(i: int):
        try:
            pool = pools[i % 2]
            for j in range(300):
                blocks = chain(2, start=(i * 1000 + j) * 8)
                held = store(pool, blocks)
                assert len(pool.match_prefix(blocks)) == 2
                del held
        except Exception as e:  # noqa: BLE001
            errors_seen.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a pool thread did not finish"
    assert errors_seen == []
    assert count[0] >= 4 * 300 * 2  # every new hash was stored once


# --- layouts -----------------------------------------------------------------------------------


def test_fully_contiguous_layout():
    dims = kvbm.LayoutDims(num_blocks=4, num_layers=2, outer_dim=2, page_size=16, inner_dim=64, dtype_bytes=2)
    assert dims.chunk_bytes == 16 * 64 * 2 and dims.block_bytes == 2 * 2 * dims.chunk_bytes
    layout = kvbm.FullyContiguousLayout(dims, block_alignment=4096)
    assert layout.kind == "fully-contiguous" and layout.num_allocations == 1
    assert layout.block_stride % 4096 == 0 and layout.block_stride >= dims.block_bytes
    assert layout.chunk(0, 0, 0) == (0, 0, dims.chunk_bytes)
    assert layout.chunk(1, 1, 1) == (0, layout.block_stride + 3 * dims.chunk_bytes, dims.chunk_bytes)
    with pytest.raises(InvariantError) as e:
        layout.chunk(4, 0, 0)
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(ConfigError):
        kvbm.FullyContiguousLayout(kvbm.LayoutDims(num_blocks=1))


def test_layout_from_engine_tensor_shapes():
    shape = [2, 10, 16, 4, 64]  # FlashAttention: (2, num_blocks, block_size, heads, head_size)
    strides = [10 * 16 * 4 * 64, 16 * 4 * 64, 4 * 64, 64, 1]
    layout = kvbm.layout_from_tensor_shapes([(shape, strides, 2)] * 3, 10, 16)
    assert isinstance(layout, kvbm.LayerSeparateLayout) and layout.outer_first
    assert layout.num_allocations == 3 and layout.dims.inner_dim == 256
    chunk = 16 * 256 * 2
    assert layout.chunk(3, 2, 1) == (2, 10 * chunk + 3 * chunk, chunk)
    with pytest.raises(InvalidArgumentError, match="num_blocks=11"):
        kvbm.layout_from_tensor_shapes([(shape, strides, 2)], 11, 16)


# --- configuration -----------------------------------------------------------------------------


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "4")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "1000")
    monkeypatch.setenv("DYN_KVBM_DISK_ALLOCATOR_TYPE", "open-direct")
    c = kvbm.KvbmConfig.from_environment()
    assert c.cpu_cache_gb == 4.0 and c.disk_cache_num_blocks == 1000 and c.disk_allocator == "open-direct"
    assert c.host_blocks(1_000_000) == 4000
    assert c.leader_zmq_pub_port == 56001 and c.disk_cache_dir == "/tmp/"
    c.validate()


def test_config_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("DYN_KVBM_MAX_CONCURRENT_TRANSFERS", "lots")
    with pytest.raises(ConfigError, match="DYN_KVBM_MAX_CONCURRENT_TRANSFERS") as e:
        kvbm.KvbmConfig.from_environment()
    assert isinstance(e.value, ValueError) and e.value.code == "Config"
    with pytest.raises(ConfigError):
        kvbm.KvbmConfig.from_map({}).validate()  # no tier below G1 sized


# --- error mapping -----------------------------------------------------------------------------

CODES = {
    "InvalidArgument": (errors.InvalidArgumentError, ValueError),
    "NotFound": (errors.NotFoundError, KeyError),
    "ResourceExhausted": (errors.ResourceExhaustedError, None),
    "IoError": (errors.IoError, OSError),
    "Corrupt": (errors.CorruptError, None),
    "Timeout": (errors.TimeoutError, builtins.TimeoutError),
    "Unavailable": (errors.UnavailableError, None),
    "Cancelled": (errors.CancelledError, None),
    "FailedPrecondition": (errors.FailedPreconditionError, None),
    "Internal": (errors.InternalError, None),
    "Config": (errors.ConfigError, ValueError),
    "Invariant": (errors.InvariantError, RuntimeError),
}


@pytest.mark.parametrize("code", sorted(CODES))
def test_each_error_code_raises_its_class(code):
    cls, builtin = CODES[code]
    with pytest.raises(cls) as e:
        _core._raise_error(code, f"message for {code}")
    assert type(e.value) is cls and isinstance(e.value, KvbmError)
    if builtin is not None:
        assert isinstance(e.value, builtin)
    assert e.value.code == code == cls.code
    assert str(e.value) == f"message for {code}"
    if code not in ("Config", "Invariant"):
        assert _core.error_class_name(code) == cls.__name__


def test_bench_core_runs_natively():
    r = _core.bench_core(num_tokens=4096, passes=3, pool_cycles=200, match_blocks=128)
    assert (r["blocks_matched"], r["blocks_stored"], r["blocks_loaded"]) == (128, 128, 127)
    for k in ("hash_tokens_per_s", "hash_request_us", "pool_cycles_per_s", "match_8192_blocks_us",
              "leader_request_miss_us", "leader_request_hit_us"):
        assert r[k] > 0, k
    assert r["options"]["match_blocks"] == 128
