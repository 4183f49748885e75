"""The wheel users install: scripts/build_wheel.sh (`pip wheel .` + `auditwheel repair`), then
`pip install` into a fresh virtual environment that sees no system site-packages.

Checked: auditwheel finds no external library beyond the manylinux policy; every library the
installed extension loads outside that policy resolves to the copy inside the wheel
(kvbm.libs/), not to the Debian packages this machine built it with; and the `kvbm` command of
that environment hashes, replays and reports the versions built in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Libraries every manylinux policy lets a wheel take from the system (glibc and the C++ runtime).
POLICY_LIBS = re.compile(r"^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libresolv|"
                         r"libutil|libnsl|libcrypt)[.-]")


def _run(argv, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("auditwheel", reason="auditwheel not installed (pip install '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    r = _run(["bash", str(REPO / "scripts" / "build_wheel.sh"), str(out)], timeout=3600,
             env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file() and "manylinux" in path.name, r.stdout
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    r = _run([sys.executable, "-m", "venv", str(root)])
    assert r.returncode == 0, r.stderr
    r = _run([str(root / "bin" / "pip"), "install", "-q", str(wheel)], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def _clean_env() -> dict[str, str]:
    """No LD_LIBRARY_PATH, no PYTHONPATH: only what the environment itself provides."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYTHONPATH", "LD_PRELOAD")}


def test_auditwheel_finds_no_external_library(wheel):
    r = _run([sys.executable, "-m", "auditwheel", "show", str(wheel)])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "is consistent with the following platform tag" in text, text
    assert "manylinux" in text, text
    assert "external shared libraries are required" not in text, text


def test_extension_loads_its_libraries_from_the_wheel(venv):
    (ext,) = list((venv / "lib").glob("python3*/site-packages/kvbm/_core*.so"))
    r = _run(["ldd", str(ext)], env=_clean_env())
    assert r.returncode == 0, r.stderr
    libs_dir = os.path.realpath(ext.parent.parent / "kvbm.libs") + os.sep
    grafted = outside = 0
    for line in r.stdout.splitlines():
        name = line.strip().split()[0]
        target = line.split("=>", 1)[1].strip().split(" (")[0] if "=>" in line else ""
        assert "not found" not in line, r.stdout
        if POLICY_LIBS.match(os.path.basename(name)):
            continue
        # auditwheel's rpath is $ORIGIN/../kvbm.libs: compare resolved paths.
        if target and os.path.realpath(target).startswith(libs_dir):
            grafted += 1
        else:
            outside += 1
            print("outside the wheel:", line)
    assert outside == 0, r.stdout
    assert grafted >= 3, r.stdout  # ZeroMQ, liburing, xxHash at least


def test_kvbm_command_runs_from_the_fresh_environment(venv, tmp_path):
    kvbm = str(venv / "bin" / "kvbm")
    env = _clean_env()
    # cwd outside the repository, so python/kvbm (no extension) cannot be imported by mistake
    r = _run([kvbm, "hash", "--block-size", "4", "--salt-hash", "0", "1", "2", "3", "4", "5", "6", "7", "8"],
             cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert len([line for line in lines if line.strip()]) == 2, r.stdout
    from kvbm import _core  # the same hashes as the developer install

    expected = [f"{b.block_hash} {b.sequence_hash}" for b in _core.hash_token_blocks(list(range(1, 9)), 4, 0)]
    assert [line for line in lines if line.strip()] == expected

    r = _run([kvbm, "replay", "--limit", "100", "--json"], cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["requests"] == 100

    r = _run([kvbm, "build-info", "--json"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["extension"].startswith(str(venv)), info
    for key in ("compiler", "zeromq", "zeromq_loaded", "xxhash", "liburing", "fmt", "nanobind"):
        assert info[key] and info[key] != "unknown", (key, info)


# vLLM with the wheel: what a vLLM user does is `pip install kvbm` into the environment vLLM is
# already in. The environment sees the machine's vLLM and torch (system site-packages) but its
# own kvbm comes from the wheel; the script checks that, then runs the tiny model through
# vLLM's offline engine without and with kvbm's connector.
_VLLM_WITH_WHEEL = r"""
import json, os, sys
import kvbm
assert kvbm.__file__.startswith(sys.prefix), (kvbm.__file__, sys.prefix)
from kvbm.testing import vllm_runner as vr
from kvbm.testing.chat_workload import chat_prompts
from kvbm.testing.tiny_model import write_tiny_llama
model = str(write_tiny_llama(sys.argv[1]))
prompts = chat_prompts()
llm = vr.make_llm(model, with_kvbm=False, gpu_blocks=48, max_model_len=1504)
base = vr.run_sequential(llm, prompts).tokens
vr.close_llm(llm)
with vr.kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=64, DYN_KVBM_CPU_CACHE_GB=None):
    llm = vr.make_llm(model, with_kvbm=True, gpu_blocks=48, max_model_len=1504)
    with_kvbm = vr.run_sequential(llm, prompts).tokens
    counters = vr.kvbm_counters()
    vr.close_llm(llm)
print(json.dumps({"kvbm": kvbm.__file__, "same": base == with_kvbm, "leader": counters.get("leader", {})}))
"""


@pytest.fixture(scope="module")
def vllm_venv(wheel, tmp_path_factory) -> Path:
    """A second environment, on top of the machine's packages, with the wheel installed into it."""
    from kvbm.testing.vllm_runner import vllm_available

    reason = vllm_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise RuntimeError(f"CI is set but vLLM does not import ({reason})")
        pytest.skip(f"vLLM not importable ({reason})")
    root = tmp_path_factory.mktemp("venv-vllm")
    r = _run([sys.executable, "-m", "venv", "--system-site-packages", str(root)])
    assert r.returncode == 0, r.stderr
    # --ignore-installed: the machine's own kvbm (same version) must not satisfy the install
    r = _run([str(root / "bin" / "pip"), "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_vllm_serves_identical_outputs_with_the_installed_wheel(vllm_venv, tmp_path):
    r = _run([str(vllm_venv / "bin" / "python"), "-c", _VLLM_WITH_WHEEL, str(tmp_path / "model")],
             cwd=tmp_path, env=_clean_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["kvbm"].startswith(str(vllm_venv)), out
    assert out["same"], out
    # later turns of the chat come back from kvbm's G2 (G1 is smaller than the live prefixes)
    assert out["leader"].get("onboard_host_blocks", 0) > 0, out
