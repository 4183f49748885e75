"""vLLM KV tensor facts kvbm needs without importing vLLM."""

from __future__ import annotations


def element_order(shape: list[int], block_size: int) -> str:
    """How the elements inside one (block, layer, K|V) chunk are ordered, from a vLLM KV tensor's
    shape: FlashAttention (2, blocks, tokens, heads, dim) and FlashInfer (blocks, 2, tokens,
    heads, dim) are token-major; the CPU backend (blocks, heads, tokens, 2 * dim) is head-major
    with K and V side by side; MLA (blocks, tokens, dim). Part of kvbm's layout fingerprint."""
    if len(shape) == 5 and shape[-3] == block_size:
        return "token,head,dim"
    if len(shape) == 4 and shape[-2] == block_size:
        return "head,token,kv+dim"
    if len(shape) == 3 and shape[-2] == block_size:
        return "token,dim"
    return ""  # unknown: kvbm's fingerprint says "?"
