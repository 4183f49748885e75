"""``kvbm hash``: sequence hashes of a token list, as the reference computes them."""

from __future__ import annotations

import argparse

from kvbm.commands._args import U32_MAX, U64_MAX, decimal

_token = decimal("TOKEN (an unsigned 32-bit token id)", 0, U32_MAX)
_u64 = decimal("--salt-hash (an unsigned 64-bit hash)", 0, U64_MAX)
# The core takes the block size as a 32-bit count of tokens.
_block_size = decimal("--block-size (tokens per block)", 1, U32_MAX)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hash",
        help="print '<block_hash> <sequence_hash>' for each full block of TOKENs",
        description=(
            "Prints one line '<block_hash> <sequence_hash>' (decimal) per full block of the "
            "tokens; a partial tail is not hashed. The salt hash is --salt-hash, or derived "
            "from --salt/--lora as the reference does; with neither it is the salt hash of {} "
            "(no salt, no LoRA)."
        ),
    )
    p.add_argument("--block-size", type=_block_size, required=True, help="tokens per block")
    p.add_argument("--salt-hash", type=_u64, help="the salt hash (seed) to use")
    p.add_argument("--salt", help="cache salt; the salt hash is derived from it")
    p.add_argument("--lora", help="LoRA adapter name; the salt hash is derived from it")
    p.add_argument("tokens", nargs="*", type=_token, metavar="TOKEN")
    p.set_defaults(_parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    from kvbm import compute_salt_hash, hash_token_blocks

    parser: argparse.ArgumentParser = args._parser
    if args.block_size <= 0:
        parser.error(f"--block-size must be > 0, not {args.block_size}")
    if args.salt is not None or args.lora is not None:
        salt_hash = compute_salt_hash(args.salt, args.lora)
        if args.salt_hash is not None and args.salt_hash != salt_hash:
            parser.error(
                f"--salt-hash {args.salt_hash} conflicts with --salt/--lora, whose salt hash "
                f"is {salt_hash}; give one or the other"
            )
    elif args.salt_hash is not None:
        salt_hash = args.salt_hash
    else:
        salt_hash = compute_salt_hash(None, None)
    for block in hash_token_blocks(args.tokens, args.block_size, salt_hash):
        print(f"{block.block_hash} {block.sequence_hash}")
    return 0
