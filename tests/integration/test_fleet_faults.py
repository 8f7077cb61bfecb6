"""A misconfigured or sick LLM fleet fails the shard loudly and leaves the data alone.

Against real test LLM servers on loopback: a wrong API key or model name stops the run
before any document is requested (exit 3, no output, no quarantine); requests that time
out everywhere fail the shard within the budget the settings give; a slow endpoint is
routed around; a request that kills its worker is rejected without being handed to the
next one; token figures match what the servers counted, faults included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.publish import publish_shard
from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import EndpointsUnavailable, FleetRefused
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import Registry
from maga_tasks.settings import RunSettings

RECIPE = load_recipe()
PAIRS = RECIPE.pairs_per_document

pytestmark = pytest.mark.integration


def settings(*urls: str, **extra) -> RunSettings:
    values = dict(endpoints=urls, max_concurrency=16, backoff_base_s=0.05, backoff_max_s=0.2, progress_interval_s=1)
    values.update(extra)
    return RunSettings(**values)


def maga(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def publish_args(source: Path, out: Path, registry: str, url: str, *extra: str) -> list[str]:
    return ["publish-shard", str(source), "--output-root", str(out), "--registry", registry, "--endpoint", url, *extra]


def assert_nothing_written(out: Path, shard: str) -> None:
    paths = shard_paths(str(out), RECIPE.recipe_id, shard)
    for uri in (paths.data, paths.rejected, paths.export):
        assert not Path(uri).exists(), uri


@pytest.mark.parametrize(
    "mistake, cause",
    [
        ({"env": {"MAGA_API_KEY": "wrong-key"}}, "refused the API key"),
        ({"args": ["--served-model", "no-such-model"]}, "does not serve model 'no-such-model'"),
    ],
    ids=["wrong-key", "wrong-model"],
)
def test_wrong_key_or_model_fails_before_any_document_then_the_fix_registers(
    tmp_path, llm_server_factory, mistake, cause
):
    server = llm_server_factory(extra=["--api-key", "right-key", "--model", RECIPE.model])
    source = write_sample_corpus(tmp_path / "src", 1, 12)[0]
    out, registry = tmp_path / "out", str(tmp_path / "registry.sqlite")

    wrong = maga(*publish_args(source, out, registry, server.url, *mistake.get("args", [])),
                 env=mistake.get("env", {"MAGA_API_KEY": "right-key"}))
    assert wrong.returncode == 3, wrong.stderr
    error_lines = [line for line in wrong.stderr.splitlines() if line.startswith("maga: error:")]
    assert len(error_lines) == 1 and cause in error_lines[0] and server.url in error_lines[0], wrong.stderr
    assert server.stats()["requests_total"] == 0  # refused at readiness: no document was requested
    assert_nothing_written(out, source.stem)
    row = Registry(registry).shard(RECIPE.recipe_id, source.stem)
    assert row is None or row["status"] not in ("quarantined", "registered"), row

    fixed = maga(*publish_args(source, out, registry, server.url), env={"MAGA_API_KEY": "right-key"})
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout.splitlines()[-1])["status"] == "registered"
    by_doc = server.stats()["by_doc"]
    assert len(by_doc) == 12 and set(by_doc.values()) == {1 + PAIRS}  # every document asked once


def test_a_context_too_short_for_the_recipe_is_refused_before_any_document(tmp_path, llm_server_factory):
    server = llm_server_factory(extra=["--max-model-len", str(RECIPE.required_context_tokens - 1)])
    source = write_sample_corpus(tmp_path / "src", 1, 4)[0]
    with pytest.raises(EndpointsUnavailable, match="max_model_len"):
        expand_shard(str(source), str(tmp_path / "out"), RECIPE, settings(server.url))
    assert server.stats()["requests_total"] == 0


@pytest.mark.parametrize(
    "root, verdict",
    [
        ("/models/hub/models--org--maga/snapshots/3f1c2a9", "served"),  # the hub cache's commit folder
        ("/srv/weights/maga/3f1c2a9/", "served"),  # a folder named after the revision
        ("/models/hub/models--org--maga/snapshots/8d0e4b1", "refused"),
        ("org/maga@8d0e4b1", "refused"),
        ("org/maga", "unchecked"),  # a bare hub id names no revision: the card cannot tell
    ],
)
def test_the_recipe_model_revision_is_checked_against_the_weights_the_worker_loaded(
    tmp_path, llm_server_factory, caplog, root, verdict
):
    server = llm_server_factory(extra=["--model-root", root])
    recipe = load_recipe(model_revision="3f1c2a9")
    source = write_sample_corpus(tmp_path / "src", 1, 3)[0]
    if verdict == "refused":
        with pytest.raises(FleetRefused, match="not the recipe's model_revision '3f1c2a9'"):
            expand_shard(str(source), str(tmp_path / "out"), recipe, settings(server.url))
        assert server.stats()["requests_total"] == 0
        return
    result = expand_shard(str(source), str(tmp_path / "out"), recipe, settings(server.url))
    assert result.documents == 3 and result.recipe_id == recipe.recipe_id
    assert ("names no revision" in caplog.text) == (verdict == "unchecked")


def test_requests_timing_out_everywhere_fail_the_shard_within_the_budget(tmp_path, llm_server_factory):
    slow = [llm_server_factory(latency_ms=5_000), llm_server_factory(latency_ms=5_000)]
    source = write_sample_corpus(tmp_path / "src", 1, 8)[0]
    run = settings(*(s.url for s in slow), request_timeout_s=0.5, max_attempts=3)
    # Every request spends at most max_attempts timeouts and backoffs; the readiness check
    # and the tokenizer-free start take a few seconds at most.
    bound = run.max_attempts * (run.request_timeout_s + run.backoff_max_s) + 10.0
    started = time.monotonic()
    with pytest.raises(
        EndpointsUnavailable, match=r"requests time out after 0.5 s on every endpoint: raise request_timeout_s"
    ):
        expand_shard(str(source), str(tmp_path / "out"), RECIPE, run)
    assert time.monotonic() - started < bound
    assert_nothing_written(tmp_path / "out", source.stem)


def test_one_slow_endpoint_is_routed_around(tmp_path, llm_server_factory):
    slow, fast = llm_server_factory(latency_ms=5_000), llm_server_factory()
    source = write_sample_corpus(tmp_path / "src", 1, 20)[0]
    result = expand_shard(str(source), str(tmp_path / "out"), RECIPE,
                          settings(slow.url, fast.url, request_timeout_s=0.5, max_attempts=3))
    assert result.documents == 20 and result.accepted == 20 * PAIRS, result.rejects_by_reason


def test_a_request_that_kills_its_worker_is_rejected_and_not_handed_on(tmp_path, llm_server_factory):
    source = write_sample_corpus(tmp_path / "src", 1, 10)[0]
    victim_id = pq.read_table(source, columns=["id"]).column("id")[3].as_py()
    poison = f"crash:doc={quote(f'{source.stem}:{victim_id}', safe='')}"
    first, second = llm_server_factory(poison), llm_server_factory(poison)
    # One request in flight at a time, so the worker that dies held only the culprit.
    result = expand_shard(str(source), str(tmp_path / "out"), RECIPE,
                          settings(first.url, second.url, max_concurrency=1, endpoint_probe_interval_s=0.5))
    assert result.documents == 10
    assert result.rejects_by_reason == {"pairs_request_endpoint_died": PAIRS}, result.rejects_by_reason
    assert result.accepted == 9 * PAIRS
    assert sum(server.alive() for server in (first, second)) == 1  # the other worker survived
    rejected = pq.read_table(result.rejected_uri).to_pylist()
    assert {row["source_id"] for row in rejected} == {victim_id}


def test_registered_tokens_equal_the_servers_counted_usage_under_faults(tmp_path, llm_server_factory, registry_url):
    faults = ("http500:0.2", "disconnect:0.05", "bad_json:0.3", "wrong_count:0.2", "truncate:0.1", "empty:0.05")
    servers = [llm_server_factory(*faults), llm_server_factory(*faults)]
    source = write_sample_corpus(tmp_path / "src", 1, 40)[0]
    registry = Registry(registry_url)
    registry.upgrade()
    summary = publish_shard(str(source), str(tmp_path / "out"), RECIPE, settings(*(s.url for s in servers)),
                            registry, owner="test")
    row = registry.shard(RECIPE.recipe_id, source.stem)
    stats = [s.stats() for s in servers]
    assert sum(sum(s["faults_fired"].values()) for s in stats) > 0
    assert row["status"] in ("registered", "quarantined"), summary
    assert row["prompt_tokens"] == sum(s["prompt_tokens_total"] for s in stats)
    assert row["completion_tokens"] == sum(s["completion_tokens_total"] for s in stats)


def test_quarantined_shard_is_requeued_and_registers_with_its_old_output_kept_aside(tmp_path, llm_server_factory):
    broken, healthy = llm_server_factory("empty:1"), llm_server_factory()
    source = write_sample_corpus(tmp_path / "src", 1, 6)[0]
    out, registry = tmp_path / "out", str(tmp_path / "registry.sqlite")
    first = maga(*publish_args(source, out, registry, broken.url))
    assert json.loads(first.stdout.splitlines()[-1])["status"] == "quarantined", first.stderr
    paths = shard_paths(str(out), RECIPE.recipe_id, source.stem)
    old_rejected = Path(paths.rejected).read_bytes()

    again = maga(*publish_args(source, out, registry, healthy.url))  # quarantine holds without requeue
    assert json.loads(again.stdout.splitlines()[-1])["status"] == "quarantined"
    requeued = maga("requeue", source.stem, "--registry", registry, "--recipe-id", RECIPE.recipe_id,
                    "--output-root", str(out))
    assert requeued.returncode == 0, requeued.stderr
    summary = json.loads(requeued.stdout.splitlines()[-1])
    assert summary["requeued"] == 1
    aside = Path(summary["shards"][0]["moved_to"])
    assert (aside / "rejected" / f"{source.stem}.parquet").read_bytes() == old_rejected
    assert not Path(paths.data).exists() and not Path(paths.rejected).exists()

    fixed = maga(*publish_args(source, out, registry, healthy.url))
    assert json.loads(fixed.stdout.splitlines()[-1])["status"] == "registered", fixed.stderr
    assert healthy.stats()["by_doc"] and set(healthy.stats()["by_doc"].values()) == {1 + PAIRS}
    events = [e["event"] for e in Registry(registry).events(RECIPE.recipe_id, source.stem)]
    assert "requeue" in events
