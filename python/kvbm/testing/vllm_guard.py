"""The shared opening of kvbm's tests against vLLM: prepares the CPU environment, imports vLLM,
and gives the pytest marks (`vllm`, and a skip naming the import error when vLLM is missing)."""

from __future__ import annotations

from kvbm.testing.tiny_model import prepare_cpu_environment

prepare_cpu_environment()
try:
    import vllm  # noqa: F401

    VLLM_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - any import failure means: skip, saying why
    VLLM_ERROR = f"{type(e).__name__}: {e}"


def vllm_marks() -> list:
    import os

    import pytest

    if VLLM_ERROR is not None and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        # CI installs vLLM (.ci/run): a missing vLLM there is a broken install, not a skip.
        raise RuntimeError(f"CI is set but vLLM does not import ({VLLM_ERROR}): scripts/install_vllm.sh failed?")

    return [
        pytest.mark.vllm,
        pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vLLM not importable ({VLLM_ERROR}); "
                           "install it with scripts/install_vllm.sh"),
    ]
