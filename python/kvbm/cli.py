"""The ``kvbm`` command line.

Each subcommand is a module of :mod:`kvbm.commands` (``kvbm/commands/<name>.py``) with

* ``add_parser(subparsers)``: adds its parser (``subparsers.add_parser(<name>, ...)``) and
  returns it;
* ``run(args) -> int | None``: does the work; the return value is the exit status (None: 0).

Modules are found by listing the package, so adding a subcommand is adding a file. A module
whose import fails still gets a subcommand that reports the failure, so one broken optional
dependency never takes the other subcommands down. Modules whose name starts with ``_`` are
helpers, not subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

import kvbm.commands


def _command_modules() -> list[tuple[str, ModuleType | None, BaseException | None]]:
    found = []
    for info in sorted(pkgutil.iter_modules(kvbm.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            found.append((info.name, importlib.import_module(f"kvbm.commands.{info.name}"), None))
        except Exception as e:  # noqa: BLE001 - reported when the subcommand is used
            found.append((info.name, None, e))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvbm", description="kvbm: tiered KV-cache block manager for LLM inference."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, error in _command_modules():
        if module is None:
            sub = subparsers.add_parser(name, help=f"(unavailable: {error})")
            sub.set_defaults(_run=_unavailable(name, error))
            continue
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _unavailable(name: str, error: BaseException):
    def run(_args: argparse.Namespace) -> int:
        print(f"kvbm: error: the '{name}' command could not be loaded: {error!r}", file=sys.stderr)
        return 1

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from kvbm import __version__

        print(__version__)
        return 0
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    from kvbm.errors import KvbmError

    # Every error a user's input or environment can cause ends here as one line and exit 2 (as
    # argparse's own usage errors): kvbm's errors (bad settings, unreadable or malformed input)
    # and the OS's (a file that cannot be opened). A traceback means a bug in kvbm.
    try:
        status = args._run(args)
    except (KvbmError, OSError) as e:
        print(f"kvbm: error: {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if status is None else int(status)


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
