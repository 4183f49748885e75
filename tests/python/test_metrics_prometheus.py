"""A real Prometheus server scrapes kvbm's endpoint during `kvbm replay`, and the values read
back through Prometheus' HTTP API equal what the replay reports.

Needs /usr/bin/prometheus (Debian package `prometheus`, installed by .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(prom_port: int, expr: str):
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_replay_metrics():
    kvbm_port, prom_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                "global:\n  scrape_interval: 1s\n"
                "scrape_configs:\n  - job_name: kvbm\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{kvbm_port}']\n"
            )
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = dict(os.environ, DYN_KVBM_METRICS="true", DYN_KVBM_METRICS_PORT=str(kvbm_port))
        replay = subprocess.Popen(
            [sys.executable, "-m", "kvbm", "replay", "--limit", "800", "--json", "--no-progress", "--linger", "15"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = replay.stdout.readline()  # printed when the replay is done, before lingering
            assert line, replay.stderr.read()
            report = json.loads(line)
            assert report["metrics_port"] == kvbm_port
            expected_matched = report["onboard_blocks"]["g2_to_g1"] * report["block_size"]
            assert expected_matched > 0
            deadline = time.time() + 14
            value = None
            while time.time() < deadline:
                try:
                    value = _query(prom_port, "kvbm_matched_tokens")
                except OSError:
                    value = None
                if value == expected_matched:
                    break
                time.sleep(0.5)
            assert value == expected_matched, f"Prometheus has {value}, replay reported {expected_matched}"
            requested = _query(prom_port, "kvbm_requested_tokens")
            assert requested is not None and requested >= expected_matched
            up = _query(prom_port, 'up{job="kvbm"}')
            assert up == 1.0
        finally:
            replay.kill()
            prom.terminate()
            prom.wait(timeout=10)
            replay.wait(timeout=10)
