"""A generated multi-turn chat trace in the Mooncake format, unlike the embedded one.

Eviction policies are tuned on the embedded conversation trace only; this trace is where they
are checked against a different reuse structure (BENCHMARKS.md, issue 13). Conversations arrive
as a Poisson process (mean gap 1.5 s). Each opens with one of 20 shared system prompts (1-4
blocks); each turn re-sends the whole history plus new input (1 + an exponential number of
blocks, mean 2) and the previous answer (one block); the number of turns is 1 + an exponential
(mean 4); the gaps between turns are exponential, with a mean of ``gaps`` seconds picked per
conversation. Here recency wins: the next turn of a live conversation is the likeliest reuse.

    python -m kvbm.testing.conversation_trace SEED CONVERSATIONS OUT.jsonl [--gaps 30,120,600]
"""

from __future__ import annotations

import argparse
import json
import random

BLOCK_TOKENS = 512


def conversation_trace(seed: int, conversations: int, gaps: tuple[float, ...] = (30.0, 120.0, 600.0)) -> list[dict]:
    """Rows (timestamp ms, input_length, output_length, hash_ids), in arrival order."""
    rng = random.Random(seed)
    next_id = iter(range(1, 1 << 62))
    systems = [[next(next_id) for _ in range(rng.randint(1, 4))] for _ in range(20)]
    events, t = [], 0.0
    for _ in range(conversations):
        t += rng.expovariate(1 / 1.5)
        history, gap, at = list(rng.choice(systems)), rng.choice(gaps), t
        for _ in range(int(rng.expovariate(1 / 4)) + 1):
            history += [next(next_id) for _ in range(int(rng.expovariate(1 / 2.0)) + 1)]
            events.append((at, len(history) * BLOCK_TOKENS - rng.randint(0, BLOCK_TOKENS - 1), rng.randint(100, 600),
                           list(history)))
            history.append(next(next_id))  # the answer, part of the next turn's prompt
            at += rng.expovariate(1 / gap)
    events.sort(key=lambda e: e[0])
    return [{"timestamp": int(at * 1000), "input_length": n, "output_length": out, "hash_ids": ids}
            for at, n, out, ids in events]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbm.testing.conversation_trace", description=__doc__.split("\n")[0])
    p.add_argument("seed", type=int)
    p.add_argument("conversations", type=int)
    p.add_argument("out")
    p.add_argument("--gaps", default="30,120,600", help="mean turn gaps in seconds, one picked per conversation")
    a = p.parse_args(argv)
    try:
        gaps = tuple(float(g) for g in a.gaps.split(","))
    except ValueError:
        p.error(f"--gaps {a.gaps!r}: expected comma-separated seconds like 30,120,600")
    if a.conversations < 1 or not gaps or min(gaps) <= 0:
        p.error("conversations and every gap must be positive")
    rows = conversation_trace(a.seed, a.conversations, gaps)
    with open(a.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} requests in {a.conversations} conversations -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
