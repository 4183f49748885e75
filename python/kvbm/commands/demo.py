"""``kvbm demo``: a short tour of the core (placeholder until the vLLM demo replaces it).

Two prompts that share a prefix go through a small host pool: the first is hashed, stored and
released; the second finds the shared prefix in the cache; a third, unrelated one needs room
and evicts. Every step prints what happened, with the KV events the registry emitted.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="walk through hashing, caching, prefix reuse and eviction")
    p.add_argument("--block-size", type=int, default=4, help="tokens per block (default 4)")
    p.add_argument("--blocks", type=int, default=6, help="host pool size in blocks (default 6)")
    p.add_argument("--policy", choices=["leaf-first", "lru"], default="leaf-first")
    return p


def _store(pool, blocks, tokens, block_size):
    """Allocates, fills and registers one pool block per token block; returns the handles."""
    handles = []
    for mutable, tb in zip(pool.allocate(len(blocks)), blocks):
        start = tb.index * block_size
        mutable.complete(tb, tokens=tokens[start : start + block_size])
        handles.append(pool.register(mutable))
    return handles


def run(args: argparse.Namespace) -> int:
    from kvbm import BlockPool, BlockRegistry, Tier, compute_salt_hash, hash_token_blocks
    from kvbm.errors import ResourceExhaustedError

    bs = args.block_size
    salt = compute_salt_hash(None, None)
    events = []
    registry = BlockRegistry()
    registry.add_sink(events.append)
    pool = BlockPool.create(Tier.HOST, args.blocks, args.policy, registry)

    def show_events():
        for e in events:
            print(f"    event #{e.event_id}: {e.kind:7s} {e.sequence_hash} ({len(e.tokens)} tokens)")
        events.clear()

    system = list(range(1000, 1000 + 2 * bs))  # a shared system prompt: two blocks
    a = system + list(range(2000, 2000 + bs)) + [7]  # one more block and a partial tail
    b = system + list(range(3000, 3000 + 2 * bs))
    print(f"host pool: {args.blocks} blocks of {bs} tokens, eviction {args.policy}, salt hash {salt}")

    blocks_a = hash_token_blocks(a, bs, salt)
    print(f"\n1. request A: {len(a)} tokens -> {len(blocks_a)} full blocks (the tail of {len(a) % bs} is not cached)")
    for tb in blocks_a:
        print(f"    block {tb.index}: sequence hash {tb.sequence_hash}")
    handles = _store(pool, blocks_a, a, bs)
    show_events()
    del handles
    print(f"   A finishes; its blocks stay matchable: {pool.stats()}")

    blocks_b = hash_token_blocks(b, bs, salt)
    hit = pool.match_prefix(blocks_b)
    print(f"\n2. request B shares A's system prompt: {len(hit)} of {len(blocks_b)} blocks hit in the cache")
    rest = _store(pool, blocks_b[len(hit) :], b, bs)
    show_events()
    print(f"   B holds {len(hit) + len(rest)} blocks: {pool.stats()}")
    del hit, rest

    c = list(range(5000, 5000 + 4 * bs))
    blocks_c = hash_token_blocks(c, bs, salt)
    print(f"\n3. request C (unrelated, {len(blocks_c)} blocks) needs room; next victims first: {pool.eviction_order()}")
    held = _store(pool, blocks_c, c, bs)
    show_events()
    print(f"   after eviction: {pool.stats()}")
    print(f"   B's prefix still cached: {pool.count_prefix(blocks_b)} of {len(blocks_b)} blocks")

    print("\n4. while C holds its blocks, asking for more than is free or evictable fails whole:")
    try:
        pool.allocate(args.blocks)
    except ResourceExhaustedError as e:
        print(f"    ResourceExhaustedError: {e}")
    del held
    return 0
