"""`kvbm demo`: quiet by default, and `--plot FILE` writes a readable PNG.

The plot itself is tested without vLLM (write_plot on known values); the whole demo, with the
real engine, is checked for its exit status, its quiet output and the PNG it writes.
"""

from __future__ import annotations

import struct

import pytest

from kvbm.testing.vllm_guard import vllm_marks


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    return width, height


def test_write_plot_draws_both_runs_and_every_tier(tmp_path):
    pytest.importorskip("matplotlib")
    from kvbm.commands.demo import write_plot

    path = tmp_path / "ttft.png"
    base = [0.050, 0.060, 0.055, 0.070]
    withk = [0.050, 0.020, 0.025, 0.030]
    write_plot(str(path), base, withk, ["none", "G1", "none", "none"], ["none", "G1", "G2", "G3"])
    w, h = _png_size(path)
    assert (w, h) == (1320, 576)  # 11 x 4.8 inches at 120 dpi


def test_tier_of_turn_takes_the_deepest_tier_used():
    from kvbm.commands.demo import _tier_of_turn

    before = {"onboard_host_blocks": 3, "onboard_disk_blocks": 1}
    assert _tier_of_turn(before, {"onboard_host_blocks": 5, "onboard_disk_blocks": 2}, 128, 32) == "G3"
    assert _tier_of_turn(before, {"onboard_host_blocks": 5, "onboard_disk_blocks": 1}, 64, 32) == "G2"
    assert _tier_of_turn(before, dict(before), 32, 32) == "G1"
    assert _tier_of_turn(before, dict(before), 0, 32) == "none"


def _with_vllm(test):
    for mark in vllm_marks():
        test = mark(test)
    return test


@pytest.mark.slow
@_with_vllm
def test_demo_is_quiet_and_plots(tmp_path, run_kvbm):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    r = run_kvbm("demo", "--plot", str(path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generated tokens identical with and without kvbm: yes" in r.stdout
    assert f"plot: {path}" in r.stdout
    assert _png_size(path)[0] > 0
    # vLLM's logs are hidden: no log lines, no warnings, no tracebacks on either stream
    noise = [line for line in (r.stdout + r.stderr).splitlines()
             if " WARNING " in line or " INFO " in line or "Traceback" in line or "warmup failed" in line]
    assert noise == [], noise[:20]
    assert len(r.stderr.splitlines()) <= 2, r.stderr[-3000:]
