"""``kvbm demo``: vLLM with kvbm on a tiny local model and a multi-turn chat from a real trace.

The same conversation turns (20 requests from the Mooncake trace, see
kvbm/testing/chat_workload.py) go through vLLM twice, one turn at a time: once alone, once with
kvbm as its KV connector. The engine's own cache (G1) is kept too small for the conversations,
so a later turn finds its prefix evicted; with kvbm it comes back from host memory (G2) or disk
(G3) instead of being recomputed. Prints where the prefix tokens came from, time to first
token with and without kvbm, and whether the generated tokens are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from kvbm.commands._args import decimal


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="vLLM + kvbm on a tiny model: per-tier hits, TTFT, identical outputs")
    p.add_argument("--gpu-blocks", type=decimal("--gpu-blocks", 1, 1 << 31), default=48, help="engine (G1) blocks of 32 tokens (default 48)")
    p.add_argument("--host-blocks", type=decimal("--host-blocks", 0, 1 << 31), default=24, help="kvbm G2 blocks (default 24)")
    p.add_argument("--disk-blocks", type=decimal("--disk-blocks", 0, 1 << 31), default=400, help="kvbm G3 blocks (default 400)")
    p.add_argument("--max-tokens", type=decimal("--max-tokens", 1, 1 << 31), default=8, help="tokens generated per turn (default 8)")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's log output")
    return p


def _quiet_vllm(verbose: bool) -> None:
    import os

    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def run(args: argparse.Namespace) -> int:
    from kvbm.testing import vllm_runner as vr

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

    print("1/2 vLLM alone ...", flush=True)
    llm = vr.make_llm(model, with_kvbm=False, gpu_blocks=args.gpu_blocks, max_model_len=max_len)
    base = vr.run_sequential(llm, prompts, args.max_tokens)
    vr.close_llm(llm)

    print("2/2 vLLM + kvbm ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvbm-demo-disk-") as disk, vr.kvbm_env(
        DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=args.host_blocks,
        DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=args.disk_blocks,
        DYN_KVBM_DISK_CACHE_DIR=disk,
        DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true",
    ):
        llm = vr.make_llm(model, with_kvbm=True, gpu_blocks=args.gpu_blocks, max_model_len=max_len)
        counters_before = vr.kvbm_counters()
        withk = vr.run_sequential(llm, prompts, args.max_tokens)
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
    return 0 if same else 1
