"""kvbm's scheduler and worker bookkeeping for a hybrid model under vLLM's HMA (groups.py).

The leader holds one slot per (request, KV cache group), named by ``group_request_id``; every
slot is a plain kvbm request to it (its own hashes, stores, pins and loads), so the C++ core
needs no notion of groups. This module turns vLLM's per-group calls into those slots' calls:

- match: the longest prefix n for which every group has what a hit of n blocks needs (full
  groups: [start, n); window groups: [first_needed(n), n));
- loads: each group loads exactly the blocks vLLM allocated for it (the window groups' other
  blocks are vLLM's null block and are never written);
- stores: every group stores the blocks each step completes, window groups only from the first
  block a later hit of this request's prompt could need (``Leader.skip_stores``);
- the worker reports a request loaded (or sent) once every group's slot is.

Thread safety: as the connector's (one thread per role).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.vllm_integration.groups import KvCacheGroups, split_group_request_id

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

NULL_BLOCK = 0  # vLLM's null block (the placeholder of a freed sliding-window block)


class GroupedScheduler:
    """The scheduler side for a hybrid model: one leader slot per (request, group)."""

    def __init__(self, leader, groups: KvCacheGroups, block_size: int):
        self.leader = leader
        self.groups = groups
        self.bs = block_size
        self._start: dict[str, int] = {}  # request -> block its last match starts at
        self._block_ids: dict[str, list[list[int]]] = {}  # request -> device blocks per group
        # Requests with a kvbm hit, the tokens it loaded (once per request, not per group) and
        # the blocks each group loaded (tests and logs read them).
        self.hits = 0
        self.matched_tokens = 0
        self.loaded_blocks = [0] * len(groups.groups)

    # --------------------------------------------------------------- tokens

    def sync_tokens(self, request: "Request | None", rid: str, tokens=None, num_prompt_tokens: int | None = None,
                    salt: str | None = None, lora_name: str | None = None) -> None:
        """Adds the request's slots (one per group) or passes them the tokens they lack."""
        if request is not None:
            tokens = request.all_token_ids
            num_prompt_tokens = request.num_prompt_tokens
            salt = getattr(request, "cache_salt", None)
            lora = getattr(request, "lora_request", None)
            lora_name = lora.lora_name if lora is not None else None
        for g in self.groups.groups:
            sid = g.request_id(rid)
            if not self.leader.has_request(sid):
                self.leader.add_request(sid, list(tokens), salt=g.salt(salt), lora_name=lora_name)
                if g.kind != "full":
                    # The earliest block a later hit of this prompt can need: a repeated prompt
                    # matches at most (prompt - 1) // block blocks, and every later hit ends
                    # further on (a conversation's next turn).
                    last_hit = max(0, (int(num_prompt_tokens or len(tokens)) - 1) // self.bs)
                    self.leader.skip_stores(sid, g.first_needed(last_hit))
                continue
            known = self.leader.num_tokens(sid)
            if len(tokens) > known:
                self.leader.extend_tokens(sid, list(tokens[known:]))

    # --------------------------------------------------------------- match and load

    def _run_end(self, sid: str, first_block: int) -> tuple[int, bool]:
        """Where the run of blocks the tiers hold from ``first_block`` ends, and whether loading
        it is asynchronous. Sets the slot's pending match (no effect on the pools)."""
        ext, is_async, _host, _disk = self.leader.get_num_new_matched_tokens(sid, first_block * self.bs)
        return first_block + int(ext) // self.bs, bool(is_async)

    def match(self, rid: str, num_computed_tokens: int, num_tokens: int) -> tuple[int, bool]:
        """(external tokens, asynchronous): the longest prefix every group can serve."""
        if num_computed_tokens % self.bs:
            return 0, False
        start = num_computed_tokens // self.bs
        self._start[rid] = start
        is_async = False
        n = max(0, (num_tokens - 1) // self.bs)  # never the whole prompt (as the leader)
        for g in self.groups.full:
            end, a = self._run_end(g.request_id(rid), start)
            n = min(n, end)
            is_async |= a
        # Window groups need [first_needed(n), n). A shorter n needs blocks further back, so
        # repeat until no group shortens it.
        changed = True
        while changed and n > start:
            changed = False
            for g in self.groups.windowed:
                while n > start:
                    first = max(start, g.first_needed(n))
                    end, _ = self._run_end(g.request_id(rid), first)
                    if end >= n:
                        break
                    n, changed = end, True
        if n <= start:
            for g in self.groups.windowed:
                self._run_end(g.request_id(rid), start)  # pending match back at the engine's hit
            return 0, False
        for g in self.groups.windowed:
            _, a = self._run_end(g.request_id(rid), max(start, g.first_needed(n)))
            is_async |= a
        return (n - start) * self.bs, is_async

    def after_alloc(self, rid: str, group_block_ids, num_external_tokens: int) -> None:
        """vLLM allocated the request's blocks (one list per group): load what was matched."""
        start = self._start.pop(rid, 0)
        if num_external_tokens <= 0:
            for g in self.groups.groups:
                self.leader.update_state_after_alloc(g.request_id(rid), list(group_block_ids[g.index]), 0)
            return
        n = start + num_external_tokens // self.bs
        plans = []
        for g in self.groups.groups:
            ids = list(group_block_ids[g.index])
            first = start if g.kind == "full" else max(start, g.first_needed(n))
            live = [i for i in range(start, min(n, len(ids))) if ids[i] != NULL_BLOCK]
            if live != list(range(first, n)):
                # vLLM kept other blocks than kvbm computed: loading would leave a kept block
                # unwritten or write vLLM's null block. Refuse rather than risk a wrong KV.
                raise RuntimeError(
                    f"kvbm: request {rid}, KV cache group {g.index} ({g.kind}): vLLM allocated blocks at positions "
                    f"{live[:4]}..{live[-4:] if live else []} of a {n - start}-block hit from block {start}, kvbm "
                    f"expected {first}..{n - 1}; refusing to load")
            if g.kind != "full":
                end, _ = self._run_end(g.request_id(rid), first)
                if end < n:
                    raise RuntimeError(f"kvbm: request {rid}, group {g.index}: blocks {first}..{n - 1} matched but "
                                       f"the tiers hold only up to {end}")
            plans.append((g, ids, (n - first) * self.bs))
        for g, ids, tokens in plans:
            self.leader.update_state_after_alloc(g.request_id(rid), ids, tokens)
            self.loaded_blocks[g.index] += tokens // self.bs
        self.hits += 1
        self.matched_tokens += num_external_tokens

    # --------------------------------------------------------------- per step

    def schedule(self, so: "SchedulerOutput", requests: dict) -> int:
        """The step's scheduling, per group (build_connector_meta); returns preemptions."""
        ngroups = len(self.groups.groups)
        preempted = 0
        for rid in so.preempted_req_ids or ():
            for sid in self.groups.request_ids(rid):
                self.leader.on_preempted(sid)
            self._block_ids[rid] = [[] for _ in range(ngroups)]
            preempted += 1
        for new in so.scheduled_new_reqs:
            ids = new.block_ids or [[] for _ in range(ngroups)]
            self._block_ids[new.req_id] = [list(x) for x in ids]
            self._scheduled(new.req_id, requests, new.num_computed_tokens, so.num_scheduled_tokens.get(new.req_id, 0),
                            new.prompt_token_ids)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self._block_ids[rid] = [list(x) for x in new_ids] if new_ids is not None else [[] for _ in range(ngroups)]
            elif new_ids is not None:
                mine = self._block_ids.setdefault(rid, [[] for _ in range(ngroups)])
                for g, ids in enumerate(new_ids):
                    mine[g].extend(ids)
            self._scheduled(rid, requests, cached.num_computed_tokens[i], so.num_scheduled_tokens.get(rid, 0))
        return preempted

    # Requests the connector bypassed (an input not keyed per group): never stored here.
    bypassed: set = frozenset()

    def _scheduled(self, rid: str, requests: dict, num_computed: int, num_scheduled: int, prompt_token_ids=None) -> None:
        if rid in self.bypassed:
            return
        request = requests.get(rid)
        if request is not None:
            self.sync_tokens(request, rid)
        elif not self.leader.has_request(rid):
            return  # never seen by get_num_new_matched_tokens: its inputs are unknown, never stored
        blocks = self._block_ids.get(rid) or []
        for g in self.groups.groups:
            ids = blocks[g.index] if g.index < len(blocks) else []
            self.leader.on_scheduled(g.request_id(rid), ids, num_computed, num_scheduled)

    def expand(self, request_ids) -> list[str]:
        """Request ids -> the leader's slot ids (every group of each)."""
        return [sid for rid in request_ids for sid in self.groups.request_ids(rid)]

    def finished(self, rid: str) -> bool:
        """request_finished for every group's slot; True while any of them still loads."""
        self._start.pop(rid, None)
        self._block_ids.pop(rid, None)
        delays = [bool(self.leader.request_finished(sid)) for sid in self.groups.request_ids(rid)]
        return any(delays)


class GroupedFinished:
    """Worker side: the C++ worker reports each group's slot; vLLM wants each request once,
    when every group's slot is done."""

    def __init__(self, groups: KvCacheGroups):
        self.groups = groups
        self._recving: dict[str, set[int]] = {}
        self._sending: dict[str, set[int]] = {}

    def _collapse(self, slot_ids, seen: dict[str, set[int]]) -> list[str]:
        done = []
        for sid in slot_ids:
            rid, g = split_group_request_id(sid)
            s = seen.setdefault(rid, set())
            s.add(g)
            if len(s) == len(self.groups.groups):
                del seen[rid]
                done.append(rid)
        return done

    def collapse(self, sending, recving) -> tuple[list[str], list[str]]:
        sent = self._collapse(sending, self._sending)
        for rid in sent:
            self._recving.pop(rid, None)  # finished while loading: its loads no longer reported
        return sent, self._collapse(recving, self._recving)

    def expand(self, request_ids) -> list[str]:
        return [sid for rid in request_ids for sid in self.groups.request_ids(rid)]
