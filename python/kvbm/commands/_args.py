"""Strict argument types shared by the ``kvbm`` subcommands.

The reference (Dynamo's KVBM, vLLM) takes sizes, token ids and hashes in decimal, so these
accept decimal digits only: no ``0x10``, no ``1_000``, no sign, no spaces. Each checks its range
here, before any value reaches the C++ core, so a bad value is an argparse error naming the
option (exit 2), never a traceback from a conversion inside the extension.
"""

from __future__ import annotations

import argparse
import math
import re

_DECIMAL = re.compile(r"[0-9]+")

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


def parse_decimal(text: str, what: str, lo: int, hi: int) -> int:
    """``text`` as a decimal integer in [lo, hi]; ArgumentTypeError naming ``what`` otherwise."""
    if not _DECIMAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{what} must be a decimal integer, got {text!r}")
    value = int(text, 10)
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{what} must be in [{lo}, {hi}], got {text}")
    return value


def decimal(what: str, lo: int, hi: int):
    """An argparse ``type=`` for a decimal integer in [lo, hi]."""

    def convert(text: str) -> int:
        return parse_decimal(text, what, lo, hi)

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def finite_float(what: str, lo: float = 0.0, hi: float = math.inf, allow_inf: bool = False):
    """An argparse ``type=`` for a decimal float in [lo, hi] (``inf`` only if allowed)."""

    def convert(text: str) -> float:
        t = text.strip().lower()
        if allow_inf and t in ("inf", "infinity"):
            return math.inf
        if not re.fullmatch(r"[0-9]*\.?[0-9]*(e[+-]?[0-9]+)?", t) or not re.search(r"[0-9]", t.split("e")[0]):
            raise argparse.ArgumentTypeError(f"{what} must be a decimal number, got {text!r}")
        value = float(t)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"{what} must be in [{lo:g}, {hi:g}], got {text}")
        return value

    convert.__name__ = what
    return convert
