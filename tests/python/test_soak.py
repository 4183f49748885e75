"""The quick soak (scripts/soak.sh --quick, ~75 s): the connector core under traffic with aborts,
G2 pressure, G3 read/write errors, corrupted and refused G3 writes and, when redis-server is
installed, a G4 node killed and restarted. Every check of the soak must pass, and every kind of
fault must actually have been injected (a soak that injected nothing proves nothing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_soak(tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "soak.sh"), "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["ok"] and all(s["checks"].values()), s["checks"]
    assert s["wrong_bytes"] == 0 and s["blocks"]["wrong"] == 0
    assert s["blocks"]["loaded"] > 100 and s["blocks"]["verified"] > s["blocks"]["loaded"]
    f = s["faults_injected"]
    assert f["aborts_mid_load"] > 0 and f["eio_ranges"] > 0 and f["corrupt_pages"] > 0 and f["efbig_windows"] > 0
    assert f["g2_pressure_phases"] > 0
    # The injected disk faults reached kvbm: failed I/Os were counted and survived as load errors
    # or dropped writes, never as wrong bytes.
    assert s["kvbm_counters"]["io_errors"] > 0
    assert s["pools_at_end"]["host"]["active"] == 0 and s["pools_at_end"]["disk"]["active"] == 0
    assert s["leader"]["onboard_host_blocks"] > 0 and s["leader"]["onboard_disk_blocks"] > 0
    if shutil.which("redis-server"):
        assert s["g4"] and f["g4_kills"] > 0 and f["g4_restarts"] == f["g4_kills"]
        assert s["leader"]["onboard_remote_blocks"] > 0
    # Nothing of the run is left behind (the G3 file, the Redis nodes' directories).
    assert not list(tmp_path.glob("kvbm-soak-run-*"))
