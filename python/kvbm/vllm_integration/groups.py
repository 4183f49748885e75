"""vLLM's KV cache groups as kvbm sees them under the hybrid KV cache manager (HMA).

With HMA on, vLLM splits a model's attention layers into KV cache groups, one block table each:
full attention, sliding window, chunked local attention (Mamba groups too, which kvbm refuses).
Every group's block of 32 tokens holds the same number of layers, and the groups' tensors
overlay one memory: a block id belongs to one group at a time. A sliding-window group frees its
blocks once they fall out of the window (vLLM's table then holds the null block, id 0).

kvbm's unit under HMA is one group's block: G2/G3 slot = the layers of one group at one block
position. Each group is one kvbm "layer set" of the same size, so one G1 layout (the overlaid
tensors) and one tier chain serve every group; the key is (group, sequence hash): group 0 keeps
kvbm's sequence hashes, group g > 0 hashes under a salt that names the group and its spec, so
the same prefix of two groups never shares a key. The leader holds one slot per (request,
group) (``group_request_id``).

What a group stores and what a hit needs (never a wrong KV):
- full attention: every block; a hit of n blocks needs blocks [start, n).
- sliding window w (and chunked local attention): a hit of n blocks needs only the blocks vLLM
  keeps for it, from ``first_needed(n)`` (vLLM's ``get_num_skipped_tokens(n * block)`` /
  block) to n: the rest is the null block in vLLM's table. The group stores the blocks inside
  that window before each possible hit of a later request: the end of the prompt (a repeated
  prompt: ``(prompt - 1) // block`` blocks, the most kvbm ever matches of it) and every
  position after it (a later turn continues the conversation from wherever this one ended).
  Blocks before that are never stored: no later hit reads them.
- a match is the longest prefix n for which every group has what it needs.

A model with one full-attention group (Llama, Qwen, ...) is not hybrid: kvbm's keys, hashes and
G2 layout are exactly those without HMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig

# Separates a request id from its group in the leader's slot names (never in a vLLM request id).
_GROUP_SEP = "\x1fkvbm-group="


class UnsupportedKvCacheGroups(ValueError):
    """The model's KV cache groups include one kvbm cannot store without risking a wrong KV."""


@dataclass(frozen=True)
class LayerGroup:
    """One of vLLM's KV cache groups: what kvbm stores of it and what a hit needs."""

    index: int
    kind: str  # "full", "sliding_window" or "chunked_local"
    layer_names: tuple[str, ...]
    block_size: int
    window: int = 0  # sliding window (tokens), or the attention chunk size for chunked_local
    extra_retained: int = 0  # sliding window: tokens vLLM keeps below the window

    @property
    def description(self) -> str:
        """Kind, window and layers: part of the layout fingerprint (a value of one group never
        loads into another)."""
        spec = self.kind if self.kind == "full" else f"{self.kind}({self.window}+{self.extra_retained})"
        return f"{spec}:{','.join(self.layer_names)}"

    def first_needed(self, num_blocks: int) -> int:
        """The first block a hit of ``num_blocks`` blocks needs in this group (vLLM keeps the
        null block before it): vLLM's ``get_num_skipped_tokens`` of the hit, in blocks."""
        tokens = num_blocks * self.block_size
        if self.kind == "sliding_window":
            skipped = max(0, tokens - self.window + 1 - self.extra_retained)
        elif self.kind == "chunked_local":
            skipped = (tokens // self.window) * self.window
        else:
            skipped = 0
        return skipped // self.block_size

    def request_id(self, request_id: str) -> str:
        return group_request_id(request_id, self.index)

    def salt(self, salt: str | None) -> str | None:
        """The salt group ``index``'s hashes are computed under (group 0: the request's own)."""
        if self.index == 0:
            return salt
        own = "" if salt is None else f"salt={salt}"  # no salt and an empty one stay apart, as in group 0
        return f"{own}{_GROUP_SEP}{self.index}:{self.description}"


def group_request_id(request_id: str, group: int) -> str:
    return request_id if group == 0 else f"{request_id}{_GROUP_SEP}{group}"


def split_group_request_id(slot_id: str) -> tuple[str, int]:
    """Inverse of :func:`group_request_id`."""
    rid, sep, group = slot_id.rpartition(_GROUP_SEP)
    return (rid, int(group)) if sep else (slot_id, 0)


def _classify(index: int, group, block_size: int) -> LayerGroup:
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
    )

    spec = group.kv_cache_spec
    names = tuple(group.layer_names)
    layers = f"KV cache group {index} ({len(names)} layers, first {names[0] if names else '?'})"
    if int(getattr(spec, "block_size", block_size)) != block_size:
        raise UnsupportedKvCacheGroups(
            f"kvbm: {layers} has block size {spec.block_size}, the others {block_size}; kvbm needs one block size "
            "for every group")
    if isinstance(spec, MambaSpec):
        raise UnsupportedKvCacheGroups(
            f"kvbm: {layers} is a Mamba / linear-attention state ({type(spec).__name__}, mamba_cache_mode="
            f"{getattr(spec, 'mamba_cache_mode', '?')!r}). kvbm does not store recurrent states: a hit needs the state "
            "at its exact block boundary, and loading only the attention groups would pair their KV with a state "
            "computed for another prefix. Run this model without kvbm's connector (no --kv-transfer-config).")
    if isinstance(spec, SlidingWindowSpec):
        return LayerGroup(index, "sliding_window", names, block_size, int(spec.sliding_window),
                          int(getattr(spec, "extra_retained_tokens", 0) or 0))
    if isinstance(spec, ChunkedLocalAttentionSpec):
        return LayerGroup(index, "chunked_local", names, block_size, int(spec.attention_chunk_size))
    # Exactly full attention (MLA included): no subclass that frees or rewrites blocks (R-SWA,
    # attention sinks, hidden-state caches), whose blocks kvbm cannot tell apart.
    if type(spec) in (FullAttentionSpec, MLAAttentionSpec):
        return LayerGroup(index, "full", names, block_size)
    raise UnsupportedKvCacheGroups(
        f"kvbm: {layers} has KV cache spec {type(spec).__name__}, which kvbm does not know how to store without "
        "risking a wrong KV; supported: full attention, sliding window, chunked local attention")


@dataclass(frozen=True)
class KvCacheGroups:
    """The model's KV cache groups, as kvbm stores them."""

    groups: tuple[LayerGroup, ...]

    @classmethod
    def from_config(cls, kv_cache_config: "KVCacheConfig", block_size: int) -> "KvCacheGroups":
        """Raises :class:`UnsupportedKvCacheGroups` naming the group kvbm cannot serve."""
        groups = tuple(_classify(i, g, block_size) for i, g in enumerate(kv_cache_config.kv_cache_groups))
        if len({len(g.layer_names) for g in groups}) > 1:
            raise UnsupportedKvCacheGroups(
                "kvbm: vLLM's KV cache groups have different numbers of layers "
                f"({[len(g.layer_names) for g in groups]}); kvbm's block is one group's layers and needs them equal")
        return cls(groups)

    @property
    def hybrid(self) -> bool:
        """More than one group, or one that frees blocks: kvbm keys and stores per group."""
        return len(self.groups) > 1 or any(g.kind != "full" for g in self.groups)

    @property
    def full(self) -> list[LayerGroup]:
        return [g for g in self.groups if g.kind == "full"]

    @property
    def windowed(self) -> list[LayerGroup]:
        return [g for g in self.groups if g.kind != "full"]

    @property
    def layers_per_group(self) -> int:
        return len(self.groups[0].layer_names)

    def descriptor(self) -> str:
        """Part of the model descriptor (G4 keys, the persistent G3 file and its fingerprint):
        every group's kind, window and layers. Empty for a model that is not hybrid, whose
        descriptor stays what it was."""
        if not self.hybrid:
            return ""
        return "|groups=" + ";".join(g.description for g in self.groups)

    def request_ids(self, request_id: str) -> list[str]:
        return [g.request_id(request_id) for g in self.groups]
