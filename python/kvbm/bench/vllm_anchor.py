"""vLLM's own prefix cache, timed on the same work as ``kvbm bench core``: the anchor its figures
are read against.

Everything timed here is vLLM's code, imported from the installed vLLM (nothing is re-implemented):

* :func:`match_us`: a fully hit request against a warm cache, as vLLM's scheduler handles it:
  ``FullAttentionManager.find_longest_cache_hit`` over the request's block hashes, then
  ``BlockPool.touch`` of the hit blocks (the request takes them) and ``BlockPool.free_blocks``
  (the request finishes, tail first). The cache holds the chain cached-and-free (reference count 0,
  still matchable), the state kvbm's ``match_8192_blocks_us`` is measured in.
* :func:`hash_us`: the request block hasher the engine core builds
  (``get_request_block_hasher`` with the hash function of vLLM's default
  ``prefix_caching_hash_algo``), which fills ``Request.block_hashes``.

Both use kvbm's bench tokens: ``tokens[i] = (i * 2654435761) % 152064`` (src/tools/core_bench.cpp).

Importing this module never imports vLLM; the functions do, and raise :class:`VllmUnavailable`
naming what is missing when they cannot.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from types import SimpleNamespace

# Same token sequence as MakeTokens in src/tools/core_bench.cpp (a 152,064-entry vocabulary).
_TOKEN_MULTIPLIER = 2654435761
_VOCAB = 152064


class VllmUnavailable(ImportError):
    """vLLM (or the part of it the anchor drives) cannot be imported."""


def bench_tokens(n: int) -> list[int]:
    """kvbm's bench token sequence, ``tokens[i] = (i * 2654435761) % 152064`` (fits a uint32)."""
    return [(i * _TOKEN_MULTIPLIER) % _VOCAB for i in range(n)]


def _vllm() -> SimpleNamespace:
    """vLLM's prefix-cache pieces, or VllmUnavailable naming the module that failed and why."""
    from kvbm.testing.tiny_model import prepare_cpu_environment

    prepare_cpu_environment()
    module = "vllm"
    try:
        import vllm

        module = "vllm.v1.core.block_pool"
        from vllm.v1.core.block_pool import BlockPool

        module = "vllm.v1.core.single_type_kv_cache_manager"
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

        module = "vllm.v1.core.kv_cache_utils"
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        module = "vllm.v1.kv_cache_interface"
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        module = "vllm.v1.request"
        from vllm.v1.request import Request

        module = "vllm.sampling_params"
        from vllm.sampling_params import SamplingParams

        module = "vllm.utils.hashing"
        from vllm.utils.hashing import get_hash_fn_by_name

        module = "vllm.config"
        from vllm.config import CacheConfig

        module = "torch"
        import torch
    except Exception as e:  # noqa: BLE001 - any failure means the anchor cannot run; say which
        raise VllmUnavailable(
            f"vLLM's prefix cache is not importable ({module}: {type(e).__name__}: {e}); "
            "install vLLM with scripts/install_vllm.sh"
        ) from e

    defaults = {f.name: f.default for f in dataclasses.fields(CacheConfig)}
    hash_algo = defaults.get("prefix_caching_hash_algo")
    if not isinstance(hash_algo, str):
        raise VllmUnavailable(
            f"vLLM {vllm.__version__}: CacheConfig has no default prefix_caching_hash_algo; "
            "this anchor needs a vLLM with v1 prefix caching"
        )
    return SimpleNamespace(
        version=vllm.__version__,
        BlockPool=BlockPool,
        FullAttentionManager=FullAttentionManager,
        FullAttentionSpec=FullAttentionSpec,
        Request=Request,
        SamplingParams=SamplingParams,
        get_request_block_hasher=get_request_block_hasher,
        init_none_hash=init_none_hash,
        get_hash_fn_by_name=get_hash_fn_by_name,
        hash_algo=hash_algo,
        torch=torch,
    )


def version() -> str:
    """The installed vLLM's version; VllmUnavailable when it cannot be imported."""
    return _vllm().version


def hash_algo() -> str:
    """vLLM's default ``prefix_caching_hash_algo`` (what :func:`hash_us` times)."""
    return _vllm().hash_algo


def _check_sizes(num_blocks: int, block_size: int, passes: int) -> None:
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("passes", passes)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"vLLM anchor: {name} must be a positive integer, got {value!r}")


def _hasher(v: SimpleNamespace, block_size: int):
    """The request block hasher vLLM's engine core builds when prefix caching is on."""
    hash_fn = v.get_hash_fn_by_name(v.hash_algo)
    v.init_none_hash(hash_fn)
    return v.get_request_block_hasher(block_size, hash_fn)


def _request(v: SimpleNamespace, tokens: list[int], block_hasher=None):
    return v.Request(
        request_id="kvbm-bench",
        prompt_token_ids=tokens,
        sampling_params=v.SamplingParams(max_tokens=1),
        pooling_params=None,
        block_hasher=block_hasher,
    )


def _timed(passes: int, body) -> list[float]:
    """Wall time of each of ``passes`` calls of ``body()``, in µs.

    Before the passes the heap is collected and frozen (``gc.freeze``), as vLLM's engine core
    does once it has started, so set-up garbage is not collected inside a timed window while
    the collections the timed code itself causes still count. Unfrozen afterwards.
    """
    micros = []
    gc.collect()
    gc.freeze()
    try:
        for _ in range(passes):
            start = time.perf_counter()
            body()
            micros.append((time.perf_counter() - start) * 1e6)
    finally:
        gc.unfreeze()
    return micros


def match_us(num_blocks: int = 8192, block_size: int = 16, passes: int = 15) -> tuple[float, int, float]:
    """vLLM's prefix-cache hit of a ``num_blocks`` chain: median µs, blocks hit per pass, and
    the fastest pass in µs.

    Builds a ``BlockPool`` of ``num_blocks + 1`` blocks (block 0 is vLLM's null block) with
    prefix caching on, caches the chain with ``cache_full_blocks`` under the hashes vLLM's own
    hasher gives kvbm's bench tokens, and frees it, so every block is cached and free. Each pass
    times ``find_longest_cache_hit`` (max length: the whole chain) + ``touch`` + ``free_blocks``.
    Raises RuntimeError if a pass hits fewer than ``num_blocks`` blocks or the pool does not get
    every block back.
    """
    _check_sizes(num_blocks, block_size, passes)
    v = _vllm()
    tokens = bench_tokens(num_blocks * block_size)
    request = _request(v, tokens, _hasher(v, block_size))
    block_hashes = request.block_hashes
    if len(block_hashes) != num_blocks:
        raise RuntimeError(f"vLLM anchor: vLLM hashed {len(block_hashes)} blocks, expected {num_blocks}")

    pool = v.BlockPool(num_blocks + 1, enable_caching=True, hash_block_size=block_size)
    spec = v.FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=v.torch.float32)
    group_ids = [0]
    blocks = pool.get_new_blocks(num_blocks)
    pool.cache_full_blocks(request, blocks, 0, num_blocks, block_size, group_ids[0])
    pool.free_blocks(reversed(blocks))  # the request finishes: cached, free, matchable
    del blocks
    if pool.get_num_free_blocks() != num_blocks:
        raise RuntimeError(f"vLLM anchor: {pool.get_num_free_blocks()} of {num_blocks} blocks free after caching")

    hits: list[int] = []
    manager = v.FullAttentionManager
    max_length = num_blocks * block_size

    def one_request() -> None:
        computed, _ = manager.find_longest_cache_hit(
            block_hashes=block_hashes,
            max_length=max_length,
            kv_cache_group_ids=group_ids,
            block_pool=pool,
            kv_cache_spec=spec,
            drop_eagle_block=False,
            alignment_tokens=block_size,
        )
        hit = computed[0]
        pool.touch(hit)  # the request takes the hit blocks
        pool.free_blocks(reversed(hit))  # and finishes: freed tail first, as vLLM does
        hits.append(len(hit))

    micros = _timed(passes, one_request)
    short = [h for h in hits if h != num_blocks]
    if short:
        raise RuntimeError(f"vLLM anchor: a pass hit {short[0]} of {num_blocks} cached blocks")
    if pool.get_num_free_blocks() != num_blocks:
        raise RuntimeError(f"vLLM anchor: {pool.get_num_free_blocks()} of {num_blocks} blocks free after the passes")
    return statistics.median(micros), hits[0], min(micros)


def hash_us(num_tokens: int = 131072, block_size: int = 16, passes: int = 15) -> tuple[float, float]:
    """vLLM's block hashing of ``num_tokens`` bench tokens: median µs per request, and the
    fastest pass in µs.

    Times the request block hasher the engine core gives every ``Request`` (vLLM's default
    hash function) on a request with no hashes yet: what fills ``request.block_hashes``.
    Raises RuntimeError if it returns the wrong number of hashes.
    """
    _check_sizes(num_tokens, block_size, passes)
    v = _vllm()
    hasher = _hasher(v, block_size)
    request = _request(v, bench_tokens(num_tokens))  # no hasher: block_hashes stays empty
    expected = num_tokens // block_size
    counts: list[int] = []

    def one_request() -> None:
        counts.append(len(hasher(request)))

    micros = _timed(passes, one_request)
    wrong = [c for c in counts if c != expected]
    if wrong:
        raise RuntimeError(f"vLLM anchor: vLLM's hasher returned {wrong[0]} hashes, expected {expected}")
    return statistics.median(micros), min(micros)
