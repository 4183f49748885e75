"""A small multi-turn chat workload taken from a real trace, for the vLLM demo, tests and bench.

Source of the rows below: the Mooncake conversation trace, repository ``kvcache-ai/Mooncake``,
``FAST25-release/traces/conversation_trace.jsonl`` (commit 3cca71daccf2a7afb8fe3f0295358f70e3a69fdb),
Apache-2.0; paper "Mooncake: Trading More Storage for Less Computation", FAST'25. Twenty rows,
copied unchanged: four conversations (7, 5, 4 and 4 turns) interleaved in arrival order, so a
turn's prefix has usually been pushed out of a small engine cache by the other conversations
before the next turn comes.

The trace has no text: each ``hash_ids`` entry names one 512-token block, equal ids meaning
equal tokens. Here each block becomes ``tokens_per_block`` deterministic token ids (pseudo-random,
seeded by the id), so the structure of reuse is the trace's, scaled down to fit a tiny model.
"""

from __future__ import annotations

import math
import random

# (trace line, timestamp ms, input_length, output_length, hash_ids)
TRACE_ROWS = [
    (41, 12000, 14041, 227, [0, *range(978, 1005)]),
    (140, 48000, 2986, 436, [0, 3874, 3875, 3876, 3877, 3878]),
    (148, 51000, 5939, 15, [0, *range(4048, 4059)]),
    (180, 65999, 15233, 300, [0, *range(978, 1004), 4762, 4763, 4764]),
    (260, 90000, 3954, 297, [0, 3874, 3875, 3876, 3877, 6726, 6727, 6728]),
    (285, 99000, 6603, 20, [0, *range(7402, 7414)]),
    (333, 113999, 6077, 128, [0, *range(4048, 4058), 8551]),
    (403, 141000, 15978, 210, [0, *range(978, 1004), 4762, 4763, 9887, 9888, 9889]),
    (412, 144000, 6649, 22, [0, *range(7402, 7413), 10025]),
    (451, 153000, 6214, 18, [0, *range(4048, 4058), 10932, 10933]),
    (513, 171000, 6688, 15, [0, *range(7402, 7413), 12026, 12027]),
    (520, 171000, 16450, 219, [0, *range(978, 1004), 4762, 4763, 9887, 9888, 12070, 12071]),
    (623, 206999, 6728, 26, [0, *range(7402, 7413), 12026, 14054]),
    (627, 209999, 6312, 80, [0, *range(4048, 4058), 10932, 14116]),
    (665, 222000, 18224, 314, [0, *range(978, 1004), 4762, 4763, 9887, 9888, 12070, 14740, 14741, 14742, 14743]),
    (753, 254999, 6872, 124, [0, *range(7402, 7413), 12026, 16846]),
    (792, 264000, 18989, 279,
     [0, *range(978, 1004), 4762, 4763, 9887, 9888, 12070, 14740, 14741, 14742, 17579, 17580, 17581]),
    (898, 291000, 4278, 138, [0, 3874, 3875, 3876, 3877, 6726, 19229, 19230, 19231]),
    (955, 315000, 19634, 245,
     [0, *range(978, 1004), 4762, 4763, 9887, 9888, 12070, 14740, 14741, 14742, 17579, 17580, 20520, 20521]),
    (1149, 390000, 4683, 207, [0, 3874, 3875, 3876, 3877, 6726, 19229, 19230, 24785, 24786]),
]
TRACE_BLOCK_TOKENS = 512


def block_tokens(hash_id: int, n: int, vocab: int) -> list[int]:
    """``n`` token ids for trace block ``hash_id``: equal ids give equal tokens."""
    rng = random.Random(hash_id * 1_000_003 + 17)
    return [rng.randrange(3, vocab) for _ in range(n)]


def chat_prompts(tokens_per_block: int = 32, vocab: int = 2000) -> list[list[int]]:
    """The workload's prompts in arrival order, each trace block scaled to ``tokens_per_block``."""
    prompts = []
    for _line, _ts, input_length, _out, hash_ids in TRACE_ROWS:
        assert len(hash_ids) == math.ceil(input_length / TRACE_BLOCK_TOKENS)
        length = math.ceil(input_length * tokens_per_block / TRACE_BLOCK_TOKENS)
        tokens: list[int] = []
        for h in hash_ids:
            tokens += block_tokens(h, tokens_per_block, vocab)
        prompts.append(tokens[:length])
    return prompts
