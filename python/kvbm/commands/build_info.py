"""``kvbm build-info``: the versions built into this installation (bug reports, wheel checks)."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("build-info", help="versions of kvbm, its compiler and the libraries built in")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def info() -> dict:
    import kvbm
    from kvbm import _core

    out = {"kvbm": getattr(kvbm, "__version__", _core.__version__), "python": platform.python_version(),
           "extension": _core.__file__}
    out.update(_core.build_info())
    return out


def run(args: argparse.Namespace) -> int:
    d = info()
    if args.json:
        print(json.dumps(d, sort_keys=True))
        return 0
    width = max(map(len, d))
    for k, v in d.items():
        print(f"{k:<{width}}  {v}", file=sys.stdout)
    return 0
