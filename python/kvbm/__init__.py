"""kvbm: a tiered KV-cache block manager for LLM inference.

The native core lives in ``kvbm._core`` (C++, nanobind); this package re-exports it and adds
the errors (:mod:`kvbm.errors`), the ``kvbm`` command line (:mod:`kvbm.cli`) and the engine
integrations (``kvbm.vllm_integration``, ...).
"""

from kvbm import errors
from kvbm._core import (
    DEFAULT_SALT_HASH,
    BlockPool,
    BlockRegistry,
    FullyContiguousLayout,
    ImmutableBlock,
    KvbmConfig,
    KvEvent,
    LayerSeparateLayout,
    Layout,
    LayoutDims,
    MutableBlock,
    Tier,
    TokenBlock,
    TokenBlockSequence,
    __version__,
    chain_sequence_hash,
    compute_block_hash,
    compute_salt_hash,
    hash_token_blocks,
    layout_from_tensor_shapes,
    salt_json,
)
from kvbm.errors import *  # noqa: F401,F403 - the exception classes are part of the API

__all__ = [
    "DEFAULT_SALT_HASH",
    "BlockPool",
    "BlockRegistry",
    "FullyContiguousLayout",
    "ImmutableBlock",
    "KvbmConfig",
    "KvEvent",
    "LayerSeparateLayout",
    "Layout",
    "LayoutDims",
    "MutableBlock",
    "Tier",
    "TokenBlock",
    "TokenBlockSequence",
    "__version__",
    "chain_sequence_hash",
    "compute_block_hash",
    "compute_salt_hash",
    "errors",
    "hash_token_blocks",
    "layout_from_tensor_shapes",
    "salt_json",
    *errors.__all__,
]
