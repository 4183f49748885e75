"""``kvbm replay [TRACE]``: replay a Mooncake request trace through kvbm's real connector core.

The event loop runs in C++ (src/tools/replay.cpp, ``kvbm._core.run_replay``); this module
parses the arguments, draws the progress bar, and for ``--sweep`` writes the table and the
plot. docs/REPLAY.md describes the engine and time model and every figure printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import sys
import time
import zlib
from importlib import resources

from kvbm.commands._args import U32_MAX, decimal, finite_float
from kvbm.errors import ConfigError, InvalidArgumentError

# Bytes of KV per token (all layers, K and V, bf16): layers * 2 * kv_heads * head_dim * 2.
BYTES_PER_TOKEN_PRESETS = {
    "llama-3-8b": 32 * 2 * 8 * 128 * 2,  # 131,072
    "llama-3-70b": 80 * 2 * 8 * 128 * 2,  # 327,680
    "llama-3.1-8b": 32 * 2 * 8 * 128 * 2,
    "llama-3.1-70b": 80 * 2 * 8 * 128 * 2,
    "qwen2.5-7b": 28 * 2 * 4 * 128 * 2,  # 57,344
    "mistral-7b": 32 * 2 * 8 * 128 * 2,
}
DEFAULT_SWEEP_G2 = "1000,5859,10000,30000,100000"
EMBEDDED_TRACE = "conversation_trace.jsonl.gz"

TIME_MODEL = """\
time model: a request arrives at its timestamp and waits (first come, first served) until G1 can
hold all of its ceil((input+output)/block) blocks, reusing its longest cached G1 prefix. Past
that prefix kvbm is asked for the rest (G2 run, then G3 run; never the whole prompt) and loads
it. The request then computes for input_length / --prefill-tokens-per-s seconds (hits do not
shorten it, so the schedule is the same for every G2/G3 size and policy); at the end of its
prefill its full prompt blocks are stored (write-through G1->G2, G2->G3 through the disk
admission filter) and registered in G1. It decodes for output_length / --decode-tokens-per-s
seconds, then finishes and releases its G1 blocks. See docs/REPLAY.md."""


# The most blocks a tier may have (kvbm::kMaxCacheBlocks, include/kvbm/config.h).
MAX_TIER_BLOCKS = 1 << 40
# Sizes in GB: at most an exabyte, as DYN_KVBM_*_CACHE_GB.
MAX_GB = 1e9


def _size(value: str) -> int | None:
    """A tier size in blocks: a decimal integer (``_`` may group digits), or ``unlimited`` (None)."""
    if value.lower() in ("unlimited", "inf", "none"):
        return None
    digits = value.replace("_", "") if re.fullmatch(r"[0-9]+(_[0-9]+)*", value) else value
    try:
        return decimal("a size in blocks", 0, MAX_TIER_BLOCKS)(digits)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'unlimited')") from None


_instances = decimal("--instances (engine instances)", 1, 1024)


def _g4_size(value: str) -> int:
    v = _size(value)
    if v is None:
        raise argparse.ArgumentTypeError("G4 needs a finite size in blocks")
    return v


def _rate(value: str) -> float:
    v = finite_float("a rate in tokens/s", allow_inf=True)(value)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 tokens/s (or 'inf'), got {value!r}")
    return v

_gb = finite_float("a size in GB", lo=0.0, hi=MAX_GB)
_seconds = finite_float("SECONDS", lo=0.0, hi=365 * 86400.0)
_limit = decimal("--limit (a number of requests)", 0, 1 << 62)
_block_size = decimal("--block-size (tokens per block)", 1, 1 << 31)
_load_steps = decimal("--load-steps (engine steps a load takes)", 0, 1_000_000)


def _bytes_per_token(value: str) -> int:
    key = value.lower()
    if key in BYTES_PER_TOKEN_PRESETS:
        return BYTES_PER_TOKEN_PRESETS[key]
    try:
        return decimal("bytes per token", 1, U32_MAX)(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(
            f"{e}; or one of {', '.join(sorted(BYTES_PER_TOKEN_PRESETS))}"
        ) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "replay",
        help="replay a Mooncake request trace through kvbm and report hit rates",
        description="Replays a Mooncake trace (JSONL: timestamp, input_length, output_length, hash_ids) through "
        "kvbm's connector core with a simulated engine: G1 stands for the engine's own prefix cache, G2/G3 are "
        "kvbm's tiers. With no TRACE, the Mooncake conversation trace shipped with kvbm is replayed "
        "(attribution: kvbm/data/ATTRIBUTION.md).",
        epilog=TIME_MODEL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", nargs="?", metavar="TRACE", help="Mooncake JSONL trace (.jsonl or .jsonl.gz)")
    p.add_argument("--limit", type=_limit, default=0, help="replay only the first N requests (default: all; 200 with --bytes)")
    p.add_argument("--block-size", type=_block_size, default=512, help="kvbm block (page) size in tokens (default 512)")
    sizes = p.add_argument_group("tier sizes (blocks: a number or 'unlimited'; or GB with --bytes-per-token)")
    sizes.add_argument("--g1-blocks", type=_size, default=2000,
                       help="engine prefix cache (G1); 0 = engine without prefix caching (default 2000)")
    sizes.add_argument("--g2-blocks", type=_size, default=5859, help="host tier G2; 0 = off (default 5859, ~3M tokens)")
    sizes.add_argument("--g3-blocks", type=_size, default=0, help="disk tier G3; 0 = off (default 0)")
    sizes.add_argument("--g1-gb", type=_gb, help="G1 in decimal GB (needs --bytes-per-token)")
    sizes.add_argument("--g2-gb", type=_gb, help="G2 in decimal GB (needs --bytes-per-token)")
    sizes.add_argument("--g3-gb", type=_gb, help="G3 in decimal GB (needs --bytes-per-token)")
    sizes.add_argument("--bytes-per-token", type=_bytes_per_token,
                       help="KV bytes per token for the GB sizes: a number or a preset "
                       f"({', '.join(sorted(BYTES_PER_TOKEN_PRESETS))}); with --bytes, the bytes moved per token "
                       "(default 8)")
    p.add_argument("--policy", choices=list(POLICIES), default="adaptive",
                   help="eviction policy of G2 and G3 (default adaptive, kvbm's; opt = Belady's MIN from the trace's future, "
                   "the upper limit; G1 is always LRU, like the engine's)")
    p.add_argument("--disk-policy", choices=list(POLICIES), help="eviction policy of G3 (default: --policy)")
    p.add_argument("--load-steps", type=_load_steps, default=0, metavar="N",
                   help="engine steps each load takes (default 0: within its step); with N > 0 the loaded blocks "
                   "stay pinned while other requests are admitted and stored, as with a slow tier, so eviction "
                   "policies that treat held blocks differently differ (not with --bytes)")
    p.add_argument("--prefill-tokens-per-s", type=_rate, default=10_000.0, help="prefill speed (default 10000; 'inf')")
    p.add_argument("--decode-tokens-per-s", type=_rate, default=50.0, help="decode speed per request (default 50; 'inf')")
    p.add_argument("--bytes", action="store_true",
                   help="move real bytes (G1 tensors in host memory, the transfer engine, the G3 file) and verify "
                   "every loaded block")
    inst = p.add_argument_group("instances sharing G4 (the hit-rate model; see docs/REPLAY.md)")
    inst.add_argument("--instances", type=_instances, default=1,
                      help="engine instances, each with its own G1/G2/G3 of the sizes above (default 1)")
    inst.add_argument("--g4-blocks", type=_g4_size, default=0,
                      help="shared G4 (remote tier) capacity in blocks, LRU like Redis allkeys-lru; 0 = none (default)")
    inst.add_argument("--assign", choices=("conversation", "random"), default="conversation",
                      help="requests to instances: round-robin by conversation (same first block past the trace's "
                      "common prefix -> same instance; default), or each request at random")
    inst.add_argument("--seed", type=decimal("--seed", 0, (1 << 64) - 1), default=0,
                      help="seed of --assign random (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")
    p.add_argument("--linger", type=_seconds, default=0.0, metavar="SECONDS",
                   help="keep the process (and the DYN_KVBM_METRICS endpoint) alive this long after the replay")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--sweep", action="store_true",
                    help="replay once per G2 capacity and policy; print a table and write a PNG plot")
    sw.add_argument("--sweep-g2", default=DEFAULT_SWEEP_G2, help=f"G2 capacities in blocks (default {DEFAULT_SWEEP_G2})")
    sw.add_argument("--sweep-policies", default=",".join(POLICIES),
                    help=f"policies (default {','.join(POLICIES)}); each runs in G2 and G3")
    sw.add_argument("--sweep-g1", help="G1 sizes to sweep too, e.g. 0,2000 (default: --g1-blocks)")
    sw.add_argument("--sweep-g3", help="G3 sizes to sweep too: blocks, or Nx = N times the G2 capacity, e.g. 0,4x "
                    "(default: --g3-blocks)")
    sw.add_argument("--plot", default="kvbm-replay-sweep.png", help="PNG path (default kvbm-replay-sweep.png)")
    sw.add_argument("--table", help="also write the table (Markdown) to this path")
    return p


# Eviction policies of G2/G3 in a replay: the pool's (kvbm.eviction.h) and Belady's optimum.
POLICIES = ("lru", "leaf-first", "reuse", "adaptive", "opt")


def _read_gz_lines(path: str, limit: int) -> bytes:
    """The decompressed lines of a gzip trace, read line by line with the core's line bound.

    Stops after `limit` non-blank lines (0: all). A line longer than the bound, a truncated or
    corrupt stream, a directory or an unreadable file is an error naming the file (and line).
    """
    from kvbm import _core

    max_line = _core.MAX_TRACE_LINE_BYTES
    lines = []
    kept = 0
    try:
        with gzip.open(path, "rb") as f:
            line_no = 0
            while limit == 0 or kept < limit:
                # One byte over the bound (plus the newline) tells an overlong line apart.
                line = f.readline(max_line + 2)
                if not line:
                    break
                line_no += 1
                if len(line.rstrip(b"\n")) > max_line:
                    raise InvalidArgumentError(
                        f"{path}: trace line {line_no}: longer than {max_line} bytes (is this a Mooncake JSONL trace?)"
                    )
                lines.append(line)
                if line.strip():
                    kept += 1
    except EOFError:
        raise InvalidArgumentError(
            f"cannot read trace {path}: the gzip stream is truncated (it ends before its end marker)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InvalidArgumentError(f"cannot read trace {path}: not a valid gzip file: {e}") from None
    except OSError as e:
        raise InvalidArgumentError(f"cannot read trace {path}: {e.strerror or e}") from None
    return b"".join(lines)


def load_trace(path: str | None, limit: int = 0):
    """The parsed trace: `path` (.jsonl or .jsonl.gz), or the embedded conversation trace."""
    from kvbm import _core

    if path is None:
        data = resources.files("kvbm.data").joinpath(EMBEDDED_TRACE).read_bytes()
        return _core.parse_mooncake_trace(gzip.decompress(data), limit), f"embedded:{EMBEDDED_TRACE}"
    if path.endswith(".gz"):
        data = _read_gz_lines(path, limit)
        try:
            return _core.parse_mooncake_trace(data, limit), path
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{path}: {e}") from None
    return _core.read_mooncake_trace(path, limit), path


def _blocks_from_gb(gb: float, bytes_per_token: int | None, block_size: int, flag: str) -> int:
    if bytes_per_token is None:
        raise ConfigError(f"{flag} needs --bytes-per-token (a number or a model preset)")
    blocks = int(gb * 1e9 // (bytes_per_token * block_size))
    if blocks > MAX_TIER_BLOCKS:
        raise ConfigError(f"{flag} {gb:g}: too large: {blocks:,} blocks, more than the {MAX_TIER_BLOCKS:,} a tier may have")
    return blocks


class ProgressBar:
    """A one-line bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str):
        self.label = label
        self.last = 0.0
        self.start = time.monotonic()

    def __call__(self, finished: int, total: int, trace_seconds: float, hit_rate: float) -> bool:
        now = time.monotonic()
        if finished < total and now - self.last < 0.1:
            return True
        self.last = now
        width = 30
        filled = int(width * finished / max(total, 1))
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {finished}/{total} requests, "
            f"trace {trace_seconds:,.0f} s, token hit rate {hit_rate:.3f}, {now - self.start:.1f} s"
        )
        if finished >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
        return True


def _options(args: argparse.Namespace) -> dict:
    bpt = args.bytes_per_token
    bs = args.block_size
    g1 = _blocks_from_gb(args.g1_gb, bpt, bs, "--g1-gb") if args.g1_gb is not None else args.g1_blocks
    g2 = _blocks_from_gb(args.g2_gb, bpt, bs, "--g2-gb") if args.g2_gb is not None else args.g2_blocks
    g3 = _blocks_from_gb(args.g3_gb, bpt, bs, "--g3-gb") if args.g3_gb is not None else args.g3_blocks
    if args.bytes and args.g1_blocks is None and args.g1_gb is None:
        raise ConfigError("--bytes needs a finite G1 (--g1-blocks N): its tensors are allocated in host memory")
    if args.bytes and args.load_steps:
        raise ConfigError(f"--load-steps {args.load_steps} cannot be combined with --bytes: with real bytes the "
                          "worker's loads take the steps they take")
    return dict(
        block_size=bs,
        g1_blocks=g1,
        g2_blocks=g2,
        g3_blocks=g3,
        policy=args.policy,
        disk_policy=args.disk_policy,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        decode_tokens_per_s=args.decode_tokens_per_s,
        load_steps=args.load_steps,
        move_bytes=args.bytes,
        bytes_per_token=(bpt if (args.bytes and bpt is not None) else 8),
    )


def _fmt_size(n) -> str:
    return "unlimited" if n is None else f"{n:,}"


def _print_report(r: dict, source: str) -> None:
    bs = r["block_size"]
    print(f"trace            {source}: {r['requests']:,} requests, {r['block_refs']:,} block references, "
          f"{r['input_tokens']:,} prompt tokens" + (f", {r['rejected_requests']} rejected (larger than G1)"
                                                     if r["rejected_requests"] else ""))
    print(f"tiers            G1 {r['g1_blocks']:,}  G2 {r['g2_blocks']:,}  G3 {r['g3_blocks']:,} blocks of {bs} tokens")
    print("hit rates        tokens    blocks")
    for tier in ("g1", "g2", "g3"):
        print(f"  {tier.upper()}             {r[f'{tier}_token_hit_rate']:.4f}    {r[f'{tier}_block_hit_rate']:.4f}")
    print(f"  total          {r['token_hit_rate']:.4f}    {r['block_hit_rate']:.4f}")
    on, off = r["onboard_blocks"], r["offload_blocks"]
    print(f"onboards         G2->G1 {on['g2_to_g1']:,}  G3->G1 {on['g3_to_g1']:,} blocks")
    print(f"offloads         G1->G2 {off['g1_to_g2']:,}  G2->G3 {off['g2_to_g3']:,}  G1->G3 {off['g1_to_g3']:,} blocks")
    print(f"disk filter      {r['disk_writes_avoided']:,} disk writes avoided by the admission filter")
    ev = r["evictions"]
    print(f"evictions        G1 {ev['g1']:,}  G2 {ev['g2']:,}  G3 {ev['g3']:,}; offloads dropped (tier full) "
          f"{r['offloads_dropped_full']:,}")
    print(f"engine           {r['max_running']} requests running at most, {r['max_waiting']} waiting at most, "
          f"{r['trace_seconds']:,.0f} s of trace time")
    if r.get("move_bytes"):
        print(f"bytes            {r['bytes_loaded']:,} loaded, {r['bytes_stored']:,} stored; "
              f"{r['blocks_verified']:,} loaded blocks verified, {r['mismatched_blocks']} mismatched, "
              f"{r['load_errors']} load errors")
    print(f"speed            {r['seconds']:.3f} s: {r['requests_per_s']:,.0f} requests/s, "
          f"{r['block_refs_per_s']:,.0f} block references/s")


def _run_instances(trace, opts: dict, args, source: str) -> dict:
    from kvbm import _core

    show = sys.stderr.isatty() and not args.no_progress
    progress = ProgressBar(f"replay x{args.instances}") if show else None
    # load_steps is refused with --instances (run() checks), so it is always 0 here
    base = {k: v for k, v in opts.items() if k not in ("move_bytes", "bytes_per_token", "load_steps")}
    r = _core.run_replay_instances(trace, instances=args.instances, g4_blocks=args.g4_blocks, assign=args.assign,
                                   seed=args.seed, **base, progress=progress, progress_every=64,
                                   linger_seconds=args.linger)
    r["trace"] = source
    r["policy"] = opts["policy"]
    r["seed"] = args.seed
    r["prefill_tokens_per_s"] = opts["prefill_tokens_per_s"]
    r["decode_tokens_per_s"] = opts["decode_tokens_per_s"]
    return r


def _print_instances(r: dict, source: str) -> None:
    o = r["overall"]
    rule = ("round-robin by conversation" if r["assign"] == "conversation"
            else f"at random (seed {r['seed']})")
    print(f"trace            {source}: {o['requests']:,} requests, {o['block_refs']:,} block references, "
          f"{o['input_tokens']:,} prompt tokens" + (f", {o['rejected_requests']} rejected (larger than G1)"
                                                     if o["rejected_requests"] else ""))
    print(f"instances        {r['instances']}, requests assigned {rule}")
    print(f"tiers            per instance G1 {o['g1_blocks']:,}  G2 {o['g2_blocks']:,}  G3 {o['g3_blocks']:,}; "
          f"shared G4 {r['g4_blocks']:,} blocks of {o['block_size']} tokens ({r['policy']} in G2/G3, LRU in G4)")
    print("token hit rates  local = G1+G2+G3 of the instance; global = local + G4")
    print("| instance | requests | G1 | G2 | G3 | local | G4 | global |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(str(i), x) for i, x in enumerate(r["per_instance"])] + [("all", o)]
    for name, x in rows:
        print(f"| {name} | {x['requests']:,} | {x['g1_token_hit_rate']:.4f} | {x['g2_token_hit_rate']:.4f} | "
              f"{x['g3_token_hit_rate']:.4f} | {x['local_token_hit_rate']:.4f} | {x['g4_token_hit_rate']:.4f} | "
              f"{x['global_token_hit_rate']:.4f} |")
    print(f"G4               {r['g4_used_blocks']:,} blocks held at the end, {o['g4_put_blocks']:,} put, "
          f"{o['g4_hit_blocks']:,} read, {r['g4_evictions']:,} evicted")
    print(f"speed            {o['seconds']:.3f} s: {o['requests_per_s']:,.0f} requests/s")


def _run_one(trace, opts: dict, args, source: str) -> dict:
    from kvbm import _core

    show = sys.stderr.isatty() and not args.no_progress and not args.sweep
    progress = ProgressBar("replay") if show else None
    on_port = None
    if args.linger > 0 and os.environ.get("DYN_KVBM_METRICS", "").strip().lower() in ("1", "true", "yes", "on"):
        on_port = _metrics_port_reporter(args.linger)
    r = _core.run_replay(trace, **opts, progress=progress, progress_every=64, linger_seconds=args.linger,
                         on_metrics_port=on_port)
    r["policy"] = opts["policy"]
    r["load_steps"] = opts["load_steps"]
    r["move_bytes"] = opts["move_bytes"]
    r["trace"] = source
    r["prefill_tokens_per_s"] = opts["prefill_tokens_per_s"]
    r["decode_tokens_per_s"] = opts["decode_tokens_per_s"]
    return r


def _metrics_port_reporter(linger: float):
    """Prints the port the metrics endpoint really bound (known once the replay has started)."""

    def report(port: int) -> None:
        if port:
            host = os.environ.get("DYN_KVBM_METRICS_HOST", "127.0.0.1").strip() or "127.0.0.1"
            print(f"kvbm replay: metrics on http://{host}:{port}/metrics; lingering {linger:g} s after the replay",
                  file=sys.stderr, flush=True)
        else:
            print("kvbm replay: the metrics endpoint is not running (see the error above); no metrics to scrape",
                  file=sys.stderr, flush=True)

    return report


def _sweep(trace, base: dict, args, source: str) -> int:
    from kvbm import _core

    try:
        capacities = [_size(c.strip()) for c in args.sweep_g2.split(",") if c.strip()]
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--sweep-g2: {e}") from None
    policies = [p.strip() for p in args.sweep_policies.split(",") if p.strip()]
    for pol in policies:
        if pol not in POLICIES:
            raise ConfigError(f"--sweep-policies: unknown policy {pol!r} ({', '.join(POLICIES)})")
    if args.sweep_g1 is not None or args.sweep_g3 is not None:
        return _sweep_matrix(trace, base, args, source, capacities, policies)
    bs = base["block_size"]
    rows = []
    header = f"| G2 blocks | G2 tokens | {' | '.join(f'{p} hit rate' for p in policies)} | seconds |"
    if not args.json:
        print(f"sweep over G2 on {source}: G1 {_fmt_size(base['g1_blocks'])}, G3 {_fmt_size(base['g3_blocks'])} blocks "
              f"of {bs} tokens")
        print(header)
        print("|" + "---|" * (3 + len(policies)))
    for cap in capacities:
        row = {"g2_blocks": cap, "results": {}}
        secs = 0.0
        for pol in policies:
            r = _core.run_replay(trace, **{**base, "g2_blocks": cap, "policy": pol, "disk_policy": None})
            row["results"][pol] = r
            secs += r["seconds"]
        rows.append(row)
        if not args.json:
            tokens = "unlimited" if cap is None else f"{cap * bs / 1e6:.2f}M"
            rates = " | ".join(f"{row['results'][p]['token_hit_rate']:.4f}" for p in policies)
            print(f"| {_fmt_size(cap)} | {tokens} | {rates} | {secs:.2f} |", flush=True)
    bound = _core.run_replay(trace, **{**base, "g1_blocks": None, "g2_blocks": None, "policy": "lru",
                                       "disk_policy": None})
    table = [header, "|" + "---|" * (3 + len(policies))]
    for row in rows:
        cap = row["g2_blocks"]
        tokens = "unlimited" if cap is None else f"{cap * bs / 1e6:.2f}M"
        rates = " | ".join(f"{row['results'][p]['token_hit_rate']:.4f}" for p in policies)
        secs = sum(r["seconds"] for r in row["results"].values())
        table.append(f"| {_fmt_size(cap)} | {tokens} | {rates} | {secs:.2f} |")
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(table) + "\n")
    _plot(rows, policies, bound["token_hit_rate"], bs, base, args.plot, source)
    if args.json:
        out = {
            "trace": source,
            "block_size": bs,
            "g1_blocks": base["g1_blocks"],
            "g3_blocks": base["g3_blocks"],
            "unlimited_token_hit_rate": bound["token_hit_rate"],
            "plot": args.plot,
            "rows": [
                {"g2_blocks": row["g2_blocks"], **{p: row["results"][p] for p in policies}} for row in rows
            ],
        }
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"unlimited capacity (prefix-reuse bound): token hit rate {bound['token_hit_rate']:.4f}")
        print(f"plot written to {args.plot}")
    return 0


def _g3_size(text: str, g2):
    text = text.strip()
    if text.endswith("x"):
        try:
            factor = float(text[:-1])
        except ValueError:
            raise ConfigError(f"--sweep-g3: {text!r} is not a number of blocks or Nx") from None
        if factor < 0 or g2 is None:
            raise ConfigError(f"--sweep-g3: {text!r} needs a finite G2 capacity and N >= 0")
        return int(round(factor * g2))
    try:
        return _size(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--sweep-g3: {e}") from None


def _sweep_matrix(trace, base: dict, args, source: str, capacities, policies) -> int:
    """Every (G1, G3, G2 capacity, policy): token hit rate and prefill tokens saved, one table."""
    from kvbm import _core

    try:
        g1s = [_size(c.strip()) for c in args.sweep_g1.split(",") if c.strip()] if args.sweep_g1 else [base["g1_blocks"]]
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--sweep-g1: {e}") from None
    g3s = [c for c in args.sweep_g3.split(",") if c.strip()] if args.sweep_g3 else [str(base["g3_blocks"])]
    bs = base["block_size"]
    # One "X / lru" column per online policy that is not lru's own order.
    ratios = [p for p in ("reuse", "adaptive") if p in policies] if "lru" in policies else []
    header = ("| G1 | G3 | G2 blocks | " + " | ".join(f"{p} hit rate" for p in policies) + " | "
              + " | ".join(f"{p} saved (M tokens)" for p in policies)
              + "".join(f" | {p} / lru" for p in ratios) + " |")
    table = [header, "|" + "---|" * (3 + 2 * len(policies) + len(ratios))]
    if not args.json:
        print(f"sweep on {source}: blocks of {bs} tokens; G3 'Nx' = N times G2")
        print(table[0])
        print(table[1])
    rows = []
    for g1 in g1s:
        for g3_text in g3s:
            for cap in capacities:
                g3 = _g3_size(g3_text, cap)
                if cap == 0 and g3 == 0:
                    continue
                res = {}
                for pol in policies:
                    res[pol] = _core.run_replay(trace, **{**base, "g1_blocks": g1, "g2_blocks": cap, "g3_blocks": g3,
                                                          "policy": pol, "disk_policy": None})
                rows.append({"g1_blocks": g1, "g3_blocks": g3, "g2_blocks": cap, **res})
                line = (f"| {_fmt_size(g1)} | {_fmt_size(g3)} | {_fmt_size(cap)} | "
                        + " | ".join(f"{res[p]['token_hit_rate']:.4f}" for p in policies) + " | "
                        + " | ".join(f"{res[p]['hit_tokens'] / 1e6:.2f}" for p in policies))
                for p in ratios:
                    lru = res["lru"]["token_hit_rate"]
                    line += f" | {res[p]['token_hit_rate'] / lru:.3f}" if lru > 0 else " | -"
                line += " |"
                table.append(line)
                if not args.json:
                    print(line, flush=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(table) + "\n")
    if args.json:
        print(json.dumps({"trace": source, "block_size": bs, "rows": rows}, sort_keys=True))
    return 0


def _plot(rows, policies, bound: float, bs: int, base: dict, path: str, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if r["g2_blocks"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"leaf-first": dict(marker="o", linestyle="-"), "lru": dict(marker="x", linestyle="--", markersize=9),
              "reuse": dict(marker="s", linestyle="-", linewidth=2),
              "adaptive": dict(marker="D", linestyle="-", linewidth=2), "opt": dict(marker="^", linestyle=":", color="black")}
    for pol in policies:  # distinct markers: equal curves stay visible on top of each other
        xs = [r["g2_blocks"] * bs for r in finite]
        ys = [r["results"][pol]["token_hit_rate"] for r in finite]
        ax.plot(xs, ys, label=pol, **styles.get(pol, {"marker": "o"}))
    ax.axhline(bound, linestyle=":", color="grey", label=f"unlimited ({bound:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel(f"G2 capacity (tokens; blocks of {bs})")
    ax.set_ylabel("token hit rate (G1 + G2 + G3)")
    ax.set_title(f"kvbm replay: {os.path.basename(source)}\nG1 {_fmt_size(base['g1_blocks'])} blocks, "
                 f"G3 {_fmt_size(base['g3_blocks'])} blocks", fontsize=10)
    ax.set_ylim(0, max(0.05, bound * 1.1))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    limit = args.limit if args.limit > 0 else (200 if args.bytes else 0)
    trace, source = load_trace(args.trace, limit)
    opts = _options(args)
    if opts["g2_blocks"] == 0 and opts["g3_blocks"] == 0:
        raise ConfigError("size G2 or G3 (--g2-blocks / --g3-blocks are both 0)")
    if args.instances > 1 or args.g4_blocks > 0:
        if args.sweep:
            raise ConfigError("--sweep replays one instance; drop --instances/--g4-blocks or --sweep")
        if args.bytes:
            raise ConfigError("--bytes moves bytes for one instance; --instances/--g4-blocks use the hit-rate model")
        if args.load_steps:
            raise ConfigError("--load-steps models one instance's loads; drop --instances/--g4-blocks or --load-steps")
        if args.g4_blocks > 0 and opts["g2_blocks"] == 0:
            raise ConfigError("--g4-blocks needs G2 (--g2-blocks > 0), as kvbm's remote tier does")
        r = _run_instances(trace, opts, args, source)
        if args.json:
            print(json.dumps(r, sort_keys=True))
        else:
            _print_instances(r, source)
        return 0
    if args.sweep:
        return _sweep(trace, opts, args, source)
    r = _run_one(trace, opts, args, source)
    if args.json:
        print(json.dumps(r, sort_keys=True))
    else:
        _print_report(r, source)
    if r["mismatched_blocks"]:
        print(f"kvbm replay: error: {r['mismatched_blocks']} loaded blocks had wrong bytes", file=sys.stderr)
        return 1
    return 0 if math.isfinite(r["token_hit_rate"]) else 1
