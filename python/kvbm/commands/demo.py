"""``kvbm demo``: vLLM with kvbm on a tiny local model and a multi-turn chat from a real trace.

The same conversation turns (20 requests from the Mooncake trace, see
kvbm/testing/chat_workload.py) go through vLLM twice, one turn at a time: once alone, once with
kvbm as its KV connector. The engine's own cache (G1) is kept too small for the conversations,
so a later turn finds its prefix evicted; with kvbm it comes back from host memory (G2) or disk
(G3) instead of being recomputed. Prints where the prefix tokens came from, time to first
token with and without kvbm, and whether the generated tokens are identical.

vLLM's own log lines are hidden unless ``--verbose``; a progress bar on stderr (drawn only on a
terminal) follows the turns. ``--plot FILE`` draws time to first token per turn, without and
with kvbm, marking where each kvbm turn's prefix came from (G1, G2, G3 or nowhere).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

from kvbm.commands._args import decimal


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="vLLM + kvbm on a tiny model: per-tier hits, TTFT, identical outputs")
    p.add_argument("--gpu-blocks", type=int, default=48, help="engine (G1) blocks of 32 tokens (default 48)")
    p.add_argument("--host-blocks", type=int, default=24, help="kvbm G2 blocks (default 24)")
    p.add_argument("--disk-blocks", type=int, default=400, help="kvbm G3 blocks (default 400)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn (default 8)")
    p.add_argument("--verbose", action="store_true", help="show vLLM's and kvbm's log output")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of time to first token per turn (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")
    return p


# Loggers whose lines are noise for the demo's reader: vLLM's (one logger tree, configured by
# VLLM_LOGGING_LEVEL before vllm is imported), and the libraries it pulls in.
_NOISY_LOGGERS = ("vllm", "transformers", "torch", "urllib3", "filelock")


def _quiet_vllm(verbose: bool) -> None:
    """Before vLLM is imported: keep only errors from it (and kvbm's C++ core) unless verbose.

    ERROR, not WARNING: vLLM warns at start on a CPU-only machine about things that do not
    matter here (no GPU, the tokenizer-less model's "Chat template warmup failed", ...).
    """
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ warnings (CPU NUMA binding, ...)
    os.environ.setdefault("KVBM_LOG", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class _TurnProgress:
    """``label [#####.....] 7/20 turns, 3.1 s`` on stderr, redrawn in place (terminal only)."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.start = time.monotonic()
        self(-1, None)

    def __call__(self, index: int, _result) -> None:
        if not self.enabled:
            return
        done = index + 1
        width = 30
        filled = width * done // max(self.total, 1)
        sys.stderr.write(f"\r  {self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} turns, "
                         f"{time.monotonic() - self.start:.1f} s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _tier_of_turn(before: dict, after: dict, engine_cached_tokens: int, block_size: int) -> str:
    """Where a kvbm turn's prefix came from: the deepest tier that served any of it."""
    disk = after.get("onboard_disk_blocks", 0) - before.get("onboard_disk_blocks", 0)
    host = after.get("onboard_host_blocks", 0) - before.get("onboard_host_blocks", 0)
    if disk > 0:
        return "G3"
    if host > 0:
        return "G2"
    if engine_cached_tokens > 0:
        return "G1"
    return "none"


def _base_tier(engine_cached_tokens: int) -> str:
    return "G1" if engine_cached_tokens > 0 else "none"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"kvbm demo --plot needs matplotlib ({e}); install it with: pip install matplotlib") from e


def write_plot(path: str, base_ttft_s: list[float], kvbm_ttft_s: list[float], base_tiers: list[str],
               kvbm_tiers: list[str]) -> None:
    """Time to first token per turn, both runs; each point's marker says where its prefix came from."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"none": ("o", "computed (no cached prefix)"), "G1": ("s", "prefix from G1 (vLLM's cache)"),
               "G2": ("^", "prefix from G2 (kvbm host memory)"), "G3": ("D", "prefix from G3 (kvbm disk)")}
    turns = list(range(1, len(base_ttft_s) + 1))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for label, ttft, tiers, color in (("vLLM alone", base_ttft_s, base_tiers, "tab:gray"),
                                      ("vLLM + kvbm", kvbm_ttft_s, kvbm_tiers, "tab:blue")):
        ms = [1000 * t for t in ttft]
        ax.plot(turns, ms, color=color, linewidth=1.2, alpha=0.7, label=label)
        for tier, (marker, _) in markers.items():
            xs = [x for x, t in zip(turns, tiers) if t == tier]
            ys = [y for y, t in zip(ms, tiers) if t == tier]
            if xs:
                ax.scatter(xs, ys, marker=marker, s=46, color=color, edgecolors="black", linewidths=0.5, zorder=3)
    # Legend for the markers, independent of colour.
    for tier, (marker, text) in markers.items():
        if tier in base_tiers or tier in kvbm_tiers:
            ax.scatter([], [], marker=marker, s=46, color="white", edgecolors="black", linewidths=0.8, label=text)
    ax.set_xlabel("turn (arrival order, 4 interleaved conversations)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_xticks(turns)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title("kvbm demo: TTFT per turn, tiny Llama on vLLM (CPU)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the data
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from kvbm.testing import vllm_runner as vr

    if args.plot:
        _require_matplotlib()  # before a minute of engine work, not after
    _quiet_vllm(args.verbose)
    why = vr.vllm_available()
    if why is not None:
        print(f"kvbm demo needs vLLM ({why}).\n\n{vr.INSTALL_HINT}", file=sys.stderr)
        return 1
    from kvbm.testing.chat_workload import TRACE_ROWS, chat_prompts

    prompts = chat_prompts()
    model = vr.tiny_model_dir()
    max_len = (args.gpu_blocks - 1) * vr.BLOCK_SIZE
    print(f"model: tiny Llama (2 layers, hidden 256, random weights) in {model}")
    print(f"workload: {len(prompts)} turns of 4 conversations (Mooncake trace lines "
          f"{TRACE_ROWS[0][0]}..{TRACE_ROWS[-1][0]}), {sum(map(len, prompts))} prompt tokens")
    print(f"G1 (vLLM's own cache): {args.gpu_blocks} blocks x {vr.BLOCK_SIZE} tokens; "
          f"kvbm G2 {args.host_blocks} blocks, G3 {args.disk_blocks} blocks\n")

    show_progress = sys.stderr.isatty() and not args.no_progress
    print("1/2 vLLM alone ...", flush=True)
    quiet = {} if args.verbose else {"use_tqdm_on_load": False}  # no "Loading safetensors" bar
    llm = vr.make_llm(model, with_kvbm=False, gpu_blocks=args.gpu_blocks, max_model_len=max_len, **quiet)
    base = vr.run_sequential(llm, prompts, args.max_tokens,
                             on_turn=_TurnProgress("vLLM alone ", len(prompts), show_progress))
    vr.close_llm(llm)

    print("2/2 vLLM + kvbm ...", flush=True)
    turn_tiers: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kvbm-demo-disk-") as disk, vr.kvbm_env(
        DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=args.host_blocks,
        DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=args.disk_blocks,
        DYN_KVBM_DISK_CACHE_DIR=disk,
        DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true",
    ):
        llm = vr.make_llm(model, with_kvbm=True, gpu_blocks=args.gpu_blocks, max_model_len=max_len, **quiet)
        counters_before = vr.kvbm_counters()
        progress = _TurnProgress("vLLM + kvbm", len(prompts), show_progress)
        last = [dict(counters_before["leader"])]

        def on_turn(index, result):
            now = dict(vr.kvbm_counters()["leader"])
            turn_tiers.append(_tier_of_turn(last[0], now, result.engine_cached_tokens[index], vr.BLOCK_SIZE))
            last[0] = now
            progress(index, result)

        withk = vr.run_sequential(llm, prompts, args.max_tokens, on_turn=on_turn)
        counters = vr.kvbm_counters()
        vr.close_llm(llm)

    bs = vr.BLOCK_SIZE
    total = sum(map(len, prompts))
    stats = {k: counters["leader"][k] - counters_before["leader"].get(k, 0) for k in counters["leader"]}
    g1_base = sum(base.engine_cached_tokens)
    g1_kvbm = sum(withk.engine_cached_tokens) - (stats["onboard_host_blocks"] + stats["onboard_disk_blocks"]) * bs
    g2 = stats["onboard_host_blocks"] * bs
    g3 = stats["onboard_disk_blocks"] * bs
    print("\nprompt tokens served from cache instead of being computed:")
    print(f"  {'':22s}{'vLLM alone':>12s}{'vLLM + kvbm':>13s}")
    print(f"  {'G1 engine prefix cache':22s}{g1_base:12d}{g1_kvbm:13d}")
    print(f"  {'G2 kvbm host memory':22s}{0:12d}{g2:13d}")
    print(f"  {'G3 kvbm disk':22s}{0:12d}{g3:13d}")
    print(f"  {'computed':22s}{total - g1_base:12d}{total - g1_kvbm - g2 - g3:13d}")
    w = counters.get("worker", {})
    print(f"kvbm moved: {stats['store_host_blocks']} blocks G1->G2, {stats['offload_disk_blocks']} G2->G3, "
          f"{w.get('blocks_h2d', 0)} G2->G1, {w.get('blocks_disk2d', 0)} G3->G1; load errors {stats['load_errors']}")

    def ms(xs):
        return f"{1000 * statistics.mean(xs):7.1f} ms mean, {1000 * sum(xs):7.0f} ms total"

    print("\ntime to first token per turn:")
    print(f"  vLLM alone   {ms(base.ttft_s)}")
    print(f"  vLLM + kvbm  {ms(withk.ttft_s)}")
    same = base.tokens == withk.tokens
    diff = sum(a != b for a, b in zip(base.tokens, withk.tokens))
    print(f"\ngenerated tokens identical with and without kvbm: {'yes' if same else f'NO ({diff} turns differ)'}")
    if args.plot:
        write_plot(args.plot, base.ttft_s, withk.ttft_s, [_base_tier(c) for c in base.engine_cached_tokens], turn_tiers)
        print(f"plot: {args.plot}")
    return 0 if same else 1
