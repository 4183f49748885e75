"""Shared fixtures for the Python tests of kvbm.

The tests import the installed package (``pip install .`` builds ``kvbm._core``); they never
put python/ on sys.path, whose kvbm has no compiled extension. Test-only helpers live in
tests/python/support/ (``from support.tiny_vlm import ...``), whatever pytest's import mode.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def run_kvbm():
    """Runs the ``kvbm`` command line in a subprocess; returns the CompletedProcess.

    Uses the console script installed beside this interpreter (what users type), else
    ``python -m kvbm`` with this interpreter, so the command and the tests see the same install.
    """
    script = Path(sys.executable).parent / "kvbm"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "kvbm"]

    def run(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=timeout, check=check, stdin=subprocess.DEVNULL
        )

    return run


def pytest_collection_modifyitems(config, items):
    """Tests marked `sglang` run last: importing SGLang patches transformers and redirects cache
    directories for the whole process, which the vLLM tests must not see."""
    items.sort(key=lambda item: item.get_closest_marker("sglang") is not None)
