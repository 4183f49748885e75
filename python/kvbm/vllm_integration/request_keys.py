"""What besides its tokens shapes a vLLM request's KV, as kvbm keys it.

vLLM's own prefix cache keys a block on its tokens and on its extra keys
(``vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys``): the LoRA adapter, every
multimodal item whose placeholders overlap the block (its identifier and its offset in the
block), the cache salt and the block's slice of prompt embeddings. Two requests with the same
text and different images have the same token ids (an image is one placeholder token
repeated), and so do two embedding prompts of the same length (their token ids are all 0), so
a key of tokens alone would serve one request the other's KV.

kvbm folds the same inputs into its sequence hashes (``kvbm._core.BlockExtraKeys``, described
in include/kvbm/tokens.h): salt and LoRA name through the salt hash, as the reference does;
each multimodal item's identifier at full width and its offset; a 128-bit digest of each
block's embedding rows (and of the mixed-prompt mask that says which positions are token
ids). A text-only request has none, and hashes exactly as the reference does.

A request with an input kvbm cannot key is *bypassed*: neither matched nor stored, counted in
``kvbm_bypassed_requests{reason}`` and logged once per reason. It is never served from a key
that ignores an input. The guard against inputs vLLM adds later: vLLM's own extra keys of the
request's first block are computed and every kind in them must be one kvbm keys.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm import _core

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.kvbm")

# Kinds of vLLM's block-hash extra keys that kvbm keys (kv_cache_utils.generate_block_hash_extra_keys).
KNOWN_EXTRA_KEY_KINDS = frozenset({"lora", "mm", "cache_salt", "prompt_embeds"})

BYPASS_MULTIMODAL = "multimodal"
BYPASS_PROMPT_EMBEDS = "prompt_embeds"
BYPASS_UNKNOWN_INPUT = "unknown_input"

_logged_lock = threading.Lock()
_logged: set[str] = set()


def log_bypass_once(reason: str, detail: str) -> None:
    """One warning per reason per process: a bypassed request is served right, only uncached."""
    with _logged_lock:
        if reason in _logged:
            return
        _logged.add(reason)
    logger.warning("kvbm: a request is neither matched nor stored (%s: %s); it is computed by the engine as "
                   "without kvbm. Counted in kvbm_bypassed_requests{reason=\"%s\"}; logged once per reason.",
                   reason, detail, reason)


@dataclass
class RequestKeys:
    """A request's extra keys (None: it has none, a text request), or why it cannot be keyed."""

    extra: Any = None  # kvbm._core.BlockExtraKeys | None
    bypass: str | None = None
    detail: str = ""


def _multimodal_items(mm_features, num_tokens: int) -> tuple[list[tuple[str, int, int]] | None, str]:
    items = []
    for i, f in enumerate(mm_features):
        ident = getattr(f, "identifier", None)
        pos = getattr(f, "mm_position", None)
        if not isinstance(ident, str) or not ident:
            return None, f"multimodal item {i} has no identifier"
        offset, length = getattr(pos, "offset", None), getattr(pos, "length", None)
        if not isinstance(offset, int) or not isinstance(length, int) or length <= 0 or offset < 0 \
                or offset + length > num_tokens:
            return None, f"multimodal item {i} has placeholder range ({offset}, {length}) in a {num_tokens}-token prompt"
        items.append((ident, offset, length))
    return items, ""


def _embeds_bytes(embeds, num_tokens: int):
    """The embeddings as one contiguous uint8 CPU tensor and the bytes of one row, or a reason."""
    import torch

    if not isinstance(embeds, torch.Tensor):
        return None, 0, f"prompt embeddings of type {type(embeds).__name__}"
    t = embeds.detach()
    if t.dim() != 2 or t.shape[0] != num_tokens or t.shape[1] == 0:
        return None, 0, f"prompt embeddings of shape {tuple(t.shape)} for {num_tokens} prompt tokens"
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    row_bytes = int(t.shape[1]) * t.element_size()
    # The raw bytes, as vLLM's own digest takes them: the same values in another dtype are
    # other KV (the model runs on what it was given).
    return t.view(torch.uint8).reshape(-1), row_bytes, ""


def _unknown_kinds(request: "Request", block_size: int) -> set[str]:
    """Kinds in vLLM's extra keys of the first block that kvbm does not key (empty: none)."""
    try:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
    except ImportError:  # pragma: no cover - a vLLM without it has no extra keys to miss
        return set()
    end = min(block_size, int(request.num_prompt_tokens))
    keys, _ = generate_block_hash_extra_keys(request, 0, end, 0)
    kinds = set()
    for key in keys or ():
        kind = key[0] if isinstance(key, tuple) and key else repr(key)
        if kind not in KNOWN_EXTRA_KEY_KINDS:
            kinds.add(str(kind))
    return kinds


def request_keys(request: "Request", block_size: int) -> RequestKeys:
    """The extra keys of `request`'s prompt for blocks of `block_size` tokens."""
    num_tokens = int(getattr(request, "num_prompt_tokens", None) or len(request.prompt_token_ids or ()))
    mm_features = getattr(request, "mm_features", None) or []
    embeds = getattr(request, "prompt_embeds", None)
    items, why = _multimodal_items(mm_features, num_tokens)
    if items is None:
        return RequestKeys(bypass=BYPASS_MULTIMODAL, detail=why)
    try:
        unknown = _unknown_kinds(request, block_size)
    except Exception as e:  # noqa: BLE001 - whatever vLLM raises, kvbm cannot tell what the keys are
        return RequestKeys(bypass=BYPASS_UNKNOWN_INPUT, detail=f"vLLM's extra keys raised {type(e).__name__}: {e}")
    if unknown:
        return RequestKeys(bypass=BYPASS_UNKNOWN_INPUT, detail=f"extra key kinds {sorted(unknown)}")
    if not items and embeds is None:
        return RequestKeys()
    kwargs: dict[str, Any] = {}
    if embeds is not None:
        data, row_bytes, why = _embeds_bytes(embeds, num_tokens)
        if data is None:
            return RequestKeys(bypass=BYPASS_PROMPT_EMBEDS, detail=why)
        kwargs.update(embeds=data, embeds_row_bytes=row_bytes)
        mask = getattr(request, "prompt_is_token_ids", None)
        if mask is not None:
            import torch

            if len(mask) != num_tokens:
                return RequestKeys(bypass=BYPASS_PROMPT_EMBEDS,
                                   detail=f"a token mask of {len(mask)} positions for {num_tokens} prompt tokens")
            kwargs["is_token"] = torch.tensor([1 if m else 0 for m in mask], dtype=torch.uint8)
    try:
        extra = _core.BlockExtraKeys(block_size, num_tokens, items, **kwargs)
    except ValueError as e:
        return RequestKeys(bypass=BYPASS_PROMPT_EMBEDS if embeds is not None and not items else BYPASS_MULTIMODAL,
                           detail=str(e))
    return RequestKeys(extra=extra)
