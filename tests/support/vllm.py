"""Session fixtures for tests against the real vLLM CPU engine serving `maga-tiny`.

Register them once for the whole run with `pytest_plugins = ["vllm_fixtures"]` (in
tests/conftest.py, or in a test module); one server then serves every test that asks
for it, so the ~1 minute startup is paid once.

Without the vLLM virtualenv the server fixtures skip, unless MAGA_REQUIRE_VLLM=1 (CI),
where a missing engine is a failure rather than a silent skip.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from maga_tasks.llm.vllm_local import VllmServer, default_vllm_python, start_vllm_server

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_TINY_MODEL = REPO_ROOT / "scripts" / "build_tiny_model.py"
TINY_RECIPE = REPO_ROOT / "maga_tasks" / "recipes" / "tiny.yaml"
TINY_SERVED_NAME = "maga-tiny"
VLLM_MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built maga-tiny (random weights, real tokenizer); ~3 s."""
    out_dir = tmp_path_factory.mktemp("models") / TINY_SERVED_NAME
    subprocess.run([sys.executable, str(BUILD_TINY_MODEL), str(out_dir)], check=True,
                   capture_output=True, text=True)
    return out_dir


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    python = default_vllm_python()
    if not python.exists():
        message = f"no vLLM virtualenv at {python} (scripts/setup_vllm_venv.sh)"
        if os.environ.get("MAGA_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def vllm_api_key() -> str:
    """A fresh key per run: tests can then look for it in logs."""
    return "maga-test-" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, vllm_python, vllm_api_key, tmp_path_factory):
    """One vLLM CPU server for the session, serving maga-tiny with an API key."""
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    server: VllmServer = start_vllm_server(
        tiny_model_dir,
        python=vllm_python,
        served_model_name=TINY_SERVED_NAME,
        max_model_len=VLLM_MAX_MODEL_LEN,
        api_key=vllm_api_key,
        log_path=log_path,
    )
    try:
        server.wait_healthy(timeout=300)
        yield server
    finally:
        server.stop()
