"""kvbm as an SGLang HiCache storage backend (the L3 below SGLang's host pool).

Select it through SGLang's ``dynamic`` backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvbm",
        "module_path": "kvbm.sglang_integration", "class_name": "KvbmHiCacheStorage"}'

SGLang's factory imports ``module_path``, checks that the class subclasses ``HiCacheStorage``
and calls ``KvbmHiCacheStorage(storage_config, kwargs)``; the cache controller then calls
``register_mem_pool_host(host_pool)``. Pages go into ``kvbm._core.PageConnector``
(include/kvbm/page_connector.h): the same tier chain as the vLLM and TensorRT-LLM paths (G2 host
memory, G3 disk file, G4 remote store when ``DYN_KVBM_REMOTE_URL`` is set), with its eviction
policies, write-through, G3 admission filter, promotion and metrics, all from the usual
``DYN_KVBM_*`` variables. A page is stored in kvbm's block format ``[layer][K|V][tokens, heads,
head_dim]`` with its layout fingerprint; pools of another fingerprint are refused.

Keys: SGLang hands a storage backend its own page keys (a SHA-256 chain over token ids), never
the tokens. kvbm identifies a page by XXH3-128 of its key (the block's 64-bit sequence hash and
its 64-bit block hash): a 64-bit collision is a miss, never another page's bytes. Pages are not
shared with vLLM / TensorRT-LLM instances (their keys are kvbm's sequence hashes of the tokens);
``kvbm_keys`` computes kvbm's chain for a hook that has tokens; docs/ENGINES.md explains the limit.

Extra config keys (all optional): ``store`` (name of the process-wide connector to share,
default "default"), ``env`` (a dict of DYN_KVBM_* settings instead of the environment).

Thread safety: SGLang calls from its prefetch and backup threads at once; the connector
serialises them (and releases the GIL while copying).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from kvbm import _core

try:  # the real interface when SGLang imports
    from sglang.srt.mem_cache.hicache_storage import (  # type: ignore[import-not-found]
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )

    INTERFACE = "sglang"
except Exception as _e:  # noqa: BLE001 - any failure: the stand-ins, and say why
    from kvbm.sglang_integration.interface import (
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )

    INTERFACE = f"kvbm stand-ins (sglang not importable: {type(_e).__name__}: {_e})"

__all__ = ["KvbmHiCacheStorage", "INTERFACE", "kvbm_keys", "pool_geometry", "remote_descriptor"]

logger = logging.getLogger("kvbm.sglang")

_stores_lock = threading.Lock()
_stores: dict[str, Any] = {}

# Element order inside one (page, layer, K|V) chunk of kvbm's block, for SGLang's MHA pools.
# The same order as vLLM's FlashAttention/FlashInfer tensors (kvbm's Worker.block_format).
ELEMENT_ORDER = "token,head,dim"


def kvbm_keys(token_ids: List[int], page_size: int, salt: Optional[str] = None) -> List[int]:
    """kvbm's sequence hashes of the full pages of `token_ids`: the keys vLLM and TensorRT-LLM
    instances store those pages under (for a hook that has the tokens; see docs/ENGINES.md)."""
    salt_hash = _core.compute_salt_hash(salt, None)
    return [b.sequence_hash for b in _core.hash_token_blocks(list(token_ids), page_size, salt_hash)]


@dataclass(frozen=True)
class PoolGeometry:
    """Where one page's K/V chunks live in an SGLang MHA host pool (element strides)."""

    layout: str
    layers: int
    heads: int
    head_dim: int
    page_size: int
    itemsize: int
    base: int  # kv_buffer data pointer
    stride_kv: int
    stride_token: int  # element stride between tokens
    stride_layer: int
    contiguous_page: bool  # a (layer, K|V) chunk of a page is one range

    @property
    def chunk_bytes(self) -> int:
        return self.page_size * self.heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        return self.layers * 2 * self.chunk_bytes

    @property
    def block_format(self) -> str:
        # Same string as the Worker's (src/connector/worker.cpp FormatOf): blocks are comparable.
        return (f"layers={self.layers} outer=2 page={self.page_size} inner={self.heads * self.head_dim} "
                f"dtype_bytes={self.itemsize} order={ELEMENT_ORDER}")

    def segments(self, first_tokens: np.ndarray) -> tuple[np.ndarray, int]:
        """Addresses of every page's segments in kvbm block order, and the segment size."""
        it = self.itemsize
        firsts = first_tokens.astype(np.uint64)
        l = np.arange(self.layers, dtype=np.uint64)[:, None]
        kv = np.arange(2, dtype=np.uint64)[None, :]
        chunk0 = (kv * self.stride_kv + l * self.stride_layer) * it  # [layers, 2] byte offsets
        if self.contiguous_page:
            offs = firsts[:, None, None] * np.uint64(self.stride_token * it) + chunk0[None]
            return (np.uint64(self.base) + offs).reshape(-1), self.chunk_bytes
        t = np.arange(self.page_size, dtype=np.uint64)
        offs = (firsts[:, None, None, None] + t[None, None, None, :]) * np.uint64(self.stride_token * it) \
            + chunk0[None, :, :, None]
        return (np.uint64(self.base) + offs).reshape(-1), self.heads * self.head_dim * it


def pool_geometry(pool: Any) -> PoolGeometry:
    """Reads an SGLang MHA host pool (MHATokenToKVPoolHost): layout, sizes, strides."""
    layout = getattr(pool, "layout", None)
    buf = getattr(pool, "kv_buffer", None)
    if buf is None or layout is None:
        raise ValueError("kvbm: the host pool has no kv_buffer/layout (only MHA host pools are supported; "
                         f"got {type(pool).__name__}: SGLang's hybrid SWA, Mamba and MLA host pools are refused, "
                         "their pages are not one layer-uniform block per key)")
    page = int(pool.page_size)
    s = buf.stride()
    shape = tuple(buf.shape)
    if layout == "layer_first":  # (2, layers, size, heads, head_dim)
        _, layers, _, heads, hd = shape
        return PoolGeometry(layout, layers, heads, hd, page, buf.element_size(), buf.data_ptr(), s[0], s[2], s[1],
                            s[2] == heads * hd and s[3] == hd and s[4] == 1)
    if layout == "page_first":  # (2, size, layers, heads, head_dim): tokens of a page are strided
        _, _, layers, heads, hd = shape
        if not (s[3] == hd and s[4] == 1):
            raise ValueError(f"kvbm: page_first host pool with non-dense heads (strides {s})")
        return PoolGeometry(layout, layers, heads, hd, page, buf.element_size(), buf.data_ptr(), s[0], s[1], s[2],
                            False)
    if layout == "page_first_direct":  # (2, pages, layers, page_size, heads, head_dim)
        _, _, layers, ps, heads, hd = shape
        if ps != page:
            raise ValueError(f"kvbm: page_first_direct pool page dimension {ps} != page_size {page}")
        # Token t of page p lives at p*s[1] + (t % page)*s[3]; with s[1] == layers*page*heads*hd
        # that is t*s[3] + p*(s[1] - page*s[3]); kvbm addresses pages by their first token.
        if s[1] != layers * page * heads * hd or s[3] != heads * hd:
            raise ValueError(f"kvbm: page_first_direct host pool is not dense (strides {s})")
        return PoolGeometry(layout, layers, heads, hd, page, buf.element_size(), buf.data_ptr(), s[0],
                            s[1] // page, s[2], True)
    raise ValueError(f"kvbm: SGLang host pool layout {layout!r} is not supported "
                     "(layer_first, page_first, page_first_direct)")


def remote_descriptor(config: Optional[HiCacheStorageConfig], geometry: PoolGeometry) -> str:
    """What names this rank's pages in G4: instances of the same model, tensor-parallel rank and
    page format share them, nothing else does."""
    model = getattr(config, "model_name", None) or "unknown"
    tp_rank = getattr(config, "tp_rank", 0)
    tp_size = getattr(config, "tp_size", 1)
    return f"sglang model={model} tp={tp_rank}/{tp_size} pages=[{geometry.block_format}]"


def _open_store(name: str, geometry: PoolGeometry, env: Optional[dict], descriptor: str) -> Any:
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            store = _core.PageConnector(geometry.layers, geometry.page_size, geometry.heads * geometry.head_dim,
                                        geometry.itemsize, ELEMENT_ORDER, env=env, remote_descriptor=descriptor)
            if store.block_format != geometry.block_format:  # the core's fingerprint must be this pool's
                raise ValueError(f"kvbm: page format [{store.block_format}] != pool format [{geometry.block_format}]")
            _stores[name] = store
            logger.info("kvbm store %r: %s; G2 %d blocks, G3 %d blocks of %d bytes, G4 %s", name,
                        geometry.block_format, store.host_blocks, store.disk_blocks, geometry.block_bytes,
                        "on" if store.has_remote else "off")
        elif store.block_format != geometry.block_format:
            raise ValueError(f"kvbm: layout fingerprint differs: this pool's pages are [{geometry.block_format}], "
                             f"store {name!r} holds [{store.block_format}]; refusing, they would be misread")
        return store


class KvbmHiCacheStorage(HiCacheStorage):
    """SGLang ``HiCacheStorage`` over kvbm's tier chain (G2 / G3 / G4)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        extra = dict(storage_config.extra_config or {}) if storage_config is not None else {}
        if storage_config is not None and storage_config.pp_size > 1:
            raise ValueError("kvbm: pipeline parallelism is not supported by the kvbm storage backend")
        self.config = storage_config
        self._store_name = str(extra.get("store", "default"))
        self._env = extra.get("env")
        self.store: Any = None
        self.geometry: Optional[PoolGeometry] = None
        self.mem_pool_host = (kwargs or {}).get("mem_pool_host") if isinstance(kwargs, dict) else None
        if self.mem_pool_host is not None:
            self.register_mem_pool_host(self.mem_pool_host)

    def register_mem_pool_host(self, mem_pool_host: Any):
        super().register_mem_pool_host(mem_pool_host)
        self.geometry = pool_geometry(mem_pool_host)
        self.store = _open_store(self._store_name, self.geometry, self._env,
                                 remote_descriptor(self.config, self.geometry))

    def _ready(self) -> None:
        if self.store is None:
            raise RuntimeError("kvbm: register_mem_pool_host was not called before the first transfer")

    # ---------------------------------------------------------------- zero copy (host indices)

    def _firsts(self, keys: List[str], host_indices: Any) -> np.ndarray:
        idx = np.asarray(host_indices.cpu() if hasattr(host_indices, "cpu") else host_indices, dtype=np.int64)
        page = self.geometry.page_size
        if idx.shape[0] != len(keys) * page:
            raise ValueError(f"kvbm: {len(keys)} keys need {len(keys) * page} host indices, got {idx.shape[0]}")
        firsts = idx[::page]
        if self.geometry.layout == "page_first_direct" and np.any(firsts % page):
            raise ValueError("kvbm: page_first_direct host indices must start pages")
        return firsts

    def batch_set_v1(self, keys: List[str], host_indices: Any,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        self._ready()
        if not keys:
            return []
        addrs, seg = self.geometry.segments(self._firsts(keys, host_indices))
        return list(self.store.put(list(keys), addrs, seg))

    def batch_get_v1(self, keys: List[str], host_indices: Any,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        self._ready()
        if not keys:
            return []
        addrs, seg = self.geometry.segments(self._firsts(keys, host_indices))
        return list(self.store.get(list(keys), addrs, seg))

    # ---------------------------------------------------------------- flat pages (older path)

    def _flat_to_block(self, flat: Any) -> Any:
        """SGLang's flat data page (get_data_page) -> kvbm block order [layer][K|V][tok][h][d]."""
        g = self.geometry
        if g.layout == "page_first":  # a flat page is (2, tokens, layers, heads, dim)
            t = flat.view(2, g.page_size, g.layers, g.heads, g.head_dim).permute(2, 0, 1, 3, 4)
        else:  # layer_first, page_first_direct: (2, layers, tokens, heads, dim)
            t = flat.view(2, g.layers, g.page_size, g.heads, g.head_dim).transpose(0, 1)
        return t.contiguous()

    def _block_to_flat(self, block: Any, out: Any) -> Any:
        g = self.geometry
        b = block.view(g.layers, 2, g.page_size, g.heads, g.head_dim)
        if g.layout == "page_first":
            out.view(2, g.page_size, g.layers, g.heads, g.head_dim).copy_(b.permute(1, 2, 0, 3, 4))
        else:
            out.view(2, g.layers, g.page_size, g.heads, g.head_dim).copy_(b.transpose(0, 1))
        return out

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        self._ready()
        if values is None or len(values) != len(keys):
            raise ValueError("kvbm: batch_set needs one flat data page per key")
        ok = True
        for key, value in zip(keys, values):
            block = self._flat_to_block(value)
            ok &= bool(self.store.put([key], np.array([block.data_ptr()], dtype=np.uint64),
                                      self.geometry.block_bytes)[0])
        return ok

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None):
        import torch

        self._ready()
        g = self.geometry
        out = []
        for i, key in enumerate(keys):
            block = torch.empty(g.block_bytes // g.itemsize, dtype=self.mem_pool_host.kv_buffer.dtype)
            if not self.store.get([key], np.array([block.data_ptr()], dtype=np.uint64), g.block_bytes)[0]:
                out.append(None)
                continue
            dst = target_locations[i] if target_locations is not None else torch.empty_like(block)
            out.append(self._block_to_flat(block, dst))
        return out

    # ---------------------------------------------------------------- queries

    def exists(self, key: str) -> bool:
        self._ready()
        return bool(self.store.contains(key))

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        self._ready()
        return int(self.store.prefix_hits(list(keys)))

    def clear(self) -> None:
        if self.store is not None:
            self.store.clear()

    def get_stats(self):
        return None  # SGLang's storage metrics expect its own type; kvbm's are in kvbm_stats()

    def kvbm_stats(self) -> dict:
        """The connector's and its tier chain's counters (kvbm._core.PageConnector.stats)."""
        return dict(self.store.stats()) if self.store is not None else {}

    def kvbm_metrics(self) -> dict:
        """kvbm's metrics of this store (what its Prometheus endpoint serves)."""
        return dict(self.store.metrics()) if self.store is not None else {}
