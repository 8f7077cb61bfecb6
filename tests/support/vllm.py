"""The real vLLM CPU engine serving `maga-tiny` in tests: the script that builds the tiny
model, its recipe and the server's settings. The session fixtures (`tiny_model_dir`,
`vllm_python`, `vllm_api_key`, `vllm_server`) are in tests/conftest.py: one server serves
every test that asks for it, so the ~1 minute startup is paid once a run.

Without the vLLM virtualenv the server fixtures skip, unless MAGA_REQUIRE_VLLM=1 (CI),
where a missing engine is a failure rather than a silent skip.
"""

from __future__ import annotations

from tests.support.paths import REPO

BUILD_TINY_MODEL = REPO / "scripts" / "build_tiny_model.py"
TINY_RECIPE = REPO / "maga_tasks" / "recipes" / "tiny.yaml"
TINY_SERVED_NAME = "maga-tiny"
VLLM_MAX_MODEL_LEN = 2048
