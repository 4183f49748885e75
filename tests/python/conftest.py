"""Shared fixtures for the Python tests of kvbm.

The tests import the installed package (``pip install .`` builds ``kvbm._core``); they never
put python/ on sys.path, whose kvbm has no compiled extension.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


@pytest.fixture
def run_kvbm():
    """Runs the ``kvbm`` command line in a subprocess; returns the CompletedProcess.

    Uses the installed console script when it is on PATH (what users type), else
    ``python -m kvbm`` with this interpreter.
    """
    script = shutil.which("kvbm")
    base = [script] if script else [sys.executable, "-m", "kvbm"]

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=120, check=check, stdin=subprocess.DEVNULL
        )

    return run
